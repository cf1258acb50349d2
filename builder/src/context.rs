//! Build contexts: opened with cap-std, walked in sorted order, filtered by `.dockerignore`.
//!
//! A `copy` step selects a path of its context. [`select`] resolves that path inside the
//! context's capability (so `..`, absolute paths and symlinks leading out are refused by
//! construction, not by string checks alone), walks it in sorted order without following the
//! symlinks it finds below it (they are copied as symlinks, as Docker does), drops what the
//! context's `.dockerignore` excludes, and hashes every regular file with blake3 for the key.
//!
//! What it deliberately does not do: decide where files land in the image or with which owner.
//! That is the build step's job; this module reports what the context holds.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cap_std::fs::{Dir, Metadata, MetadataExt};
use layerwright_cache::{FileMaterial, FileStat, StatCache};
use layerwright_dsl::{Context, DockerIgnore, DockerIgnoreError, ImagePathError, normalize_context_path};
use rayon::prelude::*;
use thiserror::Error;

/// Why a build context could not be opened, or a path of it selected and walked.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ContextError {
    /// The context's directory does not exist or cannot be opened.
    #[error("cannot open build context {root}: {source}")]
    Open {
        /// The context's directory (canonical, once it could be resolved).
        root: PathBuf,
        /// The IO error from the operating system.
        source: io::Error,
    },
    /// The context has a `.dockerignore` that cannot be read.
    #[error("cannot read {root}/.dockerignore: {source}")]
    ReadDockerIgnore {
        /// The context's canonical directory.
        root: PathBuf,
        /// The IO error from the operating system.
        source: io::Error,
    },
    /// The context's `.dockerignore` holds a pattern that does not parse.
    #[error("{root}/{source}")]
    DockerIgnore {
        /// The context's canonical directory.
        root: PathBuf,
        /// The line and pattern that do not parse.
        source: DockerIgnoreError,
    },
    /// The path a `copy` step selects is not a valid context path (absolute, or climbing out
    /// with `..`).
    #[error("context path {path:?}: {source}")]
    Path {
        /// The path as the step gives it.
        path: String,
        /// What is wrong with it.
        source: ImagePathError,
    },
    /// The selected path does not exist in the context, or its `.dockerignore` excludes it.
    #[error("{path:?} is not in the build context {root} (or is excluded by its .dockerignore)")]
    Missing {
        /// The context's canonical directory.
        root: PathBuf,
        /// The path relative to the context's root.
        path: String,
    },
    /// The selected path is a symlink that resolves into a loop.
    #[error("{path:?} in the build context {root} is a symlink loop")]
    SymlinkLoop {
        /// The context's canonical directory.
        root: PathBuf,
        /// The path relative to the context's root.
        path: String,
    },
    /// The selected path is a symlink whose target lies outside the context (absolute, or
    /// climbing above its root).
    #[error("{path:?} in the build context {root} is a symlink that leads outside the context: {source}")]
    Escapes {
        /// The context's canonical directory.
        root: PathBuf,
        /// The path relative to the context's root.
        path: String,
        /// The error of resolving it inside the context's capability.
        source: io::Error,
    },
    /// Reading a file, directory or symlink of the context failed.
    #[error("cannot read {path:?} in the build context {root}: {source}")]
    Read {
        /// The context's canonical directory.
        root: PathBuf,
        /// The path relative to the context's root.
        path: String,
        /// The IO error from the operating system.
        source: io::Error,
    },
    /// A name in the context (a file's, or a symlink's target) is not valid UTF-8.
    #[error("{path:?} in the build context {root} has a name that is not valid UTF-8")]
    NotUtf8 {
        /// The context's canonical directory.
        root: PathBuf,
        /// The path relative to the context's root, decoded lossily for display.
        path: String,
    },
    /// A path of the selection is a socket, device node or named pipe, which a `copy` step
    /// cannot take from a context.
    #[error("{path:?} in the build context {root} is a socket or device, which a layer cannot hold")]
    UnsupportedType {
        /// The context's canonical directory.
        root: PathBuf,
        /// The path relative to the context's root.
        path: String,
    },
}

