//! The subcommands and their arguments (clap), and what they resolve to: paths given on the
//! command line are relative to the directory the command was started in; defaults are under
//! the workspace root.

use std::path::{Path, PathBuf};

use super::build::{Attestations, BuildCommand, OutputSpec, parse_compression};
use crate::{Compression, Platform};

/// The subcommands of [`crate::cli::main`]. A binary with commands of its own flattens these
/// into its clap enum (`#[command(flatten)]`) and hands them to [`crate::cli::execute`].
#[derive(Debug, Clone, clap::Subcommand)]
#[non_exhaustive]
pub enum Command {
    /// Build an image and write it out (default: docker-archive:target/images/NAME.tar).
    /// Boxed: its many options would make every command as large as it.
    BuildImage(Box<BuildImageArgs>),
    /// List the images.
    List,
    /// Build an image and show its config, its layers and what each layer holds.
    Inspect(InspectArgs),
    /// Show or shrink the build cache.
    Cache(CacheArgs),
}

/// `build-image NAME [--output SPEC].. [--tag REF] [--cache DIR] [--compression C] [--push REF
/// [--insecure]] [--cache-from REF].. [--cache-to REF]`.
#[derive(Debug, Clone, clap::Args)]
#[non_exhaustive]
pub struct BuildImageArgs {
    /// The image's name (`list` shows them).
    pub name: String,
    /// oci:DIR, oci-archive:FILE or docker-archive:FILE; may be repeated. Default:
    /// docker-archive:target/images/NAME.tar under the workspace root.
    #[arg(long = "output", value_name = "SPEC")]
    pub outputs: Vec<OutputSpec>,
    /// The tag written into the outputs. Default: NAME:latest
    #[arg(long, value_name = "REF")]
    pub tag: Option<String>,
    /// The cache directory. Default: target/layerwright under the workspace root.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// The layers' compression: gzip, zstd or none.
    #[arg(long, default_value = "gzip", value_parser = parse_compression, value_name = "C")]
    pub compression: Compression,
    /// Also push the image to a registry: `registry/repository[:tag]`. Registries on
    /// localhost or 127.0.0.1 are spoken to in plain HTTP; credentials come from
    /// ~/.docker/config.json.
    #[arg(long, value_name = "REF")]
    pub push: Option<String>,
    /// Plain HTTP for a --push to a registry that is not on this machine.
    #[arg(long, requires = "push")]
    pub insecure: bool,
    /// A remote cache in a registry (registry/repository:tag) to take steps from when they
    /// miss locally; may be repeated (asked in order).
    #[arg(long = "cache-from", value_name = "REF")]
    pub cache_from: Vec<String>,
    /// A remote cache to export every step's record to after the build (uploading only the
    /// blobs the registry lacks). An unreachable cache is a warning, never a failed build.
    #[arg(long = "cache-to", value_name = "REF")]
    pub cache_to: Option<String>,
    /// A REAPI server (BuildGrid, Buildbarn, ...) as a shared step cache: http://HOST:PORT
    /// (plaintext) or https://HOST:PORT (TLS). Steps that miss locally are looked up in its
    /// action cache; the steps this build executes are uploaded to it. An unreachable server
    /// is a warning, never a failed build.
    #[arg(long, value_name = "URL")]
    pub reapi: Option<String>,
    /// The REAPI instance name (default: the server's default instance, "").
    #[arg(long = "reapi-instance", value_name = "NAME", requires = "reapi", default_value = "")]
    pub reapi_instance: String,
    /// Run RUN steps on the workers of the --reapi server (`layerwright-worker`s registered
    /// with BuildGrid); file steps and RUN steps with mounts run here. A failing farm is one
    /// warning, and the rest of the build runs here.
    #[arg(long = "reapi-execute")]
    pub reapi_execute: bool,
    /// Also load the image into the Docker engine at DOCKER_HOST, sending only the layers it
    /// lacks (of an index: the image for this host's platform).
    #[arg(long)]
    pub load: bool,
    /// Build for these platforms (os/arch[/variant], comma-separated): one gives a plain image,
    /// several an OCI image index (not a docker-archive).
    #[arg(long, value_delimiter = ',', value_parser = parse_platform, value_name = "P,..")]
    pub platform: Vec<Platform>,
    /// Attach an SLSA provenance statement and an SPDX SBOM to a single-platform build too: the
    /// output becomes an image index of the image and its attestations (an OCI output, --push or
    /// --load; not a docker-archive). Several platforms get them without asking.
    #[arg(long, conflicts_with = "no_attest")]
    pub attest: bool,
    /// Leave the attestations out of a build for several platforms.
    #[arg(long)]
    pub no_attest: bool,
    /// Keep running: rebuild (and deliver to the outputs, --load and --push) whenever a file the
    /// image reads changes. Ctrl-C stops.
    #[arg(long)]
    pub watch: bool,
    /// A secret RUN steps may mount (`Mount::secret`): `id=ID,src=FILE` (a file, relative to the
    /// current directory) or `id=ID,env=VAR` (an environment variable); may be repeated. Its
    /// bytes never enter the cache, a layer or the output.
    #[arg(long = "secret", value_parser = parse_secret, value_name = "id=ID,src=FILE|env=VAR")]
    pub secrets: Vec<(String, crate::SecretSource)>,
    /// An SSH agent RUN steps may mount (`Mount::ssh`), as `docker build --ssh`: `ID` (this
    /// process's `SSH_AUTH_SOCK`, usually `default`) or `ID=SOCKET` (a socket, relative to the
    /// current directory); may be repeated. None unless given.
    #[arg(long = "ssh", value_parser = parse_ssh, value_name = "ID[=SOCKET]")]
    pub ssh_agents: Vec<(String, crate::SshSource)>,
}

