//! The remote cache in a build: which steps remote caches serve, what has to be downloaded
//! for that, and the export of a build's records afterwards. A remote cache is a
//! [`RemoteSource`]: a cache held in a registry (`cache_from`, `registry_io`) or a REAPI
//! server (`reapi`); the classification and the trust rules below are one algorithm for both.
//!
//! Between keying and executing every node is classified (with remote caches, they are asked
//! only when a step the build needs misses locally: a fully cached rebuild makes no request at
//! all):
//! - **computed** (scratch, config changes): nothing to fetch or run;
//! - **local**: the local store has its record and blobs;
//! - **remote**: a remote cache has a record for its key;
//! - **execute**: nobody has it.
//!
//! A node is *required* when the build reads its result: the parent chains of the requested
//! images (their layers are exported) and the parent and `copy_from` source chains of every
//! required step that executes (its tree is built on them). A node nobody requires (a stage
//! whose `copy_from` is a hit) is not built at all. The content of a required remote hit (the
//! blobs of the layers its record names) is downloaded, verified by digest and size; every
//! other remote hit is used as a record alone (a base's small config blob is always fetched,
//! since the image config is built from it). A remote hit whose blobs did not arrive (the registry died mid-import) executes
//! instead, which may make more content needed; the classification is repeated until nothing
//! changes, so whatever the registry delivered is used and the build is still correct.
//!
//! Trust: a record from a remote cache becomes a local one (used by this and every later
//! build) only after the layers it names have been downloaded, checked against their digest
//! and size, decompressed and hashed against the diff ids the record claims; a record that
//! does not match is dropped and its step built locally. Which writers of a cache are read at
//! all is the reference's choice (`REF,writers=ci+alice`, see `registry_io`); by default every
//! writer the cache lists is.
//!
//! A remote cache that is unreachable, slow or corrupt never fails a build: it costs one
//! warning per reference or endpoint and the build goes on locally. The transfers themselves
//! are in `registry_io` and `reapi`; `decide` classifies, and this module prepares, exports
//! (to `cache_to`; to the REAPI server, the records of the steps the build executed) and
//! reports.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use layerwright_cache::{ActionRecord, Digest, LayerRecord, StepKey, Store};

mod decide;
#[cfg(feature = "reapi")]
mod reapi;
#[cfg(feature = "registry")]
mod registry_io;
mod report;

use decide::required_of;
pub(crate) use decide::{Decision, NodeShape, Served, decide};
#[cfg(feature = "reapi")]
pub use reapi::worker::{WorkerError, WorkerEvent, WorkerOptions, serve as serve_worker};
pub(crate) use report::RemoteRecords;
pub use report::{CacheExportReport, ReapiUploadReport, RemoteCacheReport, RemoteExecution};

use crate::layer::LayerOptions;
use crate::oci::Platform;
use crate::progress::Progress;

/// A REAPI server used as a shared step cache ([`crate::Builder::reapi`]): its gRPC endpoint
/// (`http://HOST:PORT` in plaintext, `https://HOST:PORT` with TLS) and the instance name
/// (often empty).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReapiEndpoint {
    /// `http://HOST:PORT` or `https://HOST:PORT`.
    pub url: String,
    /// The REAPI instance name; empty for the server's default instance.
    pub instance: String,
}

impl ReapiEndpoint {
    /// The endpoint at `url` (`http://` or `https://`), instance `instance`.
    pub fn new(url: impl Into<String>, instance: impl Into<String>) -> ReapiEndpoint {
        ReapiEndpoint { url: url.into(), instance: instance.into() }
    }
}

impl std::fmt::Display for ReapiEndpoint {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.instance.is_empty() {
            write!(formatter, "REAPI {}", self.url)
        } else {
            write!(formatter, "REAPI {} (instance {})", self.url, self.instance)
        }
    }
}

/// One remote cache a build reads: a registry reference (`cache_from`) or a REAPI server.
/// `prepare` is one algorithm over any of them; a source only says what it holds and
/// delivers blobs.
pub(crate) trait RemoteSource {
    /// How warnings and `failed` name it.
    fn name(&self) -> &str;
    /// Its records for (at least) `keys`, the keys of the recorded nodes that miss locally (a
    /// registry reads its whole record batch; a REAPI server is asked key by key).
    fn records(&self, keys: &[StepKey]) -> Result<RemoteRecords, String>;
    /// Downloads `blobs` (digest, size) into `store`, each checked by size and digest before
    /// it is committed. An error after some blobs arrived leaves those in the store.
    fn download_blobs(&self, store: &Store, blobs: &[(Digest, u64)]) -> Result<(), String>;
}

