//! A RUN step's own mounts ([`StepMount`]): host directories bound read-write (cache mounts)
//! and fresh tmpfs instances, on top of the merged tree, for the command alone.
//!
//! The parent prepares them ([`PreparedMounts::new`], before `clone`): it checks that a host
//! directory opens relative to its parent's descriptor with `O_NOFOLLOW` (an error then names
//! it before anything runs), and makes every string the child needs a `CString`. The child
//! then, with raw syscalls and no allocation:
//!
//! 1. [`PreparedMounts::detach`], while the host's mounts are still in its namespace (after the
//!    overlay, before `pivot_root`): opens each directory the same way, relative to its parent's
//!    descriptor with `O_NOFOLLOW` (a step could have planted a symlink where a later one looks:
//!    the mount source is the directory itself, never a path resolved through what a step
//!    made), and `open_tree(OPEN_TREE_CLONE)`s that descriptor, made
//!    `nosuid,nodev` with `mount_setattr` (a device node a command made in a cache directory
//!    must not open in a later step), and `fsopen`/`fsmount` of each tmpfs (`nosuid,nodev`,
//!    `size=` when asked for): detached mounts, held by descriptors;
//! 2. [`PreparedMounts::attach`], after `pivot_root` and the runner's own mounts (so a mount
//!    at `/dev/shm` or below `/tmp` lands on top of them): opens each target with `openat2`
//!    and `RESOLVE_NO_SYMLINKS` in the new root, and `move_mount`s the detached mount there.
//!    The target must exist as a directory (the caller creates a missing one in the upper).
//!
//! Writes below a mount go to the mounted filesystem, never to the overlay's upper directory:
//! nothing of a mount's contents can enter the step's layer.
//!
//! A secret ([`StepMount::Secret`]) is written by the child onto a tmpfs of its own, attached
//! on a staging directory in the child's mount namespace only, and bound read-only on its
//! target (a file): its bytes never touch a disk. [`SecretBytes`] never prints them.
//!
//! A bind mount of an image's files ([`StepMount::Image`]) is an overlay of that image's
//! snapshots with an upper directory of its own (thrown away with the run directory), mounted
//! by the child in its own namespace only; the source path is opened in it with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), cloned with `open_tree` and bound read-only unless
//! writable. A host file, directory or socket of the caller's ([`StepMount::Host`]: a context
//! bind's staged copy, an SSH agent's socket) is opened as a cache directory is, relative to
//! its parent with `O_NOFOLLOW`, and bound read-only when asked.
//!
//! What this module deliberately is not: where a cache directory lives or how it is shared and
//! locked (the caller's), where a secret or an SSH agent comes from, or which files a bind
//! mount shows (the caller plans the overlay and stages a context's selection).

use std::ffi::CString;
use std::io;
use std::path::PathBuf;

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags};

use crate::failure::{Failure, SandboxError, Stage};
use crate::overlay::OverlayMount;

/// The most mounts one step may have (the child holds their descriptors in a fixed array).
pub const MAX_STEP_MOUNTS: usize = 32;

/// One mount of a step, made on top of the merged tree before the command runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepMount {
    /// A host directory bound read-write (a cache mount): `parent/name`, opened with
    /// `O_NOFOLLOW` relative to `parent`.
    Directory {
        /// A directory of the caller's own (no step can change it).
        parent: PathBuf,
        /// One path component: the directory in `parent`.
        name: String,
        /// Absolute, normalised path inside the image; must be a directory there.
        target: String,
    },
    /// A fresh tmpfs (`nosuid,nodev`).
    Tmpfs {
        /// Absolute, normalised path inside the image; must be a directory there.
        target: String,
        /// Its size limit in bytes; the kernel's default when `None`.
        size: Option<u64>,
    },
    /// A secret: a file written by the child on a tmpfs of its own (the bytes never touch a
    /// disk), bound read-only (`nosuid,nodev,noexec`) on `target`.
    Secret {
        /// Absolute, normalised path inside the image; must be a regular file there.
        target: String,
        /// An empty directory of the caller's, where the child attaches the secret's tmpfs in
        /// its own mount namespace (gone with it: nothing is attached on the host).
        staging: PathBuf,
        /// The bytes; never printed.
        bytes: SecretBytes,
        /// The file's owner.
        uid: u32,
        /// The file's group.
        gid: u32,
        /// The file's permission bits.
        mode: u32,
    },
    /// A host directory, file or socket of the caller's own (no step can change it), bound
    /// `nosuid,nodev` (and `ro` when `read_only`): `parent/name`, opened with `O_NOFOLLOW`
    /// relative to `parent`.
    Host {
        /// The directory holding it.
        parent: PathBuf,
        /// One path component: the entry in `parent`.
        name: String,
        /// Absolute, normalised path inside the image; a directory there for a directory, a
        /// regular file otherwise.
        target: String,
        /// What it is.
        kind: HostKind,
        /// Bound read-only.
        read_only: bool,
    },
    /// Files of an image: `overlay` (its snapshots as lowers, an upper of its own) mounted on
    /// its merged directory in the child's namespace, and `path` below it bound on `target`,
    /// `nosuid,nodev`, read-only unless `writable` (then writes land in the throwaway upper).
    Image {
        /// The overlay, attached at `merged`.
        overlay: Box<OverlayMount>,
        /// The overlay's merged directory, below the store root (the child's working
        /// directory when it mounts).
        merged: PathBuf,
        /// The normalised path inside the image's tree (empty for its root); no symlink on the
        /// way (it is opened with `RESOLVE_NO_SYMLINKS`).
        path: String,
        /// Absolute, normalised path inside the step's image.
        target: String,
        /// A regular file rather than a directory.
        file: bool,
        /// Writes allowed (to the overlay's upper).
        writable: bool,
    },
}

