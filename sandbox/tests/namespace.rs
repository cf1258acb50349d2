//! The real sandbox, without the builder: a lower directory with busybox, an overlay on it, and
//! commands that look at their namespaces and write into the upper directory. Needs root (or
//! `LAYERWRIGHT_SKIP_PRIVILEGED=1` to skip) and a static busybox.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, symlink};
use std::path::{Path, PathBuf};

use rustix::thread::CapabilitySet;

use layerwright_sandbox::{
    NamespaceSandbox, OverlayMount, OverlayOptions, OverlayPaths, ProcessSpec, ResourceLimits, Sandbox, SandboxError,
    SandboxMounts, SandboxNetwork, SandboxPlan, SecretBytes, StepMount, Termination,
};

/// `LAYERWRIGHT_SKIP_PRIVILEGED=1`: tests that need a working sandbox may skip.
fn skip_privileged() -> bool {
    std::env::var("LAYERWRIGHT_SKIP_PRIVILEGED").is_ok_and(|value| value == "1")
}

/// A store root with one lower directory (busybox, mountpoints, `/old`) and an empty run
/// directory, as the builder lays them out.
struct Fixture {
    root: tempfile::TempDir,
}

impl Fixture {
    /// `None` when the test is to be skipped.
    fn new() -> Option<Fixture> {
        let busybox = ["/bin/busybox", "/usr/bin/busybox"].into_iter().map(Path::new).find(|path| path.is_file());
        let Some(busybox) = busybox else {
            assert!(skip_privileged(), "the test needs /bin/busybox: `apt-get install -y busybox-static`");
            return None;
        };
        if !rustix::process::geteuid().is_root() {
            assert!(skip_privileged(), "the test needs root (or LAYERWRIGHT_SKIP_PRIVILEGED=1)");
            return None;
        }
        let root = tempfile::tempdir().unwrap();
        let lower = root.path().join("lower");
        for directory in ["bin", "proc", "dev", "etc"] {
            fs::create_dir_all(lower.join(directory)).unwrap();
        }
        fs::copy(busybox, lower.join("bin/busybox")).unwrap();
        for applet in [
            "sh", "cat", "hostname", "id", "rm", "grep", "mknod", "unshare", "wc", "ls", "cut", "touch", "mount", "nc",
            "head", "tail", "ip", "sleep", "echo", "dd",
        ] {
            symlink("busybox", lower.join("bin").join(applet)).unwrap();
        }
        fs::write(lower.join("etc/hosts"), "").unwrap();
        fs::write(lower.join("etc/resolv.conf"), "").unwrap();
        fs::write(lower.join("old"), "old\n").unwrap();
        // A device node shipped in an image layer, kept in the snapshot with the image's mode.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            lower.join("image-null"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
        let run = root.path().join("run");
        for directory in ["upper", "work", "merged", "lowers"] {
            fs::create_dir_all(run.join(directory)).unwrap();
        }
        symlink(&lower, run.join("lowers/0")).unwrap();
        fs::write(run.join("hosts"), "127.0.0.1\tlocalhost sandbox\n").unwrap();
        fs::write(run.join("resolv.conf"), "").unwrap();
        Some(Fixture { root })
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.path().join(relative)
    }

    /// [`Fixture::plan`] in a new user namespace that maps root to root (what a rootless
    /// builder does for its caller).
    fn rootless_plan(&self, script: &str) -> SandboxPlan {
        let mut plan = self.plan(false, script);
        plan.overlay = self.overlay(&OverlayOptions { userxattr: true, ..OverlayOptions::default() });
        plan.rootless = Some((0, 0));
        plan
    }

    /// The overlay of the fixture's lower directory with its run directory's upper and work.
    fn overlay(&self, options: &OverlayOptions) -> OverlayMount {
        let lowers = [self.path("lower")];
        let paths = OverlayPaths {
            base_dir: self.root.path(),
            lowers: &lowers,
            upper: &self.path("run/upper"),
            work: &self.path("run/work"),
            target: &self.path("run/merged"),
            short_lowers: &self.path("run/lowers"),
        };
        OverlayMount::new(&paths, options).unwrap()
    }

