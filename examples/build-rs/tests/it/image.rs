//! The image the build script built: the layout it wrote names the digest the crate was compiled
//! with, and it holds the published site (not the drafts), owned and configured as declared.

use layerwright::{Image, testing};
use layerwright_example_build_rs::{SITE_IMAGE_DIGEST, SITE_IMAGE_LAYOUT};

#[test]
fn the_layout_names_the_digest_the_crate_was_built_with() {
    let index = std::fs::read(std::path::Path::new(SITE_IMAGE_LAYOUT).join("index.json")).expect("the layout");
    let index: serde_json::Value = serde_json::from_slice(&index).expect("index.json is JSON");
    let manifests = index["manifests"].as_array().expect("a manifests list");
    assert_eq!(manifests.len(), 1, "{index}");
    assert_eq!(manifests[0]["digest"], SITE_IMAGE_DIGEST);
    assert_eq!(manifests[0]["annotations"]["org.opencontainers.image.ref.name"], "latest");
}

#[test]
fn the_image_holds_the_published_site() {
    let image = Image::from_archive(SITE_IMAGE_LAYOUT);
    let built = testing::build(&image);
    let config = built.config().expect("the config");
    assert_eq!(config["config"]["User"], "101:101");
    assert_eq!(config["config"]["WorkingDir"], "/srv/www");
    assert_eq!(config["config"]["Labels"]["org.opencontainers.image.version"], env!("CARGO_PKG_VERSION"));
    // The version file holds the crate version, which the snapshot should not pin.
    insta::with_settings!({ filters => vec![(r"file 0644 0:0 \d+ sha256:[0-9a-f]{64} /etc/site/version", "file 0644 0:0 [version file] /etc/site/version")] }, {
        insta::assert_snapshot!(testing::listing(&built));
    });
}
