//! The deterministic layer writer: entries in, one compressed tar blob (and its index) out.
//!
//! [`write_layer`] takes the entries of one layer in any order and streams them as a tar
//! through a diff-id hasher and a compressor into a new blob of the [`Store`], building the
//! layer's [`LayerIndex`] on the way. Nothing is held whole in memory: file contents are read
//! from their sources while the tar is written.
//!
//! Reproducibility rules (DESIGN.md), all enforced here:
//! - Entries are sorted component-wise by tar path (`a` < `a/b` < `a-b`: a directory always
//!   before its contents) and a path may appear only once.
//! - Every header is a ustar header written explicitly: mode bits exactly as given (setuid,
//!   setgid, sticky, 0600 included), uid/gid as given, empty uname/gname, mtime =
//!   [`LayerOptions::mtime`]. Nothing is read from host metadata and
//!   `HeaderMode::Deterministic` (which drops setuid and 0600) is never used.
//! - Whatever ustar cannot hold (long names and link names, sizes of 8 GiB and more, ids that
//!   need more than 7 octal digits, xattrs as `SCHILY.xattr.NAME`) goes into a PAX extended
//!   header written by this module, never a GNU extension.
//! - Gzip uses flate2 with its pinned zlib-rs backend (pure Rust) at level [`GZIP_LEVEL`] with no
//!   file name, mtime 0 and OS byte 255; zstd uses the bundled libzstd at level [`ZSTD_LEVEL`]
//!   in single-threaded mode. Both see their input in chunks that depend only on the stream, so
//!   the compressed bytes depend only on the tar stream. Gzip compresses blocks of the stream
//!   on every core as independent deflate streams, each primed with the 32 KiB before it
//!   (pigz's scheme, see `ParallelGzip`): the output is one ordinary gzip member and does not
//!   depend on the number of cores. Blocks end where entries picked by a hash of their path
//!   start, so a changed file changes one block, and the blocks of the previous layer with the
//!   same paths are reused instead of compressed again (`PreviousBlocks`).
//!
//! Hard links: the tar format needs a link's target to come earlier in the stream, but sorting
//! can put a link before its target. When that happens the first member of the link group (in
//! tar order) carries the content and the target's metadata, and the others become links to
//! it: the same files, the same inode, a different but equally valid tar.
//!
//! What this module deliberately does not do: walk directories, apply `.dockerignore`, decide
//! modes or owners (the caller normalises them), or look at lower layers. A hard link whose
//! target is not in this layer is written as given and checked when the layer is applied to a
//! tree (`FsTree::apply`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};

use layerwright_cache::{Digest, LayerRecord, Sha256Writer, Store};
use thiserror::Error;

use super::compress::{Compressor, PreviousBlocks, layer_shape};
use super::format::*;
use super::index::{IndexEntry, IndexKind, LayerIndex, TreeError};

/// The ustar `name` field holds this many bytes.
const USTAR_NAME_LENGTH: usize = 100;
/// The ustar `prefix` field holds this many bytes.
const USTAR_PREFIX_LENGTH: usize = 155;
/// The ustar `linkname` field holds this many bytes.
const USTAR_LINK_NAME_LENGTH: usize = 100;
/// The largest size the 12-byte octal `size` field holds (11 octal digits, 8 GiB - 1).
const USTAR_MAX_SIZE: u64 = 0o777_7777_7777;
/// The largest id the 8-byte octal `uid`/`gid` fields hold (7 octal digits).
const USTAR_MAX_ID: u64 = 0o777_7777;

