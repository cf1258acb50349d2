//! The remote cache's registry side: step records shared between machines as OCI artifacts.
//!
//! For a cache reference `registry/repository:TAG` the registry holds:
//! - **One writer manifest per writer**, tagged `TAG--lw-WRITER` (a writer is a cache directory,
//!   or what `LAYERWRIGHT_CACHE_WRITER` names): an OCI image manifest with the artifact type
//!   [`CACHE_ARTIFACT_TYPE`], the empty config, and as layers first its record batch (JSON: step
//!   key → the layers and config the step produced) and then every blob those records name. The
//!   layers are the very blobs an image pushed to the same repository uses, so they are stored
//!   once, and the registry's garbage collection keeps them because a tagged manifest names them.
//! - **An index at `TAG`**: an OCI image index of the writer manifests, rewritten by every export.
//!
//! Each writer rewrites only its own tag, merging its new records into its own earlier batch, so
//! writers exporting at once never lose each other's records (the registry has no
//! compare-and-swap that a shared document would need). Readers take every writer tag from the
//! tag list and fall back to the index only when the registry will not list tags; a lost update
//! of the index is repaired by the next export.
//!
//! What it deliberately is not: a cache server, or anything that decides which records a build
//! uses (that is `crate::remote`). Everything read is checked: documents and blobs by digest,
//! sizes against their descriptors, records by shape; a writer whose documents are unusable is
//! skipped and reported, never trusted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use layerwright_cache::{ActionRecord, Digest, KEY_FORMAT_VERSION, StepKey, Store};
use oci_client::RegistryOperation;
use serde::{Deserialize, Serialize};

use super::report::{CacheExportReport, RemoteRecords};
use crate::oci::{Descriptor, canonical, media_types};
use crate::registry::client::{self, RegistryClient, Timeouts};
use crate::registry::{RegistryError, RegistryReference, fetch_blob, parse_digest, upload_missing_blobs};

/// The artifact type of a writer manifest.
pub const CACHE_ARTIFACT_TYPE: &str = "application/vnd.layerwright.cache.v1";
/// The media type of a record batch.
pub const RECORDS_MEDIA_TYPE: &str = "application/vnd.layerwright.cache.records.v1+json";
/// The OCI 1.1 empty descriptor's media type and content, the config of an artifact.
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_BLOB: &[u8] = b"{}";
const IMAGE_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const WRITER_ANNOTATION: &str = "dev.layerwright.cache.writer";
const WRITER_TAG_INFIX: &str = "--lw-";
/// What `format` says in a record batch.
const BATCH_FORMAT: &str = "layerwright-cache-records";

