//! Pulling a base image: resolving a tag to a digest (plan phase), fetching that image into the
//! store and checking its layers (execute phase).

use std::io::Write as _;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use layerwright_cache::{Digest, LayerRecord, Store};
use oci_client::RegistryOperation;
use serde::Deserialize;

use super::client::{self, RegistryClient};
use super::reference::RegistryReference;
use super::{RegistryError, media_types};
use crate::layer::{Compression, LayerIndex};
use crate::oci::{Descriptor, Platform};
use crate::tree;

/// How many blobs are downloaded at once.
const PARALLEL_DOWNLOADS: usize = 3;

/// How deep image indexes may nest before the answer is considered malformed.
const MAX_INDEX_DEPTH: usize = 4;

/// A pulled image: its layers (bottom first) in the store, their indexes, its config.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PulledImage {
    /// The image's layers, bottom first, as the store holds them.
    pub layers: Vec<LayerRecord>,
    /// The index of each layer, in the same order.
    pub indexes: Vec<LayerIndex>,
    /// The image's config document.
    pub config: serde_json::Value,
    /// Blobs fetched from the registry (those already in the store are not).
    pub blobs_downloaded: usize,
}

/// The digest `reference` names now: its own digest when it has one (no request is made), else
/// what the registry says its tag points at (an image manifest or an index).
pub(crate) fn resolve(reference: &str) -> Result<Digest, RegistryError> {
    let reference = RegistryReference::parse(reference)?;
    if let Some(digest) = reference.digest() {
        return parse_digest(&reference, digest);
    }
    client::on_own_thread(move || {
        let client = RegistryClient::new(&reference, false)?;
        client::block_on(async {
            client.authenticate(RegistryOperation::Pull).await?;
            // The manifest itself (capped while streaming), hashed here: no registry's word is
            // needed for what its tag points at.
            let Some(bytes) = client.fetch_manifest(&client.reference, &media_types::ACCEPTED_MANIFESTS).await? else {
                return Err(RegistryError::Request {
                    registry: client.reference.registry().to_owned(),
                    repository: client.reference.repository().to_owned(),
                    action: format!("resolving tag {:?}", client.reference.tag().unwrap_or("latest")),
                    status: Some(404),
                    detail: "manifest unknown".to_owned(),
                });
            };
            Ok(Digest::of_bytes(&bytes))
        })?
    })
}

/// Fetches the image `digest` (as [`resolve`]d) of `reference` into `store`.
pub(crate) fn pull_image(
    store: &Store,
    reference: &str,
    digest: &Digest,
    platform: &Platform,
) -> Result<PulledImage, RegistryError> {
    let reference = RegistryReference::parse(reference)?.with_digest(&digest.to_string());
    client::on_own_thread(move || {
        let client = RegistryClient::new(&reference, false)?;
        let fetched = client::block_on(fetch_image(&client, store, digest, platform))??;
        let indexes = index_and_apply_layers(&client, store, &fetched.layers)?;
        Ok(PulledImage {
            layers: fetched.layers,
            indexes,
            config: fetched.config,
            blobs_downloaded: fetched.blobs_downloaded,
        })
    })
}

struct FetchedImage {
    layers: Vec<LayerRecord>,
    config: serde_json::Value,
    blobs_downloaded: usize,
}

/// A manifest or an index: which one is told by the media type, or by `manifests` being there.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

