//! `layerwright-bench --platforms WORKDIR RUNS`: what a foreign platform costs, in this one
//! process, medians of RUNS cold builds (a fresh cache directory each):
//!
//! - one RUN step native (linux/amd64) and under qemu-user emulation (linux/arm64): a trivial
//!   command (`uname -m`, the emulator's start-up) and a shell loop (its CPU cost);
//! - an index of both platforms (`build_index`, attestations included) against the two single
//!   builds it replaces (`build_for` each platform, each with its own cache).
//!
//! The images are busybox bases declared with the DSL: the host's `/bin/busybox` (Debian's
//! busybox-static) and the arm64 one `.ci/run` extracts. What it is not: a test; a missing
//! emulator or busybox ends it with the builder's error.

use std::path::Path;
use std::time::{Duration, Instant};

use layerwright::{Builder, Context, CopyOptions, FileOptions, Image, Platform};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const ARM64_BUSYBOX: &str = "/usr/local/lib/layerwright-test/busybox-arm64";
const HOST_BUSYBOX: &str = "/bin/busybox";

/// A CPU-bound shell loop: what an emulated build step spends its time on.
const LOOP: &str = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo $i > /count";

fn busybox_base(busybox: &Path) -> Result<Image> {
    let context = Context::dir(busybox.parent().ok_or("busybox has a parent")?)?;
    let name = busybox.file_name().and_then(|name| name.to_str()).ok_or("a UTF-8 name")?;
    Ok(Image::scratch()
        .copy_with(&context, name, "/bin/busybox", CopyOptions::default().with_mode(0o755))
        .symlink("/bin/sh", "busybox")
        .symlink("/bin/uname", "busybox")
        .write_file_with("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", FileOptions::mode(0o644)))
}

/// Runs the measurements and prints one table.
pub fn run(workdir: &Path, runs: usize) -> Result<()> {
    std::fs::create_dir_all(workdir)?;
    let amd64 = Platform::parse("linux/amd64")?;
    let arm64 = Platform::parse("linux/arm64")?;
    let native_base = busybox_base(Path::new(HOST_BUSYBOX))?;
    let arm64_base = busybox_base(Path::new(ARM64_BUSYBOX))?;
    let mut round = 0;
    let mut fresh_cache = || {
        round += 1;
        let cache = workdir.join(format!("cache-{round}"));
        let _ = std::fs::remove_dir_all(&cache);
        cache
    };
    println!("{:<44} {:>12} {:>12} {:>8}", "median of cold builds", "amd64", "arm64/qemu", "ratio");
    for (label, command) in [("RUN uname -m (start-up)", "uname -m > /arch"), ("RUN a 20,000-step shell loop", LOOP)] {
        let mut native = Vec::new();
        let mut emulated = Vec::new();
        for _ in 0..runs {
            for (platform, base, durations) in
                [(&amd64, &native_base, &mut native), (&arm64, &arm64_base, &mut emulated)]
            {
                let built = Builder::new(fresh_cache())?.build_for(&base.run(command), platform)?;
                let step = built.steps().last().ok_or("a RUN step")?;
                durations.push(step.duration);
            }
        }
        row(label, median(native), median(emulated));
    }
    let image_of = |base: &Image| base.run(LOOP).cmd(["/bin/sh"]);
    let (native_image, arm64_image) = (image_of(&native_base), image_of(&arm64_base));
    let mut index_builds = Vec::new();
    let mut single_builds = Vec::new();
    for _ in 0..runs {
        let pairs = [(amd64.clone(), &native_image), (arm64.clone(), &arm64_image)];
        index_builds.push(timed(|| Builder::new(fresh_cache())?.build_index(&pairs).map(drop).map_err(Into::into))?);
        single_builds.push(timed(|| {
            Builder::new(fresh_cache())?.build_for(&native_image, &amd64)?;
            Builder::new(fresh_cache())?.build_for(&arm64_image, &arm64)?;
            Ok(())
        })?);
    }
    let (index, singles) = (median(index_builds), median(single_builds));
    println!(
        "{:<44} {:>10.1} ms against two single builds {:.1} ms ({:.2}×)",
        "index of both (attestations included)",
        index.as_secs_f64() * 1000.0,
        singles.as_secs_f64() * 1000.0,
        index.as_secs_f64() / singles.as_secs_f64()
    );
    for cache in (1..=round).map(|round| workdir.join(format!("cache-{round}"))) {
        let _ = std::fs::remove_dir_all(cache);
    }
    Ok(())
}

fn row(label: &str, native: Duration, emulated: Duration) {
    println!(
        "{label:<44} {:>9.1} ms {:>9.1} ms {:>7.1}×",
        native.as_secs_f64() * 1000.0,
        emulated.as_secs_f64() * 1000.0,
        emulated.as_secs_f64() / native.as_secs_f64()
    );
}

fn timed(build: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let started = Instant::now();
    build()?;
    Ok(started.elapsed())
}

fn median(mut durations: Vec<Duration>) -> Duration {
    durations.sort();
    durations[durations.len() / 2]
}
