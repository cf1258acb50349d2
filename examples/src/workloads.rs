//! The benchmark workloads (W1, W2, W3 of `cargo xtask bench`, W4 of `cargo xtask bench
//! --distro`): their generated inputs, their layerwright declarations and the equivalent
//! Dockerfiles, kept side by side so that they change together. The bench binary, the xtask and
//! the remote-cache tests share them.
//!
//! A workload directory holds `base.tar` (the busybox example as a docker-archive, the base
//! W1–W3 start from), for W4 `debian.tar` (a Debian minbase made by `mmdebstrap`, as a
//! docker-archive tagged [`DEBIAN_BASE_TAG`]), and `WORKLOAD/context/` (generated
//! deterministically, once).
//! What this module is not: the measuring, which is `xtask/src/bench.rs`.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use layerwright::{BuildError, Builder, Context, ExportError, Image, ImagePathError};
use thiserror::Error;

use crate::{ExampleEnvironment, ExampleError};

/// The tag of the base image, in `base.tar` and in the Dockerfiles.
pub const BASE_TAG: &str = "localhost/lw-bench-base:1";

/// The tag of W4's Debian base, in `debian.tar` and in its Dockerfile.
pub const DEBIAN_BASE_TAG: &str = "localhost/lw-bench-debian:1";

/// The workloads, by name.
pub const WORKLOADS: [&str; 4] = ["w1", "w2", "w3", "w4"];

/// The context file W4's "one file changed" scenarios rewrite (relative to `w4/context`).
pub const W4_CHANGED_FILE: &str = "app/src/m150.txt";

/// W4's network step: the package lists and one small package (with its libraries) from
/// Debian's mirror.
const W4_APT: &str = "apt-get update && apt-get install -y --no-install-recommends jq && rm -rf /var/lib/apt/lists/*";

/// The packages of the cache-mount benchmark's apt step (`cargo xtask bench --apt-mounts`), by
/// round: round 0 installs `jq`, and every later round `jq` and one package more, so that each
/// re-runs the step with one more package than the first (as a Dockerfile edit would).
pub const APT_BENCH_PACKAGES: [&str; 6] = ["jq", "jq hello", "jq tree", "jq bc", "jq ed", "jq dc"];

/// The cache-mount benchmark's workload names: `apt-mounts-ROUND` (apt with its cache and lists
/// as cache mounts) and `apt-plain-ROUND` (the usual install-then-clean, no mounts).
pub fn apt_bench_workload(with_mounts: bool, round: usize) -> String {
    format!("apt-{}-{round}", if with_mounts { "mounts" } else { "plain" })
}

/// The mode and round an apt benchmark workload name holds.
fn parse_apt_bench_workload(name: &str) -> Option<(bool, &'static str)> {
    let (mode, round) = name.strip_prefix("apt-")?.split_once('-')?;
    let with_mounts = match mode {
        "mounts" => true,
        "plain" => false,
        _ => return None,
    };
    let packages = APT_BENCH_PACKAGES.get(round.parse::<usize>().ok()?)?;
    Some((with_mounts, packages))
}

fn apt_plain_install(packages: &str) -> String {
    format!(
        "apt-get update -q && apt-get install -y -q --no-install-recommends {packages} && apt-get clean && rm -rf \
         /var/lib/apt/lists/*"
    )
}

/// W4's user step, and the build step it runs as that user.
const W4_USER: &str = "useradd --create-home app && chown -R app:app /app";
const W4_BUILD: &str =
    "cd /app && cat src/* | sha256sum > build.sum && jq -n --arg sum \"$(cat build.sum)\" '{sum: $sum}' > build.json";

