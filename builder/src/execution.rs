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
    pub layers: Vec<LayerRecord>,
    pub config: Value,
    pub parent: Option<Arc<NodeState>>,
    /// The merged tree, computed when a step above needs it.
    tree: OnceLock<Arc<FsTree>>,
}

impl NodeState {
    pub fn new(layers: Vec<LayerRecord>, config: Value, parent: Option<Arc<NodeState>>) -> NodeState {
        NodeState { layers, config, parent, tree: OnceLock::new() }
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
        let index = match LayerIndex::load(store, &layer.diff_id)? {
            Some(index) => index,
            None => layer::index_layer(store, layer)?,
        };
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
        // Walk down to the nearest known tree without recursion (chains can be deep).
        let mut pending = vec![Arc::clone(state)];
        while let Some(parent) = pending.last().and_then(|node| node.parent.clone()) {
            if parent.tree.get().is_some() {
                pending.push(parent);
                break;
            }
            pending.push(parent);
        }
        let mut tree: Option<Arc<FsTree>> = None;
        while let Some(node) = pending.pop() {
            if let Some(known) = node.tree.get() {
                tree = Some(Arc::clone(known));
                continue;
            }
            let mut next = tree.as_deref().cloned().unwrap_or_default();
            let first_own_layer = match &tree {
                Some(_) => node.parent.as_ref().map_or(0, |parent| parent.layers.len()),
                None => 0,
            };
            for (position, layer) in node.layers.iter().enumerate().skip(first_own_layer) {
                next.apply(position, &layer.digest, &*self.indexes.get(self.store, layer)?)?;
            }
            let next = Arc::new(next);
            let _ = node.tree.set(Arc::clone(&next));
            tree = Some(next);
        }
        Ok(tree.expect("at least the node itself was processed"))
    }

    /// Writes `entries` as a layer and commits the record under `key`.
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
