//! The step types: one variant per kind of instruction, each holding exactly what the step
//! means, and a human label for progress lines and errors.
//!
//! Steps hold declared values only. Paths are kept as the user wrote them and normalised by the
//! builder, so that a bad path is reported with the step that named it rather than panicking at
//! declaration time. This module does not validate, key or execute a step: [`Step::encode`]
//! (in the `encode` module) gives the bytes a key hashes, and the builder does the rest.
//!
//! [`Image`] is defined here too: a node of the graph is a step on top of its parent, and a
//! `copy_from` step holds its source image, so the two types are one recursive structure (its
//! chainable methods are in `image`).
//!
//! RUN mounts ([`Mount`], [`Sharing`], [`MountSource`]) are here too: a bind mount holds its
//! source image, as a `copy_from` step does.
//!
//! [`Step`], [`ConfigChange`] and [`RunCommand`] are deliberately exhaustive: the builder matches
//! them without a wildcard arm, so that adding a kind of step is a compile error everywhere a
//! step is executed, keyed or exported until it is handled there.

use std::path::PathBuf;
use std::sync::Arc;

use std::hash::{Hash, Hasher};

use crate::Context;

/// One node of the step graph: a step on top of its parent image.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) step: Step,
    pub(crate) parent: Option<Image>,
}

/// An image declaration: a step on top of a parent image. Cheap to clone; `Send + Sync`.
///
/// Every method returns a new image with one more step and leaves `self` unchanged, so one
/// image can be the base of several others (they share it: it is built once).
///
/// ```
/// use layerwright_dsl::{Context, Image};
///
/// let context = Context::dir("app")?;
/// let base = Image::from_archive("busybox.tar");
/// let tool = base.run("mkdir -p /out && echo hi > /out/hi");
/// let app = Image::scratch()
///     .copy(&context, "src", "/app/src")
///     .copy_from(&tool, "/out/hi", "/app/hi")
///     .write_file("/etc/app.conf", b"x=1\n")
///     .symlink("/app/current", "/app/src")
///     .remove("/app/src/tmp")
///     .env("RUST_LOG", "info")
///     .workdir("/app")
///     .user("1000:1000")
///     .label("org.opencontainers.image.title", "app")
///     .expose(8080)
///     .entrypoint(["/app/bin/app"])
///     .cmd(["--serve"]);
/// assert_eq!(app.chain().len(), 13);
/// assert!(app.chain()[2].inputs()[1].same_node(&tool));
/// # Ok::<(), layerwright_dsl::ImagePathError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Image {
    pub(crate) node: Arc<Node>,
}

/// A numeric owner for files a step writes. Names are not resolved: an image has no
/// `/etc/passwd` the builder could trust at declaration time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Owner {
    /// The numeric user id.
    pub uid: u32,
    /// The numeric group id.
    pub gid: u32,
}

impl Owner {
    /// uid 0, gid 0: the owner of every entry a step writes unless told otherwise.
    pub const ROOT: Owner = Owner { uid: 0, gid: 0 };

    /// The owner with user id `uid` and group id `gid`.
    pub const fn new(uid: u32, gid: u32) -> Owner {
        Owner { uid, gid }
    }
}

/// Mode and owner for the entries a file step writes. `None` means the step's default: for
/// `copy` the source's permission bits, for `write_file` 0644, for `mkdir` 0755; owner root.
///
/// Built with [`FileOptions::default`], [`FileOptions::mode`] and the `with_` methods:
///
/// ```
/// use layerwright_dsl::{FileOptions, Image};
///
/// let options = FileOptions::mode(0o600).with_owner(1000, 1000);
/// let image = Image::scratch().write_file_with("/etc/secret.conf", b"token=x\n", options);
/// assert_eq!(options.mode, Some(0o600));
/// # let _ = image;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub struct FileOptions {
    /// Permission bits including setuid (0o4000), setgid (0o2000) and sticky (0o1000).
    pub mode: Option<u32>,
    /// The owner of the entries written; `None` for root.
    pub owner: Option<Owner>,
}

impl FileOptions {
    /// Options with permission bits `mode` (for example `0o755`) and the default owner.
    pub fn mode(mode: u32) -> FileOptions {
        FileOptions { mode: Some(mode), owner: None }
    }

    /// These options with the owner set to `uid:gid`.
    pub fn with_owner(self, uid: u32, gid: u32) -> FileOptions {
        FileOptions { owner: Some(Owner { uid, gid }), ..self }
    }

    /// These options with the permission bits set to `mode`.
    pub fn with_mode(self, mode: u32) -> FileOptions {
        FileOptions { mode: Some(mode), ..self }
    }
}

