//! Snapshots: each layer unpacked once into the cache, as an overlayfs lower directory that
//! every RUN step above it reuses.
//!
//! `snapshots/<diff id hex>` (`<hex>.user` for rootless runs, whose overlay reads `user.`
//! xattrs instead of `trusted.` ones) holds the layer's own entries with OCI whiteouts turned
//! into overlay's: `.wh.NAME` becomes a character device 0/0 named `NAME`, `.wh..wh..opq` the
//! xattr `overlay.opaque=y` on its directory. A snapshot is unpacked into a temporary directory
//! under the store's `tmp/` (which a crash leaves as garbage the store removes) and renamed into
//! place whole, so a snapshot that exists is complete; the diff id is verified on the way.
//!
//! Safety: nothing is written outside the snapshot. Member names are normalised as the layer
//! indexer does (`..` and absolute names refused), and every path is resolved from the
//! snapshot's directory fd one component at a time with `O_NOFOLLOW`, so an entry below a
//! symlink (planted by an earlier member) is an error rather than a write through it. Hard links
//! are made with `linkat` without following, to targets resolved the same way. xattrs in the
//! layer that overlayfs would interpret (`*.overlay.*`) are dropped.
//!
//! Rootless (not root): owners cannot be set and device nodes cannot be made, so files keep
//! the caller's ids (root inside the run's user namespace; the image's owner is recorded in
//! [`OWNER_XATTR`] for the layer) and device nodes are left out.
//!
//! What this module deliberately does not do: mount, merge layers (overlayfs does), or delete
//! snapshots (a snapshot is as reusable as its layer; `cache prune` may remove the directory).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread::JoinHandle;

use layerwright_cache::{Digest, LayerRecord, Store};
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timestamps};
use rustix::io::Errno;
use thiserror::Error;

use super::format::{OPAQUE_WHITEOUT_NAME, WHITEOUT_PREFIX};
use super::index::TreeError;
use super::read::{self, MemberPath};

/// In a rootless snapshot, the owner (`uid:gid`) the layer gives a file or directory that is not
/// root's: the caller cannot chown, so the entry belongs to the caller (root inside the run).
/// Overlayfs copies this xattr up with the entry, and the upper walk gives a copied-up entry
/// its owner back from it; it never reaches a layer.
pub const OWNER_XATTR: &str = "user.layerwright.owner";

/// How a snapshot marks opaque directories: the overlay mount reads `trusted.overlay.*` when
/// mounted by real root and `user.overlay.*` with `userxattr` (rootless).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotFlavour {
    Privileged,
    Rootless,
}

/// The flavour of the snapshots RUN steps of this process stack: rootless unless the process
/// runs as root (a user who is not root needs a user namespace, and `user.*` xattrs).
pub(crate) fn flavour() -> SnapshotFlavour {
    if rustix::process::geteuid().is_root() { SnapshotFlavour::Privileged } else { SnapshotFlavour::Rootless }
}

impl SnapshotFlavour {
    pub fn opaque_xattr(self) -> &'static str {
        match self {
            SnapshotFlavour::Privileged => "trusted.overlay.opaque",
            SnapshotFlavour::Rootless => "user.overlay.opaque",
        }
    }

    fn directory_name(self, diff_id: &Digest) -> String {
        match self {
            SnapshotFlavour::Privileged => diff_id.hex().to_owned(),
            SnapshotFlavour::Rootless => format!("{}.user", diff_id.hex()),
        }
    }
}

/// Why a layer could not be unpacked into its snapshot directory.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Reading the layer failed, or one of its members is unsafe (its path escapes the root, its
    /// diff id does not match, …).
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// Creating a member in the snapshot, or setting its content or metadata, failed.
    #[error("layer {layer}: entry {entry:?}: cannot {action}: {source}")]
    Write {
        /// The digest of the layer's blob.
        layer: Digest,
        /// The member's normalised image path.
        entry: String,
        /// What was being done (`create`, `set the mtime of`, …).
        action: &'static str,
        /// The IO error from the operating system.
        source: io::Error,
    },
    /// A member would be written below a symlink or another non-directory that an earlier
    /// member of the layer put at one of its parents.
    #[error("layer {layer}: entry {entry:?} is written through the symlink or non-directory {parent:?}")]
    ThroughSymlink {
        /// The digest of the layer's blob.
        layer: Digest,
        /// The member's normalised image path.
        entry: String,
        /// The parent that is not a directory.
        parent: String,
    },
    /// A hard link points at a path this layer does not hold (snapshots hold one layer each, so
    /// a link into a lower layer cannot be made).
    #[error("layer {layer}: hard link {entry:?} points at {target:?}, which this layer does not hold")]
    HardLinkOutsideLayer {
        /// The digest of the layer's blob.
        layer: Digest,
        /// The image path of the hard link.
        entry: String,
        /// The image path it points at.
        target: String,
    },
    /// A filesystem operation on the snapshot directory itself (making the temporary directory,
    /// renaming it into place) failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done (`rename a snapshot into`, …).
        action: &'static str,
        /// The directory it was done to.
        path: PathBuf,
        /// The IO error from the operating system.
        source: io::Error,
    },
}

