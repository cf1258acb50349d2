//! How the sandbox fails: [`SandboxError`] (what the caller gets; a failed call is named in it
//! with its arguments), [`Stage`] (which call of the child failed), and the fixed-size
//! [`Failure`] record the child sends to the parent through a pipe, since between `clone` and
//! `execve` it may not allocate.
//!
//! This is the leaf of the crate: it names the calls but makes none (apart from reading a
//! filesystem context's log into a record), and imports no other module of the crate, so that
//! both the overlay mount and the child's setup can report through it.
//!
//! What it deliberately is not: the place that describes a failed call with its arguments (the
//! child's program and the overlay mount hold those), or a logger (the parent logs).

use std::io;

use rustix::fd::OwnedFd;
use rustix::io::Errno;
use thiserror::Error;

/// Why the sandbox could not run the command at all.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// `clone(2)` refused the namespaces.
    #[error("cannot create the sandbox's namespaces (clone with flags {flags}): {source}{}", hint_text(hint))]
    Clone {
        /// The namespace flags, as `CLONE_NEWNS | CLONE_NEWPID | ...`.
        flags: String,
        /// What `clone` returned.
        source: io::Error,
        /// What the failure most likely means.
        hint: Option<&'static str>,
    },
    /// A call of the child's setup (before `execve`) failed.
    #[error("preparing the sandbox: {action} failed: {source}{}{}", kernel_text(kernel_message), hint_text(hint))]
    Setup {
        /// The call, with its arguments (paths, options, ids).
        action: String,
        /// Its errno.
        source: io::Error,
        /// The last line of the kernel's log of the filesystem context (empty when none).
        kernel_message: String,
        /// What the failure most likely means.
        hint: Option<&'static str>,
    },
    /// No candidate of the command could be executed.
    #[error("cannot execute {program:?} in the image (tried {tried}): {source}")]
    Exec {
        /// `argv[0]`.
        program: String,
        /// The paths tried, comma-separated.
        tried: String,
        /// The most telling errno (a found but refused file over a missing one).
        source: io::Error,
    },
    /// The command failed after its processes hit the sandbox's process limit (a fork bomb, or
    /// a build that needs a higher limit).
    #[error("the command hit its limit of {limit} processes (pids.max of its cgroup) and {ended}")]
    ProcessLimit {
        /// The limit.
        limit: u64,
        /// How it ended (`exited with code 2`, `was killed by signal 9`).
        ended: String,
    },
    /// A step's own mount could not be prepared by the parent (its host directory opened).
    #[error("cannot prepare a RUN mount: {action} failed: {source}")]
    StepMount {
        /// The call, with the mount's target and path.
        action: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The command failed after the kernel killed a process of it for going past its memory
    /// limit.
    #[error(
        "the command hit its memory limit of {} (the kernel's OOM killer ended a process of it in its cgroup) and \
         {ended}",
        bytes_text(*limit)
    )]
    MemoryLimit {
        /// The limit, in bytes.
        limit: u64,
        /// How it ended (`exited with code 137`, `was killed by signal 9`).
        ended: String,
    },
    /// The program that gives a step its isolated network is not installed.
    #[error(
        "a RUN step with network access needs `{program}`, which is not on PATH: install the Debian package \
         `{package}` (apt-get install {package})"
    )]
    NetworkHelperMissing {
        /// The program.
        program: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// The step's isolated network could not be set up.
    #[error("cannot give the command its network with {}: {reason}", program.display())]
    Network {
        /// The program that failed (`slirp4netns`).
        program: std::path::PathBuf,
        /// What went wrong, with what it printed.
        reason: String,
    },
    /// The parent's side (pipes, reading the output, waiting) failed, or the plan holds a
    /// string the kernel cannot take.
    #[error("cannot {action}: {source}")]
    Io {
        /// What the parent was doing.
        action: &'static str,
        /// Why it could not.
        source: io::Error,
    },
}

