//! Registries: pushing a built image and pulling a base image over the OCI distribution API.
//!
//! What it is: a blocking front over the `oci-client` crate. Tokio lives only in here: every
//! operation runs a current-thread runtime on a thread of its own, so callers (the rayon
//! solver, a build script, an async program) never see it and never nest runtimes.
//!
//! - **Push** (`BuiltImage::push`): asks the registry which blobs it already has
//!   (`HEAD /v2/<name>/blobs/<digest>`) and uploads only the others, each streamed from the store
//!   in 4 MiB chunks (`POST` an upload, `PATCH` each chunk with its `Content-Range`, `PUT
//!   ?digest=`), so no layer is ever whole in memory; then the manifest, unless the tag already
//!   names it. A [`PushReport`] counts what was uploaded and what was skipped.
//! - **Pull** (`Image::pull`, through the solver): the plan phase resolves a tag to the digest of
//!   what it names, so a step's key follows the digest and a moved tag is noticed;
//!   the execute phase fetches that manifest by digest (choosing this host's
//!   platform from an index), streams each blob the store lacks into it, verifying its digest,
//!   then checks every layer as an imported archive's layers are checked (diff ids, entries that
//!   would escape the root, writes through symlinks).
//! - **Remote cache** (`Builder::remote_cache`, module `cache`): step records shared between
//!   machines. Each writer (a cache directory) keeps one OCI artifact manifest under its own tag
//!   `TAG--lw-WRITER`, artifact type `application/vnd.layerwright.cache.v1`, whose layers are a
//!   JSON record batch (step key → layers and config) and every blob the records name; an OCI
//!   index at `TAG` lists the writers. Readers take the writers from the tag list, so writers
//!   exporting at once never lose each other's records. Cache requests give up sooner than
//!   pushes and pulls (5 s to connect, 20 s of silence, 60 s to read the records).
//! - **Transport**: registries on `localhost`, `127.0.0.0/8` or `::1` are spoken to in plain
//!   HTTP, as Docker does; every other registry over HTTPS (the platform's root certificates),
//!   unless [`PushOptions::insecure`] (or, for pulls, `LAYERWRIGHT_INSECURE_REGISTRIES`, a
//!   comma-separated list of `host[:port]`) says plain HTTP.
//! - **Credentials**: Docker's `config.json` (`$DOCKER_CONFIG` or `~/.docker`): a registry's
//!   `credHelpers` entry, then `credsStore`, then the base64 `auth` of `auths`; see
//!   [`credentials`]. Without an entry, requests are anonymous (bearer tokens are still fetched
//!   when the registry asks for them).
//!
//! What it deliberately is not: a registry mirror or a general OCI client. It pushes one
//! image manifest per call (indexes only for the remote cache; no cross-repository mounts, no
//! signatures) and pulls only
//! image manifests (OCI or Docker schema 2, possibly through an index); Docker schema 1 and
//! foreign layers are refused. Identity tokens (OAuth refresh tokens) in the Docker config are
//! not exchanged: such a registry is reported as needing a `docker login` with a password.
//!
//! Errors name the registry, the repository and, when the registry answered, the HTTP status.
//! `oci-client` reports some refusals only by their distribution error code (`BLOB_UNKNOWN`,
//! `DENIED`); their status is then the one the distribution spec fixes for that code.

pub(crate) mod client;
pub mod credentials;
mod pull;
mod push;
mod reference;

use std::fmt;
use std::path::PathBuf;

use layerwright_cache::{Digest, StoreError};
use thiserror::Error;

use crate::layer::TreeError;

pub(crate) use crate::oci::media_types;
pub use pull::PulledImage;
pub(crate) use pull::{fetch_blob, parse_digest, pull_image, resolve};
pub use push::{PushOptions, PushReport};
pub(crate) use push::{push, push_index, upload_missing_blobs};
pub use reference::RegistryReference;

