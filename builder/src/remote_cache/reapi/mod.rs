//! A shared step cache over the Remote Execution API (REAPI: Bazel's remote cache protocol,
//! served by BuildGrid, Buildbarn, BuildBuddy, NativeLink, ...): the second kind of remote
//! cache source beside registries, behind the same [`RemoteSource`] seam, so that the folder's
//! classification (`decide`) and trust rules are one algorithm for both.
//!
//! - **Lookup**: for each step key the local store lacks, `GetActionResult` of the key's action
//!   (`action`: a pure function of the key), then one `BatchReadBlobs` for the records those
//!   results hold. An entry that is not shaped as layerwright writes it is skipped and reported
//!   (one warning for all of them); the server itself answers a miss for an entry whose outputs
//!   have left its CAS.
//! - **Download**: the blobs the build needs, small ones in batches and the rest through
//!   ByteStream, each checked by size and digest before the store commits it; the folder's
//!   `prepare` then checks every layer against the diff id its record claims.
//! - **Upload**, after a build, of the records of the steps it executed: `FindMissingBlobs`
//!   over everything they need (layers, base configs, the records, and each action's command
//!   and input root), only the missing blobs sent, then one `UpdateActionResult` per step.
//!
//! Remote execution (a later addition) plugs in beside this module: a RUN step that misses
//! both caches would be submitted with `Execute` as an action of its own (its command, its
//! lower layers as inputs, platform properties a worker must offer); the worker's result would
//! be downloaded through this module's `Connection` and recorded under the key's action here,
//! so that lookups stay one `GetActionResult` per key whoever executed the step.
//!
//! What it deliberately is not: a scheduler, or a client of the Execution service.

mod action;
mod client;
mod execute;
mod remote_step;
pub(crate) mod worker;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use futures_util::{StreamExt, TryStreamExt, stream};
use layerwright_cache::{ActionRecord, Digest, StepKey, Store};

use super::report::{ReapiUploadReport, RemoteRecords};
use super::{ReapiEndpoint, RemoteSource};
use action::{action_of, blob_of, blobs_of, reapi_digest, record_file, record_of, result_of};
use client::{BATCH_BLOB_LIMIT, Connection, ReapiError};
pub(crate) use execute::execute_step;

/// How many calls of a lookup, download or upload run at once on the one channel.
const PARALLEL_CALLS: usize = 16;
/// How many blobs stream at once.
const PARALLEL_STREAMS: usize = 4;
/// How long looking up a build's keys may take in all before the server is given up on.
const LOOKUP_DEADLINE: Duration = Duration::from_secs(60);

/// A REAPI server as a source of records (see the module doc).
pub(crate) struct ReapiSource {
    endpoint: ReapiEndpoint,
    name: String,
}

impl ReapiSource {
    pub(crate) fn new(endpoint: &ReapiEndpoint) -> ReapiSource {
        ReapiSource { endpoint: endpoint.clone(), name: endpoint.to_string() }
    }
}

/// Runs `work` with a connection to `endpoint`, on a thread and runtime of its own.
fn with_connection<T: Send>(
    endpoint: &ReapiEndpoint,
    work: impl AsyncFnOnce(&Connection) -> Result<T, ReapiError> + Send,
) -> Result<T, String> {
    crate::runtime::on_own_thread("layerwright-reapi", move || {
        crate::runtime::block_on(async move {
            let connection = Connection::open(endpoint).await.map_err(|error| error.to_string())?;
            work(&connection).await.map_err(|error| error.to_string())
        })?
    })
}

impl RemoteSource for ReapiSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn records(&self, keys: &[StepKey]) -> Result<RemoteRecords, String> {
        with_connection(&self.endpoint, async |connection| {
            match tokio::time::timeout(LOOKUP_DEADLINE, look_up(connection, keys)).await {
                Ok(found) => found,
                Err(_) => {
                    Err(ReapiError::Timeout { call: "looking up the build's steps".into(), timeout: LOOKUP_DEADLINE })
                }
            }
        })
    }

    fn download_blobs(&self, store: &Store, blobs: &[(Digest, u64)]) -> Result<(), String> {
        let failures = with_connection(&self.endpoint, async |connection| {
            let failures: Vec<String> = stream::iter(blobs)
                .map(|(digest, size)| async move { connection.download(store, digest, *size).await })
                .buffer_unordered(PARALLEL_STREAMS)
                .filter_map(|outcome| async move { outcome.err().map(|error| error.to_string()) })
                .collect()
                .await;
            Ok(failures)
        })?;
        // Every blob that could come did; what did not is said once.
        match failures.as_slice() {
            [] => Ok(()),
            [only] => Err(only.clone()),
            [first, rest @ ..] => Err(format!("{first} (and {} more blobs failed)", rest.len())),
        }
    }
}