/// Why a layer could not be written to the store.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LayerError {
    /// Reading the content of a file entry from its source failed.
    #[error("cannot read {path}: {source}")]
    ReadSource {
        /// The source and the image path it is written to (`context file src/a (for /app/a)`).
        path: String,
        /// The IO error from the operating system.
        source: std::io::Error,
    },
    /// A source file held a different number of bytes than its size said when the layer was
    /// planned: it changed while the layer was written.
    #[error("{path} changed size while the layer was written (expected {expected} bytes, read {actual})")]
    SizeChanged {
        /// The source and the image path it is written to.
        path: String,
        /// The size in bytes the entry was planned with.
        expected: u64,
        /// The number of bytes the source held (at least).
        actual: u64,
    },
    /// Two entries of the layer have the same path.
    #[error("layer entry {path} appears twice")]
    DuplicateEntry {
        /// The entry's path in the tar.
        path: String,
    },
    /// Writing an entry to the tar, compressor or blob file failed.
    #[error("cannot write layer entry {path}: {source}")]
    Write {
        /// The entry's path in the tar.
        path: String,
        /// The IO error of the write.
        source: std::io::Error,
    },
    /// An entry the writer refuses: a path that is not normalised, a name that would read back
    /// as a whiteout, a hard link to a directory, a child of a non-directory, a bad xattr name.
    #[error("invalid layer entry {path}: {reason}")]
    InvalidEntry {
        /// The entry's path as given.
        path: String,
        /// Why it is refused.
        reason: String,
    },
    /// The tar or compressor stream could not be finished.
    #[error("cannot finish the layer stream: {source}")]
    Finish {
        /// The IO error of the tar writer or the compressor.
        source: std::io::Error,
    },
    /// Creating or committing the blob in the cache's store failed.
    #[error(transparent)]
    Store(#[from] layerwright_cache::StoreError),
    /// The layer blob was committed but its index could not be saved.
    #[error(transparent)]
    Index(#[from] TreeError),
}

/// A layer committed to the store: its record, its index, and how many blob bytes were written.

#[derive(Debug, Clone)]
pub struct WrittenLayer {
    pub record: LayerRecord,
    pub index: LayerIndex,
    pub blob_bytes_written: u64,
}

/// Writes `entries` (any order; sorted here) as one layer blob into `store` and saves its
/// index (`LayerIndex::save`). Returns the record (diff id, blob digest, size, media type).
///
/// The same entries (in any order) with the same options always give byte-identical tar and
/// blob bytes. On error nothing is committed (the temporary blob file is deleted).
pub fn write_layer(
    store: &Store,
    entries: Vec<LayerEntry>,
    options: &LayerOptions,
) -> Result<WrittenLayer, LayerError> {
    write_layer_observed(store, entries, options, &mut |_| {})
}

/// [`write_layer`], handing every byte of the uncompressed tar stream to `observe`, in order,
/// as it is written (a RUN runner unpacks a snapshot from it: see `run::StreamedSnapshot`).
pub fn write_layer_observed(
    store: &Store,
    entries: Vec<LayerEntry>,
    options: &LayerOptions,
    observe: &mut dyn FnMut(&[u8]),
) -> Result<WrittenLayer, LayerError> {
    let planned = plan_entries(entries)?;
    let shape = (options.compression == Compression::Gzip)
        .then(|| layer_shape(planned.iter().map(|entry| entry.tar_path.as_str())));
    let previous = shape.as_ref().and_then(|shape| PreviousBlocks::load(store, shape));

    let compressor = Compressor::reusing(options.compression, store.blob_writer()?, previous)
        .map_err(|source| LayerError::Finish { source })?;
    let diff_id_writer = DiffIdWriter::new(options.compression, compressor);
    let mut tar = tar::Builder::new(ObservedWriter { inner: diff_id_writer, observe });
    let mut index = LayerIndex::default();
    for entry in &planned {
        // `tar::Builder` does not buffer: what it wrote so far is exactly the entries before.
        tar.get_mut()
            .inner
            .compressor_mut()
            .entry_starts(&entry.tar_path)
            .map_err(|source| LayerError::Write { path: entry.tar_path.clone(), source })?;
        index.entries.push(write_entry(&mut tar, entry, options.mtime)?);
    }

    // `into_inner` writes the two zero blocks that end the archive; they are part of the diff id.
    let diff_id_writer = tar.into_inner().map_err(|source| LayerError::Finish { source })?.inner;
    let (diff_id, compressor) = diff_id_writer.finish();
    let (blob_writer, blocks) = compressor.finish_with_blocks().map_err(|source| LayerError::Finish { source })?;
    let blob_bytes_written = blob_writer.written();
    let blob = blob_writer.commit()?;
    // A layer of one block has nothing to share with its next version (that block is what
    // changes), and small layers are the many: they write no map.
    if let Some(shape) = shape.as_ref().filter(|_| blocks.len() > 1) {
        PreviousBlocks::save(store, shape, &blob.digest, blocks);
    }
    // An uncompressed blob is the tar itself: its digest is the diff id.
    let diff_id = diff_id.unwrap_or_else(|| blob.digest.clone());

    let record = LayerRecord {
        diff_id,
        digest: blob.digest,
        size: blob.size,
        media_type: options.compression.media_type().to_owned(),
    };
    index.save(store, &record.diff_id)?;
    Ok(WrittenLayer { record, index, blob_bytes_written })
}

/// An entry as it will be written: its tar path and what the tar header will say.
#[derive(Debug, Clone)]
struct PlannedEntry {
    /// The path inside the tar without a trailing `/` (`dir/.wh.name` for a whiteout).
    tar_path: String,
    /// The path the index names (the deleted path for a whiteout, the dir for an opaque one).
    image_path: String,
    kind: EntryKind,
    mode: u32,
    uid: u32,
    gid: u32,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl PlannedEntry {
    fn is_whiteout(&self) -> bool {
        matches!(self.kind, EntryKind::Whiteout | EntryKind::OpaqueWhiteout)
    }
}

/// Validates the entries, maps whiteouts to their tar names, sorts them component-wise,
/// refuses duplicates, and puts every hard link after the member of its group that carries
/// the content.
fn plan_entries(entries: Vec<LayerEntry>) -> Result<Vec<PlannedEntry>, LayerError> {
    let mut planned = Vec::with_capacity(entries.len());
    for entry in entries {
        planned.push(plan_entry(entry)?);
    }
    planned.sort_by(|left, right| compare_paths(&left.tar_path, &right.tar_path));
    for pair in planned.windows(2) {
        if pair[0].tar_path == pair[1].tar_path {
            return Err(LayerError::DuplicateEntry { path: pair[0].tar_path.clone() });
        }
    }
    order_hard_links(&mut planned)?;
    check_parents_are_directories(&planned)?;
    Ok(planned)
}

fn plan_entry(entry: LayerEntry) -> Result<PlannedEntry, LayerError> {
    let invalid = |reason: &str| LayerError::InvalidEntry { path: entry.path.clone(), reason: reason.to_owned() };
    // An opaque whiteout of the root directory is `.wh..wh..opq` at the top of the tar.
    let is_root_opaque = entry.path.is_empty() && matches!(entry.kind, EntryKind::OpaqueWhiteout);
    if !is_root_opaque {
        check_normalised(&entry.path).map_err(invalid)?;
    }
    let (parent, name) = split_parent(&entry.path);
    let tar_path = match &entry.kind {
        EntryKind::Whiteout => join_path(parent, &format!("{WHITEOUT_PREFIX}{name}")),
        EntryKind::OpaqueWhiteout => join_path(&entry.path, OPAQUE_WHITEOUT_NAME),
        _ => {
            // A regular entry named `.wh.x` would read back as a whiteout of `x`.
            if name.starts_with(WHITEOUT_PREFIX) {
                return Err(invalid("names starting with .wh. are reserved for whiteouts"));
            }
            entry.path.clone()
        }
    };
    if let EntryKind::HardLink { target } = &entry.kind {
        check_normalised(target).map_err(|reason| invalid(&format!("hard link target {target:?}: {reason}")))?;
    }
    if let EntryKind::Symlink { target } = &entry.kind
        && target.contains('\0')
    {
        return Err(invalid("symlink target contains a NUL byte"));
    }
    let mut xattrs = entry.xattrs;
    for (name, _) in &xattrs {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(invalid(&format!("xattr name {name:?} cannot be a PAX key")));
        }
    }
    // Sorted so that the PAX records do not depend on the order the caller listed them in.
    xattrs.sort();
    if xattrs.windows(2).any(|pair| pair[0].0 == pair[1].0) {
        return Err(invalid("an xattr is listed twice"));
    }

    let is_whiteout = matches!(entry.kind, EntryKind::Whiteout | EntryKind::OpaqueWhiteout);
    Ok(PlannedEntry {
        tar_path,
        image_path: entry.path,
        kind: entry.kind,
        // Whiteout files are empty regular files owned by root with mode 0 (what every other
        // tool writes); file-type bits in a caller's mode are dropped.
        mode: if is_whiteout { 0 } else { entry.mode & 0o7777 },
        uid: if is_whiteout { 0 } else { entry.uid },
        gid: if is_whiteout { 0 } else { entry.gid },
        xattrs: if is_whiteout { Vec::new() } else { xattrs },
    })
}

/// `Ok` for a normalised image-relative path: non-empty, no leading or trailing `/`, no empty,
/// `.` or `..` components, no NUL bytes.
fn check_normalised(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("the path is empty");
    }
    if path.contains('\0') {
        return Err("the path contains a NUL byte");
    }
    if path.starts_with('/') {
        return Err("the path is absolute (image paths have no leading /)");
    }
    for component in path.split('/') {
        match component {
            "" => return Err("the path has an empty component"),
            "." | ".." => return Err("the path has a . or .. component"),
            _ => {}
        }
    }
    Ok(())
}

