//! Building an image from a crate's `build.rs`, so that the crate's code and tests can name it.
//!
//! [`build`] builds the image, writes it under `OUT_DIR/layerwright/<name>` (an OCI layout by
//! default), and tells cargo:
//! - `cargo::rerun-if-changed=PATH` for exactly the paths the image reads: every file and
//!   directory its `copy` steps select from their contexts, each context's `.dockerignore`, and
//!   base archives. (Cargo scans a listed directory recursively, so a change to a file that the
//!   `.dockerignore` excludes below a copied directory also re-runs the script; that is cargo's
//!   granularity, not a changed image.) `cargo::rerun-if-env-changed` for `SOURCE_DATE_EPOCH` and
//!   `LAYERWRIGHT_CACHE_DIR`. Printing these means cargo re-runs the script only when one of them
//!   changes (or the script itself is rebuilt), not on every change in the package.
//! - `cargo::rustc-env=LAYERWRIGHT_IMAGE_<NAME>_DIGEST=sha256:…` and `…_PATH=<output>`, where
//!   `<NAME>` is the image name upper-cased with every other character than `A-Z0-9` as `_`, so the
//!   crate can `env!("LAYERWRIGHT_IMAGE_APP_DIGEST")`.
//!
//! The cache is shared: every build script of a workspace uses `<target dir>/layerwright` (the
//! cache `cargo xtask build-image` uses too), found from `OUT_DIR`, or `LAYERWRIGHT_CACHE_DIR`.
//! Cargo runs build scripts in parallel; they share layers through the cache, and concurrent
//! builds on one cache are safe (the store's lock and atomic renames).
//!
//! RUN steps: an image whose RUN steps are all in the cache builds for any user, running
//! nothing. A RUN step that misses runs as it does anywhere else: as root, or as a plain user
//! where the kernel allows user namespaces. Where its sandbox cannot start, the error
//! ([`BuildRsError::RunNeedsPrivilege`]) names the step and the cache directory: build the image
//! once where RUN steps work, on that cache, and the build script reuses the result. Every other
//! failure is reported as a `cargo::error` too, and returned.
//!
//! Keep build-time dependencies light: depend on layerwright with `default-features = false`
//! in `[build-dependencies]` (no registry client, so no tokio or TLS in the build script), and
//! optimise the compressors in build scripts, which debug builds leave unoptimised:
//!
//! ```toml
//! [build-dependencies]
//! layerwright = { version = "0.1", default-features = false }
//!
//! [profile.dev.build-override]
//! opt-level = 2
//! ```
//!
//! What it deliberately is not: a way to pull base images (without the `registry` feature a
//! pull is an error; a moved tag could not be noticed by cargo anyway) or to push.
//!
//! ```no_run
//! // build.rs
//! use layerwright::{Context, Image, build_rs};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let site = Context::dir("site")?;
//!     let image = Image::scratch().copy(&site, ".", "/srv/www");
//!     build_rs::build(&image, build_rs::BuildRsOptions::new("site"))?;
//!     Ok(())
//! }
//! ```

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use layerwright_cache::StatCache;
use layerwright_dsl::{Image, Step};
use thiserror::Error;

use crate::build::{BuildError, Builder, BuilderOptions, BuiltImage};
use crate::context::{self, ContextError, StatLookup};
use crate::layer::Compression;
use crate::output::ExportError;
use crate::run::RunError;
use crate::solve::StepError;

