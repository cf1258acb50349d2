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
//! With remote caches (`cache_from`), `remote::prepare` runs between 2 and 3: it classifies
//! every node, downloads the blobs the build needs and hands the walk the records it may use
//! without their content. After 4, the records of every step go to `cache_to`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use layerwright_cache::{
    ActionRecord, FileMaterial, FileSetInput, FileStat, MissReason, Provenance, StepInput, StepKey, Store,
};
use layerwright_dsl::{ConfigChange, Image, Step};
use rayon::prelude::*;

use crate::build::{BuildError, Builder, BuiltImage, BuiltInner, ProgressEvent, StepError, StepReport};
use crate::config;
use crate::context::{self, OpenedContext, Selection, StatLookup};
use crate::import;
use crate::layer::{LayerEntry, LayerOptions};
use crate::remote::{self, Decision, NodeShape, RemoteCacheReport, Served};
use crate::run::{self, RunRequest};
use crate::steps::{Execution, IndexCache, NodeState};

/// One node of the plan.
struct PlannedNode {
    image: Image,
    label: String,
    parent: Option<usize>,
    source: Option<usize>,
    /// `parent` and `source`, for the dependency counts.
    inputs: Vec<usize>,
    input: StepInput,
    /// A position-based identity that survives changes of the step's inputs (for miss reasons).
    slot: StepKey,
    selection: Option<Selection>,
    /// Provenance without the keys, which are known only after the key phase.
    definition: String,
    extra: Vec<u8>,
    /// Whether the step's mode override keeps the context files' modes out of the key.
    keep_mode: bool,
}

pub(crate) fn build_all(builder: &Builder, images: &[&Image]) -> Result<Vec<BuiltImage>, BuildError> {
    let epoch = builder.options.source_date_epoch.or_else(source_date_epoch_from_env).unwrap_or(0);
    let order = collect(images);
    let plan = {
        let mut state = builder.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let plan = plan(&order, &builder.store, &mut state, &builder.workers)?;
        if let Err(error) = state.stat_cache.save(&builder.store) {
            // Only an accelerator: the next build re-hashes what it cannot find.
            eprintln!("layerwright: warning: cannot save the stat cache: {error}");
        }
        let keys = key_by_depth(&plan, state.keys.queries(), &builder.workers);
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
            source: node.source,
            recorded: !matches!(node.image.step(), Step::Scratch | Step::Config(_)),
        })
        .collect();
    let mut local_records = builder.workers.install(|| read_local_records(&builder.store, &plan, &keys, &shapes))?;
    let mut remote =
        remote::prepare(&builder.store, &builder.options.cache_from, &shapes, &keys, &tops, &mut local_records);
    let walk = Walk {
        store: &builder.store,
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
        builder,
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
    let records: Vec<(StepKey, ActionRecord)> = walk
        .records
        .into_iter()
        .enumerate()
        .filter_map(|(index, record)| Some((keys[index], record.into_inner()?)))
        .collect();
    let created = walk.created;
    if let Some(cache_to) = &builder.options.cache_to {
        remote::export(&builder.store, cache_to, records, &mut remote);
    }
    let uses_remote = !builder.options.cache_from.is_empty() || builder.options.cache_to.is_some();
    let remote_cache = uses_remote.then(|| Arc::new(remote.report));
    tops.iter()
        .map(|top| {
            let steps = reports_of(&plan, &outcomes, *top);
            let (top_state, _) = outcomes[*top].as_ref().expect("requested images are required");
            finish(&builder.store, top_state, &created, steps, bytes_written, remote_cache.clone())
                .map_err(|source| BuildError::Step { step: "write manifest".into(), source: Box::new(source) })
        })
        .collect()
}

