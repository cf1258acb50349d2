//! Attestations of a built image: an in-toto SLSA provenance v1 statement (what it was built
//! from, by digest) and an SPDX 2.3 SBOM (the dpkg packages of its final tree and the files its
//! context copies put there), attached to an image index the way BuildKit does.
//!
//! Layout: for each image, an *attestation manifest* in the same index (platform
//! `unknown/unknown`, annotations `vnd.docker.reference.type: attestation-manifest` and
//! `vnd.docker.reference.digest: <the image's manifest>`) whose layers are the statements
//! (`application/vnd.in-toto+json`, each annotated with its `in-toto.io/predicate-type`).
//! BuildKit's layout rather than OCI 1.1 referrers because it travels inside the index: any
//! registry stores it (the `docker-registry` 2.8 of Debian has no referrers API), an OCI
//! layout or archive carries it, and `docker buildx imagetools` reads it.
//!
//! Reproducible: every document is canonical JSON with no wall-clock time (the SBOM's `created`
//! is the image config's, from `SOURCE_DATE_EPOCH` or 0), and nothing in it depends on where the
//! sources are on disk: inputs are named by the steps that read them.
//!
//! What it deliberately is not: a signature. Statements are unsigned; sign the index digest.

use std::collections::{BTreeMap, BTreeSet};

use layerwright_cache::{Digest, LayerRecord, Store, StoreError};
use serde_json::{Value, json};
use thiserror::Error;

use crate::layer::{IndexKind, TreeError};
use crate::oci::{Platform, canonical, media_types};
use crate::progress::StepReport;
use crate::solve::BuildInputs;
use crate::tree;

/// The media type of an in-toto statement layer.
const IN_TOTO_MEDIA_TYPE: &str = "application/vnd.in-toto+json";
/// The predicate type of SLSA provenance v1.
const SLSA_PROVENANCE: &str = "https://slsa.dev/provenance/v1";
/// The predicate type of an SPDX document.
const SPDX_DOCUMENT: &str = "https://spdx.dev/Document";
/// The build type the provenance names: layerwright's step graph, version 1.
const BUILD_TYPE: &str = "urn:layerwright:step-graph:v1";
/// Where dpkg keeps what is installed.
const DPKG_STATUS: &str = "var/lib/dpkg/status";

/// Why an image's attestations could not be made.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AttestError {
    /// A layer of the image could not be read.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A temporary directory for files read from the image could not be made.
    #[error("cannot create a temporary directory for the SBOM: {0}")]
    Spool(std::io::Error),
}

/// An image's attestation manifest, stored as blobs: what an index and its exports need.
#[derive(Debug, Clone)]
pub(crate) struct Attestation {
    pub manifest: Digest,
    pub manifest_size: u64,
    pub config: Digest,
    pub layers: Vec<LayerRecord>,
}

/// What an attestation is about.
pub(crate) struct Subject<'a> {
    pub store: &'a Store,
    pub manifest: &'a Digest,
    pub config: &'a Digest,
    pub layers: &'a [LayerRecord],
    pub steps: &'a [StepReport],
    pub inputs: &'a BuildInputs,
    pub platform: &'a Platform,
}

/// Writes the provenance and SBOM statements of `subject` and their attestation manifest into
/// the store.
pub(crate) fn attest(subject: &Subject<'_>) -> Result<Attestation, AttestError> {
    let config: Value =
        serde_json::from_slice(&std::fs::read(subject.store.blob_path(subject.config)).map_err(|source| {
            StoreError::Io { action: "read config blob", path: subject.store.blob_path(subject.config), source }
        })?)
        .unwrap_or(Value::Null);
    let created = config["created"].as_str().unwrap_or("1970-01-01T00:00:00Z").to_owned();
    let statements = [
        (SLSA_PROVENANCE, statement(subject, SLSA_PROVENANCE, provenance(subject))),
        (SPDX_DOCUMENT, statement(subject, SPDX_DOCUMENT, sbom(subject, &created)?)),
    ];
    let mut layers = Vec::new();
    let mut descriptors = Vec::new();
    for (predicate_type, document) in statements {
        let blob = subject.store.put_blob(&canonical::to_bytes(&document))?;
        descriptors.push(json!({
            "mediaType": IN_TOTO_MEDIA_TYPE,
            "digest": blob.digest.to_string(),
            "size": blob.size,
            "annotations": { "in-toto.io/predicate-type": predicate_type },
        }));
        layers.push(LayerRecord {
            diff_id: blob.digest.clone(),
            digest: blob.digest,
            size: blob.size,
            media_type: IN_TOTO_MEDIA_TYPE.to_owned(),
        });
    }
    let diff_ids: Vec<String> = layers.iter().map(|layer| layer.diff_id.to_string()).collect();
    let attestation_config = json!({
        "architecture": "unknown",
        "os": "unknown",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config_blob = subject.store.put_blob(&canonical::to_bytes(&attestation_config))?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media_types::OCI_MANIFEST,
        "config": { "mediaType": media_types::OCI_CONFIG, "digest": config_blob.digest.to_string(), "size": config_blob.size },
        "layers": descriptors,
    });
    let manifest_blob = subject.store.put_blob(&canonical::to_bytes(&manifest))?;
    Ok(Attestation {
        manifest: manifest_blob.digest,
        manifest_size: manifest_blob.size,
        config: config_blob.digest,
        layers,
    })
}

