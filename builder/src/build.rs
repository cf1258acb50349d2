//! The public face of a build: [`Builder`], its options, and the [`BuiltImage`] it returns.
//!
//! A `Builder` owns the cache directory's store and, for as long as it lives, the salsa key
//! database and the stat cache: a long-lived builder (watch mode, `build_all`, tests) re-executes
//! only the key queries whose inputs changed. The walk itself is in `solve`; this facade wraps it
//! and is never imported from below.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use layerwright_cache::{KeyDatabase, LayerRecord, PrunePolicy, PruneReport, StatCache, Store, StoreError};
use layerwright_dsl::Image;
use serde_json::Value;
use thiserror::Error;

use crate::attest::{AttestError, Attestation, Subject, attest};
use crate::inspect::InspectOptions;
use crate::layer::{self, Compression, IndexKind, LayerIndex, TreeError};
use crate::oci::{Platform, canonical, media_types};
use crate::output::{ExportError, ImageParts, IndexParts, LoadError, LoadReport};
#[cfg(feature = "testing")]
use crate::progress::StepHook;
use crate::progress::{Progress, ProgressSink, StepReport};
use crate::remote_cache::{ReapiEndpoint, RemoteCacheReport};
use crate::run::{SecretSource, SshSource};
use crate::solve::{self, KeyState, Session, SolveOptions, SolvedImage, StepError, StepFailure, Target};
use crate::tree::FsTree;

/// Why a build failed: which step, and what about it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The cache directory could not be opened.
    #[error("cache directory {path}: {source}")]
    Cache {
        /// The cache directory.
        path: PathBuf,
        /// What failed.
        source: StoreError,
    },
    /// A step failed.
    #[error("step `{step}`: {source}")]
    Step {
        /// The step's label.
        step: String,
        /// What went wrong in it.
        source: Box<StepError>,
    },
    /// The worker thread pool could not be started.
    #[error("cannot start the build's worker threads: {0}")]
    Workers(String),
    /// The attestations of an image index could not be made.
    #[error("attesting the image: {0}")]
    Attestation(Box<AttestError>),
    /// A layer of the image could not be read for its listing.
    #[error("listing the image: {0}")]
    Listing(#[from] TreeError),
}

impl From<StepFailure> for BuildError {
    fn from(failure: StepFailure) -> BuildError {
        BuildError::Step { step: failure.step, source: failure.source }
    }
}

/// Options of a [`Builder`].
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct BuilderOptions {
    /// The compression of the layers the build writes (gzip by default).
    pub compression: Compression,
    /// The mtime of every layer entry and the `created` time of the config; `None` reads
    /// `SOURCE_DATE_EPOCH`, and without it uses 0.
    pub source_date_epoch: Option<u64>,
    /// Receives progress events and warnings; without one, warnings go to the `log` crate.
    pub progress: Option<ProgressSink>,
    /// How many steps may execute at once; `None` means the number of cores, at least 4 (RUN
    /// steps and IO wait as much as they compute).
    pub jobs: Option<usize>,
    /// Called with a step's label just before the step executes (cache misses only). For tests
    /// that need a slow step.
    #[cfg(feature = "testing")]
    pub before_execute: Option<StepHook>,
    /// Remote caches (registry references `registry/repository:tag`) asked for a step that
    /// misses locally, in order; see [`Builder::remote_cache`].
    pub cache_from: Vec<String>,
    /// The remote cache this build's records are exported to after it succeeds.
    pub cache_to: Option<String>,
    /// A REAPI server used as a shared step cache; see [`Builder::reapi`].
    pub reapi: Option<ReapiEndpoint>,
    /// Whether RUN steps run on the workers of the REAPI server (`reapi`); see
    /// [`Builder::reapi_execute`].
    pub reapi_execute: bool,
    /// The secrets RUN steps may mount ([`crate::Mount::secret`]), by id: see
    /// [`BuilderOptions::secret`].
    pub secrets: crate::run::Secrets,
    /// The SSH agents RUN steps may mount ([`crate::Mount::ssh`]), by id: see
    /// [`BuilderOptions::ssh`]. None unless asked for, as `docker build` without `--ssh`.
    pub ssh_agents: crate::run::SshAgents,
    /// Resource limits of every RUN step (a step's own [`Limits`](crate::Limits) win); a
    /// `None` field takes layerwright's default: 4096 processes, no memory limit. Limits do
    /// not enter step keys.
    pub run_limits: crate::Limits,
    /// The policy the cache is pruned to after a build that leaves it over the policy; see
    /// [`BuilderOptions::prune_policy`].
    pub prune_policy: Option<PrunePolicy>,
}

