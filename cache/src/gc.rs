//! Cache management: how much the cache holds (`du`) and pruning it under a policy (`prune`),
//! least recently used first.
//!
//! **Disk usage** counts every byte under the cache directory the way `du -sb` (GNU du with
//! `--apparent-size --block-size=1`) does: the size (`st_size`) of every entry, directories
//! and the root included, symlinks not followed, a file with several hard links once.
//!
//! **What a prune removes.** The cache holds the store's own entries (blobs, action records,
//! layer indexes, provenance records, temp files) and directories the builder declares, each
//! with how its entries relate to records ([`CacheDirectory`], [`Attachment`]): RUN snapshots
//! and recompressed layers belong to a layer's diff id, RUN logs to a step key, gzip block maps
//! and resolved tags stand alone. The units of least-recently-used order are action records
//! (used when last hit: a hit refreshes the record's mtime) and standalone entries (used when
//! last written). Removing a record removes the blobs and diff-id entries no remaining record
//! names and the step-key entries of its key. Garbage goes first, oldest first: blobs and
//! diff-id or step-key entries that no record names, and temp files older than every running
//! build. Kept always: the stat cache, the locks and the leases.
//!
//! **The policy** ([`PrunePolicy`], BuildKit's GC policy): entries not used for
//! `keep_duration` go; then, least recently used first, entries go until the cache holds at most
//! `keep_bytes` (`maxUsedSpace`) and the filesystem has at least `min_free_bytes` free
//! (`minFreeSpace`); no rule prunes the cache below `reserved_bytes` (`reservedSpace`).
//!
//! **Running builds.** A prune never removes what an open store uses (see the `lease` module):
//! records of the keys it looked up, the blobs it wrote or named, and anything modified since
//! the oldest open store was opened. It may run beside builds, in this process or others, and
//! holds their registrations off while it removes. A prune can make a later build slower
//! (it rebuilds what was removed), never wrong.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::lease::{self, GcGuard};
use crate::{ActionRecord, Store, StoreError};

/// How the entries of a directory under the cache relate to the cache's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Attachment {
    /// Each entry's name starts with the hex of a layer's diff id: it is removed when no
    /// remaining record names that layer (snapshots, layer indexes, recompressed layers).
    DiffId,
    /// Each entry's name starts with the hex of a step key: it is removed with that key's
    /// record (RUN logs).
    StepKey,
    /// Each entry stands alone, last used when last modified, and takes its turn in
    /// least-recently-used order with the records (gzip block maps, resolved tags).
    Standalone,
}

/// A directory directly under the cache root that a user of the store (the builder) writes,
/// and how a prune treats its entries. The store knows its own directories; the builder
/// declares its own with these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheDirectory {
    /// Its name under the cache root.
    pub name: &'static str,
    /// How its entries are pruned.
    pub attachment: Attachment,
}

impl CacheDirectory {
    /// The directory `name`, its entries pruned as `attachment` says.
    pub const fn new(name: &'static str, attachment: Attachment) -> CacheDirectory {
        CacheDirectory { name, attachment }
    }
}

/// The store's own directories whose entries a prune treats like declared ones.
const OWN_DIRECTORIES: [CacheDirectory; 2] =
    [CacheDirectory::new("indexes", Attachment::DiffId), CacheDirectory::new("provenance", Attachment::Standalone)];

/// What a prune keeps; every field `None` keeps everything. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PrunePolicy {
    /// The most bytes the cache may hold (BuildKit's `maxUsedSpace`).
    pub keep_bytes: Option<u64>,
    /// How long an entry is kept after its last use (BuildKit's `keepDuration`).
    pub keep_duration: Option<Duration>,
    /// The free space the cache's filesystem must keep, in bytes (BuildKit's `minFreeSpace`).
    pub min_free_bytes: Option<u64>,
    /// Bytes the cache may always keep, whatever the other rules say (BuildKit's
    /// `reservedSpace`).
    pub reserved_bytes: Option<u64>,
}

