//! The OCI content descriptor: what a manifest or index says about a blob it names.
//!
//! What it deliberately is not: a verifier; a descriptor read from an archive or a registry is a
//! claim until the blob it names is hashed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::platform::Platform;

/// A descriptor as manifests and indexes carry it. Fields layerwright does not use (`urls`,
/// `data`) are not modelled: documents are written from `serde_json::Value`s,
/// and reading ignores them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The media type of the blob; Docker manifest lists may leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// `sha256:…` of the blob.
    pub digest: String,
    /// The blob's size in bytes (0 when a document left it out).
    #[serde(default)]
    pub size: u64,
    /// Annotations (a layout's `org.opencontainers.image.ref.name`, say).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The artifact type of an artifact manifest an index names (OCI 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The platform of an index entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// A descriptor of `media_type` naming `digest` of `size` bytes, with nothing else.
    #[cfg_attr(not(feature = "registry"), allow(dead_code))]
    pub fn plain(media_type: &str, digest: impl ToString, size: u64) -> Descriptor {
        Descriptor {
            media_type: Some(media_type.to_owned()),
            digest: digest.to_string(),
            size,
            annotations: BTreeMap::new(),
            artifact_type: None,
            platform: None,
        }
    }
}
