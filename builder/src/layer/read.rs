//! Reading layer blobs: a decompressing, diff-id hashing stream over a stored layer, and the
//! indexer that turns it into a [`LayerIndex`].
//!
//! Safety: [`index_layer`] refuses entries that could land outside the image root (absolute
//! paths, `..` components, whiteouts naming `.` or `..`, hard links to such paths) and verifies
//! the diff id of what it read.
//!
//! What it deliberately is not: an unpacker (see `snapshot`), nor the merged view of several
//! layers (`crate::tree`).

use std::io::{self, BufRead, BufReader, Read, Write};

use layerwright_cache::{Digest, LayerRecord, Sha256Writer, Store};

use super::format::{Compression, OPAQUE_WHITEOUT_NAME, WHITEOUT_PREFIX};
use super::index::{IndexEntry, IndexKind, LayerIndex, TreeError};

/// Reads a stored layer blob (decompressing per its media type), verifies its diff id, checks
/// every entry name for safety, saves and returns its index. Used for imported base layers.
///
/// The media type must be a known layer type, but the compression is taken from the blob's
/// first bytes when they are a gzip or zstd magic number (as containerd does): docker-archive
/// tools disagree on whether `layer.tar` is compressed. Member names are normalised (one
/// leading `./` and any `.` or empty components dropped); the root directory entry (`./`) is
/// skipped; `.wh..wh..opq` becomes an `IndexKind::OpaqueWhiteout` of its directory, `.wh.NAME`
/// a `IndexKind::Whiteout` of `NAME`, and other `.wh..wh.` names (aufs metadata) are
/// skipped. Symlink targets are kept verbatim; hard link targets are normalised like names.
pub fn index_layer(store: &Store, layer: &LayerRecord) -> Result<LayerIndex, TreeError> {
    index_layer_observed(store, layer, &mut |_| {})
}

/// [`index_layer`], showing `observe` every byte of the uncompressed tar stream, in order (a
/// base image's snapshot is unpacked from it: see `import::import_archive_for_runs`).
pub fn index_layer_observed(
    store: &Store,
    layer: &LayerRecord,
    observe: &mut dyn FnMut(&[u8]),
) -> Result<LayerIndex, TreeError> {
    let stream = open_layer_stream(store, layer)?;
    index_stream_observed(store, layer, stream, observe)
}

/// [`index_layer_observed`] over the layer's blob as read from `blob` rather than from the
/// store: a base image's member indexed while the same bytes are being stored (see
/// `import::import_archive_for_runs`). The diff id is verified all the same; that the bytes
/// are the blob the record names is the storing side's check.
pub fn index_blob_observed(
    store: &Store,
    layer: &LayerRecord,
    blob: Box<dyn Read>,
    observe: &mut dyn FnMut(&[u8]),
) -> Result<LayerIndex, TreeError> {
    let stream = layer_stream(BufReader::with_capacity(256 * 1024, blob), layer)?;
    index_stream_observed(store, layer, stream, observe)
}

fn index_stream_observed<R: Read>(
    store: &Store,
    layer: &LayerRecord,
    HashingReader { inner, hasher }: HashingReader<R>,
    observe: &mut dyn FnMut(&[u8]),
) -> Result<LayerIndex, TreeError> {
    let layer_digest = &layer.digest;
    let read_error = |source| TreeError::Read { layer: layer_digest.clone(), source };
    let stream = HashingReader { inner: ObservedReader { inner, observe }, hasher };
    let mut archive = tar::Archive::new(stream);
    archive.set_ignore_zeros(false);

    let mut index = LayerIndex::default();
    for member in archive.entries().map_err(read_error)? {
        let mut member = member.map_err(read_error)?;
        if let Some(entry) = index_member(&mut member, layer_digest)? {
            index.entries.push(entry);
        }
    }
    verify_diff_id(archive.into_inner(), layer)?;
    index.save(store, &layer.diff_id)?;
    Ok(index)
}

/// Where a tar member name lands in the image.
pub(crate) enum MemberPath {
    /// The root directory itself (`./`, `.`).
    Root,
    Inside(String),
    Escapes,
}

