//! The runner's decisions with a fake sandbox (no root, no namespaces): what the plan holds,
//! how the upper directory becomes the layer, and how a failed command is reported.

use std::sync::Mutex;

use layerwright_cache::ActionRecord;
use serde_json::json;

use super::*;
use crate::execution::IndexCache;
use crate::layer::IndexEntry;
use crate::layer::{Compression, Content, EntryKind, LayerEntry, LayerOptions};
use crate::progress::ProgressSink;

/// What a fake sandbox does with the plan and the output callback.
type Script = Box<dyn Fn(&SandboxPlan, &mut dyn FnMut(&[u8])) -> Termination + Sync>;

/// A sandbox that records the plan and plays a script against the upper directory.
struct FakeSandbox {
    plans: Mutex<Vec<SandboxPlan>>,
    script: Script,
}

impl Sandbox for FakeSandbox {
    fn run(&self, plan: &SandboxPlan, output: &mut dyn FnMut(&[u8])) -> Result<Termination, SandboxError> {
        self.plans.lock().unwrap().push(plan.clone());
        Ok((self.script)(plan, output))
    }
}

fn fake(script: impl Fn(&SandboxPlan, &mut dyn FnMut(&[u8])) -> Termination + Sync + 'static) -> FakeSandbox {
    FakeSandbox { plans: Mutex::new(Vec::new()), script: Box::new(script) }
}

fn file(path: &str, content: &str) -> LayerEntry {
    let bytes: Arc<[u8]> = Arc::from(content.as_bytes());
    LayerEntry {
        path: path.to_owned(),
        kind: EntryKind::File { size: bytes.len() as u64, content: Content::Inline(bytes) },
        mode: 0o644,
        uid: 0,
        gid: 0,
        xattrs: Vec::new(),
    }
}

fn directory(path: &str, mode: u32, uid: u32) -> LayerEntry {
    LayerEntry { path: path.to_owned(), kind: EntryKind::Directory, mode, uid, gid: uid, xattrs: Vec::new() }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    indexes: IndexCache,
    parent: Arc<NodeState>,
}

impl Fixture {
    /// A parent image of one layer: `/etc` (0750, 0:0) with passwd and group, `/srv/old`.
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("cache")).unwrap();
        let entries = vec![
            directory("etc", 0o750, 0),
            file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"),
            file("etc/group", "root:x:0:\napp:x:1000:\n"),
            file("srv/old", "old\n"),
        ];
        let written = crate::layer::write_layer(&store, entries, &layer_options()).unwrap();
        let config = json!({ "config": { "Env": ["PATH=/bin"], "User": "app", "WorkingDir": "/srv" } });
        let parent = Arc::new(NodeState::new(vec![written.record], config, None));
        Fixture { _dir: dir, store, indexes: IndexCache::default(), parent }
    }

    fn execution(&self) -> Execution<'_> {
        Execution {
            store: &self.store,
            layer_options: layer_options(),
            indexes: &self.indexes,
            snapshot_for_run: false,
        }
    }

    fn run(&self, run: &Run, sandbox: &FakeSandbox, progress: Option<&ProgressSink>) -> Result<NewLayer, RunError> {
        let key = StepKey::builder().str(&format!("{run:?}")).finish();
        let label = format!("RUN {}", command_text(run));
        let progress = Progress::new(progress.cloned());
        let secrets = Secrets::new();
        let request = RunRequest {
            key: &key,
            label: &label,
            run,
            parent: &self.parent,
            progress: &progress,
            given: Given { secrets: &secrets, ssh: &SshAgents::new() },
            bind_images: &[],
            bind_contexts: &[],
            defaults: Limits { pids: None, memory: Some(1 << 30) },
        };
        execute_run_with(&self.execution(), &request, sandbox, Identity::of_process())
    }

    fn key_of(run: &Run) -> StepKey {
        StepKey::builder().str(&format!("{run:?}")).finish()
    }

    fn tmp_is_empty(&self) -> bool {
        fs::read_dir(self.store.tmp_dir()).unwrap().next().is_none()
    }
}

fn error_of(result: Result<NewLayer, RunError>) -> RunError {
    match result {
        Ok(written) => panic!("expected an error, the step wrote {:?}", written.record),
        Err(error) => error,
    }
}

fn layer_options() -> LayerOptions {
    LayerOptions { compression: Compression::Gzip, mtime: 0 }
}

