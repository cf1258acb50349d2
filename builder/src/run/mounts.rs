//! A RUN step's mounts on the builder's side: checking the declared mounts ([`validate`], at
//! plan time, before anything executes: a secret the builder was not given is an error then)
//! and, when the step runs, turning them into the sandbox's [`StepMount`]s ([`prepare`]): a
//! cache mount's directory leased from the store (created with its mode and owner, locked as
//! its sharing says, held until the command ends), a tmpfs as it is, a secret's bytes read from
//! its [`SecretSource`] (into memory only: the sandbox writes them onto a tmpfs of the step's).
//!
//! A secret's bytes never enter the key (a changed secret does not rebuild the step, as in
//! BuildKit), a layer, a record or an error message; a step that prints them puts them in its
//! own log, as it would in BuildKit's. A secret's file mountpoint, and the directories made for
//! it, are left out of the layer while the command leaves them as they were.
//!
//! What a mount leaves in the layer: nothing of its contents (the command's writes under a
//! mount go to the mounted filesystem, never to the overlay's upper directory). Where the target
//! did not exist in the image, the layer gets the empty mountpoint directory (0755, root) and any
//! missing parents, as BuildKit leaves them; existing parents are copied up with their metadata
//! (see [`CreatedPath`]).
//!
//! A bind mount of an image ([`BoundImage`]) is an overlay of that image's snapshots (the
//! same ones a RUN step on it would have as lowers) with an upper of its own in the run
//! directory, read-only unless writable; its source path must be a directory or a regular file
//! of the image, reached through directories only (a symlink on the way is an error naming the
//! step and the path). A bind mount of the context is the selection a `copy` of the same path
//! would make (`.dockerignore` applied, nothing outside the context), staged in the run
//! directory through the context's capability and bound read-only unless writable (writes then
//! change only the staged copy, thrown away with the run directory). An SSH agent is the
//! builder's socket ([`SshSource`]) bound on a file mountpoint, checked to be a socket before
//! anything runs.
//!
//! What this module deliberately is not: the mount itself (`layerwright_sandbox`), where cache
//! directories live or how they are locked (`layerwright_cache`), or keys (a mount's declaration
//! is in the step's encoding; the planner adds a bound image's key, the bound context files'
//! digests and, for a secret keyed by its digest, [`secret_digest`]).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use layerwright_cache::{CacheMountLease, CacheMountOptions, CacheMountSharing, Store, StoreError};
use layerwright_dsl::{ImagePathError, Mount, MountSource, Run, Sharing, normalize_image_path};
use layerwright_sandbox::{
    HostKind, MAX_STEP_MOUNTS, OverlayError, OverlayMount, OverlayOptions, OverlayPaths, SecretBytes, StepMount,
};
use thiserror::Error;

use super::upper::CreatedPath;
use crate::context::{ContextKind, Selection};
use crate::layer::{IndexEntry, IndexKind};
use crate::tree::FsTree;

/// Where the bytes of a secret come from ([`crate::Builder::secret`]). Read when a step that
/// mounts it runs, never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file's whole content.
    File(PathBuf),
    /// An environment variable's value (of the process that builds).
    Env(String),
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::File(path) => write!(formatter, "file {}", path.display()),
            SecretSource::Env(name) => write!(formatter, "environment variable {name}"),
        }
    }
}

/// The secrets a builder was given, by id.
pub type Secrets = BTreeMap<String, SecretSource>;

/// Where an SSH agent's socket is ([`crate::Builder::ssh`]), as `docker build --ssh` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshSource {
    /// The agent of the process that builds: its `SSH_AUTH_SOCK` (`--ssh default`).
    Agent,
    /// A socket at this path (`--ssh id=PATH`).
    Socket(PathBuf),
}

impl std::fmt::Display for SshSource {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SshSource::Agent => formatter.write_str("the builder's SSH_AUTH_SOCK"),
            SshSource::Socket(path) => write!(formatter, "socket {}", path.display()),
        }
    }
}

/// The SSH agents a builder was given, by id.
pub type SshAgents = BTreeMap<String, SshSource>;

/// What a builder was given for its steps' mounts: secrets and SSH agents, by id.
#[derive(Debug, Clone, Copy)]
pub struct Given<'a> {
    /// The secrets ([`crate::Builder::secret`]).
    pub secrets: &'a Secrets,
    /// The SSH agents ([`crate::Builder::ssh`]).
    pub ssh: &'a SshAgents,
}

