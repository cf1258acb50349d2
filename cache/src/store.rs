//! The persistent store under the cache directory.
//!
//! Layout (everything below `root`):
//! - `blobs/sha256/<hex>`: content-addressed blobs (layers, configs, manifests).
//! - `actions/<2 hex>/<key hex>.json`: step key → [`ActionRecord`].
//! - `indexes/<diff id hex>.json`: the builder's index of a layer's entries (opaque bytes here).
//! - `snapshots/`: unpacked layers for the RUN runner (owned by the builder).
//! - `gzip-blocks/<shape hex>.json`: where the compressed blocks of the last gzip layer of each
//!   shape are in its blob, so that an almost identical layer reuses them (owned by the
//!   builder; a map naming a missing blob is ignored).
//! - `tmp/`: files being written; anything left there by a crash is garbage.
//! - `leases/`, `gc.lock`: what each open store uses, for pruning beside running builds (see
//!   the `lease` module).
//! - `provenance/<slot>`: what the steps of each slot were last built from, to explain their next
//!   miss.
//! - `stat-cache`, `lock`: the stat cache and the lock `prune` waits on.
//! - directories the builder declares (see [`crate::CacheDirectory`]), such as RUN logs.
//!
//! The cache directory holds other users' secrets in effect (snapshots with setuid-root files
//! and image device nodes, RUN logs, build outputs), so it is private: [`Store::open`] makes
//! it and every directory of the layout mode 0700 (an existing one too, when it is ours), and
//! refuses a cache directory owned by another non-root user ([`StoreError::ForeignOwner`]):
//! whoever owns it could swap its contents under a build run by someone else (root). Files are
//! written through temp files, which are 0600.
//!
//! Every write goes to `tmp/` first, is fsynced and then renamed into place, so a reader sees a
//! whole entry or none. Records are written after the blobs they name.
//!
//! What the store does not do: decide what a blob contains (it takes bytes and names them by
//! their digest), unpack snapshots, or trust what it finds on disk: a record naming a missing
//! blob reads as a miss, and callers re-hash blobs they export.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use rustix::fs::{FlockOperation, flock};
use serde::{Deserialize, Serialize};
use tempfile::NamedTempFile;
use thiserror::Error;

use crate::lease::Lease;
use crate::{Digest, Sha256Writer, StepKey};

/// Why a store operation failed. Every variant names the path or digest concerned.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("cache store: cannot {action} {path}: {source}")]
    Io {
        /// What was being done, as a verb phrase ("create directory", "rename blob to").
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A blob that should be stored is not.
    #[error("cache store: blob {digest} is missing from {path}")]
    MissingBlob {
        /// The blob's digest.
        digest: Digest,
        /// Where it should be.
        path: PathBuf,
    },
    /// Bytes imported as one digest hash to another; nothing was stored.
    #[error("cache store: blob written as {expected} has digest {actual}")]
    DigestMismatch {
        /// The digest the bytes were imported as.
        expected: Digest,
        /// The digest they have.
        actual: Digest,
    },
    /// The exclusive lock could not be had in time: a build holds the cache.
    #[error("cache store {path} is in use by a running build")]
    Busy {
        /// The cache directory.
        path: PathBuf,
    },
    /// The cache directory belongs to another user (not root): using it would let that user
    /// change what this build reads and runs.
    #[error(
        "cache store {path} belongs to uid {owner}, not to this process's uid {uid} (nor root): refusing to use \
         another user's cache directory; choose a cache directory of your own"
    )]
    ForeignOwner {
        /// The cache directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The effective uid of this process.
        uid: u32,
    },
    /// A lease (what an open store uses, for prunes beside it) could not be kept.
    #[error(transparent)]
    Lease(#[from] crate::lease::LeaseError),
    /// An action record cannot be parsed.
    #[error("cache store: action record {path} is unreadable: {reason}")]
    CorruptRecord {
        /// The record's file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl StoreError {
    fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
        move |source| StoreError::Io { action, path: path.to_owned(), source }
    }
}

