//! The child of the sandbox: everything between `clone` and `execve`. [`ChildProgram`] is
//! prepared by the parent (every string a `CString`, every argv/envp pointer array built);
//! [`child_main`] then runs only raw syscalls on it: no allocation, no locks, nothing a thread
//! of the parent might have held at the time of the clone. In order, the child:
//!
//! 1. asks for SIGKILL when the builder thread dies (and quits if it already has), resets
//!    signal dispositions and mask, points stdin at `/dev/null` and stdout/stderr at the
//!    output pipe, joins the command's cgroups, and starts a session of its own (`setsid`: no controlling terminal, so the
//!    builder's terminal and `/dev/tty` are out of reach);
//! 2. (rootless) maps root to the caller in `/proc/self/{setgroups,uid_map,gid_map}`;
//! 3. makes every mount private (nothing propagates back to the host), sets the hostname;
//! 4. mounts the overlay (`nodev`, [`OverlayMount`](crate::OverlayMount)), opens detached bind
//!    mounts of the host files it needs (`/dev/null` & co., the generated `hosts` and
//!    `resolv.conf`, `/dev/null` again for each masked `/proc` file), and mounts a new `/proc`
//!    on the merged tree (before the host's proc goes out of sight: a user namespace may mount
//!    proc only while one is fully visible);
//! 5. `pivot_root`s into the merged tree and detaches the old root: from here no host path is
//!    reachable; makes `/proc/sys`, `/proc/sysrq-trigger`, `/proc/irq`, `/proc/bus` and
//!    `/proc/fs` read-only and masks runc's paths (`/proc/kcore`, `/proc/keys`, timers, ...);
//! 6. mounts a `nodev` tmpfs `/dev` with the device binds, `pts`, `shm` and the usual links, and
//!    the `hosts`/`resolv.conf` binds; then the step's own mounts (cache directories and tmpfs,
//!    detached in step 4, see `mounts`);
//! 7. creates and enters the working directory, waits for the parent to bring its network up
//!    (isolated networking), sets `RLIMIT_NPROC` (rootless without a cgroup), joins a fresh
//!    session keyring, installs the
//!    seccomp filter (Docker's default profile, see `seccomp`), sets the capability sets as Docker does
//!    (bounding, effective and permitted: Docker's default set for root, nothing for another
//!    user; inheritable and ambient empty), switches to the step's user and groups, arms the
//!    parent-death signal again (a credential change clears it), marks every inherited
//!    descriptor close-on-exec;
//! 8. `execve`s the command (trying each `PATH` candidate, as `execvp` does).
//!
//! A failing step writes a fixed-size [`Failure`] record (which call, its errno, the kernel's
//! mount log line) to a close-on-exec pipe and exits; [`ChildProgram::describe`] names the call
//! with its arguments for the parent's error. A successful `execve` closes that pipe.
//!
//! What this module deliberately is not: the parent's side (`clone`, reading the output,
//! waiting, turning a record into an error: see `namespace`), the overlay's options (see
//! `overlay`), or a full container runtime (no CPU or IO limits; the cgroups are the parent's,
//! see `limits`; the network helper too, see `network`).

use std::convert::Infallible;
use std::ffi::{CStr, CString};
use std::io;
use std::os::raw::c_char;

use rustix::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MountPropagationFlags, MoveMountFlags, OpenTreeFlags,
    UnmountFlags,
};
use rustix::process::Signal;
use rustix::thread::CapabilitySet;

use crate::failure::{Failure, SandboxError, Stage};
use crate::mounts::PreparedMounts;
use crate::plan::SandboxPlan;

/// The device nodes of the sandbox's `/dev`, bound from the host's.
const DEVICES: [&CStr; 6] = [c"/dev/null", c"/dev/zero", c"/dev/full", c"/dev/random", c"/dev/urandom", c"/dev/tty"];
/// Links in `/dev`: (target, link).
const DEV_LINKS: [(&CStr, &CStr); 5] = [
    (c"pts/ptmx", c"/dev/ptmx"),
    (c"/proc/self/fd", c"/dev/fd"),
    (c"/proc/self/fd/0", c"/dev/stdin"),
    (c"/proc/self/fd/1", c"/dev/stdout"),
    (c"/proc/self/fd/2", c"/dev/stderr"),
];
/// At most: the devices, `hosts`, `resolv.conf`.
const MAX_BINDS: usize = DEVICES.len() + 2;

/// Parts of `/proc` made read-only (Docker's and runc's `readonlyPaths`): the kernel's
/// tunables (`/proc/sys/kernel/core_pattern` would run a program of the step's choosing as
/// root on the host), the magic SysRq trigger, interrupt affinities, bus and filesystem knobs.
pub(crate) const READONLY_PROC: [&CStr; 5] =
    [c"/proc/bus", c"/proc/fs", c"/proc/irq", c"/proc/sys", c"/proc/sysrq-trigger"];
