//! The integration tests of the example images, as one test binary: linking is most of what an
//! incremental `cargo test` waits for, so every file is a module here rather than a binary of
//! its own (`cargo test -p layerwright-examples --test it [FILTER]`).
//!
//! - `snapshots`: one insta snapshot of `listing()` per example image.
//! - `load`: `BuiltImage::load` into a Docker engine, sending only the layers it lacks.
//! - `platforms`: multi-platform indexes, and RUN steps of a foreign platform under qemu-user.
//! - `real_clients`: the images checked by oci-image-tool, skopeo, umoci and a Docker engine.
//! - `registry`: push and pull against a local `docker-registry`.
//! - `remote_cache`: the remote cache between machines, through a local registry.
//! - `reapi`: the shared step cache between machines, through a local BuildGrid (REAPI).
//! - `run`: RUN steps for real, on the busybox example base.
//! - `mounts`: RUN mounts (cache, tmpfs) for real, on the busybox example base.
//! - `escape`: a hostile RUN step's attempts to reach the host, each refused as it should be.
//!
//! `support` is their shared harness: finding and running the real clients, a local registry,
//! a local BuildGrid.

mod support;

mod escape;
mod load;
mod mounts;
mod platforms;
mod real_clients;
mod reapi;
mod reapi_execute;
mod registry;
mod remote_cache;
mod run;
mod snapshots;

#[path = "../../../builder/tests/it/support/layout.rs"]
mod layout;

/// Every file of `tests/` is a module of this binary (see `support::layout`).
#[test]
fn every_test_file_is_a_module_of_this_binary() {
    layout::check_every_test_file_is_a_module(env!("CARGO_MANIFEST_DIR"));
}
