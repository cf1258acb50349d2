//! What a sandbox is asked to do ([`SandboxPlan`]: the overlay, the mounts, the process), how
//! the command ended ([`Termination`]), and the [`Sandbox`] trait that runs a plan.
//!
//! The trait is the seam between the caller's decisions and the syscalls: the real
//! implementation is `NamespaceSandbox`; a caller's tests run their logic against a fake that
//! records the plan and writes into the upper directory, without root or namespaces.
//!
//! What this module deliberately is not: the place where a plan is decided (the caller resolves
//! the user, the environment and the mountpoints from the image), or executed (see `child` and
//! `namespace`). It is plain data.

use std::path::PathBuf;

use crate::failure::SandboxError;
use crate::mounts::StepMount;
use crate::overlay::OverlayMount;

/// What the sandbox runs: prepared by the caller, executed by a [`Sandbox`].
#[derive(Debug, Clone)]
pub struct SandboxPlan {
    /// The store root: the working directory of the overlay mount (its paths are relative).
    pub base_dir: PathBuf,
    /// The overlay to mount on `merged`.
    pub overlay: OverlayMount,
    /// The upper directory of the overlay (what a test sandbox writes into; the real one
    /// finds it in `overlay`).
    pub upper: PathBuf,
    /// Where the overlay is attached, then pivoted into.
    pub merged: PathBuf,
    /// Rootless: the caller's (uid, gid), mapped to root in a new user namespace.
    pub rootless: Option<(u32, u32)>,
    /// The network namespace of the command.
    pub network: SandboxNetwork,
    /// Which of the caller's mounts to make.
    pub mounts: SandboxMounts,
    /// The hostname inside (in a new UTS namespace).
    pub hostname: String,
    /// The command, and who it runs as.
    pub process: ProcessSpec,
    /// The command's resource limits (its own cgroups).
    pub limits: ResourceLimits,
}

/// The network namespace a command runs in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SandboxNetwork {
    /// A new one with only `lo`: no network.
    #[default]
    None,
    /// A new one with outbound access through this `slirp4netns` program (see
    /// [`slirp4netns`](crate::slirp4netns)), the host's loopback out of reach; the caller
    /// points the command's `/etc/resolv.conf` at [`ISOLATED_NAMESERVER`](crate::ISOLATED_NAMESERVER).
    Isolated {
        /// The program, found by the caller before the step runs.
        slirp4netns: PathBuf,
    },
    /// The host's own.
    Host,
}

/// The resource limits of a command, each `None` for no limit of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceLimits {
    /// The most processes (and threads) the command may have at once (`pids.max`).
    pub pids: Option<u64>,
    /// The most bytes of memory its processes may use together (`memory.max`, or
    /// `memory.limit_in_bytes` on cgroup v1) before the kernel kills one of them.
    pub memory: Option<u64>,
}

/// Which of the runner's own mounts to make (the mountpoints exist in the merged tree).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxMounts {
    /// A new proc (of the sandbox's pid namespace) on `/proc`.
    pub proc: bool,
    /// A tmpfs `/dev` with the usual devices bound from the host, `pts`, `shm` and links.
    pub dev: bool,
    /// The generated `/etc/hosts` to bind over the image's.
    pub hosts: Option<PathBuf>,
    /// The generated `/etc/resolv.conf` to bind over the image's.
    pub resolv_conf: Option<PathBuf>,
    /// The step's own mounts (cache directories, tmpfs), in order, after the runner's.
    pub step: Vec<StepMount>,
}

/// The process a sandbox starts, resolved by the caller from the image config and the step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// The arguments, `argv[0]` first.
    pub argv: Vec<String>,
    /// `NAME=value`, in the order the config and the step gave them.
    pub env: Vec<String>,
    /// Absolute, normalised (`/` or `/app/src`); created (as root) when missing.
    pub workdir: String,
    /// The user it runs as.
    pub uid: u32,
    /// Its primary group.
    pub gid: u32,
    /// Supplementary groups, sorted, each once: as runc, the image's groups that name the user,
    /// without the primary group.
    pub groups: Vec<u32>,
    /// Paths to `execve`, in order, until one is found (one unless `argv[0]` is a bare name).
    pub exec_candidates: Vec<String>,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
}

/// Runs a [`SandboxPlan`]. The real one is `NamespaceSandbox`; tests of a caller's decisions
/// use a fake that writes into the upper directory.
pub trait Sandbox: Sync {
    /// Runs the command, passing its output (stdout and stderr, interleaved) to `output` as it
    /// comes, and returns how it ended.
    fn run(&self, plan: &SandboxPlan, output: &mut dyn FnMut(&[u8])) -> Result<Termination, SandboxError>;
}
