//! Executing one step: what each kind of step puts in its layer, or changes in the config.
//!
//! Each function gets the finished states of the step's inputs and returns the step's own
//! result. Layer steps compute their entries against the merged tree of the parent (so missing
//! parents are created as Docker creates them, and existing ones are left as they are) and hand
//! them to the layer writer. Nothing here decides what is cached: the solver looks the key up
//! first and calls in here only on a miss.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use layerwright_cache::{Digest, StoreError};
use layerwright_dsl::{
    CopyFromStep, CopyOptions, CopyStep, FileOptions, ImagePathError, MkdirStep, Owner, SymlinkStep, WriteFileStep,
    normalize_image_path,
};
use serde_json::Value;

use super::error::StepError;
use crate::context::{ContextKind, Selection};
use crate::execution::{Execution, NodeState};
use crate::layer::{Content, EntryKind, IndexEntry, IndexKind, LayerEntry};
use crate::tree::{self, FsTree, TreeNode};

/// The file steps, executed against an [`Execution`] (an inherent impl here so that the walk
/// reads `execution.copy_entries(..)`; `Execution` itself knows nothing of steps).
impl Execution<'_> {
    pub fn read_config(&self, digest: &Digest) -> Result<Value, StepError> {
        let path = self.store.blob_path(digest);
        let bytes =
            std::fs::read(&path).map_err(|source| StoreError::Io { action: "read config blob", path, source })?;
        serde_json::from_slice(&bytes)
            .map_err(|error| StepError::CorruptConfig { digest: digest.clone(), reason: error.to_string() })
    }

    pub fn copy_entries(
        &self,
        copy: &CopyStep,
        selection: &Selection,
        parent: &Arc<NodeState>,
    ) -> Result<Vec<LayerEntry>, StepError> {
        let tree = self.tree(parent)?;
        let destination = image_path(&copy.destination)?;
        let owner = copy.options.file.owner.unwrap_or(Owner::ROOT);
        let root = if selection.source_is_directory {
            destination
        } else {
            let name = copy.source.trim_end_matches('/').rsplit('/').next().unwrap_or_default().to_owned();
            file_destination(&tree, &copy.destination, destination, &name)
        };
        let mut entries = parent_directories(&tree, &root, owner)?;
        let replace = copy.options.replace_directory && !root.is_empty() && tree_is_directory(&tree, &root);
        if replace {
            entries.push(entry(&root, EntryKind::OpaqueWhiteout, 0, Owner::ROOT));
        }
        if selection.source_is_directory {
            entries.extend(destination_directory(&tree, &root, &copy.options, replace));
        }
        for file in &selection.files {
            let path = join(&root, &file.relative);
            if path.is_empty() || (file.relative.is_empty() && selection.source_is_directory) {
                // The destination directory's entry is made above.
                continue;
            }
            let kind = match &file.kind {
                ContextKind::Directory => EntryKind::Directory,
                ContextKind::File { size, .. } => EntryKind::File {
                    content: Content::Context {
                        dir: Arc::clone(&selection.dir),
                        path: selection.open_path(file).to_owned(),
                    },
                    size: *size,
                },
                ContextKind::Symlink { target } => EntryKind::Symlink { target: target.clone() },
                ContextKind::HardLink { target } => EntryKind::HardLink { target: join(&root, target) },
            };
            let mode = match kind {
                EntryKind::Symlink { .. } => 0o777,
                _ => copy.options.file.mode.unwrap_or(file.mode),
            };
            entries.push(entry(&path, kind, mode, owner));
        }
        Ok(entries)
    }

    /// The entries of a `copy_from`, and the spool directory their content was extracted to
    /// (it must outlive the layer writer).
    pub fn copy_from_entries(
        &self,
        copy: &CopyFromStep,
        source: &Arc<NodeState>,
        parent: &Arc<NodeState>,
    ) -> Result<(Vec<LayerEntry>, tempfile::TempDir), StepError> {
        let source_tree = self.tree(source)?;
        let tree = self.tree(parent)?;
        let source_path = resolve_symlinks(&source_tree, &image_path(&copy.source)?);
        let source_node = if source_path.is_empty() {
            root_node()
        } else {
            source_tree
                .get(&source_path)
                .cloned()
                .ok_or_else(|| StepError::NotInSourceImage { path: copy.source.clone() })?
        };
        let source_is_directory = matches!(source_node.entry.kind, IndexKind::Directory);
        let destination = image_path(&copy.destination)?;
        let root = if source_is_directory {
            destination
        } else {
            let name = source_path.rsplit('/').next().unwrap_or_default().to_owned();
            file_destination(&tree, &copy.destination, destination, &name)
        };
        let mut selected: Vec<(String, TreeNode)> = Vec::new();
        if source_is_directory {
            if !source_path.is_empty() {
                selected.push((String::new(), source_node.clone()));
            }
            let prefix = if source_path.is_empty() { String::new() } else { format!("{source_path}/") };
            for (path, node) in source_tree.subtree(&source_path) {
                if let Some(relative) = path.strip_prefix(&prefix).filter(|relative| !relative.is_empty()) {
                    selected.push((relative.to_owned(), node.clone()));
                }
            }
        } else {
            selected.push((String::new(), source_node.clone()));
        }

        // Regular files (and hard links whose target is not copied along) need their bytes:
        // spool them out of the source layers, reading each layer once.
        let copied: BTreeSet<String> = selected.iter().map(|(relative, _)| join(&source_path, relative)).collect();
        let mut wanted: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
        for (relative, node) in &selected {
            match &node.entry.kind {
                IndexKind::File { .. } => {
                    wanted.entry(node.layer).or_default().insert(join(&source_path, relative));
                }
                IndexKind::HardLink { target } if !copied.contains(target) => {
                    // The bytes are where the link's target was when the link was made, even if
                    // a later layer replaced that path.
                    let source_full = join(&source_path, relative);
                    let target_node = source_tree
                        .hard_link_target(&source_full)
                        .ok_or_else(|| StepError::NotInSourceImage { path: format!("/{target}") })?;
                    wanted.entry(target_node.layer).or_default().insert(target_node.entry.path.clone());
                }
                _ => {}
            }
        }
        let tmp = self.store.tmp_dir();
        let spool = tempfile::tempdir_in(&tmp).map_err(|source| StepError::Spool { path: tmp, source })?;
        let spooled = tree::extract_files(self.store, &source.layers.to_vec(), &wanted, spool.path())?;

        let missing_owner = copy.options.file.owner.unwrap_or(Owner::ROOT);
        let mut entries = parent_directories(&tree, &root, missing_owner)?;
        let replace = copy.options.replace_directory && !root.is_empty() && tree_is_directory(&tree, &root);
        if replace {
            entries.push(entry(&root, EntryKind::OpaqueWhiteout, 0, Owner::ROOT));
        }
        if source_is_directory {
            entries.extend(destination_directory(&tree, &root, &copy.options, replace));
        }
        for (relative, node) in &selected {
            let path = join(&root, relative);
            if path.is_empty() || (relative.is_empty() && source_is_directory) {
                // The destination directory's entry is made above.
                continue;
            }
            let source_full = join(&source_path, relative);
            let kind = match &node.entry.kind {
                IndexKind::Directory => EntryKind::Directory,
                IndexKind::File { size, .. } => {
                    EntryKind::File { content: Content::HostFile(spooled_path(&spooled, &source_full)?), size: *size }
                }
                IndexKind::Symlink { target } => EntryKind::Symlink { target: target.clone() },
                IndexKind::HardLink { target } if copied.contains(target) => {
                    let target_relative = target.strip_prefix(&source_path).unwrap_or(target).trim_start_matches('/');
                    EntryKind::HardLink { target: join(&root, target_relative) }
                }
                IndexKind::HardLink { target } => {
                    let Some(target_node) = source_tree.hard_link_target(&source_full) else {
                        return Err(StepError::NotInSourceImage { path: format!("/{target}") });
                    };
                    let IndexKind::File { size, .. } = target_node.entry.kind else {
                        return Err(StepError::NotInSourceImage { path: format!("/{target}") });
                    };
                    let content = Content::HostFile(spooled_path(&spooled, &target_node.entry.path)?);
                    EntryKind::File { content, size }
                }
                IndexKind::CharDevice { major, minor } => EntryKind::CharDevice { major: *major, minor: *minor },
                IndexKind::BlockDevice { major, minor } => EntryKind::BlockDevice { major: *major, minor: *minor },
                IndexKind::Fifo => EntryKind::Fifo,
                IndexKind::Whiteout | IndexKind::OpaqueWhiteout => continue,
            };
            let owner = copy.options.file.owner.unwrap_or(Owner { uid: node.entry.uid, gid: node.entry.gid });
            let mode = match kind {
                EntryKind::Symlink { .. } => 0o777,
                _ => copy.options.file.mode.unwrap_or(node.entry.mode),
            };
            entries.push(entry(&path, kind, mode, owner));
        }
        Ok((entries, spool))
    }

    pub fn write_file_entries(
        &self,
        write: &WriteFileStep,
        parent: &Arc<NodeState>,
    ) -> Result<Vec<LayerEntry>, StepError> {
        let tree = self.tree(parent)?;
        let path = non_root_path(&write.path)?;
        let mut entries = parent_directories(&tree, &path, Owner::ROOT)?;
        let content = Content::Inline(Arc::clone(&write.content));
        let kind = EntryKind::File { content, size: write.content.len() as u64 };
        entries.push(file_entry(&path, kind, write.options, 0o644));
        Ok(entries)
    }

    pub fn mkdir_entries(&self, mkdir: &MkdirStep, parent: &Arc<NodeState>) -> Result<Vec<LayerEntry>, StepError> {
        let tree = self.tree(parent)?;
        let path = non_root_path(&mkdir.path)?;
        let mut entries = parent_directories(&tree, &path, Owner::ROOT)?;
        entries.push(file_entry(&path, EntryKind::Directory, mkdir.options, 0o755));
        Ok(entries)
    }

    pub fn symlink_entries(
        &self,
        symlink: &SymlinkStep,
        parent: &Arc<NodeState>,
    ) -> Result<Vec<LayerEntry>, StepError> {
        let tree = self.tree(parent)?;
        let path = non_root_path(&symlink.link_path)?;
        let mut entries = parent_directories(&tree, &path, Owner::ROOT)?;
        let kind = EntryKind::Symlink { target: symlink.target.clone() };
        entries.push(entry(&path, kind, 0o777, symlink.owner.unwrap_or(Owner::ROOT)));
        Ok(entries)
    }

    pub fn remove_entries(&self, path: &str, parent: &Arc<NodeState>) -> Result<Vec<LayerEntry>, StepError> {
        let tree = self.tree(parent)?;
        let normalised = non_root_path(path)?;
        if tree.get(&normalised).is_none() {
            return Err(StepError::NotInImage { path: path.to_owned() });
        }
        let mut entries = parent_directories(&tree, &normalised, Owner::ROOT)?;
        entries.push(entry(&normalised, EntryKind::Whiteout, 0, Owner::ROOT));
        Ok(entries)
    }
}

