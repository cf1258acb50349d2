//! `cache prune` and `cache du` on real caches: each policy removes what it should (RUN
//! snapshots and logs with their records, least recently used first) and leaves a cache that
//! builds the same digests; `du` counts every byte of the directory; a builder with a policy
//! prunes after a build that leaves the cache over it; a build running beside a prune keeps
//! everything it uses, and a long-lived builder only what its live images use.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime};

use layerwright::cache::{DIRECTORIES, PrunePolicy, Store};
use layerwright::{Builder, BuilderOptions, Image};

/// An image of file steps only.
fn plain(tag: &str) -> Image {
    Image::scratch().write_file("/a", tag.as_bytes()).mkdir("/d").write_file("/d/b", format!("{tag}\n").as_bytes())
}

fn digest(cache: &Path, image: &Image) -> String {
    Builder::new(cache).unwrap().build(image).unwrap().manifest_digest()
}

fn cached(cache: &Path, image: &Image) -> bool {
    Builder::new(cache).unwrap().build(image).unwrap().steps().iter().all(|step| step.cached)
}

/// Sets the mtime of every entry below `path` that changed in the last minute to `seconds` ago
/// (what is older keeps its age).
fn age_recent(path: &Path, seconds: u64) {
    let now = SystemTime::now();
    let mut pending = vec![path.to_owned()];
    while let Some(path) = pending.pop() {
        let metadata = fs::symlink_metadata(&path).unwrap();
        if metadata.is_dir() {
            pending.extend(fs::read_dir(&path).unwrap().map(|entry| entry.unwrap().path()));
        }
        let recent = metadata.modified().unwrap() + Duration::from_secs(60) > now;
        if recent && (metadata.is_dir() || metadata.is_file()) {
            fs::File::open(&path).unwrap().set_modified(now - Duration::from_secs(seconds)).unwrap();
        }
    }
}

fn record_count(cache: &Path) -> u64 {
    Store::open(cache).unwrap().disk_usage().record_count
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir).map_or_else(|_| Vec::new(), |entries| entries.map(|entry| entry.unwrap().path()).collect())
}

/// The snapshots of layers (named by diff id) in the cache.
fn layer_snapshots(cache: &Path) -> usize {
    entries(&cache.join("snapshots")).iter().filter(|path| path.file_name().unwrap().len() >= 64).count()
}

#[test]
fn each_prune_policy_removes_the_least_recently_used_and_the_cache_still_builds_the_same_digests() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (old, new) = (crate::support::busybox_running("echo old > /made-by-run"), plain("new"));
    let expected_old = digest(&dir.path().join("reference"), &old);
    let expected_new = digest(&dir.path().join("reference"), &new);

    let fill = || {
        assert_eq!(digest(&cache, &old), expected_old);
        age_recent(&cache, 7_200);
        assert_eq!(digest(&cache, &new), expected_new);
        age_recent(&cache, 600);
    };
    fill();
    assert!(layer_snapshots(&cache) > 0 && !entries(&cache.join("logs")).is_empty());
    let records = record_count(&cache);

    // Unused for an hour: the old image's records, snapshots and logs go; the new one's stay.
    let store = Store::open(&cache).unwrap();
    let report =
        layerwright::cache::prune(&store, &PrunePolicy::new().keep_duration(Duration::from_secs(3_600))).unwrap();
    drop(store);
    assert_eq!(report.removed_records, records - 3, "the new image's three layer steps stay: {report:?}");
    assert_eq!(layer_snapshots(&cache), 0, "{report:?}");
    assert!(entries(&cache.join("logs")).is_empty(), "{report:?}");
    assert!(cached(&cache, &new));
    assert_eq!(digest(&cache, &old), expected_old);

    // At most half the cache: the least recently used (the old image) goes first.
    age_recent(&cache, 7_200);
    assert!(cached(&cache, &new));
    age_recent(&cache, 600);
    let store = Store::open(&cache).unwrap();
    let half = store.disk_usage().total() / 2;
    let report = layerwright::cache::prune(&store, &PrunePolicy::new().keep_bytes(half)).unwrap();
    assert!(report.remaining_bytes <= half, "{report:?}");
    assert_eq!(report.remaining_bytes, store.disk_usage().total(), "{report:?}");
    drop(store);
    assert!(cached(&cache, &new), "the most recently used image stays: {report:?}");
    assert_eq!(digest(&cache, &old), expected_old);

    // A disk with no room: everything that can go goes, unless the cache may keep some.
    age_recent(&cache, 7_200);
    let store = Store::open(&cache).unwrap();
    let total = store.disk_usage().total();
    let reserved = PrunePolicy::new().min_free_bytes(1 << 40).reserved_bytes(total);
    assert_eq!(store.prune_with_free(&reserved, DIRECTORIES, 0).unwrap().freed_bytes, 0);
    let report = store.prune_with_free(&PrunePolicy::new().min_free_bytes(1 << 40), DIRECTORIES, 0).unwrap();
    assert!(report.removed_records >= records, "{report:?}");
    assert_eq!(store.disk_usage().record_count, 0);
    assert_eq!(store.disk_usage().blob_count, 0);
    // What is left is the cache's skeleton: directories, locks, leases, the stat cache.
    let mut left = Vec::new();
    let mut pending = vec![cache.clone()];
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            pending.extend(entries(&path));
        } else {
            left.push(path.strip_prefix(&cache).unwrap().to_owned());
        }
    }
    for path in &left {
        let kept = ["lock", "gc.lock", "stat-cache", "remote-cache-writer"].contains(&path.to_str().unwrap())
            || path.starts_with("leases");
        assert!(kept, "{} survived a prune of everything: {left:?}", path.display());
    }
    drop(store);
    assert_eq!(digest(&cache, &old), expected_old);
    assert_eq!(digest(&cache, &new), expected_new);
    assert!(cached(&cache, &old) && cached(&cache, &new));
}

