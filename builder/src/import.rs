//! Base image import: docker-archive tars (`docker save`), OCI archive tars and OCI layout dirs.
//!
//! CONTRACT (stub, to be implemented).
//!
//! Every blob is copied into the store and verified against the digest that names it (manifest
//! → config → layers; for docker-archive, each layer's sha256 against the config's diff ids),
//! and every layer is indexed with `tree::index_layer` and applied to an `FsTree`, so that an
//! entry that would land outside the image root is refused here, naming the archive and entry.

use std::path::{Path, PathBuf};

use layerwright_cache::{LayerRecord, Store};
use thiserror::Error;

use crate::tree::{LayerIndex, TreeError};

#[derive(Debug, Error)]
pub enum ImportError {
    #[error("base archive {archive}: {reason}")]
    Invalid { archive: PathBuf, reason: String },
    #[error("base archive {archive}: cannot read {entry}: {source}")]
    Read { archive: PathBuf, entry: String, source: std::io::Error },
    #[error("base archive {archive}: blob {entry} has digest {actual}, but is named {expected}")]
    DigestMismatch { archive: PathBuf, entry: String, expected: String, actual: String },
    #[error("base archive {archive}: {source}")]
    Layer { archive: PathBuf, source: TreeError },
    #[error(transparent)]
    Store(#[from] layerwright_cache::StoreError),
}

/// An imported base image: its layers (bottom first), their indexes, and its config document.
#[derive(Debug, Clone)]
pub struct BaseImage {
    pub layers: Vec<LayerRecord>,
    pub indexes: Vec<LayerIndex>,
    pub config: serde_json::Value,
}

/// What identifies an archive's content for the step key: a sha256 hex of the archive file
/// (tar archives) or of the layout's `index.json` plus the manifest it selects (layout dirs).
pub fn archive_identity(path: &Path) -> Result<String, ImportError> {
    let _ = path;
    todo!()
}

/// Imports the base image at `path` (format auto-detected) into `store`.
pub fn import_archive(store: &Store, path: &Path) -> Result<BaseImage, ImportError> {
    let _ = (store, path);
    todo!()
}
