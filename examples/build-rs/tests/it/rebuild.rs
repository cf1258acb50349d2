//! Cargo's view of the build script: a second build with nothing changed does not run it again;
//! touching a file the image reads does; touching the crate's own code does not.
//!
//! Runs a nested `cargo check` (which runs build scripts but compiles the rest of the crate only
//! as far as checking it) in a target directory of its own under the running cargo's target
//! directory (`CARGO_TARGET_TMPDIR`), so that it never waits for the lock of the cargo running
//! this test, starts clean with a clean target directory, and keeps its build across test runs. The first run compiles layerwright without its `registry` feature for the build
//! script: this is also the check that the build script's dependencies stay light.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

const PACKAGE: &str = "layerwright-example-build-rs";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("examples/build-rs is two levels down").to_owned()
}

/// `cargo check -v` of this package; returns stderr (where cargo says what it runs).
fn cargo_check(target_dir: &Path) -> String {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace())
        .args(["check", "-v", "--package", PACKAGE, "--target-dir"])
        .arg(target_dir)
        // A `cargo test` that runs us sets variables meant for its own crates only.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("SOURCE_DATE_EPOCH")
        .env_remove("LAYERWRIGHT_CACHE_DIR")
        .output()
        .expect("running cargo");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "cargo check failed:\n{stderr}");
    stderr
}

fn ran_build_script(stderr: &str) -> bool {
    stderr.lines().any(|line| {
        line.contains("Running `")
            && line.contains("layerwright-example-build-rs-")
            && line.contains("build-script-build")
    })
}

/// Sets `path`'s mtime to now: later than the previous build (cargo compares with nanoseconds),
/// and not in the future, which would make every later build see it as changed.
fn touch(path: &Path) {
    std::thread::sleep(Duration::from_millis(20));
    let file = std::fs::File::options().append(true).open(path).expect("a file to touch");
    file.set_modified(SystemTime::now()).expect("setting the mtime");
}

#[test]
fn the_build_script_runs_again_only_when_the_image_inputs_change() {
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("build-rs-target");
    cargo_check(&target_dir);

    let unchanged = cargo_check(&target_dir);
    assert!(!ran_build_script(&unchanged), "nothing changed, but the build script ran again:\n{unchanged}");
    assert!(unchanged.contains(&format!("Fresh {PACKAGE}")), "{unchanged}");

    touch(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"));
    let code_changed = cargo_check(&target_dir);
    assert!(!ran_build_script(&code_changed), "the crate's code is no input of the image:\n{code_changed}");

    touch(&Path::new(env!("CARGO_MANIFEST_DIR")).join("site/css/site.css"));
    let site_changed = cargo_check(&target_dir);
    assert!(
        ran_build_script(&site_changed),
        "a file the image reads changed, but the script did not run:\n{site_changed}"
    );

    let again = cargo_check(&target_dir);
    assert!(!ran_build_script(&again), "{again}");
}
