//! RUN mounts for real, on the busybox example base: cache mounts kept across builds and never
//! in a layer, `Locked` and `Private` sharing across concurrent builds, the empty mountpoint a
//! missing target leaves, tmpfs mounts, secrets (whose bytes are searched for in every file of
//! the cache and the outputs), and declarations refused before anything runs.
//!
//! They need root, or user namespaces for a rootless run; without either a test fails saying
//! so, unless `LAYERWRIGHT_SKIP_PRIVILEGED=1`.

use std::io::Read;
use std::path::PathBuf;

use layerwright::cache::{CacheMountOptions, CacheMountSharing};
use layerwright::{Builder, BuiltImage, Image, Mount, Run, Sharing, SshSource};

use crate::support;

fn busybox() -> Image {
    layerwright_examples::busybox(&support::environment()).unwrap_or_else(|error| panic!("declaring busybox: {error}"))
}

/// The top layer's tar members: (path, content of a regular file).
fn top_layer(builder: &Builder, built: &BuiltImage) -> Vec<(String, String)> {
    let layer = built.layers().last().expect("the image has layers");
    let blob = builder.store().open_blob(&layer.digest).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    archive
        .entries()
        .unwrap()
        .map(|member| {
            let mut member = member.unwrap();
            let path = member.path().unwrap().to_string_lossy().into_owned();
            let mut content = String::new();
            let _ = member.read_to_string(&mut content);
            (path, content)
        })
        .collect()
}

fn paths(members: &[(String, String)]) -> Vec<&str> {
    members.iter().map(|(path, _)| path.as_str()).collect()
}

fn content<'a>(members: &'a [(String, String)], path: &str) -> &'a str {
    &members.iter().find(|(member, _)| member == path).unwrap_or_else(|| panic!("no {path} in {members:?}")).1
}

/// The host directories of cache mount `id` in `builder`'s cache.
fn cache_directories(builder: &Builder, id: &str) -> Vec<PathBuf> {
    builder.store().cache_mount_usage().into_iter().filter(|usage| usage.id == id).map(|usage| usage.path).collect()
}

#[test]
fn a_cache_mount_keeps_its_contents_across_builds_and_leaves_only_its_empty_mountpoint_in_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    // `/root` exists (0700); `/root/.cache/tool` does not.
    let step = |round: &str| {
        Run::shell("echo $ROUND >> /root/.cache/tool/seen && cat /root/.cache/tool/seen > /seen")
            .env("ROUND", round)
            .mount(Mount::cache("/root/.cache/tool").id("tool"))
    };
    let Some(first) = support::build_with_runs(&builder, &busybox().run(step("one"))) else { return };
    let members = top_layer(&builder, &first);
    assert_eq!(paths(&members), ["root/", "root/.cache/", "root/.cache/tool/", "seen"], "{members:?}");
    assert_eq!(content(&members, "seen"), "one\n");

    // Another declaration of the step (an unrelated variable changed): it runs again and finds
    // what the first run left.
    let Some(second) = support::build_with_runs(&builder, &busybox().run(step("two"))) else { return };
    let members = top_layer(&builder, &second);
    assert_eq!(paths(&members), ["root/", "root/.cache/", "root/.cache/tool/", "seen"], "{members:?}");
    assert_eq!(content(&members, "seen"), "one\ntwo\n");

    // `cache du` counts it; the directory holds what the steps wrote.
    let directories = cache_directories(&builder, "tool");
    assert_eq!(directories.len(), 1);
    assert_eq!(std::fs::read_to_string(directories[0].join("seen")).unwrap(), "one\ntwo\n");
    assert!(builder.store().disk_usage().parts.get("mounts").is_some_and(|bytes| *bytes > 0));
}

