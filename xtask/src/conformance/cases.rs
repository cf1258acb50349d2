//! The conformance cases: each a Dockerfile, the build context it needs and the same graph in
//! the DSL. `FROM busybox` is the busybox base the runner loads into the engine; the DSL graph
//! gets the same base as its first argument.

use std::fs;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::Path;

use layerwright::{Context, CopyOptions, Image, Run};

/// One conformance case: a Dockerfile, the context it is built from and the same graph in the
/// DSL.
pub struct Case {
    /// A short name, unique in the table (`NN-what`).
    pub name: &'static str,
    /// The Dockerfile. `FROM busybox` means the busybox base (the runner's busybox base).
    pub dockerfile: &'static str,
    /// Writes the build context's files into the directory it is given.
    pub context: fn(&Path) -> std::io::Result<()>,
    /// The same graph in the DSL, on the given busybox base and build context.
    pub dsl: fn(&Image, &Context) -> Image,
}

/// Writes `content` at `root/path` with permission bits `mode`, creating its parents.
fn file(root: &Path, path: &str, content: &str, mode: u32) -> std::io::Result<()> {
    let path = root.join(path);
    fs::create_dir_all(path.parent().expect("a file has a parent"))?;
    fs::write(&path, content)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
}

/// Creates the symlink `root/path` → `target`.
fn link(root: &Path, path: &str, target: &str) -> std::io::Result<()> {
    let path = root.join(path);
    fs::create_dir_all(path.parent().expect("a link has a parent"))?;
    symlink(target, path)
}

/// An empty context.
fn no_context(_: &Path) -> std::io::Result<()> {
    Ok(())
}

/// A small context: `a.txt`, `dir/` with a nested file and an executable, an empty directory.
fn small_context(root: &Path) -> std::io::Result<()> {
    file(root, "a.txt", "a\n", 0o644)?;
    file(root, "dir/one", "one\n", 0o644)?;
    file(root, "dir/sub/two", "two\n", 0o600)?;
    file(root, "dir/run.sh", "#!/bin/sh\necho hi\n", 0o755)?;
    fs::create_dir_all(root.join("dir/empty"))?;
    fs::set_permissions(root.join("dir/empty"), fs::Permissions::from_mode(0o750))
}

/// `RUN` in the DSL: a shell string, as a Dockerfile's `RUN` line.
fn run(image: &Image, command: &str) -> Image {
    image.run(Run::shell(command))
}

/// `COPY --chown=uid:gid`.
fn chown(uid: u32, gid: u32) -> CopyOptions {
    CopyOptions::default().with_owner(uid, gid)
}

