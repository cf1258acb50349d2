//! Leases: what the open stores use, so that a prune running beside them (in this process or in
//! another) never removes it.
//!
//! Every open `Store` holds one lease: a file `leases/<pid>-<ns>-<n>` that it
//! keeps locked (`flock`, exclusive) for as long as it (or a clone) is alive, and removes when
//! the last clone is dropped. A builder runs each build on a clone with a lease of its own
//! (`Store::with_own_lease`), which the build's images keep, and restarts its own lease's start
//! then: a long-lived builder protects what its live images use, not all it ever used. The file says when the store was opened
//! (`start <ns since the epoch>`) and then names, one a line, what the store relies on:
//! `key <hex>` (an action record, and therefore every blob and attachment the record names)
//! and `blob <hex>`. A lease whose file can be locked by a prune belongs to a process that is
//! gone: the prune removes it.
//!
//! Registering and pruning exclude each other through `gc.lock`: a store registers a name while
//! holding it shared, *before* it looks for or relies on what the name stands for; a prune holds
//! it exclusively from the moment it reads the leases to its last removal. So either the prune
//! sees the name, or the store looks after the prune is done (and finds the entry, or its
//! absence, as the prune left it).
//!
//! What a lease does not list, a prune protects by age: nothing modified since the oldest live
//! lease started (or since the prune started) is removed, which covers what running builds
//! write (blobs being committed, their indexes, snapshots and logs) before a record names it.
//!
//! What it deliberately is not: a lock on the cache as a whole (that is `lock`, taken by
//! `Store::open_exclusive`), or a record of use for LRU
//! ordering (that is the mtime of action records).

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{FlockOperation, flock};

use thiserror::Error;

/// A lease file or `gc.lock` could not be made, locked, written or read.
#[derive(Debug, Error)]
#[error("cache lease: cannot {action} {path}: {source}")]
pub struct LeaseError {
    /// What was being done ("create lease", "lock").
    pub action: &'static str,
    /// The file it was done to.
    pub path: PathBuf,
    /// The operating system's error.
    pub source: io::Error,
}

/// The directory of lease files, below the cache root.
pub(crate) const LEASES: &str = "leases";
/// The lock file that orders registrations and prunes.
pub(crate) const GC_LOCK: &str = "gc.lock";

/// Distinguishes the leases of one process.
static NEXT_LEASE: AtomicU64 = AtomicU64::new(0);

/// The lease of one open store.
#[derive(Debug)]
pub(crate) struct Lease {
    path: PathBuf,
    /// The lease file, locked exclusively and opened for appending.
    file: File,
    gc_lock: PathBuf,
    /// The lines written so far: each is written once.
    written: Mutex<HashSet<String>>,
}