/// An opened context: the directory capability and its `.dockerignore`.
#[derive(Debug, Clone)]
pub struct OpenedContext {
    root: PathBuf,
    dir: Arc<Dir>,
    ignore: Arc<DockerIgnore>,
}

/// Opens `context`'s directory as a capability and parses its `.dockerignore`, if it has one.
pub fn open_context(context: &Context) -> Result<OpenedContext, ContextError> {
    // The canonical path names the context in the stat cache and the key database, so the same
    // directory reached by two spellings is one context.
    let root = std::fs::canonicalize(context.root())
        .map_err(|source| ContextError::Open { root: context.root().to_owned(), source })?;
    let dir = Dir::open_ambient_dir(&root, cap_std::ambient_authority())
        .map_err(|source| ContextError::Open { root: root.clone(), source })?;
    let ignore = match dir.read_to_string(".dockerignore") {
        Ok(text) => {
            DockerIgnore::parse(&text).map_err(|source| ContextError::DockerIgnore { root: root.clone(), source })?
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => DockerIgnore::empty(),
        Err(source) => return Err(ContextError::ReadDockerIgnore { root, source }),
    };
    Ok(OpenedContext { root, dir: Arc::new(dir), ignore: Arc::new(ignore) })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextKind {
    Directory,
    File {
        size: u64,
        blake3: [u8; 32],
    },
    Symlink {
        target: String,
    },
    /// A hard link to an earlier file of the same selection (`relative` path).
    HardLink {
        target: String,
    },
}

/// One path of a selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextFile {
    /// Path relative to the selected source (empty for the source itself).
    pub relative: String,
    pub kind: ContextKind,
    /// Permission bits, setuid/setgid/sticky included.
    pub mode: u32,
}

/// What a `copy` step selected: a directory (its contents) or a single file.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The canonical root of the context it was selected from.
    pub root: PathBuf,
    /// The handle [`Selection::open_path`]s are relative to.
    pub dir: Arc<Dir>,
    pub source_is_directory: bool,
    /// The selected path, relative to the context's root (normalised).
    pub source: String,
    /// Sorted by `relative`, component-wise; the source itself first.
    pub files: Vec<ContextFile>,
}

/// The stat cache as a walk sees it: read-only lookups, and the digests it had to compute, to be
/// recorded afterwards. Several walks can then share one cache from different threads.
pub struct StatLookup<'a> {
    cache: &'a StatCache,
    /// The digests computed because the cache had no entry for the file or its stat changed:
    /// the file's path, its stat, and the blake3 of its content.
    pub computed: Vec<(PathBuf, FileStat, [u8; 32])>,
}

