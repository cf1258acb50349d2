//! `build-image`: output specs, the progress display and the closing summary.
//!
//! It draws progress with indicatif on a terminal (one line per step with its state and time)
//! and prints plain lines otherwise, so CI logs stay readable. It does not parse arguments
//! (`args` does) nor know which images exist (`Images`, in the parent module, does).

use std::fmt;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::CliError;
use crate::{
    Builder, BuilderOptions, BuiltImage, BuiltIndex, Compression, Image, IndexOptions, Platform, ProgressEvent,
};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Where a built image goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSpec {
    /// An OCI image layout directory (`oci:DIR`).
    OciLayout(PathBuf),
    /// An OCI archive file (`oci-archive:FILE`).
    OciArchive(PathBuf),
    /// A docker-archive file for `docker load -i` (`docker-archive:FILE`).
    DockerArchive(PathBuf),
}

impl FromStr for OutputSpec {
    type Err = CliError;

    fn from_str(spec: &str) -> Result<OutputSpec, CliError> {
        let invalid = || CliError::InvalidOutput { spec: spec.to_owned() };
        let (kind, path) = spec.split_once(':').ok_or_else(invalid)?;
        if path.is_empty() {
            return Err(invalid());
        }
        match kind {
            "oci" => Ok(OutputSpec::OciLayout(path.into())),
            "oci-archive" => Ok(OutputSpec::OciArchive(path.into())),
            "docker-archive" => Ok(OutputSpec::DockerArchive(path.into())),
            _ => Err(invalid()),
        }
    }
}

impl fmt::Display for OutputSpec {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutputSpec::OciLayout(path) => write!(formatter, "oci:{}", path.display()),
            OutputSpec::OciArchive(path) => write!(formatter, "oci-archive:{}", path.display()),
            OutputSpec::DockerArchive(path) => write!(formatter, "docker-archive:{}", path.display()),
        }
    }
}

/// The layer compression named `gzip`, `zstd` or `none`.
pub fn parse_compression(name: &str) -> Result<Compression, CliError> {
    match name {
        "gzip" => Ok(Compression::Gzip),
        "zstd" => Ok(Compression::Zstd),
        "none" => Ok(Compression::None),
        _ => Err(CliError::InvalidCompression { name: name.to_owned() }),
    }
}

/// What `build_image` does.
#[derive(Debug, Clone)]
pub struct BuildCommand {
    /// The builder's cache directory.
    pub cache_dir: PathBuf,
    /// Where to write the built image (none: the image is only built, and pushed if asked).
    pub outputs: Vec<OutputSpec>,
    /// The tag the outputs name the image by (`app:latest`).
    pub tag: String,
    /// The compression of the layers the build writes.
    pub compression: Compression,
    /// A registry reference to push the image to (`registry/repository:tag`).
    pub push: Option<String>,
    /// Plain HTTP for a push to a registry that is not on this machine.
    pub insecure: bool,
    /// Remote caches to take steps from, and the one to export to (see
    /// [`crate::Builder::remote_cache`]).
    pub cache_from: Vec<String>,
    /// The remote cache to export the build's steps to, if any.
    pub cache_to: Option<String>,
    /// The REAPI server used as a shared step cache, if any (see [`crate::Builder::reapi`]).
    pub reapi: Option<crate::ReapiEndpoint>,
    /// Whether RUN steps run on the REAPI server's workers (see [`crate::Builder::reapi_execute`]).
    pub reapi_execute: bool,
    /// The secrets RUN steps may mount, by id (`--secret`).
    pub secrets: Vec<(String, crate::SecretSource)>,
    /// The SSH agents RUN steps may mount, by id (`--ssh`).
    pub ssh_agents: Vec<(String, crate::SshSource)>,
    /// Load the image into the local Docker engine.
    pub load: bool,
    /// The platforms to build for (none: this host's, a plain image).
    pub platforms: Vec<Platform>,
    /// Whether the build attaches attestations (provenance and SBOM).
    pub attestations: Attestations,
}

/// Whether a build attaches attestations: an SLSA provenance statement and an SPDX SBOM per
/// image, in an image index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Attestations {
    /// A build for several platforms gets them; a single image stays a plain manifest.
    #[default]
    Default,
    /// Every build gets them: a single image becomes an index of itself and its attestations.
    Always,
    /// No build gets them.
    Never,
}

