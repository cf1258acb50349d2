//! RUN mounts for real, on the busybox example base: cache mounts kept across builds and never
//! in a layer, `Locked` and `Private` sharing across concurrent builds, the empty mountpoint a
//! missing target leaves, tmpfs mounts, secrets (whose bytes are searched for in every file of
//! the cache and the outputs), and declarations refused before anything runs.
//!
//! They need root, or user namespaces for a rootless run; without either a test fails saying
//! so, unless `LAYERWRIGHT_SKIP_PRIVILEGED=1`.

use std::io::Read;
use std::path::PathBuf;

use layerwright::cache::{CacheMountOptions, CacheMountSharing};
use layerwright::{Builder, BuiltImage, Image, Mount, Run, Sharing};

use crate::support;

fn busybox() -> Image {
    layerwright_examples::busybox(&support::environment()).unwrap_or_else(|error| panic!("declaring busybox: {error}"))
}

/// The top layer's tar members: (path, content of a regular file).
fn top_layer(builder: &Builder, built: &BuiltImage) -> Vec<(String, String)> {
    let layer = built.layers().last().expect("the image has layers");
    let blob = builder.store().open_blob(&layer.digest).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    archive
        .entries()
        .unwrap()
        .map(|member| {
            let mut member = member.unwrap();
            let path = member.path().unwrap().to_string_lossy().into_owned();
            let mut content = String::new();
            let _ = member.read_to_string(&mut content);
            (path, content)
        })
        .collect()
}

fn paths(members: &[(String, String)]) -> Vec<&str> {
    members.iter().map(|(path, _)| path.as_str()).collect()
}

fn content<'a>(members: &'a [(String, String)], path: &str) -> &'a str {
    &members.iter().find(|(member, _)| member == path).unwrap_or_else(|| panic!("no {path} in {members:?}")).1
}

/// The host directories of cache mount `id` in `builder`'s cache.
fn cache_directories(builder: &Builder, id: &str) -> Vec<PathBuf> {
    builder.store().cache_mount_usage().into_iter().filter(|usage| usage.id == id).map(|usage| usage.path).collect()
}

#[test]
fn a_cache_mount_keeps_its_contents_across_builds_and_leaves_only_its_empty_mountpoint_in_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    // `/root` exists (0700); `/root/.cache/tool` does not.
    let step = |round: &str| {
        Run::shell("echo $ROUND >> /root/.cache/tool/seen && cat /root/.cache/tool/seen > /seen")
            .env("ROUND", round)
            .mount(Mount::cache("/root/.cache/tool").id("tool"))
    };
    let Some(first) = support::build_with_runs(&builder, &busybox().run(step("one"))) else { return };
    let members = top_layer(&builder, &first);
    assert_eq!(paths(&members), ["root/", "root/.cache/", "root/.cache/tool/", "seen"], "{members:?}");
    assert_eq!(content(&members, "seen"), "one\n");

    // Another declaration of the step (an unrelated variable changed): it runs again and finds
    // what the first run left.
    let Some(second) = support::build_with_runs(&builder, &busybox().run(step("two"))) else { return };
    let members = top_layer(&builder, &second);
    assert_eq!(paths(&members), ["root/", "root/.cache/", "root/.cache/tool/", "seen"], "{members:?}");
    assert_eq!(content(&members, "seen"), "one\ntwo\n");

    // `cache du` counts it; the directory holds what the steps wrote.
    let directories = cache_directories(&builder, "tool");
    assert_eq!(directories.len(), 1);
    assert_eq!(std::fs::read_to_string(directories[0].join("seen")).unwrap(), "one\ntwo\n");
    assert!(builder.store().disk_usage().parts.get("mounts").is_some_and(|bytes| *bytes > 0));
}

