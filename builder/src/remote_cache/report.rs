//! What a build did with remote caches, as the user sees it ([`RemoteCacheReport`],
//! [`CacheExportReport`], [`ReapiUploadReport`]), and the records the caches offered
//! ([`RemoteRecords`]).
//!
//! What it deliberately is not: logic; these are plain data.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use layerwright_cache::{ActionRecord, Digest, StepKey};

/// The records a remote cache holds for a build's keys.
#[derive(Debug, Default)]
pub(crate) struct RemoteRecords {
    pub records: HashMap<StepKey, ActionRecord>,
    /// The size of every blob the caches' manifests name (downloads check it).
    pub blob_sizes: HashMap<Digest, u64>,
    /// Writers read (a registry's).
    pub writers: usize,
    /// Writers (a registry's) or entries (a REAPI server's) skipped because they were
    /// unusable, each with why.
    pub problems: Vec<String>,
}

/// What a build did with remote caches; see [`crate::BuiltImage::remote_cache`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemoteCacheReport {
    /// Whether any remote cache was asked (one is asked only when a step misses locally).
    pub consulted: bool,
    /// Writers whose records were read (registry caches).
    pub writers: usize,
    /// The records those writers offered, and the entries a REAPI cache had for the steps
    /// asked about.
    pub records_available: usize,
    /// Steps whose result came from a remote cache.
    pub steps_served: usize,
    /// Records dropped because a layer they name does not decompress to the diff id they
    /// claim (those steps were built locally).
    pub records_rejected: usize,
    /// Blobs downloaded from remote caches into the local store.
    pub blobs_downloaded: usize,
    /// The bytes of those blobs.
    pub bytes_downloaded: u64,
    /// What went wrong with a remote cache (each was also printed once, as a warning).
    pub warnings: Vec<String>,
    /// What the export to `cache_to` did, when it succeeded.
    pub export: Option<CacheExportReport>,
    /// What the upload to the REAPI cache did, when it succeeded.
    pub reapi_upload: Option<ReapiUploadReport>,
    /// The RUN steps the REAPI server's workers executed
    /// ([`crate::BuilderOptions::reapi_execute`]), in the order they finished.
    pub remote_executions: Vec<RemoteExecution>,
}

/// One RUN step a REAPI server's worker executed, and what that cost the builder.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemoteExecution {
    /// The step's label.
    pub step: String,
    /// The worker that ran it, as it names itself.
    pub worker: String,
    /// When the worker started running the command (its clock).
    pub execution_started: SystemTime,
    /// When the command had ended and its layer was written (the worker's clock).
    pub execution_finished: SystemTime,
    /// The inputs the CAS lacked, uploaded before the step was submitted.
    pub blobs_uploaded: usize,
    /// The bytes of those blobs.
    pub bytes_uploaded: u64,
    /// How long finding and uploading the missing inputs took.
    pub upload: Duration,
    /// From `Execute` to the operation's end: queueing, the worker's fetching, running and
    /// uploading, and the server's bookkeeping.
    pub execute: Duration,
    /// How long fetching the record and the layer took.
    pub download: Duration,
}

/// What a build uploaded to a REAPI cache ([`crate::Builder::reapi`]): the records of the
/// steps it executed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReapiUploadReport {
    /// The endpoint (and instance) uploaded to.
    pub endpoint: String,
    /// Action-cache entries written, one per executed step.
    pub action_results: usize,
    /// Records left out because a blob they name changed in the local store since it was
    /// hashed (it is not sent).
    pub records_left_out: usize,
    /// Blobs uploaded to the CAS (those it lacked).
    pub blobs_uploaded: usize,
    /// The bytes of those blobs.
    pub bytes_uploaded: u64,
    /// Blobs the CAS already had, so not uploaded.
    pub blobs_present: usize,
}

/// What an export to a remote cache did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheExportReport {
    /// The writer tag written (`registry/repository:TAG--lw-WRITER`).
    pub reference: String,
    /// Records in the writer's batch after the merge.
    pub records: usize,
    /// How many of them this build offered.
    pub records_new: usize,
    /// Records left out because a blob they name is neither in the local cache nor the registry.
    pub records_dropped: usize,
    /// Blobs uploaded to the registry (those it lacked).
    pub blobs_uploaded: usize,
    /// The bytes of those blobs.
    pub bytes_uploaded: u64,
    /// Blobs the registry already had, so not uploaded.
    pub blobs_skipped: usize,
    /// False when the writer tag already named an identical manifest.
    pub manifest_uploaded: bool,
    /// Why the index at the cache's own tag could not be rewritten (the records are exported
    /// regardless: readers find them through the tag list).
    pub index_problem: Option<String>,
}