fn root_node() -> TreeNode {
    TreeNode {
        entry: IndexEntry { path: String::new(), kind: IndexKind::Directory, mode: 0o755, uid: 0, gid: 0 },
        layer: 0,
    }
}

pub fn image_path(path: &str) -> Result<String, StepError> {
    normalize_image_path(path).map_err(|source| StepError::Path { path: path.to_owned(), source })
}

/// An image path that must not be the root itself.
fn non_root_path(path: &str) -> Result<String, StepError> {
    let normalised = image_path(path)?;
    if normalised.is_empty() {
        return Err(StepError::Path { path: path.to_owned(), source: ImagePathError::Empty });
    }
    Ok(normalised)
}

/// Where a single file lands: inside `destination` when it names a directory (a trailing `/`,
/// or an existing directory), else at `destination` itself.
fn file_destination(tree: &FsTree, declared: &str, destination: String, name: &str) -> String {
    if declared.ends_with('/') || destination.is_empty() || tree_is_directory(tree, &destination) {
        return join(&destination, name);
    }
    destination
}

fn tree_is_directory(tree: &FsTree, path: &str) -> bool {
    path.is_empty() || tree.get(path).is_some_and(|node| matches!(node.entry.kind, IndexKind::Directory))
}

/// Entries for the parents of `path`: the missing ones created (0755, owned by `owner`), as
/// Docker creates them, and the existing ones repeated with the mode and owner the lower
/// layers give them. An engine applying a layer creates a directory that the layer does not
/// carry with its own defaults (0755, root), and that directory then hides the lower one's
/// metadata in the merged tree: BuildKit's layers carry every parent for the same reason.
fn parent_directories(tree: &FsTree, path: &str, owner: Owner) -> Result<Vec<LayerEntry>, StepError> {
    let mut entries = Vec::new();
    for (end, _) in path.match_indices('/') {
        let parent = &path[..end];
        match tree.get(parent) {
            Some(node) if matches!(node.entry.kind, IndexKind::Directory) => entries.push(existing_directory(node)),
            Some(node) => {
                return Err(StepError::ParentNotDirectory {
                    path: parent.to_owned(),
                    kind: kind_name(&node.entry.kind),
                });
            }
            None => entries.push(entry(parent, EntryKind::Directory, 0o755, owner)),
        }
    }
    Ok(entries)
}

