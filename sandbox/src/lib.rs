//! layerwright-sandbox: the sandbox a RUN step's command executes in. One child process in
//! fresh mount, pid, ipc, uts and (unless the step asks for the host's) net namespaces, plus a
//! user namespace when not root, whose root is an overlay mount of the image's layers; what the
//! command writes lands in the overlay's upper directory, which the caller turns into a layer.
//!
//! This crate holds every syscall of that, and every `unsafe` block of the workspace (`clone`,
//! `execve`, `_exit`, signal dispositions, `close_range`, borrowing the child's descriptors, and
//! the store's one call rustix lacks, [`start_writeback`]), so that every other crate forbids
//! `unsafe` code. Its API is small:
//!
//! - [`OverlayMount`]: the overlay of some lower directories (top first) with an upper and work
//!   directory, planned from [`OverlayPaths`] (checked against the kernel's limits, with
//!   [`OverlayError`]) and mounted in the child with the new mount API, or `mount(2)` on kernels
//!   whose overlayfs lacks `lowerdir+`;
//! - [`SandboxPlan`]: the overlay, the mounts the caller wants ([`SandboxMounts`]), the process
//!   ([`ProcessSpec`]), rootless or not, its network ([`SandboxNetwork`]: none, isolated
//!   through [`slirp4netns`], or the host's) and limits ([`ResourceLimits`]);
//! - [`Sandbox`]: runs a plan and returns how the command ended ([`Termination`]) or why it
//!   could not run ([`SandboxError`], whose variants name the failed call with its arguments).
//!   [`NamespaceSandbox`] is the real one; a caller's tests use a fake.
//!
//! Modules, arrows pointing down only: `namespace` (the parent: clone, wait, errors) → `child`
//! (between clone and execve: raw syscalls, no allocation) → `mounts` (a step's own cache
//! directories and tmpfs, prepared by the parent, made by the child) → `plan` (the data) → `overlay`
//! (the overlay's options and mount), `seccomp` (Docker's profile, compiled once) → `failure`
//! (stages, the child's failure record, errors).
//!
//! The command gets what runc and Docker give a container by default where it matters for a
//! hostile base image: its own session, a read-only and masked `/proc`, `nodev` mounts,
//! Docker's default capability set (nothing for a non-root user), Docker's default seccomp
//! profile, a fresh session keyring, death with the builder even after a user switch, cgroups
//! of its own with a process and a memory limit (where the builder can make them), and a
//! network namespace of its own even when it has network access.
//!
//! Modules added since: `limits` (the cgroups), `network` (slirp4netns), both used by
//! `namespace`.
//!
//! What it deliberately is not: a full container runtime (no CPU or IO limits), or
//! the place where a plan is decided or its
//! result read: the builder resolves the user and environment from the image config, lays out
//! the run directory, and reads the upper directory afterwards.
//!
//! ```no_run
//! use std::path::{Path, PathBuf};
//!
//! use layerwright_sandbox::{
//!     NamespaceSandbox, OverlayMount, OverlayOptions, OverlayPaths, ProcessSpec, ResourceLimits, Sandbox,
//!     SandboxMounts, SandboxNetwork, SandboxPlan, Termination,
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Made by the caller: a lower directory holding /bin/busybox, and an empty upper, work,
//! // merged and short-links directory in one run directory.
//! let store = Path::new("/var/cache/layerwright");
//! let run = store.join("tmp/run-1");
//! let lowers = [store.join("snapshots/busybox")];
//! let paths = OverlayPaths {
//!     base_dir: store,
//!     lowers: &lowers,
//!     upper: &run.join("upper"),
//!     work: &run.join("work"),
//!     target: &run.join("merged"),
//!     short_lowers: &run.join("lowers"),
//! };
//! let plan = SandboxPlan {
//!     base_dir: store.to_owned(),
//!     overlay: OverlayMount::new(&paths, &OverlayOptions::default())?,
//!     upper: run.join("upper"),
//!     merged: run.join("merged"),
//!     rootless: None,
//!     network: SandboxNetwork::None,
//!     mounts: SandboxMounts::default(),
//!     hostname: "sandbox".to_owned(),
//!     process: ProcessSpec {
//!         argv: vec!["busybox".into(), "sh".into(), "-c".into(), "echo hello > /greeting".into()],
//!         env: vec!["PATH=/bin".into()],
//!         workdir: "/".into(),
//!         uid: 0,
//!         gid: 0,
//!         groups: vec![],
//!         exec_candidates: vec!["/bin/busybox".into()],
//!     },
//!     limits: ResourceLimits { pids: Some(4096), memory: None },
//! };
//! let ended = NamespaceSandbox.run(&plan, &mut |output| print!("{}", String::from_utf8_lossy(output)))?;
//! assert_eq!(ended, Termination::Exited(0));
//! // The upper directory now holds `greeting`.
//! # let _: PathBuf = run;
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod child;
mod failure;
mod limits;
mod mounts;
mod namespace;
mod network;
mod overlay;
mod plan;
mod seccomp;
mod writeback;

pub use failure::SandboxError;
pub use mounts::{HostKind, MAX_STEP_MOUNTS, SecretBytes, StepMount};
pub use namespace::NamespaceSandbox;
pub use network::{ISOLATED_NAMESERVER, slirp4netns};
pub use overlay::{MAX_LOWER_LAYERS, OverlayError, OverlayMount, OverlayOptions, OverlayPaths};
pub use plan::{ProcessSpec, ResourceLimits, Sandbox, SandboxMounts, SandboxNetwork, SandboxPlan, Termination};
pub use writeback::start_writeback;
