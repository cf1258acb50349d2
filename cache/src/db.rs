//! The salsa database of step keys.
//!
//! Inputs: one [`StepInput`] per distinct step (its canonical encoding, its parent, its
//! `copy_from` source, extra identity bytes such as an archive's digest, and the context files
//! it selects) and one [`FileSetInput`] per selection of context files, holding the
//! [`FileSetDigest`] of their key material (kind, mode, size and blake3 digest, never mtimes).
//! The tracked query [`step_key`] hashes them as the module `key` describes, so in a long-lived
//! [`KeyDatabase`] a changed context file re-executes only the key queries that read its
//! selection and the ones above them; salsa backdates an unchanged result, so a change that
//! does not alter a key stops there.
//!
//! A selection is one input, not one input per file: its digest reads every file anyway, and
//! 200,000 salsa inputs cost a fresh process more than the walk that found the files. The
//! digest is computed from the walk's materials (see [`FileSetDigest::of`]) and set only when it
//! changed, which is what keeps an unchanged selection from starting a revision.
//!
//! Inputs are interned by identity in [`KeyDatabase`]: declaring the same graph again maps to the
//! same inputs and changes no revision. What this module does not do: stat or read files (the
//! builder feeds it what it found, through the stat cache) or look keys up in the store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use salsa::Setter;

use crate::StepKey;

pub use inputs::{FileSetInput, StepInput};

/// What a context file contributes to a key. Mtimes never appear here; a mode the step
/// overrides is given as 0, so that changing it on disk does not change the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FileMaterial {
    /// A directory.
    Directory {
        /// Its permission bits (0 when the step sets them).
        mode: u32,
    },
    /// A regular file.
    File {
        /// Its permission bits (0 when the step sets them).
        mode: u32,
        /// Its size in bytes.
        size: u64,
        /// The blake3 digest of its content.
        blake3: [u8; 32],
    },
    /// A symbolic link.
    Symlink {
        /// Its target, verbatim.
        target: String,
    },
    /// A hard link to a file selected before it.
    HardLink {
        /// The context-relative path of the file it links to.
        target: String,
    },
}

/// The salsa inputs. Their own module only to scope the `allow` below: salsa generates a `new`,
/// a `builder` and a setter per field for each input without doc comments (the getters carry
/// the fields' docs). `new` takes the fields in declaration order; `set_<field>` changes one and
/// starts a new revision.
#[allow(missing_docs)]
mod inputs {
    use super::FileSetDigest;

    /// A salsa input: the context files one step selects, by the digest of their key material
    /// in walk order.
    #[salsa::input(debug)]
    pub struct FileSetInput {
        /// The digest of the selected files.
        pub digest: FileSetDigest,
    }

    /// A salsa input: one step definition and the inputs its key reads.
    #[salsa::input(debug)]
    pub struct StepInput {
        /// The step's canonical encoding (`Step::encode` of layerwright-dsl).
        #[returns(ref)]
        pub encoding: Vec<u8>,
        /// The step it is stacked on; `None` for a base step.
        pub parent: Option<StepInput>,
        /// The `copy_from` source image's final step.
        pub source: Option<StepInput>,
        /// Extra identity bytes, such as the digest of a base image's archive or of the manifest a
        /// pulled tag names.
        #[returns(ref)]
        pub extra: Vec<u8>,
        /// The context files a `copy` selects.
        pub files: Option<FileSetInput>,
        /// A RUN step's bind mounts: their source images' final steps and the context files
        /// they select, in declaration order (empty for every other step).
        #[returns(ref)]
        pub mounts: crate::db::MountInputs,
    }
}

/// What a RUN step's bind mounts add to its key: the source images' final steps and the
/// context files each context bind mount selects, both in declaration order. Empty for a step
/// without bind mounts, whose key then hashes exactly what it did before bind mounts existed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct MountInputs {
    /// The final steps of the images bound by `Mount::bind`.
    pub images: Vec<StepInput>,
    /// The selections of `Mount::context`.
    pub files: Vec<FileSetInput>,
}

impl MountInputs {
    /// Whether there is nothing (the key then has no mounts section).
    pub fn is_empty(&self) -> bool {
        self.images.is_empty() && self.files.is_empty()
    }
}

