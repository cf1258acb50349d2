//! `cargo xtask`: the repository's commands. A thin clap front over `layerwright::cli` and the
//! images of `layerwright-examples`, plus the chores that need a process around the tests
//! (starting a Docker engine for the real-client tests).
//!
//! - `cargo xtask build-image NAME [--output SPEC]... [--tag REF] [--cache DIR] [--compression C]
//!   [--push REF [--insecure]]`
//! - `cargo xtask list`
//! - `cargo xtask test [-- CARGO TEST ARGS]`
//! - `cargo xtask bench [-- FILTER]`
//! - `cargo xtask cache du`, `cargo xtask cache prune --keep-bytes N`

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use layerwright::cache::Store;
use layerwright::cli::{self, BuildCommand, OutputSpec};
use layerwright_examples::{EXAMPLES, ExampleEnvironment};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "layerwright's repository commands")]
struct Arguments {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Build one of the example images and write it out.
    BuildImage {
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
        /// Also push the image to a registry: registry/repository[:tag]. Registries on
        /// localhost or 127.0.0.1 are spoken to in plain HTTP; credentials come from
        /// ~/.docker/config.json.
        #[arg(long, value_name = "REF")]
        push: Option<String>,
        /// Plain HTTP for a --push to a registry that is not on this machine.
        #[arg(long, requires = "push")]
        insecure: bool,
    },
    /// List the example images.
    List,
    /// Run the criterion benchmarks (no-op rebuilds, cold build) and print their medians.
    Bench {
        /// Arguments passed on to the benchmark harness (a name filter, `--quick`).
        #[arg(last = true)]
        arguments: Vec<String>,
    },
    /// Inspect or shrink the build cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
        /// The cache directory. Default: target/layerwright
        #[arg(long, global = true)]
        cache: Option<PathBuf>,
    },
    /// Run the workspace tests, with a Docker engine started for the real-client tests.
    Test {
        /// Arguments passed on to `cargo test`.
        #[arg(last = true)]
        cargo_arguments: Vec<String>,
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
        Commands::BuildImage { name, outputs, tag, cache, compression, push, insecure } => {
            let push = push.map(|reference| (reference, insecure));
            build_image(&workspace, &name, &outputs, tag, cache, &compression, push)?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::List => {
            for example in EXAMPLES {
                println!("{:<10} {}", example.name, example.description);
            }
            Ok(ExitCode::SUCCESS)
        }
        Commands::Test { cargo_arguments } => test(&workspace, &cargo_arguments),
        Commands::Bench { arguments } => {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(&workspace)
                .args(["bench", "--package", "layerwright", "--"])
                .args(&arguments)
                .status()
                .context("running cargo bench")?;
            Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
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

fn build_image(
    workspace: &Path,
    name: &str,
    outputs: &[String],
    tag: Option<String>,
    cache: Option<PathBuf>,
    compression: &str,
    push: Option<(String, bool)>,
) -> Result<()> {
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
        compression: cli::parse_compression(compression)?,
        insecure: push.as_ref().is_some_and(|(_, insecure)| *insecure),
        push: push.map(|(reference, _)| reference),
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

/// Runs `cargo test --workspace`, with `DOCKER_HOST` pointing at a Docker engine: the one
/// already set, or one started here (as root) and stopped afterwards.
fn test(workspace: &Path, cargo_arguments: &[String]) -> Result<ExitCode> {
    let _engine = match std::env::var_os("DOCKER_HOST") {
        Some(host) => {
            eprintln!("xtask test: using the Docker engine at DOCKER_HOST={}", host.to_string_lossy());
            None
        }
        None => match DockerEngine::start()? {
            Some(engine) => {
                // SAFETY: single-threaded here; the variable is read by the child processes.
                unsafe { std::env::set_var("DOCKER_HOST", engine.host()) };
                Some(engine)
            }
            None => None,
        },
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args(["test", "--workspace"])
        .args(cargo_arguments)
        .status()
        .context("running cargo test")?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// A `dockerd` of our own, in a temporary directory, stopped when dropped.
struct DockerEngine {
    child: Child,
    dir: PathBuf,
}

impl DockerEngine {
    /// Starts an engine when we are root and `dockerd` is installed; otherwise says why not and
    /// returns `None` (the tests that need one then fail, naming what is missing, unless
    /// `LAYERWRIGHT_SKIP_PRIVILEGED=1`).
    fn start() -> Result<Option<DockerEngine>> {
        let dockerd = ["/usr/sbin/dockerd", "/usr/bin/dockerd"].into_iter().map(Path::new).find(|path| path.is_file());
        let Some(dockerd) = dockerd else {
            eprintln!(
                "xtask test: dockerd is not installed (Debian package docker.io); Docker tests will fail unless LAYERWRIGHT_SKIP_PRIVILEGED=1"
            );
            return Ok(None);
        };
        if !rustix::process::geteuid().is_root() {
            eprintln!(
                "xtask test: not root, so no Docker engine is started; Docker tests will fail unless LAYERWRIGHT_SKIP_PRIVILEGED=1"
            );
            return Ok(None);
        }
        // Short paths: the engine's unix sockets must fit in 108 bytes.
        let dir = PathBuf::from(format!("/tmp/layerwright-dockerd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = std::fs::File::create(dir.join("dockerd.log")).context("creating the dockerd log")?;
        let child = Command::new(dockerd)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", dir.join("docker.sock").display()))
            .args(["--iptables=false", "--bridge=none"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cloning the log handle")?)
            .stderr(log)
            .spawn()
            .context("starting dockerd")?;
        let engine = DockerEngine { child, dir };
        engine.wait_until_ready()?;
        eprintln!("xtask test: started a Docker engine at {}", engine.host());
        Ok(Some(engine))
    }

    fn host(&self) -> String {
        format!("unix://{}", self.dir.join("docker.sock").display())
    }

    fn wait_until_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let answered = Command::new("/usr/bin/docker")
                .args(["version", "--format", "{{.Server.Version}}"])
                .env("DOCKER_HOST", self.host())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if answered {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        bail!("dockerd did not answer within 60 s; its log:\n{log}")
    }
}

impl Drop for DockerEngine {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a child has a positive pid");
        if let Err(error) = rustix::process::kill_process(pid, rustix::process::Signal::TERM) {
            eprintln!("xtask test: kill(dockerd {pid:?}, SIGTERM) failed: {error}");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Err(error) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("xtask test: could not remove {}: {error}", self.dir.display());
        }
    }
}
