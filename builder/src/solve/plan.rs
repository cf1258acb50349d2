//! The plan of a build: every node the requested images reach, in dependency order, with its
//! salsa input, its context selection and its slot (the identity that explains misses).
//!
//! What it deliberately is not: the key computation (`keys`) or the execution (`walk`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use layerwright_cache::{FileSetDigest, FileSetInput, FileStat, StepInput, StepKey, Store};
use layerwright_dsl::{Image, Step};
use rayon::prelude::*;

use super::KeyState;
use super::error::{StepError, StepFailure};
use crate::base;
use crate::context::{self, OpenedContext, Selection, StatLookup};
use crate::oci::Platform;
use crate::progress::Progress;
use crate::remote_cache::{Decision, Served};

/// What separates a step's own identity from the platform in its key's extra bytes.
pub(super) const PLATFORM_SEPARATOR: &[u8] = b"\0platform=";

/// One node of the plan.
pub(super) struct PlannedNode {
    pub(super) image: Image,
    pub(super) label: String,
    pub(super) parent: Option<usize>,
    pub(super) source: Option<usize>,
    /// `parent` and `source`, for the dependency counts.
    pub(super) inputs: Vec<usize>,
    pub(super) input: StepInput,
    /// A position-based identity that survives changes of the step's inputs (for miss reasons).
    pub(super) slot: StepKey,
    pub(super) selection: Option<Selection>,
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

/// By node: whether a RUN step that will execute has the node's layer among its overlay's
/// lowers (the RUN's parent, and everything down that parent's chain).
pub(super) fn below_run(plan: &[PlannedNode], decision: &Decision) -> Vec<bool> {
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

pub(super) fn dependents(plan: &[PlannedNode]) -> Vec<Vec<usize>> {
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
pub(super) fn select_contexts(
    order: &[Image],
    state: &mut KeyState,
    workers: &rayon::ThreadPool,
) -> Result<Vec<Option<Selection>>, StepFailure> {
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
                    .map_err(|error| StepFailure::new(image.step().label(), error))?;
                contexts.insert(root, context.clone());
                context
            }
        };
        opened.push(Some(context));
    }
    let stat_cache = &state.stat_cache;
    let walked: Vec<Result<Option<(Selection, Vec<_>)>, StepFailure>> = workers.install(|| {
        order
            .par_iter()
            .zip(opened.par_iter())
            .map(|(image, context)| {
                let (Step::Copy(copy), Some(context)) = (image.step(), context) else { return Ok(None) };
                let mut lookup = StatLookup::new(stat_cache);
                let selection = context::select(context, &copy.source, &mut lookup)
                    .map_err(|error| StepFailure::new(image.step().label(), error))?;
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

pub(super) fn plan(
    order: &[Image],
    store: &Store,
    state: &mut KeyState,
    workers: &rayon::ThreadPool,
    progress: &Progress,
    platform: Option<&Platform>,
) -> Result<Vec<PlannedNode>, StepFailure> {
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
        match step {
            Step::Copy(copy) => {
                let selected = selections[position].take().expect("copy steps were walked");
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
