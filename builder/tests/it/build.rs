//! End-to-end builds through the public API: reproducibility, caching, and bad input.
//!
//! These need no root and no external tools; the checks with real clients (`docker`, `skopeo`,
//! `umoci`) live in `examples/tests/it/real_clients.rs`.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use layerwright::{Builder, BuilderOptions, Context, CopyOptions, FileOptions, Image};

use crate::support::archive::{ArchiveOptions, Raw, crafted_archive_with};
use crate::support::subprocess::{self, entry_point};
use crate::support::{rebuilt, write};

/// A context with a few files, a script with the setuid bit, a secret with 0600, and an ignored
/// file.
fn make_context(root: &Path, mtime: SystemTime) {
    write(&root.join("src/main.rs"), b"fn main() {}\n");
    write(&root.join("src/lib/util.rs"), b"pub fn util() {}\n");
    write(&root.join("bin/tool"), b"#!/bin/sh\necho tool\n");
    write(&root.join("secret"), b"hunter2\n");
    write(&root.join("target/junk"), b"build output\n");
    write(&root.join(".dockerignore"), b"target\n");
    fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    for path in ["src/main.rs", "src/lib/util.rs", "bin/tool", "secret", "target/junk"] {
        fs::File::options().write(true).open(root.join(path)).unwrap().set_modified(mtime).unwrap();
    }
}

fn declaration(context_dir: &Path) -> Image {
    let context = Context::dir(context_dir).unwrap();
    Image::scratch()
        .copy(&context, "src", "/app/src")
        .copy(&context, "bin/tool", "/usr/local/bin/")
        .copy_with(
            &context,
            "secret",
            "/etc/secret",
            CopyOptions { file: FileOptions::default().with_owner(1000, 1000), ..Default::default() },
        )
        .write_file("/etc/app.conf", b"x=1\n")
        .symlink("/app/current", "/app/src")
        .remove("/app/src/lib")
        .env("RUST_LOG", "info")
        .entrypoint(["/usr/local/bin/tool"])
}

fn build(cache: &Path, image: &Image, epoch: u64) -> layerwright::BuiltImage {
    let options = BuilderOptions::default().source_date_epoch(epoch);
    Builder::with_options(cache, options).unwrap().build(image).unwrap_or_else(|error| panic!("build failed: {error}"))
}

/// Builds `declaration(ctx)` from the current directory and writes the digest to the file named
/// by `LAYERWRIGHT_TEST_DIGEST_OUT`: the entry point of the processes that
/// `same_declaration_gives_the_same_digest_anywhere` starts in other working directories.
#[test]
#[ignore = "subprocess entry point of same_declaration_gives_the_same_digest_anywhere"]
fn helper_build_in_current_directory() {
    let out = subprocess::variable("LAYERWRIGHT_TEST_DIGEST_OUT", "same_declaration_gives_the_same_digest_anywhere");
    let built = build(Path::new("cache"), &declaration(Path::new("ctx")), 0);
    fs::write(out, built.manifest_digest()).unwrap();
}

