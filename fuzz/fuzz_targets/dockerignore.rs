//! `.dockerignore` parsing and matching: any text parses or is refused with an error, and
//! matching any path against any parsed file never panics.
#![no_main]

use layerwright::DockerIgnore;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (patterns, paths) = text.split_once('\u{0}').unwrap_or((&text, "a/b/c"));
    if let Ok(ignore) = DockerIgnore::parse(patterns) {
        for path in paths.split('\n') {
            let _ = ignore.is_excluded(path);
        }
        let _ = ignore.has_exceptions();
    }
});
