//! The command line of a workspace that declares images (feature `cli`): a user's whole
//! `cargo xtask` is a list of image functions handed to [`main`].
//!
//! ```no_run
//! // xtask/src/main.rs
//! use layerwright::cli::Images;
//! use layerwright::{Context, Image};
//!
//! fn main() -> std::process::ExitCode {
//!     layerwright::cli::main(Images::new().add("api", api_image).add("worker", worker_image))
//! }
//!
//! fn api_image() -> Result<Image, Box<dyn std::error::Error + Send + Sync>> {
//!     let bin = Context::dir("target/release")?; // relative to the workspace root
//!     Ok(Image::scratch().copy(&bin, "api", "/usr/local/bin/api").entrypoint(["/usr/local/bin/api"]))
//! }
//!
//! fn worker_image() -> Result<Image, Box<dyn std::error::Error + Send + Sync>> {
//!     Ok(api_image()?.entrypoint(["/usr/local/bin/api", "--worker"]))
//! }
//! ```
//!
//! With `xtask = "run --package xtask --"` in `.cargo/config.toml`'s `[alias]`:
//!
//! ```text
//! cargo xtask build-image api [--output SPEC].. [--tag REF] [--cache DIR] [--compression C]
//!                             [--push REF [--insecure]] [--cache-from REF].. [--cache-to REF]
//! cargo xtask list
//! cargo xtask inspect api [--full]
//! cargo xtask cache du | cache prune [--keep-bytes SIZE] [--keep-duration D] [--min-free SIZE] [--reserved SIZE]
//! ```
//!
//! It works from any subdirectory of the workspace: before an image function runs, the process
//! enters the workspace root (see [`workspace_root`]), so relative paths in declarations resolve
//! against it; paths given on the command line (`--output`, `--cache`) stay relative to the
//! directory the command was started in. The default cache is `target/layerwright` under the
//! root, and the default output `docker-archive:target/images/NAME.tar`.
//!
//! A binary with commands of its own (this repository's xtask has `test`, `tidy`, …) flattens
//! [`Command`] into its clap enum and calls [`execute`] for those:
//!
//! ```no_run
//! use layerwright::cli::{self, Images, clap};
//! use clap::Parser as _;
//!
//! #[derive(clap::Parser)]
//! struct Arguments {
//!     #[command(subcommand)]
//!     command: Commands,
//! }
//!
//! #[derive(clap::Subcommand)]
//! enum Commands {
//!     #[command(flatten)]
//!     Images(cli::Command),
//!     /// Something only this workspace does.
//!     Lint,
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     match Arguments::parse().command {
//!         Commands::Images(command) => cli::execute(&Images::new(), command),
//!         Commands::Lint => std::process::ExitCode::SUCCESS,
//!     }
//! }
//! ```
//!
//! This is the only library code that prints: progress on stderr (spinners on a terminal,
//! plain lines otherwise), results on stdout, errors on stderr.

mod args;
mod build;
mod error;
mod inspect;
mod workspace;

use std::error::Error;
use std::ffi::OsString;
use std::fmt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser as _;

pub use args::{BuildImageArgs, CacheArgs, CacheCommand, Command, InspectArgs};
pub use build::{
    Attestations, BuildCommand, BuildSummary, OutputSpec, build_image, build_with_progress, parse_compression,
};
pub use error::CliError;
pub use workspace::workspace_root;

use crate::Image;
use crate::cache::Store;

/// The clap this module's argument types derive with, for binaries that flatten [`Command`].
pub use clap;

/// What an image function returns: the image, or why it could not be declared.
pub type DeclareResult = Result<Image, Box<dyn Error + Send + Sync>>;

/// A function that declares an image.
type Declare = Arc<dyn Fn() -> DeclareResult + Send + Sync>;

/// The images a workspace declares, by name, in the order they were added.
///
/// ```no_run
/// use layerwright::cli::Images;
/// use layerwright::Image;
///
/// let version = "1.2.3".to_owned();
/// let images = Images::new()
///     .add("empty", || Ok::<_, std::io::Error>(Image::scratch()))
///     .add_described("motd", "a message of the day", move || {
///         Ok::<_, std::io::Error>(Image::scratch().write_file("/etc/motd", format!("v{version}\n")))
///     });
/// assert_eq!(images.names().collect::<Vec<_>>(), ["empty", "motd"]);
/// ```
#[derive(Clone, Default)]
pub struct Images {
    entries: Vec<Entry>,
}

/// One registered image.
#[derive(Clone)]
struct Entry {
    name: String,
    description: String,
    declare: Declare,
}

impl fmt::Debug for Images {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_list().entries(self.entries.iter().map(|entry| &entry.name)).finish()
    }
}