/// Files of `/proc` hidden behind the host's `/dev/null` (Docker's `maskedPaths` that are
/// files): kernel memory, every keyring's description, timers and scheduler internals.
pub(crate) const MASKED_PROC_FILES: [&CStr; 7] = [
    c"/proc/interrupts",
    c"/proc/kcore",
    c"/proc/keys",
    c"/proc/latency_stats",
    c"/proc/timer_list",
    c"/proc/timer_stats",
    c"/proc/sched_debug",
];
/// Directories of `/proc` hidden under an empty read-only tmpfs (Docker's `maskedPaths` that
/// are directories). The sandbox mounts no `/sys`, so Docker's `/sys/firmware` and
/// `/sys/devices/virtual/powercap` are out of sight already.
pub(crate) const MASKED_PROC_DIRECTORIES: [&CStr; 3] = [c"/proc/acpi", c"/proc/asound", c"/proc/scsi"];

/// `keyctl(2)`'s operation that gives the caller a new anonymous session keyring.
const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;

/// The capabilities a RUN command keeps: Docker's default set. Everything else (mounting,
/// modules, raw IO, the clock, ...) is dropped from the bounding set before `execve`.
const KEPT_CAPABILITIES: CapabilitySet = CapabilitySet::CHOWN
    .union(CapabilitySet::DAC_OVERRIDE)
    .union(CapabilitySet::FSETID)
    .union(CapabilitySet::FOWNER)
    .union(CapabilitySet::MKNOD)
    .union(CapabilitySet::NET_RAW)
    .union(CapabilitySet::SETGID)
    .union(CapabilitySet::SETUID)
    .union(CapabilitySet::SETFCAP)
    .union(CapabilitySet::SETPCAP)
    .union(CapabilitySet::NET_BIND_SERVICE)
    .union(CapabilitySet::SYS_CHROOT)
    .union(CapabilitySet::KILL)
    .union(CapabilitySet::AUDIT_WRITE);

/// A host file bound into the sandbox.
struct Bind {
    source: CString,
    /// Inside the sandbox (absolute).
    target: &'static CStr,
    /// A device node whose mountpoint file is created in the tmpfs `/dev` first.
    device: bool,
}

/// Everything the child needs, prepared before `clone` (the child allocates nothing).
pub(crate) struct ChildProgram<'a> {
    pub(crate) plan: &'a SandboxPlan,
    base_dir: CString,
    merged: CString,
    id_maps: Option<(Vec<u8>, Vec<u8>)>,
    binds: Vec<Bind>,
    devpts_options: &'static CStr,
    workdir_prefixes: Vec<CString>,
    workdir: CString,
    groups: Vec<rustix::process::Gid>,
    /// Own the strings `argv_pointers` and `env_pointers` point into.
    _argv: Vec<CString>,
    _env: Vec<CString>,
    exec_candidates: Vec<CString>,
    seccomp: &'static crate::seccomp::Programs,
    /// The files to write `0` to, to join the command's cgroups (`tasks` on v1,
    /// `cgroup.procs` on v2).
    pub(crate) cgroup_joins: Vec<CString>,
    /// Wait for the parent's byte on the alive pipe before the command (its network is being
    /// set up).
    pub(crate) wait_for_network: bool,
    /// `RLIMIT_NPROC` to set in the command's user namespace (rootless, no cgroup).
    pub(crate) nproc_limit: Option<u64>,
    argv_pointers: Vec<*const c_char>,
    env_pointers: Vec<*const c_char>,
    /// The step's own mounts (see `mounts`).
    step_mounts: PreparedMounts<'a>,
}

