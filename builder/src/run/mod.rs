//! RUN steps: run a command against the image as it stands and record what it changed as a new
//! layer, the way Docker's copy-on-write storage does (the lower layers stay read-only, every
//! write lands in the overlay's upper directory, and that directory is the layer).
//!
//! [`execute_run`] is the whole of one RUN step on a cache miss:
//! 1. every layer of the parent is unpacked once into the cache ([`snapshot`]) and used as an
//!    overlay lower directory, top first;
//! 2. what the command runs as is resolved from the image config and the step ([`spec`]);
//! 3. a run directory under the store's `tmp/` gets the upper, work and merged directories and
//!    the generated `/etc/hosts` and `/etc/resolv.conf`; mountpoints the image lacks (`/proc`,
//!    `/dev`, ...) and directories whose metadata a snapshot would get wrong (see
//!    [`implied_directory_fixes`]) are made in the upper and remembered;
//! 4. the sandbox ([`layerwright_sandbox`]) mounts the overlay in fresh namespaces and runs the
//!    command, whose output goes to the progress sink line by line and to `logs/<step key>.log`;
//! 5. on exit code 0 the upper directory becomes the layer ([`upper`]), which is written and
//!    committed under the step's key; on anything else nothing is committed and the error shows
//!    the exit code, the command, the last 20 lines of output and the log's path.
//!
//! The run directory is removed in every case (a crash leaves it in `tmp/`, which the store
//! clears). Mounts and processes need no cleanup here: they live in namespaces that die with the
//! command (see [`layerwright_sandbox`]).
//!
//! Rootless: when not root, the sandbox adds a user namespace mapping root to the caller and
//! mounts overlayfs with `userxattr`; snapshots are unpacked in their rootless flavour. Only
//! root exists in such a run (a step with another user fails with a clear error). Owners other
//! than root in lower layers are seen as root by the command, but an entry it copies up keeps
//! its owner in the layer (recorded in an xattr of the snapshot); a `chown` the command makes to
//! root of such an entry is lost.
//!
//! What this module deliberately does not do: decide whether the step runs (the solver looks its
//! key up first), or keep anything of a failed run but its log.

pub(crate) mod emulation;
mod mounts;
mod spec;
mod upper;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use layerwright_cache::{LayerRecord, StepKey, Store};
use layerwright_dsl::{Limits, NetworkMode, Run, RunCommand};
use layerwright_sandbox::{
    NamespaceSandbox, OverlayMount, OverlayOptions, OverlayPaths, ResourceLimits, Sandbox, SandboxMounts,
    SandboxNetwork, SandboxPlan, Termination,
};
use rayon::prelude::*;
use thiserror::Error;

use crate::execution::{Execution, ExecutionError, NewLayer, NodeState};
use crate::layer::snapshot::{self, SnapshotError, SnapshotFlavour};
use crate::layer::{IndexKind, LayerIndex, TreeError, compare_paths};
use crate::progress::{Progress, ProgressEvent};
use crate::tree::FsTree;

pub use layerwright_sandbox::{OverlayError, SandboxError};
pub use mounts::{
    Given, MountError, SecretSource, Secrets, SshAgents, SshSource, secret_digest, validate as validate_mounts,
};
pub use spec::SpecError;
pub use upper::UpperError;

use upper::{CreatedPath, UpperOptions};

/// How many lines of a failed command's output its error shows.
pub const ERROR_OUTPUT_LINES: usize = 20;

/// The most processes a RUN command may have at once unless the step or the builder says
/// otherwise (the `pids.max` of its own cgroup, where the builder can make one): a fork bomb
/// fails its step instead of the machine.
pub const PIDS_LIMIT: u64 = 4096;

/// The memory limit of a RUN command unless the step or the builder sets one: none. What a
/// build step needs varies by orders of magnitude (a linker, a JVM, `cargo build -j`), and a
/// default taken from this machine's RAM would make the same build pass here and fail on a
/// smaller CI machine; the host's own OOM killer still guards the machine. A build that runs
/// untrusted steps sets one ([`crate::BuilderOptions::memory_limit`]).
pub const MEMORY_LIMIT: Option<u64> = None;