/// Options of `copy` and `copy_from`: mode and owner of what is copied, and whether the
/// destination directory is replaced or merged into.
///
/// ```
/// use layerwright_dsl::{Context, CopyOptions, Image};
///
/// let context = Context::dir("app")?;
/// let options = CopyOptions::default().with_mode(0o755).with_owner(1000, 1000).with_replace_directory(true);
/// let image = Image::scratch().copy_with(&context, "bin", "/app/bin", options);
/// assert_eq!(image.step().label(), "COPY bin /app/bin");
/// # Ok::<(), layerwright_dsl::ImagePathError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CopyOptions {
    /// Mode and owner of the copied entries; by default the sources' permission bits, owner root.
    pub file: FileOptions,
    /// Replace the destination directory wholesale instead of merging into it (Docker merges):
    /// the layer then carries an opaque whiteout, so nothing from lower layers shows through.
    pub replace_directory: bool,
}

impl CopyOptions {
    /// These options with the mode and owner of the copied entries set to `file`.
    pub fn with_file_options(self, file: FileOptions) -> CopyOptions {
        CopyOptions { file, ..self }
    }

    /// These options with every copied entry's permission bits set to `mode`.
    pub fn with_mode(self, mode: u32) -> CopyOptions {
        CopyOptions { file: self.file.with_mode(mode), ..self }
    }

    /// These options with every copied entry owned by `uid:gid`.
    pub fn with_owner(self, uid: u32, gid: u32) -> CopyOptions {
        CopyOptions { file: self.file.with_owner(uid, gid), ..self }
    }

    /// These options replacing the destination directory (`true`) or merging into it
    /// (`false`, the default, as Docker does).
    pub fn with_replace_directory(self, replace: bool) -> CopyOptions {
        CopyOptions { replace_directory: replace, ..self }
    }
}

// The step structs below stay exhaustive (no `#[non_exhaustive]`): they are the payloads of
// `Step`, which code generating declarations builds by struct literal for `Image::with_step`, and
// a field added to one changes what the step means, which its consumers must then handle.

/// `copy(&context, src, dest)`: files from the build context.
#[derive(Debug, Clone)]
pub struct CopyStep {
    /// The build context the source is selected from.
    pub context: Context,
    /// The source path inside the context, as declared (normalised by the builder).
    pub source: String,
    /// The destination path inside the image, as declared; a trailing `/` means "into".
    pub destination: String,
    /// Mode, owner and merge behaviour of the copy.
    pub options: CopyOptions,
}

/// `copy_from(&image, src, dest)`: files from another image's filesystem (multi-stage builds).
#[derive(Debug, Clone)]
pub struct CopyFromStep {
    /// The image whose final filesystem the source is read from.
    pub image: Image,
    /// The source path inside `image`, as declared.
    pub source: String,
    /// The destination path inside the new image, as declared; a trailing `/` means "into".
    pub destination: String,
    /// Mode, owner and merge behaviour of the copy.
    pub options: CopyOptions,
}

/// `write_file(path, content)`: inline content.
#[derive(Debug, Clone)]
pub struct WriteFileStep {
    /// The file's path inside the image, as declared.
    pub path: String,
    /// The file's whole content.
    pub content: Arc<[u8]>,
    /// Mode (default 0644) and owner (default root) of the file.
    pub options: FileOptions,
}

/// `mkdir(path)`: a directory and any missing parents.
#[derive(Debug, Clone)]
pub struct MkdirStep {
    /// The directory's path inside the image, as declared.
    pub path: String,
    /// Mode (default 0755) and owner (default root) of the directory and its created parents.
    pub options: FileOptions,
}

/// `symlink(link_path, target)`: `link_path` points at `target` (stored verbatim).
#[derive(Debug, Clone)]
pub struct SymlinkStep {
    /// Where the link is made inside the image, as declared.
    pub link_path: String,
    /// What the link points at, stored verbatim (relative or absolute, never resolved).
    pub target: String,
    /// The link's owner; `None` for root.
    pub owner: Option<Owner>,
}

/// What a RUN step executes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RunCommand {
    /// `/bin/sh -c STRING`.
    Shell(String),
    /// An argv, executed directly.
    Argv(Vec<String>),
}