/// The snapshot directory of `layer`, unpacked now if it is not there yet.
pub fn ensure_snapshot(store: &Store, layer: &LayerRecord, flavour: SnapshotFlavour) -> Result<PathBuf, SnapshotError> {
    let final_path = store.snapshots_dir().join(flavour.directory_name(&layer.diff_id));
    if final_path.is_dir() {
        return Ok(final_path);
    }
    // Steps of one build often need the same snapshot at once: unpack it once per process
    // (other processes are handled by the rename below).
    let lock = snapshot_lock(&final_path);
    let _guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if final_path.is_dir() {
        return Ok(final_path);
    }
    let tmp = store.tmp_dir();
    let unpacking = tempfile::Builder::new()
        .prefix("snapshot-")
        .tempdir_in(&tmp)
        .map_err(|source| SnapshotError::Io { action: "create a directory in", path: tmp.clone(), source })?;
    unpack_layer(store, layer, unpacking.path(), flavour)?;
    match std::fs::rename(unpacking.path(), &final_path) {
        Ok(()) => {
            // Renamed away: nothing is left for the TempDir to remove.
            let _ = unpacking.keep();
            Ok(final_path)
        }
        // Another process unpacked the same layer first; its snapshot is as good as ours.
        Err(_) if final_path.is_dir() => Ok(final_path),
        Err(source) => {
            log::warn!("rename({}, {}) failed: {source}", unpacking.path().display(), final_path.display());
            Err(SnapshotError::Io { action: "rename a snapshot into", path: final_path, source })
        }
    }
}

fn snapshot_lock(path: &Path) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS.get_or_init(Default::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    Arc::clone(locks.entry(path.to_owned()).or_default())
}

/// Metadata applied to a directory after everything below it was written (a read-only
/// directory must not be read-only while it is filled; its mtime changes with every child).
struct DirectoryMetadata {
    path: String,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Unpacks the layer blob of `layer` into the empty directory `root`, verifying its diff id.
pub fn unpack_layer(
    store: &Store,
    layer: &LayerRecord,
    root: &Path,
    flavour: SnapshotFlavour,
) -> Result<(), SnapshotError> {
    let stream = read::open_layer_stream(store, layer)?;
    let (stream, unpacker) = unpack_tar(stream, &layer.digest, root, flavour)?;
    read::verify_diff_id(stream, layer)?;
    unpacker.finish_directories()
}

/// Unpacks the tar `stream` of the layer `layer` (named in errors) into the empty directory
/// `root`; returns the stream (for whatever checks the rest of it) and the unpacker, whose
/// directory metadata is still to be applied.
fn unpack_tar<R: Read>(
    stream: R,
    layer: &Digest,
    root: &Path,
    flavour: SnapshotFlavour,
) -> Result<(R, Unpacker), SnapshotError> {
    let root_fd = rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|error| SnapshotError::Io { action: "open", path: root.to_owned(), source: error.into() })?;
    // The root of the merged tree takes the upper directory's metadata; the lower roots only
    // need to be searchable.
    rustix::fs::fchmod(&root_fd, Mode::from_raw_mode(0o755)).map_err(|error| SnapshotError::Io {
        action: "chmod",
        path: root.to_owned(),
        source: error.into(),
    })?;
    let mut unpacker = Unpacker {
        layer: layer.clone(),
        root: root_fd,
        privileged: flavour == SnapshotFlavour::Privileged,
        flavour,
        directories: HashMap::new(),
        last_parent: None,
        creates_root_owned: false,
    };
    unpacker.creates_root_owned = unpacker.privileged && creates_root_owned(&unpacker.root);
    let read_error = |source| TreeError::Read { layer: layer.clone(), source };
    let mut archive = tar::Archive::new(stream);
    archive.set_ignore_zeros(false);
    for member in archive.entries().map_err(read_error)? {
        let mut member = member.map_err(read_error)?;
        unpacker.member(&mut member)?;
    }
    Ok((archive.into_inner(), unpacker))
}

/// The bytes of the tar stream a [`StreamedSnapshot`] gathers before handing them to its thread.
const STREAMED_CHUNK: usize = 128 * 1024;

/// A snapshot unpacked from a layer's tar stream on a thread of its own while the layer is
/// being written, for a layer that a RUN step will stack under its overlay: the RUN then finds
/// the snapshot ready instead of decompressing the blob it was just written into, re-hashing
/// it and creating every file only then. The stream is the layer writer's own, so there is no
/// diff id to verify; a snapshot that fails for any reason is simply not installed, and the
/// RUN unpacks the blob as usual.
pub struct StreamedSnapshot {
    pending: Vec<u8>,
    sender: Option<mpsc::SyncSender<Vec<u8>>>,
    worker: Option<JoinHandle<Option<tempfile::TempDir>>>,
    store: Store,
    flavour: SnapshotFlavour,
}

