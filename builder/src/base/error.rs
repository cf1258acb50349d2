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
    /// The archive is not a base image layerwright can read: not a tar or OCI layout directory,
    /// compressed, missing a member its documents name, or holding a malformed document.
    #[error("base archive {archive}: {reason}")]
    Invalid {
        /// The archive file or layout directory.
        archive: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The archive file (or layout directory) could not be opened or inspected.
    #[error("base archive {archive}: cannot open: {source}")]
    Open {
        /// The archive file or layout directory.
        archive: PathBuf,
        /// The IO error from the operating system.
        source: std::io::Error,
    },
    /// Reading a member of the archive failed part-way.
    #[error("base archive {archive}: cannot read {entry}: {source}")]
    Read {
        /// The archive file or layout directory.
        archive: PathBuf,
        /// The member being read (for example `blobs/sha256/<hex>` or `manifest.json`).
        entry: String,
        /// The IO error from the operating system.
        source: std::io::Error,
    },
    /// A member's content does not hash to the digest the image's documents name it by.
    #[error("base archive {archive}: blob {entry} has digest {actual}, but is named {expected}")]
    DigestMismatch {
        /// The archive file or layout directory.
        archive: PathBuf,
        /// The member whose content was hashed.
        entry: String,
        /// The digest the archive's documents promise (`sha256:…`).
        expected: String,
        /// The digest of the content actually read (`sha256:…`).
        actual: String,
    },
    /// A layer of the image could not be indexed or stacked on the layers below it (an unsafe
    /// path, a diff id that does not match, a corrupt tar stream, …).
    #[error("base archive {archive}: {source}")]
    Layer {
        /// The archive file or layout directory.
        archive: PathBuf,
        /// What was wrong with the layer.
        source: TreeError,
    },
    /// Copying a blob into the cache's store failed.
    #[error(transparent)]
    Store(#[from] layerwright_cache::StoreError),
}