    fn plan(&self, classic: bool, script: &str) -> SandboxPlan {
        SandboxPlan {
            base_dir: self.root.path().to_owned(),
            overlay: self.overlay(&OverlayOptions { prefer_classic: classic, ..OverlayOptions::default() }),
            upper: self.path("run/upper"),
            merged: self.path("run/merged"),
            rootless: None,
            network: SandboxNetwork::None,
            mounts: SandboxMounts {
                proc: true,
                dev: true,
                hosts: Some(self.path("run/hosts")),
                resolv_conf: Some(self.path("run/resolv.conf")),
                step: Vec::new(),
            },
            hostname: "sandbox".to_owned(),
            process: ProcessSpec {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                env: vec!["PATH=/bin".into()],
                workdir: "/work/dir".into(),
                uid: 0,
                gid: 0,
                groups: vec![0],
                exec_candidates: vec!["/bin/sh".into()],
            },
            limits: ResourceLimits { pids: Some(4096), memory: None },
        }
    }
}

fn run(plan: &SandboxPlan) -> (Result<Termination, SandboxError>, String) {
    let mut output = Vec::new();
    let ended = NamespaceSandbox.run(plan, &mut |chunk| output.extend_from_slice(chunk));
    (ended, String::from_utf8(output).unwrap())
}

#[test]
fn a_command_runs_as_pid_1_on_the_overlay_with_the_new_mount_api_and_the_classic_fallback() {
    for classic in [false, true] {
        let Some(fixture) = Fixture::new() else { return };
        let script = "echo pid=$$; hostname; cat /etc/hosts; pwd; [ -f /proc/self/status ] && echo proc; \
                      [ -c /dev/null ] && [ -d /dev/pts ] && echo dev; echo err >&2; echo hi > new; rm /old";
        // As the builder mounts it: `volatile`, on a run directory used once.
        let mut plan = fixture.plan(classic, script);
        plan.overlay =
            fixture.overlay(&OverlayOptions { volatile: true, prefer_classic: classic, ..Default::default() });
        let (ended, output) = run(&plan);
        assert_eq!(ended.unwrap(), Termination::Exited(0), "classic {classic}: {output}");
        assert_eq!(output, "pid=1\nsandbox\n127.0.0.1\tlocalhost sandbox\n/work/dir\nproc\ndev\nerr\n");
        // Every write is in the upper directory; the lower is untouched.
        assert_eq!(fs::read_to_string(fixture.path("run/upper/work/dir/new")).unwrap(), "hi\n");
        let whiteout = fs::symlink_metadata(fixture.path("run/upper/old")).unwrap();
        assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0, "{whiteout:?}");
        assert!(fixture.path("lower/old").is_file());
        // Nothing stays mounted on the host.
        assert_eq!(fs::read_dir(fixture.path("run/merged")).unwrap().count(), 0);
        // A volatile overlay marks its work directory; the kernel refuses to mount it again,
        // which is why every RUN step gets a fresh run directory.
        assert!(fixture.path("run/work/work/incompat/volatile").is_dir());
        let (again, output) = run(&plan);
        assert!(matches!(again, Err(SandboxError::Setup { .. })), "classic {classic}: {again:?} {output}");
    }
}