/// A cache in a registry (`cache_from`).
struct RegistrySource {
    reference: String,
}

impl RemoteSource for RegistrySource {
    fn name(&self) -> &str {
        &self.reference
    }

    fn records(&self, _keys: &[StepKey]) -> Result<RemoteRecords, String> {
        transport::fetch_records(&self.reference)
    }

    fn download_blobs(&self, store: &Store, blobs: &[(Digest, u64)]) -> Result<(), String> {
        transport::download_blobs(&self.reference, store, blobs)
    }
}

/// The remote caches a build reads, in the order they are asked: the registry references of
/// `cache_from`, then the REAPI server.
pub(crate) fn sources(cache_from: &[String], reapi: Option<&ReapiEndpoint>) -> Vec<Box<dyn RemoteSource>> {
    let registries = cache_from.iter().map(|reference| {
        let source: Box<dyn RemoteSource> = Box::new(RegistrySource { reference: reference.clone() });
        source
    });
    registries.chain(reapi.map(reapi_transport::source)).collect()
}

/// How one build's nodes will be satisfied, decided before anything executes.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub decision: Decision,
    /// For each node a remote cache serves without its content: the record to use (nodes whose
    /// content was downloaded have had their record committed to the local store instead).
    pub remote_records: Vec<Option<ActionRecord>>,
    pub report: RemoteCacheReport,
    /// Sources that failed (by name); an export or upload to one of them is not tried (one
    /// warning is enough).
    pub failed: Vec<String>,
}

/// Reports a remote cache's problem once, as a warning, and keeps it for the report.
fn warn(progress: &Progress, report: &mut RemoteCacheReport, name: &str, problem: &str) {
    let warning = format!("remote cache {name}: {problem}");
    progress.warn(None, warning.clone());
    report.warnings.push(warning);
}

