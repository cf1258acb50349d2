//! A RUN step as a REAPI execution `Action`: what a builder submits with `Execute` and what a
//! `layerwright-worker` takes from a lease. Both sides use this module, so the two cannot
//! disagree on the format.
//!
//! - **The step** ([`RemoteStep`], the input root's [`STEP_FILE`], JSON): the step key and
//!   label, the command with its environment, working directory, user, network and limits, the
//!   parent image's config (what the command runs as is resolved from it) and its layers,
//!   bottom first, and how the layer is written (compression, mtime). A step with mounts does
//!   not travel (see [`RemoteStep::of`]).
//! - **The input root**: [`STEP_FILE`] and a directory [`LAYERS_DIRECTORY`] holding every lower
//!   layer blob under its hex digest. A layer's CAS digest is its OCI digest, so nothing is
//!   hashed again and a layer the CAS has from an earlier step or build is not sent again.
//! - **The command**: `layerwright-worker-step step.json`, with the formats in its environment
//!   and one output, the record; the result is shaped as a cache entry (`action::result_of`):
//!   the record and the layer blob as output files.
//! - **The platform**: `OSFamily` (the image's OS), `ISA` (its `GOARCH` name: `amd64`, `arm64`,
//!   ...) and [`FORMAT_PROPERTY`], which only a layerwright worker offers; BuildGrid must list it
//!   among its `match-property-keys`.
//!
//! What it deliberately is not: IO, or the decision whether a step runs remotely.

use std::collections::BTreeSet;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use layerwright_cache::{Digest, LayerRecord};
use layerwright_dsl::{Limits, NetworkMode, Run, RunCommand};
use serde::{Deserialize, Serialize};

use crate::remote_cache::RemoteRun;

use super::action::{ACTION_FORMAT, EncodedMessage, RECORD_PATH, digest_of_bytes};
use crate::layer::{Compression, LayerOptions};
use crate::oci::Platform;

/// The version of this format: a change in what a step file holds or how the action is made
/// bumps it (and the platform property with it, so that an old worker never takes a new step).
pub(crate) const REMOTE_STEP_FORMAT: u32 = 1;
/// The input root's file holding the step.
pub(crate) const STEP_FILE: &str = "step.json";
/// The input root's directory holding the lower layers' blobs.
pub(crate) const LAYERS_DIRECTORY: &str = "layers";
/// The first argument of the command: what a worker checks before it runs anything.
pub(crate) const PROGRAM: &str = "layerwright-worker-step";
/// The platform property only layerwright workers offer (its value: [`REMOTE_STEP_FORMAT`]).
pub(crate) const FORMAT_PROPERTY: &str = "layerwright-step-format";

/// The command of a RUN step, as it travels.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RemoteCommand {
    Shell(String),
    Argv(Vec<String>),
}

/// The network of a RUN step, as it travels.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RemoteNetwork {
    None,
    Isolated,
    Host,
}

/// Everything a worker needs to run one RUN step as the builder would (see the module doc).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct RemoteStep {
    pub format: u32,
    pub key: String,
    pub label: String,
    pub command: RemoteCommand,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub network: RemoteNetwork,
    /// The step's own limits, then the builder's (the step's win, as in a local run).
    pub pids_limit: Option<u64>,
    pub memory_limit: Option<u64>,
    pub default_pids_limit: Option<u64>,
    pub default_memory_limit: Option<u64>,
    /// The parent's config document (its runtime part is what the command runs as).
    pub config: serde_json::Value,
    /// The parent's layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// The media type of the layer to write (its compression).
    pub media_type: String,
    /// The mtime of every entry of the layer.
    pub mtime: u64,
    /// The platform the command runs for.
    pub platform: String,
}

impl RemoteStep {
    /// The step `inputs` describe. The caller has checked [`stays_local`].
    pub(crate) fn of(inputs: &RemoteRun<'_>) -> RemoteStep {
        let run = inputs.run;
        RemoteStep {
            format: REMOTE_STEP_FORMAT,
            key: inputs.key.to_hex(),
            label: inputs.label.to_owned(),
            command: match &run.command {
                RunCommand::Shell(command) => RemoteCommand::Shell(command.clone()),
                RunCommand::Argv(argv) => RemoteCommand::Argv(argv.clone()),
            },
            env: run.env.clone(),
            workdir: run.workdir.clone(),
            user: run.user.clone(),
            network: match run.network {
                NetworkMode::None => RemoteNetwork::None,
                NetworkMode::Isolated => RemoteNetwork::Isolated,
                NetworkMode::Host => RemoteNetwork::Host,
            },
            pids_limit: run.limits.pids,
            memory_limit: run.limits.memory,
            default_pids_limit: inputs.defaults.pids,
            default_memory_limit: inputs.defaults.memory,
            config: inputs.config.clone(),
            layers: inputs.layers.clone(),
            media_type: inputs.layer_options.compression.media_type().to_owned(),
            mtime: inputs.layer_options.mtime,
            platform: inputs.platform.to_string(),
        }
    }