impl FileMaterial {
    /// The canonical bytes of this material, fed to key hashes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(48);
        self.write_canonical_bytes(&mut bytes);
        bytes
    }

    /// Appends [`FileMaterial::canonical_bytes`] to `bytes`.
    pub fn write_canonical_bytes(&self, bytes: &mut Vec<u8>) {
        let text = |tag: u8, text: &str, bytes: &mut Vec<u8>| {
            bytes.push(tag);
            bytes.extend_from_slice(&(text.len() as u64).to_le_bytes());
            bytes.extend_from_slice(text.as_bytes());
        };
        match self {
            FileMaterial::Directory { mode } => {
                bytes.push(1);
                bytes.extend_from_slice(&mode.to_le_bytes());
            }
            FileMaterial::File { mode, size, blake3 } => {
                bytes.push(2);
                bytes.extend_from_slice(&mode.to_le_bytes());
                bytes.extend_from_slice(&size.to_le_bytes());
                bytes.extend_from_slice(blake3);
            }
            FileMaterial::Symlink { target } => text(3, target, bytes),
            FileMaterial::HardLink { target } => text(4, target, bytes),
        }
    }

    /// A short hex digest of the material, for provenance records.
    pub fn digest_hex(&self) -> String {
        blake3::hash(&self.canonical_bytes()).to_hex()[..32].to_owned()
    }
}

/// blake3 over the key material of a selection of context files, in walk order: the count,
/// then for each file its relative path and its canonical material, each length-prefixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileSetDigest(pub [u8; 32]);

impl FileSetDigest {
    /// The digest of `files` (relative path, material), in the order given.
    pub fn of<'a>(files: impl ExactSizeIterator<Item = (&'a str, FileMaterial)>) -> FileSetDigest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&(files.len() as u64).to_le_bytes());
        let mut material_bytes = Vec::with_capacity(64);
        for (relative, material) in files {
            hasher.update(&(relative.len() as u64).to_le_bytes());
            hasher.update(relative.as_bytes());
            material_bytes.clear();
            material.write_canonical_bytes(&mut material_bytes);
            hasher.update(&(material_bytes.len() as u64).to_le_bytes());
            hasher.update(&material_bytes);
        }
        FileSetDigest(*hasher.finalize().as_bytes())
    }
}

/// The key of a step: format version, canonical encoding, parent key, source key, extra
/// identity, the digest of the selected context files and, for bind mounts, their source
/// images' keys and selected files' digests.
#[salsa::tracked(returns(copy))]
pub fn step_key(db: &dyn salsa::Database, step: StepInput) -> StepKey {
    let parent = step.parent(db).map(|parent| step_key(db, parent));
    let source = step.source(db).map(|source| step_key(db, source));
    let files = step.files(db).map(|set| set.digest(db).0);
    let mut builder =
        StepKey::builder().bytes(step.encoding(db)).optional_key(parent.as_ref()).optional_key(source.as_ref());
    builder = builder.bytes(step.extra(db));
    builder = match files {
        None => builder.u64(0),
        Some(digest) => builder.u64(1).bytes(&digest),
    };
    // Only a step with bind mounts has this section, so every other key stays as it was.
    let mounts = step.mounts(db);
    if !mounts.is_empty() {
        builder = builder.str("bind mounts").u64(mounts.images.len() as u64);
        for image in &mounts.images {
            builder = builder.key(&step_key(db, *image));
        }
        builder = builder.u64(mounts.files.len() as u64);
        for set in &mounts.files {
            builder = builder.bytes(&set.digest(db).0);
        }
    }
    builder.finish()
}

/// Names of the queries that executed, from salsa's `WillExecute` events (for tests and
/// `--explain`-style diagnostics).
#[derive(Debug, Clone, Default)]
pub struct ExecutionLog {
    entries: Arc<Mutex<Vec<String>>>,
}

impl ExecutionLog {
    /// The executions logged since the last call.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

/// The salsa storage; clone it once per worker thread to run queries in parallel.
#[salsa::db]
#[derive(Clone)]
pub struct KeyQueries {
    storage: salsa::Storage<Self>,
}

#[salsa::db]
impl salsa::Database for KeyQueries {}

impl KeyQueries {
    /// The key of `step` (memoised: computed again only when an input it read changed).
    pub fn key(&self, step: StepInput) -> StepKey {
        step_key(self, step)
    }
}

/// What a step's key is made of, as the builder declares it: the identity under which its
/// input is interned (the same identity again is the same input).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct StepIdentity {
    /// The step's canonical encoding.
    pub encoding: Vec<u8>,
    /// The step below it.
    pub parent: Option<StepInput>,
    /// A `copy_from` step's source image.
    pub source: Option<StepInput>,
    /// Identity outside the encoding (an archive's digest, a platform, secret digests).
    pub extra: Vec<u8>,
    /// The context files it selects.
    pub files: Option<FileSetInput>,
    /// A RUN step's bind mounts' inputs (none for every other step).
    pub mounts: MountInputs,
}