impl BuilderOptions {
    /// These options with layers written in `compression`.
    pub fn compression(mut self, compression: Compression) -> BuilderOptions {
        self.compression = compression;
        self
    }

    /// These options with every mtime (and the config's `created`) at `seconds` since the epoch.
    pub fn source_date_epoch(mut self, seconds: u64) -> BuilderOptions {
        self.source_date_epoch = Some(seconds);
        self
    }

    /// These options with progress events (and warnings) going to `sink`.
    pub fn progress(mut self, sink: ProgressSink) -> BuilderOptions {
        self.progress = Some(sink);
        self
    }

    /// These options with at most `jobs` steps executing at once.
    pub fn jobs(mut self, jobs: usize) -> BuilderOptions {
        self.jobs = Some(jobs);
        self
    }

    /// These options with secret `id` read from `source` when a RUN step that mounts it runs.
    /// Its bytes never enter a key, a layer, a record, a log line of the builder's or an error
    /// message; a changed secret does not rebuild a step (as in BuildKit).
    pub fn secret(mut self, id: impl Into<String>, source: SecretSource) -> BuilderOptions {
        self.secrets.insert(id.into(), source);
        self
    }

    /// These options with SSH agent `id` ([`SshSource::Agent`]: the builder's `SSH_AUTH_SOCK`,
    /// or a socket's path) bound into the RUN steps that mount it ([`crate::Mount::ssh`]), as
    /// `docker build --ssh id[=SOCKET]`. The socket is bound as it is on the host (its owner
    /// and mode: a step running as another user than the agent's cannot connect unless the
    /// socket lets it). A step that mounts an agent the builder lacks, or whose socket is not
    /// one, fails before anything runs. The agent does not enter a key.
    pub fn ssh(mut self, id: impl Into<String>, source: SshSource) -> BuilderOptions {
        self.ssh_agents.insert(id.into(), source);
        self
    }

    /// These options with `reference` asked, after the caches already named, for a step that
    /// misses locally.
    pub fn cache_from(mut self, reference: impl Into<String>) -> BuilderOptions {
        self.cache_from.push(reference.into());
        self
    }

    /// These options with the build's records exported to `reference` after it succeeds.
    pub fn cache_to(mut self, reference: impl Into<String>) -> BuilderOptions {
        self.cache_to = Some(reference.into());
        self
    }

    /// These options with the REAPI server at `url` (`http://HOST:PORT`, or `https://` for TLS),
    /// instance `instance`, as a shared step cache; see [`Builder::reapi`].
    pub fn reapi(mut self, url: impl Into<String>, instance: impl Into<String>) -> BuilderOptions {
        self.reapi = Some(ReapiEndpoint::new(url, instance));
        self
    }

    /// These options with RUN steps run on the REAPI server's workers; see
    /// [`Builder::reapi_execute`].
    pub fn reapi_execute(mut self, execute: bool) -> BuilderOptions {
        self.reapi_execute = execute;
        self
    }

    /// These options with every RUN step limited to `pids` processes (and threads) at once,
    /// unless the step sets its own limit (default 4096).
    pub fn pids_limit(mut self, pids: u64) -> BuilderOptions {
        self.run_limits.pids = Some(pids);
        self
    }

