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

/// Why a layer could not be read, indexed or stacked on the layers below it. Every variant
/// but `Write`, `Store` and `NoSuchLayer` names the layer by its blob digest.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TreeError {
    /// A member's path leaves the image root (an absolute path or `..` that climbs out).
    #[error("layer {layer}: entry {entry:?} would land outside the image root")]
    EscapesRoot {
        /// The digest of the layer's blob.
        layer: Digest,
        /// The member's name as the tar holds it.
        entry: String,
    },
    /// A member would be written through a symlink that a lower layer (or an earlier member)
    /// put at one of its parent directories: the write-through-a-symlink attack.
    #[error("layer {layer}: entry {entry:?} is written through the symlink {symlink:?}")]
    ThroughSymlink {
        /// The digest of the layer's blob.
        layer: Digest,
        /// The member's name as the tar holds it.
        entry: String,
        /// The image path of the symlink among its parents.
        symlink: String,
    },
    /// A hard link points at a path that no layer of the image holds.
    #[error("layer {layer}: hard link {entry:?} points at {target:?}, which is not in the image")]
    DanglingHardLink {
        /// The digest of the layer's blob.
        layer: Digest,
        /// The image path of the hard link.
        entry: String,
        /// The image path it points at.
        target: String,
    },
    /// The layer's uncompressed tar stream does not hash to the diff id the image's config
    /// names it by.
    #[error("layer {layer}: uncompressed content has digest {actual}, but the image names diff id {expected}")]
    DiffIdMismatch {
        /// The digest of the layer's blob.
        layer: Digest,
        /// The diff id the image promises.
        expected: Digest,
        /// The digest of the uncompressed stream actually read.
        actual: Digest,
    },
    /// The layer's media type is not a tar layer layerwright can read (plain, gzip or zstd).
    #[error("layer {layer}: unsupported media type {media_type}")]
    UnsupportedMediaType {
        /// The digest of the layer's blob.
        layer: Digest,
        /// The media type the manifest gives the layer.
        media_type: String,
    },
    /// Reading or decompressing the layer's blob failed, or its tar stream is corrupt.
    #[error("layer {layer}: cannot read: {source}")]
    Read {
        /// The digest of the layer's blob.
        layer: Digest,
        /// The IO error of the read or the decompressor.
        source: std::io::Error,
    },
    /// Writing a file extracted from a layer (a spooled copy of a member) failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The IO error from the operating system.
        source: std::io::Error,
    },
    /// Reading the blob or the saved index from the cache's store failed.
    #[error(transparent)]
    Store(#[from] layerwright_cache::StoreError),
    /// A member name or link target that is not UTF-8 (image paths are strings here).
    #[error("layer {layer}: entry {entry:?} is not valid UTF-8")]
    NotUtf8 {
        /// The digest of the layer's blob.
        layer: Digest,
        /// The name, decoded lossily for display.
        entry: String,
    },
    /// A tar member type an image layer cannot hold (a GNU volume label, say).
    #[error("layer {layer}: entry {entry:?} has the unsupported tar type {entry_type:?}")]
    UnsupportedEntry {
        /// The digest of the layer's blob.
        layer: Digest,
        /// The member's name as the tar holds it.
        entry: String,
        /// The tar header's type flag.
        entry_type: char,
    },
    /// An entry below something that exists but is neither a directory nor a symlink.
    #[error("layer {layer}: entry {entry:?} is below {parent:?}, which is not a directory")]
    ParentNotDirectory {
        /// The digest of the layer's blob.
        layer: Digest,
        /// The member's name as the tar holds it.
        entry: String,
        /// The image path of the parent that is not a directory.
        parent: String,
    },
    /// `extract_files` was asked for a path that the layer holds no regular file at.
    #[error("layer {layer}: holds no regular file at {path:?}")]
    MissingFile {
        /// The digest of the layer's blob.
        layer: Digest,
        /// The image path asked for.
        path: String,
    },
    /// `extract_files` was asked for a stack position past the end of `layers`.
    #[error("there is no layer at stack position {position} (the image has {layers} layers)")]
    NoSuchLayer {
        /// The stack position asked for (0 is the bottom layer).
        position: usize,
        /// How many layers the image has.
        layers: usize,
    },
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

impl IndexKind {
    /// The size of a regular file's content; 0 for every other kind.
    pub fn file_size(&self) -> u64 {
        match self {
            IndexKind::File { size, .. } => *size,
            _ => 0,
        }
    }
}
