//! The `Image::pull` base step, as the solver sees it: an identity for the step key (the digest
//! the reference names now) in the plan phase, and the image in the store in the execute phase.
//!
//! With the `registry` feature this goes through [`crate::registry`]; without it (a build script
//! that depends on layerwright with `default-features = false`) a pull is an error that says so.
//! It deliberately holds no logic of its own beyond that switch.

use layerwright_cache::Store;

use crate::build::StepError;
use crate::import::BaseImage;

/// What enters the step key of a pull: the digest the reference resolves to (`sha256:…`), so
/// that the key follows the digest and a moved tag is a miss.
#[cfg(feature = "registry")]
pub(crate) fn identity(reference: &str) -> Result<Vec<u8>, StepError> {
    Ok(crate::registry::resolve(reference)?.to_string().into_bytes())
}

/// Fetches the image `identity` (from [`identity`]) of `reference` into `store`.
#[cfg(feature = "registry")]
pub(crate) fn fetch(store: &Store, reference: &str, identity: &[u8]) -> Result<BaseImage, StepError> {
    let digest = std::str::from_utf8(identity)
        .ok()
        .and_then(|text| layerwright_cache::Digest::parse(text).ok())
        .expect("the plan phase puts the resolved digest into the identity");
    let pulled = crate::registry::pull_image(store, reference, &digest)?;
    Ok(BaseImage { layers: pulled.layers, indexes: pulled.indexes, config: pulled.config })
}

#[cfg(feature = "registry")]
impl From<crate::registry::RegistryError> for StepError {
    fn from(error: crate::registry::RegistryError) -> StepError {
        StepError::Registry(Box::new(error))
    }
}

#[cfg(not(feature = "registry"))]
pub(crate) fn identity(reference: &str) -> Result<Vec<u8>, StepError> {
    Err(StepError::RegistryDisabled { reference: reference.to_owned() })
}

#[cfg(not(feature = "registry"))]
pub(crate) fn fetch(_store: &Store, reference: &str, _identity: &[u8]) -> Result<BaseImage, StepError> {
    Err(StepError::RegistryDisabled { reference: reference.to_owned() })
}