/// Normalises a tar member name: no leading `/`, one leading `./` stripped, empty and `.`
/// components dropped, `..` refused.
pub(crate) fn normalise_member_path(name: &str) -> MemberPath {
    if name.is_empty() || name.starts_with('/') {
        return MemberPath::Escapes;
    }
    let name = name.strip_prefix("./").unwrap_or(name);
    let mut components = Vec::new();
    for component in name.split('/') {
        match component {
            "" | "." => continue,
            ".." => return MemberPath::Escapes,
            component => components.push(component),
        }
    }
    if components.is_empty() {
        return MemberPath::Root;
    }
    MemberPath::Inside(components.join("/"))
}

/// A regular file's tar types: regular (`0` and the old `\0`), contiguous, and GNU sparse
/// (whose holes the tar crate fills in when the content is read).
pub(crate) fn is_regular_file(entry_type: tar::EntryType) -> bool {
    entry_type.is_file() || entry_type.is_contiguous() || entry_type.is_gnu_sparse()
}

pub(crate) fn member_name<R: Read>(member: &tar::Entry<'_, R>, layer: &Digest) -> Result<String, TreeError> {
    let bytes = member.path_bytes();
    match std::str::from_utf8(&bytes) {
        Ok(name) => Ok(name.to_owned()),
        Err(_) => Err(TreeError::NotUtf8 { layer: layer.clone(), entry: String::from_utf8_lossy(&bytes).into_owned() }),
    }
}

/// A member's link target (PAX and GNU long names included), which must be UTF-8.
pub(crate) fn member_link_name<R: Read>(
    member: &tar::Entry<'_, R>,
    layer: &Digest,
    name: &str,
) -> Result<String, TreeError> {
    let bytes = member.link_name_bytes().unwrap_or_default();
    match std::str::from_utf8(&bytes) {
        Ok(target) => Ok(target.to_owned()),
        Err(_) => Err(TreeError::NotUtf8 {
            layer: layer.clone(),
            entry: format!("{name} -> {}", String::from_utf8_lossy(&bytes)),
        }),
    }
}

/// The index entry of one tar member, `None` for members that are not image entries (the root
/// directory, PAX global headers, aufs metadata).
fn index_member<R: Read>(member: &mut tar::Entry<'_, R>, layer: &Digest) -> Result<Option<IndexEntry>, TreeError> {
    let read_error = |source| TreeError::Read { layer: layer.clone(), source };
    let name = member_name(member, layer)?;
    let escapes = || TreeError::EscapesRoot { layer: layer.clone(), entry: name.clone() };
    let header = member.header();
    let entry_type = header.entry_type();
    if entry_type.is_pax_global_extensions() {
        return Ok(None);
    }
    let path = match normalise_member_path(&name) {
        MemberPath::Inside(path) => path,
        MemberPath::Root if entry_type.is_dir() => return Ok(None),
        MemberPath::Root | MemberPath::Escapes => return Err(escapes()),
    };
    let id = |value: io::Result<u64>| {
        let value = value.map_err(read_error)?;
        u32::try_from(value).map_err(|_| {
            read_error(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name:?}: owner id {value} does not fit 32 bits"),
            ))
        })
    };
    // File-type bits that some tools put into the mode field are not permissions.
    let mode = header.mode().map_err(read_error)? & 0o7777;
    let uid = id(header.uid())?;
    let gid = id(header.gid())?;

    let (parent, base) = match path.rsplit_once('/') {
        Some((parent, base)) => (parent, base),
        None => ("", path.as_str()),
    };
    if base == OPAQUE_WHITEOUT_NAME {
        return Ok(Some(IndexEntry { path: parent.to_owned(), kind: IndexKind::OpaqueWhiteout, mode, uid, gid }));
    }
    if base.starts_with(".wh..wh.") {
        return Ok(None); // aufs metadata (`.wh..wh.plnk`, ...): never part of the image.
    }
    if let Some(deleted) = base.strip_prefix(WHITEOUT_PREFIX) {
        if deleted.is_empty() || deleted == "." || deleted == ".." {
            return Err(escapes());
        }
        let deleted_path = if parent.is_empty() { deleted.to_owned() } else { format!("{parent}/{deleted}") };
        return Ok(Some(IndexEntry { path: deleted_path, kind: IndexKind::Whiteout, mode, uid, gid }));
    }

    let link_name = || member_link_name(member, layer, &name);
    let device =
        |number: io::Result<Option<u32>>| -> Result<u32, TreeError> { Ok(number.map_err(read_error)?.unwrap_or(0)) };
    let kind = if entry_type.is_dir() {
        IndexKind::Directory
    } else if entry_type.is_symlink() {
        IndexKind::Symlink { target: link_name()? }
    } else if entry_type.is_hard_link() {
        let target = link_name()?;
        match normalise_member_path(&target) {
            MemberPath::Inside(target) => IndexKind::HardLink { target },
            MemberPath::Root | MemberPath::Escapes => {
                return Err(TreeError::EscapesRoot { layer: layer.clone(), entry: format!("{name} => {target}") });
            }
        }
    } else if entry_type.is_character_special() {
        IndexKind::CharDevice { major: device(header.device_major())?, minor: device(header.device_minor())? }
    } else if entry_type.is_block_special() {
        IndexKind::BlockDevice { major: device(header.device_major())?, minor: device(header.device_minor())? }
    } else if entry_type.is_fifo() {
        IndexKind::Fifo
    } else if is_regular_file(entry_type) {
        let mut hasher = Sha256Writer::new(io::sink());
        io::copy(member, &mut hasher).map_err(read_error)?;
        let (sha256, size, _) = hasher.finish();
        IndexKind::File { size, sha256 }
    } else {
        return Err(TreeError::UnsupportedEntry {
            layer: layer.clone(),
            entry: name.clone(),
            entry_type: char::from(entry_type.as_byte()),
        });
    };
    Ok(Some(IndexEntry { path, kind, mode, uid, gid }))
}

