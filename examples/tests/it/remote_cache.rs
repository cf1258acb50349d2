//! The remote cache through a real `docker-registry` on 127.0.0.1, with separate cache
//! directories standing for separate machines.
//!
//! - Machine A builds W1 (the benchmark workload: a base, a 2,000-file COPY, three RUN stages,
//!   RUNs and `copy_from`s) and exports; machine B, with an empty cache, builds W1 executing no
//!   step, gets the same digest, and downloads only the final image's blobs.
//! - The registry is SIGKILLed in the middle of B's import: B's build is still correct.
//! - Two machines export into one cache at the same time: a third finds both.
//! - An unreachable, silent or corrupt remote cache costs one warning and never the build.
//!
//! W1 runs RUN steps: those tests need root (or user namespaces), like `run`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use layerwright::{Builder, Image};

use crate::support;

/// A builder on `cache` that counts the steps it executes, with the given remote caches.
fn machine(cache: &Path, cache_from: &[String], cache_to: Option<&str>) -> (Builder, Arc<AtomicUsize>) {
    let (mut options, executed) = support::counting_executions();
    options.cache_from = cache_from.to_vec();
    options.cache_to = cache_to.map(str::to_owned);
    (Builder::with_options(cache, options).unwrap(), executed)
}

#[test]
fn machine_b_builds_w1_from_machine_a_s_export_executing_nothing_and_downloading_only_the_final_image() {
    let Some(registry) = support::registry() else { return };
    let reference = format!("{}/team/w1-cache:main", registry.address());
    let machines = tempfile::tempdir().unwrap();

    let (machine_a, executed_a) = machine(&machines.path().join("a"), &[], Some(&reference));
    let Some(built_a) = support::build_with_runs(&machine_a, &support::w1()) else { return };
    let report_a = built_a.remote_cache().expect("a build with a remote cache reports on it");
    assert!(report_a.warnings.is_empty(), "{:?}", report_a.warnings);
    let export_a = report_a.export.as_ref().expect("A exported");
    let layered_steps = built_a.steps().iter().filter(|step| step.layer.is_some()).count();
    assert!(executed_a.load(Ordering::Relaxed) >= 9, "A built W1 from nothing");
    assert!(export_a.records > layered_steps && export_a.records_new == export_a.records, "{export_a:?}");
    assert!(export_a.blobs_uploaded > 0 && export_a.records_dropped == 0, "{export_a:?}");
    // Every step's record (BuildKit's mode=max): the three stages' layers are exported too,
    // although the final image does not contain them.
    let stage_layers: BTreeSet<String> = built_a
        .steps()
        .iter()
        .filter(|step| step.label.contains("sleep 1"))
        .filter_map(|step| step.layer.clone())
        .collect();
    assert_eq!(stage_layers.len(), 3, "{:#?}", built_a.steps());
    assert!(stage_layers.is_disjoint(&support::final_image_blobs(&built_a)));

    // Exporting again uploads nothing: the registry has every blob and the same manifest.
    let (machine_a_again, _) = machine(&machines.path().join("a"), &[], Some(&reference));
    let again = support::build_with_runs(&machine_a_again, &support::w1()).unwrap();
    let export_again = again.remote_cache().unwrap().export.clone().expect("A exported again");
    assert_eq!((export_again.blobs_uploaded, export_again.manifest_uploaded), (0, false), "{export_again:?}");

    let cache_b = machines.path().join("b");
    let (machine_b, executed_b) = machine(&cache_b, std::slice::from_ref(&reference), None);
    let built_b = support::build_with_runs(&machine_b, &support::w1()).unwrap();
    assert_eq!(built_b.manifest_digest(), built_a.manifest_digest());
    assert_eq!(executed_b.load(Ordering::Relaxed), 0, "B executed steps: {:#?}", built_b.steps());
    let report_b = built_b.remote_cache().unwrap();
    assert!(report_b.consulted && report_b.warnings.is_empty(), "{report_b:?}");
    let layered_steps = built_b.steps().iter().filter(|step| step.layer.is_some()).count();
    assert!(built_b.steps().iter().all(|step| step.cached), "{:#?}", built_b.steps());
    assert!(report_b.steps_served > layered_steps, "{report_b:?}");

    // Only what the final image needs came down: its layers and the base's config (from which
    // the image config is built); B wrote the config and manifest itself. No stage layer.
    let base_config = built_b.config().unwrap();
    let stored = support::stored_blobs(&cache_b);
    let final_blobs = support::final_image_blobs(&built_b);
    let extra: Vec<&String> = stored.difference(&final_blobs).collect();
    assert_eq!(extra.len(), 1, "B downloaded more than the final image and the base config: {extra:?}");
    assert!(stored.is_disjoint(&stage_layers), "B downloaded a stage's layer");
    let distinct_layers: BTreeSet<_> = built_b.layers().iter().map(|layer| &layer.digest).collect();
    assert_eq!(report_b.blobs_downloaded, distinct_layers.len() + 1, "{report_b:?}");
    assert!(base_config["rootfs"].is_object());

    // The image B got is whole: its tree is A's, and it is exportable.
    assert_eq!(built_b.listing().unwrap(), built_a.listing().unwrap());
    built_b.write_oci_layout(machines.path().join("layout-b"), "w1:b").unwrap();

    // The cache shares its layers with the images of its repository: pushing the image next to
    // the cache uploads its config alone.
    let pushed = built_b.push(&format!("{}/team/w1-cache:image", registry.address())).unwrap();
    assert_eq!((pushed.blobs_uploaded, pushed.blobs_skipped), (1, distinct_layers.len()), "{pushed:?}");
    // A real client reads the cache's index and a writer's artifact manifest.
    if support::require_tool("skopeo").is_some() {
        let index = support::skopeo_inspect_raw(&format!("docker://{reference}"));
        let manifests = index["manifests"].as_array().expect("the cache tag is an index");
        assert_eq!(manifests.len(), 1, "{index}");
        assert_eq!(manifests[0]["artifactType"], "application/vnd.layerwright.cache.v1");
        let writer = export_a.reference.rsplit(':').next().unwrap();
        let manifest = support::skopeo_inspect_raw(&format!("docker://{}/team/w1-cache:{writer}", registry.address()));
        assert_eq!(manifest["layers"][0]["mediaType"], "application/vnd.layerwright.cache.records.v1+json");
    }

    // B's next build is a local no-op that asks the registry nothing.
    support::assert_w1_rebuild_is_a_local_no_op(machine(&cache_b, std::slice::from_ref(&reference), None), &built_a);
}

