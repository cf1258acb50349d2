//! The image config document, how config steps change it, and the manifest that names it.
//!
//! The config is kept as a `serde_json::Value` rather than a typed struct so that fields of an
//! imported base config that we do not model survive untouched. It is written as canonical JSON
//! (`super::canonical`): the bytes, and so the digest, depend only on the content.
//!
//! What it is not: a validator of base configs (a base config is trusted as far as its digest
//! was verified) or an exporter (see `export`).

use layerwright_cache::{Digest, LayerRecord};
use layerwright_dsl::ConfigChange;
use serde_json::{Map, Value, json};

use super::media_types::{OCI_CONFIG, OCI_MANIFEST};
use super::platform::Platform;

/// The config of an empty image for `platform` (`None`: this host's, whose variant is left out
/// as it always was, so that host builds keep their digests).
pub fn scratch_config_for(created: &str, platform: Option<&Platform>) -> Value {
    let (os, architecture, variant) = match platform {
        Some(platform) => (platform.os.clone(), platform.architecture.clone(), platform.variant.clone()),
        None => ("linux".to_owned(), Platform::host().architecture, None),
    };
    let mut config = json!({
        "architecture": architecture,
        "os": os,
        "created": created,
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [] },
        "history": [],
    });
    if let Some(variant) = variant {
        object(&mut config).insert("variant".into(), Value::String(variant));
    }
    config
}

/// Sets `created` of an image whose top step we built (a base keeps its own until then).
pub fn set_created(config: &mut Value, created: &str) {
    object(config).insert("created".into(), Value::String(created.to_owned()));
}

/// Records a layer: its diff id in `rootfs.diff_ids` and a history entry.
pub fn push_layer(config: &mut Value, layer: &LayerRecord, created_by: &str, created: &str) {
    let rootfs = object(object(config).entry("rootfs").or_insert_with(|| json!({ "type": "layers" })));
    let diff_ids = rootfs.entry("diff_ids").or_insert_with(|| json!([]));
    if let Value::Array(diff_ids) = diff_ids {
        diff_ids.push(Value::String(layer.diff_id.to_string()));
    }
    push_history(config, json!({ "created": created, "created_by": created_by }));
}

/// Applies a config step and records it as an empty-layer history entry.
#[cfg(test)]
pub fn apply_change(config: &mut Value, change: &ConfigChange, created_by: &str, created: &str) {
    apply_runtime_change(config, change);
    push_change_history(config, created_by, created);
}

/// The empty-layer history entry of a config step.
pub fn push_change_history(config: &mut Value, created_by: &str, created: &str) {
    push_history(config, json!({ "created": created, "created_by": created_by, "empty_layer": true }));
}

/// Applies a config step to the runtime config (`config.Env`, ...), without its history entry.
pub fn apply_runtime_change(config: &mut Value, change: &ConfigChange) {
    let runtime = object(object(config).entry("config").or_insert_with(|| json!({})));
    match change {
        ConfigChange::Env { key, value } => {
            let env = array(runtime.entry("Env").or_insert_with(|| json!([])));
            let prefix = format!("{key}=");
            let entry = Value::String(format!("{key}={value}"));
            match env.iter_mut().find(|existing| existing.as_str().is_some_and(|text| text.starts_with(&prefix))) {
                Some(existing) => *existing = entry,
                None => env.push(entry),
            }
        }
        ConfigChange::Workdir(dir) => {
            // As Docker does, a relative WORKDIR is relative to the previous one.
            let previous = runtime.get("WorkingDir").and_then(Value::as_str).unwrap_or("/");
            let resolved =
                if dir.starts_with('/') { dir.clone() } else { format!("{}/{dir}", previous.trim_end_matches('/')) };
            runtime.insert("WorkingDir".into(), Value::String(resolved));
        }
        ConfigChange::User(user) => {
            runtime.insert("User".into(), Value::String(user.clone()));
        }
        ConfigChange::Label { key, value } => {
            object(runtime.entry("Labels").or_insert_with(|| json!({})))
                .insert(key.clone(), Value::String(value.clone()));
        }
        ConfigChange::Expose(port) => {
            object(runtime.entry("ExposedPorts").or_insert_with(|| json!({}))).insert(port.clone(), json!({}));
        }
        ConfigChange::Entrypoint(argv) => {
            runtime.insert("Entrypoint".into(), json!(argv));
        }
        ConfigChange::Cmd(argv) => {
            runtime.insert("Cmd".into(), json!(argv));
        }
        ConfigChange::Volume(path) => {
            object(runtime.entry("Volumes").or_insert_with(|| json!({}))).insert(path.clone(), json!({}));
        }
        ConfigChange::StopSignal(signal) => {
            runtime.insert("StopSignal".into(), Value::String(signal.clone()));
        }
    }
}

fn push_history(config: &mut Value, entry: Value) {
    array(object(config).entry("history").or_insert_with(|| json!([]))).push(entry);
}

/// `value` as an object, replacing anything else (a base config with a `null` field).
fn object(value: &mut Value) -> &mut Map<String, Value> {
    if !value.is_object() {
        *value = Value::Object(Map::new());
    }
    value.as_object_mut().expect("made an object above")
}

fn array(value: &mut Value) -> &mut Vec<Value> {
    if !value.is_array() {
        *value = Value::Array(Vec::new());
    }
    value.as_array_mut().expect("made an array above")
}

/// The canonical bytes of a JSON document (sorted keys, no whitespace).
pub fn to_bytes(document: &Value) -> Vec<u8> {
    super::canonical::to_bytes(document)
}

/// The image manifest naming `config` and `layers`.
pub fn manifest(config: &Digest, config_size: u64, layers: &[LayerRecord]) -> Value {
    let layers: Vec<Value> = layers
        .iter()
        .map(|layer| json!({ "mediaType": layer.media_type, "digest": layer.digest.to_string(), "size": layer.size }))
        .collect();
    json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": config.to_string(), "size": config_size },
        "layers": layers,
    })
}

/// RFC 3339 UTC time of `seconds` since the epoch, as image configs spell `created`.
pub fn rfc3339(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let second_of_day = seconds % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        for (seconds, expected) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
        ] {
            assert_eq!(rfc3339(seconds), expected);
        }
    }

    #[test]
    fn config_changes_follow_docker() {
        let mut config = scratch_config_for("1970-01-01T00:00:00Z", None);
        let changes = [
            ConfigChange::Env { key: "A".into(), value: "1".into() },
            ConfigChange::Env { key: "B".into(), value: "2".into() },
            ConfigChange::Env { key: "A".into(), value: "3".into() },
            ConfigChange::Workdir("/app".into()),
            ConfigChange::Workdir("sub".into()),
            ConfigChange::Label { key: "l".into(), value: "v".into() },
            ConfigChange::Expose("8080/tcp".into()),
            ConfigChange::Cmd(vec!["--serve".into()]),
        ];
        for change in &changes {
            apply_change(&mut config, change, "x", "t");
        }
        let runtime = &config["config"];
        assert_eq!(runtime["Env"], json!(["A=3", "B=2"]));
        assert_eq!(runtime["WorkingDir"], "/app/sub");
        assert_eq!(runtime["Labels"], json!({ "l": "v" }));
        assert_eq!(runtime["ExposedPorts"], json!({ "8080/tcp": {} }));
        assert_eq!(config["history"].as_array().unwrap().len(), changes.len());
        assert_eq!(config["history"][0]["empty_layer"], true);
        let text = String::from_utf8(to_bytes(&config)).unwrap();
        assert!(text.starts_with(r#"{"architecture":"#), "keys are sorted: {text}");
    }
}