/// The records the action cache holds for `keys`.
async fn look_up(connection: &Connection, keys: &[StepKey]) -> Result<RemoteRecords, ReapiError> {
    let results: Vec<(StepKey, reapi::ActionResult)> = stream::iter(keys)
        .map(|key| async move {
            let action = action_of(key).action.digest;
            Ok::<_, ReapiError>(connection.action_result(&action).await?.map(|result| (*key, result)))
        })
        .buffer_unordered(PARALLEL_CALLS)
        .try_filter_map(|found| async move { Ok(found) })
        .try_collect()
        .await?;
    let mut records = RemoteRecords::default();
    let mut wanted: Vec<(StepKey, reapi::ActionResult, Digest)> = Vec::new();
    for (key, result) in results {
        match record_file(&result) {
            Ok((digest, size)) if size <= BATCH_BLOB_LIMIT => wanted.push((key, result, digest)),
            Ok((digest, size)) => {
                records.problems.push(format!("step key {}: record {digest} is {size} bytes", key.to_hex()))
            }
            Err(problem) => records.problems.push(format!("step key {}: {problem}", key.to_hex())),
        }
    }
    let mut record_digests: Vec<reapi::Digest> = Vec::new();
    let mut seen: HashSet<&Digest> = HashSet::new();
    for (_, result, digest) in &wanted {
        if seen.insert(digest) {
            let size = record_file(result).map(|(_, size)| size).unwrap_or(0);
            record_digests.push(reapi_digest(digest, size));
        }
    }
    let mut bytes_of: HashMap<Digest, Vec<u8>> = HashMap::new();
    for (digest, data) in connection.read_small(&record_digests).await? {
        // Only bytes that are what their digest says are a record.
        if let Ok((digest, _)) = blob_of(&digest)
            && Digest::of_bytes(&data) == digest
        {
            bytes_of.insert(digest, data);
        }
    }
    for (key, result, digest) in wanted {
        let Some(bytes) = bytes_of.get(&digest) else {
            records
                .problems
                .push(format!("step key {}: record {digest} is missing or corrupt in the CAS", key.to_hex()));
            continue;
        };
        match record_of(&result, bytes) {
            Ok((record, sizes)) => {
                records.blob_sizes.extend(sizes);
                records.records.insert(key, record);
            }
            Err(problem) => records.problems.push(format!("step key {}: {problem}", key.to_hex())),
        }
    }
    Ok(records)
}

/// What one executed step puts into the REAPI cache.
struct Upload {
    action: reapi::Digest,
    result: reapi::ActionResult,
}

/// Uploads the records of the steps a build executed (see the module doc): only the blobs the
/// CAS lacks, then the action results. A blob of the local store that no longer matches its
/// digest is not sent, and the records naming it are left out.
pub(crate) fn upload(
    store: &Store,
    endpoint: &ReapiEndpoint,
    records: &[(StepKey, ActionRecord)],
) -> Result<ReapiUploadReport, String> {
    let mut report = ReapiUploadReport { endpoint: endpoint.to_string(), ..ReapiUploadReport::default() };
    if records.is_empty() {
        return Ok(report);
    }
    // Every blob the uploads need, by digest: from the store (layers, configs) or from memory
    // (records, commands, input roots).
    let mut in_memory: HashMap<Digest, Vec<u8>> = HashMap::new();
    let mut from_store: HashMap<Digest, u64> = HashMap::new();
    let mut uploads: Vec<(Upload, Vec<Digest>)> = Vec::new();
    for (key, record) in records {
        let config_size = record.config.as_ref().and_then(|config| store_size(store, config));
        if record.config.is_some() && config_size.is_none() {
            continue;
        }
        let blobs = blobs_of(record, config_size);
        let record_bytes = serde_json::to_vec(record).map_err(|error| format!("cannot encode a record: {error}"))?;
        let key_action = action_of(key);
        let result = result_of(&record_bytes, &blobs);
        let mut needs: Vec<Digest> = blobs.iter().map(|(digest, _)| digest.clone()).collect();
        from_store.extend(blobs.iter().cloned());
        for bytes in [record_bytes, key_action.action.bytes, key_action.command.bytes, key_action.input_root.bytes] {
            let digest = Digest::of_bytes(&bytes);
            needs.push(digest.clone());
            in_memory.insert(digest, bytes);
        }
        uploads.push((Upload { action: key_action.action.digest, result }, needs));
    }
    let sizes: HashMap<Digest, u64> = from_store
        .iter()
        .map(|(digest, size)| (digest.clone(), *size))
        .chain(in_memory.iter().map(|(digest, bytes)| (digest.clone(), bytes.len() as u64)))
        .collect();

    let outcome = with_connection(endpoint, async |connection| {
        let sent = send_missing(connection, store, &sizes, &in_memory).await?;
        report.blobs_present = sent.present;
        report.blobs_uploaded = sent.uploaded;
        report.bytes_uploaded = sent.bytes;
        let unsendable = sent.unsendable;
        let sendable: Vec<&Upload> = uploads
            .iter()
            .filter(|(_, needs)| needs.iter().all(|digest| !unsendable.contains(digest)))
            .map(|(upload, _)| upload)
            .collect();
        report.records_left_out = uploads.len() - sendable.len();
        stream::iter(sendable)
            .map(|upload| connection.update_action_result(&upload.action, upload.result.clone()))
            .buffer_unordered(PARALLEL_CALLS)
            .try_collect::<Vec<()>>()
            .await?;
        report.action_results = uploads.len() - report.records_left_out;
        Ok(())
    });
    outcome.map(|()| report)
}

