//! The cache directory as a user sees it: the digests and records it holds, how much disk it
//! takes, and shrinking it.
//!
//! The store (`layerwright-cache`) knows its own directories; the builder writes more under the
//! cache directory, and declares them here ([`DIRECTORIES`]) so that a prune covers them without
//! the store knowing what they hold. Kept whatever the policy: `remote-cache-writer` (this
//! cache's name as a remote cache writer), the stat cache, locks and leases.
//!
//! What it deliberately is not: the key database. The salsa queries that compute step keys are
//! an implementation detail of the builder and are not exported.

use std::path::Path;

pub use layerwright_cache::{
    ActionRecord, Attachment, CacheDirectory, CacheMountLease, CacheMountOptions, CacheMountSharing, CacheMountUsage,
    Digest, DigestError, DiskUsage, LayerRecord, MissReason, PrunePolicy, PruneReport, Store, StoreError, free_bytes,
};

/// The directories the builder writes under the cache directory, and how a prune treats them.
pub const DIRECTORIES: &[CacheDirectory] = &[
    // `layer::snapshot`: layers unpacked for RUN steps, `<diff id>[.user]/`.
    CacheDirectory::new("snapshots", Attachment::DiffId),
    // `layer::recompress`: a layer in another compression, `<diff id>.<compression>.v<n>.json`.
    CacheDirectory::new("recompressed", Attachment::DiffId),
    // `run`: the output of RUN steps, `<step key>.log`.
    CacheDirectory::new("logs", Attachment::StepKey),
    // `layer::compress`: where the gzip blocks of the last layer of each shape are.
    CacheDirectory::new("gzip-blocks", Attachment::Standalone),
    // `base::pull`: what a pulled tag last resolved to, for offline builds.
    CacheDirectory::new("resolved-tags", Attachment::Standalone),
];

/// Opens the cache directory `path` (created if missing) for inspection or pruning.
pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
    Store::open(path.as_ref())
}

/// Prunes the cache of `store` under `policy`, the builder's directories included, least
/// recently used first and never what a running build (of any process) uses.
pub fn prune(store: &Store, policy: &PrunePolicy) -> Result<PruneReport, StoreError> {
    store.prune(policy, DIRECTORIES)
}
