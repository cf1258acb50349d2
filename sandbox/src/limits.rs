//! The process limit of a RUN command: a cgroup of its own with `pids.max`, made by the parent
//! before `clone` and joined by the child (it writes `0` to the cgroup's `cgroup.procs`) before
//! anything of the command runs; a fork bomb then fails its forks with `EAGAIN` and the host
//! is fine. The cgroup is a child of the builder's own, in the cgroup v2 hierarchy when the
//! `pids` controller is enabled for the builder's children there, else in the cgroup v1 `pids`
//! hierarchy; when neither can be made (a plain user without a delegated cgroup) the command
//! runs without the limit and a warning says so. After the command, `pids.events` tells whether
//! the limit was hit (the caller's error says so), and the emptied cgroup is kept for the next
//! command of this process.
//!
//! What this module deliberately is not: a resource manager (no memory or CPU limits yet), or
//! `RLIMIT_NPROC`, which counts every process of the user on the whole machine and does not
//! apply to root at all.

use std::ffi::CString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// A cgroup for one command at a time. Making and removing a cgroup costs milliseconds (the
/// kernel waits for RCU grace periods), so an emptied one goes back to a pool of this process
/// and is reused; what a crashed builder left (`layerwright-<pid>-<n>` of a process that is
/// gone) is removed when the first one is made.
#[derive(Debug)]
pub(crate) struct CommandCgroup {
    directory: PathBuf,
    /// `DIR/cgroup.procs`, for the child to join.
    pub(crate) procs: CString,
    /// `max` of `pids.events` when this command got the cgroup.
    refused_before: u64,
}

/// Emptied cgroups of this process, ready for the next command.
static POOL: Mutex<Vec<(PathBuf, CString)>> = Mutex::new(Vec::new());

impl CommandCgroup {
    /// A cgroup limited to `pids` processes below the builder's own; `None` (after a warning)
    /// when this process cannot make one.
    pub(crate) fn create(pids: u64) -> Option<CommandCgroup> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        static PARENT: OnceLock<Option<PathBuf>> = OnceLock::new();
        let parent = PARENT.get_or_init(|| {
            let parent = parent_cgroup();
            match &parent {
                Some(parent) => remove_stale(parent),
                None => log::warn!(
                    "RUN sandbox: no cgroup with the pids controller can be made here; commands run without a process \
                     limit"
                ),
            }
            parent
        });
        let parent = parent.as_ref()?;
        let pooled = POOL.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let (directory, procs) = match pooled {
            Some(pooled) => pooled,
            None => {
                let name = format!("layerwright-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
                let directory = parent.join(name);
                if let Err(error) = fs::create_dir(&directory) {
                    log::warn!(
                        "RUN sandbox: cannot make the cgroup {}: {error}; running without a process limit",
                        directory.display()
                    );
                    return None;
                }
                let procs = CString::new(directory.join("cgroup.procs").into_os_string().into_encoded_bytes()).ok()?;
                (directory, procs)
            }
        };
        if let Err(error) = fs::write(directory.join("pids.max"), pids.to_string()) {
            log::warn!(
                "RUN sandbox: cannot set {}/pids.max: {error}; running without a process limit",
                directory.display()
            );
            let _ = fs::remove_dir(&directory);
            return None;
        }
        let refused_before = refused(&directory);
        Some(CommandCgroup { directory, procs, refused_before })
    }

    /// Whether a fork of this command was refused because of `pids.max`.
    pub(crate) fn limit_hit(&self) -> bool {
        refused(&self.directory) > self.refused_before
    }
}

/// `max N` of `pids.events`: how many forks the limit refused so far.
fn refused(directory: &Path) -> u64 {
    let events = fs::read_to_string(directory.join("pids.events")).unwrap_or_default();
    events.lines().find_map(|line| line.strip_prefix("max ")?.trim().parse().ok()).unwrap_or(0)
}

impl Drop for CommandCgroup {
    fn drop(&mut self) {
        // The command's processes are gone (pid 1 of its namespace exited and was reaped): the
        // cgroup is empty, and the next command takes it.
        let pooled = (std::mem::take(&mut self.directory), std::mem::take(&mut self.procs));
        POOL.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(pooled);
    }
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
/// enabled for its children there, else in the v1 `pids` hierarchy.
fn parent_cgroup() -> Option<PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
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
            if Path::new(root).join("cgroup.controllers").is_file()
                && enabled.split_whitespace().any(|controller| controller == "pids")
            {
                return Some(directory);
            }
        }
    }
    entries.iter().find_map(|(controllers, relative)| {
        let directory = Path::new("/sys/fs/cgroup/pids").join(relative);
        (controllers.split(',').any(|controller| controller == "pids") && directory.join("cgroup.procs").is_file())
            .then_some(directory)
    })
}