/// Decides how each node is satisfied. `local_records` holds the local store's record of each
/// node; when a required node misses locally, the `sources` are asked, the blobs the build
/// needs are downloaded from them, and the records of the remote hits whose content arrived
/// are committed (and added to `local_records`).
pub(crate) fn prepare(
    store: &Store,
    sources: &[Box<dyn RemoteSource>],
    shapes: &[NodeShape],
    keys: &[StepKey],
    requested: &[usize],
    local_records: &mut [Option<ActionRecord>],
    progress: &Progress,
) -> Prepared {
    let local: Vec<bool> = local_records.iter().map(Option::is_some).collect();
    let no_remote = vec![None; shapes.len()];
    let local_only = decide(shapes, &local, &no_remote, requested, |_| true);
    let mut prepared = Prepared {
        remote_records: vec![None; shapes.len()],
        report: RemoteCacheReport::default(),
        failed: Vec::new(),
        decision: local_only,
    };
    let executes = |decision: &Decision| {
        decision.served.iter().zip(&decision.required).any(|(served, required)| *required && *served == Served::Execute)
    };
    if sources.is_empty() || !executes(&prepared.decision) {
        return prepared;
    }
    prepared.report.consulted = true;
    // The keys of the nodes a remote cache could serve: recorded, missing locally.
    let asked: Vec<StepKey> = keys
        .iter()
        .enumerate()
        .filter(|(index, _)| shapes[*index].recorded && !local[*index])
        .map(|(_, key)| *key)
        .collect();
    let mut offers: Vec<(&dyn RemoteSource, RemoteRecords)> = Vec::new();
    for source in sources {
        match source.records(&asked) {
            Ok(records) => {
                if !records.problems.is_empty() {
                    let problem = format!("skipped unusable entries: {}", records.problems.join("; "));
                    warn(progress, &mut prepared.report, source.name(), &problem);
                }
                prepared.report.writers += records.writers;
                prepared.report.records_available += records.records.len();
                offers.push((source.as_ref(), records));
            }
            Err(error) => {
                warn(progress, &mut prepared.report, source.name(), &format!("{error}; building without it"));
                prepared.failed.push(source.name().to_owned());
            }
        }
    }
    // For each node that misses locally: which cache serves it, and its record there.
    let remote_of: Vec<Option<(usize, &ActionRecord)>> = keys
        .iter()
        .enumerate()
        .map(|(index, key)| {
            if !shapes[index].recorded || local[index] {
                return None;
            }
            offers.iter().enumerate().find_map(|(source, (_, records))| Some((source, records.records.get(key)?)))
        })
        .collect();
    let remote: Vec<Option<&ActionRecord>> = remote_of.iter().map(|entry| entry.map(|(_, record)| record)).collect();

    let planned = decide(shapes, &local, &remote, requested, |_| true);
    let mut wanted_total: Vec<Digest> = Vec::new();
    for (source, (cache, records)) in offers.iter().enumerate() {
        let mut wanted: Vec<(Digest, u64)> = Vec::new();
        for (index, served) in planned.served.iter().enumerate() {
            let (Served::Remote, Some((from, record))) = (served, remote_of[index]) else { continue };
            if from != source {
                continue;
            }
            for digest in required_of(record, planned.required[index]) {
                let layer_size = record.layers.iter().find(|layer| layer.digest == *digest).map(|layer| layer.size);
                let Some(size) = records.blob_sizes.get(digest).copied().or(layer_size) else { continue };
                if !store.has_blob(digest) && !wanted.iter().any(|(known, _)| known == digest) {
                    wanted.push((digest.clone(), size));
                }
            }
        }
        if wanted.is_empty() {
            continue;
        }
        wanted_total.extend(wanted.iter().map(|(digest, _)| digest.clone()));
        if let Err(error) = cache.download_blobs(store, &wanted) {
            let problem = format!("{error}; building what did not arrive locally");
            warn(progress, &mut prepared.report, cache.name(), &problem);
            prepared.failed.push(cache.name().to_owned());
        }
    }
    // Counted from what is there now, so that a download cut short counts what it delivered.
    for digest in wanted_total.iter().filter(|digest| store.has_blob(digest)) {
        prepared.report.blobs_downloaded += 1;
        prepared.report.bytes_downloaded += std::fs::metadata(store.blob_path(digest)).map_or(0, |meta| meta.len());
    }

    // A record becomes local only when its layers are what it says they are: each blob (already
    // verified by digest) is decompressed and hashed against the record's diff id, which the
    // images built on it will name. A record that lies is dropped (its step executes), and the
    // classification is repeated, since its inputs may now be needed.
    let mut remote = remote;
    let mut verified: HashSet<Digest> = HashSet::new();
    let decision = loop {
        let decision = decide(shapes, &local, &remote, requested, |digest| store.has_blob(digest));
        let mut rejected = false;
        for (index, served) in decision.served.iter().enumerate() {
            let (Served::Remote, Some(record), true) = (served, remote[index], decision.required[index]) else {
                continue;
            };
            let bad = record.layers.iter().find_map(|layer| {
                if verified.contains(&layer.digest) {
                    return None;
                }
                match crate::layer::verify_diff_id(crate::layer::open_layer_stream(store, layer).ok()?, layer) {
                    Ok(()) => {
                        verified.insert(layer.digest.clone());
                        None
                    }
                    Err(error) => Some(error),
                }
            });
            if let Some(error) = bad {
                let source = remote_of[index].map_or("?", |(source, _)| offers[source].0.name());
                let problem = format!(
                    "the record of step key {} does not match its layer ({error}); the step is built locally",
                    keys[index].to_hex()
                );
                warn(progress, &mut prepared.report, source, &problem);
                prepared.report.records_rejected += 1;
                remote[index] = None;
                rejected = true;
            }
        }
        if !rejected {
            break decision;
        }
    };
    for (index, served) in decision.served.iter().enumerate() {
        let (Served::Remote, Some(record)) = (served, remote[index]) else { continue };
        prepared.report.steps_served += 1;
        // With its content here the record is as good as one built locally: committed, the
        // walk (and every later build) finds it in the local store.
        if decision.required[index] && store.write_action(&keys[index], record).is_ok() {
            local_records[index] = Some(record.clone());
        } else {
            prepared.remote_records[index] = Some(record.clone());
        }
    }
    prepared.decision = decision;
    prepared
}

