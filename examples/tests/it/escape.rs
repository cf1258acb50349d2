//! A hostile base image's RUN step trying to reach the host: each attempt is one line of a
//! shell script on the busybox example base, and the test asserts the specific refusal the
//! sandbox gives it (busybox's wording of the errno), as root and, where the kernel allows one,
//! in a user namespace (what a rootless builder runs in).
//!
//! They need root (CAP_SYS_ADMIN for the namespaces and mounts): without it they fail saying
//! so, unless `LAYERWRIGHT_SKIP_PRIVILEGED=1`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

use layerwright::{Builder, BuilderOptions, Image, Run};
use layerwright_examples::ExampleEnvironment;

use crate::support;
use crate::support::is_root;

fn busybox() -> Image {
    let environment: ExampleEnvironment = support::environment();
    layerwright_examples::busybox(&environment).unwrap_or_else(|error| panic!("declaring busybox: {error}"))
}

/// Fails the test naming the capability it needs, unless `LAYERWRIGHT_SKIP_PRIVILEGED=1`.
fn needs_root() -> bool {
    if is_root() {
        return true;
    }
    assert!(
        support::skip_privileged(),
        "the escape-attempt suite needs root (CAP_SYS_ADMIN, to make the sandbox's namespaces and mounts, and \
         CAP_CHOWN, to play another user); set LAYERWRIGHT_SKIP_PRIVILEGED=1 to skip it"
    );
    false
}

/// The output lines of the RUN step `script` (which must succeed) built into `cache`.
fn attempt(cache: &Path, script: &str) -> Vec<String> {
    let (sink, lines) = layerwright::testing::output_collector();
    let options = BuilderOptions::default().progress(sink);
    let builder = Builder::with_options(cache, options).unwrap();
    support::build_with_runs(&builder, &busybox().run(Run::shell(format!("{script}\ntrue"))))
        .expect("needs_root() was checked");
    lines.lock().unwrap().clone()
}

#[test]
fn a_step_cannot_set_the_hosts_core_pattern_or_other_kernel_tunables() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let before = fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    let lines = attempt(
        &dir.path().join("cache"),
        "echo '|/proc/%P/root/pwn' > /proc/sys/kernel/core_pattern
echo 1 > /proc/sys/kernel/panic
echo 3 > /proc/sys/vm/drop_caches
echo kcore $(cat /proc/kcore 2>/dev/null | wc -c) keys $(wc -c < /proc/keys)",
    );
    assert_eq!(
        lines,
        [
            "/bin/sh: can't create /proc/sys/kernel/core_pattern: Read-only file system",
            "/bin/sh: can't create /proc/sys/kernel/panic: Read-only file system",
            "/bin/sh: can't create /proc/sys/vm/drop_caches: Read-only file system",
            "kcore 0 keys 0",
        ]
    );
    assert_eq!(fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap(), before);
}

#[test]
fn a_step_has_no_controlling_terminal() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lines = attempt(&dir.path().join("cache"), "cat < /dev/tty\ncut -d' ' -f6-8 /proc/self/stat");
    assert_eq!(lines, ["/bin/sh: can't open /dev/tty: No such device or address", "1 0 -1"]);
}

#[test]
fn device_nodes_a_step_makes_do_not_open_but_reach_the_layer() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let lines = attempt(
        &cache,
        "mknod /dev/mem-again c 1 1 && head -c 1 /dev/mem-again
mknod /kmsg c 1 11 && echo x > /kmsg
test -c /kmsg && echo the node exists",
    );
    assert_eq!(
        lines,
        [
            "head: /dev/mem-again: Permission denied",
            "/bin/sh: can't create /kmsg: Permission denied",
            "the node exists"
        ]
    );
    // The image keeps the node (a layer is faithful): a later step sees it, and cannot open it.
    let builder = Builder::new(&cache).unwrap();
    let image = busybox().run("mknod /kmsg c 1 11").run("test -c /kmsg && ! cat /kmsg");
    let built = support::build_with_runs(&builder, &image).unwrap();
    assert!(built.listing().unwrap().contains("/kmsg"), "{}", built.listing().unwrap());
}

#[test]
fn another_user_cannot_read_the_cache_directory() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The temp dir is root's 0700: let the other user reach the cache directory's parent.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let cache = dir.path().join("cache");
    let lines = attempt(&cache, "echo secret > /secret");
    assert!(lines.is_empty(), "{lines:?}");
    assert_eq!(fs::metadata(&cache).unwrap().permissions().mode() & 0o777, 0o700);
    for what in [cache.clone(), cache.join("logs"), cache.join("snapshots")] {
        let output = std::process::Command::new("ls").arg(&what).uid(65534).gid(65534).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains("Permission denied"), "{what:?}: {stderr}");
    }
    // A cache directory that another (non-root) user owns is refused, naming the owner.
    let theirs = dir.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let error = Builder::new(&theirs).map(drop).unwrap_err().to_string();
    assert!(error.contains("belongs to uid 65534, not to this process's uid 0"), "{error}");
}