fn c_string(text: &str) -> Result<CString, SandboxError> {
    CString::new(text).map_err(|_| SandboxError::Io {
        action: "pass a string with a NUL byte to the sandbox",
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

fn c_path(path: &std::path::Path) -> Result<CString, SandboxError> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| SandboxError::Io {
        action: "pass a path with a NUL byte to the sandbox",
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

impl<'a> ChildProgram<'a> {
    /// Prepares every string and pointer array the child uses; fails on a NUL byte only.
    pub(crate) fn new(plan: &'a SandboxPlan) -> Result<ChildProgram<'a>, SandboxError> {
        let process = &plan.process;
        let mut binds = Vec::new();
        if plan.mounts.dev {
            for device in DEVICES {
                binds.push(Bind { source: device.to_owned(), target: device, device: true });
            }
        }
        if let Some(hosts) = &plan.mounts.hosts {
            binds.push(Bind { source: c_path(hosts)?, target: c"/etc/hosts", device: false });
        }
        if let Some(resolv_conf) = &plan.mounts.resolv_conf {
            binds.push(Bind { source: c_path(resolv_conf)?, target: c"/etc/resolv.conf", device: false });
        }
        debug_assert!(binds.len() <= MAX_BINDS, "at most the devices, hosts and resolv.conf are bound");
        let mut workdir_prefixes = Vec::new();
        let mut prefix = String::new();
        for component in process.workdir.split('/').filter(|component| !component.is_empty()) {
            prefix.push('/');
            prefix.push_str(component);
            workdir_prefixes.push(c_string(&prefix)?);
        }
        let argv = process.argv.iter().map(|argument| c_string(argument)).collect::<Result<Vec<_>, _>>()?;
        let env = process.env.iter().map(|entry| c_string(entry)).collect::<Result<Vec<_>, _>>()?;
        let exec_candidates =
            process.exec_candidates.iter().map(|candidate| c_string(candidate)).collect::<Result<Vec<_>, _>>()?;
        // The pointers point into the CStrings' heap buffers, which stay put when the vectors
        // holding them move.
        let argv_pointers = argv.iter().map(|argument| argument.as_ptr()).chain([std::ptr::null()]).collect();
        let env_pointers = env.iter().map(|entry| entry.as_ptr()).chain([std::ptr::null()]).collect();
        Ok(ChildProgram {
            plan,
            base_dir: c_path(&plan.base_dir)?,
            merged: c_path(&plan.merged)?,
            id_maps: plan
                .rootless
                .map(|(uid, gid)| (format!("0 {uid} 1\n").into_bytes(), format!("0 {gid} 1\n").into_bytes())),
            binds,
            devpts_options: if plan.rootless.is_some() {
                c"newinstance,ptmxmode=0666,mode=0620"
            } else {
                c"newinstance,ptmxmode=0666,mode=0620,gid=5"
            },
            workdir_prefixes,
            workdir: c_string(&process.workdir)?,
            groups: process.groups.iter().map(|gid| rustix::process::Gid::from_raw(*gid)).collect(),
            _argv: argv,
            _env: env,
            exec_candidates,
            seccomp: crate::seccomp::programs()?,
            cgroup_joins: Vec::new(),
            wait_for_network: false,
            nproc_limit: None,
            argv_pointers,
            env_pointers,
            step_mounts: PreparedMounts::new(&plan.mounts.step, &plan.base_dir)?,
        })
    }

    /// The call a failure is about, with its arguments.
    pub(crate) fn describe(&self, failure: &Failure) -> String {
        let detail = failure.detail as usize;
        let bind = |index: usize| {
            self.binds.get(index).map_or_else(
                || format!("bind {index}"),
                |bind| format!("{} -> {}", bind.source.to_string_lossy(), bind.target.to_string_lossy()),
            )
        };
        let process = &self.plan.process;
        match failure.stage {
            Stage::ParentGone => "the builder exited before the command started".to_owned(),
            Stage::ParentDeathSignal if detail == 1 => {
                "prctl(PR_SET_PDEATHSIG, SIGKILL) after the switch to the step's user".to_owned()
            }
            Stage::ParentDeathSignal => "prctl(PR_SET_PDEATHSIG, SIGKILL)".to_owned(),
            Stage::Stdio => "pointing the command's stdin at /dev/null and stdout/stderr at the output pipe".to_owned(),
            Stage::Setsid => "setsid()".to_owned(),
            Stage::JoinCgroup => format!(
                "write({:?}, \"0\") to join the command's cgroup",
                self.cgroup_joins.get(detail).map_or(c"cgroup.procs", CString::as_c_str)
            ),
            Stage::WaitNetwork => "reading the alive pipe while the parent starts the network".to_owned(),
            Stage::ProcessRlimit => format!("setrlimit(RLIMIT_NPROC, {})", self.nproc_limit.unwrap_or(0)),
            Stage::SetgroupsDeny => "write(/proc/self/setgroups, \"deny\")".to_owned(),
            Stage::UidMap => format!(
                "write(/proc/self/uid_map, {:?})",
                self.id_maps
                    .as_ref()
                    .map_or_else(String::new, |(uid_map, _)| String::from_utf8_lossy(uid_map).into_owned())
            ),
            Stage::GidMap => format!(
                "write(/proc/self/gid_map, {:?})",
                self.id_maps
                    .as_ref()
                    .map_or_else(String::new, |(_, gid_map)| String::from_utf8_lossy(gid_map).into_owned())
            ),
            Stage::MakePrivate => "mount(\"/\", MS_REC | MS_PRIVATE)".to_owned(),
            Stage::Hostname => format!("sethostname({:?})", self.plan.hostname),
            Stage::ChdirBase => format!("chdir({:?})", self.plan.base_dir),
            Stage::OverlayOpen
            | Stage::OverlayOption
            | Stage::OverlayCreate
            | Stage::OverlayMount
            | Stage::OverlayAttach
            | Stage::OverlayClassic => self.plan.overlay.describe(failure.stage, failure.detail),
            Stage::OpenBind => format!("open_tree(OPEN_TREE_CLONE) for the bind {}", bind(detail)),
            Stage::ChdirMerged => format!("chdir({:?})", self.plan.merged),
            Stage::PivotRoot => format!("pivot_root into {:?}", self.plan.merged),
            Stage::DetachOldRoot => "umount2(old root, MNT_DETACH)".to_owned(),
            Stage::ChdirRoot => "chdir(\"/\") in the new root".to_owned(),
            Stage::MountProc => {
                let call = [
                    "open(merged/proc, O_PATH | O_NOFOLLOW)",
                    "fsopen(\"proc\")",
                    "fsconfig(FSCONFIG_CMD_CREATE)",
                    "fsmount(proc)",
                    "move_mount(proc, merged/proc)",
                ];
                format!("{} for /proc", call.get(detail).unwrap_or(&"mounting proc"))
            }
            Stage::MountDev => "mount(\"tmpfs\", \"/dev\", \"tmpfs\", \"mode=755,size=65536k\")".to_owned(),
            Stage::DevMountpoint => format!("creating the mountpoint of the bind {}", bind(detail)),
            Stage::AttachBind => format!("move_mount for the bind {}", bind(detail)),
            Stage::MountDevPts => format!("mount(\"devpts\", \"/dev/pts\", {:?})", self.devpts_options),
            Stage::MountShm => "mount(\"tmpfs\", \"/dev/shm\", \"mode=1777,size=65536k\")".to_owned(),
            Stage::DevLink => DEV_LINKS
                .get(detail)
                .map_or_else(|| "a /dev link".to_owned(), |(target, link)| format!("symlink({target:?}, {link:?})")),
            Stage::Workdir => format!(
                "mkdir({:?}) for the working directory",
                self.workdir_prefixes
                    .get(detail)
                    .map_or_else(String::new, |prefix| prefix.to_string_lossy().into_owned())
            ),
            Stage::ChdirWorkdir => format!("chdir({:?})", process.workdir),
            Stage::DropCapabilities => format!("prctl(PR_CAPBSET_DROP, {detail})"),
            Stage::CapabilitySets => [
                "prctl(PR_SET_KEEPCAPS, 0)",
                "prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)",
                "capget()",
                "capset(effective = permitted = Docker's default set, inheritable = none)",
                "capset(none) after the switch to a non-root user",
            ]
            .get(detail)
            .map_or_else(|| "setting the capability sets".to_owned(), |call| (*call).to_owned()),
            Stage::SessionKeyring => "keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)".to_owned(),
            Stage::Seccomp => format!(
                "seccomp(SECCOMP_SET_MODE_FILTER) of {}",
                if detail == 0 { "Docker's default profile" } else { "the clone3 -> ENOSYS filter" }
            ),
            Stage::ReadonlyProc => format!(
                "mount({0:?}, {0:?}, MS_BIND) and remount read-only",
                READONLY_PROC.get(detail).copied().unwrap_or(c"/proc/?")
            ),
            Stage::MaskProc => match MASKED_PROC_FILES.get(detail) {
                Some(path) => format!("binding the host's /dev/null over {path:?}"),
                None => format!(
                    "mount(\"tmpfs\", {:?}, \"tmpfs\", MS_RDONLY) to mask it",
                    MASKED_PROC_DIRECTORIES.get(detail - MASKED_PROC_FILES.len()).copied().unwrap_or(c"/proc/?")
                ),
            },
            Stage::SetGroups => format!("setgroups({:?})", process.groups),
            Stage::SetGid => format!("setgid({})", process.gid),
            Stage::SetUid => format!("setuid({})", process.uid),
            Stage::CloseDescriptors => "close_range(3, ~0, CLOSE_RANGE_CLOEXEC)".to_owned(),
            Stage::Exec => format!("execve({:?})", process.exec_candidates.get(detail).map_or("", String::as_str)),
            Stage::StepMount => self.step_mounts.describe(failure.detail),
        }
    }
}

/// The descriptors the child uses (raw numbers: the child only borrows them).
#[derive(Clone, Copy)]
pub(crate) struct ChildDescriptors {
    /// The write end of the output pipe: the command's stdout and stderr.
    pub(crate) output: RawFd,
    /// The write end of the close-on-exec pipe a [`Failure`] record goes to.
    pub(crate) failure: RawFd,
    /// The read end of the pipe whose write end the parent holds while it waits.
    pub(crate) alive_read: RawFd,
    /// The child's copy of that write end, closed first thing.
    pub(crate) alive_write: RawFd,
}

/// The child's whole life: sets up and `execve`s the command, or sends the [`Failure`] record
/// and exits (125, or 127 when the command cannot be executed). Runs between `clone` and
/// `execve`: raw syscalls only, no allocation.
pub(crate) fn child_main(program: &ChildProgram<'_>, descriptors: ChildDescriptors) -> ! {
    let failure = match child_setup(program, descriptors) {
        Ok(never) => match never {},
        Err(failure) => failure,
    };
    if failure.stage != Stage::ParentGone {
        // SAFETY: the failure pipe's write end is open in this process until it exits.
        let pipe = unsafe { BorrowedFd::borrow_raw(descriptors.failure) };
        let _ = rustix::io::write(pipe, &failure.encode());
    }
    // SAFETY: `_exit` ends the process without running the parent's atexit handlers or
    // destructors, which belong to the parent.
    unsafe { libc::_exit(if failure.stage == Stage::Exec { 127 } else { 125 }) }
}

// The failure is returned by value: the child must not allocate a Box.
#[allow(clippy::result_large_err)]
fn child_setup(program: &ChildProgram<'_>, descriptors: ChildDescriptors) -> Result<Infallible, Failure> {
    let plan = program.plan;
    let fail = |stage: Stage, detail: usize| move |error: Errno| Failure::new(stage, detail as u32, error);

    // 1. Die with the builder; quit if it is already gone.
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL)).map_err(fail(Stage::ParentDeathSignal, 0))?;
    // SAFETY: the write end of the alive pipe is this process's copy, never used again.
    unsafe { libc::close(descriptors.alive_write) };
    if parent_gone(descriptors) {
        return Err(Failure::new(Stage::ParentGone, 0, Errno::SRCH));
    }
    reset_signals();
    let null =
        rustix::fs::open(c"/dev/null", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()).map_err(fail(Stage::Stdio, 0))?;
    // SAFETY: open in this process until it exits.
    let output = unsafe { BorrowedFd::borrow_raw(descriptors.output) };
    rustix::stdio::dup2_stdin(&null).map_err(fail(Stage::Stdio, 0))?;
    rustix::stdio::dup2_stdout(output).map_err(fail(Stage::Stdio, 1))?;
    rustix::stdio::dup2_stderr(output).map_err(fail(Stage::Stdio, 2))?;
    // Into the command's cgroup before anything of the command can fork.
    for (index, join) in program.cgroup_joins.iter().enumerate() {
        write_file(join.as_c_str(), b"0").map_err(fail(Stage::JoinCgroup, index))?;
    }
    // A session of its own, without a controlling terminal: the builder's terminal (and
    // TIOCSTI on it) is out of reach, and `/dev/tty` does not open.
    rustix::process::setsid().map_err(fail(Stage::Setsid, 0))?;

    // 2. Root inside is the caller outside.
    if let Some((uid_map, gid_map)) = &program.id_maps {
        write_file(c"/proc/self/setgroups", b"deny").map_err(fail(Stage::SetgroupsDeny, 0))?;
        write_file(c"/proc/self/uid_map", uid_map).map_err(fail(Stage::UidMap, 0))?;
        write_file(c"/proc/self/gid_map", gid_map).map_err(fail(Stage::GidMap, 0))?;
    }

    // 3. Nothing mounted from here on propagates to the host.
    rustix::mount::mount_change(c"/", MountPropagationFlags::PRIVATE | MountPropagationFlags::REC)
        .map_err(fail(Stage::MakePrivate, 0))?;
    rustix::system::sethostname(plan.hostname.as_bytes()).map_err(fail(Stage::Hostname, 0))?;

    // 4. The overlay, and the host files to bind, while host paths are still reachable.
    rustix::process::chdir(program.base_dir.as_c_str()).map_err(fail(Stage::ChdirBase, 0))?;
    plan.overlay.mount()?;
    let mut bind_mounts: [Option<OwnedFd>; MAX_BINDS] = std::array::from_fn(|_| None);
    for (index, bind) in program.binds.iter().enumerate() {
        let clone = rustix::mount::open_tree(
            rustix::fs::CWD,
            bind.source.as_c_str(),
            OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
        )
        .map_err(fail(Stage::OpenBind, index))?;
        bind_mounts[index] = Some(clone);
    }
    // The step's own mounts, detached while the host's directories are in this namespace.
    let step_mounts = program.step_mounts.detach()?;

    // `/proc` before the host's root goes: in a user namespace the kernel mounts a new proc only
    // while one is fully visible in the mount namespace. It is mounted through a descriptor of
    // the directory, opened without following symlinks (the runner checked that the image has a
    // directory there, or made one).
    let mut null_clones: [Option<OwnedFd>; MASKED_PROC_FILES.len()] = std::array::from_fn(|_| None);
    if plan.mounts.proc {
        mount_proc(program.merged.as_c_str())?;
        // The host's `/dev/null`, once per masked file (a detached mount attaches once).
        for (index, slot) in null_clones.iter_mut().enumerate() {
            let clone = rustix::mount::open_tree(
                rustix::fs::CWD,
                c"/dev/null",
                OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
            )
            .map_err(fail(Stage::MaskProc, index))?;
            *slot = Some(clone);
        }
    }

    // 5. Into the merged tree; the host's root is detached.
    rustix::process::chdir(program.merged.as_c_str()).map_err(fail(Stage::ChdirMerged, 0))?;
    rustix::process::pivot_root(c".", c".").map_err(fail(Stage::PivotRoot, 0))?;
    rustix::mount::unmount(c".", UnmountFlags::DETACH).map_err(fail(Stage::DetachOldRoot, 0))?;
    rustix::process::chdir(c"/").map_err(fail(Stage::ChdirRoot, 0))?;
    if plan.mounts.proc {
        harden_proc(&null_clones)?;
    }

    // 6. The runner's other mounts. The tmpfs `/dev` is `nodev`: the standard devices are
    // binds of the host's (mounts of their own), and a node the command makes does not open.
    if plan.mounts.dev {
        rustix::mount::mount(
            c"tmpfs",
            c"/dev",
            c"tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::STRICTATIME,
            Some(c"mode=755,size=65536k"),
        )
        .map_err(fail(Stage::MountDev, 0))?;
    }
    for (index, bind) in program.binds.iter().enumerate() {
        if bind.device {
            let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            rustix::fs::open(bind.target, flags, Mode::from_raw_mode(0o666))
                .map_err(fail(Stage::DevMountpoint, index))?;
        }
        let Some(clone) = &bind_mounts[index] else { continue };
        rustix::mount::move_mount(
            clone.as_fd(),
            c"",
            rustix::fs::CWD,
            bind.target,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(fail(Stage::AttachBind, index))?;
    }
    if plan.mounts.dev {
        rustix::fs::mkdir(c"/dev/pts", Mode::from_raw_mode(0o755)).map_err(fail(Stage::MountDevPts, 0))?;
        rustix::mount::mount(
            c"devpts",
            c"/dev/pts",
            c"devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            Some(program.devpts_options),
        )
        .map_err(fail(Stage::MountDevPts, 0))?;
        rustix::fs::mkdir(c"/dev/shm", Mode::from_raw_mode(0o1777)).map_err(fail(Stage::MountShm, 0))?;
        rustix::mount::mount(
            c"shm",
            c"/dev/shm",
            c"tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            Some(c"mode=1777,size=65536k"),
        )
        .map_err(fail(Stage::MountShm, 0))?;
        for (index, (target, link)) in DEV_LINKS.iter().enumerate() {
            rustix::fs::symlink(*target, *link).map_err(fail(Stage::DevLink, index))?;
        }
    }

    // The step's own mounts on top of everything, their targets resolved in the new root.
    program.step_mounts.attach(&step_mounts)?;

    // 7. The process's own settings. Docker creates a missing working directory as root.
    rustix::process::umask(Mode::from_raw_mode(0o022));
    for (index, prefix) in program.workdir_prefixes.iter().enumerate() {
        match rustix::fs::mkdir(prefix.as_c_str(), Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(error) => return Err(Failure::new(Stage::Workdir, index as u32, error)),
        }
    }
    rustix::process::chdir(program.workdir.as_c_str()).map_err(fail(Stage::ChdirWorkdir, 0))?;
    // The parent started the network helper for this process while it set up its mounts; one
    // byte says the interfaces are up, EOF that the builder is gone.
    if program.wait_for_network {
        // SAFETY: open in this process until it exits.
        let alive = unsafe { BorrowedFd::borrow_raw(descriptors.alive_read) };
        let mut byte = [0u8; 1];
        loop {
            match rustix::io::read(alive, &mut byte) {
                Ok(1) => break,
                Ok(_) => return Err(Failure::new(Stage::ParentGone, 0, Errno::SRCH)),
                Err(Errno::INTR) => continue,
                Err(error) => return Err(Failure::new(Stage::WaitNetwork, 0, error)),
            }
        }
    }
    // Without a cgroup, a rootless command's processes are counted in its own user namespace.
    if let Some(limit) = program.nproc_limit {
        let limit = rustix::process::Rlimit { current: Some(limit), maximum: Some(limit) };
        rustix::process::setrlimit(rustix::process::Resource::Nproc, limit).map_err(fail(Stage::ProcessRlimit, 0))?;
    }
    set_capabilities(program, descriptors)?;
    // Whatever the builder's process had open (a library user's descriptors included) must not
    // reach the command: an open directory of the host would be a way out.
    // SAFETY: a raw syscall on integers.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) } != 0 {
        return Err(Failure::new(Stage::CloseDescriptors, 0, last_errno()));
    }

    // 8. The command.
    let mut reported: Option<(usize, Errno)> = None;
    for (index, candidate) in program.exec_candidates.iter().enumerate() {
        // SAFETY: NUL-terminated strings and NULL-terminated pointer arrays built by the parent.
        unsafe { libc::execve(candidate.as_ptr(), program.argv_pointers.as_ptr(), program.env_pointers.as_ptr()) };
        let errno = last_errno();
        match errno {
            // As execvp: keep looking, but a found-and-refused file is the better report.
            Errno::NOENT | Errno::NOTDIR => {
                if reported.is_none() {
                    reported = Some((index, errno));
                }
            }
            Errno::ACCESS => reported = Some((index, errno)),
            other => return Err(Failure::new(Stage::Exec, index as u32, other)),
        }
    }
    let (index, errno) = reported.unwrap_or((0, Errno::NOENT));
    Err(Failure::new(Stage::Exec, index as u32, errno))
}

/// The session keyring, the seccomp filter, then the capabilities and credentials of the
/// command, as Docker sets them: the bounding set
/// reduced to Docker's default set, the ambient set cleared and `SECBIT_KEEP_CAPS` off, the
/// effective and permitted sets equal to the bounding set and the inheritable set empty for
/// root; then the user switch, after which a non-root user holds no capability at all. The
/// user switch clears the parent-death signal, so it is armed again (and the builder checked
/// to be still there); a fresh anonymous session keyring replaces the builder's, so the
/// command sees none of the host's keys. `no_new_privs` is left off, as Docker does: setuid
/// programs of the image (`su`, `apt`'s sandbox user) keep working. Raw syscalls only.
// The failure is returned by value: the child must not allocate a Box.
#[allow(clippy::result_large_err)]
fn set_capabilities(program: &ChildProgram<'_>, descriptors: ChildDescriptors) -> Result<(), Failure> {
    let fail = |stage: Stage, detail: u32| move |error: Errno| Failure::new(stage, detail, error);
    let plan = program.plan;
    let process = &plan.process;
    // SAFETY: a raw syscall on integers (a NULL name: an anonymous keyring).
    if unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, 0usize) } < 0 {
        match last_errno() {
            // A kernel without keys support has no keyring to leak.
            Errno::NOSYS => {}
            error => return Err(Failure::new(Stage::SessionKeyring, 0, error)),
        }
    }
    // Docker's seccomp profile, while CAP_SYS_ADMIN still allows installing it without
    // `no_new_privs`; every call from here to `execve` is one it allows.
    crate::seccomp::install(&program.seccomp.allowlist).map_err(fail(Stage::Seccomp, 0))?;
    crate::seccomp::install(&program.seccomp.clone3).map_err(fail(Stage::Seccomp, 1))?;
    for bit in 0..64u32 {
        let capability = CapabilitySet::from_bits_retain(1 << bit);
        if KEPT_CAPABILITIES.contains(capability) {
            continue;
        }
        match rustix::thread::remove_capability_from_bounding_set(capability) {
            // EINVAL: past the last capability this kernel knows.
            Ok(()) | Err(Errno::INVAL) => {}
            Err(error) => return Err(Failure::new(Stage::DropCapabilities, bit, error)),
        }
    }
    rustix::thread::set_keep_capabilities(false).map_err(fail(Stage::CapabilitySets, 0))?;
    match rustix::thread::clear_ambient_capability_set() {
        // EINVAL: a kernel before 4.3 has no ambient set.
        Ok(()) | Err(Errno::INVAL) => {}
        Err(error) => return Err(Failure::new(Stage::CapabilitySets, 1, error)),
    }
    let current = rustix::thread::capabilities(None).map_err(fail(Stage::CapabilitySets, 2))?;
    let kept = KEPT_CAPABILITIES.intersection(current.permitted);
    let root_sets =
        rustix::thread::CapabilitySets { effective: kept, permitted: kept, inheritable: CapabilitySet::empty() };
    rustix::thread::set_capabilities(None, root_sets).map_err(fail(Stage::CapabilitySets, 3))?;
    if plan.rootless.is_none() {
        rustix::thread::set_thread_groups(&program.groups).map_err(fail(Stage::SetGroups, 0))?;
    }
    rustix::thread::set_thread_gid(rustix::process::Gid::from_raw(process.gid)).map_err(fail(Stage::SetGid, 0))?;
    rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(process.uid)).map_err(fail(Stage::SetUid, 0))?;
    if process.uid != 0 {
        // The kernel cleared the effective and permitted sets at the switch; say so explicitly.
        let none = rustix::thread::CapabilitySets {
            effective: CapabilitySet::empty(),
            permitted: CapabilitySet::empty(),
            inheritable: CapabilitySet::empty(),
        };
        rustix::thread::set_capabilities(None, none).map_err(fail(Stage::CapabilitySets, 4))?;
    }
    // The credentials changed: the kernel forgot the parent-death signal.
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL)).map_err(fail(Stage::ParentDeathSignal, 1))?;
    if parent_gone(descriptors) {
        return Err(Failure::new(Stage::ParentGone, 0, Errno::SRCH));
    }
    Ok(())
}

