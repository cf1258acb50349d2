//! Running a foreign platform's programs: the kernel's binfmt_misc hands them to a registered
//! qemu-user emulator. A RUN step for such a platform needs the emulator registered with the
//! `F` (fix binary) flag, so that the kernel opens the interpreter when it is registered and
//! the step's own root, which has no qemu, does not matter.
//!
//! What it deliberately is not: a registrar. It checks and says what to install; registering
//! is the machine's business (`.ci/run` shows how without systemd).

use std::path::PathBuf;

use thiserror::Error;

use crate::oci::Platform;

/// Where the kernel lists its binfmt_misc entries.
const BINFMT_MISC: &str = "/proc/sys/fs/binfmt_misc";

/// Why a foreign platform's programs cannot run here.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EmulationError {
    /// The architecture has no qemu-user emulator layerwright knows of.
    #[error("RUN steps for {platform} cannot execute on this {host} machine: no qemu-user emulator is known for it")]
    Unknown {
        /// The platform built for.
        platform: String,
        /// This machine's platform.
        host: String,
    },
    /// The emulator is not registered (or not with the `F` flag) with binfmt_misc.
    #[error(
        "RUN steps for {platform} need the binfmt_misc entry {entry} ({reason}): install qemu-user-static \
         (Debian: `apt-get install qemu-user-static`) and register /usr/lib/binfmt.d/{name}.conf with the F flag \
         (`mount -t binfmt_misc binfmt_misc {BINFMT_MISC}` if it is not mounted, then write the file's line to \
         {BINFMT_MISC}/register)"
    )]
    NotRegistered {
        /// The platform built for.
        platform: String,
        /// The entry looked for.
        entry: PathBuf,
        /// The emulator's name (`qemu-aarch64`).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The qemu-user emulator name for a Go architecture.
fn qemu_name(architecture: &str) -> Option<&'static str> {
    Some(match architecture {
        "amd64" => "qemu-x86_64",
        "386" => "qemu-i386",
        "arm64" => "qemu-aarch64",
        "arm" => "qemu-arm",
        "ppc64le" => "qemu-ppc64le",
        "s390x" => "qemu-s390x",
        "riscv64" => "qemu-riscv64",
        "mips64le" => "qemu-mips64el",
        "loong64" => "qemu-loongarch64",
        _ => return None,
    })
}

/// Ok when programs of `platform` run here: natively, or through a registered emulator.
pub(crate) fn check(platform: &Platform) -> Result<(), EmulationError> {
    if platform.is_native() {
        return Ok(());
    }
    let Some(name) = qemu_name(&platform.architecture) else {
        return Err(EmulationError::Unknown { platform: platform.to_string(), host: Platform::host().to_string() });
    };
    let entry = PathBuf::from(BINFMT_MISC).join(name);
    let not_registered = |reason: String| EmulationError::NotRegistered {
        platform: platform.to_string(),
        entry: entry.clone(),
        name: name.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(&entry).map_err(|error| not_registered(format!("cannot read it: {error}")))?;
    if text.lines().next() != Some("enabled") {
        return Err(not_registered("it is disabled".into()));
    }
    let flags = text.lines().find_map(|line| line.strip_prefix("flags:")).unwrap_or("").trim();
    if !flags.contains('F') {
        return Err(not_registered(format!("its flags are {flags:?}, without F")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_needs_no_emulator_and_unknown_architectures_are_named() {
        assert!(check(&Platform::host()).is_ok());
        let unknown = Platform::parse("linux/vax").unwrap();
        assert!(check(&unknown).unwrap_err().to_string().contains("linux/vax"));
        assert_eq!(qemu_name("arm64"), Some("qemu-aarch64"));
    }
}
