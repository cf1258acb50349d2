//! Base image import: docker-archive tars (`docker save`), OCI archive tars and OCI layout dirs.
//!
//! What it does: finds the one image an archive holds, copies its config and layer blobs into
//! the store while verifying each against the digest that names it (index → manifest → config
//! → layers; for a docker-archive, each uncompressed layer against the config's diff ids), then
//! indexes every layer with [`tree::index_layer`] (which checks the diff id of compressed layers
//! and refuses entries escaping the image root) and applies the indexes to one [`FsTree`]
//! (which refuses writes through symlinks). Every error names the archive and the member.
//!
//! What it does not: extract anything to disk, hold a layer in memory, pull from a registry, or
//! import several images at once. Tar archives are read in place: their headers are scanned
//! once to learn where each member's bytes start, and a member is then read by seeking there.
//!
//! Which image is imported: an archive must hold exactly one image. In an OCI index (the
//! layout's `index.json`, or a nested image index it points at) descriptors that all name the
//! same digest count as one; otherwise the first descriptor whose platform is this host's
//! (`linux/<arch>`) is taken, and an index listing several images with no platform to tell them
//! apart is refused. A docker-archive whose `manifest.json` lists several different images is
//! refused likewise. When a tar holds both an `oci-layout` and a `manifest.json` (Docker ≥ 25
//! writes both), the OCI index is used.

use std::fs::{self, File};
use std::io;
use std::path::Path;

use layerwright_cache::{Digest, LayerRecord, Sha256Writer, Store};
use rayon::prelude::*;
use serde::Deserialize;

use super::archive::{Archive, compression_of_magic, normalise_member_name, read_up_to};
use super::error::ImportError;
use crate::layer::{self, Compression, LayerIndex};
use crate::oci::{Descriptor, Platform, media_types};
use crate::tree;

/// An imported base image: its layers (bottom first), their indexes, and its config document.
#[derive(Debug, Clone)]
pub struct BaseImage {
    pub layers: Vec<LayerRecord>,
    pub indexes: Vec<LayerIndex>,
    pub config: serde_json::Value,
}

/// What identifies an archive's content for the step key: a sha256 hex of the archive file
/// (tar archives) or of the layout's `index.json` plus the manifest it selects (layout dirs).
///
/// For a layout, every document on the way from `index.json` to the selected manifest (nested
/// indexes included) is hashed: the manifest names its config and layers by digest, so these
/// few small files identify the whole image without reading a layer.
pub fn archive_identity(path: &Path, platform: Option<&Platform>) -> Result<String, ImportError> {
    let metadata = fs::metadata(path).map_err(|source| ImportError::Open { archive: path.to_owned(), source })?;
    let mut hasher = Sha256Writer::new(io::sink());
    if metadata.is_dir() {
        let archive = Archive::open(path)?;
        check_oci_layout_file(&archive)?;
        let selected = select_oci_manifest(&archive, platform)?;
        for document in &selected.documents {
            io::Write::write_all(&mut hasher, document).expect("writing to a sink does not fail");
        }
    } else {
        let mut file = File::open(path).map_err(|source| ImportError::Open { archive: path.to_owned(), source })?;
        io::copy(&mut file, &mut hasher).map_err(|source| ImportError::Read {
            archive: path.to_owned(),
            entry: "the archive file".into(),
            source,
        })?;
    }
    let (digest, _, _) = hasher.finish();
    Ok(digest.hex().to_owned())
}

/// Imports the base image at `path` (format auto-detected) into `store`, for this host.
#[cfg(any(test, feature = "testing"))]
pub fn import_archive(store: &Store, path: &Path) -> Result<BaseImage, ImportError> {
    import_archive_for(store, path, None)
}

/// [`import_archive`] for `platform` (`None`: this host's, leniently: a single image of another
/// platform is taken as it is).
pub fn import_archive_for(store: &Store, path: &Path, platform: Option<&Platform>) -> Result<BaseImage, ImportError> {
    let fetched = fetch_base_image(store, path, platform)?;
    let indexes = index_and_apply_layers(store, path, &fetched.layers)?;
    Ok(BaseImage { layers: fetched.layers, indexes, config: fetched.config })
}

/// [`import_archive`] for a base that RUN steps will stack (`prepare_snapshots`): each layer
/// is indexed and, from the same decompressed stream on another thread, unpacked into its
/// snapshot, all layers at once, inside the base's own step. The RUN steps above then start
/// with their lowers ready instead of all waiting for the same unpack while other steps (a
/// large COPY compressing on every core) compete for the CPU. A snapshot is installed only
/// when its layer's diff id checked out; one that could not be made is left to the RUN.
///
/// A layer whose blob digest the archive names (every OCI layer, and `docker save`'s
/// uncompressed ones) is indexed and unpacked from a second read of its member while the first
/// copies it into the store, so that the import costs the longer of the two, not their sum.
pub fn import_archive_for_runs(
    store: &Store,
    path: &Path,
    prepare_snapshots: bool,
    platform: Option<&Platform>,
) -> Result<BaseImage, ImportError> {
    if !prepare_snapshots {
        return import_archive_for(store, path, platform);
    }
    let archive = Archive::open(path)?;
    let selected = select_base_image(store, &archive, platform)?;
    let (layers, indexes): (Vec<LayerRecord>, Vec<LayerIndex>) = selected
        .layers
        .par_iter()
        .map(|layer| store_index_and_unpack(store, &archive, layer))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    tree::apply_indexes(&layers, &indexes).map_err(|source| ImportError::Layer { archive: path.to_owned(), source })?;
    Ok(BaseImage { layers, indexes, config: selected.config })
}

