//! The walk: a rayon-parallel execution of the plan in which a node starts as soon as its inputs
//! are done. A node whose key has a committed record is a hit; a miss executes (file steps in
//! `steps`, RUN steps in `crate::run`, bases in `crate::base`) and commits its record last.
//!
//! What it deliberately is not: the planner or the keyer; it never computes a key.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use layerwright_cache::{ActionRecord, MissReason, Provenance, StepKey, Store};
use layerwright_dsl::{ConfigChange, Step};

use super::Session;
use super::error::{StepError, StepFailure};
use super::plan::PlannedNode;
use crate::base;
use crate::execution::{Appended, ConfigLog, Execution, IndexCache, LayerStack, NodeState};
use crate::layer::recompress;
use crate::layer::{LayerEntry, LayerOptions};
use crate::oci::{Platform, config};
use crate::progress::{ProgressEvent, StepReport};
use crate::remote_cache::{Decision, RemoteExecutor, RemoteRun, Served};
use crate::run::{self, RunRequest};

/// A finished node: its state and its report.
pub(super) type Finished = (Arc<NodeState>, StepReport);

pub(super) struct Walk<'a> {
    pub(super) session: Session<'a>,
    /// The platform the images are built for (`None`: this host's).
    pub(super) platform: Option<Platform>,
    pub(super) store: &'a Store,
    pub(super) plan: &'a [PlannedNode],
    pub(super) keys: &'a [StepKey],
    pub(super) created: String,
    pub(super) layer_options: LayerOptions,
    pub(super) indexes: IndexCache,
    pub(super) remaining: Vec<AtomicUsize>,
    pub(super) dependents: Vec<Vec<usize>>,
    pub(super) results: Vec<OnceLock<NodeResult>>,
    pub(super) failed: AtomicBool,
    pub(super) errors: Mutex<Vec<(usize, StepFailure)>>,
    pub(super) bytes_written: AtomicU64,
    /// The local store's record of each node, read once before the walk.
    pub(super) local_records: Vec<Option<ActionRecord>>,
    /// The records remote caches serve without their content (see `remote`), by node.
    pub(super) remote_records: Vec<Option<ActionRecord>>,
    /// How each node is served and which the build needs.
    pub(super) decision: &'a Decision,
    /// The record each recorded node ended with, for the export to a remote cache.
    pub(super) records: Vec<OnceLock<ActionRecord>>,
    /// By node: whether a RUN step stacks the node's layer under its overlay.
    pub(super) snapshot_for_run: Vec<bool>,
    /// Remote execution of RUN steps, when the build asked for it.
    pub(super) remote_executor: Option<&'a RemoteExecutor>,
}

/// What became of a node in the walk.
pub(super) enum NodeResult {
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
    layers: LayerStack,
    config: Arc<serde_json::Value>,
    /// What the step appended to its parent's config log (see `NodeState::config`).
    log: ConfigLog,
    cached: bool,
    layer: Option<String>,
    miss: Option<MissReason>,
    /// The step's action record (layer and base steps).
    record: Option<ActionRecord>,
}

/// The context files of a RUN step's bind mounts, by context path (the declared source joined
/// with the path below it), with the hex digest of their key material.
pub(super) fn mount_files(node: &PlannedNode) -> Vec<(String, String)> {
    let Step::Run(run) = node.image.step() else { return Vec::new() };
    let sources = run.mounts.iter().filter_map(|mount| match mount {
        layerwright_dsl::Mount::Bind { source: layerwright_dsl::MountSource::Context(_), path, .. } => Some(path),
        _ => None,
    });
    node.mount_selections
        .iter()
        .zip(sources)
        .flat_map(|(selection, source)| {
            let source = source.trim_end_matches('/');
            selection.files.iter().map(move |file| {
                let path =
                    if file.relative.is_empty() { source.to_owned() } else { format!("{source}/{}", file.relative) };
                (path, file.material(true).digest_hex())
            })
        })
        .collect()
}

