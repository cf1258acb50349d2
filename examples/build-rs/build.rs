//! Builds the image of this crate's static site (`site/`) into `OUT_DIR`; the crate names it
//! through `LAYERWRIGHT_IMAGE_SITE_DIGEST` and `LAYERWRIGHT_IMAGE_SITE_PATH`.

use std::path::PathBuf;

use layerwright::build_rs::{self, BuildRsOptions};
use layerwright::{Context, FileOptions, Image};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    // `site/.dockerignore` keeps the drafts out of the image (and out of the rerun-if-changed list).
    let site = Context::dir(manifest_dir.join("site"))?;
    let version = std::env::var("CARGO_PKG_VERSION")?;
    let image = Image::scratch()
        .copy(&site, ".", "/srv/www")
        .write_file("/etc/site/version", format!("{version}\n"))
        .mkdir_with("/var/log/site", FileOptions::mode(0o750).with_owner(101, 101))
        .workdir("/srv/www")
        .user("101:101")
        .label("org.opencontainers.image.version", &version)
        .expose(8080);
    build_rs::build(&image, BuildRsOptions::new("site"))?;
    Ok(())
}
