//! The chainable methods of `Image` that add steps (the type itself is defined with the steps
//! it holds, in `step`, since a `copy_from` step holds an image).
//!
//! Each method clones nothing but an `Arc`: the new image points at its parent, and a
//! `copy_from` step points at its source image, so stages share their common prefix and the
//! builder can tell shared steps by identity ([`Image::same_node`]) before it keys them.
//!
//! What this module deliberately is not: a builder or a validator. Declaring an image reads no
//! file, checks no path and never fails; a bad path or a missing archive is reported when the
//! image is built, naming the step that declared it.

use std::path::PathBuf;
use std::sync::Arc;

use crate::Context;
pub use crate::step::Image;
use crate::step::{
    ConfigChange, CopyFromStep, CopyOptions, CopyStep, FileOptions, MkdirStep, Node, Owner, Run, Step, SymlinkStep,
    WriteFileStep,
};

impl Image {
    /// The empty image, with no layers and an empty config (`FROM scratch`).
    ///
    /// ```
    /// use layerwright_dsl::{Image, Step};
    ///
    /// let image = Image::scratch();
    /// assert!(matches!(image.step(), Step::Scratch));
    /// assert!(image.parent().is_none());
    /// ```
    pub fn scratch() -> Image {
        Image::root(Step::Scratch)
    }

    /// A base image from a docker-archive tar (as `docker save` writes it), an OCI archive tar,
    /// or an OCI image layout directory. The format is detected, and the path read, when the
    /// image is built.
    ///
    /// ```
    /// use layerwright_dsl::Image;
    ///
    /// let base = Image::from_archive("images/busybox.tar");
    /// assert_eq!(base.step().label(), "FROM archive images/busybox.tar");
    /// ```
    pub fn from_archive(path: impl Into<PathBuf>) -> Image {
        Image::root(Step::FromArchive { path: path.into() })
    }

    /// A base image from a registry, for example `localhost:5000/base:1` or a reference with a
    /// `@sha256:` digest. The tag is resolved when the image is built.
    ///
    /// ```
    /// use layerwright_dsl::Image;
    ///
    /// let base = Image::pull("localhost:5000/base:1");
    /// assert_eq!(base.step().label(), "FROM localhost:5000/base:1");
    /// ```
    pub fn pull(reference: impl Into<String>) -> Image {
        Image::root(Step::Pull { reference: reference.into() })
    }

    fn root(step: Step) -> Image {
        Image { node: Arc::new(Node { step, parent: None }) }
    }

    /// A new image with `step` on top of this one. The building block of every method below,
    /// public so that code generating declarations need not go through the sugar.
    ///
    /// # Panics
    ///
    /// When `step` is a base step ([`Step::is_base`]): those start an image, see
    /// [`Image::scratch`], [`Image::from_archive`] and [`Image::pull`].
    ///
    /// ```
    /// use layerwright_dsl::{Image, Step};
    ///
    /// let image = Image::scratch().with_step(Step::Remove { path: "/tmp".into() });
    /// assert_eq!(image.step().label(), "REMOVE /tmp");
    /// ```
    pub fn with_step(&self, step: Step) -> Image {
        assert!(!step.is_base(), "a base step ({}) cannot be stacked on an image", step.label());
        Image { node: Arc::new(Node { step, parent: Some(self.clone()) }) }
    }

    /// The step this image adds to its parent (or, for a base, the step it starts from).
    pub fn step(&self) -> &Step {
        &self.node.step
    }

    /// The image this one adds its step to; `None` for a base image.
    pub fn parent(&self) -> Option<&Image> {
        self.node.parent.as_ref()
    }

    /// True when both values are the same declaration node (not merely equal steps).
    pub fn same_node(&self, other: &Image) -> bool {
        Arc::ptr_eq(&self.node, &other.node)
    }

    /// A stable identity of this node for the lifetime of the value, for hash maps.
    pub fn node_id(&self) -> usize {
        Arc::as_ptr(&self.node) as usize
    }

    /// The chain of images from the base up to and including this one.
    pub fn chain(&self) -> Vec<Image> {
        let mut chain = Vec::new();
        let mut current = Some(self.clone());
        while let Some(image) = current {
            current = image.parent().cloned();
            chain.push(image);
        }
        chain.reverse();
        chain
    }

