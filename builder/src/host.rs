//! Host helpers for examples and tests: the static binaries and host tools that example images
//! are made of.
//!
//! An example image must be buildable from a fresh clone without network or root, so it is made
//! of things the host already has: a static Rust binary built from this workspace, or Debian's
//! `busybox-static`. What this module deliberately is not: a general cross-compilation driver.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// Why a host helper failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HostError {
    /// A host command (`cargo`, `busybox`) could not be started.
    #[error("cannot run {command}: {source}")]
    Spawn {
        /// The command, as `Debug` prints it.
        command: String,
        /// The IO error from the operating system.
        source: io::Error,
    },
    /// A host command exited unsuccessfully.
    #[error("{command} failed with {status}:\n{stderr}")]
    Failed {
        /// The command, as `Debug` prints it.
        command: String,
        /// How it exited.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Writing a file or directory of a generated context failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// The IO error from the operating system.
        source: io::Error,
    },
    /// A file the helper needs or should have made is not there (the static binary after the
    /// build, or the host's busybox).
    #[error("{path} does not exist; {hint}")]
    Missing {
        /// The file that is missing.
        path: PathBuf,
        /// What to do about it.
        hint: &'static str,
    },
}

/// Which static binary to build.
#[derive(Debug, Clone)]
pub struct StaticBinaryOptions {
    /// The workspace whose package holds the binary.
    pub workspace: PathBuf,
    /// The package that holds the binary.
    pub package: String,
    /// The binary's name (its `[[bin]]` target).
    pub binary: String,
    /// A target directory of its own, so that the nested cargo never waits for the lock of the
    /// cargo that runs us.
    pub target_dir: PathBuf,
}

/// The host's target triple, as cargo names it for the gnu toolchain this workspace builds on.
pub fn host_target() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

/// Builds `binary` of `package` as a statically linked release executable (glibc's static
/// libraries, `+crt-static`) and returns its path. Paths are remapped and symbols stripped so
/// the bytes do not depend on where the workspace is checked out.
pub fn build_static_rust_binary(options: &StaticBinaryOptions) -> Result<PathBuf, HostError> {
    let target = host_target();
    let workspace = options.workspace.display().to_string();
    let rustflags = format!(
        r#"target.{target}.rustflags=["-C", "target-feature=+crt-static", "--remap-path-prefix={workspace}=/workspace"]"#
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&options.workspace)
        .args([
            "build",
            "--release",
            "--quiet",
            "--package",
            &options.package,
            "--bin",
            &options.binary,
            "--target",
            &target,
        ])
        .arg("--target-dir")
        .arg(&options.target_dir)
        .args([
            "--config",
            &rustflags,
            "--config",
            "profile.release.strip=true",
            "--config",
            "profile.release.debug=false",
        ])
        // A `cargo test` that runs us sets variables meant for its own crates only.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR");
    run(&mut command)?;
    let path = options.target_dir.join(&target).join("release").join(&options.binary);
    if !path.is_file() {
        return Err(HostError::Missing { path, hint: "cargo reported success but wrote no binary there" });
    }
    Ok(path)
}

/// The applet names a busybox binary provides (`busybox --list`).
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>, HostError> {
    if !busybox.is_file() {
        return Err(HostError::Missing { path: busybox.to_owned(), hint: "install Debian's busybox-static" });
    }
    let output = run(Command::new(busybox).arg("--list"))?;
    let mut applets: Vec<String> =
        output.lines().map(str::trim).filter(|name| !name.is_empty()).map(str::to_owned).collect();
    applets.sort();
    applets.dedup();
    Ok(applets)
}