impl Images {
    /// No images yet.
    pub fn new() -> Images {
        Images::default()
    }

    /// Adds the image `name`, declared by `declare`: a `fn() -> Result<Image, E>` or a closure
    /// (which may capture what the declarations need), with any error type that converts to a
    /// boxed error. It runs only when the image is built or inspected, in the workspace root.
    ///
    /// # Panics
    ///
    /// When an image of that name was added before: a name names one image.
    pub fn add<F, E>(self, name: impl Into<String>, declare: F) -> Images
    where
        F: Fn() -> Result<Image, E> + Send + Sync + 'static,
        E: Into<Box<dyn Error + Send + Sync>>,
    {
        self.add_described(name, "", declare)
    }

    /// [`Images::add`] with a one-line description, which `list` shows.
    ///
    /// # Panics
    ///
    /// When an image of that name was added before.
    pub fn add_described<F, E>(mut self, name: impl Into<String>, description: impl Into<String>, declare: F) -> Images
    where
        F: Fn() -> Result<Image, E> + Send + Sync + 'static,
        E: Into<Box<dyn Error + Send + Sync>>,
    {
        let name = name.into();
        assert!(self.entries.iter().all(|entry| entry.name != name), "image {name:?} is added twice");
        let declare: Declare = Arc::new(move || declare().map_err(Into::into));
        self.entries.push(Entry { name, description: description.into(), declare });
        self
    }

    /// The names of the images, in the order they were added.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|entry| entry.name.as_str())
    }

    /// Runs the function of the image `name` (in the current directory: [`execute`] enters the
    /// workspace root first).
    pub fn declare(&self, name: &str) -> Result<Image, CliError> {
        let Some(entry) = self.entries.iter().find(|entry| entry.name == name) else {
            return Err(CliError::UnknownImage {
                name: name.to_owned(),
                known: self.names().map(str::to_owned).collect(),
            });
        };
        (entry.declare)().map_err(|source| CliError::Declare { name: name.to_owned(), source })
    }

    /// One line per image: its name, and its description if it has one.
    pub fn list(&self) -> String {
        let width = self.entries.iter().map(|entry| entry.name.len()).max().unwrap_or(0);
        let mut text = String::new();
        for entry in &self.entries {
            let line = format!("{:<width$}  {}", entry.name, entry.description);
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }
}

/// The command line as it is parsed by [`main`] and [`run`].
#[derive(clap::Parser, Debug)]
#[command(bin_name = "cargo xtask", about = "Build the container images this workspace declares")]
struct Arguments {
    #[command(subcommand)]
    command: Command,
}

/// The whole `main` of a workspace's xtask: parses the process's arguments and runs the
/// command on `images` (see the module docs). Errors are printed; the exit code says whether
/// the command succeeded.
///
/// ```no_run
/// use layerwright::{Image, cli::Images};
///
/// fn main() -> std::process::ExitCode {
///     layerwright::cli::main(Images::new().add("motd", motd))
/// }
///
/// fn motd() -> Result<Image, Box<dyn std::error::Error + Send + Sync>> {
///     Ok(Image::scratch().write_file("/etc/motd", "hello\n"))
/// }
/// ```
pub fn main(images: Images) -> ExitCode {
    run(&images, std::env::args_os())
}

/// [`main`] with the arguments given (the first one is the program's name).
///
/// ```no_run
/// use layerwright::Image;
/// use layerwright::cli::{self, Images};
///
/// let images = Images::new().add("empty", || Ok::<_, std::io::Error>(Image::scratch()));
/// let code = cli::run(&images, ["xtask", "build-image", "empty", "--output", "oci:out/empty"]);
/// assert_eq!(code, std::process::ExitCode::SUCCESS);
/// ```
pub fn run<I, T>(images: &Images, arguments: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match Arguments::try_parse_from(arguments) {
        Ok(arguments) => execute(images, arguments.command),
        Err(error) => {
            let _ = error.print();
            if error.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS }
        }
    }
}

/// Runs one parsed command on `images`: finds the workspace root, enters it (so relative paths
/// in declarations resolve against it), and prints the result, or the error with its causes.
pub fn execute(images: &Images, command: Command) -> ExitCode {
    match try_execute(images, command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", crate::error_text::describe_chain(&error));
            ExitCode::FAILURE
        }
    }
}

