//! `cargo xtask bench --apt-mounts [--quick]`: what RUN cache mounts save, layerwright against
//! BuildKit in the same run. The step is W4's kind of apt install on the Debian minbase
//! (`layerwright_examples::workloads::apt_bench_workload`): after a first build that installs
//! `jq`, each round re-runs the step with one package more (its command changed), once with
//! `/var/cache/apt` and `/var/lib/apt/lists` as cache mounts (layerwright's `Mount::cache`,
//! BuildKit's `RUN --mount=type=cache`, both `sharing=locked`) and once without (the usual
//! install, then `apt-get clean` and the lists removed). The tools alternate round by round.
//!
//! What it is not: part of CI (every round fetches from Debian's mirror).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use layerwright_examples::workloads::{APT_BENCH_PACKAGES, apt_bench_dockerfile, apt_bench_workload};

use crate::bench::{median, retried, run_quiet, settle};
use crate::bench_distro::{DebianBench, buildkit_build, docker_command};

/// The tag BuildKit's builds get.
const TAG: &str = "apt-bench:latest";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Layerwright,
    BuildKit,
}

pub fn run(workspace: &Path, quick: bool) -> Result<()> {
    let bench = DebianBench::start(workspace)?;
    let rounds = if quick { 3 } else { APT_BENCH_PACKAGES.len() - 1 };
    let mut rows = Vec::new();
    for with_mounts in [true, false] {
        rows.push((with_mounts, measure(&bench, with_mounts, rounds)?));
    }
    let report = report(&rows);
    println!("{report}");
    fs::write(bench.dir.join("report-apt-mounts.md"), &report)?;
    drop(bench);
    Ok(())
}

/// From an empty cache (layerwright's directory, BuildKit's build cache with its cache
/// mounts), round 0 untimed, then `rounds` timed rounds per tool.
fn measure(bench: &DebianBench, with_mounts: bool, rounds: usize) -> Result<[Vec<Duration>; 2]> {
    let cache = cache(bench, with_mounts);
    if cache.exists() {
        fs::remove_dir_all(&cache)?;
    }
    run_quiet(docker_command(&bench.docker_host).args(["builder", "prune", "--all", "--force"]))?;
    for tool in [Tool::Layerwright, Tool::BuildKit] {
        build(bench, tool, with_mounts, 0)?;
    }
    let mut durations = [Vec::new(), Vec::new()];
    for (round, packages) in APT_BENCH_PACKAGES.iter().enumerate().skip(1).take(rounds) {
        let order =
            if round % 2 == 1 { [Tool::Layerwright, Tool::BuildKit] } else { [Tool::BuildKit, Tool::Layerwright] };
        for tool in order {
            settle()?;
            let elapsed = build(bench, tool, with_mounts, round)?;
            let name = apt_bench_workload(with_mounts, round);
            eprintln!("bench: {name} ({packages}) {tool:?}: {:.3} s", elapsed.as_secs_f64());
            durations[usize::from(tool == Tool::BuildKit)].push(elapsed);
        }
    }
    Ok(durations)
}

fn cache(bench: &DebianBench, with_mounts: bool) -> PathBuf {
    bench.dir.join(format!("lw-cache-{}", apt_bench_workload(with_mounts, 0)))
}

/// One build of `round`, timed; retried up to twice when the tool fails (the mirror).
fn build(bench: &DebianBench, tool: Tool, with_mounts: bool, round: usize) -> Result<Duration> {
    let name = apt_bench_workload(with_mounts, round);
    let root = bench.dir.join(&name);
    if tool == Tool::BuildKit {
        fs::create_dir_all(root.join("context"))?;
        fs::write(root.join("Dockerfile"), apt_bench_dockerfile(&name)?)?;
    }
    retried(&format!("{name} {tool:?}"), || {
        let started = Instant::now();
        match tool {
            Tool::Layerwright => {
                run_quiet(
                    Command::new(&bench.layerwright)
                        .arg(&name)
                        .arg(&bench.dir)
                        .arg(cache(bench, with_mounts))
                        .arg(format!("oci:{}", bench.dir.join("lw-out-apt").display())),
                )?;
            }
            Tool::BuildKit => buildkit_build(&bench.docker_host, &root, TAG)?,
        }
        Ok(started.elapsed())
    })
}

fn report(rows: &[(bool, [Vec<Duration>; 2])]) -> String {
    let mut text = String::from(
        "| apt step re-run with one package more | layerwright | BuildKit | layerwright / BuildKit |\n|---|---|---|---|\n",
    );
    let mut medians = Vec::new();
    for (with_mounts, [ours, buildkit]) in rows {
        let (ours, buildkit) = (median(ours).as_secs_f64(), median(buildkit).as_secs_f64());
        let name = if *with_mounts { "with cache mounts" } else { "without cache mounts" };
        let _ = writeln!(text, "| {name} | {ours:.3} s | {buildkit:.3} s | {:.3} |", ours / buildkit);
        medians.push((ours, buildkit));
    }
    if let [(ours_with, buildkit_with), (ours_without, buildkit_without)] = medians[..] {
        let _ = writeln!(
            text,
            "| without / with (what the mounts save) | {:.2}× | {:.2}× | |",
            ours_without / ours_with,
            buildkit_without / buildkit_with
        );
    }
    text
}
