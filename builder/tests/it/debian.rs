//! A real Debian base: `apt-get update && apt-get install` in a RUN step with isolated
//! networking (its own network namespace, outbound through slirp4netns, DNS through its
//! forwarder). The base is the bookworm minbase rootfs `.ci/run` makes once per machine with
//! `mmdebstrap` ([`MINBASE`]), wrapped here as a one-layer OCI image layout; the step fetches
//! from deb.debian.org, the only non-loopback host any test reaches. The image is built with its
//! attestations, and its SPDX SBOM must list exactly the packages `dpkg -l` shows installed.
//!
//! It needs root (the sandbox's namespaces and mounts, and apt's switch to its `_apt` user):
//! without root, or without the tarball, it fails saying what is missing, unless
//! `LAYERWRIGHT_SKIP_PRIVILEGED=1`, with which it skips saying so. What it is not: a test of
//! apt, or of the network's isolation (the sandbox's and the escape suite's tests do that).

use std::fs;

use std::path::Path;

use layerwright::{Builder, BuilderOptions, Image, Run};

/// The rootfs tarball `.ci/run` makes with
/// `mmdebstrap --variant=minbase --mode=root bookworm MINBASE`.
const MINBASE: &str = layerwright::host::DEBIAN_MINBASE_TAR;

fn skip_privileged() -> bool {
    std::env::var("LAYERWRIGHT_SKIP_PRIVILEGED").is_ok_and(|value| value == "1")
}

#[test]
fn apt_installs_in_a_debian_base_with_isolated_networking_and_the_sbom_lists_what_dpkg_shows() {
    if !rustix::process::geteuid().is_root() {
        assert!(
            skip_privileged(),
            "the Debian apt test needs root (CAP_SYS_ADMIN for the sandbox's namespaces and mounts, CAP_SETUID for \
             apt's _apt user); set LAYERWRIGHT_SKIP_PRIVILEGED=1 to skip it"
        );
        eprintln!("skipped: the Debian apt test needs root (LAYERWRIGHT_SKIP_PRIVILEGED=1)");
        return;
    }
    if !Path::new(MINBASE).is_file() {
        assert!(
            skip_privileged(),
            "{MINBASE} is missing: run .ci/run (it builds it once with `mmdebstrap --variant=minbase --mode=root \
             bookworm {MINBASE}`)"
        );
        eprintln!("skipped: {MINBASE} is missing (LAYERWRIGHT_SKIP_PRIVILEGED=1; .ci/run makes it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layout = layerwright::host::rootfs_tar_as_oci_layout(Path::new(MINBASE), &dir.path().join("layout")).unwrap();
    let (sink, lines) = layerwright::testing::output_collector();
    let options = BuilderOptions::default().progress(sink);
    let builder = Builder::with_options(dir.path().join("cache"), options).unwrap();
    // Built with its attestations: the SBOM must list what `dpkg -l` shows installed.
    let image = Image::from_archive(&layout)
        .run(
            Run::shell(
                "grep nameserver /etc/resolv.conf && apt-get update -q && apt-get install -y -q \
                 --no-install-recommends hello && dpkg -l hello | tail -n 1 | cut -c1-9 && hello",
            )
            .network(true),
        )
        .run("dpkg -l | awk '/^ii/ { sub(/:.*/, \"\", $2); print \"installed \" $2 }'");
    let index = builder.build_attested(&image).unwrap_or_else(|error| panic!("the apt step failed: {error}"));
    let built = &index.images()[0].1;
    let lines = lines.lock().unwrap().clone();
    assert_eq!(lines.first().map(String::as_str), Some("nameserver 10.0.2.3"), "{lines:#?}");
    assert!(lines.iter().any(|line| line == "ii  hello"), "dpkg -l hello did not list it installed: {lines:#?}");
    assert!(lines.iter().any(|line| line == "Hello, world!"), "{lines:#?}");
    let listing = built.listing().unwrap();
    assert!(
        listing.lines().any(|line| line.ends_with(" /usr/bin/hello") && line.starts_with("file")),
        "/usr/bin/hello is not in the image"
    );

    let installed: std::collections::BTreeSet<&str> =
        lines.iter().filter_map(|line| line.strip_prefix("installed ")).collect();
    assert!(installed.contains("hello") && installed.len() > 50, "{installed:?}");
    let sbom = sbom_of(&index, &dir.path().join("attested"));
    let packages: std::collections::BTreeSet<&str> =
        sbom["packages"].as_array().unwrap().iter().filter_map(|package| package["name"].as_str()).collect();
    assert_eq!(packages, installed, "the SBOM's packages are what dpkg -l shows installed");
}

/// The SPDX document of the first image of `index`, read back from an OCI layout of it at `dir`.
fn sbom_of(index: &layerwright::BuiltIndex, dir: &Path) -> serde_json::Value {
    index.write_oci_layout(dir, "debian:1").unwrap();
    let blob = |digest: &str| -> serde_json::Value {
        let path = dir.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap());
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    };
    let layout_index: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let image_index = blob(layout_index["manifests"][0]["digest"].as_str().unwrap());
    let attestation = blob(image_index["manifests"][1]["digest"].as_str().unwrap());
    attestation["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| blob(layer["digest"].as_str().unwrap()))
        .find(|statement| statement["predicateType"] == "https://spdx.dev/Document")
        .map(|statement| statement["predicate"].clone())
        .expect("an SPDX statement")
}
