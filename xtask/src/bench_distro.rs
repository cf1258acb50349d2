//! `cargo xtask bench --distro`: W4, a distribution workload, layerwright against BuildKit in the
//! same run, and the daily edit → runnable loop.
//!
//! W4 (declared beside its Dockerfile in `layerwright_examples::workloads`): a Debian bookworm
//! minbase made by `mmdebstrap`; `apt-get update && apt-get install jq` over the network
//! (layerwright: an isolated network namespace; BuildKit: `--network=host`); a COPY of 300
//! source files; `useradd` + `chown -R`; a build step as that user. Both tools start from the
//! same base: the minbase tar imported into the engine (`docker import`) and saved as the
//! docker-archive layerwright reads, so layerwright's cold build includes the base's import and
//! BuildKit's does not (its base is in its store, as on a developer's machine).
//!
//! Scenarios, alternating the tools run by run: cold, no-op, one source file changed, and edit
//! → runnable (one file changed, then the image in the engine: layerwright builds and loads it
//! with `BuiltImage::load`, BuildKit's `docker build -t` lands there). Then the same loop in one
//! long-lived process: `build-image --watch --load`'s watch loop (`layerwright-bench
//! --watch-rounds`), compared with BuildKit's edit → runnable runs of this bench.
//!
//! What it is not: part of CI (it downloads packages from Debian's mirror every cold run).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use layerwright_examples::workloads::{self, DEBIAN_BASE_TAG, W4_CHANGED_FILE};

use crate::bench::{build_bench_binary, median, retried, run_quiet, settle};
use crate::docker::DockerEngine;

/// Where `.ci/run` leaves the minbase tar (the tests use it too); made here when absent.
const MINBASE: &str = "/usr/local/lib/layerwright-test/debian-bookworm-minbase.tar";

/// The tag both tools give W4's image in the engine.
const TAG: &str = "w4:bench";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Layerwright,
    BuildKit,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    Cold,
    NoOp,
    OneFile,
    EditToRunnable,
}

impl Scenario {
    const ALL: [Scenario; 4] = [Scenario::Cold, Scenario::NoOp, Scenario::OneFile, Scenario::EditToRunnable];

    fn name(self) -> &'static str {
        match self {
            Scenario::Cold => "cold (layerwright: base import included)",
            Scenario::NoOp => "no-op",
            Scenario::OneFile => "one file changed",
            Scenario::EditToRunnable => "edit → runnable (build + in the engine)",
        }
    }

    /// The target for layerwright / BuildKit.
    fn target(self) -> f64 {
        match self {
            Scenario::Cold => 1.0,
            Scenario::NoOp => 0.1,
            Scenario::OneFile => 0.3,
            Scenario::EditToRunnable => 0.5,
        }
    }
}

struct DistroBench {
    dir: PathBuf,
    layerwright: PathBuf,
    docker_host: String,
    edits: u32,
}

/// What the benches on the Debian minbase share: their directory (`target/bench`), the release
/// bench binary, and a Docker engine (`DOCKER_HOST`'s, else one started and kept in `engine`)
/// holding the minbase as `DEBIAN_BASE_TAG`, which `dir/debian.tar` holds for layerwright.
pub(crate) struct DebianBench {
    pub dir: PathBuf,
    pub layerwright: PathBuf,
    pub docker_host: String,
    pub engine: Option<DockerEngine>,
}

impl DebianBench {
    pub(crate) fn start(workspace: &Path) -> Result<DebianBench> {
        let dir = workspace.join("target/bench");
        fs::create_dir_all(&dir)?;
        let layerwright = build_bench_binary(workspace)?;
        let (engine, docker_host) = DockerEngine::from_environment_or_start()?;
        prepare_debian_base(&dir, &docker_host)?;
        Ok(DebianBench { dir, layerwright, docker_host, engine })
    }
}

