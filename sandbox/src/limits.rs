//! The resource limits of a RUN command: cgroups of its own with `pids.max` and the memory
//! limit, made (or taken from a pool) by the parent before `clone` and joined by the child
//! before anything of the command runs. A fork bomb then fails its forks with `EAGAIN`, a
//! memory hog is killed by the kernel's OOM killer inside its cgroup, and the host is fine.
//!
//! Where: below the builder's own cgroup, in the cgroup v2 hierarchy when the `pids` controller
//! is enabled for the builder's children there (`memory.max`, `memory.swap.max` too when the
//! `memory` controller is), else in the cgroup v1 `pids` and `memory` hierarchies
//! (`memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes` when the kernel accounts swap,
//! so that the limit is not dodged by swapping). A command without a memory limit does not
//! join a v1 memory cgroup at all.
//!
//! Cost: on cgroup v1, writing a pid to `cgroup.procs` takes the kernel's global threadgroup
//! lock for writing, which waits for an RCU grace period (7–15 ms on a busy machine with
//! `HZ=250`). The child is single-threaded when it joins, so it writes `0` to the v1 `tasks`
//! file instead: moving only the calling thread skips that lock (Linux 6.0, "cgroup: Optimize
//! single thread migration"), and joining costs well under a millisecond. Making and removing a
//! cgroup costs milliseconds too (RCU again), so an emptied cgroup goes back to a pool of this
//! process and is reused; what a crashed builder left (`layerwright-<pid>-<n>` of a process
//! that is gone) is removed when the first one is made. The limit files are written through a
//! descriptor of the cgroup's directory.
//!
//! After the command, `pids.events` (`max`) and `memory.events` / v1 `memory.oom_control`
//! (`oom_kill`) tell whether a limit was hit; the caller's error then names the limit.
//!
//! When no cgroup can be made (a plain user without a delegated cgroup), a warning says so once
//! and the limits fall back as far as they sensibly can: the process limit becomes
//! `RLIMIT_NPROC` of the command's own user namespace (counted per user namespace since Linux
//! 5.14, so it bounds the command and nothing else of the user); the memory limit is not
//! applied. `RLIMIT_AS` would be a poor proxy for it: it bounds each process's address space,
//! not the command's memory, and breaks programs that reserve large mappings (JVMs, Go, ASan).
//!
//! What this module deliberately is not: a resource manager (no CPU or IO limits), or a user
//! of `RLIMIT_NPROC` as root, where it counts every process of root on the machine and is not
//! enforced.

use std::ffi::CString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use rustix::fd::OwnedFd;
use rustix::fs::{Mode, OFlags};

use crate::plan::ResourceLimits;

/// Which hierarchy a cgroup is in, and so which files it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// cgroup v2, with the memory controller enabled for the builder's children or not.
    Unified { memory: bool },
    /// The cgroup v1 `pids` hierarchy.
    V1Pids,
    /// The cgroup v1 `memory` hierarchy.
    V1Memory,
}

/// Where this process's command cgroups go.
#[derive(Debug)]
struct Parents {
    /// The v2 cgroup, or the v1 `pids` one.
    pids: Option<(PathBuf, Kind)>,
    /// The v1 `memory` cgroup (on v2 the `pids` one holds memory too).
    memory: Option<PathBuf>,
}

/// One pooled cgroup: its directory (and a descriptor of it) and the file the child writes `0`
/// to.
#[derive(Debug)]
struct Slot {
    directory: PathBuf,
    descriptor: OwnedFd,
    join: CString,
    kind: Kind,
}

/// Emptied cgroups of this process, ready for the next command.
static POOL: Mutex<Vec<Slot>> = Mutex::new(Vec::new());

/// The cgroups of one command.
#[derive(Debug)]
pub(crate) struct CommandCgroups {
    slots: Vec<Slot>,
    /// `max` of `pids.events` when this command got its cgroup.
    refused_before: u64,
    /// `oom_kill` of its memory cgroup's events when this command got it.
    killed_before: u64,
    /// Whether the memory limit is in place (else a hit cannot be told).
    memory_limited: bool,
}

