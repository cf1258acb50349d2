//! Push and pull against a real `docker-registry` (distribution) on 127.0.0.1, started by each
//! test (`support::registry()`) and killed when it ends, checked with skopeo and umoci.
//!
//! Needs the Debian packages docker-registry, skopeo, umoci and busybox-static, and root for
//! umoci to keep owners; missing any fails the test naming it, unless
//! `LAYERWRIGHT_SKIP_PRIVILEGED=1`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use layerwright::cache::MissReason;
use layerwright::{Builder, BuilderOptions, BuiltImage, Compression, Image, testing};

use crate::support;
use crate::support::{build_example, tools_present};

const TIMEOUT: Duration = Duration::from_secs(300);

fn skopeo(arguments: &[&str]) -> String {
    let tool = support::require_tool("skopeo").expect("callers check the tools first");
    let mut command = Command::new(tool);
    command.arg("--insecure-policy").args(arguments);
    String::from_utf8(support::run_checked(&mut command, TIMEOUT).stdout).expect("skopeo prints UTF-8")
}

/// `skopeo inspect` of an image in the registry, parsed.
fn inspect(reference: &str) -> serde_json::Value {
    let output = skopeo(&["inspect", "--tls-verify=false", &format!("docker://{reference}")]);
    serde_json::from_str(&output).unwrap_or_else(|error| panic!("skopeo inspect printed no JSON ({error}): {output}"))
}

/// Copies an image from the registry into an OCI layout and unpacks it with umoci; returns the
/// listing of the unpacked rootfs.
fn copy_and_unpack(reference: &str, work: &Path) -> String {
    let layout = work.join("layout");
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("oci:{}:copied", layout.display()),
    ]);
    let rootfs = support::umoci_unpack(&layout, "copied", &work.join("bundle"));
    support::tree_of(&rootfs)
}

fn unique_layers(built: &BuiltImage) -> usize {
    let mut digests: Vec<_> = built.layers().iter().map(|layer| &layer.digest).collect();
    digests.sort();
    digests.dedup();
    digests.len()
}

