//! The builder: keys each step, looks it up in the store, executes the misses, and assembles
//! the manifest and config of the result.
//!
//! A build walks the declaration graph from its bases up. Each node gets a [`StepKey`] from its
//! canonical encoding, its parent's key, the keys of its `copy_from` source and the digests of
//! the context files it selects; a key with a committed action record is a hit and costs one
//! small file read. A miss writes its layer through `layer::write_layer` and commits the record
//! last, so an interrupted build leaves the cache as it was.
//!
//! What it is not (yet): parallel. Independent steps run one after the other here; the rayon
//! solver and the salsa database of the incremental-cache issue replace this walk.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use layerwright_cache::{ActionRecord, Digest, LayerRecord, StepKey, Store, StoreError};
use layerwright_dsl::{
    CopyFromStep, CopyStep, FileOptions, Image, ImagePathError, MkdirStep, Owner, Step, SymlinkStep, WriteFileStep,
    normalize_image_path,
};
use serde_json::Value;
use thiserror::Error;

use crate::config;
use crate::context::{self, ContextError, ContextKind};
use crate::export::{ExportError, ImageParts};
use crate::import::{self, ImportError};
use crate::layer::{self, Compression, Content, EntryKind, LayerEntry, LayerError, LayerOptions};
use crate::tree::{FsTree, IndexKind, LayerIndex, TreeError, TreeNode};