/// The longest line of a command's output kept whole: a longer one (or output without
/// newlines) is passed on in pieces of this size, so that the builder's memory stays bounded
/// whatever the command prints.
pub const MAX_OUTPUT_LINE_BYTES: usize = 64 * 1024;

/// The most bytes of a command's output its log keeps (`CACHE/logs/<key>.log`): past them the
/// log says it was cut, and the output still goes to the progress sink.
pub const MAX_LOG_BYTES: u64 = 64 << 20;

/// The hostname inside a RUN step.
const HOSTNAME: &str = "layerwright";

/// Why a RUN step failed. The step label is carried for callers that match on the error; the
/// message leaves it out because the build error around it already names the step.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RunError {
    /// The command exited with a code other than 0. Nothing of the run is committed.
    #[error("{}", failure_message(command, &format!("exited with code {code}"), last_lines, log))]
    Failed {
        /// The step's label.
        step: String,
        /// The command as it was run (the shell string, or the argv as a bracketed list).
        command: String,
        /// The command's exit code.
        code: i32,
        /// The last lines of its output (at most 20).
        last_lines: Vec<String>,
        /// The file holding its whole output.
        log: PathBuf,
    },
    /// The command was killed by a signal. Nothing of the run is committed.
    #[error("{}", failure_message(command, &format!("was killed by signal {signal}"), last_lines, log))]
    Killed {
        /// The step's label.
        step: String,
        /// The command as it was run (the shell string, or the argv as a bracketed list).
        command: String,
        /// The number of the signal that killed it.
        signal: i32,
        /// The last lines of its output (at most 20).
        last_lines: Vec<String>,
        /// The file holding its whole output.
        log: PathBuf,
    },
    /// What the command runs as (user, working directory, environment, argv) could not be
    /// resolved from the image config and the step.
    #[error("{source}")]
    Spec {
        /// The step's label.
        step: String,
        /// What could not be resolved.
        source: SpecError,
    },
    /// A layer of the parent image could not be unpacked into its snapshot, the overlay's
    /// lower directory.
    #[error("preparing a lower layer: {source}")]
    Snapshot {
        /// The step's label.
        step: String,
        /// Why the layer could not be unpacked.
        source: SnapshotError,
    },
    /// The overlay mount could not be planned: a path too long for the kernel, or more lower
    /// layers than overlayfs stacks.
    #[error("{source}")]
    Overlay {
        /// The step's label.
        step: String,
        /// Why the overlay could not be planned.
        source: OverlayError,
    },
    /// The sandbox could not set up its namespaces and mounts, or start or wait for the command,
    /// or the command failed after hitting the sandbox's process limit.
    #[error("running `{command}`: {source}")]
    Sandbox {
        /// The step's label.
        step: String,
        /// The command as it was to be run.
        command: String,
        /// What failed in the sandbox.
        source: SandboxError,
    },
    /// The overlay's upper directory, what the command changed, could not be turned into layer
    /// entries.
    #[error("reading what `{command}` changed: {source}")]
    Upper {
        /// The step's label.
        step: String,
        /// The command that ran.
        command: String,
        /// Why the upper directory could not be read.
        source: UpperError,
    },
    /// Preparing the run directory (its upper, work and merged directories, `/etc/hosts`,
    /// `/etc/resolv.conf`, the log file) failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// The step's label.
        step: String,
        /// What was being done (`create`, `write`, …).
        action: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The IO error from the operating system.
        source: io::Error,
    },
    /// The merged tree of the parent could not be read, or the layer not written.
    #[error(transparent)]
    Execution(#[from] ExecutionError),
    /// A mount of the step could not be made ready (its target, a cache directory).
    #[error(transparent)]
    Mount(#[from] MountError),
}

impl From<TreeError> for RunError {
    fn from(error: TreeError) -> RunError {
        RunError::Execution(ExecutionError::Tree(error))
    }
}

fn failure_message(command: &str, how: &str, last_lines: &[String], log: &Path) -> String {
    let mut message = format!("`{command}` {how}");
    if last_lines.is_empty() {
        message.push_str("; it printed nothing");
    } else {
        message.push_str(&format!("; the last {} lines of its output:", last_lines.len()));
        for line in last_lines {
            message.push_str("\n  | ");
            message.push_str(line);
        }
    }
    message.push_str(&format!("\nfull log: {}", log.display()));
    message
}

/// A RUN step to execute.
pub struct RunRequest<'a> {
    pub key: &'a StepKey,
    pub label: &'a str,
    pub run: &'a Run,
    pub parent: &'a Arc<NodeState>,
    pub progress: &'a Progress,
    /// The builder's secrets and SSH agents, for the step's secret and SSH mounts.
    pub given: Given<'a>,
    /// The source images of the step's bind mounts of images, in declaration order.
    pub bind_images: &'a [Arc<NodeState>],
    /// The selections of the step's bind mounts of the context, in declaration order.
    pub bind_contexts: &'a [crate::context::Selection],
    /// The builder's limits for every RUN step (a `None` field: [`PIDS_LIMIT`],
    /// [`MEMORY_LIMIT`]); the step's own win.
    pub defaults: Limits,
}

