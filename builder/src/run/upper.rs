//! The layer of a RUN step is the overlay's upper directory: this module turns that directory,
//! after the command has exited, into [`LayerEntry`]s for the layer writer.
//!
//! What overlayfs leaves in the upper and what it becomes:
//! - a character device 0/0 (or an empty file with an `overlay.whiteout` xattr, the newer
//!   "xwhiteout" form) is a deleted lower path: [`EntryKind::Whiteout`] (`.wh.NAME`);
//! - a directory with `overlay.opaque=y` replaced a lower directory: the directory entry plus
//!   [`EntryKind::OpaqueWhiteout`] (`.wh..wh..opq`);
//! - regular files are read when the tar is written ([`Content::HostFile`]); files that share
//!   an inode become one file and hard links to it;
//! - modes, owners and xattrs are kept, except overlay's own (`trusted.overlay.*`,
//!   `user.overlay.*`); in a rootless run the caller's ids are root's, and an entry copied up
//!   from a lower layer gets back the owner the rootless snapshot recorded for it.
//!
//! The mountpoints the runner created in the upper for itself (`proc`, `dev`, `etc/hosts` and
//! the like, when the image lacks them) are left out, but only while they are still exactly as
//! the runner made them: an empty directory or an empty file with the runner's metadata. A
//! command that put something there, or changed their mode, keeps them in the layer.
//!
//! What this module deliberately does not do: mount, run or look at lower layers (overlayfs
//! already put exactly the differences here), or order entries (the layer writer sorts).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::layer::snapshot::OWNER_XATTR;
use crate::layer::{Content, EntryKind, LayerEntry};

/// Prefixes of the xattrs overlayfs keeps for itself (`trusted.` when mounted by root, `user.`
/// with `userxattr`).
const OVERLAY_XATTR_PREFIXES: [&str; 2] = ["trusted.overlay.", "user.overlay."];

/// Something the runner created in the upper directory before the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedPath {
    /// Image-relative (`etc/hosts`).
    pub path: String,
    pub directory: bool,
    pub mode: u32,
    /// As the layer would record them (after id mapping).
    pub uid: u32,
    pub gid: u32,
}

/// How to read an upper directory.
#[derive(Debug, Clone, Default)]
pub struct UpperOptions {
    /// In a rootless run, the caller's (uid, gid) on the host: root inside the run.
    pub root_ids: Option<(u32, u32)>,
    /// What the runner created for its own mounts, parents before children.
    pub created: Vec<CreatedPath>,
}

/// Why the upper directory of a RUN step could not be turned into layer entries.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum UpperError {
    /// Reading an entry of the upper directory (its metadata, xattrs, link target or listing)
    /// failed.
    #[error("cannot read {path} in the RUN step's upper directory: {source}")]
    Read {
        /// The entry's path on the host.
        path: PathBuf,
        /// The IO error from the operating system.
        source: io::Error,
    },
    /// The command created a file whose name is not valid UTF-8.
    #[error("the RUN step created {path:?}, whose name is not valid UTF-8 (image paths are text)")]
    NotUtf8 {
        /// The entry's path on the host.
        path: PathBuf,
    },
}