#[test]
fn a_tmpfs_mount_is_empty_sized_and_never_in_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let run = Run::shell(
        "echo scratch > /tmp/x && grep ' /tmp ' /proc/self/mounts | cut -d' ' -f3 > /fs && echo done > /out",
    )
    .mount(Mount::tmpfs("/tmp").size(1 << 20));
    let Some(built) = support::build_with_runs(&builder, &busybox().run(run)) else { return };
    let members = top_layer(&builder, &built);
    // `/tmp` exists in the image: the layer does not even hold its mountpoint.
    assert_eq!(paths(&members), ["fs", "out"], "{members:?}");
    assert_eq!(content(&members, "fs"), "tmpfs\n");
}

/// What [`concurrent_builds`] gives: the cache's directory (removed on drop), a builder on it,
/// and the top layer of each build.
type Concurrent = (tempfile::TempDir, Builder, Vec<Vec<(String, String)>>);

/// Two builds on one cache directory, each in its thread, of steps that differ only in `NAME`
/// and share cache mount `id` with `sharing`; the base is built first.
fn concurrent_builds(sharing: Sharing, id: &str, script: &str) -> Option<Concurrent> {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let base = busybox().run("true");
    let builder = Builder::new(&cache).unwrap();
    support::build_with_runs(&builder, &base)?;
    let threads: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let image =
                base.run(Run::shell(script).env("NAME", name).mount(Mount::cache("/shared").id(id).sharing(sharing)));
            let cache = cache.clone();
            std::thread::spawn(move || {
                let builder = Builder::new(&cache).unwrap();
                let built = builder.build(&image).unwrap_or_else(|error| panic!("build {name}: {error}"));
                top_layer(&builder, &built)
            })
        })
        .collect();
    let layers = threads.into_iter().map(|thread| thread.join().unwrap()).collect();
    Some((dir, builder, layers))
}

#[test]
fn a_locked_cache_mount_serialises_concurrent_builds() {
    let script = "echo begin-$NAME >> /shared/log; sleep 1; echo end-$NAME >> /shared/log; echo $NAME > /done";
    let Some((_dir, builder, _)) = concurrent_builds(Sharing::Locked, "locked", script) else { return };
    let directories = cache_directories(&builder, "locked");
    assert_eq!(directories.len(), 1);
    let log = std::fs::read_to_string(directories[0].join("log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines == ["begin-a", "end-a", "begin-b", "end-b"] || lines == ["begin-b", "end-b", "begin-a", "end-a"],
        "the steps interleaved: {lines:?}"
    );
}

#[test]
fn a_private_cache_mount_gives_each_concurrent_user_its_own_directory() {
    // Deterministic: the test holds the id's first directory while the build runs.
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let options = CacheMountOptions { mode: 0o755, owner: None };
    let held = builder.store().acquire_cache_mount("private", CacheMountSharing::Private, options).unwrap();
    std::fs::write(held.parent().join(held.name()).join("owner"), "the test\n").unwrap();
    let run = Run::shell("cat /p/owner > /seen 2>/dev/null || echo nothing > /seen; echo build > /p/owner")
        .mount(Mount::cache("/p").id("private").sharing(Sharing::Private));
    let Some(built) = support::build_with_runs(&builder, &busybox().run(run)) else { return };
    assert_eq!(content(&top_layer(&builder, &built), "seen"), "nothing\n");
    assert_eq!(std::fs::read_to_string(held.parent().join(held.name()).join("owner")).unwrap(), "the test\n");
    assert_eq!(cache_directories(&builder, "private").len(), 2);
    drop(held);

    // Two concurrent builds: each step sees only what it wrote itself.
    let script = "echo $NAME > /shared/owner; sleep 1; cat /shared/owner > /seen";
    let Some((_dir, builder, layers)) = concurrent_builds(Sharing::Private, "private", script) else { return };
    let seen: Vec<&str> = layers.iter().map(|members| content(members, "seen")).collect();
    assert_eq!(seen, ["a\n", "b\n"]);
    assert!(!cache_directories(&builder, "private").is_empty());
}

#[test]
fn mounts_declared_wrong_fail_the_build_naming_the_step_and_the_target_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let cases = [
        (Run::shell("touch /ran").mount(Mount::cache("relative")), "mount target \"relative\" is not an absolute path"),
        (Run::shell("touch /ran").mount(Mount::tmpfs("/")), "mount target \"/\" is the root"),
        (Run::shell("touch /ran").mount(Mount::cache("/a")).mount(Mount::tmpfs("/a")), "two mounts on \"/a\""),
    ];
    for (run, expected) in cases {
        let error = builder.build(&Image::scratch().run(run)).unwrap_err().to_string();
        assert!(error.contains("RUN touch /ran"), "{error}");
        assert!(error.contains(expected), "{error}");
    }
    // A target that is a file of the image is found when the step runs, before the command.
    let run = Run::shell("touch /ran").mount(Mount::cache("/etc/passwd/x"));
    let image = busybox().run(run);
    if let Err(error) = builder.build(&image) {
        let text = error.to_string();
        if !text.contains("sandbox") {
            assert!(text.contains("RUN touch /ran") && text.contains("/etc/passwd is a file in the image"), "{text}");
        }
    } else {
        panic!("a mount below a file built");
    }
}