/// Runs the step and commits its layer under its key; nothing is committed on failure.
pub fn execute_run(execution: &Execution<'_>, request: &RunRequest<'_>) -> Result<NewLayer, RunError> {
    execute_run_with(execution, request, &NamespaceSandbox, Identity::of_process())
}

/// Who runs the build (real root, or a user who needs a user namespace), and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    /// `Some((uid, gid))` of the caller when not root.
    rootless: Option<(u32, u32)>,
    /// Mount the overlay the way kernels before 6.8 need: their overlayfs lacks `lowerdir+`
    /// (before 6.5 it even accepts it into a legacy option string and fails only at the end).
    classic_overlay: bool,
    /// The kernel's overlayfs takes `volatile` (5.10+): no syncs to the scratch upper directory.
    volatile_overlay: bool,
}

impl Identity {
    fn of_process() -> Identity {
        let rootless = (!rustix::process::geteuid().is_root())
            .then(|| (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw()));
        let release = rustix::system::uname().release().to_string_lossy().into_owned();
        Identity {
            rootless,
            classic_overlay: !kernel_at_least(&release, (6, 8)),
            volatile_overlay: kernel_at_least(&release, (5, 10)),
        }
    }

    fn flavour(self) -> SnapshotFlavour {
        if self.rootless.is_some() { SnapshotFlavour::Rootless } else { SnapshotFlavour::Privileged }
    }
}

/// Whether a kernel release (`6.18.44-fc`, `5.15.0-91-generic`) is at least `major.minor`. An
/// unreadable release counts as new.
fn kernel_at_least(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut numbers = release.split(['.', '-']).map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(release_major), Some(release_minor)) => (release_major, release_minor) >= (major, minor),
        _ => true,
    }
}

/// The step as its command sees it: with `SSH_AUTH_SOCK` naming the target of its SSH mount
/// (the first, if several), after the step's own variables so that it wins. The key was made
/// from the declaration; this changes only what runs.
fn with_agent_env(run: &Run) -> std::borrow::Cow<'_, Run> {
    let agent = run.mounts.iter().find_map(|mount| match mount {
        layerwright_dsl::Mount::Ssh { target, .. } => Some(target.clone()),
        _ => None,
    });
    match agent {
        None => std::borrow::Cow::Borrowed(run),
        Some(target) => std::borrow::Cow::Owned(run.clone().env("SSH_AUTH_SOCK", target)),
    }
}

/// The command as its error messages show it.
fn command_text(run: &Run) -> String {
    match &run.command {
        RunCommand::Shell(command) => command.clone(),
        RunCommand::Argv(argv) => {
            let quoted: Vec<String> = argv.iter().map(|argument| format!("{argument:?}")).collect();
            format!("[{}]", quoted.join(", "))
        }
    }
}

