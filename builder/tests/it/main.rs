//! The integration tests of `layerwright`, through its public API, as one test binary: linking
//! is most of what an incremental `cargo test` waits for, so every file is a module here
//! rather than a binary of its own (`cargo test -p layerwright --test it [FILTER]`).
//!
//! - `build`: end-to-end builds: reproducibility, caching, bad input.
//! - `compression`: changing the compression recompresses, never re-executes.
//! - `hostile`: crafted base archives and build contexts.
//! - `incremental`: what is rebuilt and why, the parallel solver, salsa's re-execution.
//! - `reliability`: killed builds, racing processes, a corrupt cache, a full disk.
//!
//! `support` holds what they share; tests that need processes of their own re-execute this
//! binary on an ignored entry-point test (`support::subprocess`).

mod support;

mod build;
mod compression;
mod hostile;
mod incremental;
mod reliability;

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
