//! The incremental cache and the parallel solver, through the public API: what is rebuilt when
//! something changes (and why), what a no-op rebuild writes (nothing), how independent stages
//! overlap, and what salsa re-executes in a long-lived builder.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use layerwright::cache::MissReason;
use layerwright::{Builder, BuilderOptions, BuiltImage, Context, Image};

use crate::support::subprocess::{self, entry_point};
use crate::support::{rebuilt, write};

/// A context of two source trees and an ignored directory.
fn make_context(root: &Path) {
    write(&root.join("app/main.rs"), "fn main() {}\n");
    write(&root.join("app/util.rs"), "pub fn util() {}\n");
    write(&root.join("assets/logo.svg"), "<svg/>\n");
    write(&root.join("assets/style.css"), "body {}\n");
    write(&root.join("target/debug/out"), "build output\n");
    write(&root.join(".dockerignore"), "target\n**/*.tmp\n");
}

/// Six steps: two COPYs from the context, a file, config.
fn declaration(context_root: &Path) -> Image {
    let context = Context::dir(context_root).unwrap();
    Image::scratch()
        .copy(&context, "app", "/src/app")
        .copy(&context, "assets", "/srv/assets")
        .write_file("/etc/version", "1\n")
        .env("MODE", "production")
        .cmd(["/src/app/main"])
}

fn build(builder: &Builder, context_root: &Path) -> BuiltImage {
    builder.build(&declaration(context_root)).unwrap_or_else(|error| panic!("build failed: {error}"))
}

fn layer_of<'a>(built: &'a BuiltImage, label: &str) -> &'a str {
    built.steps().iter().find(|step| step.label == label).and_then(|step| step.layer.as_deref()).unwrap()
}

fn miss_of<'a>(built: &'a BuiltImage, label: &str) -> &'a MissReason {
    built.steps().iter().find(|step| step.label == label).and_then(|step| step.miss.as_ref()).unwrap()
}

/// Checks one change to the context against the steps it must rebuild, with a fresh builder
/// each time (so the persistent store and stat cache, not memory, decide). Returns the temp dir
/// too, which holds the cache the images live in.
fn check(change: impl FnOnce(&Path), expected_rebuilt: &[&str]) -> (BuiltImage, BuiltImage, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("ctx");
    make_context(&context);
    let cache = dir.path().join("cache");
    let before = build(&Builder::new(&cache).unwrap(), &context);
    change(&context);
    let after = build(&Builder::new(&cache).unwrap(), &context);
    assert_eq!(rebuilt(&after), expected_rebuilt, "steps: {:#?}", after.steps());
    if expected_rebuilt.is_empty() {
        assert_eq!(after.manifest_digest(), before.manifest_digest());
        assert_eq!(after.blob_bytes_written(), 0, "a no-op rebuild writes no layer bytes");
    }
    (before, after, dir)
}

#[test]
fn nothing_changed_means_every_step_cached_and_nothing_written() {
    let (before, after, _dir) = check(|_| {}, &[]);
    assert!(before.blob_bytes_written() > 0);
    assert!(after.steps().iter().all(|step| step.cached && step.miss.is_none()));
}

#[test]
fn a_changed_file_rebuilds_only_the_copy_that_selects_it_and_what_is_above() {
    let (before, after, _dir) = check(
        |context| write(&context.join("assets/style.css"), "body { color: red }\n"),
        &["COPY assets /srv/assets", "WRITE /etc/version (2 bytes)"],
    );
    assert_eq!(layer_of(&before, "COPY app /src/app"), layer_of(&after, "COPY app /src/app"));
    assert_ne!(layer_of(&before, "COPY assets /srv/assets"), layer_of(&after, "COPY assets /srv/assets"));
    assert_eq!(
        *miss_of(&after, "COPY assets /srv/assets"),
        MissReason::FilesChanged { changed: vec!["style.css".into()], added: vec![], removed: vec![] }
    );
    assert_eq!(*miss_of(&after, "WRITE /etc/version (2 bytes)"), MissReason::ParentChanged);
    // The layer written for the same content is the same layer: the write step on top of the
    // changed COPY has new parents but its own layer is byte-identical.
    assert_eq!(layer_of(&before, "WRITE /etc/version (2 bytes)"), layer_of(&after, "WRITE /etc/version (2 bytes)"));
}

