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

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use layerwright_cache::{BlobWriter, Digest, LayerRecord, Sha256Writer, Store};
use thiserror::Error;

use crate::tree::{IndexEntry, IndexKind, LayerIndex, TreeError};

/// The gzip level of every gzip layer. Changing it changes every layer digest.
pub const GZIP_LEVEL: u32 = 6;

/// The zstd level of every zstd layer. Changing it changes every layer digest.
pub const ZSTD_LEVEL: i32 = 3;

/// The name prefix of an OCI whiteout file (`dir/.wh.name` deletes `dir/name`).
pub(crate) const WHITEOUT_PREFIX: &str = ".wh.";

/// The name of an OCI opaque whiteout file (`dir/.wh..wh..opq` hides the lower `dir/*`).
pub(crate) const OPAQUE_WHITEOUT_NAME: &str = ".wh..wh..opq";

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

/// The compression of the layers a build writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar+gzip`, the default: every client reads it.
    #[default]
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd`.
    Zstd,
    /// `application/vnd.oci.image.layer.v1.tar`.
    None,
}

impl Compression {
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }

    /// The compression a layer media type implies (OCI and Docker media types).
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Compression::Zstd),
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerOptions {
    pub compression: Compression,
    /// The mtime of every entry: `SOURCE_DATE_EPOCH` when set, else 0.
    pub mtime: u64,
}

/// Where a regular file's bytes come from when the tar is written.
#[derive(Debug, Clone)]
pub enum Content {
    Inline(Arc<[u8]>),
    /// A file inside a build context, opened through the context's capability so that it can
    /// never resolve outside it. `path` is context-relative.
    Context {
        dir: Arc<cap_std::fs::Dir>,
        path: String,
    },
    /// A file the builder itself wrote (a spooled file of a `copy_from`).
    HostFile(PathBuf),
}

#[derive(Debug, Clone)]
pub enum EntryKind {
    Directory,
    /// `size` is what the header says; a source whose length differs when read is an error.
    File {
        content: Content,
        size: u64,
    },
    Symlink {
        target: String,
    },
    /// A hard link to `target`, an image-relative path written earlier in the same layer.
    HardLink {
        target: String,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// Deletes `path` from lower layers: written as `dir/.wh.name`.
    Whiteout,
    /// Hides everything below directory `path` in lower layers: written as
    /// `path/.wh..wh..opq`.
    OpaqueWhiteout,
}

/// One entry of a layer. `path` is image-relative and normalised (`app/bin/x`, no leading `/`).
#[derive(Debug, Clone)]
pub struct LayerEntry {
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (no file-type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Extended attributes, written as `SCHILY.xattr.` PAX records.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, Error)]
pub enum LayerError {
    #[error("cannot read {path}: {source}")]
    ReadSource { path: String, source: std::io::Error },
    #[error("{path} changed size while the layer was written (expected {expected} bytes, read {actual})")]
    SizeChanged { path: String, expected: u64, actual: u64 },
    #[error("layer entry {path} appears twice")]
    DuplicateEntry { path: String },
    #[error("cannot write layer entry {path}: {source}")]
    Write { path: String, source: std::io::Error },
    /// An entry the writer refuses: a path that is not normalised, a name that would read back
    /// as a whiteout, a hard link to a directory, a child of a non-directory, a bad xattr name.
    #[error("invalid layer entry {path}: {reason}")]
    InvalidEntry { path: String, reason: String },
    /// The tar or compressor stream could not be finished.
    #[error("cannot finish the layer stream: {source}")]
    Finish { source: std::io::Error },
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
    let shape = (options.compression == Compression::Gzip).then(|| layer_shape(&planned));
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

/// Component-wise order: `a` < `a/b` < `a-b`, so a directory always precedes its contents.
pub(crate) fn compare_paths(left: &str, right: &str) -> std::cmp::Ordering {
    left.split('/').cmp(right.split('/'))
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
    if let EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } = &entry.kind {
        let ustar = header.as_ustar_mut().expect("headers made by new_ustar are ustar headers");
        ustar.set_device_major(*major);
        ustar.set_device_minor(*minor);
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

/// Bytes handed to the zstd backend (and to an uncompressed blob) at a time. Streaming
/// encoders may choose different block boundaries for different input chunkings, so the
/// encoder always sees whole chunks of this size: the compressed bytes then depend only on the
/// uncompressed stream, never on how upstream writers happened to buffer it.
const COMPRESSION_CHUNK: usize = 128 * 1024;

/// A gzip block ends at the start of an entry that [`cuts_gzip_block`] picks once it holds at
/// least this much, so that block boundaries follow the entries, not their offsets.
const GZIP_BLOCK_MIN: usize = 64 * 1024;

/// A gzip block that reaches this size ends there (inside a large file).
const GZIP_BLOCK_MAX: usize = 256 * 1024;

/// Whether a gzip block may end where the entry at tar path `path` starts: for one entry in 16,
/// chosen by a hash of the path. Boundaries then depend on the entries around them only, so a
/// file that changes (even in size) changes one block, and the blocks after it are the same
/// bytes as before and can be reused (see [`PreviousBlocks`]).
fn cuts_gzip_block(path: &str) -> bool {
    blake3::hash(path.as_bytes()).as_bytes()[0] & 0x0f == 0
}

/// The compressor between the diff-id hasher and the blob writer (also used to recompress a
/// cached layer, which must come out byte for byte as a fresh build's).
pub(crate) struct Compressor {
    encoder: Encoder,
    pending: Vec<u8>,
}

enum Encoder {
    Gzip(ParallelGzip),
    /// Single-threaded on purpose: zstd's output differs between 0 workers and 1 or more, so
    /// the mode is fixed (the workspace does not enable the `zstdmt` feature).
    Zstd(zstd::stream::write::Encoder<'static, BlobWriter>),
    None(BlobWriter),
}

impl Compressor {
    pub(crate) fn new(compression: Compression, blob_writer: BlobWriter) -> io::Result<Compressor> {
        Compressor::reusing(compression, blob_writer, None)
    }

    /// A compressor that takes gzip blocks it would compute from `previous` when they are there.
    fn reusing(
        compression: Compression,
        blob_writer: BlobWriter,
        previous: Option<PreviousBlocks>,
    ) -> io::Result<Compressor> {
        let encoder = match compression {
            Compression::Gzip => Encoder::Gzip(ParallelGzip::new(blob_writer, previous)?),
            Compression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(blob_writer, ZSTD_LEVEL)?),
            Compression::None => Encoder::None(blob_writer),
        };
        Ok(Compressor { encoder, pending: Vec::with_capacity(COMPRESSION_CHUNK) })
    }

    /// The most bytes the pending chunk may hold.
    fn chunk_limit(&self) -> usize {
        match self.encoder {
            Encoder::Gzip(_) => GZIP_BLOCK_MAX,
            Encoder::Zstd(_) | Encoder::None(_) => COMPRESSION_CHUNK,
        }
    }

    /// Called by the layer writer where the entry at tar path `path` starts (before its PAX
    /// header, if any): a gzip block may end here.
    fn entry_starts(&mut self, path: &str) -> io::Result<()> {
        if matches!(self.encoder, Encoder::Gzip(_)) && self.pending.len() >= GZIP_BLOCK_MIN && cuts_gzip_block(path) {
            // An entry follows, so this block is not the last.
            self.write_chunk(false)?;
        }
        Ok(())
    }

    /// Hands the pending chunk to the encoder; `last` only for the chunk `finish` writes.
    fn write_chunk(&mut self, last: bool) -> io::Result<()> {
        match &mut self.encoder {
            Encoder::Gzip(encoder) => {
                let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(GZIP_BLOCK_MAX));
                return encoder.write_block(chunk, last);
            }
            Encoder::Zstd(encoder) => encoder.write_all(&self.pending)?,
            Encoder::None(blob_writer) => blob_writer.write_all(&self.pending)?,
        }
        self.pending.clear();
        Ok(())
    }

    /// Writes what is pending and the compressor's trailer, and returns the blob writer.
    pub(crate) fn finish(self) -> io::Result<BlobWriter> {
        Ok(self.finish_with_blocks()?.0)
    }

    /// [`Compressor::finish`], and for gzip the blocks as written (for [`PreviousBlocks::save`]).
    fn finish_with_blocks(mut self) -> io::Result<(BlobWriter, Vec<WrittenBlock>)> {
        self.write_chunk(true)?;
        match self.encoder {
            Encoder::Gzip(encoder) => encoder.finish(),
            Encoder::Zstd(encoder) => Ok((encoder.finish()?, Vec::new())),
            Encoder::None(blob_writer) => Ok((blob_writer, Vec::new())),
        }
    }
}

impl Write for Compressor {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        if buffer.is_empty() {
            return Ok(0);
        }
        // A full chunk is handed on only once more bytes arrive, so that the chunk `finish`
        // writes (the one gzip marks final) is never empty: tar streams are multiples of 512
        // bytes and often end exactly on a chunk boundary.
        let limit = self.chunk_limit();
        if self.pending.len() == limit {
            self.write_chunk(false)?;
        }
        let taken = (limit - self.pending.len()).min(buffer.len());
        self.pending.extend_from_slice(&buffer[..taken]);
        Ok(taken)
    }

    /// Deliberately a no-op: flushing an encoder ends a deflate block early, which would make
    /// the output depend on when callers flush. Everything is written by `finish`.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where the entries of a layer's uncompressed tar `stream` start (their PAX header, if any),
/// with their tar paths as `write_layer` names them: what [`Compressor::entry_starts`] was
/// told when the layer was written. For recompressing a layer as a fresh build would write it.
pub(crate) fn entry_starts(stream: impl Read) -> io::Result<Vec<(u64, String)>> {
    let mut archive = tar::Archive::new(stream);
    let mut starts = Vec::new();
    // Raw: a PAX header is a member of its own, whose position is where its entry starts.
    let mut pax: Option<(u64, Option<String>)> = None;
    for member in archive.entries()?.raw(true) {
        let mut member = member?;
        let position = member.raw_header_position();
        if member.header().entry_type() == tar::EntryType::XHeader {
            let mut records = Vec::new();
            member.read_to_end(&mut records)?;
            let mut path = None;
            for record in tar::PaxExtensions::new(&records) {
                let record = record?;
                if record.key() == Ok("path") {
                    path = Some(String::from_utf8_lossy(record.value_bytes()).into_owned());
                }
            }
            pax = Some((pax.map_or(position, |(start, _)| start), path));
            continue;
        }
        let (start, pax_path) = pax.take().unwrap_or((position, None));
        let path = pax_path.unwrap_or_else(|| String::from_utf8_lossy(&member.path_bytes()).into_owned());
        starts.push((start, path.trim_end_matches('/').to_owned()));
    }
    Ok(starts)
}

/// Copies a layer's uncompressed tar `stream` into `writer` (whose compressor is its inner
/// writer), telling the compressor where each entry of `starts` ([`entry_starts`]) begins.
pub(crate) fn copy_tar_stream(
    mut stream: impl Read,
    writer: &mut Sha256Writer<Compressor>,
    starts: &[(u64, String)],
) -> io::Result<()> {
    let mut buffer = vec![0u8; COMPRESSION_CHUNK];
    let mut position = 0u64;
    let mut next = starts.iter().peekable();
    loop {
        while let Some((start, path)) = next.next_if(|(start, _)| *start <= position) {
            debug_assert_eq!(*start, position, "entries start where the bytes before them end");
            writer.get_mut().entry_starts(path)?;
        }
        // Never read past the next entry start, so that it is told at its exact position.
        let room = next.peek().map_or(buffer.len(), |(start, _)| {
            usize::try_from(start - position).map_or(buffer.len(), |left| left.min(buffer.len()))
        });
        let read = match stream.read(&mut buffer[..room]) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        writer.write_all(&buffer[..read])?;
        position += read as u64;
    }
}

/// The deflate history window: a block's dictionary is this much of the stream before it.
const DEFLATE_WINDOW: usize = 32 * 1024;

/// The gzip header of every layer: no file name, mtime 0, no extra flags (level 6), OS byte 255
/// ("unknown"), so nothing of the host leaks in.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

/// How many compressed blocks may be pending per layer (bounds memory to a few MiB).
fn gzip_blocks_in_flight() -> usize {
    2 * compression_pool().threads + 2
}

/// What a gzip block's compressed bytes are a function of: its dictionary, its bytes, whether
/// it ends the stream (and the level and scheme, fixed by the key format version).
fn gzip_block_key(dictionary: Option<&[u8]>, block: &[u8], last: bool) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"layerwright gzip block");
    hasher.update(&layerwright_cache::KEY_FORMAT_VERSION.to_le_bytes());
    hasher.update(&[u8::from(last)]);
    let dictionary = dictionary.unwrap_or_default();
    hasher.update(&(dictionary.len() as u64).to_le_bytes());
    hasher.update(dictionary);
    hasher.update(block);
    *hasher.finalize().as_bytes()
}

/// One block of a gzip blob as written: its key, where its compressed bytes are in the blob,
/// and their blake3 (checked before they are reused).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct WrittenBlock {
    key: String,
    offset: u64,
    length: u64,
    blake3: String,
}

/// The block map of a gzip layer blob, saved under the layer's shape (see [`layer_shape`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct BlockMap {
    blob: Digest,
    blocks: Vec<WrittenBlock>,
}

/// The gzip blocks of the last layer written with the same entry paths (the same step, most
/// often, after a file changed): a block whose key matches is copied from that blob instead of
/// being compressed again. Only a shortcut: the bytes are checked against the blake3 recorded
/// when they were written, and anything missing or different is simply compressed; the
/// output is the same either way.
struct PreviousBlocks {
    blob: File,
    blocks: HashMap<[u8; 32], WrittenBlock>,
}

impl PreviousBlocks {
    fn map_path(store: &Store, shape: &blake3::Hash) -> PathBuf {
        store.root().join("gzip-blocks").join(format!("{}.json", shape.to_hex()))
    }

    fn load(store: &Store, shape: &blake3::Hash) -> Option<PreviousBlocks> {
        let bytes = std::fs::read(PreviousBlocks::map_path(store, shape)).ok()?;
        let map: BlockMap = serde_json::from_slice(&bytes).ok()?;
        let blob = store.open_blob(&map.blob).ok()?;
        let mut blocks = HashMap::with_capacity(map.blocks.len());
        for block in map.blocks {
            let mut key = [0u8; 32];
            hex::decode_to_slice(&block.key, &mut key).ok()?;
            blocks.insert(key, block);
        }
        Some(PreviousBlocks { blob, blocks })
    }

    /// The compressed bytes of the block `key`, if the previous blob has them intact.
    fn take(&self, key: &[u8; 32]) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let block = self.blocks.get(key)?;
        let mut bytes = vec![0u8; usize::try_from(block.length).ok()?];
        self.blob.read_exact_at(&mut bytes, block.offset).ok()?;
        (blake3::hash(&bytes).to_hex().as_str() == block.blake3).then_some(bytes)
    }

    /// Records the blocks of `blob` under `shape` for the next layer of that shape. Only an
    /// accelerator: a map that cannot be written is left out.
    fn save(store: &Store, shape: &blake3::Hash, blob: &Digest, blocks: Vec<WrittenBlock>) {
        let path = PreviousBlocks::map_path(store, shape);
        let map = BlockMap { blob: blob.clone(), blocks };
        let Ok(bytes) = serde_json::to_vec(&map) else { return };
        if let Some(parent) = path.parent()
            && std::fs::create_dir_all(parent).is_ok()
        {
            let _ = store.write_file_atomically(&path, &bytes);
        }
    }
}

/// Which earlier layer's gzip blocks a layer may reuse: one with the same tar paths in order.
fn layer_shape(planned: &[PlannedEntry]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"layerwright layer shape");
    for entry in planned {
        hasher.update(&(entry.tar_path.len() as u64).to_le_bytes());
        hasher.update(entry.tar_path.as_bytes());
    }
    hasher.finalize()
}

/// A block on its way into the blob.
enum PendingBlock {
    /// Copied from the previous blob.
    Reused(Vec<u8>),
    Compressing(mpsc::Receiver<io::Result<Vec<u8>>>),
}

/// A gzip writer that compresses blocks of the stream (cut at entries, see
/// [`cuts_gzip_block`]) on several cores and still writes bytes that depend only on the
/// stream, never on the number of threads, the machine or the timing (the scheme of pigz): one
/// gzip member whose deflate stream is the concatenation of the blocks' raw deflate streams,
/// each block compressed by its own zlib-rs compressor at [`GZIP_LEVEL`] primed with the last
/// 32 KiB of the block before it (so matches still reach back across block boundaries) and
/// ended with a sync flush (byte-aligned, not final); the last block ends the stream. The
/// CRC-32 and size trailer cover the whole stream. Every gzip reader reads it as one ordinary
/// member. Since a block's bytes are a function of its key ([`gzip_block_key`]), a block of an
/// earlier blob with the same key is reused as it is ([`PreviousBlocks`]).
struct ParallelGzip {
    blob_writer: BlobWriter,
    crc: flate2::Crc,
    /// The last [`DEFLATE_WINDOW`] bytes of the previous block: the next block's dictionary.
    previous_tail: Option<Arc<[u8]>>,
    /// Blocks not yet written, oldest first, with their keys; written in this order.
    in_flight: VecDeque<([u8; 32], PendingBlock)>,
    previous: Option<PreviousBlocks>,
    /// Bytes written to the blob so far (the header included).
    offset: u64,
    written: Vec<WrittenBlock>,
}

impl ParallelGzip {
    fn new(mut blob_writer: BlobWriter, previous: Option<PreviousBlocks>) -> io::Result<ParallelGzip> {
        blob_writer.write_all(&GZIP_HEADER)?;
        Ok(ParallelGzip {
            blob_writer,
            crc: flate2::Crc::new(),
            previous_tail: None,
            in_flight: VecDeque::new(),
            previous,
            offset: GZIP_HEADER.len() as u64,
            written: Vec::new(),
        })
    }

    /// Compresses one block (or takes it from the previous blob): on the pool, or here for the
    /// last one (this thread has nothing else to do, and a one-block layer then never waits
    /// for another thread).
    fn write_block(&mut self, block: Vec<u8>, last: bool) -> io::Result<()> {
        self.crc.update(&block);
        let tail: Arc<[u8]> = Arc::from(&block[block.len().saturating_sub(DEFLATE_WINDOW)..]);
        let dictionary = self.previous_tail.replace(tail);
        let key = gzip_block_key(dictionary.as_deref(), &block, last);
        let pending = match self.previous.as_ref().and_then(|previous| previous.take(&key)) {
            Some(bytes) => PendingBlock::Reused(bytes),
            None if last => PendingBlock::Reused(deflate_block(&block, dictionary.as_deref(), last)?),
            None => {
                let (sender, receiver) = mpsc::sync_channel(1);
                compression_pool().submit(Box::new(move || {
                    // The receiver is gone only when the layer was abandoned; nothing to report.
                    let _ = sender.send(deflate_block(&block, dictionary.as_deref(), last));
                }));
                PendingBlock::Compressing(receiver)
            }
        };
        self.in_flight.push_back((key, pending));
        let limit = if last { 0 } else { gzip_blocks_in_flight() };
        while self.in_flight.len() > limit {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        let Some((key, pending)) = self.in_flight.pop_front() else { return Ok(()) };
        let compressed = match pending {
            PendingBlock::Reused(bytes) => bytes,
            PendingBlock::Compressing(receiver) => {
                receiver.recv().map_err(|_| io::Error::other("a gzip compression thread died"))??
            }
        };
        self.blob_writer.write_all(&compressed)?;
        self.written.push(WrittenBlock {
            key: hex::encode(key),
            offset: self.offset,
            length: compressed.len() as u64,
            blake3: blake3::hash(&compressed).to_hex().to_string(),
        });
        self.offset += compressed.len() as u64;
        Ok(())
    }

    /// Writes the trailer (CRC-32 and size modulo 2^32, little-endian). The last block must
    /// have been written.
    fn finish(mut self) -> io::Result<(BlobWriter, Vec<WrittenBlock>)> {
        debug_assert!(self.in_flight.is_empty(), "the last block drains the blocks before it");
        let mut trailer = [0u8; 8];
        trailer[..4].copy_from_slice(&self.crc.sum().to_le_bytes());
        trailer[4..].copy_from_slice(&self.crc.amount().to_le_bytes());
        self.blob_writer.write_all(&trailer)?;
        Ok((self.blob_writer, self.written))
    }
}

/// One block as raw deflate at [`GZIP_LEVEL`], primed with `dictionary`, ended with a sync
/// flush, or as the final block of the stream when `last`.
fn deflate_block(block: &[u8], dictionary: Option<&[u8]>, last: bool) -> io::Result<Vec<u8>> {
    use flate2::{Compress, FlushCompress, Status};
    let mut compress = Compress::new(flate2::Compression::new(GZIP_LEVEL), false);
    if let Some(dictionary) = dictionary {
        compress.set_dictionary(dictionary).map_err(io::Error::other)?;
    }
    let flush = if last { FlushCompress::Finish } else { FlushCompress::Sync };
    // Incompressible input grows by a few bytes per stored block; this is room for it.
    let mut output = Vec::with_capacity(block.len() + block.len() / 64 + 64);
    loop {
        let consumed = usize::try_from(compress.total_in()).expect("a block fits in memory");
        let status = compress.compress_vec(&block[consumed..], &mut output, flush).map_err(io::Error::other)?;
        let input_done = compress.total_in() as usize == block.len();
        // The flush is complete once all input is consumed and the output was not cut short
        // by a full buffer (zlib's contract: call again while avail_out is 0).
        let complete = match status {
            Status::StreamEnd => true,
            _ if last => false,
            _ => input_done && output.len() < output.capacity(),
        };
        if complete {
            return Ok(output);
        }
        output.reserve(output.capacity().max(4096));
    }
}

/// A job for the compression pool.
type CompressionJob = Box<dyn FnOnce() + Send>;

/// The process's compression threads (one per core), shared by every layer being written.
/// Jobs are pure computations that never wait on anything, so any thread may submit and wait
/// for results without risk of deadlock, whichever pool it belongs to.
struct CompressionPool {
    jobs: mpsc::Sender<CompressionJob>,
    threads: usize,
}

impl CompressionPool {
    fn submit(&self, job: CompressionJob) {
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            job(); // No worker is left (they only stop with the process): run it here.
        }
    }
}

fn compression_pool() -> &'static CompressionPool {
    static POOL: OnceLock<CompressionPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, usize::from);
        let (sender, receiver) = mpsc::channel::<CompressionJob>();
        let receiver = Arc::new(Mutex::new(receiver));
        let mut started = 0;
        for index in 0..threads {
            let receiver = Arc::clone(&receiver);
            let spawned = std::thread::Builder::new().name(format!("layerwright-gzip-{index}")).spawn(move || {
                loop {
                    let job = receiver.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            });
            started += usize::from(spawned.is_ok());
        }
        // Without any thread, `submit` runs jobs on the caller (the receiver is dropped here).
        CompressionPool { jobs: sender, threads: started.max(1) }
    })
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    const PLAIN: LayerOptions = LayerOptions { compression: Compression::None, mtime: 0 };

    fn new_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    fn entry(path: &str, kind: EntryKind, mode: u32) -> LayerEntry {
        LayerEntry { path: path.to_owned(), kind, mode, uid: 0, gid: 0, xattrs: Vec::new() }
    }

    fn file(path: &str, content: &[u8], mode: u32) -> LayerEntry {
        let kind = EntryKind::File { content: Content::Inline(Arc::from(content)), size: content.len() as u64 };
        entry(path, kind, mode)
    }

    fn dir(path: &str) -> LayerEntry {
        entry(path, EntryKind::Directory, 0o755)
    }

    fn owned(mut entry: LayerEntry, uid: u32, gid: u32) -> LayerEntry {
        entry.uid = uid;
        entry.gid = gid;
        entry
    }

    /// The uncompressed tar of a written layer.
    fn layer_tar(store: &Store, record: &LayerRecord) -> Vec<u8> {
        let blob = std::fs::read(store.blob_path(&record.digest)).unwrap();
        match Compression::from_media_type(&record.media_type).unwrap() {
            Compression::Gzip => {
                let mut tar = Vec::new();
                flate2::read::GzDecoder::new(&blob[..]).read_to_end(&mut tar).unwrap();
                tar
            }
            Compression::Zstd => zstd::stream::decode_all(&blob[..]).unwrap(),
            Compression::None => blob,
        }
    }

    /// One line per tar member as the tar crate reads it (PAX applied):
    /// `TYPE MODE UID:GID SIZE MTIME PATH [-> LINK] [CONTENT] [pax KEYS]`. Also asserts that
    /// uname and gname are empty.
    fn describe_tar(tar: &[u8]) -> String {
        let mut text = String::new();
        let mut archive = tar::Archive::new(tar);
        for member in archive.entries().unwrap() {
            let mut member = member.unwrap();
            let header = member.header().clone();
            assert_eq!(header.username_bytes(), Some(&b""[..]));
            assert_eq!(header.groupname_bytes(), Some(&b""[..]));
            let path = String::from_utf8(member.path_bytes().into_owned()).unwrap();
            let link = member
                .link_name_bytes()
                .map(|link| format!(" -> {}", String::from_utf8_lossy(&link)))
                .unwrap_or_default();
            let pax_keys: Vec<String> = match member.pax_extensions().unwrap() {
                Some(extensions) => extensions
                    .map(|extension| {
                        let extension = extension.unwrap();
                        let key = extension.key().unwrap().to_owned();
                        if key.starts_with("SCHILY.xattr.") {
                            format!("{key}={}", String::from_utf8_lossy(extension.value_bytes()))
                        } else {
                            key
                        }
                    })
                    .collect(),
                None => Vec::new(),
            };
            let mut content = Vec::new();
            member.read_to_end(&mut content).unwrap();
            let _ = write!(
                text,
                "{:?} {:04o} {}:{} {} {} {}{}",
                header.entry_type(),
                header.mode().unwrap(),
                header.uid().unwrap(),
                header.gid().unwrap(),
                member.size(),
                header.mtime().unwrap(),
                path,
                link,
            );
            if !content.is_empty() {
                let _ = write!(text, " {:?}", String::from_utf8_lossy(&content));
            }
            if !pax_keys.is_empty() {
                let _ = write!(text, " pax[{}]", pax_keys.join(","));
            }
            text.push('\n');
        }
        text
    }

    /// Writes `entries` uncompressed and compares the tar, as read back, with `expected`.
    fn check_tar(entries: Vec<LayerEntry>, options: &LayerOptions, expected: &str) {
        let (_dir, store) = new_store();
        let written = write_layer(&store, entries, options).unwrap();
        let described = describe_tar(&layer_tar(&store, &written.record));
        assert_eq!(described, expected, "\n{described}");
    }

    #[test]
    fn entries_are_sorted_component_wise_and_output_is_reproducible() {
        let entries = vec![
            file("z", b"z", 0o644),
            file("a-b", b"dash", 0o644),
            dir("a"),
            entry("a/l", EntryKind::Symlink { target: "../z".into() }, 0o777),
            file("a/c/d", b"deep", 0o644),
            dir("a/c"),
            file("a/b", b"b", 0o644),
        ];
        let orders = [
            entries.clone(),
            entries.iter().rev().cloned().collect(),
            entries.iter().skip(3).chain(entries.iter().take(3)).cloned().collect::<Vec<_>>(),
        ];
        for compression in [Compression::Gzip, Compression::Zstd, Compression::None] {
            let options = LayerOptions { compression, mtime: 1_700_000_000 };
            let mut outputs = Vec::new();
            for order in &orders {
                // A fresh store each time, so every blob is really written again.
                let (_dir, store) = new_store();
                let written = write_layer(&store, order.clone(), &options).unwrap();
                let blob = std::fs::read(store.blob_path(&written.record.digest)).unwrap();
                outputs.push((written.record, blob, written.index));
            }
            for output in &outputs[1..] {
                assert_eq!(output, &outputs[0], "{compression:?}");
            }
        }
        check_tar(
            entries,
            &PLAIN,
            "\
Directory 0755 0:0 0 0 a/
Regular 0644 0:0 1 0 a/b \"b\"
Directory 0755 0:0 0 0 a/c/
Regular 0644 0:0 4 0 a/c/d \"deep\"
Symlink 0777 0:0 0 0 a/l -> ../z
Regular 0644 0:0 4 0 a-b \"dash\"
Regular 0644 0:0 1 0 z \"z\"
",
        );
    }

    #[test]
    fn headers_carry_modes_owners_devices_and_xattrs_exactly() {
        let mut with_xattr = file("bin/ping", b"", 0o755);
        with_xattr.xattrs = vec![("security.capability".into(), b"cap".to_vec()), ("user.a".into(), b"1".to_vec())];
        check_tar(
            vec![
                owned(file("usr/bin/su", b"su", 0o4755), 0, 0),
                owned(file("etc/shadow", b"x", 0o600), 0, 42),
                owned(entry("srv", EntryKind::Directory, 0o2775), 1000, 1000),
                with_xattr,
                owned(file("home/big", b"", 0o644), 3_000_000, 70_000),
                entry("tmp", EntryKind::Directory, 0o1777),
                entry("dev/null", EntryKind::CharDevice { major: 1, minor: 3 }, 0o666),
                entry("dev/sda", EntryKind::BlockDevice { major: 8, minor: 0 }, 0o660),
                entry("run/pipe", EntryKind::Fifo, 0o644),
                // File-type bits in a caller's mode are dropped.
                entry("x", EntryKind::Directory, 0o040_700),
            ],
            &LayerOptions { compression: Compression::None, mtime: 1_234_567 },
            "\
Regular 0755 0:0 0 1234567 bin/ping pax[SCHILY.xattr.security.capability=cap,SCHILY.xattr.user.a=1]
Char 0666 0:0 0 1234567 dev/null
Block 0660 0:0 0 1234567 dev/sda
Regular 0600 0:42 1 1234567 etc/shadow \"x\"
Regular 0644 3000000:70000 0 1234567 home/big pax[uid]
Fifo 0644 0:0 0 1234567 run/pipe
Directory 2775 1000:1000 0 1234567 srv/
Directory 1777 0:0 0 1234567 tmp/
Regular 4755 0:0 2 1234567 usr/bin/su \"su\"
Directory 0700 0:0 0 1234567 x/
",
        );

        // Device numbers are in the header.
        let (_dir, store) = new_store();
        let written =
            write_layer(&store, vec![entry("dev/null", EntryKind::CharDevice { major: 1, minor: 3 }, 0o666)], &PLAIN)
                .unwrap();
        let tar = layer_tar(&store, &written.record);
        let header = tar::Header::from_byte_slice(&tar[..512]);
        assert_eq!(header.device_major().unwrap(), Some(1));
        assert_eq!(header.device_minor().unwrap(), Some(3));
    }

    #[test]
    fn long_names_whiteouts_and_hard_links_get_their_tar_names() {
        let splittable = format!("{}/{}", "d".repeat(60), "e".repeat(89));
        let one_long_component = "f".repeat(120);
        let too_deep = format!("{}/{}", "g".repeat(160), "h".repeat(50));
        let long_target = "t/".repeat(60);
        assert_eq!(splittable.len(), 150);
        check_tar(
            vec![
                file(&splittable, b"1", 0o644),
                file(&one_long_component, b"2", 0o644),
                file(&too_deep, b"3", 0o644),
                entry("link", EntryKind::Symlink { target: long_target.clone() }, 0o777),
                owned(entry("dir/gone", EntryKind::Whiteout, 0o644), 5, 5),
                entry("dir", EntryKind::OpaqueWhiteout, 0o755),
                entry("", EntryKind::OpaqueWhiteout, 0o755),
                // The target sorts after the link: the link gets the content.
                file("b/target", b"shared", 0o640),
                entry("a/link", EntryKind::HardLink { target: "b/target".into() }, 0o644),
                // A target in a lower layer is written as given.
                entry("c/lower", EntryKind::HardLink { target: "usr/lib/x".into() }, 0o644),
            ],
            &PLAIN,
            &format!(
                "\
Regular 0000 0:0 0 0 .wh..wh..opq
Regular 0640 0:0 6 0 a/link \"shared\"
Link 0640 0:0 0 0 b/target -> a/link
Link 0644 0:0 0 0 c/lower -> usr/lib/x
Regular 0644 0:0 1 0 {splittable} \"1\"
Regular 0000 0:0 0 0 dir/.wh..wh..opq
Regular 0000 0:0 0 0 dir/.wh.gone
Regular 0644 0:0 1 0 {one_long_component} \"2\" pax[path]
Regular 0644 0:0 1 0 {too_deep} \"3\" pax[path]
Symlink 0777 0:0 0 0 link -> {long_target} pax[linkpath]
"
            ),
        );

        // The 150-byte path fits the ustar prefix and name fields, with no PAX header.
        let (_dir, store) = new_store();
        let written = write_layer(&store, vec![file(&splittable, b"1", 0o644)], &PLAIN).unwrap();
        let tar = layer_tar(&store, &written.record);
        let header = tar::Header::from_byte_slice(&tar[..512]);
        let ustar = header.as_ustar().unwrap();
        assert_eq!(header.entry_type(), tar::EntryType::Regular);
        assert_eq!(&ustar.prefix[..61], format!("{}\0", "d".repeat(60)).as_bytes());
        assert_eq!(&ustar.name[..89], "e".repeat(89).as_bytes());
    }

    #[test]
    fn sizes_of_8_gib_and_more_go_through_pax() {
        let huge = 9 * 1024 * 1024 * 1024_u64;
        let planned = PlannedEntry {
            tar_path: "huge".into(),
            image_path: "huge".into(),
            kind: EntryKind::File { content: Content::Inline(Arc::from(&b""[..])), size: huge },
            mode: 0o644,
            uid: 0,
            gid: 0,
            xattrs: Vec::new(),
        };
        let (pax, header) = entry_headers(&planned, 0);
        assert_eq!(pax.bytes, b"19 size=9663676416\n");
        assert_eq!(header.size().unwrap(), huge);

        let small = PlannedEntry {
            kind: EntryKind::File { content: Content::Inline(Arc::from(&b""[..])), size: USTAR_MAX_SIZE },
            ..planned
        };
        assert!(entry_headers(&small, 0).0.is_empty());
    }

    #[test]
    fn header_copies_of_long_paths_keep_whole_components() {
        fn check(path: &str, limit: usize, expected: &str) {
            assert_eq!(truncate_path(path, limit), expected, "{path:?}");
        }
        check("short", 10, "short");
        check("abc/..def/ghi", 7, "abc");
        check("abc/..def/ghi", 10, "abc/..def");
        check("abcdefghijkl", 5, "abcde");
        // Multi-byte characters around the limit: never cut inside one.
        check("\u{e9}\u{e9}\u{e9}/x", 2, "\u{e9}");
        check("\u{e9}\u{e9}\u{e9}", 3, "\u{e9}");
        check("ab/\u{e9}\u{e9}", 4, "ab");
        let long = format!("{}/{}", "\u{e9}".repeat(60), "x".repeat(60));
        assert!(truncate_path(&long, 100).len() <= 100);
    }

    #[test]
    fn pax_record_lengths_count_themselves() {
        for value_length in 0..1100 {
            let mut records = PaxRecords::default();
            records.add("path", "a".repeat(value_length).as_bytes());
            let text = String::from_utf8(records.bytes).unwrap();
            let (length, _) = text.split_once(' ').unwrap();
            assert_eq!(length.parse::<usize>().unwrap(), text.len(), "{text:?}");
        }
    }

    #[test]
    fn compressed_blobs_are_pinned_and_decompress_to_the_diff_id() {
        fn check(compression: Compression, magic: &[u8]) {
            let (_dir, store) = new_store();
            let options = LayerOptions { compression, mtime: 0 };
            let written = write_layer(&store, vec![file("hello", b"hello", 0o644)], &options).unwrap();
            let record = &written.record;
            let blob = std::fs::read(store.blob_path(&record.digest)).unwrap();
            assert!(blob.starts_with(magic), "{compression:?}: {:x?}", &blob[..8]);
            assert_eq!(Digest::of_bytes(&blob), record.digest);
            assert_eq!(blob.len() as u64, record.size);
            assert_eq!(written.blob_bytes_written, record.size);
            assert_eq!(record.media_type, compression.media_type());
            let tar = layer_tar(&store, record);
            assert_eq!(Digest::of_bytes(&tar), record.diff_id);
            assert_eq!(tar.len(), 512 + 512 + 1024, "header, one data block, end blocks");
            if compression == Compression::Gzip {
                assert_eq!(blob[3], 0, "no gzip flags: no file name, no comment");
                assert_eq!(&blob[4..8], &[0, 0, 0, 0], "gzip mtime is 0");
                assert_eq!(blob[9], 255, "gzip OS byte is 'unknown'");
            }
        }
        check(Compression::Gzip, &[0x1f, 0x8b, 8]);
        check(Compression::Zstd, &[0x28, 0xb5, 0x2f, 0xfd]);
        check(Compression::None, b"hello\0");
    }

    #[test]
    fn gzip_blocks_compress_in_parallel_into_one_ordinary_member() {
        // Several blocks mixing text and noise; an exact multiple of the block size (the final
        // block is then a full one); and a single short block.
        let mut mixed = Vec::new();
        for round in 0..6u64 {
            mixed.extend(crate::host::incompressible_bytes(50_000, round + 1));
            mixed.extend(format!("line {round}\n").repeat(4_000).as_bytes());
        }
        let exact = crate::host::incompressible_bytes(3 * GZIP_BLOCK_MAX, 9);
        for data in [mixed, exact, b"short".to_vec()] {
            let (_dir, store) = new_store();
            let mut compressor = Compressor::new(Compression::Gzip, store.blob_writer().unwrap()).unwrap();
            // Odd write sizes: the output must depend on the bytes only.
            for piece in data.chunks(7_777) {
                compressor.write_all(piece).unwrap();
            }
            let blob = compressor.finish().unwrap().commit().unwrap();
            let bytes = std::fs::read(&blob.path).unwrap();

            // One member: a reader that stops after the first member still gets everything.
            let mut decoded = Vec::new();
            flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut decoded).unwrap();
            assert_eq!(decoded, data);

            // The same bytes as compressing the blocks one after another on one thread.
            // Without entries, blocks end at the largest block size.
            let blocks: Vec<&[u8]> = data.chunks(GZIP_BLOCK_MAX).collect();
            let mut expected = GZIP_HEADER.to_vec();
            for (position, block) in blocks.iter().enumerate() {
                let dictionary = position.checked_sub(1).map(|previous| {
                    let previous = blocks[previous];
                    &previous[previous.len() - DEFLATE_WINDOW..]
                });
                expected.extend(deflate_block(block, dictionary, position + 1 == blocks.len()).unwrap());
            }
            let mut crc = flate2::Crc::new();
            crc.update(&data);
            expected.extend(crc.sum().to_le_bytes());
            expected.extend((data.len() as u32).to_le_bytes());
            assert!(bytes == expected, "{} bytes", data.len());
        }
    }

    #[test]
    fn gzip_blocks_follow_entries_and_are_reused_after_a_change() {
        let files = |changed: &[u8]| -> Vec<LayerEntry> {
            (0..300u64)
                .map(|index| {
                    let content = if index == 150 {
                        changed.to_vec()
                    } else {
                        crate::host::incompressible_bytes(4096, index + 1)
                    };
                    file(&format!("data/f{index:03}"), &content, 0o644)
                })
                .collect()
        };
        let options = LayerOptions { compression: Compression::Gzip, mtime: 0 };
        let block_keys = |store: &Store| -> Vec<String> {
            let maps: Vec<_> = std::fs::read_dir(store.root().join("gzip-blocks")).unwrap().collect();
            assert_eq!(maps.len(), 1, "one map per layer shape");
            let map: BlockMap =
                serde_json::from_slice(&std::fs::read(maps[0].as_ref().unwrap().path()).unwrap()).unwrap();
            map.blocks.into_iter().map(|block| block.key).collect()
        };

        let (_dir, store) = new_store();
        write_layer(&store, files(&crate::host::incompressible_bytes(4096, 151)), &options).unwrap();
        let before = block_keys(&store);
        // The changed file shrinks: everything after it moves.
        let second = write_layer(&store, files(b"changed"), &options).unwrap();
        let after = block_keys(&store);
        assert!(after.len() >= 8, "{} blocks", after.len());
        let shared = after.iter().filter(|key| before.contains(key)).count();
        assert!(shared + 2 >= after.len(), "only the changed block and the next differ: {shared} of {}", after.len());

        // Reused or not, the bytes are those of a fresh build; a corrupt previous blob is not reused.
        let (_fresh_dir, fresh) = new_store();
        let fresh_second = write_layer(&fresh, files(b"changed"), &options).unwrap();
        assert_eq!(second.record, fresh_second.record);
        let blob_path = store.blob_path(&second.record.digest);
        let mut corrupted = std::fs::read(&blob_path).unwrap();
        corrupted[100] ^= 1;
        std::fs::write(&blob_path, corrupted).unwrap();
        let third = write_layer(&store, files(b"changed"), &options).unwrap();
        assert_eq!(third.record, fresh_second.record, "the corrupt block is compressed again");
    }

    #[test]
    fn sources_must_hold_their_declared_size() {
        fn check(actual_content: &[u8], declared: u64, expected: Option<(u64, u64)>) {
            let (dir, store) = new_store();
            let host_file = dir.path().join("source");
            std::fs::write(&host_file, actual_content).unwrap();
            let kind = EntryKind::File { content: Content::HostFile(host_file), size: declared };
            let result = write_layer(&store, vec![entry("app/data", kind, 0o644)], &PLAIN);
            match (result, expected) {
                (Ok(written), None) => {
                    let tar = layer_tar(&store, &written.record);
                    assert!(describe_tar(&tar).contains("app/data"));
                }
                (Err(LayerError::SizeChanged { path, expected, actual }), Some(sizes)) => {
                    assert_eq!((expected, actual), sizes);
                    assert!(path.contains("/app/data"), "{path}");
                    let leftovers = std::fs::read_dir(store.tmp_dir()).unwrap().count();
                    assert_eq!(leftovers, 0, "the temporary blob is deleted");
                }
                (other, expected) => panic!("{other:?}, expected {expected:?}"),
            }
        }
        check(b"12345", 5, None);
        check(b"12345", 10, Some((10, 5)));
        check(b"12345", 3, Some((3, 5)));
        check(b"", 1, Some((1, 0)));

        let (dir, store) = new_store();
        let kind = EntryKind::File { content: Content::HostFile(dir.path().join("missing")), size: 1 };
        let error = write_layer(&store, vec![entry("x", kind, 0o644)], &PLAIN).unwrap_err();
        assert!(matches!(error, LayerError::ReadSource { .. }), "{error}");
    }

    #[test]
    fn context_files_are_read_through_the_capability() {
        let (dir, store) = new_store();
        let context = dir.path().join("context");
        std::fs::create_dir(&context).unwrap();
        std::fs::write(context.join("inside.txt"), b"inside").unwrap();
        std::fs::write(dir.path().join("outside.txt"), b"secret").unwrap();
        let capability = Arc::new(cap_std::fs::Dir::open_ambient_dir(&context, cap_std::ambient_authority()).unwrap());
        let from_context = |path: &str, size| {
            let kind =
                EntryKind::File { content: Content::Context { dir: capability.clone(), path: path.to_owned() }, size };
            entry("app/file", kind, 0o644)
        };

        let written = write_layer(&store, vec![from_context("inside.txt", 6)], &PLAIN).unwrap();
        let tar = layer_tar(&store, &written.record);
        assert_eq!(describe_tar(&tar), "Regular 0644 0:0 6 0 app/file \"inside\"\n");

        let error = write_layer(&store, vec![from_context("../outside.txt", 6)], &PLAIN).unwrap_err();
        assert!(matches!(error, LayerError::ReadSource { .. }), "{error}");
    }

    #[test]
    fn the_index_lists_the_tar_and_is_saved() {
        let (_dir, store) = new_store();
        let written = write_layer(
            &store,
            vec![
                file("etc/passwd", b"root", 0o644),
                dir("etc"),
                entry("etc/old", EntryKind::Whiteout, 0o644),
                entry("var", EntryKind::OpaqueWhiteout, 0o755),
                entry("etc/link", EntryKind::HardLink { target: "etc/passwd".into() }, 0o644),
            ],
            &PLAIN,
        )
        .unwrap();
        let index_entry = |path: &str, kind, mode| IndexEntry { path: path.to_owned(), kind, mode, uid: 0, gid: 0 };
        let expected = LayerIndex {
            entries: vec![
                index_entry("etc", IndexKind::Directory, 0o755),
                index_entry("etc/old", IndexKind::Whiteout, 0),
                // `etc/link` sorts before `etc/passwd`, so it carries the content.
                index_entry("etc/link", IndexKind::File { size: 4, sha256: Digest::of_bytes(b"root") }, 0o644),
                index_entry("etc/passwd", IndexKind::HardLink { target: "etc/link".into() }, 0o644),
                index_entry("var", IndexKind::OpaqueWhiteout, 0),
            ],
        };
        assert_eq!(written.index, expected);
        let loaded = LayerIndex::load(&store, &written.record.diff_id).unwrap();
        assert_eq!(loaded, Some(expected));
    }

    #[test]
    fn invalid_entries_are_refused() {
        fn check(entries: Vec<LayerEntry>, expected: &str) {
            let (_dir, store) = new_store();
            let error = write_layer(&store, entries, &PLAIN).unwrap_err();
            let text = error.to_string();
            assert!(text.contains(expected), "{text:?} does not contain {expected:?}");
        }
        check(vec![file("a", b"1", 0o644), file("a", b"2", 0o644)], "layer entry a appears twice");
        for bad in ["/abs", "a/../b", "a//b", "a/", ".", "", "a/\0"] {
            check(vec![file(bad, b"", 0o644)], "invalid layer entry");
        }
        check(vec![file("a/.wh.b", b"", 0o644)], "reserved for whiteouts");
        check(vec![file("a", b"", 0o644), file("a/b", b"", 0o644)], "its parent \"a\" is not a directory");
        check(
            vec![entry("l", EntryKind::Symlink { target: "/etc".into() }, 0o777), file("l/passwd", b"", 0o644)],
            "its parent \"l\" is not a directory",
        );
        check(
            vec![dir("d"), entry("l", EntryKind::HardLink { target: "d".into() }, 0o644)],
            "hard link to the directory",
        );
        check(
            vec![
                entry("x", EntryKind::HardLink { target: "y".into() }, 0o644),
                entry("y", EntryKind::HardLink { target: "x".into() }, 0o644),
            ],
            "cycle",
        );
        check(vec![entry("x", EntryKind::HardLink { target: "../y".into() }, 0o644)], "hard link target");
        let mut bad_xattr = file("x", b"", 0o644);
        bad_xattr.xattrs = vec![("a=b".into(), Vec::new())];
        check(vec![bad_xattr], "cannot be a PAX key");
    }
}