/// A layer a step produced: what the image manifest and config need to name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// sha256 of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: Digest,
    /// sha256 of the blob as stored (compressed or not).
    pub digest: Digest,
    /// Size of the blob as stored, in bytes.
    pub size: u64,
    /// The layer's OCI media type, which says how the blob is compressed.
    pub media_type: String,
}

/// What a step key maps to: the layers the step added (one for a file step, the base layers for
/// an imported base) and, for an imported base, its config blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionRecord {
    /// The layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// The config blob of an imported base image; `None` for every other step.
    pub config: Option<Digest>,
}

/// How stale a record's last-use time may get before a hit refreshes it (LRU pruning needs no
/// finer clock than this).
const RECORD_USE_GRANULARITY: Duration = Duration::from_secs(60);

/// A committed blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// The blob's sha256 digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Its file, `blobs/sha256/<hex>` under the store root.
    pub path: PathBuf,
}

/// The store rooted at a cache directory. Cheap to clone; every clone shares one lock on the
/// cache dir, released when the last clone (a builder, a built image) is dropped.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    _lock: Arc<File>,
    /// What this store (any clone of it) uses, for prunes running beside it.
    lease: Arc<Lease>,
    /// Blobs this store (any clone of it) committed after hashing every byte on the way in, and
    /// how their files looked then: see [`Store::unchanged_since_hashed`].
    hashed_here: Arc<Mutex<HashMap<Digest, FileStamp>>>,
}