impl CommandCgroups {
    /// Cgroups with `limits` below the builder's own; `None` (after a warning, once) when this
    /// process cannot make them. A memory limit that cannot be set is warned about and left
    /// out.
    pub(crate) fn create(limits: &ResourceLimits) -> Option<CommandCgroups> {
        static PARENTS: OnceLock<Parents> = OnceLock::new();
        let parents = PARENTS.get_or_init(|| {
            let parents = parent_cgroups();
            if let Some((parent, _)) = &parents.pids {
                remove_stale(parent);
            }
            if let Some(parent) = &parents.memory {
                remove_stale(parent);
            }
            if parents.pids.is_none() {
                log::warn!(
                    "RUN sandbox: no cgroup with the pids controller can be made here; commands get RLIMIT_NPROC in \
                     their user namespace instead, and no memory limit"
                );
            }
            parents
        });
        let (pids_parent, pids_kind) = parents.pids.as_ref()?;
        let mut cgroups =
            CommandCgroups { slots: Vec::new(), refused_before: 0, killed_before: 0, memory_limited: false };
        let pids_slot = take(pids_parent, *pids_kind)?;
        let pids = limits.pids.map_or_else(|| "max".to_owned(), |pids| pids.to_string());
        if let Err(error) = write_at(&pids_slot, "pids.max", &pids) {
            log::warn!(
                "RUN sandbox: cannot set {}/pids.max: {error}; running without a process limit",
                pids_slot.directory.display()
            );
            let _ = fs::remove_dir(&pids_slot.directory);
            return None;
        }
        cgroups.refused_before = event(&pids_slot, "pids.events", "max");
        cgroups.slots.push(pids_slot);
        match (*pids_kind, limits.memory) {
            (Kind::Unified { memory: true }, memory) => {
                let slot = &cgroups.slots[0];
                let value = memory.map_or_else(|| "max".to_owned(), |bytes| bytes.to_string());
                match write_at(slot, "memory.max", &value) {
                    Ok(()) => {
                        // Swap would let the command go past its limit; a kernel without swap
                        // accounting has no such file.
                        let swap = if memory.is_some() { "0" } else { "max" };
                        let _ = write_at(slot, "memory.swap.max", swap);
                        cgroups.memory_limited = memory.is_some();
                        cgroups.killed_before = event(slot, "memory.events", "oom_kill");
                    }
                    Err(error) if memory.is_some() => warn_memory(&slot.directory, &error),
                    Err(_) => {}
                }
            }
            (Kind::Unified { memory: false }, Some(_)) => warn_once_no_memory(),
            (_, None) => {}
            (_, Some(bytes)) => match &parents.memory {
                None => warn_once_no_memory(),
                Some(parent) => {
                    if let Some(slot) = take(parent, Kind::V1Memory) {
                        match set_v1_memory(&slot, bytes) {
                            Ok(()) => {
                                cgroups.memory_limited = true;
                                cgroups.killed_before = event(&slot, "memory.oom_control", "oom_kill");
                                cgroups.slots.push(slot);
                            }
                            Err(error) => {
                                warn_memory(&slot.directory, &error);
                                give_back(slot);
                            }
                        }
                    }
                }
            },
        }
        Some(cgroups)
    }

    /// The files the child writes `0` to, to join each cgroup.
    pub(crate) fn join_files(&self) -> Vec<CString> {
        self.slots.iter().map(|slot| slot.join.clone()).collect()
    }

    /// Whether a fork of this command was refused because of `pids.max`.
    pub(crate) fn process_limit_hit(&self) -> bool {
        self.slots.first().is_some_and(|slot| event(slot, "pids.events", "max") > self.refused_before)
    }

    /// Whether the kernel killed a process of this command because of its memory limit.
    pub(crate) fn memory_limit_hit(&self) -> bool {
        if !self.memory_limited {
            return false;
        }
        self.slots.iter().any(|slot| match slot.kind {
            Kind::Unified { memory: true } => event(slot, "memory.events", "oom_kill") > self.killed_before,
            Kind::V1Memory => event(slot, "memory.oom_control", "oom_kill") > self.killed_before,
            _ => false,
        })
    }
}

impl Drop for CommandCgroups {
    fn drop(&mut self) {
        // The command's processes are gone (pid 1 of its namespace exited and was reaped): the
        // cgroups are empty, and the next command takes them.
        for slot in self.slots.drain(..) {
            give_back(slot);
        }
    }
}

fn give_back(slot: Slot) {
    POOL.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(slot);
}

fn warn_memory(directory: &Path, error: &io::Error) {
    log::warn!("RUN sandbox: cannot set the memory limit of {}: {error}; running without one", directory.display());
}

fn warn_once_no_memory() {
    static WARNED: OnceLock<()> = OnceLock::new();
    WARNED.get_or_init(|| {
        log::warn!(
            "RUN sandbox: no cgroup with the memory controller can be made here; memory limits are not applied \
             (RLIMIT_AS, a per-process address-space limit, would break programs rather than bound the command)"
        );
    });
}