    /// These options with every RUN step limited to `bytes` of memory, unless the step sets
    /// its own limit (default: none). A step that goes past it fails naming the limit.
    pub fn memory_limit(mut self, bytes: u64) -> BuilderOptions {
        self.run_limits.memory = Some(bytes);
        self
    }

    /// These options with the cache pruned to `policy` after every successful build that leaves
    /// it over the policy (more than `keep_bytes`, less than `min_free_bytes` free on its
    /// filesystem, or anything unused for `keep_duration`), least recently used first. What
    /// this builder and its built images use, and what other running builds use, is kept: see
    /// `layerwright::cache`. Checking costs a walk of the cache directory per build; a failed
    /// prune is a warning, never a failed build. [`Builder::last_prune`] tells what it did.
    pub fn prune_policy(mut self, policy: PrunePolicy) -> BuilderOptions {
        self.prune_policy = Some(policy);
        self
    }

    /// These options with `hook` called with a step's label just before it executes.
    #[cfg(feature = "testing")]
    pub fn before_execute(mut self, hook: StepHook) -> BuilderOptions {
        self.before_execute = Some(hook);
        self
    }
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
            .field("reapi", &self.reapi)
            .field("reapi_execute", &self.reapi_execute)
            .field("secrets", &self.secrets)
            .field("ssh_agents", &self.ssh_agents)
            .field("run_limits", &self.run_limits)
            .field("prune_policy", &self.prune_policy)
            .finish_non_exhaustive()
    }
}

