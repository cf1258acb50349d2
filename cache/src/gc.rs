//! Cache management: how much the cache holds (`du`) and pruning it down to a size (`prune`),
//! least recently used first.
//!
//! Use is tracked by the mtime of action records, which a cache hit refreshes. Pruning runs
//! under the exclusive lock ([`Store::open_exclusive`]), so it waits for running builds (which
//! hold the lock shared) and never removes what one of them holds. What it removes: first blobs
//! no record names (configs and manifests of old builds, orphans of crashes), then the oldest
//! records and the blobs and layer indexes only they named, then the least recently used RUN
//! cache mount directories, until the cache fits.
//!
//! What it does not do: remove unpacked snapshots, provenance records or gzip block maps
//! (they count towards the total, so the cache can stay above the size asked for by theirs),
//! or remove a blob that a remaining record names: a prune can make a later build slower, never
//! wrong.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::{ActionRecord, Digest, Store, StoreError};

/// Bytes held by each part of the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiskUsage {
    /// Bytes of the blobs (layers, configs, manifests).
    pub blobs: u64,
    /// How many blobs there are.
    pub blob_count: u64,
    /// Bytes of the action records.
    pub records: u64,
    /// How many action records there are.
    pub record_count: u64,
    /// Bytes of the layer indexes.
    pub indexes: u64,
    /// Bytes of the unpacked snapshots.
    pub snapshots: u64,
    /// Bytes of everything else: provenance, temp files, gzip block maps, the stat cache.
    pub other: u64,
    /// Bytes of the RUN cache mounts' directories (see [`Store::cache_mount_usage`]).
    pub cache_mounts: u64,
}

impl DiskUsage {
    /// All the bytes counted.
    pub fn total(&self) -> u64 {
        self.blobs + self.records + self.indexes + self.snapshots + self.other + self.cache_mounts
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
    /// Bytes removed (records, blobs and layer indexes).
    pub freed_bytes: u64,
    /// Bytes the cache holds afterwards.
    pub remaining_bytes: u64,
    /// How many RUN cache mount directories were removed.
    pub removed_cache_mounts: u64,
}

/// Sizes of the files below `dir`, recursively (not following symlinks).
pub(crate) fn tree_size(dir: &Path) -> (u64, u64) {
    let Ok(entries) = fs::read_dir(dir) else { return (0, 0) };
    let mut total = (0, 0);
    for entry in entries.flatten() {
        let Ok(metadata) = entry.metadata() else { continue };
        if metadata.is_dir() {
            let (bytes, count) = tree_size(&entry.path());
            total = (total.0 + bytes, total.1 + count);
        } else {
            total = (total.0 + metadata.len(), total.1 + 1);
        }
    }
    total
}

impl Store {
    /// How many bytes each part of the cache holds (a walk of the cache dir; no lock needed).
    pub fn disk_usage(&self) -> DiskUsage {
        let (blobs, blob_count) = tree_size(&self.root().join("blobs"));
        let (records, record_count) = tree_size(&self.root().join("actions"));
        let (indexes, _) = tree_size(&self.root().join("indexes"));
        let (snapshots, _) = tree_size(&self.root().join("snapshots"));
        let (provenance, _) = tree_size(&self.root().join("provenance"));
        let (tmp, _) = tree_size(&self.root().join("tmp"));
        let (block_maps, _) = tree_size(&self.root().join("gzip-blocks"));
        let stat_cache = fs::metadata(self.root().join("stat-cache")).map(|metadata| metadata.len()).unwrap_or(0);
        let other = provenance + tmp + block_maps + stat_cache;
        let (cache_mounts, _) = tree_size(&self.root().join("mounts"));
        DiskUsage { blobs, blob_count, records, record_count, indexes, snapshots, other, cache_mounts }
    }

    /// Removes least recently used entries until the cache holds at most `keep_bytes`. Call it
    /// on a store opened with [`Store::open_exclusive`].
    pub fn prune(&self, keep_bytes: u64) -> Result<PruneReport, StoreError> {
        let mut records = self.all_records()?;
        // Oldest first.
        records.sort_by_key(|record| record.used);
        let mut references: HashMap<Digest, usize> = HashMap::new();
        for record in &records {
            for digest in record.blobs() {
                *references.entry(digest).or_default() += 1;
            }
        }
        let mut report = PruneReport::default();
        let mut total = self.disk_usage().total();

        // Blobs no record names go first, oldest first.
        let mut orphans: Vec<(SystemTime, Digest, u64)> = Vec::new();
        for (digest, (size, modified)) in self.all_blobs()? {
            if !references.contains_key(&digest) {
                orphans.push((modified, digest, size));
            }
        }
        orphans.sort();
        for (_, digest, size) in orphans {
            if total <= keep_bytes {
                break;
            }
            self.remove_blob(&digest, size, &mut report, &mut total)?;
        }

        for record in records {
            if total <= keep_bytes {
                break;
            }
            let size = fs::metadata(&record.path).map(|metadata| metadata.len()).unwrap_or(0);
            remove_file(&record.path)?;
            report.removed_records += 1;
            report.freed_bytes += size;
            total = total.saturating_sub(size);
            for digest in record.blobs() {
                let count = references.get_mut(&digest).expect("counted above");
                *count -= 1;
                if *count == 0 {
                    let size = fs::metadata(self.blob_path(&digest)).map(|metadata| metadata.len()).unwrap_or(0);
                    self.remove_blob(&digest, size, &mut report, &mut total)?;
                }
            }
            for layer in &record.record.layers {
                let index = self.root().join("indexes").join(format!("{}.json", layer.diff_id.hex()));
                if references.get(&layer.digest).is_none_or(|count| *count == 0) && index.exists() {
                    let size = fs::metadata(&index).map(|metadata| metadata.len()).unwrap_or(0);
                    remove_file(&index)?;
                    report.freed_bytes += size;
                    total = total.saturating_sub(size);
                }
            }
        }
        // Then RUN cache mounts, least recently used first (see `cache_mounts`).
        let (removed, freed) = self.prune_cache_mounts(keep_bytes, &mut total)?;
        report.removed_cache_mounts = removed;
        report.freed_bytes += freed;
        report.remaining_bytes = total;
        Ok(report)
    }

