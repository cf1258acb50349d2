//! The solver: plan the graph, key every step, then execute the misses in parallel.
//!
//! 1. **Plan** (sequential, under the builder's state lock): collect every node the requested
//!    images reach (parents and `copy_from` sources) in dependency order, shared nodes once.
//!    Walk the contexts of `copy` steps (digests through the stat cache) and find each step's
//!    salsa input in the long-lived key database.
//! 2. **Key**: the tracked `step_key` query for every node, in parallel with one clone of the
//!    query storage per rayon worker (`map_with`), one depth level of the graph at a time (so
//!    that no query recurses down a deep chain). Unchanged inputs re-execute nothing.
//! 3. **Execute**: a rayon-parallel walk of the DAG in which a node starts as soon as its inputs
//!    are done. A node whose key has a committed action record is a hit; a miss executes, and
//!    its record is committed last. After the first failure no new step starts; the error of the
//!    earliest failed step in plan order is returned.
//! 4. **Finish**: the config and manifest of each requested image go into the store.
//!
//! With remote caches (`cache_from`, a REAPI server), `remote_cache::prepare` runs between 2
//! and 3: it classifies every node, downloads the blobs the build needs and hands the walk the
//! records it may use without their content. After 4, the records of every step go to
//! `cache_to`, and those of the steps that executed to the REAPI server.

mod error;
mod keys;
mod plan;
mod steps;
mod walk;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use layerwright_cache::{ActionRecord, Digest, KeyDatabase, LayerRecord, StatCache, StepKey, Store};
use layerwright_dsl::{Image, Step};

pub use error::StepError;
pub(crate) use error::StepFailure;

use crate::execution::{IndexCache, NodeState};
use crate::layer::{Compression, LayerOptions};
use crate::oci::{Platform, config};
use crate::progress::{Progress, StepHook, StepReport};
use crate::remote_cache::{self, NodeShape, RemoteCacheReport};
use keys::{key_by_depth, read_local_records};
use plan::{below_run, collect, dependents, plan, source_date_epoch_from_env};
use walk::{Finished, NodeResult, Walk};

/// The long-lived, mutable part of a builder: the salsa key database and the stat cache.
pub(crate) struct KeyState {
    pub keys: KeyDatabase,
    pub stat_cache: StatCache,
}

/// How a build runs (from the builder's options).
#[derive(Clone, Default)]
pub(crate) struct SolveOptions {
    pub compression: Compression,
    pub source_date_epoch: Option<u64>,
    pub progress: Progress,
    pub before_execute: Option<StepHook>,
    pub cache_from: Vec<String>,
    pub cache_to: Option<String>,
    /// The REAPI server used as a shared step cache.
    pub reapi: Option<remote_cache::ReapiEndpoint>,
    /// Whether RUN steps run on the REAPI server's workers.
    pub reapi_execute: bool,
    /// The secrets RUN steps may mount, by id.
    pub secrets: crate::run::Secrets,
    /// The SSH agents RUN steps may mount, by id.
    pub ssh_agents: crate::run::SshAgents,
    /// The builder's limits for every RUN step.
    pub run_limits: layerwright_dsl::Limits,
}

impl SolveOptions {
    /// The secrets and SSH agents, as the steps' mounts take them.
    pub fn given(&self) -> crate::run::Given<'_> {
        crate::run::Given { secrets: &self.secrets, ssh: &self.ssh_agents }
    }
}

/// What a build reads from the builder that runs it.
#[derive(Clone, Copy)]
pub(crate) struct Session<'a> {
    pub store: &'a Store,
    pub options: &'a SolveOptions,
    pub state: &'a Mutex<KeyState>,
    pub workers: &'a rayon::ThreadPool,
}

/// What a build is for: a platform (`None`: this host's), and whether the images' provenance
/// inputs are wanted (for attestations).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Target<'a> {
    pub platform: Option<&'a Platform>,
    pub provenance: bool,
}

/// A built image: its manifest, config and layers are in `store`.
#[derive(Debug)]
pub(crate) struct SolvedImage {
    pub store: Store,
    pub manifest: Digest,
    pub manifest_size: u64,
    pub config: Digest,
    pub layers: Vec<LayerRecord>,
    pub steps: Vec<StepReport>,
    pub blob_bytes_written: u64,
    /// What the build did with remote caches, when it had any.
    pub remote_cache: Option<Arc<RemoteCacheReport>>,
    /// What the image was built from, for its provenance.
    pub inputs: BuildInputs,
}

/// What an image was built from, by digest: the declaration (the canonical encoding of every
/// step it reaches), its base images and the files each context copy selected. Nothing in it
/// depends on where the sources are on disk, so two checkouts give the same provenance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct BuildInputs {
    /// blake3 of the steps' canonical encodings, in plan order.
    pub declaration_blake3: String,
    /// Base images: (the step's label, the digest algorithm, the digest).
    pub bases: Vec<(String, &'static str, String)>,
    /// Context copies: (the step's label, blake3 of the selected files' paths and contents).
    pub contexts: Vec<(String, String)>,
}

