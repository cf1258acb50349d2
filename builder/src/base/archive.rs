//! Reading the members of a base archive in place: an OCI layout directory, or a tar whose
//! headers are scanned once to learn where each member's bytes start (a member is then read by
//! seeking there, following symlinks and hard links a bounded number of hops).
//!
//! What it deliberately is not: an image reader. It knows names and bytes, not manifests.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use layerwright_cache::{Digest, Store, StoreError};

use super::error::ImportError;
use crate::layer::Compression;

// ---------------------------------------------------------------------------------------------
// Reading members of a layout directory or a tar, in place

/// Documents (index, manifests, configs) are read whole; anything bigger than this is not one.
const MAX_DOCUMENT_BYTES: u64 = 16 << 20;

/// How many symlinks or hard links may be followed to reach a tar member's data.
const MAX_LINK_HOPS: usize = 16;

/// An archive opened for reading members by name (`index.json`, `blobs/sha256/<hex>`, …).
pub(super) struct Archive {
    pub(super) path: PathBuf,
    pub(super) storage: Storage,
}

pub(super) enum Storage {
    /// An OCI layout directory: member names are paths below it. Only fixed names and
    /// `blobs/sha256/<validated hex>` are ever joined, so no name can leave the directory.
    Directory,
    /// A tar file: where each member's bytes are, from one scan of its headers.
    Tar { members: BTreeMap<String, TarMember> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TarMember {
    Data {
        offset: u64,
        size: u64,
    },
    /// A symlink; its target is relative to the link's directory (or to the root if absolute).
    Symlink {
        target: String,
    },
    /// A hard link; its target is a member name.
    HardLink {
        target: String,
    },
}

impl Archive {
    pub(super) fn open(path: &Path) -> Result<Archive, ImportError> {
        let metadata = fs::metadata(path).map_err(|source| ImportError::Open { archive: path.to_owned(), source })?;
        if metadata.is_dir() {
            return Ok(Archive { path: path.to_owned(), storage: Storage::Directory });
        }
        let members = scan_tar(path)?;
        Ok(Archive { path: path.to_owned(), storage: Storage::Tar { members } })
    }

    pub(super) fn is_tar(&self) -> bool {
        matches!(self.storage, Storage::Tar { .. })
    }

    pub(super) fn contains(&self, entry: &str) -> bool {
        match &self.storage {
            Storage::Directory => self.path.join(entry).is_file(),
            Storage::Tar { members } => resolve_tar_member(members, entry).is_some(),
        }
    }

    /// A reader of one member's bytes.
    pub(super) fn open_member(&self, entry: &str) -> Result<Box<dyn Read>, ImportError> {
        let missing = || self.invalid(format!("it has no member {entry}"));
        match &self.storage {
            Storage::Directory => {
                let file = File::open(self.path.join(entry)).map_err(|source| match source.kind() {
                    io::ErrorKind::NotFound => missing(),
                    _ => self.read_error(entry, source),
                })?;
                Ok(Box::new(file))
            }
            Storage::Tar { members } => {
                let (offset, size) = resolve_tar_member(members, entry).ok_or_else(missing)?;
                let mut file = File::open(&self.path)
                    .map_err(|source| ImportError::Open { archive: self.path.clone(), source })?;
                file.seek(SeekFrom::Start(offset)).map_err(|source| self.read_error(entry, source))?;
                Ok(Box::new(BufReader::with_capacity(256 * 1024, file.take(size))))
            }
        }
    }

    /// A small member (index, manifest, config) read whole.
    pub(super) fn read_document(&self, entry: &str) -> Result<Vec<u8>, ImportError> {
        let mut bytes = Vec::new();
        self.open_member(entry)?
            .take(MAX_DOCUMENT_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| self.read_error(entry, source))?;
        if bytes.len() as u64 > MAX_DOCUMENT_BYTES {
            return Err(self
                .invalid(format!("{entry} is larger than {MAX_DOCUMENT_BYTES} bytes, too large for a JSON document")));
        }
        Ok(bytes)
    }

    /// A small member read whole, refused unless it hashes to `digest`.
    pub(super) fn read_verified_document(&self, entry: &str, digest: &Digest) -> Result<Vec<u8>, ImportError> {
        let bytes = self.read_document(entry)?;
        let actual = Digest::of_bytes(&bytes);
        if actual != *digest {
            return Err(self.digest_mismatch(entry, digest, &actual));
        }
        Ok(bytes)
    }

    /// Copies `reader` (the bytes of `entry`) into the store, verified against `expected` when
    /// given. Errors name the member: a read failure is told apart from a store failure by
    /// watching the reader.
    pub(super) fn store_member(
        &self,
        store: &Store,
        entry: &str,
        reader: &mut dyn Read,
        expected: Option<&Digest>,
    ) -> Result<layerwright_cache::BlobInfo, ImportError> {
        let mut watched = WatchedReader { inner: reader, failure: None };
        let result = match expected {
            Some(expected) => store.import_blob(&mut watched, expected),
            None => store.blob_writer().and_then(|mut writer| {
                let tmp = store.tmp_dir();
                io::copy(&mut watched, &mut writer).map_err(|source| StoreError::Io {
                    action: "copy blob into",
                    path: tmp,
                    source,
                })?;
                writer.commit()
            }),
        };
        result.map_err(|error| {
            if let Some(source) = watched.failure.take() {
                return self.read_error(entry, source);
            }
            match error {
                StoreError::DigestMismatch { expected, actual } => self.digest_mismatch(entry, &expected, &actual),
                other => ImportError::Store(other),
            }
        })
    }

    pub(super) fn parse_json<T: serde::de::DeserializeOwned>(
        &self,
        bytes: &[u8],
        entry: &str,
    ) -> Result<T, ImportError> {
        serde_json::from_slice(bytes).map_err(|error| self.invalid(format!("{entry} is not valid: {error}")))
    }

    pub(super) fn parse_digest(&self, text: &str, entry: &str) -> Result<Digest, ImportError> {
        Digest::parse(text)
            .map_err(|error| self.invalid(format!("{entry}: {error} (only sha256 digests are supported)")))
    }

    pub(super) fn invalid(&self, reason: impl Into<String>) -> ImportError {
        ImportError::Invalid { archive: self.path.clone(), reason: reason.into() }
    }

    pub(super) fn read_error(&self, entry: &str, source: io::Error) -> ImportError {
        ImportError::Read { archive: self.path.clone(), entry: entry.to_owned(), source }
    }

    pub(super) fn digest_mismatch(&self, entry: &str, expected: &Digest, actual: &Digest) -> ImportError {
        ImportError::DigestMismatch {
            archive: self.path.clone(),
            entry: entry.to_owned(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        }
    }
}

/// A reader that keeps the first error it returned, so that a failed copy can be blamed on
/// the member being read rather than on the store being written.
struct WatchedReader<'a> {
    inner: &'a mut dyn Read,
    failure: Option<io::Error>,
}

impl Read for WatchedReader<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buffer).inspect_err(|error| {
            if self.failure.is_none() {
                self.failure = Some(io::Error::new(error.kind(), error.to_string()));
            }
        })
    }
}

