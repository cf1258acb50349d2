//! Layer indexes and the merged filesystem view of a stack of layers.
//!
//! A [`LayerIndex`] lists a layer's entries (metadata, content sha256 for files, link targets),
//! so that later steps never decompress a layer to learn what it holds: it is saved in the cache
//! next to the blob (`Store::write_index`) when a layer is written (`layer::write_layer`) or
//! imported ([`index_layer`]).
//!
//! [`FsTree`] applies indexes bottom to top with OCI semantics (whiteouts and opaque whiteouts
//! hide what lower layers hold, a non-directory replacing a directory and vice versa, missing
//! parents implied as `0755 0:0` directories) and is what `listing()`, `copy_from` and the
//! parents-exist checks of file steps read. [`extract_files`] copies chosen regular files out
//! of layer blobs for `copy_from`.
//!
//! Safety: [`index_layer`] refuses entries that could land outside the image root (absolute
//! paths, `..` components, whiteouts naming `.` or `..`, hard links to such paths) and verifies
//! the diff id of what it read; [`FsTree::apply`] refuses an entry whose parent path resolves
//! through a symlink (in a lower layer or the same one), and a hard link whose target is not in
//! the tree.
//!
//! What this module deliberately does not do: unpack layers onto disk (the snapshot unpacker
//! does, and must keep its own guards), resolve symlinks (their targets are kept verbatim: they
//! are only ever resolved inside a running container), or keep file contents (only digests).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};

use layerwright_cache::{Digest, LayerRecord, Store};

use crate::layer::{
    IndexEntry, IndexKind, LayerIndex, MemberPath, TreeError, index_layer, is_regular_file, member_name,
    normalise_member_path, open_layer_stream, verify_diff_id,
};

/// The merged tree of a stored image's `layers`, bottom first, each from its saved index (or
/// indexed now when it has none).
pub fn of_layers(store: &Store, layers: &[LayerRecord]) -> Result<FsTree, TreeError> {
    let mut tree = FsTree::default();
    for (position, layer) in layers.iter().enumerate() {
        tree.apply(position, &layer.digest, &crate::layer::saved_or_indexed(store, layer)?)?;
    }
    Ok(tree)
}

/// Applies the indexes of a base image's layers to one tree, bottom layer first, which refuses
/// writes through symlinks (what `index_and_apply_layers` does after indexing each layer).
pub fn apply_indexes(layers: &[LayerRecord], indexes: &[LayerIndex]) -> Result<(), TreeError> {
    let mut tree = FsTree::default();
    for (position, (layer, index)) in layers.iter().zip(indexes).enumerate() {
        tree.apply(position, &layer.digest, index)?;
    }
    Ok(())
}

/// Indexes each layer of a base image (which verifies its diff id and refuses entries escaping
/// the root) and applies it to one tree (which refuses writes through symlinks), bottom layer
/// first. Every layer is indexed afresh, even when an index of its diff id exists: indexing is
/// what checks that the blob really is the layer the config names.
pub fn index_and_apply_layers(store: &Store, layers: &[LayerRecord]) -> Result<Vec<LayerIndex>, TreeError> {
    let mut tree = FsTree::default();
    let mut indexes = Vec::with_capacity(layers.len());
    for (position, layer) in layers.iter().enumerate() {
        let index = index_layer(store, layer)?;
        tree.apply(position, &layer.digest, &index)?;
        indexes.push(index);
    }
    Ok(indexes)
}

/// A node of the merged tree: the entry as it stands and the position of the layer it is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeNode {
    pub entry: IndexEntry,
    pub layer: usize,
}

/// The merged filesystem of a stack of layers (metadata only).
///
/// Always closed under parents: every proper parent of a node is a directory node.
#[derive(Debug, Clone, Default)]
pub struct FsTree {
    /// Keyed by the path with every `/` replaced by NUL (which no path contains), so that plain
    /// string order is component order: `a` < `a/b` < `a-b`, and a subtree is one contiguous
    /// range right after its root.
    nodes: BTreeMap<String, TreeNode>,
    /// For every hard link node (same keys): the node its target resolved to when the link was
    /// applied (following links to links). A later change of the target path does not change
    /// the linked file, exactly as with inodes.
    hard_links: BTreeMap<String, TreeNode>,
}

/// The key of `path` in [`FsTree::nodes`].
fn tree_key(path: &str) -> String {
    path.replace('/', "\0")
}

/// The proper parents of `path`, top down: `a`, `a/b` for `a/b/c`.
fn proper_parents(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(slash, _)| &path[..slash])
}

/// `Ok` when `path` is a normalised image path (non-empty, no empty, `.` or `..` components,
/// no NUL): what `index_layer` and `write_layer` produce. An index loaded from disk or built by
/// hand is checked again here.
fn is_normalised(path: &str) -> bool {
    !path.is_empty()
        && path.split('/').all(|component| !matches!(component, "" | "." | "..") && !component.contains('\0'))
}

impl FsTree {
    /// Applies the layer at stack position `layer` (0 = bottom) on top of the tree.
    ///
    /// Entries are applied in index order. A whiteout removes the path and everything below
    /// it, an opaque whiteout everything below its directory, but both only what lower layers
    /// put there (OCI: a whiteout never hides entries of its own layer). Any other entry first
    /// has its parents checked (a symlink parent is [`TreeError::ThroughSymlink`]) and missing
    /// ones implied, then replaces what is at its path (a directory over a directory only
    /// updates the metadata and keeps the children). On error the tree is left partly updated
    /// and should be discarded.
    pub fn apply(&mut self, layer: usize, digest: &Digest, index: &LayerIndex) -> Result<(), TreeError> {
        for entry in &index.entries {
            self.apply_entry(layer, digest, entry)?;
        }
        Ok(())
    }

