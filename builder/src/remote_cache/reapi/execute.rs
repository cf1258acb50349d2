//! Remote execution of one RUN step, the builder's side: the step becomes an execution action
//! (`remote_step`), the inputs the CAS lacks are uploaded (the lower layers are blobs of the
//! store under their OCI digests, so a layer the CAS has is never sent again), the action is
//! submitted with `Execute`, its operation followed to the end, and the worker's layer
//! downloaded into the store, checked by size and digest as it arrives and then hashed
//! against the diff id the worker's record claims.
//!
//! What it deliberately is not: a fallback. Any failure is returned, and the caller runs the
//! step locally; nothing is committed under the step's key here.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use layerwright_cache::{Digest, LayerRecord, Store};

use super::action::{blob_of, reapi_digest, record_file, record_of};
use super::client::{Connection, ExecuteLimits, ReapiError};
use super::remote_step::{RemoteStep, layer_blobs, step_action};
use super::with_connection;
use crate::remote_cache::report::RemoteExecution;
use crate::remote_cache::{ReapiEndpoint, RemoteRun};

/// When the builder stops waiting for a step's operation (and runs the step itself).
const LIMITS: ExecuteLimits = ExecuteLimits { queued: Duration::from_secs(120), silent: Duration::from_secs(900) };

/// Runs the step `inputs` describe on the server's workers. The layer it made, in the store
/// and checked; and what the execution cost.
pub(crate) fn execute_step(
    store: &Store,
    endpoint: &ReapiEndpoint,
    inputs: &RemoteRun<'_>,
) -> Result<(LayerRecord, RemoteExecution), String> {
    let step = RemoteStep::of(inputs);
    let action = step_action(&step, inputs.platform);
    let mut sizes: HashMap<Digest, u64> = layer_blobs(&step).into_iter().collect();
    let mut in_memory: HashMap<Digest, Vec<u8>> = HashMap::new();
    for message in action.messages() {
        let (digest, size) = blob_of(&message.digest)?;
        sizes.insert(digest.clone(), size);
        in_memory.insert(digest, message.bytes.clone());
    }
    let expected_media_type = step.media_type.clone();
    let (layer, mut report) = with_connection(endpoint, async |connection| {
        let started = Instant::now();
        let sent = super::send_missing(connection, store, &sizes, &in_memory).await?;
        if let Some(digest) = sent.unsendable.iter().next() {
            let reason = "it no longer matches its digest in the local store".into();
            return Err(ReapiError::Unusable { call: format!("uploading blob {digest}"), reason });
        }
        let uploaded = Instant::now();
        let response = connection.execute(&action.action.digest, LIMITS).await?;
        let executed = Instant::now();
        let layer = layer_of(connection, store, &response, &expected_media_type).await?;
        let metadata = response.result.and_then(|result| result.execution_metadata).unwrap_or_default();
        let report = RemoteExecution {
            step: String::new(),
            worker: metadata.worker,
            execution_started: system_time(metadata.execution_start_timestamp),
            execution_finished: system_time(metadata.execution_completed_timestamp),
            blobs_uploaded: sent.uploaded,
            bytes_uploaded: sent.bytes,
            upload: uploaded - started,
            execute: executed - uploaded,
            download: executed.elapsed(),
        };
        Ok((layer, report))
    })?;
    report.step = inputs.label.to_owned();
    // The blob is what its digest says; what it decompresses to must be what the record claims,
    // since the images built on it will name that diff id.
    let stream = crate::layer::open_layer_stream(store, &layer).map_err(|error| error.to_string())?;
    crate::layer::verify_diff_id(stream, &layer).map_err(|error| error.to_string())?;
    Ok((layer, report))
}

/// The layer of a finished execution, downloaded into `store`: the result must be a success
/// shaped as a cache entry holding one layer of `media_type`.
async fn layer_of(
    connection: &Connection,
    store: &Store,
    response: &reapi::ExecuteResponse,
    media_type: &str,
) -> Result<LayerRecord, ReapiError> {
    let unusable = |reason: String| ReapiError::Unusable { call: "Execute".into(), reason };
    if let Some(status) = &response.status
        && status.code != 0
    {
        let code = tonic::Code::from_i32(status.code);
        return Err(unusable(format!("the execution failed: {code:?}: {}", status.message)));
    }
    let result = response.result.as_ref().ok_or_else(|| unusable("the response has no result".into()))?;
    if result.exit_code != 0 {
        return Err(unusable(format!("the command exited with code {} on the worker", result.exit_code)));
    }
    let (record_digest, record_size) = record_file(result).map_err(unusable)?;
    let read = connection.read_small(&[reapi_digest(&record_digest, record_size)]).await?;
    let bytes = read
        .into_iter()
        .map(|(_, bytes)| bytes)
        .find(|bytes| Digest::of_bytes(bytes) == record_digest)
        .ok_or_else(|| unusable(format!("the record {record_digest} is missing or corrupt in the CAS")))?;
    let (record, _) = record_of(result, &bytes).map_err(unusable)?;
    let [layer] = record.layers.as_slice() else {
        return Err(unusable(format!("the record names {} layers, not one", record.layers.len())));
    };
    if record.config.is_some() || layer.media_type != media_type {
        return Err(unusable(format!("the record is not a {media_type} layer")));
    }
    connection.download(store, &layer.digest, layer.size).await?;
    Ok(layer.clone())
}

/// A protobuf timestamp as a time; the epoch when there is none.
fn system_time(timestamp: Option<bazel_remote_apis::google::protobuf::Timestamp>) -> SystemTime {
    let Some(timestamp) = timestamp else { return SystemTime::UNIX_EPOCH };
    let seconds = Duration::from_secs(u64::try_from(timestamp.seconds).unwrap_or(0));
    SystemTime::UNIX_EPOCH + seconds + Duration::from_nanos(u64::try_from(timestamp.nanos).unwrap_or(0))
}