/// The key of every planned node, one depth level at a time (in parallel within a level).
///
/// A step's key query asks for its parent's key, so a query started at the top of a deep chain
/// recurses down the whole chain inside salsa, whose frames are large: a chain of 200 steps can
/// overflow a worker's stack. Level by level, every query finds the keys of its inputs already
/// memoized and recurses one level at most.
fn key_by_depth(
    plan: &[PlannedNode],
    queries: &layerwright_cache::KeyQueries,
    workers: &rayon::ThreadPool,
) -> Vec<StepKey> {
    let mut depths = vec![0usize; plan.len()];
    let mut levels: Vec<Vec<usize>> = Vec::new();
    for (index, node) in plan.iter().enumerate() {
        // Inputs come before the nodes that use them in the plan.
        let depth = node.inputs.iter().map(|input| depths[*input] + 1).max().unwrap_or(0);
        depths[index] = depth;
        if levels.len() <= depth {
            levels.resize_with(depth + 1, Vec::new);
        }
        levels[depth].push(index);
    }
    let mut keys: Vec<Option<StepKey>> = vec![None; plan.len()];
    for level in levels {
        let level_queries = queries.clone();
        let level_keys: Vec<(usize, StepKey)> = workers.install(|| {
            level
                .par_iter()
                .map_with(level_queries, |queries, &index| (index, queries.key(plan[index].input)))
                .collect()
        });
        for (index, key) in level_keys {
            keys[index] = Some(key);
        }
    }
    keys.into_iter().map(|key| key.expect("every node is on a level")).collect()
}

fn source_date_epoch_from_env() -> Option<u64> {
    std::env::var("SOURCE_DATE_EPOCH").ok()?.trim().parse().ok()
}

/// Every node reachable from `images`, inputs before the nodes that use them, each once.
fn collect(images: &[&Image]) -> Vec<Image> {
    let mut order = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // An explicit stack of (node, inputs pushed?) keeps deep chains off the call stack.
    let mut stack: Vec<(Image, bool)> = images.iter().rev().map(|image| ((*image).clone(), false)).collect();
    while let Some((image, expanded)) = stack.pop() {
        if seen.contains(&image.node_id()) {
            continue;
        }
        if expanded {
            seen.insert(image.node_id());
            order.push(image);
            continue;
        }
        let inputs = image.inputs();
        stack.push((image, true));
        for input in inputs.into_iter().rev() {
            if !seen.contains(&input.node_id()) {
                stack.push((input, false));
            }
        }
    }
    order
}

/// By node: whether a RUN step that will execute has the node's layer among its overlay's
/// lowers (the RUN's parent, and everything down that parent's chain).
fn below_run(plan: &[PlannedNode], decision: &Decision) -> Vec<bool> {
    let mut below = vec![false; plan.len()];
    let executes = |index: usize| decision.required[index] && decision.served[index] == Served::Execute;
    // Nodes come after their inputs: walking backwards, a node is settled before its parent.
    for index in (0..plan.len()).rev() {
        if let Some(parent) = plan[index].parent
            && (below[index] || (matches!(plan[index].image.step(), Step::Run(_)) && executes(index)))
        {
            below[parent] = true;
        }
    }
    below
}

fn dependents(plan: &[PlannedNode]) -> Vec<Vec<usize>> {
    let mut dependents = vec![Vec::new(); plan.len()];
    for (index, node) in plan.iter().enumerate() {
        for input in &node.inputs {
            dependents[*input].push(index);
        }
    }
    dependents
}