/// What a build did, printed at the end.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BuildSummary {
    /// The tag the outputs name the image by.
    pub tag: String,
    /// The image's manifest digest (`sha256:…`).
    pub digest: String,
    /// The bytes of the image's layer blobs, together.
    pub size: u64,
    /// Steps whose result came from a cache, local or remote.
    pub steps_cached: usize,
    /// Steps that were executed.
    pub steps_built: usize,
    /// How long the build, outputs and push took.
    pub elapsed: Duration,
    /// The outputs written.
    pub outputs: Vec<OutputSpec>,
    /// What the push did, as a line (`pushed REF@DIGEST: …`).
    pub pushed: Option<String>,
    /// What the remote caches did, as a line.
    pub remote_cache: Option<String>,
    /// What the load into the Docker engine sent, as a line.
    pub loaded: Option<String>,
}

impl fmt::Display for BuildSummary {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(formatter, "image   {}", self.tag)?;
        writeln!(formatter, "digest  {}", self.digest)?;
        writeln!(formatter, "size    {} bytes in layers", self.size)?;
        writeln!(formatter, "steps   {} cached, {} built", self.steps_cached, self.steps_built)?;
        for output in &self.outputs {
            writeln!(formatter, "output  {output}")?;
        }
        if let Some(pushed) = &self.pushed {
            writeln!(formatter, "push    {pushed}")?;
        }
        if let Some(remote_cache) = &self.remote_cache {
            writeln!(formatter, "cache   {remote_cache}")?;
        }
        if let Some(loaded) = &self.loaded {
            writeln!(formatter, "load    {loaded}")?;
        }
        write!(formatter, "time    {:.2?}", self.elapsed)
    }
}

/// Builds `image` with progress, writes every output (creating their parent directories),
/// pushes and loads it if asked, and returns the summary.
pub fn build_image(image: &Image, command: &BuildCommand) -> Result<BuildSummary, CliError> {
    let builder = builder_with_progress(command)?;
    build_and_deliver(&builder, image, command)
}

/// [`build_image`] on a builder that lives on (`--watch` rebuilds through one).
pub(crate) fn build_and_deliver(
    builder: &Builder,
    image: &Image,
    command: &BuildCommand,
) -> Result<BuildSummary, CliError> {
    let started = Instant::now();
    let attested = command.attestations == Attestations::Always;
    match command.platforms.as_slice() {
        [] if !attested => deliver(builder.build(image)?, command, started),
        [platform] if !attested => deliver(builder.build_for(image, platform)?, command, started),
        platforms => {
            let host = [Platform::host()];
            let platforms = if platforms.is_empty() { &host[..] } else { platforms };
            let pairs: Vec<(Platform, &Image)> = platforms.iter().map(|platform| (platform.clone(), image)).collect();
            let options = match command.attestations {
                Attestations::Never => IndexOptions::default().without_attestations(),
                Attestations::Default | Attestations::Always => IndexOptions::default(),
            };
            deliver_index(builder.build_index_with(&pairs, &options)?, command, started)
        }
    }
}

/// Writes, pushes and loads one built image.
pub(crate) fn deliver(built: BuiltImage, command: &BuildCommand, started: Instant) -> Result<BuildSummary, CliError> {
    for output in &command.outputs {
        create_parent(output)?;
        match output {
            OutputSpec::OciLayout(dir) => built.write_oci_layout(dir, &command.tag)?,
            OutputSpec::OciArchive(file) => built.write_oci_archive(file, &command.tag)?,
            OutputSpec::DockerArchive(file) => built.write_docker_archive(file, &command.tag)?,
        }
    }
    let pushed = match &command.push {
        Some(reference) => Some(push(&built, reference, command.insecure)?),
        None => None,
    };
    let loaded = if command.load { Some(describe_load(&built.load(&command.tag)?)) } else { None };
    let steps_cached = built.steps().iter().filter(|step| step.cached).count();
    Ok(BuildSummary {
        tag: command.tag.clone(),
        digest: built.manifest_digest(),
        size: built.size(),
        steps_cached,
        steps_built: built.steps().len() - steps_cached,
        elapsed: started.elapsed(),
        outputs: command.outputs.clone(),
        pushed,
        remote_cache: built.remote_cache().map(|report| describe_remote_cache(report, command)),
        loaded,
    })
}

