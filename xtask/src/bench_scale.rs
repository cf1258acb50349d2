//! `cargo xtask bench --scale [--quick]`: the scaling curves (files in a context, steps in a
//! chain, images in a `build_all`), measured by the release `layerwright-bench --scale` in one
//! process with a fresh `Builder` per build, then the no-op of the largest context in fresh
//! processes, timed whole.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::bench::build_bench_binary;

/// Prints the curves; `quick` takes one run per point and leaves out the 200k-file context.
pub fn run(workspace: &Path, quick: bool) -> Result<()> {
    let binary = build_bench_binary(workspace)?;
    let workdir = workspace.join("target/bench-scale");
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let (runs, max_files) = if quick { ("1", "20000") } else { ("3", "200000") };
    let status = Command::new(&binary)
        .arg("--scale")
        .arg(&workdir)
        .args([runs, max_files])
        .status()
        .context("running layerwright-bench --scale")?;
    if !status.success() {
        bail!("layerwright-bench --scale failed");
    }
    let files = if quick { "20000" } else { "200000" };
    let mut durations = Vec::new();
    for _ in 0..if quick { 1 } else { 3 } {
        let started = Instant::now();
        let output = Command::new(&binary)
            .arg("--scale-noop")
            .arg(&workdir)
            .arg(files)
            .output()
            .context("running layerwright-bench --scale-noop")?;
        let elapsed = started.elapsed();
        if !output.status.success() {
            bail!("layerwright-bench --scale-noop failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        durations.push(elapsed);
    }
    durations.sort();
    let median: Duration = durations[durations.len() / 2];
    println!(
        "{:<34} {:>10.1} ms (a fresh process, timed whole)",
        format!("no-op files {files}"),
        median.as_secs_f64() * 1000.0
    );
    Ok(())
}
