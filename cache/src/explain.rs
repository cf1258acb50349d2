//! Why a step missed the cache: each built step leaves a provenance record (its key and the
//! inputs that made it) under a *slot* that stays the same when the step's inputs change, and a
//! later miss in that slot is explained by comparing the two.
//!
//! The slot of a step is its position in the graph (its parent's slot and its kind), not its
//! content, so "the third step, a COPY" keeps its slot when its definition, its parent or its
//! files change. This answers BuildKit's most common complaint: a cache miss nobody can explain.
//!
//! Sibling steps share a slot (two RUN steps on one parent, in one image graph or in two
//! images), so a slot keeps the last record of each of its few most recent definitions, and a
//! miss is explained against the record of its own definition when there is one: a sibling's
//! build never makes a step's miss read "the step's definition changed".
//!
//! Provenance is diagnostic only: it never decides a hit or a miss (the action records do), and
//! a missing or unreadable provenance record only makes the explanation [`MissReason::NoRecord`].

use std::fmt;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::{StepKey, Store, StoreError};

/// The inputs of one built step, as far as they can explain a later miss.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The step's key, in hex.
    pub key: String,
    /// blake3 of the step's canonical encoding.
    pub definition: String,
    /// The parent step's key, in hex; `None` for a base step.
    pub parent: Option<String>,
    /// The `copy_from` source's key, in hex (for a RUN step, its bind mounts' source images'
    /// keys joined with `+`); `None` for every other step.
    pub source: Option<String>,
    /// Extra identity (an archive's digest).
    pub extra: String,
    /// Context files: relative path → hex digest of its key material.
    pub files: Vec<(String, String)>,
}

/// Why a step was built rather than taken from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MissReason {
    /// This step was never built into this cache (or its provenance was pruned).
    NoRecord,
    /// The step's own definition (its arguments or options) changed.
    DefinitionChanged,
    /// A step below it changed, so its parent's key did.
    ParentChanged,
    /// The `copy_from` source image, or a RUN step's bind mount source image, changed.
    SourceChanged,
    /// The base image changed: the archive's content, or the digest a pulled tag names.
    ArchiveChanged,
    /// Context files it selects changed, were added or removed.
    FilesChanged {
        /// Files selected both times whose key material differs, sorted.
        changed: Vec<String>,
        /// Files selected now but not then, sorted.
        added: Vec<String>,
        /// Files selected then but not now, sorted.
        removed: Vec<String>,
    },
    /// The inputs are the same as last time but the result is gone (pruned or corrupt).
    ResultMissing,
}

impl fmt::Display for MissReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list(formatter: &mut fmt::Formatter<'_>, what: &str, paths: &[String]) -> fmt::Result {
            if paths.is_empty() {
                return Ok(());
            }
            let shown: Vec<&str> = paths.iter().take(5).map(String::as_str).collect();
            let more = if paths.len() > 5 { format!(" and {} more", paths.len() - 5) } else { String::new() };
            write!(formatter, " {what}: {}{more};", shown.join(", "))
        }
        match self {
            MissReason::NoRecord => formatter.write_str("no cache record (first build of this step)"),
            MissReason::DefinitionChanged => formatter.write_str("the step's definition changed"),
            MissReason::ParentChanged => formatter.write_str("a step below it changed"),
            MissReason::SourceChanged => {
                formatter.write_str("a source image changed (of the copy_from, or of a bind mount)")
            }
            MissReason::ArchiveChanged => {
                formatter.write_str("the base image changed (its archive, or the digest its tag names)")
            }
            MissReason::FilesChanged { changed, added, removed } => {
                formatter.write_str("context files changed:")?;
                list(formatter, "changed", changed)?;
                list(formatter, "added", added)?;
                list(formatter, "removed", removed)
            }
            MissReason::ResultMissing => {
                formatter.write_str("same inputs, but the cached result was pruned or corrupt")
            }
        }
    }
}

/// How many definitions a slot keeps a record of (the most recently built first).
const PROVENANCE_PER_SLOT: usize = 8;

impl Provenance {
    /// Why `self` (now) missed, given the records of its slot (the most recent first): compared
    /// with the record of the same definition when there is one, else with the most recent.
    pub fn explain_in(&self, records: &[Provenance]) -> MissReason {
        let same_definition = records.iter().find(|record| record.definition == self.definition);
        self.explain(same_definition.or(records.first()))
    }

    /// Why `self` (now) missed, given what was built in the same slot before.
    pub fn explain(&self, previous: Option<&Provenance>) -> MissReason {
        let Some(previous) = previous else { return MissReason::NoRecord };
        if previous.definition != self.definition {
            return MissReason::DefinitionChanged;
        }
        if previous.parent != self.parent {
            return MissReason::ParentChanged;
        }
        if previous.source != self.source {
            return MissReason::SourceChanged;
        }
        if previous.extra != self.extra {
            return MissReason::ArchiveChanged;
        }
        if previous.files != self.files {
            let before: std::collections::BTreeMap<&str, &str> =
                previous.files.iter().map(|(path, digest)| (path.as_str(), digest.as_str())).collect();
            let after: std::collections::BTreeMap<&str, &str> =
                self.files.iter().map(|(path, digest)| (path.as_str(), digest.as_str())).collect();
            let changed = after
                .iter()
                .filter(|(path, digest)| before.get(*path).is_some_and(|old| old != *digest))
                .map(|(path, _)| path.to_string())
                .collect();
            let added = after.keys().filter(|path| !before.contains_key(*path)).map(|path| path.to_string()).collect();
            let removed =
                before.keys().filter(|path| !after.contains_key(*path)).map(|path| path.to_string()).collect();
            return MissReason::FilesChanged { changed, added, removed };
        }
        MissReason::ResultMissing
    }
}