/// Why a RUN step's mounts cannot be made. The step's label is carried for callers that match;
/// the message names the target (the build error around it names the step).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MountError {
    /// A target is not an absolute path.
    #[error("mount target {target:?} is not an absolute path")]
    NotAbsolute {
        /// The step's label.
        step: String,
        /// The target, as declared.
        target: String,
    },
    /// A target is not a valid image path (`..`, empty).
    #[error("mount target {target:?}: {source}")]
    BadTarget {
        /// The step's label.
        step: String,
        /// The target, as declared.
        target: String,
        /// What is wrong with it.
        source: ImagePathError,
    },
    /// A target is `/`.
    #[error("mount target {target:?} is the root: a mount cannot stand in for the whole image")]
    Root {
        /// The step's label.
        step: String,
        /// The target, as declared.
        target: String,
    },
    /// Two mounts of the step have the same target.
    #[error("two mounts on {target:?}")]
    Duplicate {
        /// The step's label.
        step: String,
        /// The target, as declared the second time.
        target: String,
    },
    /// More mounts than the sandbox makes.
    #[error("{count} mounts, more than the {MAX_STEP_MOUNTS} a RUN step may have")]
    TooMany {
        /// The step's label.
        step: String,
        /// How many were declared.
        count: usize,
    },
    /// An SSH mount names an agent the builder was not given.
    #[error(
        "ssh agent {id:?} (mounted on {target:?}) was not given to the builder (Builder::ssh, --ssh {id} or --ssh \
         {id}=SOCKET)"
    )]
    MissingSshAgent {
        /// The step's label.
        step: String,
        /// The agent's id.
        id: String,
        /// The target, as declared.
        target: String,
    },
    /// The builder's SSH agent cannot be used: `SSH_AUTH_SOCK` is unset, or not a socket.
    #[error("ssh agent {id:?} ({from}): {reason}")]
    SshAgentUnusable {
        /// The step's label.
        step: String,
        /// The agent's id.
        id: String,
        /// Where it was to be found.
        from: SshSource,
        /// What is wrong.
        reason: String,
    },
    /// A bind mount's source path is not a directory or regular file of its source image, or
    /// passes through something else than a directory (a symlink included).
    #[error("bind mount source {path:?} (mounted on {target:?}): {reason}")]
    BindSource {
        /// The step's label.
        step: String,
        /// The source path, as declared.
        path: String,
        /// The target, as declared.
        target: String,
        /// What is wrong.
        reason: String,
    },
    /// A bind mount's overlay of its source image cannot be planned.
    #[error("bind mount on {target:?}: {source}")]
    BindOverlay {
        /// The step's label.
        step: String,
        /// The target, as declared.
        target: String,
        /// Why the overlay cannot be planned.
        source: OverlayError,
    },
    /// The target, or a directory on the way to it, is something else than a directory in the
    /// image (a symlink included: a mount is never placed through one).
    #[error("mount target {target:?}: /{path} is a {kind} in the image, not a directory")]
    NotDirectory {
        /// The step's label.
        step: String,
        /// The target, as declared.
        target: String,
        /// The image path that is not a directory.
        path: String,
        /// What it is.
        kind: &'static str,
    },
    /// A secret mount names a secret the builder was not given.
    #[error(
        "secret {id:?} (mounted on {target:?}) was not given to the builder (Builder::secret, --secret id={id},src=FILE)"
    )]
    MissingSecret {
        /// The step's label.
        step: String,
        /// The secret's id.
        id: String,
        /// The target, as declared.
        target: String,
    },
    /// A secret's source could not be read. The message names the source, never the bytes.
    #[error("secret {id:?}: cannot read its {from}: {source}")]
    SecretUnreadable {
        /// The step's label.
        step: String,
        /// The secret's id.
        id: String,
        /// Where it was to come from.
        from: SecretSource,
        /// Why it could not be read.
        source: io::Error,
    },
    /// A file mount's (a secret's, a bound file's, an SSH agent's) target exists in the image
    /// as something else than a regular file.
    #[error("file mount target {target:?} is a {kind} in the image, not a file")]
    SecretTargetNotFile {
        /// The step's label.
        step: String,
        /// The target, as declared.
        target: String,
        /// What it is.
        kind: &'static str,
    },
    /// A cache mount's directory could not be made or locked.
    #[error("cache mount {id:?} on {target:?}: {source}")]
    Cache {
        /// The step's label.
        step: String,
        /// The cache mount's id.
        id: String,
        /// The target, as declared.
        target: String,
        /// What failed in the store.
        source: Box<StoreError>,
    },
    /// A mountpoint could not be made in the upper directory.
    #[error("mount target {target:?}: cannot create {path}: {source}")]
    Mountpoint {
        /// The step's label.
        step: String,
        /// The target, as declared.
        target: String,
        /// The directory on the host.
        path: PathBuf,
        /// The IO error from the operating system.
        source: io::Error,
    },
}

