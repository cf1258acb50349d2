//! Every error a public function of layerwright can return, in one place to name and match.
//!
//! The types are defined next to the code that raises them (a step's errors in the solver, a
//! RUN step's in the runner, …); this module only gathers them. It sits at the top with the
//! facade: nothing below imports it.
//!
//! What it deliberately is not: a single catch-all error type. A build fails with
//! [`BuildError`], whose `Step` variant carries the step's label and a [`StepError`] saying
//! what went wrong in it.

pub use crate::attest::AttestError;
pub use crate::base::ImportError;
pub use crate::build::BuildError;
pub use crate::build_rs::BuildRsError;
#[cfg(feature = "cli")]
pub use crate::cli::CliError;
pub use crate::context::ContextError;
pub use crate::execution::ExecutionError;
pub use crate::layer::recompress::RecompressError;
pub use crate::layer::snapshot::SnapshotError;
pub use crate::layer::{LayerError, TreeError};
pub use crate::oci::PlatformError;
pub use crate::output::{ExportError, LoadError};
#[cfg(feature = "registry")]
pub use crate::registry::RegistryError;
pub use crate::run::emulation::EmulationError;
pub use crate::run::{MountError, OverlayError, RunError, SandboxError, SpecError, UpperError};
pub use crate::solve::StepError;
pub use layerwright_cache::{DigestError, StoreError};
pub use layerwright_dsl::{DockerIgnoreError, ImagePathError};