#[test]
fn a_pushed_image_is_what_skopeo_inspects_copies_and_umoci_unpacks_and_a_second_push_uploads_nothing() {
    let Some(registry) = support::registry() else { return };
    if !tools_present(&["skopeo", "umoci"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let built = build_example("multi-stage", &cache, Compression::Gzip);
    let reference = format!("{}/layerwright-test/multi-stage:latest", registry.address());

    let report = built.push(&reference).unwrap_or_else(|error| panic!("{error}\nregistry log:\n{}", registry.log()));
    assert_eq!(report.blobs_uploaded, unique_layers(&built) + 1, "the layers and the config: {report}");
    assert_eq!((report.blobs_skipped, report.manifest_uploaded), (0, true), "{report}");
    assert_eq!(report.manifest_digest, built.manifest_digest());
    assert_eq!(report.bytes_uploaded, built.size() + config_size(&cache, &built));

    let inspected = inspect(&reference);
    assert_eq!(inspected["Digest"], built.manifest_digest());
    assert_eq!(inspected["Layers"].as_array().unwrap().len(), built.layers().len());
    let unpacked = copy_and_unpack(&reference, dir.path());
    if support::is_root() {
        assert_eq!(unpacked, built.listing().unwrap(), "umoci unpacked something else than was pushed");
    }

    let again = built.push(&reference).unwrap();
    assert_eq!((again.blobs_uploaded, again.bytes_uploaded), (0, 0), "a second push uploads no blob: {again}");
    assert_eq!((again.blobs_skipped, again.manifest_uploaded), (unique_layers(&built) + 1, false), "{again}");

    let other_tag = format!("{}/layerwright-test/multi-stage:second", registry.address());
    let tagged = built.push(&other_tag).unwrap();
    assert_eq!((tagged.blobs_uploaded, tagged.manifest_uploaded), (0, true), "{tagged}");
    assert_eq!(inspect(&other_tag)["Digest"], built.manifest_digest());
}

/// The size of the config blob of `built`, which was built into `cache`.
fn config_size(cache: &Path, built: &BuiltImage) -> u64 {
    let store = layerwright::cache::Store::open(cache).unwrap();
    let digest = layerwright::cache::Digest::parse(&built.config_digest()).unwrap();
    std::fs::metadata(store.blob_path(&digest)).unwrap().len()
}

#[test]
fn a_pushed_image_pulls_back_as_a_base_and_the_key_follows_the_tag() {
    let Some(registry) = support::registry() else { return };
    if !tools_present(&["skopeo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let busybox = build_example("busybox", &dir.path().join("push-cache"), Compression::Gzip);
    let files = build_example("files", &dir.path().join("push-cache"), Compression::Gzip);
    let base = format!("{}/layerwright-test/base", registry.address());
    busybox.push(&format!("{base}:1")).unwrap();

    let derived = |reference: &str| Image::pull(reference).write_file("/etc/motd", "pulled\n");
    let cache = dir.path().join("cache");
    let build = |image: &Image| Builder::new(&cache).and_then(|builder| builder.build(image)).unwrap();

    let first = build(&derived(&format!("{base}:1")));
    assert_eq!(
        first.steps().iter().filter(|step| !step.cached).count(),
        2,
        "the pull and the file: {:?}",
        first.steps()
    );
    let added = testing::diff_listing(&first, &busybox);
    assert!(added.starts_with("+ file 0644 0:0 7 sha256:") && added.ends_with(" /etc/motd\n"), "{added}");
    assert_eq!(added.lines().count(), 1, "{added}");

    // Unchanged tag: nothing is pulled or built.
    let second = build(&derived(&format!("{base}:1")));
    assert!(second.steps().iter().all(|step| step.cached), "{:?}", second.steps());
    assert_eq!(second.manifest_digest(), first.manifest_digest());

    // The tag moves to another image: the pull step's key follows the digest.
    files.push(&format!("{base}:1")).unwrap();
    let moved = build(&derived(&format!("{base}:1")));
    let pull_step = &moved.steps()[0];
    assert!(!pull_step.cached, "the moved tag was not noticed: {:?}", moved.steps());
    assert_eq!(pull_step.miss, Some(MissReason::ArchiveChanged));
    assert_eq!(testing::diff_listing(&moved, &files).lines().count(), 1);

    // By digest, no tag involved.
    let pinned = build(&derived(&format!("{base}@{}", busybox.manifest_digest())));
    assert_eq!(pinned.manifest_digest(), first.manifest_digest());

    // A Docker schema 2 manifest (skopeo converts the OCI one).
    let layout = dir.path().join("layout");
    busybox.write_oci_layout(&layout, "busybox:latest").unwrap();
    skopeo(&[
        "copy",
        "--quiet",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        &format!("oci:{}:latest", layout.display()),
        &format!("docker://{base}:v2s2"),
    ]);
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{base}:v2s2")]);
    assert!(raw.contains("application/vnd.docker.distribution.manifest.v2+json"), "{raw}");
    let from_docker = build(&derived(&format!("{base}:v2s2")));
    assert_eq!(testing::diff_listing(&from_docker, &busybox).lines().count(), 1);
    assert_eq!(from_docker.listing().unwrap(), first.listing().unwrap());

    // A multi-platform index: the host's platform is chosen.
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let other_architecture = if architecture == "s390x" { "ppc64le" } else { "s390x" };
    let descriptor = |built: &BuiltImage, architecture: &str| {
        let manifest = inspect_raw_size(&registry, "layerwright-test/base", &built.manifest_digest());
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": built.manifest_digest(),
            "size": manifest,
            "platform": {"os": "linux", "architecture": architecture},
        })
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [descriptor(&files, other_architecture), descriptor(&busybox, architecture)],
    });
    let response = registry
        .request(
            "PUT",
            "/v2/layerwright-test/base/manifests/multi",
            &[("Content-Type", "application/vnd.oci.image.index.v1+json")],
            index.to_string().as_bytes(),
        )
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    let from_index = build(&derived(&format!("{base}:multi")));
    assert_eq!(from_index.listing().unwrap(), first.listing().unwrap(), "the host platform's image was not chosen");
}

/// The size of manifest `digest` in `repository`, from a `HEAD`.
#[test]
fn a_pulled_base_whose_registry_is_down_is_served_from_the_cache_with_a_warning() {
    let Some(mut registry) = support::registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let busybox = build_example("busybox", &dir.path().join("push-cache"), Compression::Gzip);
    let reference = format!("{}/offline/base:1", registry.address());
    busybox.push(&reference).unwrap();
    let derived = Image::pull(&reference).write_file("/etc/motd", "offline\n");
    let cache = dir.path().join("cache");
    let online = Builder::new(&cache).unwrap().build(&derived).unwrap();

    registry.kill();
    let offline = Builder::new(&cache).unwrap().build(&derived).unwrap();
    assert_eq!(offline.manifest_digest(), online.manifest_digest());
    assert!(offline.steps().iter().all(|step| step.cached), "{:?}", offline.steps());
    // A cache that never reached the registry has nothing to fall back on: the error says so.
    let error = Builder::new(dir.path().join("empty")).unwrap().build(&derived).unwrap_err().to_string();
    assert!(error.contains(&registry.address()) && error.contains("no HTTP answer"), "{error}");
}

fn inspect_raw_size(registry: &support::LocalRegistry, repository: &str, digest: &str) -> u64 {
    let response = registry
        .request(
            "HEAD",
            &format!("/v2/{repository}/manifests/{digest}"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            b"",
        )
        .unwrap();
    response
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no Content-Length in {response}"))
}

#[test]
fn zstd_images_are_accepted_by_the_registry_skopeo_and_umoci() {
    let Some(registry) = support::registry() else { return };
    if !tools_present(&["skopeo", "umoci"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let built = build_example("files", &dir.path().join("cache"), Compression::Zstd);
    assert!(built.layers().iter().all(|layer| layer.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"));
    let reference = format!("{}/layerwright-test/files-zstd:latest", registry.address());
    built.push(&reference).unwrap();
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{reference}")]);
    assert!(raw.contains("application/vnd.oci.image.layer.v1.tar+zstd"), "{raw}");
    assert_eq!(inspect(&reference)["Digest"], built.manifest_digest());

    // skopeo copies it as it is (zstd layers) into a layout ...
    let zstd_layout = dir.path().join("zstd-layout");
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("oci:{}:copied", zstd_layout.display()),
    ]);
    assert_eq!(
        support::skopeo_inspect(&format!("oci:{}:copied", zstd_layout.display()))["Digest"],
        built.manifest_digest()
    );
    // ... and decompresses the zstd streams, recompressing them as gzip, for a umoci that
    // predates zstd: what umoci unpacks must be exactly the image.
    let gzip_layout = dir.path().join("gzip-layout");
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-compress-format",
        "gzip",
        &format!("docker://{reference}"),
        &format!("oci:{}:copied", gzip_layout.display()),
    ]);
    let rootfs = support::umoci_unpack(&gzip_layout, "copied", &dir.path().join("bundle"));
    let unpacked = support::tree_of(&rootfs);
    if support::is_root() {
        assert_eq!(unpacked, built.listing().unwrap());
    }
    assert!(unpacked.contains("dir 0750 1000:1000 - - /srv/data\n"), "{unpacked}");

    // umoci itself reads zstd layers from 0.5 on; Debian 12's 0.4.7 refuses their media type.
    // Whichever this machine has, it must not unpack anything else than the image.
    let umoci = support::require_tool("umoci").unwrap();
    let direct = dir.path().join("direct-bundle");
    let mut command = Command::new(umoci);
    command.arg("unpack").arg("--image").arg(format!("{}:copied", zstd_layout.display())).arg(&direct);
    let output = support::run_with_timeout(&mut command, TIMEOUT);
    if output.status.success() {
        assert_eq!(support::tree_of(&direct.join("rootfs")), unpacked, "umoci unpacked the zstd image differently");
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("not correct mediatype: application/vnd.oci.image.layer.v1.tar+zstd"), "{stderr}");
        eprintln!("note: this umoci cannot read zstd layers ({}); checked through a gzip copy", stderr.trim());
    }
}

#[test]
fn registry_errors_name_the_registry_the_repository_and_the_status() {
    let Some(registry) = support::registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");

    let missing = format!("{}/layerwright-test/nothing-here:1", registry.address());
    let error = Builder::new(&cache).unwrap().build(&Image::pull(&missing)).unwrap_err().to_string();
    for expected in
        [&format!("registry {}", registry.address()), "repository layerwright-test/nothing-here", "HTTP 404"]
    {
        assert!(error.contains(expected), "{expected:?} is not in: {error}");
    }

    // A port nothing listens on: no HTTP status, but the registry and repository are named.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let built = Builder::new(&cache).unwrap().build(&Image::scratch().write_file("/a", "a")).unwrap();
    let error = built.push(&format!("127.0.0.1:{closed_port}/team/app:1")).unwrap_err().to_string();
    for expected in [&format!("registry 127.0.0.1:{closed_port}"), "repository team/app", "no HTTP answer"] {
        assert!(error.contains(expected), "{expected:?} is not in: {error}");
    }

    let error = built.push(&format!("{}/team/app@{}", registry.address(), built.manifest_digest())).unwrap_err();
    assert!(error.to_string().contains("needs a tag"), "{error}");
}

/// Pushing a 1 GiB image (256 incompressible 4 MiB files, uncompressed) to the local registry:
/// prints the time and the process's peak RSS during the push. Run it with
/// `cargo test --release -p layerwright-examples --test it -- --ignored --exact --nocapture
/// registry::push_benchmark_one_gibibyte`.
#[test]
#[ignore = "a benchmark: writes and pushes 1 GiB"]
fn push_benchmark_one_gibibyte() {
    let Some(registry) = support::registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let context_root = dir.path().join("context");
    std::fs::create_dir_all(context_root.join("data")).unwrap();
    // xorshift64*: fast, and its output does not compress.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut chunk = vec![0u8; 4 * 1024 * 1024];
    for file in 0..256 {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        std::fs::write(context_root.join(format!("data/{file:03}.bin")), &chunk).unwrap();
    }
    drop(chunk);
    let context = layerwright::Context::dir(&context_root).unwrap();
    let image = Image::scratch().copy(&context, "data", "/data");
    let options = BuilderOptions::default().compression(Compression::None);
    let started = Instant::now();
    let built = Builder::with_options(dir.path().join("cache"), options).unwrap().build(&image).unwrap();
    let build_time = started.elapsed();
    assert!(built.size() > 1 << 30);

    let rss_before = reset_peak_rss();
    let started = Instant::now();
    let report = built.push(&format!("{}/layerwright-bench/big:latest", registry.address())).unwrap();
    let push_time = started.elapsed();
    let peak = peak_rss_kib();
    let again_started = Instant::now();
    let again = built.push(&format!("{}/layerwright-bench/big:latest", registry.address())).unwrap();
    let again_time = again_started.elapsed();
    println!(
        "push benchmark: {} bytes in {} blobs pushed in {push_time:.2?} ({:.0} MiB/s); peak RSS during the push \
         {} MiB (RSS before it {} MiB); the build took {build_time:.2?}; a second push (nothing to upload) took \
         {again_time:.2?}",
        report.bytes_uploaded,
        report.blobs_uploaded,
        report.bytes_uploaded as f64 / (1 << 20) as f64 / push_time.as_secs_f64(),
        peak / 1024,
        rss_before / 1024,
    );
    assert_eq!(again.blobs_uploaded, 0);
    assert!(peak < 100 * 1024, "peak RSS {} KiB is over the 100 MiB goal", peak);
}

/// Resets the kernel's peak-RSS mark of this process to its current RSS (`clear_refs` 5);
/// returns the current RSS in KiB.
fn reset_peak_rss() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak RSS (Linux >= 4.0)");
    status_kib("VmRSS:")
}

