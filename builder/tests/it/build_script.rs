//! `layerwright::build_rs` for a user without root: an image whose RUN steps are all in the
//! cache builds, running nothing; an uncached RUN step runs where user namespaces allow it, and
//! otherwise fails saying what to do in the user's own workspace. The parent (root) fills the
//! cache; the child is this test binary, run as `nobody`, on an entry point that calls
//! `build_rs::build` as a build script would.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

use layerwright::Builder;
use layerwright::build_rs::{self, BuildRsOptions};

use crate::support::subprocess::{self, entry_point};

const PARENT: &str = "build_script::a_build_script_without_root_reuses_cached_run_steps";

#[test]
#[ignore = "subprocess entry point of build_script::a_build_script_without_root_reuses_cached_run_steps"]
fn helper_build_script() {
    let cache = subprocess::variable("LAYERWRIGHT_TEST_CACHE", PARENT);
    let command = subprocess::variable("LAYERWRIGHT_TEST_RUN", PARENT);
    assert!(!rustix::process::geteuid().is_root(), "the child runs as a plain user");
    let mut options = BuildRsOptions::new("tools");
    options.cache_dir = Some(cache.into());
    // `build` reads OUT_DIR, which the parent set, as cargo does for a build script.
    match build_rs::build(&crate::support::busybox_running(command.to_str().unwrap()), options) {
        Ok(output) => println!("\nBUILT {}", output.digest),
        Err(error) => println!("\nFAILED {}", error.to_string().replace('\n', " ")),
    }
}

/// Runs the entry point as `nobody` on `cache`, with RUN command `command`; its result line.
fn build_as_nobody(dir: &Path, cache: &Path, command: &str) -> String {
    let output = entry_point!(helper_build_script)
        .command()
        .uid(65534)
        .gid(65534)
        .env("LAYERWRIGHT_TEST_CACHE", cache)
        .env("LAYERWRIGHT_TEST_RUN", command)
        .env("OUT_DIR", dir.join("out"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let result = stdout.lines().find(|line| line.starts_with("BUILT ") || line.starts_with("FAILED "));
    result
        .unwrap_or_else(|| panic!("the child built nothing:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr)))
        .to_owned()
}

/// Makes everything below `path` readable and writable by everyone (the child is `nobody`).
fn open_to_everyone(path: &Path) {
    let metadata = std::fs::symlink_metadata(path).unwrap();
    if metadata.is_symlink() {
        return;
    }
    let mode = if metadata.is_dir() { 0o777 } else { metadata.permissions().mode() | 0o666 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    if metadata.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            open_to_everyone(&entry.unwrap().path());
        }
    }
}

#[test]
fn a_build_script_without_root_reuses_cached_run_steps() {
    if !rustix::process::geteuid().is_root() {
        let skip = std::env::var("LAYERWRIGHT_SKIP_PRIVILEGED").is_ok_and(|value| value == "1");
        assert!(skip, "the test needs root to fill the cache and switch users (or LAYERWRIGHT_SKIP_PRIVILEGED=1)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    let cached = "echo built > /built";
    let expected =
        Builder::new(&cache).unwrap().build(&crate::support::busybox_running(cached)).unwrap().manifest_digest();
    open_to_everyone(dir.path());

    assert_eq!(build_as_nobody(dir.path(), &cache, cached), format!("BUILT {expected}"));

    // A RUN step that misses: built where this user may create user namespaces, else an error
    // that names the step and the cache, and no command of this repository.
    let result = build_as_nobody(dir.path(), &cache, "echo other > /other");
    eprintln!("an uncached RUN step as nobody: {result}");
    if let Some(message) = result.strip_prefix("FAILED ") {
        for expected in ["RUN echo other > /other", "user namespaces", &cache.display().to_string()] {
            assert!(message.contains(expected), "{expected}: {message}");
        }
        assert!(!message.contains("cargo xtask"), "{message}");
    }
}