/// Builds images into a persistent cache directory. Cheap to clone (clones share the cache
/// state); `Send + Sync`.
///
/// ```no_run
/// use layerwright::{Builder, BuilderOptions, Compression, Context, Image};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let context = Context::dir("app")?;
/// let base = Image::scratch().copy(&context, "bin", "/app/bin");
/// let api = base.clone().entrypoint(["/app/bin/api"]);
/// let worker = base.entrypoint(["/app/bin/worker"]);
///
/// let builder = Builder::with_options("target/layerwright", BuilderOptions::default().compression(Compression::Zstd))?;
/// let built = builder.build_all(&[&api, &worker])?; // the shared COPY is built once
/// for step in built[0].steps() {
///     println!("{} {}", if step.cached { "cached" } else { "built " }, step.label);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Builder {
    store: Store,
    options: BuilderOptions,
    solve_options: SolveOptions,
    state: Arc<Mutex<KeyState>>,
    workers: Arc<rayon::ThreadPool>,
    /// What the last automatic prune removed.
    last_prune: Arc<Mutex<Option<PruneReport>>>,
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

    /// A builder whose cache lives in `cache_dir` (created if missing), with `options`.
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
        let state = KeyState { keys: KeyDatabase::new(), stat_cache };
        let solve_options = solve_options(&options);
        Ok(Builder {
            store,
            options,
            solve_options,
            state: Arc::new(Mutex::new(state)),
            workers: Arc::new(workers),
            last_prune: Arc::default(),
        })
    }

    /// The store of the cache directory: its blobs, records, disk usage and pruning.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The cache directory this builder keeps its store in.
    pub fn cache_dir(&self) -> &Path {
        self.store.root()
    }

    /// The options this builder was made with.
    pub fn options(&self) -> &BuilderOptions {
        &self.options
    }

    /// Shares this builder's cache through a registry: a step that misses locally is looked
    /// up in the cache at `reference` (`registry/repository:tag`) before it executes, and after
    /// a successful build the records of every step (not only the final image's) are exported
    /// there, uploading only the blobs the registry lacks. An unreachable, slow or corrupt
    /// remote cache costs a warning, never the build. See the `registry` module for the format.
    pub fn remote_cache(mut self, reference: &str) -> Builder {
        self.options.cache_from.push(reference.to_owned());
        self.options.cache_to = Some(reference.to_owned());
        self.solve_options = solve_options(&self.options);
        self
    }

    /// Shares this builder's steps through a REAPI server (BuildGrid, Buildbarn, BuildBuddy,
    /// NativeLink, ...) at `url` (`http://HOST:PORT` plaintext, `https://HOST:PORT` TLS),
    /// instance `instance` (empty for the default): a step that misses locally is looked up in
    /// the server's action cache before it executes, under an action that is a pure function of
    /// the step's key, and after a successful build the steps it executed are uploaded there
    /// (only the blobs the server's CAS lacks). Everything downloaded is checked by digest,
    /// size and diff id before it is used; an unreachable, slow or corrupt server costs one
    /// warning, never the build. With [`Builder::reapi_execute`] the server's workers run the
    /// RUN steps too.
    ///
    /// ```no_run
    /// use layerwright::Builder;
    ///
    /// let builder = Builder::new("target/layerwright")?.reapi("http://127.0.0.1:50051", "");
    /// # Ok::<(), layerwright::BuildError>(())
    /// ```
    pub fn reapi(mut self, url: &str, instance: &str) -> Builder {
        self.options.reapi = Some(ReapiEndpoint::new(url, instance));
        self.solve_options = solve_options(&self.options);
        self
    }

    /// Runs RUN steps that miss both caches on the workers of the REAPI server set with
    /// [`Builder::reapi`] (`layerwright-worker`s registered with BuildGrid's Bots API): each is
    /// submitted with `Execute`, with its lower layers as inputs (only those the server lacks
    /// are uploaded), and the worker's layer comes back checked by digest and diff id; it is
    /// the layer a local run writes, so the image digest is the same. File steps run locally,
    /// and so do RUN steps with mounts (cache directories, secrets, SSH agents and bind mounts
    /// are this machine's). The first failure (no worker within two minutes, the server gone,
    /// a failed or wrong result) is one warning, and that step and the rest of the build run
    /// locally. Without [`Builder::reapi`] the build fails at its start.
    ///
    /// ```no_run
    /// use layerwright::Builder;
    ///
    /// let builder = Builder::new("target/layerwright")?.reapi("http://127.0.0.1:50051", "").reapi_execute(true);
    /// # Ok::<(), layerwright::BuildError>(())
    /// ```
    pub fn reapi_execute(mut self, execute: bool) -> Builder {
        self.options.reapi_execute = execute;
        self.solve_options = solve_options(&self.options);
        self
    }

    /// This builder with secret `id` read from `source` when a RUN step mounting it
    /// ([`crate::Mount::secret`]) runs; see [`BuilderOptions::secret`].
    ///
    /// ```no_run
    /// use layerwright::{Builder, SecretSource};
    ///
    /// let builder = Builder::new("target/layerwright")?
    ///     .secret("token", SecretSource::File("token.txt".into()))
    ///     .secret("npm", SecretSource::Env("NPM_TOKEN".into()));
    /// # Ok::<(), layerwright::BuildError>(())
    /// ```
    pub fn secret(mut self, id: impl Into<String>, source: SecretSource) -> Builder {
        self.options.secrets.insert(id.into(), source);
        self.solve_options = solve_options(&self.options);
        self
    }

    /// This builder with SSH agent `id` bound into the RUN steps that mount it
    /// ([`crate::Mount::ssh`]); see [`BuilderOptions::ssh`].
    ///
    /// ```no_run
    /// use layerwright::{Builder, SshSource};
    ///
    /// let builder = Builder::new("target/layerwright")?.ssh("default", SshSource::Agent);
    /// # Ok::<(), layerwright::BuildError>(())
    /// ```
    pub fn ssh(mut self, id: impl Into<String>, source: SshSource) -> Builder {
        self.options.ssh_agents.insert(id.into(), source);
        self.solve_options = solve_options(&self.options);
        self
    }

    /// Builds `image`: unchanged steps come from the cache, independent ones run at once.
    pub fn build(&self, image: &Image) -> Result<BuiltImage, BuildError> {
        let mut built = self.build_all(&[image])?;
        Ok(built.pop().expect("one image in, one out"))
    }

    /// Builds several images in one walk: a step they share is built once.
    pub fn build_all(&self, images: &[&Image]) -> Result<Vec<BuiltImage>, BuildError> {
        self.build_all_for(images, Target::default())
    }

    /// Builds `image` for `platform`: its RUN steps execute for that platform (a foreign one
    /// through binfmt_misc and qemu-user-static), its bases are that platform's image of an
    /// index, and its config names the platform.
    pub fn build_for(&self, image: &Image, platform: &Platform) -> Result<BuiltImage, BuildError> {
        let mut built = self.build_all_for(&[image], Target { platform: Some(platform), provenance: false })?;
        Ok(built.pop().expect("one image in, one out"))
    }

    /// Builds one image per platform and the OCI image index that names them. Steps whose
    /// result does not depend on the platform (a context copy both graphs share) are built
    /// once: the first platform builds them, the others find them in the cache.
    ///
    /// Each image gets its attestations (SLSA provenance and an SPDX SBOM) in the index; see
    /// [`IndexOptions`] to leave them out.
    pub fn build_index(&self, images: &[(Platform, &Image)]) -> Result<BuiltIndex, BuildError> {
        self.build_index_with(images, &IndexOptions::default())
    }

    /// Builds `image` for this host's platform with its attestations: an index that names the
    /// image and its attestation manifest (SLSA provenance and an SPDX SBOM), as
    /// [`Builder::build_index`] gives for several platforms. The image inside has the manifest
    /// digest [`Builder::build`] gives it; only the index is new. A plain `build` stays a plain
    /// manifest: attestations of a single image are asked for by name.
    pub fn build_attested(&self, image: &Image) -> Result<BuiltIndex, BuildError> {
        self.build_index(&[(Platform::host(), image)])
    }

    /// [`Builder::build_index`] with options.
    pub fn build_index_with(
        &self,
        images: &[(Platform, &Image)],
        options: &IndexOptions,
    ) -> Result<BuiltIndex, BuildError> {
        let mut built = Vec::with_capacity(images.len());
        for (platform, image) in images {
            let target = Target { platform: Some(platform), provenance: options.attestations };
            let image = self.build_all_for(&[image], target)?.pop().expect("one image in, one out");
            built.push((platform.clone(), image));
        }
        BuiltIndex::new(&self.store, built, options)
    }

    fn build_all_for(&self, images: &[&Image], target: Target<'_>) -> Result<Vec<BuiltImage>, BuildError> {
        // Each build leases what it uses on a lease of its own, which its images keep: what
        // earlier builds of a long-lived builder (`--watch`) used is protected only while their
        // images live. The builder's own lease, which would otherwise protect by age everything
        // since the builder opened, starts again.
        let store = self
            .store
            .with_own_lease()
            .map_err(|source| BuildError::Cache { path: self.store.root().to_owned(), source })?;
        if let Err(error) = self.store.restart_lease() {
            log::warn!("cannot restart the builder's cache lease: {error}");
        }
        let session =
            Session { store: &store, options: &self.solve_options, state: &self.state, workers: &self.workers };
        let solved = solve::build_all(session, images, target)?;
        let built = solved.into_iter().map(|image| BuiltImage { inner: Arc::new(image) }).collect();
        // What the images name is protected by their lease (see `layerwright::cache`).
        drop(store);
        self.prune_after_build();
        Ok(built)
    }

    /// Prunes the cache when it is over the policy of [`BuilderOptions::prune_policy`].
    fn prune_after_build(&self) {
        let Some(policy) = self.options.prune_policy.as_ref().filter(|policy| !policy.keeps_everything()) else {
            return;
        };
        let progress = &self.solve_options.progress;
        let free = crate::cache::free_bytes(self.store.root()).unwrap_or(u64::MAX);
        if !policy.is_exceeded_by(&self.store.disk_usage(), free) {
            return;
        }
        match crate::cache::prune(&self.store, policy) {
            Ok(report) => *self.last_prune.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(report),
            Err(error) => progress.warn(None, format!("cannot prune the cache: {error}")),
        }
    }

    /// What the last automatic prune (see [`BuilderOptions::prune_policy`]) removed, if one ran.
    pub fn last_prune(&self) -> Option<PruneReport> {
        self.last_prune.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// The salsa queries that executed since the last call (for tests of incrementality).
    #[cfg(feature = "testing")]
    pub fn take_key_query_log(&self) -> Vec<String> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).keys.execution_log().take()
    }
}

