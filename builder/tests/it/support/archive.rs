//! Docker archives (`docker save` format) crafted member by member, for tests of base images:
//! the layers' tar headers are written raw, so that they can hold what the tar crate refuses to
//! write (`..`, absolute names, links out of the root), and a layer can be made not to match its
//! diff id.

use std::fs;
use std::path::Path;

use layerwright::cache::Digest;

/// One raw tar member of a crafted layer.
pub enum Raw<'a> {
    File(&'a str, &'a [u8]),
    /// A regular-file header claiming `size` bytes, followed by far fewer.
    FileClaimingSize(&'a str, u64),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    CharDevice(&'a str, u32, u32),
}

/// How `crafted_archive_with` writes an archive; the default is what `crafted_archive` writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ArchiveOptions {
    /// A `history` entry per layer in the config, as `docker save` writes (by default the
    /// config has none).
    pub history: bool,
    /// Flips a byte of the last layer after its diff id is computed: its content no longer
    /// hashes to the diff id the config names.
    pub tamper_last_layer: bool,
}

fn header(name: &str, entry_type: tar::EntryType, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    // Raw name bytes: the tar crate's own setters refuse `..` and absolute names, which is
    // exactly what these archives must contain.
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_entry_type(entry_type);
    header.set_size(size);
    header.set_mode(if entry_type.is_dir() { 0o755 } else { 0o644 });
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

/// An uncompressed layer holding `entries`, in order.
pub fn layer_tar(entries: &[Raw]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in entries {
        let (mut header, content): (tar::Header, &[u8]) = match entry {
            Raw::File(name, content) => (header(name, tar::EntryType::Regular, content.len() as u64), content),
            Raw::FileClaimingSize(name, size) => (header(name, tar::EntryType::Regular, *size), b"short"),
            Raw::Dir(name) => (header(name, tar::EntryType::Directory, 0), b""),
            Raw::Symlink(name, target) => {
                let mut header = header(name, tar::EntryType::Symlink, 0);
                header.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
                (header, b"")
            }
            Raw::HardLink(name, target) => {
                let mut header = header(name, tar::EntryType::Link, 0);
                header.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
                (header, b"")
            }
            Raw::CharDevice(name, major, minor) => {
                let mut header = header(name, tar::EntryType::Char, 0);
                header.set_device_major(*major).unwrap();
                header.set_device_minor(*minor).unwrap();
                (header, b"")
            }
        };
        header.set_cksum();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(content);
        bytes.resize(bytes.len().next_multiple_of(512), 0);
    }
    bytes.resize(bytes.len() + 1024, 0);
    bytes
}

/// A docker-archive at `path` whose layers hold `layers` (the diff ids are right: the content
/// is the attack, not the digests).
pub fn crafted_archive(path: &Path, layers: &[&[Raw]]) {
    crafted_archive_with(path, layers, ArchiveOptions::default());
}

/// A docker-archive at `path` whose layers hold `layers`, written as `options` say.
pub fn crafted_archive_with(path: &Path, layers: &[&[Raw]], options: ArchiveOptions) {
    let mut tars: Vec<Vec<u8>> = layers.iter().map(|entries| layer_tar(entries)).collect();
    let diff_ids: Vec<String> = tars.iter().map(|tar| format!("\"{}\"", Digest::of_bytes(tar))).collect();
    if options.tamper_last_layer {
        let layer = tars.last_mut().expect("a layer to tamper with");
        let last = layer.iter().rposition(|byte| *byte != 0).expect("a layer with content");
        layer[last] ^= 0xff;
    }
    let history = if options.history {
        let entries = vec![r#"{"created_by":"test"}"#; tars.len()];
        format!(r#","history":[{}]"#, entries.join(","))
    } else {
        String::new()
    };
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":[{}]}}{history}}}"#,
        diff_ids.join(",")
    );
    let config_name = format!("{}.json", Digest::of_bytes(config.as_bytes()).hex());
    let layer_names: Vec<String> = (0..tars.len()).map(|index| format!("\"layer{index}/layer.tar\"")).collect();
    let manifest =
        format!(r#"[{{"Config":"{config_name}","RepoTags":["crafted:1"],"Layers":[{}]}}]"#, layer_names.join(","));
    let mut archive = tar::Builder::new(fs::File::create(path).unwrap());
    let mut members: Vec<(String, Vec<u8>)> =
        vec![("manifest.json".into(), manifest.into_bytes()), (config_name, config.into_bytes())];
    for (index, tar) in tars.into_iter().enumerate() {
        members.push((format!("layer{index}/layer.tar"), tar));
    }
    for (name, content) in members {
        let mut header = tar::Header::new_ustar();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive.append_data(&mut header, name, content.as_slice()).unwrap();
    }
    archive.finish().unwrap();
}