/// A RUN step: a command executed against the image as it stands, with its options.
///
/// Made with [`Run::shell`] or [`Run::argv`] and the chainable option methods; a plain `&str`,
/// `String`, `[&str; N]` or `Vec<String>` converts into a `Run` without options, so
/// `image.run("make")` and `image.run(Run::shell("make"))` declare the same step.
///
/// ```
/// use layerwright_dsl::{Image, NetworkMode, Run, RunCommand};
///
/// let base = Image::from_archive("busybox.tar");
/// let run = Run::shell("make install")
///     .env("PREFIX", "/usr")
///     .workdir("/src")
///     .user("1000:1000");
/// assert_eq!(run.command, RunCommand::Shell("make install".into()));
/// assert_eq!(run.network, NetworkMode::None, "off unless asked for");
/// let installed = base.run(run);
/// assert_eq!(installed.step().label(), "RUN make install");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Run {
    /// The command: a shell string or an argv.
    pub command: RunCommand,
    /// Environment variables of the command, in declaration order, on top of the image
    /// config's `Env` (a later value of a name wins).
    pub env: Vec<(String, String)>,
    /// The working directory of the command (relative to the config's `WORKDIR`, or absolute);
    /// `None` for the config's `WORKDIR`, else `/`.
    pub workdir: Option<String>,
    /// The user the command runs as (`uid[:gid]` or names); `None` for the config's `USER`.
    pub user: Option<String>,
    /// The network the command gets: none by default (a RUN step is hermetic unless it asks
    /// for the network), a namespace of its own with outbound access, or the host's.
    pub network: NetworkMode,
    /// Resource limits of the command; `None` fields take the builder's defaults. They do not
    /// enter the step's key: a limit decides whether the command may finish, not what it
    /// writes, so raising one to get a step through must not rebuild what was already built.
    pub limits: Limits,
    /// What is mounted while the command runs, in declaration order (see [`Mount`]); nothing
    /// of it enters the layer.
    pub mounts: Vec<Mount>,
}

/// The network namespace a RUN command runs in. Encoded in the step's key as one byte
/// (`None` 0, `Isolated` 1, `Host` 2: a step declared with `network(true)` before this type
/// existed keeps its key).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum NetworkMode {
    /// A network namespace of its own with only a loopback interface: no network at all.
    #[default]
    None,
    /// A network namespace of its own with outbound access through a user-mode network stack
    /// (`slirp4netns`), DNS through its forwarder, and the host's loopback out of reach.
    Isolated,
    /// The host's network namespace: every interface and service of the host, its loopback
    /// included (BuildKit's `network.host` entitlement). An explicit opt-in.
    Host,
}

impl NetworkMode {
    /// The byte the step's key encodes this mode as.
    pub fn key_byte(self) -> u8 {
        match self {
            NetworkMode::None => 0,
            NetworkMode::Isolated => 1,
            NetworkMode::Host => 2,
        }
    }
}

/// Resource limits of a RUN command, each `None` for the builder's default. Not part of the
/// step's key (see [`Run::limits`]).
///
/// ```
/// use layerwright_dsl::{Limits, Run};
///
/// let run = Run::shell("make -j8").memory_limit(2 << 30).pids_limit(512);
/// assert_eq!(run.limits, Limits { pids: Some(512), memory: Some(2 << 30) });
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Limits {
    /// The most processes (and threads) the command may have at once.
    pub pids: Option<u64>,
    /// The most memory, in bytes, the command's processes may use together (page cache
    /// included, as the kernel's memory cgroup counts it) before the kernel kills one.
    pub memory: Option<u64>,
}

impl Run {
    /// A command run by the image's shell: the config's `Shell`, by default `/bin/sh -c`, so
    /// the image must have one.
    ///
    /// ```
    /// use layerwright_dsl::{Run, RunCommand};
    ///
    /// let run = Run::shell("mkdir -p /out && echo hi > /out/hi");
    /// assert_eq!(run.command, RunCommand::Shell("mkdir -p /out && echo hi > /out/hi".into()));
    /// ```
    pub fn shell(command: impl Into<String>) -> Run {
        Run::from(RunCommand::Shell(command.into()))
    }

    /// A command executed directly from its argv, without a shell. A program name without `/`
    /// is looked up in the `PATH` of the command's environment inside the image, as `execvp`
    /// does.
    ///
    /// ```
    /// use layerwright_dsl::{Run, RunCommand};
    ///
    /// let run = Run::argv(["/bin/busybox", "--install", "-s"]);
    /// assert_eq!(run.command, RunCommand::Argv(vec!["/bin/busybox".into(), "--install".into(), "-s".into()]));
    /// ```
    pub fn argv<I, S>(argv: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Run::from(RunCommand::Argv(argv.into_iter().map(Into::into).collect()))
    }

    /// This command with the environment variable `key` set to `value`, on top of the image
    /// config's `Env` (a later value of the same name wins).
    ///
    /// ```
    /// use layerwright_dsl::Run;
    ///
    /// let run = Run::shell("cargo build").env("CARGO_HOME", "/cargo");
    /// assert_eq!(run.env, [("CARGO_HOME".to_owned(), "/cargo".to_owned())]);
    /// ```
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Run {
        self.env.push((key.into(), value.into()));
        self
    }

