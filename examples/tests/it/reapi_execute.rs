//! Remote execution of RUN steps through a real farm on 127.0.0.1 (`support::farm`: PostgreSQL,
//! BuildGrid with its execution and bots services, `layerwright-worker` processes), with
//! separate cache directories standing for separate machines. W1's digest from a local build
//! (no REAPI) is the reference every remote build must give.
//!
//! - One worker runs W1's RUN steps: the local digest; a machine with an empty cache then
//!   builds W1 from the REAPI cache executing nothing.
//! - Three workers run W1's three `sleep 1` stages at once (their execution intervals, as the
//!   workers report them, overlap), with the local digest.
//! - A worker SIGKILLed while its step runs: BuildGrid gives the lease to another worker (or
//!   the builder runs the step itself); the local digest, at most one warning.
//! - BuildGrid SIGKILLed while a step runs: the builder runs the rest locally; the local
//!   digest, one warning.
//! - A worker's layer corrupted on BuildGrid's disk: refused by digest, the step run locally;
//!   the local digest, one warning.
//!
//! These tests need root (RUN steps, PostgreSQL as its own user), PostgreSQL 15, BuildGrid
//! with its database extra, and the `layerwright-worker` binary (`cargo xtask test` builds it).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use layerwright::{Builder, BuiltImage, Image};

use crate::support;

/// How long a test waits for a worker to start a step before it fails.
const LEASE_WAIT: Duration = Duration::from_secs(120);

/// A builder on `cache` with the REAPI server at `url`, executing RUN steps there when
/// `execute`, that counts the steps it executes (locally or remotely).
fn machine(cache: &Path, url: &str, execute: bool) -> (Builder, Arc<AtomicUsize>) {
    let (options, executed) = support::counting_executions();
    let options = options.reapi(url, "").reapi_execute(execute);
    (Builder::with_options(cache, options).unwrap(), executed)
}

/// W1 built locally, without REAPI, once per test binary: the reference.
fn local_w1() -> Option<&'static BuiltImage> {
    static LOCAL: OnceLock<Option<(tempfile::TempDir, BuiltImage)>> = OnceLock::new();
    LOCAL
        .get_or_init(|| {
            let cache = tempfile::tempdir().unwrap();
            let builder = Builder::new(cache.path()).unwrap();
            support::build_with_runs(&builder, &support::w1()).map(|built| (cache, built))
        })
        .as_ref()
        .map(|(_, built)| built)
}

/// The labels of W1's RUN steps.
fn run_labels(built: &BuiltImage) -> Vec<String> {
    built.steps().iter().filter(|step| step.label.starts_with("RUN")).map(|step| step.label.clone()).collect()
}

