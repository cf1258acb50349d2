//! A private Docker engine for the tests and the benchmarks: `dockerd` started in a temporary
//! directory with its own socket, data and exec roots, and stopped (with its directory removed)
//! when dropped. It deliberately does not touch a system engine or its images.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// A `dockerd` of our own, in a temporary directory, stopped when dropped.
pub struct DockerEngine {
    child: Child,
    dir: PathBuf,
}

impl DockerEngine {
    /// Starts an engine when we are root and `dockerd` is installed; otherwise says why not and
    /// returns `None` (the tests that need one then fail, naming what is missing, unless
    /// `LAYERWRIGHT_SKIP_PRIVILEGED=1`).
    pub fn start() -> Result<Option<DockerEngine>> {
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

    /// For the benchmarks: the engine at `DOCKER_HOST` when it is set (and no engine of ours),
    /// else one started here, with its `DOCKER_HOST` value. Keep the engine until the end.
    pub fn from_environment_or_start() -> Result<(Option<DockerEngine>, String)> {
        if let Ok(host) = std::env::var("DOCKER_HOST") {
            return Ok((None, host));
        }
        let engine = DockerEngine::start()?.context("the BuildKit comparison needs root and dockerd")?;
        let host = engine.host();
        Ok((Some(engine), host))
    }

    pub fn host(&self) -> String {
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
