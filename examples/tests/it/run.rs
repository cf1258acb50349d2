//! RUN steps for real, on the busybox example base: the layer a command's changes become (as
//! `umoci unpack` and `docker run` see it, and as tar entries), deep chains, what the command
//! can and cannot see, failures, multi-stage builds and caching.
//!
//! They need root, or user namespaces for a rootless run (then `umoci` cannot keep owners and
//! the listing comparison is skipped). Where the sandbox cannot be made (no root and user
//! namespaces refused), a test fails saying so, unless `LAYERWRIGHT_SKIP_PRIVILEGED=1`.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use layerwright::{
    BuildError, Builder, BuilderOptions, BuiltImage, FileOptions, Image, ProgressEvent, Run, RunError, StepError,
};
use layerwright_examples::ExampleEnvironment;

use crate::support;
use crate::support::subprocess::{self, entry_point};
use crate::support::{is_root, sha256};

/// The environment of the examples. As root, the workspace's; otherwise the generated inputs
/// go to a directory of this user (the workspace's may belong to root).
fn environment() -> ExampleEnvironment {
    static WORK_DIR: OnceLock<PathBuf> = OnceLock::new();
    let mut environment = support::environment();
    if !is_root() {
        let work_dir = WORK_DIR.get_or_init(|| {
            let dir =
                std::env::temp_dir().join(format!("layerwright-run-tests-{}", rustix::process::getuid().as_raw()));
            fs::create_dir_all(&dir).unwrap();
            dir
        });
        environment.work_dir = work_dir.clone();
    }
    environment
}

fn busybox() -> Image {
    layerwright_examples::busybox(&environment()).unwrap_or_else(|error| panic!("declaring busybox: {error}"))
}

/// The listing lines of paths below `/prefix/` (and `/prefix` itself).
fn lines_below(listing: &str, prefix: &str) -> Vec<String> {
    listing
        .lines()
        .filter(|line| line.ends_with(&format!(" {prefix}")) || line.contains(&format!(" {prefix}/")))
        .map(str::to_owned)
        .collect()
}

/// The member names of the top layer's tar.
fn top_layer_members(builder: &Builder, built: &BuiltImage) -> Vec<String> {
    let layer = built.layers().last().expect("the image has layers");
    let blob = builder.store().open_blob(&layer.digest).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    archive.entries().unwrap().map(|member| member.unwrap().path().unwrap().to_string_lossy().into_owned()).collect()
}

const CHANGES: &str = "echo new > /srv/overwrite && rm /srv/delete && rm -rf /srv/dir && mkdir /srv/dir \
                       && echo new > /srv/dir/only && echo created > /srv/created && ln -s created /srv/link";