/// Stores one layer of the archive, indexes it, and unpacks its snapshot (installed only when
/// the blob and the diff id both checked out).
fn store_index_and_unpack(
    store: &Store,
    archive: &Archive,
    layer: &ArchiveLayer,
) -> Result<(LayerRecord, LayerIndex), ImportError> {
    let layer_error = |source| ImportError::Layer { archive: archive.path.clone(), source };
    let mut snapshot = crate::layer::snapshot::StreamedSnapshot::start(store, crate::layer::snapshot::flavour()).ok();
    let mut unpack = |bytes: &[u8]| {
        if let Some(snapshot) = snapshot.as_mut() {
            snapshot.push(bytes);
        }
    };
    let (record, index) = match &layer.expected {
        // The blob's digest is known only once it is stored: store, then index what was stored.
        None => {
            let record = store_layer(store, archive, layer)?;
            let index = layer::index_layer_observed(store, &record, &mut unpack).map_err(layer_error)?;
            (record, index)
        }
        // What indexing needs of the record is known before the blob is stored: its digest (for
        // errors), its diff id and its media type.
        Some(expected) => {
            let provisional = LayerRecord {
                diff_id: layer.diff_id.clone(),
                digest: expected.clone(),
                size: 0,
                media_type: layer.compression.media_type().to_owned(),
            };
            let (stored, indexed) = rayon::join(
                || store_layer(store, archive, layer),
                || {
                    let blob = archive.open_member(&layer.entry)?;
                    layer::index_blob_observed(store, &provisional, blob, &mut unpack).map_err(layer_error)
                },
            );
            (stored?, indexed?)
        }
    };
    if let Some(snapshot) = snapshot {
        snapshot.finish(&record);
    }
    Ok((record, index))
}

/// The blobs of an archive's image, copied into the store and verified, before indexing.
#[derive(Debug)]
struct FetchedImage {
    layers: Vec<LayerRecord>,
    config: serde_json::Value,
}

/// Everything of an import but the layer indexing: selects the image, copies and verifies its
/// blobs.
fn fetch_base_image(store: &Store, path: &Path, platform: Option<&Platform>) -> Result<FetchedImage, ImportError> {
    let archive = Archive::open(path)?;
    let selected = select_base_image(store, &archive, platform)?;
    let layers =
        selected.layers.iter().map(|layer| store_layer(store, &archive, layer)).collect::<Result<Vec<_>, _>>()?;
    Ok(FetchedImage { layers, config: selected.config })
}

/// The image an archive holds, before its layers are read: its config (already stored) and
/// where each layer's bytes are.
#[derive(Debug)]
struct SelectedImage {
    layers: Vec<ArchiveLayer>,
    config: serde_json::Value,
}

/// A layer of the selected image before its bytes are read.
#[derive(Debug)]
struct ArchiveLayer {
    /// The archive member holding the blob.
    entry: String,
    diff_id: Digest,
    /// The digest the blob must have when the archive says: an OCI descriptor's, a docker
    /// `blobs/sha256/` name, or the diff id of an uncompressed docker-archive member. Other
    /// members claim nothing (their diff id is checked when they are indexed).
    expected: Option<Digest>,
    compression: Compression,
}

/// Everything of an import but reading the layers: detects the format, selects the image,
/// stores and verifies its config, and says where its layers are.
fn select_base_image(
    store: &Store,
    archive: &Archive,
    platform: Option<&Platform>,
) -> Result<SelectedImage, ImportError> {
    // Docker ≥ 25 writes both an OCI index and a manifest.json; the OCI index is the richer
    // (and content-addressed) description, so it wins.
    if archive.contains("oci-layout") {
        return select_oci_image(store, archive, platform);
    }
    if archive.is_tar() && archive.contains("manifest.json") {
        return select_docker_image(store, archive, platform);
    }
    let reason = if archive.is_tar() {
        "the tar holds neither an oci-layout (OCI archive) nor a manifest.json (docker-archive)"
    } else {
        "the directory has no oci-layout file, so it is not an OCI image layout"
    };
    Err(archive.invalid(reason))
}

/// Copies one layer's member into the store, verified against the digest the archive names.
fn store_layer(store: &Store, archive: &Archive, layer: &ArchiveLayer) -> Result<LayerRecord, ImportError> {
    let mut member = archive.open_member(&layer.entry)?;
    let stored = archive.store_member(store, &layer.entry, &mut member, layer.expected.as_ref())?;
    Ok(LayerRecord {
        diff_id: layer.diff_id.clone(),
        digest: stored.digest,
        size: stored.size,
        media_type: layer.compression.media_type().to_owned(),
    })
}

/// `tree::index_and_apply_layers`, its errors naming the archive.
fn index_and_apply_layers(
    store: &Store,
    archive: &Path,
    layers: &[LayerRecord],
) -> Result<Vec<LayerIndex>, ImportError> {
    tree::index_and_apply_layers(store, layers)
        .map_err(|source| ImportError::Layer { archive: archive.to_owned(), source })
}

// ---------------------------------------------------------------------------------------------
// OCI image layouts and OCI archives

/// How deep image indexes may nest before the archive is considered malformed.
const MAX_INDEX_DEPTH: usize = 4;

