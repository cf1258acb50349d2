//! layerwright: build reproducible OCI / Docker images from layer graphs declared in Rust.
//!
//! This is the crate users depend on. It re-exports the declaration API of `layerwright-dsl`
//! ([`Image`], [`Context`], the step types) and adds everything that does IO: the [`Builder`]
//! (solver, cache lookups, layer writing), base image import, and the exporters of a
//! [`BuiltImage`] (OCI layout, OCI archive, docker-archive).
//!
//! Features: `registry` (default) adds pushing to and pulling from registries
//! (`BuiltImage::push`, `Image::pull`; see `registry`), which brings tokio and TLS; `reapi`
//! (default) adds a shared step cache on a REAPI server ([`Builder::reapi`]), which brings
//! tonic (gRPC) and tokio; `cli`
//! (default) adds the command-line front (`cli`) with its progress display. A build script that
//! only writes images ([`build_rs`]) leaves both out. `testing` adds listings and diffs of images
//! for insta snapshot tests (`testing`), host helpers (`host`) and the test seams.
//!
//! Errors: every error a public function returns can be named and matched through [`error`].
//!
//! What it deliberately is not: a Dockerfile parser, a container runtime, or a daemon. Images
//! are Rust values; the output is files a real client (`docker load`, `skopeo`, `umoci`) reads.
//!
//! ```no_run
//! use layerwright::{Builder, Context, Image};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let context = Context::dir("app")?;
//! let image = Image::scratch()
//!     .copy(&context, "bin", "/app/bin")
//!     .entrypoint(["/app/bin/app"]);
//! let built = Builder::new("target/layerwright")?.build(&image)?;
//! built.write_docker_archive("app.tar", "app:latest")?;
//! println!("{}", built.manifest_digest());
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

// The facade and what is built on it (nothing below imports these).
mod build;
pub mod build_rs;
#[cfg(feature = "cli")]
pub mod cli;
pub mod error;
#[cfg(any(test, feature = "testing"))]
pub mod host;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(feature = "cli")]
pub mod watch;
#[cfg(feature = "reapi")]
pub mod worker;

// The rooms below the facade, top to bottom (see ARCHITECTURE.md).
mod attest;
mod base;
mod context;
// Used by the command line and the registry client only.
#[cfg(any(test, feature = "cli", feature = "registry"))]
mod error_text;
mod execution;
mod inspect;
mod layer;
mod oci;
mod output;
mod progress;
#[cfg(feature = "registry")]
pub mod registry;
mod remote_cache;
mod run;
#[cfg(any(feature = "registry", feature = "reapi"))]
mod runtime;
mod solve;
mod tree;

pub mod cache;

pub use build::{BuildError, Builder, BuilderOptions, BuiltImage, BuiltIndex, IndexOptions, LayerListing};
pub use cache::PrunePolicy;
pub use inspect::InspectOptions;
pub use layer::Compression;
pub use layerwright_dsl::*;
pub use oci::{Platform, PlatformError};
pub use output::{ExportError, LoadError, LoadReport};
pub use progress::{ProgressEvent, ProgressSink, StepHook, StepReport};
#[cfg(feature = "registry")]
pub use registry::{PushOptions, PushReport, RegistryError};
pub use remote_cache::{CacheExportReport, ReapiEndpoint, ReapiUploadReport, RemoteCacheReport, RemoteExecution};
pub use run::{MountError, RunError, SecretSource, SshSource};
pub use solve::StepError;

/// The building blocks of a build, exposed for the criterion micro-benchmarks of the hot paths
/// (context hashing, tar writing and compression) and the fuzz targets (base layer and archive
/// import). Not a stable API.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod internals {
    pub use crate::base::import_archive;
    pub use crate::context::{StatLookup, open_context, select};
    pub use crate::layer::{Content, EntryKind, LayerEntry, LayerOptions, index_layer, write_layer};
    pub use crate::tree::FsTree;
}

/// The facade's types are `Send + Sync` and own their data (DESIGN.md): checked at compile time.
const _: () = {
    const fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Builder>();
    send_sync::<BuiltImage>();
    send_sync::<Image>();
    send_sync::<Context>();
    send_sync::<BuildError>();
};
