//! The error of importing a base image archive: every variant names the archive.
//!
//! What it deliberately is not: the error of a pull (that is the registry's).

use std::path::PathBuf;

use thiserror::Error;

use crate::layer::TreeError;

/// Why a base archive could not be imported. Every variant names the archive.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ImportError {
    #[error("base archive {archive}: {reason}")]
    Invalid { archive: PathBuf, reason: String },
    #[error("base archive {archive}: cannot open: {source}")]
    Open { archive: PathBuf, source: std::io::Error },
    #[error("base archive {archive}: cannot read {entry}: {source}")]
    Read { archive: PathBuf, entry: String, source: std::io::Error },
    #[error("base archive {archive}: blob {entry} has digest {actual}, but is named {expected}")]
    DigestMismatch { archive: PathBuf, entry: String, expected: String, actual: String },
    #[error("base archive {archive}: {source}")]
    Layer { archive: PathBuf, source: TreeError },
    #[error(transparent)]
    Store(#[from] layerwright_cache::StoreError),
}