    /// The step as the DSL declares it (without mounts: none travel).
    pub(crate) fn run(&self) -> Run {
        let mut run = match &self.command {
            RemoteCommand::Shell(command) => Run::shell(command.as_str()),
            RemoteCommand::Argv(argv) => Run::argv(argv.iter().map(String::as_str)),
        };
        run.env = self.env.clone();
        run.workdir = self.workdir.clone();
        run.user = self.user.clone();
        run.network = match self.network {
            RemoteNetwork::None => NetworkMode::None,
            RemoteNetwork::Isolated => NetworkMode::Isolated,
            RemoteNetwork::Host => NetworkMode::Host,
        };
        run.limits = Limits { pids: self.pids_limit, memory: self.memory_limit };
        run
    }

    /// The builder's limits for the step.
    pub(crate) fn defaults(&self) -> Limits {
        Limits { pids: self.default_pids_limit, memory: self.default_memory_limit }
    }

    /// How the layer is written; an error for a media type this version does not write.
    pub(crate) fn layer_options(&self) -> Result<LayerOptions, String> {
        let compression = Compression::from_media_type(&self.media_type)
            .ok_or_else(|| format!("the step asks for layers of media type {}", self.media_type))?;
        Ok(LayerOptions { compression, mtime: self.mtime })
    }
}

/// A step's execution action and every message it is made of, ready for the CAS.
#[derive(Debug, Clone)]
pub(crate) struct StepAction {
    pub action: EncodedMessage,
    pub command: EncodedMessage,
    pub input_root: EncodedMessage,
    pub layers_directory: EncodedMessage,
    pub step_file: EncodedMessage,
}

impl StepAction {
    /// The messages the CAS must hold besides the layers.
    pub(crate) fn messages(&self) -> [&EncodedMessage; 5] {
        [&self.action, &self.command, &self.input_root, &self.layers_directory, &self.step_file]
    }
}

/// The platform properties a step for `platform` asks of a worker, and a worker for `platform`
/// offers, sorted by name as REAPI wants.
pub(crate) fn platform_properties(platform: &Platform) -> Vec<(String, String)> {
    vec![
        ("ISA".to_owned(), platform.architecture.clone()),
        ("OSFamily".to_owned(), platform.os.clone()),
        (FORMAT_PROPERTY.to_owned(), REMOTE_STEP_FORMAT.to_string()),
    ]
}

