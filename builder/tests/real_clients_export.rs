//! The exporters checked by real clients: an image assembled by hand in a store (a gzip layer
//! with a setuid file, a 0600 file owned by 1000:1000 and a symlink) is written as an OCI
//! layout, an OCI archive and a docker-archive, and `oci-image-tool`, `skopeo`, `umoci` and
//! (when an engine is reachable) `docker load` must accept what was written.
//!
//! The exporters are private to the crate (users reach them through `BuiltImage`), and this
//! test must not depend on the builder, so it compiles `src/export.rs` into itself: the module
//! uses nothing of the crate but its dependencies.

mod support;

#[path = "../src/export.rs"]
mod export;

use std::fs;
use std::io::Write;
use std::path::Path;

use layerwright_cache::{Digest, LayerRecord, Store};
use serde_json::json;

use export::ImageParts;

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TOOL_CONTENT: &[u8] = b"#!/bin/sh\necho tool\n";
const SECRET_CONTENT: &[u8] = b"secret\n";

/// An image whose manifest, config and one gzip layer are in a store of its own.
struct HandMadeImage {
    _dir: tempfile::TempDir,
    store: Store,
    manifest: Digest,
    manifest_size: u64,
    config: Digest,
    layers: Vec<LayerRecord>,
}

impl HandMadeImage {
    fn parts(&self) -> ImageParts<'_> {
        ImageParts {
            store: &self.store,
            manifest: &self.manifest,
            manifest_size: self.manifest_size,
            config: &self.config,
            layers: &self.layers,
        }
    }
}

/// One tar entry, every header field set by hand (never the tar crate's defaults).
fn append_entry(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &str,
    entry_type: tar::EntryType,
    mode: u32,
    owner: u64,
    link_target: Option<&str>,
    content: &[u8],
) {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(entry_type);
    header.set_mode(mode);
    header.set_uid(owner);
    header.set_gid(owner);
    header.set_mtime(0);
    header.set_size(content.len() as u64);
    if let Some(target) = link_target {
        header.set_link_name(target).unwrap();
    }
    builder.append_data(&mut header, path, content).unwrap();
}

fn hand_made_image() -> HandMadeImage {
    use tar::EntryType::{Directory, Regular, Symlink};
    let mut builder = tar::Builder::new(Vec::new());
    append_entry(&mut builder, "app/", Directory, 0o755, 0, None, b"");
    append_entry(&mut builder, "app/bin/", Directory, 0o755, 0, None, b"");
    append_entry(&mut builder, "app/bin/tool", Regular, 0o4755, 0, None, TOOL_CONTENT);
    append_entry(&mut builder, "app/current", Symlink, 0o777, 0, Some("bin/tool"), b"");
    append_entry(&mut builder, "home/", Directory, 0o755, 0, None, b"");
    append_entry(&mut builder, "home/user/", Directory, 0o700, 1000, None, b"");
    append_entry(&mut builder, "home/user/secret", Regular, 0o600, 1000, None, SECRET_CONTENT);
    let layer_tar = builder.into_inner().unwrap();
    let diff_id = Digest::of_bytes(&layer_tar);
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&layer_tar).unwrap();
    let compressed = encoder.finish().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let layer = store.put_blob(&compressed).unwrap();
    let config = store
        .put_blob(
            &serde_json::to_vec(&json!({
                "architecture": host_architecture(),
                "os": "linux",
                "config": {"Entrypoint": ["/app/bin/tool"], "Env": ["PATH=/app/bin"]},
                "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
                "history": [{"created_by": "layerwright real_clients_export test"}],
            }))
            .unwrap(),
        )
        .unwrap();
    let manifest = store
        .put_blob(
            &serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config.digest.to_string(),
                    "size": config.size,
                },
                "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer.digest.to_string(), "size": layer.size}],
            }))
            .unwrap(),
        )
        .unwrap();
    HandMadeImage {
        _dir: dir,
        store,
        manifest: manifest.digest,
        manifest_size: manifest.size,
        config: config.digest,
        layers: vec![LayerRecord {
            diff_id,
            digest: layer.digest,
            size: layer.size,
            media_type: LAYER_MEDIA_TYPE.into(),
        }],
    }
}

fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn sha256_of(bytes: &[u8]) -> String {
    Digest::of_bytes(bytes).to_string()
}

/// What `umoci unpack` must produce from the hand-made layer, in `support::tree_of` format.
fn expected_tree() -> String {
    [
        "d 0755 0:0 - - /app".to_owned(),
        "d 0755 0:0 - - /app/bin".to_owned(),
        format!("f 4755 0:0 {} {} /app/bin/tool", TOOL_CONTENT.len(), sha256_of(TOOL_CONTENT)),
        "l 0777 0:0 - bin/tool /app/current".to_owned(),
        "d 0755 0:0 - - /home".to_owned(),
        "d 0700 1000:1000 - - /home/user".to_owned(),
        format!("f 0600 1000:1000 {} {} /home/user/secret", SECRET_CONTENT.len(), sha256_of(SECRET_CONTENT)),
    ]
    .map(|line| line + "\n")
    .concat()
}

/// A tag of its own per process, so that runs sharing a docker engine do not collide.
fn test_tag() -> String {
    format!("layerwright-real-clients-export:p{}", std::process::id())
}