fn execute_run_with(
    execution: &Execution<'_>,
    request: &RunRequest<'_>,
    sandbox: &dyn Sandbox,
    identity: Identity,
) -> Result<NewLayer, RunError> {
    let step = request.label.to_owned();
    let command = command_text(request.run);
    let store = execution.store;
    let io_error = |action: &'static str, path: &Path| {
        let step = step.clone();
        let path = path.to_owned();
        move |source: io::Error| {
            log::warn!("{step}: cannot {action} {}: {source}", path.display());
            RunError::Io { step, action, path, source }
        }
    };

    // Before anything runs: a step that asks for the network must be able to get it.
    let network = match request.run.network {
        NetworkMode::None => SandboxNetwork::None,
        NetworkMode::Host => SandboxNetwork::Host,
        NetworkMode::Isolated => SandboxNetwork::Isolated {
            slirp4netns: layerwright_sandbox::slirp4netns().map_err(|source| {
                log::warn!("{step}: {source}");
                RunError::Sandbox { step: step.clone(), command: command.clone(), source }
            })?,
        },
    };
    let limits = resolve_limits(&request.run.limits, &request.defaults);

    let parent = request.parent;
    let parent_layers = parent.layers.to_vec();
    let (by_position, lowers) = lower_snapshots(store, &parent_layers, identity.flavour())
        .map_err(|source| RunError::Snapshot { step: step.clone(), source })?;
    let tree = execution.tree(parent)?;
    let passwd = image_file(&tree, &by_position, "etc/passwd");
    let group = image_file(&tree, &by_position, "etc/group");
    let process = spec::resolve(&with_agent_env(request.run), &parent.config, passwd.as_deref(), group.as_deref())
        .map_err(|source| RunError::Spec { step: step.clone(), source })?;
    // The source images of bind mounts: their snapshots, as a RUN step on them would have.
    let bound_images = request
        .bind_images
        .iter()
        .map(|source| {
            let (_, lowers) = lower_snapshots(store, &source.layers.to_vec(), identity.flavour())
                .map_err(|error| RunError::Snapshot { step: step.clone(), source: error })?;
            Ok(mounts::BoundImage { lowers, tree: execution.tree(source)? })
        })
        .collect::<Result<Vec<_>, RunError>>()?;
    let overlay_options = OverlayOptions {
        userxattr: identity.rootless.is_some(),
        volatile: identity.volatile_overlay,
        prefer_classic: identity.classic_overlay,
    };

    let tmp = store.tmp_dir();
    let run_dir =
        tempfile::Builder::new().prefix("run-").tempdir_in(&tmp).map_err(io_error("create a directory in", &tmp))?;
    let run_dir = RunDirectory(Some(run_dir));
    let upper = run_dir.path().join("upper");
    let work = run_dir.path().join("work");
    let merged = run_dir.path().join("merged");
    for directory in [&upper, &work, &merged] {
        fs::create_dir(directory).map_err(io_error("create", directory))?;
        // The root of the merged tree takes the upper directory's mode.
        fs::set_permissions(directory, fs::Permissions::from_mode(0o755)).map_err(io_error("chmod", directory))?;
    }
    let mountpoints = plan_mountpoints(&tree);
    let indexes =
        parent_layers.iter().map(|layer| execution.indexes.get(store, layer)).collect::<Result<Vec<_>, _>>()?;
    let mut created = mountpoints.created.clone();
    created.extend(implied_directory_fixes(&tree, &indexes));
    // The step's own mounts: mountpoints, and cache directories leased (locked) until the
    // command has ended.
    let mount_context = mounts::MountContext {
        store,
        tree: &tree,
        rootless: identity.rootless.is_some(),
        given: request.given,
        run_dir: run_dir.path(),
        images: &bound_images,
        contexts: request.bind_contexts,
        overlay: overlay_options,
    };
    let step_mounts = mounts::prepare(&mount_context, &step, request.run)?;
    created.extend(step_mounts.copied_parents.iter().cloned());
    created.sort_by(|left, right| compare_paths(&left.path, &right.path));
    created.dedup_by(|later, earlier| later.path == earlier.path);
    create_in_upper(&upper, &created, identity.rootless.is_none()).map_err(|(path, source)| {
        log::warn!("{step}: cannot prepare {} in the upper directory: {source}", path.display());
        RunError::Io { step: step.clone(), action: "prepare in the upper directory", path, source }
    })?;
    step_mounts.create_mountpoints(&step, request.run, &upper)?;
    let hosts = run_dir.path().join("hosts");
    fs::write(&hosts, hosts_file()).map_err(io_error("write", &hosts))?;
    let resolv_conf = run_dir.path().join("resolv.conf");
    fs::write(&resolv_conf, resolv_conf_file(request.run.network)).map_err(io_error("write", &resolv_conf))?;

    // Short names of the layers, for kernels whose overlayfs lacks `lowerdir+`.
    let short_lowers = run_dir.path().join("lowers");
    fs::create_dir(&short_lowers).map_err(io_error("create", &short_lowers))?;
    for (index, lower) in lowers.iter().enumerate() {
        let link = short_lowers.join(index.to_string());
        std::os::unix::fs::symlink(lower, &link).map_err(io_error("create the symlink", &link))?;
    }
    let paths = OverlayPaths {
        base_dir: store.root(),
        lowers: &lowers,
        upper: &upper,
        work: &work,
        target: &merged,
        short_lowers: &short_lowers,
    };
    let overlay = OverlayMount::new(&paths, &overlay_options)
        .map_err(|source| RunError::Overlay { step: step.clone(), source })?;
    let plan = SandboxPlan {
        base_dir: store.root().to_owned(),
        overlay,
        upper: upper.clone(),
        merged,
        rootless: identity.rootless,
        network,
        mounts: SandboxMounts {
            proc: mountpoints.proc,
            dev: mountpoints.dev,
            hosts: mountpoints.hosts.then(|| hosts.clone()),
            resolv_conf: mountpoints.resolv_conf.then(|| resolv_conf.clone()),
            step: step_mounts.sandbox.clone(),
        },
        hostname: HOSTNAME.to_owned(),
        process,
        limits,
    };

    // Logs are private (0600, in a 0700 directory): a command's output may hold what its
    // secrets gave it.
    let logs = store.root().join("logs");
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&logs)
    }
    .map_err(io_error("create", &logs))?;
    let log_path = logs.join(format!("{}.log", request.key.to_hex()));
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        File::options().write(true).create(true).truncate(true).mode(0o600).open(&log_path)
    }
    .map_err(io_error("create", &log_path))?;
    // A log an earlier run left (or an older version made 0644) is made private too.
    log.set_permissions(fs::Permissions::from_mode(0o600)).map_err(io_error("chmod 0600", &log_path))?;
    let mut collector = OutputCollector::new(request.label, request.progress, log);
    let ended = sandbox.run(&plan, &mut |chunk| collector.push(chunk));
    drop(step_mounts);
    let last_lines = collector.finish();
    let termination =
        ended.map_err(|source| RunError::Sandbox { step: step.clone(), command: command.clone(), source })?;
    match termination {
        Termination::Exited(0) => {}
        Termination::Exited(code) => {
            return Err(RunError::Failed { step, command, code, last_lines, log: log_path });
        }
        Termination::Signaled(signal) => {
            return Err(RunError::Killed { step, command, signal, last_lines, log: log_path });
        }
    }

    let options = UpperOptions { root_ids: identity.rootless, created };
    let entries = upper::upper_entries(&upper, &options).map_err(|source| RunError::Upper {
        step: step.clone(),
        command: command.clone(),
        source,
    })?;
    // The entries read the upper directory's files while the layer is written: the run
    // directory goes only after the commit.
    let written = execution.commit_layer(request.key, entries)?;
    drop(run_dir);
    Ok(written)
}