async fn fetch_image(
    client: &RegistryClient,
    store: &Store,
    digest: &Digest,
    platform: &Platform,
) -> Result<FetchedImage, RegistryError> {
    client.authenticate(RegistryOperation::Pull).await?;
    let mut digest = digest.clone();
    let mut manifest = None;
    for _ in 0..MAX_INDEX_DEPTH {
        let document = fetch_document(client, &digest).await?;
        match document.manifests {
            Some(manifests) if is_index(&document.media_type) => {
                digest = choose_platform(client, &manifests, platform)?
            }
            _ => {
                manifest = Some(document);
                break;
            }
        }
    }
    let Some(manifest) = manifest else {
        return Err(client.unusable(format!("image indexes are nested more than {MAX_INDEX_DEPTH} deep")));
    };
    if let Some(media_type) = &manifest.media_type
        && media_type != media_types::OCI_MANIFEST
        && media_type != media_types::DOCKER_MANIFEST
    {
        return Err(client.unusable(format!(
            "manifest {digest} has media type {media_type}; layerwright pulls OCI and Docker schema 2 image manifests"
        )));
    }
    let Some(config_descriptor) = &manifest.config else {
        return Err(client.unusable(format!("manifest {digest} names no config")));
    };

    let config_digest = parse_digest(&client.reference, &config_descriptor.digest)?;
    // The config is read whole: its size is capped before anything is downloaded (and the
    // download stops at the size the descriptor gives).
    if config_descriptor.size > client::MAX_DOCUMENT_BYTES {
        return Err(client.unusable(format!(
            "config {config_digest} is {} bytes; layerwright reads configs of at most {} bytes",
            config_descriptor.size,
            client::MAX_DOCUMENT_BYTES
        )));
    }
    let mut blobs_downloaded = usize::from(fetch_blob(client, store, &config_digest, config_descriptor.size).await?);
    let config_bytes = std::fs::read(store.blob_path(&config_digest)).map_err(|source| RegistryError::Store {
        registry: client.reference.registry().to_owned(),
        repository: client.reference.repository().to_owned(),
        digest: config_digest.clone(),
        source: Box::new(layerwright_cache::StoreError::Io {
            action: "read config blob",
            path: store.blob_path(&config_digest),
            source,
        }),
    })?;
    let config: serde_json::Value = serde_json::from_slice(&config_bytes)
        .map_err(|error| client.unusable(format!("config {config_digest} is not JSON: {error}")))?;
    let diff_ids: Vec<Digest> = config["rootfs"]["diff_ids"]
        .as_array()
        .ok_or_else(|| client.unusable(format!("config {config_digest} lists no rootfs.diff_ids")))?
        .iter()
        .map(|value| parse_digest(&client.reference, value.as_str().unwrap_or_default()))
        .collect::<Result<_, _>>()?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(client.unusable(format!(
            "manifest {digest} lists {} layers, but its config lists {} diff ids",
            manifest.layers.len(),
            diff_ids.len()
        )));
    }

    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (descriptor, diff_id) in manifest.layers.iter().zip(diff_ids) {
        let media_type = descriptor.media_type.as_deref().unwrap_or_default();
        // Docker media types are kept under their OCI names: the bytes are the same, and the
        // manifests layerwright writes are OCI manifests. Foreign layers are refused here.
        let Some(compression) = Compression::from_media_type(media_type).filter(|_| !media_type.contains("foreign"))
        else {
            return Err(client.unusable(format!(
                "layer {} has media type {media_type:?}, which layerwright cannot use",
                descriptor.digest
            )));
        };
        let layer_digest = parse_digest(&client.reference, &descriptor.digest)?;
        layers.push(LayerRecord {
            diff_id,
            digest: layer_digest,
            size: descriptor.size,
            media_type: compression.media_type().to_owned(),
        });
    }
    // Each layer once, however often the manifest lists it.
    let mut wanted: Vec<(Digest, u64)> = layers.iter().map(|layer| (layer.digest.clone(), layer.size)).collect();
    wanted.sort();
    wanted.dedup();
    let downloaded: Vec<bool> = stream::iter(wanted)
        .map(|(layer_digest, size)| async move { fetch_blob(client, store, &layer_digest, size).await })
        .buffer_unordered(PARALLEL_DOWNLOADS)
        .try_collect()
        .await?;
    blobs_downloaded += downloaded.into_iter().filter(|downloaded| *downloaded).count();
    Ok(FetchedImage { layers, config, blobs_downloaded })
}

fn is_index(media_type: &Option<String>) -> bool {
    match media_type.as_deref() {
        Some(media_type) => media_type == media_types::OCI_INDEX || media_type == media_types::DOCKER_MANIFEST_LIST,
        // OCI allows leaving it out; `manifests` is there, so it is an index.
        None => true,
    }
}

