//! Layers in the compression a build asks for, without re-running the steps that made them.
//!
//! An action record keeps the layer a step wrote, in the compression of the build that wrote it.
//! The step's key does not include the compression (the layer's content, its diff id, does not
//! depend on it), so a build with another [`Compression`] hits the same record. Here such a hit
//! gets its layer in the requested compression: the stored blob is decompressed and compressed
//! again, streamed (blob → decoder → diff-id hasher → compressor → new blob), and the result is
//! remembered in `recompressed/<diff id hex>.<compression>.v<format version>.json` (a [`LayerRecord`]), so the next
//! build with that compression costs one small file read, and a no-op rebuild writes nothing.
//!
//! The compressor is the layer writer's own (`layer::Compressor`), fed the same chunks and told
//! where the same entries start (found in a first pass over the stream), so the compressed
//! stream depends only on the uncompressed one: a recompressed layer is byte-identical to the
//! one a fresh build in that compression writes, so the manifest digest of an image does not
//! depend on the cache's history.
//!
//! What it deliberately does not do: recompress base image layers (imported or pulled layers are
//! kept as their image had them, as Docker does), or remove the record's original blob.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::PathBuf;

use layerwright_cache::{Digest, LayerRecord, Sha256Writer, Store};

use layerwright_cache::StoreError;
use thiserror::Error;

use super::compress::{Compressor, copy_tar_stream, entry_starts};
use super::format::Compression;
use super::index::TreeError;

/// Why a cached layer could not be had in another compression.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RecompressError {
    /// Reading the stored blob or writing the new one failed.
    #[error("recompressing layer {layer}: {source}")]
    Io {
        /// The digest of the layer being recompressed.
        layer: Digest,
        /// What failed.
        source: io::Error,
    },
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored blob is not the layer its record names (it has been removed).
    #[error(transparent)]
    Tree(#[from] TreeError),
}

/// `layer` in `compression`, and the blob bytes written to get it (0 when nothing was).
pub(crate) fn in_compression(
    store: &Store,
    layer: LayerRecord,
    compression: Compression,
) -> Result<(LayerRecord, u64), RecompressError> {
    if Compression::from_media_type(&layer.media_type) == Some(compression) {
        return Ok((layer, 0));
    }
    let mapping = mapping_path(store, &layer.diff_id, compression);
    if let Some(known) = read_mapping(&mapping)
        && known.diff_id == layer.diff_id
        && known.media_type == compression.media_type()
        // Protected from a concurrent prune before it is looked for (no record names it).
        && store.protect_blob(&known.digest).is_ok()
        && store.has_blob(&known.digest)
    {
        return Ok((known, 0));
    }
    let (record, written) = recompress(store, &layer, compression)?;
    if let Some(parent) = mapping.parent() {
        fs::create_dir_all(parent).map_err(|source| StoreError::Io {
            action: "create directory",
            path: parent.to_owned(),
            source,
        })?;
    }
    let bytes = serde_json::to_vec(&record).expect("layer records serialise");
    store.write_file_atomically(&mapping, &bytes)?;
    Ok((record, written))
}

fn mapping_path(store: &Store, diff_id: &Digest, compression: Compression) -> PathBuf {
    let name = match compression {
        Compression::Gzip => "gzip",
        Compression::Zstd => "zstd",
        Compression::None => "none",
    };
    // The format version is in the name for the same reason it is in every step key: a layer
    // recompressed by an older layerwright may not be what this one writes.
    let version = layerwright_cache::KEY_FORMAT_VERSION;
    store.root().join("recompressed").join(format!("{}.{name}.v{version}.json", diff_id.hex()))
}