/// What a [`StepMount::Host`] binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// A directory (the target must be a directory in the image).
    Directory,
    /// A regular file (the target must be a regular file in the image).
    File,
    /// A unix socket, such as an SSH agent's (the target must be a regular file in the image).
    Socket,
}

/// A secret's bytes. Its `Debug` shows their length only, so that no plan, error or log line
/// holds them; they are overwritten with zeros when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// Holds `bytes`.
    pub fn new(bytes: Vec<u8>) -> SecretBytes {
        SecretBytes(bytes)
    }

    /// The bytes, to hash or write; never to print.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// How many bytes there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "SecretBytes({} bytes)", self.0.len())
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        for byte in self.0.iter_mut() {
            // SAFETY: a valid, aligned pointer to a byte we own; volatile so that the zeroing
            // is not optimised away.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
    }
}

impl StepMount {
    /// Where it is mounted.
    pub fn target(&self) -> &str {
        match self {
            StepMount::Directory { target, .. }
            | StepMount::Tmpfs { target, .. }
            | StepMount::Secret { target, .. }
            | StepMount::Host { target, .. }
            | StepMount::Image { target, .. } => target,
        }
    }
}

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A mount prepared by the parent.
enum Prepared {
    /// The parent opened the directory once to check it (an error before `clone` names it);
    /// the child opens it again the same way, since `open_tree` clones only mounts of its own
    /// mount namespace and a descriptor of the parent's refers to the parent's.
    Directory {
        parent: CString,
        name: CString,
    },
    Tmpfs {
        size: Option<CString>,
    },
    /// The index of the secret in the plan's mounts (the bytes stay there), its staging
    /// directory and its tmpfs's size.
    Secret {
        index: usize,
        staging: CString,
        size: CString,
    },
    Host {
        parent: CString,
        name: CString,
        directory: bool,
        attributes: MountAttrFlags,
    },
    /// The index of the mount in the plan's (the overlay stays there), the merged directory
    /// relative to the store root, and the path below it (`.` for its root).
    Image {
        index: usize,
        merged: CString,
        path: CString,
        directory: bool,
        attributes: MountAttrFlags,
    },
}

/// The step's mounts, ready for the child.
pub(crate) struct PreparedMounts<'a> {
    mounts: Vec<(Prepared, CString)>,
    /// The plan's mounts: a secret's bytes, and for describing a failure.
    plan: &'a [StepMount],
}

/// The calls of a secret mount a failure can name (the detail is `mount * 8 + call`).
const SECRET_CALLS: [&str; 8] = [
    "fsopen(\"tmpfs\") and fsconfig of the secret's tmpfs",
    "fsmount(nosuid, nodev, noexec) of the secret's tmpfs",
    "move_mount of the secret's tmpfs onto its staging directory",
    "writing the secret's file (openat, write, fchown, fchmod)",
    "open_tree(OPEN_TREE_CLONE) of the secret's file",
    "mount_setattr(ro, nosuid, nodev, noexec) of the secret's bind",
    "openat2(RESOLVE_NO_SYMLINKS) of the target",
    "move_mount onto the target",
];