    fn apply_entry(&mut self, layer: usize, digest: &Digest, entry: &IndexEntry) -> Result<(), TreeError> {
        let path = entry.path.as_str();
        let is_root_opaque = path.is_empty() && entry.kind == IndexKind::OpaqueWhiteout;
        if !is_root_opaque && !is_normalised(path) {
            return Err(TreeError::EscapesRoot { layer: digest.clone(), entry: path.to_owned() });
        }
        match &entry.kind {
            IndexKind::Whiteout => {
                self.check_no_symlink_parent(path, path, digest)?;
                self.remove_lower(path, true, layer);
            }
            IndexKind::OpaqueWhiteout => {
                if !is_root_opaque {
                    // The `.wh..wh..opq` file is inside the directory: it is a parent too.
                    let directories = proper_parents(path).chain([path]);
                    self.ensure_directories(directories, path, layer, digest)?;
                }
                self.remove_lower(path, false, layer);
            }
            kind => {
                self.ensure_directories(proper_parents(path), path, layer, digest)?;
                let key = tree_key(path);
                let resolved_link = match kind {
                    IndexKind::HardLink { target } => Some(self.resolve_hard_link(path, &key, target, digest)?),
                    _ => None,
                };
                let node = TreeNode { entry: entry.clone(), layer };
                let directory_over_directory = *kind == IndexKind::Directory
                    && self.nodes.get(&key).is_some_and(|old| old.entry.kind == IndexKind::Directory);
                if !directory_over_directory {
                    self.remove_all(path, true);
                }
                self.nodes.insert(key.clone(), node);
                if let Some(resolved) = resolved_link {
                    self.hard_links.insert(key, resolved);
                }
            }
        }
        Ok(())
    }

    /// The node a new hard link at `path` to `target` stands for; refuses a target that is not
    /// in the tree, is a directory, or would be removed by placing the link.
    fn resolve_hard_link(&self, path: &str, key: &str, target: &str, digest: &Digest) -> Result<TreeNode, TreeError> {
        let dangling =
            || TreeError::DanglingHardLink { layer: digest.clone(), entry: path.to_owned(), target: target.to_owned() };
        if !is_normalised(target) {
            return Err(TreeError::EscapesRoot { layer: digest.clone(), entry: format!("{path} => {target}") });
        }
        let target_key = tree_key(target);
        // A link to itself or into the directory it replaces would point at what it removes.
        if target_key == key || target_key.starts_with(&format!("{key}\0")) {
            return Err(dangling());
        }
        let Some(target_node) = self.nodes.get(&target_key) else {
            return Err(dangling());
        };
        match target_node.entry.kind {
            IndexKind::Directory => Err(dangling()),
            IndexKind::HardLink { .. } => {
                Ok(self.hard_links.get(&target_key).expect("every hard link node has a resolved target").clone())
            }
            _ => Ok(target_node.clone()),
        }
    }