impl PrunePolicy {
    /// A policy that keeps everything.
    pub fn new() -> PrunePolicy {
        PrunePolicy::default()
    }

    /// This policy, keeping at most `bytes` in the cache.
    pub fn keep_bytes(mut self, bytes: u64) -> PrunePolicy {
        self.keep_bytes = Some(bytes);
        self
    }

    /// This policy, removing what was not used for `duration`.
    pub fn keep_duration(mut self, duration: Duration) -> PrunePolicy {
        self.keep_duration = Some(duration);
        self
    }

    /// This policy, keeping at least `bytes` free on the cache's filesystem.
    pub fn min_free_bytes(mut self, bytes: u64) -> PrunePolicy {
        self.min_free_bytes = Some(bytes);
        self
    }

    /// This policy, never pruning the cache below `bytes`.
    pub fn reserved_bytes(mut self, bytes: u64) -> PrunePolicy {
        self.reserved_bytes = Some(bytes);
        self
    }

    /// Whether the policy removes nothing, ever.
    pub fn keeps_everything(&self) -> bool {
        self.keep_bytes.is_none() && self.keep_duration.is_none() && self.min_free_bytes.is_none()
    }

    /// The size the cache must be brought down to, given its `total` and the filesystem's
    /// `free` bytes; `None` when no size rule asks for anything.
    fn size_target(&self, total: u64, free: u64) -> Option<u64> {
        let by_size = self.keep_bytes;
        let by_free =
            self.min_free_bytes.filter(|wanted| free < *wanted).map(|wanted| total.saturating_sub(wanted - free));
        let target = match (by_size, by_free) {
            (Some(left), Some(right)) => left.min(right),
            (left, right) => left.or(right)?,
        };
        Some(target.max(self.reserved_bytes.unwrap_or(0)))
    }

    /// Whether a cache of `usage`, on a filesystem with `free` bytes free, is over this policy
    /// (always true with a `keep_duration`: only a prune can tell what has aged out).
    pub fn is_exceeded_by(&self, usage: &DiskUsage, free: u64) -> bool {
        self.keep_duration.is_some()
            || self.size_target(usage.total(), free).is_some_and(|target| usage.total() > target)
    }
}

/// Bytes held by each part of the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiskUsage {
    /// Bytes of the blobs (layers, configs, manifests), their directories included.
    pub blobs: u64,
    /// How many blobs there are.
    pub blob_count: u64,
    /// Bytes of the action records, their directories included.
    pub records: u64,
    /// How many action records there are.
    pub record_count: u64,
    /// Bytes below each entry directly under the cache directory, by name (a directory with
    /// everything below it and itself): every byte of the cache but its root's own.
    pub parts: BTreeMap<String, u64>,
    /// The size of the cache directory itself.
    root: u64,
}

impl DiskUsage {
    /// Every byte under the cache directory, as `du -sb` counts them.
    pub fn total(&self) -> u64 {
        self.root + self.parts.values().sum::<u64>()
    }
}

/// What a prune removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PruneReport {
    /// How many action records were removed.
    pub removed_records: u64,
    /// How many blobs were removed.
    pub removed_blobs: u64,
    /// How many other entries were removed (snapshots, logs, indexes, maps, temp files, ...).
    pub removed_other: u64,
    /// Bytes removed.
    pub freed_bytes: u64,
    /// Bytes the cache holds afterwards.
    pub remaining_bytes: u64,
    /// How many RUN cache mount directories were removed.
    pub removed_cache_mounts: u64,
}

/// Sizes below a path as `du -sb` counts them: each inode once.
#[derive(Default)]
pub(crate) struct Walk {
    seen: HashSet<(u64, u64)>,
}