/// An entry repeating an existing directory of the lower layers as it is.
fn existing_directory(node: &TreeNode) -> LayerEntry {
    entry(&node.entry.path, EntryKind::Directory, node.entry.mode, Owner { uid: node.entry.uid, gid: node.entry.gid })
}

/// The entry of a copy's destination directory when the source is a directory: the existing
/// directory as it is (a copy merges into it), or a new one, 0755 and owned by the copy's
/// owner, as BuildKit creates it (the source directory's own mode and owner are not copied).
fn destination_directory(tree: &FsTree, root: &str, options: &CopyOptions, replace: bool) -> Option<LayerEntry> {
    if root.is_empty() {
        return None;
    }
    match tree.get(root) {
        Some(node) if !replace && matches!(node.entry.kind, IndexKind::Directory) => Some(existing_directory(node)),
        _ => Some(entry(
            root,
            EntryKind::Directory,
            options.file.mode.unwrap_or(0o755),
            options.file.owner.unwrap_or(Owner::ROOT),
        )),
    }
}

fn kind_name(kind: &IndexKind) -> &'static str {
    match kind {
        IndexKind::Directory => "directory",
        IndexKind::File { .. } | IndexKind::HardLink { .. } => "file",
        IndexKind::Symlink { .. } => "symlink",
        IndexKind::CharDevice { .. } | IndexKind::BlockDevice { .. } => "device",
        IndexKind::Fifo => "fifo",
        IndexKind::Whiteout | IndexKind::OpaqueWhiteout => "whiteout",
    }
}

