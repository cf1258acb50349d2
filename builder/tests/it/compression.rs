//! Changing `BuilderOptions::compression` recompresses cached layers but never re-runs a step,
//! and gives exactly the image a fresh build in that compression gives.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use layerwright::{Builder, BuilderOptions, BuiltImage, Compression, Context, Image};

fn declaration(context_root: &Path) -> Image {
    std::fs::create_dir_all(context_root.join("app")).unwrap();
    std::fs::write(context_root.join("app/main.sh"), "#!/bin/sh\necho hello\n").unwrap();
    // Enough bytes that every compression gives a different blob.
    std::fs::write(context_root.join("app/data.txt"), "layerwright ".repeat(10_000)).unwrap();
    let context = Context::dir(context_root).unwrap();
    Image::scratch()
        .copy(&context, "app", "/app")
        .write_file("/etc/app.conf", "x=1\n")
        .symlink("/app/current", "/app")
        .env("MODE", "test")
        .cmd(["/app/main.sh"])
}

/// Builds with `compression`, counting the steps that execute (cache misses).
fn build(cache: &Path, image: &Image, compression: Compression) -> (BuiltImage, usize) {
    let executed = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&executed);
    let options = BuilderOptions::default().compression(compression).source_date_epoch(0).before_execute(Arc::new(
        move |_: &str| {
            counter.fetch_add(1, Ordering::Relaxed);
        },
    ));
    let built = Builder::with_options(cache, options).unwrap().build(image).unwrap();
    (built, executed.load(Ordering::Relaxed))
}

fn media_types(built: &BuiltImage) -> Vec<&str> {
    built.layers().iter().map(|layer| layer.media_type.as_str()).collect()
}

#[test]
fn another_compression_recompresses_cached_layers_without_executing_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let image = declaration(&dir.path().join("context"));
    let cache = dir.path().join("cache");

    let (gzip, executed) = build(&cache, &image, Compression::Gzip);
    assert_eq!(executed, 3, "the first build executes the three layer steps");
    assert_eq!(media_types(&gzip), ["application/vnd.oci.image.layer.v1.tar+gzip"; 3]);

    for (compression, media_type) in [
        (Compression::Zstd, "application/vnd.oci.image.layer.v1.tar+zstd"),
        (Compression::None, "application/vnd.oci.image.layer.v1.tar"),
    ] {
        let (recompressed, executed) = build(&cache, &image, compression);
        assert_eq!(executed, 0, "{compression:?}: no step may execute");
        assert!(recompressed.steps().iter().all(|step| step.cached), "{compression:?}: {:?}", recompressed.steps());
        assert_eq!(media_types(&recompressed), [media_type; 3]);
        assert!(recompressed.blob_bytes_written() > 0, "{compression:?}: the layers were recompressed");
        assert_eq!(recompressed.config_digest(), gzip.config_digest(), "diff ids (and so the config) stay");
        assert_eq!(recompressed.listing().unwrap(), gzip.listing().unwrap());
        for (layer, step) in
            recompressed.layers().iter().zip(recompressed.steps().iter().filter_map(|s| s.layer.as_ref()))
        {
            assert_eq!(&layer.digest.to_string(), step, "step reports name the recompressed layers");
        }

        // Byte for byte what a fresh build in that compression writes, so the digest does not
        // depend on the cache's history.
        let (fresh, _) = build(&dir.path().join(format!("fresh-{compression:?}")), &image, compression);
        assert_eq!(recompressed.manifest_digest(), fresh.manifest_digest(), "{compression:?}");

        // The recompressed layers are remembered: building again writes nothing.
        let (again, executed) = build(&cache, &image, compression);
        assert_eq!((executed, again.blob_bytes_written()), (0, 0), "{compression:?}");
        assert_eq!(again.manifest_digest(), recompressed.manifest_digest());
    }

    let (back, executed) = build(&cache, &image, Compression::Gzip);
    assert_eq!((executed, back.blob_bytes_written()), (0, 0), "the records hold the gzip layers");
    assert_eq!(back.manifest_digest(), gzip.manifest_digest());
}

#[test]
fn a_record_written_in_zstd_serves_gzip_builds_too() {
    let dir = tempfile::tempdir().unwrap();
    let image = declaration(&dir.path().join("context"));
    let cache = dir.path().join("cache");
    let (zstd, executed) = build(&cache, &image, Compression::Zstd);
    assert_eq!(executed, 3);
    let (gzip, executed) = build(&cache, &image, Compression::Gzip);
    assert_eq!(executed, 0);
    assert_eq!(media_types(&gzip), ["application/vnd.oci.image.layer.v1.tar+gzip"; 3]);
    let (fresh, _) = build(&dir.path().join("fresh"), &image, Compression::Gzip);
    assert_eq!(gzip.manifest_digest(), fresh.manifest_digest());
    assert_ne!(gzip.manifest_digest(), zstd.manifest_digest());
}