/// Why a build failed: which step, and what about it.
#[derive(Debug, Error)]
pub enum BuildError {
    #[error("cache directory {path}: {source}")]
    Cache { path: PathBuf, source: StoreError },
    #[error("step `{step}`: {source}")]
    Step { step: String, source: StepError },
    #[error("listing the image: {0}")]
    Listing(#[from] TreeError),
}

/// What went wrong inside one step.
#[derive(Debug, Error)]
pub enum StepError {
    #[error("path {path:?}: {source}")]
    Path { path: String, source: ImagePathError },
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path:?} does not exist in the image")]
    NotInImage { path: String },
    #[error("{path:?} does not exist in the source image")]
    NotInSourceImage { path: String },
    #[error("cannot write below /{path}: it is a {kind} in the image, not a directory")]
    ParentNotDirectory { path: String, kind: &'static str },
    #[error("cannot create a temporary directory under {path}: {source}")]
    Spool { path: PathBuf, source: std::io::Error },
    #[error("the cached config {digest} is unreadable: {reason}")]
    CorruptConfig { digest: Digest, reason: String },
    #[error("building the copy_from source image: {0}")]
    Source(Box<BuildError>),
    #[error("{what} is not supported yet")]
    Unsupported { what: &'static str },
}

/// One line of progress: a step started or finished.
#[derive(Debug, Clone)]
pub enum ProgressEvent {
    Started { label: String },
    Finished(StepReport),
}

/// Receives progress events (the xtask draws them; a library user may log them).
pub type ProgressSink = Arc<dyn Fn(&ProgressEvent) + Send + Sync>;

/// Options of a [`Builder`].
#[derive(Clone, Default)]
pub struct BuilderOptions {
    pub compression: Compression,
    /// The mtime of every layer entry and the `created` time of the config; `None` reads
    /// `SOURCE_DATE_EPOCH`, and without it uses 0.
    pub source_date_epoch: Option<u64>,
    pub progress: Option<ProgressSink>,
}

impl fmt::Debug for BuilderOptions {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("BuilderOptions")
            .field("compression", &self.compression)
            .field("source_date_epoch", &self.source_date_epoch)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// What happened to one step of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    pub label: String,
    /// True when the step's result came from the cache (config steps, which build nothing,
    /// count as cached).
    pub cached: bool,
    pub duration: Duration,
    /// The digest of the layer the step added, for steps that add one.
    pub layer: Option<String>,
}

/// Builds images into a persistent cache directory.
#[derive(Debug, Clone)]
pub struct Builder {
    store: Store,
    options: BuilderOptions,
}

impl Builder {
    /// A builder whose cache lives in `cache_dir` (created if missing).
    pub fn new(cache_dir: impl AsRef<Path>) -> Result<Builder, BuildError> {
        Builder::with_options(cache_dir, BuilderOptions::default())
    }

    pub fn with_options(cache_dir: impl AsRef<Path>, options: BuilderOptions) -> Result<Builder, BuildError> {
        let path = cache_dir.as_ref();
        let store = Store::open(path).map_err(|source| BuildError::Cache { path: path.to_owned(), source })?;
        Ok(Builder { store, options })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn build(&self, image: &Image) -> Result<BuiltImage, BuildError> {
        let mut built = self.build_all(&[image])?;
        Ok(built.pop().expect("one image in, one out"))
    }

    /// Builds several images in one walk: a step they share is built once.
    pub fn build_all(&self, images: &[&Image]) -> Result<Vec<BuiltImage>, BuildError> {
        let epoch = self.options.source_date_epoch.or_else(source_date_epoch_from_env).unwrap_or(0);
        let mut session = Session {
            store: &self.store,
            progress: self.options.progress.clone(),
            layer_options: LayerOptions { compression: self.options.compression, mtime: epoch },
            created: config::rfc3339(epoch),
            states: HashMap::new(),
            indexes: HashMap::new(),
            reports: Vec::new(),
        };
        let mut results = Vec::with_capacity(images.len());
        for image in images {
            let report_start = session.reports.len();
            let state = session.build_node(image)?;
            let steps = session.reports[report_start..].to_vec();
            results.push(
                session
                    .finish(&state, steps)
                    .map_err(|source| BuildError::Step { step: "write manifest".into(), source })?,
            );
        }
        Ok(results)
    }
}

fn source_date_epoch_from_env() -> Option<u64> {
    std::env::var("SOURCE_DATE_EPOCH").ok()?.trim().parse().ok()
}

/// The result of one node: everything the steps above it need.
#[derive(Debug)]
struct NodeState {
    key: StepKey,
    layers: Vec<LayerRecord>,
    config: Value,
}

struct Session<'a> {
    store: &'a Store,
    progress: Option<ProgressSink>,
    layer_options: LayerOptions,
    created: String,
    states: HashMap<usize, Arc<NodeState>>,
    indexes: HashMap<Digest, Arc<LayerIndex>>,
    reports: Vec<StepReport>,
}

/// How a step was satisfied, before it is turned into a state.
struct StepOutcome {
    state: NodeState,
    cached: bool,
    layer: Option<Digest>,
}

impl Session<'_> {
    fn build_node(&mut self, image: &Image) -> Result<Arc<NodeState>, BuildError> {
        if let Some(state) = self.states.get(&image.node_id()) {
            return Ok(Arc::clone(state));
        }
        // Walk the chain iteratively (a chain may be hundreds of steps deep); only `copy_from`
        // sources recurse.
        let mut parent: Option<Arc<NodeState>> = None;
        for node in image.chain() {
            if let Some(state) = self.states.get(&node.node_id()) {
                parent = Some(Arc::clone(state));
                continue;
            }
            let label = node.step().label();
            if let Some(progress) = &self.progress {
                progress(&ProgressEvent::Started { label: label.clone() });
            }
            let started = Instant::now();
            let outcome = self
                .build_step(&node, parent.as_deref())
                .map_err(|source| BuildError::Step { step: label.clone(), source })?;
            let report = StepReport {
                label,
                cached: outcome.cached,
                duration: started.elapsed(),
                layer: outcome.layer.map(|digest| digest.to_string()),
            };
            if let Some(progress) = &self.progress {
                progress(&ProgressEvent::Finished(report.clone()));
            }
            self.reports.push(report);
            let state = Arc::new(outcome.state);
            self.states.insert(node.node_id(), Arc::clone(&state));
            parent = Some(state);
        }
        Ok(parent.expect("a chain has at least one node"))
    }

    fn build_step(&mut self, image: &Image, parent: Option<&NodeState>) -> Result<StepOutcome, StepError> {
        let step = image.step();
        let encoding = step.encode();
        let parent_key = parent.map(|parent| &parent.key);
        match (step, parent) {
            (Step::Scratch, _) => {
                let key = StepKey::builder().bytes(&encoding).finish();
                let state = NodeState { key, layers: Vec::new(), config: config::scratch_config(&self.created) };
                Ok(StepOutcome { state, cached: true, layer: None })
            }
            (Step::FromArchive { path }, _) => self.from_archive(&encoding, path),
            (Step::Pull { .. }, _) => Err(StepError::Unsupported { what: "pulling a base image from a registry" }),
            (Step::Run(_), _) => Err(StepError::Unsupported { what: "a RUN step (the overlay runner)" }),
            (_, None) => unreachable!("only base steps lack a parent, and Image::with_step refuses bases"),
            (Step::Config(change), Some(parent)) => {
                let key = StepKey::builder().bytes(&encoding).optional_key(parent_key).finish();
                let mut config = parent.config.clone();
                config::apply_change(&mut config, change, &step.label(), &self.created);
                let state = NodeState { key, layers: parent.layers.clone(), config };
                Ok(StepOutcome { state, cached: true, layer: None })
            }
            (Step::Copy(copy), Some(parent)) => {
                let opened = context::open_context(&copy.context)?;
                let selection = context::select(&opened, &copy.source)?;
                let key = copy_key(&encoding, &parent.key, copy, &selection);
                self.file_step(key, step, parent, |session| session.copy_entries(copy, &selection, parent))
            }
            (Step::CopyFrom(copy), Some(parent)) => {
                let source = self.build_node(&copy.image).map_err(|error| StepError::Source(Box::new(error)))?;
                let key = StepKey::builder().bytes(&encoding).key(&parent.key).key(&source.key).finish();
                self.file_step(key, step, parent, |session| session.copy_from_entries(copy, &source, parent))
            }
            (Step::WriteFile(write), Some(parent)) => {
                let key = StepKey::builder().bytes(&encoding).key(&parent.key).finish();
                self.file_step(key, step, parent, |session| session.write_file_entries(write, parent))
            }
            (Step::Mkdir(mkdir), Some(parent)) => {
                let key = StepKey::builder().bytes(&encoding).key(&parent.key).finish();
                self.file_step(key, step, parent, |session| session.mkdir_entries(mkdir, parent))
            }
            (Step::Symlink(symlink), Some(parent)) => {
                let key = StepKey::builder().bytes(&encoding).key(&parent.key).finish();
                self.file_step(key, step, parent, |session| session.symlink_entries(symlink, parent))
            }
            (Step::Remove { path }, Some(parent)) => {
                let key = StepKey::builder().bytes(&encoding).key(&parent.key).finish();
                self.file_step(key, step, parent, |session| session.remove_entries(path, parent))
            }
        }
    }

    fn from_archive(&mut self, encoding: &[u8], path: &Path) -> Result<StepOutcome, StepError> {
        let identity = import::archive_identity(path)?;
        let key = StepKey::builder().bytes(encoding).str(&identity).finish();
        if let Some(record) = self.store.read_action(&key)?
            && let Some(config_digest) = &record.config
        {
            let config = self.read_config(config_digest)?;
            let state = NodeState { key, layers: record.layers, config };
            return Ok(StepOutcome { state, cached: true, layer: None });
        }
        let base = import::import_archive(self.store, path)?;
        let config_blob = self.store.put_blob(&config::to_bytes(&base.config))?;
        for (layer, index) in base.layers.iter().zip(base.indexes) {
            self.indexes.insert(layer.diff_id.clone(), Arc::new(index));
        }
        let record = ActionRecord { layers: base.layers.clone(), config: Some(config_blob.digest) };
        self.store.write_action(&key, &record)?;
        let state = NodeState { key, layers: base.layers, config: base.config };
        Ok(StepOutcome { state, cached: false, layer: None })
    }

    fn read_config(&self, digest: &Digest) -> Result<Value, StepError> {
        let path = self.store.blob_path(digest);
        let bytes =
            std::fs::read(&path).map_err(|source| StoreError::Io { action: "read config blob", path, source })?;
        serde_json::from_slice(&bytes)
            .map_err(|error| StepError::CorruptConfig { digest: digest.clone(), reason: error.to_string() })
    }

    /// A step that adds one layer: a hit reuses the recorded layer, a miss writes the entries
    /// `entries` computes and commits the record.
    fn file_step(
        &mut self,
        key: StepKey,
        step: &Step,
        parent: &NodeState,
        entries: impl FnOnce(&mut Self) -> Result<(Vec<LayerEntry>, Option<tempfile::TempDir>), StepError>,
    ) -> Result<StepOutcome, StepError> {
        let (layer, cached) = match self.store.read_action(&key)?.and_then(|record| record.layers.into_iter().next()) {
            Some(layer) => (layer, true),
            None => {
                // The spool directory (for `copy_from`) must outlive the layer writer.
                let (entries, _spool) = entries(self)?;
                let written = layer::write_layer(self.store, entries, &self.layer_options)?;
                self.store.write_action(&key, &ActionRecord { layers: vec![written.record.clone()], config: None })?;
                self.indexes.insert(written.record.diff_id.clone(), Arc::new(written.index));
                (written.record, false)
            }
        };
        let mut config = parent.config.clone();
        config::push_layer(&mut config, &layer, &step.label(), &self.created);
        let mut layers = parent.layers.clone();
        layers.push(layer.clone());
        Ok(StepOutcome { state: NodeState { key, layers, config }, cached, layer: Some(layer.digest) })
    }

    fn index(&mut self, layer: &LayerRecord) -> Result<Arc<LayerIndex>, TreeError> {
        if let Some(index) = self.indexes.get(&layer.diff_id) {
            return Ok(Arc::clone(index));
        }
        let index = match LayerIndex::load(self.store, &layer.diff_id)? {
            Some(index) => index,
            None => crate::tree::index_layer(self.store, layer)?,
        };
        let index = Arc::new(index);
        self.indexes.insert(layer.diff_id.clone(), Arc::clone(&index));
        Ok(index)
    }

    fn tree(&mut self, layers: &[LayerRecord]) -> Result<FsTree, TreeError> {
        let mut tree = FsTree::default();
        for (position, layer) in layers.iter().enumerate() {
            let index = self.index(layer)?;
            tree.apply(position, &layer.digest, &index)?;
        }
        Ok(tree)
    }

    fn copy_entries(
        &mut self,
        copy: &CopyStep,
        selection: &context::Selection,
        parent: &NodeState,
    ) -> Result<(Vec<LayerEntry>, Option<tempfile::TempDir>), StepError> {
        let tree = self.tree(&parent.layers)?;
        let destination = image_path(&copy.destination)?;
        let owner = copy.options.file.owner.unwrap_or(Owner::ROOT);
        let mode_override = copy.options.file.mode;
        let root = if selection.source_is_directory {
            destination
        } else {
            let name = copy.source.trim_end_matches('/').rsplit('/').next().unwrap_or_default().to_owned();
            file_destination(&tree, &copy.destination, destination, &name)
        };
        let mut entries = parent_directories(&tree, &root)?;
        if copy.options.replace_directory && tree_is_directory(&tree, &root) && !root.is_empty() {
            entries.push(entry(&root, EntryKind::OpaqueWhiteout, 0, Owner::ROOT));
        }
        for file in &selection.files {
            let path = join(&root, &file.relative);
            if path.is_empty() {
                continue;
            }
            if file.relative.is_empty()
                && selection.source_is_directory
                && tree_is_directory(&tree, &path)
                && !copy.options.replace_directory
            {
                // Copying into an existing directory merges, and leaves the directory as it is.
                continue;
            }
            let mode = mode_override.unwrap_or(file.mode);
            let kind = match &file.kind {
                ContextKind::Directory => EntryKind::Directory,
                ContextKind::File { size, .. } => EntryKind::File {
                    content: Content::Context { dir: Arc::clone(&selection.dir), path: file.open_path.clone() },
                    size: *size,
                },
                ContextKind::Symlink { target } => EntryKind::Symlink { target: target.clone() },
                ContextKind::HardLink { target } => EntryKind::HardLink { target: join(&root, target) },
            };
            let mode = if matches!(kind, EntryKind::Symlink { .. }) { 0o777 } else { mode };
            entries.push(entry(&path, kind, mode, owner));
        }
        Ok((entries, None))
    }

    fn copy_from_entries(
        &mut self,
        copy: &CopyFromStep,
        source: &NodeState,
        parent: &NodeState,
    ) -> Result<(Vec<LayerEntry>, Option<tempfile::TempDir>), StepError> {
        let source_tree = self.tree(&source.layers)?;
        let tree = self.tree(&parent.layers)?;
        let source_path = image_path(&copy.source)?;
        let source_path = resolve_symlinks(&source_tree, &source_path);
        let source_node = if source_path.is_empty() {
            root_node()
        } else {
            source_tree
                .get(&source_path)
                .cloned()
                .ok_or_else(|| StepError::NotInSourceImage { path: copy.source.clone() })?
        };
        let source_is_directory = matches!(source_node.entry.kind, IndexKind::Directory);
        let destination = image_path(&copy.destination)?;
        let root = if source_is_directory {
            destination
        } else {
            let name = source_path.rsplit('/').next().unwrap_or_default().to_owned();
            file_destination(&tree, &copy.destination, destination, &name)
        };
        let selected: Vec<(String, TreeNode)> = if source_is_directory {
            let mut nodes = Vec::new();
            if !source_path.is_empty() {
                nodes.push((String::new(), source_node.clone()));
            }
            let prefix = if source_path.is_empty() { String::new() } else { format!("{source_path}/") };
            for (path, node) in source_tree.subtree(&source_path) {
                if let Some(relative) = path.strip_prefix(&prefix).filter(|relative| !relative.is_empty()) {
                    nodes.push((relative.to_owned(), node.clone()));
                }
            }
            nodes
        } else {
            vec![(String::new(), source_node.clone())]
        };

        // Regular files (and hard links whose target is not copied along) need their bytes:
        // spool them out of the source layers, reading each layer once.
        let copied: BTreeSet<String> = selected.iter().map(|(relative, _)| join(&source_path, relative)).collect();
        let mut wanted: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
        for (relative, node) in &selected {
            match &node.entry.kind {
                IndexKind::File { .. } => {
                    wanted.entry(node.layer).or_default().insert(join(&source_path, relative));
                }
                IndexKind::HardLink { target } if !copied.contains(target) => {
                    let target_node = source_tree
                        .get(target)
                        .ok_or_else(|| StepError::NotInSourceImage { path: format!("/{target}") })?;
                    wanted.entry(target_node.layer).or_default().insert(target.clone());
                }
                _ => {}
            }
        }
        let spool = tempfile::tempdir_in(self.store.tmp_dir())
            .map_err(|source| StepError::Spool { path: self.store.tmp_dir(), source })?;
        let spooled = crate::tree::extract_files(self.store, &source.layers, &wanted, spool.path())?;

        let owner_override = copy.options.file.owner;
        let mode_override = copy.options.file.mode;
        let mut entries = parent_directories(&tree, &root)?;
        if copy.options.replace_directory && tree_is_directory(&tree, &root) && !root.is_empty() {
            entries.push(entry(&root, EntryKind::OpaqueWhiteout, 0, Owner::ROOT));
        }
        for (relative, node) in &selected {
            let path = join(&root, relative);
            if path.is_empty() {
                continue;
            }
            let source_full = join(&source_path, relative);
            let kind = match &node.entry.kind {
                IndexKind::Directory => EntryKind::Directory,
                IndexKind::File { size, .. } => {
                    EntryKind::File { content: Content::HostFile(spooled_path(&spooled, &source_full)?), size: *size }
                }
                IndexKind::Symlink { target } => EntryKind::Symlink { target: target.clone() },
                IndexKind::HardLink { target } if copied.contains(target) => {
                    let target_relative = target.strip_prefix(&source_path).unwrap_or(target).trim_start_matches('/');
                    EntryKind::HardLink { target: join(&root, target_relative) }
                }
                IndexKind::HardLink { target } => {
                    let size = match source_tree.get(target).map(|node| &node.entry.kind) {
                        Some(IndexKind::File { size, .. }) => *size,
                        _ => return Err(StepError::NotInSourceImage { path: format!("/{target}") }),
                    };
                    EntryKind::File { content: Content::HostFile(spooled_path(&spooled, target)?), size }
                }
                IndexKind::CharDevice { major, minor } => EntryKind::CharDevice { major: *major, minor: *minor },
                IndexKind::BlockDevice { major, minor } => EntryKind::BlockDevice { major: *major, minor: *minor },
                IndexKind::Fifo => EntryKind::Fifo,
                IndexKind::Whiteout | IndexKind::OpaqueWhiteout => continue,
            };
            let owner = owner_override.unwrap_or(Owner { uid: node.entry.uid, gid: node.entry.gid });
            let mode = if matches!(kind, EntryKind::Symlink { .. }) {
                0o777
            } else {
                mode_override.unwrap_or(node.entry.mode)
            };
            entries.push(entry(&path, kind, mode, owner));
        }
        Ok((entries, Some(spool)))
    }

    fn write_file_entries(
        &mut self,
        write: &WriteFileStep,
        parent: &NodeState,
    ) -> Result<(Vec<LayerEntry>, Option<tempfile::TempDir>), StepError> {
        let tree = self.tree(&parent.layers)?;
        let path = non_root_path(&write.path)?;
        let mut entries = parent_directories(&tree, &path)?;
        let kind =
            EntryKind::File { content: Content::Inline(Arc::clone(&write.content)), size: write.content.len() as u64 };
        entries.push(file_entry(&path, kind, write.options, 0o644));
        Ok((entries, None))
    }

    fn mkdir_entries(
        &mut self,
        mkdir: &MkdirStep,
        parent: &NodeState,
    ) -> Result<(Vec<LayerEntry>, Option<tempfile::TempDir>), StepError> {
        let tree = self.tree(&parent.layers)?;
        let path = non_root_path(&mkdir.path)?;
        let mut entries = parent_directories(&tree, &path)?;
        entries.push(file_entry(&path, EntryKind::Directory, mkdir.options, 0o755));
        Ok((entries, None))
    }

    fn symlink_entries(
        &mut self,
        symlink: &SymlinkStep,
        parent: &NodeState,
    ) -> Result<(Vec<LayerEntry>, Option<tempfile::TempDir>), StepError> {
        let tree = self.tree(&parent.layers)?;
        let path = non_root_path(&symlink.link_path)?;
        let mut entries = parent_directories(&tree, &path)?;
        let kind = EntryKind::Symlink { target: symlink.target.clone() };
        entries.push(entry(&path, kind, 0o777, symlink.owner.unwrap_or(Owner::ROOT)));
        Ok((entries, None))
    }

    fn remove_entries(
        &mut self,
        path: &str,
        parent: &NodeState,
    ) -> Result<(Vec<LayerEntry>, Option<tempfile::TempDir>), StepError> {
        let tree = self.tree(&parent.layers)?;
        let normalised = non_root_path(path)?;
        if tree.get(&normalised).is_none() {
            return Err(StepError::NotInImage { path: path.to_owned() });
        }
        Ok((vec![entry(&normalised, EntryKind::Whiteout, 0, Owner::ROOT)], None))
    }

    /// Stores the config and manifest of a built node.
    fn finish(&mut self, state: &NodeState, steps: Vec<StepReport>) -> Result<BuiltImage, StepError> {
        let mut config = state.config.clone();
        config::set_created(&mut config, &self.created);
        let config_blob = self.store.put_blob(&config::to_bytes(&config))?;
        let manifest = config::manifest(&config_blob.digest, config_blob.size, &state.layers);
        let manifest_blob = self.store.put_blob(&config::to_bytes(&manifest))?;
        Ok(BuiltImage {
            inner: Arc::new(BuiltInner {
                store: self.store.clone(),
                manifest: manifest_blob.digest,
                manifest_size: manifest_blob.size,
                config: config_blob.digest,
                layers: state.layers.clone(),
                steps,
            }),
        })
    }
}

fn root_node() -> TreeNode {
    TreeNode {
        entry: crate::tree::IndexEntry { path: String::new(), kind: IndexKind::Directory, mode: 0o755, uid: 0, gid: 0 },
        layer: 0,
    }
}

fn copy_key(encoding: &[u8], parent: &StepKey, copy: &CopyStep, selection: &context::Selection) -> StepKey {
    // The mode a step overrides does not enter the key: only what the layer will carry does.
    let keep_mode = copy.options.file.mode.is_none();
    let mut key = StepKey::builder()
        .bytes(encoding)
        .key(parent)
        .u64(selection.source_is_directory as u64)
        .u64(selection.files.len() as u64);
    for file in &selection.files {
        key = key.str(&file.relative).u64(if keep_mode { u64::from(file.mode) } else { 0 });
        key = match &file.kind {
            ContextKind::Directory => key.u64(1),
            ContextKind::File { size, blake3 } => key.u64(2).u64(*size).bytes(blake3),
            ContextKind::Symlink { target } => key.u64(3).str(target),
            ContextKind::HardLink { target } => key.u64(4).str(target),
        };
    }
    key.finish()
}

fn image_path(path: &str) -> Result<String, StepError> {
    normalize_image_path(path).map_err(|source| StepError::Path { path: path.to_owned(), source })
}

/// An image path that must not be the root itself.
fn non_root_path(path: &str) -> Result<String, StepError> {
    let normalised = image_path(path)?;
    if normalised.is_empty() {
        return Err(StepError::Path { path: path.to_owned(), source: ImagePathError::Empty });
    }
    Ok(normalised)
}

/// Where a single file lands: inside `destination` when it names a directory (a trailing `/`,
/// or an existing directory), else at `destination` itself.
fn file_destination(tree: &FsTree, declared: &str, destination: String, name: &str) -> String {
    if declared.ends_with('/') || destination.is_empty() || tree_is_directory(tree, &destination) {
        return join(&destination, name);
    }
    destination
}

fn tree_is_directory(tree: &FsTree, path: &str) -> bool {
    path.is_empty() || tree.get(path).is_some_and(|node| matches!(node.entry.kind, IndexKind::Directory))
}

/// Entries for the missing parents of `path` (0755, root), as Docker creates them. Existing
/// parents are left out so that their mode and owner stay as the lower layers have them.
fn parent_directories(tree: &FsTree, path: &str) -> Result<Vec<LayerEntry>, StepError> {
    let mut entries = Vec::new();
    for (end, _) in path.match_indices('/') {
        let parent = &path[..end];
        match tree.get(parent).map(|node| &node.entry.kind) {
            Some(IndexKind::Directory) => {}
            Some(other) => {
                return Err(StepError::ParentNotDirectory { path: parent.to_owned(), kind: kind_name(other) });
            }
            None => entries.push(entry(parent, EntryKind::Directory, 0o755, Owner::ROOT)),
        }
    }
    Ok(entries)
}

fn kind_name(kind: &IndexKind) -> &'static str {
    match kind {
        IndexKind::Directory => "directory",
        IndexKind::File { .. } | IndexKind::HardLink { .. } => "file",
        IndexKind::Symlink { .. } => "symlink",
        IndexKind::CharDevice { .. } | IndexKind::BlockDevice { .. } => "device",
        IndexKind::Fifo => "fifo",
        IndexKind::Whiteout | IndexKind::OpaqueWhiteout => "whiteout",
    }
}