    fn remove_blob(
        &self,
        digest: &Digest,
        size: u64,
        report: &mut PruneReport,
        total: &mut u64,
    ) -> Result<(), StoreError> {
        remove_file(&self.blob_path(digest))?;
        report.removed_blobs += 1;
        report.freed_bytes += size;
        *total = total.saturating_sub(size);
        Ok(())
    }

    fn all_blobs(&self) -> Result<BTreeMap<Digest, (u64, SystemTime)>, StoreError> {
        let dir = self.root().join("blobs/sha256");
        let mut blobs = BTreeMap::new();
        let entries =
            fs::read_dir(&dir).map_err(|source| StoreError::Io { action: "list", path: dir.clone(), source })?;
        for entry in entries.flatten() {
            let Some(digest) = entry.file_name().to_str().and_then(|name| Digest::from_hex(name).ok()) else {
                continue;
            };
            let Ok(metadata) = entry.metadata() else { continue };
            blobs.insert(digest, (metadata.len(), metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
        }
        Ok(blobs)
    }

    fn all_records(&self) -> Result<Vec<StoredRecord>, StoreError> {
        let dir = self.root().join("actions");
        let mut records = Vec::new();
        let shards =
            fs::read_dir(&dir).map_err(|source| StoreError::Io { action: "list", path: dir.clone(), source })?;
        for shard in shards.flatten() {
            let Ok(entries) = fs::read_dir(shard.path()) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                let used = entry.metadata().and_then(|metadata| metadata.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
                let record = fs::read(&path).ok().and_then(|bytes| serde_json::from_slice::<ActionRecord>(&bytes).ok());
                match record {
                    Some(record) => records.push(StoredRecord { path, used, record }),
                    // An unreadable record names nothing; it is removed like the oldest.
                    None => records.push(StoredRecord {
                        path,
                        used: SystemTime::UNIX_EPOCH,
                        record: ActionRecord { layers: Vec::new(), config: None },
                    }),
                }
            }
        }
        Ok(records)
    }
}

struct StoredRecord {
    path: PathBuf,
    used: SystemTime,
    record: ActionRecord,
}

impl StoredRecord {
    fn blobs(&self) -> Vec<Digest> {
        let set: HashSet<Digest> =
            self.record.layers.iter().map(|layer| layer.digest.clone()).chain(self.record.config.clone()).collect();
        set.into_iter().collect()
    }
}

fn remove_file(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io { action: "remove", path: path.to_owned(), source }),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use std::time::Duration;

    use super::*;
    use crate::{LayerRecord, StepKey};

    fn layer(store: &Store, content: &[u8]) -> LayerRecord {
        let mut writer = store.blob_writer().unwrap();
        writer.write_all(content).unwrap();
        let blob = writer.commit().unwrap();
        LayerRecord { diff_id: blob.digest.clone(), digest: blob.digest, size: blob.size, media_type: "m".into() }
    }

    #[test]
    fn prune_removes_least_recently_used_first_and_waits_for_builds() {
        let dir = tempfile::tempdir().unwrap();
        let (old_key, new_key) = (StepKey::builder().str("old").finish(), StepKey::builder().str("new").finish());
        let (old, new) = {
            let store = Store::open(dir.path()).unwrap();
            let old = layer(&store, &[1; 10_000]);
            let new = layer(&store, &[2; 10_000]);
            store.put_blob(&[3; 5_000]).unwrap();
            store.write_action(&old_key, &ActionRecord { layers: vec![old.clone()], config: None }).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            store.write_action(&new_key, &ActionRecord { layers: vec![new.clone()], config: None }).unwrap();

            // A running build holds the lock: prune gives up rather than pull blobs from under it.
            let busy = Store::open_exclusive(dir.path(), Duration::from_millis(100)).unwrap_err();
            assert!(matches!(busy, StoreError::Busy { .. }), "{busy}");
            (old, new)
        };

        let store = Store::open_exclusive(dir.path(), Duration::from_secs(1)).unwrap();
        assert_eq!(store.disk_usage().blob_count, 3);
        let report = store.prune(store.disk_usage().total() - 1).unwrap();
        assert_eq!((report.removed_blobs, report.removed_records), (1, 0), "the orphan goes first: {report:?}");
        let report = store.prune(store.disk_usage().total() - 1).unwrap();
        assert_eq!((report.removed_blobs, report.removed_records), (1, 1), "{report:?}");
        assert!(!store.has_blob(&old.digest));
        assert!(store.has_blob(&new.digest));
        assert_eq!(store.read_action(&new_key).unwrap().unwrap().layers, vec![new]);
        store.prune(0).unwrap();
        assert_eq!(store.disk_usage().blob_count, 0);
    }
}
