//! RUN mounts: what a RUN step sees mounted while its command runs, and never finds in its layer
//! (BuildKit's `RUN --mount=type=cache|tmpfs|secret|bind|ssh`).
//!
//! [`Mount`] is declared with a constructor per kind and chainable options, and attached with
//! [`Run::mount`](crate::Run::mount):
//!
//! ```
//! use layerwright_dsl::{Image, Mount, Run, Sharing};
//!
//! let base = Image::from_archive("busybox.tar");
//! let run = Run::shell("cargo build --release")
//!     .mount(Mount::cache("/root/.cargo/registry"))
//!     .mount(Mount::cache("/src/target").id("target").sharing(Sharing::Locked))
//!     .mount(Mount::secret("/run/secrets/token", "token"))
//!     .mount(Mount::tmpfs("/tmp").size(64 << 20));
//! assert_eq!(run.mounts.len(), 4);
//! assert_eq!(run.mounts[0].target(), "/root/.cargo/registry");
//! let built = base.run(run);
//! # let _ = built;
//! ```
//!
//! What this module deliberately is not: validation (a relative, duplicate or `/` target is
//! reported when the image is built, naming the step and the target: declaring never fails),
//! or anything that touches a disk. An option that does not apply to a kind (`.size` on a cache
//! mount, `.writable` on a secret) is ignored: the kinds share one builder type so that
//! declarations read like Dockerfile flags.

use std::hash::{Hash, Hasher};

use crate::step::Owner;
use crate::{Context, Image};

/// How concurrent RUN steps (in one build or in concurrent builds on one cache directory)
/// share a cache mount with the same id. BuildKit's `sharing=shared|locked|private`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Sharing {
    /// Every user mounts the same directory at once (the default, as BuildKit's).
    #[default]
    Shared,
    /// One user at a time: a step waits until the one holding the id has finished.
    Locked,
    /// Each concurrent user gets a directory of its own (one not in use, else a new one).
    Private,
}

impl Sharing {
    /// The byte the step's key encodes this mode as.
    pub fn key_byte(self) -> u8 {
        match self {
            Sharing::Shared => 0,
            Sharing::Locked => 1,
            Sharing::Private => 2,
        }
    }
}

/// Where a bind mount's files come from.
#[derive(Debug, Clone)]
pub enum MountSource {
    /// Another image's final filesystem (its key enters the step's key).
    Image(Image),
    /// The build context (the selected files' digests enter the step's key).
    Context(Context),
}

impl PartialEq for MountSource {
    fn eq(&self, other: &MountSource) -> bool {
        match (self, other) {
            (MountSource::Image(left), MountSource::Image(right)) => left.same_node(right),
            (MountSource::Context(left), MountSource::Context(right)) => left == right,
            _ => false,
        }
    }
}

impl Eq for MountSource {}

impl Hash for MountSource {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            MountSource::Image(image) => {
                0u8.hash(state);
                image.node_id().hash(state);
            }
            MountSource::Context(context) => {
                1u8.hash(state);
                context.hash(state);
            }
        }
    }
}

/// One mount of a RUN step. Made with [`Mount::cache`], [`Mount::tmpfs`], [`Mount::secret`],
/// [`Mount::bind`], [`Mount::context`] or [`Mount::ssh`] and the chainable options.
///
/// Nothing a mount holds while the command runs enters the step's layer. Where its target did
/// not exist in the image, the layer gets the empty mountpoint directory (with any missing
/// parents), as BuildKit leaves it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mount {
    /// A directory kept in the builder's cache directory across builds: the same id finds what
    /// earlier steps left there. Its key holds the id, target and options, never the contents.
    Cache {
        /// Absolute path inside the image, as declared.
        target: String,
        /// What identifies the directory across steps and builds; the target by default.
        id: String,
        /// How concurrent users share it.
        sharing: Sharing,
        /// The owner the directory is created with; root by default.
        owner: Option<Owner>,
        /// The permission bits it is created with; 0755 by default.
        mode: Option<u32>,
    },
    /// A fresh, empty tmpfs (`nosuid`, `nodev`) gone when the command ends.
    Tmpfs {
        /// Absolute path inside the image, as declared.
        target: String,
        /// Its size limit in bytes; the kernel's default (half the RAM) when `None`.
        size: Option<u64>,
    },
    /// A read-only file holding a secret the builder was given under `id`. Its bytes never
    /// enter the key, a layer, a log or a record; a changed secret does not rebuild the step
    /// (as in BuildKit) unless the builder was told to key it by its digest.
    Secret {
        /// Absolute path of the file inside the image, as declared.
        target: String,
        /// The secret's name, as given to the builder.
        id: String,
        /// The file's owner; root by default.
        owner: Option<Owner>,
        /// The file's permission bits; 0400 by default.
        mode: Option<u32>,
    },
    /// Files of another image or of the build context, read-only unless writable (then writes
    /// go to a throwaway layer). What is mounted enters the key.
    Bind {
        /// Where the files come from.
        source: MountSource,
        /// The path inside the source, as declared.
        path: String,
        /// Absolute path inside the image, as declared.
        target: String,
        /// Whether the command may write there (its writes are thrown away).
        writable: bool,
    },
    /// The host's SSH agent socket (`SSH_AUTH_SOCK`), with `SSH_AUTH_SOCK` set for the command.
    Ssh {
        /// Which agent the builder was given; `default` by default.
        id: String,
        /// Where the socket is mounted.
        target: String,
    },
}

