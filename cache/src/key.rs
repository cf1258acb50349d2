//! Step keys: blake3 over everything a step's output depends on.
//!
//! The builder feeds a [`StepKeyBuilder`] in a fixed order: the key format version, the step's
//! canonical encoding (`Step::encode`), the parent's key, the keys of `copy_from` sources, and
//! the digests and normalised metadata of the context files the step selects. Every field is
//! length-prefixed so that no two different input sequences hash alike. Mtimes never enter.
//!
//! This module only hashes what it is given. Which inputs a step has, and in which order, is
//! decided by the tracked query in the `db` module (and by the builder feeding it); a key is
//! not a content digest and never names a blob.

use std::fmt;

/// Version of the key layout *and of the bytes a step's result is made of* (tar headers,
/// compressor backend and settings): bump it whenever either changes, so that a cache filled by
/// an older layerwright is not served as if a new one had produced it. A hit must be
/// byte-identical to what a fresh build writes, or the same declaration would give different
/// digests on machines with different cache histories.
///
/// 2: gzip through flate2's zlib-rs backend, fed in fixed 128 KiB chunks.
/// 3: gzip as one member made of blocks compressed independently (each primed with the 32 KiB
///    before it, the pigz scheme), so that layers compress on every core; blocks end at entries
///    picked by a hash of their path (64-256 KiB), so that unchanged blocks can be reused.
/// 4: file steps' layers carry every parent directory of what they write (existing ones with
///    their mode and owner), and a copied directory's destination is created 0755 with the
///    copy's owner, as BuildKit's are (`cargo xtask conformance`).
/// 5: gzip at level 2 instead of 6: half the CPU for about 3 % more bytes (a 81 MB apt layer:
///    34.0 MB at level 6, 34.9 MB at level 2, compressed in 0.8 s instead of 1.6 s on one core).
pub const KEY_FORMAT_VERSION: u32 = 5;

/// The cache key of a step: 32 bytes of blake3 over everything the step's result depends on.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StepKey([u8; 32]);

impl StepKey {
    /// A builder that has hashed the key's domain and [`KEY_FORMAT_VERSION`]; feed it the
    /// step's inputs in a fixed order and [`finish`](StepKeyBuilder::finish) it.
    ///
    /// ```
    /// use layerwright_cache::StepKey;
    ///
    /// let key = StepKey::builder().str("COPY").bytes(&[1, 2]).optional_key(None).finish();
    /// assert_eq!(StepKey::from_hex(&key.to_hex()), Some(key));
    /// ```
    pub fn builder() -> StepKeyBuilder {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"layerwright step key");
        hasher.update(&KEY_FORMAT_VERSION.to_le_bytes());
        StepKeyBuilder { hasher }
    }

    /// The key as 64 lowercase hex digits, as action records are named.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key written as [`StepKey::to_hex`] writes it (64 lowercase hex digits); `None` for
    /// anything else, such as a record from a remote cache that is not a key.
    pub fn from_hex(text: &str) -> Option<StepKey> {
        if text.len() != 64 || text.bytes().any(|byte| byte.is_ascii_uppercase()) {
            return None;
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(StepKey(bytes))
    }
}

impl fmt::Display for StepKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.to_hex())
    }
}

impl fmt::Debug for StepKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "StepKey({})", &self.to_hex()[..16])
    }
}

/// Accumulates the inputs of one step key.
pub struct StepKeyBuilder {
    hasher: blake3::Hasher,
}

impl StepKeyBuilder {
    /// A length-prefixed field.
    pub fn bytes(mut self, bytes: &[u8]) -> StepKeyBuilder {
        self.hasher.update(&(bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
        self
    }

    /// A length-prefixed UTF-8 field.
    pub fn str(self, text: &str) -> StepKeyBuilder {
        self.bytes(text.as_bytes())
    }

    /// A fixed-width (8 bytes, little-endian) integer field.
    pub fn u64(mut self, value: u64) -> StepKeyBuilder {
        self.hasher.update(&value.to_le_bytes());
        self
    }

    /// Another key (a parent's or a source's), as a field.
    pub fn key(self, key: &StepKey) -> StepKeyBuilder {
        self.bytes(&key.0)
    }

    /// A tagged optional key, so that "no parent" and any parent's key never hash alike.
    pub fn optional_key(self, key: Option<&StepKey>) -> StepKeyBuilder {
        match key {
            None => self.u64(0),
            Some(key) => self.u64(1).key(key),
        }
    }

    /// The key of everything fed so far.
    pub fn finish(self) -> StepKey {
        StepKey(*self.hasher.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_length_prefixed() {
        let ab_c = StepKey::builder().str("ab").str("c").finish();
        let a_bc = StepKey::builder().str("a").str("bc").finish();
        assert_ne!(ab_c, a_bc);
        assert_eq!(ab_c, StepKey::builder().str("ab").str("c").finish());
        assert_ne!(StepKey::builder().optional_key(None).finish(), StepKey::builder().finish());
    }

    #[test]
    fn keys_round_trip_through_hex_and_nothing_else_parses() {
        let key = StepKey::builder().str("x").finish();
        assert_eq!(StepKey::from_hex(&key.to_hex()), Some(key));
        for bad in ["", "00", &key.to_hex().to_uppercase(), &format!("{}0", key.to_hex()), &"zz".repeat(32)] {
            assert_eq!(StepKey::from_hex(bad), None, "{bad:?}");
        }
    }
}
