//! Fixtures shared by the test modules of this binary: `use crate::support;`.

use std::fs;
use std::path::Path;

use layerwright::BuiltImage;

pub mod archive;
pub mod layout;
pub mod subprocess;

/// Writes `content` to `path`, creating its parent directories.
pub fn write(path: &Path, content: impl AsRef<[u8]>) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

/// The labels of the steps of `built` that were not served from the cache, in order.
pub fn rebuilt(built: &BuiltImage) -> Vec<&str> {
    built.steps().iter().filter(|step| !step.cached).map(|step| step.label.as_str()).collect()
}