/// The index descriptor of `attestation`, which attests the image `image_manifest`.
pub(crate) fn descriptor(attestation: &Attestation, image_manifest: &Digest) -> Value {
    json!({
        "mediaType": media_types::OCI_MANIFEST,
        "digest": attestation.manifest.to_string(),
        "size": attestation.manifest_size,
        "annotations": {
            "vnd.docker.reference.digest": image_manifest.to_string(),
            "vnd.docker.reference.type": "attestation-manifest",
        },
        "platform": { "architecture": "unknown", "os": "unknown" },
    })
}

/// An in-toto v1 statement about the image's manifest.
fn statement(subject: &Subject<'_>, predicate_type: &str, predicate: Value) -> Value {
    json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{ "name": subject.platform.to_string(), "digest": { "sha256": subject.manifest.hex() } }],
        "predicateType": predicate_type,
        "predicate": predicate,
    })
}

/// The SLSA provenance v1 predicate: the declaration and every input by digest.
fn provenance(subject: &Subject<'_>) -> Value {
    let inputs = subject.inputs;
    let mut dependencies: Vec<Value> = inputs
        .bases
        .iter()
        .map(|(label, algorithm, digest)| json!({ "name": label, "digest": { *algorithm: digest } }))
        .collect();
    dependencies
        .extend(inputs.contexts.iter().map(|(label, digest)| json!({ "name": label, "digest": { "blake3": digest } })));
    json!({
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {
                "platform": subject.platform.to_string(),
                "declaration": { "blake3": inputs.declaration_blake3 },
                "steps": subject.steps.iter().map(|step| step.label.clone()).collect::<Vec<_>>(),
            },
            "resolvedDependencies": dependencies,
        },
        "runDetails": {
            "builder": { "id": format!("urn:layerwright:{}", env!("CARGO_PKG_VERSION")) },
            "metadata": {},
        },
    })
}

/// The SPDX 2.3 document of the image's final tree: dpkg packages and context-copied files.
fn sbom(subject: &Subject<'_>, created: &str) -> Result<Value, AttestError> {
    let tree = tree::of_layers(subject.store, subject.layers)?;
    let packages = match tree.get(DPKG_STATUS) {
        Some(node) if matches!(node.entry.kind, IndexKind::File { .. }) => {
            let spool = tempfile::tempdir_in(subject.store.tmp_dir()).map_err(AttestError::Spool)?;
            let wanted = BTreeMap::from([(node.layer, BTreeSet::from([DPKG_STATUS.to_owned()]))]);
            let spooled = tree::extract_files(subject.store, subject.layers, &wanted, spool.path())?;
            let status = std::fs::read_to_string(&spooled[DPKG_STATUS]).unwrap_or_default();
            installed_packages(&status)
        }
        _ => Vec::new(),
    };
    let copy_layers: BTreeSet<usize> = subject
        .layers
        .iter()
        .enumerate()
        .filter(|(_, record)| {
            let digest = record.digest.to_string();
            subject
                .steps
                .iter()
                .any(|step| step.layer.as_deref() == Some(digest.as_str()) && step.label.starts_with("COPY "))
        })
        .map(|(position, _)| position)
        .collect();
    let files: Vec<Value> = tree
        .subtree("")
        .filter(|(_, node)| copy_layers.contains(&node.layer))
        .filter_map(|(path, node)| match &node.entry.kind {
            IndexKind::File { sha256, .. } => Some((path, sha256)),
            _ => None,
        })
        .enumerate()
        .map(|(number, (path, sha256))| {
            json!({
                "SPDXID": format!("SPDXRef-File-{}", number + 1),
                "fileName": format!("/{path}"),
                "checksums": [{ "algorithm": "SHA256", "checksumValue": sha256.hex() }],
            })
        })
        .collect();
    let packages: Vec<Value> = packages
        .iter()
        .enumerate()
        .map(|(number, package)| {
            json!({
                "SPDXID": format!("SPDXRef-Package-{}", number + 1),
                "name": package.name,
                "versionInfo": package.version,
                "downloadLocation": "NOASSERTION",
                "supplier": "NOASSERTION",
                "externalRefs": [{
                    "referenceCategory": "PACKAGE-MANAGER",
                    "referenceType": "purl",
                    "referenceLocator": format!("pkg:deb/debian/{}@{}?arch={}", package.name, package.version, package.architecture),
                }],
            })
        })
        .collect();
    Ok(json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("image {}", subject.manifest),
        "documentNamespace": format!("urn:layerwright:sbom:{}", subject.manifest.hex()),
        "creationInfo": { "created": created, "creators": [format!("Tool: layerwright-{}", env!("CARGO_PKG_VERSION"))] },
        "packages": packages,
        "files": files,
    }))
}

/// One installed dpkg package.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Package {
    name: String,
    version: String,
    architecture: String,
}

/// The packages `dpkg -l` lists as installed (`ii`) in a `status` file, sorted by name.
fn installed_packages(status: &str) -> Vec<Package> {
    let mut packages: Vec<Package> = status
        .split("\n\n")
        .filter_map(|paragraph| {
            let field = |name: &str| {
                paragraph
                    .lines()
                    .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(':')))
                    .map(|value| value.trim().to_owned())
            };
            (field("Status")? == "install ok installed").then_some(())?;
            Some(Package { name: field("Package")?, version: field("Version")?, architecture: field("Architecture")? })
        })
        .collect();
    packages.sort_by(|left, right| left.name.cmp(&right.name));
    packages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_installed_packages_are_listed() {
        let status = "Package: zlib1g\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1:1.2.13\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1\n\n\
                      Package: bash\nStatus: install ok installed\nArchitecture: amd64\nVersion: 5.2.15-2+b2\n";
        let names: Vec<String> = installed_packages(status).into_iter().map(|package| package.name).collect();
        assert_eq!(names, ["bash", "zlib1g"]);
    }
}