/// Every case, in the order of their names.
pub fn cases() -> Vec<Case> {
    vec![
        // Overlay transitions: one kind of entry replaced by another in a later layer.
        Case {
            name: "01-file-to-dir",
            dockerfile: "FROM busybox\nRUN echo a > /x\nRUN rm /x && mkdir /x && echo b > /x/f\n",
            context: no_context,
            dsl: |base, _| run(&run(base, "echo a > /x"), "rm /x && mkdir /x && echo b > /x/f"),
        },
        Case {
            name: "02-dir-to-file",
            dockerfile: "FROM busybox\nRUN mkdir -p /x/y && echo a > /x/y/f\nRUN rm -r /x && echo b > /x\n",
            context: no_context,
            dsl: |base, _| run(&run(base, "mkdir -p /x/y && echo a > /x/y/f"), "rm -r /x && echo b > /x"),
        },
        Case {
            name: "03-file-to-symlink",
            dockerfile: "FROM busybox\nRUN echo a > /x\nRUN rm /x && ln -s /etc/passwd /x\n",
            context: no_context,
            dsl: |base, _| run(&run(base, "echo a > /x"), "rm /x && ln -s /etc/passwd /x"),
        },
        Case {
            name: "04-symlink-to-file",
            dockerfile: "FROM busybox\nRUN ln -s /etc/passwd /x && ln -s dangling /y\nRUN rm /x /y && echo b > /x && mkdir /y\n",
            context: no_context,
            dsl: |base, _| {
                run(&run(base, "ln -s /etc/passwd /x && ln -s dangling /y"), "rm /x /y && echo b > /x && mkdir /y")
            },
        },
        Case {
            name: "05-dir-to-symlink",
            dockerfile: "FROM busybox\nRUN mkdir -p /d/e && touch /d/e/f\nRUN rm -r /d && ln -s /tmp /d\n",
            context: no_context,
            dsl: |base, _| run(&run(base, "mkdir -p /d/e && touch /d/e/f"), "rm -r /d && ln -s /tmp /d"),
        },
        Case {
            name: "06-symlink-to-dir",
            dockerfile: "FROM busybox\nRUN ln -s /tmp /d\nRUN rm /d && mkdir -p /d/e && echo x > /d/e/f\n",
            context: no_context,
            dsl: |base, _| run(&run(base, "ln -s /tmp /d"), "rm /d && mkdir -p /d/e && echo x > /d/e/f"),
        },
        Case {
            name: "07-file-to-fifo",
            dockerfile: "FROM busybox\nRUN echo a > /x && mkdir /d\nRUN rm /x && mkfifo -m 640 /x /d/p\n",
            context: no_context,
            dsl: |base, _| run(&run(base, "echo a > /x && mkdir /d"), "rm /x && mkfifo -m 640 /x /d/p"),
        },
        Case {
            name: "08-fifo-to-file-and-dir",
            dockerfile: "FROM busybox\nRUN mkfifo /p /q\nRUN rm /p /q && echo a > /p && mkdir /q\n",
            context: no_context,
            dsl: |base, _| run(&run(base, "mkfifo /p /q"), "rm /p /q && echo a > /p && mkdir /q"),
        },
        Case {
            name: "09-file-to-devices",
            dockerfile: "FROM busybox\nRUN touch /c /b\nRUN rm /c /b && mknod -m 600 /c c 1 3 && mknod /b b 7 200\n",
            context: no_context,
            dsl: |base, _| run(&run(base, "touch /c /b"), "rm /c /b && mknod -m 600 /c c 1 3 && mknod /b b 7 200"),
        },
        Case {
            name: "10-devices-to-dir-symlink",
            dockerfile: "FROM busybox\nRUN mknod /c c 1 5 && mknod /b b 7 1\nRUN rm /c /b && mkdir /c && ln -s c /b\n",
            context: no_context,
            dsl: |base, _| run(&run(base, "mknod /c c 1 5 && mknod /b b 7 1"), "rm /c /b && mkdir /c && ln -s c /b"),
        },
        Case {
            name: "11-fifo-to-device",
            dockerfile: "FROM busybox\nRUN mkfifo /p && mknod /c c 1 7\nRUN rm /p /c && mknod /p c 1 8 && mkfifo /c\n",
            context: no_context,
            dsl: |base, _| run(&run(base, "mkfifo /p && mknod /c c 1 7"), "rm /p /c && mknod /p c 1 8 && mkfifo /c"),
        },
        Case {
            name: "12-opaque-dir",
            dockerfile: "FROM busybox\nRUN mkdir -p /d/s && touch /d/a /d/b /d/s/c\nRUN rm -rf /d && mkdir /d && touch /d/c\n",
            context: no_context,
            dsl: |base, _| {
                run(&run(base, "mkdir -p /d/s && touch /d/a /d/b /d/s/c"), "rm -rf /d && mkdir /d && touch /d/c")
            },
        },
        Case {
            name: "13-emptied-dir",
            dockerfile: "FROM busybox\nRUN mkdir -p /d/s && touch /d/a /d/s/c\nRUN rm -rf /d/* && touch /d/new\n",
            context: no_context,
            dsl: |base, _| run(&run(base, "mkdir -p /d/s && touch /d/a /d/s/c"), "rm -rf /d/* && touch /d/new"),
        },
        Case {
            name: "14-rename-file",
            dockerfile: "FROM busybox\nRUN echo a > /a && mkdir /d && echo b > /d/b\nRUN mv /a /renamed && mv /d/b /d/c\n",
            context: no_context,
            dsl: |base, _| {
                run(&run(base, "echo a > /a && mkdir /d && echo b > /d/b"), "mv /a /renamed && mv /d/b /d/c")
            },
        },
        Case {
            name: "15-rename-dir",
            dockerfile: "FROM busybox\nRUN mkdir -p /d/s && echo x > /d/s/f && chmod 711 /d/s\nRUN mv /d /e && mv /e/s /e/t\n",
            context: no_context,
            dsl: |base, _| {
                run(&run(base, "mkdir -p /d/s && echo x > /d/s/f && chmod 711 /d/s"), "mv /d /e && mv /e/s /e/t")
            },
        },
        Case {
            name: "16-rename-base-dir",
            dockerfile: "FROM busybox\nRUN mv /root /root2 && mv /etc/group /etc/group2\n",
            context: no_context,
            dsl: |base, _| run(base, "mv /root /root2 && mv /etc/group /etc/group2"),
        },
        Case {
            name: "17-hardlink-across-layers",
            dockerfile: "FROM busybox\nRUN echo a > /a\nRUN ln /a /b && mkdir /d && ln /a /d/c\n",
            context: no_context,
            dsl: |base, _| run(&run(base, "echo a > /a"), "ln /a /b && mkdir /d && ln /a /d/c"),
        },
        Case {
            name: "18-hardlink-then-chmod",
            dockerfile: "FROM busybox\nRUN echo a > /a && ln /a /b && ln /a /c\nRUN chmod 600 /b\n",
            context: no_context,
            dsl: |base, _| run(&run(base, "echo a > /a && ln /a /b && ln /a /c"), "chmod 600 /b"),
        },
        Case {
            name: "19-hardlink-one-removed",
            dockerfile: "FROM busybox\nRUN echo a > /a && ln /a /b\nRUN rm /a && echo more >> /b\n",
            context: no_context,
            dsl: |base, _| run(&run(base, "echo a > /a && ln /a /b"), "rm /a && echo more >> /b"),
        },
        Case {
            name: "20-metadata-only",
            dockerfile: "FROM busybox\nRUN echo a > /a && mkdir /d\nRUN chmod 700 /a && chown 5:6 /a && chmod 750 /d && chown 7:8 /d\n",
            context: no_context,
            dsl: |base, _| {
                run(
                    &run(base, "echo a > /a && mkdir /d"),
                    "chmod 700 /a && chown 5:6 /a && chmod 750 /d && chown 7:8 /d",
                )
            },
        },
        Case {
            name: "21-delete-recreate",
            dockerfile: "FROM busybox\nRUN echo a > /a && mkdir -p /d/x && ln -s t /l\nRUN rm -rf /a /d /l && echo a > /a && mkdir -p /d/y && ln -s t /l\n",
            context: no_context,
            dsl: |base, _| {
                run(
                    &run(base, "echo a > /a && mkdir -p /d/x && ln -s t /l"),
                    "rm -rf /a /d /l && echo a > /a && mkdir -p /d/y && ln -s t /l",
                )
            },
        },
        Case {
            name: "22-whiteout-base-paths",
            dockerfile: "FROM busybox\nRUN rm -rf /etc/group /tmp /bin/vi /bin/ls\n",
            context: no_context,
            dsl: |base, _| run(base, "rm -rf /etc/group /tmp /bin/vi /bin/ls"),
        },
        Case {
            name: "23-base-file-rewritten",
            dockerfile: "FROM busybox\nRUN echo extra >> /etc/passwd && chmod 600 /etc/group && touch /bin\n",
            context: no_context,
            dsl: |base, _| run(base, "echo extra >> /etc/passwd && chmod 600 /etc/group && touch /bin"),
        },
        Case {
            name: "24-setuid-setgid-sticky",
            dockerfile: "FROM busybox\nRUN mkdir -p /s/t /s/g && echo x > /s/u && echo y > /s/gf && chmod 4755 /s/u && chmod 2711 /s/gf && chmod 1777 /s/t && chmod 2775 /s/g && chown 10:20 /s/u\n",
            context: no_context,
            dsl: |base, _| {
                run(
                    base,
                    "mkdir -p /s/t /s/g && echo x > /s/u && echo y > /s/gf && chmod 4755 /s/u && chmod 2711 /s/gf && chmod 1777 /s/t && chmod 2775 /s/g && chown 10:20 /s/u",
                )
            },
        },
        Case {
            name: "25-sparse-file",
            dockerfile: "FROM busybox\nRUN dd if=/dev/zero of=/sparse bs=1 count=0 seek=8M 2>/dev/null && echo end >> /sparse && truncate -s 3M /holes\n",
            context: no_context,
            dsl: |base, _| {
                run(
                    base,
                    "dd if=/dev/zero of=/sparse bs=1 count=0 seek=8M 2>/dev/null && echo end >> /sparse && truncate -s 3M /holes",
                )
            },
        },
        Case {
            name: "26-long-names",
            dockerfile: "FROM busybox\nRUN n=$(printf 'n%.0s' $(seq 1 200)) && mkdir -p /l/$n/$n && echo x > /l/$n/$n/$n && ln -s /l/$n/$n/$n /l/s && ln /l/$n/$n/$n /l/h\n",
            context: no_context,
            dsl: |base, _| {
                run(
                    base,
                    "n=$(printf 'n%.0s' $(seq 1 200)) && mkdir -p /l/$n/$n && echo x > /l/$n/$n/$n && ln -s /l/$n/$n/$n /l/s && ln /l/$n/$n/$n /l/h",
                )
            },
        },
        Case {
            name: "27-odd-names",
            dockerfile: "FROM busybox\nRUN mkdir /n && touch '/n/sp ace' '/n/ünï' \"$(printf '/n/tab\\tx')\" '/n/-dash' '/n/.hidden' '/n/a\\b'\n",
            context: no_context,
            dsl: |base, _| {
                run(
                    base,
                    "mkdir /n && touch '/n/sp ace' '/n/ünï' \"$(printf '/n/tab\\tx')\" '/n/-dash' '/n/.hidden' '/n/a\\b'",
                )
            },
        },
        Case {
            name: "28-umask-and-modes",
            dockerfile: "FROM busybox\nRUN mkdir /m && touch /m/default && mkdir /m/dd && (umask 077 && touch /m/private && mkdir /m/pd)\n",
            context: no_context,
            dsl: |base, _| {
                run(
                    base,
                    "mkdir /m && touch /m/default && mkdir /m/dd && (umask 077 && touch /m/private && mkdir /m/pd)",
                )
            },
        },
        // Config.
        Case {
            name: "29-config-fields",
            dockerfile: "FROM busybox\nENV A=1\nENV B=\"x y\"\nLABEL org.example.a=one\nLABEL b=two\nEXPOSE 8080\nEXPOSE 53/udp\nVOLUME /data\nSTOPSIGNAL SIGINT\nENTRYPOINT [\"/bin/sh\", \"-c\"]\nCMD [\"echo hi\"]\n",
            context: no_context,
            dsl: |base, _| {
                base.env("A", "1")
                    .env("B", "x y")
                    .label("org.example.a", "one")
                    .label("b", "two")
                    .expose(8080)
                    .expose("53/udp")
                    .volume("/data")
                    .stop_signal("SIGINT")
                    .entrypoint(["/bin/sh", "-c"])
                    .cmd(["echo hi"])
            },
        },
        Case {
            name: "30-env-in-run",
            dockerfile: "FROM busybox\nENV X=1 PATH=/opt/bin:/bin\nRUN echo \"$X $PATH $HOME\" > /env && env | sort > /envs\n",
            context: no_context,
            dsl: |base, _| {
                run(
                    &base.env("X", "1").env("PATH", "/opt/bin:/bin"),
                    "echo \"$X $PATH $HOME\" > /env && env | sort > /envs",
                )
            },
        },
        Case {
            name: "31-workdir-created",
            dockerfile: "FROM busybox\nWORKDIR /a/b/c\nRUN pwd > here\n",
            context: no_context,
            dsl: |base, _| run(&base.workdir("/a/b/c"), "pwd > here"),
        },
        Case {
            name: "32-workdir-relative",
            dockerfile: "FROM busybox\nWORKDIR /a\nWORKDIR b\nRUN pwd > /here\n",
            context: no_context,
            dsl: |base, _| run(&base.workdir("/a").workdir("b"), "pwd > /here"),
        },
        Case {
            name: "33-workdir-only",
            dockerfile: "FROM busybox\nWORKDIR /w\n",
            context: no_context,
            dsl: |base, _| base.workdir("/w"),
        },
        Case {
            name: "34-user-numeric",
            dockerfile: "FROM busybox\nUSER 1000:1000\nRUN touch /tmp/mine && id > /tmp/id\n",
            context: no_context,
            dsl: |base, _| run(&base.user("1000:1000"), "touch /tmp/mine && id > /tmp/id"),
        },
        Case {
            name: "35-user-by-name",
            dockerfile: "FROM busybox\nRUN echo 'app:x:1234:2345::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:2345:' >> /etc/group && echo 'extra:x:3456:app' >> /etc/group && mkdir -p /home/app && chown 1234:2345 /home/app\nUSER app\nRUN id > /home/app/id && touch /home/app/x && echo $HOME > /home/app/home\n",
            context: no_context,
            dsl: |base, _| {
                run(
                    &run(
                        base,
                        "echo 'app:x:1234:2345::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:2345:' >> /etc/group && echo 'extra:x:3456:app' >> /etc/group && mkdir -p /home/app && chown 1234:2345 /home/app",
                    )
                    .user("app"),
                    "id > /home/app/id && touch /home/app/x && echo $HOME > /home/app/home",
                )
            },
        },
        Case {
            name: "36-user-name-and-group",
            dockerfile: "FROM busybox\nRUN echo 'app:x:1234:2345::/tmp:/bin/sh' >> /etc/passwd && echo 'grp:x:777:' >> /etc/group\nUSER app:grp\nRUN id > /tmp/id && touch /tmp/x\n",
            context: no_context,
            dsl: |base, _| {
                run(
                    &run(
                        base,
                        "echo 'app:x:1234:2345::/tmp:/bin/sh' >> /etc/passwd && echo 'grp:x:777:' >> /etc/group",
                    )
                    .user("app:grp"),
                    "id > /tmp/id && touch /tmp/x",
                )
            },
        },
        // COPY.
        Case {
            name: "37-copy-dir-contents",
            dockerfile: "FROM busybox\nCOPY dir /dest/\nCOPY dir /other\n",
            context: small_context,
            dsl: |base, context| base.copy(context, "dir", "/dest/").copy(context, "dir", "/other"),
        },
        Case {
            name: "38-copy-file-trailing-slash",
            dockerfile: "FROM busybox\nCOPY a.txt /dest/\nCOPY a.txt /renamed.txt\nCOPY dir/one /new/dir/\n",
            context: small_context,
            dsl: |base, context| {
                base.copy(context, "a.txt", "/dest/").copy(context, "a.txt", "/renamed.txt").copy(
                    context,
                    "dir/one",
                    "/new/dir/",
                )
            },
        },
        Case {
            name: "39-copy-chown",
            dockerfile: "FROM busybox\nCOPY --chown=1000:1001 dir /app\nCOPY --chown=7:7 a.txt /app/sub/\n",
            context: small_context,
            dsl: |base, context| {
                base.copy_with(context, "dir", "/app", chown(1000, 1001)).copy_with(
                    context,
                    "a.txt",
                    "/app/sub/",
                    chown(7, 7),
                )
            },
        },
        Case {
            name: "40-copy-whole-context",
            dockerfile: "FROM busybox\nCOPY . /app\n",
            context: small_context,
            dsl: |base, context| base.copy(context, ".", "/app"),
        },
        Case {
            name: "41-copy-symlinks-in-context",
            dockerfile: "FROM busybox\nCOPY . /app/\nCOPY link /single\n",
            context: |root| {
                file(root, "target.txt", "t\n", 0o644)?;
                link(root, "link", "target.txt")?;
                link(root, "sub/up", "../target.txt")?;
                link(root, "dangling", "nowhere")?;
                link(root, "dirlink", "sub")
            },
            dsl: |base, context| base.copy(context, ".", "/app/").copy(context, "link", "/single"),
        },
        Case {
            name: "42-copy-hardlinks-in-context",
            dockerfile: "FROM busybox\nCOPY . /app\n",
            context: |root| {
                file(root, "one", "same\n", 0o644)?;
                fs::create_dir_all(root.join("d"))?;
                fs::hard_link(root.join("one"), root.join("d/two"))?;
                fs::hard_link(root.join("one"), root.join("three"))
            },
            dsl: |base, context| base.copy(context, ".", "/app"),
        },
        Case {
            name: "43-dockerignore-exceptions",
            dockerfile: "FROM busybox\nCOPY . /app\n",
            context: |root| {
                file(root, ".dockerignore", "*.log\n!keep.log\nsecret/\ndocs/**/*.md\n!docs/README.md\n", 0o644)?;
                file(root, "a.log", "a\n", 0o644)?;
                file(root, "keep.log", "k\n", 0o644)?;
                file(root, "secret/key", "s\n", 0o600)?;
                file(root, "docs/README.md", "r\n", 0o644)?;
                file(root, "docs/x/y.md", "y\n", 0o644)?;
                file(root, "docs/x/y.txt", "y\n", 0o644)?;
                file(root, "src/main.rs", "fn main() {}\n", 0o644)
            },
            dsl: |base, context| base.copy(context, ".", "/app"),
        },
        Case {
            name: "44-copy-merges-into-existing",
            dockerfile: "FROM busybox\nRUN mkdir -p /app/sub && echo old > /app/old && echo old > /app/one && chmod 700 /app\nCOPY dir /app\n",
            context: small_context,
            dsl: |base, context| {
                run(base, "mkdir -p /app/sub && echo old > /app/old && echo old > /app/one && chmod 700 /app")
                    .copy(context, "dir", "/app")
            },
        },
        Case {
            name: "45-copy-over-file-and-symlink",
            dockerfile: "FROM busybox\nRUN mkdir -p /app/sub && echo old > /app/one && ln -s /etc /app/run.sh\nCOPY dir /app\n",
            context: small_context,
            dsl: |base, context| {
                run(base, "mkdir -p /app/sub && echo old > /app/one && ln -s /etc /app/run.sh")
                    .copy(context, "dir", "/app")
            },
        },
        Case {
            name: "46-copy-from-stage",
            dockerfile: "FROM busybox AS build\nRUN mkdir -p /out/bin && echo tool > /out/bin/tool && chmod 4750 /out/bin/tool && ln -s tool /out/bin/t && chown -R 3:4 /out\nFROM busybox\nCOPY --from=build /out /opt/\nCOPY --from=build /out/bin/tool /usr/local/bin/\n",
            context: no_context,
            dsl: |base, _| {
                let build = run(
                    base,
                    "mkdir -p /out/bin && echo tool > /out/bin/tool && chmod 4750 /out/bin/tool && ln -s tool /out/bin/t && chown -R 3:4 /out",
                );
                base.copy_from(&build, "/out", "/opt/").copy_from(&build, "/out/bin/tool", "/usr/local/bin/")
            },
        },
        Case {
            name: "47-scratch-copy",
            dockerfile: "FROM scratch\nCOPY dir /\nCOPY a.txt /etc/\n",
            context: small_context,
            dsl: |_, context| Image::scratch().copy(context, "dir", "/").copy(context, "a.txt", "/etc/"),
        },
        Case {
            name: "48-copy-then-run-changes",
            dockerfile: "FROM busybox\nCOPY dir /app\nRUN chmod 600 /app/one && rm /app/run.sh && mv /app/sub /app/moved\n",
            context: small_context,
            dsl: |base, context| {
                run(
                    &base.copy(context, "dir", "/app"),
                    "chmod 600 /app/one && rm /app/run.sh && mv /app/sub /app/moved",
                )
            },
        },
        Case {
            name: "49-non-utf8-context",
            dockerfile: "FROM busybox\nCOPY . /app\n",
            context: |root| {
                let name = std::ffi::OsStr::from_bytes(b"caf\xe9");
                fs::write(root.join(name), "latin-1\n")?;
                file(root, "sp ace", "s\n", 0o644)
            },
            dsl: |base, context| base.copy(context, ".", "/app"),
        },
        Case {
            name: "50-non-utf8-run-names",
            dockerfile: "FROM busybox\nRUN mkdir /n && echo x > \"$(printf '/n/\\377\\376')\"\n",
            context: no_context,
            dsl: |base, _| run(base, "mkdir /n && echo x > \"$(printf '/n/\\377\\376')\""),
        },
        // The DSL's own file steps against the RUN lines that do the same.
        Case {
            name: "51-write-file-into-existing-dirs",
            dockerfile: "FROM busybox\nRUN mkdir -m 700 /private && chown 4:4 /private\nRUN printf 'x=1\\n' > /tmp/app.conf && printf 'y\\n' > /private/y && chmod 600 /private/y\n",
            context: no_context,
            dsl: |base, _| {
                run(base, "mkdir -m 700 /private && chown 4:4 /private")
                    .write_file("/tmp/app.conf", "x=1\n")
                    .write_file_with("/private/y", "y\n", layerwright::FileOptions::mode(0o600))
            },
        },
        Case {
            name: "52-remove-base-paths",
            dockerfile: "FROM busybox\nRUN rm /etc/group && rm -r /root\n",
            context: no_context,
            dsl: |base, _| base.remove("/etc/group").remove("/root"),
        },
        Case {
            name: "53-mkdir-and-symlink-steps",
            dockerfile: "FROM busybox\nRUN mkdir -p /a/b && chmod 711 /a/b && ln -s /a/b /tmp/l && ln -s ../etc /a/e\n",
            context: no_context,
            dsl: |base, _| {
                base.mkdir_with("/a/b", layerwright::FileOptions::mode(0o711))
                    .symlink("/tmp/l", "/a/b")
                    .symlink("/a/e", "../etc")
            },
        },
        Case {
            name: "54-copy-into-sticky-tmp",
            dockerfile: "FROM busybox\nCOPY a.txt /tmp/\nCOPY --chown=9:9 dir /tmp/dir\n",
            context: small_context,
            dsl: |base, context| {
                base.copy(context, "a.txt", "/tmp/").copy_with(context, "dir", "/tmp/dir", chown(9, 9))
            },
        },
    ]
}
