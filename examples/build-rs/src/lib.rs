//! An example of `layerwright::build_rs`: this crate's build script builds a container image of
//! its static site (`site/`) and the crate names the result, so that a test (or a deploy step
//! in the same program) knows exactly which image it is talking about.
//!
//! What it is not: a web server. The image holds the files; serving them is another image's job.
//!
//! ```
//! assert!(layerwright_example_build_rs::SITE_IMAGE_DIGEST.starts_with("sha256:"));
//! ```

#![forbid(unsafe_code)]

/// `sha256:…` of the site image's manifest.
pub const SITE_IMAGE_DIGEST: &str = env!("LAYERWRIGHT_IMAGE_SITE_DIGEST");

/// The OCI layout directory the build script wrote the image to (tag `site:latest`).
pub const SITE_IMAGE_LAYOUT: &str = env!("LAYERWRIGHT_IMAGE_SITE_PATH");