/// What [`send_missing`] did.
struct Sent {
    /// Blobs the CAS had.
    present: usize,
    uploaded: usize,
    bytes: u64,
    /// Blobs of the store that no longer match their digest: not sent.
    unsendable: HashSet<Digest>,
}

/// Sends the blobs of `sizes` the CAS lacks: from `in_memory` when it holds them, else from
/// the store (checked before they leave: one that changed since it was hashed is not sent),
/// small ones in batches and the rest through ByteStream.
async fn send_missing(
    connection: &Connection,
    store: &Store,
    sizes: &HashMap<Digest, u64>,
    in_memory: &HashMap<Digest, Vec<u8>>,
) -> Result<Sent, ReapiError> {
    let all: Vec<reapi::Digest> = sizes.iter().map(|(digest, size)| reapi_digest(digest, *size)).collect();
    let missing: HashSet<Digest> = connection
        .find_missing(&all)
        .await?
        .iter()
        .filter_map(|digest| blob_of(digest).ok().map(|(digest, _)| digest))
        .collect();
    let mut unsendable: HashSet<Digest> = HashSet::new();
    let mut small: Vec<(reapi::Digest, Vec<u8>)> = Vec::new();
    let mut streamed: Vec<(Digest, u64)> = Vec::new();
    for digest in &missing {
        let size = sizes[digest];
        if let Some(bytes) = in_memory.get(digest) {
            small.push((reapi_digest(digest, size), bytes.clone()));
        } else if !intact(store, digest) {
            unsendable.insert(digest.clone());
        } else if size <= BATCH_BLOB_LIMIT {
            let bytes = std::fs::read(store.blob_path(digest)).map_err(|source| ReapiError::Store {
                digest: digest.clone(),
                source: layerwright_cache::StoreError::Io {
                    action: "read blob",
                    path: store.blob_path(digest),
                    source,
                },
            })?;
            small.push((reapi_digest(digest, size), bytes));
        } else {
            streamed.push((digest.clone(), size));
        }
    }
    let small_bytes: u64 = small.iter().map(|(_, bytes)| bytes.len() as u64).sum();
    let uploaded = small.len() + streamed.len();
    connection.write_small(small).await?;
    stream::iter(&streamed)
        .map(|(digest, size)| async move { connection.write_stream(store, digest, *size).await })
        .buffer_unordered(PARALLEL_STREAMS)
        .try_collect::<Vec<()>>()
        .await?;
    let bytes = small_bytes + streamed.iter().map(|(_, size)| size).sum::<u64>();
    Ok(Sent { present: all.len() - missing.len(), uploaded, bytes, unsendable })
}

/// The size of a stored blob; `None` when the store lacks it.
fn store_size(store: &Store, digest: &Digest) -> Option<u64> {
    std::fs::metadata(store.blob_path(digest)).ok().map(|metadata| metadata.len())
}

/// Whether a stored blob still is what its name says (re-hashed unless this process hashed it
/// and nothing wrote to it since).
fn intact(store: &Store, digest: &Digest) -> bool {
    let Ok(file) = store.open_blob(digest) else { return false };
    store.unchanged_since_hashed(digest, &file) || store.verify_blob(digest).unwrap_or(false)
}