/// Walks the contexts of every `copy` step, in parallel (each walk is mostly `stat` calls, and
/// the steps of a graph usually copy different trees). Indexed like `order`.
fn select_contexts(
    order: &[Image],
    state: &mut crate::build::BuilderState,
    workers: &rayon::ThreadPool,
) -> Result<Vec<Option<Selection>>, BuildError> {
    let mut contexts: HashMap<PathBuf, OpenedContext> = HashMap::new();
    let mut opened: Vec<Option<OpenedContext>> = Vec::with_capacity(order.len());
    for image in order {
        let Step::Copy(copy) = image.step() else {
            opened.push(None);
            continue;
        };
        let root = copy.context.root().to_owned();
        let context = match contexts.get(&root) {
            Some(context) => context.clone(),
            None => {
                let context = context::open_context(&copy.context)
                    .map_err(|error| BuildError::Step { step: image.step().label(), source: Box::new(error.into()) })?;
                contexts.insert(root, context.clone());
                context
            }
        };
        opened.push(Some(context));
    }
    let stat_cache = &state.stat_cache;
    let walked: Vec<Result<Option<(Selection, Vec<_>)>, BuildError>> = workers.install(|| {
        order
            .par_iter()
            .zip(opened.par_iter())
            .map(|(image, context)| {
                let (Step::Copy(copy), Some(context)) = (image.step(), context) else { return Ok(None) };
                let mut lookup = StatLookup::new(stat_cache);
                let selection = context::select(context, &copy.source, &mut lookup)
                    .map_err(|error| BuildError::Step { step: image.step().label(), source: Box::new(error.into()) })?;
                Ok(Some((selection, lookup.computed)))
            })
            .collect()
    });
    let mut selections = Vec::with_capacity(order.len());
    for result in walked {
        match result? {
            Some((selection, computed)) => {
                StatLookup::record_into(computed, &mut state.stat_cache);
                selections.push(Some(selection));
            }
            None => selections.push(None),
        }
    }
    Ok(selections)
}

fn plan(
    order: &[Image],
    store: &Store,
    state: &mut crate::build::BuilderState,
    workers: &rayon::ThreadPool,
) -> Result<Vec<PlannedNode>, BuildError> {
    let mut selections = select_contexts(order, state, workers)?;
    let mut positions: HashMap<usize, usize> = HashMap::new();
    let mut plan: Vec<PlannedNode> = Vec::with_capacity(order.len());
    for (position, image) in order.iter().enumerate() {
        let step = image.step();
        let label = step.label();
        let step_error = |source: StepError| BuildError::Step { step: label.clone(), source: Box::new(source) };
        let parent = image.parent().map(|parent| positions[&parent.node_id()]);
        let source = match step {
            Step::CopyFrom(copy) => Some(positions[&copy.image.node_id()]),
            _ => None,
        };
        let encoding = step.encode();
        let mut extra = Vec::new();
        let mut keep_mode = true;
        let mut file_set: Option<FileSetInput> = None;
        let mut selection = None;
        match step {
            Step::Copy(copy) => {
                let selected = selections[position].take().expect("copy steps were walked");
                // A mode the step overrides does not enter the key: only what the layer carries.
                keep_mode = copy.options.file.mode.is_none();
                let materials: Vec<(String, FileMaterial)> =
                    selected.files.iter().map(|file| (file.relative.clone(), file.material(keep_mode))).collect();
                let set_identity = format!("{}\0{}\0{}", copy.source, keep_mode, selected.source_is_directory);
                file_set = Some(state.keys.file_set(&selected.root, &set_identity, materials));
                selection = Some(selected);
            }
            Step::FromArchive { path } => {
                extra = archive_identity(path, &mut state.stat_cache).map_err(|error| step_error(error.into()))?;
            }
            // The digest the reference names now: the key follows it, so a moved tag is a miss.
            Step::Pull { reference } => extra = crate::pull::identity(store, reference).map_err(step_error)?,
            _ => {}
        }
        let parent_input = parent.map(|index| plan[index].input);
        let source_input = source.map(|index| plan[index].input);
        let slot = slot_of(step, parent.map(|index| &plan[index].slot), source.map(|index| &plan[index].slot));
        let input = state.keys.step(encoding.clone(), parent_input, source_input, extra.clone(), file_set);
        let inputs = parent.into_iter().chain(source).collect();
        positions.insert(image.node_id(), plan.len());
        plan.push(PlannedNode {
            image: image.clone(),
            label,
            parent,
            source,
            inputs,
            input,
            slot,
            selection,
            definition: blake3::hash(&encoding).to_hex()[..32].to_owned(),
            extra,
            keep_mode,
        });
    }
    Ok(plan)
}

