//! The library of `layerwright-worker`: a bot of a REAPI server's Remote Workers API
//! (BuildGrid's Bots service) that runs the RUN steps builders submit with
//! [`crate::Builder::reapi_execute`], with the same runner and layer writer as a local build,
//! keeping lower layers and their snapshots in its own cache directory between leases.
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use layerwright::ReapiEndpoint;
//! use layerwright::worker::{WorkerOptions, serve};
//!
//! let options = WorkerOptions::new(ReapiEndpoint::new("http://127.0.0.1:50051", ""), "/var/cache/layerwright-worker");
//! let stop = AtomicBool::new(false); // set it (on SIGTERM) to drain and return
//! serve(&options, &stop, &|event| eprintln!("{event:?}"))?;
//! # Ok::<(), layerwright::worker::WorkerError>(())
//! ```
//!
//! What it deliberately is not: the command line (the `layerwright-worker` crate is), or a
//! general REAPI worker: it runs only layerwright's steps (see `remote_cache::reapi`).

pub use crate::remote_cache::{WorkerError, WorkerEvent, WorkerOptions, serve_worker as serve};
