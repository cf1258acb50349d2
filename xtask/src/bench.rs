//! `cargo xtask bench`: the same images built by layerwright, by BuildKit (`docker build` with
//! `DOCKER_BUILDKIT=1`, against a private `dockerd`) and by buildah (`buildah bud --layers
//! --isolation chroot`, in a private storage root), run by run alternating the tools, reported
//! as medians and ratios layerwright / BuildKit (markdown on stdout and in
//! `target/bench/report.md`, JSON in `target/bench/report.json`).
//!
//! Workloads (generated deterministically under `target/bench/`):
//! - W1: the busybox base; a COPY of 2,000 × 4 KiB files; three independent stages, each
//!   `sleep 1` and writing a file; a RUN over the copied tree; `copy_from` of the three stages; a
//!   RUN that deletes one file; ENV; CMD. Scenarios: cold, no-op rebuild, one context file changed.
//! - W2: a 1 GiB context (256 incompressible 4 MiB files) copied in one step; cold build to a
//!   loadable archive (`docker build` + `docker save`, `buildah bud` + `buildah push
//!   docker-archive:`); and layerwright's peak RSS.
//! - W3: twenty small independent stages merged into one image: cold and no-op.
//!
//! Every tool starts from the same base image (the `busybox` example, loaded into each), and
//! after the timed runs the three results are unpacked and their file trees compared.
//! layerwright is timed as a whole process (the `layerwright-bench` binary), as the others are.
//! It deliberately measures whole builds, not parts: the criterion micro-benchmarks of the hot
//! paths are `cargo xtask bench --micro`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use layerwright_examples::ExampleEnvironment;
use layerwright_examples::workloads::{self, BASE_TAG};

use crate::docker::DockerEngine;

/// What `cargo xtask bench` runs.
pub struct BenchOptions {
    /// Fewer runs (3, and 1 for W2) for a quick look.
    pub quick: bool,
    /// Only the workloads whose name contains this (`w1`, `w2`, `w3`).
    pub only: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Layerwright,
    BuildKit,
    Buildah,
}

impl Tool {
    const ALL: [Tool; 3] = [Tool::Layerwright, Tool::BuildKit, Tool::Buildah];

    fn name(self) -> &'static str {
        match self {
            Tool::Layerwright => "layerwright",
            Tool::BuildKit => "BuildKit",
            Tool::Buildah => "buildah",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    Cold,
    NoOp,
    OneFile,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Cold => "cold",
            Scenario::NoOp => "no-op",
            Scenario::OneFile => "one file changed",
        }
    }
}

struct Workload {
    name: &'static str,
    scenarios: &'static [Scenario],
    /// Whether the result is exported to a loadable archive inside the timed run (W2).
    archive: bool,
    /// The ratio layerwright / BuildKit the issue sets as the target, per scenario.
    targets: &'static [(Scenario, f64)],
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "w1",
        scenarios: &[Scenario::Cold, Scenario::NoOp, Scenario::OneFile],
        archive: false,
        targets: &[(Scenario::Cold, 0.8), (Scenario::NoOp, 0.1), (Scenario::OneFile, 0.3)],
    },
    Workload { name: "w2", scenarios: &[Scenario::Cold], archive: true, targets: &[(Scenario::Cold, 0.2)] },
    Workload {
        name: "w3",
        scenarios: &[Scenario::Cold, Scenario::NoOp],
        archive: false,
        targets: &[(Scenario::NoOp, 0.1)],
    },
];

/// One measured scenario.
struct Measured {
    workload: &'static str,
    scenario: Scenario,
    /// Per tool, the durations of the runs.
    durations: Vec<(Tool, Vec<Duration>)>,
    target: Option<f64>,
    peak_rss_kib: Option<u64>,
}