/// The local store's record of every recorded node (scratch and config changes have none),
/// read in parallel as the walk used to read them (one small file each).
fn read_local_records(
    store: &Store,
    plan: &[PlannedNode],
    keys: &[StepKey],
    shapes: &[NodeShape],
) -> Result<Vec<Option<ActionRecord>>, BuildError> {
    plan.par_iter()
        .zip(keys)
        .zip(shapes)
        .map(|((node, key), shape)| {
            if !shape.recorded {
                return Ok(None);
            }
            store
                .read_action(key)
                .map_err(|error| BuildError::Step { step: node.label.clone(), source: Box::new(error.into()) })
        })
        .collect()
}

/// The identity of a base archive's content, through the stat cache so that an unchanged
/// archive is not re-hashed.
fn archive_identity(
    path: &Path,
    stat_cache: &mut layerwright_cache::StatCache,
) -> Result<Vec<u8>, import::ImportError> {
    use std::os::unix::fs::MetadataExt;
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    // A layout directory is identified through its index.json; a tar through itself.
    let stat_path = if canonical.is_dir() { canonical.join("index.json") } else { canonical.clone() };
    let stat = std::fs::metadata(&stat_path).ok().map(|metadata| {
        let mtime = (metadata.mtime(), metadata.mtime_nsec());
        let ctime = (metadata.ctime(), metadata.ctime_nsec());
        FileStat::from_unix(metadata.size(), mtime, ctime, metadata.ino(), metadata.dev())
    });
    if let Some(stat) = &stat
        && let Some(digest) = stat_cache.lookup(&stat_path, stat)
    {
        return Ok(digest.to_vec());
    }
    let identity = import::archive_identity(path)?;
    let digest: [u8; 32] = *blake3::hash(identity.as_bytes()).as_bytes();
    if let Some(stat) = stat {
        stat_cache.record(stat_path, stat, digest);
    }
    Ok(digest.to_vec())
}

/// A step's slot: its kind and where it writes, on top of its parent's slot.
fn slot_of(step: &Step, parent: Option<&StepKey>, source: Option<&StepKey>) -> StepKey {
    let (kind, detail): (u64, String) = match step {
        Step::Scratch => (1, String::new()),
        Step::FromArchive { path } => (2, path.display().to_string()),
        Step::Pull { reference } => (3, reference.clone()),
        Step::Copy(copy) => (4, copy.destination.clone()),
        Step::CopyFrom(copy) => (5, copy.destination.clone()),
        Step::WriteFile(write) => (6, write.path.clone()),
        Step::Mkdir(mkdir) => (7, mkdir.path.clone()),
        Step::Symlink(symlink) => (8, symlink.link_path.clone()),
        Step::Remove { path } => (9, path.clone()),
        Step::Run(_) => (10, String::new()),
        Step::Config(_) => (11, String::new()),
    };
    StepKey::builder().str("slot").optional_key(parent).optional_key(source).u64(kind).str(&detail).finish()
}

/// A finished node: its state and its report.
type Finished = (Arc<NodeState>, StepReport);

struct Walk<'a> {
    builder: &'a Builder,
    store: &'a Store,
    plan: &'a [PlannedNode],
    keys: &'a [StepKey],
    created: String,
    layer_options: LayerOptions,
    indexes: IndexCache,
    remaining: Vec<AtomicUsize>,
    dependents: Vec<Vec<usize>>,
    results: Vec<OnceLock<NodeResult>>,
    failed: AtomicBool,
    errors: Mutex<Vec<(usize, BuildError)>>,
    bytes_written: AtomicU64,
    /// The local store's record of each node, read once before the walk.
    local_records: Vec<Option<ActionRecord>>,
    /// The records remote caches serve without their content (see `remote`), by node.
    remote_records: Vec<Option<ActionRecord>>,
    /// How each node is served and which the build needs.
    decision: &'a Decision,
    /// The record each recorded node ended with, for the export to a remote cache.
    records: Vec<OnceLock<ActionRecord>>,
    /// By node: whether a RUN step stacks the node's layer under its overlay.
    snapshot_for_run: Vec<bool>,
}

/// What became of a node in the walk.
enum NodeResult {
    Done(Finished),
    /// Nothing the build needs reads this node and nothing has its result (a stage whose
    /// `copy_from` is a hit): it was not built.
    NotNeeded,
    /// It failed, or it was not started because an input failed or the build is stopping; the
    /// error is in `errors`.
    Failed,
}

