//! The integration tests of `layerwright`, through its public API, as one test binary: linking
//! is most of what an incremental `cargo test` waits for, so every file is a module here
//! rather than a binary of its own (`cargo test -p layerwright --test it [FILTER]`).
//!
//! - `build`: end-to-end builds: reproducibility, caching, bad input.
//! - `build_script`: `build_rs` as a plain user: cached RUN steps, and what an uncached one says.
//! - `cli`: `layerwright::cli` as a user's xtask runs it, from a subdirectory of a workspace.
//! - `compression`: changing the compression recompresses, never re-executes.
//! - `debian`: `apt-get install` in a real Debian base with isolated networking.
//! - `hostile`: crafted base archives and build contexts.
//! - `incremental`: what is rebuilt and why, the parallel solver, salsa's re-execution.
//! - `prune`: `cache prune` policies, `cache du`, pruning after a build and beside one.
//! - `reliability`: killed builds, racing processes, a corrupt cache, a full disk.
//! - `watch`: the rebuild loop of `--watch`.
//!
//! `support` holds what they share; tests that need processes of their own re-execute this
//! binary on an ignored entry-point test (`support::subprocess`).

mod support;

mod build;
mod build_script;
mod cli;
mod compression;
mod debian;
mod hostile;
mod incremental;
mod prune;
mod reliability;
mod watch;

/// Every file of `tests/` is a module of this binary (see `support::layout`).
#[test]
fn every_test_file_is_a_module_of_this_binary() {
    support::layout::check_every_test_file_is_a_module(env!("CARGO_MANIFEST_DIR"));
}