/// Writes, pushes and loads an image index (a docker-archive cannot hold one).
fn deliver_index(index: BuiltIndex, command: &BuildCommand, started: Instant) -> Result<BuildSummary, CliError> {
    for output in &command.outputs {
        create_parent(output)?;
        match output {
            OutputSpec::OciLayout(dir) => index.write_oci_layout(dir, &command.tag)?,
            OutputSpec::OciArchive(file) => index.write_oci_archive(file, &command.tag)?,
            OutputSpec::DockerArchive(file) => {
                return Err(CliError::IndexDockerArchive { path: file.clone() });
            }
        }
    }
    let pushed = match &command.push {
        Some(reference) => Some(push_index(&index, reference, command.insecure)?),
        None => None,
    };
    let loaded = if command.load {
        let host = index.images().iter().find(|(platform, _)| platform.is_native());
        let Some((_, image)) = host else { return Err(CliError::NoHostPlatform) };
        Some(describe_load(&image.load(&command.tag)?))
    } else {
        None
    };
    let steps = index.images().iter().flat_map(|(_, image)| image.steps());
    let (cached, total) = steps.fold((0, 0), |(cached, total), step| (cached + usize::from(step.cached), total + 1));
    Ok(BuildSummary {
        tag: command.tag.clone(),
        digest: index.manifest_digest(),
        size: index.images().iter().map(|(_, image)| image.size()).sum(),
        steps_cached: cached,
        steps_built: total - cached,
        elapsed: started.elapsed(),
        outputs: command.outputs.clone(),
        pushed,
        remote_cache: None,
        loaded,
    })
}

fn create_parent(output: &OutputSpec) -> Result<(), CliError> {
    let path = match output {
        OutputSpec::OciLayout(path) | OutputSpec::OciArchive(path) | OutputSpec::DockerArchive(path) => path,
    };
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| CliError::Io {
            action: "creating",
            path: parent.to_owned(),
            source,
        })?;
    }
    Ok(())
}

fn describe_load(report: &crate::LoadReport) -> String {
    format!(
        "{}: {} layers sent ({} bytes), {} already in the engine{}",
        report.tag,
        report.layers_sent,
        report.layer_bytes_sent,
        report.layers_skipped,
        if report.resent_whole { " (sent whole after the engine refused the trimmed stream)" } else { "" }
    )
}

/// The builder of `command` (cache, compression, remote caches) drawing progress on stderr.
pub(crate) fn builder_with_progress(command: &BuildCommand) -> Result<Builder, CliError> {
    let display = ProgressDisplay::new();
    let mut options = BuilderOptions::default()
        .compression(command.compression)
        .progress(Arc::new(move |event: &ProgressEvent| display.show(event)));
    options.cache_from = command.cache_from.clone();
    options.cache_to = command.cache_to.clone();
    options.reapi = command.reapi.clone();
    options.reapi_execute = command.reapi_execute;
    for (id, source) in &command.secrets {
        options = options.secret(id.clone(), source.clone());
    }
    for (id, source) in &command.ssh_agents {
        options = options.ssh(id.clone(), source.clone());
    }
    Ok(Builder::with_options(&command.cache_dir, options)?)
}

/// Builds `image` on `command`'s cache, compression and remote caches, showing progress on
/// stderr; writes no output.
pub fn build_with_progress(image: &Image, command: &BuildCommand) -> Result<BuiltImage, CliError> {
    Ok(builder_with_progress(command)?.build(image)?)
}

/// One line on what the remote caches did.
fn describe_remote_cache(report: &crate::RemoteCacheReport, command: &BuildCommand) -> String {
    let mut parts = Vec::new();
    if report.consulted {
        parts.push(format!(
            "{} steps from remote ({} blobs, {} bytes downloaded)",
            report.steps_served, report.blobs_downloaded, report.bytes_downloaded
        ));
    } else if !command.cache_from.is_empty() || command.reapi.is_some() {
        parts.push("remote not asked (every step the build needs hit locally)".to_owned());
    }
    if let Some(export) = &report.export {
        parts.push(format!(
            "exported {} records to {} ({} blobs uploaded, {} bytes)",
            export.records, export.reference, export.blobs_uploaded, export.bytes_uploaded
        ));
    }
    if !report.remote_executions.is_empty() {
        let mut workers: Vec<&str> = report.remote_executions.iter().map(|run| run.worker.as_str()).collect();
        workers.sort_unstable();
        workers.dedup();
        parts.push(format!(
            "{} RUN steps executed remotely on {} workers",
            report.remote_executions.len(),
            workers.len()
        ));
    }
    if let Some(upload) = &report.reapi_upload {
        parts.push(format!(
            "uploaded {} steps to {} ({} blobs, {} bytes)",
            upload.action_results, upload.endpoint, upload.blobs_uploaded, upload.bytes_uploaded
        ));
    }
    if !report.warnings.is_empty() {
        parts.push(format!("{} warnings (printed above)", report.warnings.len()));
    }
    parts.join("; ")
}

#[cfg(feature = "registry")]
fn push(built: &crate::BuiltImage, reference: &str, insecure: bool) -> Result<String, CliError> {
    let report = built.push_with(reference, &crate::registry::PushOptions { insecure })?;
    Ok(report.to_string())
}

#[cfg(not(feature = "registry"))]
fn push(_built: &crate::BuiltImage, reference: &str, _insecure: bool) -> Result<String, CliError> {
    Err(CliError::RegistryDisabled { reference: reference.to_owned() })
}

