//! The layout of a crate's integration tests: one binary, `tests/it/main.rs`, whose modules are
//! every file of `tests/it/`. This file is also a module of `examples/tests/it` and
//! `examples/build-rs/tests/it` (by `#[path]`).

/// With `autotests = false`, Cargo compiles `tests/it/main.rs` alone: a test file anywhere else
/// in `tests/`, or one in `tests/it/` that no `mod` names, would never run. Fails when there is
/// one in the crate at `manifest_dir`.
pub fn check_every_test_file_is_a_module(manifest_dir: &str) {
    let tests = std::path::Path::new(manifest_dir).join("tests");
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
