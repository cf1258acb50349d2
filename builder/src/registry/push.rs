//! Pushing a built image: the blobs the registry lacks, streamed in chunks, then the manifest.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt, stream};
use layerwright_cache::{Digest, Sha256Writer, Store, StoreError};
use oci_client::RegistryOperation;
use oci_client::errors::OciDistributionError;

use super::client::{self, RegistryClient};
use super::reference::RegistryReference;
use super::{RegistryError, media_types};
use crate::output::{ImageParts, IndexParts};

/// The size of one `PATCH` of a chunked upload, and so (about) the memory one upload holds.
const UPLOAD_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// How many blobs are uploaded at once.
const PARALLEL_UPLOADS: usize = 3;

/// How to push.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct PushOptions {
    /// Plain HTTP to a registry that is not on this machine (loopback registries always get
    /// plain HTTP, as with Docker).
    pub insecure: bool,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PushReport {
    /// The full reference pushed (`127.0.0.1:5000/app:latest`).
    pub reference: String,
    /// The digest of the pushed manifest (`sha256:…`).
    pub manifest_digest: String,
    /// Blobs (layers and the config) uploaded, and those the registry already had.
    pub blobs_uploaded: usize,
    /// Blobs (layers and the config) the registry already had, so not uploaded.
    pub blobs_skipped: usize,
    /// The bytes of the blobs uploaded.
    pub bytes_uploaded: u64,
    /// False when the tag already named this manifest, so nothing was written.
    pub manifest_uploaded: bool,
}

/// Pushes the image in `parts` to `reference` (a tag: `registry/repository[:tag]`).
pub(crate) fn push(parts: ImageParts<'_>, reference: &str, options: &PushOptions) -> Result<PushReport, RegistryError> {
    let reference = RegistryReference::parse(reference)?;
    if reference.digest().is_some() {
        return Err(RegistryError::InvalidReference {
            reference: reference.whole(),
            reason: "a push needs a tag (registry/repository:tag), not a digest".into(),
        });
    }
    let manifest_path = parts.store.blob_path(parts.manifest);
    let manifest = std::fs::read(&manifest_path).map_err(|source| RegistryError::ReadBlob {
        registry: reference.registry().to_owned(),
        repository: reference.repository().to_owned(),
        path: manifest_path,
        source: Box::new(source),
    })?;
    // Config first, then layers bottom up; each blob once (two steps may add identical layers).
    let mut seen = BTreeSet::new();
    let mut blobs: Vec<(Digest, u64)> = Vec::new();
    let config_size = std::fs::metadata(parts.store.blob_path(parts.config)).map(|metadata| metadata.len()).ok();
    blobs.push((parts.config.clone(), config_size.unwrap_or(0)));
    seen.insert(parts.config.clone());
    for layer in parts.layers {
        if seen.insert(layer.digest.clone()) {
            blobs.push((layer.digest.clone(), layer.size));
        }
    }
    let store = parts.store;
    let manifest_digest = parts.manifest;
    client::on_own_thread(move || {
        let client = RegistryClient::new(&reference, options.insecure)?;
        client::block_on(push_async(
            &client,
            store,
            &blobs,
            manifest_digest,
            manifest,
            Some(media_types::OCI_MANIFEST),
        ))?
    })
}

async fn push_async(
    client: &RegistryClient,
    store: &Store,
    blobs: &[(Digest, u64)],
    manifest_digest: &Digest,
    manifest: Vec<u8>,
    manifest_media_type: Option<&str>,
) -> Result<PushReport, RegistryError> {
    client.authenticate(RegistryOperation::Push).await?;
    let transfer = upload_missing_blobs(client, store, blobs).await?;
    if let Some(digest) = transfer.unavailable.first() {
        return Err(RegistryError::Store {
            registry: client.reference.registry().to_owned(),
            repository: client.reference.repository().to_owned(),
            digest: digest.clone(),
            source: Box::new(StoreError::MissingBlob { digest: digest.clone(), path: store.blob_path(digest) }),
        });
    }

    // The manifest is written only when the tag does not name it already, so that pushing an
    // unchanged image changes nothing in the registry.
    let Some(media_type) = manifest_media_type else {
        // The caller pushes what names the blobs (an index and its manifests).
        return Ok(PushReport {
            reference: client.reference.whole(),
            manifest_digest: manifest_digest.to_string(),
            blobs_uploaded: transfer.uploaded,
            blobs_skipped: transfer.skipped,
            bytes_uploaded: transfer.bytes_uploaded,
            manifest_uploaded: false,
        });
    };
    let tagged = client.client.fetch_manifest_digest(&client.reference.inner, &client.auth).await.ok();
    let manifest_uploaded = tagged.as_deref() != Some(manifest_digest.to_string().as_str());
    if manifest_uploaded {
        let content_type = media_type.parse().expect("a media type is a valid header value");
        client
            .client
            .push_manifest_raw(&client.reference.inner, manifest, content_type)
            .await
            .map_err(|error| client.error(format!("uploading manifest {manifest_digest}"), error))?;
    }
    Ok(PushReport {
        reference: client.reference.whole(),
        manifest_digest: manifest_digest.to_string(),
        blobs_uploaded: transfer.uploaded,
        blobs_skipped: transfer.skipped,
        bytes_uploaded: transfer.bytes_uploaded,
        manifest_uploaded,
    })
}