pub fn run(workspace: &Path, quick: bool) -> Result<()> {
    let DebianBench { dir, layerwright, docker_host, engine } = DebianBench::start(workspace)?;
    let mut bench = DistroBench { dir, layerwright, docker_host, edits: 0 };
    workloads::generate("w4", &bench.dir)?;
    let runs = if quick { 3 } else { 5 };
    let mut rows: Vec<Row> = Vec::new();
    let mut buildkit_edit_runs = Vec::new();
    for scenario in Scenario::ALL {
        let durations = bench.measure(scenario, runs)?;
        if scenario == Scenario::EditToRunnable {
            buildkit_edit_runs.clone_from(&durations[1]);
        }
        rows.push((scenario.name().to_owned(), durations, Some(scenario.target())));
    }
    let WatchRounds { edit_to_loaded, build_and_load, load } = bench.watch_rounds(if quick { 3 } else { 7 })?;
    rows.push((
        "--watch: edit → runnable (debounce 50 ms included)".to_owned(),
        [edit_to_loaded, buildkit_edit_runs.clone()],
        Some(0.3),
    ));
    rows.push(("--watch: build + load only".to_owned(), [build_and_load, buildkit_edit_runs.clone()], Some(0.3)));
    // The engine's share, which no change on this side can shorten: when it alone exceeds a
    // target, that target cannot be met through the engine's API.
    rows.push(("--watch: the engine's load alone".to_owned(), [load, buildkit_edit_runs], None));
    let report = report(&rows);
    println!("{report}");
    fs::write(bench.dir.join("report-distro.md"), &report)?;
    drop(engine);
    Ok(())
}

impl DistroBench {
    fn docker(&self) -> Command {
        docker_command(&self.docker_host)
    }

    fn measure(&mut self, scenario: Scenario, runs: usize) -> Result<[Vec<Duration>; 2]> {
        let mut durations = [Vec::new(), Vec::new()];
        for run in 0..runs {
            for offset in 0..2 {
                let tool = [Tool::Layerwright, Tool::BuildKit][(run + offset) % 2];
                self.prepare(tool, scenario)?;
                settle()?;
                let elapsed = self.timed_build(tool, scenario)?;
                eprintln!("bench: w4 {} {tool:?}: {:.3} s", scenario.name(), elapsed.as_secs_f64());
                durations[usize::from(tool == Tool::BuildKit)].push(elapsed);
            }
        }
        Ok(durations)
    }

    fn prepare(&mut self, tool: Tool, scenario: Scenario) -> Result<()> {
        match scenario {
            Scenario::Cold => {
                match tool {
                    Tool::Layerwright => {
                        let cache = self.dir.join("lw-cache-w4");
                        if cache.exists() {
                            fs::remove_dir_all(cache)?;
                        }
                    }
                    Tool::BuildKit => {
                        let _ = run_quiet(self.docker().args(["rmi", "-f", TAG]));
                        run_quiet(self.docker().args(["builder", "prune", "--all", "--force"]))?;
                    }
                }
                Ok(())
            }
            Scenario::NoOp => self.timed_build(tool, scenario).map(drop),
            Scenario::OneFile | Scenario::EditToRunnable => {
                self.timed_build(tool, scenario)?;
                self.edit()
            }
        }
    }

    /// Rewrites W4's changed file with new content.
    fn edit(&mut self) -> Result<()> {
        self.edits += 1;
        let path = self.dir.join("w4/context").join(W4_CHANGED_FILE);
        fs::write(path, format!("changed in round {}\n", self.edits))?;
        Ok(())
    }

    /// One build, retried up to twice when the tool fails (BuildKit's context transfer lost a
    /// file now and then on a loaded machine); the retry is what is timed, and the failure is
    /// said.
    fn timed_build(&self, tool: Tool, scenario: Scenario) -> Result<Duration> {
        retried(&format!("w4 {tool:?}"), || self.timed_build_once(tool, scenario))
    }

    fn timed_build_once(&self, tool: Tool, scenario: Scenario) -> Result<Duration> {
        let started = Instant::now();
        match tool {
            Tool::Layerwright => {
                let output = if scenario == Scenario::EditToRunnable {
                    format!("load:{TAG}")
                } else {
                    format!("oci:{}", self.dir.join("lw-out-w4").display())
                };
                run_quiet(
                    Command::new(&self.layerwright)
                        .env("DOCKER_HOST", &self.docker_host)
                        .arg("w4")
                        .arg(&self.dir)
                        .arg(self.dir.join("lw-cache-w4"))
                        .arg(output),
                )?;
            }
            Tool::BuildKit => buildkit_build(&self.docker_host, &self.dir.join("w4"), TAG)?,
        }
        Ok(started.elapsed())
    }