/// Where [`Mount::ssh`] mounts the agent socket unless told otherwise.
pub const SSH_AGENT_TARGET: &str = "/run/layerwright/ssh_agent.sock";

impl Mount {
    /// A cache mount at `target` (its id is the target until [`Mount::id`] says otherwise),
    /// shared, created 0755 and owned by root.
    ///
    /// ```
    /// use layerwright_dsl::{Mount, Sharing};
    ///
    /// let mount = Mount::cache("/var/cache/apt").id("apt").sharing(Sharing::Locked).owner(0, 0).mode(0o755);
    /// assert!(matches!(mount, Mount::Cache { ref id, sharing: Sharing::Locked, .. } if id == "apt"));
    /// ```
    pub fn cache(target: impl Into<String>) -> Mount {
        let target = target.into();
        Mount::Cache { id: target.clone(), target, sharing: Sharing::Shared, owner: None, mode: None }
    }

    /// A tmpfs at `target`, of the kernel's default size until [`Mount::size`] says otherwise.
    ///
    /// ```
    /// use layerwright_dsl::Mount;
    ///
    /// assert_eq!(Mount::tmpfs("/tmp").size(1 << 20), Mount::Tmpfs { target: "/tmp".into(), size: Some(1 << 20) });
    /// ```
    pub fn tmpfs(target: impl Into<String>) -> Mount {
        Mount::Tmpfs { target: target.into(), size: None }
    }

    /// The secret `id` as a read-only file at `target` (0400, root, until [`Mount::mode`] and
    /// [`Mount::owner`] say otherwise).
    ///
    /// ```
    /// use layerwright_dsl::Mount;
    ///
    /// let mount = Mount::secret("/run/secrets/token", "token");
    /// assert_eq!(mount.target(), "/run/secrets/token");
    /// ```
    pub fn secret(target: impl Into<String>, id: impl Into<String>) -> Mount {
        Mount::Secret { target: target.into(), id: id.into(), owner: None, mode: None }
    }

    /// `source` of `image`'s final filesystem, read-only at `target`.
    pub fn bind(image: &Image, source: impl Into<String>, target: impl Into<String>) -> Mount {
        Mount::Bind {
            source: MountSource::Image(image.clone()),
            path: source.into(),
            target: target.into(),
            writable: false,
        }
    }

    /// `source` of the build context `context`, read-only at `target`.
    pub fn context(context: &Context, source: impl Into<String>, target: impl Into<String>) -> Mount {
        Mount::Bind {
            source: MountSource::Context(context.clone()),
            path: source.into(),
            target: target.into(),
            writable: false,
        }
    }

    /// The builder's default SSH agent at [`SSH_AGENT_TARGET`].
    pub fn ssh() -> Mount {
        Mount::Ssh { id: "default".to_owned(), target: SSH_AGENT_TARGET.to_owned() }
    }

    /// Where the mount is, as declared.
    pub fn target(&self) -> &str {
        match self {
            Mount::Cache { target, .. }
            | Mount::Tmpfs { target, .. }
            | Mount::Secret { target, .. }
            | Mount::Bind { target, .. }
            | Mount::Ssh { target, .. } => target,
        }
    }

    /// A cache mount's or an SSH agent's id (no effect on other kinds).
    pub fn id(mut self, new_id: impl Into<String>) -> Mount {
        if let Mount::Cache { id, .. } | Mount::Ssh { id, .. } = &mut self {
            *id = new_id.into();
        }
        self
    }

    /// A cache mount's sharing mode (no effect on other kinds).
    pub fn sharing(mut self, mode: Sharing) -> Mount {
        if let Mount::Cache { sharing, .. } = &mut self {
            *sharing = mode;
        }
        self
    }

    /// The owner of a cache directory or a secret file (no effect on other kinds).
    pub fn owner(mut self, uid: u32, gid: u32) -> Mount {
        if let Mount::Cache { owner, .. } | Mount::Secret { owner, .. } = &mut self {
            *owner = Some(Owner::new(uid, gid));
        }
        self
    }

    /// The permission bits of a cache directory or a secret file (no effect on other kinds).
    pub fn mode(mut self, bits: u32) -> Mount {
        if let Mount::Cache { mode, .. } | Mount::Secret { mode, .. } = &mut self {
            *mode = Some(bits);
        }
        self
    }

    /// A tmpfs's size limit in bytes (no effect on other kinds).
    pub fn size(mut self, bytes: u64) -> Mount {
        if let Mount::Tmpfs { size, .. } = &mut self {
            *size = Some(bytes);
        }
        self
    }

    /// A bind mount the command may write to; its writes are thrown away (no effect on other
    /// kinds).
    pub fn writable(mut self) -> Mount {
        if let Mount::Bind { writable, .. } = &mut self {
            *writable = true;
        }
        self
    }

    /// The target of [`Mount::ssh`] (no effect on other kinds).
    pub fn at(mut self, path: impl Into<String>) -> Mount {
        if let Mount::Ssh { target, .. } = &mut self {
            *target = path.into();
        }
        self
    }
}
