//! Platforms (`os/architecture[/variant]`) in OCI terms, and the one mapping from Rust's
//! architecture names to Go's (`GOARCH`), which OCI uses.
//!
//! What it deliberately is not: a matcher with every rule of containerd's; a platform matches
//! another when os and architecture are equal and, if both name a variant, the variants too.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a platform string does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PlatformError {
    /// It is not `os/architecture` or `os/architecture/variant` with non-empty parts.
    #[error("invalid platform {text:?}: expected os/architecture[/variant], like linux/arm64 or linux/arm/v7")]
    Invalid {
        /// The text given.
        text: String,
    },
}

/// A platform as an image index names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    /// `linux`, …
    pub os: String,
    /// A `GOARCH` name: `amd64`, `arm64`, `arm`, `386`, `ppc64le`, `loong64`, …
    pub architecture: String,
    /// A CPU variant (`v7` for arm, `v8` for arm64), when one is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/architecture[/variant]` (`linux/amd64`, `linux/arm64`, `linux/arm/v7`).
    /// Architectures are Go's names (`amd64`, not `x86_64`).
    ///
    /// ```
    /// let platform = layerwright::Platform::parse("linux/arm/v7")?;
    /// assert_eq!((platform.architecture.as_str(), platform.variant.as_deref()), ("arm", Some("v7")));
    /// assert!(layerwright::Platform::parse("arm64").is_err());
    /// # Ok::<(), layerwright::PlatformError>(())
    /// ```
    pub fn parse(text: &str) -> Result<Platform, PlatformError> {
        let invalid = || PlatformError::Invalid { text: text.to_owned() };
        let parts: Vec<&str> = text.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|part| part.trim().is_empty() || part.contains(' ')) {
            return Err(invalid());
        }
        Ok(Platform {
            os: parts[0].to_owned(),
            architecture: parts[1].to_owned(),
            variant: parts.get(2).map(|variant| (*variant).to_owned()),
        })
    }

    /// Whether code for this platform runs on this host without emulation (same os and
    /// architecture).
    pub fn is_native(&self) -> bool {
        let host = Platform::host();
        self.os == host.os && self.architecture == host.architecture
    }

    /// The platform of this host: the platform of the binaries a declaration copies in.
    pub fn host() -> Platform {
        let (architecture, variant) = go_architecture(std::env::consts::ARCH);
        Platform { os: "linux".into(), architecture: architecture.into(), variant: variant.map(str::to_owned) }
    }

    /// Whether an image for `offered` runs here: same os and architecture, and the same variant
    /// when both name one.
    pub fn accepts(&self, offered: &Platform) -> bool {
        self.os == offered.os
            && self.architecture == offered.architecture
            && match (&self.variant, &offered.variant) {
                (Some(wanted), Some(offered)) => wanted == offered,
                _ => true,
            }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(formatter, "/{variant}")?;
        }
        Ok(())
    }
}

/// The `GOARCH` name (and the default variant, where Go has one) of a Rust architecture name.
pub fn go_architecture(rust_architecture: &str) -> (&str, Option<&'static str>) {
    match rust_architecture {
        "x86_64" => ("amd64", None),
        "x86" => ("386", None),
        "aarch64" => ("arm64", Some("v8")),
        "arm" => ("arm", Some("v7")),
        "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
        "powerpc64" => ("ppc64", None),
        "loongarch64" => ("loong64", None),
        "mips64" if cfg!(target_endian = "little") => ("mips64le", None),
        other => (other, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_architectures_map_to_go_names() {
        for (rust, go) in [("x86_64", "amd64"), ("aarch64", "arm64"), ("x86", "386"), ("loongarch64", "loong64")] {
            assert_eq!(go_architecture(rust).0, go);
        }
        assert_eq!(go_architecture("riscv64"), ("riscv64", None));
    }

    #[test]
    fn variants_match_only_when_both_name_one() {
        let arm64 = |variant: Option<&str>| Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: variant.map(str::to_owned),
        };
        assert!(arm64(Some("v8")).accepts(&arm64(None)));
        assert!(arm64(None).accepts(&arm64(Some("v8"))));
        assert!(!arm64(Some("v8")).accepts(&arm64(Some("v9"))));
        assert_eq!(arm64(Some("v8")).to_string(), "linux/arm64/v8");
    }
}
