//! `layerwright-worker`'s library: a bot of the Remote Workers API (BuildGrid's Bots service)
//! that runs the RUN steps builders submit with `Execute` (`remote_step` is the format).
//!
//! The flow: `CreateBotSession` with the platform the worker offers, then `UpdateBotSession`
//! in a loop (the server holds it while it has nothing, bounded by its bot keepalive). A lease
//! arrives PENDING (BuildGrid's already ACTIVE); the worker reports it ACTIVE and runs it on a thread of its own while the
//! loop keeps the session alive (at least once a second, well inside any keepalive); then it
//! reports it COMPLETED with the `ActionResult` (or an error status, which BuildGrid retries
//! when it is INTERNAL or UNAVAILABLE).
//!
//! A lease: the step file and the lower layers are fetched from the CAS into the worker's own
//! cache directory (a real store: a layer fetched once, and its unpacked snapshot, serve every
//! later lease), the step runs through the same runner and layer writer as a local build
//! (`run::execute_run`: the same sandbox, compression and metadata, so the same layer bytes),
//! and the layer and its record go to the CAS, shaped as a cache entry. A command that exits
//! with another code than 0 is a result with that exit code (the builder then runs the step
//! itself, which reports the failure as a local run would).
//!
//! Stopping (the `stop` flag, set on SIGTERM or Ctrl-C by the binary): no new lease is taken;
//! the running one is finished and reported; then the worker exits. A server that goes away
//! costs a reconnection (every second) and a fresh session; its leases are the server's to
//! re-queue.
//!
//! What it deliberately is not: a general REAPI worker. It runs only actions made by
//! `remote_step` (their platform asks for [`FORMAT_PROPERTY`]), one at a time.
//!
//! [`FORMAT_PROPERTY`]: super::remote_step::FORMAT_PROPERTY

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use googleapis_tonic_google_devtools_remoteworkers_v1test2::google::devtools::remoteworkers::v1test2 as bots;
use googleapis_tonic_google_devtools_remoteworkers_v1test2::google::rpc::Status;
use layerwright_cache::{Digest, LayerRecord, StepKey, Store, StoreError};
use prost::Message;
use thiserror::Error;

use super::action::{blob_of, digest_of_bytes, result_of};
use super::client::{Connection, ReapiError};
use super::remote_step::{PROGRAM, REMOTE_STEP_FORMAT, RemoteStep, layer_blobs, platform_properties, step_file_of};
use crate::execution::{ConfigLog, Execution, IndexCache, LayerStack, NodeState};
use crate::oci::Platform;
use crate::progress::Progress;
use crate::remote_cache::ReapiEndpoint;
use crate::run::{self, Given, RunError, RunRequest, Secrets, SshAgents};

/// How often a worker with a running lease reports to the server.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// How often a worker looks whether its running lease has ended.
const LEASE_POLL: Duration = Duration::from_millis(20);
/// How long a worker waits before it connects again to a server that failed.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// The type of a lease payload holding the action.
const ACTION_TYPE: &str = "type.googleapis.com/build.bazel.remote.execution.v2.Action";
/// The type of a lease payload holding the action's digest.
const DIGEST_TYPE: &str = "type.googleapis.com/build.bazel.remote.execution.v2.Digest";
/// The type of a lease result.
const RESULT_TYPE: &str = "type.googleapis.com/build.bazel.remote.execution.v2.ActionResult";
/// gRPC's INTERNAL: BuildGrid gives the lease to a worker again (a few times).
const INTERNAL: i32 = 13;

/// What a worker serves: the server, its own cache directory, and the platform it offers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerOptions {
    /// The REAPI server (BuildGrid with its Bots service) and instance.
    pub endpoint: ReapiEndpoint,
    /// The worker's cache directory (a layerwright store: layers and snapshots are kept there
    /// between leases).
    pub cache_dir: PathBuf,
    /// The platform whose steps it takes (`OSFamily` and `ISA` of its bot session).
    pub platform: Platform,
    /// The bot id it registers as.
    pub name: String,
}

impl WorkerOptions {
    /// A worker for `endpoint` keeping its cache in `cache_dir`, offering this host's platform,
    /// named after the host and the process.
    pub fn new(endpoint: ReapiEndpoint, cache_dir: impl Into<PathBuf>) -> WorkerOptions {
        let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
        WorkerOptions {
            endpoint,
            cache_dir: cache_dir.into(),
            platform: Platform::host(),
            name: format!("{host}-{}", std::process::id()),
        }
    }

    /// These options offering `platform` (a foreign one needs qemu-user under binfmt_misc).
    pub fn platform(mut self, platform: Platform) -> WorkerOptions {
        self.platform = platform;
        self
    }

    /// These options registering as `name`.
    pub fn name(mut self, name: impl Into<String>) -> WorkerOptions {
        self.name = name.into();
        self
    }
}