/// Exports this build's records to `cache_to` (see `registry::cache`); a failure is a warning.
pub(crate) fn export(
    store: &Store,
    cache_to: &str,
    records: Vec<(StepKey, ActionRecord)>,
    prepared: &mut Prepared,
    progress: &Progress,
) {
    if prepared.failed.iter().any(|failed| failed == cache_to) {
        return;
    }
    let _lock = match lock_exports(store.root()) {
        Ok(lock) => lock,
        Err(error) => {
            warn(
                progress,
                &mut prepared.report,
                cache_to,
                &format!("cannot lock the cache directory to export: {error}"),
            );
            return;
        }
    };
    let writer = writer_name(store);
    match transport::export_records(cache_to, store, &writer, records) {
        Ok(export) => {
            if let Some(problem) = &export.index_problem {
                warn(
                    progress,
                    &mut prepared.report,
                    cache_to,
                    &format!("records exported, but the index was not rewritten: {problem}"),
                );
            }
            prepared.report.export = Some(export);
        }
        Err(error) => {
            warn(progress, &mut prepared.report, cache_to, &format!("{error}; this build's records were not exported"))
        }
    }
}

/// Uploads the records of the steps this build executed to the REAPI cache; a failure is a
/// warning.
pub(crate) fn upload_to_reapi(
    store: &Store,
    endpoint: &ReapiEndpoint,
    executed: &[(StepKey, ActionRecord)],
    prepared: &mut Prepared,
    progress: &Progress,
) {
    let name = endpoint.to_string();
    if prepared.failed.contains(&name) {
        return;
    }
    match reapi_transport::upload_records(store, endpoint, executed) {
        Ok(upload) => prepared.report.reapi_upload = Some(upload),
        Err(error) => {
            warn(progress, &mut prepared.report, &name, &format!("{error}; this build's steps were not uploaded"))
        }
    }
}

/// A RUN step to run on a REAPI server's workers: what the worker needs to run it as this
/// builder would.
// Without `reapi` it is made but never sent anywhere.
#[cfg_attr(not(feature = "reapi"), allow(dead_code))]
pub(crate) struct RemoteRun<'a> {
    pub key: &'a StepKey,
    pub label: &'a str,
    pub run: &'a layerwright_dsl::Run,
    /// The builder's limits for every RUN step.
    pub defaults: layerwright_dsl::Limits,
    /// The parent's config document.
    pub config: &'a serde_json::Value,
    /// The parent's layers, bottom first.
    pub layers: Vec<LayerRecord>,
    pub layer_options: LayerOptions,
    pub platform: &'a Platform,
}

/// Remote execution of a build's RUN steps ([`crate::BuilderOptions::reapi_execute`]). The
/// first failure (the server gone, no worker, a step that failed or came back wrong) is one
/// warning, and from then on every RUN step of the build runs locally: a build never waits on
/// a broken farm twice, and never uses a result it could not check.
pub(crate) struct RemoteExecutor {
    endpoint: ReapiEndpoint,
    given_up: AtomicBool,
    executions: Mutex<Vec<RemoteExecution>>,
    warnings: Mutex<Vec<String>>,
}

impl RemoteExecutor {
    /// Remote execution on `endpoint`; already given up when the build's lookup found the
    /// server failing (its warning is enough).
    pub(crate) fn new(endpoint: &ReapiEndpoint, prepared: &Prepared) -> RemoteExecutor {
        let failed = prepared.failed.contains(&endpoint.to_string());
        RemoteExecutor {
            endpoint: endpoint.clone(),
            given_up: AtomicBool::new(failed),
            executions: Mutex::default(),
            warnings: Mutex::default(),
        }
    }