fn try_execute(images: &Images, command: Command) -> Result<(), CliError> {
    let invocation_dir = std::env::current_dir().map_err(|source| CliError::Io {
        action: "reading the working directory",
        path: ".".into(),
        source,
    })?;
    let root = workspace_root()?;
    match command {
        Command::List => print!("{}", images.list()),
        Command::BuildImage(arguments) if arguments.watch => {
            let command = arguments.resolve(&invocation_dir, &root);
            let image = declare_in(images, &arguments.name, &root)?;
            watch_and_deliver(&image, &command)?;
        }
        Command::BuildImage(arguments) => {
            let command = arguments.resolve(&invocation_dir, &root);
            let image = declare_in(images, &arguments.name, &root)?;
            let summary = build_image(&image, &command)?;
            println!("{summary}");
        }
        Command::Inspect(arguments) => {
            let build = BuildImageArgs {
                name: arguments.name.clone(),
                outputs: Vec::new(),
                tag: None,
                cache: arguments.cache.clone(),
                compression: crate::Compression::default(),
                push: None,
                insecure: false,
                cache_from: Vec::new(),
                cache_to: None,
                reapi: None,
                reapi_instance: String::new(),
                reapi_execute: false,
                load: false,
                platform: Vec::new(),
                attest: false,
                no_attest: false,
                watch: false,
                secrets: Vec::new(),
                ssh_agents: Vec::new(),
            };
            let command = BuildCommand { outputs: Vec::new(), ..build.resolve(&invocation_dir, &root) };
            let image = declare_in(images, &arguments.name, &root)?;
            let built = build_with_progress(&image, &command)?;
            print!("{}", inspect::describe(&arguments.name, &built, arguments.files)?);
        }
        Command::Cache(arguments) => {
            let cache = args::cache_dir(arguments.cache.as_deref(), &invocation_dir, &root);
            print!("{}", cache_command(&cache, &arguments.command)?);
        }
    }
    Ok(())
}

/// Enters the workspace `root`, then declares the image `name`.
fn declare_in(images: &Images, name: &str, root: &Path) -> Result<Image, CliError> {
    std::env::set_current_dir(root).map_err(|source| CliError::Io {
        action: "entering the workspace root",
        path: root.to_owned(),
        source,
    })?;
    images.declare(name)
}

/// `cache du` and `cache prune`, as the text they print.
fn cache_command(cache: &Path, command: &CacheCommand) -> Result<String, CliError> {
    let store_error = |source| CliError::Cache { path: cache.to_owned(), source };
    Ok(match command {
        CacheCommand::Du => {
            let store = Store::open(cache).map_err(store_error)?;
            let usage = store.disk_usage();
            let mut text = format!(
                "cache    {}\nblobs    {:>14} bytes in {} blobs\nrecords  {:>14} bytes in {} action records\n",
                cache.display(),
                usage.blobs,
                usage.blob_count,
                usage.records,
                usage.record_count,
            );
            for (name, bytes) in usage.parts.iter().filter(|(name, _)| !matches!(name.as_str(), "blobs" | "actions")) {
                text.push_str(&format!("{:<17}{bytes:>14} bytes\n", format!("  {name}")));
            }
            text.push_str(&format!("total    {:>14} bytes (du -sb)\n", usage.total()));
            text.push_str(&cache_mounts_text(&store, usage.parts.get("mounts").copied().unwrap_or(0)));
            text
        }
        CacheCommand::Prune { keep_bytes, keep_duration, min_free, reserved } => {
            let store = Store::open(cache).map_err(store_error)?;
            let mut policy = crate::cache::PrunePolicy::new();
            policy.keep_bytes = *keep_bytes;
            policy.keep_duration = *keep_duration;
            policy.min_free_bytes = *min_free;
            policy.reserved_bytes = *reserved;
            let report = crate::cache::prune(&store, &policy).map_err(store_error)?;
            format!(
                "removed {} records, {} blobs, {} cache mounts and {} other entries, freed {} bytes; {} bytes remain\n",
                report.removed_records,
                report.removed_blobs,
                report.removed_cache_mounts,
                report.removed_other,
                report.freed_bytes,
                report.remaining_bytes
            )
        }
    })
}

/// The RUN cache mounts' lines of `cache du` (none when there are none): their total (counted
/// in `total` above), then each, least recently used first.
fn cache_mounts_text(store: &Store, bytes: u64) -> String {
    let mounts = store.cache_mount_usage();
    if mounts.is_empty() {
        return String::new();
    }
    let mut text = format!("cache mounts {bytes} bytes in {} directories, least recently used first:\n", mounts.len());
    for mount in mounts {
        let name = mount.path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        text.push_str(&format!("  {:>14} bytes  id {:?} ({name})\n", mount.bytes, mount.id));
    }
    text
}