    /// This command run in `workdir`: an absolute path inside the image, or one relative to the
    /// config's `WORKDIR`. A missing directory is created (mode 0755, owner root), as Docker
    /// does.
    ///
    /// ```
    /// use layerwright_dsl::Run;
    ///
    /// assert_eq!(Run::shell("make").workdir("/src").workdir.as_deref(), Some("/src"));
    /// ```
    pub fn workdir(mut self, workdir: impl Into<String>) -> Run {
        self.workdir = Some(workdir.into());
        self
    }

    /// This command run as `user`: a numeric `uid[:gid]`, or names looked up in the image's
    /// `/etc/passwd` and `/etc/group` when the step runs.
    ///
    /// ```
    /// use layerwright_dsl::Run;
    ///
    /// assert_eq!(Run::shell("id").user("1000:1000").user.as_deref(), Some("1000:1000"));
    /// ```
    pub fn user(mut self, user: impl Into<String>) -> Run {
        self.user = Some(user.into());
        self
    }

    /// This command with outbound network access (`true`: [`NetworkMode::Isolated`], a network
    /// namespace of its own that reaches the internet but not the host's loopback) or without
    /// any (`false`, the default). A networked step is still cached by its declaration alone:
    /// what it downloads does not enter its key.
    ///
    /// ```
    /// use layerwright_dsl::{NetworkMode, Run};
    ///
    /// assert_eq!(Run::shell("apt-get update").network(true).network, NetworkMode::Isolated);
    /// ```
    pub fn network(mut self, enabled: bool) -> Run {
        self.network = if enabled { NetworkMode::Isolated } else { NetworkMode::None };
        self
    }

    /// This command in the host's network namespace: it reaches every service of the host,
    /// those listening on its loopback included. The explicit opt-in that BuildKit calls the
    /// `network.host` entitlement; use [`Run::network`] unless the step needs the host.
    ///
    /// ```
    /// use layerwright_dsl::{NetworkMode, Run};
    ///
    /// assert_eq!(Run::shell("curl http://127.0.0.1:8080/").host_network().network, NetworkMode::Host);
    /// ```
    pub fn host_network(mut self) -> Run {
        self.network = NetworkMode::Host;
        self
    }

    /// This command with these resource limits (a `None` field takes the builder's default).
    /// Limits are not part of the step's key: they decide whether the command may finish, not
    /// what it writes, so changing one does not rebuild a step that was built.
    ///
    /// ```
    /// use layerwright_dsl::{Limits, Run};
    ///
    /// let limits = Limits { pids: Some(64), memory: None };
    /// assert_eq!(Run::shell("make").limits(limits).limits, limits);
    /// ```
    pub fn limits(mut self, limits: Limits) -> Run {
        self.limits = limits;
        self
    }

    /// This command limited to `pids` processes (and threads) at once: a fork bomb fails the
    /// step. The builder's default is 4096.
    ///
    /// ```
    /// use layerwright_dsl::Run;
    ///
    /// assert_eq!(Run::shell("make").pids_limit(64).limits.pids, Some(64));
    /// ```
    pub fn pids_limit(mut self, pids: u64) -> Run {
        self.limits.pids = Some(pids);
        self
    }

    /// This command limited to `bytes` of memory: past it the kernel kills a process of the
    /// command and the step fails saying so. The builder's default is no limit.
    ///
    /// ```
    /// use layerwright_dsl::Run;
    ///
    /// assert_eq!(Run::shell("make").memory_limit(1 << 30).limits.memory, Some(1 << 30));
    /// ```
    pub fn memory_limit(mut self, bytes: u64) -> Run {
        self.limits.memory = Some(bytes);
        self
    }

    /// This command with `mount` mounted while it runs (a cache directory, a tmpfs, a secret,
    /// files of another image or of the context, the SSH agent). Nothing of a mount enters the
    /// layer; what enters the key depends on the kind (see [`Mount`]).
    ///
    /// ```
    /// use layerwright_dsl::{Mount, Run};
    ///
    /// let run = Run::shell("apt-get update").mount(Mount::cache("/var/lib/apt/lists"));
    /// assert_eq!(run.mounts, [Mount::cache("/var/lib/apt/lists")]);
    /// ```
    pub fn mount(mut self, mount: Mount) -> Run {
        self.mounts.push(mount);
        self
    }
}

impl Run {
    /// The source images of this step's bind mounts ([`Mount::bind`]), in declaration order.
    pub fn bind_images(&self) -> impl Iterator<Item = &Image> {
        self.mounts.iter().filter_map(|mount| match mount {
            Mount::Bind { source: MountSource::Image(image), .. } => Some(image),
            _ => None,
        })
    }
}