/// `/proc` as Docker leaves it: [`READONLY_PROC`] bound read-only onto themselves,
/// [`MASKED_PROC_FILES`] behind the host's `/dev/null` (`null_clones`, detached binds made
/// before the pivot), [`MASKED_PROC_DIRECTORIES`] under an empty read-only tmpfs. A path this
/// kernel lacks is skipped. Runs in the new root: raw syscalls only.
// The failure is returned by value: the child must not allocate a Box.
#[allow(clippy::result_large_err)]
fn harden_proc(null_clones: &[Option<OwnedFd>; MASKED_PROC_FILES.len()]) -> Result<(), Failure> {
    let locked = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    for (index, path) in READONLY_PROC.iter().enumerate() {
        match rustix::mount::mount_bind(*path, *path) {
            Ok(()) => {}
            Err(Errno::NOENT) => continue,
            Err(error) => return Err(Failure::new(Stage::ReadonlyProc, index as u32, error)),
        }
        rustix::mount::mount_remount(*path, MountFlags::BIND | MountFlags::RDONLY | locked, c"")
            .map_err(|error| Failure::new(Stage::ReadonlyProc, index as u32, error))?;
    }
    for (index, path) in MASKED_PROC_FILES.iter().enumerate() {
        let Some(null) = &null_clones[index] else { continue };
        match rustix::mount::move_mount(
            null.as_fd(),
            c"",
            rustix::fs::CWD,
            *path,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        ) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(error) => return Err(Failure::new(Stage::MaskProc, index as u32, error)),
        }
    }
    for (index, path) in MASKED_PROC_DIRECTORIES.iter().enumerate() {
        match rustix::mount::mount(c"tmpfs", *path, c"tmpfs", MountFlags::RDONLY | locked, Some(c"mode=555")) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(error) => {
                return Err(Failure::new(Stage::MaskProc, (MASKED_PROC_FILES.len() + index) as u32, error));
            }
        }
    }
    Ok(())
}

