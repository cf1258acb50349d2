//! The cost of a no-op rebuild inside a long-lived process: a 6-step graph over a context of
//! 2,000 and of 20,000 small files. Every file is stat'ed (that is how a change would be seen),
//! none is read, no key query re-executes, and no layer is written.
//!
//! Also the cold first build of the 2,000-file graph, as the anchor the no-op is measured
//! against. Run with `cargo xtask bench` (or `cargo bench -p layerwright --bench rebuild`).

use std::fs;
use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use layerwright::{Builder, Context, Image};

/// `count` files of 64 bytes in 100-file directories, split into two trees `a/` and `b/`.
fn make_context(root: &Path, count: usize) {
    for index in 0..count {
        let tree = if index % 2 == 0 { "a" } else { "b" };
        let path = root.join(format!("{tree}/dir{:04}/file{index:06}.txt", index / 100));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, format!("{index:064}")).unwrap();
    }
}

fn declaration(root: &Path) -> Image {
    let context = Context::dir(root).unwrap();
    Image::scratch()
        .copy(&context, "a", "/data/a")
        .copy(&context, "b", "/data/b")
        .write_file("/etc/data.conf", "files=all\n")
        .env("DATA", "/data")
        .workdir("/data")
        .cmd(["/bin/true"])
}

fn no_op_rebuild(criterion: &mut Criterion, count: usize) {
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("context");
    make_context(&context, count);
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let image = declaration(&context);
    builder.build(&image).unwrap();
    criterion.bench_function(&format!("no-op rebuild, 6 steps, {count} files"), |bencher| {
        bencher.iter(|| {
            let built = builder.build(&image).unwrap();
            assert_eq!(built.blob_bytes_written(), 0);
            built
        })
    });
}

fn cold_build(criterion: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("context");
    make_context(&context, 2_000);
    let image = declaration(&context);
    let mut round = 0;
    criterion.bench_function("cold build, 6 steps, 2000 files", |bencher| {
        bencher.iter(|| {
            round += 1;
            let cache = dir.path().join(format!("cache-{round}"));
            let built = Builder::new(&cache).unwrap().build(&image).unwrap();
            drop(built);
            fs::remove_dir_all(cache).unwrap();
        })
    });
}

fn benches(criterion: &mut Criterion) {
    no_op_rebuild(criterion, 2_000);
    no_op_rebuild(criterion, 20_000);
    cold_build(criterion);
}

criterion_group! {
    name = rebuild;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(rebuild);
