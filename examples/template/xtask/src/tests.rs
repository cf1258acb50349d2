//! A snapshot of what the `app` image holds: a change to it shows up in review.

use layerwright::testing;

#[test]
fn app_image() {
    // `cargo test` runs in the package's directory; the declarations expect the workspace root.
    std::env::set_current_dir(layerwright::cli::workspace_root().unwrap()).unwrap();
    let listing = testing::listing_of(&super::app().unwrap());
    // The binary's bytes depend on the toolchain: keep its size and digest out of the snapshot.
    let filters = vec![(r"\d+ sha256:[0-9a-f]{64} /usr/local/bin/app", "[size] [digest] /usr/local/bin/app")];
    insta::with_settings!({ filters => filters }, { insta::assert_snapshot!(listing) });
}
