//! How a step key and its action record are written in REAPI terms: the `Action` a key maps
//! to, and the `ActionResult` that holds a record and the blobs it names.
//!
//! - **The action** of step key `K`: a `Command` whose arguments are `layerwright-step K` and
//!   whose environment names the key, [`KEY_FORMAT_VERSION`] and [`ACTION_FORMAT`], with one
//!   declared output, [`RECORD_PATH`]; an empty input root; no platform. Its digest (SHA-256 of
//!   the encoded `Action`, which prost encodes deterministically) is a pure function of `K`, so
//!   every machine asks the action cache for the same entry. Nothing runs it: it only names the
//!   entry (remote execution would submit an action of its own, see the folder's doc).
//! - **The result**: exit code 0 and as output files the record ([`RECORD_PATH`], JSON of
//!   [`ActionRecord`]) and every blob the record names at `blobs/sha256/HEX`. Listing the blobs
//!   as outputs makes the server answer a miss when one of them has left its CAS (REAPI servers
//!   check the outputs of an entry before serving it), and gives every blob's size.
//!
//! What it deliberately is not: IO, or trust. [`record_of`] checks that a result is shaped as
//! this module writes it; whether the bytes are what they claim is checked where they arrive.

use std::collections::HashMap;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use layerwright_cache::{ActionRecord, Digest, KEY_FORMAT_VERSION, StepKey};
use prost::Message;

/// The version of this mapping: a change in how a key becomes an action, or in what a result
/// holds, bumps it, so that old entries are never misread.
pub(crate) const ACTION_FORMAT: u32 = 1;
/// The output file holding the record.
pub(crate) const RECORD_PATH: &str = "layerwright-record.json";
/// Where the blobs a record names are among the output files.
const BLOB_PREFIX: &str = "blobs/sha256/";

/// A message of the action's closure (the action, its command, its input root) with its
/// encoding, which goes to the CAS as it is.
#[derive(Debug, Clone)]
pub(crate) struct EncodedMessage {
    pub digest: reapi::Digest,
    pub bytes: Vec<u8>,
}

impl EncodedMessage {
    pub(crate) fn of(message: &impl Message) -> EncodedMessage {
        let bytes = message.encode_to_vec();
        EncodedMessage { digest: digest_of_bytes(&bytes), bytes }
    }
}

/// The action a step key maps to, and the messages it is made of.
#[derive(Debug, Clone)]
pub(crate) struct KeyAction {
    pub action: EncodedMessage,
    pub command: EncodedMessage,
    pub input_root: EncodedMessage,
}

/// The action of step key `key` (see the module doc).
pub(crate) fn action_of(key: &StepKey) -> KeyAction {
    let key_hex = key.to_hex();
    let variable = |name: &str, value: String| reapi::command::EnvironmentVariable { name: name.to_owned(), value };
    let command = reapi::Command {
        arguments: vec!["layerwright-step".to_owned(), key_hex.clone()],
        // Sorted by name, as REAPI requires.
        environment_variables: vec![
            variable("LAYERWRIGHT_ACTION_FORMAT", ACTION_FORMAT.to_string()),
            variable("LAYERWRIGHT_KEY_FORMAT_VERSION", KEY_FORMAT_VERSION.to_string()),
            variable("LAYERWRIGHT_STEP_KEY", key_hex),
        ],
        output_paths: vec![RECORD_PATH.to_owned()],
        ..reapi::Command::default()
    };
    let command = EncodedMessage::of(&command);
    let input_root = EncodedMessage::of(&reapi::Directory::default());
    let action = reapi::Action {
        command_digest: Some(command.digest.clone()),
        input_root_digest: Some(input_root.digest.clone()),
        ..reapi::Action::default()
    };
    KeyAction { action: EncodedMessage::of(&action), command, input_root }
}

/// The REAPI digest of `bytes` (SHA-256 and size).
pub(crate) fn digest_of_bytes(bytes: &[u8]) -> reapi::Digest {
    reapi::Digest { hash: Digest::of_bytes(bytes).hex().to_owned(), size_bytes: bytes.len() as i64 }
}

