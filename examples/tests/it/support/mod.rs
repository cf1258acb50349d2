//! The shared harness of the integration tests that check layerwright's output with real
//! clients: docker, skopeo, umoci, oci-image-tool (Debian packages, installed by `.ci/run`).
//!
//! What it is: finding the tools, running them with a timeout, and turning what they print or
//! unpack into something a test can compare (`tree_of` lists an unpacked rootfs in the format
//! of `FsTree::listing()`). Every failed command panics with the command line, its exit code and
//! its stderr.
//!
//! What it is not: a way to start dockerd, which is started by `cargo xtask test` (or
//! `.ci/run`, which calls it) and found through `DOCKER_HOST`. The servers the tests own (a
//! registry, BuildGrid, a farm of PostgreSQL, BuildGrid and `layerwright-worker`s) are
//! started here, fresh per test, and stopped on drop.
//!
//! Missing tools: a test that needs one calls `require_tool` (or `docker()`) and returns early on
//! `None`. That happens only when `LAYERWRIGHT_SKIP_PRIVILEGED=1`; otherwise a missing tool is a
//! test failure naming the Debian package to install, so that CI cannot pass by skipping.
//!
//! Use from a test module of this binary: `use crate::support;`.
//!
//! Tests that need a process of their own re-execute this binary on an ignored entry-point test:
//! `subprocess`, the same module as in layerwright's own integration tests.

#[path = "../../../../builder/tests/it/support/subprocess.rs"]
pub mod subprocess;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use layerwright::{Builder, BuilderOptions, BuiltImage, Compression};
use layerwright_examples::ExampleEnvironment;

/// How long one client command may take before the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `docker version` may take to answer before the engine counts as unreachable.
const DOCKER_VERSION_TIMEOUT: Duration = Duration::from_secs(20);

/// `LAYERWRIGHT_SKIP_PRIVILEGED=1`: tests needing root, daemons or missing tools skip instead of
/// failing (for developer machines without them; CI never sets it).
pub fn skip_privileged() -> bool {
    std::env::var("LAYERWRIGHT_SKIP_PRIVILEGED").is_ok_and(|value| value == "1")
}

/// Skips (returning `None`, after saying why) when `skip_privileged()`, else fails the test.
pub fn skip_or_panic<T>(reason: &str) -> Option<T> {
    if skip_privileged() {
        eprintln!("skipped: {reason} (LAYERWRIGHT_SKIP_PRIVILEGED=1)");
        return None;
    }
    panic!("{reason}. (Set LAYERWRIGHT_SKIP_PRIVILEGED=1 to skip tests that need it.)");
}

/// Whether a build failed because this machine cannot make the RUN sandbox at all (no root,
/// user namespaces refused).
pub fn sandbox_unavailable(error: &layerwright::BuildError) -> bool {
    use layerwright::{BuildError, RunError, StepError};
    let BuildError::Step { source, .. } = error else { return false };
    let StepError::Run(RunError::Sandbox { .. }) = source.as_ref() else { return false };
    let text = error.to_string();
    text.contains("namespace") || text.contains("CAP_SYS_ADMIN")
}