/// Why a worker could not serve at all.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// Its cache directory could not be opened.
    #[error("cache directory {path}: {source}")]
    Cache {
        /// The cache directory.
        path: PathBuf,
        /// What failed.
        source: StoreError,
    },
    /// The async runtime could not be started.
    #[error("{0}")]
    Runtime(String),
}

/// What a worker did, for its log.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum WorkerEvent {
    /// A bot session was opened.
    Connected {
        /// The session's name on the server.
        session: String,
    },
    /// The server failed; the worker connects again.
    Disconnected {
        /// What failed.
        reason: String,
    },
    /// A lease started.
    LeaseStarted {
        /// The lease (BuildGrid's job name).
        lease: String,
    },
    /// A lease ended; it is reported to the server next.
    LeaseFinished {
        /// The lease.
        lease: String,
        /// The step it ran, when its step file could be read.
        step: Option<String>,
        /// When the step's command started and when its layer was written.
        started: SystemTime,
        /// See `started`.
        finished: SystemTime,
        /// The layer's digest, or why there is none.
        outcome: Result<String, String>,
    },
    /// A stop was asked for; the running lease, if any, is finished first.
    Draining,
}

/// Serves leases until `stop` is set, then finishes the running lease, reports it and
/// returns. `events` hears what happens (the binary prints it).
pub fn serve(
    options: &WorkerOptions,
    stop: &AtomicBool,
    events: &(dyn Fn(WorkerEvent) + Sync),
) -> Result<(), WorkerError> {
    let store = Store::open(&options.cache_dir)
        .map_err(|source| WorkerError::Cache { path: options.cache_dir.clone(), source })?;
    crate::runtime::on_own_thread("layerwright-worker", || {
        crate::runtime::block_on(async {
            let mut running: Option<Running> = None;
            let mut draining_said = false;
            loop {
                let outcome = match Connection::open(&options.endpoint).await {
                    Ok(connection) => {
                        let state = SessionState { running: &mut running, draining_said: &mut draining_said };
                        session(&connection, options, &store, stop, events, state).await
                    }
                    Err(error) => Err(error),
                };
                match outcome {
                    Ok(()) => return,
                    Err(error) => {
                        // The server's leases are its to re-queue; a lease still running here is
                        // finished and reported to the next session.
                        events(WorkerEvent::Disconnected { reason: error.to_string() });
                        if stop.load(Ordering::Relaxed) && running.is_none() {
                            return;
                        }
                        tokio::time::sleep(RECONNECT_DELAY).await;
                    }
                }
            }
        })
    })
    .map_err(WorkerError::Runtime)
}

/// What outlives one bot session: the lease being run, and whether the stop was announced.
struct SessionState<'a> {
    running: &'a mut Option<Running>,
    draining_said: &'a mut bool,
}

/// A lease being run on its thread.
struct Running {
    lease: bots::Lease,
    work: JoinHandle<LeaseOutcome>,
}

/// What running a lease gave.
struct LeaseOutcome {
    step: Option<String>,
    started: SystemTime,
    finished: SystemTime,
    result: Result<(reapi::ActionResult, Option<LayerRecord>), String>,
}