impl<'a> Walk<'a> {
    pub(super) fn run<'scope>(&'scope self, index: usize, scope: &rayon::Scope<'scope>)
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
                    let error = StepFailure::new(node.label.clone(), source);
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
        self.session.options.progress.emit(ProgressEvent::Started { label: node.label.clone() });
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
        self.session.options.progress.emit(ProgressEvent::Finished(report.clone()));
        Ok((Arc::new(NodeState::with_log(outcome.layers, outcome.config, outcome.log, parent)), report))
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
            // A RUN step's bind mount sources stand where a `copy_from` source does.
            source: match (node.source, node.mount_sources.as_slice()) {
                (Some(source), _) => Some(self.keys[source].to_hex()),
                (None, []) => None,
                (None, sources) => {
                    Some(sources.iter().map(|source| self.keys[*source].to_hex()).collect::<Vec<_>>().join("+"))
                }
            },
            extra: hex::encode(&node.extra),
            // Hashed only here, on a miss: a no-op rebuild never pays for it. A bind mount's
            // files are named by their context path.
            files: node
                .selection
                .iter()
                .flat_map(|selection| &selection.files)
                .map(|file| (file.relative.clone(), file.material(node.keep_mode).digest_hex()))
                .chain(mount_files(node))
                .collect(),
        }
    }

    /// Why the step at `index` missed; records what it was built from for the next miss.
    fn explain_miss(&self, index: usize) -> MissReason {
        let provenance = self.provenance(index);
        let slot = &self.plan[index].slot;
        let (reason, recorded) = self.store.explain_and_record(slot, &provenance);
        if let Err(error) = recorded {
            let message = format!("cannot record why the step was built: {error}");
            self.session.options.progress.warn(Some(&self.plan[index].label), message);
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
                let config = Arc::new(config::scratch_config_for(&self.created, self.platform.as_ref()));
                let log = ConfigLog::default();
                return Ok(Outcome {
                    layers: LayerStack::default(),
                    config,
                    log,
                    cached: true,
                    layer: None,
                    miss: None,
                    record: None,
                });
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
            let (layer, written) = recompress::in_compression(self.store, layer, self.layer_options.compression)?;
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
        if let Some(hook) = &self.session.options.before_execute {
            hook(&node.label);
        }
        let entries: Vec<LayerEntry>;
        let mut _spool = None;
        match step {
            Step::Run(run) => {
                if let Some(layer) = self.run_remotely(key, &node.label, run, parent) {
                    let record = ActionRecord { layers: vec![layer.clone()], config: None };
                    self.store.write_action(&key, &record)?;
                    return Ok(layer_outcome(parent, layer, &node.label, &self.created, false, Some(miss)));
                }
                if let Some(platform) = &self.platform {
                    run::emulation::check(platform)?;
                }
                let progress = &self.session.options.progress;
                let defaults = self.session.options.run_limits;
                // A RUN that executes has its bind mounts' sources required: only a record that
                // vanished since the plan could leave one unbuilt.
                let bind_images = node
                    .mount_sources
                    .iter()
                    .map(|source| {
                        self.state(Some(*source))
                            .ok_or_else(|| StepError::InputNotBuilt { input: self.plan[*source].label.clone() })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let request = RunRequest {
                    key: &key,
                    label: &node.label,
                    run,
                    parent,
                    progress,
                    given: self.session.options.given(),
                    bind_images: &bind_images,
                    bind_contexts: &node.mount_selections,
                    defaults,
                };
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

    /// Runs a RUN step on the REAPI server's workers when the build asks for that and the step
    /// can travel; `None`: it runs locally.
    fn run_remotely(
        &self,
        key: StepKey,
        label: &str,
        run: &layerwright_dsl::Run,
        parent: &Arc<NodeState>,
    ) -> Option<layerwright_cache::LayerRecord> {
        let executor = self.remote_executor?;
        if let Err(reason) = executor.takes(run) {
            log::info!("{label}: runs locally: {reason}");
            return None;
        }
        let platform = self.platform.clone().unwrap_or_else(Platform::host);
        let request = RemoteRun {
            key: &key,
            label,
            run,
            defaults: self.session.options.run_limits,
            config: &parent.config,
            layers: parent.layers.to_vec(),
            layer_options: self.layer_options,
            platform: &platform,
        };
        executor.run(self.store, &request, &self.session.options.progress)
    }

    fn import_base(&self, index: usize, key: StepKey, path: &Path) -> Result<Outcome, StepError> {
        self.base_outcome(index, key, || {
            Ok(base::import_archive_for_runs(self.store, path, self.snapshot_for_run[index], self.platform.as_ref())?)
        })
    }

    /// As `import_base`, for a base from a registry: the plan phase resolved the reference to
    /// the digest in the node's `extra`, and that image is what is fetched.
    fn pull_base(&self, index: usize, key: StepKey, reference: &str) -> Result<Outcome, StepError> {
        self.base_outcome(index, key, || {
            let platform = self.platform.clone().unwrap_or_else(Platform::host);
            Ok(base::fetch(self.store, reference, &self.plan[index].extra, &platform)?)
        })
    }

    /// A base image: its record on a hit; on a miss, what `fetch` brings in (verified and
    /// indexed), recorded with its config.
    fn base_outcome(
        &self,
        index: usize,
        key: StepKey,
        fetch: impl FnOnce() -> Result<base::BaseImage, StepError>,
    ) -> Result<Outcome, StepError> {
        let found = self.local_records[index].clone().or_else(|| self.remote_records[index].clone());
        if let Some(record) = found
            && let Some(config_digest) = &record.config
        {
            let config = Arc::new(self.execution().read_config(config_digest)?);
            let layers = LayerStack::from_layers(record.layers.clone());
            let log = ConfigLog::default();
            return Ok(Outcome { layers, config, log, cached: true, layer: None, miss: None, record: Some(record) });
        }
        let miss = self.explain_miss(index);
        let base = fetch()?;
        let config_blob = self.store.put_blob(&config::to_bytes(&base.config))?;
        for (layer, index) in base.layers.iter().zip(base.indexes) {
            self.indexes.insert(layer.diff_id.clone(), index);
        }
        let record = ActionRecord { layers: base.layers.clone(), config: Some(config_blob.digest) };
        self.store.write_action(&key, &record)?;
        let (layers, config, log) = (LayerStack::from_layers(base.layers), Arc::new(base.config), ConfigLog::default());
        Ok(Outcome { layers, config, log, cached: false, layer: None, miss: Some(miss), record: Some(record) })
    }
}

fn config_outcome(parent: &NodeState, change: &ConfigChange, label: &str, created: &str) -> Outcome {
    let mut config = (*parent.config).clone();
    config::apply_runtime_change(&mut config, change);
    let log = parent.log.with(Appended::Change { created_by: label.to_owned(), created: created.to_owned() });
    let config = Arc::new(config);
    Outcome { layers: parent.layers.clone(), config, log, cached: true, layer: None, miss: None, record: None }
}

fn layer_outcome(
    parent: &NodeState,
    layer: layerwright_cache::LayerRecord,
    label: &str,
    created: &str,
    cached: bool,
    miss: Option<MissReason>,
) -> Outcome {
    let config = Arc::clone(&parent.config);
    let appended = Appended::Layer { layer: layer.clone(), created_by: label.to_owned(), created: created.to_owned() };
    let log = parent.log.with(appended);
    let digest = layer.digest.to_string();
    let record = ActionRecord { layers: vec![layer.clone()], config: None };
    let layers = parent.layers.with(layer);
    Outcome { layers, config, log, cached, layer: Some(digest), miss, record: Some(record) }
}