#[test]
fn a_tmpfs_mount_is_empty_sized_and_never_in_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let run = Run::shell(
        "echo scratch > /tmp/x && grep ' /tmp ' /proc/self/mounts | cut -d' ' -f3 > /fs && echo done > /out",
    )
    .mount(Mount::tmpfs("/tmp").size(1 << 20));
    let Some(built) = support::build_with_runs(&builder, &busybox().run(run)) else { return };
    let members = top_layer(&builder, &built);
    // `/tmp` exists in the image: the layer does not even hold its mountpoint.
    assert_eq!(paths(&members), ["fs", "out"], "{members:?}");
    assert_eq!(content(&members, "fs"), "tmpfs\n");
}

/// What [`concurrent_builds`] gives: the cache's directory (removed on drop), a builder on it,
/// and the top layer of each build.
type Concurrent = (tempfile::TempDir, Builder, Vec<Vec<(String, String)>>);

/// Two builds on one cache directory, each in its thread, of steps that differ only in `NAME`
/// and share cache mount `id` with `sharing`; the base is built first.
fn concurrent_builds(sharing: Sharing, id: &str, script: &str) -> Option<Concurrent> {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let base = busybox().run("true");
    let builder = Builder::new(&cache).unwrap();
    support::build_with_runs(&builder, &base)?;
    let threads: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let image =
                base.run(Run::shell(script).env("NAME", name).mount(Mount::cache("/shared").id(id).sharing(sharing)));
            let cache = cache.clone();
            std::thread::spawn(move || {
                let builder = Builder::new(&cache).unwrap();
                let built = builder.build(&image).unwrap_or_else(|error| panic!("build {name}: {error}"));
                top_layer(&builder, &built)
            })
        })
        .collect();
    let layers = threads.into_iter().map(|thread| thread.join().unwrap()).collect();
    Some((dir, builder, layers))
}

#[test]
fn a_locked_cache_mount_serialises_concurrent_builds() {
    let script = "echo begin-$NAME >> /shared/log; sleep 1; echo end-$NAME >> /shared/log; echo $NAME > /done";
    let Some((_dir, builder, _)) = concurrent_builds(Sharing::Locked, "locked", script) else { return };
    let directories = cache_directories(&builder, "locked");
    assert_eq!(directories.len(), 1);
    let log = std::fs::read_to_string(directories[0].join("log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines == ["begin-a", "end-a", "begin-b", "end-b"] || lines == ["begin-b", "end-b", "begin-a", "end-a"],
        "the steps interleaved: {lines:?}"
    );
}

#[test]
fn a_private_cache_mount_gives_each_concurrent_user_its_own_directory() {
    // Deterministic: the test holds the id's first directory while the build runs.
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let options = CacheMountOptions { mode: 0o755, owner: None };
    let held = builder.store().acquire_cache_mount("private", CacheMountSharing::Private, options).unwrap();
    std::fs::write(held.parent().join(held.name()).join("owner"), "the test\n").unwrap();
    let run = Run::shell("cat /p/owner > /seen 2>/dev/null || echo nothing > /seen; echo build > /p/owner")
        .mount(Mount::cache("/p").id("private").sharing(Sharing::Private));
    let Some(built) = support::build_with_runs(&builder, &busybox().run(run)) else { return };
    assert_eq!(content(&top_layer(&builder, &built), "seen"), "nothing\n");
    assert_eq!(std::fs::read_to_string(held.parent().join(held.name()).join("owner")).unwrap(), "the test\n");
    assert_eq!(cache_directories(&builder, "private").len(), 2);
    drop(held);

    // Two concurrent builds: each step sees only what it wrote itself.
    let script = "echo $NAME > /shared/owner; sleep 1; cat /shared/owner > /seen";
    let Some((_dir, builder, layers)) = concurrent_builds(Sharing::Private, "private", script) else { return };
    let seen: Vec<&str> = layers.iter().map(|members| content(members, "seen")).collect();
    assert_eq!(seen, ["a\n", "b\n"]);
    assert!(!cache_directories(&builder, "private").is_empty());
}

#[test]
fn mounts_declared_wrong_fail_the_build_naming_the_step_and_the_target_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let cases = [
        (Run::shell("touch /ran").mount(Mount::cache("relative")), "mount target \"relative\" is not an absolute path"),
        (Run::shell("touch /ran").mount(Mount::tmpfs("/")), "mount target \"/\" is the root"),
        (Run::shell("touch /ran").mount(Mount::cache("/a")).mount(Mount::tmpfs("/a")), "two mounts on \"/a\""),
    ];
    for (run, expected) in cases {
        let error = builder.build(&Image::scratch().run(run)).unwrap_err().to_string();
        assert!(error.contains("RUN touch /ran"), "{error}");
        assert!(error.contains(expected), "{error}");
    }
    // A target that is a file of the image is found when the step runs, before the command.
    let run = Run::shell("touch /ran").mount(Mount::cache("/etc/passwd/x"));
    let image = busybox().run(run);
    if let Err(error) = builder.build(&image) {
        let text = error.to_string();
        if !text.contains("sandbox") {
            assert!(text.contains("RUN touch /ran") && text.contains("/etc/passwd is a file in the image"), "{text}");
        }
    } else {
        panic!("a mount below a file built");
    }
}