    /// `rounds` edits through one watch loop (after a build that fills the cache).
    fn watch_rounds(&self, rounds: u32) -> Result<WatchRounds> {
        let output = run_quiet(
            Command::new(&self.layerwright)
                .env("DOCKER_HOST", &self.docker_host)
                .arg("--watch-rounds")
                .arg("w4")
                .arg(&self.dir)
                .arg(self.dir.join("lw-cache-w4"))
                .arg(TAG)
                .arg(rounds.to_string()),
        )?;
        let mut measured = WatchRounds::default();
        for line in output.lines() {
            let Some(fields) = line.strip_prefix("round ") else { continue };
            let seconds: Vec<f64> = fields.split(' ').filter_map(|field| field.parse().ok()).collect();
            let [edit, build, load] = seconds[..] else { bail!("a round line of three numbers expected: {line}") };
            eprintln!(
                "bench: w4 --watch round: edit → loaded {edit:.3} s, build + load {build:.3} s, load {load:.3} s"
            );
            measured.edit_to_loaded.push(Duration::from_secs_f64(edit));
            measured.build_and_load.push(Duration::from_secs_f64(build));
            measured.load.push(Duration::from_secs_f64(load));
        }
        if measured.edit_to_loaded.len() != rounds as usize {
            bail!("--watch-rounds gave {} rounds of {rounds}:\n{output}", measured.edit_to_loaded.len());
        }
        Ok(measured)
    }
}

/// Per round of the watch loop: edit → loaded (debounce included), build + load, and the
/// engine's load alone.
#[derive(Default)]
struct WatchRounds {
    edit_to_loaded: Vec<Duration>,
    build_and_load: Vec<Duration>,
    load: Vec<Duration>,
}

/// The engine's own client, with BuildKit, talking to the engine at `docker_host`.
pub(crate) fn docker_command(docker_host: &str) -> Command {
    let mut command = Command::new("/usr/bin/docker");
    command.env("DOCKER_HOST", docker_host).env("DOCKER_BUILDKIT", "1");
    command
}

/// `docker build -t tag` with BuildKit of `root/Dockerfile` on the context `root/context`, with
/// the host's network (the engine runs without a bridge).
pub(crate) fn buildkit_build(docker_host: &str, root: &Path, tag: &str) -> Result<()> {
    run_quiet(
        docker_command(docker_host)
            .args(["build", "--network=host", "--quiet", "-f"])
            .arg(root.join("Dockerfile"))
            .args(["-t", tag])
            .arg(root.join("context")),
    )?;
    Ok(())
}

/// The Debian minbase tar (made with mmdebstrap when absent), imported into the engine at
/// `docker_host` as `DEBIAN_BASE_TAG` and saved as `dir/debian.tar` for layerwright.
fn prepare_debian_base(dir: &Path, docker_host: &str) -> Result<()> {
    let mut minbase = PathBuf::from(MINBASE);
    if !minbase.is_file() {
        minbase = dir.join("debian-bookworm-minbase.tar");
        if !minbase.is_file() {
            eprintln!("bench: making a Debian bookworm minbase with mmdebstrap (Debian's mirror)");
            run_quiet(
                Command::new("mmdebstrap")
                    .args(["--variant=minbase", "--mode=root", "--quiet", "bookworm"])
                    .arg(&minbase),
            )
            .context("mmdebstrap (Debian package mmdebstrap)")?;
        }
    }
    run_quiet(docker_command(docker_host).arg("import").arg(&minbase).arg(DEBIAN_BASE_TAG))?;
    run_quiet(docker_command(docker_host).args(["save", "-o"]).arg(dir.join("debian.tar")).arg(DEBIAN_BASE_TAG))?;
    Ok(())
}

/// One row of the report: a scenario's name, layerwright's and BuildKit's runs, and the target
/// ratio (`None`: a share of a scenario, shown for reference).
type Row = (String, [Vec<Duration>; 2], Option<f64>);

fn report(rows: &[Row]) -> String {
    let mut text = String::from(
        "| W4 scenario | layerwright | BuildKit | layerwright / BuildKit | target |\n|---|---|---|---|---|\n",
    );
    for (name, [ours, buildkit], target) in rows {
        let (ours, buildkit) = (median(ours).as_secs_f64(), median(buildkit).as_secs_f64());
        let ratio = ours / buildkit;
        let target = match target {
            Some(target) if ratio <= *target => format!("≤ {target} met"),
            Some(target) => format!("≤ {target} MISSED"),
            None => "–".to_owned(),
        };
        let _ = writeln!(text, "| {name} | {ours:.3} s | {buildkit:.3} s | {ratio:.3} | {target} |");
    }
    text
}
