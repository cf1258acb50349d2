//! OCI knowledge, once: media types, descriptors, platforms and the Rust → Go architecture
//! names, the image config and manifest documents, and the canonical JSON every document that
//! gets a digest is written in.
//!
//! What it deliberately is not: IO. Nothing here reads or writes a file or talks to a registry;
//! `base`, `output`, `registry` and `remote_cache` do, with these types.

pub mod canonical;
pub mod config;
pub mod descriptor;
pub mod media_types;
pub mod platform;

pub use descriptor::Descriptor;
pub use platform::{Platform, PlatformError};
