//! Multi-platform images: one OCI index for several platforms, a step that does not depend on
//! the platform built once, and RUN steps of a foreign platform executed under qemu-user.
//!
//! The emulated test needs `qemu-user-static` registered with binfmt_misc (flag F) and a static
//! arm64 busybox; `.ci/run` sets both up. Without them it fails naming what is missing, unless
//! `LAYERWRIGHT_SKIP_PRIVILEGED=1`.

use std::path::PathBuf;

use layerwright::{Builder, Context, FileOptions, Image, Platform};

use crate::support;

/// Where `.ci/run` puts the arm64 busybox (from Debian's `busybox-static:arm64`).
const ARM64_BUSYBOX: &str = "/usr/local/lib/layerwright-test/busybox-arm64";

#[test]
fn an_index_names_each_platform_and_shares_what_does_not_depend_on_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("app")).unwrap();
    std::fs::write(dir.path().join("app/index.html"), "<h1>hi</h1>\n").unwrap();
    let context = Context::dir(dir.path().join("app")).unwrap();
    let image = Image::scratch().copy(&context, ".", "/srv").cmd(["/srv/index.html"]);
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let (amd64, arm64) = (Platform::parse("linux/amd64").unwrap(), Platform::parse("linux/arm64").unwrap());
    // Without attestations: oci-image-tool (spec 1.0) refuses the in-toto media type of their
    // layers, as it does BuildKit's; `attestations_…` below checks those.
    let options = layerwright::IndexOptions::default().without_attestations();
    let index = builder.build_index_with(&[(amd64.clone(), &image), (arm64.clone(), &image)], &options).unwrap();

    let images = index.images();
    assert!(!images[0].1.steps().iter().find(|step| step.label == "COPY . /srv").unwrap().cached);
    assert!(images[1].1.steps().iter().find(|step| step.label == "COPY . /srv").unwrap().cached, "built once");
    assert_eq!(images[0].1.layers(), images[1].1.layers(), "one layer for both");
    assert_eq!(images[1].1.config().unwrap()["architecture"], "arm64");
    assert_ne!(images[0].1.manifest_digest(), images[1].1.manifest_digest());

    let layout = dir.path().join("layout");
    index.write_oci_layout(&layout, "site:1").unwrap();
    if !support::tools_present(&["skopeo", "oci-image-tool"]) {
        return;
    }
    support::oci_image_tool_validate(&layout);
    let raw = support::skopeo_inspect_raw(&format!("oci:{}:1", layout.display()));
    let platform_of = |manifest: &serde_json::Value| {
        format!(
            "{}/{}",
            manifest["platform"]["os"].as_str().unwrap(),
            manifest["platform"]["architecture"].as_str().unwrap()
        )
    };
    let platforms: Vec<String> = raw["manifests"].as_array().unwrap().iter().map(platform_of).collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    let archive = dir.path().join("site.tar");
    index.write_oci_archive(&archive, "site:1").unwrap();
    let inspected = support::skopeo_inspect_raw(&format!("oci-archive:{}:1", archive.display()));
    assert_eq!(inspected, raw);

    // Pushed to a registry, each platform is pulled back by skopeo.
    let Some(registry) = support::registry() else { return };
    let reference = format!("{}/site:1", registry.address());
    let report = index.push(&reference).unwrap();
    assert_eq!(report.manifest_digest, index.manifest_digest());
    assert_eq!(support::skopeo_inspect_raw(&format!("docker://{reference}")), raw);
    for (architecture, (_, image)) in ["amd64", "arm64"].iter().zip(images) {
        let tool = support::require_tool("skopeo").unwrap();
        let output = support::run_checked(
            std::process::Command::new(tool).args([
                "--override-arch",
                architecture,
                "inspect",
                "--tls-verify=false",
                &format!("docker://{reference}"),
            ]),
            std::time::Duration::from_secs(60),
        );
        let inspected: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        // `Digest` is the index's; the layers and the architecture are the platform's image's.
        let layers: Vec<String> = image.layers().iter().map(|layer| layer.digest.to_string()).collect();
        assert_eq!(inspected["Layers"], serde_json::json!(layers));
        assert_eq!(inspected["Architecture"], *architecture);
    }
}