#[derive(Debug, Error)]
pub enum WorkloadError {
    #[error("unknown workload {name:?} (expected w1, w2, w3 or w4)")]
    Unknown { name: String },
    #[error("workload {workload}: cannot write {path}: {source}")]
    Io { workload: String, path: PathBuf, source: io::Error },
    #[error("workload base: {0}")]
    Example(#[from] ExampleError),
    #[error("workload base: {0}")]
    Build(#[from] BuildError),
    #[error("workload base: {0}")]
    Export(#[from] ExportError),
    #[error("workload {workload}: {source}")]
    Context { workload: String, source: ImagePathError },
}

/// Writes `workdir/base.tar`: the busybox example as a docker-archive tagged [`BASE_TAG`],
/// built with its own cache in `workdir/base-cache`.
pub fn write_base_archive(environment: &ExampleEnvironment, workdir: &Path) -> Result<PathBuf, WorkloadError> {
    let archive = workdir.join("base.tar");
    let image = crate::busybox(environment)?;
    let built = Builder::new(workdir.join("base-cache"))?.build(&image)?;
    built.write_docker_archive(&archive, BASE_TAG)?;
    Ok(archive)
}

/// Writes the workload's context (once: it is deterministic) and its Dockerfile under
/// `workdir/WORKLOAD/`.
pub fn generate(workload: &str, workdir: &Path) -> Result<(), WorkloadError> {
    if !WORKLOADS.contains(&workload) {
        return Err(WorkloadError::Unknown { name: workload.to_owned() });
    }
    let root = workdir.join(workload);
    let context = root.join("context");
    let marker = root.join(".generated");
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| WorkloadError::Io { workload: workload.to_owned(), path, source }
    };
    let write = |path: &Path, bytes: &[u8]| -> Result<(), WorkloadError> {
        fs::create_dir_all(path.parent().expect("a file has a parent")).map_err(io_error(path))?;
        fs::write(path, bytes).map_err(io_error(path))
    };
    if !marker.exists() {
        if root.exists() {
            fs::remove_dir_all(&root).map_err(io_error(&root))?;
        }
        match workload {
            "w1" => {
                for index in 0..2000u64 {
                    let path = context.join(format!("files/d{:02}/f{index:04}", index / 100));
                    write(&path, &layerwright::host::incompressible_bytes(4096, index + 1))?;
                }
            }
            "w4" => {
                // A small application's sources: 300 text files of 1–3 KiB.
                for index in 0..300u64 {
                    let line = format!("line of module {index:03}\n");
                    let content = line.repeat(40 + (index as usize % 3) * 40);
                    write(&context.join(format!("app/src/m{index:03}.txt")), content.as_bytes())?;
                }
            }
            "w2" => {
                for index in 0..256u64 {
                    let path = context.join(format!("blobs/b{index:03}"));
                    write(&path, &layerwright::host::incompressible_bytes(4 << 20, 1000 + index))?;
                }
            }
            _ => {
                for index in 0..20 {
                    write(&context.join(format!("s{index:02}.txt")), format!("stage {index}\n").as_bytes())?;
                }
            }
        }
        write(&marker, b"")?;
    }
    write(&root.join("Dockerfile"), dockerfile(workload).as_bytes())
}

/// The workload's image, declared with layerwright (the same steps as [`dockerfile`]).
pub fn declare(workload: &str, workdir: &Path) -> Result<Image, WorkloadError> {
    let context = |workload: &str| {
        Context::dir(workdir.join(workload).join("context"))
            .map_err(|source| WorkloadError::Context { workload: workload.to_owned(), source })
    };
    let base = Image::from_archive(workdir.join("base.tar"));
    match workload {
        "w1" => {
            let context = context(workload)?;
            let stages: Vec<Image> = (0..3)
                .map(|stage| base.run(format!("sleep 1 && echo stage {stage} > /stage-{stage}").as_str()))
                .collect();
            let mut image = base
                .copy(&context, "files", "/data")
                .run("find /data -type f | wc -l > /file-count && cat /data/d00/* | md5sum > /d00.md5");
            for (stage, source) in stages.iter().enumerate() {
                image = image.copy_from(source, &format!("/stage-{stage}"), "/stages/");
            }
            Ok(image.run("rm /data/d00/f0000").env("W1", "done").cmd(["/bin/sh"]))
        }
        "w2" => Ok(base.copy(&context(workload)?, "blobs", "/blobs").cmd(["/bin/sh"])),
        "w4" => {
            let debian = Image::from_archive(workdir.join("debian.tar"));
            Ok(debian
                .run(layerwright::Run::shell(W4_APT).network(true))
                .copy(&context(workload)?, "app", "/app")
                .run(W4_USER)
                .user("app")
                .run(W4_BUILD)
                .cmd(["/bin/sh"]))
        }
        "w3" => {
            let context = context(workload)?;
            let stages: Vec<Image> = (0..20)
                .map(|stage| base.copy(&context, &format!("s{stage:02}.txt"), &format!("/s{stage:02}.txt")))
                .collect();
            let mut image = base;
            for (stage, source) in stages.iter().enumerate() {
                image = image.copy_from(source, &format!("/s{stage:02}.txt"), "/out/");
            }
            Ok(image.cmd(["/bin/sh"]))
        }
        other => {
            let (with_mounts, packages) =
                parse_apt_bench_workload(other).ok_or_else(|| WorkloadError::Unknown { name: other.to_owned() })?;
            let debian = Image::from_archive(workdir.join("debian.tar"));
            if with_mounts {
                return Ok(crate::apt_install_with_cache_mounts(&debian, packages));
            }
            Ok(debian.run(layerwright::Run::shell(apt_plain_install(packages)).network(true)))
        }
    }
}

/// The Dockerfile of an apt benchmark workload ([`apt_bench_workload`]): the same steps as
/// [`declare`], with BuildKit's `RUN --mount=type=cache` for the mounts.
pub fn apt_bench_dockerfile(name: &str) -> Result<String, WorkloadError> {
    let (with_mounts, packages) =
        parse_apt_bench_workload(name).ok_or_else(|| WorkloadError::Unknown { name: name.to_owned() })?;
    if !with_mounts {
        return Ok(format!("FROM {DEBIAN_BASE_TAG}\nRUN {}\n", apt_plain_install(packages)));
    }
    Ok(format!(
        "FROM {DEBIAN_BASE_TAG}\nRUN {}\nRUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
         --mount=type=cache,target=/var/lib/apt/lists,sharing=locked apt-get update -q && apt-get install -y -q \
         --no-install-recommends {packages}\n",
        crate::APT_KEEP_DOWNLOADS
    ))
}

/// The Dockerfile of a workload: the same steps as [`declare`].
pub fn dockerfile(workload: &str) -> String {
    let mut text = String::new();
    match workload {
        "w1" => {
            for stage in 0..3 {
                let _ = writeln!(
                    text,
                    "FROM {BASE_TAG} AS stage{stage}\nRUN sleep 1 && echo stage {stage} > /stage-{stage}\n"
                );
            }
            let _ = writeln!(text, "FROM {BASE_TAG}\nCOPY files /data");
            text.push_str("RUN find /data -type f | wc -l > /file-count && cat /data/d00/* | md5sum > /d00.md5\n");
            for stage in 0..3 {
                let _ = writeln!(text, "COPY --from=stage{stage} /stage-{stage} /stages/");
            }
            text.push_str("RUN rm /data/d00/f0000\nENV W1=done\nCMD [\"/bin/sh\"]\n");
        }
        "w2" => {
            let _ = writeln!(text, "FROM {BASE_TAG}\nCOPY blobs /blobs\nCMD [\"/bin/sh\"]");
        }
        "w4" => {
            let _ = writeln!(text, "FROM {DEBIAN_BASE_TAG}\nRUN {W4_APT}\nCOPY app /app\nRUN {W4_USER}\nUSER app");
            let _ = writeln!(text, "RUN {W4_BUILD}\nCMD [\"/bin/sh\"]");
        }
        _ => {
            for stage in 0..20 {
                let _ = writeln!(text, "FROM {BASE_TAG} AS s{stage:02}\nCOPY s{stage:02}.txt /s{stage:02}.txt\n");
            }
            let _ = writeln!(text, "FROM {BASE_TAG}");
            for stage in 0..20 {
                let _ = writeln!(text, "COPY --from=s{stage:02} /s{stage:02}.txt /out/");
            }
            text.push_str("CMD [\"/bin/sh\"]\n");
        }
    }
    text
}
