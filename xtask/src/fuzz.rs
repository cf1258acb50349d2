//! `cargo xtask fuzz`: the cargo-fuzz targets of `fuzz/` (their own workspace), each for a
//! bounded time.

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail};

/// Runs each fuzz target for `seconds`. cargo-fuzz needs nightly flags; `RUSTC_BOOTSTRAP=1`
/// lets the machine's stable toolchain accept them.
pub fn run(workspace: &Path, seconds: u64, only: Option<&str>) -> Result<ExitCode> {
    let targets = ["dockerignore", "base_layer", "base_archive"];
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let has_cargo_fuzz =
        Command::new(&cargo).args(["fuzz", "--version"]).output().is_ok_and(|output| output.status.success());
    if !has_cargo_fuzz {
        bail!("cargo-fuzz is not installed: `cargo install cargo-fuzz`");
    }
    for target in targets.iter().filter(|target| only.is_none_or(|only| only == **target)) {
        eprintln!("xtask fuzz: {target} for {seconds} s");
        let status = Command::new(&cargo)
            .current_dir(workspace.join("fuzz"))
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", target, "--", &format!("-max_total_time={seconds}")])
            .status()
            .context("running cargo fuzz")?;
        if !status.success() {
            eprintln!("xtask fuzz: {target} found a failure; see fuzz/artifacts/{target}/");
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}