/// Why [`build`] could not build and write the image.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BuildRsError {
    /// `OUT_DIR` is not set: [`build`] was called outside a build script.
    #[error("OUT_DIR is not set: layerwright::build_rs::build runs in a build script, which cargo gives an OUT_DIR")]
    NoOutDir,
    /// The image name is empty or holds something other than ASCII letters, digits, `-` and `_`.
    #[error("invalid image name {name:?}: use letters, digits, '-' and '_'")]
    InvalidName {
        /// The name as given.
        name: String,
    },
    /// A RUN step missed the cache and its sandbox could not start here (no root, and no user
    /// namespaces for this user).
    #[error(
        "image `{name}`: step `{step}` runs a command, and its sandbox cannot start in this build script: {source}\n\
         RUN steps need root, or a kernel that lets this user create user namespaces. A step in the cache runs \
         nothing: build this image once where RUN steps work on the same cache directory ({}; \
         LAYERWRIGHT_CACHE_DIR sets it), and this build script reuses the result.",
        cache_dir.display()
    )]
    RunNeedsPrivilege {
        /// The image's name, as [`BuildRsOptions::name`] gives it.
        name: String,
        /// The label of the RUN step.
        step: String,
        /// The cache directory the build script used.
        cache_dir: PathBuf,
        /// Why the sandbox could not start.
        source: Box<crate::RunError>,
    },
    /// A `copy` step's context could not be opened, or its source selected, while listing the
    /// paths for `cargo::rerun-if-changed`.
    #[error("image `{name}`: step `{step}`: {source}")]
    Context {
        /// The image's name, as [`BuildRsOptions::name`] gives it.
        name: String,
        /// The label of the `copy` step.
        step: String,
        /// What went wrong with the context.
        source: Box<ContextError>,
    },
    /// The builder could not be created on the cache directory, or the build failed.
    #[error("image `{name}`: {source}")]
    Build {
        /// The image's name, as [`BuildRsOptions::name`] gives it.
        name: String,
        /// Why the build failed.
        source: Box<BuildError>,
    },
    /// Writing the image under `OUT_DIR` failed.
    #[error("image `{name}`: {source}")]
    Export {
        /// The image's name, as [`BuildRsOptions::name`] gives it.
        name: String,
        /// Why the export failed.
        source: Box<ExportError>,
    },
    /// The directory `OUT_DIR/layerwright` could not be created.
    #[error("image `{name}`: cannot create {path}: {source}")]
    CreateDir {
        /// The image's name, as [`BuildRsOptions::name`] gives it.
        name: String,
        /// The directory.
        path: PathBuf,
        /// The IO error from the operating system.
        source: std::io::Error,
    },
}

/// The format of the image written under `OUT_DIR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// A directory `OUT_DIR/layerwright/<name>` (`index.json`, `blobs/sha256`).
    #[default]
    OciLayout,
    /// `OUT_DIR/layerwright/<name>.tar`.
    OciArchive,
    /// `OUT_DIR/layerwright/<name>.tar`, for `docker load -i`.
    DockerArchive,
}

/// How to build and write the image.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BuildRsOptions {
    /// Names the output and the `LAYERWRIGHT_IMAGE_<NAME>_*` variables.
    pub name: String,
    /// The tag written into the output; default `<name>:latest`.
    pub tag: Option<String>,
    /// The format of the output (an OCI layout by default).
    pub format: OutputFormat,
    /// The compression of the layers the build writes (gzip by default).
    pub compression: Compression,
    /// Default: `LAYERWRIGHT_CACHE_DIR`, else the target directory's `layerwright`.
    pub cache_dir: Option<PathBuf>,
    /// Default: `SOURCE_DATE_EPOCH`, else 0.
    pub source_date_epoch: Option<u64>,
}

impl BuildRsOptions {
    /// The options of the image `name`, everything else at its default.
    pub fn new(name: impl Into<String>) -> BuildRsOptions {
        BuildRsOptions {
            name: name.into(),
            tag: None,
            format: OutputFormat::default(),
            compression: Compression::default(),
            cache_dir: None,
            source_date_epoch: None,
        }
    }
}

/// What [`build`] wrote.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BuildRsOutput {
    /// The image's manifest digest (`sha256:…`).
    pub digest: String,
    /// The layout directory or archive file.
    pub path: PathBuf,
    /// The paths printed as `cargo::rerun-if-changed`, sorted.
    pub rerun_if_changed: Vec<PathBuf>,
    /// The built image, for further outputs.
    pub built: BuiltImage,
}