/// The run directory; removed on drop, including overlay's work directory, which the kernel
/// leaves without permissions.
struct RunDirectory(Option<tempfile::TempDir>);

impl RunDirectory {
    fn path(&self) -> &Path {
        self.0.as_ref().expect("present until dropped").path()
    }
}

impl Drop for RunDirectory {
    fn drop(&mut self) {
        let Some(directory) = self.0.take() else { return };
        let inner_work = directory.path().join("work/work");
        let _ = fs::set_permissions(&inner_work, fs::Permissions::from_mode(0o700));
        let path = directory.path().to_owned();
        if let Err(error) = directory.close() {
            log::warn!("cannot remove the RUN directory {}: {error}", path.display());
        }
    }
}

/// The snapshot of every layer by stack position, and the overlay's lower directories: top
/// first, each layer once (a layer repeated lower in the stack adds nothing its top copy does
/// not), empty ones left out, and an empty directory when nothing is left (overlayfs needs one).
fn lower_snapshots(
    store: &Store,
    layers: &[LayerRecord],
    flavour: SnapshotFlavour,
) -> Result<(Vec<PathBuf>, Vec<PathBuf>), SnapshotError> {
    let by_position: Vec<PathBuf> =
        layers.par_iter().map(|layer| snapshot::ensure_snapshot(store, layer, flavour)).collect::<Result<_, _>>()?;
    let mut seen = HashSet::new();
    let mut lowers = Vec::new();
    for path in by_position.iter().rev() {
        if !seen.insert(path.clone()) {
            continue;
        }
        let empty = fs::read_dir(path)
            .map_err(|source| SnapshotError::Io { action: "list", path: path.clone(), source })?
            .next()
            .is_none();
        if !empty {
            lowers.push(path.clone());
        }
    }
    if lowers.is_empty() {
        let empty = store.snapshots_dir().join("empty");
        match fs::create_dir(&empty) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(SnapshotError::Io { action: "create", path: empty, source }),
        }
        lowers.push(empty);
    }
    Ok((by_position, lowers))
}

