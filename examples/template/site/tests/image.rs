//! A snapshot of what the build script's image holds, and its digest.

use layerwright::{Image, testing};

#[test]
fn the_site_image() {
    let built = testing::build(&Image::from_archive(site::IMAGE_LAYOUT));
    assert_eq!(built.manifest_digest(), site::IMAGE_DIGEST);
    insta::assert_snapshot!(testing::listing(&built));
}
