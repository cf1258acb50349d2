//! [`NamespaceSandbox`], the real [`Sandbox`]: the parent's side of a run. It prepares the
//! child's program, makes the pipes, `clone(2)`s a child with the namespace flags, streams the
//! child's output to the caller, waits for it, and turns a failure record into an error that
//! names the call with its arguments (logged as it is returned).
//!
//! The builder is multi-threaded (rayon), so the calling process never changes namespaces:
//! `clone` with fresh mount, pid, ipc, uts and (unless the plan asks for the host's network)
//! net namespaces, plus a user namespace when rootless, makes a child that is pid 1 of its own pid
//! namespace and owns its own mount namespace; it runs `child::child_main` and never returns.
//!
//! Cleanup is structural: every mount lives in the child's mount namespace, which the kernel
//! tears down when pid 1 (the command) exits, and pid 1's exit kills whatever it left running.
//! The parent kills and reaps the child if it is unwound early (error, panic), and the child
//! gets SIGKILL if the builder dies (Ctrl-C). With isolated networking, slirp4netns is started
//! for the child's pid right after the `clone` and stopped (killed and reaped) when the run
//! ends, however it ends (see `network`); the child waits for it before its command.
//!
//! What this module deliberately is not: the child's setup (see `child`), or the place where
//! the upper directory is read (the caller reads it after a successful run).

use std::fs::File;
use std::io::{self, Read};

use rustix::fd::{AsRawFd, OwnedFd};
use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitOptions};

use crate::child::{ChildDescriptors, ChildProgram, child_main};
use crate::failure::{Failure, RECORD_SIZE, SandboxError, Stage, hint};
use crate::limits::CommandCgroups;
use crate::network::Forwarder;
use crate::plan::{Sandbox, SandboxNetwork, SandboxPlan, Termination};

/// The real sandbox: namespaces, overlay, pivot_root, exec.
#[derive(Debug, Clone, Copy, Default)]
pub struct NamespaceSandbox;

/// Kills and reaps the child if the parent is unwound before it did (an error or a panic
/// while streaming the output).
struct ChildGuard {
    pid: Pid,
    reaped: bool,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = rustix::process::kill_process(self.pid, Signal::KILL);
            let _ = wait(self.pid);
        }
    }
}