/// Every file below `dir` (not following symlinks), with its bytes; gzip blobs also decompressed.
fn files_below(dir: &std::path::Path, found: &mut Vec<(PathBuf, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            files_below(&entry.path(), found);
        } else if kind.is_file() {
            let bytes = std::fs::read(entry.path()).unwrap_or_default();
            let mut decompressed = Vec::new();
            if flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut decompressed).is_ok() {
                found.push((entry.path(), decompressed));
            }
            found.push((entry.path(), bytes));
        }
    }
}

#[test]
fn a_secret_is_read_by_its_step_and_its_bytes_are_in_no_file_of_the_cache_no_layer_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    // Made at run time so that no source file of the test holds it either.
    let secret = format!("lw-secret-{}-{}", std::process::id(), dir.path().display().to_string().len() * 7919);
    std::fs::write(dir.path().join("token.txt"), &secret).unwrap();
    let run = || {
        Run::shell(
            "sha256sum /run/secrets/token | cut -c1-64 > /digest && ls -ln /run/secrets/token | cut -c1-10 > /mode \
             && grep ' /run/secrets/token ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1 > /options",
        )
        .mount(Mount::secret("/run/secrets/token", "token"))
    };

    // Without the secret: an error naming the step and the id, before anything runs.
    let unprovided = Builder::new(dir.path().join("other-cache")).unwrap();
    let error = unprovided.build(&busybox().run(run())).unwrap_err().to_string();
    assert!(error.contains("RUN sha256sum /run/secrets/token") && error.contains("secret \"token\""), "{error}");
    assert!(!dir.path().join("other-cache/logs").exists(), "nothing ran");

    let builder = Builder::new(dir.path().join("cache"))
        .unwrap()
        .secret("token", layerwright::SecretSource::File(dir.path().join("token.txt")));
    let Some(built) = support::build_with_runs(&builder, &busybox().run(run())) else { return };
    let members = top_layer(&builder, &built);
    // The file's mountpoint (and `/run/secrets`, if made for it) are not in the layer.
    assert_eq!(paths(&members), ["digest", "mode", "options"], "{members:?}");
    assert_eq!(format!("sha256:{}", content(&members, "digest").trim()), support::sha256(&secret));
    assert_eq!(content(&members, "mode"), "-r--------\n");
    assert_eq!(content(&members, "options"), "ro\n");

    built.write_oci_archive(dir.path().join("out.tar"), "secret:1").unwrap();
    built.write_oci_layout(dir.path().join("layout"), "secret:1").unwrap();
    let mut files = Vec::new();
    files_below(&dir.path().join("cache"), &mut files);
    files_below(&dir.path().join("layout"), &mut files);
    let archive = std::fs::read(dir.path().join("out.tar")).unwrap();
    files.push((dir.path().join("out.tar"), archive));
    assert!(files.len() > 10, "{} files searched", files.len());
    for (path, bytes) in &files {
        assert!(!bytes.windows(secret.len()).any(|window| window == secret.as_bytes()), "the secret is in {path:?}");
    }
}