impl<'a> StatLookup<'a> {
    /// A lookup in `cache` that has computed nothing yet.
    pub fn new(cache: &'a StatCache) -> StatLookup<'a> {
        StatLookup { cache, computed: Vec::new() }
    }

    /// Records what the walk computed into `cache`.
    pub fn record_into(computed: Vec<(PathBuf, FileStat, [u8; 32])>, cache: &mut StatCache) {
        for (path, stat, blake3) in computed {
            cache.record(path, stat, blake3);
        }
    }
}

/// Resolves `source` inside the context and walks it. File digests come from the stat cache
/// when a file's stat is unchanged, and are computed (and collected in `stat_cache.computed`)
/// otherwise.
pub fn select(
    context: &OpenedContext,
    source: &str,
    stat_cache: &mut StatLookup<'_>,
) -> Result<Selection, ContextError> {
    let source = normalize_context_path(source)
        .map_err(|error| ContextError::Path { path: source.to_owned(), source: error })?;
    if !source.is_empty() && context.ignore.is_excluded(&source) {
        return Err(ContextError::Missing { root: context.root.clone(), path: source });
    }
    let metadata = resolve_metadata(context, &source)?;
    let walker = Walker { context, cache: stat_cache.cache };
    let mut walked = Walked::default();
    let dir = if metadata.is_dir() {
        let dir = if source.is_empty() {
            Arc::clone(&context.dir)
        } else {
            let opened = context.dir.open_dir(&source).map_err(|error| walker.read_error(&source, error))?;
            Arc::new(opened)
        };
        walked.files.push(ContextFile {
            relative: String::new(),
            kind: ContextKind::Directory,
            mode: metadata.mode() & 0o7777,
        });
        walked.append(walker.walk_directory(&dir, &source)?);
        dir
    } else {
        let absolute = context.root.join(&source);
        let names = Names { name: &source, context_path: &source, absolute: &absolute };
        let (kind, link) = walker.classify(&context.dir, names, &mut walked.computed, &metadata)?;
        walked.push_file(ContextFile { relative: String::new(), kind, mode: metadata.mode() & 0o7777 }, link);
        Arc::clone(&context.dir)
    };
    stat_cache.computed.extend(walked.computed);
    // Hard links, in walk order: the first path of an inode carries the content, the others
    // link to it (the parallel walk only noted who shares an inode).
    let mut files = walked.files;
    let mut first_paths: HashMap<(u64, u64), usize> = HashMap::new();
    for (position, identity) in walked.links {
        match first_paths.get(&identity) {
            Some(&first) => files[position].kind = ContextKind::HardLink { target: files[first].relative.clone() },
            None => {
                first_paths.insert(identity, position);
            }
        }
    }
    Ok(Selection { root: context.root.clone(), dir, source_is_directory: metadata.is_dir(), source, files })
}

impl Selection {
    /// Where `file`'s content opens, relative to [`Selection::dir`]: its relative path below a
    /// selected directory (which `dir` is), or the selected file's path from the context's root.
    pub fn open_path<'a>(&'a self, file: &'a ContextFile) -> &'a str {
        if self.source_is_directory { &file.relative } else { &self.source }
    }
}

/// The metadata of the selected source, following a symlink only inside the context.
fn resolve_metadata(context: &OpenedContext, source: &str) -> Result<Metadata, ContextError> {
    if source.is_empty() {
        return context.dir.dir_metadata().map_err(|error| ContextError::Read {
            root: context.root.clone(),
            path: ".".into(),
            source: error,
        });
    }
    let link_metadata = context.dir.symlink_metadata(source).map_err(|error| match error.kind() {
        io::ErrorKind::NotFound => ContextError::Missing { root: context.root.clone(), path: source.to_owned() },
        _ => ContextError::Read { root: context.root.clone(), path: source.to_owned(), source: error },
    })?;
    if !link_metadata.file_type().is_symlink() {
        return Ok(link_metadata);
    }
    // cap-std resolves the link inside the context and fails if it leads out (absolute target,
    // or enough `..` to climb above the root).
    context.dir.metadata(source).map_err(|error| match error.kind() {
        io::ErrorKind::NotFound => ContextError::Missing { root: context.root.clone(), path: source.to_owned() },
        _ if error.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            ContextError::SymlinkLoop { root: context.root.clone(), path: source.to_owned() }
        }
        _ => ContextError::Escapes { root: context.root.clone(), path: source.to_owned(), source: error },
    })
}

struct Walker<'a> {
    context: &'a OpenedContext,
    cache: &'a StatCache,
}

/// What a walk of one directory found, in walk order.
#[derive(Default)]
struct Walked {
    files: Vec<ContextFile>,
    /// Files with several links: their position in `files` and their (device, inode).
    links: Vec<(usize, (u64, u64))>,
    /// Digests computed (not found in the stat cache), to be recorded.
    computed: Vec<(PathBuf, FileStat, [u8; 32])>,
}

impl Walked {
    fn push_file(&mut self, file: ContextFile, link: Option<(u64, u64)>) {
        if let Some(identity) = link {
            self.links.push((self.files.len(), identity));
        }
        self.files.push(file);
    }

    fn append(&mut self, later: Walked) {
        let offset = self.files.len();
        self.files.extend(later.files);
        self.links.extend(later.links.into_iter().map(|(position, identity)| (position + offset, identity)));
        self.computed.extend(later.computed);
    }
}