impl Walk {
    /// The bytes of `path` and everything below it (symlinks not followed), and how many
    /// non-directories it holds.
    pub(crate) fn size(&mut self, path: &Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let Ok(metadata) = fs::symlink_metadata(path) else { return (0, 0) };
        let mut total = (0, 0);
        if metadata.nlink() <= 1 || metadata.is_dir() || self.seen.insert((metadata.dev(), metadata.ino())) {
            total.0 = metadata.len();
        }
        if !metadata.is_dir() {
            return (total.0, 1);
        }
        // Iteratively: snapshots can be deep.
        let mut pending = vec![path.to_owned()];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let Ok(metadata) = entry.metadata() else { continue };
                if metadata.is_dir() {
                    total.0 += metadata.len();
                    pending.push(entry.path());
                    continue;
                }
                total.1 += 1;
                if metadata.nlink() <= 1 || self.seen.insert((metadata.dev(), metadata.ino())) {
                    total.0 += metadata.len();
                }
            }
        }
        total
    }
}

fn modified(path: &Path) -> SystemTime {
    fs::symlink_metadata(path).and_then(|metadata| metadata.modified()).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The free bytes (for an unprivileged user) of the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64, StoreError> {
    let stat = rustix::fs::statvfs(path).map_err(|error| StoreError::Io {
        action: "statvfs",
        path: path.to_owned(),
        source: error.into(),
    })?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// One thing a prune may remove.
#[derive(Debug)]
enum Unit {
    /// An action record: its key (hex) and what it names.
    Record { key: String, record: ActionRecord },
    /// A blob no record names.
    Blob { hex: String },
    /// An entry of a directory attached to diff ids or keys, or standing alone, or a temp file.
    Other,
}

#[derive(Debug)]
struct Candidate {
    path: PathBuf,
    used: SystemTime,
    unit: Unit,
}

impl Store {
    /// How many bytes each part of the cache holds (a walk of the cache dir; no lock needed).
    pub fn disk_usage(&self) -> DiskUsage {
        let mut walk = Walk::default();
        let mut usage = DiskUsage {
            root: fs::symlink_metadata(self.root()).map_or(0, |metadata| metadata.len()),
            ..DiskUsage::default()
        };
        let Ok(entries) = fs::read_dir(self.root()) else { return usage };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (bytes, count) = walk.size(&entry.path());
            match name.as_str() {
                "blobs" => (usage.blobs, usage.blob_count) = (bytes, count),
                "actions" => (usage.records, usage.record_count) = (bytes, count),
                _ => {}
            }
            usage.parts.insert(name, bytes);
        }
        usage
    }

    /// Removes what `policy` says must go, least recently used first, never what an open
    /// store uses (see the module documentation). `directories` are the directories the
    /// builder keeps under the cache; entries of other unknown directories are left alone.
    pub fn prune(&self, policy: &PrunePolicy, directories: &[CacheDirectory]) -> Result<PruneReport, StoreError> {
        let free = free_bytes(self.root())?;
        self.prune_with_free(policy, directories, free)
    }

    /// [`Store::prune`] with the filesystem's free space given (for tests of `min_free_bytes`).
    pub fn prune_with_free(
        &self,
        policy: &PrunePolicy,
        directories: &[CacheDirectory],
        free: u64,
    ) -> Result<PruneReport, StoreError> {
        let _guard = GcGuard::acquire(self.root())?;
        let started = SystemTime::now();
        let live = lease::read_live(self.root());
        // Nothing modified since the oldest open store started (or since this prune started)
        // is removed; the slack covers coarse filesystem timestamps.
        let cutoff = live.oldest_start.map_or(started, |oldest| oldest.min(started)) - Duration::from_secs(2);
        let aged_out = |used: SystemTime| policy.keep_duration.is_some_and(|keep| used + keep < started);

        let mut total = self.disk_usage().total();
        let mut report = PruneReport::default();
        let target = policy.size_target(total, free);
        let reserved = policy.reserved_bytes.unwrap_or(0);

        let records = self.all_records()?;
        let mut blob_references: HashMap<String, usize> = HashMap::new();
        let mut diff_references: HashMap<String, usize> = HashMap::new();
        for (_, _, _, record) in &records {
            for hex in record_blobs(record) {
                *blob_references.entry(hex).or_default() += 1;
            }
            for hex in record_diff_ids(record) {
                *diff_references.entry(hex).or_default() += 1;
            }
        }
        let record_keys: HashSet<String> = records.iter().map(|(_, key, _, _)| key.clone()).collect();

        // Entries attached to diff ids and keys, by id, and the standalone ones.
        let mut by_diff_id: HashMap<String, Vec<PathBuf>> = HashMap::new();
        let mut by_key: HashMap<String, Vec<PathBuf>> = HashMap::new();
        let mut garbage: Vec<Candidate> = Vec::new();
        let mut ordered: Vec<Candidate> = Vec::new();
        for directory in OWN_DIRECTORIES.iter().chain(directories) {
            let Ok(entries) = fs::read_dir(self.root().join(directory.name)) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                let id = name.get(..64).unwrap_or(&name).to_owned();
                let named_by_id = id.len() == 64 && id.bytes().all(|byte| byte.is_ascii_hexdigit());
                match directory.attachment {
                    // Not named after a diff id or key (a fixed entry such as an empty lower
                    // directory): left alone.
                    Attachment::DiffId | Attachment::StepKey if !named_by_id => {}
                    Attachment::DiffId if diff_references.contains_key(&id) => {
                        by_diff_id.entry(id).or_default().push(path)
                    }
                    Attachment::StepKey if record_keys.contains(&id) => by_key.entry(id).or_default().push(path),
                    Attachment::DiffId | Attachment::StepKey => {
                        garbage.push(Candidate { used: modified(&path), path, unit: Unit::Other })
                    }
                    Attachment::Standalone => {
                        ordered.push(Candidate { used: modified(&path), path, unit: Unit::Other })
                    }
                }
            }
        }
        for (hex, (path, used)) in self.all_blobs()? {
            if !blob_references.contains_key(&hex) {
                garbage.push(Candidate { path, used, unit: Unit::Blob { hex } });
            }
        }
        if let Ok(entries) = fs::read_dir(self.tmp_dir()) {
            for entry in entries.flatten() {
                let path = entry.path();
                garbage.push(Candidate { used: modified(&path), path, unit: Unit::Other });
            }
        }
        for (path, key, used, record) in records {
            ordered.push(Candidate { path, used, unit: Unit::Record { key, record } });
        }
        garbage.sort_by_key(|candidate| candidate.used);
        ordered.sort_by_key(|candidate| candidate.used);

        let mut walk = Walk::default();
        let mut remove = |path: &Path, total: &mut u64, report: &mut PruneReport| -> Result<bool, StoreError> {
            let (bytes, _) = walk.size(path);
            if !remove_path(path)? {
                return Ok(false);
            }
            report.freed_bytes += bytes;
            *total = total.saturating_sub(bytes);
            Ok(true)
        };
        for candidate in garbage.into_iter().chain(ordered) {
            if total <= reserved {
                break;
            }
            let over = target.is_some_and(|target| total > target);
            if !(over || aged_out(candidate.used)) || candidate.used >= cutoff {
                continue;
            }
            match candidate.unit {
                Unit::Blob { hex } => {
                    if !live.blobs.contains(&hex) && remove(&candidate.path, &mut total, &mut report)? {
                        report.removed_blobs += 1;
                    }
                }
                Unit::Other => {
                    if remove(&candidate.path, &mut total, &mut report)? {
                        report.removed_other += 1;
                    }
                }
                Unit::Record { key, record } => {
                    if live.keys.contains(&key) || !remove(&candidate.path, &mut total, &mut report)? {
                        continue;
                    }
                    report.removed_records += 1;
                    for path in by_key.remove(&key).unwrap_or_default() {
                        if remove(&path, &mut total, &mut report)? {
                            report.removed_other += 1;
                        }
                    }
                    for hex in record_blobs(&record) {
                        let count = blob_references.get_mut(&hex).expect("counted above");
                        *count -= 1;
                        let path = self.root().join("blobs/sha256").join(&hex);
                        if *count == 0
                            && !live.blobs.contains(&hex)
                            && modified(&path) < cutoff
                            && remove(&path, &mut total, &mut report)?
                        {
                            report.removed_blobs += 1;
                        }
                    }
                    for hex in record_diff_ids(&record) {
                        let count = diff_references.get_mut(&hex).expect("counted above");
                        *count -= 1;
                        if *count > 0 {
                            continue;
                        }
                        for path in by_diff_id.remove(&hex).unwrap_or_default() {
                            if modified(&path) < cutoff && remove(&path, &mut total, &mut report)? {
                                report.removed_other += 1;
                            }
                        }
                    }
                }
            }
        }
        // Then RUN cache mounts, least recently used first, while the cache is still over its size
        // target (see `cache_mounts`; one a running step holds is skipped).
        if let Some(target) = target {
            let (removed, freed) = self.prune_cache_mounts(target.max(reserved), &mut total)?;
            report.removed_cache_mounts = removed;
            report.freed_bytes += freed;
        }
        report.remaining_bytes = total;
        Ok(report)
    }

    /// Every stored blob: hex → (path, mtime).
    fn all_blobs(&self) -> Result<BTreeMap<String, (PathBuf, SystemTime)>, StoreError> {
        let dir = self.root().join("blobs/sha256");
        let mut blobs = BTreeMap::new();
        let entries =
            fs::read_dir(&dir).map_err(|source| StoreError::Io { action: "list", path: dir.clone(), source })?;
        for entry in entries.flatten() {
            let hex = entry.file_name().to_string_lossy().into_owned();
            let used = entry.metadata().and_then(|metadata| metadata.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            blobs.insert(hex, (entry.path(), used));
        }
        Ok(blobs)
    }

    /// Every action record: (path, key hex, last use, record).
    fn all_records(&self) -> Result<Vec<(PathBuf, String, SystemTime, ActionRecord)>, StoreError> {
        let dir = self.root().join("actions");
        let mut records = Vec::new();
        let shards =
            fs::read_dir(&dir).map_err(|source| StoreError::Io { action: "list", path: dir.clone(), source })?;
        for shard in shards.flatten() {
            let Ok(entries) = fs::read_dir(shard.path()) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                let key = entry.file_name().to_string_lossy().trim_end_matches(".json").to_owned();
                let used = entry.metadata().and_then(|metadata| metadata.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
                // An unreadable record names nothing; it goes in its turn.
                let record = fs::read(&path)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<ActionRecord>(&bytes).ok())
                    .unwrap_or(ActionRecord { layers: Vec::new(), config: None });
                records.push((path, key, used, record));
            }
        }
        Ok(records)
    }
}