/// A writer keeps its newest records up to this many, so that its manifest stays well under
/// the 4 MiB registries accept.
const MAX_RECORDS_PER_WRITER: usize = 4096;
/// Writers read per import; more are ignored (and reported).
const MAX_WRITERS: usize = 64;
/// The biggest manifest or record batch read into memory.
const MAX_DOCUMENT_BYTES: u64 = 32 << 20;
/// How many registry requests of an import or export run at once.
const PARALLEL_REQUESTS: usize = 4;
/// How long reading a cache's records may take in all before it is given up on.
const READ_DEADLINE: Duration = Duration::from_secs(60);
/// The page size of the tag list.
const TAGS_PAGE: usize = 1000;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordBatch {
    format: String,
    key_format_version: u32,
    records: Vec<KeyedRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct KeyedRecord {
    key: String,
    #[serde(flatten)]
    record: ActionRecord,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WriterManifest {
    schema_version: u32,
    media_type: String,
    #[serde(default)]
    artifact_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheIndex {
    schema_version: u32,
    media_type: String,
    manifests: Vec<Descriptor>,
}

/// Parses a `--cache-from` value, `REF` or `REF,writers=NAME+NAME...`: the cache, and the
/// tags of the writers whose records are read (`None`: every writer the cache lists). A writer
/// is named as it exports (`LAYERWRIGHT_CACHE_WRITER`), and compared as its tag writes it.
pub(crate) fn cache_source(spec: &str) -> Result<(RegistryReference, Option<HashSet<String>>), RegistryError> {
    let invalid = |reason: String| RegistryError::InvalidReference { reference: spec.to_owned(), reason };
    let (reference, options) = spec.split_once(',').unwrap_or((spec, ""));
    let parsed = cache_reference(reference)?;
    if options.is_empty() {
        return Ok((parsed, None));
    }
    let tag = parsed.tag().unwrap_or("latest").to_owned();
    let mut writers: Option<HashSet<String>> = None;
    for option in options.split(',') {
        match option.split_once('=') {
            Some(("writers", names)) => {
                let names: Vec<&str> = names.split('+').map(str::trim).filter(|name| !name.is_empty()).collect();
                if names.is_empty() {
                    return Err(invalid("`writers=` names no writer (write `writers=ci+alice`)".into()));
                }
                writers.get_or_insert_default().extend(names.iter().map(|name| writer_tag(&tag, name)));
            }
            _ => {
                return Err(invalid(format!(
                    "unknown cache option {option:?}: a cache to read is `REF` or `REF,writers=NAME+NAME`"
                )));
            }
        }
    }
    Ok((parsed, writers))
}

/// Parses a cache reference: it needs a tag (the cache's name), not a digest.
fn cache_reference(reference: &str) -> Result<RegistryReference, RegistryError> {
    if reference.contains(',') {
        return Err(RegistryError::InvalidReference {
            reference: reference.to_owned(),
            reason: "options such as `writers=` select what a build reads (`--cache-from`); an export \
                     (`--cache-to`) writes as this cache directory's writer"
                .into(),
        });
    }
    let parsed = RegistryReference::parse(reference)?;
    if parsed.digest().is_some() {
        return Err(RegistryError::InvalidReference {
            reference: reference.to_owned(),
            reason: "a remote cache is named by a tag (registry/repository:tag), not a digest".into(),
        });
    }
    Ok(parsed)
}

/// The tag a writer writes: `TAG--lw-WRITER`, at most 128 characters, WRITER reduced to
/// lowercase letters, digits and `-`.
pub(crate) fn writer_tag(tag: &str, writer: &str) -> String {
    let mut writer: String = writer
        .chars()
        .map(|character| character.to_ascii_lowercase())
        .map(|character| if character.is_ascii_alphanumeric() { character } else { '-' })
        .take(40)
        .collect();
    if writer.trim_matches('-').is_empty() {
        writer = "default".into();
    }
    let room = 128 - WRITER_TAG_INFIX.len() - writer.len();
    let prefix: String = tag.chars().take(room).collect();
    format!("{prefix}{WRITER_TAG_INFIX}{writer}")
}

/// Whether `candidate` is one of the writer tags of the cache tagged `tag` (whose prefix
/// [`writer_tag`] may have shortened to make room for a long writer name).
fn is_writer_tag(candidate: &str, tag: &str) -> bool {
    candidate.match_indices(WRITER_TAG_INFIX).any(|(position, _)| {
        let prefix = &candidate[..position];
        tag.starts_with(prefix) && (prefix.len() == tag.len() || candidate.len() == 128)
    })
}

/// Whether a request failed because the registry has no such repository or tag.
fn is_not_found(error: &RegistryError) -> bool {
    matches!(error, RegistryError::Request { status: Some(404), .. })
}

/// Reads every writer's records of the cache at `reference`. A cache that does not exist yet
/// is empty, not an error; an unreachable registry is an error.
pub(crate) fn fetch_records(reference: &str) -> Result<RemoteRecords, RegistryError> {
    let (reference, trusted) = cache_source(reference)?;
    client::on_own_thread(move || {
        let client = RegistryClient::with_timeouts(&reference, false, Timeouts::CACHE)?;
        client::block_on(async {
            match tokio::time::timeout(READ_DEADLINE, fetch_records_async(&client, trusted.as_ref())).await {
                Ok(result) => result,
                Err(_) => Err(client.unusable(format!("reading the cache took longer than {READ_DEADLINE:?}"))),
            }
        })?
    })
}

/// Reads the records of the writers of the cache (only those of `trusted`, writer tags, when
/// given).
async fn fetch_records_async(
    client: &RegistryClient,
    trusted: Option<&HashSet<String>>,
) -> Result<RemoteRecords, RegistryError> {
    client.authenticate(RegistryOperation::Pull).await?;
    let tag = client.reference.tag().unwrap_or("latest").to_owned();
    let is_trusted = |writer: &str| trusted.is_none_or(|trusted| trusted.contains(writer));
    let sources: Vec<RegistryReference> = match list_writer_tags(client, &tag).await {
        Ok(tags) => {
            tags.iter().filter(|writer| is_trusted(writer)).map(|writer| tagged(&client.reference, writer)).collect()
        }
        Err(error) if is_not_found(&error) => return Ok(RemoteRecords::default()),
        // Some registries will not list tags: the index names the writers too.
        Err(list_error) => match fetch_index(client, &tag).await {
            Ok(Some((index, _))) => index
                .manifests
                .iter()
                .filter(|descriptor| {
                    trusted.is_none()
                        || descriptor.annotations.get(WRITER_ANNOTATION).is_some_and(|writer| is_trusted(writer))
                })
                .map(|descriptor| client.reference.with_digest(&descriptor.digest))
                .collect(),
            _ => return Err(list_error),
        },
    };
    let mut records = RemoteRecords::default();
    if sources.len() > MAX_WRITERS {
        records.problems.push(format!("{} writers; only the first {MAX_WRITERS} are read", sources.len()));
    }
    let read: Vec<(String, Result<WriterRecords, RegistryError>)> = stream::iter(sources.into_iter().take(MAX_WRITERS))
        .map(|source| async move { (source.whole(), read_writer(client, &source).await) })
        .buffered(PARALLEL_REQUESTS)
        .collect()
        .await;
    let mut first_error = None;
    for (source, result) in read {
        match result {
            Ok((manifest, batch)) => {
                records.writers += 1;
                for descriptor in &manifest.layers {
                    if let Ok(digest) = Digest::parse(&descriptor.digest) {
                        records.blob_sizes.insert(digest, descriptor.size);
                    }
                }
                for keyed in batch.records {
                    // Keys are checked, records are taken as written: their blobs are verified
                    // by digest when downloaded.
                    if let Some(key) = StepKey::from_hex(&keyed.key) {
                        records.records.entry(key).or_insert(keyed.record);
                    }
                }
            }
            Err(error) => {
                records.problems.push(format!("{source}: {error}"));
                first_error.get_or_insert(error);
            }
        }
    }
    // When no writer could be read at all (the registry died, say), the cache was not read.
    match first_error {
        Some(error) if records.writers == 0 => Err(error),
        _ => Ok(records),
    }
}

fn tagged(reference: &RegistryReference, tag: &str) -> RegistryReference {
    let inner = oci_client::Reference::with_tag(
        reference.registry().to_owned(),
        reference.repository().to_owned(),
        tag.to_owned(),
    );
    RegistryReference { inner }
}

/// Every writer tag of the cache tagged `tag`, sorted.
async fn list_writer_tags(client: &RegistryClient, tag: &str) -> Result<Vec<String>, RegistryError> {
    let mut writers = Vec::new();
    let mut last: Option<String> = None;
    loop {
        let page = client
            .client
            .list_tags(&client.reference.inner, &client.auth, Some(TAGS_PAGE), last.as_deref())
            .await
            .map_err(|error| client.error("listing tags", error))?;
        let full_page = page.tags.len() >= TAGS_PAGE;
        last = page.tags.last().cloned();
        writers.extend(page.tags.into_iter().filter(|candidate| is_writer_tag(candidate, tag)));
        if !full_page || last.is_none() {
            break;
        }
    }
    writers.sort();
    writers.dedup();
    Ok(writers)
}

/// A manifest's bytes, fetched by tag or digest; `None` when the registry has no such thing.
async fn fetch_document(
    client: &RegistryClient,
    reference: &RegistryReference,
    accepted: &[&str],
) -> Result<Option<Vec<u8>>, RegistryError> {
    // Read while streaming, refused past `client::MAX_DOCUMENT_BYTES` (what registries accept).
    let Some(bytes) = client.fetch_manifest(reference, accepted).await? else { return Ok(None) };
    if let Some(digest) = reference.digest() {
        let actual = Digest::of_bytes(&bytes);
        if actual.to_string() != digest {
            return Err(client.unusable(format!("manifest {digest} arrived with digest {actual}")));
        }
    }
    Ok(Some(bytes))
}

/// The index at the cache's own tag, with its bytes; `None` when there is none.
async fn fetch_index(client: &RegistryClient, tag: &str) -> Result<Option<(CacheIndex, Vec<u8>)>, RegistryError> {
    let Some(bytes) = fetch_document(client, &tagged(&client.reference, tag), &[media_types::OCI_INDEX]).await? else {
        return Ok(None);
    };
    let index: CacheIndex = serde_json::from_slice(&bytes)
        .map_err(|error| client.unusable(format!("the cache index at {tag} is not an OCI index: {error}")))?;
    Ok(Some((index, bytes)))
}

/// A writer's manifest and record batch.
type WriterRecords = (WriterManifest, RecordBatch);

/// One writer's manifest and record batch.
async fn read_writer(client: &RegistryClient, source: &RegistryReference) -> Result<WriterRecords, RegistryError> {
    let Some(bytes) = fetch_document(client, source, &[media_types::OCI_MANIFEST]).await? else {
        return Err(client.unusable(format!("{} is gone", source.whole())));
    };
    let manifest = parse_writer_manifest(client, &bytes)?;
    let batch = read_batch(client, &manifest).await?;
    Ok((manifest, batch))
}

fn parse_writer_manifest(client: &RegistryClient, bytes: &[u8]) -> Result<WriterManifest, RegistryError> {
    let manifest: WriterManifest = serde_json::from_slice(bytes)
        .map_err(|error| client.unusable(format!("a cache manifest is not an OCI manifest: {error}")))?;
    if manifest.artifact_type.as_deref() != Some(CACHE_ARTIFACT_TYPE) {
        return Err(client.unusable(format!(
            "a manifest among the cache's tags has artifact type {:?}, not {CACHE_ARTIFACT_TYPE}",
            manifest.artifact_type
        )));
    }
    Ok(manifest)
}

/// The record batch a writer manifest names, fetched and checked.
async fn read_batch(client: &RegistryClient, manifest: &WriterManifest) -> Result<RecordBatch, RegistryError> {
    let Some(descriptor) =
        manifest.layers.first().filter(|layer| layer.media_type.as_deref() == Some(RECORDS_MEDIA_TYPE))
    else {
        return Err(client.unusable("a cache manifest's first layer is not a record batch"));
    };
    let digest = parse_digest(&client.reference, &descriptor.digest)?;
    let bytes = fetch_small_blob(client, &digest, descriptor.size).await?;
    let batch: RecordBatch = serde_json::from_slice(&bytes)
        .map_err(|error| client.unusable(format!("record batch {digest} is unreadable: {error}")))?;
    if batch.format != BATCH_FORMAT {
        return Err(client.unusable(format!("record batch {digest} has format {:?}", batch.format)));
    }
    Ok(batch)
}

/// A small blob (a record batch) in memory, checked against its digest and size.
async fn fetch_small_blob(client: &RegistryClient, digest: &Digest, size: u64) -> Result<Vec<u8>, RegistryError> {
    if size > MAX_DOCUMENT_BYTES {
        return Err(client.unusable(format!("blob {digest} is {size} bytes, more than {MAX_DOCUMENT_BYTES}")));
    }
    let mut chunks = client.blob_stream(digest, size).await?;
    let mut bytes = Vec::with_capacity(size as usize);
    while let Some(chunk) = chunks.next().await {
        let chunk: Bytes = chunk.map_err(|error| client.error(format!("downloading blob {digest}"), error.into()))?;
        if bytes.len() as u64 + chunk.len() as u64 > size {
            return Err(client.unusable(format!("blob {digest} is bigger than the {size} bytes its descriptor says")));
        }
        bytes.extend_from_slice(&chunk);
    }
    let actual = Digest::of_bytes(&bytes);
    if actual != *digest || bytes.len() as u64 != size {
        return Err(client.unusable(format!("blob {digest} arrived as {} bytes with digest {actual}", bytes.len())));
    }
    Ok(bytes)
}

/// Downloads `blobs` the store lacks from the cache at `reference` into the store, a few at
/// once, each verified by digest and size. Stops at the first failure (what arrived stays).
pub(crate) fn download_blobs(reference: &str, store: &Store, blobs: &[(Digest, u64)]) -> Result<(), RegistryError> {
    let (reference, _) = cache_source(reference)?;
    client::on_own_thread(move || {
        let client = RegistryClient::with_timeouts(&reference, false, Timeouts::CACHE)?;
        client::block_on(async {
            client.authenticate(RegistryOperation::Pull).await?;
            stream::iter(blobs)
                .map(|(digest, size)| fetch_blob(&client, store, digest, *size))
                .buffer_unordered(PARALLEL_REQUESTS)
                .try_collect::<Vec<bool>>()
                .await?;
            Ok(())
        })?
    })
}

/// Exports `records` (this build's, in plan order) as `writer`'s records of the cache at
/// `reference`: merged with the writer's earlier batch, their blobs uploaded where the registry
/// lacks them, the writer tag and then the index rewritten.
pub(crate) fn export_records(
    reference: &str,
    store: &Store,
    writer: &str,
    records: Vec<(StepKey, ActionRecord)>,
) -> Result<CacheExportReport, RegistryError> {
    let reference = cache_reference(reference)?;
    client::on_own_thread(move || {
        let client = RegistryClient::with_timeouts(&reference, false, Timeouts::CACHE)?;
        client::block_on(export_async(&client, store, writer, records))?
    })
}

async fn export_async(
    client: &RegistryClient,
    store: &Store,
    writer: &str,
    new_records: Vec<(StepKey, ActionRecord)>,
) -> Result<CacheExportReport, RegistryError> {
    client.authenticate(RegistryOperation::Push).await?;
    let tag = client.reference.tag().unwrap_or("latest").to_owned();
    let own_tag = writer_tag(&tag, writer);
    let own_reference = tagged(&client.reference, &own_tag);

    // The writer's earlier manifest: its records are kept (behind the new ones) and its blobs
    // are known to be in the registry. An unusable one is replaced.
    let earlier = fetch_document(client, &own_reference, &[media_types::OCI_MANIFEST]).await?;
    let mut earlier_records = Vec::new();
    let mut in_registry: HashMap<Digest, u64> = HashMap::new();
    if let Some(bytes) = &earlier
        && let Ok(manifest) = parse_writer_manifest(client, bytes)
        && let Ok(batch) = read_batch(client, &manifest).await
    {
        for descriptor in &manifest.layers[1..] {
            if let Ok(digest) = Digest::parse(&descriptor.digest) {
                in_registry.insert(digest, descriptor.size);
            }
        }
        earlier_records = batch
            .records
            .into_iter()
            .filter_map(|keyed| StepKey::from_hex(&keyed.key).map(|key| (key, keyed.record)))
            .collect();
    }

    let records_new = new_records.len();
    let mut seen = HashSet::new();
    let mut merged: Vec<(StepKey, ActionRecord)> = new_records
        .into_iter()
        .chain(earlier_records)
        .filter(|(key, _)| seen.insert(*key))
        .take(MAX_RECORDS_PER_WRITER)
        .collect();

    // Every blob the records name, with its size and media type, each once.
    let mut blobs: BTreeMap<Digest, (u64, String)> = BTreeMap::new();
    let mut unknown_size = HashSet::new();
    for (_, record) in &merged {
        for layer in &record.layers {
            blobs.insert(layer.digest.clone(), (layer.size, layer.media_type.clone()));
        }
        if let Some(config) = &record.config {
            let size = in_registry
                .get(config)
                .copied()
                .or_else(|| std::fs::metadata(store.blob_path(config)).ok().map(|metadata| metadata.len()));
            match size {
                Some(size) => {
                    blobs.insert(config.clone(), (size, IMAGE_CONFIG_MEDIA_TYPE.to_owned()));
                }
                None => {
                    unknown_size.insert(config.clone());
                }
            }
        }
    }
    let to_check: Vec<(Digest, u64)> = blobs
        .iter()
        .filter(|(digest, _)| !in_registry.contains_key(*digest))
        .map(|(digest, (size, _))| (digest.clone(), *size))
        .collect();
    let transfer = upload_missing_blobs(client, store, &to_check).await?;
    let unavailable: HashSet<Digest> = transfer.unavailable.iter().cloned().chain(unknown_size).collect();
    let before = merged.len();
    merged.retain(|(_, record)| {
        record.layers.iter().all(|layer| !unavailable.contains(&layer.digest))
            && record.config.as_ref().is_none_or(|config| !unavailable.contains(config))
    });
    let records_dropped = before - merged.len();

    let batch = RecordBatch {
        format: BATCH_FORMAT.into(),
        key_format_version: KEY_FORMAT_VERSION,
        records: merged.iter().map(|(key, record)| KeyedRecord { key: key.to_hex(), record: record.clone() }).collect(),
    };
    let batch_bytes = canonical::to_bytes_of(&batch);
    let batch_digest = Digest::of_bytes(&batch_bytes);
    let empty_digest = Digest::of_bytes(EMPTY_BLOB);
    push_small_blob(client, &empty_digest, EMPTY_BLOB).await?;
    push_small_blob(client, &batch_digest, &batch_bytes).await?;

    // Only blobs a kept record names are listed, so the registry keeps exactly those.
    let mut named: BTreeMap<Digest, (u64, String)> = BTreeMap::new();
    for (_, record) in &merged {
        for digest in record.layers.iter().map(|layer| &layer.digest).chain(record.config.as_ref()) {
            if let Some(entry) = blobs.get(digest) {
                named.insert(digest.clone(), entry.clone());
            }
        }
    }
    let manifest = WriterManifest {
        schema_version: 2,
        media_type: media_types::OCI_MANIFEST.into(),
        artifact_type: Some(CACHE_ARTIFACT_TYPE.into()),
        config: plain_descriptor(EMPTY_MEDIA_TYPE, &empty_digest, EMPTY_BLOB.len() as u64),
        layers: std::iter::once(plain_descriptor(RECORDS_MEDIA_TYPE, &batch_digest, batch_bytes.len() as u64))
            .chain(named.iter().map(|(digest, (size, media_type))| plain_descriptor(media_type, digest, *size)))
            .collect(),
        annotations: BTreeMap::from([(WRITER_ANNOTATION.to_owned(), writer.to_owned())]),
    };
    let manifest_bytes = canonical::to_bytes_of(&manifest);
    let manifest_uploaded = earlier.as_deref() != Some(manifest_bytes.as_slice());
    if manifest_uploaded {
        push_document(client, &own_reference, manifest_bytes, media_types::OCI_MANIFEST).await?;
    }
    let index_problem = rewrite_index(client, &tag).await.err().map(|error| error.to_string());
    Ok(CacheExportReport {
        reference: own_reference.whole(),
        records: merged.len(),
        records_new,
        records_dropped,
        blobs_uploaded: transfer.uploaded,
        bytes_uploaded: transfer.bytes_uploaded,
        blobs_skipped: transfer.skipped + (blobs.len() - to_check.len()),
        manifest_uploaded,
        index_problem,
    })
}

fn plain_descriptor(media_type: &str, digest: &Digest, size: u64) -> Descriptor {
    Descriptor::plain(media_type, digest, size)
}

async fn push_small_blob(client: &RegistryClient, digest: &Digest, bytes: &[u8]) -> Result<(), RegistryError> {
    if !client.blob_exists(digest).await? {
        client
            .client
            .push_blob(&client.reference.inner, bytes.to_vec(), &digest.to_string())
            .await
            .map_err(|error| client.error(format!("uploading blob {digest}"), error))?;
    }
    Ok(())
}

async fn push_document(
    client: &RegistryClient,
    reference: &RegistryReference,
    bytes: Vec<u8>,
    media_type: &str,
) -> Result<(), RegistryError> {
    let content_type = media_type.parse().expect("a media type is a valid header value");
    client
        .client
        .push_manifest_raw(&reference.inner, bytes, content_type)
        .await
        .map_err(|error| client.error(format!("uploading {}", reference.whole()), error))?;
    Ok(())
}

/// Rewrites the index at the cache's tag from the writer tags the registry lists now. A
/// writer whose manifest cannot be read this moment (another writer is replacing it, and some
/// registries answer 500 meanwhile) is left out: readers find it through the tag list, and the
/// next export puts it back.
async fn rewrite_index(client: &RegistryClient, tag: &str) -> Result<(), RegistryError> {
    let writers = list_writer_tags(client, tag).await?;
    let documents: Vec<(String, Option<Vec<u8>>)> = stream::iter(writers.into_iter().take(MAX_WRITERS))
        .map(|writer| async move {
            let document =
                fetch_document(client, &tagged(&client.reference, &writer), &[media_types::OCI_MANIFEST]).await;
            (writer, document.ok().flatten())
        })
        .buffered(PARALLEL_REQUESTS)
        .collect()
        .await;
    let manifests = documents
        .into_iter()
        .filter_map(|(writer, document)| {
            let bytes = document?;
            let manifest: WriterManifest = serde_json::from_slice(&bytes).ok()?;
            (manifest.artifact_type.as_deref() == Some(CACHE_ARTIFACT_TYPE)).then(|| Descriptor {
                artifact_type: Some(CACHE_ARTIFACT_TYPE.into()),
                annotations: BTreeMap::from([(WRITER_ANNOTATION.to_owned(), writer)]),
                ..Descriptor::plain(media_types::OCI_MANIFEST, Digest::of_bytes(&bytes), bytes.len() as u64)
            })
        })
        .collect();
    let index = CacheIndex { schema_version: 2, media_type: media_types::OCI_INDEX.into(), manifests };
    let bytes = canonical::to_bytes_of(&index);
    let current = fetch_index(client, tag).await.ok().flatten().map(|(_, bytes)| bytes);
    if current.as_deref() != Some(bytes.as_slice()) {
        push_document(client, &tagged(&client.reference, tag), bytes, media_types::OCI_INDEX).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_to_read_names_the_writers_it_trusts() {
        let (reference, writers) = cache_source("localhost:5000/cache:main").unwrap();
        assert_eq!((reference.whole().as_str(), writers), ("localhost:5000/cache:main", None));
        let (_, writers) = cache_source("localhost:5000/cache:main,writers=ci+CI Runner #3").unwrap();
        let mut writers: Vec<String> = writers.unwrap().into_iter().collect();
        writers.sort();
        assert_eq!(writers, ["main--lw-ci", "main--lw-ci-runner--3"]);
        for (spec, message) in [
            ("localhost:5000/cache:main,writers=", "names no writer"),
            ("localhost:5000/cache:main,trust=ci", "REF,writers=NAME+NAME"),
        ] {
            let error = cache_source(spec).unwrap_err().to_string();
            assert!(error.contains(message), "{spec}: {error}");
        }
        // An export writes as its own writer: options are refused there.
        let error = cache_reference("localhost:5000/cache:main,writers=ci").unwrap_err().to_string();
        assert!(error.contains("--cache-to"), "{error}");
    }

    #[test]
    fn writer_tags_are_valid_tags_that_belong_to_their_cache() {
        for (tag, writer, expected) in [
            ("main", "ab12cd", "main--lw-ab12cd"),
            ("main", "CI Runner #3", "main--lw-ci-runner--3"),
            ("main", "", "main--lw-default"),
            ("main", "///", "main--lw-default"),
        ] {
            assert_eq!(writer_tag(tag, writer), expected);
            assert!(is_writer_tag(expected, tag));
        }
        let long = "t".repeat(128);
        let long_writer_tag = writer_tag(&long, &"w".repeat(80));
        assert_eq!(long_writer_tag.len(), 128);
        assert!(is_writer_tag(&long_writer_tag, &long));
        assert!(!is_writer_tag("main", "main"));
        assert!(!is_writer_tag("mainline--lw-x", "main"));
        assert!(!is_writer_tag("other--lw-x", "main"));
    }
}
