//! Criterion micro-benchmarks of the hot paths, so that regressions show: hashing a context
//! (walk + blake3, no stat cache), the same walk answered by the stat cache, writing a layer's
//! tar stream with each compression (gzip on every core), rewriting a gzip layer of which one
//! file changed (the other blocks reused), and computing step keys through salsa.
//!
//! Run with `cargo xtask bench --micro` (or `cargo bench -p layerwright --bench hot_paths`).

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use layerwright::internals::{
    Content, EntryKind, LayerEntry, LayerOptions, StatLookup, open_context, select, write_layer,
};
use layerwright::{Compression, Context};
use layerwright_cache::{KeyDatabase, StatCache, StepIdentity, Store};

/// Bytes that are half noise, half text, roughly like a real tree of binaries and sources.
fn mixed_bytes(length: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut bytes = Vec::with_capacity(length);
    while bytes.len() < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if bytes.len() % 8192 < 4096 {
            bytes.extend_from_slice(&state.to_le_bytes());
        } else {
            bytes.extend_from_slice(b"fn main() {}\n");
        }
    }
    bytes.truncate(length);
    bytes
}

fn context_hashing(criterion: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    for index in 0..2_000u64 {
        let path = dir.path().join(format!("d{:02}/f{index:04}", index / 100));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, mixed_bytes(4096, index)).unwrap();
    }
    let context = open_context(&Context::dir(dir.path()).unwrap()).unwrap();
    let mut group = criterion.benchmark_group("context");
    group.throughput(Throughput::Bytes(2_000 * 4096));
    let empty = StatCache::default();
    group.bench_function("walk and hash 2000 x 4 KiB", |bencher| {
        bencher.iter(|| select(&context, ".", &mut StatLookup::new(&empty)).unwrap())
    });
    let mut warm = StatCache::default();
    let mut lookup = StatLookup::new(&empty);
    select(&context, ".", &mut lookup).unwrap();
    StatLookup::record_into(lookup.computed, &mut warm);
    group.bench_function("walk 2000 files through the stat cache", |bencher| {
        bencher.iter(|| select(&context, ".", &mut StatLookup::new(&warm)).unwrap())
    });
    group.finish();
}

fn layer_writing(criterion: &mut Criterion) {
    let cache = tempfile::tempdir().unwrap();
    let store = Store::open(cache.path()).unwrap();
    let files: Vec<Arc<[u8]>> = (0..64u64).map(|index| Arc::from(mixed_bytes(256 * 1024, index))).collect();
    let entries = || -> Vec<LayerEntry> {
        files
            .iter()
            .enumerate()
            .map(|(index, content)| LayerEntry {
                path: format!("data/file{index:03}"),
                kind: EntryKind::File { content: Content::Inline(Arc::clone(content)), size: content.len() as u64 },
                mode: 0o644,
                uid: 0,
                gid: 0,
                xattrs: Vec::new(),
            })
            .collect()
    };
    let block_maps = cache.path().join("gzip-blocks");
    let mut group = criterion.benchmark_group("layer");
    group.throughput(Throughput::Bytes(64 * 256 * 1024));
    for (name, compression) in [("none", Compression::None), ("gzip", Compression::Gzip), ("zstd", Compression::Zstd)] {
        let options = LayerOptions { compression, mtime: 0 };
        // Without the block maps of earlier iterations: every gzip block is compressed (on
        // every core).
        group.bench_function(format!("write 16 MiB tar, {name}"), |bencher| {
            bencher.iter_batched(
                || {
                    let _ = fs::remove_dir_all(&block_maps);
                    entries()
                },
                |entries| write_layer(&store, entries, &options).unwrap(),
                criterion::BatchSize::PerIteration,
            )
        });
    }
    // The same layer with one file changed each time: the other gzip blocks are copied from the
    // previous blob.
    let options = LayerOptions { compression: Compression::Gzip, mtime: 0 };
    let variants: Vec<Arc<[u8]>> = (0..2u64).map(|seed| Arc::from(mixed_bytes(256 * 1024, 1_000 + seed))).collect();
    let mut round = 0usize;
    group.bench_function("rewrite 16 MiB tar with one file changed, gzip", |bencher| {
        bencher.iter_batched(
            || {
                round += 1;
                let mut changed = entries();
                let content = Arc::clone(&variants[round % 2]);
                changed[10].kind = EntryKind::File { size: content.len() as u64, content: Content::Inline(content) };
                changed
            },
            |entries| write_layer(&store, entries, &options).unwrap(),
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn key_computation(criterion: &mut Criterion) {
    criterion.bench_function("salsa: key a fresh 200-step chain", |bencher| {
        bencher.iter(|| {
            let mut database = KeyDatabase::new();
            let mut parent = None;
            for index in 0..200u32 {
                let identity =
                    StepIdentity { encoding: index.to_le_bytes().to_vec(), parent, ..StepIdentity::default() };
                parent = Some(database.step(identity));
            }
            database.key(parent.unwrap())
        })
    });
}

criterion_group! {
    name = hot_paths;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = context_hashing, layer_writing, key_computation
}
criterion_main!(hot_paths);