/// The calls of a host bind a failure can name (the detail is `mount * 8 + call`).
const HOST_CALLS: [&str; 8] = [
    "open(parent, O_PATH | O_DIRECTORY)",
    "openat(name, O_PATH | O_NOFOLLOW)",
    "open_tree(OPEN_TREE_CLONE)",
    "mount_setattr(nosuid, nodev) of the bind",
    "",
    "",
    "openat2(RESOLVE_NO_SYMLINKS) of the target",
    "move_mount onto the target",
];

/// The calls of an image bind a failure can name (the detail is `mount * 8 + call`).
const IMAGE_CALLS: [&str; 8] = [
    "mounting the overlay of the source image's layers",
    "open(merged directory, O_PATH | O_NOFOLLOW)",
    "openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) of the source path",
    "open_tree(OPEN_TREE_CLONE) of the source path",
    "mount_setattr(nosuid, nodev, ro unless writable) of the bind",
    "",
    "openat2(RESOLVE_NO_SYMLINKS) of the target",
    "move_mount onto the target",
];

/// The calls of a step mount a failure can name (the detail is `mount * 8 + call`).
const CALLS: [&str; 8] = [
    "open(parent, O_PATH), openat(name, O_NOFOLLOW) and open_tree(OPEN_TREE_CLONE) of the directory",
    "mount_setattr(nosuid, nodev) of the directory's bind",
    "fsopen(\"tmpfs\")",
    "fsconfig(\"size\")",
    "fsconfig(FSCONFIG_CMD_CREATE) of the tmpfs",
    "fsmount(nosuid, nodev) of the tmpfs",
    "openat2(RESOLVE_NO_SYMLINKS, O_DIRECTORY) of the target",
    "move_mount onto the target",
];

