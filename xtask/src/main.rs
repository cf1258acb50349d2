//! `cargo xtask`: the repository's commands. A thin clap front over `layerwright::cli` and the
//! images of `layerwright-examples`, plus the chores that need a process around the tests
//! (starting a Docker engine for the real-client tests).
//!
//! - `cargo xtask build-image NAME [--output SPEC]... [--tag REF] [--cache DIR] [--compression C]
//!   [--push REF [--insecure]] [--cache-from REF]... [--cache-to REF]`
//! - `cargo xtask list`
//! - `cargo xtask test [-- CARGO TEST ARGS]` (runs `cargo xtask tidy` first)
//! - `cargo xtask tidy [--no-cargo]`
//! - `cargo xtask bench [--quick] [--only W]`, `cargo xtask bench --micro [-- FILTER]`,
//!   `cargo xtask bench --remote-cache [--quick]`
//! - `cargo xtask fuzz [--seconds N] [TARGET]`
//! - `cargo xtask cache du`, `cargo xtask cache prune --keep-bytes N`

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use layerwright::cache::Store;
use layerwright::cli::{self, BuildCommand, OutputSpec};
use layerwright_examples::{EXAMPLES, ExampleEnvironment};

mod bench;
mod bench_remote;
mod bench_scale;
mod conformance;
mod docker;
mod tidy;

use docker::DockerEngine;
use tidy::TidyOptions;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "layerwright's repository commands")]
struct Arguments {
    #[command(subcommand)]
    command: Commands,
}

#[derive(clap::Args)]
struct BuildImageArguments {
    /// The example's name (`cargo xtask list` shows them).
    name: String,
    /// oci:DIR, oci-archive:FILE or docker-archive:FILE; may be repeated. Default:
    /// docker-archive:target/images/NAME.tar
    #[arg(long = "output")]
    outputs: Vec<String>,
    /// The tag written into the outputs. Default: NAME:latest
    #[arg(long)]
    tag: Option<String>,
    /// The cache directory. Default: target/layerwright
    #[arg(long)]
    cache: Option<PathBuf>,
    /// gzip, zstd or none.
    #[arg(long, default_value = "gzip")]
    compression: String,
    /// Also push the image to a registry: `registry/repository[:tag]`. Registries on
    /// localhost or 127.0.0.1 are spoken to in plain HTTP; credentials come from
    /// ~/.docker/config.json.
    #[arg(long, value_name = "REF")]
    push: Option<String>,
    /// Plain HTTP for a --push to a registry that is not on this machine.
    #[arg(long, requires = "push")]
    insecure: bool,
    /// A remote cache in a registry (registry/repository:tag) to take steps from when they
    /// miss locally; may be repeated (asked in order).
    #[arg(long = "cache-from", value_name = "REF")]
    cache_from: Vec<String>,
    /// A remote cache to export every step's record to after the build (uploading only the
    /// blobs the registry lacks). An unreachable cache is a warning, never a failed build.
    #[arg(long = "cache-to", value_name = "REF")]
    cache_to: Option<String>,
}

#[derive(Subcommand)]
enum Commands {
    /// Build one of the example images and write it out.
    BuildImage(BuildImageArguments),
    /// List the example images.
    List,
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
        /// Print the scaling curves instead: files in a context, steps in a chain, images in a
        /// build_all (cold, no-op, one change at the tail).
        #[arg(long, conflicts_with_all = ["micro", "remote_cache"])]
        scale: bool,
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
    /// Inspect or shrink the build cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
        /// The cache directory. Default: target/layerwright
        #[arg(long, global = true)]
        cache: Option<PathBuf>,
    },
    /// Run `cargo xtask tidy`, then the workspace tests, with a Docker engine started for the
    /// real-client tests. A tidy violation fails the command before the tests run.
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

#[derive(Subcommand)]
enum CacheCommand {
    /// How much the cache holds, by kind.
    Du,
    /// Remove least recently used entries until the cache holds at most N bytes. Waits up to a
    /// minute for running builds to finish (they hold the cache's lock), never removing what
    /// they use.
    Prune {
        #[arg(long = "keep-bytes")]
        keep_bytes: u64,
    },
}

