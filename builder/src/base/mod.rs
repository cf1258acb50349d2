//! Base images: importing a docker-archive, OCI archive or OCI layout (`import`, reading members
//! in place through `archive`), and pulling one from a registry (`pull`). Either way the result
//! is a [`BaseImage`]: layers verified by digest and indexed, and the config document.
//!
//! What this folder deliberately does not know: steps, keys or the solver. It brings an image
//! into the store and says what it is; the solver decides when.

mod archive;
mod error;
mod import;
mod pull;

pub use error::ImportError;
#[cfg(feature = "testing")]
pub use import::import_archive;
pub use import::{BaseImage, archive_identity, import_archive_for_runs};
pub(crate) use pull::{PullError, fetch, identity};
