//! Outbound network access for a command in a network namespace of its own: `slirp4netns`
//! (Debian package `slirp4netns`), a user-mode TCP/IP stack that the parent starts for the
//! child's pid once the child exists. It creates `tap0` in the child's namespace (10.0.2.100,
//! gateway 10.0.2.2, MTU 65520), brings it and `lo` up, and relays the command's connections
//! through ordinary sockets of the builder's process; its DNS forwarder at 10.0.2.3
//! ([`ISOLATED_NAMESERVER`]) asks the host's resolvers.
//!
//! Why slirp4netns rather than `pasta` (package `passt`): its command line has been stable
//! since 1.0 (bookworm ships 1.2.0), it tells when the network is up (`--ready-fd`) and exits
//! when a descriptor the builder holds closes (`--exit-fd`, so it cannot outlive a killed
//! builder), and it has one switch that keeps the host's loopback out of reach
//! (`--disable-host-loopback`: the gateway address does not lead to `127.0.0.1` of the host).
//! The `pasta` of bookworm (2023-03) forwards the namespace's loopback ports to the host's and
//! maps the gateway to the host by default (`-T auto`, no `--no-map-gw`), each of which must be
//! turned off one by one to keep the host's services out of reach. slirp4netns also confines
//! itself (`--enable-sandbox`: its own mount namespace, capabilities dropped; `--enable-seccomp`).
//!
//! The parent: finds the program on `PATH` before anything runs ([`slirp4netns`]: a missing one
//! is an error naming the package), starts it for the child's pid while the child sets up its
//! mounts, waits until it reports the network up, and lets the child go on to the command. The
//! [`Forwarder`] drains its messages on a thread (a chatty slirp4netns must never block on a
//! full pipe; the first few KiB are kept for an error), kills it when the step ends, however
//! it ends, and a reaper thread reaps it
//! (its exit waits for the kernel to tear down the tap device, which the step need not wait
//! for); if the builder itself
//! dies (Ctrl-C), the kernel closes the exit descriptor and slirp4netns ends too (it also gets
//! `SIGKILL` as its parent-death signal).
//!
//! What this module deliberately is not: a firewall (the command reaches whatever the host can
//! reach, the host's loopback excepted), a port forwarder into the step, or IPv6 (off).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use rustix::fd::{AsRawFd, OwnedFd};
use rustix::process::Pid;

use crate::failure::SandboxError;

/// The nameserver a command with isolated networking uses: slirp4netns's DNS forwarder.
pub const ISOLATED_NAMESERVER: &str = "10.0.2.3";

/// The most bytes of slirp4netns's own messages kept for an error.
const MAX_MESSAGES: usize = 8 * 1024;

/// The `slirp4netns` program on `PATH` (looked up once); an error naming the Debian package
/// when there is none.
pub fn slirp4netns() -> Result<PathBuf, SandboxError> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|directory| directory.join("slirp4netns"))
            .find(|candidate| rustix::fs::access(candidate, rustix::fs::Access::EXEC_OK).is_ok() && candidate.is_file())
    });
    found.clone().ok_or(SandboxError::NetworkHelperMissing { program: "slirp4netns", package: "slirp4netns" })
}

