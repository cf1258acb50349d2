//! Exporters: OCI image layout dir, OCI archive, docker-archive.
//!
//! What they do: write an image whose manifest, config and layer blobs are already in the
//! store into a form a real client reads. An OCI layout is `oci-layout`, `index.json` and
//! `blobs/sha256/<hex>`; an OCI archive is that layout as a tar; a docker-archive is a tar that
//! `docker load -i` reads (`manifest.json` naming the config and layers) and that is at the same
//! time an OCI archive (Docker ≥ 25 writes that combined format too).
//!
//! Rules: outputs are reproducible (sorted entries; every tar header written explicitly: mode
//! 0644 for files and 0755 for directories, uid/gid 0, mtime 0, no user or group names; JSON
//! with sorted keys and no whitespace), streamed (a blob goes from the store into the output
//! through a small buffer or inside the kernel, never whole into memory), verified (each blob
//! is hashed while it is copied, except one this process hashed itself while committing it,
//! whose size is checked; a store blob that no longer matches its digest fails the export
//! rather than being served) and atomic (a temp file in the destination directory, renamed into place). A layout
//! blob that is already present with the right size is not rewritten, so re-exporting an
//! unchanged image into a layout costs a few stats and one `index.json`.
//!
//! What they do not: build or change images (the manifest and config are written by the
//! builder), compress or recompress layers, or talk to registries.
//!
//! Tags: `app`, `app:1.2`, `localhost:5000/team/app:latest`. The tag is what follows the last
//! `:` after the last `/` (default `latest`); it becomes the layout's
//! `org.opencontainers.image.ref.name`, and the full name (`app:latest`) the docker-archive's
//! `RepoTags` and the `io.containerd.image.name` annotation. A layout can hold several tags:
//! exporting replaces only the descriptor with the same ref name.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use layerwright_cache::{Digest, LayerRecord, Sha256Writer, Store};
use serde_json::{Value, json};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("invalid tag {tag:?}: {reason}")]
    InvalidTag { tag: String, reason: String },
    #[error(transparent)]
    Store(#[from] layerwright_cache::StoreError),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "cache blob {path} is corrupt: it should be {expected_size} bytes with digest {digest}, but is {actual_size} bytes with digest {actual}; it was removed from the cache, so building again rebuilds it"
    )]
    CorruptBlob { path: PathBuf, digest: Digest, expected_size: u64, actual: Digest, actual_size: u64 },
    #[error("{path} cannot be updated: {reason}")]
    ExistingIndex { path: PathBuf, reason: String },
}

/// What an exporter needs: everything is in `store`.
#[derive(Debug, Clone, Copy)]
pub struct ImageParts<'a> {
    pub store: &'a Store,
    pub manifest: &'a Digest,
    pub manifest_size: u64,
    pub config: &'a Digest,
    pub layers: &'a [LayerRecord],
}

const OCI_LAYOUT_CONTENT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
const OCI_INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME_ANNOTATION: &str = "io.containerd.image.name";

/// Writes (or updates) the OCI image layout `dir` so that it holds the image under `tag`.
pub fn write_oci_layout(parts: ImageParts<'_>, dir: &Path, tag: &str) -> Result<(), ExportError> {
    let reference = ImageReference::parse(tag)?;
    let blobs_dir = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs_dir).map_err(|source| ExportError::Write { path: blobs_dir.clone(), source })?;

    let layout_file = dir.join("oci-layout");
    if fs::read(&layout_file).ok().as_deref() != Some(OCI_LAYOUT_CONTENT) {
        write_atomically(&layout_file, |output| {
            output.write_all(OCI_LAYOUT_CONTENT).map_err(write_error(&layout_file))
        })?;
    }
    // Blobs first, index last: a layout interrupted half way names no missing blob.
    for (digest, size) in blob_sizes(&parts)? {
        copy_blob_into_layout(parts.store, &digest, size, &blobs_dir)?;
    }

    let index_path = dir.join("index.json");
    let existing = match fs::read(&index_path) {
        Ok(bytes) => Some(bytes),
        Err(error) if error.kind() == io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(ExportError::Read { path: index_path, source });
        }
    };
    let index = merged_index(existing.as_deref(), manifest_descriptor(&parts, &reference), &reference.tag)
        .map_err(|reason| ExportError::ExistingIndex { path: index_path.clone(), reason })?;
    let index_bytes = canonical_json(&index);
    if existing.as_deref() == Some(index_bytes.as_slice()) {
        // The layout already names this image under this tag: leave it untouched.
        return Ok(());
    }
    write_atomically(&index_path, |output| output.write_all(&index_bytes).map_err(write_error(&index_path)))
}

/// Writes the OCI archive `file`: the image's OCI layout as a tar.
pub fn write_oci_archive(parts: ImageParts<'_>, file: &Path, tag: &str) -> Result<(), ExportError> {
    let reference = ImageReference::parse(tag)?;
    write_layout_tar(&parts, &reference, file, BTreeMap::new())
}