/// `("dir/sub", "name")` for `dir/sub/name`, `("", "name")` for `name`.
fn split_parent(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((parent, name)) => (parent, name),
        None => ("", path),
    }
}

fn join_path(parent: &str, name: &str) -> String {
    if parent.is_empty() { name.to_owned() } else { format!("{parent}/{name}") }
}

/// Makes every hard link point (directly) at the first member of its link group in tar order,
/// moving the content there when the caller's target sorts after one of its links.
fn order_hard_links(planned: &mut [PlannedEntry]) -> Result<(), LayerError> {
    let position_of: HashMap<String, usize> = planned
        .iter()
        .enumerate()
        .filter(|(_, entry)| !entry.is_whiteout())
        .map(|(position, entry)| (entry.image_path.clone(), position))
        .collect();

    // Link group root (the entry that is not itself a link) → the links that end at it.
    let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
    // Links whose chain leaves this layer: rewritten to the last target of the chain.
    let mut flattened = Vec::new();
    for (position, entry) in planned.iter().enumerate() {
        let EntryKind::HardLink { target } = &entry.kind else {
            continue;
        };
        let mut target = target.clone();
        let mut steps = 0;
        // Follow link → link chains inside this layer to the entry that holds the content.
        let root = loop {
            let Some(&target_position) = position_of.get(&target) else {
                break None; // A target in a lower layer: written as given.
            };
            match &planned[target_position].kind {
                EntryKind::HardLink { target: next } => {
                    steps += 1;
                    if steps > planned.len() {
                        return Err(LayerError::InvalidEntry {
                            path: entry.image_path.clone(),
                            reason: "hard links form a cycle".to_owned(),
                        });
                    }
                    target = next.clone();
                }
                EntryKind::Directory => {
                    return Err(LayerError::InvalidEntry {
                        path: entry.image_path.clone(),
                        reason: format!("hard link to the directory {target:?}"),
                    });
                }
                _ => break Some(target_position),
            }
        };
        match root {
            Some(root) => groups.entry(root).or_default().push(position),
            None => flattened.push((position, target)),
        }
    }
    for (position, target) in flattened {
        planned[position].kind = EntryKind::HardLink { target };
    }

    let mut roots: Vec<usize> = groups.keys().copied().collect();
    roots.sort_unstable();
    for root in roots {
        let links = &groups[&root];
        let first = links.iter().copied().chain([root]).min().expect("a link group has at least its root");
        if first != root {
            // The first member in tar order takes over the content and the file's metadata
            // (a hard link shares its inode, so the target's metadata is the one that counts).
            let content_holder = planned[root].clone();
            let first_entry = &mut planned[first];
            first_entry.kind = content_holder.kind;
            first_entry.mode = content_holder.mode;
            first_entry.uid = content_holder.uid;
            first_entry.gid = content_holder.gid;
            first_entry.xattrs = content_holder.xattrs;
        }
        let first_path = planned[first].image_path.clone();
        for member in links.iter().copied().chain([root]) {
            if member != first {
                planned[member].kind = EntryKind::HardLink { target: first_path.clone() };
            }
        }
    }
    Ok(())
}

