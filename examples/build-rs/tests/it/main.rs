//! The integration tests of the build-script example, as one test binary
//! (`cargo test -p layerwright-example-build-rs --test it [FILTER]`).
//!
//! - `image`: the image the build script built.
//! - `rebuild`: when cargo runs the build script again.

mod image;
mod rebuild;