fn main() -> Result<ExitCode> {
    let arguments = Arguments::parse();
    let workspace = workspace_root();
    match arguments.command {
        Commands::BuildImage(arguments) => {
            build_image(&workspace, arguments)?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::List => {
            for example in EXAMPLES {
                println!("{:<10} {}", example.name, example.description);
            }
            Ok(ExitCode::SUCCESS)
        }
        Commands::Test { cargo_arguments } => {
            if !tidy::run(&workspace, &TidyOptions { cargo_checks: true })? {
                eprintln!("xtask test: tidy found violations, so the tests were not run");
                return Ok(ExitCode::FAILURE);
            }
            test(&workspace, &cargo_arguments)
        }
        Commands::Tidy { no_cargo } => {
            let clean = tidy::run(&workspace, &TidyOptions { cargo_checks: !no_cargo })?;
            Ok(if clean { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Commands::Bench { quick, scale: true, .. } => {
            bench_scale::run(&workspace, quick)?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Bench { quick, remote_cache: true, .. } => {
            bench_remote::run(&workspace, quick)?;
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
        Commands::Fuzz { seconds, target } => fuzz(&workspace, seconds, target.as_deref()),
        Commands::Cache { command, cache } => {
            let cache = cache.unwrap_or_else(|| workspace.join("target/layerwright"));
            cache_command(&cache, command)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn build_image(workspace: &Path, arguments: BuildImageArguments) -> Result<()> {
    let BuildImageArguments { name, outputs, tag, cache, compression, push, insecure, cache_from, cache_to } =
        arguments;
    let name = name.as_str();
    let Some(example) = layerwright_examples::find(name) else {
        let known: Vec<&str> = EXAMPLES.iter().map(|example| example.name).collect();
        bail!("unknown image {name:?}; the known images are: {}", known.join(", "));
    };
    let mut outputs = outputs.iter().map(|spec| spec.parse::<OutputSpec>()).collect::<Result<Vec<_>, _>>()?;
    if outputs.is_empty() {
        outputs.push(OutputSpec::DockerArchive(workspace.join("target/images").join(format!("{name}.tar"))));
    }
    for output in &outputs {
        let path = match output {
            OutputSpec::OciLayout(path) | OutputSpec::OciArchive(path) | OutputSpec::DockerArchive(path) => path,
        };
        if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    let environment = ExampleEnvironment::for_workspace(workspace);
    let image = (example.declare)(&environment)?;
    let command = BuildCommand {
        cache_dir: cache.unwrap_or_else(|| workspace.join("target/layerwright")),
        outputs,
        tag: tag.unwrap_or_else(|| format!("{name}:latest")),
        compression: cli::parse_compression(&compression)?,
        push,
        insecure,
        cache_from,
        cache_to,
    };
    let summary = cli::build_image(&image, &command).with_context(|| format!("building image {name}"))?;
    println!("{summary}");
    Ok(())
}

fn cache_command(cache: &Path, command: CacheCommand) -> Result<()> {
    match command {
        CacheCommand::Du => {
            let store = Store::open(cache).with_context(|| format!("opening the cache {}", cache.display()))?;
            let usage = store.disk_usage();
            println!("cache    {}", cache.display());
            println!("blobs    {:>14} bytes in {} blobs", usage.blobs, usage.blob_count);
            println!("records  {:>14} bytes in {} action records", usage.records, usage.record_count);
            println!("indexes  {:>14} bytes", usage.indexes);
            println!("snapshots{:>14} bytes", usage.snapshots);
            println!("other    {:>14} bytes", usage.other);
            println!("total    {:>14} bytes", usage.total());
        }
        CacheCommand::Prune { keep_bytes } => {
            let store = Store::open_exclusive(cache, Duration::from_secs(60))
                .with_context(|| format!("locking the cache {} for pruning", cache.display()))?;
            let report = store.prune(keep_bytes).context("pruning the cache")?;
            println!(
                "removed {} records and {} blobs, freed {} bytes; {} bytes remain",
                report.removed_records, report.removed_blobs, report.freed_bytes, report.remaining_bytes
            );
        }
    }
    Ok(())
}

/// Runs each fuzz target for `seconds`. cargo-fuzz needs nightly flags; `RUSTC_BOOTSTRAP=1`
/// lets the machine's stable toolchain accept them.
fn fuzz(workspace: &Path, seconds: u64, only: Option<&str>) -> Result<ExitCode> {
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

/// Runs `cargo test --workspace`, with `DOCKER_HOST` pointing at a Docker engine: the one
/// already set, or one started here (as root) and stopped afterwards.
fn test(workspace: &Path, cargo_arguments: &[String]) -> Result<ExitCode> {
    let engine = match std::env::var_os("DOCKER_HOST") {
        Some(host) => {
            eprintln!("xtask test: using the Docker engine at DOCKER_HOST={}", host.to_string_lossy());
            None
        }
        None => DockerEngine::start()?,
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    // The preserve-order crate switches a serde_json feature on for whatever it is built with:
    // it runs in an invocation of its own below.
    command
        .current_dir(workspace)
        .args(["test", "--workspace", "--exclude", PRESERVE_ORDER_CRATE])
        .args(cargo_arguments);
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
        .env("LAYERWRIGHT_XTASK_BIN", std::env::current_exe().context("finding the xtask binary")?)
        .status()
        .context("running cargo test -p layerwright-preserve-order")?;
    if !status.success() {
        return Ok(ExitCode::FAILURE);
    }
    // The BuildKit conformance suite, where a Docker engine runs.
    let host = engine.as_ref().map(DockerEngine::host).or_else(|| std::env::var("DOCKER_HOST").ok());
    let conforming = match host {
        Some(host) => conformance::run(workspace, &conformance::ConformanceOptions::default(), Some(host))?,
        None => {
            eprintln!("xtask test: no Docker engine, so the conformance suite was not run");
            true
        }
    };
    Ok(if conforming { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The test crate that builds the examples with serde_json's `preserve_order` on.
const PRESERVE_ORDER_CRATE: &str = "layerwright-preserve-order";