/// Writes the docker-archive `file` (`docker load -i`), which is also an OCI archive.
///
/// Docker 20.10 reads `manifest.json` only: `Config` and `Layers` name members, a layer member
/// may be gzip-compressed (it is decompressed while loaded and checked against the config's
/// diff ids), and the legacy `repositories` file is read only when `manifest.json` is absent,
/// so it is not written.
pub fn write_docker_archive(parts: ImageParts<'_>, file: &Path, tag: &str) -> Result<(), ExportError> {
    let reference = ImageReference::parse(tag)?;
    let layer_members: Vec<String> = parts.layers.iter().map(|layer| blob_member(&layer.digest)).collect();
    let manifest = json!([{
        "Config": blob_member(parts.config),
        "RepoTags": [reference.full_name],
        "Layers": layer_members,
    }]);
    let extra = BTreeMap::from([("manifest.json".to_owned(), canonical_json(&manifest))]);
    write_layout_tar(&parts, &reference, file, extra)
}

// ---------------------------------------------------------------------------------------------
// Tags

/// A validated image reference, normalised to `name:tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ImageReference {
    /// `app:latest`, `localhost:5000/app:1`.
    full_name: String,
    /// `latest`, `1`.
    tag: String,
}

impl ImageReference {
    /// Accepts docker references without a digest: `[host[:port]/]path[:tag]`, the path made
    /// of lowercase components (`[a-z0-9]` separated by `.`, `_`, `-`), the tag of
    /// `[A-Za-z0-9_.-]` (at most 128, not starting with `.` or `-`).
    fn parse(reference: &str) -> Result<ImageReference, ExportError> {
        let invalid = |reason: &str| ExportError::InvalidTag { tag: reference.to_owned(), reason: reason.to_owned() };
        if reference.is_empty() {
            return Err(invalid("it is empty"));
        }
        if reference.chars().any(char::is_whitespace) {
            return Err(invalid("it contains whitespace"));
        }
        if reference.contains('@') {
            return Err(invalid("a digest cannot name an export; give a name and tag such as app:latest"));
        }
        let last_slash = reference.rfind('/');
        let (name, tag) = match reference.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                (&reference[..colon], &reference[colon + 1..])
            }
            _ => (reference, "latest"),
        };
        if !is_valid_tag(tag) {
            return Err(invalid("the tag must be 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'"));
        }
        if name.len() > 255 {
            return Err(invalid("the name is longer than 255 characters"));
        }
        let mut components: Vec<&str> = name.split('/').collect();
        let first = components[0];
        let has_host = components.len() > 1 && (first.contains('.') || first.contains(':') || first == "localhost");
        if has_host {
            if !is_valid_host(first) {
                return Err(invalid("the registry host must be host[:port] of [A-Za-z0-9.-]"));
            }
            components.remove(0);
        }
        if !components.iter().all(|component| is_valid_path_component(component)) {
            return Err(invalid(
                "each name component must be lowercase [a-z0-9], separated inside by '.', '_' or '-' (e.g. team/app)",
            ));
        }
        Ok(ImageReference { full_name: format!("{name}:{tag}"), tag: tag.to_owned() })
    }
}

fn is_valid_tag(tag: &str) -> bool {
    let mut characters = tag.chars();
    let Some(first) = characters.next() else {
        return false;
    };
    tag.len() <= 128
        && (first.is_ascii_alphanumeric() || first == '_')
        && characters.all(|character| character.is_ascii_alphanumeric() || matches!(character, '_' | '.' | '-'))
}

fn is_valid_host(host: &str) -> bool {
    let (name, port) = match host.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let name_is_valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|character| character.is_ascii_alphanumeric() || character == '-')
        });
    let port_is_valid =
        port.is_none_or(|port| !port.is_empty() && port.len() <= 5 && port.chars().all(|c| c.is_ascii_digit()));
    name_is_valid && port_is_valid
}

fn is_valid_path_component(component: &str) -> bool {
    let is_alphanumeric = |character: char| character.is_ascii_lowercase() || character.is_ascii_digit();
    let is_separator = |character: char| matches!(character, '.' | '_' | '-');
    !component.is_empty()
        && component.starts_with(is_alphanumeric)
        && component.ends_with(is_alphanumeric)
        && component.chars().all(|character| is_alphanumeric(character) || is_separator(character))
}

// ---------------------------------------------------------------------------------------------
// Documents

/// The blobs of the image (manifest, config, layers; each once) and their sizes, sorted by
/// digest. The config's size is not in the parts, so it is read from the store.
fn blob_sizes(parts: &ImageParts<'_>) -> Result<BTreeMap<Digest, u64>, ExportError> {
    let config_path = parts.store.blob_path(parts.config);
    let config_file = parts.store.open_blob(parts.config)?;
    let config_size = config_file.metadata().map_err(|source| ExportError::Read { path: config_path, source })?.len();
    let mut sizes =
        BTreeMap::from([(parts.manifest.clone(), parts.manifest_size), (parts.config.clone(), config_size)]);
    for layer in parts.layers {
        sizes.insert(layer.digest.clone(), layer.size);
    }
    Ok(sizes)
}