    /// Whether `run` goes to the workers (why not, otherwise): a step with mounts runs where
    /// its mounts are.
    pub(crate) fn takes(&self, run: &layerwright_dsl::Run) -> Result<(), &'static str> {
        if self.given_up.load(Ordering::Relaxed) {
            return Err("remote execution failed earlier in this build");
        }
        if !run.mounts.is_empty() {
            // Cache directories, secrets, SSH agents and bind mounts are the builder's: a secret
            // must never leave the machine it was given on.
            return Err("its mounts are the builder's");
        }
        Ok(())
    }

    /// Runs `request` on the workers: the layer, in the store and checked by digest and diff
    /// id, or `None` when the step must run locally (the first failure is warned about).
    pub(crate) fn run(&self, store: &Store, request: &RemoteRun<'_>, progress: &Progress) -> Option<LayerRecord> {
        match reapi_transport::execute(store, &self.endpoint, request) {
            Ok((layer, execution)) => {
                self.executions.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(execution);
                Some(layer)
            }
            Err(error) => {
                if !self.given_up.swap(true, Ordering::Relaxed) {
                    let warning = format!(
                        "remote execution on {}: {error}; this step and the rest of the build run locally",
                        self.endpoint
                    );
                    progress.warn(Some(request.label), warning.clone());
                    self.warnings.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(warning);
                }
                None
            }
        }
    }

    /// Adds what remote execution did to the build's report. After a failure the server counts
    /// as failed: the build's upload is not tried (its warning is enough).
    pub(crate) fn finish(self, prepared: &mut Prepared) {
        let warnings = self.warnings.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !warnings.is_empty() {
            prepared.failed.push(self.endpoint.to_string());
        }
        prepared.report.warnings.extend(warnings);
        prepared.report.remote_executions =
            self.executions.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
    }
}

/// The REAPI cache, or its absence in a build without the `reapi` feature.
#[cfg(feature = "reapi")]
mod reapi_transport {
    use layerwright_cache::{ActionRecord, StepKey, Store};

    use super::reapi::{ReapiSource, upload};
    use super::{ReapiEndpoint, ReapiUploadReport, RemoteSource};

    pub(super) fn upload_records(
        store: &Store,
        endpoint: &ReapiEndpoint,
        records: &[(StepKey, ActionRecord)],
    ) -> Result<ReapiUploadReport, String> {
        upload(store, endpoint, records)
    }

    pub(super) fn source(endpoint: &ReapiEndpoint) -> Box<dyn RemoteSource> {
        Box::new(ReapiSource::new(endpoint))
    }

    pub(super) fn execute(
        store: &Store,
        endpoint: &ReapiEndpoint,
        request: &super::RemoteRun<'_>,
    ) -> Result<(layerwright_cache::LayerRecord, super::RemoteExecution), String> {
        super::reapi::execute_step(store, endpoint, request)
    }
}

#[cfg(not(feature = "reapi"))]
mod reapi_transport {
    use layerwright_cache::{ActionRecord, Digest, StepKey, Store};

    use super::{ReapiEndpoint, ReapiUploadReport, RemoteRecords, RemoteSource};

    const DISABLED: &str = "a REAPI cache needs the `reapi` feature of layerwright, which this build leaves out";

    struct Disabled(String);

    impl RemoteSource for Disabled {
        fn name(&self) -> &str {
            &self.0
        }

        fn records(&self, _keys: &[StepKey]) -> Result<RemoteRecords, String> {
            Err(DISABLED.into())
        }

        fn download_blobs(&self, _store: &Store, _blobs: &[(Digest, u64)]) -> Result<(), String> {
            Err(DISABLED.into())
        }
    }

    pub(super) fn source(endpoint: &ReapiEndpoint) -> Box<dyn RemoteSource> {
        Box::new(Disabled(endpoint.to_string()))
    }

    pub(super) fn upload_records(
        _store: &Store,
        _endpoint: &ReapiEndpoint,
        _records: &[(StepKey, ActionRecord)],
    ) -> Result<ReapiUploadReport, String> {
        Err(DISABLED.into())
    }
    pub(super) fn execute(
        _store: &Store,
        _endpoint: &ReapiEndpoint,
        _request: &super::RemoteRun<'_>,
    ) -> Result<(layerwright_cache::LayerRecord, super::RemoteExecution), String> {
        Err(DISABLED.into())
    }
}

/// The registry transfers, or their absence in a build without the `registry` feature.
#[cfg(feature = "registry")]
mod transport {
    use layerwright_cache::{ActionRecord, Digest, StepKey, Store};

    use super::registry_io as cache;
    use super::{CacheExportReport, RemoteRecords};

    pub(super) fn fetch_records(reference: &str) -> Result<RemoteRecords, String> {
        cache::fetch_records(reference).map_err(|error| error.to_string())
    }

