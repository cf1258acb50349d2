//! `inspect NAME`: what a built image is, as text: its digests, the config a runtime reads, then
//! the library's layer report ([`BuiltImage::inspect`]): one line per layer with its size, the
//! step that made it, cached or built and why, and on request what each layer adds, changes and
//! removes, largest first. It deliberately adds nothing to that report but the config.

use std::fmt::Write as _;

use serde_json::Value;

use super::error::CliError;
use crate::{BuildError, BuiltImage, InspectOptions};

/// The text `inspect` prints for the image `name`; `files` lists what each layer changes.
pub(crate) fn describe(name: &str, built: &BuiltImage, files: bool) -> Result<String, CliError> {
    let config = built.config().map_err(|source| {
        CliError::Build(BuildError::Step { step: format!("reading the config of {name}"), source: Box::new(source) })
    })?;
    let mut text = String::new();
    let _ = writeln!(text, "image       {name}");
    let _ = writeln!(text, "digest      {}", built.manifest_digest());
    let _ = writeln!(text, "config      {}", built.config_digest());
    let platform = [&config["os"], &config["architecture"]].map(|value| value.as_str().unwrap_or("?").to_owned());
    let _ = writeln!(text, "platform    {}", platform.join("/"));
    if let Some(created) = config["created"].as_str() {
        let _ = writeln!(text, "created     {created}");
    }
    let runtime = &config["config"];
    for (label, field) in [("entrypoint", "Entrypoint"), ("cmd", "Cmd")] {
        if let Some(argv) = runtime[field].as_array() {
            let _ = writeln!(text, "{label:<11} {}", Value::Array(argv.clone()));
        }
    }
    for (label, field) in [("workdir", "WorkingDir"), ("user", "User")] {
        if let Some(value) = runtime[field].as_str().filter(|value| !value.is_empty()) {
            let _ = writeln!(text, "{label:<11} {value}");
        }
    }
    for variable in runtime["Env"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        let _ = writeln!(text, "env         {variable}");
    }
    for port in runtime["ExposedPorts"].as_object().into_iter().flat_map(|ports| ports.keys()) {
        let _ = writeln!(text, "expose      {port}");
    }
    for (key, value) in runtime["Labels"].as_object().into_iter().flatten() {
        let _ = writeln!(text, "label       {key}={}", value.as_str().unwrap_or_default());
    }
    let _ = writeln!(text, "layers      {} ({} bytes)", built.layers().len(), built.size());
    let options = if files { InspectOptions::default().with_files() } else { InspectOptions::default() };
    text.push_str(&built.inspect(options)?);
    Ok(text)
}