fn blob_member(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// The `index.json` descriptor of the image's manifest under `reference`.
fn manifest_descriptor(parts: &ImageParts<'_>, reference: &ImageReference) -> Value {
    json!({
        "mediaType": OCI_MANIFEST_MEDIA_TYPE,
        "digest": parts.manifest.to_string(),
        "size": parts.manifest_size,
        "annotations": {
            REF_NAME_ANNOTATION: reference.tag,
            CONTAINERD_NAME_ANNOTATION: reference.full_name,
        },
    })
}

/// A fresh index holding `descriptor`, or the `existing` index with `descriptor` in place of
/// the one with the same ref name (the others kept, in order). Errors are reasons.
fn merged_index(existing: Option<&[u8]>, descriptor: Value, ref_name: &str) -> Result<Value, String> {
    let mut index = match existing {
        None => serde_json::Map::new(),
        Some(bytes) => match serde_json::from_slice(bytes) {
            Ok(Value::Object(index)) => index,
            Ok(_) => return Err("it is not a JSON object".into()),
            Err(error) => return Err(format!("it is not valid JSON: {error}")),
        },
    };
    let mut manifests = match index.remove("manifests") {
        None => Vec::new(),
        Some(Value::Array(manifests)) => manifests,
        Some(_) => return Err("its \"manifests\" is not a list".into()),
    };
    let has_ref_name = |manifest: &Value| manifest["annotations"][REF_NAME_ANNOTATION] == ref_name;
    match manifests.iter().position(has_ref_name) {
        Some(position) => {
            manifests[position] = descriptor;
            // An index should not name one ref twice; if it did, the first place is kept.
            let mut seen = false;
            manifests.retain(|manifest| !has_ref_name(manifest) || !std::mem::replace(&mut seen, true));
        }
        None => manifests.push(descriptor),
    }
    index.insert("schemaVersion".into(), json!(2));
    index.insert("mediaType".into(), json!(OCI_INDEX_MEDIA_TYPE));
    index.insert("manifests".into(), Value::Array(manifests));
    Ok(Value::Object(index))
}

/// Compact JSON with object keys sorted, whatever order the map kept them in (serde_json's
/// `preserve_order` feature may be switched on by any crate of a build).
fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical_json(value, &mut out);
    out
}

