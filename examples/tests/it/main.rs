//! The integration tests of the example images, as one test binary: linking is most of what an
//! incremental `cargo test` waits for, so every file is a module here rather than a binary of
//! its own (`cargo test -p layerwright-examples --test it [FILTER]`).
//!
//! - `snapshots`: one insta snapshot of `listing()` per example image.
//! - `real_clients`: the images checked by oci-image-tool, skopeo, umoci and a Docker engine.
//! - `registry`: push and pull against a local `docker-registry`.
//! - `remote_cache`: the remote cache between machines, through a local registry.
//! - `run`: RUN steps for real, on the busybox example base.
//!
//! `support` is their shared harness: finding and running the real clients, a local registry.

mod support;

mod real_clients;
mod registry;
mod remote_cache;
mod run;
mod snapshots;

/// With `autotests = false`, Cargo compiles `tests/it/main.rs` alone: a test file anywhere else
/// in `tests/`, or one in `tests/it/` that no `mod` names, would never run. There is none.
#[test]
fn every_test_file_is_a_module_of_this_binary() {
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let names = |dir: &std::path::Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|error| panic!("reading {}: {error}", dir.display()))
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&tests), ["it"], "tests/ holds files outside tests/it: make them modules of tests/it/main.rs");
    let main = std::fs::read_to_string(tests.join("it/main.rs")).unwrap();
    for name in names(&tests.join("it")) {
        let module = match name.strip_suffix(".rs") {
            Some("main") => continue,
            Some(module) => module,
            // A module directory; `snapshots/` is none.
            None if tests.join("it").join(&name).join("mod.rs").is_file() => name.as_str(),
            None => continue,
        };
        assert!(main.contains(&format!("\nmod {module};\n")), "tests/it/{name} is not a module of tests/it/main.rs");
    }
}