#[test]
fn du_counts_every_byte_under_the_cache_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    digest(&cache, &crate::support::busybox_running("echo du > /made-by-run"));
    digest(&cache, &plain("du"));
    let usage = Store::open(&cache).unwrap().disk_usage();
    // An independent walk: every inode once, directories included (`du -sb`).
    let mut seen = HashSet::new();
    let mut walked = 0;
    let mut pending = vec![cache.clone()];
    while let Some(path) = pending.pop() {
        let metadata = fs::symlink_metadata(&path).unwrap();
        if seen.insert((metadata.dev(), metadata.ino())) {
            walked += metadata.len();
        }
        if metadata.is_dir() {
            pending.extend(entries(&path));
        }
    }
    // The store opened for `du` holds a lease file while it lives; it is gone now.
    assert_eq!(usage.total(), walked + usage.parts["leases"] - fs::metadata(cache.join("leases")).unwrap().len());
    assert!(usage.parts["snapshots"] > 0 && usage.parts["logs"] > 0, "{usage:?}");
    let output = std::process::Command::new("du").arg("-sb").arg(&cache).output().unwrap();
    let du: u64 = String::from_utf8(output.stdout).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(du, walked);
}

#[test]
fn a_builder_prunes_after_a_build_that_leaves_the_cache_over_its_policy() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (old, new) = (crate::support::busybox_running("echo old > /made-by-run"), plain("new"));
    let expected_new = digest(&dir.path().join("reference"), &new);
    digest(&cache, &old);
    age_recent(&cache, 7_200);
    let records = record_count(&cache);

    let roomy =
        Builder::with_options(&cache, BuilderOptions::default().prune_policy(PrunePolicy::new().keep_bytes(1 << 40)))
            .unwrap();
    roomy.build(&plain("roomy")).unwrap();
    assert_eq!(roomy.last_prune(), None, "under the policy: no prune");
    drop(roomy);
    age_recent(&cache, 7_200);

    let builder =
        Builder::with_options(&cache, BuilderOptions::default().prune_policy(PrunePolicy::new().keep_bytes(1)))
            .unwrap();
    let built = builder.build(&new).unwrap();
    let report = builder.last_prune().expect("over the policy: pruned after the build");
    assert!(report.removed_records >= records, "{report:?}");
    assert_eq!(layer_snapshots(&cache), 0);
    // What the build used and made is kept: its image exports and builds again from the cache.
    built.write_oci_layout(dir.path().join("layout"), "new:1").unwrap();
    assert_eq!(built.manifest_digest(), expected_new);
    drop((built, builder));
    assert!(cached(&cache, &new));
}

#[test]
fn a_long_lived_builder_protects_only_what_its_live_images_use() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // Two rounds of a watch session: the first round's image has been delivered and dropped,
    // the second's is alive.
    let builder = Builder::new(&cache).unwrap();
    drop(builder.build(&plain("first")).unwrap());
    let second = builder.build(&plain("second")).unwrap();
    age_recent(&cache, 7_200);
    let report = layerwright::cache::prune(builder.store(), &PrunePolicy::new().keep_bytes(0)).unwrap();
    assert_eq!(report.removed_records, 3, "the first round's records, and no other: {report:?}");
    drop(second);
    assert!(cached(&cache, &plain("second")));
    assert!(!cached(&cache, &plain("first")));
}

#[test]
fn a_build_running_beside_a_prune_keeps_what_it_uses() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let base = crate::support::busybox_running("echo base > /made-by-run");
    let image = base.write_file("/tail", b"tail");
    let expected = digest(&dir.path().join("reference"), &image);
    let other = plain("other");
    digest(&cache, &base);
    digest(&cache, &other);
    age_recent(&cache, 7_200);

    // The build stops before its last step until the prune is done.
    let (reached, wait_for_prune) = (mpsc::channel::<()>(), mpsc::channel::<()>());
    let (reached_sender, go) = (Mutex::new(reached.0), Mutex::new(wait_for_prune.1));
    let options = BuilderOptions::default().before_execute(Arc::new(move |label: &str| {
        if label.contains("/tail") {
            reached_sender.lock().unwrap().send(()).unwrap();
            go.lock().unwrap().recv().unwrap();
        }
    }));
    let build = {
        let (cache, image) = (cache.clone(), image.clone());
        std::thread::spawn(move || {
            let built = Builder::with_options(&cache, options).unwrap().build(&image).unwrap();
            (built.manifest_digest(), built.steps().iter().filter(|step| step.cached).count())
        })
    };
    reached.1.recv().unwrap();
    let store = Store::open(&cache).unwrap();
    let report = layerwright::cache::prune(&store, &PrunePolicy::new().keep_bytes(0)).unwrap();
    wait_for_prune.0.send(()).unwrap();
    let (built, hits) = build.join().unwrap();
    assert_eq!(built, expected, "{report:?}");
    assert!(hits >= 4, "the base's steps were hits: {hits}");
    assert!(report.removed_records >= 3, "the other image went: {report:?}");
    assert!(layer_snapshots(&cache) > 0, "the RUN step's lower snapshots were in use: {report:?}");
    drop(store);
    assert!(cached(&cache, &image));
    assert!(!cached(&cache, &other));
}