impl StreamedSnapshot {
    /// Starts the unpacking thread into a new directory under the store's `tmp/`.
    pub fn start(store: &Store, flavour: SnapshotFlavour) -> io::Result<StreamedSnapshot> {
        let directory = tempfile::Builder::new().prefix("snapshot-").tempdir_in(store.tmp_dir())?;
        // A few chunks in flight: the writer never waits long, memory stays small.
        let (sender, receiver) = mpsc::sync_channel::<Vec<u8>>(8);
        let worker = std::thread::Builder::new().name("layerwright-snapshot".into()).spawn(move || {
            let stream = ChannelReader { receiver, chunk: Vec::new(), position: 0 };
            // Named in errors only, which are not reported (see the type's doc).
            let layer = Digest::of_bytes(b"");
            let (mut stream, unpacker) = unpack_tar(stream, &layer, directory.path(), flavour).ok()?;
            // The end-of-archive blocks and anything after them: drain so the writer never blocks.
            io::copy(&mut stream, &mut io::sink()).ok()?;
            unpacker.finish_directories().ok()?;
            Some(directory)
        })?;
        Ok(StreamedSnapshot {
            pending: Vec::with_capacity(STREAMED_CHUNK),
            sender: Some(sender),
            worker: Some(worker),
            store: store.clone(),
            flavour,
        })
    }

    /// The next bytes of the layer's tar stream.
    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let taken = bytes.len().min(STREAMED_CHUNK - self.pending.len());
            self.pending.extend_from_slice(&bytes[..taken]);
            bytes = &bytes[taken..];
            if self.pending.len() == STREAMED_CHUNK {
                self.send_pending();
            }
        }
    }

    fn send_pending(&mut self) {
        let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(STREAMED_CHUNK));
        // A failed unpack dropped its receiver: the rest of the stream is not needed.
        if let Some(sender) = &self.sender
            && sender.send(chunk).is_err()
        {
            self.sender = None;
        }
    }

    /// Ends the stream and installs the snapshot as the one of `layer`'s diff id, unless one
    /// is there already. Returns whether a snapshot of the layer now exists from this stream.
    pub fn finish(mut self, layer: &LayerRecord) -> bool {
        if !self.pending.is_empty() {
            self.send_pending();
        }
        self.sender = None;
        let Some(Some(directory)) = self.worker.take().map(|worker| worker.join().ok().flatten()) else {
            return false;
        };
        let final_path = self.store.snapshots_dir().join(self.flavour.directory_name(&layer.diff_id));
        let lock = snapshot_lock(&final_path);
        let _guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if final_path.is_dir() || std::fs::rename(directory.path(), &final_path).is_err() {
            return false; // The TempDir removes ours.
        }
        // Renamed away: nothing is left for the TempDir to remove.
        let _ = directory.keep();
        true
    }
}

impl Drop for StreamedSnapshot {
    /// An abandoned layer: stop the thread and wait for it, so that its directory is removed.
    fn drop(&mut self) {
        self.sender = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// The receiving end of a [`StreamedSnapshot`] as a reader.
struct ChannelReader {
    receiver: mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    position: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        while self.position == self.chunk.len() {
            match self.receiver.recv() {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.position = 0;
                }
                Err(_) => return Ok(0), // The writer finished (or gave up): end of stream.
            }
        }
        let count = buffer.len().min(self.chunk.len() - self.position);
        buffer[..count].copy_from_slice(&self.chunk[self.position..self.position + count]);
        self.position += count;
        Ok(count)
    }
}

struct Unpacker {
    layer: Digest,
    root: OwnedFd,
    privileged: bool,
    flavour: SnapshotFlavour,
    /// Directories this layer holds (or implies), by path.
    directories: HashMap<String, DirectoryMetadata>,
    /// The directory of the previous member: members of one directory usually follow each other.
    last_parent: Option<(String, Arc<OwnedFd>)>,
    /// Whether what this unpack creates is root's already (see [`creates_root_owned`]), so that
    /// entries owned by root need no `chown`.
    creates_root_owned: bool,
}

/// Whether the files and directories created below `root` during an unpack belong to root:
/// the process is root with group root and `root` has group root. A new entry takes its
/// group from the process, or (setgid directory, `grpid` mount) from its parent directory,
/// and every parent created during an unpack gets its own metadata only at the very end.
fn creates_root_owned(root: &OwnedFd) -> bool {
    rustix::process::geteuid().is_root()
        && rustix::process::getegid().is_root()
        && rustix::fs::fstat(root).is_ok_and(|stat| stat.st_gid == 0)
}

