//! The REAPI calls a shared step cache makes, over one gRPC channel: `GetActionResult` and
//! `UpdateActionResult` (action cache), `FindMissingBlobs`, `BatchReadBlobs` and
//! `BatchUpdateBlobs` (CAS) for small blobs, ByteStream `Read` and `Write` for the rest; for
//! remote execution `Execute` (its operation followed to the end) and, for a worker, the Remote
//! Workers API's `CreateBotSession` and `UpdateBotSession`.
//!
//! Every call is bounded in time ([`CALL_TIMEOUT`], for a stream per message), so that a
//! server that stops answering costs a bounded wait. Blobs stream between the store and the
//! network in chunks: a layer is never held whole in memory. What arrives is checked: sizes as
//! they stream, digests when the store commits the blob (a blob that is not what its digest
//! says is refused and deleted).
//!
//! What it deliberately is not: a decision about which entries to use or what to upload (the
//! folder's `mod.rs`), or a mapping of records to actions (`action`).

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream::byte_stream_client::ByteStreamClient;
use bazel_remote_apis::google::bytestream::{ReadRequest, WriteRequest};
use googleapis_tonic_google_devtools_remoteworkers_v1test2::google::devtools::remoteworkers::v1test2 as bots;
use layerwright_cache::{Digest, Store, StoreError};
use prost::Message;
use reapi::action_cache_client::ActionCacheClient;
use reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use reapi::execution_client::ExecutionClient;
use thiserror::Error;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::ReapiEndpoint;
use super::action::reapi_digest;

/// How long one call (or one message of a stream) may take before the server counts as gone.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Blobs up to this size travel in batch calls; bigger ones through ByteStream.
pub(crate) const BATCH_BLOB_LIMIT: u64 = 1 << 20;
/// The payload of one batch call: under the 4 MiB a gRPC message is usually allowed.
const BATCH_BYTES: u64 = 3 << 20;
/// Digests per `FindMissingBlobs` call (about 80 bytes each).
const DIGESTS_PER_CALL: usize = 4096;
/// The data of one ByteStream `Write` message.
const WRITE_CHUNK: usize = 1 << 20;
/// The biggest message accepted from the server (a batch of small blobs, with its framing).
const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// How long a bot's session update may be held by the server (it answers earlier: its bot
/// keepalive bounds the wait).
const BOT_POLL: Duration = Duration::from_secs(20);

/// When a builder gives up on an `Execute` (see [`Connection::execute`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExecuteLimits {
    /// The longest the operation may stay queued (no worker takes it).
    pub queued: Duration,
    /// The longest the operation stream may say nothing (servers send the operation's state
    /// every so often while it runs).
    pub silent: Duration,
}

/// Why a call to the REAPI server failed.
#[derive(Debug, Error)]
pub(crate) enum ReapiError {
    /// The endpoint is not an `http://` or `https://` URL tonic accepts.
    #[error("`{endpoint}` is not a REAPI endpoint (write http://HOST:PORT or https://HOST:PORT): {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    /// The server could not be reached.
    #[error("cannot connect: {reason}")]
    Connect { reason: String },
    /// The server answered a call with an error.
    #[error("{call} failed: {code:?}: {message}")]
    Call { call: String, code: tonic::Code, message: String },
    /// The server did not answer in time.
    #[error("{call} got no answer within {timeout:?}")]
    Timeout { call: String, timeout: Duration },
    /// The server sent something that is not what was asked for.
    #[error("{call}: {reason}")]
    Unusable { call: String, reason: String },
    /// A blob could not be read from or written to the local store.
    #[error("blob {digest}: {source}")]
    Store { digest: Digest, source: StoreError },
}

