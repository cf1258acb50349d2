//! The entry model of a layer: what a step hands the layer writer, the compressions a layer
//! blob may have, and the OCI whiteout names.
//!
//! What it deliberately is not: a tar writer or reader (see `write` and `read`).

use std::path::PathBuf;
use std::sync::Arc;

/// The gzip level of every gzip layer. Changing it changes every layer digest (and needs a new
/// `KEY_FORMAT_VERSION`).
///
/// Level 2 (zlib-rs's "fast" strategy, with dynamic Huffman trees) rather than zlib's default 6:
/// compressing a layer is the largest cost of committing a big RUN step (an `apt-get install`
/// leaves 80 MB of package caches), and level 2 halves it for about 3 % more bytes. Level 1
/// (zlib-rs's "quick", static trees only) is twice as fast again but 25 % larger.
pub const GZIP_LEVEL: u32 = 2;

/// The zstd level of every zstd layer. Changing it changes every layer digest.
pub const ZSTD_LEVEL: i32 = 3;

/// The name prefix of an OCI whiteout file (`dir/.wh.name` deletes `dir/name`).
pub const WHITEOUT_PREFIX: &str = ".wh.";

/// The name of an OCI opaque whiteout file (`dir/.wh..wh..opq` hides the lower `dir/*`).
pub const OPAQUE_WHITEOUT_NAME: &str = ".wh..wh..opq";

/// The compression of the layers a build writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar+gzip`, the default: every client reads it.
    #[default]
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd`.
    Zstd,
    /// `application/vnd.oci.image.layer.v1.tar`.
    None,
}

impl Compression {
    /// The OCI media type of a layer blob with this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }

    /// The compression a layer media type implies (OCI and Docker media types).
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Compression::Zstd),
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            _ => None,
        }
    }
}

/// How a layer is written: the choices that are the same for every entry of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerOptions {
    /// The compression of the layer blob.
    pub compression: Compression,
    /// The mtime of every entry: `SOURCE_DATE_EPOCH` when set, else 0.
    pub mtime: u64,
}

/// Where a regular file's bytes come from when the tar is written.
#[derive(Debug, Clone)]
pub enum Content {
    /// Bytes held in memory (a `write_file` step's content).
    Inline(Arc<[u8]>),
    /// A file inside a build context, opened through the context's capability so that it can
    /// never resolve outside it. `path` is context-relative.
    Context {
        /// The context's root directory.
        dir: Arc<cap_std::fs::Dir>,
        /// The file's path relative to `dir`.
        path: String,
    },
    /// A file the builder itself wrote (a spooled file of a `copy_from`).
    HostFile(PathBuf),
}

/// What a layer entry is, with what only that kind of entry has.
#[derive(Debug, Clone)]
pub enum EntryKind {
    /// A directory.
    Directory,
    /// `size` is what the header says; a source whose length differs when read is an error.
    File {
        /// Where the file's bytes come from.
        content: Content,
        /// The file's size in bytes.
        size: u64,
    },
    /// A symbolic link.
    Symlink {
        /// The link's target, written as given (relative or absolute).
        target: String,
    },
    /// A hard link to `target`, an image-relative path written earlier in the same layer.
    HardLink {
        /// The image-relative path of the file linked to.
        target: String,
    },
    /// A character device node.
    CharDevice {
        /// The device's major number.
        major: u32,
        /// The device's minor number.
        minor: u32,
    },
    /// A block device node.
    BlockDevice {
        /// The device's major number.
        major: u32,
        /// The device's minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
    /// Deletes `path` from lower layers: written as `dir/.wh.name`.
    Whiteout,
    /// Hides everything below directory `path` in lower layers: written as
    /// `path/.wh..wh..opq`.
    OpaqueWhiteout,
}

/// One entry of a layer. `path` is image-relative and normalised (`app/bin/x`, no leading `/`).
#[derive(Debug, Clone)]
pub struct LayerEntry {
    /// The entry's image-relative, normalised path.
    pub path: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (no file-type bits).
    pub mode: u32,
    /// The owner's user id.
    pub uid: u32,
    /// The owner's group id.
    pub gid: u32,
    /// Extended attributes, written as `SCHILY.xattr.` PAX records.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Component-wise order: `a` < `a/b` < `a-b`, so a directory always precedes its contents.
pub fn compare_paths(left: &str, right: &str) -> std::cmp::Ordering {
    left.split('/').cmp(right.split('/'))
}
