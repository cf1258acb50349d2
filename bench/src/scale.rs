//! `layerwright-bench --scale WORKDIR [--runs N] [--max-files N]`: the scaling curves, measured
//! in this one process with a fresh `Builder` per build (a fresh cache directory for a cold
//! build), medians of N runs:
//!
//! - a context of 2k / 20k / 200k files copied whole: cold and no-op;
//! - a chain of 10 / 100 / 1,000 `write_file` steps: cold, no-op, and one change at the tail;
//! - `build_all` of 1 / 10 / 100 images on a shared base: cold and no-op.
//!
//! `layerwright-bench --scale-noop WORKDIR FILES` builds the files workload of FILES files once
//! on the cache a `--scale` run left (a no-op): `cargo xtask bench --scale` times that process
//! as a whole.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use layerwright::{Builder, Context, Image};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The sizes of each curve.
const FILE_COUNTS: [usize; 3] = [2_000, 20_000, 200_000];
const CHAIN_LENGTHS: [usize; 3] = [10, 100, 1_000];
const IMAGE_COUNTS: [usize; 3] = [1, 10, 100];

/// Runs every curve and prints one table.
pub fn run(workdir: &Path, runs: usize, max_files: usize) -> Result<()> {
    fs::create_dir_all(workdir)?;
    println!("{:<34} {:>10} {:>10} {:>10}", "curve (median ms)", "cold", "no-op", "tail");
    for files in FILE_COUNTS.into_iter().filter(|files| *files <= max_files) {
        let context_dir = files_context(workdir, files)?;
        let image = files_image(&context_dir)?;
        let cache = workdir.join(format!("cache-files-{files}"));
        let cold = median(runs, || {
            remove(&cache)?;
            timed(|| Builder::new(&cache)?.build(&image).map(drop).map_err(Into::into))
        })?;
        let no_op = median(runs, || timed(|| Builder::new(&cache)?.build(&image).map(drop).map_err(Into::into)))?;
        row(&format!("files {files}"), Some(cold), Some(no_op), None);
    }
    for length in CHAIN_LENGTHS {
        let cache = workdir.join(format!("cache-chain-{length}"));
        let image = chain(length, 0);
        let cold = median(runs, || {
            remove(&cache)?;
            timed(|| Builder::new(&cache)?.build(&image).map(drop).map_err(Into::into))
        })?;
        let no_op = median(runs, || timed(|| Builder::new(&cache)?.build(&image).map(drop).map_err(Into::into)))?;
        let mut round = 0;
        let tail = median(runs, || {
            round += 1;
            let changed = chain(length, round);
            timed(|| Builder::new(&cache)?.build(&changed).map(drop).map_err(Into::into))
        })?;
        row(&format!("chain {length}"), Some(cold), Some(no_op), Some(tail));
    }
    for count in IMAGE_COUNTS {
        let cache = workdir.join(format!("cache-images-{count}"));
        let base = chain(20, 0);
        let images: Vec<Image> =
            (0..count).map(|index| base.write_file("/image", format!("image {index}\n").as_bytes())).collect();
        let references: Vec<&Image> = images.iter().collect();
        let cold = median(runs, || {
            remove(&cache)?;
            timed(|| Builder::new(&cache)?.build_all(&references).map(drop).map_err(Into::into))
        })?;
        let no_op =
            median(runs, || timed(|| Builder::new(&cache)?.build_all(&references).map(drop).map_err(Into::into)))?;
        row(&format!("build_all {count}"), Some(cold), Some(no_op), None);
    }
    Ok(())
}

/// One no-op build of the files workload (the cache is the one `run` left).
pub fn no_op(workdir: &Path, files: usize) -> Result<()> {
    let context_dir = files_context(workdir, files)?;
    let image = files_image(&context_dir)?;
    let built = Builder::new(workdir.join(format!("cache-files-{files}")))?.build(&image)?;
    let built_steps = built.steps().iter().filter(|step| !step.cached).count();
    println!("steps-built {built_steps}");
    Ok(())
}

/// For a profiler: a chain of `length` steps built once (if its cache lacks it), then `rounds`
/// no-op builds and `rounds` builds with a change at the tail.
pub fn chain_point(workdir: &Path, length: usize, rounds: usize) -> Result<()> {
    let cache = workdir.join(format!("cache-chain-{length}"));
    let image = chain(length, 0);
    Builder::new(&cache)?.build(&image)?;
    let no_op = median(rounds, || timed(|| Builder::new(&cache)?.build(&image).map(drop).map_err(Into::into)))?;
    let mut round = 1000;
    let tail = median(rounds, || {
        round += 1;
        let changed = chain(length, round);
        timed(|| Builder::new(&cache)?.build(&changed).map(drop).map_err(Into::into))
    })?;
    row(&format!("chain {length}"), None, Some(no_op), Some(tail));
    Ok(())
}

fn files_image(context_dir: &Path) -> Result<Image> {
    Ok(Image::scratch().copy(&Context::dir(context_dir)?, ".", "/app"))
}

/// A context of `files` small files, 100 to a directory (generated once).
fn files_context(workdir: &Path, files: usize) -> Result<PathBuf> {
    let dir = workdir.join(format!("files-{files}"));
    let marker = workdir.join(format!("files-{files}.generated"));
    if marker.exists() {
        return Ok(dir);
    }
    remove(&dir)?;
    for index in 0..files {
        let sub = dir.join(format!("d{}", index / 100));
        if index % 100 == 0 {
            fs::create_dir_all(&sub)?;
        }
        fs::write(sub.join(format!("f{index}")), format!("file {index}\n"))?;
    }
    fs::write(marker, "")?;
    Ok(dir)
}

/// `length` `write_file` steps on scratch; the last one's content depends on `round`.
fn chain(length: usize, round: usize) -> Image {
    let mut image = Image::scratch();
    for index in 0..length {
        let content =
            if index + 1 == length { format!("step {index} round {round}\n") } else { format!("step {index}\n") };
        image = image.write_file(&format!("/chain/f{index}"), content.as_bytes());
    }
    image
}

fn remove(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error.into()),
        _ => Ok(()),
    }
}

fn timed(build: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let started = Instant::now();
    build()?;
    Ok(started.elapsed())
}

fn median(runs: usize, mut measure: impl FnMut() -> Result<Duration>) -> Result<Duration> {
    let mut durations = (0..runs.max(1)).map(|_| measure()).collect::<Result<Vec<_>>>()?;
    durations.sort();
    Ok(durations[durations.len() / 2])
}

fn row(name: &str, cold: Option<Duration>, no_op: Option<Duration>, tail: Option<Duration>) {
    let cell = |duration: Option<Duration>| {
        duration.map_or_else(|| "-".to_owned(), |duration| format!("{:.1}", duration.as_secs_f64() * 1000.0))
    };
    println!("{name:<34} {:>10} {:>10} {:>10}", cell(cold), cell(no_op), cell(tail));
}