/// `64 MiB (67108864 bytes)`, or just the bytes when they are not a whole number of MiB.
fn bytes_text(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB ({bytes} bytes)", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

fn hint_text(hint: &Option<&'static str>) -> String {
    hint.map(|hint| format!(" ({hint})")).unwrap_or_default()
}

fn kernel_text(message: &str) -> String {
    if message.is_empty() { String::new() } else { format!(" [kernel: {message}]") }
}

/// Which call of the child failed, in the order the child makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Stage {
    /// The builder exited before the child started (not reported: nobody is listening).
    ParentGone,
    /// `prctl(PR_SET_PDEATHSIG, SIGKILL)`.
    ParentDeathSignal,
    /// Pointing stdin at `/dev/null` and stdout/stderr at the output pipe.
    Stdio,
    /// Joining the command's cgroup (writing `0` to its `cgroup.procs`).
    JoinCgroup,
    /// `setsid()`: a session of its own, without a controlling terminal.
    Setsid,
    /// `write(/proc/self/setgroups, "deny")` (rootless).
    SetgroupsDeny,
    /// `write(/proc/self/uid_map)` (rootless).
    UidMap,
    /// `write(/proc/self/gid_map)` (rootless).
    GidMap,
    /// Making every mount private.
    MakePrivate,
    /// `sethostname`.
    Hostname,
    /// `chdir` to the store root the overlay's paths are relative to.
    ChdirBase,
    /// `fsopen("overlay")`.
    OverlayOpen,
    /// One `fsconfig` option of the overlay (the detail is its index).
    OverlayOption,
    /// `fsconfig(FSCONFIG_CMD_CREATE)` of the overlay.
    OverlayCreate,
    /// `fsmount` of the overlay.
    OverlayMount,
    /// `move_mount` of the overlay onto the merged directory.
    OverlayAttach,
    /// The classic `mount(2)` of the overlay (kernels before 6.8).
    OverlayClassic,
    /// `open_tree(OPEN_TREE_CLONE)` of a host file to bind (the detail is the bind).
    OpenBind,
    /// `chdir` to the merged directory.
    ChdirMerged,
    /// `pivot_root` into the merged directory.
    PivotRoot,
    /// Detaching the old root.
    DetachOldRoot,
    /// `chdir("/")` in the new root.
    ChdirRoot,
    /// Mounting `/proc` (the detail is the call).
    MountProc,
    /// Binding a part of `/proc` read-only onto itself (the detail is the path).
    ReadonlyProc,
    /// Masking a part of `/proc` (the detail is the path: files, then directories).
    MaskProc,
    /// Mounting the tmpfs `/dev`.
    MountDev,
    /// Creating a device's mountpoint in `/dev` (the detail is the bind).
    DevMountpoint,
    /// `move_mount` of a bind (the detail is the bind).
    AttachBind,
    /// Mounting `/dev/pts`.
    MountDevPts,
    /// Mounting `/dev/shm`.
    MountShm,
    /// A link in `/dev` (the detail is the link).
    DevLink,
    /// Creating the working directory (the detail is the prefix).
    Workdir,
    /// `chdir` to the working directory.
    ChdirWorkdir,
    /// Waiting for the parent to start the command's network (reading the alive pipe).
    WaitNetwork,
    /// `setrlimit(RLIMIT_NPROC)`, the process limit without a cgroup (rootless).
    ProcessRlimit,
    /// Dropping a capability from the bounding set (the detail is the capability).
    DropCapabilities,
    /// Setting the other capability sets (the detail is the call: keep-caps off, ambient
    /// cleared, capget, capset for root, capset to nothing after a switch to another user).
    CapabilitySets,
    /// `keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)`.
    SessionKeyring,
    /// Installing a seccomp filter (the detail is the filter).
    Seccomp,
    /// `setgroups`.
    SetGroups,
    /// `setgid`.
    SetGid,
    /// `setuid`.
    SetUid,
    /// Marking inherited descriptors close-on-exec.
    CloseDescriptors,
    /// `execve` (the detail is the candidate).
    Exec,
    /// A step's own mount (the detail is `mount * 8 + call`, see `mounts`).
    StepMount,
}

