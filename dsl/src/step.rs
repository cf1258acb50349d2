//! The step types: one variant per kind of instruction, each holding exactly what the step
//! means, and a human label for progress lines and errors.
//!
//! Steps hold declared values only. Paths are kept as the user wrote them and normalised by the
//! builder, so that a bad path is reported with the step that named it rather than panicking at
//! declaration time.

use std::path::PathBuf;
use std::sync::Arc;

use crate::{Context, Image};

/// A numeric owner for files a step writes. Names are not resolved: an image has no
/// `/etc/passwd` the builder could trust at declaration time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    pub const ROOT: Owner = Owner { uid: 0, gid: 0 };
}

/// Mode and owner for the entries a file step writes. `None` means the step's default: for
/// `copy` the source's permission bits, for `write_file` 0644, for `mkdir` 0755; owner root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FileOptions {
    /// Permission bits including setuid (0o4000), setgid (0o2000) and sticky (0o1000).
    pub mode: Option<u32>,
    pub owner: Option<Owner>,
}

impl FileOptions {
    pub fn mode(mode: u32) -> FileOptions {
        FileOptions { mode: Some(mode), owner: None }
    }

    pub fn with_owner(self, uid: u32, gid: u32) -> FileOptions {
        FileOptions { owner: Some(Owner { uid, gid }), ..self }
    }

    pub fn with_mode(self, mode: u32) -> FileOptions {
        FileOptions { mode: Some(mode), ..self }
    }
}

/// Options of `copy` and `copy_from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CopyOptions {
    pub file: FileOptions,
    /// Replace the destination directory wholesale instead of merging into it (Docker merges):
    /// the layer then carries an opaque whiteout, so nothing from lower layers shows through.
    pub replace_directory: bool,
}

/// `copy(&context, src, dest)`: files from the build context.
#[derive(Debug, Clone)]
pub struct CopyStep {
    pub context: Context,
    pub source: String,
    pub destination: String,
    pub options: CopyOptions,
}

/// `copy_from(&image, src, dest)`: files from another image's filesystem (multi-stage builds).
#[derive(Debug, Clone)]
pub struct CopyFromStep {
    pub image: Image,
    pub source: String,
    pub destination: String,
    pub options: CopyOptions,
}

/// `write_file(path, content)`: inline content.
#[derive(Debug, Clone)]
pub struct WriteFileStep {
    pub path: String,
    pub content: Arc<[u8]>,
    pub options: FileOptions,
}

/// `mkdir(path)`: a directory and any missing parents.
#[derive(Debug, Clone)]
pub struct MkdirStep {
    pub path: String,
    pub options: FileOptions,
}

/// `symlink(link_path, target)`: `link_path` points at `target` (stored verbatim).
#[derive(Debug, Clone)]
pub struct SymlinkStep {
    pub link_path: String,
    pub target: String,
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

/// A RUN step: a command executed against the image as it stands.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Run {
    pub command: RunCommand,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    /// Off by default: a RUN step is hermetic unless it asks for the network.
    pub network: bool,
}

impl Run {
    pub fn shell(command: impl Into<String>) -> Run {
        Run::from(RunCommand::Shell(command.into()))
    }

    pub fn argv<I, S>(argv: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Run::from(RunCommand::Argv(argv.into_iter().map(Into::into).collect()))
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Run {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn workdir(mut self, workdir: impl Into<String>) -> Run {
        self.workdir = Some(workdir.into());
        self
    }

    pub fn user(mut self, user: impl Into<String>) -> Run {
        self.user = Some(user.into());
        self
    }

    pub fn network(mut self, enabled: bool) -> Run {
        self.network = enabled;
        self
    }
}

impl From<RunCommand> for Run {
    fn from(command: RunCommand) -> Run {
        Run { command, env: Vec::new(), workdir: None, user: None, network: false }
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
    Env {
        key: String,
        value: String,
    },
    Workdir(String),
    User(String),
    Label {
        key: String,
        value: String,
    },
    /// `PORT/PROTO`, for example `8080/tcp`.
    Expose(String),
    Entrypoint(Vec<String>),
    Cmd(Vec<String>),
    Volume(String),
    StopSignal(String),
}

/// One step of an image: what it starts from or what it adds to its parent.
#[derive(Debug, Clone)]
pub enum Step {
    /// The empty image.
    Scratch,
    /// A base image read from a docker-archive tar, an OCI archive tar or an OCI layout dir.
    FromArchive {
        path: PathBuf,
    },
    /// A base image pulled from a registry.
    Pull {
        reference: String,
    },
    Copy(CopyStep),
    CopyFrom(CopyFromStep),
    WriteFile(WriteFileStep),
    Mkdir(MkdirStep),
    Symlink(SymlinkStep),
    /// A whiteout for `path` in the new layer.
    Remove {
        path: String,
    },
    Run(Run),
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