/// Follows symlinks of the final component of `path` inside `tree` (at most 40, like Linux).
fn resolve_symlinks(tree: &FsTree, path: &str) -> String {
    let mut current = path.to_owned();
    for _ in 0..40 {
        let Some(IndexKind::Symlink { target }) = tree.get(&current).map(|node| &node.entry.kind) else {
            return current;
        };
        let base = match current.rsplit_once('/') {
            Some((dir, _)) if !target.starts_with('/') => dir.to_owned(),
            _ => String::new(),
        };
        let mut components: Vec<&str> = if base.is_empty() { Vec::new() } else { base.split('/').collect() };
        for component in target.split('/') {
            match component {
                "" | "." => {}
                ".." => {
                    components.pop();
                }
                other => components.push(other),
            }
        }
        current = components.join("/");
    }
    current
}

fn spooled_path(spooled: &BTreeMap<String, PathBuf>, path: &str) -> Result<PathBuf, StepError> {
    spooled.get(path).cloned().ok_or_else(|| StepError::NotInSourceImage { path: format!("/{path}") })
}

pub fn join(parent: &str, child: &str) -> String {
    match (parent.is_empty(), child.is_empty()) {
        (true, _) => child.to_owned(),
        (false, true) => parent.to_owned(),
        (false, false) => format!("{parent}/{child}"),
    }
}

fn entry(path: &str, kind: EntryKind, mode: u32, owner: Owner) -> LayerEntry {
    LayerEntry { path: path.to_owned(), kind, mode, uid: owner.uid, gid: owner.gid, xattrs: Vec::new() }
}

fn file_entry(path: &str, kind: EntryKind, options: FileOptions, default_mode: u32) -> LayerEntry {
    entry(path, kind, options.mode.unwrap_or(default_mode), options.owner.unwrap_or(Owner::ROOT))
}