/// The entries of the layer the upper directory `upper` stands for.
pub fn upper_entries(upper: &Path, options: &UpperOptions) -> Result<Vec<LayerEntry>, UpperError> {
    let mut entries = Vec::new();
    // (dev, inode) of regular files seen, for hard links: the first path (in sorted order)
    // carries the content.
    let mut first_links: HashMap<(u64, u64), String> = HashMap::new();
    // Depth-first with sorted children: `a`, `a/b`, `a-b`, the layer's own order.
    let mut pending: Vec<String> = sorted_children(upper, "")?.into_iter().rev().collect();
    while let Some(relative) = pending.pop() {
        let path = upper.join(&relative);
        let read_error = |source| UpperError::Read { path: path.clone(), source };
        let metadata = fs::symlink_metadata(&path).map_err(read_error)?;
        let file_type = metadata.file_type();
        let (mut uid, mut gid) = map_ids(metadata.uid(), metadata.gid(), options.root_ids);
        let mode = metadata.mode() & 0o7777;
        if file_type.is_char_device() && metadata.rdev() == 0 {
            entries.push(LayerEntry { path: relative, kind: EntryKind::Whiteout, mode, uid, gid, xattrs: Vec::new() });
            continue;
        }
        let Xattrs { kept: xattrs, overlay: overlay_xattrs, owner } = read_xattrs(&path)?;
        // A copied-up entry of a rootless snapshot that the command did not chown (it could only
        // chown to root, which it already is) gets its owner in the image back.
        if let (Some(owner), Some((root_uid, _))) = (owner, options.root_ids)
            && metadata.uid() == root_uid
        {
            (uid, gid) = owner;
        }
        let entry = |kind: EntryKind, xattrs: Vec<(String, Vec<u8>)>| LayerEntry {
            path: relative.clone(),
            kind,
            mode,
            uid,
            gid,
            xattrs,
        };
        if file_type.is_dir() {
            let opaque = overlay_xattrs.iter().any(|(name, value)| name.ends_with(".opaque") && value == b"y");
            entries.push(entry(EntryKind::Directory, xattrs));
            if opaque {
                entries.push(entry(EntryKind::OpaqueWhiteout, Vec::new()));
            }
            pending.extend(sorted_children(upper, &relative)?.into_iter().rev());
        } else if file_type.is_file() {
            let xwhiteout = overlay_xattrs.iter().any(|(name, _)| name.ends_with(".whiteout"));
            if xwhiteout && metadata.len() == 0 {
                entries.push(entry(EntryKind::Whiteout, Vec::new()));
                continue;
            }
            if metadata.nlink() > 1 {
                let inode = (metadata.dev(), metadata.ino());
                if let Some(first) = first_links.get(&inode) {
                    entries.push(entry(EntryKind::HardLink { target: first.clone() }, Vec::new()));
                    continue;
                }
                first_links.insert(inode, relative.clone());
            }
            let content = Content::HostFile(path.clone());
            entries.push(entry(EntryKind::File { content, size: metadata.len() }, xattrs));
        } else if file_type.is_symlink() {
            let target = fs::read_link(&path).map_err(read_error)?;
            let target = target.to_str().ok_or_else(|| UpperError::NotUtf8 { path: path.clone() })?.to_owned();
            entries.push(entry(EntryKind::Symlink { target }, xattrs));
        } else if file_type.is_char_device() || file_type.is_block_device() {
            let (major, minor) = (rustix::fs::major(metadata.rdev()), rustix::fs::minor(metadata.rdev()));
            let kind = if file_type.is_char_device() {
                EntryKind::CharDevice { major, minor }
            } else {
                EntryKind::BlockDevice { major, minor }
            };
            entries.push(entry(kind, xattrs));
        } else if file_type.is_fifo() {
            entries.push(entry(EntryKind::Fifo, xattrs));
        }
        // A socket cannot be in a layer (tar has no type for it); Docker drops them too.
    }
    drop_pristine_mountpoints(&mut entries, &options.created);
    Ok(entries)
}

/// The children of `upper/relative` as image-relative paths, sorted by name.
fn sorted_children(upper: &Path, relative: &str) -> Result<Vec<String>, UpperError> {
    let directory = upper.join(relative);
    let read_error = |source| UpperError::Read { path: directory.clone(), source };
    let mut names = Vec::new();
    for child in fs::read_dir(&directory).map_err(read_error)? {
        let child = child.map_err(read_error)?;
        let name = child.file_name();
        let name = name.to_str().ok_or_else(|| UpperError::NotUtf8 { path: child.path() })?;
        names.push(if relative.is_empty() { name.to_owned() } else { format!("{relative}/{name}") });
    }
    names.sort();
    Ok(names)
}