#[derive(Debug, Deserialize)]
struct ImageIndex {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageManifest {
    media_type: Option<String>,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// The image manifest an OCI index leads to, and every document read on the way there
/// (`index.json` first, the manifest last).
struct SelectedManifest {
    entry: String,
    documents: Vec<Vec<u8>>,
}

impl SelectedManifest {
    fn manifest_bytes(&self) -> &[u8] {
        self.documents.last().expect("a selection ends with its manifest")
    }
}

fn select_oci_image(
    store: &Store,
    archive: &Archive,
    platform: Option<&Platform>,
) -> Result<SelectedImage, ImportError> {
    check_oci_layout_file(archive)?;
    let selected = select_oci_manifest(archive, platform)?;
    let manifest: ImageManifest = archive.parse_json(selected.manifest_bytes(), &selected.entry)?;
    if let Some(media_type) = &manifest.media_type
        && !media_types::is_manifest(media_type)
    {
        return Err(archive.invalid(format!("manifest {} has unsupported media type {media_type}", selected.entry)));
    }

    let config_digest = archive.parse_digest(&manifest.config.digest, &selected.entry)?;
    let config_entry = blob_entry(&config_digest);
    let config_bytes = archive.read_verified_document(&config_entry, &config_digest)?;
    // Kept in the store with its original bytes, so the base's config digest stays resolvable.
    store.put_blob(&config_bytes)?;
    let config: serde_json::Value = archive.parse_json(&config_bytes, &config_entry)?;
    check_config_platform(archive, &config, platform)?;
    let diff_ids = diff_ids_of(archive, &config, &config_entry)?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(archive.invalid(format!(
            "manifest {} lists {} layers, but its config {config_entry} lists {} diff ids",
            selected.entry,
            manifest.layers.len(),
            diff_ids.len()
        )));
    }

    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (descriptor, diff_id) in manifest.layers.iter().zip(diff_ids) {
        let digest = archive.parse_digest(&descriptor.digest, &selected.entry)?;
        let entry = blob_entry(&digest);
        let declared_media_type = descriptor.media_type.as_deref().unwrap_or_default();
        // Docker media types are stored under their OCI names: the bytes are the same, and the
        // manifests the builder writes are OCI manifests.
        let Some(compression) = Compression::from_media_type(declared_media_type) else {
            return Err(archive.invalid(format!("layer {entry} has unsupported media type {declared_media_type:?}")));
        };
        layers.push(ArchiveLayer { entry, diff_id, expected: Some(digest), compression });
    }
    Ok(SelectedImage { layers, config })
}

/// The `oci-layout` file must be a JSON object naming a layout version; nothing else in it
/// matters, but a file that is not one means the archive is something else.
fn check_oci_layout_file(archive: &Archive) -> Result<(), ImportError> {
    let bytes = archive.read_document("oci-layout")?;
    let layout: serde_json::Value = archive.parse_json(&bytes, "oci-layout")?;
    if layout.get("imageLayoutVersion").and_then(serde_json::Value::as_str).is_none() {
        return Err(archive.invalid("oci-layout does not name an imageLayoutVersion"));
    }
    Ok(())
}

/// Walks from `index.json` through nested indexes to one image manifest (see the module docs
/// for which one), reading and verifying each document on the way.
fn select_oci_manifest(archive: &Archive, platform: Option<&Platform>) -> Result<SelectedManifest, ImportError> {
    let mut entry = "index.json".to_owned();
    let mut documents = vec![archive.read_document(&entry)?];
    for _ in 0..MAX_INDEX_DEPTH {
        let index_bytes = documents.last().expect("documents start with index.json");
        let index: ImageIndex = archive.parse_json(index_bytes, &entry)?;
        let descriptor = choose_descriptor(archive, &entry, &index.manifests, platform)?;
        let digest = archive.parse_digest(&descriptor.digest, &entry)?;
        let child_entry = blob_entry(&digest);
        let child_bytes = archive.read_verified_document(&child_entry, &digest)?;
        let is_index = match descriptor.media_type.as_deref() {
            Some(media_type) if media_types::is_index(media_type) => true,
            Some(media_type) if media_types::is_manifest(media_type) => false,
            Some(other) => {
                return Err(archive.invalid(format!("{entry} names {child_entry} with unsupported media type {other}")));
            }
            // Descriptors without a media type are tolerated: the document itself says.
            None => {
                let child: serde_json::Value = archive.parse_json(&child_bytes, &child_entry)?;
                child.get("manifests").is_some()
            }
        };
        documents.push(child_bytes);
        if !is_index {
            return Ok(SelectedManifest { entry: child_entry, documents });
        }
        entry = child_entry;
    }
    Err(archive.invalid(format!("image indexes are nested more than {MAX_INDEX_DEPTH} deep")))
}

/// One descriptor out of an index's list: the only image, or the first for this host.
fn choose_descriptor<'a>(
    archive: &Archive,
    entry: &str,
    descriptors: &'a [Descriptor],
    platform: Option<&Platform>,
) -> Result<&'a Descriptor, ImportError> {
    let Some(first) = descriptors.first() else {
        return Err(archive.invalid(format!("{entry} lists no manifests")));
    };
    let wanted = platform.cloned().unwrap_or_else(Platform::host);
    // Several tags of one image are several descriptors with the same digest. Built for this
    // host, such an image is taken whatever its platform; built for a platform named, it must be
    // for that one (or say nothing of its platform).
    if descriptors.iter().all(|descriptor| descriptor.digest == first.digest)
        && (platform.is_none() || first.platform.as_ref().is_none_or(|offered| wanted.accepts(offered)))
    {
        return Ok(first);
    }
    let chosen = descriptors
        .iter()
        .find(|descriptor| descriptor.platform.as_ref().is_some_and(|offered| wanted.accepts(offered)));
    if let Some(descriptor) = chosen {
        return Ok(descriptor);
    }
    let offered: Vec<String> =
        descriptors.iter().filter_map(|descriptor| descriptor.platform.as_ref().map(Platform::to_string)).collect();
    let names: Vec<&str> = descriptors
        .iter()
        .filter_map(|descriptor| descriptor.annotations.get(media_types::REF_NAME_ANNOTATION).map(String::as_str))
        .collect();
    Err(archive.invalid(format!(
        "{entry} lists {} manifests and none is for {wanted} (it offers {}; ref names: {names:?})",
        descriptors.len(),
        if offered.is_empty() { "no platforms".to_owned() } else { offered.join(", ") },
    )))
}

