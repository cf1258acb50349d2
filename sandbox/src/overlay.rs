//! The overlay mount of a RUN step, with the new mount API: `fsopen("overlay")`, one
//! `fsconfig` per option (`lowerdir+` once per layer, top first, so that a chain deeper than
//! the classic option string allows still mounts), `fsmount`, `move_mount` onto the merged
//! directory.
//!
//! The options are prepared by the parent (all allocation happens there) and applied by the
//! sandbox's child process, inside its own mount namespace, with only raw syscalls: the
//! builder is multi-threaded, so nothing between `clone` and `execve` may allocate. Paths are
//! given relative to the store root, which the child makes its working directory first, because
//! `fsconfig` takes strings of at most 255 bytes.
//!
//! The mount is `nodev`: a device node shipped in an image layer (its snapshot holds it with
//! the image's mode and numbers, so that a layer written from the upper directory carries it
//! faithfully) or made by the command does not open inside the sandbox.
//!
//! Options besides the layers: `redirect_dir=nofollow` and `metacopy=off` so that the upper
//! directory holds whole files and no redirects (a rename of a lower directory copies, as in
//! Docker); `index=off`; `userxattr` in a user namespace (rootless), where overlay keeps its
//! xattrs under `user.overlay.*`; and `volatile` (kernel 5.10+), because the upper directory is
//! scratch: it is read into a layer that the store commits durably on its own, then deleted, and
//! a crash discards it. Without it every copy-up fsyncs the copied file: a `chown -R` over 300
//! files spent a second in fsyncs, and deleting the synced upper afterwards most of another (on
//! ext4 with online discard).
//!
//! Kernels before 6.8 lack `lowerdir+` (and before 5.2 the new API): there (as the kernel
//! release says, or as the kernel answers the first `lowerdir+`) the same overlay is mounted
//! with `mount(2)` and the classic option string, whose page-size limit is kept by naming
//! the layers through a directory of short symlinks (`0`, `1`, ...), as Docker's overlay2 does.
//!
//! What this module deliberately is not: the sandbox (namespaces, pivot_root, exec; see
//! `child`, which calls [`OverlayMount::mount`]), a way to mount anything in the calling
//! process's own mount namespace, or the layout of the run directory (the caller makes the
//! upper, work, merged and short-link directories and names them in [`OverlayPaths`]).

use std::ffi::CString;
use std::path::{Path, PathBuf};

use rustix::fd::AsFd;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MoveMountFlags};
use thiserror::Error;

use crate::failure::{Failure, Stage};

/// The longest string `fsconfig(FSCONFIG_SET_STRING)` accepts.
const FSCONFIG_STRING_LIMIT: usize = 255;

/// The longest option string `mount(2)` passes (a page, with its NUL).
const CLASSIC_DATA_LIMIT: usize = 4096;

/// The deepest stack of lower directories overlayfs mounts (`OVL_MAX_STACK`).
pub const MAX_LOWER_LAYERS: usize = 500;

/// Why an overlay cannot be planned (before anything is mounted).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OverlayError {
    /// A path (relative to the store root) is too long for `fsconfig`, or holds a NUL byte.
    #[error("overlay path {path} is longer than the {FSCONFIG_STRING_LIMIT} bytes fsconfig accepts")]
    PathTooLong {
        /// The path as given.
        path: PathBuf,
    },
    /// More lower directories than overlayfs stacks.
    #[error("the image has {layers} non-empty layers below the RUN step; overlayfs stacks at most {MAX_LOWER_LAYERS}")]
    TooManyLayers {
        /// How many were given.
        layers: usize,
    },
}

/// One `fsconfig` call: a key and its string value, or a flag.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ConfigOption {
    key: CString,
    value: Option<CString>,
}

/// How an overlay is mounted, besides its paths.
#[derive(Debug, Clone, Copy, Default)]
pub struct OverlayOptions {
    /// Overlay's own xattrs under `user.overlay.*`: a mount in a user namespace (rootless).
    pub userxattr: bool,
    /// No syncs to the upper directory (`volatile`, kernel 5.10+): for an upper that is
    /// scratch, never mounted again.
    pub volatile: bool,
    /// Mount with `mount(2)` and the classic option string, skipping the new API: kernels before
    /// 6.8 (and tests of the fallback).
    pub prefer_classic: bool,
}