/// Refuses an entry below a non-directory of the same layer (`a` a file or symlink and `a/b`):
/// such a tar cannot be extracted, and through a symlink it would write outside the image.
fn check_parents_are_directories(planned: &[PlannedEntry]) -> Result<(), LayerError> {
    let is_directory: HashMap<&str, bool> = planned
        .iter()
        .filter(|entry| !entry.is_whiteout())
        .map(|entry| {
            let directory = matches!(entry.kind, EntryKind::Directory);
            (entry.image_path.as_str(), directory)
        })
        .collect();
    for entry in planned {
        let mut parent = split_parent(&entry.tar_path).0;
        while !parent.is_empty() {
            if is_directory.get(parent) == Some(&false) {
                return Err(LayerError::InvalidEntry {
                    path: entry.image_path.clone(),
                    reason: format!("its parent {parent:?} is not a directory in this layer"),
                });
            }
            parent = split_parent(parent).0;
        }
    }
    Ok(())
}

/// PAX extended header records (`"<length> <key>=<value>\n"`), in the order added.
#[derive(Debug, Default)]
struct PaxRecords {
    bytes: Vec<u8>,
}

impl PaxRecords {
    fn add(&mut self, key: &str, value: &[u8]) {
        // The length counts the whole record including its own digits: find the digit count
        // that is consistent with itself.
        let rest = 1 + key.len() + 1 + value.len() + 1; // " key=value\n"
        let mut digits = 1;
        while (rest + digits).to_string().len() != digits {
            digits += 1;
        }
        self.bytes.extend_from_slice((rest + digits).to_string().as_bytes());
        self.bytes.push(b' ');
        self.bytes.extend_from_slice(key.as_bytes());
        self.bytes.push(b'=');
        self.bytes.extend_from_slice(value);
        self.bytes.push(b'\n');
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// The headers of one entry: the PAX extended header data (if any is needed) and the ustar
/// header (checksum set).
fn entry_headers(entry: &PlannedEntry, mtime: u64) -> (PaxRecords, tar::Header) {
    let mut pax = PaxRecords::default();
    let mut header = tar::Header::new_ustar();

    let name = match entry.kind {
        EntryKind::Directory => format!("{}/", entry.tar_path),
        _ => entry.tar_path.clone(),
    };
    set_ustar_name(&mut header, &name, &mut pax);

    let (entry_type, size) = match &entry.kind {
        EntryKind::Directory => (tar::EntryType::Directory, 0),
        EntryKind::File { size, .. } => (tar::EntryType::Regular, *size),
        EntryKind::Symlink { .. } => (tar::EntryType::Symlink, 0),
        EntryKind::HardLink { .. } => (tar::EntryType::Link, 0),
        EntryKind::CharDevice { .. } => (tar::EntryType::Char, 0),
        EntryKind::BlockDevice { .. } => (tar::EntryType::Block, 0),
        EntryKind::Fifo => (tar::EntryType::Fifo, 0),
        EntryKind::Whiteout | EntryKind::OpaqueWhiteout => (tar::EntryType::Regular, 0),
    };
    header.set_entry_type(entry_type);

    if let EntryKind::Symlink { target } | EntryKind::HardLink { target } = &entry.kind {
        set_ustar_link_name(&mut header, target, &mut pax);
    }
    if size > USTAR_MAX_SIZE {
        pax.add("size", size.to_string().as_bytes());
    }
    // `set_size`/`set_uid`/`set_gid` fall back to base-256 for what octal cannot hold, so a
    // reader without PAX support still gets the right numbers.
    header.set_size(size);
    if u64::from(entry.uid) > USTAR_MAX_ID {
        pax.add("uid", entry.uid.to_string().as_bytes());
    }
    if u64::from(entry.gid) > USTAR_MAX_ID {
        pax.add("gid", entry.gid.to_string().as_bytes());
    }
    header.set_uid(u64::from(entry.uid));
    header.set_gid(u64::from(entry.gid));
    header.set_mode(entry.mode);
    header.set_mtime(mtime);
    // Device numbers for devices, and zeros for a FIFO: readers (the tar crate among them) parse
    // the fields of every special file, and NUL bytes there are not a number. Other entries keep
    // the fields empty, as every layer written so far has them (their digests stay the same).
    let device = match &entry.kind {
        EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } => Some((*major, *minor)),
        EntryKind::Fifo => Some((0, 0)),
        _ => None,
    };
    if let Some((major, minor)) = device {
        let ustar = header.as_ustar_mut().expect("headers made by new_ustar are ustar headers");
        ustar.set_device_major(major);
        ustar.set_device_minor(minor);
    }
    for (name, value) in &entry.xattrs {
        pax.add(&format!("SCHILY.xattr.{name}"), value);
    }
    header.set_cksum();
    (pax, header)
}

/// Puts `name` (with its trailing `/` for a directory) into the ustar `name` field, or split
/// into `prefix` and `name` at a `/`, or, when neither fits, into a PAX `path` record with a
/// truncated copy in the header for readers that ignore PAX.
fn set_ustar_name(header: &mut tar::Header, name: &str, pax: &mut PaxRecords) {
    let ustar = header.as_ustar_mut().expect("headers made by new_ustar are ustar headers");
    let bytes = name.as_bytes();
    if bytes.len() <= USTAR_NAME_LENGTH {
        ustar.name[..bytes.len()].copy_from_slice(bytes);
        return;
    }
    // Split at the last `/` that leaves a prefix that fits; the name part must be non-empty
    // (the trailing `/` of a directory is not a split point) and fit too.
    let split = bytes
        .iter()
        .enumerate()
        .filter(|&(position, &byte)| {
            byte == b'/'
                && position > 0
                && position <= USTAR_PREFIX_LENGTH
                && position + 1 < bytes.len()
                && bytes.len() - position - 1 <= USTAR_NAME_LENGTH
        })
        .map(|(position, _)| position)
        .next_back();
    if let Some(split) = split {
        ustar.prefix[..split].copy_from_slice(&bytes[..split]);
        let rest = &bytes[split + 1..];
        ustar.name[..rest.len()].copy_from_slice(rest);
        return;
    }
    pax.add("path", bytes);
    let truncated = truncate_path(name, USTAR_NAME_LENGTH);
    ustar.name[..truncated.len()].copy_from_slice(truncated.as_bytes());
}

/// Puts `target` into the ustar `linkname` field, or into a PAX `linkpath` record with a
/// truncated copy in the header when it is too long.
fn set_ustar_link_name(header: &mut tar::Header, target: &str, pax: &mut PaxRecords) {
    let ustar = header.as_ustar_mut().expect("headers made by new_ustar are ustar headers");
    let bytes = target.as_bytes();
    if bytes.len() <= USTAR_LINK_NAME_LENGTH {
        ustar.linkname[..bytes.len()].copy_from_slice(bytes);
        return;
    }
    pax.add("linkpath", bytes);
    let truncated = truncate_path(target, USTAR_LINK_NAME_LENGTH);
    ustar.linkname[..truncated.len()].copy_from_slice(truncated.as_bytes());
}

/// At most `limit` bytes of `path` for the header copy of a PAX-held path. Cut at a `/` when
/// there is one, so that a PAX-unaware reader sees whole components (cutting `..x` to `..`
/// would name a parent directory); a single over-long component is cut at a char boundary.
fn truncate_path(path: &str, limit: usize) -> &str {
    if path.len() <= limit {
        return path;
    }
    // Searched as bytes: `limit` need not be a char boundary, but a `/` always is one.
    let slash = path.as_bytes()[..=limit].iter().rposition(|&byte| byte == b'/');
    if let Some(slash) = slash.filter(|&slash| slash > 0) {
        return &path[..slash];
    }
    let mut end = limit;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

/// The ustar header of the PAX extended header that precedes `entry`.
fn pax_header(entry: &PlannedEntry, records: &PaxRecords, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    // The name of a PAX header is ignored by readers that understand PAX; readers that do not
    // extract it as a file, so it gets a harmless relative name (GNU tar and Go do the same).
    let base = split_parent(&entry.tar_path).1;
    let name = format!("PaxHeaders.0/{base}");
    let name = truncate_path(&name, USTAR_NAME_LENGTH);
    header.as_ustar_mut().expect("headers made by new_ustar are ustar headers").name[..name.len()]
        .copy_from_slice(name.as_bytes());
    header.set_entry_type(tar::EntryType::XHeader);
    header.set_size(records.bytes.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime);
    header.set_cksum();
    header
}

/// Writes one entry (its PAX header, its header, its content) and returns its index entry.
fn write_entry<W: Write>(
    tar: &mut tar::Builder<W>,
    entry: &PlannedEntry,
    mtime: u64,
) -> Result<IndexEntry, LayerError> {
    let write_error = |source| LayerError::Write { path: entry.tar_path.clone(), source };
    let (pax, header) = entry_headers(entry, mtime);
    if !pax.is_empty() {
        tar.append(&pax_header(entry, &pax, mtime), pax.bytes.as_slice()).map_err(write_error)?;
    }

    let kind = match &entry.kind {
        EntryKind::File { content, size } => {
            let sha256 = write_file_content(tar, entry, &header, content, *size)?;
            IndexKind::File { size: *size, sha256 }
        }
        other => {
            tar.append(&header, io::empty()).map_err(write_error)?;
            match other {
                EntryKind::Directory => IndexKind::Directory,
                EntryKind::Symlink { target } => IndexKind::Symlink { target: target.clone() },
                EntryKind::HardLink { target } => IndexKind::HardLink { target: target.clone() },
                EntryKind::CharDevice { major, minor } => IndexKind::CharDevice { major: *major, minor: *minor },
                EntryKind::BlockDevice { major, minor } => IndexKind::BlockDevice { major: *major, minor: *minor },
                EntryKind::Fifo => IndexKind::Fifo,
                EntryKind::Whiteout => IndexKind::Whiteout,
                EntryKind::OpaqueWhiteout => IndexKind::OpaqueWhiteout,
                EntryKind::File { .. } => unreachable!("files are handled above"),
            }
        }
    };
    Ok(IndexEntry { path: entry.image_path.clone(), kind, mode: entry.mode, uid: entry.uid, gid: entry.gid })
}

/// Streams a file's content into the tar after `header`, hashing it on the way, and checks
/// that the source holds exactly `size` bytes. Returns the content's sha256.
fn write_file_content<W: Write>(
    tar: &mut tar::Builder<W>,
    entry: &PlannedEntry,
    header: &tar::Header,
    content: &Content,
    size: u64,
) -> Result<Digest, LayerError> {
    let source_name = match content {
        Content::Inline(_) => format!("inline content of /{}", entry.image_path),
        Content::Context { path, .. } => {
            format!("context file {path} (for /{})", entry.image_path)
        }
        Content::HostFile(path) => format!("{} (for /{})", path.display(), entry.image_path),
    };
    let read_error = |source| LayerError::ReadSource { path: source_name.clone(), source };
    // Opened only now, so that a layer of many files never holds more than one open.
    let source: Box<dyn Read + '_> = match content {
        Content::Inline(bytes) => Box::new(&bytes[..]),
        Content::Context { dir, path } => Box::new(dir.open(path).map_err(read_error)?),
        Content::HostFile(path) => Box::new(File::open(path).map_err(read_error)?),
    };

    let mut reader =
        CheckedContentReader { source, remaining: size, read: 0, hasher: Sha256Writer::new(io::sink()), failure: None };
    // `tar::Builder::append` copies through an 8 KiB buffer: a large file is read in pieces of
    // up to `SOURCE_READ` instead (one system call per 256 KiB rather than per 8 KiB; a 1 GiB
    // layer made 131,000 reads). Small files keep their single direct read.
    let capacity = usize::try_from(size).map_or(SOURCE_READ, |size| size.min(SOURCE_READ));
    let appended = tar.append(header, io::BufReader::with_capacity(capacity, &mut reader));
    match (appended, reader.failure.take()) {
        (_, Some(ContentFailure::EndedEarly)) => {
            return Err(LayerError::SizeChanged { path: source_name, expected: size, actual: reader.read });
        }
        (_, Some(ContentFailure::Read(source))) => return Err(read_error(source)),
        (Err(source), None) => {
            return Err(LayerError::Write { path: entry.tar_path.clone(), source });
        }
        (Ok(()), None) => {}
    }

    // A source that grew: count what is left so the error says how long it is now.
    let extra = io::copy(&mut reader.source, &mut io::sink()).map_err(read_error)?;
    if extra > 0 {
        return Err(LayerError::SizeChanged { path: source_name, expected: size, actual: size + extra });
    }
    Ok(reader.hasher.finish().0)
}

/// The most bytes of a source file read at once while it is written into a layer.
const SOURCE_READ: usize = 256 * 1024;

enum ContentFailure {
    EndedEarly,
    Read(io::Error),
}

/// Reads at most `remaining` bytes from `source`, hashing them, and remembers why it failed
/// (the source ended early, or could not be read) so that the caller can tell a source
/// problem from a problem of the stream it writes to.
struct CheckedContentReader<R> {
    source: R,
    remaining: u64,
    read: u64,
    hasher: Sha256Writer<io::Sink>,
    failure: Option<ContentFailure>,
}

impl<R: Read> Read for CheckedContentReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buffer.is_empty() {
            return Ok(0);
        }
        let limit = usize::try_from(self.remaining).map_or(buffer.len(), |remaining| remaining.min(buffer.len()));
        loop {
            match self.source.read(&mut buffer[..limit]) {
                Ok(0) => {
                    self.failure = Some(ContentFailure::EndedEarly);
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the source ended before its declared size",
                    ));
                }
                Ok(count) => {
                    self.hasher.write_all(&buffer[..count]).expect("writing to a sink cannot fail");
                    self.remaining -= count as u64;
                    self.read += count as u64;
                    return Ok(count);
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    let message = error.to_string();
                    self.failure = Some(ContentFailure::Read(error));
                    return Err(io::Error::other(message));
                }
            }
        }
    }
}