/// Checks a RUN step's mounts before anything executes: absolute targets, none `/`, no two on
/// one target, at most [`MAX_STEP_MOUNTS`], every secret and SSH agent given to the builder
/// (an agent's socket present). Returns the normalised targets (image-relative,
/// `var/cache/apt`) in declaration order.
pub fn validate(step: &str, run: &Run, given: Given<'_>) -> Result<Vec<String>, MountError> {
    let step = step.to_owned();
    if run.mounts.len() > MAX_STEP_MOUNTS {
        return Err(MountError::TooMany { step, count: run.mounts.len() });
    }
    let mut seen = HashSet::new();
    let mut targets = Vec::with_capacity(run.mounts.len());
    for mount in &run.mounts {
        let target = mount.target().to_owned();
        match mount {
            Mount::Secret { id, .. } if !given.secrets.contains_key(id) => {
                return Err(MountError::MissingSecret { step, id: id.clone(), target });
            }
            Mount::Ssh { id, .. } => {
                agent_socket(&step, id, &target, given.ssh)?;
            }
            _ => {}
        }
        if !target.starts_with('/') {
            return Err(MountError::NotAbsolute { step, target });
        }
        let normalised = match normalize_image_path(&target) {
            Ok(normalised) => normalised,
            Err(source) => return Err(MountError::BadTarget { step, target, source }),
        };
        if normalised.is_empty() {
            return Err(MountError::Root { step, target });
        }
        if !seen.insert(normalised.clone()) {
            return Err(MountError::Duplicate { step, target });
        }
        targets.push(normalised);
    }
    Ok(targets)
}

/// A step's mounts, ready for the sandbox. Holds the cache mounts' leases (and so their locks)
/// until dropped: drop it when the command has ended.
pub struct PreparedMounts {
    /// For [`layerwright_sandbox::SandboxMounts::step`].
    pub sandbox: Vec<StepMount>,
    /// Existing directories on the way to a missing target, to copy up with their metadata
    /// (the runner's own created paths: left out of the layer when unchanged and empty).
    pub copied_parents: Vec<CreatedPath>,
    /// Missing targets and their missing parents (image-relative, parents first), to create
    /// 0755 in the upper after the copied parents: they stay in the layer.
    pub new_directories: Vec<String>,
    _leases: Vec<CacheMountLease>,
}

/// What [`prepare`] works with besides the step.
pub struct MountContext<'a> {
    /// The cache store (cache mounts' directories).
    pub store: &'a Store,
    /// The parent's merged tree (where mountpoints are missing).
    pub tree: &'a FsTree,
    /// Owners cannot be set (only root exists in the run).
    pub rootless: bool,
    /// The builder's secrets and SSH agents.
    pub given: Given<'a>,
    /// The step's run directory (secrets, bind overlays and context copies are staged there).
    pub run_dir: &'a Path,
    /// The source images of the step's bind mounts of images, in declaration order.
    pub images: &'a [BoundImage],
    /// The selections of the step's bind mounts of the context, in declaration order.
    pub contexts: &'a [Selection],
    /// How the step's own overlay is mounted (bind overlays are mounted alike).
    pub overlay: OverlayOptions,
}

/// The source image of a bind mount: its snapshots as overlay lowers (top first, as a RUN step
/// on it would have them) and its merged tree.
pub struct BoundImage {
    /// The overlay's lower directories, top first.
    pub lowers: Vec<PathBuf>,
    /// The image's merged tree (to check the source path).
    pub tree: Arc<FsTree>,
}