impl Stage {
    /// Every stage, in declaration order (`Stage::ALL[stage as usize] == stage`).
    pub(crate) const ALL: [Stage; 45] = [
        Stage::ParentGone,
        Stage::ParentDeathSignal,
        Stage::Stdio,
        Stage::JoinCgroup,
        Stage::Setsid,
        Stage::SetgroupsDeny,
        Stage::UidMap,
        Stage::GidMap,
        Stage::MakePrivate,
        Stage::Hostname,
        Stage::ChdirBase,
        Stage::OverlayOpen,
        Stage::OverlayOption,
        Stage::OverlayCreate,
        Stage::OverlayMount,
        Stage::OverlayAttach,
        Stage::OverlayClassic,
        Stage::OpenBind,
        Stage::ChdirMerged,
        Stage::PivotRoot,
        Stage::DetachOldRoot,
        Stage::ChdirRoot,
        Stage::MountProc,
        Stage::ReadonlyProc,
        Stage::MaskProc,
        Stage::MountDev,
        Stage::DevMountpoint,
        Stage::AttachBind,
        Stage::MountDevPts,
        Stage::MountShm,
        Stage::DevLink,
        Stage::Workdir,
        Stage::ChdirWorkdir,
        Stage::WaitNetwork,
        Stage::ProcessRlimit,
        Stage::DropCapabilities,
        Stage::CapabilitySets,
        Stage::SessionKeyring,
        Stage::Seccomp,
        Stage::SetGroups,
        Stage::SetGid,
        Stage::SetUid,
        Stage::CloseDescriptors,
        Stage::Exec,
        Stage::StepMount,
    ];
}

/// Bytes of the kernel's mount log a failure record carries.
const MESSAGE_CAPACITY: usize = 240;
/// stage, detail, errno, message length (4 bytes each), message.
pub(crate) const RECORD_SIZE: usize = 16 + MESSAGE_CAPACITY;

/// A failed call of the child, sent to the parent as a fixed-size record.
#[derive(Clone, Copy)]
pub(crate) struct Failure {
    pub(crate) stage: Stage,
    /// Which one of a list (an overlay option, a bind, a PATH candidate).
    pub(crate) detail: u32,
    pub(crate) errno: i32,
    message: [u8; MESSAGE_CAPACITY],
    message_length: usize,
}

impl std::fmt::Debug for Failure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Failure")
            .field("stage", &self.stage)
            .field("detail", &self.detail)
            .field("errno", &self.errno)
            .field("message", &self.message())
            .finish()
    }
}

impl Failure {
    pub(crate) fn new(stage: Stage, detail: u32, errno: Errno) -> Failure {
        Failure { stage, detail, errno: errno.raw_os_error(), message: [0; MESSAGE_CAPACITY], message_length: 0 }
    }

    /// The same failure (errno and kernel message) reported at another stage: a call shared
    /// by two stages (the overlay of a bind mount) is described by the one that made it.
    pub(crate) fn at(self, stage: Stage, detail: u32) -> Failure {
        Failure { stage, detail, ..self }
    }

    /// Adds the last message of the kernel's log of a filesystem context (what `mount(8)`
    /// shows after "see dmesg"). No allocation: it is read straight into the record.
    pub(crate) fn with_log(mut self, filesystem: &OwnedFd) -> Failure {
        let mut buffer = [0u8; MESSAGE_CAPACITY];
        // Each read returns one message; the last one names the problem.
        for _ in 0..8 {
            match rustix::io::read(filesystem, &mut buffer[..]) {
                Ok(length) if length > 0 => {
                    self.message[..length].copy_from_slice(&buffer[..length]);
                    self.message_length = length;
                }
                _ => break,
            }
        }
        self
    }

    pub(crate) fn message(&self) -> String {
        String::from_utf8_lossy(&self.message[..self.message_length]).trim().to_owned()
    }

    pub(crate) fn encode(&self) -> [u8; RECORD_SIZE] {
        let mut record = [0u8; RECORD_SIZE];
        record[0..4].copy_from_slice(&(self.stage as u32).to_le_bytes());
        record[4..8].copy_from_slice(&self.detail.to_le_bytes());
        record[8..12].copy_from_slice(&self.errno.to_le_bytes());
        record[12..16].copy_from_slice(&(self.message_length as u32).to_le_bytes());
        record[16..16 + self.message_length].copy_from_slice(&self.message[..self.message_length]);
        record
    }