/// The options of the solver, from the builder's.
fn solve_options(options: &BuilderOptions) -> SolveOptions {
    SolveOptions {
        compression: options.compression,
        source_date_epoch: options.source_date_epoch,
        progress: Progress::new(options.progress.clone()),
        #[cfg(feature = "testing")]
        before_execute: options.before_execute.clone(),
        #[cfg(not(feature = "testing"))]
        before_execute: None,
        cache_from: options.cache_from.clone(),
        cache_to: options.cache_to.clone(),
        reapi: options.reapi.clone(),
        reapi_execute: options.reapi_execute,
        secrets: options.secrets.clone(),
        ssh_agents: options.ssh_agents.clone(),
        run_limits: options.run_limits,
    }
}

/// A built image: its manifest, config and layers are in the cache store. Outlives the
/// [`Builder`] that made it; cheap to clone.
///
/// ```no_run
/// use layerwright::{Builder, Image};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let image = Image::scratch().write_file("/etc/motd", "hello\n").cmd(["/bin/sh"]);
/// let built = Builder::new("target/layerwright")?.build(&image)?;
/// println!("{} ({} bytes of layers)", built.manifest_digest(), built.size());
/// built.write_oci_layout("out/motd", "motd:latest")?;
/// built.write_docker_archive("out/motd.tar", "motd:latest")?; // docker load -i out/motd.tar
/// let config = built.config()?; // the image config document
/// assert_eq!(config["config"]["Cmd"][0], "/bin/sh");
/// print!("{}", built.listing()?); // one line per path, for snapshot tests
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct BuiltImage {
    inner: Arc<SolvedImage>,
}

