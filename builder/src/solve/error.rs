//! What went wrong inside one step ([`StepError`]), and a failed step as the walk reports it
//! ([`StepFailure`]: the step's label and its error).
//!
//! What it deliberately is not: the error of a whole build (`BuildError`, in the facade).

use std::path::PathBuf;

use layerwright_cache::{Digest, StoreError};
use layerwright_dsl::ImagePathError;
use thiserror::Error;

use crate::base::{ImportError, PullError};
use crate::context::ContextError;
use crate::execution::ExecutionError;
use crate::layer::recompress::RecompressError;
use crate::layer::{LayerError, TreeError};
use crate::run::RunError;
use crate::run::emulation::EmulationError;

/// What went wrong inside one step.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StepError {
    /// A path the step names is not a valid image path.
    #[error("path {path:?}: {source}")]
    Path {
        /// The path as declared.
        path: String,
        /// Why it is invalid.
        source: ImagePathError,
    },
    /// The build context could not be opened or walked.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// A base image archive could not be imported.
    #[error(transparent)]
    Import(#[from] ImportError),
    /// The step's layer could not be written.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// A layer could not be read or applied to the merged tree.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// The cache store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Remote execution was asked for ([`crate::BuilderOptions::reapi_execute`]) without a
    /// REAPI endpoint to execute on.
    #[error(
        "remote execution (`reapi_execute`, `--reapi-execute`) needs a REAPI endpoint: set one with \
         `Builder::reapi(URL, INSTANCE)` or `--reapi URL`"
    )]
    RemoteExecutionWithoutEndpoint,
    /// A `remove` names a path the image does not hold.
    #[error("{path:?} does not exist in the image")]
    NotInImage {
        /// The image path.
        path: String,
    },
    /// A `copy_from` names a path its source image does not hold.
    #[error("{path:?} does not exist in the source image")]
    NotInSourceImage {
        /// The path in the source image.
        path: String,
    },
    /// A step writes below something that is not a directory.
    #[error("cannot write below /{path}: it is a {kind} in the image, not a directory")]
    ParentNotDirectory {
        /// The image path that is not a directory.
        path: String,
        /// What it is (`file`, `symlink`, …).
        kind: &'static str,
    },
    /// A spool directory for extracted files could not be made.
    #[error("cannot create a temporary directory under {path}: {source}")]
    Spool {
        /// The directory it was to be made in.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A config blob in the cache does not parse.
    #[error("the cached config {digest} is unreadable: {reason}")]
    CorruptConfig {
        /// The config's digest.
        digest: Digest,
        /// What the JSON parser said.
        reason: String,
    },
    /// The step asks for something this version cannot do.
    #[error("{what} is not supported yet")]
    Unsupported {
        /// What it asks for.
        what: &'static str,
    },
    /// A RUN step failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// A RUN step's mounts are declared wrong (a relative, duplicate or `/` target, a kind not
    /// supported yet): found before anything executes.
    #[error(transparent)]
    Mount(#[from] crate::run::MountError),
    /// A base image could not be pulled.
    #[cfg(feature = "registry")]
    #[error(transparent)]
    Registry(Box<crate::registry::RegistryError>),
    /// A base image from a registry, in a build of layerwright without its `registry` feature.
    #[error("pulling {reference} needs the `registry` feature of layerwright, which this build of it leaves out")]
    RegistryDisabled {
        /// The reference to pull.
        reference: String,
    },
    /// An input's cache record vanished while the build ran.
    #[error("its input `{input}` was not built: its cache record vanished during the build; build again")]
    InputNotBuilt {
        /// The input step's label.
        input: String,
    },
    /// A RUN step for a foreign platform, on a machine that cannot run its programs.
    #[error(transparent)]
    Emulation(#[from] EmulationError),
    /// A cached layer could not be recompressed.
    #[error(transparent)]
    Recompress(#[from] RecompressError),
}

impl From<PullError> for StepError {
    fn from(error: PullError) -> StepError {
        match error {
            #[cfg(feature = "registry")]
            PullError::Registry(error) => StepError::Registry(error),
            #[cfg(not(feature = "registry"))]
            PullError::Disabled { reference } => StepError::RegistryDisabled { reference },
        }
    }
}

#[cfg(feature = "registry")]
impl From<crate::registry::RegistryError> for StepError {
    fn from(error: crate::registry::RegistryError) -> StepError {
        StepError::Registry(Box::new(error))
    }
}

impl From<ExecutionError> for StepError {
    fn from(error: ExecutionError) -> StepError {
        match error {
            ExecutionError::Layer(error) => StepError::Layer(error),
            ExecutionError::Tree(error) => StepError::Tree(error),
            ExecutionError::Store(error) => StepError::Store(error),
        }
    }
}

/// A step that failed: its label and what went wrong.
#[derive(Debug)]
pub(crate) struct StepFailure {
    pub step: String,
    pub source: Box<StepError>,
}

impl StepFailure {
    pub(crate) fn new(step: impl Into<String>, source: impl Into<StepError>) -> StepFailure {
        StepFailure { step: step.into(), source: Box::new(source.into()) }
    }
}
