//! Image references (`[registry/]repository[:tag][@digest]`) and how to reach their registry.
//!
//! Parsing is Docker's (through `oci-client`): a first component with a `.` or a `:`, or
//! `localhost`, is a registry; otherwise the registry is Docker Hub and a one-component name is
//! in `library/`. A reference with neither tag nor digest means `:latest`.

use std::net::IpAddr;

use oci_client::Reference;

use super::RegistryError;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryReference {
    pub(crate) inner: Reference,
}

impl RegistryReference {
    /// Parses `reference` (`[registry/]repository[:tag][@digest]`) as Docker does.
    pub fn parse(reference: &str) -> Result<RegistryReference, RegistryError> {
        let invalid = |reason: String| RegistryError::InvalidReference { reference: reference.to_owned(), reason };
        if reference.trim() != reference || reference.is_empty() {
            return Err(invalid("it is empty or has surrounding whitespace".into()));
        }
        let inner: Reference = reference.parse().map_err(|error| invalid(format!("{error}")))?;
        Ok(RegistryReference { inner })
    }

    /// The registry as written (`127.0.0.1:5000`, `docker.io`).
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The host the requests go to (`index.docker.io` for `docker.io`).
    pub fn resolved_registry(&self) -> &str {
        self.inner.resolve_registry()
    }

    /// The repository (`team/app`, `library/busybox` for Docker Hub's `busybox`).
    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// The tag, if the reference has one.
    pub fn tag(&self) -> Option<&str> {
        self.inner.tag()
    }

    /// The digest (`sha256:…`), if the reference has one.
    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// The same repository, addressed by `digest`.
    pub fn with_digest(&self, digest: &str) -> RegistryReference {
        let inner = Reference::with_digest(self.registry().to_owned(), self.repository().to_owned(), digest.to_owned());
        RegistryReference { inner }
    }

    /// `registry/repository:tag` (or `@digest`), in full.
    pub fn whole(&self) -> String {
        self.inner.whole()
    }

    /// Whether the registry is on this machine: `localhost`, `127.0.0.0/8`, `::1`, with any
    /// port. Docker speaks plain HTTP to these without being told, and so does layerwright.
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(self.resolved_registry())
    }

    /// Whether to speak plain HTTP: loopback registries, `insecure`, or a registry listed in
    /// `LAYERWRIGHT_INSECURE_REGISTRIES` (comma-separated `host[:port]`).
    pub(crate) fn uses_plain_http(&self, insecure: bool) -> bool {
        if insecure || self.is_loopback() {
            return true;
        }
        let listed = std::env::var("LAYERWRIGHT_INSECURE_REGISTRIES").unwrap_or_default();
        listed.split(',').map(str::trim).any(|entry| !entry.is_empty() && entry == self.resolved_registry())
    }
}

/// `host`, `host:port`, `[v6]:port` or `v6`: is the host a loopback name or address?
fn is_loopback_host(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else if registry.matches(':').count() > 1 {
        registry // a bare IPv6 address
    } else {
        registry.split(':').next().unwrap_or_default()
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|address| address.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_docker_parses_them() {
        let local = RegistryReference::parse("127.0.0.1:5000/team/app:1.2").unwrap();
        assert_eq!((local.registry(), local.repository(), local.tag()), ("127.0.0.1:5000", "team/app", Some("1.2")));
        assert!(local.is_loopback());

        let hub = RegistryReference::parse("busybox").unwrap();
        assert_eq!((hub.registry(), hub.resolved_registry()), ("docker.io", "index.docker.io"));
        assert_eq!((hub.repository(), hub.tag()), ("library/busybox", Some("latest")));
        assert!(!hub.is_loopback());

        let pinned = RegistryReference::parse(
            "localhost:5000/app@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        )
        .unwrap();
        assert!(pinned.digest().is_some() && pinned.is_loopback());
        assert_eq!(
            pinned.with_digest("sha256:00").whole(),
            "localhost:5000/app@sha256:00",
            "with_digest keeps registry and repository"
        );

        for bad in ["", " app", "team/UPPER", "app:", "app@sha256:xyz"] {
            assert!(RegistryReference::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn only_loopback_hosts_are_loopback() {
        for host in ["localhost", "localhost:5000", "127.0.0.1:5000", "127.1.2.3", "[::1]:5000", "::1"] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in ["registry.example:5000", "10.0.0.1:5000", "localhost.example", "[fe80::1]:5000"] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