/// Reads a tar's headers once (seeking over member data) and records where each member's
/// bytes are. Names are normalised (`./a//b/` → `a/b`); a later member of the same name wins,
/// as when a tar is extracted.
pub(super) fn scan_tar(path: &Path) -> Result<BTreeMap<String, TarMember>, ImportError> {
    let invalid = |reason: String| ImportError::Invalid { archive: path.to_owned(), reason };
    let open_error = |source| ImportError::Open { archive: path.to_owned(), source };
    let mut file = File::open(path).map_err(open_error)?;
    let mut magic = [0u8; 4];
    let magic_length = read_up_to(&mut file, &mut magic).map_err(open_error)?;
    if compression_of_magic(&magic[..magic_length]) != Compression::None {
        return Err(invalid(
            "it is a compressed file; layerwright reads uncompressed tars in place, so decompress it first \
             (for example `gunzip -k` or `zstd -d`)"
                .into(),
        ));
    }
    file.seek(SeekFrom::Start(0)).map_err(open_error)?;

    let not_a_tar = |error: io::Error| {
        invalid(format!(
            "it is neither an OCI image layout directory nor a readable tar archive (docker-archive or \
             OCI archive): {error}"
        ))
    };
    let mut tar = tar::Archive::new(BufReader::new(file));
    let mut members = BTreeMap::new();
    for entry in tar.entries_with_seek().map_err(not_a_tar)? {
        let entry = entry.map_err(not_a_tar)?;
        let name = normalise_member_name(&String::from_utf8_lossy(&entry.path_bytes()));
        let link_target = || entry.link_name_bytes().map(|target| String::from_utf8_lossy(&target).into_owned());
        let member = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                TarMember::Data { offset: entry.raw_file_position(), size: entry.size() }
            }
            tar::EntryType::Symlink => TarMember::Symlink { target: link_target().unwrap_or_default() },
            tar::EntryType::Link => {
                TarMember::HardLink { target: normalise_member_name(&link_target().unwrap_or_default()) }
            }
            // Directories and anything else hold no member bytes.
            _ => continue,
        };
        members.insert(name, member);
    }
    if members.is_empty() {
        return Err(invalid("it is an empty tar, or not a tar at all".into()));
    }
    Ok(members)
}

/// Follows symlinks and hard links inside the tar to a member with data: its offset and size.
pub(super) fn resolve_tar_member(members: &BTreeMap<String, TarMember>, entry: &str) -> Option<(u64, u64)> {
    let mut current = normalise_member_name(entry);
    for _ in 0..MAX_LINK_HOPS {
        current = match members.get(&current)? {
            TarMember::Data { offset, size } => return Some((*offset, *size)),
            TarMember::HardLink { target } => target.clone(),
            TarMember::Symlink { target } if target.starts_with('/') => normalise_member_name(target),
            TarMember::Symlink { target } => {
                let directory = current.rsplit_once('/').map_or("", |(directory, _)| directory);
                normalise_member_name(&format!("{directory}/{target}"))
            }
        };
    }
    None
}

/// `./a//b/../c/` → `a/c`. Only used as a lookup key among the tar's own members, never as a
/// filesystem path, so resolving `..` lexically is safe.
pub(super) fn normalise_member_name(name: &str) -> String {
    layerwright_dsl::clean_lexically(name)
}

pub(super) fn compression_of_magic(magic: &[u8]) -> Compression {
    match magic {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        _ => Compression::None,
    }
}

/// Reads until `buffer` is full or the reader ends; returns how much was read.
pub(super) fn read_up_to(reader: &mut dyn Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}
