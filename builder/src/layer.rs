//! The deterministic layer writer: entries in, one compressed tar blob (and its index) out.
//!
//! CONTRACT (stub, to be implemented): see `write_layer`.
//!
//! Reproducibility rules (DESIGN.md): entries sorted component-wise (a directory before its
//! contents); every header written explicitly (mode incl. setuid/setgid/sticky and 0600,
//! uid/gid, mtime = `LayerOptions::mtime`, empty uname/gname, ustar/GNU-free PAX where needed:
//! long names, large sizes, xattrs); never `HeaderMode::Deterministic`. Gzip through flate2's
//! pinned rust backend at a fixed level with no header timestamp; zstd at a fixed level with
//! one fixed thread mode. Streaming: tar → diff-id hasher → compressor → blob writer; no layer
//! is held whole in memory.

use std::path::PathBuf;
use std::sync::Arc;

use layerwright_cache::{LayerRecord, Store};
use thiserror::Error;

use crate::tree::LayerIndex;

/// The compression of the layers a build writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar+gzip`, the default: every client reads it.
    #[default]
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd`.
    Zstd,
    /// `application/vnd.oci.image.layer.v1.tar`.
    None,
}

impl Compression {
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }

    /// The compression a layer media type implies (OCI and Docker media types).
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Compression::Zstd),
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerOptions {
    pub compression: Compression,
    /// The mtime of every entry: `SOURCE_DATE_EPOCH` when set, else 0.
    pub mtime: u64,
}

/// Where a regular file's bytes come from when the tar is written.
#[derive(Debug, Clone)]
pub enum Content {
    Inline(Arc<[u8]>),
    /// A file inside a build context, opened through the context's capability so that it can
    /// never resolve outside it. `path` is context-relative.
    Context {
        dir: Arc<cap_std::fs::Dir>,
        path: String,
    },
    /// A file the builder itself wrote (a spooled file of a `copy_from`).
    HostFile(PathBuf),
}

#[derive(Debug, Clone)]
pub enum EntryKind {
    Directory,
    /// `size` is what the header says; a source whose length differs when read is an error.
    File {
        content: Content,
        size: u64,
    },
    Symlink {
        target: String,
    },
    /// A hard link to `target`, an image-relative path written earlier in the same layer.
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
    /// Deletes `path` from lower layers: written as `dir/.wh.name`.
    Whiteout,
    /// Hides everything below directory `path` in lower layers: written as
    /// `path/.wh..wh..opq`.
    OpaqueWhiteout,
}

/// One entry of a layer. `path` is image-relative and normalised (`app/bin/x`, no leading `/`).
#[derive(Debug, Clone)]
pub struct LayerEntry {
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (no file-type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Extended attributes, written as `SCHILY.xattr.` PAX records.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, Error)]
pub enum LayerError {
    #[error("cannot read {path}: {source}")]
    ReadSource { path: String, source: std::io::Error },
    #[error("{path} changed size while the layer was written (expected {expected} bytes, read {actual})")]
    SizeChanged { path: String, expected: u64, actual: u64 },
    #[error("layer entry {path} appears twice")]
    DuplicateEntry { path: String },
    #[error("cannot write layer entry {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] layerwright_cache::StoreError),
}

/// A layer committed to the store: its record, its index, and how many blob bytes were written.
#[derive(Debug, Clone)]
pub struct WrittenLayer {
    pub record: LayerRecord,
    pub index: LayerIndex,
    pub blob_bytes_written: u64,
}

/// Writes `entries` (any order; sorted here) as one layer blob into `store` and saves its
/// index (`LayerIndex::save`). Returns the record (diff id, blob digest, size, media type).
pub fn write_layer(
    store: &Store,
    entries: Vec<LayerEntry>,
    options: &LayerOptions,
) -> Result<WrittenLayer, LayerError> {
    let _ = (store, entries, options);
    todo!("layer writer")
}