/// The text of a regular file of the image (following a hard link to where its bytes are),
/// read from the snapshot of the layer that holds it.
fn image_file(tree: &FsTree, by_position: &[PathBuf], path: &str) -> Option<String> {
    let node = tree.get(path)?;
    let holder = match node.entry.kind {
        IndexKind::File { .. } => node,
        IndexKind::HardLink { .. } => tree.hard_link_target(path)?,
        _ => return None,
    };
    let snapshot = by_position.get(holder.layer)?;
    let bytes = snapshot::read_lower_file(std::slice::from_ref(snapshot), &holder.entry.path)?;
    String::from_utf8(bytes).ok()
}

/// Which of the runner's mounts can be made, and what must be created in the upper for them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountpointPlan {
    proc: bool,
    dev: bool,
    hosts: bool,
    resolv_conf: bool,
    /// Parents before children.
    created: Vec<CreatedPath>,
}

/// Decides the runner's mountpoints from the parent's tree. A mountpoint that exists with the
/// right type is mounted over; a missing one is created in the upper (with missing parents, and
/// existing parent directories copied up with their metadata, as overlayfs would); one whose
/// path holds something else, or passes through a symlink, is not mounted at all (the command
/// then sees what the image has there).
fn plan_mountpoints(tree: &FsTree) -> MountpointPlan {
    let mut created: Vec<CreatedPath> = Vec::new();
    let mut place = |path: &str, directory: bool| -> bool {
        let Ok(mut needed) = mounts::mountpoint_parents(tree, path) else { return false };
        match tree.get(path).map(|node| &node.entry.kind) {
            Some(IndexKind::Directory) if directory => true,
            Some(IndexKind::File { .. } | IndexKind::HardLink { .. }) if !directory => true,
            Some(_) => false,
            None => {
                let mode = if directory { 0o755 } else { 0o644 };
                needed.push(CreatedPath { path: path.to_owned(), directory, mode, uid: 0, gid: 0 });
                for made in needed {
                    if !created.iter().any(|existing| existing.path == made.path) {
                        created.push(made);
                    }
                }
                true
            }
        }
    };
    let proc = place("proc", true);
    let dev = place("dev", true);
    let hosts = place("etc/hosts", false);
    let resolv_conf = place("etc/resolv.conf", false);
    MountpointPlan { proc, dev, hosts, resolv_conf, created }
}

