//! The entry model of a layer: what a step hands the layer writer, the compressions a layer
//! blob may have, and the OCI whiteout names.
//!
//! What it deliberately is not: a tar writer or reader (see `write` and `read`).

use std::path::PathBuf;
use std::sync::Arc;

/// The gzip level of every gzip layer. Changing it changes every layer digest.
pub const GZIP_LEVEL: u32 = 6;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerOptions {
    pub compression: Compression,
    /// The mtime of every entry: `SOURCE_DATE_EPOCH` when set, else 0.
    pub mtime: u64,
}

/// Where a regular file's bytes come from when the tar is written.
#[derive(Debug, Clone)]
pub enum Content {
    Inline(Arc<[u8]>),
    /// A file inside a build context, opened through the context's capability so that it can
    /// never resolve outside it. `path` is context-relative.
    Context {
        dir: Arc<cap_std::fs::Dir>,
        path: String,
    },
    /// A file the builder itself wrote (a spooled file of a `copy_from`).
    HostFile(PathBuf),
}

#[derive(Debug, Clone)]
pub enum EntryKind {
    Directory,
    /// `size` is what the header says; a source whose length differs when read is an error.
    File {
        content: Content,
        size: u64,
    },
    Symlink {
        target: String,
    },
    /// A hard link to `target`, an image-relative path written earlier in the same layer.
    HardLink {
        target: String,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
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
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (no file-type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Extended attributes, written as `SCHILY.xattr.` PAX records.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Component-wise order: `a` < `a/b` < `a-b`, so a directory always precedes its contents.
pub fn compare_paths(left: &str, right: &str) -> std::cmp::Ordering {
    left.split('/').cmp(right.split('/'))
}