impl Store {
    /// Opens (creating if needed) the store under `root`, holding a shared lock on it so that
    /// `prune` never removes what this process may still use. When no other process holds the
    /// cache, temp files a crashed build left behind are removed first.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        create_private_layout(&root)?;
        mark_unrelated_trees(&root.join("tmp"));
        let lock = open_lock_file(&root)?;
        let lock_path = root.join("lock");
        if flock(&lock, FlockOperation::NonBlockingLockExclusive).is_ok() {
            remove_stale_temp_files(&root.join("tmp"));
        }
        flock(&lock, FlockOperation::LockShared).map_err(|error| {
            log::warn!("flock({}, LOCK_SH) failed: {error}", lock_path.display());
            StoreError::Io { action: "lock", path: lock_path, source: error.into() }
        })?;
        Store::with_lock(root, lock)
    }

    fn with_lock(root: PathBuf, lock: File) -> Result<Store, StoreError> {
        let lease = Lease::create(&root)?;
        Ok(Store { root, _lock: Arc::new(lock), lease: Arc::new(lease), hashed_here: Arc::default() })
    }

    /// A clone of this store with a lease of its own, started now and naming nothing yet.
    ///
    /// A long-lived builder runs each build on one: what a build looked up and wrote is then
    /// protected for as long as the build and the images it gave are alive, and no longer, so
    /// that a prune during a `--watch` session can remove what earlier rounds used.
    pub fn with_own_lease(&self) -> Result<Store, StoreError> {
        Ok(Store { lease: Arc::new(Lease::create(&self.root)?), ..self.clone() })
    }

    /// Moves the start of this store's lease to now: what it does not name and was modified
    /// before now is no longer protected by it. Call it only when nothing done through this
    /// store (rather than through a clone [`with_own_lease`](Store::with_own_lease)) is under
    /// way.
    pub fn restart_lease(&self) -> Result<(), StoreError> {
        Ok(self.lease.restart()?)
    }

    /// Marks the records of `keys` as in use by this store until it (its last clone) is
    /// dropped: a prune, here or in another process, keeps them and everything they name.
    /// Call it before looking the records up.
    pub fn protect_keys<'a>(&self, keys: impl IntoIterator<Item = &'a StepKey>) -> Result<(), StoreError> {
        Ok(self.lease.add(keys.into_iter().map(|key| format!("key {}", key.to_hex())))?)
    }

    /// Marks the blob `digest` as in use by this store (see [`Store::protect_keys`]).
    pub fn protect_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        Ok(self.lease.add([format!("blob {}", digest.hex())])?)
    }

    /// Opens the store holding the lock exclusively (for `prune`): waits up to `timeout` for
    /// running builds to finish, then gives up with [`StoreError::Busy`].
    pub fn open_exclusive(root: impl Into<PathBuf>, timeout: Duration) -> Result<Store, StoreError> {
        let root = root.into();
        create_private_directory(&root)?;
        let lock = open_lock_file(&root)?;
        let deadline = Instant::now() + timeout;
        while flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            if Instant::now() >= deadline {
                return Err(StoreError::Busy { path: root });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        remove_stale_temp_files(&root.join("tmp"));
        create_private_layout(&root)?;
        Store::with_lock(root, lock)
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `tmp/`: where files are written before they are renamed into place. It is on the same
    /// filesystem as everything else in the store, so those renames are atomic.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// `snapshots/`: the builder's unpacked layers.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Where the blob `digest` is (or would be) stored.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Whether the blob `digest` is stored (its content is not checked).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens the stored blob `digest` for reading.
    ///
    /// # Errors
    ///
    /// [`StoreError::MissingBlob`] when it is not stored, [`StoreError::Io`] when it cannot be
    /// opened.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, StoreError> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob { digest: digest.clone(), path },
            _ => StoreError::Io { action: "open blob", path, source },
        })
    }

    /// Whether `blob` (the opened file of the blob `digest`) is still the file this store
    /// committed after hashing every byte of it (a new layer, or an imported blob checked
    /// against its digest): same inode, size, mtime and ctime as right after the commit.
    /// Exporters re-hash store blobs to catch a blob that changed since it was hashed; one
    /// this very process hashed and that nothing has written to since need not be read twice
    /// for that. Any write moves the ctime, which the kernel makes fine-grained for a file
    /// whose times were read (as they were here, after the commit).
    pub fn unchanged_since_hashed(&self, digest: &Digest, blob: &File) -> bool {
        let Some(recorded) =
            self.hashed_here.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(digest).copied()
        else {
            return false;
        };
        blob.metadata().is_ok_and(|metadata| FileStamp::of(&metadata) == recorded)
    }

    fn record_hashed_here(&self, digest: &Digest, path: &Path) {
        if let Ok(metadata) = fs::symlink_metadata(path) {
            let stamp = FileStamp::of(&metadata);
            self.hashed_here.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(digest.clone(), stamp);
        }
    }

    /// Re-hashes a stored blob; `Ok(false)` when its content no longer matches its name.
    pub fn verify_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        let path = self.blob_path(digest);
        let mut file = self.open_blob(digest)?;
        let mut hasher = Sha256Writer::new(io::sink());
        io::copy(&mut file, &mut hasher).map_err(StoreError::io("read blob", &path))?;
        Ok(hasher.finish().0 == *digest)
    }

    /// A writer for a new blob: a temp file under `tmp/`, hashed as it is written.
    pub fn blob_writer(&self) -> Result<BlobWriter, StoreError> {
        let tmp = self.tmp_dir();
        let file = NamedTempFile::new_in(&tmp).map_err(StoreError::io("create temp file in", &tmp))?;
        Ok(BlobWriter {
            store: self.clone(),
            buffer: Vec::with_capacity(BLOB_BUFFER),
            written: 0,
            sink: Some(BlobSink::Here(Sha256Writer::new(file))),
        })
    }

    /// Stores `bytes` as a blob (for configs and manifests, which are small).
    pub fn put_blob(&self, bytes: &[u8]) -> Result<BlobInfo, StoreError> {
        let digest = Digest::of_bytes(bytes);
        self.protect_blob(&digest)?;
        if self.has_blob(&digest) {
            return Ok(BlobInfo { path: self.blob_path(&digest), digest, size: bytes.len() as u64 });
        }
        let mut writer = self.blob_writer()?;
        let tmp = self.tmp_dir();
        writer.write_all(bytes).map_err(StoreError::io("write temp file in", &tmp))?;
        writer.commit()
    }

    /// Copies a blob from `reader`, refusing it unless it hashes to `expected`.
    /// The bytes are verified even when the store already holds the blob, so that a corrupt
    /// source is reported rather than silently replaced by the good copy.
    pub fn import_blob(&self, reader: &mut dyn Read, expected: &Digest) -> Result<BlobInfo, StoreError> {
        self.protect_blob(expected)?;
        if self.has_blob(expected) {
            let path = self.blob_path(expected);
            let mut hasher = Sha256Writer::new(io::sink());
            io::copy(reader, &mut hasher).map_err(StoreError::io("read blob for", &path))?;
            let (actual, size, _) = hasher.finish();
            if actual != *expected {
                return Err(StoreError::DigestMismatch { expected: expected.clone(), actual });
            }
            return Ok(BlobInfo { digest: expected.clone(), size, path });
        }
        let mut writer = self.blob_writer()?;
        let tmp = self.tmp_dir();
        io::copy(reader, &mut writer).map_err(StoreError::io("copy blob into", &tmp))?;
        writer.commit_expecting(expected)
    }

    pub(crate) fn action_path(&self, key: &StepKey) -> PathBuf {
        let hex = key.to_hex();
        self.root.join("actions").join(&hex[..2]).join(format!("{hex}.json"))
    }

    /// The record for `key`, if one was committed. A record whose blobs are gone is reported as
    /// absent, so the step is rebuilt rather than exported with a hole.
    pub fn read_action(&self, key: &StepKey) -> Result<Option<ActionRecord>, StoreError> {
        let path = self.action_path(key);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { action: "open action record", path, source }),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(StoreError::io("read action record", &path))?;
        let record: ActionRecord = match serde_json::from_slice(&bytes) {
            Ok(record) => record,
            Err(error) => {
                // A torn or corrupted record is a miss, not a failed build: the step is rebuilt
                // and its record rewritten.
                log::warn!("ignoring unreadable action record {}: {error}", path.display());
                return Ok(None);
            }
        };
        let complete = record.layers.iter().all(|layer| self.has_blob(&layer.digest))
            && record.config.as_ref().is_none_or(|config| self.has_blob(config));
        if complete {
            // The record's mtime is its last use, for least-recently-used pruning. Refreshed
            // through the descriptor already open, and at most once a minute, so that repeated
            // no-op rebuilds do not write an inode per step.
            let now = SystemTime::now();
            let stale = file
                .metadata()
                .and_then(|metadata| metadata.modified())
                .is_ok_and(|used| now.duration_since(used).is_ok_and(|age| age > RECORD_USE_GRANULARITY));
            if stale {
                let _ = file.set_modified(now);
            }
        }
        Ok(complete.then_some(record))
    }

    /// Commits the record for `key`; its blobs must already be stored.
    pub fn write_action(&self, key: &StepKey, record: &ActionRecord) -> Result<(), StoreError> {
        let path = self.action_path(key);
        let parent = path.parent().expect("action paths have a parent");
        create_private_dir_all(parent)?;
        let bytes = serde_json::to_vec(record).expect("action records serialise");
        self.write_file_atomically(&path, &bytes)
    }

    fn index_path(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("indexes").join(format!("{}.json", diff_id.hex()))
    }

    /// The saved index bytes of the layer with `diff_id`, if any.
    pub fn read_index(&self, diff_id: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.index_path(diff_id);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { action: "read layer index", path, source }),
        }
    }

    /// Saves the index bytes of the layer with `diff_id`.
    pub fn write_index(&self, diff_id: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        self.write_file_atomically(&self.index_path(diff_id), bytes)
    }

    /// Writes `bytes` to `path` (inside the cache dir) through a temp file and a rename.
    pub fn write_file_atomically(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let tmp = self.tmp_dir();
        let mut file = NamedTempFile::new_in(&tmp).map_err(StoreError::io("create temp file in", &tmp))?;
        file.write_all(bytes).map_err(StoreError::io("write temp file in", &tmp))?;
        file.as_file().sync_all().map_err(StoreError::io("fsync temp file in", &tmp))?;
        file.persist(path).map_err(|error| StoreError::Io {
            action: "rename into place",
            path: path.to_owned(),
            source: error.error,
        })?;
        Ok(())
    }
}