fn run(command: &mut Command) -> Result<String, HostError> {
    let description = format!("{command:?}");
    let output = command.output().map_err(|source| HostError::Spawn { command: description.clone(), source })?;
    if !output.status.success() {
        return Err(HostError::Failed {
            command: description,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Where Debian's `busybox-static` puts its binary.
pub fn find_busybox() -> Result<PathBuf, HostError> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .ok_or(HostError::Missing { path: PathBuf::from("/bin/busybox"), hint: "install Debian's busybox-static" })
}

/// Writes (once) a build context holding `bin/<applet>` symlinks to `busybox` for every applet
/// of the host's busybox, so that one `copy` step adds them all as one layer, and returns its
/// directory: `parent/busybox-links-<hash of the applet list>`. The directory is built aside and
/// renamed into place, so concurrent callers (parallel tests) never see a half-written one.
pub fn write_busybox_links_context(busybox: &Path, parent: &Path) -> Result<PathBuf, HostError> {
    let applets = busybox_applets(busybox)?;
    let write_error = |path: &Path| {
        let path = path.to_owned();
        move |source| HostError::Write { path, source }
    };
    let hash = blake3::hash(applets.join("\n").as_bytes()).to_hex();
    let dir = parent.join(format!("busybox-links-{}", &hash[..16]));
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(parent).map_err(write_error(parent))?;
    let aside = tempfile::tempdir_in(parent).map_err(write_error(parent))?;
    let bin = aside.path().join("bin");
    std::fs::create_dir(&bin).map_err(write_error(&bin))?;
    for applet in applets.iter().filter(|applet| applet.as_str() != "busybox") {
        let link = bin.join(applet);
        std::os::unix::fs::symlink("busybox", &link).map_err(write_error(&link))?;
    }
    let aside = aside.keep();
    if let Err(error) = std::fs::rename(&aside, &dir) {
        // Another caller renamed its copy into place first; theirs is the same.
        let _ = std::fs::remove_dir_all(&aside);
        if !dir.is_dir() {
            return Err(HostError::Write { path: dir, source: error });
        }
    }
    Ok(dir)
}

/// Lists the tree below `root` (not `root` itself) as it is on disk, in the format of
/// `BuiltImage::listing()` (one line per path, sorted component-wise, the same escaping), so that
/// an image unpacked by a real client (`umoci unpack`, `docker export`) can be compared with the
/// image's own listing. Hard links on disk are listed as plain files; sockets as `socket`.
pub fn directory_listing(root: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use sha2::Digest as _;

    let mut lines = std::collections::BTreeMap::new();
    let mut pending = vec![root.to_owned()];
    while let Some(directory) = pending.pop() {
        for entry in std::fs::read_dir(&directory)? {
            let path = entry?.path();
            let metadata = std::fs::symlink_metadata(&path)?;
            let relative = path.strip_prefix(root).expect("listed below the root").to_string_lossy().into_owned();
            let file_type = metadata.file_type();
            let (kind, size, what) = if file_type.is_dir() {
                pending.push(path.clone());
                ("dir", "-".to_owned(), "-".to_owned())
            } else if file_type.is_file() {
                let mut hasher = sha2::Sha256::new();
                std::io::copy(&mut std::fs::File::open(&path)?, &mut hasher)?;
                ("file", metadata.len().to_string(), format!("sha256:{}", hex::encode(hasher.finalize())))
            } else if file_type.is_symlink() {
                let target = std::fs::read_link(&path)?.to_string_lossy().into_owned();
                ("symlink", "-".to_owned(), format!("-> {}", crate::tree::escape_for_listing(&target)))
            } else if file_type.is_char_device() || file_type.is_block_device() {
                let kind = if file_type.is_char_device() { "char" } else { "block" };
                let device = metadata.rdev();
                let major = ((device >> 32) & 0xffff_f000) | ((device >> 8) & 0x0000_0fff);
                let minor = ((device >> 12) & 0xffff_ff00) | (device & 0x0000_00ff);
                (kind, "-".to_owned(), format!("{major},{minor}"))
            } else if file_type.is_fifo() {
                ("fifo", "-".to_owned(), "-".to_owned())
            } else {
                ("socket", "-".to_owned(), "-".to_owned())
            };
            let line = format!(
                "{kind} {:04o} {}:{} {size} {what} /{}",
                metadata.mode() & 0o7777,
                metadata.uid(),
                metadata.gid(),
                crate::tree::escape_for_listing(&relative)
            );
            // Keyed with `/` as NUL so that the order is component-wise, as the image listing.
            lines.insert(relative.replace('/', "\0"), line);
        }
    }
    Ok(lines.into_values().map(|line| line + "\n").collect())
}

/// `length` incompressible bytes from `seed` (xorshift64), the same on every machine: test and
/// benchmark contexts that must cost real compression and hashing time.
pub fn incompressible_bytes(length: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut bytes = Vec::with_capacity(length + 8);
    while bytes.len() < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(length);
    bytes
}

/// Where `.ci/run` leaves the Debian bookworm minbase rootfs it makes once per machine with
/// `mmdebstrap --variant=minbase --mode=root bookworm` (the base of the apt tests).
pub const DEBIAN_MINBASE_TAR: &str = "/usr/local/lib/layerwright-test/debian-bookworm-minbase.tar";

/// An OCI image layout at `dir` whose one (uncompressed) layer is the rootfs tar `rootfs`
/// (hard-linked into it when they share a filesystem, else copied), for this host's
/// architecture, with a `PATH` and `Cmd ["bash"]`. Returns `dir`.
pub fn rootfs_tar_as_oci_layout(rootfs: &Path, dir: &Path) -> io::Result<PathBuf> {
    use sha2::Digest as _;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let mut hasher = sha2::Sha256::new();
    let layer_size = io::copy(&mut std::fs::File::open(rootfs)?, &mut hasher)?;
    let layer_digest = format!("sha256:{:x}", hasher.finalize());
    let layer_path = blobs.join(&layer_digest["sha256:".len()..]);
    if std::fs::hard_link(rootfs, &layer_path).is_err() {
        std::fs::copy(rootfs, &layer_path)?;
    }
    let blob = |bytes: &[u8]| -> io::Result<String> {
        let digest = format!("sha256:{:x}", sha2::Sha256::digest(bytes));
        std::fs::write(blobs.join(&digest["sha256:".len()..]), bytes)?;
        Ok(digest)
    };
    let architecture = crate::oci::Platform::host().architecture;
    let config = format!(
        r#"{{"architecture":"{architecture}","os":"linux","config":{{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["bash"]}},"rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#
    );
    let config_digest = blob(config.as_bytes())?;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{layer_size}}}]}}"#,
        config.len()
    );
    let manifest_digest = blob(manifest.as_bytes())?;
    std::fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{}}}]}}"#,
            manifest.len()
        ),
    )?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(dir.to_owned())
}