    /// The images this step needs built first: its parent, for `copy_from` its source, and
    /// for a RUN step the source images of its bind mounts ([`crate::Mount::bind`]), in
    /// declaration order.
    pub fn inputs(&self) -> Vec<Image> {
        let mut inputs: Vec<Image> = self.parent().cloned().into_iter().collect();
        match self.step() {
            Step::CopyFrom(copy) => inputs.push(copy.image.clone()),
            Step::Run(run) => inputs.extend(run.bind_images().cloned()),
            _ => {}
        }
        inputs
    }

    /// `COPY src dest` from a build context. A directory source copies its contents into
    /// `dest`; a file source lands at `dest`, or inside it when `dest` ends with `/`. Missing
    /// parent directories are created (0755, root); copied entries keep their permission bits
    /// and are owned by root. `source` is relative to the context root and may not leave it;
    /// files the context's `.dockerignore` excludes are not copied.
    ///
    /// ```
    /// use layerwright_dsl::{Context, Image};
    ///
    /// let context = Context::dir("app")?;
    /// let image = Image::scratch().copy(&context, "src", "/app/src").copy(&context, "Cargo.toml", "/app/");
    /// assert_eq!(image.step().label(), "COPY Cargo.toml /app/");
    /// # Ok::<(), layerwright_dsl::ImagePathError>(())
    /// ```
    pub fn copy(&self, context: &Context, source: &str, destination: &str) -> Image {
        self.copy_with(context, source, destination, CopyOptions::default())
    }

    /// [`Image::copy`] with options: the mode and owner of the copied entries, and whether the
    /// destination directory is replaced rather than merged into.
    pub fn copy_with(&self, context: &Context, source: &str, destination: &str, options: CopyOptions) -> Image {
        self.with_step(Step::Copy(CopyStep {
            context: context.clone(),
            source: source.to_owned(),
            destination: destination.to_owned(),
            options,
        }))
    }

    /// `COPY --from=image src dest`: files from another image's final filesystem, with the same
    /// rules as [`Image::copy`]. `image` is built first (once, however many images use it).
    ///
    /// ```
    /// use layerwright_dsl::Image;
    ///
    /// let build = Image::from_archive("rust.tar").run("cargo build --release");
    /// let app = Image::scratch().copy_from(&build, "/src/target/release/app", "/app");
    /// assert!(app.inputs()[1].same_node(&build));
    /// ```
    pub fn copy_from(&self, image: &Image, source: &str, destination: &str) -> Image {
        self.copy_from_with(image, source, destination, CopyOptions::default())
    }

    /// [`Image::copy_from`] with options, as [`Image::copy_with`].
    pub fn copy_from_with(&self, image: &Image, source: &str, destination: &str, options: CopyOptions) -> Image {
        self.with_step(Step::CopyFrom(CopyFromStep {
            image: image.clone(),
            source: source.to_owned(),
            destination: destination.to_owned(),
            options,
        }))
    }

    /// A regular file at `path` with inline content (mode 0644, owner root unless
    /// `write_file_with`). Missing parent directories are created (0755, root).
    ///
    /// ```
    /// use layerwright_dsl::Image;
    ///
    /// let image = Image::scratch().write_file("/etc/app.conf", b"x=1\n");
    /// assert_eq!(image.step().label(), "WRITE /etc/app.conf (4 bytes)");
    /// ```
    pub fn write_file(&self, path: &str, content: impl AsRef<[u8]>) -> Image {
        self.write_file_with(path, content, FileOptions::default())
    }

    /// [`Image::write_file`] with the file's mode and owner.
    ///
    /// ```
    /// use layerwright_dsl::{FileOptions, Image};
    ///
    /// let script = "#!/bin/sh\necho hi\n";
    /// let image = Image::scratch().write_file_with("/usr/bin/hello", script, FileOptions::mode(0o755));
    /// # let _ = image;
    /// ```
    pub fn write_file_with(&self, path: &str, content: impl AsRef<[u8]>, options: FileOptions) -> Image {
        self.with_step(Step::WriteFile(WriteFileStep {
            path: path.to_owned(),
            content: Arc::from(content.as_ref()),
            options,
        }))
    }

    /// A directory and its missing parents (mode 0755, owner root unless `mkdir_with`).
    ///
    /// ```
    /// use layerwright_dsl::Image;
    ///
    /// let image = Image::scratch().mkdir("/var/lib/app");
    /// assert_eq!(image.step().label(), "MKDIR /var/lib/app");
    /// ```
    pub fn mkdir(&self, path: &str) -> Image {
        self.mkdir_with(path, FileOptions::default())
    }