#[test]
fn a_run_that_creates_overwrites_deletes_and_replaces_is_one_layer_that_umoci_and_docker_see_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let image = busybox()
        .write_file("/srv/keep", "keep\n")
        .write_file("/srv/overwrite", "old\n")
        .write_file("/srv/delete", "delete me\n")
        .write_file("/srv/dir/a", "a\n")
        .write_file("/srv/dir/sub/b", "b\n")
        .run(CHANGES);
    let Some(built) = support::build_with_runs(&builder, &image) else { return };

    let listing = built.listing().unwrap();
    let expected = [
        "dir 0755 0:0 - - /srv".to_owned(),
        format!("file 0644 0:0 8 {} /srv/created", sha256("created\n")),
        "dir 0755 0:0 - - /srv/dir".to_owned(),
        format!("file 0644 0:0 4 {} /srv/dir/only", sha256("new\n")),
        format!("file 0644 0:0 5 {} /srv/keep", sha256("keep\n")),
        "symlink 0777 0:0 - -> created /srv/link".to_owned(),
        format!("file 0644 0:0 4 {} /srv/overwrite", sha256("new\n")),
    ];
    assert_eq!(lines_below(&listing, "/srv"), expected, "\n{listing}");
    for runner_path in ["/proc", "/dev", "/etc/hosts", "/etc/resolv.conf"] {
        assert!(!listing.contains(&format!(" {runner_path}\n")), "{runner_path} left a trace:\n{listing}");
    }

    // As Docker writes it: a whiteout for the deleted file, an opaque marker for the replaced
    // directory, the changed and new files, and nothing else.
    let members: BTreeSet<String> = top_layer_members(&builder, &built).into_iter().collect();
    let expected_members: BTreeSet<String> = [
        "srv/",
        "srv/.wh.delete",
        "srv/created",
        "srv/dir/",
        "srv/dir/.wh..wh..opq",
        "srv/dir/only",
        "srv/link",
        "srv/overwrite",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(members, expected_members);

    if support::require_tool("umoci").is_some() {
        let layout = dir.path().join("layout");
        built.write_oci_layout(&layout, "run:latest").unwrap();
        let rootfs = support::umoci_unpack(&layout, "latest", &dir.path().join("bundle"));
        let unpacked = support::tree_of(&rootfs);
        if is_root() {
            assert_eq!(unpacked, listing, "umoci unpacked something other than the image's listing");
        }
        assert!(!rootfs.join("srv/delete").exists());
        let replaced: Vec<String> = fs::read_dir(rootfs.join("srv/dir"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(replaced, ["only"]);
    }

    let Some(docker) = support::docker() else { return };
    let tag = format!("layerwright-test-run:{}", std::process::id());
    let archive = dir.path().join("run.tar");
    built.write_docker_archive(&archive, &tag).unwrap();
    docker.load(&archive);
    let output = docker.run(
        &tag,
        &[
            "/bin/sh",
            "-c",
            "ls -A /srv; ls -A /srv/dir; cat /srv/overwrite /srv/dir/only; test ! -e /srv/delete && echo deleted",
        ],
    );
    docker.remove_image(&tag);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "created\ndir\nkeep\nlink\noverwrite\nonly\nnew\nnew\ndeleted\n"
    );
}

#[test]
fn what_a_run_copies_up_keeps_its_owner_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let owned = FileOptions::mode(0o640).with_owner(1000, 1000);
    let image = busybox()
        .mkdir_with("/srv/data", FileOptions::mode(0o750).with_owner(1000, 1000))
        .write_file_with("/srv/data/config", "a\n", owned)
        .write_file_with("/srv/data/untouched", "u\n", owned)
        .run("echo b >> /srv/data/config && echo new > /srv/data/new");
    let Some(built) = support::build_with_runs(&Builder::new(dir.path().join("cache")).unwrap(), &image) else {
        return;
    };
    let listing = built.listing().unwrap();
    assert_eq!(
        lines_below(&listing, "/srv/data"),
        [
            "dir 0750 1000:1000 - - /srv/data".to_owned(),
            format!("file 0640 1000:1000 4 {} /srv/data/config", sha256("a\nb\n")),
            format!("file 0644 0:0 4 {} /srv/data/new", sha256("new\n")),
            format!("file 0640 1000:1000 2 {} /srv/data/untouched", sha256("u\n")),
        ]
    );
}

#[test]
fn renames_hard_links_and_mode_changes_of_lower_files_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox()
        .write_file("/srv/old-dir/inner/file", "inner\n")
        .write_file("/srv/linked", "linked\n")
        .write_file("/srv/script", "#!/bin/sh\n")
        // A rename of a lower directory (overlayfs refuses it with EXDEV; mv copies), a hard
        // link to a lower file, a mode change, a write into the sticky /tmp.
        .run("mv /srv/old-dir /srv/new-dir && ln /srv/linked /srv/hard && chmod 4755 /srv/script && echo t > /tmp/t");
    let Some(built) = support::build_with_runs(&Builder::new(dir.path().join("cache")).unwrap(), &image) else {
        return;
    };
    let listing = built.listing().unwrap();
    assert_eq!(
        lines_below(&listing, "/srv"),
        [
            "dir 0755 0:0 - - /srv".to_owned(),
            format!("file 0644 0:0 7 {} /srv/hard", sha256("linked\n")),
            format!("hardlink 0644 0:0 7 {} => /srv/hard /srv/linked", sha256("linked\n")),
            "dir 0755 0:0 - - /srv/new-dir".to_owned(),
            "dir 0755 0:0 - - /srv/new-dir/inner".to_owned(),
            format!("file 0644 0:0 6 {} /srv/new-dir/inner/file", sha256("inner\n")),
            format!("file 4755 0:0 10 {} /srv/script", sha256("#!/bin/sh\n")),
        ]
    );
    assert!(listing.contains("dir 1777 0:0 - - /tmp\n"), "{listing}");
}

