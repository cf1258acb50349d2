//! Why a step missed the cache: each built step leaves a provenance record (its key and the
//! inputs that made it) under a *slot* that stays the same when the step's inputs change, and a
//! later miss in that slot is explained by comparing the two.
//!
//! The slot of a step is its position in the graph (its parent's slot and its kind), not its
//! content, so "the third step, a COPY" keeps its slot when its definition, its parent or its
//! files change. This answers BuildKit's most common complaint: a cache miss nobody can explain.
//!
//! Provenance is diagnostic only: it never decides a hit or a miss (the action records do), and
//! a missing or unreadable provenance record only makes the explanation [`MissReason::NoRecord`].

use std::fmt;

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

impl Provenance {
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

    /// The provenance last recorded in `slot`, if any (an unreadable record reads as none).
    pub fn read_provenance(&self, slot: &StepKey) -> Option<Provenance> {
        let bytes = std::fs::read(self.provenance_path(slot)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records `provenance` in `slot`, replacing what was there, atomically.
    pub fn write_provenance(&self, slot: &StepKey, provenance: &Provenance) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(provenance).expect("provenance serialises");
        self.write_file_atomically(&self.provenance_path(slot), &bytes)
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
}