    /// [`Image::mkdir`] with the directory's mode and owner (missing parents get 0755, root).
    pub fn mkdir_with(&self, path: &str, options: FileOptions) -> Image {
        self.with_step(Step::Mkdir(MkdirStep { path: path.to_owned(), options }))
    }

    /// `link_path` becomes a symbolic link whose target is `target`, stored verbatim (owner
    /// root). A relative target is relative to the link's directory, as usual for symlinks.
    ///
    /// ```
    /// use layerwright_dsl::Image;
    ///
    /// let image = Image::scratch().symlink("/bin/sh", "busybox");
    /// assert_eq!(image.step().label(), "SYMLINK /bin/sh -> busybox");
    /// ```
    pub fn symlink(&self, link_path: &str, target: &str) -> Image {
        self.with_step(Step::Symlink(SymlinkStep {
            link_path: link_path.to_owned(),
            target: target.to_owned(),
            owner: None,
        }))
    }

    /// [`Image::symlink`] with the link owned by `owner`.
    pub fn symlink_owned(&self, link_path: &str, target: &str, owner: Owner) -> Image {
        self.with_step(Step::Symlink(SymlinkStep {
            link_path: link_path.to_owned(),
            target: target.to_owned(),
            owner: Some(owner),
        }))
    }

    /// Deletes `path` (and everything below it) from the image: a whiteout in the new layer.
    ///
    /// ```
    /// use layerwright_dsl::Image;
    ///
    /// let image = Image::from_archive("debian.tar").remove("/var/cache/apt");
    /// assert_eq!(image.step().label(), "REMOVE /var/cache/apt");
    /// ```
    pub fn remove(&self, path: &str) -> Image {
        self.with_step(Step::Remove { path: path.to_owned() })
    }

    /// A RUN step: a shell string (`/bin/sh -c`), an argv array, or a [`Run`] with options.
    /// The command runs in a sandbox on top of this image, without network unless the `Run`
    /// asks for it; the files it changes are the new layer. The image needs what the command
    /// runs (a `scratch` image has no shell).
    ///
    /// ```
    /// use layerwright_dsl::{Image, Run};
    ///
    /// let base = Image::from_archive("busybox.tar");
    /// let shell = base.run("echo hi > /hi");
    /// let argv = base.run(["/bin/touch", "/hi"]);
    /// let networked = base.run(Run::shell("wget -O /data http://example.invalid/data").network(true));
    /// assert_eq!(shell.step().label(), "RUN echo hi > /hi");
    /// assert_eq!(argv.step().label(), r#"RUN ["/bin/touch", "/hi"]"#);
    /// # let _ = networked;
    /// ```
    pub fn run(&self, run: impl Into<Run>) -> Image {
        self.with_step(Step::Run(run.into()))
    }

    /// `ENV key=value`: sets one environment variable of the image config (replacing an
    /// earlier value of `key`), for later RUN steps and the container.
    ///
    /// ```
    /// use layerwright_dsl::Image;
    ///
    /// assert_eq!(Image::scratch().env("RUST_LOG", "info").step().label(), "ENV RUST_LOG=info");
    /// ```
    pub fn env(&self, key: &str, value: &str) -> Image {
        self.config(ConfigChange::Env { key: key.to_owned(), value: value.to_owned() })
    }

    /// `WORKDIR dir`: the working directory of later RUN steps and of the container; a
    /// relative `dir` is relative to the previous one.
    ///
    /// ```
    /// use layerwright_dsl::Image;
    ///
    /// assert_eq!(Image::scratch().workdir("/app").step().label(), "WORKDIR /app");
    /// ```
    pub fn workdir(&self, dir: &str) -> Image {
        self.config(ConfigChange::Workdir(dir.to_owned()))
    }

    /// `USER user`: who later RUN steps and the container run as (`uid[:gid]`, or names that
    /// the image's `/etc/passwd` and `/etc/group` define).
    ///
    /// ```
    /// use layerwright_dsl::Image;
    ///
    /// assert_eq!(Image::scratch().user("1000:1000").step().label(), "USER 1000:1000");
    /// ```
    pub fn user(&self, user: &str) -> Image {
        self.config(ConfigChange::User(user.to_owned()))
    }