#[test]
fn killing_the_registry_in_the_middle_of_an_import_leaves_a_correct_build() {
    let Some(mut registry) = support::registry() else { return };
    let machines = tempfile::tempdir().unwrap();
    let (machine_a, _) = machine(&machines.path().join("a"), &[], Some(&format!("{}/w1:main", registry.address())));
    let Some(built_a) = support::build_with_runs(&machine_a, &support::w1()) else { return };
    assert!(built_a.remote_cache().unwrap().export.is_some());

    // B reaches the registry through a proxy that kills it after 3 MiB of answers: the record
    // batch has arrived by then, and the layers (the COPY's alone is 8 MiB) have not.
    let proxy = support::KillingProxy::start(&registry, 3 << 20);
    let through_proxy = format!("{}/w1:main", proxy.address());
    let cache_b = machines.path().join("b");
    let (machine_b, executed_b) = machine(&cache_b, std::slice::from_ref(&through_proxy), Some(&through_proxy));
    let built_b = support::build_with_runs(&machine_b, &support::w1()).unwrap();
    assert!(proxy.killed.load(Ordering::Relaxed), "the registry was not killed mid-import");
    support::assert_w1_built_past_a_killed_cache(&built_b, &executed_b, &built_a);
    registry.kill();

    // What B's store holds is consistent: a local rebuild agrees and builds nothing.
    support::assert_w1_rebuild_is_a_local_no_op(machine(&cache_b, &[], None), &built_a);
}

/// A small image of file steps (no RUN: these tests need no root), different per `name`.
fn small_image(name: &str) -> Image {
    Image::scratch()
        .write_file("/etc/shared.conf", "shared\n")
        .write_file(format!("/srv/{name}/data").as_str(), format!("{name}\n").repeat(1000).as_str())
        .symlink(format!("/srv/{name}/current").as_str(), "data")
        .cmd(["/srv/run"])
}