fn digest_built_in(working_dir: &Path, mtime: SystemTime) -> String {
    make_context(&working_dir.join("ctx"), mtime);
    let out = working_dir.join("digest");
    let output = entry_point!(helper_build_in_current_directory)
        .command()
        .current_dir(working_dir)
        .env("LAYERWRIGHT_TEST_DIGEST_OUT", &out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the child build failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    fs::read_to_string(&out).unwrap_or_else(|error| panic!("the child wrote no digest to {}: {error}", out.display()))
}

#[test]
fn same_declaration_gives_the_same_digest_anywhere() {
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    let nested = second.path().join("some/deeper/place");
    fs::create_dir_all(&nested).unwrap();
    let digest_one = digest_built_in(first.path(), SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
    let digest_two = digest_built_in(&nested, SystemTime::now());
    assert!(digest_one.starts_with("sha256:"), "{digest_one}");
    assert_eq!(digest_one, digest_two, "two empty caches, two working directories, two mtimes");
}

#[test]
fn source_date_epoch_changes_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    make_context(&dir.path().join("ctx"), SystemTime::now());
    let image = declaration(&dir.path().join("ctx"));
    let at_zero = build(&dir.path().join("cache"), &image, 0);
    let later = build(&dir.path().join("cache"), &image, 1_700_000_000);
    assert_ne!(at_zero.manifest_digest(), later.manifest_digest());
    let config = later.config().unwrap();
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
}

#[test]
fn listing_shows_modes_owners_links_and_removals() {
    let dir = tempfile::tempdir().unwrap();
    make_context(&dir.path().join("ctx"), SystemTime::now());
    let built = build(&dir.path().join("cache"), &declaration(&dir.path().join("ctx")), 0);
    let listing = built.listing().unwrap();
    let lines: Vec<&str> = listing.lines().collect();
    let line = |path: &str| lines.iter().find(|line| line.ends_with(&format!(" {path}"))).copied();
    assert!(line("/usr/local/bin/tool").unwrap().starts_with("file 4755 0:0 "), "{listing}");
    assert!(line("/etc/secret").unwrap().starts_with("file 0600 1000:1000 8 "), "{listing}");
    assert!(line("/app/current").unwrap().contains("-> /app/src"), "{listing}");
    assert!(line("/app/src/main.rs").is_some(), "{listing}");
    assert!(line("/app/src/lib").is_none() && line("/app/src/lib/util.rs").is_none(), "removed: {listing}");
    assert!(!listing.contains("junk"), ".dockerignore'd: {listing}");
}

#[test]
fn an_unchanged_rebuild_is_all_cached_and_a_changed_file_rebuilds_its_step_and_above() {
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("ctx");
    make_context(&context, SystemTime::now());
    let cache = dir.path().join("cache");
    let image = declaration(&context);
    let first = build(&cache, &image, 0);
    assert!(first.steps().iter().filter(|step| step.layer.is_some()).all(|step| !step.cached));

    let again = build(&cache, &declaration(&context), 0);
    assert!(again.steps().iter().all(|step| step.cached), "{:#?}", again.steps());
    assert_eq!(first.manifest_digest(), again.manifest_digest());

    write(&context.join("secret"), b"hunter3\n");
    let changed = build(&cache, &declaration(&context), 0);
    assert_eq!(
        rebuilt(&changed),
        [
            "COPY secret /etc/secret",
            "WRITE /etc/app.conf (4 bytes)",
            "SYMLINK /app/current -> /app/src",
            "REMOVE /app/src/lib"
        ]
    );
    assert_eq!(changed.layers()[..2], first.layers()[..2], "layers below the change are reused");
}

/// The error of building `image`, which must fail.
fn build_error(cache: &Path, image: &Image) -> String {
    match Builder::new(cache).unwrap().build(image) {
        Ok(_) => panic!("the build of {} succeeded", image.step().label()),
        Err(error) => error.to_string(),
    }
}

fn check_error(cache: &Path, image: &Image, fragments: &[&str]) {
    let message = build_error(cache, image);
    for fragment in fragments {
        assert!(message.contains(fragment), "error {message:?} does not mention {fragment:?}");
    }
}

#[test]
fn bad_copy_sources_are_errors_naming_the_step_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let context_dir = dir.path().join("ctx");
    write(&context_dir.join("file"), b"x");
    write(&dir.path().join("outside"), b"secret outside the context");
    symlink("../outside", context_dir.join("leads-out")).unwrap();
    symlink("/etc/passwd", context_dir.join("absolute-link")).unwrap();
    let context = Context::dir(&context_dir).unwrap();
    let cache = dir.path().join("cache");
    let base = Image::scratch();
    check_error(&cache, &base.copy(&context, "../outside", "/x"), &["COPY ../outside /x", "\"../outside\"", ".."]);
    check_error(
        &cache,
        &base.copy(&context, "/etc/passwd", "/x"),
        &["COPY /etc/passwd /x", "\"/etc/passwd\"", "absolute"],
    );
    check_error(
        &cache,
        &base.copy(&context, "leads-out", "/x"),
        &["COPY leads-out /x", "\"leads-out\"", "outside the context"],
    );
    check_error(
        &cache,
        &base.copy(&context, "absolute-link", "/x"),
        &["COPY absolute-link /x", "\"absolute-link\"", "outside the context"],
    );
    check_error(
        &cache,
        &base.copy(&context, "missing", "/x"),
        &["COPY missing /x", "\"missing\"", "not in the build context"],
    );
    check_error(&cache, &base.remove("/nothing"), &["REMOVE /nothing", "\"/nothing\"", "does not exist"]);
    check_error(&cache, &base.write_file("/a/../../etc/x", b""), &["WRITE /a/../../etc/x", ".."]);
    // This base has no shell. (Where the RUN sandbox itself cannot be made, the error says
    // that instead; the RUN tests in `examples/tests/it/run.rs` insist on a working sandbox.)
    let message = build_error(&cache, &base.run("true"));
    assert!(message.starts_with("step `RUN true`: "), "{message}");
    assert!(message.contains("cannot execute \"/bin/sh\" in the image") || message.contains("namespace"), "{message}");
}