/// Waits until some worker's log says a lease started; the index of that worker.
fn worker_with_a_lease(farm: &support::LocalFarm) -> usize {
    let deadline = Instant::now() + LEASE_WAIT;
    loop {
        if let Some(index) = farm.workers.iter().position(|worker| worker.log().contains(" started")) {
            return index;
        }
        assert!(Instant::now() < deadline, "no worker started a lease:\n{}", farm.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Builds W1 on `builder` while `disturb` acts on the farm, called once a worker has started
/// a lease (with that worker's index); the build must succeed.
fn build_w1_disturbed(
    builder: &Builder,
    farm: &mut support::LocalFarm,
    disturb: impl FnOnce(&mut support::LocalFarm, usize),
) -> BuiltImage {
    let built = std::thread::scope(|scope| {
        let build = scope.spawn(|| builder.build(&support::w1()));
        let busy = worker_with_a_lease(farm);
        disturb(farm, busy);
        build.join().unwrap()
    });
    built.unwrap_or_else(|error| panic!("{error}\n{}", farm.logs()))
}

#[test]
fn one_worker_runs_w1_s_run_steps_and_a_second_machine_builds_w1_from_the_cache() {
    let Some(local) = local_w1() else { return };
    let Some(farm) = support::farm(1) else { return };
    let machines = tempfile::tempdir().unwrap();
    let url = farm.buildgrid.url();

    let (machine_a, executed_a) = machine(&machines.path().join("a"), &url, true);
    let built_a = machine_a.build(&support::w1()).unwrap_or_else(|error| panic!("{error}\n{}", farm.logs()));
    assert_eq!(built_a.manifest_digest(), local.manifest_digest(), "{}", farm.logs());
    let report = built_a.remote_cache().expect("a build with REAPI reports on it");
    assert!(report.warnings.is_empty(), "{:?}\n{}", report.warnings, farm.logs());
    // Every RUN step ran on the worker; the file steps and the base here.
    let mut executed_remotely: Vec<String> = report.remote_executions.iter().map(|run| run.step.clone()).collect();
    executed_remotely.sort();
    let mut runs = run_labels(&built_a);
    runs.sort();
    assert_eq!(executed_remotely, runs, "{}", farm.logs());
    assert!(report.remote_executions.iter().all(|run| run.worker == "worker-0"), "{report:?}");
    assert!(executed_a.load(Ordering::Relaxed) > runs.len(), "the file steps ran here");
    // The executed steps are in the action cache under their keys, as a local run's would be.
    let upload = report.reapi_upload.as_ref().expect("A uploaded its steps");
    assert!(upload.action_results >= executed_a.load(Ordering::Relaxed), "{upload:?}");
    assert_eq!(built_a.listing().unwrap(), local.listing().unwrap());

    let (machine_b, executed_b) = machine(&machines.path().join("b"), &url, false);
    let built_b = support::build_with_runs(&machine_b, &support::w1()).unwrap();
    assert_eq!(built_b.manifest_digest(), local.manifest_digest());
    let report_b = built_b.remote_cache().unwrap();
    assert_eq!(executed_b.load(Ordering::Relaxed), 0, "B executed steps: {report_b:#?}\n{}", farm.logs());
    assert!(report_b.warnings.is_empty() && report_b.remote_executions.is_empty(), "{report_b:?}");
}

#[test]
fn three_workers_run_w1_s_three_stages_at_once() {
    let Some(local) = local_w1() else { return };
    let Some(farm) = support::farm(3) else { return };
    let cache = tempfile::tempdir().unwrap();
    let (builder, _) = machine(cache.path(), &farm.buildgrid.url(), true);
    let built = builder.build(&support::w1()).unwrap_or_else(|error| panic!("{error}\n{}", farm.logs()));
    assert_eq!(built.manifest_digest(), local.manifest_digest(), "{}", farm.logs());
    let report = built.remote_cache().unwrap();
    assert!(report.warnings.is_empty(), "{:?}\n{}", report.warnings, farm.logs());
    let stages: Vec<_> = report.remote_executions.iter().filter(|run| run.step.contains("sleep 1")).collect();
    assert_eq!(stages.len(), 3, "{report:#?}");
    // Each ran on a worker of its own, and all three were running at one moment: the latest
    // start is before the earliest end (the workers' clocks are this machine's).
    let mut workers: Vec<&str> = stages.iter().map(|run| run.worker.as_str()).collect();
    workers.sort_unstable();
    workers.dedup();
    assert_eq!(workers.len(), 3, "{stages:#?}");
    let latest_start = stages.iter().map(|run| run.execution_started).max().unwrap();
    let earliest_end = stages.iter().map(|run| run.execution_finished).min().unwrap();
    assert!(latest_start < earliest_end, "the stages did not overlap: {stages:#?}\n{}", farm.logs());
}

#[test]
fn a_worker_killed_in_the_middle_of_a_step_costs_at_most_one_warning_and_not_the_digest() {
    let Some(local) = local_w1() else { return };
    let Some(mut farm) = support::farm(2) else { return };
    let cache = tempfile::tempdir().unwrap();
    let (builder, _) = machine(cache.path(), &farm.buildgrid.url(), true);
    let built = build_w1_disturbed(&builder, &mut farm, |farm, busy| farm.workers[busy].kill());
    assert_eq!(built.manifest_digest(), local.manifest_digest(), "{}", farm.logs());
    let report = built.remote_cache().unwrap();
    assert!(report.warnings.len() <= 1, "{:?}", report.warnings);
    assert_eq!(built.listing().unwrap(), local.listing().unwrap());
}

#[test]
fn buildgrid_killed_in_the_middle_of_a_step_leaves_a_correct_build_and_one_warning() {
    let Some(local) = local_w1() else { return };
    let Some(mut farm) = support::farm(1) else { return };
    let cache = tempfile::tempdir().unwrap();
    let (builder, _) = machine(cache.path(), &farm.buildgrid.url(), true);
    let built = build_w1_disturbed(&builder, &mut farm, |farm, _| farm.buildgrid.kill());
    assert_eq!(built.manifest_digest(), local.manifest_digest());
    let report = built.remote_cache().unwrap();
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.reapi_upload.is_none(), "nothing is uploaded to a dead server");
    assert_eq!(built.listing().unwrap(), local.listing().unwrap());
}

#[test]
fn a_worker_s_layer_corrupted_in_buildgrid_s_cas_is_refused_and_its_step_run_locally() {
    let Some(local) = local_w1() else { return };
    let Some(farm) = support::farm(1) else { return };
    let machines = tempfile::tempdir().unwrap();
    let url = farm.buildgrid.url();
    // A builds W1's first stage on the worker, then a step that fails: its build fails, so it
    // uploads nothing under the step keys, and BuildGrid keeps the stage's execution result
    // (its own cache of the execution action) and layer.
    let stage_label = "RUN sleep 1 && echo stage 0 > /stage-0";
    let base = Image::from_archive(support::w1_workdir().join("base.tar"));
    let stage = base.run("sleep 1 && echo stage 0 > /stage-0");
    let (machine_a, _) = machine(&machines.path().join("a"), &url, true);
    let failed = machine_a.build(&stage.run("exit 3"));
    assert!(failed.is_err(), "the last step fails");

    // The stage's layer (the local build's: the worker wrote the same bytes) is flipped where
    // BuildGrid keeps it.
    let layer = local
        .steps()
        .iter()
        .find(|step| step.label == stage_label)
        .and_then(|step| step.layer.clone())
        .unwrap_or_else(|| panic!("{:#?}", local.steps()));
    let path = farm.buildgrid.blob_path(&layer);
    let mut bytes = std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}\n{}", path.display(), farm.logs()));
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    // B's lookup misses (A uploaded nothing); its Execute of the stage is answered from
    // BuildGrid's execution cache with the flipped layer, which B refuses.
    let cache_b = machines.path().join("b");
    let (machine_b, _) = machine(&cache_b, &url, true);
    let built = machine_b.build(&support::w1()).unwrap_or_else(|error| panic!("{error}\n{}", farm.logs()));
    assert_eq!(built.manifest_digest(), local.manifest_digest());
    let report = built.remote_cache().unwrap();
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].contains(&layer), "{:?}", report.warnings);
    assert!(!report.remote_executions.iter().any(|run| run.step == stage_label), "{report:#?}");
    for digest in support::stored_blobs(&cache_b) {
        let parsed = layerwright::cache::Digest::parse(&digest).unwrap();
        assert!(machine_b.store().verify_blob(&parsed).unwrap(), "{digest} is corrupt");
    }
}

