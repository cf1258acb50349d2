//! `cargo xtask bench --remote-cache`: what the shared cache buys a second machine.
//!
//! A `docker-registry` on 127.0.0.1 holds the cache. Per run, with fresh cache directories and
//! a fresh cache tag, alternating the order: machine A builds W1 cold and exports
//! (`--cache-to`); machine B, with an empty cache, builds W1 from A's export (`--cache-from`);
//! and, as the baseline, a cold local build without any remote cache. Each is the
//! `layerwright-bench` binary timed as a whole process. Reported: medians, and B / A-cold.
//! B must get A's digest and build no step, or the bench fails.
//!
//! What it is not: a comparison with BuildKit's registry cache, which needs buildx's
//! `docker-container` driver (an image from Docker Hub, unreachable here).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use layerwright_examples::{ExampleEnvironment, workloads};

/// A `docker-registry` serving from a temp directory, killed when dropped.
struct Registry {
    child: Child,
    address: String,
    dir: PathBuf,
}

impl Registry {
    fn start(dir: &Path) -> Result<Registry> {
        let storage = dir.join("storage");
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
        fs::create_dir_all(&storage)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: \
                 127.0.0.1:{port}\n",
                storage.display()
            ),
        )?;
        let log = fs::File::create(dir.join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry (Debian package docker-registry)")?;
        let registry = Registry { child, address: format!("127.0.0.1:{port}"), dir: dir.to_owned() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("docker-registry did not listen on 127.0.0.1:{port} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One timed `layerwright-bench w1` process: its wall time and what it printed.
fn timed(binary: &Path, workdir: &Path, cache: &Path, output: &Path, flags: &[&str]) -> Result<(Duration, String)> {
    if cache.exists() {
        fs::remove_dir_all(cache)?;
    }
    if output.exists() {
        fs::remove_dir_all(output)?;
    }
    let started = Instant::now();
    let result = Command::new(binary)
        .arg("w1")
        .arg(workdir)
        .arg(cache)
        .arg(format!("oci:{}", output.display()))
        .args(flags)
        .stdin(Stdio::null())
        .output()
        .context("running layerwright-bench")?;
    let elapsed = started.elapsed();
    if !result.status.success() {
        bail!("layerwright-bench failed ({}):\n{}", result.status, String::from_utf8_lossy(&result.stderr));
    }
    Ok((elapsed, String::from_utf8_lossy(&result.stdout).into_owned()))
}

fn field<'a>(stdout: &'a str, name: &str) -> &'a str {
    stdout.lines().find_map(|line| line.strip_prefix(name)).map(str::trim).unwrap_or("")
}

fn median(durations: &[Duration]) -> Duration {
    let mut sorted = durations.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

pub fn run(workspace: &Path, quick: bool) -> Result<()> {
    let dir = workspace.join("target/bench");
    fs::create_dir_all(&dir)?;
    let binary = crate::bench::build_bench_binary(workspace)?;
    let environment = ExampleEnvironment::for_workspace(workspace);
    workloads::write_base_archive(&environment, &dir)?;
    workloads::generate("w1", &dir)?;
    let registry = Registry::start(&dir.join("remote-registry"))?;
    let runs = if quick { 3 } else { 5 };
    let (mut local, mut machine_a, mut machine_b) = (Vec::new(), Vec::new(), Vec::new());
    let mut downloaded = String::new();
    let mut exported = String::new();
    for run in 0..runs {
        // A repository per run, so that every export uploads its blobs again.
        let reference = format!("{}/bench/w1-cache-{run}:main", registry.address);
        let local_run = || timed(&binary, &dir, &dir.join("remote-local-cache"), &dir.join("remote-local-out"), &[]);
        // Alternate whether the baseline runs first, so that neither always has a warm page cache.
        if run % 2 == 0 {
            local.push(local_run()?.0);
        }
        let (a_time, a_out) =
            timed(&binary, &dir, &dir.join("remote-a-cache"), &dir.join("remote-a-out"), &["--cache-to", &reference])?;
        let (b_time, b_out) = timed(
            &binary,
            &dir,
            &dir.join("remote-b-cache"),
            &dir.join("remote-b-out"),
            &["--cache-from", &reference],
        )?;
        if run % 2 == 1 {
            local.push(local_run()?.0);
        }
        if field(&a_out, "digest") != field(&b_out, "digest") || field(&b_out, "steps-built") != "0" {
            bail!("machine B did not get A's image without building:\nA:\n{a_out}\nB:\n{b_out}");
        }
        downloaded = field(&b_out, "blobs-downloaded").to_owned();
        exported = field(&a_out, "exported").to_owned();
        machine_a.push(a_time);
        machine_b.push(b_time);
    }
    let (local, machine_a, machine_b) = (median(&local), median(&machine_a), median(&machine_b));
    let mut report = String::new();
    let _ = writeln!(report, "| W1, {runs} runs (medians) | time | ratio to a cold local build |");
    let _ = writeln!(report, "|---|---|---|");
    for (name, time) in [
        ("cold, local cache only", local),
        ("machine A: cold, exporting (--cache-to)", machine_a),
        ("machine B: empty cache, from A's export (--cache-from)", machine_b),
    ] {
        let _ = writeln!(
            report,
            "| {name} | {:.3} s | {:.3} |",
            time.as_secs_f64(),
            time.as_secs_f64() / local.as_secs_f64()
        );
    }
    let _ = writeln!(
        report,
        "\nB / A = {:.3}; A exported {exported}; B downloaded {downloaded}; B built no step.",
        machine_b.as_secs_f64() / machine_a.as_secs_f64()
    );
    println!("{report}");
    fs::write(dir.join("remote-cache.md"), &report)?;
    Ok(())
}