/// `("dir/sub", "name")` for `dir/sub/name`, `("", "name")` for `name`.
fn split_parent(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

impl Unpacker {
    /// Gives the entry `base` of `parent` (a symlink or node, not followed) its owner; only real
    /// root can, and a rootless snapshot keeps the caller's.
    fn chown_at(&self, parent: &OwnedFd, base: &str, path: &str, (uid, gid): (u32, u32)) -> Result<(), SnapshotError> {
        if !self.privileged {
            return Ok(());
        }
        let (uid, gid) = (rustix::fs::Uid::from_raw(uid), rustix::fs::Gid::from_raw(gid));
        rustix::fs::chownat(parent, base, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(self.write_error(path, "chown"))
    }

    fn write_error<'a>(&'a self, entry: &'a str, action: &'static str) -> impl Fn(Errno) -> SnapshotError + 'a {
        move |error| SnapshotError::Write {
            layer: self.layer.clone(),
            entry: entry.to_owned(),
            action,
            source: error.into(),
        }
    }

    fn member<R: Read>(&mut self, member: &mut tar::Entry<'_, R>) -> Result<(), SnapshotError> {
        let layer = self.layer.clone();
        let read_error = |source| TreeError::Read { layer: layer.clone(), source };
        let name = read::member_name(member, &self.layer)?;
        let header = member.header().clone();
        let entry_type = header.entry_type();
        if entry_type.is_pax_global_extensions() {
            return Ok(());
        }
        let path = match read::normalise_member_path(&name) {
            MemberPath::Inside(path) => path,
            MemberPath::Root if entry_type.is_dir() => return Ok(()),
            MemberPath::Root | MemberPath::Escapes => {
                return Err(TreeError::EscapesRoot { layer: self.layer.clone(), entry: name }.into());
            }
        };
        let mode = header.mode().map_err(read_error)? & 0o7777;
        let id = |value: io::Result<u64>| -> Result<u32, SnapshotError> {
            let value = value.map_err(read_error)?;
            u32::try_from(value).map_err(|_| {
                read_error(io::Error::new(io::ErrorKind::InvalidData, format!("owner id {value} does not fit 32 bits")))
                    .into()
            })
        };
        let uid = id(header.uid())?;
        let gid = id(header.gid())?;
        let mtime = header.mtime().unwrap_or(0);
        let xattrs = pax_xattrs(member).map_err(read_error)?;

        let (parent, base) = split_parent(&path);
        if base == OPAQUE_WHITEOUT_NAME {
            let directory = self.directory(parent, &path)?;
            let opaque = self.flavour.opaque_xattr();
            rustix::fs::fsetxattr(&directory, opaque, b"y", rustix::fs::XattrFlags::empty())
                .map_err(self.write_error(&path, "set the opaque xattr on its directory"))?;
            return Ok(());
        }
        if base.starts_with(".wh..wh.") {
            return Ok(()); // aufs metadata, never part of the image.
        }
        if let Some(deleted) = base.strip_prefix(WHITEOUT_PREFIX) {
            if deleted.is_empty() || deleted == "." || deleted == ".." || deleted.contains('/') {
                return Err(TreeError::EscapesRoot { layer: self.layer.clone(), entry: name }.into());
            }
            let parent_fd = self.directory(parent, &path)?;
            // A whiteout hides lower layers only: an entry of this same layer at that name stays.
            if rustix::fs::statat(&parent_fd, deleted, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
                return Ok(());
            }
            rustix::fs::mknodat(
                &parent_fd,
                deleted,
                FileType::CharacterDevice,
                Mode::empty(),
                rustix::fs::makedev(0, 0),
            )
            .map_err(self.write_error(&path, "create the overlay whiteout"))?;
            return Ok(());
        }

        let parent_fd = self.directory(parent, &path)?;
        if entry_type.is_dir() {
            match rustix::fs::statat(&parent_fd, base, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::Directory => {}
                Ok(_) => {
                    remove_tree(&parent_fd, base).map_err(self.write_error(&path, "replace"))?;
                    self.make_directory(&parent_fd, base, &path)?;
                }
                Err(_) => self.make_directory(&parent_fd, base, &path)?,
            }
            self.directories.insert(path.clone(), DirectoryMetadata { path, mode, uid, gid, mtime, xattrs });
            return Ok(());
        }
        // Anything else replaces what is at its path (a later member of the same name wins). A
        // regular file (most members) finds out by creating it exclusively, the others by a stat.
        let is_regular = read::is_regular_file(entry_type);
        if !is_regular && rustix::fs::statat(&*parent_fd, base, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
            remove_tree(&*parent_fd, base).map_err(self.write_error(&path, "replace"))?;
            self.directories.remove(&path);
        }
        let times = timestamps(mtime);
        if is_regular {
            let create = || {
                rustix::fs::openat(
                    &*parent_fd,
                    base,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
            };
            let file = match create() {
                Err(Errno::EXIST) => {
                    remove_tree(&*parent_fd, base).map_err(self.write_error(&path, "replace"))?;
                    self.directories.remove(&path);
                    create()
                }
                other => other,
            }
            .map_err(self.write_error(&path, "create"))?;
            let mut file = File::from(file);
            io::copy(member, &mut file).map_err(|source| SnapshotError::Write {
                layer: self.layer.clone(),
                entry: path.clone(),
                action: "write",
                source,
            })?;
            self.set_metadata(&file, &path, mode, uid, gid, &xattrs)?;
            rustix::fs::futimens(&file, &times).map_err(self.write_error(&path, "set the mtime of"))?;
        } else if entry_type.is_symlink() {
            let target = read::member_link_name(member, &self.layer, &name)?;
            rustix::fs::symlinkat(target.as_str(), &parent_fd, base)
                .map_err(self.write_error(&path, "create the symlink"))?;
            self.chown_at(&parent_fd, base, &path, (uid, gid))?;
            rustix::fs::utimensat(&parent_fd, base, &times, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(self.write_error(&path, "set the mtime of"))?;
        } else if entry_type.is_hard_link() {
            let target = match read::normalise_member_path(&read::member_link_name(member, &self.layer, &name)?) {
                MemberPath::Inside(target) => target,
                MemberPath::Root | MemberPath::Escapes => {
                    return Err(TreeError::EscapesRoot { layer: self.layer.clone(), entry: name }.into());
                }
            };
            let (target_parent, target_base) = split_parent(&target);
            let outside = || SnapshotError::HardLinkOutsideLayer {
                layer: layer.clone(),
                entry: path.clone(),
                target: target.clone(),
            };
            let target_parent_fd = self.open_directory(target_parent, &path, false)?.ok_or_else(outside)?;
            match rustix::fs::linkat(&target_parent_fd, target_base, &parent_fd, base, AtFlags::empty()) {
                Ok(()) => {}
                Err(Errno::NOENT) => return Err(outside()),
                Err(error) => return Err(self.write_error(&path, "create the hard link")(error)),
            }
        } else if entry_type.is_character_special() || entry_type.is_block_special() || entry_type.is_fifo() {
            let file_type = if entry_type.is_fifo() {
                FileType::Fifo
            } else if entry_type.is_character_special() {
                FileType::CharacterDevice
            } else {
                FileType::BlockDevice
            };
            if file_type != FileType::Fifo && !self.privileged {
                // Only real root may make device nodes; a rootless run does without them.
                return Ok(());
            }
            let major = header.device_major().map_err(read_error)?.unwrap_or(0);
            let minor = header.device_minor().map_err(read_error)?.unwrap_or(0);
            rustix::fs::mknodat(
                &parent_fd,
                base,
                file_type,
                Mode::from_raw_mode(0o600),
                rustix::fs::makedev(major, minor),
            )
            .map_err(self.write_error(&path, "create the node"))?;
            self.chown_at(&parent_fd, base, &path, (uid, gid))?;
            // The node was just made in this private directory, so the name still is it.
            rustix::fs::chmodat(&parent_fd, base, Mode::from_raw_mode(mode), AtFlags::empty())
                .map_err(self.write_error(&path, "chmod"))?;
        } else {
            return Err(TreeError::UnsupportedEntry {
                layer: self.layer.clone(),
                entry: name,
                entry_type: char::from(entry_type.as_byte()),
            }
            .into());
        }
        Ok(())
    }

    fn make_directory(&self, parent: &OwnedFd, base: &str, path: &str) -> Result<(), SnapshotError> {
        rustix::fs::mkdirat(parent, base, Mode::from_raw_mode(0o755))
            .map_err(self.write_error(path, "create the directory"))
    }

    /// Owner (when privileged), then mode (a chown clears setuid bits), then xattrs.
    fn set_metadata(
        &self,
        fd: impl AsFd,
        path: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        xattrs: &[(String, Vec<u8>)],
    ) -> Result<(), SnapshotError> {
        if self.privileged && !(self.creates_root_owned && (uid, gid) == (0, 0)) {
            rustix::fs::fchown(&fd, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))
                .map_err(self.write_error(path, "chown"))?;
        } else if (uid, gid) != (0, 0) {
            // Kept for the layer of a RUN step that copies this entry up (see `OWNER_XATTR`).
            let owner = format!("{uid}:{gid}");
            rustix::fs::fsetxattr(&fd, OWNER_XATTR, owner.as_bytes(), rustix::fs::XattrFlags::empty())
                .map_err(self.write_error(path, "record the owner of"))?;
        }
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(self.write_error(path, "chmod"))?;
        for (name, value) in xattrs {
            match rustix::fs::fsetxattr(&fd, name.as_str(), value, rustix::fs::XattrFlags::empty()) {
                Ok(()) => {}
                // Rootless runs cannot set `trusted.`/`security.` xattrs; they matter for the
                // layer the image already has, not for what the command sees.
                Err(Errno::PERM | Errno::NOTSUP) if !self.privileged => {}
                Err(error) => return Err(self.write_error(path, "set an xattr of")(error)),
            }
        }
        Ok(())
    }

    /// The directory `parent` of entry `entry`, created (with implied parents) when missing.
    fn directory(&mut self, parent: &str, entry: &str) -> Result<Arc<OwnedFd>, SnapshotError> {
        if let Some((last, fd)) = &self.last_parent
            && last == parent
        {
            return Ok(Arc::clone(fd));
        }
        let fd = Arc::new(self.open_directory(parent, entry, true)?.expect("missing directories are created"));
        self.last_parent = Some((parent.to_owned(), Arc::clone(&fd)));
        Ok(fd)
    }

    /// Opens `directory` (image-relative) one component at a time without following symlinks.
    /// Missing components are created as implied `0755` directories when `create`, else the
    /// answer is `None`.
    fn open_directory(&mut self, directory: &str, entry: &str, create: bool) -> Result<Option<OwnedFd>, SnapshotError> {
        let mut current =
            rustix::io::dup(&self.root).map_err(self.write_error(entry, "duplicate a directory descriptor"))?;
        if directory.is_empty() {
            return Ok(Some(current));
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut walked = String::new();
        for component in directory.split('/') {
            if !walked.is_empty() {
                walked.push('/');
            }
            walked.push_str(component);
            let opened = match rustix::fs::openat(&current, component, flags, Mode::empty()) {
                Err(Errno::NOENT) if create => {
                    rustix::fs::mkdirat(&current, component, Mode::from_raw_mode(0o755))
                        .map_err(self.write_error(entry, "create an implied parent directory"))?;
                    self.directories.entry(walked.clone()).or_insert_with(|| DirectoryMetadata {
                        path: walked.clone(),
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                        mtime: 0,
                        xattrs: Vec::new(),
                    });
                    rustix::fs::openat(&current, component, flags, Mode::empty())
                }
                other => other,
            };
            current = match opened {
                Ok(fd) => fd,
                Err(Errno::NOENT) => return Ok(None),
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    return Err(SnapshotError::ThroughSymlink {
                        layer: self.layer.clone(),
                        entry: entry.to_owned(),
                        parent: walked,
                    });
                }
                Err(error) => return Err(self.write_error(entry, "open a parent directory of")(error)),
            };
        }
        Ok(Some(current))
    }

    /// Applies directory metadata deepest first, so that a read-only parent is made read-only
    /// only after its children are done.
    fn finish_directories(mut self) -> Result<(), SnapshotError> {
        self.last_parent = None;
        let mut directories: Vec<DirectoryMetadata> = std::mem::take(&mut self.directories).into_values().collect();
        directories.sort_by_key(|directory| std::cmp::Reverse(directory.path.split('/').count()));
        for directory in directories {
            let Some(fd) = self.open_directory(&directory.path, &directory.path, false)? else {
                continue; // Replaced by a non-directory later in the layer.
            };
            self.set_metadata(&fd, &directory.path, directory.mode, directory.uid, directory.gid, &directory.xattrs)?;
            rustix::fs::futimens(&fd, &timestamps(directory.mtime))
                .map_err(self.write_error(&directory.path, "set the mtime of"))?;
        }
        Ok(())
    }
}

fn timestamps(mtime: u64) -> Timestamps {
    let time = rustix::fs::Timespec { tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX), tv_nsec: 0 };
    Timestamps { last_access: time, last_modification: time }
}