/// A case of the image bind mount test: the image, its layer's paths, contents, cached.
type ImageCase<'a> = (Image, Vec<&'a str>, Vec<(&'a str, &'a str)>, bool);

/// A case of the context bind mount test: the image, the context file changed before, the
/// layer's contents, cached.
type ContextCase<'a> = (&'a Image, Option<&'a str>, Vec<(&'a str, &'a str)>, bool);

/// One step built on `builder`: the top layer's members must be exactly `paths`, and each of
/// `contents` (path, content) must be there; returns whether the step came from the cache.
fn check_step(builder: &Builder, image: &Image, paths_expected: &[&str], contents: &[(&str, &str)]) -> Option<bool> {
    let built = support::build_with_runs(builder, image)?;
    let members = top_layer(builder, &built);
    assert_eq!(paths(&members), paths_expected, "{}: {members:?}", image.step().label());
    for (path, expected) in contents {
        assert_eq!(content(&members, path), *expected, "{}: {path}", image.step().label());
    }
    Some(built.steps().last().expect("a step").cached)
}

/// A stage whose `/out` holds `sub/data` with `content` (made by a RUN step, so that the bind
/// mount reads the snapshot of a RUN layer).
fn stage_with(content: &str) -> Image {
    busybox().run(format!("mkdir -p /out/sub && echo {content} > /out/sub/data"))
}

#[test]
fn a_bind_mount_of_an_image_is_keyed_by_its_source_read_only_unless_writable_and_never_in_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let reader =
        "cat /in/sub/data > /seen; if touch /in/x 2>/dev/null; then echo writable; else echo read-only; fi > /ro";
    let read = |stage: &Image| busybox().run(Run::shell(reader).mount(Mount::bind(stage, "/out", "/in")));
    let writer = "echo new > /in/new && cat /in/new /in/sub/data > /wrote";
    let write = |stage: &Image| busybox().run(Run::shell(writer).mount(Mount::bind(stage, "/out", "/in").writable()));
    let after = "if test -e /in/new; then echo present; else echo absent; fi > /after";
    let after_write = |stage: &Image| write(stage).run(Run::shell(after).mount(Mount::bind(stage, "/out", "/in")));
    let file = |stage: &Image| {
        busybox().run(Run::shell("cat /etc/data.txt > /seen").mount(Mount::bind(
            stage,
            "/out/sub/data",
            "/etc/data.txt",
        )))
    };
    let (one, two) = (stage_with("one"), stage_with("two"));
    // (image, layer paths, contents, cached): the mountpoint `/in` is all a bind leaves; a file
    // bind's mountpoint is left out; writes to a writable bind vanish with the step.
    let cases: Vec<ImageCase> = vec![
        (read(&one), vec!["in/", "ro", "seen"], vec![("seen", "one\n"), ("ro", "read-only\n")], false),
        (read(&one), vec!["in/", "ro", "seen"], vec![("seen", "one\n")], true),
        // The source image changed: the step runs again and sees it.
        (read(&two), vec!["in/", "ro", "seen"], vec![("seen", "two\n"), ("ro", "read-only\n")], false),
        (write(&one), vec!["in/", "wrote"], vec![("wrote", "new\none\n")], false),
        (after_write(&one), vec!["after"], vec![("after", "absent\n")], false),
        (file(&two), vec!["seen"], vec![("seen", "two\n")], false),
    ];
    for (image, layer, contents, cached) in cases {
        let Some(was_cached) = check_step(&builder, &image, &layer, &contents) else { return };
        assert_eq!(was_cached, cached, "{}", image.step().label());
    }
    // Why it ran again: its source image changed. (Miss reasons compare with the last step
    // built in the same position, which for a RUN step on busybox is also the stage's RUN: the
    // reader is put on a position of its own.)
    let positioned =
        |stage: &Image| busybox().workdir("/").run(Run::shell(reader).mount(Mount::bind(stage, "/out", "/in")));
    builder.build(&positioned(&stage_with("three"))).unwrap();
    let built = builder.build(&positioned(&stage_with("four"))).unwrap();
    let miss = built.steps().last().and_then(|step| step.miss.clone()).map(|miss| miss.to_string());
    assert_eq!(miss.as_deref(), Some("a source image changed (of the copy_from, or of a bind mount)"));

    // A source path that is not in the source image, or that goes through a symlink: an error
    // naming the step and the path.
    let linked = busybox().run("mkdir -p /real && ln -s /real /out");
    let cases = [
        (
            Mount::bind(&one, "/nope", "/in"),
            "bind mount source \"/nope\" (mounted on \"/in\"): /nope is not in the source image",
        ),
        (
            Mount::bind(&linked, "/out", "/in"),
            "bind mount source \"/out\" (mounted on \"/in\"): /out is a symlink in the source image",
        ),
    ];
    for (mount, expected) in cases {
        let error = builder.build(&busybox().run(Run::shell("touch /ran").mount(mount))).unwrap_err().to_string();
        assert!(error.contains("RUN touch /ran") && error.contains(expected), "{error}");
    }
}

