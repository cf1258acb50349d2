//! `cargo xtask test`: the workspace's tests with a Docker engine for the real-client tests,
//! the `preserve_order` build in an invocation of its own, and the template workspace of
//! `examples/template` built and tested there as a new user would.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result};

use crate::docker::DockerEngine;

/// Runs `cargo test --workspace`, with `DOCKER_HOST` pointing at a Docker engine: the one
/// already set, or one started here (as root) and stopped afterwards.
pub fn run(workspace: &Path, cargo_arguments: &[String]) -> Result<ExitCode> {
    // This binary, pinned: a cargo build of xtask while tidy and the tests run (another checkout
    // sharing the target directory) replaces the file `current_exe` names; /proc/self/exe still
    // reads the running one.
    let target_dir = target_dir(workspace);
    std::fs::create_dir_all(&target_dir).with_context(|| format!("creating {}", target_dir.display()))?;
    let pinned = tempfile::Builder::new()
        .prefix("xtask-under-test")
        .tempdir_in(&target_dir)
        .context("creating a directory for the pinned xtask binary")?;
    let xtask = pinned.path().join("xtask");
    std::fs::copy("/proc/self/exe", &xtask).context("copying the running xtask binary (/proc/self/exe)")?;
    let engine = match std::env::var_os("DOCKER_HOST") {
        Some(host) => {
            eprintln!("xtask test: using the Docker engine at DOCKER_HOST={}", host.to_string_lossy());
            None
        }
        None => DockerEngine::start()?,
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The remote execution tests start `layerwright-worker` processes. `cargo test` builds a
    // package's binary for that package's own integration tests (the worker's command-line
    // tests), in the same invocation and with the same features as everything else, before
    // any test runs.
    let release =
        cargo_arguments.iter().take_while(|argument| *argument != "--").any(|argument| argument == "--release");
    let worker = target_dir.join(if release { "release" } else { "debug" }).join("layerwright-worker");
    let mut command = Command::new(&cargo);
    // The preserve-order crate switches a serde_json feature on for whatever it is built with:
    // it runs in an invocation of its own below.
    command
        .current_dir(workspace)
        .args(["test", "--workspace", "--exclude", PRESERVE_ORDER_CRATE])
        .args(cargo_arguments)
        .env("LAYERWRIGHT_WORKER", &worker);
    // The engine started here is handed to the tests through their environment only; it is
    // stopped when `engine` is dropped, after they finish.
    if let Some(engine) = &engine {
        command.env("DOCKER_HOST", engine.host());
    }
    let status = command.status().context("running cargo test")?;
    if !status.success() {
        return Ok(ExitCode::FAILURE);
    }
    // Compares its builds with this binary's `build-image` (built without the feature).
    let status = Command::new(&cargo)
        .current_dir(workspace)
        .args(["test", "-p", PRESERVE_ORDER_CRATE])
        .env("LAYERWRIGHT_XTASK_BIN", &xtask)
        .status()
        .context("running cargo test -p layerwright-preserve-order")?;
    if !status.success() {
        return Ok(ExitCode::FAILURE);
    }
    // The BuildKit conformance suite, where a Docker engine runs.
    let host = engine.as_ref().map(DockerEngine::host).or_else(|| std::env::var("DOCKER_HOST").ok());
    let conforming = match host {
        Some(host) => {
            crate::conformance::run(workspace, &crate::conformance::ConformanceOptions::default(), Some(host))?
        }
        None => {
            eprintln!("xtask test: no Docker engine, so the conformance suite was not run");
            true
        }
    };
    if !conforming {
        return Ok(ExitCode::FAILURE);
    }
    template(workspace)
}

/// Builds and tests the template workspace `examples/template` in its own directory, as a new
/// user of layerwright would (`cargo test`, `cargo xtask build-image app`), on this workspace's
/// target directory so that the dependencies they share are built once.
fn template(workspace: &Path) -> Result<ExitCode> {
    let template = workspace.join("examples/template");
    let target_dir = target_dir(workspace);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for arguments in [&["test"][..], &["xtask", "build-image", "app"]] {
        eprintln!("xtask test: in examples/template: cargo {}", arguments.join(" "));
        let status = Command::new(&cargo)
            .current_dir(&template)
            .args(arguments)
            .env("CARGO_TARGET_DIR", &target_dir)
            .status()
            .with_context(|| format!("running cargo {} in {}", arguments.join(" "), template.display()))?;
        if !status.success() {
            eprintln!("xtask test: `cargo {}` failed in examples/template", arguments.join(" "));
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The test crate that builds the examples with serde_json's `preserve_order` on.
const PRESERVE_ORDER_CRATE: &str = "layerwright-preserve-order";

/// The target directory of this workspace's builds: `CARGO_TARGET_DIR`, else `target`.
fn target_dir(workspace: &Path) -> PathBuf {
    workspace.join(std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into()))
}
