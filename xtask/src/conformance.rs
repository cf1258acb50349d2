//! `cargo xtask conformance`: the same image built from a Dockerfile by BuildKit
//! (`DOCKER_BUILDKIT=1 docker build --network=none` against a private `dockerd`) and from the
//! equivalent DSL graph by layerwright (loaded into the same engine with `docker load` of a
//! docker-archive), compared by a canonical listing of the `docker export`ed file trees and of
//! the image configs. Real clients decide: both images go through the same engine, and the
//! listings are made from what the engine exports.
//!
//! The suite is data-driven: [`cases()`] is a table of [`Case`]s (a Dockerfile, the context files
//! it needs, the same graph in the DSL), and one runner, [`Work::check`], builds and compares a case.
//! Differences that are intended are listed in [`INTENDED`] with their reason, printed when
//! they are met, and documented in `docs/conformance.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use layerwright::{Builder, Context, Image};
use layerwright_examples::ExampleEnvironment;
use sha2::{Digest as _, Sha256};

use crate::docker::DockerEngine;

mod cases;

use cases::{Case, cases};

/// The tag of the busybox base in the engine: the `busybox` example, built by layerwright from
/// the host's busybox-static.
const BUSYBOX_TAG: &str = "lwconform-busybox:base";

/// A difference between BuildKit's image and layerwright's that is intended: lines of the
/// listings (tree or config) whose path or field is `what`, in the case `case` (`*`: any).
pub struct Intended {
    /// The case it applies to, or `*`.
    pub case: &'static str,
    /// The path of the tree (or `config.Field`) whose lines may differ.
    pub what: &'static str,
    /// Why the difference is intended.
    pub reason: &'static str,
}

/// The differences that are intended, with their reasons (also in `docs/conformance.md`).
pub const INTENDED: &[Intended] = &[
    Intended {
        case: "33-workdir-only",
        what: "/w",
        reason: "layerwright's workdir() is a config change and adds no layer; BuildKit creates the \
                 directory in a layer of its own. RUN steps create it before they run (case 31), and \
                 the engine creates a missing WorkingDir when it creates a container, so a container \
                 sees the same tree",
    },
    Intended {
        case: "47-scratch-copy",
        what: "config.Env",
        reason: "BuildKit gives an image FROM scratch a default PATH; layerwright's config holds only \
                 what the declaration sets (the engine supplies the same default PATH at run time)",
    },
    Intended {
        case: "47-scratch-copy",
        what: "config.WorkingDir",
        reason: "BuildKit sets WorkingDir \"/\" on an image FROM scratch; layerwright leaves it unset, \
                 which the engine treats as \"/\"",
    },
];

/// Cases layerwright refuses to build, by design, with the reason.
pub const REFUSED: &[(&str, &str)] = &[
    (
        "50-non-utf8-run-names",
        "image paths are UTF-8 text in layerwright (declarations, listings, keys); a RUN step that \
         creates a name that is not valid UTF-8 fails, naming the path, where BuildKit stores the bytes",
    ),
    (
        "49-non-utf8-context",
        "a build context entry whose name is not valid UTF-8 is an error naming it (image paths are \
         text), where BuildKit copies the bytes",
    ),
];

/// Differences that are bugs still open, with where they are to be fixed: reported at every
/// run, not failing it, and failing it once they are gone (so that the entry is removed).
pub const KNOWN: &[Intended] = &[];

/// Options of a conformance run.
#[derive(Default)]
pub struct ConformanceOptions {
    /// Only the cases whose name contains this.
    pub only: Option<String>,
    /// Keep the work directory (Dockerfiles, contexts, listings) for inspection.
    pub keep: bool,
}