#[test]
fn a_bind_mount_of_the_context_is_its_selection_keyed_by_its_files_and_refuses_symlinks_out_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let context_dir = dir.path().join("context");
    std::fs::create_dir_all(context_dir.join("src")).unwrap();
    std::fs::write(context_dir.join("src/a.txt"), "first\n").unwrap();
    std::fs::write(context_dir.join("src/ignored"), "left out\n").unwrap();
    std::fs::write(context_dir.join(".dockerignore"), "src/ignored\n").unwrap();
    std::fs::create_dir(dir.path().join("outside")).unwrap();
    std::os::unix::fs::symlink("../outside", context_dir.join("escape")).unwrap();
    let context = layerwright::Context::dir(&context_dir).unwrap();
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let script = "ls /src > /listing; cat /src/a.txt > /seen; if touch /src/x 2>/dev/null; then echo writable; else echo read-only; fi > /ro";
    let read = busybox().run(Run::shell(script).mount(Mount::context(&context, "src", "/src")));
    let writable = busybox().run(Run::shell(script).mount(Mount::context(&context, "src", "/src").writable()));
    let layer = ["listing", "ro", "seen", "src/"];
    let cases: Vec<ContextCase> = vec![
        (&read, None, vec![("listing", "a.txt\n"), ("seen", "first\n"), ("ro", "read-only\n")], false),
        // An ignored file changes: not in the mount, not in the key.
        (&read, Some("src/ignored"), vec![("seen", "first\n")], true),
        (&read, Some("src/a.txt"), vec![("seen", "second\n")], false),
        (&writable, None, vec![("ro", "writable\n")], false),
    ];
    for (image, change, contents, cached) in cases {
        if let Some(path) = change {
            std::fs::write(context_dir.join(path), "second\n").unwrap();
        }
        let Some(was_cached) = check_step(&builder, image, &layer, &contents) else { return };
        assert_eq!(was_cached, cached, "after changing {change:?}");
    }
    // Why it ran again: the bound file, by its context path (compared with the last build of
    // this step, not of its writable sibling, which shares its slot).
    std::fs::write(context_dir.join("src/a.txt"), "third\n").unwrap();
    builder.build(&read).unwrap();
    builder.build(&writable).unwrap();
    std::fs::write(context_dir.join("src/a.txt"), "fourth\n").unwrap();
    let built = builder.build(&read).unwrap();
    let miss = built.steps().last().and_then(|step| step.miss.clone()).map(|miss| miss.to_string());
    assert_eq!(miss.as_deref(), Some("context files changed: changed: src/a.txt;"));
    // The writable mount's write went to a throwaway copy.
    assert!(!context_dir.join("src/x").exists());

    let escaping = busybox().run(Run::shell("touch /ran").mount(Mount::context(&context, "escape", "/x")));
    let error = builder.build(&escaping).unwrap_err().to_string();
    assert!(
        error.contains("RUN touch /ran") && error.contains("\"escape\"") && error.contains("leads outside the context"),
        "{error}"
    );
}