#[test]
fn the_upper_directory_becomes_the_layer_and_the_runners_mountpoints_leave_no_trace() {
    let fixture = Fixture::new();
    let sandbox = fake(|plan, output| {
        let upper = &plan.upper;
        // What overlayfs would leave for `echo new > /srv/new && rm /srv/old`.
        fs::create_dir_all(upper.join("srv")).unwrap();
        fs::write(upper.join("srv/new"), "new\n").unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            upper.join("srv/old"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .unwrap();
        output(b"done\n");
        Termination::Exited(0)
    });
    let run = Run::shell("echo new > /srv/new && rm /srv/old");
    let written = fixture.run(&run, &sandbox, None).unwrap();

    let plan = sandbox.plans.lock().unwrap().pop().unwrap();
    // The image has no /proc, /dev, /etc/hosts or /etc/resolv.conf: all four are made, and
    // bound or mounted over.
    assert!(plan.mounts.proc && plan.mounts.dev);
    assert!(plan.mounts.hosts.is_some() && plan.mounts.resolv_conf.is_some());
    assert!(plan.network == SandboxNetwork::None && plan.rootless == Identity::of_process().rootless);
    // The builder's memory limit (the fixture's), layerwright's process limit.
    assert_eq!(plan.limits, ResourceLimits { pids: Some(PIDS_LIMIT), memory: Some(1 << 30) });
    // The process: the config's user resolved through the image's passwd, PATH, workdir.
    assert_eq!(plan.process.argv, ["/bin/sh", "-c", "echo new > /srv/new && rm /srv/old"]);
    assert_eq!((plan.process.uid, plan.process.gid), (1000, 1000));
    assert_eq!(plan.process.env, ["PATH=/bin", "HOME=/home/app"]);
    assert_eq!(plan.process.workdir, "/srv");
    assert!(plan.overlay.summary().contains("lowerdir+=snapshots/"), "{}", plan.overlay.summary());

    let index = LayerIndex::load(&fixture.store, &written.record.diff_id).unwrap().unwrap();
    // In tar order: `srv/.wh.old` sorts before `srv/new`.
    let paths: Vec<(&str, &IndexKind)> = index.entries.iter().map(|entry| (entry.path.as_str(), &entry.kind)).collect();
    assert_eq!(paths.len(), 3, "{paths:?}");
    assert_eq!(paths[0], ("srv", &IndexKind::Directory));
    assert_eq!(paths[1], ("srv/old", &IndexKind::Whiteout));
    assert_eq!(paths[2].0, "srv/new");
    let record = fixture.store.read_action(&Fixture::key_of(&run)).unwrap();
    assert_eq!(record, Some(ActionRecord { layers: vec![written.record.clone()], config: None }));
    assert!(fixture.tmp_is_empty(), "the run directory is removed");
    let log = fixture.store.root().join("logs").join(format!("{}.log", Fixture::key_of(&run).to_hex()));
    assert_eq!(fs::read_to_string(log).unwrap(), "done\n");
}

#[test]
fn a_failed_command_shows_its_exit_code_command_last_20_lines_and_log_and_commits_nothing() {
    let fixture = Fixture::new();
    let sandbox = fake(|plan, output| {
        fs::write(plan.upper.join("half-done"), "x").unwrap();
        for line in 1..=30 {
            // Lines split across chunks and a final line without a newline.
            let text = if line == 30 { "line 30".to_owned() } else { format!("line {line}\n") };
            let (first, second) = text.as_bytes().split_at(3);
            output(first);
            output(second);
        }
        Termination::Exited(3)
    });
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&lines);
    let progress: ProgressSink = Arc::new(move |event: &ProgressEvent| {
        if let ProgressEvent::Output { label, line } = event {
            seen.lock().unwrap().push(format!("{label}: {line}"));
        }
    });
    let run = Run::shell("for i in $(seq 30); do echo line $i; done; exit 3");
    let error = error_of(fixture.run(&run, &sandbox, Some(&progress)));
    let RunError::Failed { step, command, code, last_lines, log } = &error else { panic!("{error:?}") };
    assert_eq!(step, "RUN for i in $(seq 30); do echo line $i; done; exit 3");
    assert_eq!(command, "for i in $(seq 30); do echo line $i; done; exit 3");
    assert_eq!(*code, 3);
    let expected: Vec<String> = (11..=30).map(|line| format!("line {line}")).collect();
    assert_eq!(*last_lines, expected);
    let full_log: String = (1..=30).map(|line| format!("line {line}\n")).collect();
    assert_eq!(fs::read_to_string(log).unwrap(), full_log.trim_end());
    let message = error.to_string();
    assert!(
        message.starts_with(
            "`for i in $(seq 30); do echo line $i; done; exit 3` exited with code 3; the last 20 lines of its output:\n  | line 11\n"
        ),
        "{message}"
    );
    assert!(message.ends_with(&format!("  | line 30\nfull log: {}", log.display())), "{message}");
    assert_eq!(lines.lock().unwrap().len(), 30, "every line went to the progress sink");
    assert_eq!(lines.lock().unwrap()[0], format!("{step}: line 1"));

    assert_eq!(fixture.store.read_action(&Fixture::key_of(&run)).unwrap(), None, "nothing is cached");
    assert!(fixture.tmp_is_empty(), "the run directory is removed after a failure too");

    let killed = fake(|_, _| Termination::Signaled(9));
    let error = error_of(fixture.run(&Run::argv(["sleep", "1"]), &killed, None)).to_string();
    assert!(
        error.starts_with("`[\"sleep\", \"1\"]` was killed by signal 9; it printed nothing\nfull log: "),
        "{error}"
    );
}

