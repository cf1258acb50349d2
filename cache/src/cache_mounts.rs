//! The directories of RUN cache mounts (`Mount::cache`): kept under `mounts/cache/` of the cache
//! directory across builds, one per id, never in a layer, a key or a record.
//!
//! Layout: `mounts/cache/<hash>` is the directory of the id whose blake3 starts with `<hash>`
//! (32 hex digits), `<hash>-<n>` the further directories of a `Private` id used concurrently,
//! `<name>.lock` the lock file of each directory (its mtime is when a step last used it, for
//! pruning least recently used first) and `<hash>.id` the id in text, for `cache du`.
//!
//! Sharing ([`CacheMountSharing`]): a `Shared` user holds the lock file shared, a `Locked` one
//! exclusive (so it waits for every other user, in this process or another); a `Private` user
//! takes the first directory whose lock it can hold exclusive without waiting. A lease
//! ([`CacheMountLease`]) holds its lock until it is dropped.
//!
//! A directory is made whole before it has its name (made under a temporary name with its mode
//! and owner, then renamed without replacing), so a concurrent user never sees it half made.
//! Its contents belong to RUN steps and are never followed: a step may have left symlinks in it,
//! so the sandbox opens the directory itself relative to [`CacheMountLease::parent`] with
//! `O_NOFOLLOW` and binds that, and pruning removes it without following links.
//!
//! What this module deliberately is not: the mount itself (the sandbox's), or a policy on what
//! a step keeps there.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustix::fs::{FlockOperation, flock};

use crate::{Store, StoreError};

/// How many directories a `Private` id may have at once.
const MAX_PRIVATE_DIRECTORIES: usize = 1024;

/// How concurrent users share one cache mount id (the dsl's `Sharing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMountSharing {
    /// Everyone uses the same directory at once.
    Shared,
    /// One user at a time.
    Locked,
    /// Each concurrent user has a directory of its own.
    Private,
}

/// How a cache mount's directory is created (an existing one is left as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheMountOptions {
    /// Permission bits.
    pub mode: u32,
    /// Owner (uid, gid); `None` leaves it to the caller (root, or the caller when rootless).
    pub owner: Option<(u32, u32)>,
}

/// A cache mount directory in use: its lock is held until the lease is dropped.
#[derive(Debug)]
pub struct CacheMountLease {
    parent: PathBuf,
    name: String,
    _lock: File,
}

impl CacheMountLease {
    /// The directory holding the cache mount directories (the builder's own, no step writes
    /// there).
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// The directory's name in [`CacheMountLease::parent`]: one component, to open with
    /// `O_NOFOLLOW`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// One cache mount directory, as `cache du` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheMountUsage {
    /// The id it was declared with (`?` if its id file is gone).
    pub id: String,
    /// The directory.
    pub path: PathBuf,
    /// Bytes of the files in it.
    pub bytes: u64,
    /// When a step last used it.
    pub last_used: SystemTime,
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| {
        log::warn!("cache mounts: cannot {action} {}: {source}", path.display());
        StoreError::Io { action, path, source }
    }
}

/// The first 32 hex digits of the id's blake3: a file name whatever the id holds.
fn id_hash(id: &str) -> String {
    blake3::hash(id.as_bytes()).to_hex()[..32].to_owned()
}

impl Store {
    /// `mounts/cache/` of the cache directory.
    pub fn cache_mounts_dir(&self) -> PathBuf {
        self.root().join("mounts/cache")
    }