/// Whether the builder is gone: the write end of the alive pipe is closed.
fn parent_gone(descriptors: ChildDescriptors) -> bool {
    // SAFETY: open in this process until it exits.
    let alive = unsafe { BorrowedFd::borrow_raw(descriptors.alive_read) };
    let mut poll = [rustix::event::PollFd::new(&alive, rustix::event::PollFlags::IN)];
    let now = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    rustix::event::poll(&mut poll, Some(&now)).is_ok() && poll[0].revents().contains(rustix::event::PollFlags::HUP)
}

/// Mounts a new proc (of the child's pid namespace) on `merged/proc`. Raw syscalls only.
// The failure is returned by value: the child must not allocate a Box.
#[allow(clippy::result_large_err)]
fn mount_proc(merged: &CStr) -> Result<(), Failure> {
    let fail = |detail: u32| move |error: Errno| Failure::new(Stage::MountProc, detail, error);
    let path_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let merged = rustix::fs::open(merged, path_flags, Mode::empty()).map_err(fail(0))?;
    let directory =
        rustix::fs::openat(&merged, c"proc", path_flags | OFlags::NOFOLLOW, Mode::empty()).map_err(fail(0))?;
    let filesystem = rustix::mount::fsopen(c"proc", FsOpenFlags::FSOPEN_CLOEXEC).map_err(fail(1))?;
    rustix::mount::fsconfig_create(&filesystem).map_err(|error| fail(2)(error).with_log(&filesystem))?;
    let attributes =
        MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV | MountAttrFlags::MOUNT_ATTR_NOEXEC;
    let mount = rustix::mount::fsmount(&filesystem, FsMountFlags::FSMOUNT_CLOEXEC, attributes)
        .map_err(|error| fail(3)(error).with_log(&filesystem))?;
    rustix::mount::move_mount(
        mount.as_fd(),
        c"",
        directory.as_fd(),
        c"",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(fail(4))
}

fn last_errno() -> Errno {
    Errno::from_raw_os_error(io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

fn write_file(path: &CStr, bytes: &[u8]) -> Result<(), Errno> {
    let file = rustix::fs::open(path, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
    let written = rustix::io::write(&file, bytes)?;
    if written != bytes.len() {
        return Err(Errno::IO);
    }
    Ok(())
}

/// Default dispositions and an empty mask: the builder's process may ignore or block signals
/// (Rust ignores SIGPIPE), which an exec'd command would inherit.
fn reset_signals() {
    // SAFETY: sigaction and sigprocmask are async-signal-safe; the set is initialised by
    // sigemptyset before use.
    unsafe {
        for signal in 1..=64 {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}
