//! Builds the image of `static/` into OUT_DIR; `src/lib.rs` names it.

use layerwright::build_rs::{self, BuildRsOptions};
use layerwright::{Context, Image};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = Context::dir(std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR")?).join("static"))?;
    let image = Image::scratch().copy(&files, ".", "/srv/www").workdir("/srv/www").expose(8080);
    build_rs::build(&image, BuildRsOptions::new("site"))?;
    Ok(())
}