/// Tells ext2/3/4 that the directories made in `directory` (snapshots being unpacked, RUN
/// directories) are unrelated trees (`chattr +T`, `FS_TOPDIR_FL`): the Orlov allocator then
/// spreads them over block groups with free inodes instead of packing them next to their
/// parent. Without it every snapshot lands in the cache directory's group, where the files of
/// deleted snapshots and caches lie; on a filesystem without a journal, ext4 skips inodes
/// deleted in the last 30 seconds one by one while allocating, which made unpacking a layer of
/// 2,000 files right after a cache was cleared several times slower. Only a placement hint: on
/// other filesystems, or when it cannot be set, nothing changes.
fn mark_unrelated_trees(directory: &Path) {
    let Ok(opened) = File::open(directory) else { return };
    if let Ok(flags) = rustix::fs::ioctl_getflags(&opened)
        && !flags.contains(rustix::fs::IFlags::TOPDIR)
    {
        let _ = rustix::fs::ioctl_setflags(&opened, flags | rustix::fs::IFlags::TOPDIR);
    }
}

/// What tells one version of a file from another without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(metadata: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            inode: metadata.ino(),
            size: metadata.len(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
            ctime: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

/// The directories of the store's layout, below its root.
const LAYOUT: [&str; 8] =
    ["blobs", "blobs/sha256", "actions", "indexes", "provenance", "snapshots", "tmp", crate::lease::LEASES];

/// Creates (or checks) the root with [`create_private_directory`], then each directory of
/// [`LAYOUT`] with mode 0700.
fn create_private_layout(root: &Path) -> Result<(), StoreError> {
    create_private_directory(root)?;
    for sub in LAYOUT {
        let path = root.join(sub);
        private_directory(&path)?;
    }
    Ok(())
}

/// Creates the directory `path` and its missing parents with mode 0700: a directory of the
/// cache that anyone else could read would undo its private root if that were ever opened up.
pub fn create_private_dir_all(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(StoreError::io("create directory", path))
}

/// Creates `path` (and missing parents, with the default mode) as a directory of mode 0700, or
/// checks an existing one: it must belong to this process's user or to root; when it is ours,
/// its mode becomes 0700.
fn create_private_directory(root: &Path) -> Result<(), StoreError> {
    if let Some(parent) = root.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(StoreError::io("create directory", parent))?;
    }
    private_directory(root)?;
    let metadata = fs::metadata(root).map_err(StoreError::io("stat", root))?;
    let uid = rustix::process::geteuid().as_raw();
    let owner = std::os::unix::fs::MetadataExt::uid(&metadata);
    if owner != uid && owner != 0 {
        log::warn!("cache directory {} belongs to uid {owner}, not to {uid}", root.display());
        return Err(StoreError::ForeignOwner { path: root.to_owned(), owner, uid });
    }
    Ok(())
}