/// How a step was satisfied.
struct Outcome {
    layers: Vec<layerwright_cache::LayerRecord>,
    config: serde_json::Value,
    cached: bool,
    layer: Option<String>,
    miss: Option<MissReason>,
    /// The step's action record (layer and base steps).
    record: Option<ActionRecord>,
}

impl<'a> Walk<'a> {
    fn run<'scope>(&'scope self, index: usize, scope: &rayon::Scope<'scope>)
    where
        'a: 'scope,
    {
        let node = &self.plan[index];
        let input_is = |wanted: fn(&NodeResult) -> bool| {
            node.inputs.iter().any(|input| self.results[*input].get().is_some_and(wanted))
        };
        let not_needed = !self.decision.required[index]
            && (self.decision.served[index] == Served::Execute
                || input_is(|result| matches!(result, NodeResult::NotNeeded)));
        let result = if input_is(|result| matches!(result, NodeResult::Failed)) || self.failed.load(Ordering::Relaxed) {
            NodeResult::Failed
        } else if not_needed {
            NodeResult::NotNeeded
        } else {
            match self.execute(index) {
                Ok(done) => NodeResult::Done(done),
                Err(source) => {
                    self.failed.store(true, Ordering::Relaxed);
                    let error = BuildError::Step { step: node.label.clone(), source: Box::new(source) };
                    self.errors.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push((index, error));
                    NodeResult::Failed
                }
            }
        };
        let _ = self.results[index].set(result);
        for dependent in &self.dependents[index] {
            if self.remaining[*dependent].fetch_sub(1, Ordering::AcqRel) == 1 {
                let dependent = *dependent;
                scope.spawn(move |scope| self.run(dependent, scope));
            }
        }
    }

    fn state(&self, index: Option<usize>) -> Option<Arc<NodeState>> {
        index.and_then(|index| match self.results[index].get() {
            Some(NodeResult::Done((state, _))) => Some(Arc::clone(state)),
            _ => None,
        })
    }

    fn execute(&self, index: usize) -> Result<(Arc<NodeState>, StepReport), StepError> {
        let node = &self.plan[index];
        let key = self.keys[index];
        if let Some(progress) = &self.builder.options.progress {
            progress(&ProgressEvent::Started { label: node.label.clone() });
        }
        let started = Instant::now();
        let parent = self.state(node.parent);
        let source = self.state(node.source);
        let outcome = self.outcome(index, key, parent.as_ref(), source.as_ref())?;
        if let Some(record) = outcome.record {
            let _ = self.records[index].set(record);
        }
        let report = StepReport {
            label: node.label.clone(),
            cached: outcome.cached,
            remote: self.decision.served[index] == Served::Remote,
            duration: started.elapsed(),
            layer: outcome.layer,
            miss: outcome.miss,
        };
        if let Some(progress) = &self.builder.options.progress {
            progress(&ProgressEvent::Finished(report.clone()));
        }
        Ok((Arc::new(NodeState::new(outcome.layers, outcome.config, parent)), report))
    }