    /// `LABEL key=value`: one label of the image config.
    ///
    /// ```
    /// use layerwright_dsl::Image;
    ///
    /// let image = Image::scratch().label("org.opencontainers.image.title", "app");
    /// assert_eq!(image.step().label(), "LABEL org.opencontainers.image.title=app");
    /// ```
    pub fn label(&self, key: &str, value: &str) -> Image {
        self.config(ConfigChange::Label { key: key.to_owned(), value: value.to_owned() })
    }

    /// `EXPOSE`: a port number (TCP) or a `PORT/PROTO` string.
    ///
    /// ```
    /// use layerwright_dsl::Image;
    ///
    /// let image = Image::scratch().expose(8080).expose("53/udp");
    /// assert_eq!(image.parent().unwrap().step().label(), "EXPOSE 8080/tcp");
    /// assert_eq!(image.step().label(), "EXPOSE 53/udp");
    /// ```
    pub fn expose(&self, port: impl ExposedPort) -> Image {
        self.config(ConfigChange::Expose(port.exposed_port()))
    }

    /// `ENTRYPOINT [..]`, exec form: the program the container runs, replacing any earlier one.
    ///
    /// ```
    /// use layerwright_dsl::Image;
    ///
    /// let image = Image::scratch().entrypoint(["/app/bin/app", "--config", "/etc/app.conf"]);
    /// assert_eq!(image.step().label(), r#"ENTRYPOINT ["/app/bin/app", "--config", "/etc/app.conf"]"#);
    /// ```
    pub fn entrypoint<I, S>(&self, argv: I) -> Image
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config(ConfigChange::Entrypoint(argv.into_iter().map(Into::into).collect()))
    }

    /// `CMD [..]`, exec form: the default arguments of the entrypoint (or the default command
    /// when there is none), replacing any earlier one.
    ///
    /// ```
    /// use layerwright_dsl::Image;
    ///
    /// let image = Image::scratch().entrypoint(["/app/bin/app"]).cmd(["--serve"]);
    /// assert_eq!(image.step().label(), r#"CMD ["--serve"]"#);
    /// ```
    pub fn cmd<I, S>(&self, argv: I) -> Image
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config(ConfigChange::Cmd(argv.into_iter().map(Into::into).collect()))
    }

    /// `VOLUME path`: a path the container runtime mounts a volume on.
    pub fn volume(&self, path: &str) -> Image {
        self.config(ConfigChange::Volume(path.to_owned()))
    }

    /// `STOPSIGNAL signal`: the signal that stops the container, for example `SIGTERM`.
    pub fn stop_signal(&self, signal: &str) -> Image {
        self.config(ConfigChange::StopSignal(signal.to_owned()))
    }

    /// Any config change as a step (what [`Image::env`], [`Image::label`] and the others call).
    pub fn config(&self, change: ConfigChange) -> Image {
        self.with_step(Step::Config(change))
    }
}

/// What `expose` accepts: `8080` (TCP) or `"53/udp"`.
pub trait ExposedPort {
    /// The port as the image config spells it: `PORT/PROTO`, TCP when no protocol is given.
    fn exposed_port(self) -> String;
}

impl ExposedPort for u16 {
    fn exposed_port(self) -> String {
        format!("{self}/tcp")
    }
}

impl ExposedPort for &str {
    fn exposed_port(self) -> String {
        if self.contains('/') { self.to_owned() } else { format!("{self}/tcp") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_share_their_prefix_and_are_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Image>();
        assert_send_sync::<Context>();

        let base = Image::scratch().write_file("/a", b"a");
        let left = base.env("A", "1");
        let right = base.copy_from(&left, "/a", "/b");
        assert!(left.parent().unwrap().same_node(&base));
        let inputs = right.inputs();
        assert_eq!(inputs.len(), 2);
        assert!(inputs[0].same_node(&base));
        assert!(inputs[1].same_node(&left));
        assert_eq!(right.chain().len(), 3);
    }

    #[test]
    fn expose_accepts_numbers_and_protocols() {
        let image = Image::scratch().expose(8080).expose("53/udp");
        let Step::Config(ConfigChange::Expose(port)) = image.step() else { panic!() };
        assert_eq!(port, "53/udp");
        let Step::Config(ConfigChange::Expose(port)) = image.parent().unwrap().step() else { panic!() };
        assert_eq!(port, "8080/tcp");
    }
}
