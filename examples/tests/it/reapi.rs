//! The shared step cache over REAPI through a real BuildGrid on 127.0.0.1 (CAS on disk), with
//! separate cache directories standing for separate machines.
//!
//! - Machine A builds W1 (a base, a 2,000-file COPY, three RUN stages, RUNs and `copy_from`s)
//!   and uploads what it executed; machine B, with an empty cache, builds W1 executing no step,
//!   gets A's digest, and downloads only the final image's blobs.
//! - BuildGrid is SIGKILLed in the middle of B's downloads: B's build is still correct, with
//!   one warning.
//! - A blob corrupted in BuildGrid's disk CAS is refused by digest, its step built locally.
//! - An unreachable server costs one warning and never the build.
//!
//! W1 runs RUN steps: those tests need root (or user namespaces), like `run`. BuildGrid comes
//! from `.ci/run` (a virtualenv at /opt/layerwright-buildgrid, or `LAYERWRIGHT_BUILDGRID`).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use layerwright::{Builder, Image};

use crate::support;

/// A builder on `cache` with the REAPI cache at `url` (if any) that counts the steps it
/// executes.
fn machine(cache: &Path, url: Option<&str>) -> (Builder, Arc<AtomicUsize>) {
    let (mut options, executed) = support::counting_executions();
    if let Some(url) = url {
        options = options.reapi(url, "");
    }
    (Builder::with_options(cache, options).unwrap(), executed)
}

/// A small image of file steps (no RUN: no root needed), different per `name`. Its data file
/// does not compress: its layer is over 1 MiB, so it travels through ByteStream.
fn small_image(name: &str) -> Image {
    use sha2::Digest as _;
    let data: Vec<u8> =
        (0..48_000u32).flat_map(|block| sha2::Sha256::digest(format!("{name} {block}").as_bytes())).collect();
    Image::scratch()
        .write_file("/etc/shared.conf", "shared\n")
        .write_file(format!("/srv/{name}/data").as_str(), data)
        .symlink(format!("/srv/{name}/current").as_str(), "data")
        .cmd(["/srv/run"])
}

#[test]
fn machine_b_builds_w1_from_machine_a_s_reapi_cache_executing_nothing() {
    let Some(server) = support::buildgrid() else { return };
    let machines = tempfile::tempdir().unwrap();

    let (machine_a, executed_a) = machine(&machines.path().join("a"), Some(&server.url()));
    let Some(built_a) = support::build_with_runs(&machine_a, &support::w1()) else { return };
    let report_a = built_a.remote_cache().expect("a build with a REAPI cache reports on it");
    assert!(report_a.warnings.is_empty(), "{:?}\n{}", report_a.warnings, server.log());
    let upload = report_a.reapi_upload.as_ref().expect("A uploaded");
    let executed = executed_a.load(Ordering::Relaxed);
    assert!(executed >= 9, "A built W1 from nothing");
    // Every step A executed is in the action cache (the base import too, which is recorded but
    // not a hooked execution), the three stages' layers among them.
    assert!(upload.action_results >= executed && upload.records_left_out == 0, "{upload:?}");
    assert!(upload.blobs_uploaded > upload.action_results && upload.bytes_uploaded > 8 << 20, "{upload:?}");
    let stage_layers: BTreeSet<String> = built_a
        .steps()
        .iter()
        .filter(|step| step.label.contains("sleep 1"))
        .filter_map(|step| step.layer.clone())
        .collect();
    assert_eq!(stage_layers.len(), 3, "{:#?}", built_a.steps());

    // A's next build is a local no-op: nothing is asked, nothing uploaded.
    let (machine_a_again, executed_again) = machine(&machines.path().join("a"), Some(&server.url()));
    let again = support::build_with_runs(&machine_a_again, &support::w1()).unwrap();
    assert_eq!(executed_again.load(Ordering::Relaxed), 0);
    let report_again = again.remote_cache().unwrap();
    assert!(!report_again.consulted, "{report_again:?}");
    assert_eq!(report_again.reapi_upload.as_ref().map(|upload| upload.action_results), Some(0));

    let cache_b = machines.path().join("b");
    let (machine_b, executed_b) = machine(&cache_b, Some(&server.url()));
    let built_b = support::build_with_runs(&machine_b, &support::w1()).unwrap();
    assert_eq!(built_b.manifest_digest(), built_a.manifest_digest());
    assert_eq!(executed_b.load(Ordering::Relaxed), 0, "B executed steps: {:#?}", built_b.steps());
    assert!(built_b.steps().iter().all(|step| step.cached), "{:#?}", built_b.steps());
    let report_b = built_b.remote_cache().unwrap();
    assert!(report_b.consulted && report_b.warnings.is_empty(), "{report_b:?}");
    let layered_steps = built_b.steps().iter().filter(|step| step.layer.is_some()).count();
    assert!(report_b.steps_served >= layered_steps, "{report_b:?}");
    assert_eq!(report_b.reapi_upload.as_ref().map(|upload| upload.action_results), Some(0), "B executed nothing");

    // Only what the final image needs came down: its layers and the base's config (from which
    // the image config is built); B wrote the config and manifest itself. No stage layer.
    let stored = support::stored_blobs(&cache_b);
    let final_blobs = support::final_image_blobs(&built_b);
    let extra: Vec<&String> = stored.difference(&final_blobs).collect();
    assert_eq!(extra.len(), 1, "B downloaded more than the final image and the base config: {extra:?}");
    assert!(stored.is_disjoint(&stage_layers), "B downloaded a stage's layer");
    let distinct_layers: BTreeSet<_> = built_b.layers().iter().map(|layer| &layer.digest).collect();
    assert_eq!(report_b.blobs_downloaded, distinct_layers.len() + 1, "{report_b:?}");
    assert_eq!(built_b.listing().unwrap(), built_a.listing().unwrap());

    // B's next build is a local no-op that asks the server nothing.
    support::assert_w1_rebuild_is_a_local_no_op(machine(&cache_b, Some(&server.url())), &built_a);
}

