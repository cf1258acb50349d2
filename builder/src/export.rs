//! Exporters: OCI image layout dir, OCI archive, docker-archive.
//!
//! CONTRACT (stub, to be implemented).
//!
//! All three are written from the same parts: the manifest and config blobs and the layer
//! blobs, all already in the store. Outputs are reproducible (sorted entries, fixed tar
//! headers) and written atomically (temp file or dir, then rename); a layout that already holds
//! a blob is not rewritten.

use std::path::{Path, PathBuf};

use layerwright_cache::{Digest, LayerRecord, Store};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("invalid tag {tag:?}: {reason}")]
    InvalidTag { tag: String, reason: String },
    #[error(transparent)]
    Store(#[from] layerwright_cache::StoreError),
}

/// What an exporter needs: everything is in `store`.
#[derive(Debug, Clone, Copy)]
pub struct ImageParts<'a> {
    pub store: &'a Store,
    pub manifest: &'a Digest,
    pub manifest_size: u64,
    pub config: &'a Digest,
    pub layers: &'a [LayerRecord],
}

pub fn write_oci_layout(parts: ImageParts<'_>, dir: &Path, tag: &str) -> Result<(), ExportError> {
    let _ = (parts, dir, tag);
    todo!()
}

pub fn write_oci_archive(parts: ImageParts<'_>, file: &Path, tag: &str) -> Result<(), ExportError> {
    let _ = (parts, file, tag);
    todo!()
}

pub fn write_docker_archive(parts: ImageParts<'_>, file: &Path, tag: &str) -> Result<(), ExportError> {
    let _ = (parts, file, tag);
    todo!()
}