/// A busybox base for `busybox` (a static binary of the image's platform), with `sh`, `uname`
/// and `cat`.
fn busybox_base(busybox: &std::path::Path) -> Image {
    let context = Context::dir(busybox.parent().unwrap()).unwrap();
    let name = busybox.file_name().unwrap().to_str().unwrap();
    Image::scratch()
        .copy_with(&context, name, "/bin/busybox", layerwright::CopyOptions::default().with_mode(0o755))
        .symlink("/bin/sh", "busybox")
        .symlink("/bin/uname", "busybox")
        .symlink("/bin/cat", "busybox")
        .write_file_with("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", FileOptions::mode(0o644))
}

/// The arm64 busybox `.ci/run` provides, or why the test cannot run.
fn arm64_busybox() -> Option<PathBuf> {
    let busybox = PathBuf::from(ARM64_BUSYBOX);
    if busybox.is_file() {
        return Some(busybox);
    }
    support::skip_or_panic(&format!(
        "the test needs an arm64 busybox at {ARM64_BUSYBOX} (`.ci/run` extracts Debian's busybox-static:arm64)"
    ))
}

#[test]
fn a_foreign_platform_runs_its_programs_under_emulation() {
    let Some(busybox) = arm64_busybox() else { return };
    let arm64 = Platform::parse("linux/arm64").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_base(&busybox).run("uname -m > /arch");
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let built = match builder.build_for(&image, &arm64) {
        Ok(built) => built,
        Err(error) if error.to_string().contains("binfmt_misc") => {
            return support::skip_or_panic::<()>(&error.to_string()).unwrap_or_default();
        }
        Err(error) if support::sandbox_unavailable(&error) => return,
        Err(error) => panic!("{error}"),
    };
    let listing = built.listing().unwrap();
    assert!(listing.contains(&format!("file 0644 0:0 8 {} /arch", support::sha256("aarch64\n"))), "{listing}");
    assert_eq!(built.config().unwrap()["architecture"], "arm64");
}

/// The path for a user of an index: `skopeo copy --override-arch arm64` out of it into a
/// docker-archive, `docker load`, `docker run --platform linux/arm64`: the container runs under
/// the engine's emulation and shows what the RUN step saw when it ran under the builder's.
#[test]
fn the_arm64_image_of_an_index_runs_in_docker() {
    let Some(arm64_busybox) = arm64_busybox() else { return };
    let Some(host_busybox) = support::require_tool("busybox") else { return };
    if !support::tools_present(&["skopeo"]) {
        return;
    }
    let Some(docker) = support::docker() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image_of = |busybox: &std::path::Path| busybox_base(busybox).run("uname -m > /arch").cmd(["/bin/cat", "/arch"]);
    let (amd64_image, arm64_image) = (image_of(&host_busybox), image_of(&arm64_busybox));
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let pairs = [
        (Platform::parse("linux/amd64").unwrap(), &amd64_image),
        (Platform::parse("linux/arm64").unwrap(), &arm64_image),
    ];
    let index = match builder.build_index(&pairs) {
        Ok(index) => index,
        Err(error) if error.to_string().contains("binfmt_misc") => {
            return support::skip_or_panic::<()>(&error.to_string()).unwrap_or_default();
        }
        Err(error) if support::sandbox_unavailable(&error) => return,
        Err(error) => panic!("{error}"),
    };
    let layout = dir.path().join("layout");
    index.write_oci_layout(&layout, "arch:1").unwrap();
    let archive = dir.path().join("arm64.tar");
    let tag = "layerwright-test/arch:arm64";
    let skopeo = support::require_tool("skopeo").unwrap();
    support::run_checked(
        std::process::Command::new(skopeo).args([
            "--override-arch",
            "arm64",
            "copy",
            &format!("oci:{}:1", layout.display()),
            &format!("docker-archive:{}:{tag}", archive.display()),
        ]),
        std::time::Duration::from_secs(60),
    );
    assert_eq!(docker.load(&archive), tag);
    let output = docker.run_on_platform("linux/arm64", tag, &[]);
    let uname = docker.run_on_platform("linux/arm64", tag, &["uname", "-m"]);
    docker.remove_image(tag);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "aarch64\n", "what the RUN step saw");
    assert_eq!(String::from_utf8_lossy(&uname.stdout), "aarch64\n", "{}", String::from_utf8_lossy(&uname.stderr));
}