/// `ID` or `ID=SOCKET`.
fn parse_ssh(text: &str) -> Result<(String, crate::SshSource), String> {
    match text.split_once('=') {
        None if !text.is_empty() => Ok((text.to_owned(), crate::SshSource::Agent)),
        Some((id, socket)) if !id.is_empty() && !socket.is_empty() => {
            Ok((id.to_owned(), crate::SshSource::Socket(socket.into())))
        }
        _ => Err(format!("{text:?} is neither ID nor ID=SOCKET")),
    }
}

/// `id=ID,src=FILE` or `id=ID,env=VAR` (`source=` for `src=`, as BuildKit takes both).
fn parse_secret(text: &str) -> Result<(String, crate::SecretSource), String> {
    let (mut id, mut source) = (None, None);
    for part in text.split(',') {
        let (key, value) = part.split_once('=').ok_or_else(|| format!("{part:?} is not KEY=VALUE"))?;
        if value.is_empty() {
            return Err(format!("{key}= is empty"));
        }
        match key {
            "id" => id = Some(value.to_owned()),
            "src" | "source" => source = Some(crate::SecretSource::File(value.into())),
            "env" => source = Some(crate::SecretSource::Env(value.to_owned())),
            other => return Err(format!("unknown key {other:?} (id, src or env)")),
        }
    }
    match (id, source) {
        (Some(id), Some(source)) => Ok((id, source)),
        (None, _) => Err("no id=".to_owned()),
        (_, None) => Err("neither src=FILE nor env=VAR".to_owned()),
    }
}

fn parse_platform(text: &str) -> Result<Platform, crate::PlatformError> {
    Platform::parse(text)
}

impl BuildImageArgs {
    /// What to do: relative paths given here resolve against `invocation_dir`, defaults are
    /// under the workspace `root`.
    pub fn resolve(&self, invocation_dir: &Path, root: &Path) -> BuildCommand {
        let mut outputs: Vec<OutputSpec> = self
            .outputs
            .iter()
            .map(|output| match output {
                OutputSpec::OciLayout(path) => OutputSpec::OciLayout(invocation_dir.join(path)),
                OutputSpec::OciArchive(path) => OutputSpec::OciArchive(invocation_dir.join(path)),
                OutputSpec::DockerArchive(path) => OutputSpec::DockerArchive(invocation_dir.join(path)),
            })
            .collect();
        if outputs.is_empty() {
            outputs.push(OutputSpec::DockerArchive(root.join("target/images").join(format!("{}.tar", self.name))));
        }
        BuildCommand {
            cache_dir: cache_dir(self.cache.as_deref(), invocation_dir, root),
            outputs,
            tag: self.tag.clone().unwrap_or_else(|| format!("{}:latest", self.name)),
            compression: self.compression,
            push: self.push.clone(),
            insecure: self.insecure,
            cache_from: self.cache_from.clone(),
            cache_to: self.cache_to.clone(),
            reapi: self.reapi.as_ref().map(|url| crate::ReapiEndpoint::new(url, &self.reapi_instance)),
            reapi_execute: self.reapi_execute,
            secrets: self
                .secrets
                .iter()
                .map(|(id, source)| {
                    let source = match source {
                        crate::SecretSource::File(path) => crate::SecretSource::File(invocation_dir.join(path)),
                        other => other.clone(),
                    };
                    (id.clone(), source)
                })
                .collect(),
            ssh_agents: self
                .ssh_agents
                .iter()
                .map(|(id, source)| {
                    let source = match source {
                        crate::SshSource::Socket(path) => crate::SshSource::Socket(invocation_dir.join(path)),
                        other => other.clone(),
                    };
                    (id.clone(), source)
                })
                .collect(),
            load: self.load,
            platforms: self.platform.clone(),
            attestations: match (self.attest, self.no_attest) {
                (true, _) => Attestations::Always,
                (false, true) => Attestations::Never,
                (false, false) => Attestations::Default,
            },
        }
    }
}