#[test]
fn two_machines_exporting_into_one_cache_at_once_lose_nothing() {
    let Some(registry) = support::registry() else { return };
    let reference = format!("{}/shared-cache:main", registry.address());
    let machines = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let images: Vec<Image> = ["left", "right"].iter().map(|side| small_image(&format!("{side}-{round}"))).collect();
        let digests: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = images
                .iter()
                .zip(["left", "right"])
                .map(|(image, side)| {
                    let cache = machines.path().join(side);
                    let reference = reference.clone();
                    scope.spawn(move || {
                        let (builder, _) = machine(&cache, &[], Some(&reference));
                        let built = builder.build(image).unwrap();
                        let report = built.remote_cache().unwrap();
                        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
                        built.manifest_digest()
                    })
                })
                .collect();
            handles.into_iter().map(|handle| handle.join().unwrap()).collect()
        });

        // A third machine finds every round's images of both writers so far.
        let third = tempfile::tempdir().unwrap();
        let (builder, executed) = machine(third.path(), std::slice::from_ref(&reference), None);
        for earlier in 0..=round {
            for side in ["left", "right"] {
                let built = builder.build(&small_image(&format!("{side}-{earlier}"))).unwrap();
                assert!(built.remote_cache().unwrap().warnings.is_empty());
                if earlier == round {
                    assert!(digests.contains(&built.manifest_digest()));
                }
            }
        }
        assert_eq!(executed.load(Ordering::Relaxed), 0, "round {round}: a writer's records were lost");
    }
    // The index at the cache's tag names both writers' manifests.
    let index = registry
        .request(
            "GET",
            "/v2/shared-cache/manifests/main",
            &[("Accept", "application/vnd.oci.image.index.v1+json")],
            b"",
        )
        .unwrap();
    assert_eq!(index.matches("application/vnd.layerwright.cache.v1").count(), 2, "{index}");
}

#[test]
fn an_unreachable_remote_cache_costs_one_warning_and_not_the_build() {
    // A port that was free a moment ago: nothing answers there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let reference = format!("127.0.0.1:{port}/nowhere:main");
    let cache = tempfile::tempdir().unwrap();
    let (builder, executed) = machine(cache.path(), std::slice::from_ref(&reference), Some(&reference));
    let built = builder.build(&small_image("alone")).unwrap();
    let report = built.remote_cache().unwrap();
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].contains(&reference), "{:?}", report.warnings);
    assert!(executed.load(Ordering::Relaxed) > 0 && report.export.is_none());
}

#[test]
fn a_remote_cache_that_never_answers_is_given_up_on_with_one_warning() {
    // A listener that is never accepted from: connections open (the kernel completes them) and
    // then nothing is ever said, as with a registry stuck behind a dead proxy.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let reference = format!("{}/silent:main", silent.local_addr().unwrap());
    let cache = tempfile::tempdir().unwrap();
    let (builder, executed) = machine(cache.path(), std::slice::from_ref(&reference), Some(&reference));
    let started = std::time::Instant::now();
    let built = builder.build(&small_image("patient")).unwrap();
    let report = built.remote_cache().unwrap();
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(executed.load(Ordering::Relaxed) > 0 && report.export.is_none());
    // The cache's read timeout (20 s) bounds the wait, not the operating system's.
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "{:?}", started.elapsed());
    drop(silent);
}

