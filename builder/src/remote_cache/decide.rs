//! The classification of every node of a build (computed, local, remote, execute) and which
//! nodes the build needs at all; see the folder's doc.
//!
//! What it deliberately is not: IO; it decides from what it is told.

use layerwright_cache::{ActionRecord, Digest};

/// The shape of one planned node, as far as the remote cache cares.
#[derive(Debug, Clone)]
pub(crate) struct NodeShape {
    pub parent: Option<usize>,
    /// The other images it reads: a `copy_from` source, a RUN step's bind mount sources.
    pub sources: Vec<usize>,
    /// Whether the node's result is an action record (layer and base steps); scratch and
    /// config changes are computed.
    pub recorded: bool,
}

/// How a node will be satisfied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    Computed,
    Local,
    Remote,
    Execute,
}

/// The classification of every node, and which nodes the build needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub served: Vec<Served>,
    /// The nodes whose result, and so whose content, the build needs: the requested images'
    /// parent chains, and the parent and source chains of every required step that executes.
    /// Any other node need not be built at all (a stage whose `copy_from` is a hit).
    pub required: Vec<bool>,
}

pub(super) fn required_of(record: &ActionRecord, content: bool) -> impl Iterator<Item = &Digest> {
    let layers = content.then_some(&record.layers).into_iter().flatten().map(|layer| &layer.digest);
    layers.chain(record.config.as_ref())
}

/// Classifies every node (see the module doc). `local[i]`: the local store serves node `i`;
/// `remote[i]`: a remote record for its key; `requested`: the nodes whose images are built;
/// `present`: whether a blob is in the local store (or, to plan downloads, will be).
pub(crate) fn decide(
    shapes: &[NodeShape],
    local: &[bool],
    remote: &[Option<&ActionRecord>],
    requested: &[usize],
    present: impl Fn(&Digest) -> bool,
) -> Decision {
    let mut demoted = vec![false; shapes.len()];
    loop {
        let served: Vec<Served> = shapes
            .iter()
            .enumerate()
            .map(|(index, shape)| match () {
                _ if !shape.recorded => Served::Computed,
                _ if local[index] => Served::Local,
                _ if remote[index].is_some() && !demoted[index] => Served::Remote,
                _ => Served::Execute,
            })
            .collect();
        // Inputs come before the nodes that use them, so walking backwards every node is
        // final before its inputs are visited.
        let mut required = vec![false; shapes.len()];
        for top in requested {
            required[*top] = true;
        }
        for index in (0..shapes.len()).rev() {
            if !required[index] {
                continue;
            }
            if let Some(parent) = shapes[index].parent {
                required[parent] = true;
            }
            if served[index] == Served::Execute {
                for source in &shapes[index].sources {
                    required[*source] = true;
                }
            }
        }
        let mut changed = false;
        for index in 0..shapes.len() {
            let (Served::Remote, Some(record)) = (served[index], remote[index]) else { continue };
            if !required_of(record, required[index]).all(&present) {
                demoted[index] = true;
                changed = true;
            }
        }
        if !changed {
            return Decision { served, required };
        }
    }
}
