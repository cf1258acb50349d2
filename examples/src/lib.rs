//! Example images declared with layerwright: each is a function from an
//! [`ExampleEnvironment`] to an [`Image`], listed in [`EXAMPLES`] and registered for
//! `layerwright::cli` by [`images`] so that `cargo xtask build-image NAME` finds it, and each
//! has an insta snapshot test of its `listing()` in `tests/`.
//!
//! They are made only of what a fresh clone has: a static Rust binary built from this
//! workspace, and Debian's `busybox-static`. What this crate is not: a library of base images
//! to depend on.
//!
//! ```no_run
//! use layerwright::Builder;
//! use layerwright_examples::{find, ExampleEnvironment};
//!
//! let environment = ExampleEnvironment::for_workspace(env!("CARGO_MANIFEST_DIR").as_ref());
//! let image = (find("hello").unwrap().declare)(&environment).unwrap();
//! let built = Builder::new("target/layerwright").unwrap().build(&image).unwrap();
//! println!("{}", built.manifest_digest());
//! ```

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

pub mod workloads;

use layerwright::cli::Images;
use layerwright::host::{self, HostError, StaticBinaryOptions};
use layerwright::{Context, FileOptions, Image, ImagePathError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ExampleError {
    #[error("example {example}: {source}")]
    Host { example: &'static str, source: HostError },
    #[error("example {example}: {source}")]
    Context { example: &'static str, source: ImagePathError },
}

/// Where examples find the workspace and may write generated inputs.
#[derive(Debug, Clone)]
pub struct ExampleEnvironment {
    pub workspace: PathBuf,
    /// A directory for generated build contexts and the nested cargo's target dir.
    pub work_dir: PathBuf,
}

impl ExampleEnvironment {
    /// The environment for the workspace at `path` or any of its member directories.
    pub fn for_workspace(path: &Path) -> ExampleEnvironment {
        let workspace = path
            .ancestors()
            .find(|candidate| candidate.join("Cargo.toml").is_file() && candidate.join("xtask").is_dir())
            .unwrap_or(path)
            .to_owned();
        let work_dir = workspace.join("target").join("layerwright-examples");
        ExampleEnvironment { workspace, work_dir }
    }
}

/// An example image.
pub struct Example {
    pub name: &'static str,
    pub description: &'static str,
    pub declare: fn(&ExampleEnvironment) -> Result<Image, ExampleError>,
}

pub const EXAMPLES: &[Example] = &[
    Example { name: "hello", description: "a static Rust binary from scratch that greets", declare: hello },
    Example {
        name: "busybox",
        description: "a busybox base built with the DSL from the host's busybox-static",
        declare: busybox,
    },
    Example {
        name: "files",
        description: "file steps on the busybox base: modes, owners, symlinks, a removed file",
        declare: files,
    },
    Example {
        name: "busybox-tools",
        description: "RUN steps on the busybox base: a user, a generated index, a tool script (needs root)",
        declare: busybox_tools,
    },
    Example {
        name: "multi-stage",
        description: "a build stage on busybox and a slim final image that takes only its output (copy_from)",
        declare: multi_stage,
    },
];

/// Every example, registered for `layerwright::cli` (`cargo xtask build-image NAME`, `list`,
/// `inspect`): each declaration is a closure over `environment`.
pub fn images(environment: &ExampleEnvironment) -> Images {
    EXAMPLES.iter().fold(Images::new(), |images, example| {
        let environment = environment.clone();
        let declare = example.declare;
        images.add_described(example.name, example.description, move || declare(&environment))
    })
}

pub fn find(name: &str) -> Option<&'static Example> {
    EXAMPLES.iter().find(|example| example.name == name)
}

/// Makes apt keep what it downloads, as BuildKit's documentation of cache mounts does: a Debian
/// image from Docker's official ones deletes `.deb` files after every install
/// (`/etc/apt/apt.conf.d/docker-clean`), and the `apt` front end keeps none by default.
pub const APT_KEEP_DOWNLOADS: &str = "rm -f /etc/apt/apt.conf.d/docker-clean && echo \
     'Binary::apt::APT::Keep-Downloaded-Packages \"true\";' > /etc/apt/apt.conf.d/keep-cache";

/// `apt-get update && apt-get install` of `packages` (space-separated) on `debian`, with
/// `/var/cache/apt` (the downloaded packages) and `/var/lib/apt/lists` (the package lists) as
/// cache mounts, `Locked` as apt takes its own locks there, in a networked RUN step: when the
/// step runs again (its package list changed), apt finds the lists and the packages it
/// fetched before, and neither ever enters a layer. The equivalent of
/// `RUN --mount=type=cache,target=/var/cache/apt,sharing=locked
/// --mount=type=cache,target=/var/lib/apt/lists,sharing=locked apt-get update && apt-get install`.
pub fn apt_install_with_cache_mounts(debian: &Image, packages: &str) -> Image {
    let install = format!("apt-get update -q && apt-get install -y -q --no-install-recommends {packages}");
    debian.run(APT_KEEP_DOWNLOADS).run(
        layerwright::Run::shell(install)
            .network(true)
            .mount(layerwright::Mount::cache("/var/cache/apt").sharing(layerwright::Sharing::Locked))
            .mount(layerwright::Mount::cache("/var/lib/apt/lists").sharing(layerwright::Sharing::Locked)),
    )
}

/// Before `cargo build` on a target directory kept in a cache mount: touches the sources whose
/// content changed since the last build there. Files copied into an image carry the
/// reproducible mtime (`SOURCE_DATE_EPOCH`, else 0), so an edited file has the mtime of the
/// one it replaces and cargo's mtime-based freshness check would call the old build fresh;
/// the content digests of the last build are kept in the target directory.
pub const TOUCH_CHANGED_SOURCES: &str = "find . -path ./target -prune -o -type f -print | sort | xargs sha256sum \
     > /tmp/sources && touch target/.sources && comm -13 target/.sources /tmp/sources | cut -c67- | xargs -r touch";

/// `cargo build --offline --release` of the workspace in `context` (its `.` copied to `/src`)
/// on `rust` (an image with cargo), with cargo's registry and the target directory as cache
/// mounts: a build after a change recompiles only what changed, and neither the registry nor
/// the target directory enters a layer; the binary `bin` is copied out of the target directory
/// to `/usr/local/bin` in the same step (the mount is gone after it). The equivalent of
/// `RUN --mount=type=cache,target=/usr/local/cargo/registry --mount=type=cache,target=/src/target
/// cargo build --release && cp target/release/BIN /usr/local/bin/`, with
/// [`TOUCH_CHANGED_SOURCES`] first.
pub fn cargo_build_with_cache_mounts(rust: &Image, context: &Context, bin: &str) -> Image {
    let build = format!(
        "{TOUCH_CHANGED_SOURCES} && cargo build --offline --release && cp /tmp/sources target/.sources && cp \
         target/release/{bin} /usr/local/bin/{bin}"
    );
    rust.copy(context, ".", "/src").run(
        layerwright::Run::shell(build)
            .workdir("/src")
            .env("CARGO_HOME", "/usr/local/cargo")
            .mount(layerwright::Mount::cache("/usr/local/cargo/registry").id("cargo-registry"))
            .mount(layerwright::Mount::cache("/src/target").id(format!("cargo-target-{bin}"))),
    )
}

/// FROM scratch: the `hello` binary of `examples/hello-bin`, statically linked, as the
/// entrypoint.
pub fn hello(environment: &ExampleEnvironment) -> Result<Image, ExampleError> {
    let binary_dir = hello_binary_dir("hello", environment)?;
    Ok(Image::scratch()
        .copy(&binary_dir, "hello", "/usr/local/bin/hello")
        .label("org.opencontainers.image.title", "hello")
        .entrypoint(["/usr/local/bin/hello"]))
}

/// A minimal shell base: busybox and a symlink per applet in `/bin`, `/etc/passwd`, `/tmp`.
pub fn busybox(environment: &ExampleEnvironment) -> Result<Image, ExampleError> {
    let binary = host::find_busybox().map_err(|source| ExampleError::Host { example: "busybox", source })?;
    let links_dir = host::write_busybox_links_context(&binary, &environment.work_dir)
        .map_err(|source| ExampleError::Host { example: "busybox", source })?;
    let binary_dir = context_of("busybox", binary.parent().expect("a binary lives in a directory"))?;
    let links = context_of("busybox", &links_dir)?;
    Ok(Image::scratch()
        .copy_with(
            &binary_dir,
            "busybox",
            "/bin/busybox",
            layerwright::CopyOptions { file: FileOptions::mode(0o755), ..Default::default() },
        )
        .copy(&links, "bin", "/bin")
        .write_file(
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )
        .write_file("/etc/group", "root:x:0:\nnogroup:x:65534:\n")
        .mkdir_with("/tmp", FileOptions::mode(0o1777))
        .mkdir_with("/root", FileOptions::mode(0o700))
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .cmd(["/bin/sh"]))
}

/// File steps on the busybox base, with the modes and owners that are easy to get wrong.
pub fn files(environment: &ExampleEnvironment) -> Result<Image, ExampleError> {
    Ok(busybox(environment)?
        .mkdir_with("/srv/data", FileOptions::mode(0o750).with_owner(1000, 1000))
        .write_file_with("/srv/data/secret", "s3cret\n", FileOptions::mode(0o600).with_owner(1000, 1000))
        .write_file_with("/usr/local/bin/setuid-tool", "#!/bin/sh\nid\n", FileOptions::mode(0o4755))
        .write_file("/tmp/scratch", "to be removed\n")
        .symlink("/srv/current", "data")
        .remove("/tmp/scratch")
        .workdir("/srv")
        .user("1000:1000")
        .cmd(["/bin/sh", "-c", "ls -ln /srv/data; test ! -e /tmp/scratch && echo removed"]))
}

/// Multi-stage: a build stage on the busybox base assembles the application under `/out` (the
/// static `hello` binary, its config, a state directory owned by `nobody`) next to files only
/// the build needs; the final image starts from scratch and takes only `/out` and the account
/// it runs as, through `copy_from`. Nothing of busybox reaches it.
pub fn multi_stage(environment: &ExampleEnvironment) -> Result<Image, ExampleError> {
    let binary_dir = hello_binary_dir("multi-stage", environment)?;
    let build = busybox(environment)?
        .copy_with(
            &binary_dir,
            "hello",
            "/out/usr/local/bin/hello",
            layerwright::CopyOptions { file: FileOptions::mode(0o755), ..Default::default() },
        )
        .write_file("/out/etc/hello.conf", "greeting=hello\n")
        .mkdir_with("/out/var/lib/hello", FileOptions::mode(0o750).with_owner(65534, 65534))
        .write_file("/build/cache/notes.txt", "build-only files stay in the build stage\n");
    Ok(Image::scratch()
        .copy_from(&build, "/out", "/")
        .copy_from(&build, "/etc/passwd", "/etc/passwd")
        .copy_from(&build, "/etc/group", "/etc/group")
        .user("65534:65534")
        .label("org.opencontainers.image.title", "multi-stage")
        .entrypoint(["/usr/local/bin/hello"]))
}

/// RUN steps on the busybox base, the way a real image is put together: add a user, generate
/// files with the image's own tools, delete what the build needed. Needs root (or user
/// namespaces) to build.
pub fn busybox_tools(environment: &ExampleEnvironment) -> Result<Image, ExampleError> {
    Ok(busybox(environment)?
        .run("echo 'app:x:1000:1000:app:/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1000:' >> /etc/group && mkdir -p /home/app")
        .run("mkdir -p /srv/www && for page in index about contact; do echo \"<h1>$page</h1>\" > /srv/www/$page.html; done")
        .run("cd /srv/www && ls *.html | sort > MANIFEST && rm contact.html")
        .write_file_with("/usr/local/bin/serve", "#!/bin/sh\nexec httpd -f -p 8080 -h /srv/www\n", FileOptions::mode(0o755))
        .run(layerwright::Run::shell("chown -R app:app /srv/www && touch /home/app/.ready").env("LANG", "C"))
        .user("app")
        .workdir("/srv/www")
        .expose(8080)
        .cmd(["/usr/local/bin/serve"]))
}

/// The directory holding the static `hello` binary of `examples/hello-bin`, as a context.
fn hello_binary_dir(example: &'static str, environment: &ExampleEnvironment) -> Result<Context, ExampleError> {
    let binary = host::build_static_rust_binary(&StaticBinaryOptions {
        workspace: environment.workspace.clone(),
        package: "hello-bin".into(),
        binary: "hello".into(),
        target_dir: environment.work_dir.join("static-target"),
    })
    .map_err(|source| ExampleError::Host { example, source })?;
    context_of(example, binary.parent().expect("a binary lives in a directory"))
}

fn context_of(example: &'static str, dir: &Path) -> Result<Context, ExampleError> {
    Context::dir(dir).map_err(|source| ExampleError::Context { example, source })
}