/// Builds `image` in a build script; see the module docs. Errors are also printed as
/// `cargo::error` lines, so a build script may simply return them.
pub fn build(image: &Image, options: BuildRsOptions) -> Result<BuildRsOutput, BuildRsError> {
    let mut stdout = std::io::stdout().lock();
    let out_dir = std::env::var_os("OUT_DIR").map(PathBuf::from);
    let cache_dir = options.cache_dir.clone().or_else(|| std::env::var_os("LAYERWRIGHT_CACHE_DIR").map(PathBuf::from));
    let result = match out_dir {
        Some(out_dir) => build_into(image, &options, &out_dir, cache_dir, &mut stdout),
        None => Err(BuildRsError::NoOutDir),
    };
    if let Err(error) = &result {
        // One directive per line: cargo ends a directive at a newline.
        for line in error.to_string().lines() {
            let _ = writeln!(stdout, "cargo::error={line}");
        }
    }
    result
}

/// [`build`] with its environment given: the cargo directives go to `directives`.
pub(crate) fn build_into(
    image: &Image,
    options: &BuildRsOptions,
    out_dir: &Path,
    cache_dir: Option<PathBuf>,
    directives: &mut dyn Write,
) -> Result<BuildRsOutput, BuildRsError> {
    let name = options.name.clone();
    let variable = variable_name(&name)?;
    let nodes = reachable_nodes(image);

    let cache_dir = cache_dir.unwrap_or_else(|| shared_cache_dir(out_dir));
    let mut builder_options = BuilderOptions::default().compression(options.compression);
    builder_options.source_date_epoch = options.source_date_epoch;
    let builder = Builder::with_options(&cache_dir, builder_options)
        .map_err(|source| BuildRsError::Build { name: name.clone(), source: Box::new(source) })?;
    let rerun_if_changed = read_paths(&nodes, builder.store(), &name)?;
    let built = builder.build(image).map_err(|source| build_error(&name, &cache_dir, source))?;

    let output_dir = out_dir.join("layerwright");
    std::fs::create_dir_all(&output_dir).map_err(|source| BuildRsError::CreateDir {
        name: name.clone(),
        path: output_dir.clone(),
        source,
    })?;
    let tag = options.tag.clone().unwrap_or_else(|| format!("{}:latest", name.to_ascii_lowercase()));
    let export_error = |source| BuildRsError::Export { name: name.clone(), source: Box::new(source) };
    let path = match options.format {
        OutputFormat::OciLayout => {
            let path = output_dir.join(&name);
            built.write_oci_layout(&path, &tag).map_err(export_error)?;
            path
        }
        OutputFormat::OciArchive => {
            let path = output_dir.join(format!("{name}.tar"));
            built.write_oci_archive(&path, &tag).map_err(export_error)?;
            path
        }
        OutputFormat::DockerArchive => {
            let path = output_dir.join(format!("{name}.tar"));
            built.write_docker_archive(&path, &tag).map_err(export_error)?;
            path
        }
    };

    let mut lines = Vec::new();
    for read in &rerun_if_changed {
        lines.push(format!("cargo::rerun-if-changed={}", read.display()));
    }
    lines.push("cargo::rerun-if-env-changed=SOURCE_DATE_EPOCH".to_owned());
    lines.push("cargo::rerun-if-env-changed=LAYERWRIGHT_CACHE_DIR".to_owned());
    lines.push(format!("cargo::rustc-env=LAYERWRIGHT_IMAGE_{variable}_DIGEST={}", built.manifest_digest()));
    lines.push(format!("cargo::rustc-env=LAYERWRIGHT_IMAGE_{variable}_PATH={}", path.display()));
    for line in lines {
        // A closed stdout is cargo's business; the image is written either way.
        let _ = writeln!(directives, "{line}");
    }
    Ok(BuildRsOutput { digest: built.manifest_digest(), path, rerun_if_changed, built })
}

/// The error of a failed build: a RUN step whose sandbox could not start says what to do.
fn build_error(name: &str, cache_dir: &Path, error: BuildError) -> BuildRsError {
    match error {
        BuildError::Step { step, source }
            if matches!(*source, StepError::Run(RunError::Sandbox { .. } | RunError::Overlay { .. })) =>
        {
            let StepError::Run(run) = *source else { unreachable!("matched above") };
            BuildRsError::RunNeedsPrivilege {
                name: name.to_owned(),
                step,
                cache_dir: cache_dir.to_owned(),
                source: Box::new(run),
            }
        }
        error => BuildRsError::Build { name: name.to_owned(), source: Box::new(error) },
    }
}