/// The blobs a record names (hex, each once).
fn record_blobs(record: &ActionRecord) -> Vec<String> {
    let set: HashSet<String> = record
        .layers
        .iter()
        .map(|layer| layer.digest.hex().to_owned())
        .chain(record.config.iter().map(|config| config.hex().to_owned()))
        .collect();
    set.into_iter().collect()
}

/// The diff ids of a record's layers (hex, each once).
fn record_diff_ids(record: &ActionRecord) -> Vec<String> {
    let set: HashSet<String> = record.layers.iter().map(|layer| layer.diff_id.hex().to_owned()).collect();
    set.into_iter().collect()
}

/// Removes a file or a directory tree; `Ok(false)` when it was already gone.
fn remove_path(path: &Path) -> Result<bool, StoreError> {
    let is_dir = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata.is_dir(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(StoreError::Io { action: "stat", path: path.to_owned(), source }),
    };
    let removed = if is_dir {
        fs::remove_dir_all(path).or_else(|_| {
            // A directory of mode 000 (an overlay work directory) must be opened up first.
            crate::store::make_directories_searchable(path);
            fs::remove_dir_all(path)
        })
    } else {
        fs::remove_file(path)
    };
    match removed {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(StoreError::Io { action: "remove", path: path.to_owned(), source }),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::{LayerRecord, StepKey};

    const SNAPSHOTS: CacheDirectory = CacheDirectory::new("snapshots", Attachment::DiffId);
    const LOGS: CacheDirectory = CacheDirectory::new("logs", Attachment::StepKey);
    const MAPS: CacheDirectory = CacheDirectory::new("maps", Attachment::Standalone);
    const DIRECTORIES: [CacheDirectory; 3] = [SNAPSHOTS, LOGS, MAPS];

    fn layer(store: &Store, content: &[u8]) -> LayerRecord {
        let mut writer = store.blob_writer().unwrap();
        writer.write_all(content).unwrap();
        let blob = writer.commit().unwrap();
        LayerRecord { diff_id: blob.digest.clone(), digest: blob.digest, size: blob.size, media_type: "m".into() }
    }

    /// Sets the mtime of `path` and everything below it to `seconds` ago.
    fn age(path: &Path, seconds: u64) {
        let when = SystemTime::now() - Duration::from_secs(seconds);
        if path.is_dir() && !path.is_symlink() {
            for entry in fs::read_dir(path).unwrap() {
                age(&entry.unwrap().path(), seconds);
            }
        }
        if !path.is_symlink() {
            fs::File::open(path).unwrap().set_modified(when).unwrap();
        }
    }

    /// A step's record, its layer's snapshot and its log, all `seconds` old.
    fn entry(store: &Store, name: &str, size: usize, seconds: u64) -> (StepKey, LayerRecord) {
        let key = StepKey::builder().str(name).finish();
        let layer = layer(store, &vec![name.as_bytes()[0]; size]);
        store.write_action(&key, &ActionRecord { layers: vec![layer.clone()], config: None }).unwrap();
        let snapshot = store.root().join("snapshots").join(layer.diff_id.hex());
        fs::create_dir_all(snapshot.join("etc")).unwrap();
        fs::write(snapshot.join("etc/file"), vec![0; size]).unwrap();
        fs::create_dir_all(store.root().join("logs")).unwrap();
        fs::write(store.root().join("logs").join(format!("{}.log", key.to_hex())), "output\n").unwrap();
        age(&store.action_path(&key), seconds);
        age(&store.blob_path(&layer.digest), seconds);
        age(&snapshot, seconds);
        age(&store.root().join("logs").join(format!("{}.log", key.to_hex())), seconds);
        (key, layer)
    }

    /// Bytes under `root` by an independent walk: every inode once, directories included.
    fn walked(root: &Path) -> u64 {
        let mut seen = HashSet::new();
        let mut total = 0;
        let mut pending = vec![root.to_owned()];
        while let Some(path) = pending.pop() {
            let metadata = fs::symlink_metadata(&path).unwrap();
            if seen.insert((metadata.dev(), metadata.ino())) {
                total += metadata.len();
            }
            if metadata.is_dir() {
                pending.extend(fs::read_dir(&path).unwrap().map(|entry| entry.unwrap().path()));
            }
        }
        total
    }

    #[test]
    fn disk_usage_counts_every_byte_as_du_does() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        entry(&store, "a", 5_000, 0);
        entry(&store, "b", 7_000, 0);
        store.put_blob(b"orphan").unwrap();
        let deep = dir.path().join("unknown/x/y");
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("f"), vec![1; 12_345]).unwrap();
        fs::hard_link(deep.join("f"), deep.join("g")).unwrap();
        std::os::unix::fs::symlink("../f", deep.join("link")).unwrap();
        fs::write(dir.path().join("stat-cache"), b"1234").unwrap();

        let usage = store.disk_usage();
        assert_eq!(usage.total(), walked(dir.path()));
        assert_eq!(usage.blob_count, 3);
        assert_eq!(usage.record_count, 2);
        assert!(usage.parts["snapshots"] > 12_000 && usage.parts["unknown"] > 12_345, "{usage:?}");
        // GNU du's own count (`-b`: apparent sizes in bytes), where it is installed.
        if let Ok(output) = std::process::Command::new("du").arg("-sb").arg(dir.path()).output()
            && output.status.success()
        {
            let text = String::from_utf8(output.stdout).unwrap();
            let du: u64 = text.split_whitespace().next().unwrap().parse().unwrap();
            assert_eq!(usage.total(), du, "du -sb says {text}");
        }
    }

    #[test]
    fn keep_bytes_removes_garbage_first_then_least_recently_used_with_what_they_own() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new, standalone) = {
            let store = Store::open(dir.path()).unwrap();
            let old = entry(&store, "old", 10_000, 3_000);
            let new = entry(&store, "new", 10_000, 1_000);
            let orphan = store.put_blob(&[3; 5_000]).unwrap();
            age(&orphan.path, 100);
            let standalone = dir.path().join("maps/shape.json");
            fs::create_dir_all(standalone.parent().unwrap()).unwrap();
            fs::write(&standalone, vec![0; 3_000]).unwrap();
            age(&standalone, 2_000);
            (old, new, standalone)
        };
        let store = Store::open(dir.path()).unwrap();
        let total = store.disk_usage().total();

        let report = store.prune(&PrunePolicy::new().keep_bytes(total - 1), &DIRECTORIES).unwrap();
        assert_eq!((report.removed_blobs, report.removed_records, report.removed_other), (1, 0, 0), "{report:?}");
        assert_eq!(report.remaining_bytes, store.disk_usage().total());

        let report = store.prune(&PrunePolicy::new().keep_bytes(store.disk_usage().total() - 1), &DIRECTORIES).unwrap();
        assert_eq!((report.removed_blobs, report.removed_records), (1, 1), "{report:?}");
        assert_eq!(report.removed_other, 2, "the snapshot and the log go with the record: {report:?}");
        assert!(store.read_action(&old.0).unwrap().is_none());
        assert!(!dir.path().join("snapshots").join(old.1.diff_id.hex()).exists());
        assert!(!dir.path().join("logs").join(format!("{}.log", old.0.to_hex())).exists());
        assert!(store.read_action(&new.0).unwrap().is_some());
        assert!(dir.path().join("snapshots").join(new.1.diff_id.hex()).exists());
        assert!(standalone.exists(), "used after the old record");

        let report = store.prune(&PrunePolicy::new().keep_bytes(store.disk_usage().total() - 1), &DIRECTORIES).unwrap();
        assert_eq!(report.removed_other, 1, "the standalone map is next: {report:?}");
        assert!(!standalone.exists());

        // (The look-ups above refreshed the record's use: it is not used now any more.)
        age(&dir.path().join("actions"), 500);
        store.prune(&PrunePolicy::new().keep_bytes(0), &DIRECTORIES).unwrap();
        assert_eq!(store.disk_usage().blob_count, 0);
        assert_eq!(store.disk_usage().record_count, 0);
        assert!(fs::read_dir(dir.path().join("snapshots")).unwrap().next().is_none());
        assert!(dir.path().join("lock").exists(), "locks are kept");
    }

    #[test]
    fn keep_duration_removes_what_was_not_used_for_that_long() {
        let dir = tempfile::tempdir().unwrap();
        let (old, recent) = {
            let store = Store::open(dir.path()).unwrap();
            (entry(&store, "old", 1_000, 7_200), entry(&store, "recent", 1_000, 600))
        };
        let store = Store::open(dir.path()).unwrap();
        let policy = PrunePolicy::new().keep_duration(Duration::from_secs(3_600));
        assert!(policy.is_exceeded_by(&store.disk_usage(), u64::MAX));
        let report = store.prune(&policy, &DIRECTORIES).unwrap();
        assert_eq!((report.removed_records, report.removed_blobs, report.removed_other), (1, 1, 2), "{report:?}");
        assert!(store.read_action(&old.0).unwrap().is_none());
        assert!(store.read_action(&recent.0).unwrap().is_some());
    }

    #[test]
    fn min_free_bytes_prunes_what_the_filesystem_lacks_and_reserved_bytes_stop_it() {
        let dir = tempfile::tempdir().unwrap();
        let entries = {
            let store = Store::open(dir.path()).unwrap();
            (0..4u64).map(|index| entry(&store, &format!("{index}"), 20_000, 4_000 - index * 100)).collect::<Vec<_>>()
        };
        let store = Store::open(dir.path()).unwrap();
        let policy = PrunePolicy::new().min_free_bytes(1_000_000);
        assert!(!policy.is_exceeded_by(&store.disk_usage(), 1_000_000));
        assert!(policy.is_exceeded_by(&store.disk_usage(), 1_000_000 - 60_000));
        // 60,000 bytes short: the two least recently used entries (each over 40,000 bytes with
        // its snapshot) cover it.
        let report = store.prune_with_free(&policy, &DIRECTORIES, 1_000_000 - 60_000).unwrap();
        assert_eq!(report.removed_records, 2, "{report:?}");
        assert!(report.freed_bytes >= 60_000, "{report:?}");
        assert!(store.read_action(&entries[0].0).unwrap().is_none());
        assert!(store.read_action(&entries[1].0).unwrap().is_none());
        assert!(store.read_action(&entries[2].0).unwrap().is_some());

        // The filesystem is full, but the cache may keep what it holds now.
        let reserved = store.disk_usage().total();
        let report = store.prune_with_free(&policy.clone().reserved_bytes(reserved), &DIRECTORIES, 0).unwrap();
        assert_eq!(report, PruneReport { remaining_bytes: reserved, ..PruneReport::default() });
    }

    #[test]
    fn what_an_open_store_uses_survives_a_prune() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, gone) = {
            let store = Store::open(dir.path()).unwrap();
            (entry(&store, "kept", 1_000, 3_600), entry(&store, "gone", 1_000, 3_600))
        };
        let stale_lease = dir.path().join(crate::lease::LEASES).join("1-1-1");
        fs::write(&stale_lease, "start 1\nkey ").unwrap();
        // A build (another store) looks `kept` up and writes a new blob no record names yet.
        let build = Store::open(dir.path()).unwrap();
        build.protect_keys([&kept.0]).unwrap();
        assert!(build.read_action(&kept.0).unwrap().is_some());
        let fresh = layer(&build, b"being built");
        let old_blob = build.put_blob(b"an old config").unwrap();
        age(&old_blob.path, 7_200);

        let pruner = Store::open(dir.path()).unwrap();
        let report = pruner.prune(&PrunePolicy::new().keep_bytes(0), &DIRECTORIES).unwrap();
        assert!(build.read_action(&kept.0).unwrap().is_some(), "{report:?}");
        assert!(dir.path().join("snapshots").join(kept.1.diff_id.hex()).exists());
        assert!(build.has_blob(&fresh.digest) && build.has_blob(&old_blob.digest));
        assert!(build.read_action(&gone.0).unwrap().is_none());
        assert!(!stale_lease.exists(), "a lease nobody holds is removed");

        // Once the build is gone, so is its protection.
        drop(build);
        for path in [dir.path().join("blobs"), dir.path().join("actions"), dir.path().join("snapshots")] {
            age(&path, 7_200);
        }
        pruner.prune(&PrunePolicy::new().keep_bytes(0), &DIRECTORIES).unwrap();
        assert_eq!(pruner.disk_usage().record_count, 0);
        assert_eq!(pruner.disk_usage().blob_count, 0);
    }
}