    fn execution(&self) -> Execution<'_> {
        Execution {
            store: self.store,
            layer_options: self.layer_options,
            indexes: &self.indexes,
            snapshot_for_run: false,
        }
    }

    fn provenance(&self, index: usize) -> Provenance {
        let node = &self.plan[index];
        Provenance {
            key: self.keys[index].to_hex(),
            definition: node.definition.clone(),
            parent: node.parent.map(|parent| self.keys[parent].to_hex()),
            source: node.source.map(|source| self.keys[source].to_hex()),
            extra: hex::encode(&node.extra),
            // Hashed only here, on a miss: a no-op rebuild never pays for it.
            files: node
                .selection
                .iter()
                .flat_map(|selection| &selection.files)
                .map(|file| (file.relative.clone(), file.material(node.keep_mode).digest_hex()))
                .collect(),
        }
    }

    /// Why the step at `index` missed; records what it was built from for the next miss.
    fn explain_miss(&self, index: usize) -> MissReason {
        let provenance = self.provenance(index);
        let slot = &self.plan[index].slot;
        let reason = provenance.explain(self.store.read_provenance(slot).as_ref());
        if let Err(error) = self.store.write_provenance(slot, &provenance) {
            eprintln!("layerwright: warning: cannot record why step {} was built: {error}", self.plan[index].label);
        }
        reason
    }

    fn outcome(
        &self,
        index: usize,
        key: StepKey,
        parent: Option<&Arc<NodeState>>,
        source: Option<&Arc<NodeState>>,
    ) -> Result<Outcome, StepError> {
        let node = &self.plan[index];
        let step = node.image.step();
        let execution = Execution { snapshot_for_run: self.snapshot_for_run[index], ..self.execution() };
        let (parent, step) = match (parent, step) {
            (_, Step::Scratch) => {
                let config = config::scratch_config(&self.created);
                return Ok(Outcome { layers: Vec::new(), config, cached: true, layer: None, miss: None, record: None });
            }
            (_, Step::FromArchive { path }) => return self.import_base(index, key, path),
            (_, Step::Pull { reference }) => return self.pull_base(index, key, reference),
            (Some(parent), step) => (parent, step),
            (None, _) => unreachable!("only base steps lack a parent, and Image::with_step refuses bases"),
        };
        if let Step::Config(change) = step {
            return Ok(config_outcome(parent, change, &node.label, &self.created));
        }
        if let Some(record) = self.local_records[index].clone()
            && let Some(layer) = record.layers.into_iter().next()
        {
            // The key leaves the compression out: a hit may need its layer recompressed.
            let (layer, written) =
                crate::recompress::in_compression(self.store, layer, self.layer_options.compression)?;
            self.bytes_written.fetch_add(written, Ordering::Relaxed);
            return Ok(layer_outcome(parent, layer, &node.label, &self.created, true, None));
        }
        // Served by a remote cache without its content, which nothing in this build reads: the
        // layer stays as the remote has it.
        if let Some(record) = &self.remote_records[index]
            && let Some(layer) = record.layers.first()
        {
            return Ok(layer_outcome(parent, layer.clone(), &node.label, &self.created, true, None));
        }
        let miss = self.explain_miss(index);
        if let Some(hook) = &self.builder.options.before_execute {
            hook(&node.label);
        }
        let entries: Vec<LayerEntry>;
        let mut _spool = None;
        match step {
            Step::Run(run) => {
                let progress = self.builder.options.progress.as_ref();
                let request = RunRequest { key: &key, label: &node.label, run, parent, progress };
                let written = run::execute_run(&execution, &request)?;
                self.bytes_written.fetch_add(written.blob_bytes_written, Ordering::Relaxed);
                return Ok(layer_outcome(parent, written.record, &node.label, &self.created, false, Some(miss)));
            }
            Step::Copy(copy) => {
                let selection = node.selection.as_ref().expect("copy steps are planned with their selection");
                entries = execution.copy_entries(copy, selection, parent)?;
            }
            Step::CopyFrom(copy) => {
                // A required copy_from that executes has its source required too; only a
                // record that vanished since the plan could leave it unbuilt.
                let source = source
                    .ok_or(StepError::InputNotBuilt { input: self.plan[node.source.unwrap_or(index)].label.clone() })?;
                let (copied, spool) = execution.copy_from_entries(copy, source, parent)?;
                entries = copied;
                _spool = Some(spool);
            }
            Step::WriteFile(write) => entries = execution.write_file_entries(write, parent)?,
            Step::Mkdir(mkdir) => entries = execution.mkdir_entries(mkdir, parent)?,
            Step::Symlink(symlink) => entries = execution.symlink_entries(symlink, parent)?,
            Step::Remove { path } => entries = execution.remove_entries(path, parent)?,
            Step::Scratch | Step::FromArchive { .. } | Step::Pull { .. } | Step::Config(_) => {
                unreachable!("handled above")
            }
        }
        let written = execution.commit_layer(&key, entries)?;
        self.bytes_written.fetch_add(written.blob_bytes_written, Ordering::Relaxed);
        Ok(layer_outcome(parent, written.record, &node.label, &self.created, false, Some(miss)))
    }

    fn import_base(&self, index: usize, key: StepKey, path: &Path) -> Result<Outcome, StepError> {
        self.base_outcome(index, key, || {
            Ok(import::import_archive_for_runs(self.store, path, self.snapshot_for_run[index])?)
        })
    }

    /// As `import_base`, for a base from a registry: the plan phase resolved the reference to
    /// the digest in the node's `extra`, and that image is what is fetched.
    fn pull_base(&self, index: usize, key: StepKey, reference: &str) -> Result<Outcome, StepError> {
        self.base_outcome(index, key, || crate::pull::fetch(self.store, reference, &self.plan[index].extra))
    }

    /// A base image: its record on a hit; on a miss, what `fetch` brings in (verified and
    /// indexed), recorded with its config.
    fn base_outcome(
        &self,
        index: usize,
        key: StepKey,
        fetch: impl FnOnce() -> Result<import::BaseImage, StepError>,
    ) -> Result<Outcome, StepError> {
        let found = self.local_records[index].clone().or_else(|| self.remote_records[index].clone());
        if let Some(record) = found
            && let Some(config_digest) = &record.config
        {
            let config = self.execution().read_config(config_digest)?;
            let layers = record.layers.clone();
            return Ok(Outcome { layers, config, cached: true, layer: None, miss: None, record: Some(record) });
        }
        let miss = self.explain_miss(index);
        let base = fetch()?;
        let config_blob = self.store.put_blob(&config::to_bytes(&base.config))?;
        for (layer, index) in base.layers.iter().zip(base.indexes) {
            self.indexes.insert(layer.diff_id.clone(), index);
        }
        let record = ActionRecord { layers: base.layers.clone(), config: Some(config_blob.digest) };
        self.store.write_action(&key, &record)?;
        let (layers, config) = (base.layers, base.config);
        Ok(Outcome { layers, config, cached: false, layer: None, miss: Some(miss), record: Some(record) })
    }
}