/// Plans the mountpoints of `run`'s mounts in the parent's tree, leases the cache mounts'
/// directories from the store (waiting for a `Locked` id) and reads the secrets.
pub fn prepare(context: &MountContext<'_>, step: &str, run: &Run) -> Result<PreparedMounts, MountError> {
    let MountContext { store, tree, rootless, given, run_dir, .. } = *context;
    let secrets = given.secrets;
    let targets = validate(step, run, given)?;
    let mut images = context.images.iter();
    let mut contexts = context.contexts.iter();
    let mut prepared = PreparedMounts {
        sandbox: Vec::new(),
        copied_parents: Vec::new(),
        new_directories: Vec::new(),
        _leases: Vec::new(),
    };
    for (index, (mount, target)) in run.mounts.iter().zip(&targets).enumerate() {
        let absolute = format!("/{target}");
        if let Mount::Secret { id, owner, mode, .. } = mount {
            plan_file_mountpoint(step, mount.target(), target, tree, &mut prepared)?;
            let from = secrets.get(id).expect("validated: the builder has it").clone();
            let bytes = read_secret(&from).map_err(|source| {
                log::warn!("{step}: cannot read secret {id:?} from its {from}: {source}");
                MountError::SecretUnreadable { step: step.to_owned(), id: id.clone(), from, source }
            })?;
            let staging = run_dir.join(format!("secret-{index}"));
            fs::create_dir(&staging).map_err(|source| MountError::Mountpoint {
                step: step.to_owned(),
                target: mount.target().to_owned(),
                path: staging.clone(),
                source,
            })?;
            let (uid, gid) = if rootless { (0, 0) } else { owner.map_or((0, 0), |owner| (owner.uid, owner.gid)) };
            prepared.sandbox.push(StepMount::Secret {
                target: absolute,
                staging,
                bytes,
                uid,
                gid,
                mode: mode.unwrap_or(0o400),
            });
            continue;
        }
        let mountpoint_error = |path: PathBuf| {
            let step = step.to_owned();
            let target = mount.target().to_owned();
            move |source: io::Error| {
                log::warn!("{step}: cannot stage the mount on {target} in {}: {source}", path.display());
                MountError::Mountpoint { step, target, path, source }
            }
        };
        match mount {
            Mount::Ssh { id, .. } => {
                plan_file_mountpoint(step, mount.target(), target, tree, &mut prepared)?;
                let socket = agent_socket(step, id, mount.target(), given.ssh)?;
                let (parent, name) = split_host_path(&socket);
                let kind = HostKind::Socket;
                prepared.sandbox.push(StepMount::Host { parent, name, target: absolute, kind, read_only: false });
                continue;
            }
            Mount::Bind { source: MountSource::Image(_), path, writable, .. } => {
                let bound = images.next().expect("one bound image per image bind mount");
                let (inside, file) = bind_source(step, path, mount.target(), &bound.tree)?;
                plan_target(step, mount.target(), target, file, tree, &mut prepared)?;
                let directory = run_dir.join(format!("bind-{index}"));
                let [upper, work, merged, short_lowers] =
                    ["upper", "work", "merged", "lowers"].map(|name| directory.join(name));
                for made in [&directory, &upper, &work, &merged, &short_lowers] {
                    fs::create_dir(made).map_err(mountpoint_error(made.clone()))?;
                }
                for (position, lower) in bound.lowers.iter().enumerate() {
                    let link = short_lowers.join(position.to_string());
                    std::os::unix::fs::symlink(lower, &link).map_err(mountpoint_error(link.clone()))?;
                }
                let paths = OverlayPaths {
                    base_dir: store.root(),
                    lowers: &bound.lowers,
                    upper: &upper,
                    work: &work,
                    target: &merged,
                    short_lowers: &short_lowers,
                };
                let overlay = OverlayMount::new(&paths, &context.overlay).map_err(|source| {
                    MountError::BindOverlay { step: step.to_owned(), target: mount.target().to_owned(), source }
                })?;
                prepared.sandbox.push(StepMount::Image {
                    overlay: Box::new(overlay),
                    merged,
                    path: inside,
                    target: absolute,
                    file,
                    writable: *writable,
                });
                continue;
            }
            Mount::Bind { source: MountSource::Context(_), writable, .. } => {
                let selection = contexts.next().expect("one selection per context bind mount");
                let file = !selection.source_is_directory;
                plan_target(step, mount.target(), target, file, tree, &mut prepared)?;
                let parent = run_dir.join(format!("bind-{index}"));
                fs::create_dir(&parent).map_err(mountpoint_error(parent.clone()))?;
                stage_selection(selection, &parent.join("content")).map_err(|(path, source)| {
                    log::warn!("{step}: cannot stage the context's files in {}: {source}", path.display());
                    MountError::Mountpoint { step: step.to_owned(), target: mount.target().to_owned(), path, source }
                })?;
                let kind = if file { HostKind::File } else { HostKind::Directory };
                let name = "content".to_owned();
                prepared.sandbox.push(StepMount::Host { parent, name, target: absolute, kind, read_only: !writable });
                continue;
            }
            _ => {}
        }
        plan_mountpoint(step, mount.target(), target, tree, &mut prepared)?;
        match mount {
            Mount::Cache { id, sharing, owner, mode, .. } => {
                let sharing = match sharing {
                    Sharing::Shared => CacheMountSharing::Shared,
                    Sharing::Locked => CacheMountSharing::Locked,
                    Sharing::Private => CacheMountSharing::Private,
                };
                let owner = if rootless { None } else { Some(owner.map_or((0, 0), |owner| (owner.uid, owner.gid))) };
                let options = CacheMountOptions { mode: mode.unwrap_or(0o755), owner };
                let lease = store.acquire_cache_mount(id, sharing, options).map_err(|source| MountError::Cache {
                    step: step.to_owned(),
                    id: id.clone(),
                    target: mount.target().to_owned(),
                    source: Box::new(source),
                })?;
                prepared.sandbox.push(StepMount::Directory {
                    parent: lease.parent().to_owned(),
                    name: lease.name().to_owned(),
                    target: absolute,
                });
                prepared._leases.push(lease);
            }
            Mount::Tmpfs { size, .. } => prepared.sandbox.push(StepMount::Tmpfs { target: absolute, size: *size }),
            Mount::Secret { .. } | Mount::Bind { .. } | Mount::Ssh { .. } => unreachable!("handled above"),
            _ => unreachable!("validated: every kind of this version"),
        }
    }
    prepared.copied_parents.sort_by(|left, right| crate::layer::compare_paths(&left.path, &right.path));
    prepared.copied_parents.dedup_by(|later, earlier| later.path == earlier.path);
    Ok(prepared)
}