#[test]
fn a_changed_file_that_dockerignore_excludes_rebuilds_nothing() {
    check(
        |context| {
            write(&context.join("target/debug/out"), "other output\n");
            write(&context.join("app/scratch.tmp"), "temporary\n");
        },
        &[],
    );
}

#[test]
fn only_an_mtime_changed_rebuilds_nothing() {
    check(
        |context| {
            let file = fs::File::options().write(true).open(context.join("app/main.rs")).unwrap();
            file.set_modified(SystemTime::now() + Duration::from_secs(3600)).unwrap();
        },
        &[],
    );
}

#[test]
fn a_changed_mode_rebuilds_that_layer() {
    let (_, after, _dir) = check(
        |context| fs::set_permissions(context.join("app/main.rs"), fs::Permissions::from_mode(0o755)).unwrap(),
        &["COPY app /src/app", "COPY assets /srv/assets", "WRITE /etc/version (2 bytes)"],
    );
    assert!(
        matches!(miss_of(&after, "COPY app /src/app"), MissReason::FilesChanged { changed, .. } if changed == &["main.rs"])
    );
    assert!(after.listing().unwrap().contains("file 0755 0:0 13 "));
}

#[test]
fn added_files_and_changed_definitions_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("ctx");
    make_context(&context);
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let first = build(&builder, &context);
    assert_eq!(*miss_of(&first, "COPY app /src/app"), MissReason::NoRecord);

    write(&context.join("app/new.rs"), "// new\n");
    let second = build(&builder, &context);
    assert_eq!(
        *miss_of(&second, "COPY app /src/app"),
        MissReason::FilesChanged { changed: vec![], added: vec!["new.rs".into()], removed: vec![] }
    );

    let changed_definition = Image::scratch().copy(&Context::dir(&context).unwrap(), "app/", "/src/app");
    let third = builder.build(&changed_definition).unwrap();
    assert_eq!(*miss_of(&third, "COPY app/ /src/app"), MissReason::DefinitionChanged);
}

#[test]
fn exporting_an_unchanged_image_again_leaves_the_outputs_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("ctx");
    make_context(&context);
    let cache = dir.path().join("cache");
    let first = build(&Builder::new(&cache).unwrap(), &context);
    let layout = dir.path().join("layout");
    let archive = dir.path().join("image.tar");
    first.write_oci_layout(&layout, "app:1").unwrap();
    first.write_docker_archive(&archive, "app:1").unwrap();
    let stamp = |path: &Path| {
        use std::os::unix::fs::MetadataExt;
        let metadata = fs::metadata(path).unwrap();
        (metadata.ino(), metadata.modified().unwrap())
    };
    let before = (stamp(&layout.join("index.json")), stamp(&archive));
    std::thread::sleep(Duration::from_millis(20));

    let again = build(&Builder::new(&cache).unwrap(), &context);
    again.write_oci_layout(&layout, "app:1").unwrap();
    again.write_docker_archive(&archive, "app:1").unwrap();
    assert_eq!((stamp(&layout.join("index.json")), stamp(&archive)), before);

    again.write_docker_archive(&archive, "app:2").unwrap();
    assert_ne!(stamp(&archive), before.1, "another tag is another archive");
}

#[test]
fn a_corrupt_cached_blob_is_never_exported_and_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("ctx");
    make_context(&context);
    let cache = dir.path().join("cache");
    let first = build(&Builder::new(&cache).unwrap(), &context);
    let layer = first.layers()[1].digest.clone();
    let blob = cache.join("blobs/sha256").join(layer.hex());
    let mut bytes = fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&blob, bytes).unwrap();

    let error = first.write_docker_archive(dir.path().join("out.tar"), "app:1").unwrap_err();
    assert!(error.to_string().contains("is corrupt"), "{error}");
    assert!(!dir.path().join("out.tar").exists());

    let again = build(&Builder::new(&cache).unwrap(), &context);
    assert_eq!(rebuilt(&again), ["COPY assets /srv/assets"]);
    assert_eq!(*miss_of(&again, "COPY assets /srv/assets"), MissReason::ResultMissing);
    assert_eq!(again.manifest_digest(), first.manifest_digest());
    again.write_docker_archive(dir.path().join("out.tar"), "app:1").unwrap();
}

