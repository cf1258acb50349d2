//! The public face of a build: [`Builder`], its options, and the [`BuiltImage`] it returns.
//!
//! A `Builder` owns the cache directory's store and, for as long as it lives, the salsa key
//! database and the stat cache: a long-lived builder (watch mode, `build_all`, tests) re-executes
//! only the key queries whose inputs changed. The walk itself is in `solver`; what each step
//! does is in `steps`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use layerwright_cache::{Digest, KeyDatabase, LayerRecord, MissReason, StatCache, Store, StoreError};
use layerwright_dsl::{Image, ImagePathError};
use serde_json::Value;
use thiserror::Error;

use crate::context::ContextError;
use crate::export::{ExportError, ImageParts};
use crate::import::ImportError;
use crate::layer::{Compression, LayerError};
use crate::remote::RemoteCacheReport;
use crate::tree::{FsTree, LayerIndex, TreeError};

/// Why a build failed: which step, and what about it.
#[derive(Debug, Error)]
pub enum BuildError {
    #[error("cache directory {path}: {source}")]
    Cache { path: PathBuf, source: StoreError },
    #[error("step `{step}`: {source}")]
    Step { step: String, source: Box<StepError> },
    #[error("cannot start the build's worker threads: {0}")]
    Workers(String),
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
    #[error("{what} is not supported yet")]
    Unsupported { what: &'static str },
    #[error(transparent)]
    Run(#[from] crate::run::RunError),
    #[cfg(feature = "registry")]
    #[error(transparent)]
    Registry(Box<crate::registry::RegistryError>),
    #[error("pulling {reference} needs the `registry` feature of layerwright, which this build of it leaves out")]
    RegistryDisabled { reference: String },
    #[error("its input `{input}` was not built: its cache record vanished during the build; build again")]
    InputNotBuilt { input: String },
    #[error("recompressing layer {layer}: {source}")]
    Recompress { layer: Digest, source: std::io::Error },
}

/// One line of progress: a step started or finished, or a RUN step's command printed a line.
#[derive(Debug, Clone)]
pub enum ProgressEvent {
    Started {
        label: String,
    },
    Finished(StepReport),
    /// A line of a RUN command's output (stdout and stderr interleaved), as it comes.
    Output {
        label: String,
        line: String,
    },
}

/// Receives progress events (the xtask draws them; a library user may log them). Called from
/// the build's worker threads.
pub type ProgressSink = Arc<dyn Fn(&ProgressEvent) + Send + Sync>;

/// Called with a step's label (see [`BuilderOptions::before_execute`]).
pub type StepHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Options of a [`Builder`].
#[derive(Clone, Default)]
pub struct BuilderOptions {
    pub compression: Compression,
    /// The mtime of every layer entry and the `created` time of the config; `None` reads
    /// `SOURCE_DATE_EPOCH`, and without it uses 0.
    pub source_date_epoch: Option<u64>,
    pub progress: Option<ProgressSink>,
    /// How many steps may execute at once; `None` means the number of cores, at least 4 (RUN
    /// steps and IO wait as much as they compute).
    pub jobs: Option<usize>,
    /// Called with a step's label just before the step executes (cache misses only). For tests
    /// that need a slow step.
    #[doc(hidden)]
    pub before_execute: Option<StepHook>,
    /// Remote caches (registry references `registry/repository:tag`) asked for a step that
    /// misses locally, in order; see [`Builder::remote_cache`].
    pub cache_from: Vec<String>,
    /// The remote cache this build's records are exported to after it succeeds.
    pub cache_to: Option<String>,
}

impl fmt::Debug for BuilderOptions {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("BuilderOptions")
            .field("compression", &self.compression)
            .field("source_date_epoch", &self.source_date_epoch)
            .field("progress", &self.progress.is_some())
            .field("jobs", &self.jobs)
            .field("cache_from", &self.cache_from)
            .field("cache_to", &self.cache_to)
            .finish_non_exhaustive()
    }
}

/// What happened to one step of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    pub label: String,
    /// True when the step's result came from the cache (config steps, which build nothing,
    /// count as cached).
    pub cached: bool,
    /// True when the result came from a remote cache (then `cached` is true as well).
    pub remote: bool,
    pub duration: Duration,
    /// The digest of the layer the step added, for steps that add one.
    pub layer: Option<String>,
    /// For a step that was built: why the cache could not serve it.
    pub miss: Option<MissReason>,
}

/// The long-lived, mutable part of a builder.
pub(crate) struct BuilderState {
    pub keys: KeyDatabase,
    pub stat_cache: StatCache,
}