/// An `ssh-agent` of the test's own, on a socket in `dir`, holding one new key; stopped on drop.
struct Agent {
    process: std::process::Child,
    socket: PathBuf,
    fingerprint: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn ssh_agent(dir: &std::path::Path) -> Option<Agent> {
    use std::process::Command;
    if !support::tools_present(&["ssh-agent", "ssh-add", "ssh-keygen"]) {
        return support::skip_or_panic("ssh-agent, ssh-add and ssh-keygen (Debian package openssh-client) are needed");
    }
    let socket = dir.join("agent.sock");
    let process =
        Command::new("ssh-agent").arg("-D").arg("-a").arg(&socket).stdout(std::process::Stdio::null()).spawn().unwrap();
    let mut agent = Agent { process, socket, fingerprint: String::new() };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !agent.socket.exists() {
        assert!(std::time::Instant::now() < deadline, "ssh-agent did not make its socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let key = dir.join("key");
    let timeout = std::time::Duration::from_secs(30);
    support::run_checked(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key), timeout);
    support::run_checked(Command::new("ssh-add").arg(&key).env("SSH_AUTH_SOCK", &agent.socket), timeout);
    let listed = support::run_checked(Command::new("ssh-keygen").arg("-lf").arg(key.with_extension("pub")), timeout);
    agent.fingerprint = String::from_utf8_lossy(&listed.stdout).split_whitespace().nth(1).unwrap().to_owned();
    Some(agent)
}

/// The host's `ssh-add` and the shared libraries it loads, as a context laid out as `/`.
fn ssh_add_context(dir: &std::path::Path) -> layerwright::Context {
    let root = dir.join("ssh-add-root");
    let binary = support::require_tool("ssh-add").expect("checked");
    let listed =
        support::run_checked(std::process::Command::new("ldd").arg(&binary), std::time::Duration::from_secs(30));
    let libraries = String::from_utf8_lossy(&listed.stdout)
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
        .map(PathBuf::from)
        .collect::<Vec<_>>();
    for file in libraries.iter().chain([&binary]) {
        let destination = root.join(file.strip_prefix("/").unwrap());
        std::fs::create_dir_all(destination.parent().unwrap()).unwrap();
        std::fs::copy(file, &destination).unwrap();
    }
    layerwright::Context::dir(&root).unwrap()
}

#[test]
fn an_ssh_mount_binds_the_builders_agent_and_a_builder_without_one_fails_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let Some(agent) = ssh_agent(dir.path()) else { return };
    let context = ssh_add_context(dir.path());
    let image = busybox()
        .copy(&context, ".", "/")
        .run(Run::shell("echo $SSH_AUTH_SOCK > /sock && ssh-add -l > /keys").mount(Mount::ssh()));

    // Without the agent: named with the step and the id, before anything runs.
    let without = Builder::new(dir.path().join("other-cache")).unwrap();
    let error = without.build(&image).unwrap_err().to_string();
    assert!(error.contains("RUN echo $SSH_AUTH_SOCK") && error.contains("ssh agent \"default\""), "{error}");
    assert!(!dir.path().join("other-cache/logs").exists(), "nothing ran");
    let not_a_socket =
        Builder::new(dir.path().join("other-cache")).unwrap().ssh("default", SshSource::Socket(dir.path().join("key")));
    let error = not_a_socket.build(&image).unwrap_err().to_string();
    assert!(error.contains("is not a socket"), "{error}");

    let builder =
        Builder::new(dir.path().join("cache")).unwrap().ssh("default", SshSource::Socket(agent.socket.clone()));
    // The socket's file mountpoint (and `/run/layerwright`, made for it) are not in the layer.
    let Some(_) =
        check_step(&builder, &image, &["keys", "sock"], &[("sock", &format!("{}\n", layerwright::SSH_AGENT_TARGET))])
    else {
        return;
    };
    let built = builder.build(&image).unwrap();
    let keys = top_layer(&builder, &built);
    assert!(content(&keys, "keys").contains(&agent.fingerprint), "{keys:?} lacks {}", agent.fingerprint);
}

#[test]
fn a_secret_keyed_by_its_digest_rebuilds_when_it_changes_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token.txt");
    let secret = |round: usize| format!("lw-digest-secret-{}-{round}", std::process::id());
    std::fs::write(&token, secret(1)).unwrap();
    let builder =
        Builder::new(dir.path().join("cache")).unwrap().secret("token", layerwright::SecretSource::File(token.clone()));
    let step = |mount: Mount| busybox().run(Run::shell("wc -c < /run/secrets/token > /length").mount(mount));
    let plain = step(Mount::secret("/run/secrets/token", "token"));
    let keyed = step(Mount::secret("/run/secrets/token", "token").key_by_digest());
    // (which step, the secret's round written before, cached)
    let cases = [("plain", 1, false), ("keyed", 1, false), ("plain", 2, true), ("keyed", 2, false), ("keyed", 2, true)];
    for (which, round, cached) in cases {
        std::fs::write(&token, secret(round)).unwrap();
        let image = if which == "keyed" { &keyed } else { &plain };
        let Some(was_cached) = check_step(&builder, image, &["length"], &[]) else { return };
        assert_eq!(was_cached, cached, "the {which} step after round {round}");
    }
    // The digest entered the key; the bytes are in no file of the cache.
    let mut files = Vec::new();
    files_below(&dir.path().join("cache"), &mut files);
    for round in [1, 2] {
        let bytes = secret(round);
        for (path, content) in &files {
            assert!(
                !content.windows(bytes.len()).any(|window| window == bytes.as_bytes()),
                "the secret is in {path:?}"
            );
        }
    }
}

