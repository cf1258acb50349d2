//! `cargo xtask bench --remote-cache [--reapi]`: what the shared cache buys a second machine.
//!
//! A `docker-registry` on 127.0.0.1 holds the cache, or with `--reapi` a BuildGrid (REAPI: CAS
//! on disk, action cache; from `LAYERWRIGHT_BUILDGRID` or /opt/layerwright-buildgrid). Per run,
//! with fresh cache directories and a fresh cache tag (a fresh BuildGrid), alternating the
//! order: machine A builds W1 cold and exports (`--cache-to`; uploads, `--reapi`); machine B,
//! with an empty cache, builds W1 from A's (`--cache-from`; `--reapi`); and, as the baseline, a
//! cold local build without any remote cache. Each is the `layerwright-bench` binary timed as
//! a whole process. Reported: medians, B / A-cold, and B's time per step it took from the
//! remote. B must get A's digest and build no step, or the bench fails.
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

/// A BuildGrid cache server (CAS on disk, action cache, ByteStream) from a temp directory,
/// killed when dropped.
struct BuildGrid {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl BuildGrid {
    fn start(dir: &Path) -> Result<BuildGrid> {
        let venv = std::env::var_os("LAYERWRIGHT_BUILDGRID")
            .map_or_else(|| "/opt/layerwright-buildgrid".into(), PathBuf::from);
        let bgd = venv.join("bin/bgd");
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
        fs::create_dir_all(dir.join("storage"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.join("config.yml");
        fs::write(
            &config,
            format!(
                "server:\n  - !channel\n    address: \"127.0.0.1:{port}\"\n    insecure-mode: true\n\
                 authorization:\n  method: none\n\
                 storages:\n  - !disk-storage &cas\n    path: {}\n\
                 caches:\n  - !lru-action-cache &ac\n    storage: *cas\n    max-cached-refs: 100000\n    \
                 allow-updates: true\n    cache-failed-actions: false\n\
                 instances:\n  - name: \"\"\n    services:\n      - !action-cache\n        cache: *ac\n      \
                 - !cas\n        storage: *cas\n      - !bytestream\n        storage: *cas\n",
                dir.join("storage").display()
            ),
        )?;
        let log = fs::File::create(dir.join("buildgrid.log"))?;
        let child = Command::new(&bgd)
            .args(["server", "start"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (BuildGrid, as .ci/run installs it)", bgd.display()))?;
        let server = BuildGrid { child, url: format!("http://127.0.0.1:{port}"), dir: dir.to_owned() };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("BuildGrid did not listen on 127.0.0.1:{port} within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // A connection made before the server serves waits in its backlog: the first timed
        // process is answered once it does (the builder waits up to 10 s to connect).
        Ok(server)
    }
}

impl Drop for BuildGrid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One timed `layerwright-bench w1` process on an empty cache: its wall time and what it
/// printed.
fn timed(binary: &Path, workdir: &Path, cache: &Path, output: &Path, flags: &[&str]) -> Result<(Duration, String)> {
    if cache.exists() {
        fs::remove_dir_all(cache)?;
    }
    timed_on_cache(binary, workdir, cache, output, flags)
}

/// One timed `layerwright-bench w1` process on `cache` as it is.
fn timed_on_cache(
    binary: &Path,
    workdir: &Path,
    cache: &Path,
    output: &Path,
    flags: &[&str],
) -> Result<(Duration, String)> {
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

pub fn run(workspace: &Path, quick: bool, reapi: bool) -> Result<()> {
    let dir = workspace.join("target/bench");
    fs::create_dir_all(&dir)?;
    let binary = crate::bench::build_bench_binary(workspace)?;
    let environment = ExampleEnvironment::for_workspace(workspace);
    workloads::write_base_archive(&environment, &dir)?;
    workloads::generate("w1", &dir)?;
    let registry = if reapi { None } else { Some(Registry::start(&dir.join("remote-registry"))?) };
    let runs = if quick { 3 } else { 5 };
    let (mut local, mut machine_a, mut machine_b, mut noop) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut downloaded = String::new();
    let mut exported = String::new();
    let mut steps_remote = 0usize;
    for run in 0..runs {
        // A repository (a server) per run, so that every export uploads its blobs again.
        let server = if reapi { Some(BuildGrid::start(&dir.join("remote-buildgrid"))?) } else { None };
        let (export_flags, import_flags) = match (&registry, &server) {
            (Some(registry), _) => {
                let reference = format!("{}/bench/w1-cache-{run}:main", registry.address);
                (["--cache-to".to_owned(), reference.clone()], ["--cache-from".to_owned(), reference])
            }
            (None, Some(server)) => {
                (["--reapi".to_owned(), server.url.clone()], ["--reapi".to_owned(), server.url.clone()])
            }
            (None, None) => unreachable!("one of them was started"),
        };
        let export_flags: Vec<&str> = export_flags.iter().map(String::as_str).collect();
        let import_flags: Vec<&str> = import_flags.iter().map(String::as_str).collect();
        let local_run = || timed(&binary, &dir, &dir.join("remote-local-cache"), &dir.join("remote-local-out"), &[]);
        // Alternate whether the baseline runs first, so that neither always has a warm page cache.
        if run % 2 == 0 {
            local.push(local_run()?.0);
        }
        let (a_time, a_out) =
            timed(&binary, &dir, &dir.join("remote-a-cache"), &dir.join("remote-a-out"), &export_flags)?;
        let (b_time, b_out) =
            timed(&binary, &dir, &dir.join("remote-b-cache"), &dir.join("remote-b-out"), &import_flags)?;
        // The same build on B's cache, now whole, without the remote: what B's time costs
        // beyond asking and downloading.
        let (noop_time, _) =
            timed_on_cache(&binary, &dir, &dir.join("remote-b-cache"), &dir.join("remote-b-out"), &[])?;
        if run % 2 == 1 {
            local.push(local_run()?.0);
        }
        if field(&a_out, "digest") != field(&b_out, "digest") || field(&b_out, "steps-built") != "0" {
            bail!("machine B did not get A's image without building:\nA:\n{a_out}\nB:\n{b_out}");
        }
        downloaded = field(&b_out, "blobs-downloaded").to_owned();
        exported = [field(&a_out, "exported"), field(&a_out, "uploaded")].concat();
        steps_remote = field(&b_out, "steps-remote").parse().unwrap_or(0);
        machine_a.push(a_time);
        machine_b.push(b_time);
        noop.push(noop_time);
    }
    let (local, machine_a, machine_b) = (median(&local), median(&machine_a), median(&machine_b));
    let noop = median(&noop);
    let mut report = String::new();
    let through = if reapi { "a local BuildGrid (REAPI)" } else { "a local registry" };
    let _ = writeln!(report, "| W1 through {through}, {runs} runs (medians) | time | ratio to a cold local build |");
    let _ = writeln!(report, "|---|---|---|");
    for (name, time) in [
        ("cold, local cache only", local),
        ("machine A: cold, exporting (--cache-to / --reapi)", machine_a),
        ("machine B: empty cache, from A's export (--cache-from / --reapi)", machine_b),
        ("machine B again: a local no-op rebuild, no remote", noop),
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
        "\nB / A = {:.3}; A exported {exported}; B downloaded {downloaded}; B built no step and took {steps_remote} \
         from the remote: (B - B's no-op) / {steps_remote} = {:.1} ms per step taken from the remote.",
        machine_b.as_secs_f64() / machine_a.as_secs_f64(),
        machine_b.saturating_sub(noop).as_secs_f64() * 1000.0 / steps_remote.max(1) as f64
    );
    println!("{report}");
    fs::write(dir.join(if reapi { "remote-cache-reapi.md" } else { "remote-cache.md" }), &report)?;
    Ok(())
}
