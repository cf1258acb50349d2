//! The edit → runnable loop of `build-image --watch --load`, measured in one process: the real
//! watch loop (`layerwright::watch::watch`: notify, debounce, one long-lived builder) rebuilds
//! after each edit of the workload's changed file, and each result is loaded into the Docker
//! engine at `DOCKER_HOST`. For every round it prints `round EDIT_TO_LOADED BUILD_AND_LOAD
//! LOAD` in seconds: from the write of the file to the end of the load (what a user waits for,
//! debounce included), the build plus the load, and the load alone (the engine's share).
//!
//! What it deliberately is not: a test. The first build (cold or from the cache) is not a
//! round; a failed build or load ends the run with its error.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use layerwright::watch::{WatchOptions, watch};
use layerwright::{Builder, BuilderOptions, Compression};
use layerwright_examples::workloads;

/// How long the watched files stay quiet before a rebuild starts: short, as an editor's save is
/// one write.
const DEBOUNCE: Duration = Duration::from_millis(50);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs `rounds` edits of the workload's changed file through one watch loop.
pub fn run(workload: &str, workdir: &Path, cache: &Path, tag: &str, rounds: u32) -> Result<(), BoxError> {
    if workload != "w4" {
        return Err(format!("--watch-rounds knows the changed file of w4 only, not {workload}").into());
    }
    let image = workloads::declare(workload, workdir)?;
    let changed_file = workdir.join(workload).join("context").join(workloads::W4_CHANGED_FILE);
    let builder = Builder::with_options(cache, BuilderOptions::default().compression(Compression::Gzip))?;
    let options = WatchOptions::default().debounce(DEBOUNCE);
    let stop = AtomicBool::new(false);
    // The editor: a thread that writes the file once per round, after the previous round ended.
    let (round_done, next_round) = mpsc::channel::<()>();
    let (edited, edits) = mpsc::channel::<Instant>();
    let editor_file = changed_file.clone();
    let editor = std::thread::spawn(move || -> std::io::Result<()> {
        for round in 0..rounds {
            if next_round.recv().is_err() {
                return Ok(());
            }
            // Past the debounce of the previous round's own events.
            std::thread::sleep(Duration::from_millis(200));
            let written = Instant::now();
            std::fs::write(&editor_file, format!("edited in watch round {round}\n"))?;
            if edited.send(written).is_err() {
                return Ok(());
            }
        }
        Ok(())
    });
    let mut failure: Option<BoxError> = None;
    let mut completed = 0;
    watch(&builder, &[&image], &options, &stop, |watched_build| {
        let built = match watched_build.result {
            Ok(mut built) => built.remove(0),
            Err(error) => {
                failure = Some(error.into());
                return ControlFlow::Break(());
            }
        };
        let load_started = Instant::now();
        if let Err(error) = built.load(tag) {
            failure = Some(error.into());
            return ControlFlow::Break(());
        }
        if !watched_build.changed.is_empty() {
            let edit_time = edits.recv_timeout(Duration::from_secs(5)).ok();
            let load = load_started.elapsed();
            let build_and_load = watched_build.duration + load;
            let edit_to_loaded = edit_time.map_or(build_and_load, |written| written.elapsed());
            println!(
                "round {:.4} {:.4} {:.4}",
                edit_to_loaded.as_secs_f64(),
                build_and_load.as_secs_f64(),
                load.as_secs_f64()
            );
            completed += 1;
        }
        if completed == rounds || round_done.send(()).is_err() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })?;
    editor.join().map_err(|_| "the editor thread panicked")??;
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