impl BuiltImage {
    /// `sha256:…` of the image manifest.
    pub fn manifest_digest(&self) -> String {
        self.inner.manifest.to_string()
    }

    /// `sha256:…` of the image config.
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

    /// The image's layers, bottom first.
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

    pub(crate) fn parts(&self) -> ImageParts<'_> {
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
        crate::output::write_oci_layout(self.parts(), dir.as_ref(), tag)
    }

    /// Writes an OCI archive (a tar of an OCI layout).
    pub fn write_oci_archive(&self, file: impl AsRef<Path>, tag: &str) -> Result<(), ExportError> {
        crate::output::write_oci_archive(self.parts(), file.as_ref(), tag)
    }

    /// Writes a tar that `docker load -i` reads, tagged `tag`.
    pub fn write_docker_archive(&self, file: impl AsRef<Path>, tag: &str) -> Result<(), ExportError> {
        crate::output::write_docker_archive(self.parts(), file.as_ref(), tag)
    }

    /// Loads the image into the local Docker engine (`DOCKER_HOST` honoured, else
    /// `/var/run/docker.sock`) tagged `tag`, sending only the layers the engine does not
    /// already hold: after a one-file change, the changed layer (see [`LoadReport`]).
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let image = layerwright::Image::scratch().write_file("/hello", b"hi\n");
    /// let built = layerwright::Builder::new("target/layerwright")?.build(&image)?;
    /// let report = built.load("app:dev")?;
    /// println!("{} layers sent, {} already in the engine", report.layers_sent, report.layers_skipped);
    /// # Ok(())
    /// # }
    /// ```
    pub fn load(&self, tag: &str) -> Result<LoadReport, LoadError> {
        crate::output::load_into_docker(self.parts(), tag)
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

    /// One line per layer (its size, the step that made it, cached or built and why) and, with
    /// [`InspectOptions::with_files`], the files each layer adds, changes and removes, largest
    /// first: plain text for a terminal or an insta snapshot.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let image = layerwright::Image::scratch().write_file("/hello", b"hi\n");
    /// let built = layerwright::Builder::new("target/layerwright")?.build(&image)?;
    /// print!("{}", built.inspect(layerwright::InspectOptions::default().with_files())?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn inspect(&self, options: InspectOptions) -> Result<String, BuildError> {
        Ok(crate::inspect::layer_report(&self.inner.store, &self.inner.layers, &self.inner.steps, options)?)
    }

    /// A stable text listing of the final filesystem, one line per path, for insta (format:
    /// see `FsTree::listing`).
    pub fn listing(&self) -> Result<String, BuildError> {
        Ok(crate::tree::of_layers(&self.inner.store, &self.inner.layers)?.listing())
    }

    /// Each layer, bottom first, with what it holds on its own: its entries in the format of
    /// [`BuiltImage::listing`], then a `whiteout /PATH` line for each path it deletes from the
    /// layers below and an `opaque /PATH` line for each directory it makes opaque.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let built = layerwright::Builder::new("target/layerwright")?.build(&layerwright::Image::scratch().write_file("/a", "a"))?;
    /// for layer in built.layer_listings()? {
    ///     println!("{} {} bytes, {} paths", layer.layer.digest, layer.layer.size, layer.listing.lines().count());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn layer_listings(&self) -> Result<Vec<LayerListing>, BuildError> {
        let mut listings = Vec::with_capacity(self.inner.layers.len());
        for layer in &self.inner.layers {
            let index = layer::saved_or_indexed(&self.inner.store, layer)?;
            let (deletions, entries): (Vec<_>, Vec<_>) = index
                .entries
                .into_iter()
                .partition(|entry| matches!(entry.kind, IndexKind::Whiteout | IndexKind::OpaqueWhiteout));
            let mut tree = FsTree::default();
            tree.apply(0, &layer.digest, &LayerIndex { entries })?;
            let mut listing = tree.listing();
            for deletion in deletions {
                let kind = if deletion.kind == IndexKind::Whiteout { "whiteout" } else { "opaque" };
                listing.push_str(&format!("{kind} /{}\n", crate::tree::escape_for_listing(&deletion.path)));
            }
            listings.push(LayerListing { layer: layer.clone(), listing });
        }
        Ok(listings)
    }
}