/// One bot session, until the worker stops (`Ok`) or the server fails.
async fn session(
    connection: &Connection,
    options: &WorkerOptions,
    store: &Store,
    stop: &AtomicBool,
    events: &(dyn Fn(WorkerEvent) + Sync),
    state: SessionState<'_>,
) -> Result<(), ReapiError> {
    let SessionState { running, draining_said } = state;
    // BuildGrid matches a job's platform against the primary device's properties.
    let properties =
        platform_properties(&options.platform).into_iter().map(|(key, value)| bots::device::Property { key, value });
    let device = bots::Device { handle: options.name.clone(), properties: properties.collect() };
    let offer = bots::BotSession {
        bot_id: options.name.clone(),
        status: bots::BotStatus::Ok as i32,
        worker: Some(bots::Worker { devices: vec![device], ..Default::default() }),
        ..Default::default()
    };
    let mut session = connection.create_bot_session(offer).await?;
    events(WorkerEvent::Connected { session: session.name.clone() });
    // A lease that finished and is to be reported COMPLETED in the next update.
    let mut completed: Option<bots::Lease> = None;
    loop {
        if let Some(done) = running.take_if(|running| running.work.is_finished()) {
            let outcome = done.work.join().unwrap_or_else(|_| LeaseOutcome {
                step: None,
                started: SystemTime::now(),
                finished: SystemTime::now(),
                result: Err("the lease's thread panicked".into()),
            });
            let mut lease = done.lease;
            lease.state = bots::LeaseState::Completed as i32;
            let described = match outcome.result {
                Ok((result, layer)) => {
                    lease.status = Some(Status { code: 0, ..Default::default() });
                    lease.result =
                        Some(prost_types::Any { type_url: RESULT_TYPE.into(), value: result.encode_to_vec() });
                    layer
                        .map(|layer| layer.digest.to_string())
                        .ok_or_else(|| format!("the command exited with code {}", result.exit_code))
                }
                Err(error) => {
                    lease.status = Some(Status { code: INTERNAL, message: error.clone(), details: Vec::new() });
                    Err(error)
                }
            };
            events(WorkerEvent::LeaseFinished {
                lease: lease.id.clone(),
                step: outcome.step,
                started: outcome.started,
                finished: outcome.finished,
                outcome: described,
            });
            completed = Some(lease);
        }
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && !*draining_said {
            *draining_said = true;
            events(WorkerEvent::Draining);
        }
        if stopping && running.is_none() && completed.is_none() {
            return Ok(());
        }
        // What the worker knows of its leases: the running one ACTIVE, a finished one COMPLETED.
        session.leases = running.iter().map(|running| running.lease.clone()).chain(completed.clone()).collect();
        session.status = if stopping { bots::BotStatus::BotTerminating as i32 } else { bots::BotStatus::Ok as i32 };
        session = connection.update_bot_session(session).await?;
        completed = None;
        for lease in std::mem::take(&mut session.leases) {
            // BuildGrid hands a new lease out already ACTIVE; the protocol's is PENDING.
            let state = lease.state;
            let new = state == bots::LeaseState::Pending as i32 || state == bots::LeaseState::Active as i32;
            let known = running.as_ref().is_some_and(|running| running.lease.id == lease.id);
            if known || !new {
                continue;
            }
            if running.is_some() || stopping {
                // One lease at a time: the server re-queues what the worker does not take up.
                continue;
            }
            let mut lease = lease;
            lease.state = bots::LeaseState::Active as i32;
            events(WorkerEvent::LeaseStarted { lease: lease.id.clone() });
            let work = start_lease(store.clone(), options.clone(), lease.payload.clone());
            *running = Some(Running { lease, work });
        }
        // While a lease runs, the session is reported every KEEPALIVE, and at once when the
        // lease ends (its result is what the builder waits for).
        let keepalive_due = tokio::time::Instant::now() + KEEPALIVE;
        while running.as_ref().is_some_and(|running| !running.work.is_finished())
            && tokio::time::Instant::now() < keepalive_due
        {
            tokio::time::sleep(LEASE_POLL).await;
        }
    }
}

/// Runs a lease's step on a thread of its own (it blocks: sandbox, layer writer).
fn start_lease(store: Store, options: WorkerOptions, payload: Option<prost_types::Any>) -> JoinHandle<LeaseOutcome> {
    std::thread::Builder::new()
        .name("layerwright-lease".into())
        .spawn(move || run_lease(&store, &options, payload))
        .expect("spawning a thread (the OS refused: out of memory or threads)")
}

fn run_lease(store: &Store, options: &WorkerOptions, payload: Option<prost_types::Any>) -> LeaseOutcome {
    let mut outcome = LeaseOutcome {
        step: None,
        started: SystemTime::now(),
        finished: SystemTime::now(),
        result: Err(String::new()),
    };
    outcome.result = run_lease_step(store, options, payload, &mut outcome);
    outcome
}