#[test]
fn exit_codes_pass_through_and_failures_name_the_call() {
    let Some(fixture) = Fixture::new() else { return };
    let (ended, _) = run(&fixture.plan(false, "id -u; exit 3"));
    assert_eq!(ended.unwrap(), Termination::Exited(3));

    let mut plan = fixture.plan(false, "true");
    plan.process.argv[0] = "missing".into();
    plan.process.exec_candidates = vec!["/usr/bin/missing".into(), "/bin/missing".into()];
    match run(&plan).0 {
        Err(SandboxError::Exec { program, tried, source }) => {
            assert_eq!((program.as_str(), tried.as_str()), ("missing", "/usr/bin/missing, /bin/missing"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }

    let mut plan = fixture.plan(false, "true");
    plan.process.workdir = "/bin/busybox/x".into();
    match run(&plan).0 {
        Err(error @ SandboxError::Setup { .. }) => assert_eq!(
            error.to_string(),
            "preparing the sandbox: mkdir(\"/bin/busybox/x\") for the working directory failed: Not a directory \
             (os error 20)"
        ),
        other => panic!("{other:?}"),
    }
}

/// The output of `script` in the sandbox, which must exit 0; each line of `script` that is an
/// attempt prints what refused it.
fn output_of(plan: &SandboxPlan) -> String {
    let (ended, output) = run(plan);
    assert_eq!(ended.unwrap(), Termination::Exited(0), "{output}");
    output
}

/// A plan of `fixture` running `script` as `nobody` (65534:65534).
fn as_nobody(mut plan: SandboxPlan) -> SandboxPlan {
    plan.process.uid = 65534;
    plan.process.gid = 65534;
    plan.process.groups = vec![65534];
    plan.process.workdir = "/".into();
    plan
}

/// Each line is one attempt, whose refusal the command prints (busybox's wording).
const PROC_ATTEMPTS: &str = "echo '|/tmp/x' > /proc/sys/kernel/core_pattern
echo 3 > /proc/sys/vm/drop_caches
touch /proc/acpi/x
echo kcore $(cat /proc/kcore 2>/dev/null | wc -c) keys $(wc -c < /proc/keys) timers $(wc -c < /proc/timer_list)
true";

#[test]
fn proc_tunables_are_read_only_and_kernel_internals_masked_as_root_and_in_a_user_namespace() {
    let Some(fixture) = Fixture::new() else { return };
    for plan in [fixture.plan(false, PROC_ATTEMPTS), fixture.rootless_plan(PROC_ATTEMPTS)] {
        let output = output_of(&plan);
        let rootless = plan.rootless.is_some();
        assert_eq!(
            output,
            "sh: can't create /proc/sys/kernel/core_pattern: Read-only file system\n\
             sh: can't create /proc/sys/vm/drop_caches: Read-only file system\n\
             touch: /proc/acpi/x: Read-only file system\n\
             kcore 0 keys 0 timers 0\n",
            "rootless {rootless}"
        );
    }
}

#[test]
fn the_command_has_its_own_session_and_no_terminal() {
    let Some(fixture) = Fixture::new() else { return };
    // Fields 6-8 of stat: the session (the command's own: pid 1), the terminal (none), the
    // terminal's foreground group (none).
    let script = "cut -d' ' -f6-8 /proc/self/stat; cat < /dev/tty; true";
    for plan in [fixture.plan(false, script), fixture.rootless_plan(script)] {
        assert_eq!(output_of(&plan), "1 0 -1\nsh: can't open /dev/tty: No such device or address\n");
    }
}

#[test]
fn device_nodes_of_the_image_or_the_command_do_not_open() {
    let Some(fixture) = Fixture::new() else { return };
    let script = "cat /image-null; mknod /dev/made c 1 3 && echo x > /dev/made; mknod /made c 1 3 && cat /made
echo x > /dev/null && test \"$(head -c 2 /dev/zero | wc -c)\" = 2 && echo standard devices work; true";
    let output = output_of(&fixture.plan(false, script));
    assert_eq!(
        output,
        "cat: can't open '/image-null': Permission denied\n\
         sh: can't create /dev/made: Permission denied\n\
         cat: can't open '/made': Permission denied\n\
         standard devices work\n"
    );
    // The node made on the overlay is in the upper directory, as an image's layer carries it.
    let made = fs::symlink_metadata(fixture.path("run/upper/made")).unwrap();
    assert!(made.file_type().is_char_device() && made.rdev() == rustix::fs::makedev(1, 3), "{made:?}");
    // In a user namespace the kernel refuses the node itself.
    let Some(fixture) = Fixture::new() else { return };
    let output = output_of(&fixture.rootless_plan(script));
    assert!(
        output.starts_with(
            "cat: can't open '/image-null': Permission denied\nmknod: /dev/made: Operation not permitted\n"
        ),
        "{output}"
    );
}

#[test]
fn capability_sets_are_dockers_for_root_and_empty_for_other_users() {
    let Some(fixture) = Fixture::new() else { return };
    // A builder whose thread holds inheritable and ambient capabilities (a service manager's
    // `AmbientCapabilities=`): none of them reach the command. Capability sets are per thread.
    let mut sets = rustix::thread::capabilities(None).unwrap();
    sets.inheritable = CapabilitySet::SYS_ADMIN | CapabilitySet::NET_ADMIN;
    rustix::thread::set_capabilities(None, sets).unwrap();
    rustix::thread::configure_capability_in_ambient_set(CapabilitySet::NET_ADMIN, true).unwrap();
    let script = "grep ^Cap /proc/self/status";
    let docker = "00000000a80425fb";
    let none = "0000000000000000";
    let expected = |permitted: &str| {
        format!("CapInh:\t{none}\nCapPrm:\t{permitted}\nCapEff:\t{permitted}\nCapBnd:\t{docker}\nCapAmb:\t{none}\n")
    };
    assert_eq!(output_of(&fixture.plan(false, script)), expected(docker));
    assert_eq!(output_of(&fixture.rootless_plan(script)), expected(docker));
    assert_eq!(output_of(&as_nobody(fixture.plan(false, script))), expected(none));
}

/// One RUN's fixed cost in the sandbox: the median of 30 runs of `true` on a one-layer
/// overlay in each configuration (interleaved, so that the machine's load hits them alike),
/// printed (`cargo test -p layerwright-sandbox --test namespace fixed_cost -- --ignored
/// --nocapture`).
#[test]
#[ignore = "a measurement, not a check"]
fn fixed_cost() {
    let Some(fixture) = Fixture::new() else { return };
    let isolated = layerwright_sandbox::slirp4netns().ok().map(|slirp4netns| SandboxNetwork::Isolated { slirp4netns });
    let mut configurations = vec![
        ("no cgroup, no network", ResourceLimits::default(), SandboxNetwork::None),
        ("pids limit, no network", ResourceLimits { pids: Some(4096), memory: None }, SandboxNetwork::None),
        (
            "pids and memory limits, no network",
            ResourceLimits { pids: Some(4096), memory: Some(1 << 30) },
            SandboxNetwork::None,
        ),
    ];
    configurations.push((
        "pids limit, host network",
        ResourceLimits { pids: Some(4096), memory: None },
        SandboxNetwork::Host,
    ));
    if let Some(isolated) = isolated {
        configurations.push((
            "pids limit, isolated network",
            ResourceLimits { pids: Some(4096), memory: None },
            isolated,
        ));
    }
    let mut times = vec![Vec::new(); configurations.len()];
    for _ in 0..30 {
        for (index, (_, limits, network)) in configurations.iter().enumerate() {
            for directory in ["upper", "work"] {
                let path = fixture.path(&format!("run/{directory}"));
                fs::remove_dir_all(&path).unwrap();
                fs::create_dir(&path).unwrap();
            }
            let mut plan = fixture.plan(false, "true");
            plan.limits = *limits;
            plan.network = network.clone();
            let started = std::time::Instant::now();
            assert_eq!(run(&plan).0.unwrap(), Termination::Exited(0));
            times[index].push(started.elapsed());
        }
    }
    for ((name, _, _), mut times) in configurations.iter().zip(times) {
        times.sort();
        println!(
            "{name}: median of 30 sandbox runs of `true`: {:?} (min {:?}, max {:?})",
            times[15], times[0], times[29]
        );
    }
}

/// The isolated network, or `None` (after checking that skipping is allowed) without
/// slirp4netns.
fn isolated_network() -> Option<SandboxNetwork> {
    match layerwright_sandbox::slirp4netns() {
        Ok(slirp4netns) => Some(SandboxNetwork::Isolated { slirp4netns }),
        Err(error) => {
            assert!(skip_privileged(), "{error}");
            None
        }
    }
}

/// The slirp4netns processes that are children of this process, once they had up to 5 s to
/// be reaped (a reaper thread waits for them after the step).
fn forwarders_left() -> usize {
    for _ in 0..500 {
        if forwarders() == 0 {
            return 0;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    forwarders()
}

fn forwarders() -> usize {
    let me = std::process::id().to_string();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|entry| {
            let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid ...
            let Some((comm, rest)) = stat.split_once(") ") else { return false };
            comm.ends_with("(slirp4netns") && rest.split(' ').nth(1) == Some(me.as_str())
        })
        .count()
}

#[test]
fn isolated_networking_has_its_own_interfaces_and_cannot_reach_the_hosts_loopback() {
    let Some(fixture) = Fixture::new() else { return };
    let Some(network) = isolated_network() else { return };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "ip -4 -o addr show | cut -d' ' -f2,7
for address in 127.0.0.1 10.0.2.2; do
  if echo hello | nc -w 2 $address {port}; then echo \"reached $address\"; else echo \"refused $address\"; fi
done"
    );
    for plan in [fixture.plan(false, &script), fixture.rootless_plan(&script)] {
        let mut plan = plan;
        plan.network = network.clone();
        let output = output_of(&plan);
        assert_eq!(
            output,
            "lo 127.0.0.1/8\ntap0 10.0.2.100/24\n\
             nc: can't connect to remote host (127.0.0.1): Connection refused\nrefused 127.0.0.1\n\
             nc: can't connect to remote host (10.0.2.2): Network is unreachable\nrefused 10.0.2.2\n",
            "rootless {:?}",
            plan.rootless
        );
        assert_eq!(listener.accept().map(drop).map_err(|error| error.kind()), Err(std::io::ErrorKind::WouldBlock));
        assert_eq!(forwarders_left(), 0, "slirp4netns is stopped and reaped with the step");
    }
    // The namespace's own loopback is the command's (`Connection refused`: nothing listens
    // there), and slirp4netns's gateway does not lead to the host's (`--disable-host-loopback`).
    // A failing command stops it too.
    let mut plan = fixture.plan(false, "exit 3");
    plan.network = network.clone();
    assert_eq!(run(&plan).0.unwrap(), Termination::Exited(3));
    assert_eq!(forwarders_left(), 0);
    // And a missing program is a clear error before anything runs.
    let mut plan = fixture.plan(false, "true");
    plan.network = SandboxNetwork::Isolated { slirp4netns: "/nonexistent/slirp4netns".into() };
    let error = run(&plan).0.unwrap_err().to_string();
    assert!(
        error.starts_with("cannot give the command its network with /nonexistent/slirp4netns: cannot start it"),
        "{error}"
    );
}

#[test]
fn host_networking_reaches_the_hosts_loopback() {
    let Some(fixture) = Fixture::new() else { return };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
        text
    });
    let mut plan = fixture.plan(false, &format!("echo hello | nc -w 2 127.0.0.1 {port} && echo reached"));
    plan.network = SandboxNetwork::Host;
    assert_eq!(output_of(&plan), "reached\n");
    assert_eq!(accepted.join().unwrap(), "hello\n");
}

#[test]
fn a_memory_hog_hits_the_memory_limit_and_fails_with_a_clear_error() {
    let Some(fixture) = Fixture::new() else { return };
    // dd's buffer is one block: 600 MiB, written to before each copy.
    let mut plan =
        fixture.plan(false, "dd if=/dev/zero of=/dev/null bs=600M count=1 2>/dev/null; echo \"dd: $?\"; exit 1");
    plan.limits.memory = Some(64 << 20);
    let (ended, output) = run(&plan);
    match ended {
        Err(error @ SandboxError::MemoryLimit { limit, .. }) if limit == 64 << 20 => assert_eq!(
            error.to_string(),
            "the command hit its memory limit of 64 MiB (67108864 bytes) (the kernel's OOM killer ended a process of \
             it in its cgroup) and exited with code 1"
        ),
        other => panic!("{other:?}, output {output:?}"),
    }
    assert_eq!(output, "dd: 137\n");
    // Below the limit (in a reused cgroup, whose earlier kills do not count) all is well.
    let mut plan = fixture.plan(false, "dd if=/dev/zero of=/dev/null bs=8M count=4 2>/dev/null && echo fine");
    plan.limits.memory = Some(64 << 20);
    assert_eq!(output_of(&plan), "fine\n");
}

#[test]
fn the_seccomp_filter_refuses_nested_user_namespaces_and_mounts_but_not_a_shell_s_work() {
    let Some(fixture) = Fixture::new() else { return };
    // `unshare -U` needs no capability: only the filter refuses it. The status line says the
    // filter is there; ordinary work (fork, pipes, files) goes on.
    let script = "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status
unshare -U true
unshare -r true
mount -t tmpfs none /tmp
echo piped | cat > /made && cat /made && rm /made
(sleep 0 &) ; wait; echo forked
true";
    for plan in [fixture.plan(false, script), fixture.rootless_plan(script)] {
        let output = output_of(&plan);
        assert_eq!(
            output,
            "NoNewPrivs:\t0\nSeccomp:\t2\n\
             unshare: unshare(0x10000000): Operation not permitted\n\
             unshare: unshare(0x10000000): Operation not permitted\n\
             mount: permission denied (are you root?)\n\
             piped\nforked\n",
            "rootless {:?}",
            plan.rootless
        );
    }
    // A non-root user's command is filtered too.
    let output = output_of(&as_nobody(fixture.plan(false, "grep '^Seccomp:' /proc/self/status")));
    assert_eq!(output, "Seccomp:\t2\n");
}

#[test]
fn a_fork_bomb_hits_the_process_limit_and_fails_with_a_clear_error() {
    let Some(fixture) = Fixture::new() else { return };
    let mut plan = fixture.plan(false, "bomb() { bomb | bomb & }; bomb; sleep 2; exit 1");
    plan.limits.pids = Some(32);
    let started = std::time::Instant::now();
    let (ended, _) = run(&plan);
    match ended {
        Err(error @ SandboxError::ProcessLimit { limit: 32, .. }) => assert_eq!(
            error.to_string(),
            "the command hit its limit of 32 processes (pids.max of its cgroup) and exited with code 1"
        ),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    // A command below the limit is unaffected (in a reused cgroup, whose earlier refusals do
    // not count).
    let mut plan = fixture.plan(false, "for i in 1 2 3 4 5 6 7 8; do sleep 0 & done; wait; echo fine");
    plan.limits.pids = Some(32);
    assert_eq!(output_of(&plan), "fine\n");
}

#[test]
fn step_mounts_bind_a_directory_and_a_tmpfs_whose_writes_never_reach_the_upper() {
    for rootless in [false, true] {
        let Some(fixture) = Fixture::new() else { return };
        for directory in ["lower/cache", "lower/scratch"] {
            fs::create_dir_all(fixture.path(directory)).unwrap();
        }
        let host = fixture.path("mounts");
        fs::create_dir_all(host.join("cache-1")).unwrap();
        fs::write(host.join("cache-1/earlier"), "from an earlier step\n").unwrap();
        // A link an earlier step left in the cache directory is not followed by the mount.
        symlink("/", host.join("cache-1/escape")).unwrap();
        let script = "cat /cache/earlier; echo new > /cache/new; [ -L /cache/escape ] && echo link; \
                      echo scratch > /scratch/x; grep -E ' /(cache|scratch) ' /proc/self/mounts | cut -d' ' -f2-4; \
                      (mknod /cache/null c 1 3 && echo x > /cache/null) 2>/dev/null && echo opened || echo refused";
        let mut plan = if rootless { fixture.rootless_plan(script) } else { fixture.plan(false, script) };
        plan.mounts.step = vec![
            StepMount::Directory { parent: host.clone(), name: "cache-1".into(), target: "/cache".into() },
            StepMount::Tmpfs { target: "/scratch".into(), size: Some(1 << 20) },
        ];
        let output = output_of(&plan);
        let mut lines = output.lines();
        assert_eq!(lines.next(), Some("from an earlier step"), "{output}");
        assert_eq!(lines.next(), Some("link"), "{output}");
        let mounts: Vec<&str> = lines.by_ref().take(2).collect();
        assert!(mounts[0].starts_with("/cache ") && mounts[0].contains("nosuid,nodev"), "{output}");
        assert!(mounts[1].starts_with("/scratch tmpfs ") && mounts[1].contains("nosuid,nodev"), "{output}");
        assert!(mounts[1].contains("size=1024k"), "{output}");
        assert_eq!(lines.next(), Some("refused"), "a device node made in a cache directory does not open");
        assert_eq!(host.join("cache-1/null").exists(), !rootless, "root may make the node, not open it");
        assert_eq!(fs::read_to_string(host.join("cache-1/new")).unwrap(), "new\n");
        // Nothing of either mount is in the upper directory.
        let upper: Vec<String> = fs::read_dir(fixture.path("run/upper"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(upper.iter().all(|name| name != "cache" && name != "scratch"), "{upper:?}");
        let _ = fs::remove_file(host.join("cache-1/null"));
    }
}

#[test]
fn a_step_mount_refuses_a_target_through_a_symlink_and_a_source_that_is_a_symlink() {
    let Some(fixture) = Fixture::new() else { return };
    symlink("/bin", fixture.path("lower/linked")).unwrap();
    let host = fixture.path("mounts");
    fs::create_dir_all(host.join("real")).unwrap();
    symlink(host.join("real"), host.join("link")).unwrap();
    let mut plan = fixture.plan(false, "true");
    plan.mounts.step = vec![StepMount::Tmpfs { target: "/linked".into(), size: None }];
    match run(&plan).0 {
        Err(error @ SandboxError::Setup { .. }) => {
            let text = error.to_string();
            assert!(
                text.contains("openat2(RESOLVE_NO_SYMLINKS, O_DIRECTORY) of the target for the tmpfs on /linked"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    plan.mounts.step = vec![StepMount::Directory { parent: host.clone(), name: "link".into(), target: "/bin".into() }];
    match run(&plan).0 {
        Err(error @ SandboxError::StepMount { .. }) => {
            assert!(error.to_string().contains("O_NOFOLLOW"), "{error}");
            assert!(error.to_string().contains("/bin"), "{error}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_secret_is_a_read_only_file_of_its_owner_on_a_tmpfs_and_never_in_the_upper() {
    for rootless in [false, true] {
        let Some(fixture) = Fixture::new() else { return };
        fs::create_dir_all(fixture.path("lower/run/secrets")).unwrap();
        fs::write(fixture.path("lower/run/secrets/token"), "").unwrap();
        fs::create_dir_all(fixture.path("run/staging")).unwrap();
        let secret = b"s3cr3t-value\n".to_vec();
        let script = "cat /run/secrets/token; ls -ln /run/secrets/token | cut -c1-10; \
                      grep ' /run/secrets/token ' /proc/self/mounts | cut -d' ' -f3,4; \
                      (echo x > /run/secrets/token) 2>/dev/null && echo written || echo read-only";
        let mut plan = if rootless { fixture.rootless_plan(script) } else { fixture.plan(false, script) };
        let (uid, gid) = if rootless { (0, 0) } else { (1000, 1000) };
        plan.mounts.step = vec![StepMount::Secret {
            target: "/run/secrets/token".into(),
            staging: fixture.path("run/staging"),
            bytes: SecretBytes::new(secret.clone()),
            uid,
            gid,
            mode: 0o400,
        }];
        assert_eq!(format!("{:?}", plan.mounts.step).matches("s3cr3t").count(), 0, "Debug never shows the bytes");
        let output = output_of(&plan);
        let mut lines = output.lines();
        assert_eq!(lines.next(), Some("s3cr3t-value"), "{output}");
        assert_eq!(lines.next(), Some("-r--------"), "{output}");
        let mount = lines.next().unwrap();
        assert!(mount.starts_with("tmpfs ro,nosuid,nodev,noexec"), "{output}");
        assert_eq!(lines.next(), Some("read-only"), "{output}");
        // Nothing on the host: no file in the upper, the staging directory empty.
        assert!(!fixture.path("run/upper/run").exists());
        assert_eq!(fs::read_dir(fixture.path("run/staging")).unwrap().count(), 0);
        assert_eq!(fs::read(fixture.path("lower/run/secrets/token")).unwrap(), b"");
    }
}