/// The names of one path met in a walk: in its directory, in the context, and on the host
/// (the stat cache's key).
#[derive(Clone, Copy)]
struct Names<'a> {
    name: &'a str,
    context_path: &'a str,
    absolute: &'a Path,
}

/// A subdirectory met in a walk.
struct Subdirectory {
    context_path: String,
    relative: String,
    excluded: bool,
    mode: u32,
}

/// What one name of a directory turned out to be, in sorted order.
enum Child {
    File(ContextFile, Option<(u64, u64)>),
    /// A subdirectory and the position of its own listing.
    Directory(Subdirectory, usize),
}

/// The children of one directory, and the digests computed while classifying them.
#[derive(Default)]
struct Listing {
    children: Vec<Child>,
    computed: Vec<(PathBuf, FileStat, [u8; 32])>,
}

impl Walker<'_> {
    fn read_error(&self, path: &str, source: io::Error) -> ContextError {
        ContextError::Read { root: self.context.root.clone(), path: path.to_owned(), source }
    }

    /// Walks `dir` (the directory at context path `context_path`, the selection's root) and
    /// everything below it, in sorted order. Breadth first: the directories of one depth are
    /// listed in parallel (a walk is mostly `stat` calls, which wait on the kernel), each opened
    /// by its path below `dir` when its turn comes (no descriptor is held per pending
    /// directory), and the listings are put together in order afterwards. Neither step
    /// recurses, so a tree of any depth is fine on any stack.
    fn walk_directory(&self, dir: &Dir, context_path: &str) -> Result<Walked, ContextError> {
        let mut listings: Vec<Listing> = Vec::new();
        // Directories to list: (position of their listing, context path, selection path).
        let mut level: Vec<(usize, String, String)> = vec![(0, context_path.to_owned(), String::new())];
        listings.push(Listing::default());
        while !level.is_empty() {
            let list = |(_, context_path, relative): &(usize, String, String)| {
                if relative.is_empty() {
                    return self.list_directory(dir, context_path, relative);
                }
                let opened = dir.open_dir(relative).map_err(|error| self.read_error(context_path, error))?;
                self.list_directory(&opened, context_path, relative)
            };
            let listed: Vec<Listing> = if level.len() > 1 {
                level.par_iter().map(list).collect::<Result<_, _>>()?
            } else {
                level.iter().map(list).collect::<Result<_, _>>()?
            };
            let mut next = Vec::new();
            for ((position, _, _), mut listing) in level.iter().zip(listed) {
                for child in &mut listing.children {
                    if let Child::Directory(subdirectory, child_position) = child {
                        *child_position = listings.len();
                        next.push((listings.len(), subdirectory.context_path.clone(), subdirectory.relative.clone()));
                        listings.push(Listing::default());
                    }
                }
                listings[*position] = listing;
            }
            level = next;
        }
        Ok(assemble(listings))
    }

    /// The children of one directory, sorted by name (subdirectories not yet walked).
    fn list_directory(&self, dir: &Dir, context_path: &str, relative: &str) -> Result<Listing, ContextError> {
        let mut names = Vec::new();
        let entries = dir.entries().map_err(|error| self.read_error(context_path, error))?;
        for entry in entries {
            let entry = entry.map_err(|error| self.read_error(context_path, error))?;
            let name = entry.file_name().into_string().map_err(|name| ContextError::NotUtf8 {
                root: self.context.root.clone(),
                path: join(context_path, &name.to_string_lossy()),
            })?;
            names.push(name);
        }
        names.sort_unstable();
        // The children's context paths and absolute paths (the stat cache's keys) are built in
        // one buffer each: a directory of a large context has thousands of files.
        let mut child_context_path = String::from(context_path);
        if !context_path.is_empty() {
            child_context_path.push('/');
        }
        let context_prefix = child_context_path.len();
        let mut absolute = self.context.root.join(context_path).into_os_string().into_vec();
        absolute.push(b'/');
        let absolute_prefix = absolute.len();
        let mut listing = Listing::default();
        for name in names {
            child_context_path.truncate(context_prefix);
            child_context_path.push_str(&name);
            let excluded = self.context.ignore.is_excluded(&child_context_path);
            let metadata = dir.symlink_metadata(&name).map_err(|error| self.read_error(&child_context_path, error))?;
            let mode = metadata.mode() & 0o7777;
            if metadata.is_dir() {
                if excluded && !self.context.ignore.has_exceptions() {
                    continue;
                }
                let subdirectory = Subdirectory {
                    context_path: child_context_path.clone(),
                    relative: join(relative, &name),
                    excluded,
                    mode,
                };
                // Its listing's position is set when it is scheduled.
                listing.children.push(Child::Directory(subdirectory, 0));
                continue;
            }
            if excluded {
                continue;
            }
            absolute.truncate(absolute_prefix);
            absolute.extend_from_slice(name.as_bytes());
            let names = Names {
                name: &name,
                context_path: &child_context_path,
                absolute: Path::new(OsStr::from_bytes(&absolute)),
            };
            let (kind, link) = self.classify(dir, names, &mut listing.computed, &metadata)?;
            listing.children.push(Child::File(ContextFile { relative: join(relative, &name), kind, mode }, link));
        }
        Ok(listing)
    }

    /// The kind of a non-directory at `names.name` in `dir`, and its (device, inode) when it
    /// has several links. A digest it had to compute is added to `computed`.
    fn classify(
        &self,
        dir: &Dir,
        names: Names<'_>,
        computed: &mut Vec<(PathBuf, FileStat, [u8; 32])>,
        metadata: &Metadata,
    ) -> Result<(ContextKind, Option<(u64, u64)>), ContextError> {
        let Names { name, context_path, absolute } = names;
        let file_type = metadata.file_type();
        if file_type.is_symlink() {
            let target = dir.read_link_contents(name).map_err(|error| self.read_error(context_path, error))?;
            let Some(target) = target.to_str() else {
                return Err(ContextError::NotUtf8 { root: self.context.root.clone(), path: context_path.to_owned() });
            };
            return Ok((ContextKind::Symlink { target: target.to_owned() }, None));
        }
        if !file_type.is_file() {
            return Err(ContextError::UnsupportedType {
                root: self.context.root.clone(),
                path: context_path.to_owned(),
            });
        }
        let link = (metadata.nlink() > 1).then(|| (metadata.dev(), metadata.ino()));
        let stat = FileStat::from_unix(
            metadata.len(),
            (metadata.mtime(), metadata.mtime_nsec()),
            (metadata.ctime(), metadata.ctime_nsec()),
            metadata.ino(),
            metadata.dev(),
        );
        if let Some(blake3) = self.cache.lookup(absolute, &stat) {
            return Ok((ContextKind::File { size: stat.size, blake3 }, link));
        }
        let mut file = dir.open(name).map_err(|error| self.read_error(context_path, error))?;
        let mut hasher = blake3::Hasher::new();
        let mut buffer = vec![0u8; 64 * 1024];
        let mut size = 0u64;
        loop {
            let read = file.read(&mut buffer).map_err(|error| self.read_error(context_path, error))?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            size += read as u64;
        }
        let blake3 = *hasher.finalize().as_bytes();
        // Record only what was read in one piece (a file that changed size while being read is
        // hashed again next time), and only files whose last change is safely in the past: a
        // file rewritten within the filesystem's timestamp granularity keeps its mtime, ctime
        // and size, and would be served its old digest ("racily clean", as git calls it).
        if size == stat.size && changed_long_enough_ago(&stat) {
            computed.push((absolute.to_owned(), stat, blake3));
        }
        Ok((ContextKind::File { size, blake3 }, link))
    }
}

