//! One insta snapshot of `listing()` per example image: what each image holds, path by path.
//!
//! The bytes of host binaries (the static `hello`, Debian's busybox) depend on the toolchain and
//! package versions, so their size and digest are redacted; everything else (modes, owners,
//! links, which paths exist) is compared exactly.

use layerwright::Builder;
use layerwright_examples::{EXAMPLES, ExampleEnvironment};

fn check(name: &str) {
    let example = layerwright_examples::find(name).unwrap_or_else(|| panic!("no example {name}"));
    let environment = ExampleEnvironment::for_workspace(env!("CARGO_MANIFEST_DIR").as_ref());
    let image = (example.declare)(&environment).unwrap_or_else(|error| panic!("declaring {name}: {error}"));
    let cache = tempfile::tempdir().expect("a temp dir");
    let built = Builder::new(cache.path())
        .and_then(|builder| builder.build(&image))
        .unwrap_or_else(|error| panic!("building {name}: {error}"));
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
    let root = rustix::process::geteuid().is_root();
    if !root && std::env::var("LAYERWRIGHT_SKIP_PRIVILEGED").is_ok_and(|value| value == "1") {
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