fn write_canonical_json(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(object) => {
            let mut keys: Vec<&String> = object.keys().collect();
            keys.sort();
            out.push(b'{');
            for (position, key) in keys.into_iter().enumerate() {
                if position > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).expect("strings serialise");
                out.push(b':');
                write_canonical_json(&object[key], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (position, item) in items.iter().enumerate() {
                if position > 0 {
                    out.push(b',');
                }
                write_canonical_json(item, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("JSON scalars serialise"),
    }
}

// ---------------------------------------------------------------------------------------------
// Blobs and files

/// Copies one blob into a layout's `blobs/sha256`, unless a file of the right size is there.
/// A file of another size is a leftover of something else and is replaced.
fn copy_blob_into_layout(store: &Store, digest: &Digest, size: u64, blobs_dir: &Path) -> Result<(), ExportError> {
    let destination = blobs_dir.join(digest.hex());
    if let Ok(metadata) = fs::metadata(&destination)
        && metadata.is_file()
        && metadata.len() == size
    {
        return Ok(());
    }
    write_atomically(&destination, |output| copy_blob(store, digest, size, output, &destination))
}

/// Appends the store blob `digest` of `size` bytes to `output` (`destination` names it in
/// errors). A blob this process hashed itself while committing it, and which has not changed
/// since ([`Store::unchanged_since_hashed`]), is copied inside the kernel (`copy_file_range`);
/// any other is read, hashed and checked on the way ([`VerifiedBlob`]).
fn copy_blob(
    store: &Store,
    digest: &Digest,
    size: u64,
    output: &mut OutputFile<'_>,
    destination: &Path,
) -> Result<(), ExportError> {
    let file = store.open_blob(digest)?;
    if store.unchanged_since_hashed(digest, &file) {
        let copied = output.copy_file(&file).map_err(write_error(destination))?;
        if copied == size {
            return Ok(());
        }
        // It changed while it was copied: reported (and a corrupt blob removed) as the
        // verified copy would, and the output is not finished either way.
        let mut blob = VerifiedBlob::open(store, digest, size)?;
        let read = io::copy(&mut blob, &mut io::sink());
        blob.check(read.map(drop), destination)?;
        let source = io::Error::other(format!("it changed while it was copied ({copied} of {size} bytes)"));
        return Err(ExportError::Read { path: store.blob_path(digest), source });
    }
    let mut blob = VerifiedBlob::open(store, digest, size)?;
    let copied = io::copy(&mut blob, output);
    blob.check(copied.map(drop), destination)
}

/// A store blob being read, hashed and counted as it passes, so that a blob that no longer
/// matches its digest (or its recorded size) is caught while it is exported.
struct VerifiedBlob {
    path: PathBuf,
    digest: Digest,
    size: u64,
    reader: io::Take<File>,
    hasher: Sha256Writer<io::Sink>,
    read_failure: Option<io::Error>,
}

impl VerifiedBlob {
    fn open(store: &Store, digest: &Digest, size: u64) -> Result<VerifiedBlob, ExportError> {
        let file = store.open_blob(digest)?;
        Ok(VerifiedBlob {
            path: store.blob_path(digest),
            digest: digest.clone(),
            size,
            // One byte more than recorded, so that a longer blob is noticed.
            reader: file.take(size + 1),
            hasher: Sha256Writer::new(io::sink()),
            read_failure: None,
        })
    }

    /// Turns the outcome of the copy that read this blob into the export's error: a failed
    /// read is the blob's fault, a failed write the destination's; a clean copy must have
    /// produced the recorded size and digest.
    fn check(&mut self, copied: io::Result<()>, destination: &Path) -> Result<(), ExportError> {
        if let Some(source) = self.read_failure.take() {
            return Err(ExportError::Read { path: self.path.clone(), source });
        }
        copied.map_err(write_error(destination))?;
        let hasher = std::mem::replace(&mut self.hasher, Sha256Writer::new(io::sink()));
        let (actual, actual_size, _) = hasher.finish();
        if actual != self.digest || actual_size != self.size {
            // Never serve it again: without the blob, the action records naming it read as
            // misses, and the next build rebuilds the layer.
            if let Err(error) = fs::remove_file(&self.path) {
                eprintln!("layerwright: warning: cannot remove corrupt blob {}: {error}", self.path.display());
            }
            return Err(ExportError::CorruptBlob {
                path: self.path.clone(),
                digest: self.digest.clone(),
                expected_size: self.size,
                actual,
                actual_size,
            });
        }
        Ok(())
    }
}

impl Read for VerifiedBlob {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let read = self.reader.read(buffer).inspect_err(|error| {
            if self.read_failure.is_none() {
                self.read_failure = Some(io::Error::new(error.kind(), error.to_string()));
            }
        })?;
        self.hasher.write_all(&buffer[..read]).expect("hashing into a sink does not fail");
        Ok(read)
    }
}

fn write_error(path: &Path) -> impl Fn(io::Error) -> ExportError + '_ {
    move |source| ExportError::Write { path: path.to_owned(), source }
}

/// Writes `destination` through a temp file in its directory, fsynced and renamed into place,
/// so that a reader (or a crash) sees the old file or the whole new one. The directory is
/// created if missing. Files are created 0644 (less the umask), like any file a tool writes.
fn write_atomically(
    destination: &Path,
    fill: impl FnOnce(&mut OutputFile<'_>) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    let directory = match destination.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs::create_dir_all(directory).map_err(write_error(directory))?;
    let temp = tempfile::Builder::new()
        .prefix(".layerwright-")
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(0o644))
        .tempfile_in(directory)
        .map_err(write_error(destination))?;
    {
        let mut output = OutputFile { buffered: BufWriter::with_capacity(256 * 1024, temp.as_file()) };
        fill(&mut output)?;
        output.flush().map_err(write_error(destination))?;
    }
    temp.as_file().sync_all().map_err(write_error(destination))?;
    temp.persist(destination)
        .map_err(|error| ExportError::Write { path: destination.to_owned(), source: error.error })?;
    Ok(())
}

/// An output file being written: buffered for small writes, and able to take a whole file's
/// content without it passing through this process.
struct OutputFile<'a> {
    buffered: BufWriter<&'a File>,
}