/// Puts the listings of a walk (the root's first, every directory's after its parent's)
/// together in walk order: a directory, then what is below it. An excluded directory walked
/// only for exceptions gets an entry when something below it was re-included, so that its
/// contents have a parent, and none otherwise.
fn assemble(mut listings: Vec<Listing>) -> Walked {
    // Whether a directory's entry is written: children come after their parents, so walking
    // backwards settles every child before its parent.
    let mut keeps_something = vec![false; listings.len()];
    for position in (0..listings.len()).rev() {
        keeps_something[position] = listings[position].children.iter().any(|child| match child {
            Child::File(..) => true,
            Child::Directory(subdirectory, below) => !subdirectory.excluded || keeps_something[*below],
        });
    }
    let mut walked = Walked::default();
    for listing in &mut listings {
        walked.computed.append(&mut listing.computed);
    }
    let mut children: Vec<std::vec::IntoIter<Child>> =
        listings.into_iter().map(|listing| listing.children.into_iter()).collect();
    // Depth first with an explicit stack of listings being emitted.
    let mut stack = vec![0usize];
    while let Some(&current) = stack.last() {
        let Some(child) = children[current].next() else {
            stack.pop();
            continue;
        };
        match child {
            Child::File(file, link) => walked.push_file(file, link),
            Child::Directory(subdirectory, below) => {
                if !subdirectory.excluded || keeps_something[below] {
                    walked.files.push(ContextFile {
                        relative: subdirectory.relative,
                        kind: ContextKind::Directory,
                        mode: subdirectory.mode,
                    });
                }
                stack.push(below);
            }
        }
    }
    walked
}