/// Builds `image`; `None` (after saying why) when RUN steps cannot run here and
/// `skip_privileged()`; any other failure fails the test.
pub fn build_with_runs(builder: &Builder, image: &layerwright::Image) -> Option<BuiltImage> {
    match builder.build(image) {
        Ok(built) => Some(built),
        Err(error) if sandbox_unavailable(&error) => skip_or_panic(&format!("RUN steps cannot run here: {error}")),
        Err(error) => panic!("build failed: {error}"),
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

// ---------------------------------------------------------------------------------------------
// The example images

/// The environment of the examples of this workspace.
pub fn environment() -> ExampleEnvironment {
    ExampleEnvironment::for_workspace(env!("CARGO_MANIFEST_DIR").as_ref())
}

/// Declares example `name` and builds it into `cache` with `compression`; any failure fails the
/// test.
pub fn build_example(name: &str, cache: &Path, compression: Compression) -> BuiltImage {
    let example = layerwright_examples::find(name).unwrap_or_else(|| panic!("no example {name}"));
    let image = (example.declare)(&environment()).unwrap_or_else(|error| panic!("declaring {name}: {error}"));
    let options = BuilderOptions::default().compression(compression);
    Builder::with_options(cache, options)
        .and_then(|builder| builder.build(&image))
        .unwrap_or_else(|error| panic!("building {name}: {error}"))
}

/// A generated W1 workload directory (the benchmark workload: a base, a 2,000-file COPY, three
/// RUN stages, RUNs and `copy_from`s), shared by the tests of this binary.
pub fn w1_workdir() -> PathBuf {
    static WORKDIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    WORKDIR
        .get_or_init(|| {
            let environment = environment();
            let workdir = environment.work_dir.join("remote-cache-w1");
            fs::create_dir_all(&workdir).unwrap();
            layerwright_examples::workloads::write_base_archive(&environment, &workdir)
                .unwrap_or_else(|error| panic!("{error}"));
            layerwright_examples::workloads::generate("w1", &workdir).unwrap_or_else(|error| panic!("{error}"));
            workdir
        })
        .clone()
}

/// W1, declared on [`w1_workdir`].
pub fn w1() -> layerwright::Image {
    layerwright_examples::workloads::declare("w1", &w1_workdir()).unwrap()
}

/// Options whose `before_execute` hook counts the steps a build executes, and the count.
pub fn counting_executions() -> (BuilderOptions, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let executed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = executed.clone();
    let options = BuilderOptions::default().before_execute(std::sync::Arc::new(move |_label: &str| {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }));
    (options, executed)
}

/// Builds W1 on `machine` (a builder and its execution count, from [`counting_executions`]),
/// whose cache already holds it, and checks that the build is a local no-op: `expected`'s
/// digest, nothing executed, and no remote cache asked.
pub fn assert_w1_rebuild_is_a_local_no_op(
    machine: (Builder, std::sync::Arc<std::sync::atomic::AtomicUsize>),
    expected: &BuiltImage,
) {
    let (builder, executed) = machine;
    let rebuilt = build_with_runs(&builder, &w1()).unwrap();
    assert_eq!(rebuilt.manifest_digest(), expected.manifest_digest());
    assert_eq!(executed.load(std::sync::atomic::Ordering::Relaxed), 0, "{:#?}", rebuilt.steps());
    assert!(rebuilt.remote_cache().is_none_or(|report| !report.consulted), "{:?}", rebuilt.remote_cache());
}

/// Checks W1 as machine B built it (`built_b`, `executed_b` from [`counting_executions`]) while
/// its remote cache was killed mid-build: A's digest and listing, exactly one warning, nothing
/// uploaded or exported to the dead server, and the steps that did not arrive built here.
pub fn assert_w1_built_past_a_killed_cache(
    built_b: &BuiltImage,
    executed_b: &std::sync::atomic::AtomicUsize,
    built_a: &BuiltImage,
) {
    assert_eq!(built_b.manifest_digest(), built_a.manifest_digest());
    let report_b = built_b.remote_cache().unwrap();
    assert_eq!(report_b.warnings.len(), 1, "one warning, not {:?}", report_b.warnings);
    assert!(report_b.reapi_upload.is_none() && report_b.export.is_none(), "nothing can go to a dead server");
    assert!(executed_b.load(std::sync::atomic::Ordering::Relaxed) > 0, "the steps that did not arrive were built");
    assert_eq!(built_b.listing().unwrap(), built_a.listing().unwrap());
}

/// The digests of the blobs in a cache directory's store.
pub fn stored_blobs(cache: &Path) -> std::collections::BTreeSet<String> {
    fs::read_dir(cache.join("blobs/sha256"))
        .unwrap()
        .map(|entry| format!("sha256:{}", entry.unwrap().file_name().to_string_lossy()))
        .collect()
}

/// What the final image of `built` is made of: its layers, its config and its manifest.
pub fn final_image_blobs(built: &BuiltImage) -> std::collections::BTreeSet<String> {
    built
        .layers()
        .iter()
        .map(|layer| layer.digest.to_string())
        .chain([built.config_digest(), built.manifest_digest()])
        .collect()
}

/// `sha256:HEX` of `content`, as listings and descriptors name blobs.
pub fn sha256(content: impl AsRef<[u8]>) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(content.as_ref())))
}

// ---------------------------------------------------------------------------------------------
// Tools

/// The Debian package that provides a tool `require_tool` may be asked for.
fn debian_package_of(tool: &str) -> &'static str {
    match tool {
        "skopeo" => "skopeo",
        "umoci" => "umoci",
        "oci-image-tool" => "oci-image-tool",
        "docker" | "dockerd" => "docker.io",
        "docker-registry" => "docker-registry",
        "busybox" => "busybox-static",
        "buildah" => "buildah",
        _ => "the package that provides it",
    }
}

/// The path of the executable `name`, looked up on `PATH` and in `/usr/sbin`, `/usr/bin`,
/// `/sbin` and `/bin` (daemons live in sbin, which a non-root `PATH` often lacks). Missing:
/// `None` under `skip_privileged()`, else a panic naming the Debian package.
pub fn require_tool(name: &str) -> Option<PathBuf> {
    if let Some(path) = find_executable(name) {
        return Some(path);
    }
    let package = debian_package_of(name);
    skip_or_panic(&format!("the test needs `{name}`, which is not installed: `apt-get install -y {package}`"))
}

/// Whether all of `tools` are installed: `require_tool` for each (so `false` only under
/// `skip_privileged()`).
pub fn tools_present(tools: &[&str]) -> bool {
    tools.iter().all(|tool| require_tool(tool).is_some())
}

fn find_executable(name: &str) -> Option<PathBuf> {
    let is_executable = |path: &Path| {
        fs::metadata(path).is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let path = PathBuf::from(name);
        return is_executable(&path).then_some(path);
    }
    let path_variable = std::env::var_os("PATH").unwrap_or_default();
    let fixed = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path_variable)
        .chain(fixed)
        .map(|directory| directory.join(name))
        .find(|candidate| is_executable(candidate))
}