/// Creates the directory `path` with mode 0700 (its parent exists), or makes an existing one
/// of ours 0700.
fn private_directory(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => return Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(StoreError::Io { action: "create directory", path: path.to_owned(), source }),
    }
    let metadata = fs::metadata(path).map_err(StoreError::io("stat", path))?;
    if metadata.mode() & 0o077 != 0 && metadata.uid() == rustix::process::geteuid().as_raw() {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(StoreError::io("chmod 0700", path))?;
    }
    Ok(())
}

fn open_lock_file(root: &Path) -> Result<File, StoreError> {
    let path = root.join("lock");
    use std::os::unix::fs::OpenOptionsExt;
    File::options().create(true).truncate(false).read(true).write(true).mode(0o600).open(&path).map_err(|source| {
        log::warn!("open({}) failed: {source}", path.display());
        StoreError::Io { action: "open lock file", path, source }
    })
}

/// Removes what interrupted writers left in `tmp/`. Called only while holding the lock
/// exclusively, so no running writer owns any of it.
fn remove_stale_temp_files(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path).or_else(|_| {
                // A RUN step's overlay work directory holds a directory the kernel made with
                // mode 000, which only root can enter: open up what we own, then retry.
                make_directories_searchable(&path);
                fs::remove_dir_all(&path)
            })
        } else {
            fs::remove_file(&path)
        };
        if let Err(error) = removed {
            log::warn!("cannot remove stale temp file {}: {error}", path.display());
        }
    }
}