/// Root inside a rootless run is the caller outside it.
fn map_ids(uid: u32, gid: u32, root_ids: Option<(u32, u32)>) -> (u32, u32) {
    match root_ids {
        Some((root_uid, root_gid)) => (if uid == root_uid { 0 } else { uid }, if gid == root_gid { 0 } else { gid }),
        None => (uid, gid),
    }
}

/// The xattrs of an upper entry.
#[derive(Default)]
struct Xattrs {
    /// For the layer.
    kept: Vec<(String, Vec<u8>)>,
    /// Overlayfs's own.
    overlay: Vec<(String, Vec<u8>)>,
    /// The image's owner of a copied-up entry of a rootless snapshot ([`OWNER_XATTR`]).
    owner: Option<(u32, u32)>,
}

/// The xattrs of `path`, not following a symlink.
fn read_xattrs(path: &Path) -> Result<Xattrs, UpperError> {
    let read_error = |source: rustix::io::Errno| UpperError::Read { path: path.to_owned(), source: source.into() };
    let length = match rustix::fs::llistxattr_query(path) {
        Ok(length) => length,
        // A filesystem without xattrs has none to keep.
        Err(rustix::io::Errno::NOTSUP) => return Ok(Xattrs::default()),
        Err(error) => return Err(read_error(error)),
    };
    if length == 0 {
        return Ok(Xattrs::default());
    }
    let mut names = vec![0u8; length];
    let length = rustix::fs::llistxattr(path, &mut names[..]).map_err(read_error)?;
    names.truncate(length);
    let mut xattrs = Xattrs::default();
    for name in names.split(|byte| *byte == 0).filter(|name| !name.is_empty()) {
        let Ok(name) = std::str::from_utf8(name) else {
            continue; // Not representable as a PAX key; no tool writes such names.
        };
        let size = match rustix::fs::lgetxattr_query(path, name) {
            Ok(size) => size,
            // Removed between the list and the read: nothing to keep.
            Err(rustix::io::Errno::NODATA) => continue,
            Err(error) => return Err(read_error(error)),
        };
        let mut value = vec![0u8; size];
        let size = rustix::fs::lgetxattr(path, name, &mut value[..]).map_err(read_error)?;
        value.truncate(size);
        if name == OWNER_XATTR {
            let text = String::from_utf8_lossy(&value);
            xattrs.owner = text.split_once(':').and_then(|(uid, gid)| Some((uid.parse().ok()?, gid.parse().ok()?)));
        } else if OVERLAY_XATTR_PREFIXES.iter().any(|prefix| name.starts_with(prefix)) {
            xattrs.overlay.push((name.to_owned(), value));
        } else {
            xattrs.kept.push((name.to_owned(), value));
        }
    }
    Ok(xattrs)
}

