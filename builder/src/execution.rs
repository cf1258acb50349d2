//! What executing a step gets from the build: the finished states of its inputs (layers,
//! config, merged tree), the layer indexes loaded so far, and the way a step's layer is written
//! and committed under its key.
//!
//! Both the file steps (`solve::steps`) and RUN steps (`run`) execute through an [`Execution`];
//! this module sits below both so that neither imports the other.
//!
//! What it deliberately is not: a scheduler (the walk in `solve` decides what executes and when)
//! or a step implementation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use layerwright_cache::{ActionRecord, Digest, LayerRecord, StepKey, Store, StoreError};
use rayon::prelude::*;
use serde_json::Value;
use thiserror::Error;

use crate::layer::snapshot::{self, StreamedSnapshot};
use crate::layer::{self, LayerEntry, LayerError, LayerIndex, LayerOptions, TreeError};
use crate::tree::FsTree;

/// Why a step's layer could not be written, or its inputs' trees not read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ExecutionError {
    /// The layer writer refused an entry or could not write the blob.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// A layer of an input could not be read or applied.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// The cache store could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The result of one node: everything the steps above it need.
#[derive(Debug)]
pub struct NodeState {
    /// The layers, bottom first, shared with the parent's (see [`LayerStack`]).
    pub layers: LayerStack,
    /// The image config as of this step, except for the `history` entries and `rootfs.diff_ids`
    /// that `log` holds: its runtime part (`config.Env`, `User`, ...) is always current. A step
    /// shares its parent's document (`Arc`) and adds one log entry, so a chain of n steps costs
    /// O(n), not O(n²); [`NodeState::full_config`] writes the log in.
    pub config: Arc<Value>,
    /// What the steps since `config` was last copied appended to the config, newest first.
    pub log: ConfigLog,
    pub parent: Option<Arc<NodeState>>,
    /// The merged tree, computed when a step above needs it.
    tree: OnceLock<Arc<FsTree>>,
}

impl NodeState {
    /// A state whose `config` is complete (nothing pending in the log).
    #[cfg(test)]
    pub fn new(layers: Vec<LayerRecord>, config: Value, parent: Option<Arc<NodeState>>) -> NodeState {
        NodeState::with_log(LayerStack::from_layers(layers), Arc::new(config), ConfigLog::default(), parent)
    }

    pub fn with_log(
        layers: LayerStack,
        config: Arc<Value>,
        log: ConfigLog,
        parent: Option<Arc<NodeState>>,
    ) -> NodeState {
        NodeState { layers, config, log, parent, tree: OnceLock::new() }
    }

    /// The whole config document: `config` with the log's entries appended, oldest first.
    pub fn full_config(&self) -> Value {
        let mut entries = Vec::new();
        let mut next = self.log.0.as_deref();
        while let Some(entry) = next {
            entries.push(&entry.appended);
            next = entry.previous.0.as_deref();
        }
        let mut config = (*self.config).clone();
        for appended in entries.into_iter().rev() {
            match appended {
                Appended::Layer { layer, created_by, created } => {
                    crate::oci::config::push_layer(&mut config, layer, created_by, created)
                }
                Appended::Change { created_by, created } => {
                    crate::oci::config::push_change_history(&mut config, created_by, created)
                }
            }
        }
        config
    }
}

/// The layers of a state, bottom first, as a persistent list: a step's stack is its parent's
/// with one layer on top, sharing every entry below (`Arc`), so a chain of n steps holds n
/// entries, not n²/2 copies. [`LayerStack::to_vec`] materialises it where a slice is needed
/// (the final manifest, a RUN step's lowers).
#[derive(Debug, Clone, Default)]
pub struct LayerStack(Option<Arc<StackEntry>>);

#[derive(Debug)]
pub struct StackEntry {
    layer: LayerRecord,
    below: LayerStack,
    /// How many layers the stack holds with this one on top.
    len: usize,
}

impl LayerStack {
    /// A stack of `layers`, bottom first.
    pub fn from_layers(layers: impl IntoIterator<Item = LayerRecord>) -> LayerStack {
        layers.into_iter().fold(LayerStack::default(), |stack, layer| stack.with(layer))
    }

    /// This stack with `layer` on top.
    pub fn with(&self, layer: LayerRecord) -> LayerStack {
        LayerStack(Some(Arc::new(StackEntry { layer, below: self.clone(), len: self.len() + 1 })))
    }

    /// How many layers the stack holds.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |entry| entry.len)
    }

    /// The layers at positions `from..` (0 is the bottom), bottom first: the cost is that of
    /// the layers returned, not of the whole stack.
    pub fn above(&self, from: usize) -> Vec<&LayerRecord> {
        let mut layers = Vec::with_capacity(self.len().saturating_sub(from));
        let mut next = self.0.as_deref();
        while let Some(entry) = next.filter(|entry| entry.len > from) {
            layers.push(&entry.layer);
            next = entry.below.0.as_deref();
        }
        layers.reverse();
        layers
    }

    /// Every layer, bottom first.
    pub fn to_vec(&self) -> Vec<LayerRecord> {
        self.above(0).into_iter().cloned().collect()
    }
}