/// The `SCHILY.xattr.` records of a member, except the ones overlayfs would interpret.
fn pax_xattrs<R: Read>(member: &mut tar::Entry<'_, R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut xattrs = Vec::new();
    let Some(extensions) = member.pax_extensions()? else {
        return Ok(xattrs);
    };
    for extension in extensions {
        let extension = extension?;
        let Ok(key) = extension.key() else { continue };
        let Some(name) = key.strip_prefix("SCHILY.xattr.") else { continue };
        if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") || name == OWNER_XATTR {
            continue;
        }
        xattrs.push((name.to_owned(), extension.value_bytes().to_vec()));
    }
    Ok(xattrs)
}

/// Removes `name` in `parent` and, for a directory, everything below it, without following
/// symlinks.
fn remove_tree(parent: &impl AsFd, name: &str) -> Result<(), Errno> {
    match rustix::fs::unlinkat(parent, name, AtFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(Errno::ISDIR | Errno::PERM) => {}
        Err(error) => return Err(error),
    }
    let directory = rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let children: Vec<String> = {
        let mut reader = rustix::fs::Dir::read_from(&directory)?;
        let mut children = Vec::new();
        while let Some(entry) = reader.read() {
            let entry = entry?;
            let child = entry.file_name().to_string_lossy().into_owned();
            if child != "." && child != ".." {
                children.push(child);
            }
        }
        children
    };
    for child in children {
        remove_tree(&directory, &child)?;
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)
}

