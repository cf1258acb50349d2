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
use std::fs::{self};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use layerwright_cache::{Digest, LayerRecord, Store};
use serde_json::json;
use thiserror::Error;

mod blobs;
mod docker_load;
mod documents;
mod tags;
mod tar_archive;

use blobs::{copy_blob_into_layout, write_atomically, write_error};
use documents::blob_sizes;
use documents::{blob_member, manifest_descriptor, merged_index};
use tags::ImageReference;
use tar_archive::write_layout_tar;

pub use docker_load::{LoadError, LoadReport, load_into_docker};

use crate::oci::canonical::to_bytes as canonical_json;
use crate::oci::media_types::OCI_LAYOUT_CONTENT;

/// Why an image could not be exported as an OCI layout, OCI archive or docker-archive.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ExportError {
    /// Writing the output (a blob, a document, the archive file, or a directory of the layout)
    /// failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// The IO error from the operating system.
        source: std::io::Error,
    },
    /// The tag to export the image under is not a valid image reference.
    #[error("invalid tag {tag:?}: {reason}")]
    InvalidTag {
        /// The tag as given.
        tag: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The cache's store could not be read.
    #[error(transparent)]
    Store(#[from] layerwright_cache::StoreError),
    /// Reading a blob from the store, or the layout's existing `index.json`, failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file being read.
        path: PathBuf,
        /// The IO error from the operating system.
        source: std::io::Error,
    },
    /// A blob in the cache no longer has the size and digest it is stored under. It is removed
    /// from the cache when this is raised, so the next build makes it again.
    #[error(
        "cache blob {path} is corrupt: it should be {expected_size} bytes with digest {digest}, but is {actual_size} bytes with digest {actual}; it was removed from the cache, so building again rebuilds it"
    )]
    CorruptBlob {
        /// The blob's file in the store.
        path: PathBuf,
        /// The digest it is stored under.
        digest: Digest,
        /// The size in bytes it should have.
        expected_size: u64,
        /// The digest of the bytes actually read.
        actual: Digest,
        /// The number of bytes actually read.
        actual_size: u64,
    },
    /// The layout's existing `index.json` cannot be parsed or merged with the new image.
    #[error("{path} cannot be updated: {reason}")]
    ExistingIndex {
        /// The `index.json` file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
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

/// An image index and its images, every blob in `store`.
#[derive(Debug, Clone)]
pub struct IndexParts<'a> {
    pub store: &'a Store,
    pub index: &'a Digest,
    pub index_size: u64,
    pub images: Vec<ImageParts<'a>>,
}

/// What a layout or an archive holds: one image, or an index of images.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Exported<'a> {
    Image(ImageParts<'a>),
    Index(&'a IndexParts<'a>),
}

impl Exported<'_> {
    fn store(&self) -> &Store {
        match self {
            Exported::Image(parts) => parts.store,
            Exported::Index(index) => index.store,
        }
    }
}

/// Writes (or updates) the OCI image layout `dir` so that it holds the image under `tag`.
pub fn write_oci_layout(parts: ImageParts<'_>, dir: &Path, tag: &str) -> Result<(), ExportError> {
    write_layout(Exported::Image(parts), dir, tag)
}

/// Writes (or updates) the OCI image layout `dir` so that it holds the index under `tag`.
pub fn write_index_layout(index: &IndexParts<'_>, dir: &Path, tag: &str) -> Result<(), ExportError> {
    write_layout(Exported::Index(index), dir, tag)
}

/// Writes the OCI archive `file`: the index's OCI layout as a tar.
pub fn write_index_archive(index: &IndexParts<'_>, file: &Path, tag: &str) -> Result<(), ExportError> {
    let reference = ImageReference::parse(tag)?;
    write_layout_tar(Exported::Index(index), &reference, file, BTreeMap::new())
}

fn write_layout(exported: Exported<'_>, dir: &Path, tag: &str) -> Result<(), ExportError> {
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
    for (digest, size) in blob_sizes(exported)? {
        copy_blob_into_layout(exported.store(), &digest, size, &blobs_dir)?;
    }

    let index_path = dir.join("index.json");
    let existing = match fs::read(&index_path) {
        Ok(bytes) => Some(bytes),
        Err(error) if error.kind() == io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(ExportError::Read { path: index_path, source });
        }
    };
    let index = merged_index(existing.as_deref(), manifest_descriptor(exported, &reference), &reference.tag)
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
    write_layout_tar(Exported::Image(parts), &reference, file, BTreeMap::new())
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
    write_layout_tar(Exported::Image(parts), &reference, file, extra)
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;

    use serde_json::Value;

    use super::*;
    use crate::oci::media_types::{
        CONTAINERD_NAME_ANNOTATION, OCI_INDEX as OCI_INDEX_MEDIA_TYPE, OCI_MANIFEST as OCI_MANIFEST_MEDIA_TYPE,
        REF_NAME_ANNOTATION,
    };

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