impl Drop for StackEntry {
    // Unlinks a long stack iteratively, as `LogEntry` does.
    fn drop(&mut self) {
        let mut next = self.below.0.take();
        while let Some(entry) = next {
            match Arc::try_unwrap(entry) {
                Ok(mut entry) => next = entry.below.0.take(),
                Err(_) => break,
            }
        }
    }
}

/// A persistent list of what steps appended to the config, newest first.
#[derive(Debug, Clone, Default)]
pub struct ConfigLog(Option<Arc<LogEntry>>);

#[derive(Debug)]
pub struct LogEntry {
    appended: Appended,
    previous: ConfigLog,
}

/// What one step appended to the config.
#[derive(Debug)]
pub enum Appended {
    /// A layer: its diff id and a history entry.
    Layer { layer: LayerRecord, created_by: String, created: String },
    /// A config step's empty-layer history entry.
    Change { created_by: String, created: String },
}

impl ConfigLog {
    /// This log with `appended` added on top.
    pub fn with(&self, appended: Appended) -> ConfigLog {
        ConfigLog(Some(Arc::new(LogEntry { appended, previous: self.clone() })))
    }
}

impl Drop for LogEntry {
    // Unlinks a long chain iteratively: a recursive drop of 100k entries would overflow the stack.
    fn drop(&mut self) {
        let mut next = self.previous.0.take();
        while let Some(entry) = next {
            match Arc::try_unwrap(entry) {
                Ok(mut entry) => next = entry.previous.0.take(),
                Err(_) => break,
            }
        }
    }
}

/// Layer indexes loaded during a build, shared by the workers.
#[derive(Debug, Default)]
pub struct IndexCache {
    indexes: Mutex<HashMap<Digest, Arc<LayerIndex>>>,
}

impl IndexCache {
    pub fn insert(&self, diff_id: Digest, index: LayerIndex) {
        self.indexes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(diff_id, Arc::new(index));
    }

    pub fn get(&self, store: &Store, layer: &LayerRecord) -> Result<Arc<LayerIndex>, TreeError> {
        if let Some(index) = self.indexes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&layer.diff_id) {
            return Ok(Arc::clone(index));
        }
        let index = layer::saved_or_indexed(store, layer)?;
        let index = Arc::new(index);
        self.indexes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(layer.diff_id.clone(), Arc::clone(&index));
        Ok(index)
    }
}

/// What a step execution needs from the build.
pub struct Execution<'a> {
    pub store: &'a Store,
    pub layer_options: LayerOptions,
    pub indexes: &'a IndexCache,
    /// Whether a RUN step of this build will stack the layer under its overlay: its snapshot
    /// is then unpacked from the tar stream while the layer is written.
    pub snapshot_for_run: bool,
}

/// A layer a step wrote.
pub struct NewLayer {
    pub record: LayerRecord,
    pub blob_bytes_written: u64,
}

impl Execution<'_> {
    /// The merged tree of `state`, built from the nearest ancestor whose tree is known.
    pub fn tree(&self, state: &Arc<NodeState>) -> Result<Arc<FsTree>, TreeError> {
        if let Some(tree) = state.tree.get() {
            return Ok(Arc::clone(tree));
        }
        // Start from the nearest ancestor whose tree is known (else from nothing) and apply the
        // layers above it, once: the trees of the steps in between are not made, so that a
        // change at the tail of a long chain costs one tree, not one per step.
        let mut ancestor = state.parent.as_ref();
        let known = loop {
            match ancestor {
                Some(node) => match node.tree.get() {
                    Some(tree) => break Some((Arc::clone(tree), node.layers.len())),
                    None => ancestor = node.parent.as_ref(),
                },
                None => break None,
            }
        };
        let (mut tree, first_own_layer) = match known {
            Some((tree, applied)) => (FsTree::clone(&tree), applied),
            None => (FsTree::default(), 0),
        };
        // The indexes are loaded in parallel (each a small file read and parsed: a change at the
        // tail of a long chain loads one per step below it), and applied in order.
        let own = state.layers.above(first_own_layer);
        let indexes = own.par_iter().map(|layer| self.indexes.get(self.store, layer)).collect::<Result<Vec<_>, _>>()?;
        for (offset, (layer, index)) in own.iter().zip(&indexes).enumerate() {
            tree.apply(first_own_layer + offset, &layer.digest, index)?;
        }
        let tree = Arc::new(tree);
        let _ = state.tree.set(Arc::clone(&tree));
        Ok(tree)
    }

    pub fn commit_layer(&self, key: &StepKey, entries: Vec<LayerEntry>) -> Result<NewLayer, ExecutionError> {
        // Only an accelerator: without it (it could not start), the RUN unpacks the blob.
        let mut snapshot =
            self.snapshot_for_run.then(|| StreamedSnapshot::start(self.store, snapshot::flavour()).ok()).flatten();
        let written = match &mut snapshot {
            Some(snapshot) => layer::write_layer_observed(self.store, entries, &self.layer_options, &mut |bytes| {
                snapshot.push(bytes)
            })?,
            None => layer::write_layer(self.store, entries, &self.layer_options)?,
        };
        if let Some(snapshot) = snapshot {
            snapshot.finish(&written.record);
        }
        self.store.write_action(key, &ActionRecord { layers: vec![written.record.clone()], config: None })?;
        self.indexes.insert(written.record.diff_id.clone(), written.index);
        Ok(NewLayer { record: written.record, blob_bytes_written: written.blob_bytes_written })
    }
}
