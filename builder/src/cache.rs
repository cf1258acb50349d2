//! The cache directory as a user sees it: the digests and records it holds, how much disk it
//! takes, and shrinking it.
//!
//! What it deliberately is not: the key database. The salsa queries that compute step keys are
//! an implementation detail of the builder and are not exported.

use std::path::Path;

pub use layerwright_cache::{
    ActionRecord, CacheMountLease, CacheMountOptions, CacheMountSharing, CacheMountUsage, Digest, DigestError,
    DiskUsage, LayerRecord, MissReason, PruneReport, Store, StoreError,
};

/// Opens the cache directory `path` (created if missing) for inspection or pruning.
pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
    Store::open(path.as_ref())
}