/// A running slirp4netns for one command: killed and reaped on drop.
pub(crate) struct Forwarder {
    /// `None` once stopped.
    child: Option<Child>,
    /// Closing it tells slirp4netns to exit.
    exit_write: Option<OwnedFd>,
    /// The thread that drains slirp4netns's stderr (so that it can never block on a full
    /// pipe) and returns the first [`MAX_MESSAGES`] bytes of it once the pipe closes.
    messages: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Forwarder {
    /// Starts `program` for the network namespace of `pid` and waits until the namespace's
    /// interfaces are up.
    pub(crate) fn start(program: &Path, pid: Pid) -> Result<Forwarder, SandboxError> {
        let pipe = |action: &'static str| {
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|error| SandboxError::Io { action, source: error.into() })
        };
        let (ready_read, ready_write) = pipe("create slirp4netns's ready pipe")?;
        let (exit_read, exit_write) = pipe("create slirp4netns's exit pipe")?;
        let (ready_fd, exit_fd) = (ready_write.as_raw_fd(), exit_read.as_raw_fd());
        let mut command = Command::new(program);
        command
            .args(["--configure", "--mtu=65520", "--disable-host-loopback", "--enable-sandbox", "--enable-seccomp"])
            .arg(format!("--ready-fd={ready_fd}"))
            .arg(format!("--exit-fd={exit_fd}"))
            .arg(pid.as_raw_nonzero().to_string())
            .arg("tap0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec the closure makes only async-signal-safe calls (fcntl,
        // prctl) on integers.
        unsafe {
            command.pre_exec(move || {
                // These two descriptors, and no other of the builder, are inherited.
                for fd in [ready_fd, exit_fd] {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| SandboxError::Network {
            program: program.to_owned(),
            reason: format!("cannot start it: {source}"),
        })?;
        drop(ready_write);
        drop(exit_read);
        let messages = child.stderr.take().and_then(|stderr| {
            std::thread::Builder::new().name("slirp4netns-stderr".to_owned()).spawn(move || drain(stderr)).ok()
        });
        let mut forwarder = Forwarder { child: Some(child), exit_write: Some(exit_write), messages };
        // One byte ("1") when the interfaces are up; EOF when it exited first.
        let mut ready = [0u8; 1];
        let mut ready_file = std::fs::File::from(ready_read);
        let answered = loop {
            match ready_file.read(&mut ready) {
                Ok(length) => break length == 1,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break false,
            }
        };
        if !answered {
            let messages = forwarder.stop();
            return Err(SandboxError::Network {
                program: program.to_owned(),
                reason: format!("it exited before the network was up: {}", messages.trim()),
            });
        }
        Ok(forwarder)
    }

    /// Stops slirp4netns (exit descriptor closed, then `SIGKILL`), reaps it, and returns what
    /// it printed.
    fn stop(&mut self) -> String {
        drop(self.exit_write.take());
        let Some(mut child) = self.child.take() else { return String::new() };
        let _ = child.kill();
        let _ = child.wait();
        let messages = self.messages.take().and_then(|thread| thread.join().ok()).unwrap_or_default();
        String::from_utf8_lossy(&messages).into_owned()
    }
}

/// Reads `stderr` to its end, keeping the first [`MAX_MESSAGES`] bytes.
fn drain(mut stderr: std::process::ChildStderr) -> Vec<u8> {
    let mut kept = Vec::new();
    let _ = (&mut stderr).take(MAX_MESSAGES as u64).read_to_end(&mut kept);
    let _ = std::io::copy(&mut stderr, &mut std::io::sink());
    kept
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // Killed now; reaped by the reaper thread, because its exit is slow: closing the tap
        // device of a dying network namespace waits for RCU grace periods (15-45 ms here), which
        // the step need not wait for.
        drop(self.exit_write.take());
        let _ = child.kill();
        if let Err(std::sync::mpsc::SendError(mut child)) = reaper().send(child) {
            let _ = child.wait();
        }
    }
}

/// The channel to the thread that reaps stopped slirp4netns processes, started on first use.
fn reaper() -> std::sync::mpsc::Sender<Child> {
    static REAPER: OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Child>>> = OnceLock::new();
    let sender = REAPER.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel::<Child>();
        let spawned = std::thread::Builder::new().name("slirp4netns-reaper".to_owned()).spawn(move || {
            for mut child in receiver {
                let _ = child.wait();
            }
        });
        if let Err(error) = spawned {
            log::warn!("RUN sandbox: cannot start the thread that reaps slirp4netns: {error}; reaping in place");
        }
        std::sync::Mutex::new(sender)
    });
    sender.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
}