#[test]
fn oci_layout_is_accepted_by_oci_image_tool_skopeo_and_umoci() {
    let (Some(_), Some(_), Some(_)) =
        (support::require_tool("oci-image-tool"), support::require_tool("skopeo"), support::require_tool("umoci"))
    else {
        return;
    };
    let image = hand_made_image();
    let out = tempfile::tempdir().unwrap();
    let layout = out.path().join("layout");
    export::write_oci_layout(image.parts(), &layout, "app:latest").unwrap();
    // A second tag in the same layout must not disturb the first.
    export::write_oci_layout(image.parts(), &layout, "app:v1").unwrap();

    support::oci_image_tool_validate(&layout);

    let inspected = support::skopeo_inspect(&format!("oci:{}:latest", layout.display()));
    assert_eq!(inspected["Digest"], image.manifest.to_string(), "{inspected:#}");
    assert_eq!(inspected["Layers"], json!([image.layers[0].digest.to_string()]), "{inspected:#}");
    assert_eq!(inspected["Architecture"], host_architecture(), "{inspected:#}");

    let copied = out.path().join("copied-docker.tar");
    support::skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker-archive:{}:app:v1", copied.display()),
    );
    let copied_inspected = support::skopeo_inspect(&format!("docker-archive:{}", copied.display()));
    assert_eq!(copied_inspected["Env"], json!(["PATH=/app/bin"]), "{copied_inspected:#}");

    let rootfs = support::umoci_unpack(&layout, "latest", &out.path().join("bundle"));
    assert_eq!(support::tree_of(&rootfs), expected_tree());
}

#[test]
fn oci_archive_is_read_by_skopeo_and_unpacks_the_same_tree() {
    let (Some(_), Some(_)) = (support::require_tool("skopeo"), support::require_tool("umoci")) else {
        return;
    };
    let image = hand_made_image();
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("app-oci.tar");
    export::write_oci_archive(image.parts(), &archive, "app:latest").unwrap();

    let inspected = support::skopeo_inspect(&format!("oci-archive:{}:latest", archive.display()));
    assert_eq!(inspected["Digest"], image.manifest.to_string(), "{inspected:#}");

    // skopeo re-reads the archive and writes a layout of its own, which umoci then unpacks.
    let layout = out.path().join("via-skopeo");
    support::skopeo_copy(
        &format!("oci-archive:{}:latest", archive.display()),
        &format!("oci:{}:latest", layout.display()),
    );
    let rootfs = support::umoci_unpack(&layout, "latest", &out.path().join("bundle"));
    assert_eq!(support::tree_of(&rootfs), expected_tree());
}

#[test]
fn docker_archive_is_read_by_skopeo_and_loaded_by_docker() {
    let Some(_) = support::require_tool("skopeo") else {
        return;
    };
    let image = hand_made_image();
    let out = tempfile::tempdir().unwrap();
    let tag = test_tag();
    let archive = out.path().join("app-docker.tar");
    export::write_docker_archive(image.parts(), &archive, &tag).unwrap();

    let inspected = support::skopeo_inspect(&format!("docker-archive:{}", archive.display()));
    // skopeo reads docker-archives through manifest.json and the config: it names layers by
    // their diff ids, and reports no RepoTags for them.
    assert_eq!(inspected["Layers"], json!([image.layers[0].diff_id.to_string()]), "{inspected:#}");
    assert_eq!(inspected["Architecture"], host_architecture(), "{inspected:#}");
    // It is an OCI archive as well.
    let as_oci =
        support::skopeo_inspect(&format!("oci-archive:{}:{}", archive.display(), tag.rsplit(':').next().unwrap()));
    assert_eq!(as_oci["Digest"], image.manifest.to_string(), "{as_oci:#}");

    let Some(docker) = support::docker() else {
        return;
    };
    docker.remove_image(&tag);
    let loaded = docker.load(&archive);
    assert_eq!(loaded, tag);
    assert!(docker.image_exists(&tag));
    // docker decompressed the gzip layer and found the config's diff id.
    let diff_ids = docker.inspect_image(&tag, "{{json .RootFS.Layers}}");
    assert_eq!(diff_ids, json!([image.layers[0].diff_id.to_string()]).to_string());
    assert_eq!(docker.inspect_image(&tag, "{{.Id}}"), image.config.to_string());
    docker.remove_image(&tag);
}

#[test]
fn tree_of_lists_what_is_on_disk() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join("a/b")).unwrap();
    fs::write(root.join("a/b/file"), b"x").unwrap();
    fs::set_permissions(root.join("a/b/file"), fs::Permissions::from_mode(0o4750)).unwrap();
    fs::set_permissions(root.join("a"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o1777)).unwrap();
    symlink("b/file", root.join("a-link")).unwrap();
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    let listing = support::tree_of(Path::new(root));
    // Sorted by path string, as FsTree keys are: `a-link` comes before `a/b` ('-' < '/').
    let expected = format!(
        "d 0755 {uid}:{gid} - - /a\n\
         l 0777 {uid}:{gid} - b/file /a-link\n\
         d 1777 {uid}:{gid} - - /a/b\n\
         f 4750 {uid}:{gid} 1 {} /a/b/file\n",
        sha256_of(b"x")
    );
    assert_eq!(listing, expected);
}
