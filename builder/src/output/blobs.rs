//! Blobs and files of an export: copying store blobs (verified while copied, or inside the kernel
//! for blobs this process hashed itself) and writing files atomically.
//!
//! What it deliberately is not: a format; it knows files, not layouts or archives.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use layerwright_cache::{Digest, Sha256Writer, Store};

use super::ExportError;

/// Copies one blob into a layout's `blobs/sha256`, unless a file of the right size is there.
/// A file of another size is a leftover of something else and is replaced.
pub(super) fn copy_blob_into_layout(
    store: &Store,
    digest: &Digest,
    size: u64,
    blobs_dir: &Path,
) -> Result<(), ExportError> {
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
pub(super) fn copy_blob(
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

/// Copies one blob into any stream (a socket, say), verifying its digest and size on the way.
pub(super) fn copy_verified_blob(
    store: &Store,
    digest: &Digest,
    size: u64,
    output: &mut dyn Write,
    destination: &Path,
) -> Result<(), ExportError> {
    let mut blob = VerifiedBlob::open(store, digest, size)?;
    let copied = io::copy(&mut blob, output);
    blob.check(copied.map(drop), destination)
}

/// A store blob being read, hashed and counted as it passes, so that a blob that no longer
/// matches its digest (or its recorded size) is caught while it is exported.
pub(super) struct VerifiedBlob {
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
                log::warn!("cannot remove corrupt blob {}: {error}", self.path.display());
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

pub(super) fn write_error(path: &Path) -> impl Fn(io::Error) -> ExportError + '_ {
    move |source| ExportError::Write { path: path.to_owned(), source }
}

/// Writes `destination` through a temp file in its directory, fsynced and renamed into place,
/// so that a reader (or a crash) sees the old file or the whole new one. The directory is
/// created if missing. Files are created 0644 (less the umask), like any file a tool writes.
pub(super) fn write_atomically(
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
pub(super) struct OutputFile<'a> {
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