fn config_outcome(parent: &NodeState, change: &ConfigChange, label: &str, created: &str) -> Outcome {
    let mut config = parent.config.clone();
    config::apply_change(&mut config, change, label, created);
    Outcome { layers: parent.layers.clone(), config, cached: true, layer: None, miss: None, record: None }
}

fn layer_outcome(
    parent: &NodeState,
    layer: layerwright_cache::LayerRecord,
    label: &str,
    created: &str,
    cached: bool,
    miss: Option<MissReason>,
) -> Outcome {
    let mut config = parent.config.clone();
    config::push_layer(&mut config, &layer, label, created);
    let mut layers = parent.layers.clone();
    let digest = layer.digest.to_string();
    let record = ActionRecord { layers: vec![layer.clone()], config: None };
    layers.push(layer);
    Outcome { layers, config, cached, layer: Some(digest), miss, record: Some(record) }
}

/// The reports of the nodes `top` depends on (itself included), in plan order.
fn reports_of(plan: &[PlannedNode], outcomes: &[Option<Finished>], top: usize) -> Vec<StepReport> {
    let mut needed = vec![false; plan.len()];
    needed[top] = true;
    for index in (0..=top).rev() {
        if needed[index] {
            for input in &plan[index].inputs {
                needed[*input] = true;
            }
        }
    }
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
) -> Result<BuiltImage, StepError> {
    let mut config = state.config.clone();
    config::set_created(&mut config, created);
    let config_blob = store.put_blob(&config::to_bytes(&config))?;
    let manifest = config::manifest(&config_blob.digest, config_blob.size, &state.layers);
    let manifest_blob = store.put_blob(&config::to_bytes(&manifest))?;
    Ok(BuiltImage {
        inner: Arc::new(BuiltInner {
            store: store.clone(),
            manifest: manifest_blob.digest,
            manifest_size: manifest_blob.size,
            config: config_blob.digest,
            layers: state.layers.clone(),
            steps,
            blob_bytes_written,
            remote_cache,
        }),
    })
}