/// Passes bytes through while hashing them: the diff id of the uncompressed stream.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256Writer<io::Sink>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let count = self.inner.read(buffer)?;
        self.hasher.write_all(&buffer[..count]).expect("writing to a sink cannot fail");
        Ok(count)
    }
}

/// Passes bytes through and shows `observe` what was read.
struct ObservedReader<'a, R> {
    inner: R,
    observe: &'a mut dyn FnMut(&[u8]),
}

impl<R: Read> Read for ObservedReader<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let count = self.inner.read(buffer)?;
        (self.observe)(&buffer[..count]);
        Ok(count)
    }
}

/// The uncompressed tar stream of a stored layer blob, hashed as it is read.
pub(crate) fn open_layer_stream(store: &Store, layer: &LayerRecord) -> Result<HashingReader<Box<dyn Read>>, TreeError> {
    let blob: Box<dyn Read> = Box::new(store.open_blob(&layer.digest)?);
    layer_stream(BufReader::with_capacity(256 * 1024, blob), layer)
}

/// The decompressed, diff-id hashing stream of `blob`, the bytes of `layer`'s blob.
fn layer_stream(
    mut blob: BufReader<Box<dyn Read>>,
    layer: &LayerRecord,
) -> Result<HashingReader<Box<dyn Read>>, TreeError> {
    let read_error = |source| TreeError::Read { layer: layer.digest.clone(), source };
    let declared = Compression::from_media_type(&layer.media_type).ok_or_else(|| TreeError::UnsupportedMediaType {
        layer: layer.digest.clone(),
        media_type: layer.media_type.clone(),
    })?;
    let magic = blob.fill_buf().map_err(read_error)?;
    let compression = if magic.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        // No magic: trust the media type (a gzip type then fails with a clear gzip error).
        declared
    };
    let inner: Box<dyn Read> = match compression {
        // Multi-member: pigz and concatenating tools write several gzip members.
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(blob)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(blob).map_err(read_error)?),
        Compression::None => Box::new(blob),
    };
    Ok(HashingReader { inner, hasher: Sha256Writer::new(io::sink()) })
}

/// Reads the rest of the stream (the end-of-archive blocks and any record padding count for
/// the diff id) and compares the digest of everything read with the layer's diff id.
pub(crate) fn verify_diff_id<R: Read>(mut stream: HashingReader<R>, layer: &LayerRecord) -> Result<(), TreeError> {
    io::copy(&mut stream, &mut io::sink()).map_err(|source| TreeError::Read { layer: layer.digest.clone(), source })?;
    let (actual, _, _) = stream.hasher.finish();
    if actual != layer.diff_id {
        return Err(TreeError::DiffIdMismatch { layer: layer.digest.clone(), expected: layer.diff_id.clone(), actual });
    }
    Ok(())
}

/// The index of a stored layer: the one saved next to its blob, or, when there is none (or it
/// no longer parses), one made by reading the blob (and saved for next time).
pub fn saved_or_indexed(store: &Store, layer: &LayerRecord) -> Result<LayerIndex, TreeError> {
    match LayerIndex::load(store, &layer.diff_id)? {
        Some(index) => Ok(index),
        None => index_layer(store, layer),
    }
}
