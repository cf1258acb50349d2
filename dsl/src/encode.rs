//! The canonical, versioned byte encoding of a step, which the cache keys hash.
//!
//! Written by hand rather than derived, so that it changes only when we mean it to: every field
//! has a fixed order, integers are little-endian of a fixed width, strings and byte strings are
//! length-prefixed (so no two different steps can encode alike), and options are tagged. Bump
//! [`ENCODING_VERSION`] whenever the encoding or the meaning of a step changes; old cache
//! entries then simply stop matching.
//!
//! What is deliberately *not* encoded: the context's location on disk and the archive path of a
//! `FromArchive` step (their content enters the key instead, so a key does not depend on the
//! working directory), and the source image of `copy_from` (its key enters instead).

use crate::step::{ConfigChange, CopyOptions, FileOptions, Owner, RunCommand, Step};

/// Version of the step encoding; part of every key.
pub const ENCODING_VERSION: u32 = 1;

struct Encoder {
    bytes: Vec<u8>,
}

impl Encoder {
    fn tag(&mut self, tag: u8) -> &mut Self {
        self.bytes.push(tag);
        self
    }

    fn u32(&mut self, value: u32) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    fn bytes(&mut self, value: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(&(value.len() as u64).to_le_bytes());
        self.bytes.extend_from_slice(value);
        self
    }

    fn str(&mut self, value: &str) -> &mut Self {
        self.bytes(value.as_bytes())
    }

    fn strs(&mut self, values: &[String]) -> &mut Self {
        self.u32(values.len() as u32);
        for value in values {
            self.str(value);
        }
        self
    }

    fn optional_str(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            None => self.tag(0),
            Some(value) => self.tag(1).str(value),
        }
    }

    fn owner(&mut self, owner: Option<Owner>) -> &mut Self {
        match owner {
            None => self.tag(0),
            Some(Owner { uid, gid }) => self.tag(1).u32(uid).u32(gid),
        }
    }

    fn file_options(&mut self, options: &FileOptions) -> &mut Self {
        match options.mode {
            None => self.tag(0),
            Some(mode) => self.tag(1).u32(mode),
        };
        self.owner(options.owner)
    }

    fn copy_options(&mut self, options: &CopyOptions) -> &mut Self {
        self.file_options(&options.file).tag(options.replace_directory as u8)
    }
}

impl Step {
    /// The canonical encoding of this step's own definition (see the module docs for what it
    /// leaves to the key).
    pub fn encode(&self) -> Vec<u8> {
        let mut encoder = Encoder { bytes: Vec::with_capacity(64) };
        encoder.u32(ENCODING_VERSION);
        match self {
            Step::Scratch => encoder.tag(1),
            Step::FromArchive { .. } => encoder.tag(2),
            Step::Pull { reference } => encoder.tag(3).str(reference),
            Step::Copy(copy) => encoder.tag(4).str(&copy.source).str(&copy.destination).copy_options(&copy.options),
            Step::CopyFrom(copy) => encoder.tag(5).str(&copy.source).str(&copy.destination).copy_options(&copy.options),
            Step::WriteFile(write) => {
                encoder.tag(6).str(&write.path).bytes(&write.content).file_options(&write.options)
            }
            Step::Mkdir(mkdir) => encoder.tag(7).str(&mkdir.path).file_options(&mkdir.options),
            Step::Symlink(symlink) => encoder.tag(8).str(&symlink.link_path).str(&symlink.target).owner(symlink.owner),
            Step::Remove { path } => encoder.tag(9).str(path),
            Step::Run(run) => {
                encoder.tag(10);
                match &run.command {
                    RunCommand::Shell(command) => encoder.tag(1).str(command),
                    RunCommand::Argv(argv) => encoder.tag(2).strs(argv),
                };
                encoder.u32(run.env.len() as u32);
                for (key, value) in &run.env {
                    encoder.str(key).str(value);
                }
                encoder
                    .optional_str(run.workdir.as_deref())
                    .optional_str(run.user.as_deref())
                    .tag(run.network.key_byte())
            }
            Step::Config(change) => {
                encoder.tag(11);
                match change {
                    ConfigChange::Env { key, value } => encoder.tag(1).str(key).str(value),
                    ConfigChange::Workdir(dir) => encoder.tag(2).str(dir),
                    ConfigChange::User(user) => encoder.tag(3).str(user),
                    ConfigChange::Label { key, value } => encoder.tag(4).str(key).str(value),
                    ConfigChange::Expose(port) => encoder.tag(5).str(port),
                    ConfigChange::Entrypoint(argv) => encoder.tag(6).strs(argv),
                    ConfigChange::Cmd(argv) => encoder.tag(7).strs(argv),
                    ConfigChange::Volume(path) => encoder.tag(8).str(path),
                    ConfigChange::StopSignal(signal) => encoder.tag(9).str(signal),
                }
            }
        };
        encoder.bytes
    }
}