/// Every file below `dir` (not following symlinks), with its bytes; gzip blobs also decompressed.
fn files_below(dir: &std::path::Path, found: &mut Vec<(PathBuf, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            files_below(&entry.path(), found);
        } else if kind.is_file() {
            let bytes = std::fs::read(entry.path()).unwrap_or_default();
            let mut decompressed = Vec::new();
            if flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut decompressed).is_ok() {
                found.push((entry.path(), decompressed));
            }
            found.push((entry.path(), bytes));
        }
    }
}

#[test]
fn a_secret_is_read_by_its_step_and_its_bytes_are_in_no_file_of_the_cache_no_layer_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    // Made at run time so that no source file of the test holds it either.
    let secret = format!("lw-secret-{}-{}", std::process::id(), dir.path().display().to_string().len() * 7919);
    std::fs::write(dir.path().join("token.txt"), &secret).unwrap();
    let run = || {
        Run::shell(
            "sha256sum /run/secrets/token | cut -c1-64 > /digest && ls -ln /run/secrets/token | cut -c1-10 > /mode \
             && grep ' /run/secrets/token ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1 > /options",
        )
        .mount(Mount::secret("/run/secrets/token", "token"))
    };

    // Without the secret: an error naming the step and the id, before anything runs.
    let unprovided = Builder::new(dir.path().join("other-cache")).unwrap();
    let error = unprovided.build(&busybox().run(run())).unwrap_err().to_string();
    assert!(error.contains("RUN sha256sum /run/secrets/token") && error.contains("secret \"token\""), "{error}");
    assert!(!dir.path().join("other-cache/logs").exists(), "nothing ran");

    let builder = Builder::new(dir.path().join("cache"))
        .unwrap()
        .secret("token", layerwright::SecretSource::File(dir.path().join("token.txt")));
    let Some(built) = support::build_with_runs(&builder, &busybox().run(run())) else { return };
    let members = top_layer(&builder, &built);
    // The file's mountpoint (and `/run/secrets`, if made for it) are not in the layer.
    assert_eq!(paths(&members), ["digest", "mode", "options"], "{members:?}");
    assert_eq!(format!("sha256:{}", content(&members, "digest").trim()), support::sha256(&secret));
    assert_eq!(content(&members, "mode"), "-r--------\n");
    assert_eq!(content(&members, "options"), "ro\n");

    built.write_oci_archive(dir.path().join("out.tar"), "secret:1").unwrap();
    built.write_oci_layout(dir.path().join("layout"), "secret:1").unwrap();
    let mut files = Vec::new();
    files_below(&dir.path().join("cache"), &mut files);
    files_below(&dir.path().join("layout"), &mut files);
    let archive = std::fs::read(dir.path().join("out.tar")).unwrap();
    files.push((dir.path().join("out.tar"), archive));
    assert!(files.len() > 10, "{} files searched", files.len());
    for (path, bytes) in &files {
        assert!(!bytes.windows(secret.len()).any(|window| window == secret.as_bytes()), "the secret is in {path:?}");
    }
}