    /// The directory of cache mount `id`, created with `options` if it does not exist, held
    /// as `sharing` says (waiting for a `Locked` id's user to finish).
    pub fn acquire_cache_mount(
        &self,
        id: &str,
        sharing: CacheMountSharing,
        options: CacheMountOptions,
    ) -> Result<CacheMountLease, StoreError> {
        let parent = self.cache_mounts_dir();
        fs::create_dir_all(&parent).map_err(io_error("create", &parent))?;
        let hash = id_hash(id);
        let id_file = parent.join(format!("{hash}.id"));
        if !id_file.exists() {
            fs::write(&id_file, id).map_err(io_error("write", &id_file))?;
        }
        let open_lock = |name: &str| -> Result<File, StoreError> {
            let path = parent.join(format!("{name}.lock"));
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_error("open", &path))
        };
        let lock_error = |name: &str, operation: &'static str| {
            let path = parent.join(format!("{name}.lock"));
            move |error: rustix::io::Errno| {
                log::warn!("flock({}, {operation}) failed: {error}", path.display());
                StoreError::Io { action: "lock", path, source: error.into() }
            }
        };
        let (name, lock) = match sharing {
            CacheMountSharing::Shared | CacheMountSharing::Locked => {
                let lock = open_lock(&hash)?;
                let (operation, text) = if sharing == CacheMountSharing::Shared {
                    (FlockOperation::LockShared, "LOCK_SH")
                } else {
                    (FlockOperation::LockExclusive, "LOCK_EX")
                };
                flock(&lock, operation).map_err(lock_error(&hash, text))?;
                (hash.clone(), lock)
            }
            CacheMountSharing::Private => {
                let mut found = None;
                for index in 0..MAX_PRIVATE_DIRECTORIES {
                    let name = if index == 0 { hash.clone() } else { format!("{hash}-{index}") };
                    let lock = open_lock(&name)?;
                    match flock(&lock, FlockOperation::NonBlockingLockExclusive) {
                        Ok(()) => {
                            found = Some((name, lock));
                            break;
                        }
                        Err(rustix::io::Errno::WOULDBLOCK) => continue,
                        Err(error) => return Err(lock_error(&name, "LOCK_EX | LOCK_NB")(error)),
                    }
                }
                found.ok_or_else(|| StoreError::Io {
                    action: "find a free private directory for",
                    path: parent.join(&hash),
                    source: io::Error::other(format!("{MAX_PRIVATE_DIRECTORIES} are in use")),
                })?
            }
        };
        // Used now: the lock file's mtime orders pruning.
        let lock_path = parent.join(format!("{name}.lock"));
        lock.set_modified(SystemTime::now()).map_err(io_error("touch", &lock_path))?;
        ensure_directory(&parent, &name, options)?;
        Ok(CacheMountLease { parent, name, _lock: lock })
    }

    /// Every cache mount directory with its id and size, least recently used first.
    pub fn cache_mount_usage(&self) -> Vec<CacheMountUsage> {
        let parent = self.cache_mounts_dir();
        let Ok(entries) = fs::read_dir(&parent) else { return Vec::new() };
        let mut usage = Vec::new();
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            if name.contains('.') || !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            let base = name.split('-').next().unwrap_or(&name);
            let id = fs::read_to_string(parent.join(format!("{base}.id"))).unwrap_or_else(|_| "?".to_owned());
            let last_used = fs::metadata(parent.join(format!("{name}.lock")))
                .and_then(|metadata| metadata.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let (bytes, _) = crate::gc::Walk::default().size(&entry.path());
            usage.push(CacheMountUsage { id, path: entry.path(), bytes, last_used });
        }
        usage.sort_by(|left, right| (left.last_used, &left.path).cmp(&(right.last_used, &right.path)));
        usage
    }

    /// Removes cache mount directories, least recently used first, while `total` is above
    /// `keep_bytes`; returns how many were removed and the bytes freed. For a store opened
    /// exclusive (no build holds a cache mount); a directory whose lock is held anyway is
    /// skipped.
    pub(crate) fn prune_cache_mounts(&self, keep_bytes: u64, total: &mut u64) -> Result<(u64, u64), StoreError> {
        let (mut removed, mut freed) = (0, 0);
        for mount in self.cache_mount_usage() {
            if *total <= keep_bytes {
                break;
            }
            let name = mount.path.file_name().and_then(|name| name.to_str()).unwrap_or_default().to_owned();
            let lock_path = self.cache_mounts_dir().join(format!("{name}.lock"));
            let lock = File::options().read(true).write(true).create(true).truncate(false).open(&lock_path);
            let Ok(lock) = lock else { continue };
            if flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
                continue;
            }
            // `remove_dir_all` does not follow symlinks: a link a step left points nowhere here.
            match fs::remove_dir_all(&mount.path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(io_error("remove", &mount.path)(source)),
            }
            let _ = fs::remove_file(&lock_path);
            removed += 1;
            freed += mount.bytes;
            *total = total.saturating_sub(mount.bytes);
        }
        Ok((removed, freed))
    }
}

