//! One insta snapshot of `listing()` per example image: what each image holds, path by path.
//!
//! The bytes of host binaries (the static `hello`, Debian's busybox) depend on the toolchain and
//! package versions, so their size and digest are redacted; everything else (modes, owners,
//! links, which paths exist) is compared exactly.

use layerwright::Compression;
use layerwright_examples::EXAMPLES;

use crate::support;

fn check(name: &str) {
    let cache = tempfile::tempdir().expect("a temp dir");
    let built = support::build_example(name, cache.path(), Compression::default());
    let listing = built.listing().expect("a listing");
    insta::with_settings!({
        filters => vec![(
            r"(?m)^file (\d{4}) (\d+:\d+) \d+ sha256:[0-9a-f]{64} (/bin/busybox|/usr/local/bin/hello)$",
            "file $1 $2 [size] [sha256] $3",
        )],
    }, {
        insta::assert_snapshot!(name, listing);
    });
}

#[test]
fn hello() {
    check("hello");
}

#[test]
fn busybox() {
    check("busybox");
}

#[test]
fn files() {
    check("files");
}

/// RUN steps need root (or user namespaces): without them this fails with the runner's message
/// naming what is missing, unless `LAYERWRIGHT_SKIP_PRIVILEGED=1`.
#[test]
fn busybox_tools() {
    if !support::is_root() && support::skip_privileged() {
        return;
    }
    check("busybox-tools");
}

#[test]
fn multi_stage() {
    check("multi-stage");
}

#[test]
fn every_example_has_a_snapshot_test() {
    let tested = ["hello", "busybox", "busybox-tools", "files", "multi-stage"];
    for example in EXAMPLES {
        assert!(tested.contains(&example.name), "example {} has no snapshot test", example.name);
    }
}
