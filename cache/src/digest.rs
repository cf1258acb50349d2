//! OCI content digests (`sha256:<64 hex>`) and a writer that computes one while bytes pass.
//!
//! Deliberately sha256 only, and not a general OCI digest type: other algorithms are refused
//! rather than carried, so a digest can always name a file under `blobs/sha256/`. Nothing here
//! reads or writes the store; [`crate::Store`] uses these to name what it holds.

use std::fmt;
use std::io::{self, Write};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// Why a text is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DigestError {
    /// Not `sha256:` followed by 64 lowercase hex digits (or, for [`Digest::from_hex`], not the
    /// 64 digits alone).
    #[error("digest {digest:?} is not of the form sha256:<64 lowercase hex digits>")]
    Malformed {
        /// The text that was refused.
        digest: String,
    },
}

/// A validated `sha256:<hex>` digest. Only sha256 is accepted: it is what every client writes,
/// and refusing the rest keeps a crafted digest from naming a path outside `blobs/sha256`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex digits>`.
    ///
    /// # Errors
    ///
    /// [`DigestError::Malformed`] for anything else, other algorithms included.
    ///
    /// ```
    /// use layerwright_cache::Digest;
    ///
    /// let empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    /// assert_eq!(Digest::parse(empty)?, Digest::of_bytes(b""));
    /// assert!(Digest::parse("sha512:00").is_err());
    /// # Ok::<(), layerwright_cache::DigestError>(())
    /// ```
    pub fn parse(digest: &str) -> Result<Digest, DigestError> {
        let malformed = || DigestError::Malformed { digest: digest.to_owned() };
        let hex = digest.strip_prefix("sha256:").ok_or_else(malformed)?;
        Digest::from_hex(hex).map_err(|_| malformed())
    }

    /// The digest whose 64 lowercase hex digits are `hex` (a file name under `blobs/sha256/`).
    ///
    /// # Errors
    ///
    /// [`DigestError::Malformed`] when `hex` is not exactly 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Result<Digest, DigestError> {
        let valid = hex.len() == 64 && hex.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return Err(DigestError::Malformed { digest: hex.to_owned() });
        }
        Ok(Digest { hex: hex.to_owned() })
    }

    /// The sha256 digest of `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> Digest {
        Digest { hex: hex::encode(Sha256::digest(bytes)) }
    }

    /// The 64 hex digits, as used for file names under `blobs/sha256/`.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "sha256:{}", self.hex)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Digest, D::Error> {
        let text = String::deserialize(deserializer)?;
        Digest::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Passes bytes on to `inner` while hashing and counting them.
///
/// ```
/// use std::io::Write;
/// use layerwright_cache::{Digest, Sha256Writer};
///
/// let mut writer = Sha256Writer::new(Vec::new());
/// writer.write_all(b"hello")?;
/// let (digest, size, bytes) = writer.finish();
/// assert_eq!((digest, size, bytes), (Digest::of_bytes(b"hello"), 5, b"hello".to_vec()));
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Sha256Writer<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Sha256Writer<W> {
    /// A writer passing everything on to `inner`, having hashed nothing yet.
    pub fn new(inner: W) -> Sha256Writer<W> {
        Sha256Writer { inner, hasher: Sha256::new(), written: 0 }
    }

    /// How many bytes were written (and hashed) so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The inner writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The inner writer, mutably. Bytes written to it directly are not hashed.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The digest and size of everything written, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        let digest = Digest { hex: hex::encode(self.hasher.finalize()) };
        (digest, self.written, self.inner)
    }
}

impl<W: Write> Write for Sha256Writer<W> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buffer)?;
        self.hasher.update(&buffer[..written]);
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_only_sha256_hex() {
        let empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(Digest::parse(empty).unwrap().to_string(), empty);
        assert_eq!(Digest::of_bytes(b"").to_string(), empty);
        for bad in [
            "sha512:ab",
            "sha256:../../etc",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn writer_hashes_what_passes() {
        let mut writer = Sha256Writer::new(Vec::new());
        writer.write_all(b"hello").unwrap();
        let (digest, size, inner) = writer.finish();
        assert_eq!(digest, Digest::of_bytes(b"hello"));
        assert_eq!(size, 5);
        assert_eq!(inner, b"hello");
    }
}
