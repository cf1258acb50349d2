//! The benchmark workloads of `cargo xtask bench`, declared with layerwright, as a binary so
//! that layerwright is timed as a whole process, exactly like `docker build` and `buildah bud`.
//!
//! `layerwright-bench WORKLOAD WORKDIR CACHE OUTPUT [--cache-from REF]... [--cache-to REF]
//! [--reapi URL]`: WORKLOAD is `w1`, `w2` or `w3` (declared in `layerwright_examples::workloads`,
//! beside their Dockerfiles); WORKDIR holds what `cargo xtask bench` generated (`base.tar`, the
//! base image every tool starts from, and `WORKLOAD/context/`); OUTPUT is `oci:DIR` or
//! `docker-archive:FILE`; the cache flags name remote caches in a registry, `--reapi` a REAPI
//! server. Prints the manifest digest, the steps built, the process's peak RSS and what the
//! remote caches did.
//!
//! OUTPUT may also be `load:TAG`: the image goes into the Docker engine at `DOCKER_HOST`
//! (`BuiltImage::load`, sending only the layers the engine lacks), as `docker build -t` leaves it.
//!
//! `layerwright-bench --scale WORKDIR RUNS MAX_FILES` and `--scale-noop WORKDIR FILES`: the
//! scaling curves of `cargo xtask bench --scale` (see `scale.rs`).
//!
//! `layerwright-bench --watch-rounds WORKLOAD WORKDIR CACHE TAG ROUNDS`: the edit → runnable
//! loop of `--watch` in one process (see `watch_rounds.rs`).
//!
//! `layerwright-bench --platforms WORKDIR RUNS`: a RUN step native and under emulation, and an
//! index against two single builds (see `platforms.rs`).

#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;

use layerwright::{Builder, BuilderOptions, Compression};
use layerwright_examples::workloads;

mod platforms;
mod scale;
mod watch_rounds;

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

type ModeError = Box<dyn std::error::Error + Send + Sync>;

/// The measuring modes (`--scale`, `--platforms`, ...); `None` for a workload build.
fn run_mode(mode: &str, arguments: &[String]) -> Option<Result<(), ModeError>> {
    let result = match (mode, arguments) {
        ("--platforms", [workdir, runs]) => match runs.parse() {
            Ok(runs) => platforms::run(Path::new(workdir), runs),
            Err(_) => Err("--platforms WORKDIR RUNS: a number expected".into()),
        },
        ("--watch-rounds", [workload, workdir, cache, tag, rounds]) => match rounds.parse() {
            Ok(rounds) => watch_rounds::run(workload, Path::new(workdir), Path::new(cache), tag, rounds),
            Err(_) => Err("--watch-rounds WORKLOAD WORKDIR CACHE TAG ROUNDS: a number expected".into()),
        },
        ("--scale", [workdir, runs, max_files]) => match (runs.parse(), max_files.parse()) {
            (Ok(runs), Ok(max_files)) => scale::run(Path::new(workdir), runs, max_files),
            _ => Err("--scale WORKDIR RUNS MAX_FILES: numbers expected".into()),
        },
        ("--scale-chain", [workdir, length, rounds]) => match (length.parse(), rounds.parse()) {
            (Ok(length), Ok(rounds)) => scale::chain_point(Path::new(workdir), length, rounds),
            _ => Err("--scale-chain WORKDIR LENGTH ROUNDS: numbers expected".into()),
        },
        ("--scale-noop", [workdir, files]) => match files.parse() {
            Ok(files) => scale::no_op(Path::new(workdir), files),
            Err(_) => Err("--scale-noop WORKDIR FILES: a number expected".into()),
        },
        ("--platforms" | "--watch-rounds" | "--scale" | "--scale-chain" | "--scale-noop", _) => {
            Err("usage: layerwright-bench --scale WORKDIR RUNS MAX_FILES | --scale-chain WORKDIR LENGTH ROUNDS | \
             --scale-noop WORKDIR FILES | --platforms WORKDIR RUNS | --watch-rounds WORKLOAD WORKDIR CACHE TAG ROUNDS"
                .into())
        }
        _ => return None,
    };
    Some(result)
}