/// Pushes an image index to `reference` (a tag): every image's blobs the registry lacks, each
/// image's manifest by its digest, then the index under the tag.
pub(crate) fn push_index(
    index: &IndexParts<'_>,
    reference: &str,
    options: &PushOptions,
) -> Result<PushReport, RegistryError> {
    let reference = RegistryReference::parse(reference)?;
    if reference.digest().is_some() {
        return Err(RegistryError::InvalidReference {
            reference: reference.whole(),
            reason: "a push needs a tag (registry/repository:tag), not a digest".into(),
        });
    }
    let read = |digest: &Digest| {
        let path = index.store.blob_path(digest);
        std::fs::read(&path).map_err(|source| RegistryError::ReadBlob {
            registry: reference.registry().to_owned(),
            repository: reference.repository().to_owned(),
            path,
            source: Box::new(source),
        })
    };
    let mut seen = BTreeSet::new();
    let mut blobs: Vec<(Digest, u64)> = Vec::new();
    let mut manifests = Vec::new();
    for parts in &index.images {
        let config_size = std::fs::metadata(parts.store.blob_path(parts.config)).map(|metadata| metadata.len()).ok();
        for (digest, size) in std::iter::once((parts.config, config_size.unwrap_or(0)))
            .chain(parts.layers.iter().map(|layer| (&layer.digest, layer.size)))
        {
            if seen.insert(digest.clone()) {
                blobs.push((digest.clone(), size));
            }
        }
        manifests.push((parts.manifest.clone(), read(parts.manifest)?));
    }
    let index_document = read(index.index)?;
    let store = index.store;
    let index_digest = index.index;
    client::on_own_thread(move || {
        let client = RegistryClient::new(&reference, options.insecure)?;
        client::block_on(async {
            let mut report = push_async(&client, store, &blobs, &manifests[0].0, Vec::new(), None).await?;
            for (digest, manifest) in manifests {
                let by_digest =
                    RegistryClient::new(&client.reference.with_digest(&digest.to_string()), options.insecure)?;
                by_digest.authenticate(RegistryOperation::Push).await?;
                let content_type = media_types::OCI_MANIFEST.parse().expect("a media type is a valid header value");
                by_digest
                    .client
                    .push_manifest_raw(&by_digest.reference.inner, manifest, content_type)
                    .await
                    .map_err(|error| by_digest.error(format!("uploading manifest {digest}"), error))?;
            }
            let tagged = client.client.fetch_manifest_digest(&client.reference.inner, &client.auth).await.ok();
            report.manifest_uploaded = tagged.as_deref() != Some(index_digest.to_string().as_str());
            if report.manifest_uploaded {
                let content_type = media_types::OCI_INDEX.parse().expect("a media type is a valid header value");
                client
                    .client
                    .push_manifest_raw(&client.reference.inner, index_document, content_type)
                    .await
                    .map_err(|error| client.error(format!("uploading index {index_digest}"), error))?;
            }
            report.manifest_digest = index_digest.to_string();
            Ok(report)
        })?
    })
}

/// What [`upload_missing_blobs`] did.
#[derive(Debug, Default)]
pub(crate) struct BlobTransfer {
    pub uploaded: usize,
    pub skipped: usize,
    pub bytes_uploaded: u64,
    /// Blobs neither the registry nor the store has (the caller decides whether that is fatal).
    pub unavailable: Vec<Digest>,
}