    pub(crate) fn decode(record: &[u8; RECORD_SIZE]) -> Option<Failure> {
        let word = |at: usize| u32::from_le_bytes([record[at], record[at + 1], record[at + 2], record[at + 3]]);
        let stage = *Stage::ALL.get(word(0) as usize)?;
        let message_length = (word(12) as usize).min(MESSAGE_CAPACITY);
        let mut message = [0u8; MESSAGE_CAPACITY];
        message[..message_length].copy_from_slice(&record[16..16 + message_length]);
        Some(Failure { stage, detail: word(4), errno: word(8) as i32, message, message_length })
    }
}

/// What a failure most likely means, for the error message.
pub(crate) fn hint(stage: Stage, errno: Errno, rootless: bool) -> Option<&'static str> {
    match (stage, errno, rootless) {
        (Stage::SetgroupsDeny | Stage::UidMap | Stage::GidMap, _, _) => {
            Some("the kernel refused to map root to the calling user in a new user namespace")
        }
        (Stage::OverlayOption, Errno::INVAL, _) => {
            Some("this kernel's overlayfs may lack `lowerdir+` (Linux 6.8 or newer)")
        }
        (Stage::OverlayOpen | Stage::OverlayCreate | Stage::OverlayMount, Errno::PERM, true) => {
            Some("mounting overlayfs in a user namespace needs Linux 5.11 or newer")
        }
        (Stage::Seccomp, Errno::INVAL | Errno::NOSYS, _) => Some(
            "this kernel lacks seccomp filters (CONFIG_SECCOMP_FILTER); the RUN sandbox does not run commands \
             without them",
        ),
        (Stage::StepMount, Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV, _) => {
            Some("a mount's target must be a directory of the image, reached without symlinks")
        }
        (Stage::SetUid | Stage::SetGid, Errno::INVAL, true) => {
            Some("a rootless run maps only root (the calling user); other users and groups do not exist in it")
        }
        (_, Errno::PERM | Errno::ACCESS, false) => Some("the sandbox needs CAP_SYS_ADMIN: run as root"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_records_survive_the_pipe() {
        let mut failure = Failure::new(Stage::OverlayOption, 3, Errno::INVAL);
        failure.message[..11].copy_from_slice(b"e overlay: ");
        failure.message_length = 11;
        let decoded = Failure::decode(&failure.encode()).unwrap();
        assert_eq!((decoded.stage, decoded.detail, decoded.errno), (Stage::OverlayOption, 3, libc::EINVAL));
        assert_eq!(decoded.message(), "e overlay:");
        let mut garbage = [0u8; RECORD_SIZE];
        garbage[0] = 200;
        assert!(Failure::decode(&garbage).is_none(), "an unknown stage is not a failure");
        for (position, stage) in Stage::ALL.iter().enumerate() {
            assert_eq!(*stage as usize, position, "Stage::ALL is in declaration order");
        }
    }

    #[test]
    fn limit_and_network_errors_name_the_limit_and_the_package() {
        let missing = SandboxError::NetworkHelperMissing { program: "slirp4netns", package: "slirp4netns" };
        assert_eq!(
            missing.to_string(),
            "a RUN step with network access needs `slirp4netns`, which is not on PATH: install the Debian package \
             `slirp4netns` (apt-get install slirp4netns)"
        );
        let memory = SandboxError::MemoryLimit { limit: 3 << 30, ended: "was killed by signal 9".into() };
        assert!(memory.to_string().starts_with("the command hit its memory limit of 3072 MiB (3221225472 bytes)"));
        assert_eq!(bytes_text(1000), "1000 bytes");
    }

    #[test]
    fn hints_name_what_is_missing() {
        assert!(hint(Stage::UidMap, Errno::PERM, true).unwrap().contains("map root to the calling user"));
        assert!(hint(Stage::SetUid, Errno::INVAL, true).unwrap().contains("maps only root"));
        assert!(hint(Stage::OverlayOption, Errno::INVAL, false).unwrap().contains("lowerdir+"));
        assert_eq!(hint(Stage::Exec, Errno::NOENT, false), None);
        assert!(hint(Stage::Seccomp, Errno::INVAL, false).unwrap().contains("CONFIG_SECCOMP_FILTER"));
    }
}