#[test]
fn a_chain_of_200_run_steps_mounts_runs_and_rebuilds_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut image = busybox();
    for step in 1..=200 {
        image = image.run(format!("echo {step} > /n"));
    }
    let image = image.run("test \"$(cat /n)\" = 200");
    let started = Instant::now();
    let Some(built) = support::build_with_runs(&Builder::new(&cache).unwrap(), &image) else { return };
    let elapsed = started.elapsed();
    eprintln!("201 RUN steps in {elapsed:.1?}");
    assert!(elapsed < Duration::from_secs(90), "201 RUN steps took {elapsed:?}");
    assert!(built.listing().unwrap().contains(&format!("file 0644 0:0 4 {} /n\n", sha256("200\n"))));

    // Unchanged: every step comes from the cache, nothing runs, nothing is written.
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&ran);
    let options = BuilderOptions::default().before_execute(Arc::new(move |_: &str| {
        counter.fetch_add(1, Ordering::Relaxed);
    }));
    let rebuilt = Builder::with_options(&cache, options).unwrap().build(&image).unwrap();
    assert_eq!(ran.load(Ordering::Relaxed), 0);
    assert!(rebuilt.steps().iter().all(|step| step.cached), "{:#?}", rebuilt.steps());
    assert_eq!(rebuilt.manifest_digest(), built.manifest_digest());
    assert_eq!(rebuilt.blob_bytes_written(), 0);
}

/// Builds `image` collecting the output lines of its RUN steps.
fn build_with_output(cache: &Path, image: &Image) -> Option<(BuiltImage, Vec<String>)> {
    let (sink, lines) = layerwright::testing::output_collector();
    let options = BuilderOptions::default().progress(sink);
    let built = support::build_with_runs(&Builder::with_options(cache, options).unwrap(), image)?;
    let lines = lines.lock().unwrap().clone();
    Some((built, lines))
}

#[test]
fn inside_the_command_the_shell_is_pid_1_and_no_host_path_or_network_is_visible() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("host-marker");
    fs::write(&marker, "on the host\n").unwrap();
    let check = format!(
        r#"fail() {{ echo "FAIL: $*"; exit 1; }}
test "$$" = 1 || fail "the shell is pid $$"
case "$(tr '\0' ' ' < /proc/1/cmdline)" in "/bin/sh -c "*) ;; *) fail "pid 1 is $(cat /proc/1/cmdline)";; esac
test ! -e {marker} || fail "the host marker is visible"
test ! -e {cache} || fail "the cache directory is visible"
interfaces="$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
test "$interfaces" = "lo " || fail "network interfaces: $interfaces"
test "$(ls /proc | grep '^[0-9]' | sort -n | tail -n 1)" -lt 50 || fail "processes: $(ls /proc | grep '^[0-9]' | tr '\n' ' ')"
test "$(hostname)" = layerwright || fail "hostname $(hostname)"
test -c /dev/null && echo x > /dev/null && test "$(head -c 3 /dev/zero | wc -c)" = 3 || fail "/dev"
grep -q localhost /etc/hosts || fail "/etc/hosts: $(cat /etc/hosts)"
echo "uid=$(id -u) cwd=$(pwd)"
echo isolated"#,
        marker = marker.display(),
        cache = dir.path().join("cache").display(),
    );
    let image = busybox().run(check);
    let Some((_, lines)) = build_with_output(&dir.path().join("cache"), &image) else { return };
    assert_eq!(lines, ["uid=0 cwd=/", "isolated"]);

    // With the network enabled, the step has a network namespace of its own with slirp4netns's
    // tap0; with the host's, the host's interfaces are there.
    let interfaces = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | grep -vx lo | sort | tr '\\n' ' '";
    let image = busybox().run(Run::shell(interfaces).network(true));
    let Some((_, lines)) = build_with_output(&dir.path().join("cache"), &image) else { return };
    assert_eq!(lines, ["tap0 "]);
    let mut host_interfaces: Vec<String> = fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name != "lo")
        .collect();
    host_interfaces.sort();
    let image = busybox().run(Run::shell(interfaces).host_network());
    let Some((_, lines)) = build_with_output(&dir.path().join("cache"), &image) else { return };
    assert_eq!(lines, [host_interfaces.iter().map(|name| format!("{name} ")).collect::<String>()]);
}