/// The paths of an overlay mount.
#[derive(Debug, Clone, Copy)]
pub struct OverlayPaths<'a> {
    /// The directory the child mounts from (the store root): paths below it are passed relative.
    pub base_dir: &'a Path,
    /// The lower directories, top first.
    pub lowers: &'a [PathBuf],
    /// The upper directory: where every write lands.
    pub upper: &'a Path,
    /// Overlayfs's work directory (empty, on the upper's filesystem).
    pub work: &'a Path,
    /// Where the mount is attached (the merged directory).
    pub target: &'a Path,
    /// A directory of symlinks `0`, `1`, ... to `lowers`, beside `upper`, `work` and `target`:
    /// the short names the classic option string needs.
    pub short_lowers: &'a Path,
}

/// The classic `mount(2)` of the same overlay, for kernels without `lowerdir+` (before 6.8):
/// one option string of at most a page, made from the directory of short lower links.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClassicOverlay {
    /// The directory of short links (relative to the store root).
    directory: CString,
    /// `lowerdir=0:1:...,upperdir=../upper,...`
    data: CString,
    /// The target relative to `directory`.
    target: CString,
}

impl ClassicOverlay {
    /// `None` when the option string would not fit a page.
    fn new(
        paths: &OverlayPaths<'_>,
        options: &OverlayOptions,
        relative: &dyn Fn(&Path) -> Result<CString, OverlayError>,
    ) -> Result<Option<ClassicOverlay>, OverlayError> {
        // `../name` for a sibling of the links directory, else the absolute path.
        let from_links = |path: &Path| -> String {
            match (path.parent(), path.file_name()) {
                (Some(parent), Some(name)) if Some(parent) == paths.short_lowers.parent() => {
                    format!("../{}", name.to_string_lossy())
                }
                _ => path.display().to_string(),
            }
        };
        let lowers: Vec<String> = (0..paths.lowers.len()).map(|index| index.to_string()).collect();
        let mut data = format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=nofollow,metacopy=off,index=off",
            lowers.join(":"),
            from_links(paths.upper),
            from_links(paths.work)
        );
        if options.userxattr {
            data.push_str(",userxattr");
        }
        if options.volatile {
            data.push_str(",volatile");
        }
        if data.len() >= CLASSIC_DATA_LIMIT || data.contains(['\0', ' ']) {
            return Ok(None);
        }
        Ok(Some(ClassicOverlay {
            directory: relative(paths.short_lowers)?,
            data: CString::new(data).expect("checked for NUL bytes above"),
            target: CString::new(from_links(paths.target))
                .map_err(|_| OverlayError::PathTooLong { path: paths.target.to_owned() })?,
        }))
    }
}

/// An overlay mount, ready to be made by the sandbox child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayMount {
    options: Vec<ConfigOption>,
    /// Where the mount is attached (relative to the store root).
    target: CString,
    classic: Option<ClassicOverlay>,
    prefer_classic: bool,
}

impl OverlayMount {
    /// The overlay of `paths.lowers` (top first) with `paths.upper` and `paths.work`, to be
    /// attached at `paths.target`; every path below `paths.base_dir` is given relative to it.
    pub fn new(paths: &OverlayPaths<'_>, overlay_options: &OverlayOptions) -> Result<OverlayMount, OverlayError> {
        if paths.lowers.len() > MAX_LOWER_LAYERS {
            return Err(OverlayError::TooManyLayers { layers: paths.lowers.len() });
        }
        let relative = |path: &Path| -> Result<CString, OverlayError> {
            let shown = path.strip_prefix(paths.base_dir).unwrap_or(path);
            let text = shown.as_os_str().as_encoded_bytes();
            if text.len() > FSCONFIG_STRING_LIMIT || text.contains(&0) {
                return Err(OverlayError::PathTooLong { path: path.to_owned() });
            }
            Ok(CString::new(text).expect("checked for NUL bytes above"))
        };
        let string = |key: &str, value: CString| ConfigOption {
            key: CString::new(key).expect("option names have no NUL"),
            value: Some(value),
        };
        let literal = |key: &str, value: &str| string(key, CString::new(value).expect("option values have no NUL"));
        let mut options = vec![literal("source", "layerwright")];
        for lower in paths.lowers {
            options.push(string("lowerdir+", relative(lower)?));
        }
        options.push(string("upperdir", relative(paths.upper)?));
        options.push(string("workdir", relative(paths.work)?));
        options.push(literal("redirect_dir", "nofollow"));
        options.push(literal("metacopy", "off"));
        options.push(literal("index", "off"));
        for (wanted, flag) in [(overlay_options.userxattr, "userxattr"), (overlay_options.volatile, "volatile")] {
            if wanted {
                options.push(ConfigOption { key: CString::new(flag).expect("no NUL"), value: None });
            }
        }
        Ok(OverlayMount {
            options,
            target: relative(paths.target)?,
            classic: ClassicOverlay::new(paths, overlay_options, &relative)?,
            prefer_classic: overlay_options.prefer_classic,
        })
    }