#[test]
fn a_step_user_the_image_does_not_know_fails_before_anything_runs() {
    let fixture = Fixture::new();
    let sandbox = fake(|_, _| panic!("the sandbox must not run"));
    let error = error_of(fixture.run(&Run::shell("true").user("ghost"), &sandbox, None)).to_string();
    assert_eq!(error, "user \"ghost\" is not in the image's /etc/passwd (use a numeric uid[:gid])");
    assert!(fixture.tmp_is_empty());
}

fn tree_of(entries: &[(&str, IndexKind, u32, u32)]) -> FsTree {
    let index = LayerIndex {
        entries: entries
            .iter()
            .map(|(path, kind, mode, uid)| IndexEntry {
                path: (*path).to_owned(),
                kind: kind.clone(),
                mode: *mode,
                uid: *uid,
                gid: *uid,
            })
            .collect(),
    };
    let mut tree = FsTree::default();
    tree.apply(0, &layerwright_cache::Digest::of_bytes(b"layer"), &index).unwrap();
    tree
}

#[test]
fn mountpoints_are_mounted_over_made_or_skipped_by_what_the_image_has_there() {
    let file_kind = IndexKind::File { size: 0, sha256: layerwright_cache::Digest::of_bytes(b"") };
    let symlink = |target: &str| IndexKind::Symlink { target: target.to_owned() };
    let made = |path: &str, directory: bool, mode: u32, uid: u32| CreatedPath {
        path: path.to_owned(),
        directory,
        mode,
        uid,
        gid: uid,
    };

    // An image with all of them: nothing is created.
    let tree = tree_of(&[
        ("proc", IndexKind::Directory, 0o555, 0),
        ("dev", IndexKind::Directory, 0o755, 0),
        ("etc/hosts", file_kind.clone(), 0o644, 0),
        ("etc/resolv.conf", file_kind.clone(), 0o644, 0),
    ]);
    let plan = plan_mountpoints(&tree);
    assert_eq!((plan.proc, plan.dev, plan.hosts, plan.resolv_conf), (true, true, true, true));
    assert_eq!(plan.created, []);

    // `/etc` exists (0750 1000:1000): copied up with its metadata, the files created.
    let tree = tree_of(&[("etc", IndexKind::Directory, 0o750, 1000)]);
    let plan = plan_mountpoints(&tree);
    assert_eq!(
        plan.created,
        [
            made("proc", true, 0o755, 0),
            made("dev", true, 0o755, 0),
            made("etc", true, 0o750, 1000),
            made("etc/hosts", false, 0o644, 0),
            made("etc/resolv.conf", false, 0o644, 0),
        ]
    );

    // Symlinks and other types are never mounted over or written through.
    let tree = tree_of(&[
        ("proc", file_kind.clone(), 0o644, 0),
        ("dev", symlink("/host-dev"), 0o777, 0),
        ("etc", symlink("/usr/etc"), 0o777, 0),
    ]);
    let plan = plan_mountpoints(&tree);
    assert_eq!((plan.proc, plan.dev, plan.hosts, plan.resolv_conf), (false, false, false, false));
    assert_eq!(plan.created, []);
    let tree = tree_of(&[("etc/resolv.conf", symlink("../run/resolv.conf"), 0o777, 0)]);
    let plan = plan_mountpoints(&tree);
    assert_eq!((plan.hosts, plan.resolv_conf), (true, false));
}