/// Removes the runner's own mountpoints that are still exactly as it created them, deepest
/// first, so that a parent it created goes too once its children are gone.
fn drop_pristine_mountpoints(entries: &mut Vec<LayerEntry>, created: &[CreatedPath]) {
    for made in created.iter().rev() {
        let Some(position) = entries.iter().position(|entry| {
            entry.path == made.path && !matches!(entry.kind, EntryKind::Whiteout | EntryKind::OpaqueWhiteout)
        }) else {
            continue;
        };
        let entry = &entries[position];
        let same_metadata = entry.mode == made.mode && entry.uid == made.uid && entry.gid == made.gid;
        let pristine = match &entry.kind {
            EntryKind::Directory if made.directory => {
                let below = format!("{}/", made.path);
                let has_children = entries.iter().any(|other| other.path.starts_with(&below));
                let opaque = entries
                    .iter()
                    .any(|other| other.path == made.path && matches!(other.kind, EntryKind::OpaqueWhiteout));
                !has_children && !opaque && entry.xattrs.is_empty()
            }
            EntryKind::File { size: 0, .. } if !made.directory => entry.xattrs.is_empty(),
            _ => false,
        };
        if pristine && same_metadata {
            entries.remove(position);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    /// `TYPE MODE UID:GID PATH [detail]` per entry, sorted by path then type.
    fn describe(entries: &[LayerEntry], upper: &Path) -> Vec<String> {
        let mut lines: Vec<String> = entries
            .iter()
            .map(|entry| {
                let detail = match &entry.kind {
                    EntryKind::Directory => "dir".to_owned(),
                    EntryKind::File { content: Content::HostFile(path), size } => {
                        format!("file {size} @{}", path.strip_prefix(upper).unwrap().display())
                    }
                    EntryKind::File { .. } => "file ?".to_owned(),
                    EntryKind::Symlink { target } => format!("symlink -> {target}"),
                    EntryKind::HardLink { target } => format!("hardlink => {target}"),
                    EntryKind::CharDevice { major, minor } => format!("char {major},{minor}"),
                    EntryKind::BlockDevice { major, minor } => format!("block {major},{minor}"),
                    EntryKind::Fifo => "fifo".to_owned(),
                    EntryKind::Whiteout => "whiteout".to_owned(),
                    EntryKind::OpaqueWhiteout => "opaque".to_owned(),
                };
                let xattrs: Vec<String> = entry.xattrs.iter().map(|(name, _)| name.clone()).collect();
                format!("{} {:04o} {detail} {}", entry.path, entry.mode, xattrs.join(",")).trim_end().to_owned()
            })
            .collect();
        lines.sort();
        lines
    }

    fn mode(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn whiteout(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .unwrap();
    }

    fn set_xattr(path: &Path, name: &str, value: &[u8]) -> bool {
        rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty()).is_ok()
    }

    #[test]
    fn an_upper_directory_becomes_entries_with_whiteouts_links_and_xattrs() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path();
        fs::create_dir_all(upper.join("srv/dir")).unwrap();
        mode(&upper.join("srv"), 0o750);
        fs::write(upper.join("srv/new"), "new\n").unwrap();
        mode(&upper.join("srv/new"), 0o640);
        fs::write(upper.join("srv/dir/only"), "x").unwrap();
        fs::hard_link(upper.join("srv/new"), upper.join("srv/z-link")).unwrap();
        fs::hard_link(upper.join("srv/new"), upper.join("srv/a-link")).unwrap();
        symlink("../srv/new", upper.join("srv/sym")).unwrap();
        // Unprivileged users may create whiteouts (Linux ≥ 5.8).
        whiteout(&upper.join("srv/deleted"));
        rustix::fs::mkfifoat(rustix::fs::CWD, upper.join("srv/fifo"), rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
        // An empty file with the xwhiteout xattr is a whiteout too; other user xattrs are kept.
        fs::write(upper.join("srv/xwhiteout"), "").unwrap();
        let user_xattrs = set_xattr(&upper.join("srv/xwhiteout"), "user.overlay.whiteout", b"")
            && set_xattr(&upper.join("srv/dir"), "user.overlay.opaque", b"y")
            && set_xattr(&upper.join("srv/dir/only"), "user.mime", b"text/plain")
            && set_xattr(&upper.join("srv"), "user.overlay.impure", b"y");
        assert!(user_xattrs, "the test's temp dir supports user xattrs");

        let entries = upper_entries(upper, &UpperOptions::default()).unwrap();
        assert_eq!(
            describe(&entries, upper),
            [
                "srv 0750 dir",
                "srv/a-link 0640 file 4 @srv/a-link",
                "srv/deleted 0000 whiteout",
                "srv/dir 0755 dir",
                "srv/dir 0755 opaque",
                "srv/dir/only 0644 file 1 @srv/dir/only user.mime",
                "srv/fifo 0600 fifo",
                "srv/new 0640 hardlink => srv/a-link",
                "srv/sym 0777 symlink -> ../srv/new",
                "srv/xwhiteout 0644 whiteout",
                "srv/z-link 0640 hardlink => srv/a-link",
            ]
        );
    }

    #[test]
    fn rootless_copies_up_get_the_owner_their_snapshot_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path();
        fs::create_dir(upper.join("data")).unwrap();
        mode(&upper.join("data"), 0o750);
        fs::write(upper.join("data/config"), "x").unwrap();
        mode(&upper.join("data/config"), 0o640);
        fs::write(upper.join("data/new"), "x").unwrap();
        mode(&upper.join("data/new"), 0o644);
        assert!(set_xattr(&upper.join("data"), OWNER_XATTR, b"1000:1000"));
        assert!(set_xattr(&upper.join("data/config"), OWNER_XATTR, b"1000:50"));
        let ids = (rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw());
        let entries = upper_entries(upper, &UpperOptions { root_ids: Some(ids), created: Vec::new() }).unwrap();
        let owners: Vec<(&str, u32, u32, usize)> =
            entries.iter().map(|entry| (entry.path.as_str(), entry.uid, entry.gid, entry.xattrs.len())).collect();
        assert_eq!(owners, [("data", 1000, 1000, 0), ("data/config", 1000, 50, 0), ("data/new", 0, 0, 0)]);
    }

    #[test]
    fn privileged_overlay_xattrs_are_read_and_dropped() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: trusted.* xattrs need root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path();
        fs::create_dir(upper.join("opaque")).unwrap();
        fs::create_dir(upper.join("merged")).unwrap();
        assert!(set_xattr(&upper.join("opaque"), "trusted.overlay.opaque", b"y"));
        assert!(set_xattr(&upper.join("merged"), "trusted.overlay.opaque", b"x"));
        assert!(set_xattr(&upper.join("merged"), "trusted.overlay.origin", b"\0\0"));
        assert!(set_xattr(&upper.join("merged"), "trusted.kept", b"1"));
        let entries = upper_entries(upper, &UpperOptions::default()).unwrap();
        assert_eq!(
            describe(&entries, upper),
            ["merged 0755 dir trusted.kept", "opaque 0755 dir", "opaque 0755 opaque"],
            "`opaque=x` marks a directory with xwhiteouts, not an opaque one"
        );
    }

    #[test]
    fn the_runners_mountpoints_leave_no_trace_unless_the_command_used_them() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path();
        let (uid, gid) = (rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw());
        for directory in ["proc", "dev", "etc", "run", "run/lock"] {
            fs::create_dir(upper.join(directory)).unwrap();
            mode(&upper.join(directory), 0o755);
        }
        fs::write(upper.join("etc/hosts"), "").unwrap();
        mode(&upper.join("etc/hosts"), 0o644);
        fs::write(upper.join("etc/resolv.conf"), "").unwrap();
        mode(&upper.join("etc/resolv.conf"), 0o644);
        // The command wrote below `dev` (say, after unmounting it) and chmodded `run/lock`.
        fs::write(upper.join("dev/kept"), "x").unwrap();
        mode(&upper.join("run/lock"), 0o700);
        let made = |path: &str, directory: bool| CreatedPath {
            path: path.to_owned(),
            directory,
            mode: if directory { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
        };
        let options = UpperOptions {
            root_ids: Some((uid, gid)),
            created: vec![
                made("proc", true),
                made("dev", true),
                made("etc", true),
                made("etc/hosts", false),
                made("etc/resolv.conf", false),
                made("run", true),
                made("run/lock", true),
            ],
        };
        let entries = upper_entries(upper, &options).unwrap();
        assert_eq!(
            describe(&entries, upper),
            ["dev 0755 dir", "dev/kept 0644 file 1 @dev/kept", "run 0755 dir", "run/lock 0700 dir"]
        );
        assert!(entries.iter().all(|entry| (entry.uid, entry.gid) == (0, 0)), "the caller's ids are root's");
    }
}