/// A docker-archive (`docker save` format, with history) with one uncompressed layer holding
/// `entries`, which no longer hashes to its diff id if `tamper_layer`.
fn docker_archive(path: &Path, entries: &[(&str, &[u8])], tamper_layer: bool) {
    let layer: Vec<Raw> = entries.iter().map(|(name, content)| Raw::File(name, content)).collect();
    crafted_archive_with(path, &[&layer], ArchiveOptions { history: true, tamper_last_layer: tamper_layer });
}

#[test]
fn hostile_or_corrupt_base_archives_are_refused_and_write_nothing_outside() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = dir.path().join("sandbox");
    fs::create_dir_all(&sandbox).unwrap();
    let cache = sandbox.join("cache");

    let good = sandbox.join("good.tar");
    docker_archive(&good, &[("etc/hello", b"hi\n")], false);
    let built = Builder::new(&cache).unwrap().build(&Image::from_archive(&good).write_file("/etc/more", b"x")).unwrap();
    assert!(built.listing().unwrap().contains("/etc/hello"));

    let tampered = sandbox.join("tampered.tar");
    docker_archive(&tampered, &[("etc/hello", b"hi\n")], true);
    check_error(&cache, &Image::from_archive(&tampered), &["FROM archive", "tampered.tar"]);

    let escaping = sandbox.join("escaping.tar");
    docker_archive(&escaping, &[("../../x", b"escaped\n")], false);
    check_error(&cache, &Image::from_archive(&escaping), &["FROM archive", "escaping.tar", "../../x"]);

    for candidate in [dir.path().join("x"), sandbox.join("x"), dir.path().parent().unwrap().join("x")] {
        assert!(!candidate.exists(), "{} was written", candidate.display());
    }
    let outside: Vec<PathBuf> = fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().path()).collect();
    assert_eq!(outside, [sandbox], "nothing but the sandbox in the test dir");
}

/// `inspect`: one line per layer with the step that made it, then what each layer adds,
/// changes and removes, largest first.
#[test]
fn inspect_shows_each_layer_its_step_and_its_files_largest_first() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("ctx/big"), vec![b'x'; 5000]);
    write(&dir.path().join("ctx/small"), "small\n");
    let context = Context::dir(dir.path().join("ctx")).unwrap();
    let image = Image::scratch()
        .copy(&context, ".", "/app")
        .write_file("/app/small", "changed\n")
        .remove("/app/big")
        .env("A", "1");
    let builder =
        Builder::with_options(dir.path().join("cache"), BuilderOptions::default().source_date_epoch(0)).unwrap();
    let built = builder.build(&image).unwrap();
    insta::assert_snapshot!(built.inspect(layerwright::InspectOptions::default().with_files()).unwrap(), @r"
      1          166 COPY . /app  built (no cache record (first build of this step))
          +         5000 /app/big
          +            6 /app/small
          +            0 /app
      2          125 WRITE /app/small (8 bytes)  built (no cache record (first build of this step))
          ~            8 /app/small
      3          111 REMOVE /app/big  built (no cache record (first build of this step))
          -         5000 /app/big
    ");
    let rebuilt = builder.build(&image).unwrap();
    let summary = rebuilt.inspect(layerwright::InspectOptions::default()).unwrap();
    assert_eq!(summary.lines().count(), 3, "{summary}");
    assert!(summary.lines().all(|line| line.ends_with("cached")), "{summary}");
}
