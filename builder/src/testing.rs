//! Helpers for snapshot tests of images (feature `testing`): what an image holds, or what it
//! changes against another, as stable text for `insta::assert_snapshot!`.
//!
//! - [`listing`] of a built image: one line per path, `TYPE MODE UID:GID SIZE WHAT /PATH` (the
//!   format of `BuiltImage::listing`).
//! - [`listing_of`] an image declaration: builds it through one builder shared by the whole test
//!   process (so the tests of a binary share steps, keys and the stat cache) on a cache shared
//!   by every test binary of the target directory.
//! - [`diff_listing`] (and [`diff_listing_of`]): what the first image adds (`+`), changes (`~`)
//!   and deletes (`-`) against the second, one path a line in path order; a changed line shows
//!   the path's new state and, after `was`, its old one:
//!
//!   ```text
//!   + file 0644 0:0 6 sha256:… /etc/motd
//!   ~ file 0755 0:0 11 sha256:… /app/run was file 0644 0:0 11 sha256:…
//!   - symlink 0777 0:0 - -> busybox /bin/vi
//!   ```
//!
//! Suited to redactions: fields are separated by single spaces, paths and link targets hold no
//! spaces (they are escaped), and every content digest matches [`DIGEST_PATTERN`], so an insta
//! filter can replace the digests and sizes of files whose bytes are not reproducible (host
//! binaries) while the rest is compared exactly:
//!
//! ```ignore
//! insta::with_settings!({ filters => vec![(layerwright::testing::DIGEST_PATTERN, "[sha256]")] }, {
//!     insta::assert_snapshot!(layerwright::testing::listing(&built));
//! });
//! ```
//!
//! What it deliberately is not: an assertion library. These functions panic with a message
//! naming what failed (they are for tests), and compare nothing themselves.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use layerwright_dsl::Image;

use crate::build::{Builder, BuiltImage};
use crate::progress::{ProgressEvent, ProgressSink};

/// A regular expression matching every content digest of a listing, for insta filters.
pub const DIGEST_PATTERN: &str = r"sha256:[0-9a-f]{64}";

/// The output lines of RUN steps, in the order a progress sink received them.
pub type OutputLines = Arc<Mutex<Vec<String>>>;

/// A progress sink for [`crate::BuilderOptions::progress`] that collects the output lines of RUN
/// steps, and the lines it has collected so far.
pub fn output_collector() -> (ProgressSink, OutputLines) {
    let lines = OutputLines::default();
    let seen = Arc::clone(&lines);
    let sink: ProgressSink = Arc::new(move |event: &ProgressEvent| {
        if let ProgressEvent::Output { line, .. } = event {
            seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(line.clone());
        }
    });
    (sink, lines)
}

/// The listing of a built image (see the module docs).
pub fn listing(built: &BuiltImage) -> String {
    built.listing().unwrap_or_else(|error| panic!("cannot list image {}: {error}", built.manifest_digest()))
}

/// Builds `image` through the shared test builder and returns its listing.
pub fn listing_of(image: &Image) -> String {
    listing(&build(image))
}

/// What `image` adds, changes and deletes against `base` (see the module docs). Empty when
/// they hold the same tree.
pub fn diff_listing(image: &BuiltImage, base: &BuiltImage) -> String {
    diff_of_listings(&listing(image), &listing(base))
}

/// [`diff_listing`] of two declarations, built through the shared test builder.
pub fn diff_listing_of(image: &Image, base: &Image) -> String {
    let shared = builder();
    let built = shared.build_all(&[image, base]).unwrap_or_else(|error| panic!("cannot build the images: {error}"));
    diff_listing(&built[0], &built[1])
}

/// Builds `image` through the builder every test of this process shares.
pub fn build(image: &Image) -> BuiltImage {
    builder().build(image).unwrap_or_else(|error| panic!("cannot build the image: {error}"))
}

/// The builder every test of this process shares. Its cache is `LAYERWRIGHT_CACHE_DIR`, else
/// `<target dir>/layerwright-testing` (the target directory found above the test executable
/// by cargo's `CACHEDIR.TAG`), else `layerwright-testing` in the temp directory.
pub fn builder() -> &'static Builder {
    static BUILDER: OnceLock<Builder> = OnceLock::new();
    BUILDER.get_or_init(|| {
        let cache = shared_cache_dir();
        Builder::new(&cache).unwrap_or_else(|error| panic!("cannot open the test cache {}: {error}", cache.display()))
    })
}

fn shared_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LAYERWRIGHT_CACHE_DIR").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir);
    }
    let target_dir = std::env::current_exe().ok().and_then(|executable| {
        executable.ancestors().skip(1).find(|dir| dir.join("CACHEDIR.TAG").is_file()).map(|dir| dir.to_owned())
    });
    match target_dir {
        Some(target_dir) => target_dir.join("layerwright-testing"),
        None => std::env::temp_dir().join("layerwright-testing"),
    }
}

/// One listing line split into its path (the last field: paths hold no spaces) and the rest.
fn split_line(line: &str) -> (&str, &str) {
    match line.rsplit_once(' ') {
        Some((fields, path)) => (path, fields),
        None => (line, ""),
    }
}

/// The diff of two listings (each sorted component-wise, as `FsTree::listing` writes them).
fn diff_of_listings(image: &str, base: &str) -> String {
    // Keyed as the listing sorts: component-wise (`/` before any other byte).
    let key = |path: &str| path.replace('/', "\0");
    let before: BTreeMap<String, (&str, &str)> =
        base.lines().map(|line| (key(split_line(line).0), split_line(line))).collect();
    let after: BTreeMap<String, (&str, &str)> =
        image.lines().map(|line| (key(split_line(line).0), split_line(line))).collect();
    let mut paths: Vec<&String> = before.keys().chain(after.keys()).collect();
    paths.sort();
    paths.dedup();
    let mut text = String::new();
    for path in paths {
        match (before.get(path), after.get(path)) {
            (None, Some((path, fields))) => text.push_str(&format!("+ {fields} {path}\n")),
            (Some((path, fields)), None) => text.push_str(&format!("- {fields} {path}\n")),
            (Some((_, old)), Some((path, new))) if old != new => {
                text.push_str(&format!("~ {new} {path} was {old}\n"));
            }
            _ => {}
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_say_what_was_added_changed_and_deleted_in_path_order() {
        let base = "dir 0755 0:0 - - /app\nfile 0644 0:0 1 sha256:aa /app/a\nfile 0644 0:0 1 sha256:bb /app/b\n\
                    symlink 0777 0:0 - -> a /app/link\n";
        let image = "dir 0755 0:0 - - /app\nfile 0755 0:0 1 sha256:aa /app/a\ndir 0755 0:0 - - /app/new\n\
                     file 0644 0:0 2 sha256:cc /app/new/x\nsymlink 0777 0:0 - -> a /app/link\ndir 0755 0:0 - - /app-b\n";
        assert_eq!(
            diff_of_listings(image, base),
            "~ file 0755 0:0 1 sha256:aa /app/a was file 0644 0:0 1 sha256:aa\n\
             - file 0644 0:0 1 sha256:bb /app/b\n\
             + dir 0755 0:0 - - /app/new\n\
             + file 0644 0:0 2 sha256:cc /app/new/x\n\
             + dir 0755 0:0 - - /app-b\n"
        );
        assert_eq!(diff_of_listings(base, base), "");
    }
}