impl From<RunCommand> for Run {
    fn from(command: RunCommand) -> Run {
        Run {
            command,
            env: Vec::new(),
            workdir: None,
            user: None,
            network: NetworkMode::None,
            limits: Limits::default(),
            mounts: Vec::new(),
        }
    }
}

impl From<&str> for Run {
    fn from(command: &str) -> Run {
        Run::shell(command)
    }
}

impl From<String> for Run {
    fn from(command: String) -> Run {
        Run::shell(command)
    }
}

impl<const N: usize> From<[&str; N]> for Run {
    fn from(argv: [&str; N]) -> Run {
        Run::argv(argv)
    }
}

impl From<Vec<String>> for Run {
    fn from(argv: Vec<String>) -> Run {
        Run::argv(argv)
    }
}

/// A change to the image config that adds no layer (`empty_layer` in the history).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConfigChange {
    /// `ENV key=value`: sets (or replaces) one environment variable.
    Env {
        /// The variable's name.
        key: String,
        /// Its value, taken literally (`$VAR` is not expanded).
        value: String,
    },
    /// `WORKDIR`: the working directory of later RUN steps and of the container; a relative
    /// path is relative to the previous one, as in Docker.
    Workdir(String),
    /// `USER`: the user of later RUN steps and of the container.
    User(String),
    /// `LABEL key=value`: one label of the image config.
    Label {
        /// The label's key, for example `org.opencontainers.image.title`.
        key: String,
        /// Its value.
        value: String,
    },
    /// `PORT/PROTO`, for example `8080/tcp`.
    Expose(String),
    /// `ENTRYPOINT`, in exec form.
    Entrypoint(Vec<String>),
    /// `CMD`, in exec form.
    Cmd(Vec<String>),
    /// `VOLUME`: a path the container runtime mounts a volume on.
    Volume(String),
    /// `STOPSIGNAL`, for example `SIGTERM`.
    StopSignal(String),
}

/// One step of an image: what it starts from or what it adds to its parent.
#[derive(Debug, Clone)]
pub enum Step {
    /// The empty image.
    Scratch,
    /// A base image read from a docker-archive tar, an OCI archive tar or an OCI layout dir.
    FromArchive {
        /// The archive or layout directory, as declared.
        path: PathBuf,
    },
    /// A base image pulled from a registry.
    Pull {
        /// The image reference, for example `localhost:5000/base:1`.
        reference: String,
    },
    /// Files from a build context.
    Copy(CopyStep),
    /// Files from another image's filesystem.
    CopyFrom(CopyFromStep),
    /// A regular file with inline content.
    WriteFile(WriteFileStep),
    /// A directory and its missing parents.
    Mkdir(MkdirStep),
    /// A symbolic link.
    Symlink(SymlinkStep),
    /// A whiteout for `path` in the new layer.
    Remove {
        /// The path removed, as declared, with everything below it.
        path: String,
    },
    /// A command executed against the image; its changes are the layer.
    Run(Run),
    /// A config change; adds no layer.
    Config(ConfigChange),
}

impl Step {
    /// True for the steps that start an image rather than add to one.
    pub fn is_base(&self) -> bool {
        matches!(self, Step::Scratch | Step::FromArchive { .. } | Step::Pull { .. })
    }

    /// True for the steps that add a filesystem layer.
    pub fn adds_layer(&self) -> bool {
        matches!(
            self,
            Step::Copy(_)
                | Step::CopyFrom(_)
                | Step::WriteFile(_)
                | Step::Mkdir(_)
                | Step::Symlink(_)
                | Step::Remove { .. }
                | Step::Run(_)
        )
    }

    /// A Dockerfile-like one-line description, for progress lines, errors and history.
    pub fn label(&self) -> String {
        match self {
            Step::Scratch => "FROM scratch".to_owned(),
            Step::FromArchive { path } => format!("FROM archive {}", path.display()),
            Step::Pull { reference } => format!("FROM {reference}"),
            Step::Copy(copy) => format!("COPY {} {}", copy.source, copy.destination),
            Step::CopyFrom(copy) => format!("COPY --from=<image> {} {}", copy.source, copy.destination),
            Step::WriteFile(write) => format!("WRITE {} ({} bytes)", write.path, write.content.len()),
            Step::Mkdir(mkdir) => format!("MKDIR {}", mkdir.path),
            Step::Symlink(symlink) => format!("SYMLINK {} -> {}", symlink.link_path, symlink.target),
            Step::Remove { path } => format!("REMOVE {path}"),
            Step::Run(run) => match &run.command {
                RunCommand::Shell(command) => format!("RUN {command}"),
                RunCommand::Argv(argv) => format!("RUN {}", json_array(argv)),
            },
            Step::Config(change) => match change {
                ConfigChange::Env { key, value } => format!("ENV {key}={value}"),
                ConfigChange::Workdir(dir) => format!("WORKDIR {dir}"),
                ConfigChange::User(user) => format!("USER {user}"),
                ConfigChange::Label { key, value } => format!("LABEL {key}={value}"),
                ConfigChange::Expose(port) => format!("EXPOSE {port}"),
                ConfigChange::Entrypoint(argv) => format!("ENTRYPOINT {}", json_array(argv)),
                ConfigChange::Cmd(argv) => format!("CMD {}", json_array(argv)),
                ConfigChange::Volume(path) => format!("VOLUME {path}"),
                ConfigChange::StopSignal(signal) => format!("STOPSIGNAL {signal}"),
            },
        }
    }
}