/// Directories whose mode and owner the overlay would take from a snapshot that only implies
/// them, with their parents: to be made in the upper with the image's metadata.
///
/// A layer of a file step holds only the directories it creates; an existing parent of what it
/// writes is implied, and an implied directory changes nothing (OCI). Its snapshot must still
/// hold a real directory there (`0755 0:0`), and overlayfs takes a merged directory's metadata
/// from the topmost layer that has it: `/tmp` (1777) under a layer that wrote `/tmp/x` would
/// read as 0755, and a command writing into it would put that into its layer. A directory in
/// the upper is above every layer; like the runner's mountpoints it is left out of the layer
/// while the command leaves it as it was.
fn implied_directory_fixes(tree: &FsTree, indexes: &[Arc<LayerIndex>]) -> Vec<CreatedPath> {
    // The topmost stack position whose snapshot has each directory.
    let mut topmost: HashMap<&str, usize> = HashMap::new();
    for (position, index) in indexes.iter().enumerate() {
        for entry in &index.entries {
            let path = entry.path.as_str();
            for (end, _) in path.match_indices('/') {
                topmost.insert(&path[..end], position);
            }
            if matches!(entry.kind, IndexKind::Directory | IndexKind::OpaqueWhiteout) && !path.is_empty() {
                topmost.insert(path, position);
            }
        }
    }
    let as_created = |path: &str| -> Option<CreatedPath> {
        let entry = &tree.get(path)?.entry;
        (entry.kind == IndexKind::Directory).then(|| mounts::copied_up_directory(path, entry))
    };
    let mut fixes: Vec<CreatedPath> = Vec::new();
    for (path, top) in topmost {
        let Some(node) = tree.get(path) else { continue };
        let entry = &node.entry;
        // The topmost snapshot with the directory holds the image's own entry for it, or it
        // implies it and the image's directory is an implied one too.
        if entry.kind != IndexKind::Directory
            || top <= node.layer
            || (entry.mode, entry.uid, entry.gid) == (0o755, 0, 0)
        {
            continue;
        }
        let parents = path.match_indices('/').map(|(end, _)| &path[..end]);
        fixes.extend(parents.chain([path]).filter_map(as_created));
    }
    fixes.sort_by(|left, right| compare_paths(&left.path, &right.path));
    fixes.dedup_by(|later, earlier| later.path == earlier.path);
    fixes
}

/// Creates the planned directories and files in the fresh upper directory. Modes are set
/// children first, so that a read-only parent copied from the image does not stop its children
/// being made.
fn create_in_upper(upper: &Path, created: &[CreatedPath], privileged: bool) -> Result<(), (PathBuf, io::Error)> {
    for made in created {
        let path = upper.join(&made.path);
        let result = if made.directory { fs::create_dir(&path) } else { File::create(&path).map(drop) };
        result.map_err(|error| (path.clone(), error))?;
        if privileged {
            std::os::unix::fs::lchown(&path, Some(made.uid), Some(made.gid)).map_err(|error| (path.clone(), error))?;
        } else if (made.uid, made.gid) != (0, 0) {
            // As a rootless snapshot records an owner it cannot set (see `snapshot::OWNER_XATTR`).
            let owner = format!("{}:{}", made.uid, made.gid);
            rustix::fs::lsetxattr(&path, snapshot::OWNER_XATTR, owner.as_bytes(), rustix::fs::XattrFlags::empty())
                .map_err(|error| (path.clone(), io::Error::from(error)))?;
        }
    }
    for made in created.iter().rev() {
        let path = upper.join(&made.path);
        fs::set_permissions(&path, fs::Permissions::from_mode(made.mode)).map_err(|error| (path.clone(), error))?;
    }
    Ok(())
}

fn hosts_file() -> String {
    format!("127.0.0.1\tlocalhost {HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n")
}

/// The command's resolver configuration: none without a network; slirp4netns's DNS forwarder
/// with isolated networking (it asks the host's resolvers, which may be on the host's loopback
/// the command cannot reach itself); the host's own in the host's network namespace.
fn resolv_conf_file(network: NetworkMode) -> Vec<u8> {
    match network {
        NetworkMode::None => Vec::new(),
        NetworkMode::Isolated => format!("nameserver {}\n", layerwright_sandbox::ISOLATED_NAMESERVER).into_bytes(),
        NetworkMode::Host => fs::read("/etc/resolv.conf").unwrap_or_default(),
    }
}