fn peak_rss_kib() -> u64 {
    status_kib("VmHWM:")
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|line| line.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).and_then(|value| value.parse().ok()).unwrap()
}

/// A "registry" on 127.0.0.1 that answers `/v2/` and then, for any manifest, streams JSON
/// without end; the bytes it managed to send are counted.
fn endless_manifest_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&sent);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    return;
                }
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|read| read > 2) {
                    line.clear();
                }
                if !request_line.contains("/manifests/") {
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
                    return;
                }
                let header = "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                              Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
                if stream.write_all(header.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![b' '; 64 * 1024];
                // Up to 1 GiB, unless the client hangs up first.
                for _ in 0..16 * 1024 {
                    let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
                    if stream.write_all(&framed).is_err() {
                        return;
                    }
                    counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (address, sent)
}

#[test]
fn a_registry_sending_an_endless_manifest_is_cut_off_at_4_mib() {
    let (address, sent) = endless_manifest_server();
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let started = Instant::now();
    let error = builder.build(&Image::pull(format!("{address}/endless:latest"))).map(drop).unwrap_err().to_string();
    assert!(error.contains("is bigger than 4194304 bytes"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
    // The client stopped reading soon after the cap (the socket buffers hold a few MiB more).
    std::thread::sleep(Duration::from_millis(200));
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(sent < 64 << 20, "the registry sent {sent} bytes");
}