/// For a build for a platform named: the image's config must be for it.
fn check_config_platform(
    archive: &Archive,
    config: &serde_json::Value,
    platform: Option<&Platform>,
) -> Result<(), ImportError> {
    let Some(wanted) = platform else { return Ok(()) };
    let (Some(os), Some(architecture)) = (config["os"].as_str(), config["architecture"].as_str()) else {
        return Ok(());
    };
    let variant = config["variant"].as_str().map(str::to_owned);
    let offered = Platform { os: os.to_owned(), architecture: architecture.to_owned(), variant };
    if wanted.accepts(&offered) {
        return Ok(());
    }
    Err(archive.invalid(format!("it holds an image for {offered}, not for {wanted}")))
}

/// The member holding the blob `digest` in an OCI layout.
fn blob_entry(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

// ---------------------------------------------------------------------------------------------
// docker-archive (`docker save`)

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

fn select_docker_image(
    store: &Store,
    archive: &Archive,
    platform: Option<&Platform>,
) -> Result<SelectedImage, ImportError> {
    let manifest_bytes = archive.read_document("manifest.json")?;
    let images: Vec<DockerManifestEntry> = archive.parse_json(&manifest_bytes, "manifest.json")?;
    let Some(image) = images.first() else {
        return Err(archive.invalid("manifest.json lists no image"));
    };
    if images.iter().any(|other| other.config != image.config) {
        let tags: Vec<&String> = images.iter().flat_map(|image| image.repo_tags.iter().flatten()).collect();
        return Err(archive.invalid(format!(
            "manifest.json lists {} different images (tags {tags:?}); layerwright imports an archive \
             holding one image, so `docker save` a single image",
            images.len()
        )));
    }

    let config_entry = normalise_member_name(&image.config);
    let config_bytes = archive.read_document(&config_entry)?;
    let config_digest = Digest::of_bytes(&config_bytes);
    if let Some(named) = digest_named_by(&config_entry)
        && named != config_digest
    {
        return Err(archive.digest_mismatch(&config_entry, &named, &config_digest));
    }
    store.put_blob(&config_bytes)?;
    let config: serde_json::Value = archive.parse_json(&config_bytes, &config_entry)?;
    check_config_platform(archive, &config, platform)?;
    let diff_ids = diff_ids_of(archive, &config, &config_entry)?;
    if diff_ids.len() != image.layers.len() {
        return Err(archive.invalid(format!(
            "manifest.json lists {} layers, but the config {config_entry} lists {} diff ids",
            image.layers.len(),
            diff_ids.len()
        )));
    }

    let mut layers = Vec::with_capacity(image.layers.len());
    for (member, diff_id) in image.layers.iter().zip(diff_ids) {
        let entry = normalise_member_name(member);
        layers.push(docker_layer(archive, entry, diff_id)?);
    }
    Ok(SelectedImage { layers, config })
}

/// One layer member of a docker-archive. `docker save` writes uncompressed tars, whose sha256
/// is the diff id and is checked when it is stored; a compressed member (other writers, or a
/// hand-made archive) is stored as it is, its diff id then being checked by `index_layer`.
fn docker_layer(archive: &Archive, entry: String, diff_id: Digest) -> Result<ArchiveLayer, ImportError> {
    let mut reader = archive.open_member(&entry)?;
    let mut magic = [0u8; 4];
    let magic_length = read_up_to(&mut reader, &mut magic).map_err(|source| archive.read_error(&entry, source))?;
    let compression = compression_of_magic(&magic[..magic_length]);
    // An uncompressed member must hash to its diff id. A compressed one named
    // `blobs/sha256/<digest>` (Docker ≥ 25) must hash to that name; other names claim nothing.
    let expected = match compression {
        Compression::None => Some(diff_id.clone()),
        _ => digest_named_by(&entry),
    };
    Ok(ArchiveLayer { entry, diff_id, expected, compression })
}

/// The digest a docker-archive member's name claims: `blobs/sha256/<hex>` (Docker ≥ 25) or
/// `<hex>.json` (the config of older `docker save`). Other names claim nothing.
fn digest_named_by(entry: &str) -> Option<Digest> {
    let hex = entry.strip_prefix("blobs/sha256/").or_else(|| entry.strip_suffix(".json"))?;
    Digest::from_hex(hex).ok()
}

/// The config's `rootfs.diff_ids`, parsed.
fn diff_ids_of(archive: &Archive, config: &serde_json::Value, config_entry: &str) -> Result<Vec<Digest>, ImportError> {
    let Some(diff_ids) = config.pointer("/rootfs/diff_ids").and_then(serde_json::Value::as_array) else {
        return Err(archive.invalid(format!("config {config_entry} has no rootfs.diff_ids list")));
    };
    diff_ids
        .iter()
        .map(|diff_id| {
            let text = diff_id.as_str().unwrap_or_default();
            archive.parse_digest(text, config_entry)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Write;
    use std::path::PathBuf;

    use super::*;
    use crate::base::archive::{Storage, TarMember, resolve_tar_member};
    use crate::layer::TreeError;
    use crate::oci::media_types::{OCI_INDEX as OCI_INDEX_MEDIA_TYPE, OCI_MANIFEST as OCI_MANIFEST_MEDIA_TYPE};

    // -- hand-made archives ---------------------------------------------------------------

    /// A tar of regular files, each 0644 root-owned with mtime 0.
    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, content) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, name, *content).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn layer_tar() -> Vec<u8> {
        tar_of(&[("etc/hostname", b"base\n"), ("hello.txt", b"hello\n")])
    }

    fn config_for(diff_ids: &[&Digest]) -> Vec<u8> {
        let diff_ids: Vec<String> = diff_ids.iter().map(|diff_id| diff_id.to_string()).collect();
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap()
    }

    /// A `docker save`-style archive (pre-25 naming): `<hex>.json`, `<id>/layer.tar`.
    fn docker_archive(dir: &Path, layers: &[Vec<u8>], diff_ids: &[&Digest]) -> PathBuf {
        let config = config_for(diff_ids);
        let config_name = format!("{}.json", Digest::of_bytes(&config).hex());
        let layer_names: Vec<String> = (0..layers.len()).map(|index| format!("layer{index}id/layer.tar")).collect();
        let manifest = serde_json::to_vec(&serde_json::json!([
            {"Config": config_name, "RepoTags": ["base:latest"], "Layers": layer_names}
        ]))
        .unwrap();
        let mut files: Vec<(&str, &[u8])> = vec![("manifest.json", &manifest), (&config_name, &config)];
        for (name, bytes) in layer_names.iter().zip(layers) {
            files.push((name, bytes));
        }
        let path = dir.join("docker.tar");
        fs::write(&path, tar_of(&files)).unwrap();
        path
    }

    /// The files of an OCI layout holding one image with the given layer blobs.
    fn oci_layout_files(layers: &[(Vec<u8>, &Digest, &str)]) -> Vec<(String, Vec<u8>)> {
        let diff_ids: Vec<&Digest> = layers.iter().map(|(_, diff_id, _)| *diff_id).collect();
        let config = config_for(&diff_ids);
        let config_digest = Digest::of_bytes(&config);
        let layer_descriptors: Vec<serde_json::Value> = layers
            .iter()
            .map(|(bytes, _, media_type)| {
                serde_json::json!({"mediaType": media_type, "digest": Digest::of_bytes(bytes).to_string(), "size": bytes.len()})
            })
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len()},
            "layers": layer_descriptors,
        }))
        .unwrap();
        let manifest_digest = Digest::of_bytes(&manifest);
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": OCI_MANIFEST_MEDIA_TYPE,
                "digest": manifest_digest.to_string(),
                "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }],
        }))
        .unwrap();
        let mut files = vec![
            ("oci-layout".to_owned(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
            ("index.json".to_owned(), index),
            (blob_entry(&manifest_digest), manifest),
            (blob_entry(&config_digest), config),
        ];
        for (bytes, _, _) in layers {
            files.push((blob_entry(&Digest::of_bytes(bytes)), bytes.clone()));
        }
        files
    }

    fn write_layout(dir: &Path, files: &[(String, Vec<u8>)]) -> PathBuf {
        let layout = dir.join("layout");
        for (name, bytes) in files {
            let path = layout.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, bytes).unwrap();
        }
        layout
    }

    fn write_tar(dir: &Path, name: &str, files: &[(String, Vec<u8>)]) -> PathBuf {
        let borrowed: Vec<(&str, &[u8])> =
            files.iter().map(|(name, bytes)| (name.as_str(), bytes.as_slice())).collect();
        let path = dir.join(name);
        fs::write(&path, tar_of(&borrowed)).unwrap();
        path
    }

    fn store_in(dir: &Path) -> Store {
        Store::open(dir.join("store")).unwrap()
    }

    // -- tests of this module alone (no layer indexing) ------------------------------------

    #[test]
    fn docker_archive_layers_are_verified_against_diff_ids_and_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path());
        let layer = layer_tar();
        let diff_id = Digest::of_bytes(&layer);
        let archive = docker_archive(dir.path(), std::slice::from_ref(&layer), &[&diff_id]);

        let fetched = fetch_base_image(&store, &archive, None).unwrap();
        assert_eq!(
            fetched.layers,
            vec![LayerRecord {
                diff_id: diff_id.clone(),
                digest: diff_id.clone(),
                size: layer.len() as u64,
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            }]
        );
        assert_eq!(fs::read(store.blob_path(&diff_id)).unwrap(), layer);
        assert_eq!(fetched.config["config"]["Env"][0], "PATH=/bin");
        let config_digest = Digest::of_bytes(&config_for(&[&diff_id]));
        assert!(store.has_blob(&config_digest), "the config is kept in the store");
    }

    #[test]
    fn docker_archive_gzip_layers_are_stored_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path());
        let layer = layer_tar();
        let compressed = gzip(&layer);
        let diff_id = Digest::of_bytes(&layer);
        let archive = docker_archive(dir.path(), std::slice::from_ref(&compressed), &[&diff_id]);

        let fetched = fetch_base_image(&store, &archive, None).unwrap();
        let record = &fetched.layers[0];
        assert_eq!(record.diff_id, diff_id);
        assert_eq!(record.digest, Digest::of_bytes(&compressed));
        assert_eq!(record.size, compressed.len() as u64);
        assert_eq!(record.media_type, "application/vnd.oci.image.layer.v1.tar+gzip");
        assert_eq!(fs::read(store.blob_path(&record.digest)).unwrap(), compressed);
    }

    #[test]
    fn docker_archive_layer_not_matching_its_diff_id_is_refused_naming_the_member() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path());
        let claimed = Digest::of_bytes(b"something else");
        let archive = docker_archive(dir.path(), &[layer_tar()], &[&claimed]);

        let error = fetch_base_image(&store, &archive, None).unwrap_err();
        let ImportError::DigestMismatch { archive: named_archive, entry, expected, actual } = &error else {
            panic!("expected a digest mismatch, got {error}");
        };
        assert_eq!(named_archive, &archive);
        assert_eq!(entry, "layer0id/layer.tar");
        assert_eq!(expected, &claimed.to_string());
        assert_eq!(actual, &Digest::of_bytes(&layer_tar()).to_string());
        assert!(error.to_string().contains("layer0id/layer.tar"), "{error}");
        assert!(!store.has_blob(&claimed));
    }

    #[test]
    fn docker_archive_config_not_matching_its_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layer = layer_tar();
        let diff_id = Digest::of_bytes(&layer);
        let wrong_name = format!("{}.json", Digest::of_bytes(b"not the config").hex());
        let manifest = serde_json::to_vec(&serde_json::json!([
            {"Config": wrong_name, "RepoTags": null, "Layers": ["l/layer.tar"]}
        ]))
        .unwrap();
        let config = config_for(&[&diff_id]);
        let archive = write_tar(
            dir.path(),
            "docker.tar",
            &[("manifest.json".into(), manifest), (wrong_name.clone(), config), ("l/layer.tar".into(), layer)],
        );
        let error = fetch_base_image(&store_in(dir.path()), &archive, None).unwrap_err();
        assert!(matches!(&error, ImportError::DigestMismatch { entry, .. } if *entry == wrong_name), "{error}");
    }

    #[test]
    fn docker_archive_layers_reached_through_symlinks_are_read() {
        // Older `docker save` writes a layer shared by two images once and symlinks the other.
        let dir = tempfile::tempdir().unwrap();
        let layer = layer_tar();
        let diff_id = Digest::of_bytes(&layer);
        let config = config_for(&[&diff_id]);
        let config_name = format!("{}.json", Digest::of_bytes(&config).hex());
        let manifest =
            serde_json::to_vec(&serde_json::json!([{"Config": config_name, "Layers": ["second/layer.tar"]}])).unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        for (name, bytes) in
            [("manifest.json", &manifest), (config_name.as_str(), &config), ("first/layer.tar", &layer)]
        {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            builder.append_data(&mut header, name, bytes.as_slice()).unwrap();
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        builder.append_link(&mut header, "second/layer.tar", "../first/layer.tar").unwrap();
        let path = dir.path().join("docker.tar");
        fs::write(&path, builder.into_inner().unwrap()).unwrap();

        let fetched = fetch_base_image(&store_in(dir.path()), &path, None).unwrap();
        assert_eq!(fetched.layers[0].digest, diff_id);
    }

    #[test]
    fn docker_archive_with_several_images_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!([
            {"Config": "a.json", "RepoTags": ["a:1"], "Layers": []},
            {"Config": "b.json", "RepoTags": ["b:1"], "Layers": []},
        ]))
        .unwrap();
        let archive = write_tar(dir.path(), "two.tar", &[("manifest.json".into(), manifest)]);
        let error = fetch_base_image(&store_in(dir.path()), &archive, None).unwrap_err();
        assert!(matches!(error, ImportError::Invalid { .. }), "{error}");
        assert!(error.to_string().contains("a:1"), "{error}");
    }

    #[test]
    fn oci_layout_and_oci_archive_give_the_same_verified_records() {
        let dir = tempfile::tempdir().unwrap();
        let layer = layer_tar();
        let compressed = gzip(&layer);
        let diff_id = Digest::of_bytes(&layer);
        // A Docker media type is recorded under its OCI name.
        let files =
            oci_layout_files(&[(compressed.clone(), &diff_id, "application/vnd.docker.image.rootfs.diff.tar.gzip")]);
        let expected = vec![LayerRecord {
            diff_id: diff_id.clone(),
            digest: Digest::of_bytes(&compressed),
            size: compressed.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        }];

        let layout = write_layout(dir.path(), &files);
        let from_layout = fetch_base_image(&store_in(&dir.path().join("a")), &layout, None).unwrap();
        assert_eq!(from_layout.layers, expected);

        let archive = write_tar(dir.path(), "oci.tar", &files);
        let store = store_in(&dir.path().join("b"));
        let from_archive = fetch_base_image(&store, &archive, None).unwrap();
        assert_eq!(from_archive.layers, expected);
        assert_eq!(from_archive.config, from_layout.config);
        assert_eq!(fs::read(store.blob_path(&expected[0].digest)).unwrap(), compressed);
    }

    #[test]
    fn tar_with_both_formats_is_read_through_its_oci_index() {
        // Docker ≥ 25: manifest.json and oci-layout side by side. The manifest.json here is
        // broken on purpose, so success shows the OCI index was the one used.
        let dir = tempfile::tempdir().unwrap();
        let layer = layer_tar();
        let diff_id = Digest::of_bytes(&layer);
        let mut files = oci_layout_files(&[(layer.clone(), &diff_id, "application/vnd.oci.image.layer.v1.tar")]);
        files.push(("manifest.json".into(), b"[{\"Config\": \"missing.json\"}]".to_vec()));
        let archive = write_tar(dir.path(), "docker25.tar", &files);
        let fetched = fetch_base_image(&store_in(dir.path()), &archive, None).unwrap();
        assert_eq!(fetched.layers[0].digest, diff_id);
    }

    #[test]
    fn oci_blob_not_matching_its_digest_is_refused_naming_the_blob() {
        let dir = tempfile::tempdir().unwrap();
        let layer = layer_tar();
        let diff_id = Digest::of_bytes(&layer);
        let mut files = oci_layout_files(&[(layer.clone(), &diff_id, "application/vnd.oci.image.layer.v1.tar")]);
        let layer_entry = blob_entry(&diff_id);
        files.iter_mut().find(|(name, _)| *name == layer_entry).unwrap().1 = b"tampered".to_vec();
        let layout = write_layout(dir.path(), &files);

        let error = fetch_base_image(&store_in(dir.path()), &layout, None).unwrap_err();
        assert!(matches!(&error, ImportError::DigestMismatch { entry, .. } if *entry == layer_entry), "{error}");
    }

    #[test]
    fn oci_index_with_several_platforms_selects_the_host_one() {
        let dir = tempfile::tempdir().unwrap();
        let layer = layer_tar();
        let diff_id = Digest::of_bytes(&layer);
        let mut files = oci_layout_files(&[(layer.clone(), &diff_id, "application/vnd.oci.image.layer.v1.tar")]);
        let top_index: serde_json::Value = serde_json::from_slice(&files[1].1).unwrap();
        let host_manifest = top_index["manifests"][0].clone();
        let host = crate::oci::Platform::host();
        let (os, architecture) = (host.os.as_str(), host.architecture.as_str());
        let mut other = serde_json::json!({
            "mediaType": OCI_MANIFEST_MEDIA_TYPE,
            "digest": Digest::of_bytes(b"another platform").to_string(),
            "size": 16,
            "platform": {"os": "linux", "architecture": "not-this-one"},
        });
        let mut for_host = host_manifest.clone();
        for_host["platform"] = serde_json::json!({"os": os, "architecture": architecture});
        let nested = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX_MEDIA_TYPE, "manifests": [other.take(), for_host],
        }))
        .unwrap();
        let nested_digest = Digest::of_bytes(&nested);
        files[1].1 = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": OCI_INDEX_MEDIA_TYPE, "digest": nested_digest.to_string(), "size": nested.len()}],
        }))
        .unwrap();
        files.push((blob_entry(&nested_digest), nested));
        let layout = write_layout(dir.path(), &files);

        let fetched = fetch_base_image(&store_in(dir.path()), &layout, None).unwrap();
        assert_eq!(fetched.layers[0].digest, diff_id);
    }

    #[test]
    fn archives_without_an_image_are_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path());
        let oci_layout_only = [("oci-layout".to_owned(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec())];
        let manifest_without_config = [("manifest.json".to_owned(), br#"[{"Config":"c.json","Layers":[]}]"#.to_vec())];
        let gzipped = dir.path().join("gzipped.tar.gz");
        fs::write(&gzipped, gzip(&layer_tar())).unwrap();
        let text = dir.path().join("text.txt");
        fs::write(&text, b"just text, not a tar").unwrap();
        let cases = [
            (write_tar(dir.path(), "plain.tar", &[("README".into(), b"hi".to_vec())]), "neither an oci-layout"),
            (write_tar(dir.path(), "empty.tar", &[]), "empty tar"),
            (write_layout(&dir.path().join("d"), &[("index.json".into(), b"{}".to_vec())]), "no oci-layout file"),
            (write_tar(dir.path(), "no-index.tar", &oci_layout_only), "no member index.json"),
            (write_tar(dir.path(), "no-config.tar", &manifest_without_config), "no member c.json"),
            (gzipped, "compressed"),
            (text, "nor a readable tar archive"),
        ];
        for (path, reason) in cases {
            let error = fetch_base_image(&store, &path, None).unwrap_err();
            assert!(matches!(error, ImportError::Invalid { .. }), "{}: {error}", path.display());
            let message = error.to_string();
            assert!(message.contains(reason), "{message:?} should say {reason:?}");
            assert!(message.contains(&path.display().to_string()), "{message:?} should name the archive");
        }
        let missing = fetch_base_image(&store, &dir.path().join("missing.tar"), None).unwrap_err();
        assert!(matches!(missing, ImportError::Open { .. }), "{missing}");
    }

    #[test]
    fn archive_identity_hashes_tar_files_and_layout_documents() {
        let dir = tempfile::tempdir().unwrap();
        let layer = layer_tar();
        let diff_id = Digest::of_bytes(&layer);
        let files = oci_layout_files(&[(layer.clone(), &diff_id, "application/vnd.oci.image.layer.v1.tar")]);

        let archive = write_tar(dir.path(), "oci.tar", &files);
        assert_eq!(archive_identity(&archive, None).unwrap(), Digest::of_bytes(&fs::read(&archive).unwrap()).hex());

        let layout = write_layout(dir.path(), &files);
        let index = &files[1].1;
        let manifest = &files[2].1;
        let expected = Digest::of_bytes(&[index.as_slice(), manifest.as_slice()].concat());
        assert_eq!(archive_identity(&layout, None).unwrap(), expected.hex());
        // Layers are named by the manifest, so the identity does not read them.
        fs::remove_file(layout.join(blob_entry(&diff_id))).unwrap();
        assert_eq!(archive_identity(&layout, None).unwrap(), expected.hex());
    }

    #[test]
    fn member_names_are_normalised_and_links_followed() {
        assert_eq!(normalise_member_name("./a//b/../c/"), "a/c");
        assert_eq!(normalise_member_name("../../x"), "x");
        let members = BTreeMap::from([
            ("data".to_owned(), TarMember::Data { offset: 512, size: 3 }),
            ("dir/hard".to_owned(), TarMember::HardLink { target: "data".into() }),
            ("dir/soft".to_owned(), TarMember::Symlink { target: "hard".into() }),
            ("loop".to_owned(), TarMember::Symlink { target: "loop".into() }),
        ]);
        assert_eq!(resolve_tar_member(&members, "./dir/soft"), Some((512, 3)));
        assert_eq!(resolve_tar_member(&members, "loop"), None);
        assert_eq!(resolve_tar_member(&members, "absent"), None);
    }

    #[test]
    fn exported_archives_import_back() {
        use crate::output::{ImageParts, write_docker_archive, write_oci_archive, write_oci_layout};
        let dir = tempfile::tempdir().unwrap();
        let source = store_in(&dir.path().join("source"));
        let layer = layer_tar();
        let compressed = gzip(&layer);
        let diff_id = Digest::of_bytes(&layer);
        let blob = source.put_blob(&compressed).unwrap();
        let config = source.put_blob(&config_for(&[&diff_id])).unwrap();
        let record = LayerRecord {
            diff_id,
            digest: blob.digest,
            size: blob.size,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        };
        let manifest_bytes = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.digest.to_string(), "size": config.size},
            "layers": [{"mediaType": record.media_type, "digest": record.digest.to_string(), "size": record.size}],
        }))
        .unwrap();
        let manifest = source.put_blob(&manifest_bytes).unwrap();
        let layers = [record.clone()];
        let parts = ImageParts {
            store: &source,
            manifest: &manifest.digest,
            manifest_size: manifest.size,
            config: &config.digest,
            layers: &layers,
        };
        let layout = dir.path().join("layout");
        let oci_archive = dir.path().join("oci.tar");
        let docker_archive = dir.path().join("docker.tar");
        write_oci_layout(parts, &layout, "base:1").unwrap();
        write_oci_archive(parts, &oci_archive, "base:1").unwrap();
        write_docker_archive(parts, &docker_archive, "base:1").unwrap();

        for path in [&layout, &oci_archive, &docker_archive] {
            let fetched = fetch_base_image(&store_in(&dir.path().join("imported")), path, None).unwrap();
            assert_eq!(fetched.layers, layers, "{}", path.display());
        }
        // The docker-archive alone (manifest.json only) reads the same: drop its OCI index.
        let archive = Archive::open(&docker_archive).unwrap();
        let Storage::Tar { members } = &archive.storage else { unreachable!() };
        assert!(members.contains_key("manifest.json") && members.contains_key("index.json"));
        let store = store_in(&dir.path().join("docker-only"));
        let selected = select_docker_image(&store, &archive, None).unwrap();
        let stored: Vec<LayerRecord> =
            selected.layers.iter().map(|layer| store_layer(&store, &archive, layer).unwrap()).collect();
        assert_eq!(stored, layers);
    }

    // -- tests that go through `tree::index_layer` and `FsTree::apply` ---------------------
    //
    // The whole import path: every layer indexed (diff ids verified, entry names checked) and
    // applied to one tree.

    mod needs_tree {
        use super::*;

        #[test]
        fn import_archive_indexes_and_applies_every_layer() {
            let dir = tempfile::tempdir().unwrap();
            let store = store_in(dir.path());
            let layer = layer_tar();
            let compressed = gzip(&layer);
            let diff_id = Digest::of_bytes(&layer);
            let archive = docker_archive(dir.path(), &[compressed], &[&diff_id]);

            let base = import_archive(&store, &archive).unwrap();
            assert_eq!(base.layers.len(), 1);
            assert_eq!(base.indexes.len(), 1);
            let paths: Vec<&str> = base.indexes[0].entries.iter().map(|entry| entry.path.as_str()).collect();
            assert_eq!(paths, ["etc/hostname", "hello.txt"]);
        }

        #[test]
        fn a_base_below_a_run_gets_its_snapshots_only_when_its_layers_check_out() {
            let dir = tempfile::tempdir().unwrap();
            let store = store_in(dir.path());
            let layer = layer_tar();
            let diff_id = Digest::of_bytes(&layer);
            let archive = docker_archive(dir.path(), &[gzip(&layer)], &[&diff_id]);
            let base = import_archive_for_runs(&store, &archive, true, None).unwrap();
            assert_eq!(base.indexes, import_archive(&store, &archive).unwrap().indexes);
            let snapshots: Vec<_> =
                fs::read_dir(store.snapshots_dir()).unwrap().map(|entry| entry.unwrap().path()).collect();
            assert_eq!(snapshots.len(), 1);
            assert!(snapshots[0].file_name().unwrap().to_string_lossy().starts_with(diff_id.hex()));
            assert!(snapshots[0].join("hello.txt").is_file());

            let other = tempfile::tempdir().unwrap();
            let store = store_in(other.path());
            let claimed = Digest::of_bytes(b"not the layer");
            let archive = docker_archive(other.path(), &[gzip(&layer)], &[&claimed]);
            assert!(import_archive_for_runs(&store, &archive, true, None).is_err());
            assert_eq!(fs::read_dir(store.snapshots_dir()).unwrap().count(), 0, "no snapshot of a refused layer");
            assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0, "nothing left in tmp/");
        }

        #[test]
        fn import_archive_refuses_a_gzip_layer_whose_diff_id_is_wrong() {
            let dir = tempfile::tempdir().unwrap();
            let store = store_in(dir.path());
            let claimed = Digest::of_bytes(b"not the layer");
            let archive = docker_archive(dir.path(), &[gzip(&layer_tar())], &[&claimed]);

            let error = import_archive(&store, &archive).unwrap_err();
            assert!(matches!(&error, ImportError::Layer { source: TreeError::DiffIdMismatch { .. }, .. }), "{error}");
            assert!(error.to_string().contains(&archive.display().to_string()), "{error}");
        }

        #[test]
        fn import_archive_refuses_entries_escaping_the_root() {
            let dir = tempfile::tempdir().unwrap();
            let store = store_in(dir.path());
            // The tar crate refuses to write `..`, so the name is written into the header raw.
            let mut header = tar::Header::new_gnu();
            header.as_old_mut().name[..13].copy_from_slice(b"../etc/passwd");
            header.set_size(3);
            header.set_mode(0o644);
            header.set_cksum();
            let mut builder = tar::Builder::new(Vec::new());
            builder.append(&header, &b"x:0"[..]).unwrap();
            let layer = builder.into_inner().unwrap();
            let diff_id = Digest::of_bytes(&layer);
            let archive = docker_archive(dir.path(), &[layer], &[&diff_id]);

            let error = import_archive(&store, &archive).unwrap_err();
            assert!(matches!(&error, ImportError::Layer { source: TreeError::EscapesRoot { .. }, .. }), "{error}");
        }
    }
}
