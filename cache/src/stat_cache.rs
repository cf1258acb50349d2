//! The persisted stat cache: a file's (size, mtime ns, ctime ns, inode, device) → its blake3
//! digest, so that an unchanged context is stat'ed, never re-read.
//!
//! A file whose stat tuple matches its entry is taken as unchanged. ctime is part of the tuple
//! because a write always moves it, even when a tool restores the mtime. The cache is a plain
//! in-memory map loaded from `stat-cache` under the cache dir and written back atomically only
//! when something changed, so a no-op rebuild writes nothing.
//!
//! Entries are keyed by the bytes of their absolute paths and hashed with a small
//! multiply-rotate hash (the keys are local paths, not attacker-chosen): a context of 200,000
//! files means 200,000 lookups and, in a fresh process, 200,000 entries decoded, and
//! `Path`'s own `Hash` and `Eq` (component by component) with SipHash made both dominate a
//! no-op build. For the same reason the loaded file is not decoded into one allocation per
//! entry: it stays one buffer, indexed by the hash of each entry's path (a table of 16-byte
//! slots that stays in the processor's caches, where a map of owned paths did not). Two paths
//! with one hash keep only the later in the index; the other then reads as a miss and is
//! hashed again, which costs time, never correctness, since a hit compares the whole path.
//!
//! It does not stat or read files itself: the builder passes the metadata it already has.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::{Store, StoreError};

/// What identifies one version of a file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileStat {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, in nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Status change time, in nanoseconds since the epoch.
    pub ctime_ns: i128,
    /// Inode number.
    pub inode: u64,
    /// Device number of the filesystem holding it.
    pub device: u64,
}

impl FileStat {
    /// From the fields of a unix `stat` (seconds and nanoseconds of mtime and ctime).
    pub fn from_unix(size: u64, mtime: (i64, i64), ctime: (i64, i64), inode: u64, device: u64) -> FileStat {
        let nanoseconds =
            |(seconds, nanoseconds): (i64, i64)| i128::from(seconds) * 1_000_000_000 + i128::from(nanoseconds);
        FileStat { size, mtime_ns: nanoseconds(mtime), ctime_ns: nanoseconds(ctime), inode, device }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    stat: FileStat,
    blake3: [u8; 32],
}

const MAGIC: &[u8; 8] = b"lwstat01";
const FILE_NAME: &str = "stat-cache";

/// A fast hash for path bytes (the multiply-rotate of rustc's `FxHasher`), eight bytes at a time.
#[derive(Default)]
struct PathHasher(u64);

impl Hasher for PathHasher {
    fn write(&mut self, bytes: &[u8]) {
        const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(chunk.try_into().expect("chunks of eight"));
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
        }
        for byte in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*byte)).wrapping_mul(SEED);
        }
    }

    fn finish(&self) -> u64 {
        // The multiplications leave their entropy in the high bits; hash tables index by the
        // low ones (as rustc-hash 2 does).
        self.0.rotate_left(26)
    }
}

type Entries = HashMap<Box<[u8]>, Entry, BuildHasherDefault<PathHasher>>;

/// The hash of a path's bytes, as the index of the loaded file keys it.
fn path_hash(path: &[u8]) -> u64 {
    let mut hasher = PathHasher::default();
    hasher.write(path);
    hasher.finish()
}

/// A hasher for keys that are already hashes.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn write(&mut self, _bytes: &[u8]) {
        unreachable!("only u64 keys are hashed")
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The stat cache file as loaded: its bytes, and where each entry starts, by path hash.
#[derive(Debug, Default)]
struct Loaded {
    bytes: Vec<u8>,
    offsets: HashMap<u64, usize, BuildHasherDefault<IdentityHasher>>,
}

/// One entry of the file: its path's length and bytes, then size, mtime, ctime, inode, device
/// and blake3.
fn read_entry<'a>(reader: &mut Reader<'a>) -> io::Result<(&'a [u8], Entry)> {
    let length = u32::from_le_bytes(reader.array()?) as usize;
    let path = reader.take(length)?;
    let stat = FileStat {
        size: reader.u64()?,
        mtime_ns: i128::from_le_bytes(reader.array()?),
        ctime_ns: i128::from_le_bytes(reader.array()?),
        inode: reader.u64()?,
        device: reader.u64()?,
    };
    Ok((path, Entry { stat, blake3: reader.array()? }))
}

impl Loaded {
    /// Indexes `bytes`, which must be a whole stat cache file.
    fn index(bytes: Vec<u8>) -> io::Result<Loaded> {
        let mut reader = Reader { bytes: &bytes, position: 0 };
        if reader.take(MAGIC.len())? != MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a stat cache"));
        }
        let count = reader.u64()?;
        let mut offsets = HashMap::with_capacity_and_hasher(count.min(1 << 22) as usize, Default::default());
        for _ in 0..count {
            let start = reader.position;
            let (path, _) = read_entry(&mut reader)?;
            offsets.insert(path_hash(path), start);
        }
        Ok(Loaded { bytes, offsets })
    }

    /// The path and entry that start at `offset` (one the index holds, so known to be whole).
    fn entry_at(&self, offset: usize) -> (&[u8], Entry) {
        let mut reader = Reader { bytes: &self.bytes, position: offset };
        read_entry(&mut reader).expect("indexed entries are whole")
    }

    fn get(&self, path: &[u8]) -> Option<Entry> {
        let offset = *self.offsets.get(&path_hash(path))?;
        let (found, entry) = self.entry_at(offset);
        (found == path).then_some(entry)
    }

    fn entries(&self) -> impl Iterator<Item = (&[u8], Entry)> {
        self.offsets.values().map(|offset| self.entry_at(*offset))
    }
}