/// What went wrong talking to a registry. Every variant names the registry; those about an
/// image also name the repository.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// An image reference could not be parsed, or is the wrong kind for the operation (a push
    /// needs a tag, not a digest).
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A request failed: refused by the registry (with its status) or not answered at all.
    #[error("registry {registry}, repository {repository}: {action}: {}", describe_failure(*status, detail))]
    Request {
        /// The registry as written in the reference (`127.0.0.1:5000`, `docker.io`).
        registry: String,
        /// The repository (`team/app`).
        repository: String,
        /// What the request was for (`downloading blob sha256:…`).
        action: String,
        /// The HTTP status of the answer, or `None` when there was none (a connection error or
        /// a timeout).
        status: Option<u16>,
        /// The registry's or the client's description of the failure.
        detail: String,
    },
    /// The registry sends its clients to a token service (`realm`) that is not HTTPS: the
    /// credentials for the registry are not sent there. Only a registry on this machine, or one
    /// marked insecure, may name a plain-HTTP realm.
    #[error(
        "registry {registry}: refusing to send its credentials to the token service {realm}, which is not HTTPS \
         (only a registry on this machine, or one marked insecure, may use a plain-HTTP token service)"
    )]
    InsecureTokenRealm {
        /// The registry as written in the reference.
        registry: String,
        /// The token service's URL, as the registry's challenge gave it.
        realm: String,
    },
    /// The Docker client configuration or a credential helper it names could not give the
    /// registry's credentials (an unreadable `config.json`, a failing helper, an identity token
    /// that needs a `docker login` with a password, …).
    #[error("registry {registry}: credentials from {origin}: {reason}")]
    Credentials {
        /// The registry the credentials are for.
        registry: String,
        /// Where they were looked for: the config file, the entry in it, or the helper program.
        origin: String,
        /// What went wrong.
        reason: String,
    },
    /// The registry answered with something layerwright cannot use (an unknown media type, an
    /// index without this platform, a document that is not what its digest says).
    #[error("registry {registry}, repository {repository}: {reason}")]
    Unusable {
        /// The registry as written in the reference.
        registry: String,
        /// The repository.
        repository: String,
        /// What is wrong with the answer.
        reason: String,
    },
    /// A blob could not be read from or written to the cache's store.
    #[error("registry {registry}, repository {repository}: blob {digest}: {source}")]
    Store {
        /// The registry as written in the reference.
        registry: String,
        /// The repository.
        repository: String,
        /// The blob's digest.
        digest: Digest,
        /// The store's error.
        source: Box<StoreError>,
    },
    /// A layer of a pulled image could not be indexed or stacked on the layers below it (an
    /// unsafe path, a diff id that does not match, a corrupt tar stream, …).
    #[error("registry {registry}, repository {repository}: {source}")]
    Layer {
        /// The registry as written in the reference.
        registry: String,
        /// The repository.
        repository: String,
        /// What was wrong with the layer.
        source: Box<TreeError>,
    },
    /// A blob of the image being pushed (its manifest, say) could not be read from the store.
    #[error("registry {registry}, repository {repository}: cannot read blob {path} to upload it: {source}")]
    ReadBlob {
        /// The registry as written in the reference.
        registry: String,
        /// The repository.
        repository: String,
        /// The blob's file in the store.
        path: PathBuf,
        /// The IO error from the operating system.
        source: Box<std::io::Error>,
    },
    /// The registry client could not be set up (its tokio runtime could not be started).
    #[error("cannot start the registry client: {reason}")]
    Client {
        /// What failed.
        reason: String,
    },
}

fn describe_failure(status: Option<u16>, detail: &str) -> String {
    match status {
        Some(status) => format!("HTTP {status}: {detail}"),
        None => format!("no HTTP answer: {detail}"),
    }
}

impl fmt::Display for PushReport {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "pushed {}@{}: {} blobs uploaded ({} bytes), {} already there, manifest {}",
            self.reference,
            self.manifest_digest,
            self.blobs_uploaded,
            self.bytes_uploaded,
            self.blobs_skipped,
            if self.manifest_uploaded { "uploaded" } else { "already tagged" }
        )
    }
}