fn json_array(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|item| format!("{item:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

// RUN mounts: what a RUN step sees mounted while its command runs, and never finds in its layer
// (BuildKit's `RUN --mount=type=cache|tmpfs|secret|bind|ssh`), attached with `Run::mount`. They
// live here because a bind mount holds its source `Image`, as `copy_from` does.
//
// What these types deliberately are not: validation (a relative, duplicate or `/` target is
// reported when the image is built, naming the step and the target: declaring never fails), or
// anything that touches a disk. An option that does not apply to a kind (`.size` on a cache
// mount, `.writable` on a secret) is ignored: the kinds share one builder type so that
// declarations read like Dockerfile flags.
/// How concurrent RUN steps (in one build or in concurrent builds on one cache directory)
/// share a cache mount with the same id. BuildKit's `sharing=shared|locked|private`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Sharing {
    /// Every user mounts the same directory at once (the default, as BuildKit's).
    #[default]
    Shared,
    /// One user at a time: a step waits until the one holding the id has finished.
    Locked,
    /// Each concurrent user gets a directory of its own (one not in use, else a new one).
    Private,
}

impl Sharing {
    /// The byte the step's key encodes this mode as.
    pub fn key_byte(self) -> u8 {
        match self {
            Sharing::Shared => 0,
            Sharing::Locked => 1,
            Sharing::Private => 2,
        }
    }
}

/// Where a bind mount's files come from.
#[derive(Debug, Clone)]
pub enum MountSource {
    /// Another image's final filesystem (its key enters the step's key).
    Image(Image),
    /// The build context (the selected files' digests enter the step's key).
    Context(Context),
}

impl PartialEq for MountSource {
    fn eq(&self, other: &MountSource) -> bool {
        match (self, other) {
            (MountSource::Image(left), MountSource::Image(right)) => left.same_node(right),
            (MountSource::Context(left), MountSource::Context(right)) => left == right,
            _ => false,
        }
    }
}

impl Eq for MountSource {}

impl Hash for MountSource {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            MountSource::Image(image) => {
                0u8.hash(state);
                image.node_id().hash(state);
            }
            MountSource::Context(context) => {
                1u8.hash(state);
                context.hash(state);
            }
        }
    }
}

/// One mount of a RUN step. Made with [`Mount::cache`], [`Mount::tmpfs`], [`Mount::secret`],
/// [`Mount::bind`], [`Mount::context`] or [`Mount::ssh`] and the chainable options.
///
/// Nothing a mount holds while the command runs enters the step's layer, for every kind. Where
/// a directory target (a cache, a tmpfs, a bind of a directory) did not exist in the image, the
/// layer gets the empty mountpoint directory (0755, root, with any missing parents), as
/// BuildKit leaves it; a file target (a secret, a bind of a file, an SSH agent's socket) that
/// did not exist is made as an empty file and left out of the layer, with the directories made
/// for it.
///
/// What enters the step's key: a cache mount's id, target and options (never its contents); a
/// tmpfs's target and size; a secret's id, target, owner and mode (its bytes never; a digest
/// of them with [`Mount::key_by_digest`]); a bind mount's source path, target and writability,
/// and the source image's key or the selected context files' digests; an SSH agent's id and
/// target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mount {
    /// A directory kept in the builder's cache directory across builds: the same id finds what
    /// earlier steps left there. Its key holds the id, target and options, never the contents.
    Cache {
        /// Absolute path inside the image, as declared.
        target: String,
        /// What identifies the directory across steps and builds; the target by default.
        id: String,
        /// How concurrent users share it.
        sharing: Sharing,
        /// The owner the directory is created with; root by default.
        owner: Option<Owner>,
        /// The permission bits it is created with; 0755 by default.
        mode: Option<u32>,
    },
    /// A fresh, empty tmpfs (`nosuid`, `nodev`) gone when the command ends.
    Tmpfs {
        /// Absolute path inside the image, as declared.
        target: String,
        /// Its size limit in bytes; the kernel's default (half the RAM) when `None`.
        size: Option<u64>,
    },
    /// A read-only file holding a secret the builder was given under `id`. Its bytes never
    /// enter the key, a layer, a log or a record; a changed secret does not rebuild the step
    /// (as in BuildKit) unless the mount opts in with [`Mount::key_by_digest`]: then a digest
    /// of its bytes (never the bytes) enters the key.
    Secret {
        /// Absolute path of the file inside the image, as declared.
        target: String,
        /// The secret's name, as given to the builder.
        id: String,
        /// The file's owner; root by default.
        owner: Option<Owner>,
        /// The file's permission bits; 0400 by default.
        mode: Option<u32>,
        /// Whether a digest of the secret's bytes enters the step's key (so that a changed
        /// secret rebuilds the step); `false` by default, as in BuildKit.
        key_by_digest: bool,
    },
    /// Files of another image or of the build context, read-only unless writable (then writes
    /// go to a throwaway layer). What is mounted enters the key.
    Bind {
        /// Where the files come from.
        source: MountSource,
        /// The path inside the source, as declared.
        path: String,
        /// Absolute path inside the image, as declared.
        target: String,
        /// Whether the command may write there (its writes are thrown away).
        writable: bool,
    },
    /// The host's SSH agent socket (`SSH_AUTH_SOCK`), with `SSH_AUTH_SOCK` set for the command.
    Ssh {
        /// Which agent the builder was given; `default` by default.
        id: String,
        /// Where the socket is mounted.
        target: String,
    },
}