/// The stat cache of one cache directory.
#[derive(Debug, Default)]
pub struct StatCache {
    /// The file as loaded.
    loaded: Loaded,
    /// What this process recorded; it wins over `loaded`.
    recorded: Entries,
    dirty: bool,
}

impl StatCache {
    /// Loads the stat cache of `store`; a missing or unreadable file gives an empty cache (it is
    /// only an accelerator: the worst case is re-hashing).
    pub fn load(store: &Store) -> StatCache {
        let bytes = match std::fs::read(store.root().join(FILE_NAME)) {
            Ok(bytes) => bytes,
            Err(_) => return StatCache::default(),
        };
        Loaded::index(bytes).map(|loaded| StatCache { loaded, ..StatCache::default() }).unwrap_or_default()
    }

    /// Writes the cache back if anything changed since it was loaded.
    pub fn save(&mut self, store: &Store) -> Result<(), StoreError> {
        if !self.dirty {
            return Ok(());
        }
        store.write_file_atomically(&store.root().join(FILE_NAME), &encode(self.entries()))?;
        self.dirty = false;
        Ok(())
    }

    /// The digest recorded for `path` if its stat is unchanged.
    pub fn lookup(&self, path: &Path, stat: &FileStat) -> Option<[u8; 32]> {
        self.entry(path.as_os_str().as_bytes()).filter(|entry| entry.stat == *stat).map(|entry| entry.blake3)
    }

    fn entry(&self, path: &[u8]) -> Option<Entry> {
        match self.recorded.get(path) {
            Some(entry) => Some(*entry),
            None => self.loaded.get(path),
        }
    }

    /// Records that the file at `path` with `stat` has content digest `blake3`.
    pub fn record(&mut self, path: PathBuf, stat: FileStat, blake3: [u8; 32]) {
        let entry = Entry { stat, blake3 };
        let path = path.into_os_string().into_vec().into_boxed_slice();
        if self.entry(&path) != Some(entry) {
            self.recorded.insert(path, entry);
            self.dirty = true;
        }
    }

    /// Every entry: the recorded ones, and the loaded ones nothing recorded replaced.
    fn entries(&self) -> impl Iterator<Item = (&[u8], Entry)> {
        let loaded = self.loaded.entries().filter(|(path, _)| !self.recorded.contains_key(*path));
        self.recorded.iter().map(|(path, entry)| (&path[..], *entry)).chain(loaded)
    }

    /// How many files have an entry.
    pub fn len(&self) -> usize {
        self.entries().count()
    }

    /// True when no file has an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn encode<'a>(entries: impl Iterator<Item = (&'a [u8], Entry)>) -> Vec<u8> {
    let mut sorted: Vec<(&[u8], Entry)> = entries.collect();
    sorted.sort_by(|left, right| left.0.cmp(right.0));
    let mut bytes = Vec::with_capacity(MAGIC.len() + sorted.len() * 128);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(sorted.len() as u64).to_le_bytes());
    for (path, entry) in sorted {
        bytes.extend_from_slice(&(path.len() as u32).to_le_bytes());
        bytes.extend_from_slice(path);
        bytes.extend_from_slice(&entry.stat.size.to_le_bytes());
        bytes.extend_from_slice(&entry.stat.mtime_ns.to_le_bytes());
        bytes.extend_from_slice(&entry.stat.ctime_ns.to_le_bytes());
        bytes.extend_from_slice(&entry.stat.inode.to_le_bytes());
        bytes.extend_from_slice(&entry.stat.device.to_le_bytes());
        bytes.extend_from_slice(&entry.blake3);
    }
    bytes
}

struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, length: usize) -> io::Result<&'a [u8]> {
        let end = self.position.checked_add(length).filter(|end| *end <= self.bytes.len());
        let end = end.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "truncated stat cache"))?;
        let slice = &self.bytes[self.position..end];
        self.position = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_only_writes_when_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let stat = FileStat { size: 3, mtime_ns: 1, ctime_ns: 2, inode: 4, device: 5 };
        let mut cache = StatCache::load(&store);
        assert!(cache.is_empty());
        cache.record("/ctx/a".into(), stat, [7; 32]);
        cache.save(&store).unwrap();
        let path = store.root().join(FILE_NAME);
        let written = std::fs::metadata(&path).unwrap().modified().unwrap();

        let mut loaded = StatCache::load(&store);
        assert_eq!(loaded.lookup(Path::new("/ctx/a"), &stat), Some([7; 32]));
        assert_eq!(loaded.lookup(Path::new("/ctx/a"), &FileStat { ctime_ns: 9, ..stat }), None);
        loaded.record("/ctx/a".into(), stat, [7; 32]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        loaded.save(&store).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), written, "unchanged: not rewritten");

        // A new file and a changed one: both saved beside the loaded entries left alone.
        loaded.record("/ctx/b".into(), stat, [8; 32]);
        loaded.record("/ctx/a".into(), FileStat { size: 4, ..stat }, [9; 32]);
        loaded.save(&store).unwrap();
        let reloaded = StatCache::load(&store);
        assert_eq!(reloaded.len(), 2);
        assert_eq!(reloaded.lookup(Path::new("/ctx/a"), &FileStat { size: 4, ..stat }), Some([9; 32]));
        assert_eq!(reloaded.lookup(Path::new("/ctx/a"), &stat), None);
        assert_eq!(reloaded.lookup(Path::new("/ctx/b"), &stat), Some([8; 32]));
        assert_eq!(reloaded.lookup(Path::new("/ctx/c"), &stat), None);

        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 10]).unwrap();
        assert!(StatCache::load(&store).is_empty(), "a truncated file is no cache");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(StatCache::load(&store).is_empty());
    }
}
