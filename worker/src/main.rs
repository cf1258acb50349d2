//! `layerwright-worker`: runs layerwright RUN steps for remote builders as a bot of a REAPI
//! server's Remote Workers API (BuildGrid). A thin command line over `layerwright::worker`.
//!
//! ```text
//! layerwright-worker --reapi http://127.0.0.1:50051 [--instance NAME] --cache DIR [--platform linux/amd64] [--name NAME]
//! ```
//!
//! SIGTERM or Ctrl-C drains: the running step is finished and reported, then it exits. It
//! prints one line per event on stderr, each with the time in milliseconds since the epoch.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use layerwright::worker::{WorkerEvent, WorkerOptions, serve};
use layerwright::{Platform, ReapiEndpoint};

/// Runs layerwright RUN steps for builders using `--reapi-execute`, as a BuildGrid bot.
#[derive(Debug, Parser)]
#[command(name = "layerwright-worker", version)]
struct Arguments {
    /// The REAPI server: http://HOST:PORT (plaintext) or https://HOST:PORT (TLS).
    #[arg(long, value_name = "URL")]
    reapi: String,
    /// The REAPI instance name (empty: the server's default instance).
    #[arg(long, value_name = "NAME", default_value = "")]
    instance: String,
    /// The worker's own cache directory (lower layers and their snapshots are kept there).
    #[arg(long, value_name = "DIR")]
    cache: PathBuf,
    /// The platform whose steps it takes (default: this host's).
    #[arg(long, value_name = "OS/ARCH")]
    platform: Option<String>,
    /// The bot id it registers as (default: the host name and the process id).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
}

fn milliseconds(time: SystemTime) -> u128 {
    time.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()
}

fn say(line: &str) {
    eprintln!("{} {line}", milliseconds(SystemTime::now()));
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    let mut options = WorkerOptions::new(ReapiEndpoint::new(&arguments.reapi, &arguments.instance), &arguments.cache);
    if let Some(platform) = &arguments.platform {
        match Platform::parse(platform) {
            Ok(platform) => options = options.platform(platform),
            Err(error) => {
                eprintln!("layerwright-worker: --platform {platform}: {error}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(name) = &arguments.name {
        options = options.name(name);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    if let Err(error) = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)) {
        eprintln!("layerwright-worker: cannot handle SIGTERM and Ctrl-C: {error}");
        return ExitCode::FAILURE;
    }
    say(&format!("worker {} serving {} (cache {})", options.name, options.endpoint, options.cache_dir.display()));
    let outcome = serve(&options, &stop, &|event| match event {
        WorkerEvent::Connected { session } => say(&format!("connected: session {session}")),
        WorkerEvent::Disconnected { reason } => say(&format!("disconnected: {reason}")),
        WorkerEvent::LeaseStarted { lease } => say(&format!("lease {lease} started")),
        WorkerEvent::LeaseFinished { lease, step, started, finished, outcome } => say(&format!(
            "lease {lease} finished: step {:?} ran from {} to {}: {}",
            step.unwrap_or_default(),
            milliseconds(started),
            milliseconds(finished),
            match outcome {
                Ok(layer) => format!("layer {layer}"),
                Err(error) => format!("failed: {error}"),
            }
        )),
        WorkerEvent::Draining => say("stopping: finishing the running lease first"),
        _ => say(&format!("{event:?}")),
    });
    match outcome {
        Ok(()) => {
            say("stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("layerwright-worker: {error}");
            ExitCode::FAILURE
        }
    }
}