fn main() -> ExitCode {
    let mut arguments: Vec<String> = std::env::args().skip(1).collect();
    if let Some(result) = arguments.split_first().and_then(|(mode, rest)| run_mode(mode, rest)) {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("layerwright-bench: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let mut cache_from = Vec::new();
    let mut cache_to = None;
    let mut reapi = None;
    while let Some(position) =
        arguments.iter().position(|argument| argument.starts_with("--cache-") || argument == "--reapi")
    {
        let flag = arguments.remove(position);
        if position >= arguments.len() {
            eprintln!("{flag} needs a value");
            return ExitCode::from(2);
        }
        let value = arguments.remove(position);
        match flag.as_str() {
            "--cache-from" => cache_from.push(value),
            "--cache-to" => cache_to = Some(value),
            "--reapi" => reapi = Some(value),
            _ => {
                eprintln!("unknown flag {flag}");
                return ExitCode::from(2);
            }
        }
    }
    let [workload, workdir, cache, output] = arguments.as_slice() else {
        eprintln!(
            "usage: layerwright-bench w1|w2|w3|w4 WORKDIR CACHE oci:DIR|docker-archive:FILE|load:TAG [--cache-from REF]... \\
             [--cache-to REF] [--reapi URL]"
        );
        return ExitCode::from(2);
    };
    let image = match workloads::declare(workload, Path::new(workdir)) {
        Ok(image) => image,
        Err(error) => {
            eprintln!("layerwright-bench: {error}");
            return ExitCode::from(2);
        }
    };
    // W2 ends in a loadable archive of 1 GiB of incompressible files: like `docker save`, which
    // it is compared with, write the layer uncompressed (gzip would only burn CPU on noise).
    let compression = if workload == "w2" { Compression::None } else { Compression::Gzip };
    let mut options = BuilderOptions::default().compression(compression);
    options.cache_from = cache_from;
    options.cache_to = cache_to;
    if let Some(url) = reapi {
        options = options.reapi(url, "");
    }
    let built = match Builder::with_options(cache, options).and_then(|builder| builder.build(&image)) {
        Ok(built) => built,
        Err(error) => {
            eprintln!("layerwright-bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    let written = if let Some(dir) = output.strip_prefix("oci:") {
        built.write_oci_layout(dir, &format!("{workload}:latest"))
    } else if let Some(file) = output.strip_prefix("docker-archive:") {
        built.write_docker_archive(file, &format!("{workload}:latest"))
    } else if let Some(tag) = output.strip_prefix("load:") {
        match built.load(tag) {
            Ok(report) => {
                println!("layers-sent {} ({} bytes)", report.layers_sent, report.layer_bytes_sent);
                Ok(())
            }
            Err(error) => {
                eprintln!("layerwright-bench: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        eprintln!("unknown output {output}");
        return ExitCode::from(2);
    };
    if let Err(error) = written {
        eprintln!("layerwright-bench: {error}");
        return ExitCode::FAILURE;
    }
    let built_steps = built.steps().iter().filter(|step| !step.cached).count();
    if std::env::var_os("LAYERWRIGHT_BENCH_STEPS").is_some() {
        for step in built.steps() {
            let state = if step.cached { "cached" } else { "built " };
            eprintln!("{state} {:>9.3?} {}", step.duration, step.label);
        }
    }
    println!("digest {}", built.manifest_digest());
    println!("steps-built {built_steps}");
    println!("peak-rss-kib {}", peak_rss_kib());
    if let Some(remote) = built.remote_cache() {
        let steps_remote = built.steps().iter().filter(|step| step.remote).count();
        println!("steps-remote {steps_remote}");
        println!("blobs-downloaded {} ({} bytes)", remote.blobs_downloaded, remote.bytes_downloaded);
        if let Some(upload) = &remote.reapi_upload {
            println!(
                "uploaded {} steps, {} blobs ({} bytes)",
                upload.action_results, upload.blobs_uploaded, upload.bytes_uploaded
            );
        }
        if let Some(export) = &remote.export {
            println!(
                "exported {} records, {} blobs uploaded ({} bytes)",
                export.records, export.blobs_uploaded, export.bytes_uploaded
            );
        }
    }
    ExitCode::SUCCESS
}