/// A file of the stack of snapshots `lowers` (top first) at image path `path`, read without
/// following symlinks; `None` when the topmost layer that has the path holds something else
/// than a regular file (or nothing), or when a whiteout hides it.
pub fn read_lower_file(lowers: &[PathBuf], path: &str) -> Option<Vec<u8>> {
    let (parent, base) = split_parent(path);
    for lower in lowers {
        let mut current: OwnedFd =
            rustix::fs::open(lower, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).ok()?;
        let mut missing = false;
        for component in parent.split('/').filter(|component| !component.is_empty()) {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rustix::fs::openat(&current, component, flags, Mode::empty()) {
                Ok(fd) => current = fd,
                Err(Errno::NOENT) => {
                    missing = true;
                    break;
                }
                // A symlink or a whiteout in the way: not something to read safely here.
                Err(_) => return None,
            }
        }
        if missing {
            continue;
        }
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        match rustix::fs::openat(&current, base, flags, Mode::empty()) {
            Ok(fd) => {
                let stat = rustix::fs::fstat(&fd).ok()?;
                if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
                    return None;
                }
                let mut bytes = Vec::new();
                File::from(fd).read_to_end(&mut bytes).ok()?;
                return Some(bytes);
            }
            Err(Errno::NOENT) => continue,
            Err(_) => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use super::*;
    use crate::layer::{Compression, Content, EntryKind, LayerEntry, LayerOptions, write_layer};

    fn new_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("cache")).unwrap();
        (dir, store)
    }

    fn entry(path: &str, kind: EntryKind, mode: u32) -> LayerEntry {
        LayerEntry { path: path.to_owned(), kind, mode, uid: 0, gid: 0, xattrs: Vec::new() }
    }

    fn file(path: &str, content: &str, mode: u32) -> LayerEntry {
        let bytes: Arc<[u8]> = Arc::from(content.as_bytes());
        entry(path, EntryKind::File { size: bytes.len() as u64, content: Content::Inline(bytes) }, mode)
    }

    fn layer_of(store: &Store, entries: Vec<LayerEntry>) -> LayerRecord {
        let options = LayerOptions { compression: Compression::Gzip, mtime: 0 };
        write_layer(store, entries, &options).unwrap().record
    }

    /// Writes a raw tar (for members our own writer refuses) as an uncompressed layer.
    fn raw_layer(store: &Store, members: &[(&str, tar::EntryType, &str)]) -> LayerRecord {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, entry_type, link) in members {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*entry_type);
            header.set_mode(0o644);
            header.set_size(0);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            if !link.is_empty() {
                header.set_link_name(link).unwrap();
            }
            // `append_data` would refuse `..`; write the name bytes directly.
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            builder.append(&header, io::empty()).unwrap();
        }
        let bytes = builder.into_inner().unwrap();
        let digest = Digest::of_bytes(&bytes);
        store.import_blob(&mut &bytes[..], &digest).unwrap();
        LayerRecord {
            diff_id: digest.clone(),
            digest,
            size: bytes.len() as u64,
            media_type: Compression::None.media_type().into(),
        }
    }

    fn kind_at(root: &Path, path: &str) -> String {
        let metadata = std::fs::symlink_metadata(root.join(path)).unwrap();
        let file_type = metadata.file_type();
        let kind = if file_type.is_dir() {
            "dir".to_owned()
        } else if file_type.is_symlink() {
            format!("symlink -> {}", std::fs::read_link(root.join(path)).unwrap().display())
        } else if file_type.is_char_device() {
            format!("char {},{}", rustix::fs::major(metadata.rdev()), rustix::fs::minor(metadata.rdev()))
        } else if file_type.is_file() {
            format!("file {:?}", std::fs::read_to_string(root.join(path)).unwrap())
        } else {
            "other".to_owned()
        };
        format!("{kind} {:04o}", metadata.mode() & 0o7777)
    }

    /// A directory, files (one setuid), a symlink, a hard link, a whiteout and an opaque
    /// directory.
    fn mixed_entries() -> Vec<LayerEntry> {
        vec![
            entry("etc", EntryKind::Directory, 0o750),
            file("etc/passwd", "root\n", 0o644),
            file("usr/bin/tool", "#!\n", 0o4755),
            entry("usr/bin/link", EntryKind::Symlink { target: "tool".into() }, 0o777),
            entry("usr/bin/hard", EntryKind::HardLink { target: "usr/bin/tool".into() }, 0o755),
            entry("srv/gone", EntryKind::Whiteout, 0),
            entry("srv/replaced", EntryKind::OpaqueWhiteout, 0),
        ]
    }

    #[test]
    fn a_layer_unpacks_with_overlay_whiteouts_and_is_reused() {
        let (_dir, store) = new_store();
        let mut entries = mixed_entries();
        entries.push(file("srv/replaced/new", "new", 0o600));
        let layer = layer_of(&store, entries);
        let flavour =
            if rustix::process::geteuid().is_root() { SnapshotFlavour::Privileged } else { SnapshotFlavour::Rootless };
        let snapshot = ensure_snapshot(&store, &layer, flavour).unwrap();
        assert_eq!(snapshot.parent().unwrap(), store.snapshots_dir());
        let expectations = [
            ("etc", "dir 0750"),
            ("etc/passwd", "file \"root\\n\" 0644"),
            ("usr", "dir 0755"),
            ("usr/bin/tool", "file \"#!\\n\" 4755"),
            ("usr/bin/link", "symlink -> tool 0777"),
            ("srv/gone", "char 0,0 0000"),
            ("srv/replaced", "dir 0755"),
            ("srv/replaced/new", "file \"new\" 0600"),
        ];
        for (path, expected) in expectations {
            assert_eq!(kind_at(&snapshot, path), expected, "{path}");
        }
        let tool = std::fs::metadata(snapshot.join("usr/bin/tool")).unwrap();
        assert_eq!(tool.nlink(), 2, "the hard link shares the inode");
        let mut opaque = [0u8; 4];
        let length =
            rustix::fs::lgetxattr(snapshot.join("srv/replaced"), flavour.opaque_xattr(), &mut opaque[..]).unwrap();
        assert_eq!(&opaque[..length], b"y");
        assert_eq!(read_lower_file(std::slice::from_ref(&snapshot), "etc/passwd").unwrap(), b"root\n");
        assert_eq!(read_lower_file(std::slice::from_ref(&snapshot), "usr/bin/link"), None, "symlinks are not followed");

        // A second call reuses the snapshot; the temp dir is gone.
        std::fs::write(snapshot.join("marker"), "").unwrap();
        assert_eq!(ensure_snapshot(&store, &layer, flavour).unwrap(), snapshot);
        assert!(snapshot.join("marker").exists());
        assert_eq!(std::fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn a_snapshot_streamed_while_the_layer_is_written_is_the_unpacked_one() {
        let (_dir, store) = new_store();
        let mut entries = mixed_entries();
        // Enough content for several chunks of the stream.
        for index in 0..40 {
            let bytes: Arc<[u8]> = Arc::from(crate::host::incompressible_bytes(10_000, index));
            let kind = EntryKind::File { size: bytes.len() as u64, content: Content::Inline(bytes) };
            entries.push(entry(&format!("data/f{index}"), kind, 0o640));
        }
        let flavour =
            if rustix::process::geteuid().is_root() { SnapshotFlavour::Privileged } else { SnapshotFlavour::Rootless };
        let mut streamed = StreamedSnapshot::start(&store, flavour).unwrap();
        let options = LayerOptions { compression: Compression::Gzip, mtime: 0 };
        let layer = crate::layer::write_layer_observed(&store, entries, &options, &mut |bytes| streamed.push(bytes))
            .unwrap()
            .record;
        assert!(streamed.finish(&layer));
        let snapshot = store.snapshots_dir().join(flavour.directory_name(&layer.diff_id));
        assert_eq!(ensure_snapshot(&store, &layer, flavour).unwrap(), snapshot, "RUN steps find it ready");

        let unpacked = tempfile::tempdir().unwrap();
        unpack_layer(&store, &layer, unpacked.path(), flavour).unwrap();
        let listing = crate::host::directory_listing(&snapshot).unwrap();
        assert_eq!(listing, crate::host::directory_listing(unpacked.path()).unwrap());
        assert!(listing.contains("data/f39"), "{listing}");
        assert_eq!(std::fs::read_dir(store.tmp_dir()).unwrap().count(), 0, "nothing is left in tmp/");
    }

    #[test]
    fn entries_that_would_write_outside_the_snapshot_are_refused() {
        let (_dir, store) = new_store();
        type Members<'a> = Vec<(&'a str, tar::EntryType, &'a str)>;
        let cases: Vec<(Members<'_>, &str)> = vec![
            (vec![("../escape", tar::EntryType::Regular, "")], "would land outside the image root"),
            (vec![("/abs", tar::EntryType::Regular, "")], "would land outside the image root"),
            (vec![("a/.wh...", tar::EntryType::Regular, "")], "would land outside the image root"),
            (
                vec![("link", tar::EntryType::Symlink, "/tmp"), ("link/file", tar::EntryType::Regular, "")],
                "is written through the symlink or non-directory \"link\"",
            ),
            (
                vec![("link", tar::EntryType::Symlink, ".."), ("link/.wh.x", tar::EntryType::Regular, "")],
                "through the symlink",
            ),
            (vec![("hard", tar::EntryType::Link, "../../etc/passwd")], "would land outside the image root"),
            (vec![("hard", tar::EntryType::Link, "elsewhere")], "which this layer does not hold"),
            (
                vec![("link", tar::EntryType::Symlink, "/etc"), ("hard", tar::EntryType::Link, "link/passwd")],
                "through the symlink",
            ),
        ];
        for (members, expected) in cases {
            let layer = raw_layer(&store, &members);
            let error = ensure_snapshot(&store, &layer, SnapshotFlavour::Rootless).unwrap_err().to_string();
            assert!(error.contains(expected), "{members:?}: {error:?} does not contain {expected:?}");
            assert!(!store.snapshots_dir().join(format!("{}.user", layer.diff_id.hex())).exists());
        }
        assert_eq!(std::fs::read_dir(store.tmp_dir()).unwrap().count(), 0, "failed unpacks are removed");
    }

    #[test]
    fn later_members_replace_earlier_ones_and_whiteouts_never_hide_their_own_layer() {
        let (_dir, store) = new_store();
        let layer = raw_layer(
            &store,
            &[
                ("x", tar::EntryType::Directory, ""),
                ("x/child", tar::EntryType::Regular, ""),
                ("x", tar::EntryType::Symlink, "target"),
                ("kept", tar::EntryType::Regular, ""),
                (".wh.kept", tar::EntryType::Regular, ""),
            ],
        );
        let snapshot = ensure_snapshot(&store, &layer, SnapshotFlavour::Rootless).unwrap();
        assert_eq!(kind_at(&snapshot, "x"), "symlink -> target 0777");
        assert_eq!(kind_at(&snapshot, "kept"), "file \"\" 0644");
    }

    #[test]
    fn a_corrupt_layer_leaves_no_snapshot() {
        let (_dir, store) = new_store();
        let mut layer = layer_of(&store, vec![file("a", "a", 0o644)]);
        layer.diff_id = Digest::of_bytes(b"something else");
        let error = ensure_snapshot(&store, &layer, SnapshotFlavour::Rootless).unwrap_err().to_string();
        assert!(error.contains("uncompressed content has digest"), "{error}");
        assert_eq!(std::fs::read_dir(store.snapshots_dir()).unwrap().count(), 0);
    }
}