/// Builds images into a persistent cache directory. Cheap to clone (clones share the cache
/// state); `Send + Sync`.
#[derive(Clone)]
pub struct Builder {
    pub(crate) store: Store,
    pub(crate) options: BuilderOptions,
    pub(crate) state: Arc<Mutex<BuilderState>>,
    pub(crate) workers: Arc<rayon::ThreadPool>,
}

impl fmt::Debug for Builder {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("Builder").field("cache", &self.store.root()).field("options", &self.options).finish()
    }
}

impl Builder {
    /// A builder whose cache lives in `cache_dir` (created if missing).
    pub fn new(cache_dir: impl AsRef<Path>) -> Result<Builder, BuildError> {
        Builder::with_options(cache_dir, BuilderOptions::default())
    }

    pub fn with_options(cache_dir: impl AsRef<Path>, options: BuilderOptions) -> Result<Builder, BuildError> {
        let path = cache_dir.as_ref();
        let store = Store::open(path).map_err(|source| BuildError::Cache { path: path.to_owned(), source })?;
        let stat_cache = StatCache::load(&store);
        let jobs = options.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(4, usize::from).max(4));
        let workers = rayon::ThreadPoolBuilder::new()
            .num_threads(jobs)
            .thread_name(|index| format!("layerwright-{index}"))
            .build()
            .map_err(|error| BuildError::Workers(error.to_string()))?;
        let state = BuilderState { keys: KeyDatabase::new(), stat_cache };
        Ok(Builder { store, options, state: Arc::new(Mutex::new(state)), workers: Arc::new(workers) })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Shares this builder's cache through a registry: a step that misses locally is looked
    /// up in the cache at `reference` (`registry/repository:tag`) before it executes, and after
    /// a successful build the records of every step (not only the final image's) are exported
    /// there, uploading only the blobs the registry lacks. An unreachable, slow or corrupt
    /// remote cache costs a warning, never the build. See [`crate::registry`] for the format.
    pub fn remote_cache(mut self, reference: &str) -> Builder {
        self.options.cache_from.push(reference.to_owned());
        self.options.cache_to = Some(reference.to_owned());
        self
    }

    /// Builds `image`: unchanged steps come from the cache, independent ones run at once.
    pub fn build(&self, image: &Image) -> Result<BuiltImage, BuildError> {
        let mut built = self.build_all(&[image])?;
        Ok(built.pop().expect("one image in, one out"))
    }

    /// Builds several images in one walk: a step they share is built once.
    pub fn build_all(&self, images: &[&Image]) -> Result<Vec<BuiltImage>, BuildError> {
        crate::solver::build_all(self, images)
    }

    /// The salsa queries that executed since the last call (for tests of incrementality).
    #[doc(hidden)]
    pub fn take_key_query_log(&self) -> Vec<String> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).keys.execution_log().take()
    }
}

#[derive(Debug)]
pub(crate) struct BuiltInner {
    pub store: Store,
    pub manifest: Digest,
    pub manifest_size: u64,
    pub config: Digest,
    pub layers: Vec<LayerRecord>,
    pub steps: Vec<StepReport>,
    pub blob_bytes_written: u64,
    /// What the build did with remote caches, when it had any.
    pub remote_cache: Option<Arc<RemoteCacheReport>>,
}

/// A built image: its manifest, config and layers are in the cache store. Outlives the
/// [`Builder`] that made it; cheap to clone.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub(crate) inner: Arc<BuiltInner>,
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

    /// Every step of the build that produced this image, bases first.
    pub fn steps(&self) -> &[StepReport] {
        &self.inner.steps
    }

    /// Layer blob bytes this build wrote (0 for a fully cached rebuild).
    pub fn blob_bytes_written(&self) -> u64 {
        self.inner.blob_bytes_written
    }

    /// What the build did with remote caches (`None` when it had none): steps served, blobs
    /// downloaded, warnings, and the export.
    pub fn remote_cache(&self) -> Option<&RemoteCacheReport> {
        self.inner.remote_cache.as_deref()
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

    /// Pushes the image to a registry (`registry/repository[:tag]`) over the OCI distribution
    /// API, uploading only the blobs the registry lacks. See [`crate::registry`].
    #[cfg(feature = "registry")]
    pub fn push(&self, reference: &str) -> Result<crate::registry::PushReport, crate::registry::RegistryError> {
        self.push_with(reference, &crate::registry::PushOptions::default())
    }

    /// [`BuiltImage::push`] with options (`insecure`: plain HTTP to a non-local registry).
    #[cfg(feature = "registry")]
    pub fn push_with(
        &self,
        reference: &str,
        options: &crate::registry::PushOptions,
    ) -> Result<crate::registry::PushReport, crate::registry::RegistryError> {
        crate::registry::push(self.parts(), reference, options)
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