/// A directory of the image at `path`, as overlayfs copies it up: its metadata kept.
pub(super) fn copied_up_directory(path: &str, entry: &IndexEntry) -> CreatedPath {
    CreatedPath { path: path.to_owned(), directory: true, mode: entry.mode, uid: entry.uid, gid: entry.gid }
}

/// The parent directories a mountpoint at `path` (normalised) needs in the upper: each one the
/// image has, copied up; each one it lacks, made by the runner (root's, 0755). The error is the
/// first parent that is not a directory, and what it is instead.
pub(super) fn mountpoint_parents<'a>(
    tree: &'a FsTree,
    path: &'a str,
) -> Result<Vec<CreatedPath>, (&'a str, &'a IndexKind)> {
    let mut parents = Vec::new();
    for (end, _) in path.match_indices('/') {
        let parent = &path[..end];
        parents.push(match tree.get(parent).map(|node| &node.entry) {
            Some(entry) if entry.kind == IndexKind::Directory => copied_up_directory(parent, entry),
            Some(entry) => return Err((parent, &entry.kind)),
            None => CreatedPath { path: parent.to_owned(), directory: true, mode: 0o755, uid: 0, gid: 0 },
        });
    }
    Ok(parents)
}

/// Where `target` (normalised) needs a mountpoint: nothing when it is a directory of the
/// image; else its existing parents copied up and the rest created.
fn plan_mountpoint(
    step: &str,
    declared: &str,
    target: &str,
    tree: &FsTree,
    prepared: &mut PreparedMounts,
) -> Result<(), MountError> {
    let mut prefixes: Vec<&str> = target.match_indices('/').map(|(end, _)| &target[..end]).collect();
    prefixes.push(target);
    let mut existing = Vec::new();
    for (position, prefix) in prefixes.iter().enumerate() {
        match tree.get(prefix).map(|node| &node.entry) {
            Some(entry) if entry.kind == IndexKind::Directory => existing.push((*prefix, entry)),
            Some(entry) => {
                return Err(MountError::NotDirectory {
                    step: step.to_owned(),
                    target: declared.to_owned(),
                    path: (*prefix).to_owned(),
                    kind: kind_name(&entry.kind),
                });
            }
            None => {
                for (path, entry) in existing {
                    prepared.copied_parents.push(copied_up_directory(path, entry));
                }
                for missing in &prefixes[position..] {
                    if !prepared.new_directories.iter().any(|made| made == missing) {
                        prepared.new_directories.push((*missing).to_owned());
                    }
                }
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Where a file mount's (a secret's, a bound file's, an SSH agent's) `target` (normalised)
/// needs a mountpoint: nothing when it is a file of the image; else an empty file, with its
/// missing parents, all made as the runner's own (left out of the layer while the command
/// leaves them as they were), existing parents copied up.
fn plan_file_mountpoint(
    step: &str,
    declared: &str,
    target: &str,
    tree: &FsTree,
    prepared: &mut PreparedMounts,
) -> Result<(), MountError> {
    let not_directory = |path: &str, kind: &IndexKind| MountError::NotDirectory {
        step: step.to_owned(),
        target: declared.to_owned(),
        path: path.to_owned(),
        kind: kind_name(kind),
    };
    match tree.get(target).map(|node| &node.entry.kind) {
        Some(IndexKind::File { .. } | IndexKind::HardLink { .. }) => return Ok(()),
        Some(kind) => {
            return Err(MountError::SecretTargetNotFile {
                step: step.to_owned(),
                target: declared.to_owned(),
                kind: kind_name(kind),
            });
        }
        None => {}
    }
    let parents = mountpoint_parents(tree, target).map_err(|(parent, kind)| not_directory(parent, kind))?;
    prepared.copied_parents.extend(parents);
    prepared.copied_parents.push(CreatedPath {
        path: target.to_owned(),
        directory: false,
        mode: 0o644,
        uid: 0,
        gid: 0,
    });
    Ok(())
}

/// A directory or file mountpoint for `target`, as the bound source is one or the other.
fn plan_target(
    step: &str,
    declared: &str,
    target: &str,
    file: bool,
    tree: &FsTree,
    prepared: &mut PreparedMounts,
) -> Result<(), MountError> {
    if file {
        plan_file_mountpoint(step, declared, target, tree, prepared)
    } else {
        plan_mountpoint(step, declared, target, tree, prepared)
    }
}

/// A bind mount's source path in its image's tree, normalised, and whether it is a file: a
/// directory or a regular file, reached through directories only.
fn bind_source(step: &str, path: &str, declared: &str, tree: &FsTree) -> Result<(String, bool), MountError> {
    let error = |reason: String| MountError::BindSource {
        step: step.to_owned(),
        path: path.to_owned(),
        target: declared.to_owned(),
        reason,
    };
    let inside = normalize_image_path(path).map_err(|source| error(source.to_string()))?;
    if inside.is_empty() {
        return Ok((inside, false));
    }
    let mut prefixes: Vec<&str> = inside.match_indices('/').map(|(end, _)| &inside[..end]).collect();
    prefixes.push(&inside);
    let last = prefixes.len() - 1;
    for (position, prefix) in prefixes.iter().enumerate() {
        let Some(node) = tree.get(prefix) else {
            return Err(error(format!("/{prefix} is not in the source image")));
        };
        match &node.entry.kind {
            IndexKind::Directory => {}
            IndexKind::File { .. } | IndexKind::HardLink { .. } if position == last => return Ok((inside, true)),
            kind => {
                return Err(error(format!(
                    "/{prefix} is a {} in the source image, not a directory{}",
                    kind_name(kind),
                    if position == last { " or a regular file" } else { "" }
                )));
            }
        }
    }
    Ok((inside, false))
}

/// Copies a context selection to `destination` (a directory made there, or a file) through
/// the context's capability: directories, files, symlinks and hard links as the selection
/// has them, owned by the builder. Directory modes are set last, children first, so that a
/// read-only directory does not stop its children being made.
fn stage_selection(selection: &Selection, destination: &Path) -> Result<(), (PathBuf, io::Error)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut directories = Vec::new();
    for file in &selection.files {
        let path = if file.relative.is_empty() { destination.to_owned() } else { destination.join(&file.relative) };
        let failed = |error: io::Error| (path.clone(), error);
        match &file.kind {
            ContextKind::Directory => {
                fs::create_dir(&path).map_err(failed)?;
                directories.push((path, file.mode));
            }
            ContextKind::File { .. } => {
                let mut source = selection.dir.open(selection.open_path(file)).map_err(failed)?;
                let mut copy =
                    fs::File::options().write(true).create_new(true).mode(0o600).open(&path).map_err(failed)?;
                io::copy(&mut source, &mut copy).map_err(failed)?;
                copy.set_permissions(fs::Permissions::from_mode(file.mode)).map_err(failed)?;
            }
            ContextKind::Symlink { target } => std::os::unix::fs::symlink(target, &path).map_err(failed)?,
            ContextKind::HardLink { target } => fs::hard_link(destination.join(target), &path).map_err(failed)?,
        }
    }
    for (path, mode) in directories.into_iter().rev() {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(|error| (path, error))?;
    }
    Ok(())
}

/// The socket of SSH agent `id`, checked to be one.
fn agent_socket(step: &str, id: &str, target: &str, agents: &SshAgents) -> Result<PathBuf, MountError> {
    use std::os::unix::fs::FileTypeExt;
    let Some(from) = agents.get(id) else {
        return Err(MountError::MissingSshAgent {
            step: step.to_owned(),
            id: id.to_owned(),
            target: target.to_owned(),
        });
    };
    let unusable = |reason: String| MountError::SshAgentUnusable {
        step: step.to_owned(),
        id: id.to_owned(),
        from: from.clone(),
        reason,
    };
    let path = match from {
        SshSource::Socket(path) => path.clone(),
        SshSource::Agent => match std::env::var_os("SSH_AUTH_SOCK") {
            Some(path) if !path.is_empty() => PathBuf::from(path),
            _ => return Err(unusable("SSH_AUTH_SOCK is not set (start an ssh-agent, or name a socket)".to_owned())),
        },
    };
    match fs::metadata(&path) {
        Ok(metadata) if metadata.file_type().is_socket() => Ok(path),
        Ok(_) => Err(unusable(format!("{} is not a socket", path.display()))),
        Err(error) => Err(unusable(format!("{}: {error}", path.display()))),
    }
}

/// A host path as (its parent directory, its last component), for [`StepMount::Host`].
fn split_host_path(path: &Path) -> (PathBuf, String) {
    let parent = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    (parent.to_owned(), name)
}

/// The digest of secret `id` that enters the key of a step whose mount opts in
/// ([`Mount::key_by_digest`]): blake3 in a key-derivation domain of layerwright's own, so
/// that it matches no other digest of the same bytes. Read before anything runs; an error
/// names the step and the id, never the bytes.
pub fn secret_digest(step: &str, id: &str, target: &str, secrets: &Secrets) -> Result<[u8; 32], MountError> {
    let Some(from) = secrets.get(id) else {
        return Err(MountError::MissingSecret { step: step.to_owned(), id: id.to_owned(), target: target.to_owned() });
    };
    let bytes = read_secret(from).map_err(|source| {
        log::warn!("{step}: cannot read secret {id:?} from its {from}: {source}");
        MountError::SecretUnreadable { step: step.to_owned(), id: id.to_owned(), from: from.clone(), source }
    })?;
    let mut hasher = blake3::Hasher::new_derive_key("layerwright 2026 secret mount key digest");
    hasher.update(bytes.as_bytes());
    Ok(*hasher.finalize().as_bytes())
}

/// A secret's bytes, from its source.
fn read_secret(from: &SecretSource) -> io::Result<SecretBytes> {
    match from {
        SecretSource::File(path) => fs::read(path).map(SecretBytes::new),
        SecretSource::Env(name) => match std::env::var_os(name) {
            Some(value) => Ok(SecretBytes::new(value.into_encoded_bytes())),
            None => Err(io::Error::new(io::ErrorKind::NotFound, "it is not set")),
        },
    }
}

fn kind_name(kind: &IndexKind) -> &'static str {
    match kind {
        IndexKind::Directory => "directory",
        IndexKind::Symlink { .. } => "symlink",
        IndexKind::File { .. } | IndexKind::HardLink { .. } => "file",
        _ => "special file",
    }
}

impl PreparedMounts {
    /// Creates the missing mountpoints (0755) in `upper`, whose copied parents exist already.
    pub fn create_mountpoints(&self, step: &str, run: &Run, upper: &Path) -> Result<(), MountError> {
        for directory in &self.new_directories {
            let path = upper.join(directory);
            let made = match fs::create_dir(&path) {
                Ok(()) => fs::set_permissions(&path, fs::Permissions::from_mode(0o755)),
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
                Err(error) => Err(error),
            };
            made.map_err(|source| {
                let target = run
                    .mounts
                    .iter()
                    .map(Mount::target)
                    .find(|target| target.trim_matches('/').starts_with(directory.as_str()))
                    .unwrap_or(directory)
                    .to_owned();
                log::warn!("{step}: cannot create the mountpoint {}: {source}", path.display());
                MountError::Mountpoint { step: step.to_owned(), target, path: path.clone(), source }
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use layerwright_dsl::{Mount, Run};

    use super::*;

    fn given<'a>(secrets: &'a Secrets, ssh: &'a SshAgents) -> Given<'a> {
        Given { secrets, ssh }
    }

    fn error(run: Run) -> String {
        validate("RUN make", &run, given(&Secrets::new(), &SshAgents::new())).unwrap_err().to_string()
    }

    #[test]
    fn targets_must_be_absolute_distinct_and_not_the_root() {
        assert_eq!(
            validate(
                "RUN make",
                &Run::shell("make").mount(Mount::cache("/a//b/")).mount(Mount::tmpfs("/c")),
                given(&Secrets::new(), &SshAgents::new())
            )
            .unwrap(),
            ["a/b", "c"]
        );
        assert_eq!(error(Run::shell("make").mount(Mount::cache("a"))), "mount target \"a\" is not an absolute path");
        assert_eq!(
            error(Run::shell("make").mount(Mount::tmpfs("/"))),
            "mount target \"/\" is the root: a mount cannot stand in for the whole image"
        );
        assert_eq!(
            error(Run::shell("make").mount(Mount::cache("/a")).mount(Mount::tmpfs("/a/"))),
            "two mounts on \"/a/\""
        );
        assert!(error(Run::shell("make").mount(Mount::tmpfs("/a/../b"))).starts_with("mount target \"/a/../b\": "));
        assert_eq!(
            error(Run::shell("make").mount(Mount::secret("/run/secrets/t", "t"))),
            "secret \"t\" (mounted on \"/run/secrets/t\") was not given to the builder (Builder::secret, --secret \
             id=t,src=FILE)"
        );
        let secrets = Secrets::from([("t".to_owned(), SecretSource::Env("T".into()))]);
        assert!(
            validate(
                "RUN make",
                &Run::shell("make").mount(Mount::secret("/run/secrets/t", "t")),
                given(&secrets, &SshAgents::new())
            )
            .is_ok()
        );
        assert_eq!(
            error(Run::shell("make").mount(Mount::ssh())),
            format!(
                "ssh agent \"default\" (mounted on {:?}) was not given to the builder (Builder::ssh, --ssh default \
                 or --ssh default=SOCKET)",
                layerwright_dsl::SSH_AGENT_TARGET
            )
        );
        // Given, but not a socket: named before anything runs.
        let file = tempfile::NamedTempFile::new().unwrap();
        let agents = SshAgents::from([("default".to_owned(), SshSource::Socket(file.path().to_owned()))]);
        let message = validate("RUN make", &Run::shell("make").mount(Mount::ssh()), given(&Secrets::new(), &agents))
            .unwrap_err()
            .to_string();
        assert_eq!(message, format!("ssh agent \"default\" (socket {0}): {0} is not a socket", file.path().display()));
        let many =
            (0..=MAX_STEP_MOUNTS).fold(Run::shell("make"), |run, index| run.mount(Mount::tmpfs(format!("/t{index}"))));
        assert_eq!(
            error(many),
            format!("{} mounts, more than the {MAX_STEP_MOUNTS} a RUN step may have", MAX_STEP_MOUNTS + 1)
        );
    }
}