/// Where [`Mount::ssh`] mounts the agent socket unless told otherwise.
pub const SSH_AGENT_TARGET: &str = "/run/layerwright/ssh_agent.sock";

impl Mount {
    /// A cache mount at `target` (its id is the target until [`Mount::id`] says otherwise),
    /// shared, created 0755 and owned by root.
    ///
    /// ```
    /// use layerwright_dsl::{Mount, Sharing};
    ///
    /// let mount = Mount::cache("/var/cache/apt").id("apt").sharing(Sharing::Locked).owner(0, 0).mode(0o755);
    /// assert!(matches!(mount, Mount::Cache { ref id, sharing: Sharing::Locked, .. } if id == "apt"));
    /// ```
    pub fn cache(target: impl Into<String>) -> Mount {
        let target = target.into();
        Mount::Cache { id: target.clone(), target, sharing: Sharing::Shared, owner: None, mode: None }
    }

    /// A tmpfs at `target`, of the kernel's default size until [`Mount::size`] says otherwise.
    ///
    /// ```
    /// use layerwright_dsl::Mount;
    ///
    /// assert_eq!(Mount::tmpfs("/tmp").size(1 << 20), Mount::Tmpfs { target: "/tmp".into(), size: Some(1 << 20) });
    /// ```
    pub fn tmpfs(target: impl Into<String>) -> Mount {
        Mount::Tmpfs { target: target.into(), size: None }
    }

    /// The secret `id` as a read-only file at `target` (0400, root, until [`Mount::mode`] and
    /// [`Mount::owner`] say otherwise).
    ///
    /// ```
    /// use layerwright_dsl::Mount;
    ///
    /// let mount = Mount::secret("/run/secrets/token", "token");
    /// assert_eq!(mount.target(), "/run/secrets/token");
    /// ```
    pub fn secret(target: impl Into<String>, id: impl Into<String>) -> Mount {
        Mount::Secret { target: target.into(), id: id.into(), owner: None, mode: None, key_by_digest: false }
    }

    /// `source` (a directory or a file) of `image`'s final filesystem, read-only at `target`
    /// ([`Mount::writable`]: writes go to a throwaway layer). `image` is built before the step,
    /// and its key enters the step's key: a changed source image rebuilds the step. Nothing
    /// of it enters the layer.
    ///
    /// ```
    /// use layerwright_dsl::{Image, Mount, Run};
    ///
    /// let base = Image::from_archive("busybox.tar");
    /// let tools = base.run("mkdir -p /out && echo hi > /out/hi");
    /// let step = base.run(Run::shell("cat /in/hi > /copied").mount(Mount::bind(&tools, "/out", "/in")));
    /// assert!(step.inputs()[1].same_node(&tools), "the source image is an input of the step");
    /// ```
    pub fn bind(image: &Image, source: impl Into<String>, target: impl Into<String>) -> Mount {
        Mount::Bind {
            source: MountSource::Image(image.clone()),
            path: source.into(),
            target: target.into(),
            writable: false,
        }
    }