/// The REAPI digest of a stored blob.
pub(crate) fn reapi_digest(digest: &Digest, size: u64) -> reapi::Digest {
    reapi::Digest { hash: digest.hex().to_owned(), size_bytes: size as i64 }
}

/// The blob a REAPI digest names, and its size; an error for anything but SHA-256 hex and a
/// size that fits.
pub(crate) fn blob_of(digest: &reapi::Digest) -> Result<(Digest, u64), String> {
    let parsed = Digest::from_hex(&digest.hash).map_err(|_| format!("`{}` is not a SHA-256 digest", digest.hash))?;
    let size = u64::try_from(digest.size_bytes).map_err(|_| format!("blob {parsed} has size {}", digest.size_bytes))?;
    Ok((parsed, size))
}

/// The blobs `record` names with their sizes: its layers, and the config of a base (whose size
/// the record does not hold: `config_size`).
pub(crate) fn blobs_of(record: &ActionRecord, config_size: Option<u64>) -> Vec<(Digest, u64)> {
    let layers = record.layers.iter().map(|layer| (layer.digest.clone(), layer.size));
    layers.chain(record.config.clone().zip(config_size)).collect()
}

/// The result that stores `record` (whose JSON is `record_bytes`) and `blobs` (every blob it
/// names, with its size).
pub(crate) fn result_of(record_bytes: &[u8], blobs: &[(Digest, u64)]) -> reapi::ActionResult {
    let record_file = reapi::OutputFile {
        path: RECORD_PATH.to_owned(),
        digest: Some(digest_of_bytes(record_bytes)),
        ..Default::default()
    };
    let blob_files = blobs.iter().map(|(digest, size)| reapi::OutputFile {
        path: format!("{BLOB_PREFIX}{}", digest.hex()),
        digest: Some(reapi_digest(digest, *size)),
        ..Default::default()
    });
    reapi::ActionResult {
        output_files: std::iter::once(record_file).chain(blob_files).collect(),
        exit_code: 0,
        ..reapi::ActionResult::default()
    }
}

/// The record file of `result` (its digest and size), when the result has one.
pub(crate) fn record_file(result: &reapi::ActionResult) -> Result<(Digest, u64), String> {
    let file = result
        .output_files
        .iter()
        .find(|file| file.path == RECORD_PATH)
        .ok_or_else(|| format!("the action result has no {RECORD_PATH}"))?;
    blob_of(file.digest.as_ref().ok_or_else(|| format!("{RECORD_PATH} has no digest"))?)
}