#[test]
fn a_corrupt_remote_cache_costs_one_warning_and_not_the_build() {
    let Some(registry) = support::registry() else { return };
    let reference = format!("{}/corrupt:main", registry.address());
    let machines = tempfile::tempdir().unwrap();
    let (writer, _) = machine(&machines.path().join("a"), &[], Some(&reference));
    let built_a = writer.build(&small_image("corrupt")).unwrap();
    let tag = &built_a.remote_cache().unwrap().export.as_ref().unwrap().reference;
    let writer_tag = tag.rsplit(':').next().unwrap();

    // Replace the writer's manifest by one whose record batch is not JSON.
    let garbage = b"this is not a record batch";
    let garbage_digest = support::sha256(garbage);
    let upload = registry.request("POST", "/v2/corrupt/blobs/uploads/", &[], b"").unwrap();
    let location = upload.lines().find_map(|line| line.strip_prefix("Location: ")).unwrap().trim().to_owned();
    let path = location.split_once(&registry.address()).map_or(location.as_str(), |(_, path)| path).to_owned();
    let separator = if path.contains('?') { '&' } else { '?' };
    let put = registry
        .request(
            "PUT",
            &format!("{path}{separator}digest={garbage_digest}"),
            &[("Content-Type", "application/octet-stream")],
            garbage,
        )
        .unwrap();
    assert!(put.starts_with("HTTP/1.1 201"), "{put}");
    let empty_digest = support::sha256(b"{}");
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/vnd.layerwright.cache.v1","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{empty_digest}","size":2}},"layers":[{{"mediaType":"application/vnd.layerwright.cache.records.v1+json","digest":"{garbage_digest}","size":{}}}]}}"#,
        garbage.len()
    );
    let put = registry
        .request(
            "PUT",
            &format!("/v2/corrupt/manifests/{writer_tag}"),
            &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
            manifest.as_bytes(),
        )
        .unwrap();
    assert!(put.starts_with("HTTP/1.1 201"), "{put}");

    let (reader, executed) = machine(&machines.path().join("b"), std::slice::from_ref(&reference), None);
    let built_b = reader.build(&small_image("corrupt")).unwrap();
    assert_eq!(built_b.manifest_digest(), built_a.manifest_digest());
    let report = built_b.remote_cache().unwrap();
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].contains("record batch"), "{:?}", report.warnings);
    assert!(executed.load(Ordering::Relaxed) > 0);
}

#[test]
fn a_layer_the_registry_serves_corrupted_is_refused_and_built_locally() {
    let Some(registry) = support::registry() else { return };
    let reference = format!("{}/flipped:main", registry.address());
    let machines = tempfile::tempdir().unwrap();
    let (writer, _) = machine(&machines.path().join("a"), &[], Some(&reference));
    let built_a = writer.build(&small_image("flipped")).unwrap();

    // Flip a byte of the top data layer as the registry stores it: it serves what it has.
    let layer = built_a.layers().iter().max_by_key(|layer| layer.size).unwrap().digest.to_string();
    let path = registry.blob_data_path(&layer);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let cache_b = machines.path().join("b");
    let (reader, executed) = machine(&cache_b, std::slice::from_ref(&reference), None);
    let built_b = reader.build(&small_image("flipped")).unwrap();
    assert_eq!(built_b.manifest_digest(), built_a.manifest_digest());
    let report = built_b.remote_cache().unwrap();
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(executed.load(Ordering::Relaxed) >= 1, "the refused layer's step was built");
    // Whatever B stored is what its name says.
    for digest in support::stored_blobs(&cache_b) {
        let parsed = layerwright::cache::Digest::parse(&digest).unwrap();
        assert!(reader.store().verify_blob(&parsed).unwrap(), "{digest} is corrupt");
    }
}

/// Uploads `bytes` as a blob of `repository`; its digest.
fn put_blob(registry: &support::LocalRegistry, repository: &str, bytes: &[u8]) -> String {
    let digest = support::sha256(bytes);
    let upload = registry.request("POST", &format!("/v2/{repository}/blobs/uploads/"), &[], b"").unwrap();
    let location = upload.lines().find_map(|line| line.strip_prefix("Location: ")).unwrap().trim().to_owned();
    let path = location.split_once(&registry.address()).map_or(location.as_str(), |(_, path)| path).to_owned();
    let separator = if path.contains('?') { '&' } else { '?' };
    let put = registry
        .request(
            "PUT",
            &format!("{path}{separator}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            bytes,
        )
        .unwrap();
    assert!(put.starts_with("HTTP/1.1 201"), "{put}");
    digest
}

/// A cache directory whose exports are written as `writer` (what `LAYERWRIGHT_CACHE_WRITER`
/// would say, without changing this process's environment).
fn cache_of_writer(parent: &Path, writer: &str) -> PathBuf {
    let cache = parent.join(writer);
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join("remote-cache-writer"), writer).unwrap();
    cache
}