/// Runs `call` within [`CALL_TIMEOUT`]; its error or its answer, `what` naming it.
async fn timed<T>(
    what: impl Fn() -> String,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ReapiError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Err(_) => Err(ReapiError::Timeout { call: what(), timeout: CALL_TIMEOUT }),
        Ok(Err(status)) => Err(status_error(what(), &status)),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

fn status_error(call: String, status: &tonic::Status) -> ReapiError {
    ReapiError::Call { call, code: status.code(), message: status.message().to_owned() }
}

/// A connection to one REAPI server and instance.
#[derive(Clone)]
pub(crate) struct Connection {
    channel: Channel,
    instance: String,
}

impl Connection {
    /// Connects to `endpoint` (TLS for `https://`, with the system's root certificates).
    pub(crate) async fn open(endpoint: &ReapiEndpoint) -> Result<Connection, ReapiError> {
        let invalid = |reason: String| ReapiError::InvalidEndpoint { endpoint: endpoint.url.clone(), reason };
        let tls = if endpoint.url.starts_with("https://") {
            true
        } else if endpoint.url.starts_with("http://") {
            false
        } else {
            return Err(invalid("the scheme is neither http nor https".into()));
        };
        let mut target = Endpoint::from_shared(endpoint.url.clone())
            .map_err(|error| invalid(error.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT);
        if tls {
            target = target
                .tls_config(ClientTlsConfig::new().with_native_roots())
                .map_err(|error| invalid(error.to_string()))?;
        }
        let channel = match tokio::time::timeout(CONNECT_TIMEOUT, target.connect()).await {
            Err(_) => return Err(ReapiError::Connect { reason: format!("no connection within {CONNECT_TIMEOUT:?}") }),
            Ok(Err(error)) => return Err(ReapiError::Connect { reason: error_chain(&error) }),
            Ok(Ok(channel)) => channel,
        };
        Ok(Connection { channel, instance: endpoint.instance.clone() })
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn byte_stream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The action cache's entry for `action`; `None` on a miss.
    pub(crate) async fn action_result(
        &self,
        action: &reapi::Digest,
    ) -> Result<Option<reapi::ActionResult>, ReapiError> {
        let request = reapi::GetActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action.clone()),
            digest_function: reapi::digest_function::Value::Sha256 as i32,
            ..Default::default()
        };
        let mut client = ActionCacheClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        match timed(|| format!("GetActionResult {}", action.hash), client.get_action_result(request)).await {
            Err(ReapiError::Call { code: tonic::Code::NotFound, .. }) => Ok(None),
            other => other.map(Some),
        }
    }

    /// Stores `result` as the action cache's entry for `action`.
    pub(crate) async fn update_action_result(
        &self,
        action: &reapi::Digest,
        result: reapi::ActionResult,
    ) -> Result<(), ReapiError> {
        let request = reapi::UpdateActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action.clone()),
            action_result: Some(result),
            digest_function: reapi::digest_function::Value::Sha256 as i32,
            ..Default::default()
        };
        let mut client = ActionCacheClient::new(self.channel.clone());
        timed(|| format!("UpdateActionResult {}", action.hash), client.update_action_result(request)).await?;
        Ok(())
    }

    /// Which of `digests` the CAS lacks.
    pub(crate) async fn find_missing(&self, digests: &[reapi::Digest]) -> Result<Vec<reapi::Digest>, ReapiError> {
        let mut missing = Vec::new();
        for chunk in digests.chunks(DIGESTS_PER_CALL) {
            let request = reapi::FindMissingBlobsRequest {
                instance_name: self.instance.clone(),
                blob_digests: chunk.to_vec(),
                digest_function: reapi::digest_function::Value::Sha256 as i32,
            };
            let mut cas = self.cas();
            let answer = timed(|| "FindMissingBlobs".to_owned(), cas.find_missing_blobs(request)).await?;
            missing.extend(answer.missing_blob_digests);
        }
        Ok(missing)
    }

    /// Reads small blobs (each at most [`BATCH_BLOB_LIMIT`]) in batches; the bytes of each
    /// blob the CAS has, unverified (callers check them), in no particular order.
    pub(crate) async fn read_small(
        &self,
        digests: &[reapi::Digest],
    ) -> Result<Vec<(reapi::Digest, Vec<u8>)>, ReapiError> {
        let mut found = Vec::new();
        for batch in batches(digests) {
            let request = reapi::BatchReadBlobsRequest {
                instance_name: self.instance.clone(),
                digests: batch,
                digest_function: reapi::digest_function::Value::Sha256 as i32,
                ..Default::default()
            };
            let mut cas = self.cas();
            let answer = timed(|| "BatchReadBlobs".to_owned(), cas.batch_read_blobs(request)).await?;
            for response in answer.responses {
                let (Some(digest), Some(status)) = (response.digest, response.status) else { continue };
                if status.code == tonic::Code::Ok as i32 {
                    found.push((digest, response.data));
                } else if status.code != tonic::Code::NotFound as i32 {
                    let code = tonic::Code::from_i32(status.code);
                    let call = format!("BatchReadBlobs {}", digest.hash);
                    return Err(ReapiError::Call { call, code, message: status.message });
                }
            }
        }
        Ok(found)
    }

    /// Downloads blob `digest` of `size` bytes into `store` (checked by size as it streams and
    /// by digest when committed). `false` when the store had it already.
    pub(crate) async fn download(&self, store: &Store, digest: &Digest, size: u64) -> Result<bool, ReapiError> {
        if store.has_blob(digest) {
            return Ok(false);
        }
        let store_error = |source| ReapiError::Store { digest: digest.clone(), source };
        let call = || format!("ByteStream Read {digest}");
        let mut writer = store.blob_writer().map_err(store_error)?;
        if size <= BATCH_BLOB_LIMIT {
            let blobs = self.read_small(&[reapi_digest(digest, size)]).await?;
            let (_, data) = blobs
                .into_iter()
                .next()
                .ok_or_else(|| ReapiError::Unusable { call: call(), reason: "the CAS does not have it".into() })?;
            if data.len() as u64 != size {
                let reason = format!("it is {} bytes, not {size}", data.len());
                return Err(ReapiError::Unusable { call: call(), reason });
            }
            writer.write_all(&data).map_err(|source| store_io(store, digest, source))?;
            writer.commit_expecting(digest).map_err(store_error)?;
            return Ok(true);
        }
        let request = ReadRequest { resource_name: self.read_resource(digest, size), read_offset: 0, read_limit: 0 };
        let mut client = self.byte_stream();
        let mut stream = timed(call, client.read(request)).await?;
        loop {
            let message = match tokio::time::timeout(CALL_TIMEOUT, stream.message()).await {
                Err(_) => return Err(ReapiError::Timeout { call: call(), timeout: CALL_TIMEOUT }),
                Ok(Err(status)) => return Err(status_error(call(), &status)),
                Ok(Ok(message)) => message,
            };
            let Some(message) = message else { break };
            // A blob bigger than its digest says is refused before it fills the disk.
            if writer.written() + message.data.len() as u64 > size {
                return Err(ReapiError::Unusable { call: call(), reason: format!("it is bigger than {size} bytes") });
            }
            writer.write_all(&message.data).map_err(|source| store_io(store, digest, source))?;
        }
        if writer.written() != size {
            let reason = format!("it is {} bytes, not {size}", writer.written());
            return Err(ReapiError::Unusable { call: call(), reason });
        }
        writer.commit_expecting(digest).map_err(store_error)?;
        Ok(true)
    }

    /// Uploads small blobs (bytes with their digests) in batches.
    pub(crate) async fn write_small(&self, blobs: Vec<(reapi::Digest, Vec<u8>)>) -> Result<(), ReapiError> {
        let mut requests: Vec<reapi::batch_update_blobs_request::Request> = Vec::new();
        let mut bytes = 0u64;
        let mut pending = blobs.into_iter().peekable();
        while let Some((digest, data)) = pending.next() {
            bytes += data.len() as u64;
            requests.push(reapi::batch_update_blobs_request::Request { digest: Some(digest), data, compressor: 0 });
            let full = pending.peek().is_some_and(|(_, next)| bytes + next.len() as u64 > BATCH_BYTES);
            if !full && pending.peek().is_some() {
                continue;
            }
            let request = reapi::BatchUpdateBlobsRequest {
                instance_name: self.instance.clone(),
                requests: std::mem::take(&mut requests),
                digest_function: reapi::digest_function::Value::Sha256 as i32,
            };
            bytes = 0;
            let mut cas = self.cas();
            let answer = timed(|| "BatchUpdateBlobs".to_owned(), cas.batch_update_blobs(request)).await?;
            for response in answer.responses {
                if let Some(status) = response.status
                    && status.code != tonic::Code::Ok as i32
                {
                    let hash = response.digest.map(|digest| digest.hash).unwrap_or_default();
                    let code = tonic::Code::from_i32(status.code);
                    return Err(ReapiError::Call {
                        call: format!("BatchUpdateBlobs {hash}"),
                        code,
                        message: status.message,
                    });
                }
            }
        }
        Ok(())
    }

    /// Uploads the stored blob `digest` of `size` bytes through ByteStream, streaming it from
    /// the store.
    pub(crate) async fn write_stream(&self, store: &Store, digest: &Digest, size: u64) -> Result<(), ReapiError> {
        let call = || format!("ByteStream Write {digest}");
        let file = store.open_blob(digest).map_err(|source| ReapiError::Store { digest: digest.clone(), source })?;
        // At least 1 MiB/s, and never less than one call's time.
        let timeout = CALL_TIMEOUT.max(Duration::from_secs(size >> 20));
        let resource_name = format!("{}uploads/{}/blobs/{}/{size}", self.prefix(), upload_id(), digest.hex());
        // The request stream reads the file as the channel takes the chunks; a read error
        // ends the stream early and is reported after the call.
        let read_error: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
        let chunks = FileChunks { file, offset: 0, size, resource_name, read_error: read_error.clone(), done: false };
        let mut client = self.byte_stream();
        let outcome = match tokio::time::timeout(timeout, client.write(futures_util::stream::iter(chunks))).await {
            Err(_) => Err(ReapiError::Timeout { call: call(), timeout }),
            Ok(Err(status)) => Err(status_error(call(), &status)),
            Ok(Ok(response)) => Ok(response.into_inner()),
        };
        if let Some(source) = read_error.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take() {
            return Err(ReapiError::Store {
                digest: digest.clone(),
                source: StoreError::Io { action: "read blob", path: store.blob_path(digest), source },
            });
        }
        let written = outcome?;
        // A server that had the blob already may stop the write early and say so.
        if written.committed_size != size as i64 && written.committed_size != -1 {
            let reason = format!("the server committed {} of {size} bytes", written.committed_size);
            return Err(ReapiError::Unusable { call: call(), reason });
        }
        Ok(())
    }

    /// Submits `action` with `Execute` and follows its operation to the end. An operation that
    /// stays queued longer than `limits.queued`, or a stream that says nothing for
    /// `limits.silent`, is given up on (the caller runs the step itself).
    pub(crate) async fn execute(
        &self,
        action: &reapi::Digest,
        limits: ExecuteLimits,
    ) -> Result<reapi::ExecuteResponse, ReapiError> {
        let call = || format!("Execute {}", action.hash);
        let request = reapi::ExecuteRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action.clone()),
            digest_function: reapi::digest_function::Value::Sha256 as i32,
            ..Default::default()
        };
        let mut client = ExecutionClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let mut stream = timed(call, client.execute(request)).await?;
        let submitted = tokio::time::Instant::now();
        loop {
            let operation = match tokio::time::timeout(limits.silent, stream.message()).await {
                Err(_) => return Err(ReapiError::Timeout { call: call(), timeout: limits.silent }),
                Ok(Err(status)) => return Err(status_error(call(), &status)),
                Ok(Ok(None)) => {
                    let reason = "the server ended the operation stream before the operation was done".into();
                    return Err(ReapiError::Unusable { call: call(), reason });
                }
                Ok(Ok(Some(operation))) => operation,
            };
            if !operation.done {
                let stage = operation
                    .metadata
                    .as_ref()
                    .and_then(|metadata| reapi::ExecuteOperationMetadata::decode(metadata.value.as_slice()).ok())
                    .map(|metadata| metadata.stage);
                let queued = stage == Some(reapi::execution_stage::Value::Queued as i32);
                if queued && submitted.elapsed() > limits.queued {
                    let reason = format!("no worker took the step within {:?}", limits.queued);
                    return Err(ReapiError::Unusable { call: call(), reason });
                }
                continue;
            }
            use bazel_remote_apis::google::longrunning::operation::Result as Outcome;
            return match operation.result {
                Some(Outcome::Response(response)) => reapi::ExecuteResponse::decode(response.value.as_slice())
                    .map_err(|error| ReapiError::Unusable { call: call(), reason: format!("its response: {error}") }),
                Some(Outcome::Error(status)) => Err(ReapiError::Call {
                    call: call(),
                    code: tonic::Code::from_i32(status.code),
                    message: status.message,
                }),
                None => {
                    Err(ReapiError::Unusable { call: call(), reason: "the operation ended without a result".into() })
                }
            };
        }
    }

    /// Opens a bot session (the Remote Workers API) for `session`; the session the server made.
    pub(crate) async fn create_bot_session(&self, session: bots::BotSession) -> Result<bots::BotSession, ReapiError> {
        let request = bots::CreateBotSessionRequest { parent: self.instance.clone(), bot_session: Some(session) };
        let mut client =
            bots::bots_client::BotsClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let mut request = tonic::Request::new(request);
        request.set_timeout(BOT_POLL);
        timed(|| "CreateBotSession".to_owned(), client.create_bot_session(request)).await
    }

    /// Reports `session` (its leases' states) and takes the server's version of it, which may
    /// hold new leases. The server holds the call while it has nothing for the bot (a long
    /// poll, bounded by its bot keepalive and [`BOT_POLL`]).
    pub(crate) async fn update_bot_session(&self, session: bots::BotSession) -> Result<bots::BotSession, ReapiError> {
        let request =
            bots::UpdateBotSessionRequest { name: session.name.clone(), bot_session: Some(session), update_mask: None };
        let mut client =
            bots::bots_client::BotsClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let mut request = tonic::Request::new(request);
        request.set_timeout(BOT_POLL);
        timed(|| "UpdateBotSession".to_owned(), client.update_bot_session(request)).await
    }

    fn prefix(&self) -> String {
        if self.instance.is_empty() { String::new() } else { format!("{}/", self.instance) }
    }

    fn read_resource(&self, digest: &Digest, size: u64) -> String {
        format!("{}blobs/{}/{size}", self.prefix(), digest.hex())
    }
}

