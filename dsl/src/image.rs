//! `Image`: an immutable node of the step graph, with the chainable methods that add steps.
//!
//! Each method clones nothing but an `Arc`: the new image points at its parent, and a
//! `copy_from` step points at its source image, so stages share their common prefix and the
//! builder can tell shared steps by identity ([`Image::same_node`]) before it keys them.

use std::path::PathBuf;
use std::sync::Arc;

use crate::Context;
use crate::step::{
    ConfigChange, CopyFromStep, CopyOptions, CopyStep, FileOptions, MkdirStep, Owner, Run, Step, SymlinkStep,
    WriteFileStep,
};

#[derive(Debug)]
struct Node {
    step: Step,
    parent: Option<Image>,
}

/// An image declaration: a step on top of a parent image. Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Image {
    node: Arc<Node>,
}

impl Image {
    /// The empty image, with no layers and an empty config.
    pub fn scratch() -> Image {
        Image::root(Step::Scratch)
    }

    /// A base image from a docker-archive tar (as `docker save` writes it), an OCI archive tar,
    /// or an OCI image layout directory. The format is detected when the image is built.
    pub fn from_archive(path: impl Into<PathBuf>) -> Image {
        Image::root(Step::FromArchive { path: path.into() })
    }

    /// A base image from a registry, for example `localhost:5000/base:1`.
    pub fn pull(reference: impl Into<String>) -> Image {
        Image::root(Step::Pull { reference: reference.into() })
    }

    fn root(step: Step) -> Image {
        Image { node: Arc::new(Node { step, parent: None }) }
    }

    /// A new image with `step` on top of this one. The building block of every method below,
    /// public so that code generating declarations need not go through the sugar.
    pub fn with_step(&self, step: Step) -> Image {
        assert!(!step.is_base(), "a base step ({}) cannot be stacked on an image", step.label());
        Image { node: Arc::new(Node { step, parent: Some(self.clone()) }) }
    }

    pub fn step(&self) -> &Step {
        &self.node.step
    }

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

    /// The images this step needs built first: its parent and, for `copy_from`, its source.
    pub fn inputs(&self) -> Vec<Image> {
        let mut inputs: Vec<Image> = self.parent().cloned().into_iter().collect();
        if let Step::CopyFrom(copy) = self.step() {
            inputs.push(copy.image.clone());
        }
        inputs
    }

    /// `COPY src dest` from a build context. A directory source copies its contents into
    /// `dest`; a file source lands at `dest`, or inside it when `dest` ends with `/`.
    pub fn copy(&self, context: &Context, source: &str, destination: &str) -> Image {
        self.copy_with(context, source, destination, CopyOptions::default())
    }

    pub fn copy_with(&self, context: &Context, source: &str, destination: &str, options: CopyOptions) -> Image {
        self.with_step(Step::Copy(CopyStep {
            context: context.clone(),
            source: source.to_owned(),
            destination: destination.to_owned(),
            options,
        }))
    }

    /// `COPY --from=image src dest`: files from another image's final filesystem.
    pub fn copy_from(&self, image: &Image, source: &str, destination: &str) -> Image {
        self.copy_from_with(image, source, destination, CopyOptions::default())
    }

    pub fn copy_from_with(&self, image: &Image, source: &str, destination: &str, options: CopyOptions) -> Image {
        self.with_step(Step::CopyFrom(CopyFromStep {
            image: image.clone(),
            source: source.to_owned(),
            destination: destination.to_owned(),
            options,
        }))
    }

    /// A regular file with inline content (mode 0644, owner root unless `write_file_with`).
    pub fn write_file(&self, path: &str, content: impl AsRef<[u8]>) -> Image {
        self.write_file_with(path, content, FileOptions::default())
    }

    pub fn write_file_with(&self, path: &str, content: impl AsRef<[u8]>, options: FileOptions) -> Image {
        self.with_step(Step::WriteFile(WriteFileStep {
            path: path.to_owned(),
            content: Arc::from(content.as_ref()),
            options,
        }))
    }

    /// A directory and its missing parents (mode 0755, owner root unless `mkdir_with`).
    pub fn mkdir(&self, path: &str) -> Image {
        self.mkdir_with(path, FileOptions::default())
    }

    pub fn mkdir_with(&self, path: &str, options: FileOptions) -> Image {
        self.with_step(Step::Mkdir(MkdirStep { path: path.to_owned(), options }))
    }

    /// `link_path` becomes a symbolic link whose target is `target`, stored verbatim.
    pub fn symlink(&self, link_path: &str, target: &str) -> Image {
        self.with_step(Step::Symlink(SymlinkStep {
            link_path: link_path.to_owned(),
            target: target.to_owned(),
            owner: None,
        }))
    }

    pub fn symlink_owned(&self, link_path: &str, target: &str, owner: Owner) -> Image {
        self.with_step(Step::Symlink(SymlinkStep {
            link_path: link_path.to_owned(),
            target: target.to_owned(),
            owner: Some(owner),
        }))
    }

    /// Deletes `path` (and everything below it) from the image: a whiteout in the new layer.
    pub fn remove(&self, path: &str) -> Image {
        self.with_step(Step::Remove { path: path.to_owned() })
    }

    /// A RUN step: a shell string (`/bin/sh -c`), an argv array, or a [`Run`] with options.
    pub fn run(&self, run: impl Into<Run>) -> Image {
        self.with_step(Step::Run(run.into()))
    }

    pub fn env(&self, key: &str, value: &str) -> Image {
        self.config(ConfigChange::Env { key: key.to_owned(), value: value.to_owned() })
    }

    pub fn workdir(&self, dir: &str) -> Image {
        self.config(ConfigChange::Workdir(dir.to_owned()))
    }

    pub fn user(&self, user: &str) -> Image {
        self.config(ConfigChange::User(user.to_owned()))
    }

    pub fn label(&self, key: &str, value: &str) -> Image {
        self.config(ConfigChange::Label { key: key.to_owned(), value: value.to_owned() })
    }

    /// `EXPOSE`: a port number (TCP) or a `PORT/PROTO` string.
    pub fn expose(&self, port: impl ExposedPort) -> Image {
        self.config(ConfigChange::Expose(port.exposed_port()))
    }

    pub fn entrypoint<I, S>(&self, argv: I) -> Image
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config(ConfigChange::Entrypoint(argv.into_iter().map(Into::into).collect()))
    }

    pub fn cmd<I, S>(&self, argv: I) -> Image
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config(ConfigChange::Cmd(argv.into_iter().map(Into::into).collect()))
    }

    pub fn volume(&self, path: &str) -> Image {
        self.config(ConfigChange::Volume(path.to_owned()))
    }

    pub fn stop_signal(&self, signal: &str) -> Image {
        self.config(ConfigChange::StopSignal(signal.to_owned()))
    }

    pub fn config(&self, change: ConfigChange) -> Image {
        self.with_step(Step::Config(change))
    }
}

/// What `expose` accepts: `8080` (TCP) or `"53/udp"`.
pub trait ExposedPort {
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
