//! The builder: keys each step, looks it up in the store, executes the misses, and assembles
//! the manifest and config of the result.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use layerwright_cache::{Digest, LayerRecord, Store};
use thiserror::Error;

use crate::export::ExportError;
use crate::layer::Compression;
use crate::Image;

/// Why a build failed. Every variant names the step (its label) and, where there is one, the
/// path.
#[derive(Debug, Error)]
pub enum BuildError {
    #[error("cache directory {path}: {source}")]
    Cache { path: PathBuf, source: layerwright_cache::StoreError },
    #[error("step {step}: {message}")]
    Step { step: String, message: String },
}

/// Options of a [`Builder`].
#[derive(Debug, Clone, Default)]
pub struct BuilderOptions {
    pub compression: Compression,
    /// The mtime of every layer entry and the `created` time of the config; defaults to
    /// `SOURCE_DATE_EPOCH` when set, else 0.
    pub source_date_epoch: Option<u64>,
}

/// What happened to one step of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    pub label: String,
    pub cached: bool,
    pub duration: Duration,
    /// The digest of the layer the step added, for steps that add one.
    pub layer: Option<String>,
}

/// Builds images into a persistent cache directory.
#[derive(Debug, Clone)]
pub struct Builder {
    store: Store,
    options: BuilderOptions,
}

impl Builder {
    pub fn new(cache_dir: impl AsRef<Path>) -> Result<Builder, BuildError> {
        Builder::with_options(cache_dir, BuilderOptions::default())
    }

    pub fn with_options(cache_dir: impl AsRef<Path>, options: BuilderOptions) -> Result<Builder, BuildError> {
        let path = cache_dir.as_ref();
        let store = Store::open(path).map_err(|source| BuildError::Cache { path: path.to_owned(), source })?;
        Ok(Builder { store, options })
    }

    pub fn build(&self, image: &Image) -> Result<BuiltImage, BuildError> {
        let _ = image;
        todo!()
    }

    pub fn build_all(&self, images: &[&Image]) -> Result<Vec<BuiltImage>, BuildError> {
        images.iter().map(|image| self.build(image)).collect()
    }
}

#[derive(Debug)]
struct BuiltInner {
    store: Store,
    manifest: Digest,
    manifest_size: u64,
    config: Digest,
    layers: Vec<LayerRecord>,
    steps: Vec<StepReport>,
}

/// A built image: its manifest, config and layers are in the cache store. Outlives the
/// [`Builder`] that made it; cheap to clone.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    inner: Arc<BuiltInner>,
}

impl BuiltImage {
    /// `sha256:…` of the image manifest.
    pub fn manifest_digest(&self) -> String {
        self.inner.manifest.to_string()
    }

    pub fn config_digest(&self) -> String {
        self.inner.config.to_string()
    }

    pub fn layers(&self) -> &[LayerRecord] {
        &self.inner.layers
    }

    pub fn steps(&self) -> &[StepReport] {
        &self.inner.steps
    }

    fn parts(&self) -> crate::export::ImageParts<'_> {
        crate::export::ImageParts {
            store: &self.inner.store,
            manifest: &self.inner.manifest,
            manifest_size: self.inner.manifest_size,
            config: &self.inner.config,
            layers: &self.inner.layers,
        }
    }

    pub fn write_oci_layout(&self, dir: impl AsRef<Path>, tag: &str) -> Result<(), ExportError> {
        crate::export::write_oci_layout(self.parts(), dir.as_ref(), tag)
    }

    pub fn write_oci_archive(&self, file: impl AsRef<Path>, tag: &str) -> Result<(), ExportError> {
        crate::export::write_oci_archive(self.parts(), file.as_ref(), tag)
    }

    pub fn write_docker_archive(&self, file: impl AsRef<Path>, tag: &str) -> Result<(), ExportError> {
        crate::export::write_docker_archive(self.parts(), file.as_ref(), tag)
    }

    /// A stable text listing of the final filesystem, one line per path, for insta.
    pub fn listing(&self) -> Result<String, BuildError> {
        todo!()
    }
}