/// The execution action of `step` for `platform` (see the module doc).
pub(crate) fn step_action(step: &RemoteStep, platform: &Platform) -> StepAction {
    let step_bytes = serde_json::to_vec(step).expect("a step of strings, numbers and JSON values encodes");
    let step_file = EncodedMessage { digest: digest_of_bytes(&step_bytes), bytes: step_bytes };
    // Each distinct layer once, sorted by name as REAPI wants.
    let layers: BTreeSet<(String, u64)> =
        step.layers.iter().map(|layer| (layer.digest.hex().to_owned(), layer.size)).collect();
    let layers_directory = EncodedMessage::of(&reapi::Directory {
        files: layers
            .iter()
            .map(|(hex, size)| reapi::FileNode {
                name: hex.clone(),
                digest: Some(reapi::Digest { hash: hex.clone(), size_bytes: *size as i64 }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
    let input_root = EncodedMessage::of(&reapi::Directory {
        files: vec![reapi::FileNode {
            name: STEP_FILE.to_owned(),
            digest: Some(step_file.digest.clone()),
            ..Default::default()
        }],
        directories: vec![reapi::DirectoryNode {
            name: LAYERS_DIRECTORY.to_owned(),
            digest: Some(layers_directory.digest.clone()),
        }],
        ..Default::default()
    });
    let properties = platform_properties(platform)
        .into_iter()
        .map(|(name, value)| reapi::platform::Property { name, value })
        .collect::<Vec<_>>();
    let variable = |name: &str, value: String| reapi::command::EnvironmentVariable { name: name.to_owned(), value };
    let command = EncodedMessage::of(&reapi::Command {
        arguments: vec![PROGRAM.to_owned(), STEP_FILE.to_owned()],
        environment_variables: vec![
            variable("LAYERWRIGHT_ACTION_FORMAT", ACTION_FORMAT.to_string()),
            variable("LAYERWRIGHT_REMOTE_STEP_FORMAT", REMOTE_STEP_FORMAT.to_string()),
        ],
        output_paths: vec![RECORD_PATH.to_owned()],
        ..Default::default()
    });
    let action = EncodedMessage::of(&reapi::Action {
        command_digest: Some(command.digest.clone()),
        input_root_digest: Some(input_root.digest.clone()),
        platform: Some(reapi::Platform { properties }),
        ..Default::default()
    });
    StepAction { action, command, input_root, layers_directory, step_file }
}

/// The blobs of the step's layers with their sizes, each once.
pub(crate) fn layer_blobs(step: &RemoteStep) -> Vec<(Digest, u64)> {
    let mut blobs: Vec<(Digest, u64)> = step.layers.iter().map(|layer| (layer.digest.clone(), layer.size)).collect();
    blobs.sort();
    blobs.dedup();
    blobs
}

/// The digest of the step file an input root names; an error when the root is not shaped as
/// [`step_action`] makes it.
pub(crate) fn step_file_of(input_root: &reapi::Directory) -> Result<reapi::Digest, String> {
    let file = input_root
        .files
        .iter()
        .find(|file| file.name == STEP_FILE)
        .ok_or_else(|| format!("the input root has no {STEP_FILE}"))?;
    file.digest.clone().ok_or_else(|| format!("{STEP_FILE} has no digest"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use layerwright_cache::StepKey;
    use prost::Message;

    fn step(command: &str) -> RemoteStep {
        let layer = LayerRecord {
            diff_id: Digest::of_bytes(b"tar"),
            digest: Digest::of_bytes(b"gzip"),
            size: 4,
            media_type: Compression::Gzip.media_type().to_owned(),
        };
        let run = Run::shell(command).env("A", "1").workdir("/w");
        let key = StepKey::from_hex(&blake3::hash(command.as_bytes()).to_hex()).unwrap();
        RemoteStep::of(&RemoteRun {
            key: &key,
            label: "RUN x",
            run: &run,
            defaults: Limits { pids: Some(7), memory: None },
            config: &serde_json::json!({"config": {"Env": ["PATH=/bin"]}}),
            layers: vec![layer.clone(), layer],
            layer_options: LayerOptions { compression: Compression::Gzip, mtime: 5 },
            platform: &Platform::parse("linux/arm64").unwrap(),
        })
    }

    #[test]
    fn a_step_reads_back_as_the_run_it_was_made_from_and_its_action_names_its_inputs() {
        let original = step("echo hi");
        let read: RemoteStep = serde_json::from_slice(&serde_json::to_vec(&original).unwrap()).unwrap();
        assert_eq!(read, original);
        let run = read.run();
        assert_eq!((run.env.clone(), run.workdir.clone()), (vec![("A".to_owned(), "1".to_owned())], Some("/w".into())));
        assert_eq!(read.defaults(), Limits { pids: Some(7), memory: None });
        assert_eq!(read.layer_options().unwrap(), LayerOptions { compression: Compression::Gzip, mtime: 5 });
        assert_eq!(layer_blobs(&read).len(), 1, "a repeated layer is one blob");

        let platform = Platform::parse("linux/arm64").unwrap();
        let action = step_action(&read, &platform);
        let decoded = reapi::Action::decode(action.action.bytes.as_slice()).unwrap();
        let properties: Vec<(String, String)> =
            decoded.platform.unwrap().properties.into_iter().map(|property| (property.name, property.value)).collect();
        assert_eq!(properties, platform_properties(&platform));
        assert!(properties.windows(2).all(|pair| pair[0].0 < pair[1].0), "REAPI wants them sorted");
        let root = reapi::Directory::decode(action.input_root.bytes.as_slice()).unwrap();
        assert_eq!(step_file_of(&root).unwrap(), action.step_file.digest);
        assert_eq!(root.directories[0].digest.as_ref(), Some(&action.layers_directory.digest));
        // Another command is another action; the same step is the same action.
        assert_eq!(step_action(&step("echo hi"), &platform).action.digest, action.action.digest);
        assert_ne!(step_action(&step("echo ho"), &platform).action.digest, action.action.digest);
    }
}