/// Passes the tar stream on to `inner` and shows `observe` what was written.
struct ObservedWriter<'a, W> {
    inner: W,
    observe: &'a mut dyn FnMut(&[u8]),
}

impl<W: Write> Write for ObservedWriter<'_, W> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buffer)?;
        (self.observe)(&buffer[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes the uncompressed tar stream for the diff id, except when the blob is the tar itself
/// (no compression): the blob writer hashes those very bytes already, so its digest is the diff
/// id and a second sha256 pass over the layer would be wasted.
enum DiffIdWriter {
    Hashing(Sha256Writer<Compressor>),
    SameAsBlob(Compressor),
}

impl DiffIdWriter {
    fn new(compression: Compression, compressor: Compressor) -> DiffIdWriter {
        match compression {
            Compression::None => DiffIdWriter::SameAsBlob(compressor),
            Compression::Gzip | Compression::Zstd => DiffIdWriter::Hashing(Sha256Writer::new(compressor)),
        }
    }

    fn compressor_mut(&mut self) -> &mut Compressor {
        match self {
            DiffIdWriter::Hashing(writer) => writer.get_mut(),
            DiffIdWriter::SameAsBlob(compressor) => compressor,
        }
    }

    /// The diff id when it differs from the blob digest, and the compressor.
    fn finish(self) -> (Option<Digest>, Compressor) {
        match self {
            DiffIdWriter::Hashing(writer) => {
                let (diff_id, _size, compressor) = writer.finish();
                (Some(diff_id), compressor)
            }
            DiffIdWriter::SameAsBlob(compressor) => (None, compressor),
        }
    }
}

impl Write for DiffIdWriter {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        match self {
            DiffIdWriter::Hashing(writer) => writer.write(buffer),
            DiffIdWriter::SameAsBlob(compressor) => compressor.write(buffer),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            DiffIdWriter::Hashing(writer) => writer.flush(),
            DiffIdWriter::SameAsBlob(compressor) => compressor.flush(),
        }
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