pub(crate) fn median(durations: &[Duration]) -> Duration {
    let mut sorted = durations.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// The bench's directories and clients.
struct Bench {
    workspace: PathBuf,
    dir: PathBuf,
    layerwright: PathBuf,
    docker_host: String,
    buildah_root: PathBuf,
    buildah_runroot: PathBuf,
    one_file_round: u32,
}

pub fn run(workspace: &Path, options: &BenchOptions) -> Result<()> {
    let dir = workspace.join("target/bench");
    fs::create_dir_all(&dir)?;
    let layerwright = build_bench_binary(workspace)?;
    let (engine, docker_host) = DockerEngine::from_environment_or_start()?;
    let mut bench = Bench {
        workspace: workspace.to_owned(),
        layerwright,
        docker_host,
        buildah_root: dir.join("buildah/root"),
        buildah_runroot: dir.join("buildah/runroot"),
        dir,
        one_file_round: 0,
    };
    bench.prepare_base()?;
    let runs = if options.quick { 3 } else { 5 };
    let mut measured = Vec::new();
    for workload in &WORKLOADS {
        if options.only.as_deref().is_some_and(|only| !workload.name.contains(only)) {
            continue;
        }
        workloads::generate(workload.name, &bench.dir)?;
        let workload_runs = if workload.name == "w2" { if options.quick { 1 } else { 3 } } else { runs };
        for scenario in workload.scenarios {
            measured.push(bench.measure(workload, *scenario, workload_runs)?);
        }
        bench.compare_trees(workload)?;
    }
    let report = report(&measured);
    println!("{report}");
    fs::write(bench.dir.join("report.md"), &report)?;
    fs::write(bench.dir.join("report.json"), serde_json_report(&measured))?;
    drop(engine);
    Ok(())
}

/// Builds the `layerwright-bench` binary (release) and returns its path.
pub fn build_bench_binary(workspace: &Path) -> Result<PathBuf> {
    eprintln!("bench: building the layerwright-bench binary (release)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "--release", "--quiet", "--package", "layerwright-bench"])
        .status()?;
    if !status.success() {
        bail!("building layerwright-bench failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    Ok(target.join("release/layerwright-bench"))
}

impl Bench {
    fn docker(&self) -> Command {
        let mut command = Command::new("/usr/bin/docker");
        command.env("DOCKER_HOST", &self.docker_host).env("DOCKER_BUILDKIT", "1");
        command
    }

    fn buildah(&self) -> Command {
        let mut command = Command::new("buildah");
        command.arg("--root").arg(&self.buildah_root).arg("--runroot").arg(&self.buildah_runroot);
        command.args(["--storage-driver", "overlay"]);
        command
    }

    /// The busybox example as a docker-archive, loaded into the engine and buildah's storage.
    fn prepare_base(&self) -> Result<()> {
        let environment = ExampleEnvironment::for_workspace(&self.workspace);
        let archive = workloads::write_base_archive(&environment, &self.dir)?;
        run_quiet(self.docker().arg("load").arg("-i").arg(&archive))?;
        self.pull_base_into_buildah()
    }

    fn pull_base_into_buildah(&self) -> Result<()> {
        let archive = self.dir.join("base.tar");
        let output =
            run_quiet(self.buildah().args(["pull", "--quiet"]).arg(format!("docker-archive:{}", archive.display())))?;
        let id = output.trim().lines().last().unwrap_or_default().to_owned();
        run_quiet(self.buildah().args(["tag", &id, BASE_TAG]))?;
        Ok(())
    }

    fn measure(&mut self, workload: &Workload, scenario: Scenario, runs: usize) -> Result<Measured> {
        let mut durations: Vec<(Tool, Vec<Duration>)> = Tool::ALL.iter().map(|tool| (*tool, Vec::new())).collect();
        let mut peak_rss_kib = None;
        for run in 0..runs {
            // Alternate the order run by run, so that no tool always runs on a warm page cache.
            for offset in 0..Tool::ALL.len() {
                let tool = Tool::ALL[(run + offset) % Tool::ALL.len()];
                self.prepare(tool, workload, scenario)?;
                settle()?;
                let (elapsed, rss) = self.timed_build(tool, workload)?;
                eprintln!(
                    "bench: {} {} {}: {:.3} s",
                    workload.name,
                    scenario.name(),
                    tool.name(),
                    elapsed.as_secs_f64()
                );
                if let Some(rss) = rss {
                    peak_rss_kib = Some(peak_rss_kib.unwrap_or(0).max(rss));
                }
                durations.iter_mut().find(|(entry, _)| *entry == tool).expect("every tool").1.push(elapsed);
            }
        }
        let target = workload.targets.iter().find(|(entry, _)| *entry == scenario).map(|(_, target)| *target);
        Ok(Measured { workload: workload.name, scenario, durations, target, peak_rss_kib })
    }

    /// Puts the tool's cache in the state the scenario starts from (untimed).
    fn prepare(&mut self, tool: Tool, workload: &Workload, scenario: Scenario) -> Result<()> {
        match scenario {
            Scenario::Cold => self.clear(tool, workload.name),
            Scenario::NoOp => {
                self.timed_build(tool, workload)?;
                Ok(())
            }
            Scenario::OneFile => {
                self.timed_build(tool, workload)?;
                self.one_file_round += 1;
                let path = self.dir.join(workload.name).join("context/files/d10/f1000");
                fs::write(path, format!("changed in round {}\n", self.one_file_round))?;
                Ok(())
            }
        }
    }

    fn clear(&self, tool: Tool, workload: &str) -> Result<()> {
        match tool {
            Tool::Layerwright => {
                for path in [self.dir.join(format!("lw-cache-{workload}")), self.dir.join(format!("lw-out-{workload}"))]
                {
                    if path.exists() {
                        fs::remove_dir_all(path)?;
                    }
                }
                let _ = fs::remove_file(self.dir.join(format!("lw-out-{workload}.tar")));
            }
            Tool::BuildKit => {
                let _ = run_quiet(self.docker().args(["rmi", "-f", &format!("{workload}:bench")]));
                run_quiet(self.docker().args(["builder", "prune", "--all", "--force"]))?;
            }
            Tool::Buildah => {
                run_quiet(self.buildah().args(["rmi", "--all", "--force"]))?;
                self.pull_base_into_buildah()?;
            }
        }
        Ok(())
    }

    /// One build, retried up to twice when the tool fails (buildah's chroot isolation fails
    /// now and then with "sealing memfd copy: Device or resource busy"); the retry is what is
    /// timed, and the failure is said.
    fn timed_build(&self, tool: Tool, workload: &Workload) -> Result<(Duration, Option<u64>)> {
        retried(&format!("{} {}", workload.name, tool.name()), || self.timed_build_once(tool, workload))
    }

    /// One build (and, for W2, export to a loadable archive), timed as whole processes.
    fn timed_build_once(&self, tool: Tool, workload: &Workload) -> Result<(Duration, Option<u64>)> {
        let name = workload.name;
        let root = self.dir.join(name);
        let dockerfile = root.join("Dockerfile");
        let context = root.join("context");
        let tag = format!("{name}:bench");
        let archive = self.dir.join(format!("{}-{name}.tar", tool.name()));
        let started = Instant::now();
        let mut rss = None;
        match tool {
            Tool::Layerwright => {
                let output = if workload.archive {
                    format!("docker-archive:{}", self.dir.join(format!("lw-out-{name}.tar")).display())
                } else {
                    format!("oci:{}", self.dir.join(format!("lw-out-{name}")).display())
                };
                let stdout = run_quiet(
                    Command::new(&self.layerwright)
                        .arg(name)
                        .arg(&self.dir)
                        .arg(self.dir.join(format!("lw-cache-{name}")))
                        .arg(output),
                )?;
                rss =
                    stdout.lines().find_map(|line| line.strip_prefix("peak-rss-kib ")).and_then(|kib| kib.parse().ok());
            }
            Tool::BuildKit => {
                run_quiet(
                    self.docker()
                        .args(["build", "--network=none", "--quiet", "-f"])
                        .arg(&dockerfile)
                        .args(["-t", &tag])
                        .arg(&context),
                )?;
                if workload.archive {
                    run_quiet(self.docker().args(["save", "-o"]).arg(&archive).arg(&tag))?;
                }
            }
            Tool::Buildah => {
                run_quiet(
                    self.buildah()
                        .args(["bud", "--layers", "--isolation", "chroot", "--quiet", "-f"])
                        .arg(&dockerfile)
                        .args(["-t", &tag])
                        .arg(&context),
                )?;
                if workload.archive {
                    let _ = fs::remove_file(&archive);
                    run_quiet(
                        self.buildah()
                            .args(["push", "--quiet", &tag])
                            .arg(format!("docker-archive:{}:{tag}", archive.display())),
                    )?;
                }
            }
        }
        Ok((started.elapsed(), rss))
    }

    /// Builds once more with each tool from the same context (untimed), unpacks the results
    /// and compares the file trees.
    fn compare_trees(&self, workload: &Workload) -> Result<()> {
        for tool in Tool::ALL {
            self.timed_build(tool, workload)?;
        }
        let workload = workload.name;
        let compare = self.dir.join(format!("compare-{workload}"));
        if compare.exists() {
            fs::remove_dir_all(&compare)?;
        }
        fs::create_dir_all(&compare)?;
        let tag = format!("{workload}:bench");
        let layerwright_layout = compare.join("layerwright");
        let built = self.dir.join(format!("lw-out-{workload}"));
        if built.is_dir() {
            copy_dir(&built, &layerwright_layout)?;
        } else {
            run_quiet(
                Command::new("skopeo")
                    .args(["copy", "--quiet"])
                    .arg(format!("docker-archive:{}", self.dir.join(format!("lw-out-{workload}.tar")).display()))
                    .arg(format!("oci:{}:latest", layerwright_layout.display())),
            )?;
        }
        let docker_archive = compare.join("buildkit.tar");
        run_quiet(self.docker().args(["save", "-o"]).arg(&docker_archive).arg(&tag))?;
        run_quiet(
            Command::new("skopeo")
                .args(["copy", "--quiet"])
                .arg(format!("docker-archive:{}", docker_archive.display()))
                .arg(format!("oci:{}:latest", compare.join("buildkit").display())),
        )?;
        run_quiet(
            self.buildah()
                .args(["push", "--quiet", &tag])
                .arg(format!("oci:{}:latest", compare.join("buildah").display())),
        )?;
        let mut listings = Vec::new();
        for (tool, layout, reference) in [
            ("layerwright", compare.join("layerwright"), "latest".to_owned()),
            ("BuildKit", compare.join("buildkit"), "latest".to_owned()),
            ("buildah", compare.join("buildah"), "latest".to_owned()),
        ] {
            let bundle = compare.join(format!("{tool}-bundle"));
            run_quiet(
                Command::new("umoci")
                    .args(["unpack", "--image"])
                    .arg(format!("{}:{reference}", layout.display()))
                    .arg(&bundle),
            )?;
            listings.push((tool, layerwright::host::directory_listing(&bundle.join("rootfs"))?));
        }
        for (tool, listing) in &listings[1..] {
            let ours: std::collections::BTreeSet<&str> = listings[0].1.lines().collect();
            let theirs: std::collections::BTreeSet<&str> = listing.lines().collect();
            let only_ours: Vec<&&str> = ours.difference(&theirs).collect();
            let (leftovers, only_theirs): (Vec<&&str>, Vec<&&str>) =
                theirs.difference(&ours).partition(|line| is_runtime_leftover(line));
            if only_ours.is_empty() && only_theirs.is_empty() {
                let note = if leftovers.is_empty() {
                    String::new()
                } else {
                    let paths: Vec<&str> = leftovers.iter().filter_map(|line| line.rsplit(' ').next()).collect();
                    format!(" (plus the mountpoints its RUN steps leave behind: {})", paths.join(" "))
                };
                eprintln!("bench: {workload}: {tool} built the same file tree as layerwright{note}");
                continue;
            }
            eprintln!("bench: {workload}: {tool}'s file tree differs from layerwright's:");
            for line in only_ours.iter().take(10) {
                eprintln!("  only layerwright: {line}");
            }
            for line in only_theirs.iter().take(10) {
                eprintln!("  only {tool}: {line}");
            }
        }
        Ok(())
    }
}

/// What BuildKit and buildah leave in RUN layers from their own mounts (layerwright's runner
/// leaves no trace of its mounts): empty `/dev`, `/proc`, `/sys`, `/run` and empty
/// `/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`.
fn is_runtime_leftover(line: &str) -> bool {
    let path = line.rsplit(' ').next().unwrap_or_default();
    let empty_file = line.starts_with("file ")
        && line.contains(" 0 sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 ");
    (line.starts_with("dir ") && matches!(path, "/dev" | "/proc" | "/sys" | "/run"))
        || (empty_file && matches!(path, "/etc/hostname" | "/etc/hosts" | "/etc/resolv.conf"))
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    if !status.success() {
        bail!("cp -a {} {} failed", from.display(), to.display());
    }
    Ok(())
}

/// Runs a command, returning its stdout; a failure is an error with its stderr.
/// `attempt` run up to three times while it fails, each failure said on stderr with `label`;
/// the result of the last attempt.
pub(crate) fn retried<T>(label: &str, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    for number in 1..3 {
        match attempt() {
            Ok(result) => return Ok(result),
            Err(error) => eprintln!("bench: {label} failed (attempt {number}), retrying: {error:#}"),
        }
    }
    attempt()
}

/// Before a timed run (untimed): no tool pays for the previous one's dirty pages (flushed) or
/// for the work an engine goes on doing after its client returned (half a second to finish).
pub(crate) fn settle() -> Result<()> {
    run_quiet(&mut Command::new("sync"))?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

pub(crate) fn run_quiet(command: &mut Command) -> Result<String> {
    let described = format!("{command:?}");
    let output = command.stdin(Stdio::null()).output().with_context(|| format!("running {described}"))?;
    if !output.status.success() {
        bail!("{described} failed ({}):\n{}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn report(measured: &[Measured]) -> String {
    let mut text = String::from(
        "| workload | scenario | layerwright | BuildKit | buildah | layerwright / BuildKit | target | layerwright / buildah |\n|---|---|---|---|---|---|---|---|\n",
    );
    for entry in measured {
        let median_of =
            |tool: Tool| median(&entry.durations.iter().find(|(each, _)| *each == tool).expect("every tool").1);
        let (ours, buildkit, buildah) =
            (median_of(Tool::Layerwright), median_of(Tool::BuildKit), median_of(Tool::Buildah));
        let ratio = ours.as_secs_f64() / buildkit.as_secs_f64();
        let target = match entry.target {
            Some(target) if ratio <= target => format!("≤ {target} met"),
            Some(target) => format!("≤ {target} MISSED"),
            None => "-".to_owned(),
        };
        let _ = writeln!(
            text,
            "| {} | {} | {:.3} s | {:.3} s | {:.3} s | {ratio:.3} | {target} | {:.3} |",
            entry.workload,
            entry.scenario.name(),
            ours.as_secs_f64(),
            buildkit.as_secs_f64(),
            buildah.as_secs_f64(),
            ours.as_secs_f64() / buildah.as_secs_f64()
        );
    }
    for entry in measured {
        if let Some(kib) = entry.peak_rss_kib {
            let _ = writeln!(
                text,
                "\n{} {}: layerwright peak RSS {} MiB",
                entry.workload,
                entry.scenario.name(),
                kib / 1024
            );
        }
    }
    text
}

fn serde_json_report(measured: &[Measured]) -> String {
    let entries: Vec<serde_json::Value> = measured
        .iter()
        .map(|entry| {
            let tools: serde_json::Map<String, serde_json::Value> = entry
                .durations
                .iter()
                .map(|(tool, durations)| {
                    let seconds: Vec<f64> = durations.iter().map(Duration::as_secs_f64).collect();
                    (tool.name().to_owned(), serde_json::json!({ "runs_seconds": seconds, "median_seconds": median(durations).as_secs_f64() }))
                })
                .collect();
            serde_json::json!({
                "workload": entry.workload,
                "scenario": entry.scenario.name(),
                "tools": tools,
                "target_ratio_vs_buildkit": entry.target,
                "layerwright_peak_rss_kib": entry.peak_rss_kib,
            })
        })
        .collect();
    serde_json::to_string_pretty(&entries).expect("JSON values serialise")
}