/// Gives every directory below `path` (itself included) mode 0700, not following symlinks;
/// errors are left for the removal that follows to report.
pub(crate) fn make_directories_searchable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
    let Ok(entries) = fs::read_dir(path) else { return };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|file_type| file_type.is_dir()) {
            make_directories_searchable(&entry.path());
        }
    }
}

/// Bytes a blob writer gathers before it hashes and writes them.
const BLOB_BUFFER: usize = 256 * 1024;

/// Full buffers that may wait for a blob's hashing thread (bounds the memory of a blob writer).
const BLOB_BUFFERS_IN_FLIGHT: usize = 4;

/// How much of a large file is written before its writeback is started (see
/// [`start_writeback`]).
pub const WRITEBACK_CHUNK: u64 = 8 << 20;

pub use layerwright_sandbox::start_writeback;

/// A blob being written. Dropping it without [`BlobWriter::commit`] deletes the temp file.
///
/// A blob larger than one buffer is hashed and written by a thread of its own, so that the
/// sha256 of the blob (the most expensive part of storing an uncompressed layer) runs on
/// another core than whatever produces the bytes (reading and hashing sources, compressing).
pub struct BlobWriter {
    store: Store,
    buffer: Vec<u8>,
    written: u64,
    /// `None` only while switching from [`BlobSink::Here`] to [`BlobSink::Thread`].
    sink: Option<BlobSink>,
}

type HashedFile = Sha256Writer<NamedTempFile>;

enum BlobSink {
    /// Hashed and written on the caller's thread (small blobs never start a thread).
    Here(HashedFile),
    /// Full buffers go to `worker`, which sends them back through `spare` for reuse.
    Thread {
        sender: mpsc::SyncSender<Vec<u8>>,
        spare: mpsc::Receiver<Vec<u8>>,
        worker: JoinHandle<io::Result<HashedFile>>,
    },
}

impl BlobWriter {
    /// How many bytes were written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Fsyncs and renames the blob into `blobs/sha256/<digest>`.
    pub fn commit(self) -> Result<BlobInfo, StoreError> {
        self.finish(None)
    }

    /// As [`BlobWriter::commit`], but refuses (and deletes) a blob whose digest is not `expected`.
    pub fn commit_expecting(self, expected: &Digest) -> Result<BlobInfo, StoreError> {
        self.finish(Some(expected))
    }