/// A pooled cgroup of `kind` below `parent`, or a new one.
fn take(parent: &Path, kind: Kind) -> Option<Slot> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    {
        let mut pool = POOL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(position) = pool.iter().position(|slot| slot.kind == kind) {
            return Some(pool.swap_remove(position));
        }
    }
    let name = format!("layerwright-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let directory = parent.join(name);
    let made = fs::create_dir(&directory).and_then(|()| {
        rustix::fs::open(&directory, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(io::Error::from)
    });
    let descriptor = match made {
        Ok(descriptor) => descriptor,
        Err(error) => {
            log::warn!(
                "RUN sandbox: cannot make the cgroup {}: {error}; running without its limit",
                directory.display()
            );
            let _ = fs::remove_dir(&directory);
            return None;
        }
    };
    // v1: `tasks` moves only the writing thread (the child is single-threaded), which spares
    // the kernel's global threadgroup lock and its RCU grace period; v2 has no such file for a
    // domain cgroup.
    let join_name = if matches!(kind, Kind::Unified { .. }) { "cgroup.procs" } else { "tasks" };
    let join = CString::new(directory.join(join_name).into_os_string().into_encoded_bytes()).ok()?;
    Some(Slot { directory, descriptor, join, kind })
}

/// Writes `value` to the file `name` of the cgroup, through its directory's descriptor.
fn write_at(slot: &Slot, name: &str, value: &str) -> io::Result<()> {
    let file = rustix::fs::openat(&slot.descriptor, name, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
    let written = rustix::io::write(&file, value.as_bytes())?;
    if written != value.len() {
        return Err(io::Error::from(io::ErrorKind::WriteZero));
    }
    Ok(())
}

/// The v1 memory limit: `memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes` (memory and
/// swap together) at the same value when the kernel accounts swap. The kernel keeps
/// `memsw >= limit` at every step, so `memsw` is lifted first.
fn set_v1_memory(slot: &Slot, bytes: u64) -> io::Result<()> {
    let swap_accounted = write_at(slot, "memory.memsw.limit_in_bytes", "-1").is_ok();
    write_at(slot, "memory.limit_in_bytes", &bytes.to_string())?;
    if swap_accounted {
        write_at(slot, "memory.memsw.limit_in_bytes", &bytes.to_string())?;
    }
    Ok(())
}

/// The counter `key` of an events file of the cgroup (`max 3`, `oom_kill 1`); 0 when absent.
fn event(slot: &Slot, file: &str, key: &str) -> u64 {
    let Ok(descriptor) = rustix::fs::openat(&slot.descriptor, file, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
    else {
        return 0;
    };
    let mut buffer = [0u8; 1024];
    let Ok(length) = rustix::io::read(&descriptor, &mut buffer) else { return 0 };
    let text = String::from_utf8_lossy(&buffer[..length]);
    text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0)
}

/// Removes the empty `layerwright-<pid>-<n>` cgroups of processes that are gone.
fn remove_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("layerwright-").and_then(|rest| rest.split('-').next()) else { continue };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir(entry.path());
        }
    }
}

/// Where this process's command cgroups go: its own cgroup, in the v2 hierarchy when `pids` is
/// enabled for its children there, else in the v1 `pids` and `memory` hierarchies.
fn parent_cgroups() -> Parents {
    let none = Parents { pids: None, memory: None };
    let Ok(own) = fs::read_to_string("/proc/self/cgroup") else { return none };
    let entries: Vec<(&str, &str)> = own
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let _ = fields.next()?;
            Some((fields.next()?, fields.next()?.trim_start_matches('/')))
        })
        .collect();
    for (controllers, relative) in &entries {
        if !controllers.is_empty() {
            continue;
        }
        for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            let directory = Path::new(root).join(relative);
            let enabled = fs::read_to_string(directory.join("cgroup.subtree_control")).unwrap_or_default();
            let enabled = |name: &str| enabled.split_whitespace().any(|controller| controller == name);
            if Path::new(root).join("cgroup.controllers").is_file() && enabled("pids") {
                return Parents { pids: Some((directory, Kind::Unified { memory: enabled("memory") })), memory: None };
            }
        }
    }
    let v1 = |name: &str| {
        entries.iter().find_map(|(controllers, relative)| {
            let directory = Path::new("/sys/fs/cgroup").join(name).join(relative);
            (controllers.split(',').any(|controller| controller == name) && directory.join("tasks").is_file())
                .then_some(directory)
        })
    };
    Parents { pids: v1("pids").map(|directory| (directory, Kind::V1Pids)), memory: v1("memory") }
}
