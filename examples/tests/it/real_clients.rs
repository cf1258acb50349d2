//! The example images checked by real clients: `oci-image-tool`, `skopeo`, `umoci` and a Docker
//! engine. These decide whether the output is right; the snapshot tests only say it is stable.
//!
//! They need the tools (Debian: skopeo umoci oci-image-tool docker.io busybox-static) and, for
//! `docker` and for `umoci` to keep owners, root and a running `dockerd` (`cargo xtask test`
//! starts one). Missing any of it fails the test naming what is missing, unless
//! `LAYERWRIGHT_SKIP_PRIVILEGED=1`.

use std::path::Path;

use layerwright::{Builder, BuiltImage, Compression};

use crate::support;

/// Builds example `name` into `cache` with the default options.
fn build_example(name: &str, cache: &Path) -> BuiltImage {
    support::build_example(name, cache, Compression::default())
}

#[test]
fn the_oci_layout_validates_inspects_copies_and_unpacks_to_exactly_the_declared_tree() {
    if !support::tools_present(&["oci-image-tool", "skopeo", "umoci"]) {
        return;
    }
    if !support::is_root() && !support::skip_privileged() {
        panic!("umoci can keep the image's owners only as root: run the tests as root (CI does)");
    }
    let dir = tempfile::tempdir().unwrap();
    let built = build_example("files", &dir.path().join("cache"));
    let layout = dir.path().join("layout");
    built.write_oci_layout(&layout, "files:latest").unwrap();

    support::oci_image_tool_validate(&layout);

    let inspected = support::skopeo_inspect(&format!("oci:{}:latest", layout.display()));
    assert_eq!(inspected["Digest"], built.manifest_digest());
    assert_eq!(inspected["Layers"].as_array().unwrap().len(), built.layers().len());

    let archive = dir.path().join("copied.tar");
    support::skopeo_copy(
        &format!("oci:{}:latest", layout.display()),
        &format!("docker-archive:{}:files:copied", archive.display()),
    );
    assert!(archive.metadata().unwrap().len() > 0);

    let oci_archive = dir.path().join("files-oci.tar");
    built.write_oci_archive(&oci_archive, "files:latest").unwrap();
    let inspected = support::skopeo_inspect(&format!("oci-archive:{}:latest", oci_archive.display()));
    assert_eq!(inspected["Digest"], built.manifest_digest());

    let rootfs = support::umoci_unpack(&layout, "latest", &dir.path().join("bundle"));
    let unpacked = support::tree_of(&rootfs);
    let listing = built.listing().unwrap();
    if support::is_root() {
        assert_eq!(unpacked, listing, "umoci unpacked something other than the image's listing");
    }
    for expected in [
        "file 0600 1000:1000 7 ",
        "file 4755 0:0 ",
        "dir 1777 0:0 - - /tmp\n",
        "dir 0750 1000:1000 - - /srv/data\n",
        "symlink 0777 0:0 - -> data /srv/current\n",
    ] {
        assert!(unpacked.contains(expected), "{expected:?} is not in the unpacked tree:\n{unpacked}");
    }
    assert!(!unpacked.contains("/tmp/scratch"), "a removed file was unpacked");
}

#[test]
fn docker_loads_and_runs_the_images() {
    let Some(docker) = support::docker() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let tag_suffix = std::process::id();

    let hello = build_example("hello", &cache);
    let hello_archive = dir.path().join("hello.tar");
    let hello_tag = format!("layerwright-test-hello:{tag_suffix}");
    hello.write_docker_archive(&hello_archive, &hello_tag).unwrap();
    assert_eq!(docker.load(&hello_archive), hello_tag);
    let output = docker.run(&hello_tag, &[]);
    docker.remove_image(&hello_tag);
    assert!(output.status.success(), "docker run failed: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "Hello from layerwright!\n");

    let files = build_example("files", &cache);
    let files_archive = dir.path().join("files.tar");
    let files_tag = format!("layerwright-test-files:{tag_suffix}");
    files.write_docker_archive(&files_archive, &files_tag).unwrap();
    assert_eq!(docker.load(&files_archive), files_tag);
    let default_command = docker.run(&files_tag, &[]);
    let explicit = docker.run(
        &files_tag,
        &["/bin/sh", "-c", "test ! -e /tmp/scratch && stat -c '%a %u:%g %n' /srv/data/secret /usr/local/bin/setuid-tool && readlink /srv/current && id -u"],
    );
    docker.remove_image(&files_tag);
    assert!(default_command.status.success(), "{}", String::from_utf8_lossy(&default_command.stderr));
    let stdout = String::from_utf8_lossy(&default_command.stdout);
    assert!(stdout.ends_with("removed\n"), "the removed path is visible in the container:\n{stdout}");
    assert!(explicit.status.success(), "{}", String::from_utf8_lossy(&explicit.stderr));
    assert_eq!(
        String::from_utf8_lossy(&explicit.stdout),
        "600 1000:1000 /srv/data/secret\n4755 0:0 /usr/local/bin/setuid-tool\ndata\n1000\n"
    );
}

#[test]
fn images_saved_by_docker_and_copied_by_skopeo_are_bases_to_build_on() {
    let Some(docker) = support::docker() else { return };
    if !support::tools_present(&["skopeo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let busybox = build_example("busybox", &cache);
    let tag = format!("layerwright-test-base:{}", std::process::id());
    let archive = dir.path().join("busybox.tar");
    busybox.write_docker_archive(&archive, &tag).unwrap();
    docker.load(&archive);

    // `docker save` writes the engine's own archive format; skopeo writes an OCI layout.
    let saved = dir.path().join("saved.tar");
    support::run_checked(
        docker.command().args(["save", "-o"]).arg(&saved).arg(&tag),
        std::time::Duration::from_secs(120),
    );
    docker.remove_image(&tag);
    let layout = dir.path().join("layout");
    support::skopeo_copy(&format!("docker-archive:{}", saved.display()), &format!("oci:{}:base", layout.display()));

    for base in [layerwright::Image::from_archive(&saved), layerwright::Image::from_archive(&layout)] {
        let image = base.write_file("/etc/motd", "built on a saved base\n").remove("/etc/group").cmd([
            "/bin/sh",
            "-c",
            "cat /etc/motd; test ! -e /etc/group && echo group-removed",
        ]);
        let built = Builder::new(&cache).unwrap().build(&image).unwrap();
        let built_tag = format!("layerwright-test-derived:{}", std::process::id());
        let built_archive = dir.path().join("derived.tar");
        built.write_docker_archive(&built_archive, &built_tag).unwrap();
        docker.load(&built_archive);
        let output = docker.run(&built_tag, &[]);
        docker.remove_image(&built_tag);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(String::from_utf8_lossy(&output.stdout), "built on a saved base\ngroup-removed\n");
    }
}
