//! The image of this crate's static files, built by its build script.

/// The image's manifest digest (`sha256:…`).
pub const IMAGE_DIGEST: &str = env!("LAYERWRIGHT_IMAGE_SITE_DIGEST");
/// The OCI layout directory the build script wrote it to.
pub const IMAGE_LAYOUT: &str = env!("LAYERWRIGHT_IMAGE_SITE_PATH");