/// Follows symlinks of the final component of `path` inside `tree` (at most 40, like Linux).
fn resolve_symlinks(tree: &FsTree, path: &str) -> String {
    let mut current = path.to_owned();
    for _ in 0..40 {
        let Some(IndexKind::Symlink { target }) = tree.get(&current).map(|node| &node.entry.kind) else {
            return current;
        };
        let base = if target.starts_with('/') {
            String::new()
        } else {
            current.rsplit_once('/').map(|(dir, _)| dir.to_owned()).unwrap_or_default()
        };
        let mut components: Vec<&str> = if base.is_empty() { Vec::new() } else { base.split('/').collect() };
        for component in target.split('/') {
            match component {
                "" | "." => {}
                ".." => {
                    components.pop();
                }
                other => components.push(other),
            }
        }
        current = components.join("/");
    }
    current
}

fn spooled_path(spooled: &BTreeMap<String, PathBuf>, path: &str) -> Result<PathBuf, StepError> {
    spooled.get(path).cloned().ok_or_else(|| StepError::NotInSourceImage { path: format!("/{path}") })
}

fn join(parent: &str, child: &str) -> String {
    match (parent.is_empty(), child.is_empty()) {
        (true, _) => child.to_owned(),
        (false, true) => parent.to_owned(),
        (false, false) => format!("{parent}/{child}"),
    }
}