/// Uploads each of `blobs` the registry lacks (asking with `HEAD` first), streamed from the
/// store, a few at once.
pub(crate) async fn upload_missing_blobs(
    client: &RegistryClient,
    store: &Store,
    blobs: &[(Digest, u64)],
) -> Result<BlobTransfer, RegistryError> {
    let uploaded = AtomicUsize::new(0);
    let skipped = AtomicUsize::new(0);
    let bytes_uploaded = AtomicU64::new(0);
    let unavailable: Vec<Option<Digest>> = stream::iter(blobs)
        .map(|(digest, size)| {
            let (uploaded, skipped, bytes_uploaded) = (&uploaded, &skipped, &bytes_uploaded);
            async move {
                if client.blob_exists(digest).await? {
                    skipped.fetch_add(1, Ordering::Relaxed);
                    return Ok(None);
                }
                if !store.has_blob(digest) {
                    return Ok(Some(digest.clone()));
                }
                let chunks = blob_chunks(client, store, digest, *size)?;
                client
                    .client
                    .push_blob_stream(&client.reference.inner, chunks, &digest.to_string(), Some(*size))
                    .await
                    .map_err(|error| client.error(format!("uploading blob {digest} ({size} bytes)"), error))?;
                uploaded.fetch_add(1, Ordering::Relaxed);
                bytes_uploaded.fetch_add(*size, Ordering::Relaxed);
                Ok::<Option<Digest>, RegistryError>(None)
            }
        })
        .buffer_unordered(PARALLEL_UPLOADS)
        .try_collect()
        .await?;
    Ok(BlobTransfer {
        uploaded: uploaded.into_inner(),
        skipped: skipped.into_inner(),
        bytes_uploaded: bytes_uploaded.into_inner(),
        unavailable: unavailable.into_iter().flatten().collect(),
    })
}

/// A store blob as a stream of chunks of at most [`UPLOAD_CHUNK_BYTES`], read only when the
/// upload asks for the next one. The bytes are hashed on the way: a blob that no longer matches
/// its digest (or recorded size) ends the stream with an error before the upload is committed,
/// and is removed from the store so that the next build rebuilds it.
fn blob_chunks(
    client: &RegistryClient,
    store: &Store,
    digest: &Digest,
    size: u64,
) -> Result<impl Stream<Item = Result<Bytes, OciDistributionError>> + Send + 'static, RegistryError> {
    let path = store.blob_path(digest);
    let file = store.open_blob(digest).map_err(|source| RegistryError::Store {
        registry: client.reference.registry().to_owned(),
        repository: client.reference.repository().to_owned(),
        digest: digest.clone(),
        source: Box::new(source),
    })?;
    let state = ChunkReader { file, path, digest: digest.clone(), size, hasher: Some(Sha256Writer::new(io::sink())) };
    Ok(stream::unfold(state, |mut state| async move {
        match state.next_chunk() {
            Ok(Some(chunk)) => Some((Ok(chunk), state)),
            Ok(None) => None,
            Err(error) => Some((Err(OciDistributionError::IoError(error)), state)),
        }
    }))
}

struct ChunkReader {
    file: File,
    path: PathBuf,
    digest: Digest,
    size: u64,
    /// `None` once the end was reached (and checked).
    hasher: Option<Sha256Writer<io::Sink>>,
}

impl ChunkReader {
    /// The next chunk; `None` at the end of a blob that matched its digest and size.
    fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        let Some(hasher) = self.hasher.as_mut() else { return Ok(None) };
        let mut chunk = vec![0u8; UPLOAD_CHUNK_BYTES];
        let mut filled = 0;
        while filled < chunk.len() {
            let read = self.file.read(&mut chunk[filled..])?;
            if read == 0 {
                break;
            }
            filled += read;
        }
        if filled > 0 {
            chunk.truncate(filled);
            io::Write::write_all(hasher, &chunk).expect("hashing into a sink does not fail");
            return Ok(Some(Bytes::from(chunk)));
        }
        let (actual, actual_size, _) = self.hasher.take().expect("checked above").finish();
        if actual == self.digest && actual_size == self.size {
            return Ok(None);
        }
        if let Err(error) = std::fs::remove_file(&self.path) {
            log::warn!("cannot remove corrupt blob {}: {error}", self.path.display());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "cache blob {} is corrupt: it should be {} bytes with digest {}, but is {actual_size} bytes with \
                 digest {actual}; it was removed from the cache, so building again rebuilds it",
                self.path.display(),
                self.size,
                self.digest
            ),
        ))
    }
}
