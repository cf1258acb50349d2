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
//! What this module deliberately is not: the mount itself (`layerwright_sandbox`), where cache
//! directories live or how they are locked (`layerwright_cache`), or keys (a mount's declaration
//! is in the step's encoding). Bind, context and SSH mounts are refused at plan time for now,
//! naming the step and the target.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use layerwright_cache::{CacheMountLease, CacheMountOptions, CacheMountSharing, Store, StoreError};
use layerwright_dsl::{ImagePathError, Mount, Run, Sharing, normalize_image_path};
use layerwright_sandbox::{MAX_STEP_MOUNTS, SecretBytes, StepMount};
use thiserror::Error;

use super::upper::CreatedPath;
use crate::layer::IndexKind;
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
    /// A kind of mount this version does not make yet.
    #[error("{kind} mounts are not supported yet (the mount on {target:?})")]
    Unsupported {
        /// The step's label.
        step: String,
        /// The kind (`secret`, `bind`, `ssh`).
        kind: &'static str,
        /// The target, as declared.
        target: String,
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
    /// A secret's target exists in the image as something else than a regular file.
    #[error("secret target {target:?} is a {kind} in the image, not a file")]
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
/// one target, at most [`MAX_STEP_MOUNTS`], and only the kinds this version makes. Returns the
/// normalised targets (image-relative, `var/cache/apt`) in declaration order.
pub fn validate(step: &str, run: &Run, secrets: &Secrets) -> Result<Vec<String>, MountError> {
    let step = step.to_owned();
    if run.mounts.len() > MAX_STEP_MOUNTS {
        return Err(MountError::TooMany { step, count: run.mounts.len() });
    }
    let mut seen = HashSet::new();
    let mut targets = Vec::with_capacity(run.mounts.len());
    for mount in &run.mounts {
        let target = mount.target().to_owned();
        let unsupported = match mount {
            Mount::Cache { .. } | Mount::Tmpfs { .. } => None,
            Mount::Secret { id, .. } if !secrets.contains_key(id) => {
                return Err(MountError::MissingSecret { step, id: id.clone(), target });
            }
            Mount::Secret { .. } => None,
            Mount::Bind { .. } => Some("bind"),
            Mount::Ssh { .. } => Some("ssh"),
            _ => Some("this kind of"),
        };
        if let Some(kind) = unsupported {
            return Err(MountError::Unsupported { step, kind, target });
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
    /// The builder's secrets.
    pub secrets: &'a Secrets,
    /// The step's run directory (secrets are staged in empty directories made there).
    pub run_dir: &'a Path,
}

/// Plans the mountpoints of `run`'s mounts in the parent's tree, leases the cache mounts'
/// directories from the store (waiting for a `Locked` id) and reads the secrets.
pub fn prepare(context: &MountContext<'_>, step: &str, run: &Run) -> Result<PreparedMounts, MountError> {
    let MountContext { store, tree, rootless, secrets, run_dir } = *context;
    let targets = validate(step, run, secrets)?;
    let mut prepared = PreparedMounts {
        sandbox: Vec::new(),
        copied_parents: Vec::new(),
        new_directories: Vec::new(),
        _leases: Vec::new(),
    };
    for (index, (mount, target)) in run.mounts.iter().zip(&targets).enumerate() {
        let absolute = format!("/{target}");
        if let Mount::Secret { id, owner, mode, .. } = mount {
            plan_secret_mountpoint(step, mount.target(), target, tree, &mut prepared)?;
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
            other => {
                let kind = match other {
                    Mount::Bind { .. } => "bind",
                    _ => "ssh",
                };
                return Err(MountError::Unsupported { step: step.to_owned(), kind, target: other.target().to_owned() });
            }
        }
    }
    prepared.copied_parents.sort_by(|left, right| crate::layer::compare_paths(&left.path, &right.path));
    prepared.copied_parents.dedup_by(|later, earlier| later.path == earlier.path);
    Ok(prepared)
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
            Some(entry) if entry.kind == IndexKind::Directory => existing.push(entry.clone()),
            Some(entry) => {
                return Err(MountError::NotDirectory {
                    step: step.to_owned(),
                    target: declared.to_owned(),
                    path: (*prefix).to_owned(),
                    kind: kind_name(&entry.kind),
                });
            }
            None => {
                for entry in existing {
                    prepared.copied_parents.push(CreatedPath {
                        path: entry.path.clone(),
                        directory: true,
                        mode: entry.mode,
                        uid: entry.uid,
                        gid: entry.gid,
                    });
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

/// Where a secret's `target` (normalised) needs a mountpoint: nothing when it is a file of the
/// image; else an empty file, with its missing parents, all made as the runner's own (left out
/// of the layer while the command leaves them as they were), existing parents copied up.
fn plan_secret_mountpoint(
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
    for (end, _) in target.match_indices('/') {
        let parent = &target[..end];
        let made = match tree.get(parent).map(|node| &node.entry) {
            Some(entry) if entry.kind == IndexKind::Directory => CreatedPath {
                path: parent.to_owned(),
                directory: true,
                mode: entry.mode,
                uid: entry.uid,
                gid: entry.gid,
            },
            Some(entry) => return Err(not_directory(parent, &entry.kind)),
            None => CreatedPath { path: parent.to_owned(), directory: true, mode: 0o755, uid: 0, gid: 0 },
        };
        prepared.copied_parents.push(made);
    }
    prepared.copied_parents.push(CreatedPath {
        path: target.to_owned(),
        directory: false,
        mode: 0o644,
        uid: 0,
        gid: 0,
    });
    Ok(())
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

    fn error(run: Run) -> String {
        validate("RUN make", &run, &Secrets::new()).unwrap_err().to_string()
    }

    #[test]
    fn targets_must_be_absolute_distinct_and_not_the_root() {
        assert_eq!(
            validate(
                "RUN make",
                &Run::shell("make").mount(Mount::cache("/a//b/")).mount(Mount::tmpfs("/c")),
                &Secrets::new()
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
            validate("RUN make", &Run::shell("make").mount(Mount::secret("/run/secrets/t", "t")), &secrets).is_ok()
        );
        assert_eq!(
            error(Run::shell("make").mount(Mount::ssh())),
            format!("ssh mounts are not supported yet (the mount on {:?})", layerwright_dsl::SSH_AGENT_TARGET)
        );
        let many =
            (0..=MAX_STEP_MOUNTS).fold(Run::shell("make"), |run, index| run.mount(Mount::tmpfs(format!("/t{index}"))));
        assert_eq!(
            error(many),
            format!("{} mounts, more than the {MAX_STEP_MOUNTS} a RUN step may have", MAX_STEP_MOUNTS + 1)
        );
    }
}