#[cfg(test)]
mod tests {
    use crate::{Context, CopyOptions, FileOptions, Image, Run};

    fn encoding(image: &Image) -> Vec<u8> {
        image.step().encode()
    }

    #[test]
    fn equal_declarations_encode_alike_and_any_change_differs() {
        let base = Image::scratch();
        let context = Context::dir("/somewhere/app").unwrap();
        let elsewhere = Context::dir("/elsewhere/app").unwrap();
        let variants = [
            base.copy(&context, "src", "/app"),
            base.copy(&context, "src", "/ap"),
            base.copy(&context, "sr", "c/app"),
            base.copy_with(&context, "src", "/app", CopyOptions { replace_directory: true, ..Default::default() }),
            base.copy_with(
                &context,
                "src",
                "/app",
                CopyOptions { file: FileOptions::mode(0o600), ..Default::default() },
            ),
            base.write_file("/a", b"x"),
            base.write_file("/a", b"y"),
            base.write_file_with("/a", b"x", FileOptions::default().with_owner(1, 1)),
            base.mkdir("/a"),
            base.symlink("/a", "b"),
            base.symlink("/ab", ""),
            base.remove("/a"),
            base.run("true"),
            base.run(["true"]),
            base.run(Run::shell("true").network(true)),
            base.run(Run::shell("true").host_network()),
            base.env("A", "1"),
            base.env("A1", ""),
            base.label("A", "1"),
            base.cmd(["a", "b"]),
            base.cmd(["a b"]),
            base.entrypoint(["a", "b"]),
        ];
        for (index, left) in variants.iter().enumerate() {
            for right in &variants[index + 1..] {
                assert_ne!(encoding(left), encoding(right), "{} vs {}", left.step().label(), right.step().label());
            }
        }
        // The context's location does not enter the encoding: its files' digests do, elsewhere.
        assert_eq!(encoding(&variants[0]), encoding(&base.copy(&elsewhere, "src", "/app")));
        assert_eq!(encoding(&base.env("A", "1")), encoding(&Image::scratch().env("A", "1")));
    }

    #[test]
    fn the_network_mode_keeps_the_bytes_of_the_old_flag_and_limits_are_not_encoded() {
        let base = Image::scratch();
        // Before `NetworkMode`, the encoding ended with the flag as one byte: 0 off, 1 on.
        let last_byte = |run: Run| *encoding(&base.run(run)).last().unwrap();
        assert_eq!(last_byte(Run::shell("true")), 0);
        assert_eq!(last_byte(Run::shell("true").network(true)), 1);
        assert_eq!(last_byte(Run::shell("true").host_network()), 2);
        let limited = Run::shell("true").network(true).memory_limit(1 << 20).pids_limit(8);
        assert_eq!(encoding(&base.run(limited)), encoding(&base.run(Run::shell("true").network(true))));
    }
}