/// Runs the suite against the engine at `docker_host`, else at `DOCKER_HOST`, else a private
/// one started here. Returns whether every case conformed.
pub fn run(workspace: &Path, options: &ConformanceOptions, docker_host: Option<String>) -> Result<bool> {
    let started = Instant::now();
    let (_engine, docker_host) = match docker_host.or_else(|| std::env::var("DOCKER_HOST").ok()) {
        Some(host) => (None, host),
        None => {
            let engine = DockerEngine::start()?.context("the conformance suite needs root and dockerd")?;
            let host = engine.host();
            (Some(engine), host)
        }
    };
    let dir = tempfile::Builder::new().prefix("lw-conformance-").tempdir().context("creating the work directory")?;
    let work = Work {
        dir: dir.path().to_owned(),
        docker_host,
        builder: Builder::new(dir.path().join("cache"))?,
        keep: options.keep,
    };
    let base_archive = work.prepare_base(workspace)?;
    let base = Image::from_archive(&base_archive);
    let selected: Vec<Case> = cases()
        .into_iter()
        .filter(|case| options.only.as_deref().is_none_or(|only| case.name.contains(only)))
        .collect();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(&'static str, Result<Outcome>)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..3 {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    let Some(case) = selected.get(index) else { break };
                    let outcome = work.check(case, &base);
                    match &outcome {
                        Ok(outcome) if outcome.differences.is_empty() => {
                            eprintln!("conformance: {} ok", case.name)
                        }
                        Ok(_) => eprintln!("conformance: {} DIFFERS", case.name),
                        Err(error) => eprintln!("conformance: {} FAILED: {error:#}", case.name),
                    }
                    results.lock().expect("no thread panics holding it").push((case.name, outcome));
                }
            });
        }
    });
    let mut results = results.into_inner().expect("no thread panicked");
    results.sort_by_key(|(name, _)| *name);
    let mut conforming = 0;
    for (name, outcome) in &results {
        match outcome {
            Ok(outcome) => {
                for (intended, line) in &outcome.intended {
                    println!("{name}: intended difference at {}: {}\n  {line}", intended.what, intended.reason);
                }
                for (known, line) in &outcome.known {
                    println!(
                        "{name}: KNOWN difference (a bug, still open) at {}: {}\n  {line}",
                        known.what, known.reason
                    );
                }
                if let Some((reason, line)) = &outcome.refused {
                    println!("{name}: refused by design: {reason}\n  {line}");
                }
                if outcome.differences.is_empty() {
                    conforming += 1;
                    continue;
                }
                println!("{name}: differs from BuildKit:");
                for line in &outcome.differences {
                    println!("  {line}");
                }
            }
            Err(error) => println!("{name}: failed: {error:#}"),
        }
    }
    println!(
        "conformance: {conforming} of {} cases give BuildKit's tree and config ({:.1} s)",
        results.len(),
        started.elapsed().as_secs_f64()
    );
    if options.keep {
        let kept = dir.keep();
        println!("conformance: work directory kept at {}", kept.display());
    }
    Ok(conforming == results.len())
}

struct Work {
    dir: PathBuf,
    docker_host: String,
    builder: Builder,
    /// Keep the images in the engine (with `--keep`).
    keep: bool,
}