/// The blob `digest` (`sha256:…`) of an OCI layout, as JSON.
fn layout_blob(layout: &std::path::Path, digest: &str) -> serde_json::Value {
    let path = layout.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap());
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The statements of the attestation manifest at `position` of a layout's index, by predicate.
fn statements(layout: &std::path::Path, position: usize) -> std::collections::BTreeMap<String, serde_json::Value> {
    let index = layout_blob(
        layout,
        support::skopeo_inspect_raw(&format!("oci:{}:1", layout.display()))["manifests"][position]["digest"]
            .as_str()
            .unwrap(),
    );
    index["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| {
            let statement = layout_blob(layout, layer["digest"].as_str().unwrap());
            (statement["predicateType"].as_str().unwrap().to_owned(), statement)
        })
        .collect()
}

#[test]
fn attestations_name_the_inputs_list_packages_and_files_and_are_reproducible() {
    if !support::tools_present(&["skopeo"]) {
        return;
    }
    let status = "Package: bash\nStatus: install ok installed\nArchitecture: amd64\nVersion: 5.2.15-2+b2\n\n\
                  Package: old\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1\n\n\
                  Package: coreutils\nStatus: install ok installed\nArchitecture: amd64\nVersion: 9.1-1\n";
    let build = |checkout: &std::path::Path| {
        std::fs::create_dir_all(checkout.join("app")).unwrap();
        std::fs::write(checkout.join("app/run.sh"), "echo hi\n").unwrap();
        let context = Context::dir(checkout.join("app")).unwrap();
        let image = Image::scratch().write_file("/var/lib/dpkg/status", status).copy(&context, ".", "/app");
        let builder = Builder::new(checkout.join("cache")).unwrap();
        let index = builder.build_index(&[(Platform::parse("linux/amd64").unwrap(), &image)]).unwrap();
        let layout = checkout.join("layout");
        index.write_oci_layout(&layout, "app:1").unwrap();
        (index.manifest_digest(), index.images()[0].1.manifest_digest(), layout)
    };
    let dir = tempfile::tempdir().unwrap();
    let (first, image_digest, layout) = build(&dir.path().join("checkout-one"));
    let (second, _, _) = build(&dir.path().join("elsewhere/checkout-two"));
    assert_eq!(first, second, "two checkouts, one index digest, attestations included");

    // The image, then its attestation manifest (BuildKit's layout).
    let raw = support::skopeo_inspect_raw(&format!("oci:{}:1", layout.display()));
    let attestation = &raw["manifests"][1];
    assert_eq!(attestation["platform"], serde_json::json!({ "architecture": "unknown", "os": "unknown" }));
    assert_eq!(attestation["annotations"]["vnd.docker.reference.type"], "attestation-manifest");
    assert_eq!(attestation["annotations"]["vnd.docker.reference.digest"], image_digest);
    let statements = statements(&layout, 1);
    let provenance = &statements["https://slsa.dev/provenance/v1"];
    assert_eq!(provenance["subject"][0]["digest"]["sha256"], image_digest.strip_prefix("sha256:").unwrap());
    let dependencies = provenance["predicate"]["buildDefinition"]["resolvedDependencies"].as_array().unwrap();
    assert_eq!(dependencies.len(), 1, "{dependencies:?}");
    assert_eq!(dependencies[0]["name"], "COPY . /app");
    let text = provenance.to_string();
    assert!(!text.contains("checkout-one"), "no host path in the provenance: {text}");

    let sbom = &statements["https://spdx.dev/Document"]["predicate"];
    assert_eq!(sbom["spdxVersion"], "SPDX-2.3");
    let packages: Vec<&str> =
        sbom["packages"].as_array().unwrap().iter().map(|package| package["name"].as_str().unwrap()).collect();
    assert_eq!(packages, ["bash", "coreutils"], "the installed packages, as dpkg -l lists them");
    let files = sbom["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0]["fileName"], "/app/run.sh");
    assert_eq!(
        files[0]["checksums"][0]["checksumValue"],
        support::sha256("echo hi\n").strip_prefix("sha256:").unwrap()
    );
    assert_eq!(sbom["creationInfo"]["created"], "1970-01-01T00:00:00Z");
}