/// `inspect NAME [--cache DIR] [--files]`.
#[derive(Debug, Clone, clap::Args)]
#[non_exhaustive]
pub struct InspectArgs {
    /// The image's name (`list` shows them).
    pub name: String,
    /// The cache directory. Default: target/layerwright under the workspace root.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Under each layer, the files it adds (`+`), changes (`~`) and removes (`-`), largest
    /// first.
    #[arg(long, alias = "full")]
    pub files: bool,
}

/// `cache du`, `cache prune [--keep-bytes N] [--keep-duration D] [--min-free N] [--reserved N]`.
#[derive(Debug, Clone, clap::Args)]
#[non_exhaustive]
pub struct CacheArgs {
    /// What to do with the cache.
    #[command(subcommand)]
    pub command: CacheCommand,
    /// The cache directory. Default: target/layerwright under the workspace root.
    #[arg(long, global = true, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

/// What `cache` does.
#[derive(Debug, Clone, clap::Subcommand)]
#[non_exhaustive]
pub enum CacheCommand {
    /// How much the cache holds, by kind.
    Du,
    /// Remove what the policy says must go, least recently used first: snapshots, logs,
    /// records, blobs and everything else the cache holds. Runs beside builds, never removing
    /// what one of them uses. Sizes take K, M, G, T (powers of 1000) or Ki, Mi, Gi, Ti
    /// suffixes; durations s, m, h, d.
    #[command(group(clap::ArgGroup::new("policy").multiple(true).required(true)
        .args(["keep_bytes", "keep_duration", "min_free"])))]
    Prune {
        /// The most bytes the cache keeps (BuildKit's maxUsedSpace).
        #[arg(long = "keep-bytes", value_name = "SIZE", value_parser = parse_size)]
        keep_bytes: Option<u64>,
        /// Remove what was not used for this long (BuildKit's keepDuration), e.g. 7d, 12h.
        #[arg(long = "keep-duration", value_name = "DURATION", value_parser = parse_duration)]
        keep_duration: Option<std::time::Duration>,
        /// Remove until the cache's filesystem has this much free (BuildKit's minFreeSpace).
        #[arg(long = "min-free", value_name = "SIZE", value_parser = parse_size)]
        min_free: Option<u64>,
        /// Never prune the cache below this size (BuildKit's reservedSpace).
        #[arg(long = "reserved", value_name = "SIZE", value_parser = parse_size)]
        reserved: Option<u64>,
    },
}

/// A size in bytes: a number with an optional K, M, G, T (powers of 1000) or Ki, Mi, Gi, Ti
/// (powers of 1024) suffix, `B` allowed after it.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits = trimmed.find(|character: char| !character.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(digits);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a size (e.g. 500M, 10GiB, 1000000)"))?;
    let unit: u64 = match suffix.trim().trim_end_matches(['B', 'b']).to_ascii_lowercase().as_str() {
        "" => 1,
        "k" => 1_000,
        "m" => 1_000_000,
        "g" => 1_000_000_000,
        "t" => 1_000_000_000_000,
        "ki" => 1 << 10,
        "mi" => 1 << 20,
        "gi" => 1 << 30,
        "ti" => 1 << 40,
        _ => return Err(format!("{text:?}: unknown size suffix {suffix:?} (K, M, G, T, Ki, Mi, Gi, Ti)")),
    };
    number.checked_mul(unit).ok_or_else(|| format!("{text:?} is too large"))
}