    /// Hands the full buffer on: to the hashing thread, started by the first full buffer.
    fn write_buffer(&mut self) -> io::Result<()> {
        if let Some(BlobSink::Here(_)) = &self.sink {
            let Some(BlobSink::Here(mut hashed)) = self.sink.take() else { unreachable!("matched above") };
            let (sender, receiver) = mpsc::sync_channel::<Vec<u8>>(BLOB_BUFFERS_IN_FLIGHT);
            let (spare_sender, spare) = mpsc::channel();
            let worker = std::thread::Builder::new().name("layerwright-blob".into()).spawn(move || {
                // How far the file was written, and how far its writeback was started.
                let (mut written, mut flushing) = (0u64, 0u64);
                for buffer in receiver {
                    hashed.write_all(&buffer)?;
                    written += buffer.len() as u64;
                    if written - flushing >= WRITEBACK_CHUNK {
                        start_writeback(hashed.get_ref().as_file(), flushing, written - flushing);
                        flushing = written;
                    }
                    // The writer may be gone (it failed); then the buffer is simply freed.
                    let _ = spare_sender.send(buffer);
                }
                Ok(hashed)
            })?;
            self.sink = Some(BlobSink::Thread { sender, spare, worker });
        }
        let Some(BlobSink::Thread { sender, spare, .. }) = &self.sink else {
            unreachable!("the thread was started above")
        };
        let next = spare.try_recv().unwrap_or_else(|_| Vec::with_capacity(BLOB_BUFFER));
        let full = std::mem::replace(&mut self.buffer, next);
        if sender.send(full).is_err() {
            // The thread stopped at a write error: finishing it reports that error.
            return match self.finish_sink() {
                Ok(_) => Err(io::Error::other("the blob writing thread stopped")),
                Err(error) => Err(error),
            };
        }
        self.buffer.clear();
        Ok(())
    }

    /// Writes what is buffered and returns the hashed file (joining the thread, if any).
    fn finish_sink(&mut self) -> io::Result<HashedFile> {
        let buffer = std::mem::take(&mut self.buffer);
        match self.sink.take() {
            Some(BlobSink::Here(mut hashed)) => {
                hashed.write_all(&buffer)?;
                Ok(hashed)
            }
            Some(BlobSink::Thread { sender, worker, .. }) => {
                let sent = buffer.is_empty() || sender.send(buffer).is_ok();
                drop(sender);
                let hashed = worker.join().map_err(|_| io::Error::other("the blob writing thread panicked"))??;
                if !sent {
                    return Err(io::Error::other("the blob writing thread stopped"));
                }
                Ok(hashed)
            }
            None => Err(io::Error::other("the blob writer failed earlier")),
        }
    }

    fn finish(mut self, expected: Option<&Digest>) -> Result<BlobInfo, StoreError> {
        let tmp = self.store.tmp_dir();
        let hashed = self.finish_sink().map_err(StoreError::io("write temp file in", &tmp))?;
        let (digest, size, file) = hashed.finish();
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(StoreError::DigestMismatch { expected: expected.clone(), actual: digest });
        }
        let path = self.store.blob_path(&digest);
        self.store.protect_blob(&digest)?;
        if path.is_file() {
            // Someone else's copy, which this process has not read: not recorded as hashed here.
            return Ok(BlobInfo { digest, size, path });
        }
        file.as_file().sync_all().map_err(StoreError::io("fsync temp file in", &tmp))?;
        file.persist(&path).map_err(|error| StoreError::Io {
            action: "rename blob to",
            path: path.clone(),
            source: error.error,
        })?;
        self.store.record_hashed_here(&digest, &path);
        Ok(BlobInfo { digest, size, path })
    }
}

impl Drop for BlobWriter {
    /// An abandoned blob: the thread (if any) is stopped and waited for, so that its temp
    /// file is gone once the writer is.
    fn drop(&mut self) {
        if let Some(BlobSink::Thread { sender, worker, .. }) = self.sink.take() {
            drop(sender);
            let _ = worker.join();
        }
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        if self.buffer.len() == BLOB_BUFFER {
            self.write_buffer()?;
        }
        let taken = buffer.len().min(BLOB_BUFFER - self.buffer.len());
        self.buffer.extend_from_slice(&buffer[..taken]);
        self.written += taken as u64;
        Ok(taken)
    }