fn entry(path: &str, kind: EntryKind, mode: u32, owner: Owner) -> LayerEntry {
    LayerEntry { path: path.to_owned(), kind, mode, uid: owner.uid, gid: owner.gid, xattrs: Vec::new() }
}

fn file_entry(path: &str, kind: EntryKind, options: FileOptions, default_mode: u32) -> LayerEntry {
    entry(path, kind, options.mode.unwrap_or(default_mode), options.owner.unwrap_or(Owner::ROOT))
}

#[derive(Debug)]
struct BuiltInner {
    store: Store,
    manifest: Digest,
    manifest_size: u64,
    config: Digest,
    layers: Vec<LayerRecord>,
    steps: Vec<StepReport>,
}

/// A built image: its manifest, config and layers are in the cache store. Outlives the
/// [`Builder`] that made it; cheap to clone.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    inner: Arc<BuiltInner>,
}

impl BuiltImage {
    /// `sha256:…` of the image manifest.
    pub fn manifest_digest(&self) -> String {
        self.inner.manifest.to_string()
    }

    pub fn config_digest(&self) -> String {
        self.inner.config.to_string()
    }

    /// The image config document.
    pub fn config(&self) -> Result<Value, StepError> {
        let path = self.inner.store.blob_path(&self.inner.config);
        let bytes =
            std::fs::read(&path).map_err(|source| StoreError::Io { action: "read config blob", path, source })?;
        serde_json::from_slice(&bytes)
            .map_err(|error| StepError::CorruptConfig { digest: self.inner.config.clone(), reason: error.to_string() })
    }