    /// Makes the mount and attaches it at the target. Runs in the sandbox child with the store
    /// root as working directory: raw syscalls only, no allocation.
    // The failure is returned by value: the child must not allocate a Box.
    #[allow(clippy::result_large_err)]
    pub(crate) fn mount(&self) -> Result<(), Failure> {
        if self.prefer_classic {
            return self.mount_classic();
        }
        let filesystem = match rustix::mount::fsopen(c"overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
            Ok(filesystem) => filesystem,
            // Before Linux 5.2 there is no new mount API at all.
            Err(Errno::NOSYS) => return self.mount_classic(),
            Err(error) => return Err(Failure::new(Stage::OverlayOpen, 0, error)),
        };
        for (index, option) in self.options.iter().enumerate() {
            let result = match &option.value {
                Some(value) => rustix::mount::fsconfig_set_string(&filesystem, option.key.as_c_str(), value.as_c_str()),
                None => rustix::mount::fsconfig_set_flag(&filesystem, option.key.as_c_str()),
            };
            match result {
                Ok(()) => {}
                // Before Linux 6.8 overlayfs does not know `lowerdir+` (the first layer is
                // option 1, after `source`).
                Err(Errno::INVAL) if index == 1 && option.key.as_bytes() == b"lowerdir+" => {
                    return self.mount_classic();
                }
                Err(error) => return Err(Failure::new(Stage::OverlayOption, index as u32, error).with_log(&filesystem)),
            }
        }
        rustix::mount::fsconfig_create(&filesystem)
            .map_err(|error| Failure::new(Stage::OverlayCreate, 0, error).with_log(&filesystem))?;
        let mount =
            rustix::mount::fsmount(&filesystem, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::MOUNT_ATTR_NODEV)
                .map_err(|error| Failure::new(Stage::OverlayMount, 0, error).with_log(&filesystem))?;
        rustix::mount::move_mount(
            mount.as_fd(),
            c"",
            rustix::fs::CWD,
            self.target.as_c_str(),
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(|error| Failure::new(Stage::OverlayAttach, 0, error))?;
        Ok(())
    }

    /// `mount(2)` with the classic option string, from the directory of short lower links.
    // The failure is returned by value: the child must not allocate a Box.
    #[allow(clippy::result_large_err)]
    fn mount_classic(&self) -> Result<(), Failure> {
        let fail = |detail: u32| move |error: Errno| Failure::new(Stage::OverlayClassic, detail, error);
        let Some(classic) = &self.classic else {
            return Err(Failure::new(Stage::OverlayClassic, 0, Errno::TOOBIG));
        };
        let base = rustix::fs::open(c".", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(fail(1))?;
        rustix::process::chdir(classic.directory.as_c_str()).map_err(fail(1))?;
        let mounted = rustix::mount::mount(
            c"layerwright",
            classic.target.as_c_str(),
            c"overlay",
            MountFlags::NODEV,
            Some(classic.data.as_c_str()),
        );
        rustix::process::fchdir(&base).map_err(fail(1))?;
        mounted.map_err(fail(2))
    }

    /// The call a failure of [`OverlayMount::mount`] is about, with its arguments.
    pub(crate) fn describe(&self, stage: Stage, detail: u32) -> String {
        match stage {
            Stage::OverlayOpen => "fsopen(\"overlay\")".to_owned(),
            Stage::OverlayOption => match self.options.get(detail as usize) {
                Some(ConfigOption { key, value: Some(value) }) => {
                    format!("fsconfig(FSCONFIG_SET_STRING, {key:?}, {value:?})")
                }
                Some(ConfigOption { key, value: None }) => format!("fsconfig(FSCONFIG_SET_FLAG, {key:?})"),
                None => format!("fsconfig (option {detail})"),
            },
            Stage::OverlayCreate => format!("fsconfig(FSCONFIG_CMD_CREATE) of the overlay [{}]", self.summary()),
            Stage::OverlayMount => "fsmount(overlay)".to_owned(),
            Stage::OverlayAttach => format!("move_mount(overlay, {:?})", self.target),
            Stage::OverlayClassic => match &self.classic {
                Some(classic) => format!(
                    "mount(\"overlay\", {:?}, {:?}) from {:?} (this kernel's overlayfs lacks `lowerdir+`)",
                    classic.target, classic.data, classic.directory
                ),
                None => "the classic overlay mount (this kernel's overlayfs lacks `lowerdir+`, and the layers do not \
                         fit its option string)"
                    .to_owned(),
            },
            other => format!("{other:?}"),
        }
    }

    /// `key=value,...` of every option, for messages.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .options
            .iter()
            .map(|option| match &option.value {
                Some(value) => format!("{}={}", option.key.to_string_lossy(), value.to_string_lossy()),
                None => option.key.to_string_lossy().into_owned(),
            })
            .collect();
        parts.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths<'a>(lowers: &'a [PathBuf]) -> OverlayPaths<'a> {
        OverlayPaths {
            base_dir: Path::new("/cache"),
            lowers,
            upper: Path::new("/cache/tmp/run-1/upper"),
            work: Path::new("/cache/tmp/run-1/work"),
            target: Path::new("/cache/tmp/run-1/merged"),
            short_lowers: Path::new("/cache/tmp/run-1/lowers"),
        }
    }

