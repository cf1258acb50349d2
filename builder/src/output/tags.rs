//! Tags as the exporters take them (`app`, `app:1.2`, `localhost:5000/team/app:latest`),
//! validated and normalised to `name:tag`.
//!
//! What it deliberately is not: a registry reference parser (pushes and pulls parse theirs with
//! the registry client); this one needs no registry feature.

use super::ExportError;

/// A validated image reference, normalised to `name:tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ImageReference {
    /// `app:latest`, `localhost:5000/app:1`.
    pub(super) full_name: String,
    /// `latest`, `1`.
    pub(super) tag: String,
}

impl ImageReference {
    /// Accepts docker references without a digest: `[host[:port]/]path[:tag]`, the path made
    /// of lowercase components (`[a-z0-9]` separated by `.`, `_`, `-`), the tag of
    /// `[A-Za-z0-9_.-]` (at most 128, not starting with `.` or `-`).
    pub(super) fn parse(reference: &str) -> Result<ImageReference, ExportError> {
        let invalid = |reason: &str| ExportError::InvalidTag { tag: reference.to_owned(), reason: reason.to_owned() };
        if reference.is_empty() {
            return Err(invalid("it is empty"));
        }
        if reference.chars().any(char::is_whitespace) {
            return Err(invalid("it contains whitespace"));
        }
        if reference.contains('@') {
            return Err(invalid("a digest cannot name an export; give a name and tag such as app:latest"));
        }
        let last_slash = reference.rfind('/');
        let (name, tag) = match reference.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                (&reference[..colon], &reference[colon + 1..])
            }
            _ => (reference, "latest"),
        };
        if !is_valid_tag(tag) {
            return Err(invalid("the tag must be 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'"));
        }
        if name.len() > 255 {
            return Err(invalid("the name is longer than 255 characters"));
        }
        let mut components: Vec<&str> = name.split('/').collect();
        let first = components[0];
        let has_host = components.len() > 1 && (first.contains('.') || first.contains(':') || first == "localhost");
        if has_host {
            if !is_valid_host(first) {
                return Err(invalid("the registry host must be host[:port] of [A-Za-z0-9.-]"));
            }
            components.remove(0);
        }
        if !components.iter().all(|component| is_valid_path_component(component)) {
            return Err(invalid(
                "each name component must be lowercase [a-z0-9], separated inside by '.', '_' or '-' (e.g. team/app)",
            ));
        }
        Ok(ImageReference { full_name: format!("{name}:{tag}"), tag: tag.to_owned() })
    }
}

pub(super) fn is_valid_tag(tag: &str) -> bool {
    let mut characters = tag.chars();
    let Some(first) = characters.next() else {
        return false;
    };
    tag.len() <= 128
        && (first.is_ascii_alphanumeric() || first == '_')
        && characters.all(|character| character.is_ascii_alphanumeric() || matches!(character, '_' | '.' | '-'))
}

pub(super) fn is_valid_host(host: &str) -> bool {
    let (name, port) = match host.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let name_is_valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|character| character.is_ascii_alphanumeric() || character == '-')
        });
    let port_is_valid =
        port.is_none_or(|port| !port.is_empty() && port.len() <= 5 && port.chars().all(|c| c.is_ascii_digit()));
    name_is_valid && port_is_valid
}

pub(super) fn is_valid_path_component(component: &str) -> bool {
    let is_alphanumeric = |character: char| character.is_ascii_lowercase() || character.is_ascii_digit();
    let is_separator = |character: char| matches!(character, '.' | '_' | '-');
    !component.is_empty()
        && component.starts_with(is_alphanumeric)
        && component.ends_with(is_alphanumeric)
        && component.chars().all(|character| is_alphanumeric(character) || is_separator(character))
}