    pub fn layers(&self) -> &[LayerRecord] {
        &self.inner.layers
    }

    /// Total size of the layer blobs.
    pub fn size(&self) -> u64 {
        self.inner.layers.iter().map(|layer| layer.size).sum()
    }

    pub fn steps(&self) -> &[StepReport] {
        &self.inner.steps
    }

    fn parts(&self) -> ImageParts<'_> {
        ImageParts {
            store: &self.inner.store,
            manifest: &self.inner.manifest,
            manifest_size: self.inner.manifest_size,
            config: &self.inner.config,
            layers: &self.inner.layers,
        }
    }

    /// Writes (or adds to) an OCI image layout directory, tagging the image `tag`.
    pub fn write_oci_layout(&self, dir: impl AsRef<Path>, tag: &str) -> Result<(), ExportError> {
        crate::export::write_oci_layout(self.parts(), dir.as_ref(), tag)
    }

    /// Writes an OCI archive (a tar of an OCI layout).
    pub fn write_oci_archive(&self, file: impl AsRef<Path>, tag: &str) -> Result<(), ExportError> {
        crate::export::write_oci_archive(self.parts(), file.as_ref(), tag)
    }

    /// Writes a tar that `docker load -i` reads, tagged `tag`.
    pub fn write_docker_archive(&self, file: impl AsRef<Path>, tag: &str) -> Result<(), ExportError> {
        crate::export::write_docker_archive(self.parts(), file.as_ref(), tag)
    }

    /// A stable text listing of the final filesystem, one line per path, for insta (format:
    /// see `FsTree::listing`).
    pub fn listing(&self) -> Result<String, BuildError> {
        let mut tree = FsTree::default();
        for (position, layer) in self.inner.layers.iter().enumerate() {
            let index = match LayerIndex::load(&self.inner.store, &layer.diff_id)? {
                Some(index) => index,
                None => crate::tree::index_layer(&self.inner.store, layer)?,
            };
            tree.apply(position, &layer.digest, &index)?;
        }
        Ok(tree.listing())
    }
}
