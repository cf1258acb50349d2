//! The real sandbox, without the builder: a lower directory with busybox, an overlay on it, and
//! commands that look at their namespaces and write into the upper directory. Needs root (or
//! `LAYERWRIGHT_SKIP_PRIVILEGED=1` to skip) and a static busybox.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, symlink};
use std::path::{Path, PathBuf};

use layerwright_sandbox::{
    NamespaceSandbox, OverlayMount, OverlayPaths, ProcessSpec, Sandbox, SandboxError, SandboxMounts, SandboxPlan,
    Termination,
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
        for applet in ["sh", "cat", "hostname", "id", "rm"] {
            symlink("busybox", lower.join("bin").join(applet)).unwrap();
        }
        fs::write(lower.join("etc/hosts"), "").unwrap();
        fs::write(lower.join("etc/resolv.conf"), "").unwrap();
        fs::write(lower.join("old"), "old\n").unwrap();
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

    fn plan(&self, classic: bool, script: &str) -> SandboxPlan {
        let lowers = [self.path("lower")];
        let paths = OverlayPaths {
            base_dir: self.root.path(),
            lowers: &lowers,
            upper: &self.path("run/upper"),
            work: &self.path("run/work"),
            target: &self.path("run/merged"),
            short_lowers: &self.path("run/lowers"),
        };
        SandboxPlan {
            base_dir: self.root.path().to_owned(),
            overlay: OverlayMount::new(&paths, false, classic).unwrap(),
            upper: self.path("run/upper"),
            merged: self.path("run/merged"),
            rootless: None,
            network: false,
            mounts: SandboxMounts {
                proc: true,
                dev: true,
                hosts: Some(self.path("run/hosts")),
                resolv_conf: Some(self.path("run/resolv.conf")),
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
        let (ended, output) = run(&fixture.plan(classic, script));
        assert_eq!(ended.unwrap(), Termination::Exited(0), "classic {classic}: {output}");
        assert_eq!(output, "pid=1\nsandbox\n127.0.0.1\tlocalhost sandbox\n/work/dir\nproc\ndev\nerr\n");
        // Every write is in the upper directory; the lower is untouched.
        assert_eq!(fs::read_to_string(fixture.path("run/upper/work/dir/new")).unwrap(), "hi\n");
        let whiteout = fs::symlink_metadata(fixture.path("run/upper/old")).unwrap();
        assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0, "{whiteout:?}");
        assert!(fixture.path("lower/old").is_file());
        // Nothing stays mounted on the host.
        assert_eq!(fs::read_dir(fixture.path("run/merged")).unwrap().count(), 0);
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