#[test]
fn killing_buildgrid_in_the_middle_of_a_build_leaves_a_correct_build_and_one_warning() {
    let Some(server) = support::buildgrid() else { return };
    let machines = tempfile::tempdir().unwrap();
    let (machine_a, _) = machine(&machines.path().join("a"), Some(&server.url()));
    let Some(built_a) = support::build_with_runs(&machine_a, &support::w1()) else { return };
    assert!(built_a.remote_cache().unwrap().reapi_upload.is_some(), "{:?}", built_a.remote_cache());

    // B reaches BuildGrid through a proxy that kills it after 3 MiB of answers: the action
    // results and records have arrived by then, and the layers (the COPY's alone is 8 MiB)
    // have not all.
    let proxy = support::KillingProxy::in_front_of(server.port(), server.pid(), 3 << 20);
    let through_proxy = format!("http://{}", proxy.address());
    let cache_b = machines.path().join("b");
    let (machine_b, executed_b) = machine(&cache_b, Some(&through_proxy));
    let built_b = support::build_with_runs(&machine_b, &support::w1()).unwrap();
    assert!(proxy.killed.load(Ordering::Relaxed), "BuildGrid was not killed mid-build");
    support::assert_w1_built_past_a_killed_cache(&built_b, &executed_b, &built_a);

    // What B's store holds is consistent: a local rebuild agrees and builds nothing.
    support::assert_w1_rebuild_is_a_local_no_op(machine(&cache_b, None), &built_a);
}

#[test]
fn a_blob_corrupted_in_buildgrid_s_cas_is_refused_and_its_step_built_locally() {
    let Some(server) = support::buildgrid() else { return };
    let machines = tempfile::tempdir().unwrap();
    let (writer, _) = machine(&machines.path().join("a"), Some(&server.url()));
    let built_a = writer.build(&small_image("flipped")).unwrap();
    assert!(built_a.remote_cache().unwrap().warnings.is_empty(), "{:?}", built_a.remote_cache());

    // Flip a byte of the biggest layer (over 1 MiB: it streams through ByteStream) where the
    // server's disk CAS keeps it: it serves what it has.
    let layer = built_a.layers().iter().max_by_key(|layer| layer.size).unwrap();
    assert!(layer.size > 1 << 20, "{layer:?}");
    let path = server.blob_path(&layer.digest.to_string());
    let mut bytes = std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let cache_b = machines.path().join("b");
    let (reader, executed) = machine(&cache_b, Some(&server.url()));
    let built_b = reader.build(&small_image("flipped")).unwrap();
    assert_eq!(built_b.manifest_digest(), built_a.manifest_digest());
    let report = built_b.remote_cache().unwrap();
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].contains(&layer.digest.to_string()), "{:?}", report.warnings);
    assert_eq!(executed.load(Ordering::Relaxed), 1, "the refused layer's step alone was built");
    // Whatever B stored is what its name says.
    for digest in support::stored_blobs(&cache_b) {
        let parsed = layerwright::cache::Digest::parse(&digest).unwrap();
        assert!(reader.store().verify_blob(&parsed).unwrap(), "{digest} is corrupt");
    }
}

#[test]
fn an_unreachable_reapi_server_costs_one_warning_and_not_the_build() {
    // A port that was free a moment ago: nothing answers there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let cache = tempfile::tempdir().unwrap();
    let (builder, executed) = machine(cache.path(), Some(&url));
    let built = builder.build(&small_image("alone")).unwrap();
    let report = built.remote_cache().unwrap();
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].contains(&url), "{:?}", report.warnings);
    assert!(executed.load(Ordering::Relaxed) > 0 && report.reapi_upload.is_none());
}