/// The limits a command runs with: the step's, else the builder's, else [`PIDS_LIMIT`] and
/// [`MEMORY_LIMIT`].
fn resolve_limits(step: &Limits, builder: &Limits) -> ResourceLimits {
    ResourceLimits {
        pids: Some(step.pids.or(builder.pids).unwrap_or(PIDS_LIMIT)),
        memory: step.memory.or(builder.memory).or(MEMORY_LIMIT),
    }
}

/// Splits the command's output into lines: each goes to the progress sink; everything goes to
/// the log, up to [`MAX_LOG_BYTES`]; the last [`ERROR_OUTPUT_LINES`] are kept for an error
/// message. Its memory is bounded: lines longer than [`MAX_OUTPUT_LINE_BYTES`] are split.
struct OutputCollector<'a> {
    label: &'a str,
    progress: &'a Progress,
    log: Option<File>,
    /// Bytes written to the log so far.
    logged: u64,
    /// The log's limit ([`MAX_LOG_BYTES`]; smaller in tests).
    log_limit: u64,
    partial: Vec<u8>,
    last_lines: VecDeque<String>,
}

impl<'a> OutputCollector<'a> {
    fn new(label: &'a str, progress: &'a Progress, log: File) -> OutputCollector<'a> {
        OutputCollector::with_log_limit(label, progress, log, MAX_LOG_BYTES)
    }

    fn with_log_limit(label: &'a str, progress: &'a Progress, log: File, log_limit: u64) -> OutputCollector<'a> {
        OutputCollector {
            label,
            progress,
            log: Some(log),
            logged: 0,
            log_limit,
            partial: Vec::new(),
            last_lines: VecDeque::new(),
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.write_log(chunk);
        let mut rest = chunk;
        while !rest.is_empty() {
            match rest.iter().position(|byte| *byte == b'\n') {
                Some(end) if self.partial.len() + end <= MAX_OUTPUT_LINE_BYTES => {
                    self.partial.extend_from_slice(&rest[..end]);
                    let line = std::mem::take(&mut self.partial);
                    self.line(&line);
                    rest = &rest[end + 1..];
                }
                _ => {
                    // No newline within the line limit: keep what fits, pass a full piece on.
                    let room = MAX_OUTPUT_LINE_BYTES - self.partial.len();
                    let (taken, left) = rest.split_at(room.min(rest.len()));
                    self.partial.extend_from_slice(taken);
                    rest = left;
                    if self.partial.len() == MAX_OUTPUT_LINE_BYTES {
                        let line = std::mem::take(&mut self.partial);
                        self.line(&line);
                    }
                }
            }
        }
    }

    /// Appends to the log up to its limit, then notes once that it was cut.
    fn write_log(&mut self, chunk: &[u8]) {
        let Some(log) = &mut self.log else { return };
        let room = self.log_limit.saturating_sub(self.logged);
        let kept = &chunk[..chunk.len().min(room as usize)];
        let mut result = log.write_all(kept);
        self.logged += kept.len() as u64;
        let cut = kept.len() < chunk.len();
        if cut && result.is_ok() {
            let note = format!("\n[layerwright: the log stops here, after {} bytes of output]\n", self.log_limit);
            result = log.write_all(note.as_bytes());
        }
        match result {
            Err(error) => {
                // The build goes on; only the log is incomplete.
                self.progress.warn(Some(self.label), format!("cannot write the RUN log: {error}"));
                self.log = None;
            }
            Ok(()) if cut => self.log = None,
            Ok(()) => {}
        }
    }

    fn line(&mut self, bytes: &[u8]) {
        let line = String::from_utf8_lossy(bytes).trim_end_matches('\r').to_owned();
        if self.progress.is_attached() {
            self.progress.emit(ProgressEvent::Output { label: self.label.to_owned(), line: line.clone() });
        }
        if self.last_lines.len() == ERROR_OUTPUT_LINES {
            self.last_lines.pop_front();
        }
        self.last_lines.push_back(line);
    }

    /// The last lines, a final unterminated one included.
    fn finish(mut self) -> Vec<String> {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.line(&rest);
        }
        if let Some(log) = &mut self.log {
            let _ = log.flush();
        }
        self.last_lines.into_iter().collect()
    }
}

#[cfg(test)]
mod tests;
