//! Layer indexes and the merged filesystem view of a stack of layers.
//!
//! CONTRACT (stub, to be implemented).
//!
//! A [`LayerIndex`] lists a layer's entries (metadata, content sha256 for files, link targets),
//! so that later steps never decompress a layer to learn what it holds: it is saved in the cache
//! next to the blob (`Store::write_index`) when a layer is written or imported.
//! [`FsTree`] applies indexes bottom to top with OCI semantics (whiteouts, opaque whiteouts, a
//! non-directory replacing a directory and vice versa) and is what `listing()`, `copy_from` and
//! the parents-exist checks of file steps read.
//!
//! Safety: `index_layer` refuses entries that could land outside the image root (absolute
//! paths, `..` components, whiteouts naming `..`), and `FsTree::apply` refuses an entry whose
//! parent path resolves through a symlink, and a hard link whose target is not in the tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use layerwright_cache::{Digest, LayerRecord, Store};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexKind {
    Directory,
    File {
        size: u64,
        sha256: Digest,
    },
    Symlink {
        target: String,
    },
    HardLink {
        target: String,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// `path` is the deleted path (not the `.wh.` name).
    Whiteout,
    /// `path` is the directory made opaque.
    OpaqueWhiteout,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Image-relative, normalised (`app/bin/x`).
    pub path: String,
    pub kind: IndexKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The entries of one layer in tar order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIndex {
    pub entries: Vec<IndexEntry>,
}

#[derive(Debug, Error)]
pub enum TreeError {
    #[error("layer {layer}: entry {entry:?} would land outside the image root")]
    EscapesRoot { layer: Digest, entry: String },
    #[error("layer {layer}: entry {entry:?} is written through the symlink {symlink:?}")]
    ThroughSymlink { layer: Digest, entry: String, symlink: String },
    #[error("layer {layer}: hard link {entry:?} points at {target:?}, which is not in the image")]
    DanglingHardLink { layer: Digest, entry: String, target: String },
    #[error("layer {layer}: uncompressed content has digest {actual}, but the image names diff id {expected}")]
    DiffIdMismatch { layer: Digest, expected: Digest, actual: Digest },
    #[error("layer {layer}: unsupported media type {media_type}")]
    UnsupportedMediaType { layer: Digest, media_type: String },
    #[error("layer {layer}: cannot read: {source}")]
    Read { layer: Digest, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] layerwright_cache::StoreError),
}

impl LayerIndex {
    /// The saved index of the layer with `diff_id`, if any.
    pub fn load(store: &Store, diff_id: &Digest) -> Result<Option<LayerIndex>, TreeError> {
        let _ = (store, diff_id);
        todo!()
    }

    /// Saves this index (atomically) as the index of `diff_id`.
    pub fn save(&self, store: &Store, diff_id: &Digest) -> Result<(), TreeError> {
        let _ = (store, diff_id);
        todo!()
    }
}

/// Reads a stored layer blob (decompressing per its media type), verifies its diff id, checks
/// every entry name for safety, saves and returns its index. Used for imported base layers.
pub fn index_layer(store: &Store, layer: &LayerRecord) -> Result<LayerIndex, TreeError> {
    let _ = (store, layer);
    todo!()
}

/// A node of the merged tree: the entry as it stands and the position of the layer it is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeNode {
    pub entry: IndexEntry,
    pub layer: usize,
}

/// The merged filesystem of a stack of layers (metadata only).
#[derive(Debug, Clone, Default)]
pub struct FsTree {
    nodes: BTreeMap<String, TreeNode>,
}

impl FsTree {
    /// Applies the layer at stack position `layer` (0 = bottom) on top of the tree.
    pub fn apply(&mut self, layer: usize, digest: &Digest, index: &LayerIndex) -> Result<(), TreeError> {
        let _ = (layer, digest, index);
        todo!()
    }

    pub fn get(&self, path: &str) -> Option<&TreeNode> {
        self.nodes.get(path)
    }

    /// `path` and everything below it, in sorted order.
    pub fn subtree<'a>(&'a self, path: &'a str) -> impl Iterator<Item = (&'a str, &'a TreeNode)> + 'a {
        let _ = path;
        std::iter::empty()
    }

    /// One line per path, sorted: `TYPE MODE UID:GID SIZE DIGEST-OR-TARGET /PATH`, for insta.
    pub fn listing(&self) -> String {
        todo!()
    }
}

/// Extracts the regular files named in `wanted` (stack position → paths) from the layers of
/// `layers` into fresh files under `spool_dir`, reading each needed layer blob once. Returns
/// path → spooled file.
pub fn extract_files(
    store: &Store,
    layers: &[LayerRecord],
    wanted: &BTreeMap<usize, BTreeSet<String>>,
    spool_dir: &Path,
) -> Result<BTreeMap<String, PathBuf>, TreeError> {
    let _ = (store, layers, wanted, spool_dir);
    todo!()
}
