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
//! Options besides the layers: `redirect_dir=nofollow` and `metacopy=off` so that the upper
//! directory holds whole files and no redirects (a rename of a lower directory copies, as in
//! Docker); `index=off`; `userxattr` in a user namespace (rootless), where overlay keeps its
//! xattrs under `user.overlay.*`.
//!
//! What this module deliberately is not: the sandbox (namespaces, pivot_root, exec), or a way
//! to mount anything in the calling process's own mount namespace.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use rustix::fd::AsFd;
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags};
use thiserror::Error;

use crate::run::sandbox::{Failure, Stage};

/// The longest string `fsconfig(FSCONFIG_SET_STRING)` accepts.
const FSCONFIG_STRING_LIMIT: usize = 255;

/// The deepest stack of lower directories overlayfs mounts (`OVL_MAX_STACK`).
pub const MAX_LOWER_LAYERS: usize = 500;

#[derive(Debug, Error)]
pub enum OverlayError {
    #[error("overlay path {path} is longer than the {FSCONFIG_STRING_LIMIT} bytes fsconfig accepts")]
    PathTooLong { path: PathBuf },
    #[error("the image has {layers} non-empty layers below the RUN step; overlayfs stacks at most {MAX_LOWER_LAYERS}")]
    TooManyLayers { layers: usize },
}

/// One `fsconfig` call: a key and its string value, or a flag.
#[derive(Debug, Clone)]
struct ConfigOption {
    key: CString,
    value: Option<CString>,
}

/// An overlay mount, ready to be made by the sandbox child.
#[derive(Debug, Clone)]
pub struct OverlayMount {
    options: Vec<ConfigOption>,
    /// Where the mount is attached (relative to the store root).
    target: CString,
}

impl OverlayMount {
    /// The overlay of `lowers` (top first) with `upper` and `work`, to be attached at `target`;
    /// every path below `base_dir` is given relative to it.
    pub fn new(
        base_dir: &Path,
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
        userxattr: bool,
    ) -> Result<OverlayMount, OverlayError> {
        if lowers.len() > MAX_LOWER_LAYERS {
            return Err(OverlayError::TooManyLayers { layers: lowers.len() });
        }
        let relative = |path: &Path| -> Result<CString, OverlayError> {
            let shown = path.strip_prefix(base_dir).unwrap_or(path);
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
        for lower in lowers {
            options.push(string("lowerdir+", relative(lower)?));
        }
        options.push(string("upperdir", relative(upper)?));
        options.push(string("workdir", relative(work)?));
        options.push(literal("redirect_dir", "nofollow"));
        options.push(literal("metacopy", "off"));
        options.push(literal("index", "off"));
        if userxattr {
            options.push(ConfigOption { key: CString::new("userxattr").expect("no NUL"), value: None });
        }
        Ok(OverlayMount { options, target: relative(target)? })
    }

    /// Makes the mount and attaches it at the target. Runs in the sandbox child with the store
    /// root as working directory: raw syscalls only, no allocation.
    // The failure is returned by value: the child must not allocate a Box.
    #[allow(clippy::result_large_err)]
    pub fn mount(&self) -> Result<(), Failure> {
        let filesystem = rustix::mount::fsopen(c"overlay", FsOpenFlags::FSOPEN_CLOEXEC)
            .map_err(|error| Failure::new(Stage::OverlayOpen, 0, error))?;
        for (index, option) in self.options.iter().enumerate() {
            let result = match &option.value {
                Some(value) => rustix::mount::fsconfig_set_string(&filesystem, option.key.as_c_str(), value.as_c_str()),
                None => rustix::mount::fsconfig_set_flag(&filesystem, option.key.as_c_str()),
            };
            result.map_err(|error| Failure::new(Stage::OverlayOption, index as u32, error).with_log(&filesystem))?;
        }
        rustix::mount::fsconfig_create(&filesystem)
            .map_err(|error| Failure::new(Stage::OverlayCreate, 0, error).with_log(&filesystem))?;
        let mount = rustix::mount::fsmount(&filesystem, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())
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

    /// The call a failure of [`OverlayMount::mount`] is about, with its arguments.
    pub fn describe(&self, stage: Stage, detail: u32) -> String {
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

    #[test]
    fn options_are_relative_to_the_store_root_and_layers_are_added_top_first() {
        let base = Path::new("/cache");
        let lowers = [PathBuf::from("/cache/snapshots/top"), PathBuf::from("/cache/snapshots/bottom")];
        let mount = OverlayMount::new(
            base,
            &lowers,
            Path::new("/cache/tmp/run-1/upper"),
            Path::new("/cache/tmp/run-1/work"),
            Path::new("/cache/tmp/run-1/merged"),
            true,
        )
        .unwrap();
        assert_eq!(
            mount.summary(),
            "source=layerwright,lowerdir+=snapshots/top,lowerdir+=snapshots/bottom,upperdir=tmp/run-1/upper,\
             workdir=tmp/run-1/work,redirect_dir=nofollow,metacopy=off,index=off,userxattr"
        );
        assert_eq!(
            mount.describe(Stage::OverlayOption, 2),
            r#"fsconfig(FSCONFIG_SET_STRING, "lowerdir+", "snapshots/bottom")"#
        );
        assert_eq!(mount.describe(Stage::OverlayAttach, 0), r#"move_mount(overlay, "tmp/run-1/merged")"#);
    }

    #[test]
    fn paths_fsconfig_cannot_take_and_stacks_overlayfs_cannot_mount_are_refused() {
        let long = PathBuf::from(format!("/elsewhere/{}", "x".repeat(300)));
        let error =
            OverlayMount::new(Path::new("/cache"), &[long], Path::new("u"), Path::new("w"), Path::new("m"), false)
                .unwrap_err();
        assert!(error.to_string().contains("longer than the 255 bytes fsconfig accepts"), "{error}");
        let lowers = vec![PathBuf::from("/cache/snapshots/x"); MAX_LOWER_LAYERS + 1];
        let error =
            OverlayMount::new(Path::new("/cache"), &lowers, Path::new("u"), Path::new("w"), Path::new("m"), false)
                .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the image has 501 non-empty layers below the RUN step; overlayfs stacks at most 500"
        );
    }
}
