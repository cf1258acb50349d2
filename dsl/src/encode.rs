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
//!
//! A RUN step's mounts are a section appended after everything else, present only when the step
//! has mounts, so that the bytes (and keys) of a RUN step without mounts are those of before
//! mounts existed. A mount encodes its kind and declared options, never contents: a cache mount
//! its id, target, sharing, owner and mode; a tmpfs its target and size; a secret its id,
//! target, owner and mode (never its bytes; one keyed by its digest has a tag of its own, and
//! the builder adds the digest); a bind mount its source path, target and
//! writability (the source image's key or the selected context files' digests enter the key
//! through the builder, as `copy_from` and `copy` sources do); an SSH agent its id and target.

use crate::step::{ConfigChange, CopyOptions, FileOptions, Mount, MountSource, Owner, RunCommand, Step};

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

    fn optional_u32(&mut self, value: Option<u32>) -> &mut Self {
        match value {
            None => self.tag(0),
            Some(value) => self.tag(1).u32(value),
        }
    }

    fn optional_u64(&mut self, value: Option<u64>) -> &mut Self {
        match value {
            None => self.tag(0),
            Some(value) => {
                self.tag(1);
                self.bytes.extend_from_slice(&value.to_le_bytes());
                self
            }
        }
    }

    /// The mounts section of a RUN step: a marker, the count, then each mount tagged by kind.
    fn mounts(&mut self, mounts: &[Mount]) -> &mut Self {
        self.tag(b'M').u32(mounts.len() as u32);
        for mount in mounts {
            match mount {
                Mount::Cache { target, id, sharing, owner, mode } => {
                    self.tag(1).str(id).str(target).tag(sharing.key_byte()).owner(*owner).optional_u32(*mode)
                }
                Mount::Tmpfs { target, size } => self.tag(2).str(target).optional_u64(*size),
                // Keyed by its digest: another tag, so that a secret without the opt-in keeps
                // its bytes; the digest itself enters the key through the builder.
                Mount::Secret { target, id, owner, mode, key_by_digest } => {
                    let tag = if *key_by_digest { 6 } else { 3 };
                    self.tag(tag).str(id).str(target).owner(*owner).optional_u32(*mode)
                }
                Mount::Bind { source, path, target, writable } => {
                    let source_tag = match source {
                        MountSource::Image(_) => 1,
                        MountSource::Context(_) => 2,
                    };
                    self.tag(4).tag(source_tag).str(path).str(target).tag(*writable as u8)
                }
                Mount::Ssh { id, target } => self.tag(5).str(id).str(target),
            };
        }
        self
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
        // Only a RUN step with mounts has this section (see the module docs).
        if let Step::Run(run) = self
            && !run.mounts.is_empty()
        {
            encoder.mounts(&run.mounts);
        }
        encoder.bytes
    }
}

#[cfg(test)]
mod tests {
    use crate::{Context, CopyOptions, FileOptions, Image, Mount, Run, Sharing};

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
    fn a_run_without_mounts_encodes_exactly_as_before_mounts_existed() {
        let run = Run::shell("echo hi").env("A", "1").workdir("/w").user("1:2").network(true);
        let bytes = Image::scratch().run(run).step().encode();
        let mut expected = Vec::new();
        expected.extend_from_slice(&1u32.to_le_bytes()); // ENCODING_VERSION
        expected.push(10); // RUN
        expected.push(1); // shell
        expected.extend_from_slice(&7u64.to_le_bytes());
        expected.extend_from_slice(b"echo hi");
        expected.extend_from_slice(&1u32.to_le_bytes()); // one env pair
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.extend_from_slice(b"A");
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.extend_from_slice(b"1");
        expected.push(1); // workdir
        expected.extend_from_slice(&2u64.to_le_bytes());
        expected.extend_from_slice(b"/w");
        expected.push(1); // user
        expected.extend_from_slice(&3u64.to_le_bytes());
        expected.extend_from_slice(b"1:2");
        expected.push(1); // network
        assert_eq!(bytes, expected);
    }

    #[test]
    fn mounts_append_a_section_and_every_option_changes_it() {
        let base = Image::scratch();
        let plain = encoding(&base.run("make"));
        let with = |mount: Mount| encoding(&base.run(Run::shell("make").mount(mount)));
        let variants = [
            with(Mount::cache("/c")),
            with(Mount::cache("/c").id("other")),
            with(Mount::cache("/d").id("/c")),
            with(Mount::cache("/c").sharing(Sharing::Locked)),
            with(Mount::cache("/c").sharing(Sharing::Private)),
            with(Mount::cache("/c").owner(1, 1)),
            with(Mount::cache("/c").mode(0o700)),
            with(Mount::tmpfs("/c")),
            with(Mount::tmpfs("/c").size(1 << 20)),
            with(Mount::secret("/c", "token")),
            with(Mount::secret("/c", "other")),
            with(Mount::secret("/c", "token").mode(0o444)),
            with(Mount::secret("/c", "token").key_by_digest()),
            with(Mount::bind(&base, "/out", "/c")),
            with(Mount::bind(&base, "/out", "/c").writable()),
            with(Mount::context(&Context::dir("/somewhere").unwrap(), "src", "/c")),
            with(Mount::ssh()),
            encoding(&base.run(Run::shell("make").mount(Mount::tmpfs("/a")).mount(Mount::tmpfs("/b")))),
            encoding(&base.run(Run::shell("make").mount(Mount::tmpfs("/b")).mount(Mount::tmpfs("/a")))),
        ];
        for (index, left) in variants.iter().enumerate() {
            assert!(left.starts_with(&plain), "the section is appended after the mount-less bytes");
            assert_ne!(left, &plain);
            for right in &variants[index + 1..] {
                assert_ne!(left, right);
            }
        }
        // The default id of a cache mount is its target.
        assert_eq!(with(Mount::cache("/c")), with(Mount::cache("/c").id("/c")));
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
