//! The plan of a build: every node the requested images reach, in dependency order, with its
//! salsa input, its context selection and its slot (the identity that explains misses).
//!
//! What it deliberately is not: the key computation (`keys`) or the execution (`walk`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use layerwright_cache::{FileSetDigest, FileSetInput, FileStat, MountInputs, StepIdentity, StepInput, StepKey, Store};
use layerwright_dsl::{Context, Image, Mount, MountSource, Step};
use rayon::prelude::*;

use super::error::{StepError, StepFailure};
use super::{KeyState, SolveOptions};
use crate::base;
use crate::context::{self, OpenedContext, Selection, StatLookup};
use crate::oci::Platform;
use crate::remote_cache::{Decision, Served};

/// What separates a step's own identity from the platform in its key's extra bytes.
pub(super) const PLATFORM_SEPARATOR: &[u8] = b"\0platform=";

/// What precedes the id and digest of a secret keyed by its digest in a RUN step's extra bytes.
const SECRET_DIGEST_SEPARATOR: &[u8] = b"\0secret-digest=";

/// One node of the plan.
pub(super) struct PlannedNode {
    pub(super) image: Image,
    pub(super) label: String,
    pub(super) parent: Option<usize>,
    pub(super) source: Option<usize>,
    /// The source images of a RUN step's bind mounts, in declaration order.
    pub(super) mount_sources: Vec<usize>,
    /// `parent`, `source` and `mount_sources`, for the dependency counts.
    pub(super) inputs: Vec<usize>,
    pub(super) input: StepInput,
    /// A position-based identity that survives changes of the step's inputs (for miss reasons).
    pub(super) slot: StepKey,
    pub(super) selection: Option<Selection>,
    /// What a RUN step's bind mounts of the context select, in declaration order.
    pub(super) mount_selections: Vec<Selection>,
    /// Provenance without the keys, which are known only after the key phase.
    pub(super) definition: String,
    pub(super) extra: Vec<u8>,
    /// Whether the step's mode override keeps the context files' modes out of the key.
    pub(super) keep_mode: bool,
}

pub(super) fn source_date_epoch_from_env() -> Option<u64> {
    std::env::var("SOURCE_DATE_EPOCH").ok()?.trim().parse().ok()
}

