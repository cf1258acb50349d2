//! `cargo xtask`: the repository's commands. One user of `layerwright::cli` (its images are the
//! examples of `layerwright-examples`, registered through `Images`), plus the chores that need
//! a process around the tests (starting a Docker engine for the real-client tests), each in its
//! own module.
//!
//! - `cargo xtask build-image NAME [--output SPEC]... [--tag REF] [--cache DIR] [--compression C]
//!   [--push REF [--insecure]] [--cache-from REF]... [--cache-to REF]`
//! - `cargo xtask list`, `cargo xtask inspect NAME [--full]`
//! - `cargo xtask cache du`, `cargo xtask cache prune --keep-bytes N`
//! - `cargo xtask test [-- CARGO TEST ARGS]` (runs `cargo xtask tidy` first)
//! - `cargo xtask tidy [--no-cargo]`
//! - `cargo xtask bench [--quick] [--only W]`, `cargo xtask bench --micro [-- FILTER]`,
//!   `cargo xtask bench --remote-cache [--reapi] [--quick]`, `cargo xtask bench --scale`, `cargo xtask bench --distro`,
//!   `cargo xtask bench --platforms`, `cargo xtask bench --apt-mounts`
//! - `cargo xtask fuzz [--seconds N] [TARGET]`

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use layerwright::cli;
use layerwright_examples::ExampleEnvironment;

mod bench;
mod bench_apt_mounts;
mod bench_distro;
mod bench_remote;
mod bench_scale;
mod conformance;
mod docker;
mod fuzz;
mod test;
mod tidy;

use tidy::TidyOptions;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "layerwright's repository commands")]
struct Arguments {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// `build-image`, `list`, `inspect`, `cache`: `layerwright::cli` on the example images.
    #[command(flatten)]
    Images(Box<cli::Command>),
    /// Build the benchmark workloads with layerwright, BuildKit and buildah, side by side
    /// (needs root, dockerd and buildah); `--micro` runs the criterion micro-benchmarks instead.
    Bench {
        /// Fewer runs, for a quick look.
        #[arg(long)]
        quick: bool,
        /// Only the workloads whose name contains this (w1, w2, w3).
        #[arg(long)]
        only: Option<String>,
        /// Run the criterion micro-benchmarks (`cargo bench -p layerwright`).
        #[arg(long)]
        micro: bool,
        /// Measure the remote cache instead: W1 built cold and exported by one cache directory,
        /// then built from that export by an empty one (needs root and docker-registry).
        #[arg(long, conflicts_with = "micro")]
        remote_cache: bool,
        /// With --remote-cache: share through a local BuildGrid (REAPI, `--reapi`) instead of a
        /// registry (needs BuildGrid, as `.ci/run` installs it).
        #[arg(long, requires = "remote_cache")]
        reapi: bool,
        /// Print the scaling curves instead: files in a context, steps in a chain, images in a
        /// build_all (cold, no-op, one change at the tail).
        #[arg(long, conflicts_with_all = ["micro", "remote_cache"])]
        scale: bool,
        /// Measure W4 instead: a Debian minbase (mmdebstrap), apt-get over the network, 300
        /// source files, a user and a build step, against BuildKit; and the edit → runnable loop
        /// with `--load` and in one `--watch` process (needs root, dockerd, mmdebstrap).
        #[arg(long, conflicts_with_all = ["micro", "remote_cache", "scale"])]
        distro: bool,
        /// Measure a RUN step native and under qemu-user emulation (linux/arm64), and an index
        /// of both platforms against two single builds (needs root and `.ci/run`'s binfmt and
        /// arm64 busybox).
        #[arg(long, conflicts_with_all = ["micro", "remote_cache", "scale", "distro"])]
        platforms: bool,
        /// Measure RUN cache mounts: the apt step re-run with one package more, with
        /// `/var/cache/apt` and `/var/lib/apt/lists` as cache mounts and without, against
        /// BuildKit's `RUN --mount=type=cache` (needs root, dockerd, mmdebstrap).
        #[arg(long, conflicts_with_all = ["micro", "remote_cache", "scale", "distro", "platforms"])]
        apt_mounts: bool,
        /// Arguments passed on to the criterion harness with --micro (a name filter).
        #[arg(last = true)]
        arguments: Vec<String>,
    },
    /// Fuzz `.dockerignore` parsing and base layer / archive import for a bounded time
    /// (needs `cargo install cargo-fuzz`; runs on the stable toolchain).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (dockerignore, base_layer, base_archive).
        target: Option<String>,
    },
    /// Run `cargo xtask tidy`, then the workspace tests, with a Docker engine started for the
    /// real-client tests, then the template workspace's (`examples/template`). A tidy violation
    /// fails the command before the tests run.
    Test {
        /// Arguments passed on to `cargo test`.
        #[arg(last = true)]
        cargo_arguments: Vec<String>,
    },
    /// Build each conformance case from its Dockerfile with BuildKit and from its DSL graph with
    /// layerwright, and compare the exported trees and configs (needs root and dockerd).
    Conformance {
        /// Only the cases whose name contains this.
        #[arg(long)]
        only: Option<String>,
        /// Keep the work directory (Dockerfiles, contexts, listings).
        #[arg(long)]
        keep: bool,
    },
    /// Check the repository's rules (no module cycles, unsafe code only in the sandbox crate, no
    /// printing from library code, documented library crates), then cargo fmt, clippy and doc
    /// with warnings denied. Reports every violation with its file and line.
    Tidy {
        /// Only the source checks: skip cargo fmt, clippy and doc.
        #[arg(long)]
        no_cargo: bool,
    },
}

