//! The async runtime of the network clients (the registry, REAPI), kept inside them.
//!
//! Each network operation runs a current-thread tokio runtime on a thread of its own, so that
//! callers (the rayon solver, a build script, an async program) never see tokio and never nest
//! runtimes. What it deliberately is not: a pool or a long-lived runtime; an operation's
//! connections live as long as the operation.

use std::future::Future;

/// Runs `work` (which drives futures with [`block_on`]) on a thread named `name`, so that a
/// caller inside an async runtime (or a rayon worker) never has a runtime nested in its thread.
pub(crate) fn on_own_thread<T: Send>(name: &str, work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn_scoped(scope, work)
            .expect("spawning a thread (the OS refused: out of memory or threads)");
        match worker.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Drives `future` to completion on a current-thread runtime: network work is IO-bound and a
/// handful of concurrent requests need no more than one thread. The error says why the runtime
/// could not be started.
pub(crate) fn block_on<F: Future>(future: F) -> Result<F::Output, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start a tokio runtime: {error}"))?;
    Ok(runtime.block_on(future))
}