/// The long-lived key database of a builder: salsa storage plus the identity maps that let a
/// re-declared graph find its existing inputs.
pub struct KeyDatabase {
    queries: KeyQueries,
    log: ExecutionLog,
    steps: HashMap<StepIdentity, StepInput>,
    sets: HashMap<(PathBuf, String), FileSetInput>,
}

impl Default for KeyDatabase {
    fn default() -> KeyDatabase {
        KeyDatabase::new()
    }
}

impl KeyDatabase {
    /// An empty database, logging the queries it executes (see [`KeyDatabase::execution_log`]).
    ///
    /// ```
    /// use std::path::Path;
    /// use layerwright_cache::{FileMaterial, FileSetDigest, KeyDatabase, StepIdentity};
    ///
    /// let mut database = KeyDatabase::new();
    /// let base = database.step(StepIdentity { encoding: b"scratch".to_vec(), ..StepIdentity::default() });
    /// let material = FileMaterial::File { mode: 0o644, size: 1, blake3: [7; 32] };
    /// let digest = FileSetDigest::of([("src/a", material)].into_iter());
    /// let files = database.file_set(Path::new("/ctx"), "src", digest);
    /// let copy = database.step(StepIdentity { encoding: b"copy src".to_vec(), parent: Some(base), files: Some(files), ..StepIdentity::default() });
    /// let key = database.key(copy);
    /// assert_ne!(key, database.key(base));
    /// // The same declaration again maps to the same input and executes nothing.
    /// database.execution_log().take();
    /// assert_eq!(database.step(StepIdentity { encoding: b"copy src".to_vec(), parent: Some(base), files: Some(files), ..StepIdentity::default() }), copy);
    /// assert_eq!(database.key(copy), key);
    /// assert!(database.execution_log().take().is_empty());
    /// ```
    pub fn new() -> KeyDatabase {
        let log = ExecutionLog::default();
        let entries = Arc::clone(&log.entries);
        let callback = move |event: salsa::Event| {
            if let salsa::EventKind::WillExecute { database_key } = event.kind {
                entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(format!("{database_key:?}"));
            }
        };
        let queries = KeyQueries { storage: salsa::Storage::new(Some(Box::new(callback))) };
        KeyDatabase { queries, log, steps: HashMap::new(), sets: HashMap::new() }
    }

    /// The queries that executed since the last call.
    pub fn execution_log(&self) -> &ExecutionLog {
        &self.log
    }

    /// The query storage, to clone per worker.
    pub fn queries(&self) -> &KeyQueries {
        &self.queries
    }

    /// The key of `step`, as [`KeyQueries::key`].
    pub fn key(&self, step: StepInput) -> StepKey {
        self.queries.key(step)
    }

    /// The input of the step with this identity, created on first sight.
    pub fn step(&mut self, identity: StepIdentity) -> StepInput {
        if let Some(step) = self.steps.get(&identity) {
            return *step;
        }
        let step = StepInput::new(
            &self.queries,
            identity.encoding.clone(),
            identity.parent,
            identity.source,
            identity.extra.clone(),
            identity.files,
            identity.mounts.clone(),
        );
        self.steps.insert(identity, step);
        step
    }