fn main() -> Result<ExitCode> {
    let arguments = Arguments::parse();
    let workspace = workspace_root();
    match arguments.command {
        Commands::Images(command) => {
            let images = layerwright_examples::images(&ExampleEnvironment::for_workspace(&workspace));
            Ok(cli::execute(&images, *command))
        }
        Commands::Test { cargo_arguments } => {
            if !tidy::run(&workspace, &TidyOptions { cargo_checks: true })? {
                eprintln!("xtask test: tidy found violations, so the tests were not run");
                return Ok(ExitCode::FAILURE);
            }
            test::run(&workspace, &cargo_arguments)
        }
        Commands::Tidy { no_cargo } => {
            let clean = tidy::run(&workspace, &TidyOptions { cargo_checks: !no_cargo })?;
            Ok(if clean { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Commands::Bench { quick, scale: true, .. } => {
            bench_scale::run(&workspace, quick)?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Bench { quick, platforms: true, .. } => {
            let binary = bench::build_bench_binary(&workspace)?;
            let workdir = workspace.join("target/bench-platforms");
            let status = std::process::Command::new(binary)
                .arg("--platforms")
                .arg(&workdir)
                .arg(if quick { "3" } else { "7" })
                .status()?;
            Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Commands::Bench { quick, apt_mounts: true, .. } => {
            bench_apt_mounts::run(&workspace, quick)?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Bench { quick, distro: true, .. } => {
            bench_distro::run(&workspace, quick)?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Bench { quick, remote_cache: true, reapi, .. } => {
            bench_remote::run(&workspace, quick, reapi)?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Bench { quick, only, micro: false, .. } => {
            bench::run(&workspace, &bench::BenchOptions { quick, only })?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Bench { arguments, micro: true, .. } => {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(&workspace)
                .args(["bench", "--package", "layerwright", "--features", "testing", "--"])
                .args(&arguments)
                .status()
                .context("running cargo bench")?;
            Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Commands::Conformance { only, keep } => {
            let conforming = conformance::run(&workspace, &conformance::ConformanceOptions { only, keep }, None)?;
            Ok(if conforming { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Commands::Fuzz { seconds, target } => fuzz::run(&workspace, seconds, target.as_deref()),
    }
}

/// This repository's root: xtask's parent, wherever the command is started from.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}