#[test]
fn output_is_split_into_lines_however_it_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let log = File::create(dir.path().join("log")).unwrap();
    let progress = Progress::default();
    let mut collector = OutputCollector::new("RUN x", &progress, log);
    for chunk in [&b"a"[..], b"b\r\nc\n", b"\n", b"\xffd", b"e"] {
        collector.push(chunk);
    }
    assert_eq!(collector.finish(), ["ab", "c", "", "\u{fffd}de"]);
    assert_eq!(fs::read(dir.path().join("log")).unwrap(), b"ab\r\nc\n\n\xffde");
}

#[test]
fn output_without_newlines_and_a_huge_log_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let log = File::create(dir.path().join("log")).unwrap();
    let progress = Progress::default();
    let mut collector = OutputCollector::with_log_limit("RUN x", &progress, log, 1000);
    // 10 MiB without a newline, in odd chunks: held at most one line's limit at a time.
    let chunk = vec![b'x'; 4099];
    for _ in 0..(10 << 20) / chunk.len() {
        collector.push(&chunk);
        assert!(collector.partial.len() <= MAX_OUTPUT_LINE_BYTES);
    }
    collector.push(b"\nlast\n");
    let lines = collector.finish();
    assert_eq!(lines.len(), ERROR_OUTPUT_LINES);
    assert!(lines[..ERROR_OUTPUT_LINES - 2].iter().all(|line| line.len() == MAX_OUTPUT_LINE_BYTES));
    assert_eq!(lines.last().unwrap(), "last");
    let logged = fs::read_to_string(dir.path().join("log")).unwrap();
    assert_eq!(
        logged,
        format!("{}\n[layerwright: the log stops here, after 1000 bytes of output]\n", "x".repeat(1000))
    );
}

#[test]
fn directories_only_implied_by_a_higher_layer_are_made_in_the_upper_with_their_metadata() {
    let file_kind = IndexKind::File { size: 0, sha256: layerwright_cache::Digest::of_bytes(b"") };
    let entry = |path: &str, kind: IndexKind, mode: u32, uid: u32| IndexEntry {
        path: path.to_owned(),
        kind,
        mode,
        uid,
        gid: uid,
    };
    let layers = vec![
        // 0: /tmp 1777, /srv/data 0750 1000, /opt 0700 (all explicit), /usr/bin default.
        LayerIndex {
            entries: vec![
                entry("tmp", IndexKind::Directory, 0o1777, 0),
                entry("srv/data", IndexKind::Directory, 0o750, 1000),
                entry("opt", IndexKind::Directory, 0o700, 0),
                entry("usr/bin/tool", file_kind.clone(), 0o755, 0),
            ],
        },
        // 1: files below /tmp, /srv/data and /usr/bin: those directories are only implied.
        LayerIndex {
            entries: vec![
                entry("tmp/x", file_kind.clone(), 0o644, 0),
                entry("srv/data/config", file_kind.clone(), 0o640, 1000),
                entry("usr/bin/other", file_kind.clone(), 0o755, 0),
            ],
        },
        // 2: /opt again, explicitly: its own entry wins.
        LayerIndex { entries: vec![entry("opt", IndexKind::Directory, 0o711, 0), entry("opt/y", file_kind, 0o644, 0)] },
    ];
    let mut tree = FsTree::default();
    for (position, index) in layers.iter().enumerate() {
        tree.apply(position, &layerwright_cache::Digest::of_bytes(&[position as u8]), index).unwrap();
    }
    let indexes: Vec<Arc<LayerIndex>> = layers.into_iter().map(Arc::new).collect();
    let fixes: Vec<(String, u32, u32)> =
        implied_directory_fixes(&tree, &indexes).into_iter().map(|made| (made.path, made.mode, made.uid)).collect();
    // `/srv` is there as the parent of `/srv/data` (an upper directory needs its parents);
    // `/usr/bin` is 0755 0:0 either way; `/opt` is right in its topmost layer.
    assert_eq!(
        fixes,
        [("srv".to_owned(), 0o755, 0), ("srv/data".to_owned(), 0o750, 1000), ("tmp".to_owned(), 0o1777, 0)]
    );
}

/// `LAYERWRIGHT_SKIP_PRIVILEGED=1`: tests that need a working sandbox may skip.
fn skip_privileged() -> bool {
    std::env::var("LAYERWRIGHT_SKIP_PRIVILEGED").is_ok_and(|value| value == "1")
}

