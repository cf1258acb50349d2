//! Layer indexes: the entries of one layer (metadata, content sha256 for files, link targets),
//! saved in the cache next to the blob so that later steps never decompress a layer to learn
//! what it holds, and the error of reading and applying them.
//!
//! What it deliberately is not: a tar reader (see `read`) or the merged view of a stack of
//! layers (see `crate::tree`).

use std::path::PathBuf;

use layerwright_cache::{Digest, Store};
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
    /// A member name or link target that is not UTF-8 (image paths are strings here).
    #[error("layer {layer}: entry {entry:?} is not valid UTF-8")]
    NotUtf8 { layer: Digest, entry: String },
    /// A tar member type an image layer cannot hold (a GNU volume label, say).
    #[error("layer {layer}: entry {entry:?} has the unsupported tar type {entry_type:?}")]
    UnsupportedEntry { layer: Digest, entry: String, entry_type: char },
    /// An entry below something that exists but is neither a directory nor a symlink.
    #[error("layer {layer}: entry {entry:?} is below {parent:?}, which is not a directory")]
    ParentNotDirectory { layer: Digest, entry: String, parent: String },
    /// `extract_files` was asked for a path that the layer holds no regular file at.
    #[error("layer {layer}: holds no regular file at {path:?}")]
    MissingFile { layer: Digest, path: String },
    /// `extract_files` was asked for a stack position past the end of `layers`.
    #[error("there is no layer at stack position {position} (the image has {layers} layers)")]
    NoSuchLayer { position: usize, layers: usize },
}

impl LayerIndex {
    /// The saved index of the layer with `diff_id`, if any.
    ///
    /// An index that no longer parses (a crash can't cause it, editing the cache can) reads as
    /// absent: the caller then re-indexes the blob and the index is rewritten, instead of every
    /// build failing on a cache entry that can be rebuilt.
    pub fn load(store: &Store, diff_id: &Digest) -> Result<Option<LayerIndex>, TreeError> {
        let Some(bytes) = store.read_index(diff_id)? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// Saves this index (atomically) as the index of `diff_id`.
    pub fn save(&self, store: &Store, diff_id: &Digest) -> Result<(), TreeError> {
        let bytes = serde_json::to_vec(self).expect("layer indexes are plain data that serialise");
        store.write_index(diff_id, &bytes)?;
        Ok(())
    }
}