    /// The file set a step selects from the context at `root` (the selection `selection`, for
    /// example the source path and options), updated to `digest`. The digest is set only when it
    /// changed, so an unchanged selection starts no new revision.
    pub fn file_set(&mut self, root: &Path, selection: &str, digest: FileSetDigest) -> FileSetInput {
        let set_identity = (root.to_owned(), selection.to_owned());
        match self.sets.get(&set_identity) {
            Some(set) => {
                if *set.digest(&self.queries) != digest {
                    set.set_digest(&mut self.queries).to(digest);
                }
                *set
            }
            None => {
                let set = FileSetInput::new(&self.queries, digest);
                self.sets.insert(set_identity, set);
                set
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(relative: &str, size: u64, byte: u8) -> FileSetDigest {
        FileSetDigest::of([(relative, FileMaterial::File { mode: 0o644, size, blake3: [byte; 32] })].into_iter())
    }

    fn executed(database: &KeyDatabase, name: &str) -> usize {
        database.execution_log().take().iter().filter(|entry| entry.contains(name)).count()
    }

    #[test]
    fn a_changed_file_re_executes_only_what_reads_it() {
        let mut database = KeyDatabase::new();
        let root = Path::new("/ctx");
        let base = database.step(StepIdentity { encoding: b"scratch".to_vec(), ..StepIdentity::default() });
        let set_a = database.file_set(root, "a", set_of("x", 1, 1));
        let set_b = database.file_set(root, "b", set_of("y", 1, 2));
        let copy_a = database.step(StepIdentity {
            encoding: b"copy a".to_vec(),
            parent: Some(base),
            files: Some(set_a),
            ..StepIdentity::default()
        });
        let copy_b = database.step(StepIdentity {
            encoding: b"copy b".to_vec(),
            parent: Some(copy_a),
            files: Some(set_b),
            ..StepIdentity::default()
        });
        let other = database.step(StepIdentity {
            encoding: b"copy b".to_vec(),
            parent: Some(base),
            files: Some(set_b),
            ..StepIdentity::default()
        });
        let first = (database.key(copy_b), database.key(other));
        assert_eq!(executed(&database, "step_key"), 4);

        // The same declaration again: no new inputs, nothing executes.
        assert_eq!(
            database.step(StepIdentity {
                encoding: b"copy a".to_vec(),
                parent: Some(base),
                files: Some(set_a),
                ..StepIdentity::default()
            }),
            copy_a
        );
        database.file_set(root, "a", set_of("x", 1, 1));
        assert_eq!((database.key(copy_b), database.key(other)), first);
        assert_eq!(executed(&database, "step_key"), 0);

        // `x` changes: copy_a and copy_b re-execute; `other` does not depend on it.
        database.file_set(root, "a", set_of("x", 1, 9));
        let second = (database.key(copy_b), database.key(other));
        assert_ne!(second.0, first.0);
        assert_eq!(second.1, first.1);
        let log = database.execution_log().take();
        assert_eq!(log.iter().filter(|entry| entry.contains("step_key")).count(), 2, "{log:#?}");
    }

    #[test]
    fn bind_mount_inputs_enter_the_key_only_when_a_step_has_them() {
        let mut database = KeyDatabase::new();
        let root = Path::new("/ctx");
        let base = database.step(StepIdentity { encoding: b"scratch".to_vec(), ..StepIdentity::default() });
        let stage =
            database.step(StepIdentity { encoding: b"stage".to_vec(), parent: Some(base), ..StepIdentity::default() });
        let other_stage = database.step(StepIdentity {
            encoding: b"other stage".to_vec(),
            parent: Some(base),
            ..StepIdentity::default()
        });
        let set = database.file_set(root, "mount src", set_of("a", 1, 1));
        let run = |database: &mut KeyDatabase, mounts: MountInputs| {
            let step = database.step(StepIdentity {
                encoding: b"run".to_vec(),
                parent: Some(base),
                mounts,
                ..StepIdentity::default()
            });
            database.key(step)
        };
        let plain = run(&mut database, MountInputs::default());
        let same =
            database.step(StepIdentity { encoding: b"run".to_vec(), parent: Some(base), ..StepIdentity::default() });
        assert_eq!(plain, database.key(same));
        let bound = run(&mut database, MountInputs { images: vec![stage], files: Vec::new() });
        let bound_elsewhere = run(&mut database, MountInputs { images: vec![other_stage], files: Vec::new() });
        let with_files = run(&mut database, MountInputs { images: Vec::new(), files: vec![set] });
        let keys = [plain, bound, bound_elsewhere, with_files];
        for (index, left) in keys.iter().enumerate() {
            for right in &keys[index + 1..] {
                assert_ne!(left, right);
            }
        }
        // A bound file changes: the key follows it.
        database.file_set(root, "mount src", set_of("a", 1, 2));
        assert_ne!(run(&mut database, MountInputs { images: Vec::new(), files: vec![set] }), with_files);
    }
}