/// A duration: a number with an s, m, h or d suffix.
pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let trimmed = text.trim();
    let digits = trimmed.find(|character: char| !character.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(digits);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration (e.g. 90s, 30m, 12h, 7d)"))?;
    let seconds = match suffix {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: a duration needs a unit: s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(number.saturating_mul(seconds)))
}

/// `--cache DIR` against the invocation directory, else `target/layerwright` under `root`.
pub(crate) fn cache_dir(given: Option<&Path>, invocation_dir: &Path, root: &Path) -> PathBuf {
    given.map_or_else(|| root.join("target/layerwright"), |dir| invocation_dir.join(dir))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Arguments {
        #[command(subcommand)]
        command: Command,
    }

    fn parse(arguments: &[&str]) -> Result<Command, clap::Error> {
        Arguments::try_parse_from(std::iter::once("xtask").chain(arguments.iter().copied()))
            .map(|arguments| arguments.command)
    }

    #[test]
    fn build_image_takes_every_flag() {
        let command = parse(&[
            "build-image",
            "api",
            "--output",
            "oci:out/api",
            "--output",
            "docker-archive:/abs/api.tar",
            "--tag",
            "api:1",
            "--cache",
            "c",
            "--compression",
            "zstd",
            "--push",
            "registry.example/api:1",
            "--insecure",
            "--cache-from",
            "registry.example/cache:a",
            "--cache-from",
            "registry.example/cache:b",
            "--cache-to",
            "registry.example/cache:a",
            "--reapi",
            "https://cache.example:443",
            "--reapi-instance",
            "main",
            "--reapi-execute",
        ])
        .unwrap();
        let Command::BuildImage(arguments) = command else { panic!("{command:?}") };
        let resolved = arguments.resolve(Path::new("/ws/sub"), Path::new("/ws"));
        assert_eq!(
            resolved.outputs,
            [OutputSpec::OciLayout("/ws/sub/out/api".into()), OutputSpec::DockerArchive("/abs/api.tar".into())]
        );
        assert_eq!(resolved.tag, "api:1");
        assert_eq!(resolved.cache_dir, Path::new("/ws/sub/c"));
        assert_eq!(resolved.compression, Compression::Zstd);
        assert_eq!(resolved.push.as_deref(), Some("registry.example/api:1"));
        assert!(resolved.insecure);
        assert_eq!(resolved.cache_from, ["registry.example/cache:a", "registry.example/cache:b"]);
        assert_eq!(resolved.cache_to.as_deref(), Some("registry.example/cache:a"));
        assert_eq!(resolved.reapi, Some(crate::ReapiEndpoint::new("https://cache.example:443", "main")));
        assert!(resolved.reapi_execute);
    }

    #[test]
    fn secrets_parse_and_their_files_resolve_against_the_invocation_directory() {
        let command = parse(&[
            "build-image",
            "api",
            "--secret",
            "id=token,src=token.txt",
            "--secret",
            "id=npm,env=NPM_TOKEN",
            "--secret",
            "source=/abs/key,id=key",
        ])
        .unwrap();
        let Command::BuildImage(arguments) = command else { panic!("{command:?}") };
        let resolved = arguments.resolve(Path::new("/ws/sub"), Path::new("/ws"));
        assert_eq!(
            resolved.secrets,
            [
                ("token".to_owned(), crate::SecretSource::File("/ws/sub/token.txt".into())),
                ("npm".to_owned(), crate::SecretSource::Env("NPM_TOKEN".into())),
                ("key".to_owned(), crate::SecretSource::File("/abs/key".into())),
            ]
        );
        for bad in ["src=x", "id=x", "id=x,src=", "id=x,path=y", "id"] {
            assert!(parse(&["build-image", "api", "--secret", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn ssh_agents_parse_as_docker_build_takes_them() {
        let command = parse(&["build-image", "api", "--ssh", "default", "--ssh", "deploy=agent.sock"]).unwrap();
        let Command::BuildImage(arguments) = command else { panic!("{command:?}") };
        let resolved = arguments.resolve(Path::new("/ws/sub"), Path::new("/ws"));
        assert_eq!(
            resolved.ssh_agents,
            [
                ("default".to_owned(), crate::SshSource::Agent),
                ("deploy".to_owned(), crate::SshSource::Socket("/ws/sub/agent.sock".into())),
            ]
        );
        for bad in ["", "=x", "x="] {
            assert!(parse(&["build-image", "api", "--ssh", bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn load_platforms_and_watch_parse() {
        let command =
            parse(&["build-image", "api", "--load", "--watch", "--platform", "linux/amd64,linux/arm/v7"]).unwrap();
        let Command::BuildImage(arguments) = command else { panic!() };
        assert!(arguments.load && arguments.watch);
        let platforms: Vec<String> = arguments.platform.iter().map(ToString::to_string).collect();
        assert_eq!(platforms, ["linux/amd64", "linux/arm/v7"]);
        let resolved = arguments.resolve(Path::new("/ws"), Path::new("/ws"));
        assert!(resolved.load);
        assert_eq!(resolved.platforms.len(), 2);
        assert!(parse(&["build-image", "api", "--platform", "arm64"]).is_err());
    }

    #[test]
    fn build_image_defaults_are_under_the_workspace_root() {
        let Command::BuildImage(arguments) = parse(&["build-image", "api"]).unwrap() else { panic!() };
        let resolved = arguments.resolve(Path::new("/ws/deep/er"), Path::new("/ws"));
        assert_eq!(resolved.outputs, [OutputSpec::DockerArchive("/ws/target/images/api.tar".into())]);
        assert_eq!(resolved.cache_dir, Path::new("/ws/target/layerwright"));
        assert_eq!(resolved.tag, "api:latest");
        assert_eq!(resolved.compression, Compression::Gzip);
        assert!(resolved.push.is_none() && resolved.cache_from.is_empty() && resolved.cache_to.is_none());
    }

    #[test]
    fn bad_arguments_are_refused_by_the_parser() {
        for bad in [
            &["build-image", "api", "--output", "tar:x"][..],
            &["build-image", "api", "--output", "oci:"],
            &["build-image", "api", "--compression", "lz4"],
            &["build-image", "api", "--insecure"],
            &["build-image"],
            &["inspect"],
            &["cache", "prune"],
            &["cache", "prune", "--keep-bytes", "lots"],
            &["cache", "prune", "--reserved", "1G"],
            &["cache", "prune", "--keep-duration", "7"],
            &["frobnicate"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let error = parse(&["build-image", "api", "--output", "tar:x"]).unwrap_err().to_string();
        assert!(error.contains("oci:DIR, oci-archive:FILE or docker-archive:FILE"), "{error}");
    }

    #[test]
    fn list_inspect_and_cache_parse() {
        assert!(matches!(parse(&["list"]).unwrap(), Command::List));
        let Command::Inspect(inspect) = parse(&["inspect", "api", "--files"]).unwrap() else { panic!() };
        assert_eq!(inspect.name, "api");
        assert!(inspect.files);
        let Command::Cache(cache) = parse(&["cache", "--cache", "/c", "prune", "--keep-bytes", "100"]).unwrap() else {
            panic!()
        };
        assert!(matches!(cache.command, CacheCommand::Prune { keep_bytes: Some(100), .. }));
        assert_eq!(cache.cache.as_deref(), Some(Path::new("/c")));
        let prune = ["cache", "prune", "--keep-bytes", "2GiB", "--keep-duration", "7d", "--min-free", "10G"];
        let Command::Cache(cache) = parse(&[&prune[..], &["--reserved", "512M"]].concat()).unwrap() else { panic!() };
        let CacheCommand::Prune { keep_bytes, keep_duration, min_free, reserved } = cache.command else { panic!() };
        assert_eq!(keep_bytes, Some(2 << 30));
        assert_eq!(keep_duration, Some(std::time::Duration::from_secs(7 * 86_400)));
        assert_eq!((min_free, reserved), (Some(10_000_000_000), Some(512_000_000)));
        let Command::Cache(cache) = parse(&["cache", "du", "--cache", "d"]).unwrap() else { panic!() };
        assert!(matches!(cache.command, CacheCommand::Du));
        assert_eq!(cache_dir(cache.cache.as_deref(), Path::new("/here"), Path::new("/ws")), Path::new("/here/d"));
    }
}
