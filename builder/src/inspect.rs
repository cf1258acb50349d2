//! What each layer of a built image holds and why it was built: the text of `inspect`, what
//! people use `dive` for, as plain lines that also fit an insta snapshot.
//!
//! One line per layer, bottom first: its position, its compressed size, cached or built (and,
//! for a build, why the cache could not serve it), and the step that made it. With files, each
//! layer's line is followed by what it adds (`+`), changes (`~`) and removes (`-`, a whiteout
//! or an opaque directory's hidden contents), largest first: the path's size in the image after
//! the layer (a removal's size is what it frees from the view, 0 for a non-file).
//!
//! What it deliberately is not: a content diff. A changed file is named, not compared; a
//! directory counts as changed only when its own mode or owner changes.

use std::fmt::Write as _;

use layerwright_cache::{LayerRecord, Store};

use crate::layer::{self, IndexKind, LayerIndex, TreeError};
use crate::progress::StepReport;
use crate::tree::FsTree;

/// What to show besides one line per layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InspectOptions {
    /// Under each layer, the files it adds, changes or removes, largest first.
    pub files: bool,
}

impl InspectOptions {
    /// These options with the files of each layer shown.
    pub fn with_files(mut self) -> InspectOptions {
        self.files = true;
        self
    }
}

/// One change a layer makes to the image's tree.
struct Change {
    sign: char,
    size: u64,
    path: String,
}

/// The report of `layers` (bottom first), made by `steps` (the image's step reports).
pub(crate) fn layer_report(
    store: &Store,
    layers: &[LayerRecord],
    steps: &[StepReport],
    options: InspectOptions,
) -> Result<String, TreeError> {
    let mut text = String::new();
    let mut tree = FsTree::default();
    for (position, record) in layers.iter().enumerate() {
        let index = layer::saved_or_indexed(store, record)?;
        let digest = record.digest.to_string();
        let step = steps.iter().find(|step| step.layer.as_deref() == Some(digest.as_str()));
        let (state, label) = match step {
            Some(step) if step.remote => ("remote".to_owned(), step.label.as_str()),
            Some(step) if step.cached => ("cached".to_owned(), step.label.as_str()),
            Some(step) => match &step.miss {
                Some(reason) => (format!("built ({reason})"), step.label.as_str()),
                None => ("built".to_owned(), step.label.as_str()),
            },
            None => ("base".to_owned(), "(a layer of the base image)"),
        };
        writeln!(text, "{:>3} {:>12} {}  {state}", position + 1, record.size, label).expect("writing to a String");
        let changes = if options.files { changes_of(&tree, &index) } else { Vec::new() };
        tree.apply(position, &record.digest, &index)?;
        for change in changes {
            writeln!(text, "      {} {:>12} /{}", change.sign, change.size, change.path).expect("writing to a String");
        }
    }
    Ok(text)
}

/// What applying `index` on top of `tree` adds, changes and removes, largest first.
fn changes_of(tree: &FsTree, index: &LayerIndex) -> Vec<Change> {
    let mut changes = Vec::new();
    for entry in &index.entries {
        let size = entry.kind.file_size();
        match (&entry.kind, tree.get(&entry.path)) {
            (IndexKind::Whiteout, Some(_)) => {
                let freed = tree.subtree(&entry.path).map(|(_, node)| node.entry.kind.file_size()).sum();
                changes.push(Change { sign: '-', size: freed, path: entry.path.clone() });
            }
            (IndexKind::OpaqueWhiteout, Some(_)) => {
                for (path, node) in tree.subtree(&entry.path).filter(|(path, _)| *path != entry.path) {
                    let removed = Change { sign: '-', size: node.entry.kind.file_size(), path: path.to_owned() };
                    changes.push(removed);
                }
            }
            (IndexKind::Whiteout | IndexKind::OpaqueWhiteout, None) => {}
            (IndexKind::Directory, Some(existing))
                if matches!(existing.entry.kind, IndexKind::Directory)
                    && (existing.entry.mode, existing.entry.uid, existing.entry.gid)
                        == (entry.mode, entry.uid, entry.gid) => {}
            (_, Some(_)) => changes.push(Change { sign: '~', size, path: entry.path.clone() }),
            (_, None) => changes.push(Change { sign: '+', size, path: entry.path.clone() }),
        }
    }
    changes.sort_by(|left, right| right.size.cmp(&left.size).then_with(|| left.path.cmp(&right.path)));
    changes
}