/// Fetches the step and its layers, runs it, and sends its layer and record to the CAS.
fn run_lease_step(
    store: &Store,
    options: &WorkerOptions,
    payload: Option<prost_types::Any>,
    outcome: &mut LeaseOutcome,
) -> Result<(reapi::ActionResult, Option<LayerRecord>), String> {
    let endpoint = &options.endpoint;
    let step = crate::runtime::block_on(async {
        let connection = Connection::open(endpoint).await.map_err(|error| error.to_string())?;
        fetch_step(&connection, store, payload).await
    })??;
    outcome.step = Some(step.label.clone());
    let key = StepKey::from_hex(&step.key).ok_or_else(|| format!("`{}` is not a step key", step.key))?;
    let layer_options = step.layer_options()?;
    let run = step.run();
    let parent = Arc::new(NodeState::with_log(
        LayerStack::from_layers(step.layers.clone()),
        Arc::new(step.config.clone()),
        ConfigLog::default(),
        None,
    ));
    let indexes = IndexCache::default();
    let execution = Execution { store, layer_options, indexes: &indexes, snapshot_for_run: false };
    let (secrets, ssh) = (Secrets::new(), SshAgents::new());
    let progress = Progress::new(None);
    let request = RunRequest {
        key: &key,
        label: &step.label,
        run: &run,
        parent: &parent,
        progress: &progress,
        given: Given { secrets: &secrets, ssh: &ssh },
        bind_images: &[],
        bind_contexts: &[],
        defaults: step.defaults(),
    };
    outcome.started = SystemTime::now();
    let ran = run::execute_run(&execution, &request);
    outcome.finished = SystemTime::now();
    let metadata = reapi::ExecutedActionMetadata {
        worker: options.name.clone(),
        execution_start_timestamp: Some(timestamp(outcome.started)),
        execution_completed_timestamp: Some(timestamp(outcome.finished)),
        ..Default::default()
    };
    let layer = match ran {
        Ok(written) => written.record,
        Err(RunError::Failed { code, .. }) => {
            let result =
                reapi::ActionResult { exit_code: code, execution_metadata: Some(metadata), ..Default::default() };
            return Ok((result, None));
        }
        Err(error) => return Err(format!("{}: {error}", step.label)),
    };
    let record = layerwright_cache::ActionRecord { layers: vec![layer.clone()], config: None };
    let record_bytes = serde_json::to_vec(&record).map_err(|error| format!("cannot encode a record: {error}"))?;
    let blobs = vec![(layer.digest.clone(), layer.size)];
    let mut result = result_of(&record_bytes, &blobs);
    result.execution_metadata = Some(metadata);
    let sizes: HashMap<Digest, u64> =
        blobs.iter().cloned().chain([(Digest::of_bytes(&record_bytes), record_bytes.len() as u64)]).collect();
    let in_memory: HashMap<Digest, Vec<u8>> = HashMap::from([(Digest::of_bytes(&record_bytes), record_bytes)]);
    crate::runtime::block_on(async {
        let connection = Connection::open(endpoint).await?;
        let sent = super::send_missing(&connection, store, &sizes, &in_memory).await?;
        match sent.unsendable.iter().next() {
            Some(digest) => Err(ReapiError::Unusable {
                call: format!("uploading blob {digest}"),
                reason: "it no longer matches its digest in the worker's store".into(),
            }),
            None => Ok(()),
        }
    })?
    .map_err(|error| error.to_string())?;
    Ok((result, Some(layer)))
}

/// The step a lease's payload names, with its lower layers in `store`.
async fn fetch_step(
    connection: &Connection,
    store: &Store,
    payload: Option<prost_types::Any>,
) -> Result<RemoteStep, String> {
    let payload = payload.ok_or("the lease has no payload")?;
    let action = match payload.type_url.as_str() {
        ACTION_TYPE => reapi::Action::decode(payload.value.as_slice()).map_err(|error| error.to_string())?,
        DIGEST_TYPE => {
            let digest = reapi::Digest::decode(payload.value.as_slice()).map_err(|error| error.to_string())?;
            decode_blob(connection, &digest).await?
        }
        other => return Err(format!("the lease's payload is a {other}, not an action")),
    };
    let command: reapi::Command =
        decode_blob(connection, action.command_digest.as_ref().ok_or("the action has no command")?).await?;
    if command.arguments.first().map(String::as_str) != Some(PROGRAM) {
        return Err(format!("the action's command is {:?}, not a layerwright step", command.arguments));
    }
    let input_root: reapi::Directory =
        decode_blob(connection, action.input_root_digest.as_ref().ok_or("the action has no input root")?).await?;
    let step_bytes = read_blob(connection, &step_file_of(&input_root)?).await?;
    let step: RemoteStep =
        serde_json::from_slice(&step_bytes).map_err(|error| format!("the step file is not a step: {error}"))?;
    if step.format != REMOTE_STEP_FORMAT {
        return Err(format!("the step has format {}, this worker reads {REMOTE_STEP_FORMAT}", step.format));
    }
    // Each layer is checked by digest as the store commits it; one the store has (an earlier
    // lease's) is not fetched again.
    for (digest, size) in layer_blobs(&step) {
        connection.download(store, &digest, size).await.map_err(|error| error.to_string())?;
    }
    Ok(step)
}

/// A small blob of the CAS, checked against its digest.
async fn read_blob(connection: &Connection, digest: &reapi::Digest) -> Result<Vec<u8>, String> {
    let (expected, _) = blob_of(digest)?;
    let found = connection.read_small(std::slice::from_ref(digest)).await.map_err(|error| error.to_string())?;
    found
        .into_iter()
        .map(|(_, bytes)| bytes)
        .find(|bytes| digest_of_bytes(bytes).hash == expected.hex())
        .ok_or_else(|| format!("blob {expected} is missing or corrupt in the CAS"))
}

/// A message of the CAS.
async fn decode_blob<M: Message + Default>(connection: &Connection, digest: &reapi::Digest) -> Result<M, String> {
    let bytes = read_blob(connection, digest).await?;
    M::decode(bytes.as_slice()).map_err(|error| format!("blob {}: {error}", digest.hash))
}

/// A time as a protobuf timestamp.
fn timestamp(time: SystemTime) -> bazel_remote_apis::google::protobuf::Timestamp {
    let since = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    bazel_remote_apis::google::protobuf::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}