impl<'a> PreparedMounts<'a> {
    /// Opens every host directory (relative to its parent, `O_NOFOLLOW`) and prepares every
    /// string. Errors name the mount's target and the path.
    pub(crate) fn new(mounts: &'a [StepMount], base_dir: &std::path::Path) -> Result<PreparedMounts<'a>, SandboxError> {
        let invalid =
            |action: String| SandboxError::StepMount { action, source: io::Error::from(io::ErrorKind::InvalidInput) };
        if mounts.len() > MAX_STEP_MOUNTS {
            return Err(SandboxError::StepMount {
                action: format!("make {} mounts (at most {MAX_STEP_MOUNTS})", mounts.len()),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
        let mut prepared = Vec::with_capacity(mounts.len());
        for (index, mount) in mounts.iter().enumerate() {
            let target = CString::new(mount.target()).map_err(|_| SandboxError::StepMount {
                action: format!("mount on {:?}, which holds a NUL byte", mount.target()),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            })?;
            let made = match mount {
                StepMount::Directory { parent, name, target } => {
                    let failed = |call: &str, source: Errno| {
                        let action = format!("{call} for the mount on {target}");
                        log::warn!("RUN sandbox: {action} failed: {source}");
                        SandboxError::StepMount { action, source: source.into() }
                    };
                    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                        return Err(failed(&format!("open {name:?} (not one path component)"), Errno::INVAL));
                    }
                    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
                    let parent_fd = rustix::fs::open(parent, flags, Mode::empty())
                        .map_err(|error| failed(&format!("open({parent:?}, O_PATH | O_DIRECTORY)"), error))?;
                    rustix::fs::openat(&parent_fd, name.as_str(), flags | OFlags::NOFOLLOW, Mode::empty()).map_err(
                        |error| {
                            failed(&format!("openat({parent:?}, {name:?}, O_PATH | O_DIRECTORY | O_NOFOLLOW)"), error)
                        },
                    )?;
                    let c_string = |text: &[u8]| {
                        CString::new(text)
                            .map_err(|_| failed(&format!("open {parent:?}/{name:?} (a NUL byte)"), Errno::INVAL))
                    };
                    Prepared::Directory {
                        parent: c_string(parent.as_os_str().as_encoded_bytes())?,
                        name: c_string(name.as_bytes())?,
                    }
                }
                StepMount::Tmpfs { size, .. } => Prepared::Tmpfs {
                    size: size.map(|size| CString::new(size.to_string()).expect("digits hold no NUL")),
                },
                StepMount::Secret { staging, bytes, target, .. } => Prepared::Secret {
                    index,
                    staging: CString::new(staging.as_os_str().as_encoded_bytes()).map_err(|_| {
                        SandboxError::StepMount {
                            action: format!("stage the secret for {target} in {staging:?}, which holds a NUL byte"),
                            source: io::Error::from(io::ErrorKind::InvalidInput),
                        }
                    })?,
                    // The file, rounded up to pages, and a page for the directory.
                    size: CString::new((bytes.len().div_ceil(4096) * 4096 + 4096).to_string())
                        .expect("digits hold no NUL"),
                },
                StepMount::Host { parent, name, kind, read_only, target } => {
                    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                        return Err(invalid(format!("bind {name:?} (not one path component) on {target}")));
                    }
                    let c_string = |text: &[u8]| {
                        CString::new(text).map_err(|_| invalid(format!("bind {parent:?}/{name:?} (a NUL byte)")))
                    };
                    let mut attributes = MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV;
                    if *read_only {
                        attributes |= MountAttrFlags::MOUNT_ATTR_RDONLY;
                    }
                    if *kind != HostKind::Directory {
                        attributes |= MountAttrFlags::MOUNT_ATTR_NOEXEC;
                    }
                    Prepared::Host {
                        parent: c_string(parent.as_os_str().as_encoded_bytes())?,
                        name: c_string(name.as_bytes())?,
                        directory: *kind == HostKind::Directory,
                        attributes,
                    }
                }
                StepMount::Image { merged, path, writable, file, target, .. } => {
                    let below = merged.strip_prefix(base_dir).unwrap_or(merged);
                    let path = if path.is_empty() { "." } else { path.as_str() };
                    let merged = CString::new(below.as_os_str().as_encoded_bytes())
                        .map_err(|_| invalid(format!("bind from {merged:?} (a NUL byte) on {target}")))?;
                    let path = CString::new(path).map_err(|_| invalid(format!("bind {path:?} (a NUL byte)")))?;
                    let mut attributes = MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV;
                    if !writable {
                        attributes |= MountAttrFlags::MOUNT_ATTR_RDONLY;
                    }
                    Prepared::Image { index, merged, path, directory: !file, attributes }
                }
            };
            prepared.push((made, target));
        }
        Ok(PreparedMounts { mounts: prepared, plan: mounts })
    }

    /// Step 1 in the child (before `pivot_root`): a detached mount per step mount. Raw
    /// syscalls only.
    // The failure is returned by value: the child must not allocate a Box.
    #[allow(clippy::result_large_err)]
    pub(crate) fn detach(&self) -> Result<[Option<OwnedFd>; MAX_STEP_MOUNTS], Failure> {
        let mut detached: [Option<OwnedFd>; MAX_STEP_MOUNTS] = std::array::from_fn(|_| None);
        for (index, (mount, _)) in self.mounts.iter().enumerate() {
            let fail = |call: u32| move |error: Errno| Failure::new(Stage::StepMount, index as u32 * 8 + call, error);
            let made = match mount {
                Prepared::Directory { parent, name } => {
                    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
                    let parent = rustix::fs::open(parent.as_c_str(), flags, Mode::empty()).map_err(fail(0))?;
                    let source = rustix::fs::openat(&parent, name.as_c_str(), flags | OFlags::NOFOLLOW, Mode::empty())
                        .map_err(fail(0))?;
                    let clone = rustix::mount::open_tree(
                        source.as_fd(),
                        c"",
                        OpenTreeFlags::OPEN_TREE_CLONE
                            | OpenTreeFlags::OPEN_TREE_CLOEXEC
                            | OpenTreeFlags::AT_EMPTY_PATH,
                    )
                    .map_err(fail(0))?;
                    set_attributes(&clone, MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV)
                        .map_err(fail(1))?;
                    clone
                }
                Prepared::Tmpfs { size } => {
                    let filesystem = rustix::mount::fsopen(c"tmpfs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(fail(2))?;
                    if let Some(size) = size {
                        rustix::mount::fsconfig_set_string(&filesystem, c"size", size.as_c_str())
                            .map_err(|error| fail(3)(error).with_log(&filesystem))?;
                    }
                    rustix::mount::fsconfig_create(&filesystem)
                        .map_err(|error| fail(4)(error).with_log(&filesystem))?;
                    let attributes = MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV;
                    rustix::mount::fsmount(&filesystem, FsMountFlags::FSMOUNT_CLOEXEC, attributes)
                        .map_err(|error| fail(5)(error).with_log(&filesystem))?
                }
                Prepared::Secret { index: position, staging, size } => {
                    let StepMount::Secret { bytes, uid, gid, mode, .. } = &self.plan[*position] else {
                        unreachable!("prepared from a secret")
                    };
                    secret_file(index, &bytes.0, (*uid, *gid, *mode), staging, size)?
                }
                Prepared::Host { parent, name, directory, attributes } => {
                    let kind = if *directory { OFlags::DIRECTORY } else { OFlags::empty() };
                    let parent = rustix::fs::open(
                        parent.as_c_str(),
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(fail(0))?;
                    let flags = OFlags::PATH | kind | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                    let source = rustix::fs::openat(&parent, name.as_c_str(), flags, Mode::empty()).map_err(fail(1))?;
                    let clone = clone_tree(&source).map_err(fail(2))?;
                    set_attributes(&clone, *attributes).map_err(fail(3))?;
                    clone
                }
                Prepared::Image { index: position, merged, path, directory, attributes } => {
                    let StepMount::Image { overlay, .. } = &self.plan[*position] else {
                        unreachable!("prepared from an image bind")
                    };
                    // The overlay attaches at `merged`, relative to the store root (the working
                    // directory here), in this namespace only.
                    overlay.mount().map_err(|failure| failure.at(Stage::StepMount, index as u32 * 8))?;
                    let root = rustix::fs::open(
                        merged.as_c_str(),
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(fail(1))?;
                    let kind = if *directory { OFlags::DIRECTORY } else { OFlags::empty() };
                    let source = rustix::fs::openat2(
                        &root,
                        path.as_c_str(),
                        OFlags::PATH | kind | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
                    )
                    .map_err(fail(2))?;
                    let clone = clone_tree(&source).map_err(fail(3))?;
                    set_attributes(&clone, *attributes).map_err(fail(4))?;
                    clone
                }
            };
            detached[index] = Some(made);
        }
        Ok(detached)
    }

    /// Step 2 in the child (in the new root, after the runner's mounts): each detached mount
    /// onto its target, opened without following any symlink. Raw syscalls only.
    // The failure is returned by value: the child must not allocate a Box.
    #[allow(clippy::result_large_err)]
    pub(crate) fn attach(&self, detached: &[Option<OwnedFd>; MAX_STEP_MOUNTS]) -> Result<(), Failure> {
        for (index, (prepared, target)) in self.mounts.iter().enumerate() {
            let fail = |call: u32| move |error: Errno| Failure::new(Stage::StepMount, index as u32 * 8 + call, error);
            let Some(mount) = &detached[index] else { continue };
            // A secret's, a host file's and a socket's target is a file; every other one a
            // directory.
            let file = match prepared {
                Prepared::Secret { .. } => true,
                Prepared::Host { directory, .. } | Prepared::Image { directory, .. } => !directory,
                Prepared::Directory { .. } | Prepared::Tmpfs { .. } => false,
            };
            let kind = if file { OFlags::empty() } else { OFlags::DIRECTORY };
            let directory = rustix::fs::openat2(
                rustix::fs::CWD,
                target.as_c_str(),
                OFlags::PATH | kind | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
            )
            .map_err(fail(6))?;
            rustix::mount::move_mount(
                mount.as_fd(),
                c"",
                directory.as_fd(),
                c"",
                MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
            )
            .map_err(fail(7))?;
        }
        Ok(())
    }

    /// The call a [`Stage::StepMount`] failure is about, with its arguments.
    pub(crate) fn describe(&self, detail: u32) -> String {
        let (index, call) = ((detail / 8) as usize, (detail % 8) as usize);
        let calls = match self.plan.get(index) {
            Some(StepMount::Secret { .. }) => SECRET_CALLS,
            Some(StepMount::Host { .. }) => HOST_CALLS,
            Some(StepMount::Image { .. }) => IMAGE_CALLS,
            _ => CALLS,
        };
        let call = calls.get(call).copied().unwrap_or("mounting");
        match self.plan.get(index) {
            Some(StepMount::Directory { parent, name, target }) => {
                format!("{call} for the mount of {:?} on {target}", parent.join(name))
            }
            Some(StepMount::Tmpfs { target, size }) => match size {
                Some(size) => format!("{call} for the tmpfs (size={size}) on {target}"),
                None => format!("{call} for the tmpfs on {target}"),
            },
            // Never the bytes.
            Some(StepMount::Secret { target, staging, .. }) => {
                format!("{call} for the secret on {target} (staged in {staging:?})")
            }
            Some(StepMount::Host { parent, name, target, .. }) => {
                format!("{call} for the bind of {:?} on {target}", parent.join(name))
            }
            Some(StepMount::Image { overlay, path, target, .. }) => {
                format!("{call} for the bind of /{path} on {target} (overlay {})", overlay.summary())
            }
            None => format!("{call} for step mount {index}"),
        }
    }
}

/// A secret's file, made in the child (before `pivot_root`): a tmpfs of its own attached on
/// `staging` (in the child's mount namespace only: `open_tree` clones only attached mounts),
/// the file written there with its owner and mode, and a detached read-only bind of that file.
/// Raw syscalls only.
// The failure is returned by value: the child must not allocate a Box.
#[allow(clippy::result_large_err)]
fn secret_file(
    mount: usize,
    bytes: &[u8],
    (uid, gid, mode): (u32, u32, u32),
    staging: &CString,
    size: &CString,
) -> Result<OwnedFd, Failure> {
    let fail = |call: u32| move |error: Errno| Failure::new(Stage::StepMount, mount as u32 * 8 + call, error);
    let filesystem = rustix::mount::fsopen(c"tmpfs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(fail(0))?;
    rustix::mount::fsconfig_set_string(&filesystem, c"size", size.as_c_str())
        .map_err(|error| fail(0)(error).with_log(&filesystem))?;
    rustix::mount::fsconfig_set_string(&filesystem, c"mode", c"0700")
        .map_err(|error| fail(0)(error).with_log(&filesystem))?;
    rustix::mount::fsconfig_create(&filesystem).map_err(|error| fail(0)(error).with_log(&filesystem))?;
    let attributes =
        MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV | MountAttrFlags::MOUNT_ATTR_NOEXEC;
    let tmpfs = rustix::mount::fsmount(&filesystem, FsMountFlags::FSMOUNT_CLOEXEC, attributes)
        .map_err(|error| fail(1)(error).with_log(&filesystem))?;
    rustix::mount::move_mount(
        tmpfs.as_fd(),
        c"",
        rustix::fs::CWD,
        staging.as_c_str(),
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(fail(2))?;
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let file = rustix::fs::openat(&tmpfs, c"secret", flags, Mode::from_raw_mode(0o600)).map_err(fail(3))?;
    let mut written = 0;
    while written < bytes.len() {
        match rustix::io::write(&file, &bytes[written..]) {
            Ok(0) => return Err(fail(3)(Errno::IO)),
            Ok(count) => written += count,
            Err(Errno::INTR) => continue,
            Err(error) => return Err(fail(3)(error)),
        }
    }
    rustix::fs::fchown(&file, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))
        .map_err(fail(3))?;
    rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).map_err(fail(3))?;
    drop(file);
    let clone =
        rustix::mount::open_tree(&tmpfs, c"secret", OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC)
            .map_err(fail(4))?;
    let read_only = MountAttrFlags::MOUNT_ATTR_RDONLY
        | MountAttrFlags::MOUNT_ATTR_NOSUID
        | MountAttrFlags::MOUNT_ATTR_NODEV
        | MountAttrFlags::MOUNT_ATTR_NOEXEC;
    set_attributes(&clone, read_only).map_err(fail(5))?;
    Ok(clone)
}

/// `open_tree(source, "", OPEN_TREE_CLONE | AT_EMPTY_PATH)`: a detached bind of what `source`
/// (an `O_PATH` descriptor) is. A raw syscall.
fn clone_tree(source: &OwnedFd) -> Result<OwnedFd, Errno> {
    rustix::mount::open_tree(
        source.as_fd(),
        c"",
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_EMPTY_PATH,
    )
}

/// `mount_setattr(mount, "", AT_EMPTY_PATH, {attr_set: attributes})`. A raw syscall.
fn set_attributes(mount: &OwnedFd, attributes: MountAttrFlags) -> Result<(), Errno> {
    let attributes = MountAttr { attr_set: u64::from(attributes.bits()), attr_clr: 0, propagation: 0, userns_fd: 0 };
    // SAFETY: a raw syscall on a descriptor we own, an empty C string and a `struct
    // mount_attr` of the size passed.
    let result = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            std::os::fd::AsRawFd::as_raw_fd(mount),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attributes as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if result != 0 { Err(last_errno()) } else { Ok(()) }
}

fn last_errno() -> Errno {
    Errno::from_raw_os_error(io::Error::last_os_error().raw_os_error().unwrap_or(0))
}