fn wait(pid: Pid) -> io::Result<rustix::process::WaitStatus> {
    loop {
        match rustix::process::waitpid(Some(pid), WaitOptions::empty()) {
            Ok(Some((_, status))) => return Ok(status),
            Ok(None) => continue,
            Err(Errno::INTR) => continue,
            Err(error) => return Err(error.into()),
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|error| SandboxError::Io { action: "create a pipe for the sandbox", source: error.into() })
}

impl Sandbox for NamespaceSandbox {
    fn run(&self, plan: &SandboxPlan, output: &mut dyn FnMut(&[u8])) -> Result<Termination, SandboxError> {
        let mut program = ChildProgram::new(plan)?;
        let cgroups = if plan.limits.pids.is_some() || plan.limits.memory.is_some() {
            CommandCgroups::create(&plan.limits)
        } else {
            None
        };
        program.cgroup_joins = cgroups.as_ref().map(CommandCgroups::join_files).unwrap_or_default();
        if cgroups.is_none() && plan.rootless.is_some() {
            program.nproc_limit = plan.limits.pids;
        }
        let helper = match &plan.network {
            SandboxNetwork::Isolated { slirp4netns } => Some(slirp4netns),
            SandboxNetwork::None | SandboxNetwork::Host => None,
        };
        program.wait_for_network = helper.is_some();
        let (output_read, output_write) = pipe()?;
        let (failure_read, failure_write) = pipe()?;
        // The parent holds the write end for as long as it waits: a child that finds it closed
        // knows the builder is gone.
        let (alive_read, alive_write) = pipe()?;
        let descriptors = ChildDescriptors {
            output: output_write.as_raw_fd(),
            failure: failure_write.as_raw_fd(),
            alive_read: alive_read.as_raw_fd(),
            alive_write: alive_write.as_raw_fd(),
        };
        let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if plan.network != SandboxNetwork::Host {
            flags |= libc::CLONE_NEWNET;
        }
        if plan.rootless.is_some() {
            flags |= libc::CLONE_NEWUSER;
        }
        // SAFETY: a fork-like clone (no CLONE_VM, no new stack): the child gets a copy of the
        // address space and continues here with `result == 0`. It then runs only
        // `child_main`, which makes raw syscalls on data prepared above and never returns.
        let result = unsafe {
            libc::syscall(libc::SYS_clone, libc::c_long::from(flags | libc::SIGCHLD), 0usize, 0usize, 0usize, 0usize)
        };
        if result == 0 {
            child_main(&program, descriptors);
        }
        if result < 0 {
            let source = io::Error::last_os_error();
            let flags = describe_clone_flags(flags);
            log::warn!("clone({flags}) failed: {source}");
            let hint = match plan.rootless {
                Some(_) => Some(
                    "RUN steps need root or a user namespace, and user namespaces are refused here: check \
                     /proc/sys/user/max_user_namespaces, kernel.unprivileged_userns_clone and \
                     kernel.apparmor_restrict_unprivileged_userns (a chroot refuses them too), or run as root",
                ),
                None if source.raw_os_error() == Some(libc::EPERM) => Some("the sandbox needs CAP_SYS_ADMIN"),
                None => None,
            };
            return Err(SandboxError::Clone { flags, source, hint });
        }
        let pid = Pid::from_raw(result as i32).expect("clone returned a positive pid");
        let mut guard = ChildGuard { pid, reaped: false };
        // Only the child writes to these now; EOF comes when it (and everything it started,
        // which dies with pid 1) is gone.
        drop(output_write);
        drop(failure_write);
        drop(alive_read);

        // The network helper starts while the child sets up its mounts; the child waits for one
        // byte on the alive pipe before its command. Dropped before the guard: the helper goes
        // first, then the child.
        let _forwarder = match helper {
            None => None,
            Some(program_path) => match Forwarder::start(program_path, pid) {
                Ok(forwarder) => {
                    // A child that is gone already (EPIPE) left its failure record, read below.
                    let _ = rustix::io::write(&alive_write, b"1");
                    Some(forwarder)
                }
                Err(error) => {
                    // A child that failed its own setup first explains the failure better.
                    let _ = rustix::process::kill_process(pid, Signal::KILL);
                    let _ = wait(pid);
                    guard.reaped = true;
                    let mut record = [0u8; RECORD_SIZE];
                    let mut failure_file = File::from(failure_read);
                    if let Ok(true) = read_full(&mut failure_file, &mut record)
                        && let Some(failure) = Failure::decode(&record)
                    {
                        return Err(failure_error(&program, &failure));
                    }
                    return Err(error);
                }
            },
        };

        let mut output_file = File::from(output_read);
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match output_file.read(&mut buffer) {
                Ok(0) => break,
                Ok(length) => output(&buffer[..length]),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(SandboxError::Io { action: "read the command's output", source }),
            }
        }
        let status = wait(pid).map_err(|source| SandboxError::Io { action: "wait for the command", source })?;
        guard.reaped = true;
        drop(alive_write);

        let mut record = [0u8; RECORD_SIZE];
        let mut failure_file = File::from(failure_read);
        if read_full(&mut failure_file, &mut record)
            .map_err(|source| SandboxError::Io { action: "read the sandbox's setup result", source })?
            && let Some(failure) = Failure::decode(&record)
        {
            return Err(failure_error(&program, &failure));
        }
        let ended = if let Some(code) = status.exit_status() {
            Termination::Exited(code)
        } else if let Some(signal) = status.terminating_signal() {
            Termination::Signaled(signal)
        } else {
            return Err(SandboxError::Io {
                action: "understand the command's wait status",
                source: io::Error::other(format!("{status:?}")),
            });
        };
        if ended != Termination::Exited(0)
            && let Some(cgroups) = &cgroups
        {
            let how = match ended {
                Termination::Exited(code) => format!("exited with code {code}"),
                Termination::Signaled(signal) => format!("was killed by signal {signal}"),
            };
            if let Some(limit) = plan.limits.memory
                && cgroups.memory_limit_hit()
            {
                return Err(SandboxError::MemoryLimit { limit, ended: how });
            }
            if let Some(limit) = plan.limits.pids
                && cgroups.process_limit_hit()
            {
                return Err(SandboxError::ProcessLimit { limit, ended: how });
            }
        }
        Ok(ended)
    }
}

/// Reads exactly `buffer.len()` bytes; `Ok(false)` on an immediate EOF.
fn read_full(file: &mut File, buffer: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(length) => filled += length,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(true)
}

fn failure_error(program: &ChildProgram<'_>, failure: &Failure) -> SandboxError {
    let errno = Errno::from_raw_os_error(failure.errno);
    let source = io::Error::from_raw_os_error(failure.errno);
    let action = program.describe(failure);
    let kernel_message = failure.message();
    log::warn!(
        "RUN sandbox: {action} failed: {source}{}",
        if kernel_message.is_empty() { String::new() } else { format!(" [kernel: {kernel_message}]") }
    );
    if failure.stage == Stage::Exec {
        let process = &program.plan.process;
        return SandboxError::Exec {
            program: process.argv[0].clone(),
            tried: process.exec_candidates.join(", "),
            source,
        };
    }
    SandboxError::Setup {
        action,
        source,
        kernel_message,
        hint: hint(failure.stage, errno, program.plan.rootless.is_some()),
    }
}

fn describe_clone_flags(flags: libc::c_int) -> String {
    let names = [
        (libc::CLONE_NEWUSER, "CLONE_NEWUSER"),
        (libc::CLONE_NEWNS, "CLONE_NEWNS"),
        (libc::CLONE_NEWPID, "CLONE_NEWPID"),
        (libc::CLONE_NEWIPC, "CLONE_NEWIPC"),
        (libc::CLONE_NEWUTS, "CLONE_NEWUTS"),
        (libc::CLONE_NEWNET, "CLONE_NEWNET"),
    ];
    let set: Vec<&str> = names.iter().filter(|(flag, _)| flags & flag != 0).map(|(_, name)| *name).collect();
    set.join(" | ")
}