/// `my-app` → `MY_APP`; refuses names that are empty or hold anything but letters, digits,
/// `-` and `_` (they also name a file under `OUT_DIR`).
fn variable_name(name: &str) -> Result<String, BuildRsError> {
    let valid =
        !name.is_empty() && name.chars().all(|character| character.is_ascii_alphanumeric() || "-_".contains(character));
    if !valid {
        return Err(BuildRsError::InvalidName { name: name.to_owned() });
    }
    Ok(name
        .chars()
        .map(|character| if character.is_ascii_alphanumeric() { character.to_ascii_uppercase() } else { '_' })
        .collect())
}

/// Every node the image depends on (parents and `copy_from` sources), each once.
fn reachable_nodes(image: &Image) -> Vec<Image> {
    let mut seen = HashSet::new();
    let mut nodes = Vec::new();
    let mut pending = vec![image.clone()];
    while let Some(node) = pending.pop() {
        if !seen.insert(node.node_id()) {
            continue;
        }
        pending.extend(node.inputs());
        nodes.push(node);
    }
    nodes
}

/// The host paths the image reads: what each `copy` selects (as the build selects it, through
/// the cache's stat cache, so unchanged files are not re-hashed), each context's
/// `.dockerignore`, and base archives.
fn read_paths(nodes: &[Image], store: &layerwright_cache::Store, name: &str) -> Result<Vec<PathBuf>, BuildRsError> {
    let stat_cache = StatCache::load(store);
    let mut paths = BTreeSet::new();
    for node in nodes {
        match node.step() {
            Step::Copy(copy) => {
                let context_error = |source| BuildRsError::Context {
                    name: name.to_owned(),
                    step: node.step().label(),
                    source: Box::new(source),
                };
                let opened = context::open_context(&copy.context).map_err(context_error)?;
                let selection =
                    context::select(&opened, &copy.source, &mut StatLookup::new(&stat_cache)).map_err(context_error)?;
                let source = lexically_normal(Path::new(&copy.source));
                for file in &selection.files {
                    paths.insert(selection.root.join(&source).join(&file.relative));
                }
                let ignore_file = selection.root.join(".dockerignore");
                if ignore_file.is_file() {
                    paths.insert(ignore_file);
                }
            }
            Step::FromArchive { path } => {
                paths.insert(std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()));
            }
            _ => {}
        }
    }
    // `root.join("")` ends in a `/`; cargo does not mind, people reading the list might.
    Ok(paths.into_iter().map(|path| lexically_normal(&path)).collect())
}

/// `a/./b/` → `a/b` (no `..` handling: context sources cannot hold `..`).
fn lexically_normal(path: &Path) -> PathBuf {
    path.components().filter(|component| !matches!(component, Component::CurDir)).collect()
}

