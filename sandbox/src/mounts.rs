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
//! What this module deliberately is not: where a cache directory lives or how it is shared and
//! locked (the caller's), or the place for secrets and bind mounts of images (later kinds).

use std::ffi::CString;
use std::io;
use std::path::PathBuf;

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags};

use crate::failure::{Failure, SandboxError, Stage};

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
}

impl StepMount {
    /// Where it is mounted.
    pub fn target(&self) -> &str {
        match self {
            StepMount::Directory { target, .. } | StepMount::Tmpfs { target, .. } => target,
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
}

/// The step's mounts, ready for the child.
pub(crate) struct PreparedMounts {
    mounts: Vec<(Prepared, CString)>,
    /// The plan's mounts, for describing a failure.
    described: Vec<StepMount>,
}

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

impl PreparedMounts {
    /// Opens every host directory (relative to its parent, `O_NOFOLLOW`) and prepares every
    /// string. Errors name the mount's target and the path.
    pub(crate) fn new(mounts: &[StepMount]) -> Result<PreparedMounts, SandboxError> {
        if mounts.len() > MAX_STEP_MOUNTS {
            return Err(SandboxError::StepMount {
                action: format!("make {} mounts (at most {MAX_STEP_MOUNTS})", mounts.len()),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
        let mut prepared = Vec::with_capacity(mounts.len());
        for mount in mounts {
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
            };
            prepared.push((made, target));
        }
        Ok(PreparedMounts { mounts: prepared, described: mounts.to_vec() })
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
                    let attributes = MountAttr {
                        attr_set: u64::from(
                            (MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV).bits(),
                        ),
                        attr_clr: 0,
                        propagation: 0,
                        userns_fd: 0,
                    };
                    // SAFETY: a raw syscall on a descriptor we own, an empty C string and a
                    // `struct mount_attr` of the size passed.
                    let result = unsafe {
                        libc::syscall(
                            libc::SYS_mount_setattr,
                            std::os::fd::AsRawFd::as_raw_fd(&clone),
                            c"".as_ptr(),
                            libc::AT_EMPTY_PATH as libc::c_uint,
                            &attributes as *const MountAttr,
                            std::mem::size_of::<MountAttr>(),
                        )
                    };
                    if result != 0 {
                        return Err(fail(1)(last_errno()));
                    }
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
        for (index, (_, target)) in self.mounts.iter().enumerate() {
            let fail = |call: u32| move |error: Errno| Failure::new(Stage::StepMount, index as u32 * 8 + call, error);
            let Some(mount) = &detached[index] else { continue };
            let directory = rustix::fs::openat2(
                rustix::fs::CWD,
                target.as_c_str(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
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
        let call = CALLS.get(call).copied().unwrap_or("mounting");
        match self.described.get(index) {
            Some(StepMount::Directory { parent, name, target }) => {
                format!("{call} for the mount of {:?} on {target}", parent.join(name))
            }
            Some(StepMount::Tmpfs { target, size }) => match size {
                Some(size) => format!("{call} for the tmpfs (size={size}) on {target}"),
                None => format!("{call} for the tmpfs on {target}"),
            },
            None => format!("{call} for step mount {index}"),
        }
    }
}

fn last_errno() -> Errno {
    Errno::from_raw_os_error(io::Error::last_os_error().raw_os_error().unwrap_or(0))
}