/// The chunks of a ByteStream `Write` of a file: the first names the resource, the last
/// finishes the write.
struct FileChunks {
    file: File,
    offset: u64,
    size: u64,
    resource_name: String,
    read_error: Arc<Mutex<Option<std::io::Error>>>,
    done: bool,
}

impl Iterator for FileChunks {
    type Item = WriteRequest;

    fn next(&mut self) -> Option<WriteRequest> {
        if self.done {
            return None;
        }
        let wanted = (self.size - self.offset).min(WRITE_CHUNK as u64) as usize;
        let mut data = vec![0u8; wanted];
        if let Err(error) = self.file.read_exact(&mut data) {
            *self.read_error.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(error);
            self.done = true;
            return None;
        }
        let resource_name = if self.offset == 0 { std::mem::take(&mut self.resource_name) } else { String::new() };
        let write_offset = self.offset as i64;
        self.offset += wanted as u64;
        self.done = self.offset == self.size;
        Some(WriteRequest { resource_name, write_offset, finish_write: self.done, data })
    }
}

/// Splits `digests` into batches of at most [`BATCH_BYTES`] of blobs.
fn batches(digests: &[reapi::Digest]) -> Vec<Vec<reapi::Digest>> {
    let mut batches: Vec<Vec<reapi::Digest>> = Vec::new();
    let mut bytes = 0u64;
    for digest in digests {
        let size = u64::try_from(digest.size_bytes).unwrap_or(0);
        if batches.is_empty() || bytes + size > BATCH_BYTES {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        batches.last_mut().expect("pushed above").push(digest.clone());
    }
    batches
}

fn store_io(store: &Store, digest: &Digest, source: std::io::Error) -> ReapiError {
    ReapiError::Store {
        digest: digest.clone(),
        source: StoreError::Io { action: "write", path: store.tmp_dir(), source },
    }
}

/// A fresh name for an upload (ByteStream wants one per write).
fn upload_id() -> String {
    crate::remote_cache::random_name()
}

/// The message of an error and of every error that caused it (tonic's transport errors say
/// little at the top).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