/// The cache every build script of a workspace shares: `<target dir>/layerwright`.
///
/// `OUT_DIR` is `<target>/[<triple>/]<profile>/build/<package>-<hash>/out`; the target directory
/// is the nearest ancestor of the profile directory holding cargo's `CACHEDIR.TAG`, else the
/// profile directory's parent.
pub(crate) fn shared_cache_dir(out_dir: &Path) -> PathBuf {
    let build_dir = out_dir.ancestors().find(|ancestor| ancestor.file_name().is_some_and(|name| name == "build"));
    let Some(profile_dir) = build_dir.and_then(Path::parent) else {
        return out_dir.join("layerwright-cache");
    };
    let target_dir = profile_dir
        .ancestors()
        .skip(1)
        .take(2)
        .find(|candidate| candidate.join("CACHEDIR.TAG").is_file())
        .or_else(|| profile_dir.parent())
        .unwrap_or(profile_dir);
    target_dir.join("layerwright")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Context;

    #[test]
    fn names_become_variables_and_odd_names_are_refused() {
        assert_eq!(variable_name("my-app_2").unwrap(), "MY_APP_2");
        for bad in ["", "a b", "../x", "é"] {
            assert!(variable_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_shared_cache_is_in_the_target_dir() {
        let target = tempfile::tempdir().unwrap();
        std::fs::write(target.path().join("CACHEDIR.TAG"), "Signature: 8a477f597d28d172789f06886806bc55").unwrap();
        let out = target.path().join("debug/build/app-0123/out");
        assert_eq!(shared_cache_dir(&out), target.path().join("layerwright"));
        let cross = target.path().join("x86_64-unknown-linux-gnu/release/build/app-0123/out");
        assert_eq!(shared_cache_dir(&cross), target.path().join("layerwright"));
        // Without the tag file: the profile directory's parent.
        let untagged = tempfile::tempdir().unwrap();
        let out = untagged.path().join("debug/build/app-0123/out");
        assert_eq!(shared_cache_dir(&out), untagged.path().join("layerwright"));
    }

    #[test]
    fn directives_name_what_the_image_reads_and_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let context_root = dir.path().join("context");
        for (path, content) in [("site/index.html", "<h1>hi</h1>"), ("site/skip.tmp", "x"), ("other", "o")] {
            let path = context_root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        std::fs::write(context_root.join(".dockerignore"), "**/*.tmp\n").unwrap();
        let context = Context::dir(&context_root).unwrap();
        let image = Image::scratch().copy(&context, "./site/", "/srv").write_file("/etc/motd", "hi\n");
        let out_dir = dir.path().join("out");
        let mut directives = Vec::new();
        let options = BuildRsOptions::new("web-site");
        let output = build_into(&image, &options, &out_dir, Some(dir.path().join("cache")), &mut directives).unwrap();
        let directives = String::from_utf8(directives).unwrap();
        let root = std::fs::canonicalize(&context_root).unwrap();
        let expected_reads = [root.join(".dockerignore"), root.join("site"), root.join("site/index.html")];
        assert_eq!(output.rerun_if_changed, expected_reads);
        let expected = format!(
            "cargo::rerun-if-changed={}\ncargo::rerun-if-changed={}\ncargo::rerun-if-changed={}\n\
             cargo::rerun-if-env-changed=SOURCE_DATE_EPOCH\ncargo::rerun-if-env-changed=LAYERWRIGHT_CACHE_DIR\n\
             cargo::rustc-env=LAYERWRIGHT_IMAGE_WEB_SITE_DIGEST={}\ncargo::rustc-env=LAYERWRIGHT_IMAGE_WEB_SITE_PATH={}\n",
            expected_reads[0].display(),
            expected_reads[1].display(),
            expected_reads[2].display(),
            output.digest,
            out_dir.join("layerwright/web-site").display()
        );
        assert_eq!(directives, expected);
        let index = std::fs::read_to_string(out_dir.join("layerwright/web-site/index.json")).unwrap();
        assert!(index.contains(&output.digest) && index.contains("web-site:latest"), "{index}");
    }

    #[test]
    fn a_sandbox_that_cannot_start_names_the_step_and_the_cache_not_this_repository() {
        let source = layerwright_sandbox::SandboxError::Clone {
            flags: "CLONE_NEWUSER | CLONE_NEWNS".into(),
            source: std::io::Error::from_raw_os_error(1),
            hint: None,
        };
        let run = RunError::Sandbox { step: "RUN make install".into(), command: "make install".into(), source };
        let error = BuildError::Step { step: "RUN make install".into(), source: Box::new(StepError::Run(run)) };
        let error = build_error("tools", Path::new("/cache/dir"), error);
        assert!(matches!(error, BuildRsError::RunNeedsPrivilege { .. }), "{error:?}");
        let message = error.to_string();
        for expected in
            ["image `tools`: step `RUN make install`", "user namespaces", "/cache/dir", "LAYERWRIGHT_CACHE_DIR"]
        {
            assert!(message.contains(expected), "{expected}: {message}");
        }
        assert!(!message.contains("cargo xtask"), "{message}");
        // Any other failure stays a build error.
        let other = BuildError::Workers("no threads".into());
        assert!(matches!(build_error("tools", Path::new("/c"), other), BuildRsError::Build { .. }));
    }
}
