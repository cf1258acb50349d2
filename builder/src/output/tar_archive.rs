//! Tar archives of a layout (OCI archive, docker-archive): reproducible headers, blobs streamed
//! from the store, and an archive that already holds exactly these members left untouched.
//!
//! What it deliberately is not: a layer writer (layers are written by `crate::layer`).

use std::collections::BTreeMap;
use std::fs::{self};
use std::io::{Read, Write};
use std::path::Path;

use layerwright_cache::Digest;

use super::blobs::*;
use super::documents::*;
use super::tags::ImageReference;
use super::{ExportError, Exported};
use crate::oci::canonical::to_bytes as canonical_json;
use crate::oci::media_types;

/// The unit of a tar archive: headers take one block, content is padded to whole blocks.
const TAR_BLOCK: u64 = 512;

/// What one member of an archive is made of.
pub(super) enum TarMember {
    Directory,
    Document(Vec<u8>),
    Blob { digest: Digest, size: u64 },
}

/// Writes the OCI layout of the image (plus `extra` documents at the top) as a tar, members
/// sorted by name, streamed from the store into a temp file renamed to `file`.
pub(super) fn write_layout_tar(
    exported: Exported<'_>,
    reference: &ImageReference,
    file: &Path,
    extra: BTreeMap<String, Vec<u8>>,
) -> Result<(), ExportError> {
    let index =
        merged_index(None, manifest_descriptor(exported, reference), &reference.tag).expect("a fresh index merges");
    let mut members: BTreeMap<String, TarMember> = BTreeMap::from([
        ("blobs/".to_owned(), TarMember::Directory),
        ("blobs/sha256/".to_owned(), TarMember::Directory),
        ("index.json".to_owned(), TarMember::Document(canonical_json(&index))),
        ("oci-layout".to_owned(), TarMember::Document(media_types::OCI_LAYOUT_CONTENT.to_vec())),
    ]);
    for (digest, size) in blob_sizes(exported)? {
        members.insert(blob_member(&digest), TarMember::Blob { digest, size });
    }
    for (name, bytes) in extra {
        members.insert(name, TarMember::Document(bytes));
    }

    if archive_already_holds(file, &members) {
        return Ok(());
    }
    // Written by hand rather than through `tar::Builder`, so that blob content can go from
    // the store into the archive file without passing through this process (`copy_blob`).
    let store = exported.store();
    write_atomically(file, |output| {
        write_members(&members, output, file, &mut |digest, size, output| copy_blob(store, digest, *size, output, file))
    })
}

/// Writes `members` as a tar to `output` (sorted by name, every header explicit), each blob
/// through `copy_blob`, then the two zero blocks that end an archive. `destination` names the
/// output in errors.
pub(super) fn write_members<W: Write + ?Sized>(
    members: &BTreeMap<String, TarMember>,
    output: &mut W,
    destination: &Path,
    copy_blob: &mut dyn FnMut(&Digest, &u64, &mut W) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    let write_error = |source| ExportError::Write { path: destination.to_owned(), source };
    for (name, member) in members {
        let (header, size) = match member {
            TarMember::Directory => (tar_header(name, tar::EntryType::Directory, 0o755, 0), 0),
            TarMember::Document(bytes) => {
                (tar_header(name, tar::EntryType::Regular, 0o644, bytes.len() as u64), bytes.len() as u64)
            }
            TarMember::Blob { size, .. } => (tar_header(name, tar::EntryType::Regular, 0o644, *size), *size),
        };
        output.write_all(header.as_bytes()).map_err(write_error)?;
        match member {
            TarMember::Directory => {}
            TarMember::Document(bytes) => output.write_all(bytes).map_err(write_error)?,
            TarMember::Blob { digest, size } => copy_blob(digest, size, output)?,
        }
        let padding = (TAR_BLOCK - size % TAR_BLOCK) % TAR_BLOCK;
        output.write_all(&[0; TAR_BLOCK as usize][..padding as usize]).map_err(write_error)?;
    }
    // Two zero blocks end a tar archive.
    output.write_all(&[0; 2 * TAR_BLOCK as usize]).map_err(write_error)
}

/// Whether `file` is already the archive `members` describe: the same member names and sizes
/// in the same order, and the same documents (index, manifest) byte for byte. Blobs are named
/// by their digest, so equal names and sizes mean the archive holds this image, and a no-op
/// rebuild need not rewrite (or re-read) gigabytes. Reads headers only, seeking past content.
pub(super) fn archive_already_holds(file: &Path, members: &BTreeMap<String, TarMember>) -> bool {
    let Ok(opened) = fs::File::open(file) else { return false };
    let mut archive = tar::Archive::new(opened);
    let Ok(entries) = archive.entries_with_seek() else { return false };
    let mut expected = members.iter();
    for entry in entries {
        let Ok(mut entry) = entry else { return false };
        let Some((name, member)) = expected.next() else { return false };
        let same_name = entry.path_bytes().as_ref() == name.trim_end_matches('/').as_bytes()
            || entry.path_bytes().as_ref() == name.as_bytes();
        if !same_name {
            return false;
        }
        let matches = match member {
            TarMember::Directory => entry.header().entry_type().is_dir(),
            TarMember::Blob { size, .. } => entry.size() == *size,
            TarMember::Document(bytes) => {
                let mut content = Vec::new();
                entry.size() == bytes.len() as u64 && entry.read_to_end(&mut content).is_ok() && content == *bytes
            }
        };
        if !matches {
            return false;
        }
    }
    expected.next().is_none()
}

/// A ustar header with every field set explicitly. The name is written into the header's
/// name field as given (the tar crate's `set_path` drops a directory's trailing `/`); all
/// names here are short ASCII.
pub(super) fn tar_header(name: &str, entry_type: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    let name_field = &mut header.as_old_mut().name;
    assert!(name.len() < name_field.len(), "archive member names are short: {name}");
    name_field[..name.len()].copy_from_slice(name.as_bytes());
    header.set_entry_type(entry_type);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(size);
    header.set_cksum();
    header
}