#[test]
fn the_real_sandbox_runs_with_the_new_mount_api_and_with_the_classic_fallback() {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"].into_iter().map(PathBuf::from).find(|path| path.is_file());
    let Some(busybox) = busybox else {
        assert!(skip_privileged(), "the test needs /bin/busybox: `apt-get install -y busybox-static`");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("cache")).unwrap();
    let size = fs::metadata(&busybox).unwrap().len();
    let mut entries = vec![LayerEntry {
        path: "bin/busybox".into(),
        kind: EntryKind::File { content: Content::HostFile(busybox), size },
        mode: 0o755,
        uid: 0,
        gid: 0,
        xattrs: Vec::new(),
    }];
    for applet in ["sh", "echo", "mkdir", "cat", "rm"] {
        entries.push(LayerEntry {
            path: format!("bin/{applet}"),
            kind: EntryKind::Symlink { target: "busybox".into() },
            mode: 0o777,
            uid: 0,
            gid: 0,
            xattrs: Vec::new(),
        });
    }
    entries.push(file("srv/old", "old\n"));
    let base = crate::layer::write_layer(&store, entries, &layer_options()).unwrap();
    let parent = Arc::new(NodeState::new(vec![base.record], json!({ "config": {} }), None));
    let indexes = IndexCache::default();
    let execution =
        Execution { store: &store, layer_options: layer_options(), indexes: &indexes, snapshot_for_run: false };
    for classic_overlay in [false, true] {
        let run = Run::shell(format!(
            "mkdir /out && echo classic={classic_overlay} > /out/x && rm /srv/old && cat /out/x && echo pid=$$"
        ));
        let key = StepKey::builder().str(&format!("{run:?}")).finish();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&lines);
        let progress: ProgressSink = Arc::new(move |event: &ProgressEvent| {
            if let ProgressEvent::Output { line, .. } = event {
                seen.lock().unwrap().push(line.clone());
            }
        });
        let progress = Progress::new(Some(progress));
        let secrets = Secrets::new();
        let request = RunRequest {
            key: &key,
            label: "RUN test",
            run: &run,
            parent: &parent,
            progress: &progress,
            given: Given { secrets: &secrets, ssh: &SshAgents::new() },
            bind_images: &[],
            bind_contexts: &[],
            defaults: Limits::default(),
        };
        let identity = Identity { classic_overlay, ..Identity::of_process() };
        let written = match execute_run_with(&execution, &request, &NamespaceSandbox, identity) {
            Ok(written) => written,
            Err(error @ RunError::Sandbox { .. }) if skip_privileged() => {
                eprintln!("skipped: the sandbox cannot run here: {error}");
                return;
            }
            Err(error) => panic!("classic overlay {classic_overlay}: {error}"),
        };
        assert_eq!(*lines.lock().unwrap(), [format!("classic={classic_overlay}"), "pid=1".to_owned()]);
        let index = LayerIndex::load(&store, &written.record.diff_id).unwrap().unwrap();
        let paths: Vec<(&str, &IndexKind)> =
            index.entries.iter().map(|entry| (entry.path.as_str(), &entry.kind)).collect();
        assert_eq!(paths.len(), 4, "{paths:?}");
        assert_eq!(paths[0], ("out", &IndexKind::Directory));
        assert_eq!(paths[1].0, "out/x");
        assert_eq!(paths[2], ("srv", &IndexKind::Directory));
        assert_eq!(paths[3], ("srv/old", &IndexKind::Whiteout));
    }
    assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
}

#[test]
fn kernel_releases_are_compared_by_major_and_minor() {
    for (release, expected) in [
        ("6.18.44-fc-v669", true),
        ("6.8.0", true),
        ("6.7.12-arch1", false),
        ("5.15.0-91-generic", false),
        ("7.0", true),
        ("weird", true),
    ] {
        assert_eq!(kernel_at_least(release, (6, 8)), expected, "{release}");
    }
}

#[test]
fn a_steps_limits_win_over_the_builders_which_win_over_the_defaults() {
    let none = Limits::default();
    assert_eq!(resolve_limits(&none, &none), ResourceLimits { pids: Some(PIDS_LIMIT), memory: MEMORY_LIMIT });
    let builder = Limits { pids: Some(100), memory: Some(1 << 30) };
    assert_eq!(resolve_limits(&none, &builder), ResourceLimits { pids: Some(100), memory: Some(1 << 30) });
    let step = Run::shell("x").memory_limit(64 << 20).limits;
    assert_eq!(resolve_limits(&step, &builder), ResourceLimits { pids: Some(100), memory: Some(64 << 20) });
}

#[test]
fn the_resolver_configuration_follows_the_network_mode() {
    assert_eq!(resolv_conf_file(NetworkMode::None), b"");
    assert_eq!(resolv_conf_file(NetworkMode::Isolated), b"nameserver 10.0.2.3\n");
    assert_eq!(resolv_conf_file(NetworkMode::Host), fs::read("/etc/resolv.conf").unwrap_or_default());
}
