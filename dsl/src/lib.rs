//! The declaration API of layerwright: images as immutable graphs of layer steps.
//!
//! An [`Image`] is a cheaply cloned value (an `Arc` inside). Every method returns a new image
//! with one more step on top of its parent, exactly as each Dockerfile instruction adds one layer
//! or one config change. Nothing is built here: the `layerwright` crate walks the graph, keys each
//! step through `layerwright-cache` and executes the misses.
//!
//! This crate is deliberately pure data. It does no IO and no syscalls and knows about files on
//! disk only as paths: a [`Context`] holds a directory path and the builder opens it. It owns the
//! canonical, versioned byte encoding of each step ([`Step::encode`]) that the cache keys hash,
//! and the `.dockerignore` matcher ([`DockerIgnore`]), because both are part of what a step
//! *means*.
//!
//! ```
//! use layerwright_dsl::{Context, Image};
//!
//! let context = Context::dir("app").unwrap();
//! let image = Image::scratch()
//!     .copy(&context, "src", "/app/src")
//!     .write_file("/etc/app.conf", b"x=1\n")
//!     .symlink("/app/current", "/app/src")
//!     .env("RUST_LOG", "info")
//!     .entrypoint(["/app/bin/app"]);
//! assert_eq!(image.chain().len(), 6);
//! assert_eq!(image.step().label(), r#"ENTRYPOINT ["/app/bin/app"]"#);
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod context;
mod dockerignore;
mod encode;
mod image;
mod image_path;
mod step;

pub use context::Context;
pub use dockerignore::{DockerIgnore, DockerIgnoreError};
pub use encode::ENCODING_VERSION;
pub use image::{ExposedPort, Image};
pub use image_path::{ImagePathError, clean_lexically, normalize_context_path, normalize_image_path};
pub use step::{
    ConfigChange, CopyFromStep, CopyOptions, CopyStep, FileOptions, Limits, MkdirStep, Mount, MountSource, NetworkMode,
    Owner, Run, RunCommand, SSH_AGENT_TARGET, Sharing, Step, SymlinkStep, WriteFileStep,
};