/// What one case gave: the differences left after the intended ones, and the intended ones met.
struct Outcome {
    differences: Vec<String>,
    intended: Vec<(&'static Intended, String)>,
    known: Vec<(&'static Intended, String)>,
    /// The case is in [`REFUSED`] and layerwright refused it: the reason and the error.
    refused: Option<(&'static str, String)>,
}

impl Work {
    fn docker(&self) -> Command {
        let mut command = Command::new("/usr/bin/docker");
        command.env("DOCKER_HOST", &self.docker_host).env("DOCKER_BUILDKIT", "1");
        command
    }

    /// Builds the busybox example, writes it as a docker-archive and loads it into the engine.
    fn prepare_base(&self, workspace: &Path) -> Result<PathBuf> {
        let environment = ExampleEnvironment::for_workspace(workspace);
        let image = layerwright_examples::busybox(&environment)?;
        let archive = self.dir.join("busybox.tar");
        self.builder.build(&image)?.write_docker_archive(&archive, BUSYBOX_TAG)?;
        run_quiet(self.docker().arg("load").arg("-i").arg(&archive))?;
        Ok(archive)
    }

    /// Builds `case` both ways and compares the listings.
    fn check(&self, case: &Case, base: &Image) -> Result<Outcome> {
        let root = self.dir.join(case.name);
        let context_dir = root.join("context");
        fs::create_dir_all(&context_dir)?;
        (case.context)(&context_dir).with_context(|| format!("writing the context of {}", case.name))?;
        let dockerfile = root.join("Dockerfile");
        fs::write(&dockerfile, case.dockerfile.replace("FROM busybox", &format!("FROM {BUSYBOX_TAG}")))?;
        let buildkit_tag = format!("lwconform-{}:buildkit", case.name);
        run_quiet(
            self.docker()
                .args(["build", "--network=none", "--quiet", "-t", &buildkit_tag, "-f"])
                .arg(&dockerfile)
                .arg(&context_dir),
        )
        .context("docker build (BuildKit)")?;

        let context = Context::dir(&context_dir)?;
        let image = (case.dsl)(base, &context);
        let layerwright_tag = format!("lwconform-{}:layerwright", case.name);
        let archive = root.join("layerwright.tar");
        let built = match self.builder.build(&image) {
            Ok(built) => built,
            Err(error) => {
                if let Some((_, reason)) = REFUSED.iter().find(|(name, _)| *name == case.name) {
                    let line = format!("layerwright refused: {error}");
                    return Ok(Outcome {
                        differences: Vec::new(),
                        intended: Vec::new(),
                        known: Vec::new(),
                        refused: Some((reason, line)),
                    });
                }
                return Err(error).context("layerwright build");
            }
        };
        if REFUSED.iter().any(|(name, _)| *name == case.name) {
            bail!("layerwright built a case listed in REFUSED; remove its entry");
        }
        built.write_docker_archive(&archive, &layerwright_tag)?;
        run_quiet(self.docker().arg("load").arg("-i").arg(&archive)).context("docker load")?;
        if !self.keep {
            fs::remove_file(&archive)?;
        }

        let theirs = self.listing(&buildkit_tag, &root.join("buildkit.listing"))?;
        let ours = self.listing(&layerwright_tag, &root.join("layerwright.listing"))?;
        if !self.keep {
            let _ = run_quiet(self.docker().args(["rmi", "-f", &buildkit_tag, &layerwright_tag]));
        }
        Ok(compare(case.name, &theirs, &ours))
    }

    /// The canonical listing of the image's exported tree and of its config, also written to
    /// `save`.
    fn listing(&self, tag: &str, save: &Path) -> Result<BTreeMap<String, String>> {
        // The working directory is set to `/` so that the engine does not create the image's
        // WorkingDir in the container: whether the image holds it is part of the comparison.
        let container = run_quiet(self.docker().args(["create", "--entrypoint", "/lwconform", "--workdir", "/", tag]))?
            .trim()
            .to_owned();
        let mut child = self
            .docker()
            .args(["export", &container])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("docker export")?;
        let stdout = child.stdout.take().expect("piped");
        let tree = tree_listing(stdout);
        let status = child.wait()?;
        let _ = run_quiet(self.docker().args(["rm", "-f", &container]));
        let mut listing = tree?;
        if !status.success() {
            bail!("docker export {tag} failed");
        }
        let inspect = run_quiet(self.docker().args(["image", "inspect", "--format", "{{json .Config}}", tag]))?;
        let config: serde_json::Value = serde_json::from_str(inspect.trim()).context("parsing the image config")?;
        for field in
            ["Env", "Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "Labels", "Volumes", "StopSignal"]
        {
            let value = match config.get(field) {
                None | Some(serde_json::Value::Null) => serde_json::Value::Null,
                Some(serde_json::Value::String(text)) if text.is_empty() => serde_json::Value::Null,
                Some(serde_json::Value::Array(items)) if items.is_empty() => serde_json::Value::Null,
                Some(serde_json::Value::Object(items)) if items.is_empty() => serde_json::Value::Null,
                Some(value) => value.clone(),
            };
            listing.insert(format!("config.{field}"), value.to_string());
        }
        let text: String = listing.iter().map(|(path, line)| format!("{path} {line}\n")).collect();
        fs::write(save, text)?;
        Ok(listing)
    }
}

/// Differences between the listings, minus the intended ones.
fn compare(case: &str, theirs: &BTreeMap<String, String>, ours: &BTreeMap<String, String>) -> Outcome {
    let mut outcome = Outcome { differences: Vec::new(), intended: Vec::new(), known: Vec::new(), refused: None };
    let paths: BTreeSet<&String> = theirs.keys().chain(ours.keys()).collect();
    for path in paths {
        let (buildkit, layerwright) = (theirs.get(path), ours.get(path));
        if buildkit == layerwright {
            continue;
        }
        let line = format!(
            "{path}: BuildKit {} / layerwright {}",
            buildkit.map_or("(absent)", String::as_str),
            layerwright.map_or("(absent)", String::as_str)
        );
        let matches = |intended: &&Intended| (intended.case == "*" || intended.case == case) && intended.what == path;
        if let Some(intended) = INTENDED.iter().find(matches) {
            outcome.intended.push((intended, line));
        } else if let Some(known) = KNOWN.iter().find(matches) {
            outcome.known.push((known, line));
        } else {
            outcome.differences.push(line);
        }
    }
    for known in KNOWN.iter().filter(|known| known.case == case) {
        if !outcome.known.iter().any(|(met, _)| std::ptr::eq(*met, known)) {
            outcome.differences.push(format!(
                "{}: the known difference is gone; remove its entry from KNOWN ({})",
                known.what, known.reason
            ));
        }
    }
    outcome
}

/// Reads a `docker export` tar: one line per path with its type, mode, owner, size, content
/// digest, link target or device numbers, hard-link group and security xattrs. Modification
/// times are left out (BuildKit and layerwright both set their own).
fn tree_listing(reader: impl std::io::Read) -> Result<BTreeMap<String, String>> {
    struct Entry {
        kind: String,
        mode: u32,
        owner: String,
        size: u64,
        digest: String,
        detail: String,
        xattrs: String,
    }
    let mut archive = tar::Archive::new(reader);
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    // Hard links: every name of a group, keyed by the first name the archive gave it.
    let mut links: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in archive.entries().context("reading the exported tree")? {
        let mut entry = entry.context("reading the exported tree")?;
        let path = display_path(&entry.path_bytes());
        let header = entry.header().clone();
        let mut xattrs = Vec::new();
        if let Some(extensions) = entry.pax_extensions()? {
            for extension in extensions {
                let extension = extension?;
                if let Some(name) = extension.key().ok().and_then(|key| key.strip_prefix("SCHILY.xattr.")) {
                    xattrs.push(format!("{name}={}", hex::encode(extension.value_bytes())));
                }
            }
        }
        xattrs.sort();
        let kind = header.entry_type();
        let mode = header.mode()? & 0o7777;
        let owner = format!("{}:{}", header.uid()?, header.gid()?);
        if kind.is_hard_link() {
            let target = display_path(&entry.link_name_bytes().context("a hard link has a target")?);
            let group = links.iter().find(|(_, names)| names.contains(&target)).map(|(first, _)| first.clone());
            let first = group.unwrap_or(target.clone());
            links.entry(first.clone()).or_insert_with(|| BTreeSet::from([first])).insert(path.clone());
            continue;
        }
        let (name, size, digest, detail) = if kind.is_file() || kind == tar::EntryType::Continuous {
            let mut hasher = Sha256::new();
            let mut buffer = vec![0; 1 << 16];
            let mut size = 0;
            loop {
                let read = entry.read(&mut buffer)?;
                if read == 0 {
                    break;
                }
                size += read as u64;
                hasher.update(&buffer[..read]);
            }
            ("file", size, hex::encode(hasher.finalize()), String::new())
        } else if kind.is_dir() {
            ("dir", 0, String::new(), String::new())
        } else if kind.is_symlink() {
            let target = entry.link_name_bytes().map(|bytes| escape(&bytes)).unwrap_or_default();
            ("symlink", 0, String::new(), format!("-> {target}"))
        } else if kind.is_fifo() {
            ("fifo", 0, String::new(), String::new())
        } else if kind.is_character_special() || kind.is_block_special() {
            let major = header.device_major()?.unwrap_or(0);
            let minor = header.device_minor()?.unwrap_or(0);
            (if kind.is_character_special() { "char" } else { "block" }, 0, String::new(), format!("{major},{minor}"))
        } else {
            bail!("{path}: an entry of type {kind:?} in the exported tree");
        };
        entries
            .insert(path, Entry { kind: name.to_owned(), mode, owner, size, digest, detail, xattrs: xattrs.join(",") });
    }
    let mut group_of: BTreeMap<String, String> = BTreeMap::new();
    for names in links.values() {
        let first = names.first().expect("a group has a name").clone();
        for name in names {
            group_of.insert(name.clone(), first.clone());
        }
    }
    let mut listing = BTreeMap::new();
    for (path, entry) in &entries {
        let link_group = group_of.get(path).map(|first| format!(" links={first}")).unwrap_or_default();
        listing.insert(
            path.clone(),
            format!(
                "{} {:04o} {} {} {} {} [{}]{link_group}",
                entry.kind, entry.mode, entry.owner, entry.size, entry.digest, entry.detail, entry.xattrs
            ),
        );
    }
    // The other names of a hard-link group: the same line as the name the archive stored.
    for (first, names) in &links {
        let line = listing.get(first).cloned().with_context(|| format!("a hard link to {first}, not in the tree"))?;
        for name in names {
            listing.insert(name.clone(), line.clone());
        }
    }
    Ok(listing)
}

/// `/path` without a trailing slash; bytes that are not UTF-8 escaped.
fn display_path(bytes: &[u8]) -> String {
    let text = escape(bytes);
    let text = text.trim_end_matches('/');
    let text = text.strip_prefix("./").unwrap_or(text);
    format!("/{}", text.trim_start_matches('/'))
}

fn escape(bytes: &[u8]) -> String {
    let mut text = String::new();
    for chunk in bytes.utf8_chunks() {
        for character in chunk.valid().chars() {
            if character.is_control() || character == ' ' || character == '\\' {
                let mut buffer = [0; 4];
                for byte in character.encode_utf8(&mut buffer).bytes() {
                    text.push_str(&format!("\\x{byte:02x}"));
                }
            } else {
                text.push(character);
            }
        }
        for byte in chunk.invalid() {
            text.push_str(&format!("\\x{byte:02x}"));
        }
    }
    text
}

/// Runs a command, returning its stdout; a failure is an error with its stderr.
fn run_quiet(command: &mut Command) -> Result<String> {
    let described = format!("{command:?}");
    let output = command.stdin(Stdio::null()).output().with_context(|| format!("running {described}"))?;
    if !output.status.success() {
        bail!("{described} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
