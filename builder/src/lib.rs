//! layerwright: build reproducible OCI / Docker images from layer graphs declared in Rust.
//!
//! This is the crate users depend on. It re-exports the declaration API of `layerwright-dsl`
//! ([`Image`], [`Context`], the step types) and adds everything that does IO: the [`Builder`]
//! (solver, cache lookups, layer writing), base image import, and the exporters of a
//! [`BuiltImage`] (OCI layout, OCI archive, docker-archive).
//!
//! Features: `registry` (default) adds pushing to and pulling from registries
//! (`BuiltImage::push`, `Image::pull`; see `registry`), which brings tokio and TLS; a build
//! script that only writes images ([`build_rs`]) leaves it out. `testing` adds listings and
//! diffs of images for insta snapshot tests (`testing`).
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

mod build;
pub mod build_rs;
pub mod cli;
mod config;
mod context;
mod export;
pub mod host;
mod import;
mod layer;
mod pull;
mod recompress;
#[cfg(feature = "registry")]
pub mod registry;
mod remote;
mod run;
mod solver;
mod steps;
#[cfg(feature = "testing")]
pub mod testing;
mod tree;

pub use build::{BuildError, Builder, BuilderOptions, BuiltImage, ProgressEvent, ProgressSink, StepError, StepReport};
pub use export::ExportError;
pub use layer::Compression;
pub use layerwright_cache as cache;
pub use layerwright_dsl::*;
pub use remote::{CacheExportReport, RemoteCacheReport};
pub use run::RunError;

/// The building blocks of a build, exposed for the criterion micro-benchmarks of the hot paths
/// (context hashing, tar writing and compression) and the fuzz targets (base layer and archive
/// import). Not a stable API.
#[doc(hidden)]
pub mod internals {
    pub use crate::context::{StatLookup, open_context, select};
    pub use crate::import::import_archive;
    pub use crate::layer::{Content, EntryKind, LayerEntry, LayerOptions, write_layer};
    pub use crate::tree::{FsTree, index_layer};
}
#[cfg(feature = "registry")]
pub use registry::{PushOptions, PushReport, RegistryError};