impl Store {
    fn provenance_path(&self, slot: &StepKey) -> std::path::PathBuf {
        self.root().join("provenance").join(format!("{}.json", slot.to_hex()))
    }

    /// The records of `slot`, the most recent first (an unreadable file reads as none; a file
    /// of one record, as older versions wrote, as that record).
    pub fn read_provenance(&self, slot: &StepKey) -> Vec<Provenance> {
        let Ok(bytes) = std::fs::read(self.provenance_path(slot)) else { return Vec::new() };
        serde_json::from_slice::<Vec<Provenance>>(&bytes)
            .or_else(|_| serde_json::from_slice::<Provenance>(&bytes).map(|record| vec![record]))
            .unwrap_or_default()
    }

    /// Explains `provenance`'s miss against its slot's records ([`Provenance::explain_in`]) and
    /// records it there first, in place of the slot's earlier record of the same definition
    /// (the most recent eight kept), atomically. Within a process the reading and
    /// writing of one slot do not interleave (sibling steps build at once); between processes
    /// a lost record only makes a later explanation less precise. The reason is returned even
    /// when recording failed.
    pub fn explain_and_record(&self, slot: &StepKey, provenance: &Provenance) -> (MissReason, Result<(), StoreError>) {
        static SLOTS: Mutex<()> = Mutex::new(());
        let _serialised = SLOTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let records = self.read_provenance(slot);
        let reason = provenance.explain_in(&records);
        let kept: Vec<&Provenance> = std::iter::once(provenance)
            .chain(records.iter().filter(|record| record.definition != provenance.definition))
            .take(PROVENANCE_PER_SLOT)
            .collect();
        let bytes = serde_json::to_vec(&kept).expect("provenance serialises");
        (reason, self.write_file_atomically(&self.provenance_path(slot), &bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provenance(files: &[(&str, &str)]) -> Provenance {
        Provenance {
            key: "k".into(),
            definition: "d".into(),
            parent: Some("p".into()),
            source: None,
            extra: String::new(),
            files: files.iter().map(|(path, digest)| (path.to_string(), digest.to_string())).collect(),
        }
    }

    #[test]
    fn explains_each_kind_of_change() {
        let before = provenance(&[("a", "1"), ("b", "2")]);
        let check = |now: Provenance, expected: MissReason| assert_eq!(now.explain(Some(&before)), expected);
        assert_eq!(before.explain(None), MissReason::NoRecord);
        check(Provenance { definition: "e".into(), ..before.clone() }, MissReason::DefinitionChanged);
        check(Provenance { parent: Some("q".into()), ..before.clone() }, MissReason::ParentChanged);
        check(
            provenance(&[("a", "9"), ("c", "3")]),
            MissReason::FilesChanged { changed: vec!["a".into()], added: vec!["c".into()], removed: vec!["b".into()] },
        );
        check(before.clone(), MissReason::ResultMissing);
        let text = provenance(&[("a", "9")]).explain(Some(&before)).to_string();
        assert_eq!(text, "context files changed: changed: a; removed: b;");
    }

    #[test]
    fn a_slot_explains_each_definition_against_its_own_last_build() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let slot = StepKey::builder().str("slot").finish();
        let sibling = |definition: &str, file_digest: &str| Provenance {
            definition: definition.into(),
            ..provenance(&[("a", file_digest)])
        };
        // (what is built in the slot, why it missed): two siblings alternate, then one changes.
        let cases = [
            (sibling("left", "1"), MissReason::NoRecord),
            (sibling("right", "1"), MissReason::DefinitionChanged),
            (
                sibling("left", "2"),
                MissReason::FilesChanged { changed: vec!["a".into()], added: vec![], removed: vec![] },
            ),
            (sibling("right", "1"), MissReason::ResultMissing),
        ];
        for (built, expected) in cases {
            let (reason, recorded) = store.explain_and_record(&slot, &built);
            recorded.unwrap();
            assert_eq!(reason, expected, "{}", built.definition);
        }
        let definitions: Vec<String> =
            store.read_provenance(&slot).into_iter().map(|record| record.definition).collect();
        assert_eq!(definitions, ["right", "left"]);
        // A record as older versions wrote it (one object) still reads.
        std::fs::write(store.provenance_path(&slot), serde_json::to_vec(&sibling("old", "1")).unwrap()).unwrap();
        assert_eq!(store.read_provenance(&slot).len(), 1);
        for index in 0..PROVENANCE_PER_SLOT + 2 {
            store.explain_and_record(&slot, &sibling(&index.to_string(), "1")).1.unwrap();
        }
        assert_eq!(store.read_provenance(&slot).len(), PROVENANCE_PER_SLOT);
    }
}