#[test]
fn the_command_runs_with_the_configs_and_the_steps_env_workdir_and_user() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox().env("FROM_CONFIG", "config").workdir("/srv").run(
        Run::shell("echo \"$FROM_CONFIG $FROM_STEP $HOME $(pwd) $(id -u):$(id -g)\"")
            .env("FROM_STEP", "step")
            .workdir("app/dir"),
    );
    let Some((built, lines)) = build_with_output(&dir.path().join("cache"), &image) else { return };
    assert_eq!(lines, ["config step /root /srv/app/dir 0:0"]);
    // The missing working directory was created, as Docker does, and is part of the layer.
    assert!(built.listing().unwrap().contains("dir 0755 0:0 - - /srv/app/dir\n"));

    // An argv runs as given, its program found through PATH; a missing one is a clear error.
    let argv = busybox().run(Run::argv(["echo", "argv", "$HOME"]));
    let Some((_, lines)) = build_with_output(&dir.path().join("cache"), &argv) else { return };
    assert_eq!(lines, ["argv $HOME"]);
    let missing = busybox().run(Run::argv(["no-such-program"]));
    let error = Builder::new(dir.path().join("cache")).unwrap().build(&missing).unwrap_err().to_string();
    assert!(
        error.contains("cannot execute \"no-such-program\" in the image (tried /usr/local/sbin/no-such-program, "),
        "{error}"
    );

    let as_nobody = busybox().run(Run::shell("id -u; id -g; touch /tmp/by-nobody").user("nobody"));
    if is_root() {
        let Some((built, lines)) = build_with_output(&dir.path().join("cache"), &as_nobody) else { return };
        assert_eq!(lines, ["65534", "65534"]);
        assert!(built.listing().unwrap().contains(" 65534:65534 0 "), "{}", built.listing().unwrap());
    } else {
        let error = Builder::new(dir.path().join("cache")).unwrap().build(&as_nobody).unwrap_err().to_string();
        assert!(error.contains("a rootless run maps only root"), "{error}");
    }
}

#[test]
fn a_failing_run_reports_its_output_and_leaves_no_cache_entry_and_no_mount() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let image = busybox().run("for i in $(seq 1 30); do echo line $i; done; exit 3");
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&ran);
    let options = BuilderOptions::default().before_execute(Arc::new(move |label: &str| {
        if label.starts_with("RUN ") {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }));
    let builder = Builder::with_options(&cache, options).unwrap();
    for attempt in 1..=2 {
        let error = match builder.build(&image) {
            Ok(_) => panic!("the failing RUN step succeeded"),
            Err(error) if support::sandbox_unavailable(&error) => {
                support::build_with_runs(&builder, &image); // Fails or skips saying why.
                return;
            }
            Err(error) => error,
        };
        let BuildError::Step { step, source } = &error else { panic!("{error}") };
        assert_eq!(step, "RUN for i in $(seq 1 30); do echo line $i; done; exit 3");
        let StepError::Run(RunError::Failed { command, code, last_lines, log, .. }) = source.as_ref() else {
            panic!("{error}")
        };
        assert_eq!(command, "for i in $(seq 1 30); do echo line $i; done; exit 3");
        assert_eq!(*code, 3);
        let expected: Vec<String> = (11..=30).map(|line| format!("line {line}")).collect();
        assert_eq!(*last_lines, expected);
        let full_log: String = (1..=30).map(|line| format!("line {line}\n")).collect();
        assert_eq!(fs::read_to_string(log).unwrap(), full_log);
        // The log is the builder's user's alone.
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(log).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(log.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        let message = error.to_string();
        assert!(message.contains("exited with code 3; the last 20 lines of its output:\n  | line 11\n"), "{message}");
        assert!(message.ends_with(&format!("  | line 30\nfull log: {}", log.display())), "{message}");
        // Nothing cached: the next build runs the step again.
        assert_eq!(ran.load(Ordering::Relaxed), attempt);
    }
    let mut mountinfo = String::new();
    fs::File::open("/proc/self/mountinfo").unwrap().read_to_string(&mut mountinfo).unwrap();
    let cache_text = cache.display().to_string();
    let ours: Vec<&str> =
        mountinfo.lines().filter(|line| line.contains(&cache_text) || line.contains(" layerwright ")).collect();
    assert!(ours.is_empty(), "mounts left behind:\n{}", ours.join("\n"));
    assert_eq!(fs::read_dir(builder.store().tmp_dir()).unwrap().count(), 0, "the run directory is removed");
}

#[test]
fn copy_from_reads_the_files_a_run_step_made_multi_stage() {
    let dir = tempfile::tempdir().unwrap();
    let stage = busybox().run("mkdir -p /out && echo built > /out/file && echo temporary > /out/tmp && rm /out/tmp");
    let app = busybox()
        .copy_from(&stage, "/out", "/app")
        .run("test \"$(cat /app/file)\" = built && test ! -e /app/tmp && echo /app/file > /app/checked");
    let Some(built) = support::build_with_runs(&Builder::new(dir.path().join("cache")).unwrap(), &app) else { return };
    let listing = built.listing().unwrap();
    assert_eq!(
        lines_below(&listing, "/app"),
        [
            "dir 0755 0:0 - - /app".to_owned(),
            format!("file 0644 0:0 10 {} /app/checked", sha256("/app/file\n")),
            format!("file 0644 0:0 6 {} /app/file", sha256("built\n")),
        ]
    );
}

/// The command lines (NULs as spaces) of the processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else { return found };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|byte| byte.is_ascii_digit()) {
            continue;
        }
        let Ok(bytes) = fs::read(entry.path().join("cmdline")) else { continue };
        let command_line = String::from_utf8_lossy(&bytes).replace('\0', " ");
        if command_line.contains(marker) {
            found.push(command_line);
        }
    }
    found
}