/// The Debian bookworm minbase `.ci/run` makes, as an image (an OCI layout in `dir`); `None`
/// (after saying why) when skipping without root or without the tarball.
fn debian_minbase(dir: &std::path::Path) -> Option<Image> {
    let minbase = std::path::Path::new(layerwright::host::DEBIAN_MINBASE_TAR);
    if !support::is_root() {
        return support::skip_or_panic("the apt and cargo cache mount tests need root (apt's switch to its _apt user)");
    }
    if !minbase.is_file() {
        return support::skip_or_panic(&format!("{} is missing: run .ci/run, which makes it", minbase.display()));
    }
    let layout = layerwright::host::rootfs_tar_as_oci_layout(minbase, &dir.join("layout")).unwrap();
    Some(Image::from_archive(&layout))
}

#[test]
fn apt_with_cache_mounts_reuses_its_lists_and_packages_when_the_step_changes_and_keeps_them_out_of_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let Some(debian) = debian_minbase(dir.path()) else { return };
    let (sink, lines) = layerwright::testing::output_collector();
    let builder =
        Builder::with_options(dir.path().join("cache"), layerwright::BuilderOptions::default().progress(sink)).unwrap();
    // (packages, whether the package indexes and `hello`'s package must be downloaded): the
    // second run fetches only the signed release files again (`InRelease`), which apt asks
    // for every time.
    for (packages, downloads) in [("hello", true), ("hello libjq1", false)] {
        lines.lock().unwrap().clear();
        let image = layerwright_examples::apt_install_with_cache_mounts(&debian, packages);
        let built = builder.build(&image).unwrap_or_else(|error| panic!("installing {packages}: {error}"));
        let output = lines.lock().unwrap().clone();
        let fetched = |what: &str| output.iter().any(|line| line.starts_with("Get:") && line.contains(what));
        assert_eq!(fetched(" hello "), downloads, "installing {packages}: {output:#?}");
        assert_eq!(fetched(" Packages "), downloads, "installing {packages}: {output:#?}");
        // Nothing of either cache in the layer: at most the mountpoints, which the image has.
        let members = top_layer(&builder, &built);
        let cached: Vec<&str> = paths(&members)
            .into_iter()
            .filter(|path| path.starts_with("var/cache/apt/") || path.starts_with("var/lib/apt/lists/"))
            .collect();
        assert!(cached.is_empty(), "{cached:?}");
        assert!(paths(&members).contains(&"usr/bin/hello"), "{:?}", paths(&members));
    }
    // The packages are kept for the next run.
    let archives = cache_directories(&builder, "/var/cache/apt")[0].join("archives");
    let kept: Vec<String> = std::fs::read_dir(&archives)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".deb"))
        .collect();
    assert!(
        kept.iter().any(|name| name.starts_with("hello_")) && kept.iter().any(|name| name.starts_with("libjq1_")),
        "{kept:?}"
    );
}