/// Fetches the manifest or index `digest` and checks that its bytes are what the digest says.
async fn fetch_document(client: &RegistryClient, digest: &Digest) -> Result<Document, RegistryError> {
    let by_digest = client.reference.with_digest(&digest.to_string());
    let Some(bytes) = client.fetch_manifest(&by_digest, &media_types::ACCEPTED_MANIFESTS).await? else {
        return Err(RegistryError::Request {
            registry: client.reference.registry().to_owned(),
            repository: client.reference.repository().to_owned(),
            action: format!("fetching manifest {digest}"),
            status: Some(404),
            detail: "manifest unknown".to_owned(),
        });
    };
    let actual = Digest::of_bytes(&bytes);
    if actual != *digest {
        return Err(client.unusable(format!("manifest {digest} arrived with digest {actual}")));
    }
    serde_json::from_slice(&bytes).map_err(|error| client.unusable(format!("manifest {digest} is not JSON: {error}")))
}

/// The descriptor of an index for `platform` (this host's: `linux/<GOARCH>`, and for arm the
/// variant `rustc` targets, unless the build names another).
fn choose_platform(
    client: &RegistryClient,
    manifests: &[Descriptor],
    platform: &Platform,
) -> Result<Digest, RegistryError> {
    let host = platform;
    let for_host = |descriptor: &&Descriptor| descriptor.platform.as_ref().is_some_and(|offered| host.accepts(offered));
    let Some(descriptor) = manifests.iter().find(for_host) else {
        let offered: Vec<String> =
            manifests.iter().filter_map(|descriptor| descriptor.platform.as_ref()).map(Platform::to_string).collect();
        return Err(client.unusable(format!(
            "the index has no image for {host} (it offers {})",
            if offered.is_empty() { "no platforms".to_owned() } else { offered.join(", ") }
        )));
    };
    parse_digest(&client.reference, &descriptor.digest)
}

/// Streams blob `digest` into the store unless it is there; true when it was downloaded. The
/// store refuses (and deletes) a download whose digest is not `digest`.
pub(crate) async fn fetch_blob(
    client: &RegistryClient,
    store: &Store,
    digest: &Digest,
    size: u64,
) -> Result<bool, RegistryError> {
    if store.has_blob(digest) {
        return Ok(false);
    }
    let store_error = |source| RegistryError::Store {
        registry: client.reference.registry().to_owned(),
        repository: client.reference.repository().to_owned(),
        digest: digest.clone(),
        source: Box::new(source),
    };
    let mut chunks = client.blob_stream(digest, size).await?;
    let mut writer = store.blob_writer().map_err(store_error)?;
    while let Some(chunk) = chunks.next().await {
        let chunk: Bytes = chunk.map_err(|error| client.error(format!("downloading blob {digest}"), error.into()))?;
        // A blob bigger than its descriptor says is refused before it fills the disk.
        if writer.written() + chunk.len() as u64 > size {
            return Err(client.unusable(format!("blob {digest} is bigger than the {size} bytes its descriptor says")));
        }
        writer.write_all(&chunk).map_err(|source| {
            store_error(layerwright_cache::StoreError::Io { action: "write", path: store.tmp_dir(), source })
        })?;
    }
    if writer.written() != size {
        return Err(
            client.unusable(format!("blob {digest} is {} bytes, but its descriptor says {size}", writer.written()))
        );
    }
    writer.commit_expecting(digest).map_err(store_error)?;
    Ok(true)
}

/// `tree::index_and_apply_layers` (as for an imported archive), its errors naming the
/// registry and repository.
fn index_and_apply_layers(
    client: &RegistryClient,
    store: &Store,
    layers: &[LayerRecord],
) -> Result<Vec<LayerIndex>, RegistryError> {
    tree::index_and_apply_layers(store, layers).map_err(|source| RegistryError::Layer {
        registry: client.reference.registry().to_owned(),
        repository: client.reference.repository().to_owned(),
        source: Box::new(source),
    })
}

pub(crate) fn parse_digest(reference: &RegistryReference, digest: &str) -> Result<Digest, RegistryError> {
    Digest::parse(digest).map_err(|error| RegistryError::Unusable {
        registry: reference.registry().to_owned(),
        repository: reference.repository().to_owned(),
        reason: error.to_string(),
    })
}