/// Every node reachable from `images`, inputs before the nodes that use them, each once.
pub(super) fn collect(images: &[&Image]) -> Vec<Image> {
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

/// By node: whether a RUN step that will execute has the node's layer among its overlays'
/// lowers (the RUN's parent and its bind mounts' source images, and everything down their
/// chains).
pub(super) fn below_run(plan: &[PlannedNode], decision: &Decision) -> Vec<bool> {
    let mut below = vec![false; plan.len()];
    let executes = |index: usize| decision.required[index] && decision.served[index] == Served::Execute;
    // Nodes come after their inputs: walking backwards, a node is settled before its parent.
    for index in (0..plan.len()).rev() {
        let executing_run = matches!(plan[index].image.step(), Step::Run(_)) && executes(index);
        if let Some(parent) = plan[index].parent
            && (below[index] || executing_run)
        {
            below[parent] = true;
        }
        // A bind mount's source image is an overlay's lowers too.
        if executing_run {
            for source in &plan[index].mount_sources {
                below[*source] = true;
            }
        }
    }
    below
}

pub(super) fn dependents(plan: &[PlannedNode]) -> Vec<Vec<usize>> {
    let mut dependents = vec![Vec::new(); plan.len()];
    for (index, node) in plan.iter().enumerate() {
        for input in &node.inputs {
            dependents[*input].push(index);
        }
    }
    dependents
}

/// The context paths a step selects: a `copy` step's source, a RUN step's context bind
/// mounts' sources (in declaration order).
fn context_requests(step: &Step) -> Vec<(&Context, &str)> {
    match step {
        Step::Copy(copy) => vec![(&copy.context, copy.source.as_str())],
        Step::Run(run) => run
            .mounts
            .iter()
            .filter_map(|mount| match mount {
                Mount::Bind { source: MountSource::Context(context), path, .. } => Some((context, path.as_str())),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Walks the contexts of every `copy` step and context bind mount, in parallel (each walk is
/// mostly `stat` calls, and the steps of a graph usually select different trees). Indexed like
/// `order`; one selection per request of [`context_requests`].
pub(super) fn select_contexts(
    order: &[Image],
    state: &mut KeyState,
    workers: &rayon::ThreadPool,
) -> Result<Vec<Vec<Selection>>, StepFailure> {
    let mut contexts: HashMap<PathBuf, OpenedContext> = HashMap::new();
    let mut requests: Vec<(usize, OpenedContext, String)> = Vec::new();
    for (position, image) in order.iter().enumerate() {
        for (context, source) in context_requests(image.step()) {
            let root = context.root().to_owned();
            let opened = match contexts.get(&root) {
                Some(opened) => opened.clone(),
                None => {
                    let opened = context::open_context(context)
                        .map_err(|error| StepFailure::new(image.step().label(), error))?;
                    contexts.insert(root, opened.clone());
                    opened
                }
            };
            requests.push((position, opened, source.to_owned()));
        }
    }
    let stat_cache = &state.stat_cache;
    let walked: Vec<Result<(Selection, Vec<_>), StepFailure>> = workers.install(|| {
        requests
            .par_iter()
            .map(|(position, context, source)| {
                let mut lookup = StatLookup::new(stat_cache);
                let selection = context::select(context, source, &mut lookup)
                    .map_err(|error| StepFailure::new(order[*position].step().label(), error))?;
                Ok((selection, lookup.computed))
            })
            .collect()
    });
    let mut selections: Vec<Vec<Selection>> = order.iter().map(|_| Vec::new()).collect();
    for ((position, _, _), result) in requests.iter().zip(walked) {
        let (selection, computed) = result?;
        StatLookup::record_into(computed, &mut state.stat_cache);
        selections[*position].push(selection);
    }
    Ok(selections)
}

pub(super) fn plan(
    order: &[Image],
    store: &Store,
    state: &mut KeyState,
    workers: &rayon::ThreadPool,
    options: &SolveOptions,
    platform: Option<&Platform>,
) -> Result<Vec<PlannedNode>, StepFailure> {
    let progress = &options.progress;
    let mut selections = select_contexts(order, state, workers)?;
    let mut positions: HashMap<usize, usize> = HashMap::new();
    let mut plan: Vec<PlannedNode> = Vec::with_capacity(order.len());
    for (position, image) in order.iter().enumerate() {
        let step = image.step();
        let label = step.label();
        let step_error = |source: StepError| StepFailure::new(label.clone(), source);
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
        let mut mount_selections = Vec::new();
        let mut mounts = MountInputs::default();
        let mut mount_sources = Vec::new();
        match step {
            Step::Copy(copy) => {
                let selected = selections[position].pop().expect("copy steps were walked");
                // A mode the step overrides does not enter the key: only what the layer carries.
                keep_mode = copy.options.file.mode.is_none();
                let digest = FileSetDigest::of(
                    selected.files.iter().map(|file| (file.relative.as_str(), file.material(keep_mode))),
                );
                let set_identity = format!("{}\0{}\0{}", copy.source, keep_mode, selected.source_is_directory);
                file_set = Some(state.keys.file_set(&selected.root, &set_identity, digest));
                selection = Some(selected);
            }
            Step::FromArchive { path } => {
                extra = archive_identity(path, &mut state.stat_cache, platform)
                    .map_err(|error| step_error(error.into()))?;
            }
            // The digest the reference names now: the key follows it, so a moved tag is a miss.
            Step::Pull { reference } => {
                extra = base::identity(store, reference, progress).map_err(|error| step_error(error.into()))?
            }
            Step::Run(run) => {
                mount_sources = run.bind_images().map(|source| positions[&source.node_id()]).collect();
                mounts.images = mount_sources.iter().map(|index| plan[*index].input).collect();
                mount_selections = std::mem::take(&mut selections[position]);
                let context_paths = run.mounts.iter().filter_map(|mount| match mount {
                    Mount::Bind { source: MountSource::Context(_), path, .. } => Some(path),
                    _ => None,
                });
                for (selected, path) in mount_selections.iter().zip(context_paths) {
                    // As a `copy` without a mode override selects (the mount shows the modes).
                    let digest = FileSetDigest::of(
                        selected.files.iter().map(|file| (file.relative.as_str(), file.material(true))),
                    );
                    let set_identity = format!("mount\0{path}\0{}", selected.source_is_directory);
                    mounts.files.push(state.keys.file_set(&selected.root, &set_identity, digest));
                }
                // A secret keyed by its digest: the digest (never the bytes) after the step's
                // identity; a step without one keeps its extra bytes.
                for mount in &run.mounts {
                    if let Mount::Secret { id, target, key_by_digest: true, .. } = mount {
                        let digest = crate::run::secret_digest(&label, id, target, &options.secrets)
                            .map_err(|error| step_error(StepError::from(crate::run::RunError::from(error))))?;
                        extra.extend_from_slice(SECRET_DIGEST_SEPARATOR);
                        extra.extend_from_slice(&(id.len() as u64).to_le_bytes());
                        extra.extend_from_slice(id.as_bytes());
                        extra.extend_from_slice(&digest);
                    }
                }
            }
            _ => {}
        }
        // What a step makes depends on the platform only when it runs the image's programs or
        // picks a base image; for this host's platform nothing is added, so keys stay as they
        // were before platforms existed.
        if let Some(platform) = platform
            && matches!(step, Step::Run(_) | Step::Pull { .. } | Step::FromArchive { .. })
        {
            extra.extend_from_slice(PLATFORM_SEPARATOR);
            extra.extend_from_slice(platform.to_string().as_bytes());
        }
        let parent_input = parent.map(|index| plan[index].input);
        let source_input = source.map(|index| plan[index].input);
        let slot = slot_of(step, parent.map(|index| &plan[index].slot), source.map(|index| &plan[index].slot));
        let input = state.keys.step(StepIdentity {
            encoding: encoding.clone(),
            parent: parent_input,
            source: source_input,
            extra: extra.clone(),
            files: file_set,
            mounts,
        });
        let inputs = parent.into_iter().chain(source).chain(mount_sources.iter().copied()).collect();
        positions.insert(image.node_id(), plan.len());
        plan.push(PlannedNode {
            image: image.clone(),
            label,
            parent,
            source,
            mount_sources,
            inputs,
            input,
            slot,
            selection,
            mount_selections,
            definition: blake3::hash(&encoding).to_hex()[..32].to_owned(),
            extra,
            keep_mode,
        });
    }
    Ok(plan)
}

/// The identity of a base archive's content, through the stat cache so that an unchanged
/// archive is not re-hashed.
fn archive_identity(
    path: &Path,
    stat_cache: &mut layerwright_cache::StatCache,
    platform: Option<&Platform>,
) -> Result<Vec<u8>, base::ImportError> {
    use std::os::unix::fs::MetadataExt;
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    // A layout directory is identified through its index.json; a tar through itself.
    let stat_path = if canonical.is_dir() { canonical.join("index.json") } else { canonical.clone() };
    // The image a layout's index selects depends on the platform: remembered apart.
    let cache_path = match platform {
        Some(platform) if canonical.is_dir() => PathBuf::from(format!("{}\0{platform}", stat_path.display())),
        _ => stat_path.clone(),
    };
    let stat = std::fs::metadata(&stat_path).ok().map(|metadata| {
        let mtime = (metadata.mtime(), metadata.mtime_nsec());
        let ctime = (metadata.ctime(), metadata.ctime_nsec());
        FileStat::from_unix(metadata.size(), mtime, ctime, metadata.ino(), metadata.dev())
    });
    if let Some(stat) = &stat
        && let Some(digest) = stat_cache.lookup(&cache_path, stat)
    {
        return Ok(digest.to_vec());
    }
    let identity = base::archive_identity(path, platform)?;
    let digest: [u8; 32] = *blake3::hash(identity.as_bytes()).as_bytes();
    if let Some(stat) = stat {
        stat_cache.record(cache_path, stat, digest);
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