#[test]
fn a_record_whose_diff_ids_lie_is_refused_and_its_steps_built_locally() {
    let Some(registry) = support::registry() else { return };
    let reference = format!("{}/lying:main", registry.address());
    let machines = tempfile::tempdir().unwrap();
    let (writer, _) = machine(&cache_of_writer(machines.path(), "liar"), &[], Some(&reference));
    let built_a = writer.build(&small_image("lying")).unwrap();

    // The writer's manifest keeps its blobs, but its record batch now claims other diff ids
    // (what a writer would do to make readers' images name layers they do not hold).
    let response = registry
        .request(
            "GET",
            "/v2/lying/manifests/main--lw-liar",
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            b"",
        )
        .unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1;
    let mut manifest: serde_json::Value = serde_json::from_str(body).unwrap();
    let batch_digest = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    let batch = std::fs::read_to_string(registry.blob_data_path(&batch_digest)).unwrap();
    let mut lying = batch.clone();
    for layer in built_a.layers() {
        lying = lying.replace(&layer.diff_id.to_string(), &support::sha256(b"a layer nobody has"));
    }
    assert_ne!(lying, batch, "the batch names the layers' diff ids");
    let lying_digest = put_blob(&registry, "lying", lying.as_bytes());
    manifest["layers"][0]["digest"] = lying_digest.into();
    manifest["layers"][0]["size"] = lying.len().into();
    let put = registry
        .request(
            "PUT",
            "/v2/lying/manifests/main--lw-liar",
            &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
            manifest.to_string().as_bytes(),
        )
        .unwrap();
    assert!(put.starts_with("HTTP/1.1 201"), "{put}");

    let cache_b = machines.path().join("b");
    let (reader, executed) = machine(&cache_b, std::slice::from_ref(&reference), None);
    let built_b = reader.build(&small_image("lying")).unwrap();
    // Built locally, right: the same image as the honest build.
    assert_eq!(built_b.manifest_digest(), built_a.manifest_digest());
    assert!(executed.load(Ordering::Relaxed) >= 1);
    let report = built_b.remote_cache().unwrap();
    assert!(report.records_rejected >= 1, "{report:?}");
    assert!(
        report.warnings.iter().all(|warning| warning.contains("does not match its layer")),
        "{:?}",
        report.warnings
    );
    // Nothing of the lie became local: a second build is a local hit with the right digest.
    let (again, executed) = machine(&cache_b, &[], None);
    assert_eq!(again.build(&small_image("lying")).unwrap().manifest_digest(), built_a.manifest_digest());
    assert_eq!(executed.load(Ordering::Relaxed), 0);
}

#[test]
fn cache_from_reads_only_the_writers_it_names() {
    let Some(registry) = support::registry() else { return };
    let reference = format!("{}/trust:main", registry.address());
    let machines = tempfile::tempdir().unwrap();
    for writer in ["ci", "pr-fork"] {
        let (builder, _) = machine(&cache_of_writer(machines.path(), writer), &[], Some(&reference));
        builder.build(&small_image(writer)).unwrap();
    }
    // Trusting `ci` alone: its records serve, the fork's are never read.
    let trusted = format!("{reference},writers=ci");
    let (reader, executed) = machine(&machines.path().join("reader"), std::slice::from_ref(&trusted), None);
    let built = reader.build(&small_image("ci")).unwrap();
    assert_eq!(built.remote_cache().unwrap().writers, 1);
    assert_eq!(executed.load(Ordering::Relaxed), 0);
    reader.build(&small_image("pr-fork")).unwrap();
    assert!(executed.load(Ordering::Relaxed) > 0, "an untrusted writer's records were used");
    // By default every writer the cache lists is read.
    let (reader, executed) = machine(&machines.path().join("default"), std::slice::from_ref(&reference), None);
    let built = reader.build(&small_image("pr-fork")).unwrap();
    assert_eq!((built.remote_cache().unwrap().writers, executed.load(Ordering::Relaxed)), (2, 0));
    // Two names, `+`-separated; an unknown option is a warning naming the syntax.
    let both = format!("{reference},writers=ci+pr-fork");
    let (reader, _) = machine(&machines.path().join("both"), std::slice::from_ref(&both), None);
    assert_eq!(reader.build(&small_image("ci")).unwrap().remote_cache().unwrap().writers, 2);
    let wrong = format!("{reference},writer=ci");
    let (reader, _) = machine(&machines.path().join("wrong"), std::slice::from_ref(&wrong), None);
    let warnings = reader.build(&small_image("ci")).unwrap().remote_cache().unwrap().warnings.clone();
    assert!(warnings[0].contains("REF,writers=NAME+NAME"), "{warnings:?}");
}