/// The remembered record, if there is a readable one (a torn or edited file is a miss).
fn read_mapping(path: &std::path::Path) -> Option<LayerRecord> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// The uncompressed tar stream of the stored blob of `layer`. As when indexing, the magic number
/// decides the compression, the media type only when there is none.
fn decoded_blob(store: &Store, layer: &LayerRecord) -> Result<Box<dyn Read>, RecompressError> {
    let io_error = |source: io::Error| RecompressError::Io { layer: layer.digest.clone(), source };
    let mut source = BufReader::with_capacity(256 * 1024, store.open_blob(&layer.digest)?);
    let magic = source.fill_buf().map_err(io_error)?;
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(source))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(source).map_err(io_error)?)
    } else {
        Box::new(source)
    })
}

fn recompress(
    store: &Store,
    layer: &LayerRecord,
    compression: Compression,
) -> Result<(LayerRecord, u64), RecompressError> {
    let io_error = |source: io::Error| RecompressError::Io { layer: layer.digest.clone(), source };
    // Gzip blocks end where chosen entries start (see `layer::Compressor`): find them first, in
    // a pass of their own, so that the blocks come out as a fresh build's.
    let starts = match compression {
        // A stream that does not parse is a corrupt blob: the pass below finds it out by its diff
        // id (and removes it), as for any other corruption.
        Compression::Gzip => entry_starts(decoded_blob(store, layer)?).unwrap_or_default(),
        Compression::Zstd | Compression::None => Vec::new(),
    };
    let compressor = Compressor::new(compression, store.blob_writer()?).map_err(io_error)?;
    let mut diff_id_writer = Sha256Writer::new(compressor);
    copy_tar_stream(decoded_blob(store, layer)?, &mut diff_id_writer, &starts).map_err(io_error)?;
    let (diff_id, _, compressor) = diff_id_writer.finish();
    if diff_id != layer.diff_id {
        // Never served again: without the blob, the record naming it reads as a miss and the
        // step is rebuilt.
        let path = store.blob_path(&layer.digest);
        if let Err(error) = fs::remove_file(&path) {
            log::warn!("cannot remove corrupt blob {}: {error}", path.display());
        }
        return Err(RecompressError::Tree(TreeError::DiffIdMismatch {
            layer: layer.digest.clone(),
            expected: layer.diff_id.clone(),
            actual: diff_id,
        }));
    }
    let blob_writer = compressor.finish().map_err(io_error)?;
    let written = blob_writer.written();
    let blob = blob_writer.commit()?;
    let record =
        LayerRecord { diff_id, digest: blob.digest, size: blob.size, media_type: compression.media_type().to_owned() };
    Ok((record, written))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::layer::{Content, EntryKind, LayerEntry, LayerOptions, write_layer};

    #[test]
    fn a_layer_recompressed_to_gzip_is_the_one_a_fresh_gzip_build_writes() {
        // Many blocks, directories, and paths long enough for PAX headers.
        let entries = || -> Vec<LayerEntry> {
            let mut entries = Vec::new();
            for index in 0..400u64 {
                let bytes: Arc<[u8]> = Arc::from(crate::host::incompressible_bytes(4096, index));
                let directory = format!("data/{}{}", "long-directory-name-".repeat(4), index / 50);
                let kind = EntryKind::File { size: bytes.len() as u64, content: Content::Inline(bytes) };
                let path = format!("{directory}/{}-{index:04}", "file".repeat(30));
                entries.push(LayerEntry { path, kind, mode: 0o644, uid: 0, gid: 0, xattrs: Vec::new() });
            }
            entries
        };
        for from in [Compression::Zstd, Compression::None] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path().join("cache")).unwrap();
            let original = write_layer(&store, entries(), &LayerOptions { compression: from, mtime: 0 }).unwrap();
            let (recompressed, written) = in_compression(&store, original.record, Compression::Gzip).unwrap();
            assert!(written > 0);

            let fresh_dir = tempfile::tempdir().unwrap();
            let fresh_store = Store::open(fresh_dir.path()).unwrap();
            let gzip = LayerOptions { compression: Compression::Gzip, mtime: 0 };
            let fresh = write_layer(&fresh_store, entries(), &gzip).unwrap();
            assert_eq!(recompressed, fresh.record, "from {from:?}");
        }
    }
}