/// Builds `images` in one walk (a step they share is built once) for `platform` (`None`: this
/// host's); one result per image.
pub(crate) fn build_all(
    session: Session<'_>,
    images: &[&Image],
    target: Target<'_>,
) -> Result<Vec<SolvedImage>, StepFailure> {
    let platform = target.platform;
    let builder = session;
    let epoch = builder.options.source_date_epoch.or_else(source_date_epoch_from_env).unwrap_or(0);
    if builder.options.reapi_execute && builder.options.reapi.is_none() {
        return Err(StepFailure::new("remote execution", StepError::RemoteExecutionWithoutEndpoint));
    }
    let order = collect(images);
    // A RUN step's mounts are checked before anything executes.
    for image in &order {
        if let Step::Run(run) = image.step() {
            crate::run::validate_mounts(&image.step().label(), run, builder.options.given())
                .map_err(|error| StepFailure::new(image.step().label(), error))?;
        }
    }
    let plan = {
        let mut state = builder.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let plan = plan(&order, builder.store, &mut state, builder.workers, builder.options, platform)?;
        if let Err(error) = state.stat_cache.save(builder.store) {
            // Only an accelerator: the next build re-hashes what it cannot find.
            builder.options.progress.warn(None, format!("cannot save the stat cache: {error}"));
        }
        let keys = key_by_depth(&plan, state.keys.queries(), builder.workers);
        (plan, keys)
    };
    let (plan, keys) = plan;
    let positions: HashMap<usize, usize> =
        plan.iter().enumerate().map(|(index, node)| (node.image.node_id(), index)).collect();
    let tops: Vec<usize> = images.iter().map(|image| positions[&image.node_id()]).collect();
    let shapes: Vec<NodeShape> = plan
        .iter()
        .map(|node| NodeShape {
            parent: node.parent,
            sources: node.source.into_iter().chain(node.mount_sources.iter().copied()).collect(),
            recorded: !matches!(node.image.step(), Step::Scratch | Step::Config(_)),
        })
        .collect();
    let mut local_records = builder.workers.install(|| read_local_records(builder.store, &plan, &keys, &shapes))?;
    let sources = remote_cache::sources(&builder.options.cache_from, builder.options.reapi.as_ref());
    let mut remote = remote_cache::prepare(
        builder.store,
        &sources,
        &shapes,
        &keys,
        &tops,
        &mut local_records,
        &builder.options.progress,
    );
    let remote_executor = match &builder.options.reapi {
        Some(endpoint) if builder.options.reapi_execute => Some(remote_cache::RemoteExecutor::new(endpoint, &remote)),
        _ => None,
    };
    let walk = Walk {
        remote_executor: remote_executor.as_ref(),
        store: builder.store,
        plan: &plan,
        keys: &keys,
        created: config::rfc3339(epoch),
        layer_options: LayerOptions { compression: builder.options.compression, mtime: epoch },
        indexes: IndexCache::default(),
        remaining: plan.iter().map(|node| AtomicUsize::new(node.inputs.len())).collect(),
        dependents: dependents(&plan),
        results: plan.iter().map(|_| OnceLock::new()).collect(),
        failed: AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
        bytes_written: AtomicU64::new(0),
        local_records,
        remote_records: std::mem::take(&mut remote.remote_records),
        decision: &remote.decision,
        records: plan.iter().map(|_| OnceLock::new()).collect(),
        snapshot_for_run: below_run(&plan, &remote.decision),
        session: builder,
        platform: platform.cloned(),
    };
    builder.workers.scope(|scope| {
        for (index, node) in plan.iter().enumerate() {
            if node.inputs.is_empty() {
                let walk = &walk;
                scope.spawn(move |scope| walk.run(index, scope));
            }
        }
    });
    let mut errors = walk.errors.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
    errors.sort_by_key(|(index, _)| *index);
    if let Some((_, error)) = errors.into_iter().next() {
        return Err(error);
    }
    // `None` for the nodes the build did not need.
    let outcomes: Vec<Option<Finished>> = walk
        .results
        .into_iter()
        .map(|result| match result.into_inner() {
            Some(NodeResult::Done(finished)) => Some(finished),
            Some(NodeResult::NotNeeded) => None,
            Some(NodeResult::Failed) | None => unreachable!("every node succeeded when no error was recorded"),
        })
        .collect();
    let bytes_written = walk.bytes_written.load(Ordering::Relaxed);
    let indexed_records: Vec<(usize, ActionRecord)> = walk
        .records
        .into_iter()
        .enumerate()
        .filter_map(|(index, record)| Some((index, record.into_inner()?)))
        .collect();
    let created = walk.created;
    if let Some(executor) = remote_executor {
        executor.finish(&mut remote);
    }
    if let Some(endpoint) = &builder.options.reapi {
        // Only what this build executed: a hit came from a cache that has it, or was built
        // (and uploaded) before.
        let executed: Vec<(StepKey, ActionRecord)> = indexed_records
            .iter()
            .filter(|(index, _)| outcomes[*index].as_ref().is_some_and(|(_, report)| !report.cached))
            .map(|(index, record)| (keys[*index], record.clone()))
            .collect();
        remote_cache::upload_to_reapi(builder.store, endpoint, &executed, &mut remote, &builder.options.progress);
    }
    let records: Vec<(StepKey, ActionRecord)> =
        indexed_records.into_iter().map(|(index, record)| (keys[index], record)).collect();
    if let Some(cache_to) = &builder.options.cache_to {
        remote_cache::export(builder.store, cache_to, records, &mut remote, &builder.options.progress);
    }
    let uses_remote =
        !builder.options.cache_from.is_empty() || builder.options.cache_to.is_some() || builder.options.reapi.is_some();
    let remote_cache = uses_remote.then(|| Arc::new(remote.report));
    tops.iter()
        .map(|top| {
            let steps = reports_of(&plan, &outcomes, *top);
            let (top_state, _) = outcomes[*top].as_ref().expect("requested images are required");
            // Only attestations read the inputs: a plain build (a no-op rebuild above all) does
            // not hash every selected file's digest again for them.
            let inputs = if target.provenance { inputs_of(&plan, *top) } else { BuildInputs::default() };
            finish(builder.store, top_state, &created, steps, bytes_written, remote_cache.clone(), inputs)
                .map_err(|source| StepFailure::new("write manifest", source))
        })
        .collect()
}

