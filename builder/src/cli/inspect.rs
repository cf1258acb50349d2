//! `inspect NAME`: what a built image is, as text: its digests, the config a runtime reads, and
//! each layer with its size and what it holds (from the layer listings of the library).

use std::fmt::Write as _;

use serde_json::Value;

use super::error::CliError;
use crate::{BuildError, BuiltImage};

/// The paths shown per layer unless every path is asked for.
const PATHS_PER_LAYER: usize = 8;

/// The text `inspect` prints for the image `name`; `full` lists every path of every layer.
pub(crate) fn describe(name: &str, built: &BuiltImage, full: bool) -> Result<String, CliError> {
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
    let layers = built.layer_listings()?;
    let _ = writeln!(text, "layers      {} ({} bytes)", layers.len(), built.size());
    for (position, layer) in layers.iter().enumerate() {
        let lines: Vec<&str> = layer.listing.lines().collect();
        let counts = count_kinds(&lines);
        let _ = writeln!(
            text,
            "  {:>2}  {}  {} bytes  {}  {counts}",
            position + 1,
            layer.layer.digest,
            layer.layer.size,
            layer.layer.media_type.rsplit('.').next().unwrap_or_default(),
        );
        let shown = if full { lines.len() } else { lines.len().min(PATHS_PER_LAYER) };
        for line in &lines[..shown] {
            let _ = writeln!(text, "        {line}");
        }
        if shown < lines.len() {
            let _ = writeln!(text, "        … {} more (inspect --full)", lines.len() - shown);
        }
    }
    Ok(text)
}

/// `3 dirs, 2 files (120 bytes), 1 symlink, 1 whiteout` of a layer's listing lines.
fn count_kinds(lines: &[&str]) -> String {
    let mut kinds: Vec<(&str, usize)> = Vec::new();
    let mut file_bytes = 0u64;
    for line in lines {
        let mut fields = line.split(' ');
        let kind = fields.next().unwrap_or_default();
        if kind == "file" {
            file_bytes += fields.nth(2).and_then(|size| size.parse::<u64>().ok()).unwrap_or(0);
        }
        match kinds.iter_mut().find(|(known, _)| *known == kind) {
            Some((_, count)) => *count += 1,
            None => kinds.push((kind, 1)),
        }
    }
    let parts: Vec<String> = kinds
        .iter()
        .map(|(kind, count)| {
            let plural = if *count == 1 { "" } else { "s" };
            let bytes = if *kind == "file" { format!(" ({file_bytes} bytes)") } else { String::new() };
            format!("{count} {kind}{plural}{bytes}")
        })
        .collect();
    if parts.is_empty() { "empty".to_owned() } else { parts.join(", ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_counted_in_order_of_appearance() {
        let lines = [
            "dir 0755 0:0 - - /app",
            "file 0644 0:0 5 sha256:aa /app/a",
            "file 0755 0:0 7 sha256:bb /app/b",
            "symlink 0777 0:0 - -> a /app/c",
            "whiteout /tmp/x",
        ];
        assert_eq!(count_kinds(&lines), "1 dir, 2 files (12 bytes), 1 symlink, 1 whiteout");
        assert_eq!(count_kinds(&[]), "empty");
    }
}