/// `build-image --watch`: one builder rebuilds whenever what the image reads changes, and each
/// good build is delivered (outputs, `--push`, `--load`); Ctrl-C stops after the build under way
/// (a second Ctrl-C ends the process at once).
fn watch_and_deliver(image: &crate::Image, command: &BuildCommand) -> Result<(), CliError> {
    use std::ops::ControlFlow;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let stop = Arc::new(AtomicBool::new(false));
    let handler_stop = Arc::clone(&stop);
    // Failing to install the handler leaves Ctrl-C's default: the process ends at once, and
    // the store clears what it left in its tmp directory the next time it opens.
    let _ = ctrlc::set_handler(move || {
        if handler_stop.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("stopping after the build under way (Ctrl-C again to stop now)");
    });
    let builder = build::builder_with_progress(command)?;
    let watched = crate::watch::watched_paths(&[image]);
    eprintln!("watching {} paths; Ctrl-C stops", watched.len());
    crate::watch::watch(&builder, &[image], &crate::watch::WatchOptions::default(), &stop, |watched_build| {
        if !watched_build.changed.is_empty() {
            let names: Vec<String> =
                watched_build.changed.iter().take(3).map(|path| path.display().to_string()).collect();
            eprintln!("changed: {}", names.join(", "));
        }
        let summary = watched_build.result.map_err(CliError::from).and_then(|mut built| {
            build::deliver(built.remove(0), command, std::time::Instant::now() - watched_build.duration)
        });
        match summary {
            Ok(summary) => println!("{summary}"),
            Err(error) => eprintln!("error: {error}"),
        }
        ControlFlow::Continue(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_found_by_name_and_unknown_names_list_the_known_ones() {
        let images = Images::new().add("a", || Ok::<_, std::io::Error>(Image::scratch())).add_described(
            "bee",
            "the second",
            || Err::<Image, _>(std::io::Error::other("no bees")),
        );
        assert!(images.declare("a").is_ok());
        let unknown = images.declare("c").unwrap_err().to_string();
        assert_eq!(unknown, "unknown image \"c\"; the images are: a, bee");
        let failed = images.declare("bee").unwrap_err().to_string();
        assert_eq!(failed, "declaring image bee: no bees");
        assert_eq!(images.list(), "a\nbee  the second\n");
    }

    #[test]
    fn cache_du_lists_cache_mounts_and_prune_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        {
            let store = Store::open(&cache).unwrap();
            let options = layerwright_cache::CacheMountOptions { mode: 0o755, owner: None };
            let lease = store
                .acquire_cache_mount("/var/cache/apt", layerwright_cache::CacheMountSharing::Shared, options)
                .unwrap();
            std::fs::write(lease.parent().join(lease.name()).join("pkg.deb"), vec![0u8; 4096]).unwrap();
        }
        let du = cache_command(&cache, &CacheCommand::Du).unwrap();
        // The total counts the id and lock files too.
        assert!(du.contains(" bytes in 1 directories, least recently used first"), "{du}");
        // The directory and its 4096-byte file, as `du -sb` counts them.
        let line = du
            .lines()
            .find(|line| line.ends_with("id \"/var/cache/apt\"") || line.contains("id \"/var/cache/apt\" ("))
            .unwrap();
        let bytes: u64 = line.split_whitespace().next().unwrap().parse().unwrap();
        assert!(bytes > 4096, "{du}");
        let pruned = cache_command(
            &cache,
            &CacheCommand::Prune { keep_bytes: Some(0), keep_duration: None, min_free: None, reserved: None },
        )
        .unwrap();
        assert!(pruned.contains("1 cache mounts"), "{pruned}");
        assert!(!cache_command(&cache, &CacheCommand::Du).unwrap().contains("cache mounts"));
    }

    #[test]
    #[should_panic(expected = "image \"a\" is added twice")]
    fn a_name_names_one_image() {
        let declare = || Ok::<_, std::io::Error>(Image::scratch());
        let _ = Images::new().add("a", declare).add("a", declare);
    }

    #[test]
    fn design_md_signature_fits() {
        fn api() -> DeclareResult {
            Ok(Image::scratch())
        }
        let images = Images::new().add("api", api).add("worker", api);
        assert_eq!(images.names().collect::<Vec<_>>(), ["api", "worker"]);
    }

    #[test]
    fn error_chains_show_each_cause_once() {
        let error = CliError::Declare { name: "x".into(), source: Box::new(std::io::Error::other("inner")) };
        assert_eq!(crate::error_text::describe_chain(&error), "declaring image x: inner");
    }
}
