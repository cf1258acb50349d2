//! Rebuilding when what an image reads changes: the daily edit → run loop (`build-image
//! --watch`).
//!
//! One long-lived [`Builder`] keeps its salsa key database, stat cache and open store between
//! builds, so a rebuild after one file changed re-executes only the key queries of the steps
//! that read that file and the steps above them, and stats (not reads) the rest of the
//! context. The paths watched are the roots of the build contexts the images copy from and
//! the base archives they import (found by walking the graph); a burst of changes (an editor
//! saving, `git checkout`) is debounced into one rebuild. Each result goes to the caller, who
//! delivers it (writes outputs, loads or pushes) and says whether to go on.
//!
//! What it deliberately is not: a precise dependency tracker. Any change under a watched root
//! starts a rebuild, and the rebuild's keys decide what really changed (a change to an ignored
//! or unselected file is a no-op build that writes nothing). Changes below the builder's own
//! cache directory are ignored, so a cache inside a context cannot make the loop spin.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use layerwright_dsl::{Image, Step};
use notify::{RecursiveMode, Watcher};
use thiserror::Error;

use crate::build::{BuildError, Builder, BuiltImage};

/// How a watch loop behaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WatchOptions {
    /// How long the watched paths must stay quiet after a change before the rebuild starts.
    pub debounce: Duration,
    /// How often the stop flag is looked at while nothing changes.
    pub poll: Duration,
}

impl Default for WatchOptions {
    fn default() -> WatchOptions {
        WatchOptions { debounce: Duration::from_millis(150), poll: Duration::from_millis(200) }
    }
}

impl WatchOptions {
    /// These options with another debounce: how long the paths must stay quiet after a change.
    pub fn debounce(mut self, debounce: Duration) -> WatchOptions {
        self.debounce = debounce;
        self
    }
}

/// One build of a watch loop, as it is handed to the caller.
#[derive(Debug)]
#[non_exhaustive]
pub struct WatchedBuild {
    /// The built images, in the order they were given, or why the build failed (the loop goes
    /// on: the next change may fix it).
    pub result: Result<Vec<BuiltImage>, BuildError>,
    /// The paths whose change started this build (empty for the first build).
    pub changed: Vec<PathBuf>,
    /// How long the build took.
    pub duration: Duration,
}

/// Why a watch loop could not start or went on no longer.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The operating system refused to watch a path (inotify limits, a missing directory).
    #[error("cannot watch {path}: {source}")]
    Watch {
        /// The path.
        path: PathBuf,
        /// What the watcher said.
        source: notify::Error,
    },
    /// The watcher stopped delivering events.
    #[error("the file watcher stopped: {0}")]
    Stopped(String),
}

/// The paths `images` read from the host: the roots of their build contexts and their base
/// archives, each once, sorted, made absolute (so that the events about them are too).
pub fn watched_paths(images: &[&Image]) -> Vec<PathBuf> {
    let mut paths = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut pending: Vec<Image> = images.iter().map(|image| (*image).clone()).collect();
    while let Some(image) = pending.pop() {
        if !seen.insert(image.node_id()) {
            continue;
        }
        match image.step() {
            Step::Copy(copy) => {
                let root = copy.context.root();
                paths.insert(std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned()));
            }
            Step::FromArchive { path } => {
                paths.insert(std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()));
            }
            _ => {}
        }
        pending.extend(image.inputs());
    }
    paths.into_iter().collect()
}

/// Builds `images` with `builder`, hands the result to `deliver`, then rebuilds and delivers
/// again whenever a path they read changes, until `deliver` breaks or `stop` is set (a Ctrl-C
/// handler sets it). A failed build is delivered like a good one, and the loop goes on.
pub fn watch(
    builder: &Builder,
    images: &[&Image],
    options: &WatchOptions,
    stop: &AtomicBool,
    mut deliver: impl FnMut(WatchedBuild) -> ControlFlow<()>,
) -> Result<(), WatchError> {
    let (sender, receiver) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // The receiver is gone only when the loop has ended.
        let _ = sender.send(event);
    })
    .map_err(|source| WatchError::Watch { path: PathBuf::new(), source })?;
    for path in watched_paths(images) {
        let mode = if path.is_dir() { RecursiveMode::Recursive } else { RecursiveMode::NonRecursive };
        watcher.watch(&path, mode).map_err(|source| WatchError::Watch { path: path.clone(), source })?;
    }
    let cache_dir = std::fs::canonicalize(builder.cache_dir()).unwrap_or_else(|_| builder.cache_dir().to_owned());

    let mut changed = Vec::new();
    loop {
        let started = Instant::now();
        let result = builder.build_all(images);
        let build = WatchedBuild { result, changed: std::mem::take(&mut changed), duration: started.elapsed() };
        if deliver(build).is_break() {
            return Ok(());
        }
        // Wait for a change that matters, then for the burst it starts to end.
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            match receiver.recv_timeout(options.poll) {
                Ok(event) => changed.extend(relevant_paths(event, &cache_dir)),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(WatchError::Stopped("its channel closed".into()));
                }
            }
            if !changed.is_empty() {
                break;
            }
        }
        while let Ok(event) = receiver.recv_timeout(options.debounce) {
            changed.extend(relevant_paths(event, &cache_dir));
        }
        changed.sort();
        changed.dedup();
    }
}

/// The paths an event names outside the cache directory (events about the cache's own files,
/// and access-only events, start no rebuild).
fn relevant_paths(event: notify::Result<notify::Event>, cache_dir: &Path) -> Vec<PathBuf> {
    let Ok(event) = event else { return Vec::new() };
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return Vec::new();
    }
    event.paths.into_iter().filter(|path| !path.starts_with(cache_dir)).collect()
}

#[cfg(test)]
mod tests {
    use layerwright_dsl::Context;

    use super::*;

    #[test]
    fn the_watched_paths_are_the_contexts_and_archives_an_image_graph_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (app, assets) = (dir.path().join("app"), dir.path().join("assets"));
        std::fs::create_dir_all(&app).unwrap();
        std::fs::create_dir_all(&assets).unwrap();
        let base = Image::from_archive(dir.path().join("base.tar"));
        let stage = Image::scratch().copy(&Context::dir(&assets).unwrap(), ".", "/assets");
        let image = base.copy(&Context::dir(&app).unwrap(), ".", "/app").copy_from(&stage, "/assets", "/srv").copy(
            &Context::dir(&app).unwrap(),
            "x",
            "/x",
        );
        let expected = vec![
            std::fs::canonicalize(&app).unwrap(),
            std::fs::canonicalize(&assets).unwrap(),
            dir.path().join("base.tar"),
        ];
        let mut found = watched_paths(&[&image]);
        found.sort();
        let mut expected_sorted = expected;
        expected_sorted.sort();
        assert_eq!(found, expected_sorted);
    }
}