impl OutputFile<'_> {
    /// Appends the content of `source` (from its start) and returns how many bytes that was.
    /// Copied with `copy_file_range`, inside the kernel (or by sharing extents, on filesystems
    /// that can), a chunk at a time, starting each chunk's writeback as soon as it is copied so
    /// that the final fsync does not wait for all of it; `io::copy` (which falls back to plain
    /// reads and writes) where `copy_file_range` is refused.
    fn copy_file(&mut self, source: &File) -> io::Result<u64> {
        self.buffered.flush()?;
        let mut output: &File = self.buffered.get_ref();
        let start = output.stream_position()?;
        let mut copied = 0u64;
        loop {
            let chunk = usize::try_from(layerwright_cache::WRITEBACK_CHUNK).unwrap_or(usize::MAX);
            match rustix::fs::copy_file_range(source, None, output, None, chunk) {
                Ok(0) => return Ok(copied),
                Ok(count) => {
                    layerwright_cache::start_writeback(output, start + copied, count as u64);
                    copied += count as u64;
                }
                Err(rustix::io::Errno::INTR) => {}
                // Nothing copied yet and the kernel cannot do it here: copy through this process.
                Err(_) if copied == 0 => {
                    let mut source = source;
                    return io::copy(&mut source, &mut output);
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
}

impl Write for OutputFile<'_> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        self.buffered.write(buffer)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.buffered.flush()
    }
}

// ---------------------------------------------------------------------------------------------
// Tar archives

/// The unit of a tar archive: headers take one block, content is padded to whole blocks.
const TAR_BLOCK: u64 = 512;

/// What one member of an archive is made of.
enum TarMember {
    Directory,
    Document(Vec<u8>),
    Blob { digest: Digest, size: u64 },
}

/// Writes the OCI layout of the image (plus `extra` documents at the top) as a tar, members
/// sorted by name, streamed from the store into a temp file renamed to `file`.
fn write_layout_tar(
    parts: &ImageParts<'_>,
    reference: &ImageReference,
    file: &Path,
    extra: BTreeMap<String, Vec<u8>>,
) -> Result<(), ExportError> {
    let index =
        merged_index(None, manifest_descriptor(parts, reference), &reference.tag).expect("a fresh index merges");
    let mut members: BTreeMap<String, TarMember> = BTreeMap::from([
        ("blobs/".to_owned(), TarMember::Directory),
        ("blobs/sha256/".to_owned(), TarMember::Directory),
        ("index.json".to_owned(), TarMember::Document(canonical_json(&index))),
        ("oci-layout".to_owned(), TarMember::Document(OCI_LAYOUT_CONTENT.to_vec())),
    ]);
    for (digest, size) in blob_sizes(parts)? {
        members.insert(blob_member(&digest), TarMember::Blob { digest, size });
    }
    for (name, bytes) in extra {
        members.insert(name, TarMember::Document(bytes));
    }

    if archive_already_holds(file, &members) {
        return Ok(());
    }
    // Written by hand rather than through `tar::Builder`, so that blob content can go from
    // the store into the archive file without passing through this process (`copy_blob`).
    write_atomically(file, |output| {
        for (name, member) in &members {
            let (header, size) = match member {
                TarMember::Directory => (tar_header(name, tar::EntryType::Directory, 0o755, 0), 0),
                TarMember::Document(bytes) => {
                    (tar_header(name, tar::EntryType::Regular, 0o644, bytes.len() as u64), bytes.len() as u64)
                }
                TarMember::Blob { size, .. } => (tar_header(name, tar::EntryType::Regular, 0o644, *size), *size),
            };
            output.write_all(header.as_bytes()).map_err(write_error(file))?;
            match member {
                TarMember::Directory => {}
                TarMember::Document(bytes) => output.write_all(bytes).map_err(write_error(file))?,
                TarMember::Blob { digest, size } => copy_blob(parts.store, digest, *size, output, file)?,
            }
            let padding = (TAR_BLOCK - size % TAR_BLOCK) % TAR_BLOCK;
            output.write_all(&[0; TAR_BLOCK as usize][..padding as usize]).map_err(write_error(file))?;
        }
        // Two zero blocks end a tar archive.
        output.write_all(&[0; 2 * TAR_BLOCK as usize]).map_err(write_error(file))
    })
}

/// Whether `file` is already the archive `members` describe: the same member names and sizes
/// in the same order, and the same documents (index, manifest) byte for byte. Blobs are named
/// by their digest, so equal names and sizes mean the archive holds this image, and a no-op
/// rebuild need not rewrite (or re-read) gigabytes. Reads headers only, seeking past content.
fn archive_already_holds(file: &Path, members: &BTreeMap<String, TarMember>) -> bool {
    let Ok(opened) = fs::File::open(file) else { return false };
    let mut archive = tar::Archive::new(opened);
    let Ok(entries) = archive.entries_with_seek() else { return false };
    let mut expected = members.iter();
    for entry in entries {
        let Ok(mut entry) = entry else { return false };
        let Some((name, member)) = expected.next() else { return false };
        let same_name = entry.path_bytes().as_ref() == name.trim_end_matches('/').as_bytes()
            || entry.path_bytes().as_ref() == name.as_bytes();
        if !same_name {
            return false;
        }
        let matches = match member {
            TarMember::Directory => entry.header().entry_type().is_dir(),
            TarMember::Blob { size, .. } => entry.size() == *size,
            TarMember::Document(bytes) => {
                let mut content = Vec::new();
                entry.size() == bytes.len() as u64 && entry.read_to_end(&mut content).is_ok() && content == *bytes
            }
        };
        if !matches {
            return false;
        }
    }
    expected.next().is_none()
}

/// A ustar header with every field set explicitly. The name is written into the header's
/// name field as given (the tar crate's `set_path` drops a directory's trailing `/`); all
/// names here are short ASCII.
fn tar_header(name: &str, entry_type: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    let name_field = &mut header.as_old_mut().name;
    assert!(name.len() < name_field.len(), "archive member names are short: {name}");
    name_field[..name.len()].copy_from_slice(name.as_bytes());
    header.set_entry_type(entry_type);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(size);
    header.set_cksum();
    header
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

    /// A tiny image put into a store by hand: one uncompressed layer, its config and manifest.
    struct TinyImage {
        _dir: tempfile::TempDir,
        store: Store,
        manifest: Digest,
        manifest_size: u64,
        config: Digest,
        layers: Vec<LayerRecord>,
    }

    impl TinyImage {
        fn new() -> TinyImage {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let mut builder = tar::Builder::new(Vec::new());
            let mut header = tar::Header::new_gnu();
            header.set_size(6);
            header.set_mode(0o644);
            builder.append_data(&mut header, "hello.txt", &b"hello\n"[..]).unwrap();
            let layer = store.put_blob(&builder.into_inner().unwrap()).unwrap();
            let config_bytes = serde_json::to_vec(&json!({
                "architecture": "amd64", "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [layer.digest.to_string()]},
            }))
            .unwrap();
            let config = store.put_blob(&config_bytes).unwrap();
            let manifest_bytes = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST_MEDIA_TYPE,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.digest.to_string(), "size": config.size},
                "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer.digest.to_string(), "size": layer.size}],
            }))
            .unwrap();
            let manifest = store.put_blob(&manifest_bytes).unwrap();
            let layers = vec![LayerRecord {
                diff_id: layer.digest.clone(),
                digest: layer.digest,
                size: layer.size,
                media_type: LAYER_MEDIA_TYPE.into(),
            }];
            TinyImage {
                _dir: dir,
                store,
                manifest: manifest.digest,
                manifest_size: manifest.size,
                config: config.digest,
                layers,
            }
        }

        fn parts(&self) -> ImageParts<'_> {
            ImageParts {
                store: &self.store,
                manifest: &self.manifest,
                manifest_size: self.manifest_size,
                config: &self.config,
                layers: &self.layers,
            }
        }

        fn blob_digests(&self) -> Vec<&Digest> {
            let mut digests = vec![&self.manifest, &self.config, &self.layers[0].digest];
            digests.sort();
            digests
        }
    }

    fn read_json(path: &Path) -> Value {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    /// One member of a tar as read back.
    struct ArchivedMember {
        name: String,
        entry_type: tar::EntryType,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
        content: Vec<u8>,
    }

    fn tar_members(path: &Path) -> Vec<ArchivedMember> {
        let mut archive = tar::Archive::new(File::open(path).unwrap());
        archive
            .entries()
            .unwrap()
            .map(|entry| {
                let mut entry = entry.unwrap();
                let header = entry.header().clone();
                let mut content = Vec::new();
                entry.read_to_end(&mut content).unwrap();
                ArchivedMember {
                    name: String::from_utf8(header.path_bytes().into_owned()).unwrap(),
                    entry_type: header.entry_type(),
                    mode: header.mode().unwrap(),
                    uid: header.uid().unwrap(),
                    gid: header.gid().unwrap(),
                    mtime: header.mtime().unwrap(),
                    content,
                }
            })
            .collect()
    }

    fn expected_index(image: &TinyImage, tag: &str, full_name: &str) -> Value {
        json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX_MEDIA_TYPE,
            "manifests": [{
                "mediaType": OCI_MANIFEST_MEDIA_TYPE,
                "digest": image.manifest.to_string(),
                "size": image.manifest_size,
                "annotations": {REF_NAME_ANNOTATION: tag, CONTAINERD_NAME_ANNOTATION: full_name},
            }],
        })
    }

    #[test]
    fn oci_layout_holds_the_blobs_and_an_index_naming_the_tag() {
        let image = TinyImage::new();
        let out = tempfile::tempdir().unwrap();
        let layout = out.path().join("layout");
        write_oci_layout(image.parts(), &layout, "app").unwrap();

        assert_eq!(fs::read(layout.join("oci-layout")).unwrap(), br#"{"imageLayoutVersion":"1.0.0"}"#);
        for digest in image.blob_digests() {
            let exported = fs::read(layout.join("blobs/sha256").join(digest.hex())).unwrap();
            assert_eq!(exported, fs::read(image.store.blob_path(digest)).unwrap());
            let mode = fs::metadata(layout.join("blobs/sha256").join(digest.hex())).unwrap().mode();
            assert_eq!(mode & 0o044, 0o044, "blobs are readable by others");
        }
        assert_eq!(fs::read_dir(layout.join("blobs/sha256")).unwrap().count(), 3, "no temp files are left");
        assert_eq!(read_json(&layout.join("index.json")), expected_index(&image, "latest", "app:latest"));
        let index_text = fs::read_to_string(layout.join("index.json")).unwrap();
        assert!(
            index_text.starts_with(r#"{"manifests":[{"annotations":{"io.containerd.image.name":"app:latest","#),
            "{index_text}"
        );
        assert!(!index_text.contains(char::is_whitespace), "{index_text}");
    }

    #[test]
    fn oci_layout_keeps_other_tags_and_replaces_the_same_tag() {
        let image = TinyImage::new();
        let out = tempfile::tempdir().unwrap();
        write_oci_layout(image.parts(), out.path(), "app:1").unwrap();
        write_oci_layout(image.parts(), out.path(), "localhost:5000/team/app").unwrap();
        write_oci_layout(image.parts(), out.path(), "other:1").unwrap();
        let index = read_json(&out.path().join("index.json"));
        let names: Vec<(&str, &str)> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|manifest| {
                let annotations = &manifest["annotations"];
                (
                    annotations[REF_NAME_ANNOTATION].as_str().unwrap(),
                    annotations[CONTAINERD_NAME_ANNOTATION].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(names, [("1", "other:1"), ("latest", "localhost:5000/team/app:latest")]);
    }

    #[test]
    fn oci_layout_export_leaves_present_blobs_untouched() {
        let image = TinyImage::new();
        let out = tempfile::tempdir().unwrap();
        write_oci_layout(image.parts(), out.path(), "app:latest").unwrap();
        let stat = |digest: &Digest| {
            let metadata = fs::metadata(out.path().join("blobs/sha256").join(digest.hex())).unwrap();
            (metadata.ino(), metadata.mtime(), metadata.mtime_nsec(), metadata.ctime_nsec())
        };
        let before: Vec<_> = image.blob_digests().into_iter().map(stat).collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_oci_layout(image.parts(), out.path(), "app:latest").unwrap();
        let after: Vec<_> = image.blob_digests().into_iter().map(stat).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn oci_layout_replaces_a_blob_of_the_wrong_size() {
        let image = TinyImage::new();
        let out = tempfile::tempdir().unwrap();
        let layer_path = out.path().join("blobs/sha256").join(image.layers[0].digest.hex());
        fs::create_dir_all(layer_path.parent().unwrap()).unwrap();
        fs::write(&layer_path, b"truncated").unwrap();
        write_oci_layout(image.parts(), out.path(), "app").unwrap();
        assert_eq!(fs::read(&layer_path).unwrap(), fs::read(image.store.blob_path(&image.layers[0].digest)).unwrap());
    }

    #[test]
    fn oci_archive_is_the_layout_as_a_deterministic_tar() {
        let image = TinyImage::new();
        let out = tempfile::tempdir().unwrap();
        let first = out.path().join("first.tar");
        let second = out.path().join("sub/second.tar");
        write_oci_archive(image.parts(), &first, "app:latest").unwrap();
        write_oci_archive(image.parts(), &second, "app:latest").unwrap();
        assert_eq!(fs::read(&first).unwrap(), fs::read(&second).unwrap(), "exports are byte-identical");

        let members = tar_members(&first);
        let names: Vec<&str> = members.iter().map(|member| member.name.as_str()).collect();
        let mut expected_names = vec!["blobs/".to_owned(), "blobs/sha256/".to_owned()];
        expected_names.extend(image.blob_digests().into_iter().map(blob_member));
        expected_names.extend(["index.json".to_owned(), "oci-layout".to_owned()]);
        assert_eq!(names, expected_names);
        for member in &members {
            let expected_mode = if member.entry_type.is_dir() { 0o755 } else { 0o644 };
            let header = (member.mode, member.uid, member.gid, member.mtime);
            assert_eq!(header, (expected_mode, 0, 0, 0), "{}", member.name);
            if let Some(hex) = member.name.strip_prefix("blobs/sha256/").filter(|hex| !hex.is_empty()) {
                assert_eq!(Digest::of_bytes(&member.content).hex(), hex);
            }
        }
        let index_member = members.iter().find(|member| member.name == "index.json").unwrap();
        let index: Value = serde_json::from_slice(&index_member.content).unwrap();
        assert_eq!(index, expected_index(&image, "latest", "app:latest"));
        assert_eq!(fs::read_dir(out.path()).unwrap().count(), 2, "no temp files are left");
    }

    #[test]
    fn docker_archive_has_a_manifest_json_and_is_an_oci_archive_too() {
        let image = TinyImage::new();
        let out = tempfile::tempdir().unwrap();
        let first = out.path().join("first.tar");
        let second = out.path().join("second.tar");
        write_docker_archive(image.parts(), &first, "localhost:5000/app").unwrap();
        write_docker_archive(image.parts(), &second, "localhost:5000/app").unwrap();
        assert_eq!(fs::read(&first).unwrap(), fs::read(&second).unwrap(), "exports are byte-identical");

        let members = tar_members(&first);
        let content_of = |name: &str| members.iter().find(|member| member.name == name).unwrap().content.clone();
        let manifest = String::from_utf8(content_of("manifest.json")).unwrap();
        let expected = format!(
            r#"[{{"Config":"blobs/sha256/{}","Layers":["blobs/sha256/{}"],"RepoTags":["localhost:5000/app:latest"]}}]"#,
            image.config.hex(),
            image.layers[0].digest.hex()
        );
        assert_eq!(manifest, expected);
        assert_eq!(content_of("oci-layout"), OCI_LAYOUT_CONTENT);
        let index: Value = serde_json::from_slice(&content_of("index.json")).unwrap();
        assert_eq!(index, expected_index(&image, "latest", "localhost:5000/app:latest"));
        assert!(!members.iter().any(|member| member.name == "repositories"));
    }

    #[test]
    fn a_corrupt_store_blob_fails_the_export_and_leaves_no_output() {
        let image = TinyImage::new();
        let out = tempfile::tempdir().unwrap();
        let layer_path = image.store.blob_path(&image.layers[0].digest);
        let mut flipped = fs::read(&layer_path).unwrap();
        flipped[0] ^= 1;
        fs::write(&layer_path, flipped).unwrap();

        let archive = out.path().join("app.tar");
        let error = write_docker_archive(image.parts(), &archive, "app").unwrap_err();
        assert!(matches!(error, ExportError::CorruptBlob { .. }), "{error}");
        assert!(!archive.exists());
        assert_eq!(fs::read_dir(out.path()).unwrap().count(), 0, "the temp file is removed");

        assert!(!layer_path.exists(), "the corrupt blob is removed from the store, never served again");
        let error = write_oci_layout(image.parts(), &out.path().join("layout"), "app").unwrap_err();
        assert!(matches!(error, ExportError::Store(_)), "{error}");
        assert!(!out.path().join("layout/index.json").exists());
    }

    #[test]
    fn a_blob_hashed_here_is_copied_unread_until_it_changes() {
        let image = TinyImage::new();
        let layer_path = image.store.blob_path(&image.layers[0].digest);
        let opened =
            |store: &Store| store.unchanged_since_hashed(&image.layers[0].digest, &File::open(&layer_path).unwrap());
        assert!(opened(&image.store), "hashed by this store while it was committed");
        assert!(!opened(&Store::open(image.store.root()).unwrap()), "another store has not hashed it");

        let out = tempfile::tempdir().unwrap();
        let archive = out.path().join("app.tar");
        write_docker_archive(image.parts(), &archive, "app").unwrap();
        let reopened = Store::open(image.store.root()).unwrap();
        let verified = out.path().join("verified.tar");
        write_docker_archive(ImageParts { store: &reopened, ..image.parts() }, &verified, "app").unwrap();
        assert_eq!(fs::read(&archive).unwrap(), fs::read(&verified).unwrap(), "both paths write the same bytes");

        // Written to since (same size): no longer trusted, so the corruption is caught.
        let mut flipped = fs::read(&layer_path).unwrap();
        flipped[0] ^= 1;
        fs::write(&layer_path, flipped).unwrap();
        assert!(!opened(&image.store));
        let error = write_docker_archive(image.parts(), &out.path().join("flipped.tar"), "app").unwrap_err();
        assert!(matches!(error, ExportError::CorruptBlob { .. }), "{error}");
        assert!(!out.path().join("flipped.tar").exists());
    }

    #[test]
    fn an_existing_index_that_is_not_json_is_reported() {
        let image = TinyImage::new();
        let out = tempfile::tempdir().unwrap();
        fs::write(out.path().join("index.json"), b"not json").unwrap();
        let error = write_oci_layout(image.parts(), out.path(), "app").unwrap_err();
        assert!(matches!(error, ExportError::ExistingIndex { .. }), "{error}");
    }

    #[test]
    fn tags_are_validated_and_normalised() {
        let normalised = |tag: &str| {
            let reference = ImageReference::parse(tag).unwrap();
            (reference.full_name, reference.tag)
        };
        assert_eq!(normalised("app"), ("app:latest".into(), "latest".into()));
        assert_eq!(normalised("app:1.2_rc-1"), ("app:1.2_rc-1".into(), "1.2_rc-1".into()));
        assert_eq!(normalised("localhost:5000/app"), ("localhost:5000/app:latest".into(), "latest".into()));
        assert_eq!(
            normalised("Registry.example.com/team/app:v1"),
            ("Registry.example.com/team/app:v1".into(), "v1".into())
        );
        assert_eq!(normalised("team/my_app.x-y:V2"), ("team/my_app.x-y:V2".into(), "V2".into()));

        for bad in [
            "",
            "app latest",
            "App",
            "app:",
            "app:.x",
            "/app",
            "app/",
            "team//app",
            "app@sha256:00",
            "app:a/b",
            "-app",
            "host:port/app",
        ] {
            let error = ImageReference::parse(bad).unwrap_err();
            assert!(matches!(error, ExportError::InvalidTag { .. }), "{bad:?}: {error}");
        }
        let image = TinyImage::new();
        let out = tempfile::tempdir().unwrap();
        let error = write_oci_archive(image.parts(), &out.path().join("x.tar"), "bad tag").unwrap_err();
        assert!(error.to_string().contains("whitespace"), "{error}");
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let mut inner = serde_json::Map::new();
        inner.insert("z".into(), json!(1));
        inner.insert("a".into(), json!([{"y": true, "b": null}]));
        let value = json!({"m": Value::Object(inner), "c": "\"quoted\""});
        assert_eq!(
            String::from_utf8(canonical_json(&value)).unwrap(),
            r#"{"c":"\"quoted\"","m":{"a":[{"b":null,"y":true}],"z":1}}"#
        );
    }
}
