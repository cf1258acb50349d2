//! The benchmark workloads of `cargo xtask bench`, declared with layerwright, as a binary so
//! that layerwright is timed as a whole process, exactly like `docker build` and `buildah bud`.
//!
//! `layerwright-bench WORKLOAD WORKDIR CACHE OUTPUT`: WORKLOAD is `w1`, `w2` or `w3`; WORKDIR
//! holds what `cargo xtask bench` generated (`base.tar`, the base image every tool starts from,
//! and `WORKLOAD/context/`); OUTPUT is `oci:DIR` or `docker-archive:FILE`. Prints the manifest
//! digest, the steps built, and the process's peak RSS.
//!
//! Each declaration mirrors the `Dockerfile` that `xtask/src/bench.rs` writes for the same
//! workload, step for step; change them together.

use std::path::Path;
use std::process::ExitCode;

use layerwright::{Builder, BuilderOptions, Compression, Context, Image};

fn w1(workdir: &Path) -> Image {
    let base = Image::from_archive(workdir.join("base.tar"));
    let context = Context::dir(workdir.join("w1/context")).expect("a context path");
    let stages: Vec<Image> =
        (0..3).map(|stage| base.run(format!("sleep 1 && echo stage {stage} > /stage-{stage}").as_str())).collect();
    let mut image = base
        .copy(&context, "files", "/data")
        .run("find /data -type f | wc -l > /file-count && cat /data/d00/* | md5sum > /d00.md5");
    for (stage, source) in stages.iter().enumerate() {
        image = image.copy_from(source, &format!("/stage-{stage}"), "/stages/");
    }
    image.run("rm /data/d00/f0000").env("W1", "done").cmd(["/bin/sh"])
}

fn w2(workdir: &Path) -> Image {
    let base = Image::from_archive(workdir.join("base.tar"));
    let context = Context::dir(workdir.join("w2/context")).expect("a context path");
    base.copy(&context, "blobs", "/blobs").cmd(["/bin/sh"])
}

fn w3(workdir: &Path) -> Image {
    let base = Image::from_archive(workdir.join("base.tar"));
    let context = Context::dir(workdir.join("w3/context")).expect("a context path");
    let stages: Vec<Image> =
        (0..20).map(|stage| base.copy(&context, &format!("s{stage:02}.txt"), &format!("/s{stage:02}.txt"))).collect();
    let mut image = base;
    for (stage, source) in stages.iter().enumerate() {
        image = image.copy_from(source, &format!("/s{stage:02}.txt"), "/out/");
    }
    image.cmd(["/bin/sh"])
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let [workload, workdir, cache, output] = arguments.as_slice() else {
        eprintln!("usage: layerwright-bench w1|w2|w3 WORKDIR CACHE oci:DIR|docker-archive:FILE");
        return ExitCode::from(2);
    };
    let workdir = Path::new(workdir);
    let image = match workload.as_str() {
        "w1" => w1(workdir),
        "w2" => w2(workdir),
        "w3" => w3(workdir),
        other => {
            eprintln!("unknown workload {other}");
            return ExitCode::from(2);
        }
    };
    // W2 ends in a loadable archive of 1 GiB of incompressible files: like `docker save`, which
    // it is compared with, write the layer uncompressed (gzip would only burn CPU on noise).
    let compression = if workload == "w2" { Compression::None } else { Compression::Gzip };
    let options = BuilderOptions { compression, ..BuilderOptions::default() };
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
    ExitCode::SUCCESS
}