    /// Refuses `path` when one of its proper parents is a symlink in the tree.
    fn check_no_symlink_parent(&self, path: &str, entry: &str, digest: &Digest) -> Result<(), TreeError> {
        for parent in proper_parents(path) {
            if let Some(node) = self.nodes.get(&tree_key(parent))
                && matches!(node.entry.kind, IndexKind::Symlink { .. })
            {
                return Err(TreeError::ThroughSymlink {
                    layer: digest.clone(),
                    entry: entry.to_owned(),
                    symlink: parent.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Makes sure each of `directories` (top down) is a directory, inserting missing ones as
    /// implicit `0755 0:0` directories of `layer`; a symlink among them is the write-through-
    /// a-symlink attack, any other non-directory a malformed layer.
    fn ensure_directories<'p>(
        &mut self,
        directories: impl Iterator<Item = &'p str>,
        entry: &str,
        layer: usize,
        digest: &Digest,
    ) -> Result<(), TreeError> {
        for directory in directories {
            let key = tree_key(directory);
            match self.nodes.get(&key).map(|node| &node.entry.kind) {
                Some(IndexKind::Directory) => {}
                Some(IndexKind::Symlink { .. }) => {
                    return Err(TreeError::ThroughSymlink {
                        layer: digest.clone(),
                        entry: entry.to_owned(),
                        symlink: directory.to_owned(),
                    });
                }
                Some(_) => {
                    return Err(TreeError::ParentNotDirectory {
                        layer: digest.clone(),
                        entry: entry.to_owned(),
                        parent: directory.to_owned(),
                    });
                }
                None => {
                    let implicit = IndexEntry {
                        path: directory.to_owned(),
                        kind: IndexKind::Directory,
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                    };
                    self.nodes.insert(key, TreeNode { entry: implicit, layer });
                }
            }
        }
        Ok(())
    }

    /// The keys of `path` (when `inclusive`) and of everything below it.
    fn subtree_keys(&self, path: &str, inclusive: bool) -> Vec<String> {
        self.subtree(path)
            .filter(|(node_path, _)| inclusive || *node_path != path)
            .map(|(node_path, _)| tree_key(node_path))
            .collect()
    }

    fn remove_node(&mut self, key: &str) {
        self.nodes.remove(key);
        self.hard_links.remove(key);
    }

    /// Removes `path` (when `inclusive`) and everything below it, from any layer.
    fn remove_all(&mut self, path: &str, inclusive: bool) {
        for key in self.subtree_keys(path, inclusive) {
            self.remove_node(&key);
        }
    }

    /// Removes what layers below `layer` put at `path` (when `inclusive`) and below it. A lower
    /// directory that still has entries of `layer` below it stays (now counted as of `layer`),
    /// so that the tree stays closed under parents.
    fn remove_lower(&mut self, path: &str, inclusive: bool, layer: usize) {
        let mut lower = Vec::new();
        let mut keep = HashSet::new();
        for (node_path, node) in self.subtree(path) {
            if !inclusive && node_path == path {
                continue;
            }
            if node.layer < layer {
                lower.push(node_path.to_owned());
            } else {
                keep.extend(proper_parents(node_path).map(str::to_owned));
            }
        }
        for node_path in lower {
            let key = tree_key(&node_path);
            if keep.contains(&node_path) {
                if let Some(node) = self.nodes.get_mut(&key) {
                    node.layer = layer;
                }
                continue;
            }
            self.remove_node(&key);
        }
    }

    /// The node at the image path `path` (normalised, no leading `/`), if the tree has one.
    pub fn get(&self, path: &str) -> Option<&TreeNode> {
        self.nodes.get(&tree_key(path))
    }

    /// For a hard link node at `path`: the node its target resolved to when the link was
    /// applied (a regular file, symlink, device or fifo), whose `layer` holds the bytes. This
    /// stays right when a later layer replaces or deletes the target path.
    pub fn hard_link_target(&self, path: &str) -> Option<&TreeNode> {
        self.hard_links.get(&tree_key(path))
    }

    /// `path` and everything below it, in sorted order.
    ///
    /// Sorted component-wise (`a`, `a/b`, `a-b`), so the subtree of `a` never includes `a-b`.
    /// `path == ""` is the whole tree; leading and trailing `/` are ignored.
    pub fn subtree<'a>(&'a self, path: &'a str) -> impl Iterator<Item = (&'a str, &'a TreeNode)> + 'a {
        let path = path.trim_matches('/');
        let key = tree_key(path);
        let below = format!("{key}\0");
        self.nodes
            .range::<str, _>((Bound::Included(key.as_str()), Bound::Unbounded))
            .take_while(move |(node_key, _)| path.is_empty() || **node_key == key || node_key.starts_with(&below))
            .map(|(_, node)| (node.entry.path.as_str(), node))
    }

    /// One line per path, sorted: `TYPE MODE UID:GID SIZE DIGEST-OR-TARGET /PATH`, for insta.
    ///
    /// Sorted component-wise (a directory, then its contents). Fields:
    /// - TYPE: `dir`, `file`, `symlink`, `hardlink`, `char`, `block` or `fifo`;
    /// - MODE: 4 octal digits (`0755`, `4755`);
    /// - SIZE: bytes for files and hard links to files, `-` otherwise;
    /// - WHAT: `sha256:<hex>` for files, `-> TARGET` for symlinks (verbatim),
    ///   `sha256:<hex> => /TARGET` for hard links to files (`=> /TARGET` to anything else),
    ///   `MAJOR,MINOR` for devices, `-` for directories and fifos.
    ///
    /// In paths and link targets, a space, a backslash and anything that is not printable
    /// ASCII are escaped as `char::escape_default` does (`\\`, `\n`, `\t`, `\u{20}`, `\u{e9}`),
    /// so one path is always one line. Every line ends with a newline.
    ///
    /// ```text
    /// dir 0755 0:0 - - /app
    /// file 0644 0:0 5 sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824 /app/hello
    /// hardlink 0644 0:0 5 sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824 => /app/hello /app/hi
    /// symlink 0777 0:0 - -> hello /app/link
    /// char 0666 0:0 - 1,3 /dev/null
    /// ```
    pub fn listing(&self) -> String {
        let mut text = String::new();
        for (key, node) in &self.nodes {
            let entry = &node.entry;
            let (kind, size, what) = match &entry.kind {
                IndexKind::Directory => ("dir", "-".to_owned(), "-".to_owned()),
                IndexKind::File { size, sha256 } => ("file", size.to_string(), sha256.to_string()),
                IndexKind::Symlink { target } => {
                    ("symlink", "-".to_owned(), format!("-> {}", escape_for_listing(target)))
                }
                IndexKind::HardLink { target } => {
                    let target_text = format!("=> /{}", escape_for_listing(target));
                    match self.hard_links.get(key).map(|resolved| &resolved.entry.kind) {
                        Some(IndexKind::File { size, sha256 }) => {
                            ("hardlink", size.to_string(), format!("{sha256} {target_text}"))
                        }
                        _ => ("hardlink", "-".to_owned(), target_text),
                    }
                }
                IndexKind::CharDevice { major, minor } => ("char", "-".to_owned(), format!("{major},{minor}")),
                IndexKind::BlockDevice { major, minor } => ("block", "-".to_owned(), format!("{major},{minor}")),
                IndexKind::Fifo => ("fifo", "-".to_owned(), "-".to_owned()),
                IndexKind::Whiteout | IndexKind::OpaqueWhiteout => {
                    unreachable!("whiteouts are applied, never stored in the tree")
                }
            };
            let _ = writeln!(
                text,
                "{kind} {:04o} {}:{} {size} {what} /{}",
                entry.mode,
                entry.uid,
                entry.gid,
                escape_for_listing(&entry.path)
            );
        }
        text
    }
}

/// Escapes a space, a backslash and everything that is not printable ASCII.
pub(crate) fn escape_for_listing(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '\\' => escaped.push_str("\\\\"),
            ' ' => escaped.push_str("\\u{20}"),
            '!'..='~' => escaped.push(character),
            _ => escaped.extend(character.escape_default()),
        }
    }
    escaped
}

/// Extracts the regular files named in `wanted` (stack position → paths) from the layers of
/// `layers` into fresh files under `spool_dir`, reading each needed layer blob once. Returns
/// path → spooled file.
///
/// Paths are normalised image paths (`app/bin/x`). Spooled files are named by a counter
/// (`000000`, `000001`, ...; numbers already taken in `spool_dir` are skipped), never by the
/// image path. A path that a layer holds twice is taken from its last member; a path wanted
/// from several layers maps to the file of the highest position. Each layer's diff id is
/// verified while it is read. Only regular-file members count: for a hard link, ask for the
/// path and layer of [`FsTree::hard_link_target`] instead.
pub fn extract_files(
    store: &Store,
    layers: &[LayerRecord],
    wanted: &BTreeMap<usize, BTreeSet<String>>,
    spool_dir: &Path,
) -> Result<BTreeMap<String, PathBuf>, TreeError> {
    let mut spooled = BTreeMap::new();
    let mut counter = 0u64;
    for (&position, paths) in wanted {
        if paths.is_empty() {
            continue;
        }
        let Some(layer) = layers.get(position) else {
            return Err(TreeError::NoSuchLayer { position, layers: layers.len() });
        };
        let read_error = |source| TreeError::Read { layer: layer.digest.clone(), source };
        let mut archive = tar::Archive::new(open_layer_stream(store, layer)?);
        archive.set_ignore_zeros(false);
        let mut found = BTreeSet::new();
        for member in archive.entries().map_err(read_error)? {
            let mut member = member.map_err(read_error)?;
            if !is_regular_file(member.header().entry_type()) {
                continue;
            }
            let MemberPath::Inside(path) = normalise_member_path(&member_name(&member, &layer.digest)?) else {
                continue;
            };
            if !paths.contains(&path) {
                continue;
            }
            let (spool_path, mut file) = create_spool_file(spool_dir, &mut counter)?;
            let write_error = |source| TreeError::Write { path: spool_path.clone(), source };
            // Reading the member and writing the spool file fail differently; copy by hand
            // so each error names the right side.
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let count = match member.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(count) => count,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(error) => return Err(read_error(error)),
                };
                file.write_all(&buffer[..count]).map_err(write_error)?;
            }
            file.flush().map_err(write_error)?;
            found.insert(path.clone());
            spooled.insert(path, spool_path);
        }
        verify_diff_id(archive.into_inner(), layer)?;
        if let Some(missing) = paths.difference(&found).next() {
            return Err(TreeError::MissingFile { layer: layer.digest.clone(), path: missing.clone() });
        }
    }
    Ok(spooled)
}