/// Creates `parent/name` with `options` unless it exists: made under a temporary name, then
/// renamed without replacing (a concurrent user that made it first wins).
fn ensure_directory(parent: &Path, name: &str, options: CacheMountOptions) -> Result<(), StoreError> {
    let path = parent.join(name);
    match fs::symlink_metadata(&path) {
        Ok(metadata) if metadata.is_dir() => return Ok(()),
        Ok(_) => {
            // Not something the builder makes; a directory takes its place.
            fs::remove_file(&path).map_err(io_error("remove", &path))?;
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(io_error("inspect", &path)(source)),
    }
    let temporary = tempfile::Builder::new()
        .prefix(&format!("{name}.tmp-"))
        .tempdir_in(parent)
        .map_err(io_error("create a directory in", parent))?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(temporary.path(), fs::Permissions::from_mode(options.mode))
            .map_err(io_error("chmod", temporary.path()))?;
    }
    if let Some((uid, gid)) = options.owner {
        std::os::unix::fs::lchown(temporary.path(), Some(uid), Some(gid))
            .map_err(io_error("chown", temporary.path()))?;
    }
    let made = temporary.keep();
    match rustix::fs::renameat_with(rustix::fs::CWD, &made, rustix::fs::CWD, &path, rustix::fs::RenameFlags::NOREPLACE)
    {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => {
            let _ = fs::remove_dir(&made);
            Ok(())
        }
        Err(error) => {
            let _ = fs::remove_dir(&made);
            Err(io_error("rename a new directory to", &path)(error.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn a_directory_is_made_once_with_its_options_and_kept() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let options = CacheMountOptions { mode: 0o700, owner: None };
        let lease = store.acquire_cache_mount("/root/.cache", CacheMountSharing::Shared, options).unwrap();
        let path = lease.parent().join(lease.name());
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o700);
        fs::write(path.join("kept"), b"x").unwrap();
        drop(lease);
        let again = store
            .acquire_cache_mount(
                "/root/.cache",
                CacheMountSharing::Locked,
                CacheMountOptions { mode: 0o755, owner: None },
            )
            .unwrap();
        assert_eq!(again.name(), lease_name("/root/.cache"));
        let path = again.parent().join(again.name());
        assert!(path.join("kept").exists(), "the contents outlive the lease");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o700, "an existing directory is left as it is");
        let usage = store.cache_mount_usage();
        assert_eq!(usage.len(), 1);
        // As `du -sb` counts: the directory itself and the one-byte file.
        let directory_bytes = fs::symlink_metadata(&path).unwrap().len();
        assert_eq!((usage[0].id.as_str(), usage[0].bytes), ("/root/.cache", directory_bytes + 1));
    }

    fn lease_name(id: &str) -> String {
        id_hash(id)
    }

    #[test]
    fn private_users_get_a_directory_each_and_shared_users_the_same() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let options = CacheMountOptions { mode: 0o755, owner: None };
        let first = store.acquire_cache_mount("id", CacheMountSharing::Private, options).unwrap();
        let second = store.acquire_cache_mount("id", CacheMountSharing::Private, options).unwrap();
        assert_ne!(first.name(), second.name());
        drop(second);
        let third = store.acquire_cache_mount("id", CacheMountSharing::Private, options).unwrap();
        assert_eq!(third.name(), format!("{}-1", id_hash("id")), "a free directory is reused");
        let shared = store.acquire_cache_mount("other", CacheMountSharing::Shared, options).unwrap();
        let shared_too = store.acquire_cache_mount("other", CacheMountSharing::Shared, options).unwrap();
        assert_eq!(shared.name(), shared_too.name());
    }

    #[test]
    fn pruning_removes_least_recently_used_first_without_following_links() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("precious"), b"keep me").unwrap();
        let store = Store::open(root.path()).unwrap();
        let options = CacheMountOptions { mode: 0o755, owner: None };
        for (id, age) in [("old", 100), ("new", 0)] {
            let lease = store.acquire_cache_mount(id, CacheMountSharing::Shared, options).unwrap();
            let path = lease.parent().join(lease.name());
            fs::write(path.join("data"), vec![0u8; 1000]).unwrap();
            std::os::unix::fs::symlink(outside.path(), path.join("link")).unwrap();
            let lock = File::options().write(true).open(lease.parent().join(format!("{}.lock", lease.name()))).unwrap();
            lock.set_modified(SystemTime::now() - std::time::Duration::from_secs(age)).unwrap();
        }
        // One directory over the limit: only the least recently used one goes.
        let before: u64 = store.cache_mount_usage().iter().map(|usage| usage.bytes).sum();
        let mut total = before;
        let (removed, freed) = store.prune_cache_mounts(before - 1, &mut total).unwrap();
        // The directory, its file and its link (the link's length) are freed.
        assert_eq!((removed, total), (1, before - freed));
        assert!(freed >= 1000);
        let left: Vec<String> = store.cache_mount_usage().into_iter().map(|usage| usage.id).collect();
        assert_eq!(left, ["new"]);
        assert!(outside.path().join("precious").exists(), "a symlink in a cache mount is not followed");
    }
}