/// Waits up to `timeout` for `condition`.
fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

/// The lines of `/proc/self/mountinfo` that mention `path` or an overlay of ours.
fn our_mounts(path: &Path) -> Vec<String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.display().to_string();
    mountinfo.lines().filter(|line| line.contains(&path) || line.contains(" layerwright ")).map(str::to_owned).collect()
}

#[test]
fn a_panic_while_the_command_runs_kills_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let image = busybox().run("echo started; sleep 987");
    let options = BuilderOptions::default().progress(Arc::new(|event: &ProgressEvent| {
        if let ProgressEvent::Output { line, .. } = event {
            panic!("the progress sink panics on {line:?}");
        }
    }));
    let builder = Builder::with_options(&cache, options).unwrap();
    let started = Instant::now();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.build(&image))) {
        Err(_) => {}
        Ok(Err(error)) if support::sandbox_unavailable(&error) => {
            support::build_with_runs(&builder, &image); // Fails or skips saying why.
            return;
        }
        Ok(other) => panic!("the build did not panic: {:?}", other.map(|built| built.manifest_digest())),
    }
    assert!(started.elapsed() < Duration::from_secs(60), "the panic waited for the command");
    assert!(
        eventually(Duration::from_secs(5), || processes_with("sleep 987").is_empty()),
        "{:?}",
        processes_with("sleep 987")
    );
    assert_eq!(our_mounts(&cache), Vec::<String>::new());
}

#[test]
fn ctrl_c_kills_the_command_and_leaves_no_mount() {
    ctrl_c_kills_the_command_of(None, "sleep 986", false);
}

/// A networked step's slirp4netns dies with the builder too.
#[test]
fn ctrl_c_kills_the_command_and_the_network_helper_of_a_networked_step() {
    ctrl_c_kills_the_command_of(None, "sleep 984", true);
}

/// A command that switched to another user (which clears the parent-death signal) still dies
/// with the builder.
#[test]
fn ctrl_c_kills_the_command_of_a_non_root_user() {
    if !is_root() {
        return; // A rootless run maps only root.
    }
    ctrl_c_kills_the_command_of(Some("nobody"), "sleep 985", false);
}

/// The pids of the slirp4netns processes whose parent is `parent`.
fn network_helpers_of(parent: u32) -> Vec<String> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter(|entry| {
            let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let Some((comm, rest)) = stat.split_once(") ") else { return false };
            comm.ends_with("(slirp4netns") && rest.split(' ').nth(1) == Some(parent.to_string().as_str())
        })
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