// ---------------------------------------------------------------------------------------------
// Running commands

/// A command line as a shell would show it, for failure messages.
fn describe(command: &Command) -> String {
    let mut parts = vec![command.get_program().to_string_lossy().into_owned()];
    parts.extend(command.get_args().map(|argument| argument.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `command` (stdin closed, output captured) for at most `timeout`; `Err` says why it
/// could not finish (not started, timed out; a timed-out command is killed).
fn try_run(command: &mut Command, timeout: Duration) -> Result<Output, String> {
    let described = describe(command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot start `{described}`: {error}"))?;
    // Read both pipes on threads: a child blocked on a full pipe would never exit.
    let stdout = drain(child.stdout.take().expect("stdout is piped"));
    let stderr = drain(child.stderr.take().expect("stderr is piped"));
    let status = match wait_until(&mut child, Instant::now() + timeout) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            return Err(format!(
                "`{described}` did not finish within {timeout:?}; stderr so far:\n{}",
                String::from_utf8_lossy(&stderr)
            ));
        }
    };
    Ok(Output { status, stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default() })
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

fn wait_until(child: &mut Child, deadline: Instant) -> Option<std::process::ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child process") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `command` with a timeout; panics if it cannot start or does not finish. The exit status
/// is the caller's to judge.
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> Output {
    try_run(command, timeout).unwrap_or_else(|reason| panic!("{reason}"))
}

/// Runs `command` with a timeout and panics unless it exits 0, showing its exit code, stderr
/// and stdout.
pub fn run_checked(command: &mut Command, timeout: Duration) -> Output {
    let described = describe(command);
    let output = run_with_timeout(command, timeout);
    if !output.status.success() {
        panic!(
            "`{described}` failed ({}):\nstderr:\n{}\nstdout:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    output
}

// ---------------------------------------------------------------------------------------------
// Docker

/// The docker engine the tests may use: `/usr/bin/docker` (the engine's own client) talking to
/// `DOCKER_HOST`.
#[derive(Debug, Clone)]
pub struct DockerClient {
    binary: PathBuf,
    host: String,
}

/// The engine at `DOCKER_HOST`, if it answers `docker version` within 20 s. Otherwise `None`
/// under `skip_privileged()`, else a panic saying how to get one.
pub fn docker() -> Option<DockerClient> {
    let binary = PathBuf::from("/usr/bin/docker");
    if !binary.is_file() {
        return skip_or_panic("the test needs /usr/bin/docker: `apt-get install -y docker.io`");
    }
    let how = "dockerd must be running and DOCKER_HOST point at it \
               (run the tests through `cargo xtask test`, which starts one)";
    let Some(host) = std::env::var("DOCKER_HOST").ok().filter(|host| !host.is_empty()) else {
        return skip_or_panic(&format!("DOCKER_HOST is not set: {how}"));
    };
    let client = DockerClient { binary, host };
    let answer = try_run(client.command().args(["version", "--format", "{{.Server.Version}}"]), DOCKER_VERSION_TIMEOUT);
    match answer {
        Ok(output) if output.status.success() => Some(client),
        Ok(output) => skip_or_panic(&format!(
            "the docker engine at {} does not answer ({}): {}; {how}",
            client.host,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(reason) => skip_or_panic(&format!("the docker engine at {} does not answer: {reason}; {how}", client.host)),
    }
}

impl DockerClient {
    /// A `docker` command aimed at this engine.
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command.env("DOCKER_HOST", &self.host);
        command
    }

    /// `docker load -i archive`; returns what was loaded (`name:tag`, or the image id when the
    /// archive names no tag).
    pub fn load(&self, archive: &Path) -> String {
        let output = run_checked(self.command().arg("load").arg("-i").arg(archive), COMMAND_TIMEOUT);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let loaded = stdout
            .lines()
            .rev()
            .find_map(|line| line.strip_prefix("Loaded image: ").or_else(|| line.strip_prefix("Loaded image ID: ")));
        match loaded {
            Some(name) => name.trim().to_owned(),
            None => panic!("`docker load -i {}` did not say what it loaded:\n{stdout}", archive.display()),
        }
    }

    /// `docker run --rm --network none image args…`; the exit status is the caller's to judge.
    pub fn run(&self, image: &str, args: &[&str]) -> Output {
        let mut command = self.command();
        command.args(["run", "--rm", "--network", "none", image]).args(args);
        run_with_timeout(&mut command, COMMAND_TIMEOUT)
    }

    /// `docker run --rm --network none --platform platform image args…` (an image of another
    /// platform runs under the engine's binfmt_misc emulation).
    pub fn run_on_platform(&self, platform: &str, image: &str, args: &[&str]) -> Output {
        let mut command = self.command();
        command.args(["run", "--rm", "--network", "none", "--platform", platform, image]).args(args);
        run_with_timeout(&mut command, COMMAND_TIMEOUT)
    }

    /// `docker rmi -f name`; an image that is already gone is fine.
    pub fn remove_image(&self, name: &str) {
        let mut command = self.command();
        command.args(["rmi", "-f", name]);
        let described = describe(&command);
        let output = run_with_timeout(&mut command, COMMAND_TIMEOUT);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() && !stderr.contains("No such image") {
            panic!("`{described}` failed ({}): {stderr}", output.status);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// OCI tools

/// `oci-image-tool validate --type image DIR`: the tool detects a layout, and checks it, its
/// index, and every manifest, config and layer descriptor (sizes and digests) of every ref.
pub fn oci_image_tool_validate(layout_dir: &Path) {
    let tool = require_tool("oci-image-tool").expect("callers check require_tool first");
    let mut command = Command::new(tool);
    command.args(["validate", "--type", "image"]).arg(layout_dir);
    let described = describe(&command);
    let output = run_checked(&mut command, COMMAND_TIMEOUT);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("imageLayout") && stdout.contains("Validation succeeded"),
        "`{described}` did not validate an image layout:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `skopeo inspect REF` (e.g. `oci:DIR:TAG`, `docker-archive:FILE`), parsed.
pub fn skopeo_inspect(transport_ref: &str) -> serde_json::Value {
    let tool = require_tool("skopeo").expect("callers check require_tool first");
    let output = run_checked(Command::new(tool).args(["inspect", transport_ref]), COMMAND_TIMEOUT);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "`skopeo inspect {transport_ref}` printed no JSON ({error}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// `skopeo inspect --raw REF` (the manifest or index as the registry serves it), plain HTTP.
pub fn skopeo_inspect_raw(transport_ref: &str) -> serde_json::Value {
    let tool = require_tool("skopeo").expect("callers check require_tool first");
    let output = run_checked(
        Command::new(tool).args(["inspect", "--raw", "--tls-verify=false", transport_ref]),
        COMMAND_TIMEOUT,
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("`skopeo inspect --raw {transport_ref}` printed no JSON ({error})"))
}

/// `skopeo copy FROM TO`, without a signature policy (these are local test images).
pub fn skopeo_copy(from: &str, to: &str) {
    let tool = require_tool("skopeo").expect("callers check require_tool first");
    run_checked(Command::new(tool).args(["--insecure-policy", "copy", "--quiet", from, to]), COMMAND_TIMEOUT);
}

/// `umoci unpack --image LAYOUT:TAG DEST` (`--rootless` when not root, which then cannot keep
/// owners); returns the unpacked rootfs, `DEST/rootfs`. `dest` must not exist yet.
pub fn umoci_unpack(layout_dir: &Path, tag: &str, dest: &Path) -> PathBuf {
    let tool = require_tool("umoci").expect("callers check require_tool first");
    let mut command = Command::new(tool);
    command.arg("unpack");
    if !is_root() {
        command.arg("--rootless");
    }
    command.arg("--image").arg(format!("{}:{tag}", layout_dir.display())).arg(dest);
    run_checked(&mut command, COMMAND_TIMEOUT);
    dest.join("rootfs")
}

// ---------------------------------------------------------------------------------------------
// Listing an unpacked rootfs

/// Lists the tree below `rootfs` in the format of `BuiltImage::listing()` (see
/// `layerwright::host::directory_listing`).
pub fn tree_of(rootfs: &Path) -> String {
    layerwright::host::directory_listing(rootfs)
        .unwrap_or_else(|error| panic!("cannot list {}: {error}", rootfs.display()))
}

// ---------------------------------------------------------------------------------------------
// A local registry

/// How long a started registry may take to answer `GET /v2/`.
const REGISTRY_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `docker-registry` (distribution) serving on `127.0.0.1:PORT` from a temp storage
/// directory. Killed, and its storage removed, when dropped (so also when a test panics).
pub struct LocalRegistry {
    child: Child,
    port: u16,
    /// Holds the config and the storage; removed after the child is gone.
    _dir: tempfile::TempDir,
}

/// Starts a registry on a free port and waits until `GET /v2/` answers. Missing
/// `docker-registry`: `None` under `skip_privileged()`, else a panic naming the package.
pub fn registry() -> Option<LocalRegistry> {
    let binary = require_tool("docker-registry")?;
    let (dir, storage, port) = server_place();
    let config = dir.path().join("config.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    \
             enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        ),
    )
    .expect("writing the registry config");
    let child = spawn_server(Command::new(&binary).arg("serve").arg(&config), &dir.path().join("registry.log"));
    let mut registry = LocalRegistry { child, port, _dir: dir };
    let answers = |registry: &LocalRegistry| {
        registry.request("GET", "/v2/", &[], b"").is_ok_and(|response| response.starts_with("HTTP/1.1 200"))
    };
    match wait_until_serving(&mut registry, |registry| &mut registry.child, answers, REGISTRY_START_TIMEOUT) {
        Start::Serving => Some(registry),
        Start::Exited(status) => panic!("docker-registry exited ({status}) before answering:\n{}", registry.log()),
        Start::Silent(timeout) => {
            panic!("docker-registry did not answer GET /v2/ within {timeout:?}:\n{}", registry.log())
        }
    }
}

/// Where a local server lives: a temp directory (removed when dropped), its `storage`
/// directory, and a port the kernel just handed out, released for the server to bind.
fn server_place() -> (tempfile::TempDir, PathBuf, u16) {
    let dir = tempfile::tempdir().expect("a temp dir for a server");
    let storage = dir.path().join("storage");
    fs::create_dir(&storage).expect("creating a server's storage");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port on 127.0.0.1")
        .port();
    (dir, storage, port)
}

/// Starts a server process with its stdout and stderr going to the file `log`.
fn spawn_server(command: &mut Command, log: &Path) -> Child {
    let log = fs::File::create(log).unwrap_or_else(|error| panic!("creating {}: {error}", log.display()));
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("a second handle on the log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {}: {error}", describe(command)))
}

/// What became of a started server process.
enum Start {
    Serving,
    Exited(std::process::ExitStatus),
    Silent(Duration),
}

/// Polls `answers(server)` until a started server serves, its process (`child_of(server)`)
/// ends, or `timeout` passes.
fn wait_until_serving<S>(
    server: &mut S,
    child_of: impl Fn(&mut S) -> &mut Child,
    answers: impl Fn(&S) -> bool,
    timeout: Duration,
) -> Start {
    let deadline = Instant::now() + timeout;
    loop {
        if answers(server) {
            return Start::Serving;
        }
        if let Some(status) = child_of(server).try_wait().expect("waiting for a server process") {
            return Start::Exited(status);
        }
        if Instant::now() >= deadline {
            return Start::Silent(timeout);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

impl LocalRegistry {
    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What the registry logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self._dir.path().join("registry.log")).unwrap_or_default()
    }

    /// One plain HTTP/1.1 request (`Connection: close`); the whole response as text.
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<String> {
        use std::io::Write as _;
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.address());
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        stream.write_all(request.as_bytes())?;
        stream.write_all(body)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        Ok(String::from_utf8_lossy(&response).into_owned())
    }
}

impl LocalRegistry {
    /// Kills the registry (SIGKILL) as a crash would: connections drop, nothing answers.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where the registry keeps blob `sha256:HEX`'s bytes (distribution's filesystem driver),
    /// for tests that corrupt what it serves.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self._dir.path().join(format!("storage/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

/// A TCP proxy on `127.0.0.1:PORT` in front of a local server (a registry, BuildGrid) that
/// SIGKILLs the server once it has passed `kill_after_bytes` bytes of answers: a server dying
/// in the middle of a transfer, at a point the test chooses. Stops accepting when dropped.
pub struct KillingProxy {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Whether the registry was killed.
    pub killed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl KillingProxy {
    pub fn start(registry: &LocalRegistry, kill_after_bytes: u64) -> KillingProxy {
        KillingProxy::in_front_of(registry.port, registry.pid(), kill_after_bytes)
    }

    /// A proxy in front of the server listening on `127.0.0.1:upstream_port` whose process is
    /// `server_pid`.
    pub fn in_front_of(upstream_port: u16, server_pid: u32, kill_after_bytes: u64) -> KillingProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port for the proxy");
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let port = listener.local_addr().expect("the proxy's address").port();
        let (stop, killed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let passed = Arc::new(AtomicU64::new(0));
        let (stop_flag, killed_flag) = (stop.clone(), killed.clone());
        thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => return,
                };
                let _ = client.set_nonblocking(false);
                let Ok(upstream) = std::net::TcpStream::connect(("127.0.0.1", upstream_port)) else { continue };
                let (mut client_reader, mut upstream_writer) =
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = std::io::copy(&mut client_reader, &mut upstream_writer);
                    let _ = upstream_writer.shutdown(std::net::Shutdown::Write);
                });
                let (passed, killed) = (passed.clone(), killed_flag.clone());
                let (mut upstream_reader, mut client_writer) = (upstream, client);
                thread::spawn(move || {
                    use std::io::Write as _;
                    let mut buffer = vec![0u8; 16 * 1024];
                    loop {
                        let read = match upstream_reader.read(&mut buffer) {
                            Ok(0) | Err(_) => break,
                            Ok(read) => read,
                        };
                        if client_writer.write_all(&buffer[..read]).is_err() {
                            break;
                        }
                        let total = passed.fetch_add(read as u64, Ordering::Relaxed) + read as u64;
                        if total >= kill_after_bytes && !killed.swap(true, Ordering::Relaxed) {
                            let pid = rustix::process::Pid::from_raw(server_pid as i32).expect("a pid");
                            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                            break;
                        }
                    }
                    let _ = client_writer.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        KillingProxy { port, stop, killed }
    }

    /// `127.0.0.1:PORT` of the proxy.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for KillingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// A local BuildGrid (REAPI cache server)

/// Where `.ci/run` installs BuildGrid (a Python virtual environment); `LAYERWRIGHT_BUILDGRID`
/// names another.
const BUILDGRID_DEFAULT: &str = "/opt/layerwright-buildgrid";
/// How long a started BuildGrid may take to answer (a Python server: a few seconds).
const BUILDGRID_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How many ports a start tries.
const BUILDGRID_START_ATTEMPTS: usize = 3;

/// A BuildGrid server (CAS, action cache, ByteStream; in a [`LocalFarm`] also execution and
/// bots, on PostgreSQL) serving on `127.0.0.1:PORT`, instance "", with its CAS on disk in a temp
/// directory. Killed, and its directory removed, when dropped (so also when a test panics).
pub struct LocalBuildGrid {
    child: Child,
    port: u16,
    /// Holds the config, the CAS and the log; removed after the child is gone.
    dir: tempfile::TempDir,
}

/// Starts BuildGrid on a free port and waits until it speaks HTTP/2. Missing BuildGrid: `None`
/// under `skip_privileged()`, else a panic naming what to install.
pub fn buildgrid() -> Option<LocalBuildGrid> {
    start_buildgrid_with(&buildgrid_program()?, "")
}

/// BuildGrid's `bgd` (see [`BUILDGRID_DEFAULT`]); missing: `None` under `skip_privileged()`,
/// else a panic naming what to install.
fn buildgrid_program() -> Option<PathBuf> {
    let venv =
        std::env::var_os("LAYERWRIGHT_BUILDGRID").map_or_else(|| PathBuf::from(BUILDGRID_DEFAULT), PathBuf::from);
    let bgd = venv.join("bin/bgd");
    if !bgd.is_file() {
        return skip_or_panic(&format!(
            "BuildGrid is missing: no {} (install it as .ci/run does: `python3 -m venv {BUILDGRID_DEFAULT} && \
             {BUILDGRID_DEFAULT}/bin/pip install 'buildgrid[database]==0.4.4'`, or point LAYERWRIGHT_BUILDGRID at a \
             virtualenv that has it)",
            bgd.display()
        ));
    }
    Some(bgd)
}

/// Starts BuildGrid (see [`buildgrid`]); with `execution` (YAML defining a `connections` and a
/// `schedulers` section with a scheduler `&scheduler`), with its execution and bots services too.
fn start_buildgrid_with(bgd: &Path, execution: &str) -> Option<LocalBuildGrid> {
    // A port handed out by the kernel and released can be taken by someone else before
    // BuildGrid binds it (it then exits): a few attempts, each on a new port.
    let mut last_log = String::new();
    for _ in 0..BUILDGRID_START_ATTEMPTS {
        match start_buildgrid(bgd, execution) {
            Ok(server) => return Some(server),
            Err(log) => last_log = log,
        }
    }
    panic!("BuildGrid did not start in {BUILDGRID_START_ATTEMPTS} attempts; its last log:\n{last_log}");
}

/// Starts BuildGrid once, on a free port; its log when it exits before answering.
fn start_buildgrid(bgd: &Path, execution: &str) -> Result<LocalBuildGrid, String> {
    let (dir, storage, port) = server_place();
    let config = dir.path().join("config.yml");
    let execution_service = if execution.is_empty() {
        String::new()
    } else {
        format!(
            "      - !execution\n        scheduler: *scheduler\n        operation-stream-keepalive-timeout: \
             {FARM_BOT_KEEPALIVE_SECONDS}\n"
        )
    };
    // gRPC servers share a port with SO_REUSEPORT by default: two servers on one port would
    // each get some of the connections. Off, a taken port makes BuildGrid exit instead.
    fs::write(
        &config,
        format!(
            "server:\n  - !channel\n    address: \"127.0.0.1:{port}\"\n    insecure-mode: true\n\
             grpc-server-options:\n  grpc.so_reuseport: 0\n\
             authorization:\n  method: none\n\
             storages:\n  - !disk-storage &cas-storage\n    path: {storage}\n\
             caches:\n  - !lru-action-cache &action-cache\n    storage: *cas-storage\n    max-cached-refs: 100000\n    \
             allow-updates: true\n    cache-failed-actions: false\n\
             {execution}\
             instances:\n  - name: \"\"\n    services:\n      - !action-cache\n        cache: *action-cache\n      \
             - !cas\n        storage: *cas-storage\n      - !bytestream\n        storage: *cas-storage\n{execution_service}",
            storage = storage.display()
        ),
    )
    .expect("writing BuildGrid's config");
    let mut command = Command::new(bgd);
    command.args(["server", "start"]);
    if !execution.is_empty() {
        // The scheduler's decisions (INFO), for a failing test's message.
        command.arg("-vv");
    }
    let child = spawn_server(command.arg(&config), &dir.path().join("buildgrid.log"));
    let mut server = LocalBuildGrid { child, port, dir };
    match wait_until_serving(
        &mut server,
        |server| &mut server.child,
        LocalBuildGrid::speaks_http2,
        BUILDGRID_START_TIMEOUT,
    ) {
        Start::Serving => Ok(server),
        Start::Exited(status) => Err(format!("(exited: {status})\n{}", server.log())),
        Start::Silent(timeout) => panic!("BuildGrid did not answer within {timeout:?}:\n{}", server.log()),
    }
}

impl LocalBuildGrid {
    /// `http://127.0.0.1:PORT`, the endpoint a builder is given.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What BuildGrid logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("buildgrid.log")).unwrap_or_default()
    }

    /// Where the server's disk CAS keeps blob `sha256:HEX`, for tests that corrupt what it
    /// serves.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.dir.path().join(format!("storage/cas/objects/{}/{}", &hex[..2], &hex[2..]))
    }

    /// Kills the server (SIGKILL) as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the server answers an HTTP/2 connection preface with its SETTINGS frame: a gRPC
    /// server that is serving, not only a bound port.
    fn speaks_http2(&self) -> bool {
        use std::io::Write as _;
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        // The client preface, then an empty SETTINGS frame (length 0, type 4, no flags, stream 0).
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        if stream.write_all(&hello).is_err() {
            return false;
        }
        let mut header = [0u8; 9];
        stream.read_exact(&mut header).is_ok() && header[3] == 4
    }
}

impl Drop for LocalBuildGrid {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// A local build farm: PostgreSQL, BuildGrid with execution, layerwright workers

/// PostgreSQL 15's server programs (Debian's `postgresql-15`, installed by `.ci/run`).
const POSTGRES_BIN: &str = "/usr/lib/postgresql/15/bin";
/// How long PostgreSQL may take to accept connections.
const POSTGRES_START_TIMEOUT: Duration = Duration::from_secs(60);
/// BuildGrid's bot keepalive in the farm: a worker that stops answering loses its lease (which
/// is queued again) after this many seconds. BuildGrid assigns leases only to bots whose
/// long poll can last 3 s, 80 % of this.
const FARM_BOT_KEEPALIVE_SECONDS: u32 = 5;

/// A PostgreSQL cluster of its own in a temp directory, run as the `postgres` user, listening
/// on a unix socket only; database `bgd` exists. Stopped (and its directory removed) when
/// dropped.
pub struct LocalPostgres {
    child: Child,
    dir: tempfile::TempDir,
}

/// The uid and gid of the `postgres` user, from /etc/passwd.
fn postgres_ids() -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres") && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

impl LocalPostgres {
    /// Starts a fresh cluster. Missing PostgreSQL or not root: `None` under
    /// `skip_privileged()`, else a panic naming what to install.
    pub fn start() -> Option<LocalPostgres> {
        use std::os::unix::process::CommandExt;
        let (Some((uid, gid)), true) = (postgres_ids(), Path::new(POSTGRES_BIN).join("postgres").is_file()) else {
            return skip_or_panic(&format!(
                "PostgreSQL is missing: no {POSTGRES_BIN}/postgres or no postgres user (apt-get install \
                 postgresql-15, as .ci/run does)"
            ));
        };
        if !is_root() {
            return skip_or_panic("starting PostgreSQL as its own user needs root");
        }
        let dir = tempfile::tempdir().expect("a temp dir for PostgreSQL");
        let (data, socket) = (dir.path().join("data"), dir.path().join("socket"));
        for directory in [&data, &socket] {
            fs::create_dir(directory).unwrap();
            rustix::fs::chown(directory, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))
                .unwrap();
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let home = dir.path().to_owned();
        let as_postgres = |program: &str| {
            let mut command = Command::new(Path::new(POSTGRES_BIN).join(program));
            command.uid(uid).gid(gid).current_dir(&home);
            command
        };
        run_checked(
            as_postgres("initdb").arg("-D").arg(&data).args(["-A", "trust", "-U", "postgres", "--no-sync"]),
            COMMAND_TIMEOUT,
        );
        let child = spawn_server(
            as_postgres("postgres")
                .arg("-D")
                .arg(&data)
                .args(["-c", "listen_addresses=", "-c", "fsync=off", "-k"])
                .arg(&socket),
            &home.join("postgres.log"),
        );
        let mut postgres = LocalPostgres { child, dir };
        let deadline = Instant::now() + POSTGRES_START_TIMEOUT;
        loop {
            let ready = as_postgres("pg_isready").arg("-h").arg(&socket).stdout(Stdio::null()).status();
            if ready.is_ok_and(|status| status.success()) {
                break;
            }
            if let Some(status) = postgres.child.try_wait().unwrap() {
                panic!("PostgreSQL exited ({status}):\n{}", postgres.log());
            }
            assert!(Instant::now() < deadline, "PostgreSQL did not start:\n{}", postgres.log());
            thread::sleep(Duration::from_millis(100));
        }
        run_checked(as_postgres("createdb").arg("-h").arg(&socket).arg("bgd"), COMMAND_TIMEOUT);
        Some(postgres)
    }

    /// The connection string of database `bgd` (SQLAlchemy's, over the unix socket). BuildGrid's
    /// notifiers need psycopg2 (they poll its connection), which SQLAlchemy 2.1 no longer
    /// takes by default.
    pub fn connection_string(&self) -> String {
        format!("postgresql+psycopg2://postgres@/bgd?host={}", self.dir.path().join("socket").display())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        // SIGQUIT: an immediate shutdown that takes the server's own processes with it.
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::QUIT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `layerwright-worker` process, its cache directory and its log; killed when dropped.
pub struct LocalWorker {
    child: Child,
    pub name: String,
    log: PathBuf,
}

impl LocalWorker {
    /// What the worker printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the worker (SIGKILL) as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the worker to stop (SIGTERM): it finishes its lease first.
    pub fn terminate(&self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }

    /// Waits up to `timeout` for the worker to exit; its status.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LocalWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A build farm on 127.0.0.1: PostgreSQL, BuildGrid with its execution and bots services (and
/// the cache services of [`buildgrid`]), and `workers` layerwright workers, each with a cache
/// directory of its own. Everything is fresh, and stopped and removed on drop (workers first).
pub struct LocalFarm {
    pub workers: Vec<LocalWorker>,
    pub buildgrid: LocalBuildGrid,
    pub postgres: LocalPostgres,
    /// The workers' cache directories and logs.
    _worker_dir: tempfile::TempDir,
}

/// The `layerwright-worker` binary beside this test binary (`cargo xtask test` builds it), or
/// `LAYERWRIGHT_WORKER`.
fn worker_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("LAYERWRIGHT_WORKER") {
        return Some(PathBuf::from(path));
    }
    let test_binary = std::env::current_exe().ok()?;
    // target/<profile>/deps/it-HASH → target/<profile>/layerwright-worker
    let path = test_binary.parent()?.parent()?.join("layerwright-worker");
    path.is_file().then_some(path)
}

/// Starts a farm with `workers` workers, or `None` (under `skip_privileged()`) when something
/// it needs is missing.
pub fn farm(workers: usize) -> Option<LocalFarm> {
    let Some(binary) = worker_binary() else {
        return skip_or_panic(
            "the layerwright-worker binary is missing beside the test binary: build it first (`cargo build -p \
             layerwright-worker`; `cargo xtask test` does) or set LAYERWRIGHT_WORKER",
        );
    };
    let postgres = LocalPostgres::start()?;
    let bgd = buildgrid_program()?;
    run_checked(Command::new(&bgd).args(["migrate", "apply"]).arg(postgres.connection_string()), COMMAND_TIMEOUT);
    // Every Execute stream and every worker's long poll holds one of BuildGrid's threads (and
    // RPC slots, 10 by default on two cores) for as long as it lasts.
    let execution = format!(
        "thread-pool-size: 64\n\
         connections:\n  - !sql-connection &sql\n    connection-string: {connection}\n    pool-size: 10\n    \
         max-overflow: 10\n\
         schedulers:\n  - !sql-scheduler &scheduler\n    sql: *sql\n    storage: *cas-storage\n    \
         action-cache: *action-cache\n    bot-session-keepalive-timeout: {FARM_BOT_KEEPALIVE_SECONDS}\n    \
         max-job-attempts: 3\n    poll-interval: 0.2\n    bot-poll-interval: 0.2\n    \
         property-set: !dynamic-property-set\n      match-property-keys: [layerwright-step-format]\n    \
         assigners:\n      - !priority-age-assigner\n        count: 2\n        interval: 0.1\n        \
         failure-backoff: 0.5\n",
        connection = postgres.connection_string()
    );
    let buildgrid = start_buildgrid_with(&bgd, &execution)?;
    let worker_dir = tempfile::tempdir().expect("a temp dir for the workers");
    let workers = (0..workers)
        .map(|index| {
            let name = format!("worker-{index}");
            let log = worker_dir.path().join(format!("{name}.log"));
            let child = spawn_server(
                Command::new(&binary)
                    .args(["--reapi", &buildgrid.url(), "--name", &name, "--cache"])
                    .arg(worker_dir.path().join(&name)),
                &log,
            );
            LocalWorker { child, name, log }
        })
        .collect();
    let farm = LocalFarm { workers, buildgrid, postgres, _worker_dir: worker_dir };
    // Every worker has a session before a test submits anything.
    let deadline = Instant::now() + BUILDGRID_START_TIMEOUT;
    while !farm.workers.iter().all(|worker| worker.log().contains("connected: session")) {
        assert!(Instant::now() < deadline, "the workers did not connect:\n{}", farm.logs());
        thread::sleep(Duration::from_millis(100));
    }
    Some(farm)
}

impl LocalFarm {
    /// Every log of the farm, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut logs = String::new();
        for worker in &self.workers {
            logs.push_str(&format!("--- {}:\n{}\n", worker.name, worker.log()));
        }
        let buildgrid = self.buildgrid.log();
        let tail: Vec<&str> = buildgrid.lines().rev().take(200).collect();
        let postgres = self.postgres.log();
        let postgres_tail: Vec<&str> = postgres.lines().rev().take(20).collect();
        logs.push_str(&format!(
            "--- PostgreSQL (last lines):\n{}\n",
            postgres_tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
        logs.push_str(&format!(
            "--- BuildGrid (last lines):\n{}\n",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
        logs
    }
}