/// One layer of a built image and what it holds on its own (see [`BuiltImage::layer_listings`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LayerListing {
    /// The layer: blob digest, diff id, blob size and media type.
    pub layer: LayerRecord,
    /// Its entries, one line per path, as [`BuiltImage::listing`] writes them, then its
    /// deletions (`whiteout /PATH`, `opaque /PATH`).
    pub listing: String,
}

/// Images of several platforms and the OCI image index that names them (see
/// [`Builder::build_index`]). Cheap to clone.
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    store: Store,
    index: layerwright_cache::Digest,
    index_size: u64,
    images: Vec<(Platform, BuiltImage)>,
    attestations: Vec<Attestation>,
}

/// Options of [`Builder::build_index_with`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct IndexOptions {
    /// Attach each image's SLSA provenance and SPDX SBOM to the index (on by default).
    pub attestations: bool,
}

impl Default for IndexOptions {
    fn default() -> IndexOptions {
        IndexOptions { attestations: true }
    }
}

impl IndexOptions {
    /// These options without attestations: the index names the images only.
    pub fn without_attestations(mut self) -> IndexOptions {
        self.attestations = false;
        self
    }
}

impl BuiltIndex {
    fn new(
        store: &Store,
        images: Vec<(Platform, BuiltImage)>,
        options: &IndexOptions,
    ) -> Result<BuiltIndex, BuildError> {
        let attestation_error = |source: AttestError| BuildError::Attestation(Box::new(source));
        let mut attestations = Vec::new();
        if options.attestations {
            for (platform, image) in &images {
                let inner = &image.inner;
                let subject = Subject {
                    store,
                    manifest: &inner.manifest,
                    config: &inner.config,
                    layers: &inner.layers,
                    steps: &inner.steps,
                    inputs: &inner.inputs,
                    platform,
                };
                attestations.push(attest(&subject).map_err(attestation_error)?);
            }
        }
        let mut manifests: Vec<Value> = images
            .iter()
            .map(|(platform, image)| {
                let mut platform_json = serde_json::json!({ "os": platform.os, "architecture": platform.architecture });
                if let Some(variant) = &platform.variant {
                    platform_json["variant"] = Value::String(variant.clone());
                }
                serde_json::json!({
                    "mediaType": media_types::OCI_MANIFEST,
                    "digest": image.inner.manifest.to_string(),
                    "size": image.inner.manifest_size,
                    "platform": platform_json,
                })
            })
            .collect();
        for (attestation, (_, image)) in attestations.iter().zip(&images) {
            manifests.push(crate::attest::descriptor(attestation, &image.inner.manifest));
        }
        let document = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_types::OCI_INDEX,
            "manifests": manifests,
        });
        let blob = store.put_blob(&canonical::to_bytes(&document)).map_err(|source| BuildError::Step {
            step: "write the image index".into(),
            source: Box::new(StepError::Store(source)),
        })?;
        Ok(BuiltIndex { store: store.clone(), index: blob.digest, index_size: blob.size, images, attestations })
    }

    /// `sha256:…` of the image index.
    pub fn manifest_digest(&self) -> String {
        self.index.to_string()
    }

    /// The images, with their platforms, in the order they were given.
    pub fn images(&self) -> &[(Platform, BuiltImage)] {
        &self.images
    }

    fn parts(&self) -> IndexParts<'_> {
        IndexParts {
            store: &self.store,
            index: &self.index,
            index_size: self.index_size,
            images: self
                .images
                .iter()
                .map(|(_, image)| image.parts())
                .chain(self.attestations.iter().map(|attestation| ImageParts {
                    store: &self.store,
                    manifest: &attestation.manifest,
                    manifest_size: attestation.manifest_size,
                    config: &attestation.config,
                    layers: &attestation.layers,
                }))
                .collect(),
        }
    }

    /// Writes (or adds to) an OCI image layout directory, tagging the index `tag`.
    pub fn write_oci_layout(&self, dir: impl AsRef<Path>, tag: &str) -> Result<(), ExportError> {
        crate::output::write_index_layout(&self.parts(), dir.as_ref(), tag)
    }

    /// Pushes the index to a registry (`registry/repository[:tag]`): every image's blobs the
    /// registry lacks, each image's manifest by digest, then the index under the tag.
    #[cfg(feature = "registry")]
    pub fn push(&self, reference: &str) -> Result<crate::registry::PushReport, crate::registry::RegistryError> {
        self.push_with(reference, &crate::registry::PushOptions::default())
    }

    /// [`BuiltIndex::push`] with options.
    #[cfg(feature = "registry")]
    pub fn push_with(
        &self,
        reference: &str,
        options: &crate::registry::PushOptions,
    ) -> Result<crate::registry::PushReport, crate::registry::RegistryError> {
        crate::registry::push_index(&self.parts(), reference, options)
    }

    /// Writes an OCI archive (a tar of an OCI layout) of the index.
    pub fn write_oci_archive(&self, file: impl AsRef<Path>, tag: &str) -> Result<(), ExportError> {
        crate::output::write_index_archive(&self.parts(), file.as_ref(), tag)
    }
}
