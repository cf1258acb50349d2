//! What can go wrong on the command line: a bad argument, an unknown or failing image, no
//! workspace, or the build, export, push or cache operation itself.

use std::path::PathBuf;

use layerwright_cache::StoreError;
use thiserror::Error;

use crate::{BuildError, ExportError};

/// Why a command-line build failed: a bad argument, or the build, export or push.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CliError {
    /// An output spec is not `oci:DIR`, `oci-archive:FILE` or `docker-archive:FILE`.
    #[error("invalid output {spec:?}: expected oci:DIR, oci-archive:FILE or docker-archive:FILE")]
    InvalidOutput {
        /// The spec as given.
        spec: String,
    },
    /// A compression name is not `gzip`, `zstd` or `none`.
    #[error("invalid compression {name:?}: expected gzip, zstd or none")]
    InvalidCompression {
        /// The name as given.
        name: String,
    },
    /// No image of that name was registered with [`crate::cli::Images`].
    #[error("unknown image {name:?}; the images are: {}", known.join(", "))]
    UnknownImage {
        /// The name as given.
        name: String,
        /// The names that are registered.
        known: Vec<String>,
    },
    /// The function that declares the image returned an error.
    #[error("declaring image {name}: {source}")]
    Declare {
        /// The image's name.
        name: String,
        /// What the declaring function returned.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No directory above the working directory holds a `Cargo.toml`.
    #[error("no Cargo.toml in {} or any directory above it: run this inside a cargo workspace", dir.display())]
    NoWorkspace {
        /// The directory the search started from.
        dir: PathBuf,
    },
    /// A file system operation of the command line itself failed (finding or entering the
    /// workspace, creating an output's directory).
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done (`creating`, `entering the workspace root`).
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The IO error from the operating system.
        source: std::io::Error,
    },
    /// Opening, measuring or pruning the cache directory failed.
    #[error("cache {}: {source}", path.display())]
    Cache {
        /// The cache directory.
        path: PathBuf,
        /// What the store reported.
        source: StoreError,
    },
    /// The build failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// Writing one of the outputs failed.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// Pushing the image to the registry failed.
    #[cfg(feature = "registry")]
    #[error(transparent)]
    Push(#[from] crate::registry::RegistryError),
    /// Loading the image into the Docker engine failed.
    #[error(transparent)]
    Load(#[from] crate::LoadError),
    /// The watch loop could not start or stopped.
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
    /// A docker-archive holds one image, and the build gives an image index (several platforms,
    /// or `--attest`).
    #[error(
        "{} cannot hold an image index (several platforms, or attestations): pick one with --platform and leave out \
         --attest, or write an OCI output (oci:DIR, oci-archive:FILE)",
        path.display()
    )]
    IndexDockerArchive {
        /// The docker-archive asked for.
        path: PathBuf,
    },
    /// `--load` of a multi-platform build whose platforms do not include this host's.
    #[error("--load loads the image for this host's platform, and --platform does not name it")]
    NoHostPlatform,
    /// A push was asked for, but this build of layerwright leaves out the `registry` feature.
    #[error("pushing to {reference} needs the `registry` feature of layerwright, which this build of it leaves out")]
    RegistryDisabled {
        /// The reference the image was to be pushed to.
        reference: String,
    },
}
