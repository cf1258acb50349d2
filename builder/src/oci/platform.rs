//! Platforms (`os/architecture[/variant]`) in OCI terms, and the one mapping from Rust's
//! architecture names to Go's (`GOARCH`), which OCI uses.
//!
//! What it deliberately is not: a matcher with every rule of containerd's; a platform matches
//! another when os and architecture are equal and, if both name a variant, the variants too.

use std::fmt;

use serde::{Deserialize, Serialize};

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