    pub(super) fn download_blobs(reference: &str, store: &Store, blobs: &[(Digest, u64)]) -> Result<(), String> {
        cache::download_blobs(reference, store, blobs).map(|_| ()).map_err(|error| error.to_string())
    }

    pub(super) fn export_records(
        reference: &str,
        store: &Store,
        writer: &str,
        records: Vec<(StepKey, ActionRecord)>,
    ) -> Result<CacheExportReport, String> {
        cache::export_records(reference, store, writer, records).map_err(|error| error.to_string())
    }
}

#[cfg(not(feature = "registry"))]
mod transport {
    use layerwright_cache::{ActionRecord, Digest, StepKey, Store};

    use super::{CacheExportReport, RemoteRecords};

    const DISABLED: &str = "a remote cache needs the `registry` feature of layerwright, which this build leaves out";

    pub(super) fn fetch_records(_reference: &str) -> Result<RemoteRecords, String> {
        Err(DISABLED.into())
    }

    pub(super) fn download_blobs(_reference: &str, _store: &Store, _blobs: &[(Digest, u64)]) -> Result<(), String> {
        Err(DISABLED.into())
    }

    pub(super) fn export_records(
        _reference: &str,
        _store: &Store,
        _writer: &str,
        _records: Vec<(StepKey, ActionRecord)>,
    ) -> Result<CacheExportReport, String> {
        Err(DISABLED.into())
    }
}

/// The name this cache directory exports under: `LAYERWRIGHT_CACHE_WRITER` when set (CI
/// runners with throwaway cache directories should set it, to one name per pipeline or
/// runner), else a random name kept in the cache directory.
pub(crate) fn writer_name(store: &Store) -> String {
    if let Ok(name) = std::env::var("LAYERWRIGHT_CACHE_WRITER")
        && !name.trim().is_empty()
    {
        return name.trim().to_owned();
    }
    let path = store.root().join("remote-cache-writer");
    if let Ok(name) = std::fs::read_to_string(&path)
        && !name.trim().is_empty()
    {
        return name.trim().to_owned();
    }
    let name = random_name();
    // Written aside and renamed, so that two first exports agree on whichever lands last and
    // nobody reads half a name.
    let aside = store.tmp_dir().join(format!("remote-cache-writer.{}", std::process::id()));
    if std::fs::write(&aside, &name).and_then(|()| std::fs::rename(&aside, &path)).is_err() {
        log::warn!("cannot record the cache writer name in {}", path.display());
    }
    std::fs::read_to_string(&path).map(|name| name.trim().to_owned()).unwrap_or(name)
}

fn random_name() -> String {
    let mut bytes = [0u8; 8];
    if File::open("/dev/urandom").and_then(|mut urandom| urandom.read_exact(&mut bytes)).is_err() {
        // Unique enough to tell writers apart: this process, now.
        let seed = format!("{}-{:?}", std::process::id(), std::time::SystemTime::now());
        bytes.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..8]);
    }
    hex::encode(bytes)
}