impl ContextFile {
    /// What this file contributes to a step key; `mode` is left out when the step overrides it.
    pub fn material(&self, keep_mode: bool) -> FileMaterial {
        let mode = if keep_mode { self.mode } else { 0 };
        match &self.kind {
            ContextKind::Directory => FileMaterial::Directory { mode },
            ContextKind::File { size, blake3 } => FileMaterial::File { mode, size: *size, blake3: *blake3 },
            ContextKind::Symlink { target } => FileMaterial::Symlink { target: target.clone() },
            ContextKind::HardLink { target } => FileMaterial::HardLink { target: target.clone() },
        }
    }
}

/// How long after its last change a file's stat is trusted to identify its content. Kernel
/// timestamps advance in clock ticks (milliseconds), so two writes in one tick look the same.
const RACY_WINDOW_NANOSECONDS: i128 = 2_000_000_000;

fn changed_long_enough_ago(stat: &FileStat) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since_epoch| since_epoch.as_nanos() as i128);
    now - stat.mtime_ns.max(stat.ctime_ns) > RACY_WINDOW_NANOSECONDS
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() { name.to_owned() } else { format!("{parent}/{name}") }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn context_with(files: &[(&str, &str)], dockerignore: Option<&str>) -> (tempfile::TempDir, OpenedContext) {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let full = dir.path().join(path);
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            fs::write(full, content).unwrap();
        }
        if let Some(text) = dockerignore {
            fs::write(dir.path().join(".dockerignore"), text).unwrap();
        }
        let opened = open_context(&Context::dir(dir.path()).unwrap()).unwrap();
        (dir, opened)
    }

    fn select_fresh(context: &OpenedContext, source: &str) -> Result<Selection, ContextError> {
        select(context, source, &mut StatLookup::new(&StatCache::default()))
    }

    #[test]
    fn the_stat_cache_spares_rereading_unchanged_files() {
        let (dir, context) = context_with(&[("a", "one")], None);
        let mut stat_cache = StatCache::default();
        // A file changed a moment ago is not trusted by its stat: it could change again within
        // the same timestamp tick.
        let mut lookup = StatLookup::new(&stat_cache);
        select(&context, "a", &mut lookup).unwrap();
        assert!(lookup.computed.is_empty(), "a racily clean file is not recorded");
        std::thread::sleep(std::time::Duration::from_nanos(RACY_WINDOW_NANOSECONDS as u64 + 100_000_000));
        let mut lookup = StatLookup::new(&stat_cache);
        let first = select(&context, "a", &mut lookup).unwrap();
        let computed = lookup.computed;
        StatLookup::record_into(computed, &mut stat_cache);
        assert_eq!(stat_cache.len(), 1);
        // Same stat, so the recorded digest is used: prove it by recording a different one.
        let absolute = context.root.join("a");
        let metadata = std::fs::metadata(&absolute).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        let stat = FileStat::from_unix(
            metadata.len(),
            (metadata.mtime(), metadata.mtime_nsec()),
            (metadata.ctime(), metadata.ctime_nsec()),
            metadata.ino(),
            metadata.dev(),
        );
        stat_cache.record(absolute, stat, [9; 32]);
        let cached = select(&context, "a", &mut StatLookup::new(&stat_cache)).unwrap();
        assert_eq!(cached.files[0].kind, ContextKind::File { size: 3, blake3: [9; 32] });
        // A write changes the stat: the file is hashed again.
        fs::write(dir.path().join("a"), "two").unwrap();
        let changed = select(&context, "a", &mut StatLookup::new(&stat_cache)).unwrap();
        assert_ne!(changed.files[0].kind, cached.files[0].kind);
        assert_ne!(changed.files[0].kind, first.files[0].kind);
    }

    fn relatives(selection: &Selection) -> Vec<&str> {
        selection.files.iter().map(|file| file.relative.as_str()).collect()
    }

    #[test]
    fn walks_sorted_and_honours_dockerignore() {
        let (_dir, context) = context_with(
            &[
                ("src/b.rs", "b"),
                ("src/a.rs", "a"),
                ("src/a-b/x", "x"),
                ("src/target/out", "o"),
                ("src/keep.log", "k"),
                ("src/x.log", "l"),
            ],
            Some("src/target\nsrc/*.log\n!src/keep.log\n"),
        );
        let selection = select_fresh(&context, "src").unwrap();
        assert!(selection.source_is_directory);
        assert_eq!(relatives(&selection), ["", "a-b", "a-b/x", "a.rs", "b.rs", "keep.log"]);
        let whole = select_fresh(&context, ".").unwrap();
        assert!(relatives(&whole).contains(&".dockerignore"));
    }

    #[test]
    fn refuses_paths_and_symlinks_leading_out() {
        let (dir, context) = context_with(&[("a", "a")], None);
        symlink("/etc/passwd", dir.path().join("absolute")).unwrap();
        symlink("../../../../etc", dir.path().join("relative")).unwrap();
        symlink("a", dir.path().join("inside")).unwrap();
        assert!(matches!(select_fresh(&context, "../a"), Err(ContextError::Path { .. })));
        assert!(matches!(select_fresh(&context, "/etc/passwd"), Err(ContextError::Path { .. })));
        assert!(
            matches!(select_fresh(&context, "absolute"), Err(ContextError::Escapes { .. })),
            "{:?}",
            select_fresh(&context, "absolute")
        );
        assert!(matches!(select_fresh(&context, "relative"), Err(ContextError::Escapes { .. })));
        assert!(matches!(select_fresh(&context, "missing"), Err(ContextError::Missing { .. })));
        let inside = select_fresh(&context, "inside").unwrap();
        assert!(matches!(inside.files[0].kind, ContextKind::File { size: 1, .. }));
    }

    #[test]
    fn symlinks_below_the_source_are_kept_and_hard_links_found() {
        let (dir, context) = context_with(&[("d/file", "content")], None);
        symlink("/etc/passwd", dir.path().join("d/link")).unwrap();
        fs::hard_link(dir.path().join("d/file"), dir.path().join("d/zhard")).unwrap();
        fs::set_permissions(dir.path().join("d/file"), fs::Permissions::from_mode(0o4755)).unwrap();
        let selection = select_fresh(&context, "d").unwrap();
        let kinds: Vec<_> =
            selection.files.iter().map(|file| (file.relative.as_str(), file.kind.clone(), file.mode)).collect();
        assert_eq!(kinds[2], ("link", ContextKind::Symlink { target: "/etc/passwd".into() }, 0o777));
        assert_eq!(kinds[3], ("zhard", ContextKind::HardLink { target: "file".into() }, 0o4755));
        assert_eq!(kinds[1].2, 0o4755);
    }
}