impl Lease {
    /// Creates and locks a new lease under `root` (whose `leases/` exists).
    pub(crate) fn create(root: &Path) -> Result<Lease, LeaseError> {
        use std::os::unix::fs::OpenOptionsExt;
        let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        let name = format!("{}-{started}-{}", std::process::id(), NEXT_LEASE.fetch_add(1, Ordering::Relaxed));
        let path = root.join(LEASES).join(name);
        let file = File::options()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| LeaseError { action: "create lease", path: path.clone(), source })?;
        flock(&file, FlockOperation::LockExclusive).map_err(|error| LeaseError {
            action: "lock lease",
            path: path.clone(),
            source: error.into(),
        })?;
        let lease = Lease { path, file, gc_lock: root.join(GC_LOCK), written: Mutex::default() };
        // The start line needs no gc lock: a prune that reads the lease before it is written
        // takes the lease's start as its own (see `read_live`), which is earlier.
        (&lease.file).write_all(format!("start {started}\n").as_bytes()).map_err(|source| LeaseError {
            action: "write lease",
            path: lease.path.clone(),
            source,
        })?;
        Ok(lease)
    }

    /// Moves the lease's start to now (a later `start` line wins): files modified before now
    /// are then protected by this lease only if it names them.
    pub(crate) fn restart(&self) -> Result<(), LeaseError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        // One short append is one write: a prune reads either line, and either is safe to act
        // on (the earlier protects more).
        (&self.file).write_all(format!("start {now}\n").as_bytes()).map_err(|source| LeaseError {
            action: "write lease",
            path: self.path.clone(),
            source,
        })
    }

    /// Adds `names` (each `kind hex`) to the lease, excluding a prune while doing so.
    pub(crate) fn add(&self, names: impl IntoIterator<Item = String>) -> Result<(), LeaseError> {
        let mut written = self.written.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut lines = String::new();
        let mut new = Vec::new();
        for name in names {
            if !written.contains(&name) {
                lines.push_str(&name);
                lines.push('\n');
                new.push(name);
            }
        }
        if lines.is_empty() {
            return Ok(());
        }
        let gc = open_gc_lock(&self.gc_lock)?;
        flock(&gc, FlockOperation::LockShared).map_err(|error| LeaseError {
            action: "lock (shared)",
            path: self.gc_lock.clone(),
            source: error.into(),
        })?;
        (&self.file).write_all(lines.as_bytes()).map_err(|source| LeaseError {
            action: "write lease",
            path: self.path.clone(),
            source,
        })?;
        written.extend(new);
        Ok(())
        // Dropping `gc` unlocks it.
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn open_gc_lock(path: &Path) -> Result<File, LeaseError> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| LeaseError { action: "open lock file", path: path.to_owned(), source })
}

/// `gc.lock` held exclusively: no store registers anything while it is alive.
#[derive(Debug)]
pub(crate) struct GcGuard {
    _file: File,
}

impl GcGuard {
    /// Waits for registrations under way to finish and holds them off.
    pub(crate) fn acquire(root: &Path) -> Result<GcGuard, LeaseError> {
        let path = root.join(GC_LOCK);
        let file = open_gc_lock(&path)?;
        flock(&file, FlockOperation::LockExclusive).map_err(|error| LeaseError {
            action: "lock",
            path,
            source: error.into(),
        })?;
        Ok(GcGuard { _file: file })
    }
}

/// What the live leases protect.
#[derive(Debug, Default)]
pub(crate) struct LiveLeases {
    /// Step keys (hex) whose records are in use.
    pub keys: HashSet<String>,
    /// Blob digests (hex) in use.
    pub blobs: HashSet<String>,
    /// When the oldest live lease started.
    pub oldest_start: Option<SystemTime>,
}

/// Reads the live leases under `root` (call it holding a [`GcGuard`]); removes stale ones.
pub(crate) fn read_live(root: &Path) -> LiveLeases {
    let mut live = LiveLeases::default();
    let Ok(entries) = fs::read_dir(root.join(LEASES)) else { return live };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(file) = File::open(&path) else { continue };
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok() {
            // Nobody holds it: its store is gone (a crash, or a drop racing this read).
            let _ = fs::remove_file(&path);
            continue;
        }
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(_) => String::new(),
        };
        // A lease that has not written its start line yet started about now (its file's
        // mtime is no later than that).
        let mut start = entry.metadata().and_then(|metadata| metadata.modified()).ok();
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("start", nanoseconds)) => {
                    if let Ok(nanoseconds) = nanoseconds.parse::<u64>() {
                        start = Some(UNIX_EPOCH + Duration::from_nanos(nanoseconds));
                    }
                }
                Some(("key", hex)) => {
                    live.keys.insert(hex.to_owned());
                }
                Some(("blob", hex)) => {
                    live.blobs.insert(hex.to_owned());
                }
                _ => {}
            }
        }
        let start = start.unwrap_or_else(SystemTime::now);
        live.oldest_start = Some(live.oldest_start.map_or(start, |oldest| oldest.min(start)));
    }
    live
}