    /// `source` (a directory or a file) of the build context `context`, read-only at `target`
    /// ([`Mount::writable`]: writes go to a throwaway copy). The source is selected as `copy`
    /// selects it (`..`, absolute paths and symlinks leading out of the context are errors,
    /// `.dockerignore` applies: an excluded file is not in the mount) and the selected files'
    /// digests enter the step's key. Nothing of it enters the layer.
    ///
    /// ```
    /// use layerwright_dsl::{Context, Image, Mount, Run};
    ///
    /// let context = Context::dir("app")?;
    /// let run = Run::shell("make -C /src").mount(Mount::context(&context, ".", "/src").writable());
    /// assert!(matches!(run.mounts[0], Mount::Bind { writable: true, .. }));
    /// # Ok::<(), layerwright_dsl::ImagePathError>(())
    /// ```
    pub fn context(context: &Context, source: impl Into<String>, target: impl Into<String>) -> Mount {
        Mount::Bind {
            source: MountSource::Context(context.clone()),
            path: source.into(),
            target: target.into(),
            writable: false,
        }
    }

    /// The builder's SSH agent `default` (see [`Mount::id`]) at [`SSH_AGENT_TARGET`] (see
    /// [`Mount::at`]), with `SSH_AUTH_SOCK` set to it for the command. The builder must have
    /// been given the agent (as `docker build --ssh`): a step that mounts an agent it lacks
    /// fails before anything runs. Keyed by its id and target, never by the agent's keys.
    ///
    /// ```
    /// use layerwright_dsl::{Mount, SSH_AGENT_TARGET};
    ///
    /// assert_eq!(Mount::ssh().target(), SSH_AGENT_TARGET);
    /// assert_eq!(Mount::ssh().id("deploy").at("/run/agent.sock").target(), "/run/agent.sock");
    /// ```
    pub fn ssh() -> Mount {
        Mount::Ssh { id: "default".to_owned(), target: SSH_AGENT_TARGET.to_owned() }
    }

    /// Where the mount is, as declared.
    pub fn target(&self) -> &str {
        match self {
            Mount::Cache { target, .. }
            | Mount::Tmpfs { target, .. }
            | Mount::Secret { target, .. }
            | Mount::Bind { target, .. }
            | Mount::Ssh { target, .. } => target,
        }
    }

    /// A cache mount's or an SSH agent's id (no effect on other kinds).
    pub fn id(mut self, new_id: impl Into<String>) -> Mount {
        if let Mount::Cache { id, .. } | Mount::Ssh { id, .. } = &mut self {
            *id = new_id.into();
        }
        self
    }

    /// A cache mount's sharing mode (no effect on other kinds).
    pub fn sharing(mut self, mode: Sharing) -> Mount {
        if let Mount::Cache { sharing, .. } = &mut self {
            *sharing = mode;
        }
        self
    }

    /// The owner of a cache directory or a secret file (no effect on other kinds).
    pub fn owner(mut self, uid: u32, gid: u32) -> Mount {
        if let Mount::Cache { owner, .. } | Mount::Secret { owner, .. } = &mut self {
            *owner = Some(Owner::new(uid, gid));
        }
        self
    }

    /// The permission bits of a cache directory or a secret file (no effect on other kinds).
    pub fn mode(mut self, bits: u32) -> Mount {
        if let Mount::Cache { mode, .. } | Mount::Secret { mode, .. } = &mut self {
            *mode = Some(bits);
        }
        self
    }

    /// A tmpfs's size limit in bytes (no effect on other kinds).
    pub fn size(mut self, bytes: u64) -> Mount {
        if let Mount::Tmpfs { size, .. } = &mut self {
            *size = Some(bytes);
        }
        self
    }

    /// A bind mount the command may write to; its writes are thrown away (no effect on other
    /// kinds).
    pub fn writable(mut self) -> Mount {
        if let Mount::Bind { writable, .. } = &mut self {
            *writable = true;
        }
        self
    }

    /// A secret mount whose secret's digest enters the step's key, so that a changed secret
    /// rebuilds the step (no effect on other kinds). The digest is blake3 of the bytes under
    /// a domain of layerwright's own; the bytes never enter the key. Off by default: a
    /// secret is usually a credential, whose rotation should not rebuild anything.
    ///
    /// ```
    /// use layerwright_dsl::Mount;
    ///
    /// let mount = Mount::secret("/run/secrets/config", "config").key_by_digest();
    /// assert!(matches!(mount, Mount::Secret { key_by_digest: true, .. }));
    /// ```
    pub fn key_by_digest(mut self) -> Mount {
        if let Mount::Secret { key_by_digest, .. } = &mut self {
            *key_by_digest = true;
        }
        self
    }

    /// The target of [`Mount::ssh`] (no effect on other kinds).
    pub fn at(mut self, path: impl Into<String>) -> Mount {
        if let Mount::Ssh { target, .. } = &mut self {
            *target = path.into();
        }
        self
    }
}