    #[test]
    fn options_are_relative_to_the_store_root_and_layers_are_added_top_first() {
        let lowers = [PathBuf::from("/cache/snapshots/top"), PathBuf::from("/cache/snapshots/bottom")];
        let options = OverlayOptions { userxattr: true, volatile: true, prefer_classic: false };
        let mount = OverlayMount::new(&paths(&lowers), &options).unwrap();
        assert_eq!(
            mount.summary(),
            "source=layerwright,lowerdir+=snapshots/top,lowerdir+=snapshots/bottom,upperdir=tmp/run-1/upper,\
             workdir=tmp/run-1/work,redirect_dir=nofollow,metacopy=off,index=off,userxattr,volatile"
        );
        assert_eq!(
            mount.describe(Stage::OverlayOption, 2),
            r#"fsconfig(FSCONFIG_SET_STRING, "lowerdir+", "snapshots/bottom")"#
        );
        assert_eq!(mount.describe(Stage::OverlayAttach, 0), r#"move_mount(overlay, "tmp/run-1/merged")"#);
        // The classic form names the layers by their short links, from the links directory.
        assert_eq!(
            mount.describe(Stage::OverlayClassic, 2),
            r#"mount("overlay", "../merged", "lowerdir=0:1,upperdir=../upper,workdir=../work,redirect_dir=nofollow,metacopy=off,index=off,userxattr,volatile") from "tmp/run-1/lowers" (this kernel's overlayfs lacks `lowerdir+`)"#
        );
    }

    #[test]
    fn paths_fsconfig_cannot_take_and_stacks_overlayfs_cannot_mount_are_refused() {
        let long = [PathBuf::from(format!("/elsewhere/{}", "x".repeat(300)))];
        let error = OverlayMount::new(&paths(&long), &OverlayOptions::default()).unwrap_err();
        assert!(error.to_string().contains("longer than the 255 bytes fsconfig accepts"), "{error}");
        let lowers = vec![PathBuf::from("/cache/snapshots/x"); MAX_LOWER_LAYERS + 1];
        let error = OverlayMount::new(&paths(&lowers), &OverlayOptions::default()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the image has 501 non-empty layers below the RUN step; overlayfs stacks at most 500"
        );
        // 500 layers still fit the classic option string through their short names.
        let lowers = vec![PathBuf::from("/cache/snapshots/x"); MAX_LOWER_LAYERS];
        assert!(OverlayMount::new(&paths(&lowers), &OverlayOptions::default()).unwrap().classic.is_some());
    }
}