/// The record `record_bytes` holds, checked against the result it came with: exit code 0, and
/// every blob the record names listed among the outputs with the size the record says. Also
/// the size of every blob the result lists (downloads check it).
pub(crate) fn record_of(
    result: &reapi::ActionResult,
    record_bytes: &[u8],
) -> Result<(ActionRecord, HashMap<Digest, u64>), String> {
    if result.exit_code != 0 {
        return Err(format!("the action result has exit code {}", result.exit_code));
    }
    let mut sizes = HashMap::new();
    for file in &result.output_files {
        let Some(hex) = file.path.strip_prefix(BLOB_PREFIX) else { continue };
        let (digest, size) = blob_of(file.digest.as_ref().ok_or_else(|| format!("{} has no digest", file.path))?)?;
        if digest.hex() != hex {
            return Err(format!("output {} holds blob {digest}", file.path));
        }
        sizes.insert(digest, size);
    }
    let record: ActionRecord =
        serde_json::from_slice(record_bytes).map_err(|error| format!("{RECORD_PATH} is not a record: {error}"))?;
    if record.layers.is_empty() {
        return Err(format!("{RECORD_PATH} names no layer"));
    }
    for layer in &record.layers {
        match sizes.get(&layer.digest) {
            Some(size) if *size == layer.size => {}
            Some(size) => {
                return Err(format!(
                    "layer {} is {} bytes in the record, {size} in the result",
                    layer.digest, layer.size
                ));
            }
            None => return Err(format!("the record names layer {}, which the result does not hold", layer.digest)),
        }
    }
    if let Some(config) = &record.config
        && !sizes.contains_key(config)
    {
        return Err(format!("the record names config {config}, which the result does not hold"));
    }
    Ok((record, sizes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use layerwright_cache::LayerRecord;

    fn key(name: &str) -> StepKey {
        StepKey::from_hex(&blake3::hash(name.as_bytes()).to_hex()).unwrap()
    }

    fn record() -> (ActionRecord, Vec<(Digest, u64)>) {
        let layer = LayerRecord {
            diff_id: Digest::of_bytes(b"tar"),
            digest: Digest::of_bytes(b"gzip"),
            size: 4,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        };
        let config = Digest::of_bytes(b"{}");
        let record = ActionRecord { layers: vec![layer], config: Some(config.clone()) };
        let blobs = blobs_of(&record, Some(2));
        (record, blobs)
    }

    #[test]
    fn the_action_is_a_pure_function_of_the_key() {
        let (first, again, other) = (action_of(&key("a")), action_of(&key("a")), action_of(&key("b")));
        assert_eq!(first.action.digest, again.action.digest);
        assert_ne!(first.action.digest, other.action.digest);
        // The command names the key and the formats, and the action names the command.
        let command = reapi::Command::decode(first.command.bytes.as_slice()).unwrap();
        assert_eq!(command.arguments, ["layerwright-step".to_owned(), key("a").to_hex()]);
        let names: Vec<&str> = command.environment_variables.iter().map(|variable| variable.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted, "REAPI wants the environment sorted");
        let action = reapi::Action::decode(first.action.bytes.as_slice()).unwrap();
        assert_eq!(action.command_digest, Some(first.command.digest.clone()));
        assert_eq!(first.action.digest, digest_of_bytes(&first.action.bytes));
        assert_eq!(first.action.digest.hash.len(), 64, "SHA-256, which BuildGrid requires");
    }

    /// Reads `result` back with `record_bytes`; the error, or "ok".
    fn check(result: &reapi::ActionResult, record_bytes: &[u8], expected: &str) {
        let outcome = record_of(result, record_bytes).map(|_| "ok".to_owned()).unwrap_or_else(|error| error);
        assert!(outcome.contains(expected), "{outcome:?} does not say {expected:?}");
    }

    #[test]
    fn a_result_reads_back_as_the_record_it_stores_and_a_misshapen_one_is_refused() {
        let (record, blobs) = record();
        let bytes = serde_json::to_vec(&record).unwrap();
        let result = result_of(&bytes, &blobs);
        let (read, sizes) = record_of(&result, &bytes).unwrap();
        assert_eq!((read, sizes.len()), (record.clone(), 2));
        assert_eq!(record_file(&result).unwrap(), (Digest::of_bytes(&bytes), bytes.len() as u64));

        check(&result, b"not json", "is not a record");
        let mut failed = result.clone();
        failed.exit_code = 1;
        check(&failed, &bytes, "exit code 1");
        let without_layer = result_of(&bytes, &blobs[1..]);
        check(&without_layer, &bytes, "does not hold");
        let without_config = result_of(&bytes, &blobs[..1]);
        check(&without_config, &bytes, "config");
        let mut other_size = result.clone();
        other_size.output_files[1].digest.as_mut().unwrap().size_bytes = 5;
        check(&other_size, &bytes, "4 bytes in the record, 5 in the result");
        let mut misnamed = result.clone();
        misnamed.output_files[1].path = format!("{BLOB_PREFIX}{}", Digest::of_bytes(b"other").hex());
        check(&misnamed, &bytes, "holds blob");
        let mut not_sha256 = result;
        not_sha256.output_files[2].digest.as_mut().unwrap().hash = "abc".into();
        check(&not_sha256, &bytes, "not a SHA-256 digest");
    }
}