fn ctrl_c_kills_the_command_of(user: Option<&str>, command: &str, network: bool) {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut helper = entry_point!(helper_a_build_whose_command_sleeps)
        .command()
        .env("LAYERWRIGHT_RUN_HELPER_CACHE", &cache)
        .env("LAYERWRIGHT_RUN_HELPER_COMMAND", command)
        .env("LAYERWRIGHT_RUN_HELPER_USER", user.unwrap_or(""))
        .env("LAYERWRIGHT_RUN_HELPER_NETWORK", if network { "1" } else { "" })
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let running = eventually(Duration::from_secs(120), || {
        !processes_with(command).is_empty() || helper.try_wait().unwrap().is_some()
    });
    if !running || helper.try_wait().unwrap().is_some() {
        let _ = helper.kill();
        let output = helper.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("RUN steps cannot run here") && support::skip_privileged() {
            eprintln!("skipped: {stderr}");
            return;
        }
        panic!("the helper build never ran its command:\n{stderr}");
    }
    let helpers = network_helpers_of(helper.id());
    assert_eq!(helpers.len(), usize::from(network), "slirp4netns of the networked step: {helpers:?}");
    // What a terminal's Ctrl-C sends; the builder has no handler, so it dies at once, as it
    // does under SIGKILL (the parent-death signal takes the command down either way).
    let signal =
        if std::process::id().is_multiple_of(2) { rustix::process::Signal::INT } else { rustix::process::Signal::KILL };
    rustix::process::kill_process(rustix::process::Pid::from_child(&helper), signal).unwrap();
    let status = helper.wait().unwrap();
    assert!(!status.success());
    assert!(eventually(Duration::from_secs(5), || processes_with(command).is_empty()), "{:?}", processes_with(command));
    // slirp4netns, reparented when the builder died, goes too (exit descriptor, parent-death
    // signal).
    assert!(
        eventually(Duration::from_secs(5), || helpers.iter().all(|pid| !Path::new("/proc").join(pid).exists())),
        "slirp4netns {helpers:?} outlived the builder"
    );
    assert_eq!(our_mounts(&cache), Vec::<String>::new());
    // The run directory the killed build left in the cache's tmp/ goes when the cache is next
    // opened by a builder alone.
    let builder = Builder::new(&cache).unwrap();
    assert_eq!(fs::read_dir(builder.store().tmp_dir()).unwrap().count(), 0);
}

#[test]
fn a_deleted_snapshot_directory_is_unpacked_again_and_the_build_is_right() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let builder = Builder::new(&cache).unwrap();
    let first = busybox().run("echo one > /one");
    let Some(_) = support::build_with_runs(&builder, &first) else { return };
    let snapshots = cache.join("snapshots");
    fs::remove_dir_all(&snapshots).unwrap();
    fs::create_dir(&snapshots).unwrap();
    let built = support::build_with_runs(&builder, &first.run("cat /one /one > /two")).unwrap();
    let listing = built.listing().unwrap();
    assert!(listing.contains(&format!(" 8 {} /two\n", sha256("one\none\n"))), "{listing}");
    assert!(fs::read_dir(&snapshots).unwrap().count() > 0, "the snapshots were unpacked again");
}

/// Builds a RUN step that sleeps into the cache named by `LAYERWRIGHT_RUN_HELPER_CACHE`: the
/// process that `ctrl_c_kills_the_command_and_leaves_no_mount` interrupts.
#[test]
#[ignore = "subprocess entry point of ctrl_c_kills_the_command_and_leaves_no_mount"]
fn helper_a_build_whose_command_sleeps() {
    let cache = subprocess::variable("LAYERWRIGHT_RUN_HELPER_CACHE", "ctrl_c_kills_the_command_and_leaves_no_mount");
    let command =
        subprocess::variable("LAYERWRIGHT_RUN_HELPER_COMMAND", "ctrl_c_kills_the_command_and_leaves_no_mount")
            .into_string()
            .unwrap();
    let user = std::env::var("LAYERWRIGHT_RUN_HELPER_USER").unwrap_or_default();
    let builder = Builder::new(PathBuf::from(cache)).unwrap();
    let run = if user.is_empty() { Run::shell(command) } else { Run::shell(command).user(user) };
    let network = std::env::var("LAYERWRIGHT_RUN_HELPER_NETWORK").is_ok_and(|value| value == "1");
    let run = run.network(network);
    support::build_with_runs(&builder, &busybox().run(run));
}