#[test]
fn a_step_cannot_make_a_nested_user_namespace_or_mount() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A nested user namespace would give the step a full capability set inside it; the filter
    // (Docker's default profile) refuses it, and what CAP_SYS_ADMIN would allow.
    let lines = attempt(
        &dir.path().join("cache"),
        "unshare -U -r id
unshare -m true
mount -t proc proc /mnt
grep -E '^(Seccomp|CapEff):' /proc/self/status",
    );
    assert_eq!(
        lines,
        [
            "unshare: unshare(0x10000000): Operation not permitted",
            "unshare: unshare(0x20000): Operation not permitted",
            "mount: permission denied (are you root?)",
            "CapEff:\t00000000a80425fb",
            "Seccomp:\t2",
        ]
    );
}

#[test]
fn a_networked_step_cannot_reach_the_hosts_loopback_and_a_host_network_step_can() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    // Isolated (`network(true)`): the namespace's own loopback has nothing listening, and
    // slirp4netns's gateway does not lead to the host's loopback.
    let (sink, lines) = layerwright::testing::output_collector();
    let options = BuilderOptions::default().progress(sink);
    let builder = Builder::with_options(dir.path().join("cache"), options).unwrap();
    let script = format!(
        "cat /etc/resolv.conf
for address in 127.0.0.1 10.0.2.2; do
  if echo hello | nc -w 2 $address {port}; then echo \"reached $address\"; else echo \"refused $address\"; fi
done"
    );
    support::build_with_runs(&builder, &busybox().run(Run::shell(script).network(true))).unwrap();
    assert_eq!(
        *lines.lock().unwrap(),
        [
            "nameserver 10.0.2.3",
            "nc: can't connect to remote host (127.0.0.1): Connection refused",
            "refused 127.0.0.1",
            "nc: can't connect to remote host (10.0.2.2): Network is unreachable",
            "refused 10.0.2.2",
        ]
    );
    assert_eq!(listener.accept().map(drop).map_err(|error| error.kind()), Err(std::io::ErrorKind::WouldBlock));

    // `host_network()`, the explicit opt-in, reaches it.
    listener.set_nonblocking(false).unwrap();
    let accepted = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
        text
    });
    lines.lock().unwrap().clear();
    let script = format!("echo hello | nc -w 2 127.0.0.1 {port} && echo reached");
    support::build_with_runs(&builder, &busybox().run(Run::shell(script).host_network())).unwrap();
    assert_eq!(*lines.lock().unwrap(), ["reached"]);
    assert_eq!(accepted.join().unwrap(), "hello\n");
}

#[test]
fn a_memory_hog_fails_its_step_naming_the_memory_limit() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // dd's one block of 600 MiB is more than the step's 64 MiB.
    let hog = "dd if=/dev/zero of=/dev/null bs=600M count=1";
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let error = builder.build(&busybox().run(Run::shell(hog).memory_limit(64 << 20))).map(drop).unwrap_err();
    let text = error.to_string();
    assert!(text.contains(&format!("RUN {hog}")), "{text}");
    assert!(
        text.contains("the command hit its memory limit of 64 MiB (67108864 bytes) (the kernel's OOM killer ended"),
        "{text}"
    );
    // The builder's limit applies to every step; the step's own wins over it.
    let options = BuilderOptions::default().memory_limit(64 << 20);
    let builder = Builder::with_options(dir.path().join("cache"), options).unwrap();
    let error = builder.build(&busybox().run(hog)).map(drop).unwrap_err().to_string();
    assert!(error.contains("memory limit of 64 MiB"), "{error}");
    let roomy = busybox().run(Run::shell("dd if=/dev/zero of=/dev/null bs=100M count=1").memory_limit(1 << 30));
    support::build_with_runs(&builder, &roomy).unwrap();
}

#[test]
fn a_fork_bomb_fails_its_step_naming_the_process_limit() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let options = BuilderOptions::default().pids_limit(64);
    let builder = Builder::with_options(dir.path().join("cache"), options).unwrap();
    let started = std::time::Instant::now();
    let error = builder
        .build(&busybox().run("bomb() { bomb | bomb & }; bomb; sleep 2; exit 1"))
        .map(drop)
        .unwrap_err()
        .to_string();
    assert!(error.contains("the command hit its limit of 64 processes (pids.max of its cgroup)"), "{error}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}
