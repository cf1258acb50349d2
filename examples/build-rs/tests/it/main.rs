//! The integration tests of the build-script example, as one test binary
//! (`cargo test -p layerwright-example-build-rs --test it [FILTER]`).
//!
//! - `image`: the image the build script built.
//! - `rebuild`: when cargo runs the build script again.

mod image;
mod rebuild;

#[path = "../../../../builder/tests/it/support/layout.rs"]
mod layout;

/// Every file of `tests/` is a module of this binary (see `support::layout`).
#[test]
fn every_test_file_is_a_module_of_this_binary() {
    layout::check_every_test_file_is_a_module(env!("CARGO_MANIFEST_DIR"));
}
