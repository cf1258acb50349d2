//! The `Image::pull` base step, as the solver sees it: an identity for the step key (the digest
//! the reference names now) in the plan phase, and the image in the store in the execute phase.
//!
//! With the `registry` feature this goes through [`crate::registry`]; without it (a build script
//! that depends on layerwright with `default-features = false`) a pull is an error that says so.
//! It deliberately holds no logic of its own beyond that switch.

use layerwright_cache::Store;
use thiserror::Error;

use super::import::BaseImage;
use crate::oci::Platform;
use crate::progress::Progress;

/// Why a base image could not be pulled.
#[derive(Debug, Error)]
pub(crate) enum PullError {
    /// The registry refused, did not answer, or served something unusable.
    #[cfg(feature = "registry")]
    #[error(transparent)]
    Registry(Box<crate::registry::RegistryError>),
    /// This build of layerwright has no registry client.
    #[cfg(not(feature = "registry"))]
    #[error("pulling {reference} needs the `registry` feature of layerwright, which this build of it leaves out")]
    Disabled { reference: String },
}

/// What enters the step key of a pull: the digest the reference resolves to (`sha256:…`), so
/// that the key follows the digest and a moved tag is a miss.
///
/// Each digest a tag resolved to is remembered in the cache directory: when the registry does
/// not answer at all (offline, down), the last one is used with a warning, so that a build
/// whose steps are all cached does not fail for want of a network. A registry that answers
/// with an error (unknown tag, refused login) is still an error.
#[cfg(feature = "registry")]
pub(crate) fn identity(store: &Store, reference: &str, progress: &Progress) -> Result<Vec<u8>, PullError> {
    let remembered = store.root().join("resolved-tags").join(&blake3::hash(reference.as_bytes()).to_hex()[..32]);
    match crate::registry::resolve(reference) {
        Ok(digest) => {
            remember(store, &remembered, reference, &digest.to_string(), progress);
            Ok(digest.to_string().into_bytes())
        }
        Err(error @ crate::registry::RegistryError::Request { status: None, .. }) => {
            let last = std::fs::read_to_string(&remembered).ok().and_then(|text| {
                let (digest, named) = text.split_once('\n')?;
                (named == reference).then(|| layerwright_cache::Digest::parse(digest).ok()).flatten()
            });
            let Some(digest) = last else { return Err(error.into()) };
            progress.warn(None, format!("{error}; using {digest}, what {reference} named when last reached"));
            Ok(digest.to_string().into_bytes())
        }
        Err(error) => Err(error.into()),
    }
}

/// Records in `path` that `reference` resolved to `digest` (best effort: it only helps offline
/// builds). Written aside and renamed, so that a reader never sees half of it.
#[cfg(feature = "registry")]
fn remember(store: &Store, path: &std::path::Path, reference: &str, digest: &str, progress: &Progress) {
    let content = format!("{digest}\n{reference}");
    if std::fs::read_to_string(path).is_ok_and(|current| current == content) {
        return;
    }
    let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    let aside = store.tmp_dir().join(format!("resolved-{name}-{}", std::process::id()));
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&aside, content))
        .and_then(|()| std::fs::rename(&aside, path));
    if let Err(error) = written {
        progress.warn(None, format!("cannot remember the digest of a pulled tag in {}: {error}", path.display()));
    }
}

/// Fetches the image `identity` (from [`identity`]) of `reference` into `store`.
#[cfg(feature = "registry")]
pub(crate) fn fetch(
    store: &Store,
    reference: &str,
    identity: &[u8],
    platform: &Platform,
) -> Result<BaseImage, PullError> {
    // The plan may have added the platform after a NUL.
    let digest_bytes = identity.split(|byte| *byte == 0).next().unwrap_or_default();
    let digest = std::str::from_utf8(digest_bytes)
        .ok()
        .and_then(|text| layerwright_cache::Digest::parse(text).ok())
        .expect("the plan phase puts the resolved digest into the identity");
    let pulled = crate::registry::pull_image(store, reference, &digest, platform)?;
    Ok(BaseImage { layers: pulled.layers, indexes: pulled.indexes, config: pulled.config })
}

#[cfg(feature = "registry")]
impl From<crate::registry::RegistryError> for PullError {
    fn from(error: crate::registry::RegistryError) -> PullError {
        PullError::Registry(Box::new(error))
    }
}

#[cfg(not(feature = "registry"))]
pub(crate) fn identity(_store: &Store, reference: &str, _progress: &Progress) -> Result<Vec<u8>, PullError> {
    Err(PullError::Disabled { reference: reference.to_owned() })
}

#[cfg(not(feature = "registry"))]
pub(crate) fn fetch(
    _store: &Store,
    reference: &str,
    _identity: &[u8],
    _platform: &Platform,
) -> Result<BaseImage, PullError> {
    Err(PullError::Disabled { reference: reference.to_owned() })
}
