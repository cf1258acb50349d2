//! The documents of an export: the layout's `index.json` (merged with what a layout already
//! holds) and the descriptor of the image's manifest.
//!
//! What it deliberately is not: a writer; it builds documents, `blobs` and `tar_archive` write.

use std::collections::BTreeMap;

use layerwright_cache::Digest;
use serde_json::{Value, json};

use super::tags::ImageReference;
use super::{ExportError, Exported, ImageParts};
use crate::oci::media_types;

/// The blobs of the image (manifest, config, layers; each once) and their sizes, sorted by
/// digest. The config's size is not in the parts, so it is read from the store.
pub(super) fn image_blob_sizes(parts: &ImageParts<'_>) -> Result<BTreeMap<Digest, u64>, ExportError> {
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

pub(super) fn blob_member(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// Every blob of what is exported (an index: its own and every image's), with its size.
pub(super) fn blob_sizes(exported: Exported<'_>) -> Result<BTreeMap<Digest, u64>, ExportError> {
    match exported {
        Exported::Image(parts) => image_blob_sizes(&parts),
        Exported::Index(index) => {
            let mut sizes = BTreeMap::from([(index.index.clone(), index.index_size)]);
            for parts in &index.images {
                sizes.extend(image_blob_sizes(parts)?);
            }
            Ok(sizes)
        }
    }
}

/// The `index.json` descriptor of what is exported (an image's manifest, or an image index)
/// under `reference`.
pub(super) fn manifest_descriptor(exported: Exported<'_>, reference: &ImageReference) -> Value {
    let (media_type, digest, size) = match exported {
        Exported::Image(parts) => (media_types::OCI_MANIFEST, parts.manifest, parts.manifest_size),
        Exported::Index(index) => (media_types::OCI_INDEX, index.index, index.index_size),
    };
    json!({
        "mediaType": media_type,
        "digest": digest.to_string(),
        "size": size,
        "annotations": {
            media_types::REF_NAME_ANNOTATION: reference.tag,
            media_types::CONTAINERD_NAME_ANNOTATION: reference.full_name,
        },
    })
}

/// A fresh index holding `descriptor`, or the `existing` index with `descriptor` in place of
/// the one with the same ref name (the others kept, in order). Errors are reasons.
pub(super) fn merged_index(existing: Option<&[u8]>, descriptor: Value, ref_name: &str) -> Result<Value, String> {
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
    let has_ref_name = |manifest: &Value| manifest["annotations"][media_types::REF_NAME_ANNOTATION] == ref_name;
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
    index.insert("mediaType".into(), json!(media_types::OCI_INDEX));
    index.insert("manifests".into(), Value::Array(manifests));
    Ok(Value::Object(index))
}