#[cfg(feature = "registry")]
fn push_index(index: &BuiltIndex, reference: &str, insecure: bool) -> Result<String, CliError> {
    let report = index.push_with(reference, &crate::registry::PushOptions { insecure })?;
    Ok(report.to_string())
}

#[cfg(not(feature = "registry"))]
fn push_index(_index: &BuiltIndex, reference: &str, _insecure: bool) -> Result<String, CliError> {
    Err(CliError::RegistryDisabled { reference: reference.to_owned() })
}

/// How a finished step was satisfied, in six letters.
fn step_state(report: &crate::StepReport) -> &'static str {
    match (report.remote, report.cached) {
        (true, _) => "remote",
        (false, true) => "cached",
        (false, false) => "built ",
    }
}

/// A step being built and its spinner.
type RunningStep = (String, ProgressBar);

/// Progress lines: spinners on a terminal, plain lines elsewhere.
struct ProgressDisplay {
    terminal: Option<(MultiProgress, Mutex<Vec<RunningStep>>)>,
}

impl ProgressDisplay {
    fn new() -> ProgressDisplay {
        let terminal = std::io::stderr().is_terminal().then(|| (MultiProgress::new(), Mutex::new(Vec::new())));
        ProgressDisplay { terminal }
    }

    fn show(&self, event: &ProgressEvent) {
        let Some((multi, bars)) = &self.terminal else {
            match event {
                ProgressEvent::Finished(report) => {
                    let state = step_state(report);
                    eprintln!("{state} {:>8.2?}  {}", report.duration, report.label);
                }
                ProgressEvent::Output { line, .. } => eprintln!("  | {line}"),
                ProgressEvent::Warning { .. } => eprintln!("{}", warning_text(event)),
                ProgressEvent::Started { .. } => {}
            }
            return;
        };
        let mut bars = bars.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match event {
            ProgressEvent::Started { label } => {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} building {elapsed:>4}  {msg}").expect("a valid template"),
                );
                bar.set_message(label.clone());
                bar.enable_steady_tick(Duration::from_millis(120));
                bars.push((label.clone(), bar));
            }
            ProgressEvent::Finished(report) => {
                let Some(position) = bars.iter().position(|(label, _)| *label == report.label) else { return };
                let (_, bar) = bars.remove(position);
                let state = step_state(report);
                bar.set_style(ProgressStyle::with_template("{msg}").expect("a valid template"));
                bar.finish_with_message(format!("✓ {state} {:>8.2?}  {}", report.duration, report.label));
            }
            ProgressEvent::Output { line, .. } => {
                // Above the spinners, which keep spinning below.
                let _ = multi.println(format!("  | {line}"));
            }
            ProgressEvent::Warning { .. } => {
                let _ = multi.println(warning_text(event));
            }
        }
    }
}

/// The line a warning is shown as.
fn warning_text(event: &ProgressEvent) -> String {
    match event {
        ProgressEvent::Warning { step: Some(step), message } => format!("warning: {step}: {message}"),
        ProgressEvent::Warning { step: None, message } => format!("warning: {message}"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod multi_platform_tests {
    use super::*;

    #[test]
    fn a_docker_archive_of_several_platforms_is_refused_naming_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("app.tar");
        let command = BuildCommand {
            cache_dir: dir.path().join("cache"),
            outputs: vec![OutputSpec::DockerArchive(archive.clone())],
            tag: "app:1".into(),
            compression: Compression::Gzip,
            push: None,
            insecure: false,
            cache_from: Vec::new(),
            cache_to: None,
            reapi: None,
            reapi_execute: false,
            secrets: Vec::new(),
            ssh_agents: Vec::new(),
            load: false,
            platforms: vec![Platform::parse("linux/amd64").unwrap(), Platform::parse("linux/arm64").unwrap()],
            attestations: Attestations::Default,
        };
        let image = Image::scratch().write_file("/hello", "hi\n");
        let error = build_image(&image, &command).unwrap_err();
        assert!(matches!(error, CliError::IndexDockerArchive { .. }), "{error}");
        assert!(error.to_string().contains("--platform") && error.to_string().contains("oci:DIR"), "{error}");
        assert!(!archive.exists());
        // With an OCI output the same build writes an index.
        let layout = dir.path().join("layout");
        let command = BuildCommand { outputs: vec![OutputSpec::OciLayout(layout.clone())], ..command };
        let summary = build_image(&image, &command).unwrap();
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], summary.digest);
        assert_eq!(index["manifests"][0]["mediaType"], "application/vnd.oci.image.index.v1+json");
    }
}