/// A new file `spool_dir/<counter>`, skipping numbers that are taken.
fn create_spool_file(spool_dir: &Path, counter: &mut u64) -> Result<(PathBuf, File), TreeError> {
    loop {
        let path = spool_dir.join(format!("{:06}", *counter));
        *counter += 1;
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(TreeError::Write { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::layer::{Content, EntryKind, LayerEntry, LayerOptions, write_layer};

    fn new_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    fn layer_digest(position: usize) -> Digest {
        Digest::of_bytes(format!("layer {position}").as_bytes())
    }

    fn index_entry(path: &str, kind: IndexKind, mode: u32) -> IndexEntry {
        IndexEntry { path: path.to_owned(), kind, mode, uid: 0, gid: 0 }
    }

    fn dir(path: &str) -> IndexEntry {
        index_entry(path, IndexKind::Directory, 0o755)
    }

    fn file(path: &str, content: &str) -> IndexEntry {
        let kind = IndexKind::File { size: content.len() as u64, sha256: Digest::of_bytes(content.as_bytes()) };
        index_entry(path, kind, 0o644)
    }

    fn symlink(path: &str, target: &str) -> IndexEntry {
        let kind = IndexKind::Symlink { target: target.to_owned() };
        index_entry(path, kind, 0o777)
    }

    fn hard_link(path: &str, target: &str) -> IndexEntry {
        let kind = IndexKind::HardLink { target: target.to_owned() };
        index_entry(path, kind, 0o644)
    }

    fn whiteout(path: &str) -> IndexEntry {
        index_entry(path, IndexKind::Whiteout, 0)
    }

    fn opaque(path: &str) -> IndexEntry {
        index_entry(path, IndexKind::OpaqueWhiteout, 0)
    }

    fn apply_all(layers: &[Vec<IndexEntry>]) -> Result<FsTree, TreeError> {
        let mut tree = FsTree::default();
        for (position, entries) in layers.iter().enumerate() {
            let index = LayerIndex { entries: entries.clone() };
            tree.apply(position, &layer_digest(position), &index)?;
        }
        Ok(tree)
    }

    /// The listing with every sha256 shortened to 8 hex digits, for readable expectations.
    fn short_listing(tree: &FsTree) -> String {
        let listing = tree.listing();
        let mut short = String::new();
        let mut rest = listing.as_str();
        while let Some(start) = rest.find("sha256:") {
            let hex_start = start + "sha256:".len();
            short.push_str(&rest[..hex_start + 8]);
            rest = &rest[hex_start + 64..];
        }
        short.push_str(rest);
        short
    }

    /// Applies `layers` bottom to top and compares the (shortened) listing.
    fn check_listing(layers: &[Vec<IndexEntry>], expected: &str) {
        let tree = apply_all(layers).unwrap();
        let listing = short_listing(&tree);
        assert_eq!(listing, expected, "\n{listing}");
    }

    /// Applies `layers` and expects an error whose message contains `expected`.
    fn check_error(layers: &[Vec<IndexEntry>], expected: &str) {
        let error = apply_all(layers).unwrap_err();
        let text = error.to_string();
        assert!(text.contains(expected), "{text:?} does not contain {expected:?}");
    }

    // Short digests of the contents used below.
    // hello: 2cf24dba, bye: b49f425a, new: 11507a0e, old: cba06b57, x: 2d711642

    #[test]
    fn listing_of_a_simple_stack() {
        check_listing(
            &[vec![
                dir("etc"),
                file("etc/passwd", "hello"),
                symlink("bin", "usr/bin"),
                // Parents `usr` and `usr/bin` are implied.
                file("usr/bin/sh", "x"),
                index_entry("dev/null", IndexKind::CharDevice { major: 1, minor: 3 }, 0o666),
                index_entry("dev/sda", IndexKind::BlockDevice { major: 8, minor: 0 }, 0o660),
                index_entry("run/fifo", IndexKind::Fifo, 0o600),
                hard_link("usr/bin/bash", "usr/bin/sh"),
                IndexEntry { uid: 1000, gid: 100, ..index_entry("home/user", IndexKind::Directory, 0o4750) },
                // One path, one line: spaces, backslashes, newlines, non-ASCII are escaped.
                file("odd/a b\\c\nd\u{e9}", "x"),
                symlink("odd/to space", "a b"),
            ]],
            "\
symlink 0777 0:0 - -> usr/bin /bin
dir 0755 0:0 - - /dev
char 0666 0:0 - 1,3 /dev/null
block 0660 0:0 - 8,0 /dev/sda
dir 0755 0:0 - - /etc
file 0644 0:0 5 sha256:2cf24dba /etc/passwd
dir 0755 0:0 - - /home
dir 4750 1000:100 - - /home/user
dir 0755 0:0 - - /odd
file 0644 0:0 1 sha256:2d711642 /odd/a\\u{20}b\\\\c\\nd\\u{e9}
symlink 0777 0:0 - -> a\\u{20}b /odd/to\\u{20}space
dir 0755 0:0 - - /run
fifo 0600 0:0 - - /run/fifo
dir 0755 0:0 - - /usr
dir 0755 0:0 - - /usr/bin
hardlink 0644 0:0 1 sha256:2d711642 => /usr/bin/sh /usr/bin/bash
file 0644 0:0 1 sha256:2d711642 /usr/bin/sh
",
        );
    }

    #[test]
    fn whiteouts_and_replacements_follow_oci_semantics() {
        // A whiteout removes the path and everything below it.
        check_listing(
            &[
                vec![dir("a"), file("a/x", "x"), file("a/y/z", "x"), file("keep", "x")],
                vec![whiteout("a"), whiteout("not-there")],
            ],
            "file 0644 0:0 1 sha256:2d711642 /keep\n",
        );
        // An opaque whiteout hides what lower layers put below the directory, but not what
        // its own layer put there (here `a/-new` sorts before `.wh..wh..opq`).
        check_listing(
            &[
                vec![dir("a"), file("a/old", "old"), file("a/-old", "old"), file("b", "old")],
                vec![file("a/-new", "new"), opaque("a"), file("a/new", "new")],
            ],
            "\
dir 0755 0:0 - - /a
file 0644 0:0 3 sha256:11507a0e /a/-new
file 0644 0:0 3 sha256:11507a0e /a/new
file 0644 0:0 3 sha256:cba06b57 /b
",
        );
        // A lower directory that still holds entries of the whiting-out layer stays.
        check_listing(
            &[vec![dir("a"), dir("a/-sub"), file("a/-sub/old", "old")], vec![file("a/-sub/new", "new"), opaque("a")]],
            "\
dir 0755 0:0 - - /a
dir 0755 0:0 - - /a/-sub
file 0644 0:0 3 sha256:11507a0e /a/-sub/new
",
        );
        // An opaque whiteout of the root hides every lower layer.
        check_listing(
            &[vec![file("a", "old")], vec![opaque(""), file("b", "new")]],
            "file 0644 0:0 3 sha256:11507a0e /b\n",
        );
        // A whiteout in layer 1 never hides an entry of layer 1 itself.
        check_listing(&[vec![], vec![file("-x", "new"), whiteout("-x")]], "file 0644 0:0 3 sha256:11507a0e /-x\n");
        // A file replaces a directory (and its contents); a directory replaces a file; a
        // directory over a directory keeps the children and takes the new metadata.
        check_listing(
            &[
                vec![dir("x"), file("x/1", "old"), file("y", "old"), dir("z"), file("z/1", "old")],
                vec![file("x", "new"), dir("y"), file("y/2", "new"), index_entry("z", IndexKind::Directory, 0o700)],
            ],
            "\
file 0644 0:0 3 sha256:11507a0e /x
dir 0755 0:0 - - /y
file 0644 0:0 3 sha256:11507a0e /y/2
dir 0700 0:0 - - /z
file 0644 0:0 3 sha256:cba06b57 /z/1
",
        );
        // A hard link keeps the content it was made with when its target path changes later.
        check_listing(
            &[
                vec![file("a", "hello"), hard_link("b", "a"), hard_link("c", "b")],
                vec![file("a", "bye"), whiteout("b")],
            ],
            "\
file 0644 0:0 3 sha256:b49f425a /a
hardlink 0644 0:0 5 sha256:2cf24dba => /b /c
",
        );
    }

    #[test]
    fn layer_positions_are_tracked() {
        let tree = apply_all(&[vec![dir("a"), file("a/x", "x")], vec![file("a/y", "x"), dir("a")]]).unwrap();
        let positions: Vec<(&str, usize)> = tree.subtree("").map(|(path, node)| (path, node.layer)).collect();
        assert_eq!(positions, [("a", 1), ("a/x", 0), ("a/y", 1)]);
        assert_eq!(tree.get("a/x").unwrap().entry, file("a/x", "x"));
        assert!(tree.get("a/z").is_none());
    }

    #[test]
    fn unsafe_entries_are_refused() {
        // Writing through a symlink of a lower layer, of the same layer, deeper down.
        check_error(
            &[vec![symlink("link", "/etc")], vec![file("link/passwd", "x")]],
            "entry \"link/passwd\" is written through the symlink \"link\"",
        );
        check_error(&[vec![symlink("link", "/etc"), file("link/passwd", "x")]], "through the symlink \"link\"");
        check_error(&[vec![dir("a"), symlink("a/l", "/")], vec![file("a/l/b/c", "x")]], "through the symlink \"a/l\"");
        check_error(&[vec![symlink("link", "/etc")], vec![opaque("link")]], "through the symlink \"link\"");
        check_error(&[vec![symlink("link", "/etc")], vec![whiteout("link/passwd")]], "through the symlink \"link\"");
        check_error(&[vec![symlink("link", "/etc")], vec![hard_link("link/x", "y")]], "through the symlink \"link\"");
        // Replacing the symlink itself is fine.
        check_listing(
            &[vec![symlink("link", "/etc")], vec![dir("link"), file("link/x", "x")]],
            "dir 0755 0:0 - - /link\nfile 0644 0:0 1 sha256:2d711642 /link/x\n",
        );
        // Paths that leave the root.
        for path in ["../x", "a/../../x", "/abs", "", "a//b", "./a"] {
            check_error(&[vec![file(path, "x")]], "would land outside the image root");
        }
        check_error(&[vec![whiteout("..")]], "would land outside the image root");
        check_error(&[vec![file("a", "x"), hard_link("b", "../a")]], "would land outside the image root");
        // Hard links need a non-directory target that is in the tree.
        check_error(
            &[vec![hard_link("b", "missing")]],
            "hard link \"b\" points at \"missing\", which is not in the image",
        );
        check_error(&[vec![dir("d"), hard_link("b", "d")]], "which is not in the image");
        check_error(&[vec![file("b", "x"), hard_link("b", "b")]], "which is not in the image");
        check_error(&[vec![dir("d"), file("d/f", "x"), hard_link("d", "d/f")]], "which is not in the image");
        // A parent that is a file.
        check_error(
            &[vec![file("a", "x")], vec![file("a/b", "x")]],
            "entry \"a/b\" is below \"a\", which is not a directory",
        );
    }

    #[test]
    fn subtrees_are_contiguous_in_component_order() {
        let tree = apply_all(&[vec![
            file("ab", "x"),
            file("a.b", "x"),
            file("a-b", "x"),
            file("a/c/d", "x"),
            file("a/b", "x"),
            dir("a"),
        ]])
        .unwrap();
        fn check(tree: &FsTree, path: &str, expected: &[&str]) {
            let paths: Vec<&str> = tree.subtree(path).map(|(path, _)| path).collect();
            assert_eq!(paths, expected, "subtree({path:?})");
        }
        check(&tree, "", &["a", "a/b", "a/c", "a/c/d", "a-b", "a.b", "ab"]);
        check(&tree, "/", &["a", "a/b", "a/c", "a/c/d", "a-b", "a.b", "ab"]);
        check(&tree, "a", &["a", "a/b", "a/c", "a/c/d"]);
        check(&tree, "/a/", &["a", "a/b", "a/c", "a/c/d"]);
        check(&tree, "a/c", &["a/c", "a/c/d"]);
        check(&tree, "a/b", &["a/b"]);
        check(&tree, "a-b", &["a-b"]);
        check(&tree, "a/", &["a", "a/b", "a/c", "a/c/d"]);
        check(&tree, "missing", &[]);
        check(&tree, "a/c/d/e", &[]);
    }

    /// A tar member written with raw header fields, so that names the tar crate's setters
    /// refuse (`..`, absolute paths) can be crafted.
    struct Member<'a> {
        name: &'a str,
        entry_type: tar::EntryType,
        link: &'a str,
        content: &'a [u8],
    }

    fn member<'a>(name: &'a str, entry_type: tar::EntryType) -> Member<'a> {
        Member { name, entry_type, link: "", content: b"" }
    }

    fn crafted_tar(members: &[Member<'_>]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for member in members {
            let mut header = tar::Header::new_ustar();
            let ustar = header.as_ustar_mut().unwrap();
            ustar.name[..member.name.len()].copy_from_slice(member.name.as_bytes());
            ustar.linkname[..member.link.len()].copy_from_slice(member.link.as_bytes());
            header.set_entry_type(member.entry_type);
            header.set_size(member.content.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_cksum();
            builder.append(&header, member.content).unwrap();
        }
        builder.into_inner().unwrap()
    }

    /// Stores `bytes` as a layer blob with `media_type`; the diff id is of `tar`.
    fn stored_layer(store: &Store, tar: &[u8], bytes: &[u8], media_type: &str) -> LayerRecord {
        let blob = store.put_blob(bytes).unwrap();
        LayerRecord {
            diff_id: Digest::of_bytes(tar),
            digest: blob.digest,
            size: blob.size,
            media_type: media_type.to_owned(),
        }
    }

    const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

    #[test]
    fn index_layer_refuses_names_that_escape_the_root() {
        use tar::EntryType::{Directory, Link, Regular};
        fn check(members: &[Member<'_>]) {
            let (_dir, store) = new_store();
            let tar = crafted_tar(members);
            let layer = stored_layer(&store, &tar, &tar, TAR);
            let error = index_layer(&store, &layer).unwrap_err();
            assert!(
                matches!(error, TreeError::EscapesRoot { .. }),
                "{:?}: {error}",
                members.iter().map(|member| member.name).collect::<Vec<_>>()
            );
        }
        for name in ["../x", "a/../../x", "./../x", "/abs", "/", "a/.wh..", "a/.wh...", ".wh.."] {
            check(&[member(name, Regular)]);
        }
        check(&[member("./", Regular)]);
        check(&[member("..", Directory)]);
        for target in ["../etc/passwd", "/etc/passwd", "./"] {
            let link = Member { link: target, ..member("x", Link) };
            check(&[member("etc/passwd", Regular), link]);
        }
    }

    #[test]
    fn index_layer_normalises_names_and_reads_whiteouts() {
        use tar::EntryType::{Directory, Link, Regular, Symlink};
        let (_dir, store) = new_store();
        let tar = crafted_tar(&[
            member("./", Directory),
            member("./etc/", Directory),
            Member { content: b"hello", ..member("./etc/passwd", Regular) },
            member("./etc/.wh.shadow", Regular),
            member("var/.wh..wh..opq", Regular),
            member(".wh..wh..opq", Regular),
            member(".wh..wh.plnk", Regular),
            Member { link: "./etc/passwd", ..member("./hl", Link) },
            Member { link: "../../etc/passwd", ..member("lnk", Symlink) },
            member("a//b/./c", Directory),
        ]);
        // A gzip blob under the Docker media type of an uncompressed layer: sniffed.
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&tar).unwrap();
        let gzip = gzip.finish().unwrap();
        let layer = stored_layer(&store, &tar, &gzip, "application/vnd.docker.image.rootfs.diff.tar");
        let index = index_layer(&store, &layer).unwrap();
        let entry = |path: &str, kind| index_entry(path, kind, 0o644);
        let expected = vec![
            entry("etc", IndexKind::Directory),
            entry("etc/passwd", IndexKind::File { size: 5, sha256: Digest::of_bytes(b"hello") }),
            entry("etc/shadow", IndexKind::Whiteout),
            entry("var", IndexKind::OpaqueWhiteout),
            entry("", IndexKind::OpaqueWhiteout),
            entry("hl", IndexKind::HardLink { target: "etc/passwd".into() }),
            entry("lnk", IndexKind::Symlink { target: "../../etc/passwd".into() }),
            entry("a/b/c", IndexKind::Directory),
        ];
        assert_eq!(index.entries, expected);
        assert_eq!(LayerIndex::load(&store, &layer.diff_id).unwrap(), Some(index));
    }

    #[test]
    fn index_layer_checks_the_diff_id_and_media_type() {
        let (_dir, store) = new_store();
        let tar = crafted_tar(&[member("a", tar::EntryType::Regular)]);
        let mut layer = stored_layer(&store, &tar, &tar, TAR);
        layer.diff_id = Digest::of_bytes(b"something else");
        let error = index_layer(&store, &layer).unwrap_err();
        let TreeError::DiffIdMismatch { expected, actual, .. } = error else {
            panic!("{error}");
        };
        assert_eq!(expected, layer.diff_id);
        assert_eq!(actual, Digest::of_bytes(&tar));
        assert_eq!(LayerIndex::load(&store, &layer.diff_id).unwrap(), None);

        // Trailing bytes after the end-of-archive blocks count for the diff id.
        let mut padded = tar.clone();
        padded.extend_from_slice(&[0; 512 * 16]);
        let layer = stored_layer(&store, &tar, &padded, TAR);
        assert!(matches!(index_layer(&store, &layer), Err(TreeError::DiffIdMismatch { .. })));
        let layer = stored_layer(&store, &padded, &padded, TAR);
        assert_eq!(index_layer(&store, &layer).unwrap().entries.len(), 1);

        let layer = stored_layer(&store, &tar, &tar, "application/octet-stream");
        assert!(matches!(index_layer(&store, &layer), Err(TreeError::UnsupportedMediaType { .. })));
    }

    fn inline_file(path: &str, content: &[u8]) -> LayerEntry {
        LayerEntry {
            path: path.to_owned(),
            kind: EntryKind::File { content: Content::Inline(Arc::from(content)), size: content.len() as u64 },
            mode: 0o644,
            uid: 0,
            gid: 0,
            xattrs: Vec::new(),
        }
    }

    fn layer_entry(path: &str, kind: EntryKind, mode: u32) -> LayerEntry {
        LayerEntry { path: path.to_owned(), kind, mode, uid: 1, gid: 2, xattrs: vec![("user.k".into(), b"v".to_vec())] }
    }

    #[test]
    fn index_layer_reads_back_what_write_layer_wrote() {
        let long_dir = "d".repeat(120);
        let entries = vec![
            layer_entry("usr", EntryKind::Directory, 0o755),
            inline_file("usr/bin/su", b"su"),
            inline_file(&format!("{long_dir}/{}", "f".repeat(150)), b"long"),
            // 160 bytes in one component: PAX, with a header copy cut at a char boundary.
            inline_file(&"\u{e9}".repeat(80), b"unicode"),
            layer_entry("usr/bin/link", EntryKind::HardLink { target: "usr/bin/su".into() }, 0o644),
            layer_entry("sym", EntryKind::Symlink { target: "../".repeat(50) }, 0o777),
            layer_entry("dev/null", EntryKind::CharDevice { major: 1, minor: 3 }, 0o666),
            layer_entry("dev/sda", EntryKind::BlockDevice { major: 8, minor: 1 }, 0o660),
            layer_entry("fifo", EntryKind::Fifo, 0o600),
            layer_entry("gone", EntryKind::Whiteout, 0),
            layer_entry("opaque", EntryKind::OpaqueWhiteout, 0),
            layer_entry("", EntryKind::OpaqueWhiteout, 0),
            LayerEntry { uid: 5_000_000, ..inline_file("big-uid", b"") },
        ];
        for compression in
            [crate::layer::Compression::Gzip, crate::layer::Compression::Zstd, crate::layer::Compression::None]
        {
            let (_dir, store) = new_store();
            let options = LayerOptions { compression, mtime: 0 };
            let written = write_layer(&store, entries.clone(), &options).unwrap();
            let indexed = index_layer(&store, &written.record).unwrap();
            assert_eq!(indexed, written.index, "{compression:?}");
            let mut tree = FsTree::default();
            tree.apply(0, &written.record.digest, &indexed).unwrap();
            assert!(tree.get("usr/bin/su").is_some());
        }
    }

    #[test]
    fn extract_files_spools_the_wanted_files() {
        let (dir, store) = new_store();
        let options = LayerOptions { compression: crate::layer::Compression::Gzip, mtime: 0 };
        let long_path = format!("{}/{}", "x".repeat(120), "y".repeat(120));
        let bottom =
            write_layer(&store, vec![inline_file("a", b"bottom a"), inline_file("b", b"bottom b")], &options).unwrap();
        let top = write_layer(
            &store,
            vec![inline_file("a", b"top a"), inline_file("c/d", b"top c/d"), inline_file(&long_path, b"long")],
            &options,
        )
        .unwrap();
        let layers = [bottom.record, top.record];
        let spool = dir.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        // A taken name is skipped, never overwritten.
        std::fs::write(spool.join("000000"), b"taken").unwrap();

        let wanted = |pairs: &[(usize, &str)]| {
            let mut wanted: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
            for &(position, path) in pairs {
                wanted.entry(position).or_default().insert(path.to_owned());
            }
            wanted
        };
        let extracted =
            extract_files(&store, &layers, &wanted(&[(0, "b"), (1, "a"), (1, "c/d"), (1, &long_path)]), &spool)
                .unwrap();
        let contents: BTreeMap<&str, Vec<u8>> = extracted
            .iter()
            .map(|(path, file)| {
                assert_eq!(file.parent(), Some(spool.as_path()));
                (path.as_str(), std::fs::read(file).unwrap())
            })
            .collect();
        let expected: BTreeMap<&str, Vec<u8>> = [
            ("a", b"top a".to_vec()),
            ("b", b"bottom b".to_vec()),
            ("c/d", b"top c/d".to_vec()),
            (long_path.as_str(), b"long".to_vec()),
        ]
        .into_iter()
        .collect();
        assert_eq!(contents, expected);
        assert_eq!(std::fs::read(spool.join("000000")).unwrap(), b"taken");
        assert_eq!(extracted["b"], spool.join("000001"));

        let error = extract_files(&store, &layers, &wanted(&[(0, "c/d")]), &spool).unwrap_err();
        assert!(matches!(&error, TreeError::MissingFile { path, .. } if path == "c/d"), "{error}");
        let error = extract_files(&store, &layers, &wanted(&[(2, "a")]), &spool).unwrap_err();
        assert!(matches!(error, TreeError::NoSuchLayer { position: 2, layers: 2 }), "{error}");
    }

    #[test]
    fn unreadable_indexes_read_as_absent() {
        let (_dir, store) = new_store();
        let diff_id = Digest::of_bytes(b"layer");
        assert_eq!(LayerIndex::load(&store, &diff_id).unwrap(), None);
        let index = LayerIndex { entries: vec![file("a", "x"), whiteout("b")] };
        index.save(&store, &diff_id).unwrap();
        assert_eq!(LayerIndex::load(&store, &diff_id).unwrap(), Some(index));
        store.write_index(&diff_id, b"{not json").unwrap();
        assert_eq!(LayerIndex::load(&store, &diff_id).unwrap(), None);
    }
}