#[test]
fn independent_stages_build_at_the_same_time() {
    let dir = tempfile::tempdir().unwrap();
    let options = BuilderOptions::default().before_execute(Arc::new(|label: &str| {
        if label.starts_with("WRITE /slow") {
            std::thread::sleep(Duration::from_secs(1));
        }
    }));
    let builder = Builder::with_options(dir.path().join("cache"), options).unwrap();
    let stages: Vec<Image> = (0..3)
        .map(|stage| Image::scratch().write_file(&format!("/slow/{stage}"), format!("stage {stage}\n")))
        .collect();
    let merged = stages
        .iter()
        .enumerate()
        .fold(Image::scratch(), |image, (stage, source)| image.copy_from(source, &format!("/slow/{stage}"), "/out/"));
    let started = Instant::now();
    let built = builder.build(&merged).unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(2500), "three 1 s stages took {elapsed:?}: they did not overlap");
    let listing = built.listing().unwrap();
    for stage in 0..3 {
        assert!(listing.contains(&format!(" /out/{stage}\n")), "{listing}");
    }
    // The same three stages in a second image are not built again.
    let again = builder.build_all(&[&merged, &stages[0]]).unwrap();
    assert!(again.iter().all(|built| built.steps().iter().all(|step| step.cached)));
}

#[test]
fn a_long_lived_builder_re_executes_only_the_key_queries_of_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("ctx");
    make_context(&context);
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    build(&builder, &context);
    let first = builder.take_key_query_log();
    assert_eq!(first.iter().filter(|entry| entry.contains("step_key")).count(), 6, "{first:#?}");

    build(&builder, &context);
    assert_eq!(builder.take_key_query_log(), Vec::<String>::new(), "nothing changed, nothing re-executes");

    write(&context.join("assets/style.css"), "body { margin: 0 }\n");
    build(&builder, &context);
    let log = builder.take_key_query_log();
    let executed = |name: &str| log.iter().filter(|entry| entry.contains(name)).count();
    // The keys of the COPY assets step (its file set's digest changed) and the three steps
    // above it; the scratch base and `COPY app` are not re-executed.
    assert_eq!(executed("step_key"), 4, "{log:#?}");
}

/// Builds the declaration of the context named by `LAYERWRIGHT_TEST_CONTEXT` into the cache named
/// by `LAYERWRIGHT_TEST_CACHE` and prints the digest: the entry point of the processes of the
/// test below.
#[test]
#[ignore = "subprocess entry point of two_processes_building_into_one_cache_both_succeed_with_the_same_digest"]
fn helper_concurrent_build() {
    const PARENT: &str = "two_processes_building_into_one_cache_both_succeed_with_the_same_digest";
    let context = subprocess::variable("LAYERWRIGHT_TEST_CONTEXT", PARENT);
    let cache = subprocess::variable("LAYERWRIGHT_TEST_CACHE", PARENT);
    let built = build(&Builder::new(Path::new(&cache)).unwrap(), Path::new(&context));
    println!("DIGEST {}", built.manifest_digest());
}

#[test]
fn two_processes_building_into_one_cache_both_succeed_with_the_same_digest() {
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("ctx");
    make_context(&context);
    let cache = dir.path().join("cache");
    let children: Vec<_> = (0..2)
        .map(|_| {
            entry_point!(helper_concurrent_build)
                .command()
                .env("LAYERWRIGHT_TEST_CONTEXT", &context)
                .env("LAYERWRIGHT_TEST_CACHE", &cache)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let digests: Vec<String> = children
        .into_iter()
        .map(|child| {
            let output = child.wait_with_output().unwrap();
            let stdout = String::from_utf8(output.stdout).unwrap();
            assert!(output.status.success(), "the child build failed ({}):\n{stdout}", output.status);
            // libtest may print the line after its own `test NAME ... `.
            let digest = stdout.lines().find_map(|line| line.split("DIGEST ").nth(1));
            digest.unwrap_or_else(|| panic!("no digest line in:\n{stdout}")).trim().to_owned()
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
    let serial = build(&Builder::new(dir.path().join("serial-cache")).unwrap(), &context);
    assert_eq!(digests[0], serial.manifest_digest());
}