    /// Nothing to do: every byte reaches the file by [`BlobWriter::commit`], the only way to
    /// keep a blob.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::MetadataExt;
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn the_cache_directory_and_its_layout_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let store = Store::open(&root).unwrap();
        store.put_blob(b"blob").unwrap();
        store
            .write_action(&StepKey::builder().str("test").finish(), &ActionRecord { layers: vec![], config: None })
            .unwrap();
        drop(store);
        let mut modes = Vec::new();
        for entry in walk(&root) {
            let expected = if entry.is_dir() { 0o700 } else { 0o600 };
            modes.push((entry.clone(), mode_of(&entry), expected));
        }
        assert!(modes.len() > 8, "{modes:?}");
        for (path, mode, expected) in &modes {
            assert_eq!(*mode, *expected, "{path:?} has mode {mode:o}");
        }
        // A cache directory an older version made world-readable is made private on open.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(root.join("snapshots"), fs::Permissions::from_mode(0o755)).unwrap();
        Store::open(&root).unwrap();
        assert_eq!((mode_of(&root), mode_of(&root.join("snapshots"))), (0o700, 0o700));
    }

    fn walk(path: &Path) -> Vec<PathBuf> {
        let mut found = vec![path.to_owned()];
        if path.is_dir() {
            for entry in fs::read_dir(path).unwrap() {
                found.extend(walk(&entry.unwrap().path()));
            }
        }
        found
    }

    #[test]
    fn a_cache_directory_of_another_non_root_user_is_refused() {
        if !rustix::process::geteuid().is_root() {
            return; // Only root can give a directory to another user.
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        fs::create_dir(&root).unwrap();
        std::os::unix::fs::chown(&root, Some(65534), Some(65534)).unwrap();
        let error = Store::open(&root).unwrap_err();
        assert!(matches!(error, StoreError::ForeignOwner { owner: 65534, uid: 0, .. }), "{error:?}");
        assert!(error.to_string().contains("belongs to uid 65534"), "{error}");
        assert!(matches!(Store::open_exclusive(&root, Duration::ZERO), Err(StoreError::ForeignOwner { .. })));
        // Root's own is fine.
        std::os::unix::fs::chown(&root, Some(0), Some(0)).unwrap();
        Store::open(&root).unwrap();
    }

    #[test]
    fn blobs_are_content_addressed_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let info = store.put_blob(b"config").unwrap();
        assert_eq!(info.digest, Digest::of_bytes(b"config"));
        assert_eq!(fs::read(store.blob_path(&info.digest)).unwrap(), b"config");
        assert!(store.verify_blob(&info.digest).unwrap());

        let wrong = Digest::of_bytes(b"other");
        let error = store.import_blob(&mut &b"config!"[..], &wrong).unwrap_err();
        assert!(matches!(error, StoreError::DigestMismatch { .. }), "{error}");
        assert!(!store.has_blob(&wrong));
        assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0, "temp files are cleaned up");

        fs::write(store.blob_path(&info.digest), b"flipped").unwrap();
        assert!(!store.verify_blob(&info.digest).unwrap());
    }

    #[test]
    fn records_naming_missing_blobs_read_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let blob = store.put_blob(b"layer").unwrap();
        let key = StepKey::builder().str("k").finish();
        let record = ActionRecord {
            layers: vec![LayerRecord {
                diff_id: blob.digest.clone(),
                digest: blob.digest.clone(),
                size: 5,
                media_type: "m".into(),
            }],
            config: None,
        };
        assert_eq!(store.read_action(&key).unwrap(), None);
        store.write_action(&key, &record).unwrap();
        assert_eq!(store.read_action(&key).unwrap(), Some(record));
        fs::remove_file(&blob.path).unwrap();
        assert_eq!(store.read_action(&key).unwrap(), None);
    }
}