/// Holds the cache directory's export lock: two builds sharing a cache directory write the
/// same writer tag, so their read-merge-write of it must not interleave.
pub(crate) fn lock_exports(root: &Path) -> std::io::Result<File> {
    let path = root.join("remote-export.lock");
    let file = File::options().create(true).truncate(false).write(true).open(&path)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map_err(|error| {
        log::warn!("flock({}, LOCK_EX) failed: {error}", path.display());
        std::io::Error::from(error)
    })?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use layerwright_cache::LayerRecord;

    fn record(name: &str, config: bool) -> ActionRecord {
        let digest = Digest::of_bytes(name.as_bytes());
        let layer = LayerRecord { diff_id: digest.clone(), digest, size: 1, media_type: "gzip".into() };
        ActionRecord {
            layers: vec![layer],
            config: config.then(|| Digest::of_bytes(format!("{name} config").as_bytes())),
        }
    }

    /// A node of a test graph: its parent, its source, and how the caches know it.
    struct Node {
        parent: Option<usize>,
        source: Option<usize>,
        recorded: bool,
        local: bool,
        remote: Option<ActionRecord>,
    }

    fn node(parent: Option<usize>, known: &str) -> Node {
        Node {
            parent,
            source: None,
            recorded: known != "computed",
            local: known == "local",
            remote: known.starts_with("remote").then(|| record(known, parent.is_none())),
        }
    }

    /// Decides over `nodes`, with the blobs in `missing` unobtainable, and returns the
    /// classification and which nodes' content is needed, as letters (C L R E, and `*`).
    fn check(nodes: &[Node], requested: &[usize], missing: &[&str], expected: &str) {
        let shapes: Vec<NodeShape> = nodes
            .iter()
            .map(|node| NodeShape {
                parent: node.parent,
                sources: node.source.into_iter().collect(),
                recorded: node.recorded,
            })
            .collect();
        let local: Vec<bool> = nodes.iter().map(|node| node.local).collect();
        let remote: Vec<Option<&ActionRecord>> = nodes.iter().map(|node| node.remote.as_ref()).collect();
        let missing: Vec<Digest> = missing.iter().map(|name| Digest::of_bytes(name.as_bytes())).collect();
        let decision = decide(&shapes, &local, &remote, requested, |digest| !missing.contains(digest));
        let actual: Vec<String> = decision
            .served
            .iter()
            .zip(&decision.required)
            .map(|(served, needed)| {
                let letter = match served {
                    Served::Computed => "C",
                    Served::Local => "L",
                    Served::Remote => "R",
                    Served::Execute => "E",
                };
                format!("{letter}{}", if *needed { "*" } else { "" })
            })
            .collect();
        assert_eq!(actual.join(" "), expected);
    }

    /// 0 base, 1 copy on it, 2 a stage on the base (a RUN), 3 `copy_from` the stage onto 1,
    /// 4 a config change: known as `known` says, in that order.
    fn stage_graph(known: [&str; 5]) -> Vec<Node> {
        let parents = [None, Some(0), Some(0), Some(1), Some(3)];
        let mut nodes: Vec<Node> = parents.into_iter().zip(known).map(|(parent, known)| node(parent, known)).collect();
        nodes[3].source = Some(2);
        nodes
    }

    #[test]
    fn only_the_requested_images_content_is_needed_when_everything_is_remote() {
        let nodes = stage_graph(["remote base", "remote copy", "remote stage", "remote copy_from", "computed"]);
        check(&nodes, &[4], &[], "R* R* R R* C*");
    }

    #[test]
    fn a_step_that_executes_needs_its_parent_and_source_chains() {
        let nodes = stage_graph(["remote base", "remote copy", "remote stage", "nobody", "computed"]);
        check(&nodes, &[4], &[], "R* R* R* E* C*");
    }

    #[test]
    fn a_remote_hit_whose_blobs_did_not_arrive_executes_and_pulls_in_its_inputs() {
        let nodes = stage_graph(["remote base", "remote copy", "remote stage", "remote copy_from", "computed"]);
        // The copy_from layer never arrived: it executes, so the stage's content is needed too.
        check(&nodes, &[4], &["remote copy_from"], "R* R* R* E* C*");
        // Then the stage's layer is missing as well: it executes on the base.
        check(&nodes, &[4], &["remote copy_from", "remote stage"], "R* R* E* E* C*");
        // Without its config the base is imported again; what stands on it is still served.
        check(&nodes, &[4], &["remote base config"], "E* R* R R* C*");
    }

    #[test]
    fn a_stage_whose_copy_from_is_a_hit_is_not_required_and_its_inputs_neither() {
        // 0 base, 1 stage tool (nobody has it), 2 stage output (nobody), 3 copy_from (local).
        let mut nodes = vec![
            node(None, "local"),
            node(Some(0), "nobody"),
            node(Some(1), "nobody"),
            node(Some(0), "local"),
            node(Some(3), "computed"),
        ];
        nodes[3].source = Some(2);
        check(&nodes, &[4], &[], "L* E E L* C*");
        // Once the copy_from itself misses, the whole stage is required.
        nodes[3].local = false;
        check(&nodes, &[4], &[], "L* E* E* E* C*");
    }

    #[test]
    fn local_hits_are_never_asked_for() {
        let nodes = vec![node(None, "local"), node(Some(0), "remote copy"), node(Some(1), "computed")];
        check(&nodes, &[2], &[], "L* R* C*");
    }
}
