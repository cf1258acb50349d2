//! The example images built with serde_json's `preserve_order` on have the digests the same
//! declarations get from `cargo xtask build-image`, which is built without it.

use std::path::{Path, PathBuf};
use std::process::Command;

use layerwright::Builder;
use layerwright_examples::{EXAMPLES, ExampleEnvironment};

/// The xtask binary (built without `preserve_order`), which `cargo xtask test` names.
fn xtask_binary() -> PathBuf {
    let Some(path) = std::env::var_os("LAYERWRIGHT_XTASK_BIN") else {
        panic!("LAYERWRIGHT_XTASK_BIN is not set: run this test through `cargo xtask test`, which builds it apart");
    };
    PathBuf::from(path)
}

/// The manifest digest an OCI layout names for its only image.
fn layout_digest(layout: &Path) -> String {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().expect("the layout names a manifest").to_owned()
}

#[test]
fn example_images_keep_their_digests_when_preserve_order_is_on() {
    assert!(layerwright_preserve_order::preserve_order_is_on(), "this build must have preserve_order on");
    let workspace = ExampleEnvironment::for_workspace(env!("CARGO_MANIFEST_DIR").as_ref()).workspace;
    let xtask = xtask_binary();
    for example in EXAMPLES {
        let scratch = tempfile::tempdir().unwrap();
        let environment = ExampleEnvironment::for_workspace(&workspace);
        let image = (example.declare)(&environment).unwrap_or_else(|error| panic!("{}: {error}", example.name));
        let built = Builder::new(scratch.path().join("cache-here")).unwrap().build(&image).unwrap();
        let here = scratch.path().join("here");
        built.write_oci_layout(&here, &format!("{}:latest", example.name)).unwrap();
        assert_eq!(layout_digest(&here), built.manifest_digest());

        let there = scratch.path().join("there");
        let status = Command::new(&xtask)
            .current_dir(&workspace)
            .args(["build-image", example.name, "--output"])
            .arg(format!("oci:{}", there.display()))
            .arg("--cache")
            .arg(scratch.path().join("cache-there"))
            .status()
            .expect("the xtask binary runs");
        assert!(status.success(), "cargo xtask build-image {} failed", example.name);
        assert_eq!(
            built.manifest_digest(),
            layout_digest(&there),
            "{}: preserve_order changed the manifest digest",
            example.name
        );
    }
}