#[test]
fn a_worker_asked_to_stop_in_the_middle_of_a_step_finishes_and_reports_it_first() {
    let Some(local) = local_w1() else { return };
    let Some(mut farm) = support::farm(2) else { return };
    let cache = tempfile::tempdir().unwrap();
    let (builder, _) = machine(cache.path(), &farm.buildgrid.url(), true);
    let (mut stopped, mut status) = (0, None);
    let built = build_w1_disturbed(&builder, &mut farm, |farm, busy| {
        farm.workers[busy].terminate();
        (stopped, status) = (busy, farm.workers[busy].wait_for_exit(LEASE_WAIT));
    });
    let log = farm.workers[stopped].log();
    assert!(status.is_some_and(|status| status.success()), "{status:?}\n{}", farm.logs());
    // The lease it had when asked was finished and reported, and it took no other.
    assert_eq!(log.matches(" started").count(), 1, "{log}");
    assert_eq!(log.matches(" finished: ").count(), 1, "{log}");
    assert!(log.contains("stopping: finishing the running lease first") && log.contains("stopped"), "{log}");
    assert_eq!(built.manifest_digest(), local.manifest_digest());
    // Its step's result reached the builder, and the other worker ran the rest: no warning.
    let report = built.remote_cache().unwrap();
    assert!(report.warnings.is_empty(), "{:?}\n{}", report.warnings, farm.logs());
    let worker = &farm.workers[stopped].name;
    assert_eq!(report.remote_executions.iter().filter(|run| &run.worker == worker).count(), 1, "{report:#?}");
    assert_eq!(report.remote_executions.len(), run_labels(&built).len(), "{report:#?}");
}

#[test]
fn remote_execution_without_a_reapi_endpoint_fails_at_the_start_of_the_build() {
    let cache = tempfile::tempdir().unwrap();
    let options = layerwright::BuilderOptions::default().reapi_execute(true);
    let builder = Builder::with_options(cache.path(), options).unwrap();
    let error = builder.build(&Image::scratch().write_file("/a", "a\n")).unwrap_err().to_string();
    assert!(error.contains("needs a REAPI endpoint") && error.contains("--reapi"), "{error}");
    assert!(support::stored_blobs(cache.path()).is_empty(), "nothing was built");
}