/// By node: whether `top` depends on it (itself included). Inputs come before the nodes that
/// use them in the plan, so one backward pass settles every node.
fn needed_by(plan: &[plan::PlannedNode], top: usize) -> Vec<bool> {
    let mut needed = vec![false; plan.len()];
    needed[top] = true;
    for index in (0..=top).rev() {
        if needed[index] {
            for input in &plan[index].inputs {
                needed[*input] = true;
            }
        }
    }
    needed
}

/// The reports of the nodes `top` depends on (itself included), in plan order.
fn reports_of(plan: &[plan::PlannedNode], outcomes: &[Option<Finished>], top: usize) -> Vec<StepReport> {
    let needed = needed_by(plan, top);
    (0..=top)
        .filter(|index| needed[*index])
        .filter_map(|index| outcomes[index].as_ref().map(|(_, report)| report.clone()))
        .collect()
}

/// Stores the config and manifest of a built node.
fn finish(
    store: &Store,
    state: &NodeState,
    created: &str,
    steps: Vec<StepReport>,
    blob_bytes_written: u64,
    remote_cache: Option<Arc<RemoteCacheReport>>,
    inputs: BuildInputs,
) -> Result<SolvedImage, StepError> {
    let mut config = state.full_config();
    config::set_created(&mut config, created);
    let config_blob = store.put_blob(&config::to_bytes(&config))?;
    let layers = state.layers.to_vec();
    let manifest = config::manifest(&config_blob.digest, config_blob.size, &layers);
    let manifest_blob = store.put_blob(&config::to_bytes(&manifest))?;
    Ok(SolvedImage {
        store: store.clone(),
        manifest: manifest_blob.digest,
        manifest_size: manifest_blob.size,
        config: config_blob.digest,
        layers,
        steps,
        blob_bytes_written,
        remote_cache,
        inputs,
    })
}

/// The inputs of the nodes `top` depends on (itself included), in plan order.
/// blake3 of (path, material digest) pairs, in order, as a provenance's context entry.
fn files_blake3(files: impl Iterator<Item = (String, String)>) -> String {
    let mut hasher = blake3::Hasher::new();
    for (path, digest) in files {
        hasher.update(path.as_bytes());
        hasher.update(b"\0");
        hasher.update(digest.as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize().to_hex().to_string()
}

fn inputs_of(plan: &[plan::PlannedNode], top: usize) -> BuildInputs {
    let needed = needed_by(plan, top);
    let mut declaration = blake3::Hasher::new();
    let mut inputs = BuildInputs::default();
    for node in (0..=top).filter(|index| needed[*index]).map(|index| &plan[index]) {
        declaration.update(node.definition.as_bytes());
        match node.image.step() {
            Step::Pull { .. } => {
                let identity = node.extra.split(|byte| *byte == 0).next().unwrap_or_default();
                let digest = String::from_utf8_lossy(identity).into_owned();
                let hex = digest.strip_prefix("sha256:").unwrap_or(&digest).to_owned();
                inputs.bases.push((node.label.clone(), "sha256", hex));
            }
            Step::FromArchive { .. } => {
                let identity = node.extra.split(|byte| *byte == 0).next().unwrap_or_default();
                inputs.bases.push((node.label.clone(), "blake3", hex::encode(identity)));
            }
            Step::Copy(_) => {
                let files = node
                    .selection
                    .iter()
                    .flat_map(|selection| &selection.files)
                    .map(|file| (file.relative.clone(), file.material(node.keep_mode).digest_hex()));
                inputs.contexts.push((node.label.clone(), files_blake3(files)));
            }
            // The context files of bind mounts, by context path.
            Step::Run(_) if !node.mount_selections.is_empty() => {
                inputs.contexts.push((node.label.clone(), files_blake3(walk::mount_files(node).into_iter())));
            }
            _ => {}
        }
    }
    inputs.declaration_blake3 = declaration.finalize().to_hex().to_string();
    inputs
}