/// A workspace of two crates: the binary `greet` and its path dependency `greeting`.
fn write_cargo_workspace(root: &std::path::Path, greeting: &str) {
    let files = [
        ("Cargo.toml", "[workspace]\nmembers = [\"greet\", \"greeting\"]\nresolver = \"2\"\n".to_owned()),
        ("greet/Cargo.toml", "[package]\nname = \"greet\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\ngreeting = { path = \"../greeting\" }\n".to_owned()),
        ("greet/src/main.rs", format!("fn main() {{\n    println!(\"{{}}\", greeting::greeting(\"{greeting}\"));\n}}\n")),
        ("greeting/Cargo.toml", "[package]\nname = \"greeting\"\nversion = \"0.1.0\"\nedition = \"2021\"\n".to_owned()),
        ("greeting/src/lib.rs", "pub fn greeting(name: &str) -> String {\n    format!(\"hello, {name}\")\n}\n".to_owned()),
    ];
    for (path, text) in files {
        std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
        std::fs::write(root.join(path), text).unwrap();
    }
}

#[test]
fn cargo_build_with_cache_mounts_recompiles_only_what_changed_and_keeps_the_target_out_of_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let Some(debian) = debian_minbase(dir.path()) else { return };
    // Debian's own cargo and rustc, installed with the apt caches mounted.
    let rust = layerwright_examples::apt_install_with_cache_mounts(&debian, "cargo");
    let workspace = dir.path().join("workspace");
    let context = layerwright::Context::dir(&workspace).unwrap();
    let (sink, lines) = layerwright::testing::output_collector();
    let builder =
        Builder::with_options(dir.path().join("cache"), layerwright::BuilderOptions::default().progress(sink)).unwrap();
    // (the greeting, the crates compiled): the dependency is compiled once, then found in the
    // target directory's cache mount.
    for (greeting, compiled) in [("world", vec!["greeting", "greet"]), ("cache mounts", vec!["greet"])] {
        write_cargo_workspace(&workspace, greeting);
        let image =
            layerwright_examples::cargo_build_with_cache_mounts(&rust, &context, "greet").run("greet > /greeting");
        lines.lock().unwrap().clear();
        let built = builder.build(&image).unwrap_or_else(|error| panic!("building {greeting}: {error}"));
        let output = lines.lock().unwrap().clone();
        let compiling: Vec<&str> = output
            .iter()
            .filter_map(|line| line.trim().strip_prefix("Compiling "))
            .map(|crate_and_version| crate_and_version.split(' ').next().unwrap_or_default())
            .collect();
        assert_eq!(compiling, compiled, "{output:#?}");
        assert_eq!(content(&top_layer(&builder, &built), "greeting"), format!("hello, {greeting}\n"));
        // The build step's layer: the binary, and of the target directory only its mountpoint.
        let listing = built.listing().unwrap();
        assert!(listing.lines().any(|line| line.ends_with(" /usr/local/bin/greet")), "{listing}");
        let target: Vec<&str> = listing.lines().filter(|line| line.contains(" /src/target/")).collect();
        assert!(target.is_empty(), "{target:?}");
    }
}
