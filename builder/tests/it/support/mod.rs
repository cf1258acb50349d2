//! Fixtures shared by the test modules of this binary: `use crate::support;`.

use std::fs;
use std::path::Path;

use layerwright::{BuiltImage, Context, CopyOptions, FileOptions, Image};

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

/// An image on a busybox base (the host's busybox-static and `/bin/sh`) with one RUN step,
/// `command`.
pub fn busybox_running(command: &str) -> Image {
    let busybox = layerwright::host::find_busybox().expect("busybox-static (apt-get install busybox-static)");
    let bin = Context::dir(busybox.parent().unwrap()).unwrap();
    let name = busybox.file_name().unwrap().to_str().unwrap();
    Image::scratch()
        .copy_with(&bin, name, "/bin/busybox", CopyOptions { file: FileOptions::mode(0o755), ..Default::default() })
        .symlink("/bin/sh", "busybox")
        .run(command)
}
