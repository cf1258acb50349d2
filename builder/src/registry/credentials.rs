//! Registry credentials from Docker's client configuration, as `docker login` leaves them.
//!
//! The file is `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`; a missing file
//! means no credentials. For a registry, the first of these that has an entry wins, as in the
//! Docker CLI:
//!
//! 1. `credHelpers[registry]`: runs `docker-credential-<helper> get` with the server address on
//!    stdin and reads `{"Username": …, "Secret": …}` from stdout;
//! 2. `credsStore`: the same with the default helper (a helper's "credentials not found" falls
//!    through to the next source);
//! 3. `auths[registry]`: `auth` is base64 of `user:password` (or `username` and `password`
//!    fields).
//!
//! Keys are compared by host: `https://registry.example/v1/`, `registry.example` and
//! `http://registry.example` are the same entry. Docker Hub is stored under
//! `https://index.docker.io/v1/` and is found for `docker.io`, `index.docker.io` and
//! `registry-1.docker.io`.
//!
//! What it deliberately is not: a `docker login` (nothing is ever written) or an OAuth client:
//! an identity token (`identitytoken`, or a helper's `<token>` user) is reported, not exchanged.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde::Deserialize;

use super::RegistryError;

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// No credentials: requests go without them (a bearer token is still fetched when the
    /// registry asks for one).
    Anonymous,
    /// A user name and password (or token), sent as HTTP basic authentication.
    Basic {
        /// The user name.
        username: String,
        /// The password or access token.
        password: String,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Anonymous => formatter.write_str("Anonymous"),
            Credential::Basic { username, .. } => write!(formatter, "Basic({username}, <redacted>)"),
        }
    }
}

/// The key Docker stores Docker Hub's credentials under.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

/// The credential sources of one Docker client configuration.
#[derive(Debug)]
pub struct CredentialStore {
    path: PathBuf,
    config: DockerConfig,
    /// `PATH` for finding `docker-credential-*` helpers; `None` inherits the process's.
    helper_path: Option<OsString>,
}

impl CredentialStore {
    /// The configuration this process's Docker client would read.
    pub fn from_environment() -> Result<CredentialStore, RegistryError> {
        match config_dir(|name| std::env::var_os(name)) {
            Some(dir) => CredentialStore::load(&dir.join("config.json"), None),
            // Neither DOCKER_CONFIG nor HOME: no configuration, so anonymous access.
            None => Ok(CredentialStore { path: PathBuf::new(), config: DockerConfig::default(), helper_path: None }),
        }
    }

    /// The configuration in `path` (missing: no credentials), with helpers found on
    /// `helper_path` (`None`: the process's `PATH`).
    pub fn load(path: &Path, helper_path: Option<OsString>) -> Result<CredentialStore, RegistryError> {
        let config = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|error| RegistryError::Credentials {
                registry: "(any)".into(),
                origin: path.display().to_string(),
                reason: format!("not a Docker client configuration: {error}"),
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => DockerConfig::default(),
            Err(error) => {
                return Err(RegistryError::Credentials {
                    registry: "(any)".into(),
                    origin: path.display().to_string(),
                    reason: format!("cannot read it: {error}"),
                });
            }
        };
        Ok(CredentialStore { path: path.to_owned(), config, helper_path })
    }

    /// The credential for `registry` (`host[:port]` as the request goes to it).
    pub fn credential_for(&self, registry: &str) -> Result<Credential, RegistryError> {
        let wanted = normalise_key(registry);
        let helper =
            self.config.cred_helpers.iter().find(|(key, _)| normalise_key(key) == wanted).map(|(_, helper)| helper);
        if let Some(helper) = helper
            && let Some(credential) = self.ask_helper(helper, registry)?
        {
            return Ok(credential);
        }
        if let Some(helper) = &self.config.creds_store
            && let Some(credential) = self.ask_helper(helper, registry)?
        {
            return Ok(credential);
        }
        let entry = self.config.auths.iter().find(|(key, _)| normalise_key(key) == wanted);
        let Some((key, entry)) = entry else { return Ok(Credential::Anonymous) };
        self.decode_entry(registry, key, entry)
    }

    fn decode_entry(&self, registry: &str, key: &str, entry: &AuthEntry) -> Result<Credential, RegistryError> {
        let origin = format!("{} (auths[{key:?}])", self.path.display());
        let error = |reason: &str| RegistryError::Credentials {
            registry: registry.to_owned(),
            origin: origin.clone(),
            reason: reason.to_owned(),
        };
        if entry.identitytoken.as_deref().is_some_and(|token| !token.is_empty()) {
            return Err(error(
                "holds an identity token, which layerwright cannot exchange; `docker login` with a password or access token",
            ));
        }
        if let Some(encoded) = entry.auth.as_deref().filter(|encoded| !encoded.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|decode_error| error(&format!("`auth` is not base64: {decode_error}")))?;
            let decoded = String::from_utf8(decoded).map_err(|_| error("`auth` does not decode to UTF-8"))?;
            let Some((username, password)) = decoded.split_once(':') else {
                return Err(error("`auth` does not decode to user:password"));
            };
            return Ok(Credential::Basic { username: username.to_owned(), password: password.to_owned() });
        }
        match (&entry.username, &entry.password) {
            (Some(username), Some(password)) if !username.is_empty() => {
                Ok(Credential::Basic { username: username.clone(), password: password.clone() })
            }
            // An empty entry is what `docker login` leaves when a credsStore holds the secret.
            _ => Ok(Credential::Anonymous),
        }
    }

    /// Runs `docker-credential-<helper> get`; `None` when it has no credentials for `registry`.
    fn ask_helper(&self, helper: &str, registry: &str) -> Result<Option<Credential>, RegistryError> {
        let program = format!("docker-credential-{helper}");
        let error = |reason: String| RegistryError::Credentials {
            registry: registry.to_owned(),
            origin: format!("{program} (named in {})", self.path.display()),
            reason,
        };
        let server = if is_docker_hub(registry) { DOCKER_HUB_KEY.to_owned() } else { registry.to_owned() };
        let mut command = Command::new(&program);
        if let Some(path) = &self.helper_path {
            command.env("PATH", path);
        }
        let mut child = command
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|spawn_error| error(format!("cannot run it: {spawn_error}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A helper that exits without reading makes this fail; its exit status says more.
            let _ = stdin.write_all(server.as_bytes());
        }
        let output = child.wait_with_output().map_err(|wait_error| error(format!("cannot run it: {wait_error}")))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            let said = format!("{}{}", stdout.trim(), String::from_utf8_lossy(&output.stderr).trim());
            // The helpers' shared "not found" message (docker-credential-helpers' ErrCredentialsNotFound).
            if said.contains("credentials not found") {
                return Ok(None);
            }
            return Err(error(format!("it failed ({}): {said}", output.status)));
        }
        let answer: HelperAnswer =
            serde_json::from_str(&stdout).map_err(|parse_error| error(format!("unexpected answer: {parse_error}")))?;
        if answer.username == "<token>" {
            return Err(error(
                "it holds an identity token, which layerwright cannot exchange; `docker login` with a password or access token".into(),
            ));
        }
        Ok(Some(Credential::Basic { username: answer.username, password: answer.secret }))
    }
}

/// Docker's client configuration directory: `$DOCKER_CONFIG`, else `$HOME/.docker`.
pub fn config_dir(environment: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    if let Some(dir) = environment("DOCKER_CONFIG").filter(|dir| !dir.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    environment("HOME").filter(|home| !home.is_empty()).map(|home| PathBuf::from(home).join(".docker"))
}

fn is_docker_hub(registry: &str) -> bool {
    matches!(registry, "docker.io" | "index.docker.io" | "registry-1.docker.io")
}

/// A config key or registry as a bare `host[:port]`, lowercased; Docker Hub's names as one.
fn normalise_key(key: &str) -> String {
    let without_scheme = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or_default().to_ascii_lowercase();
    if is_docker_hub(&host) { "index.docker.io".to_owned() } else { host }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn basic(username: &str, password: &str) -> Credential {
        Credential::Basic { username: username.into(), password: password.into() }
    }

    /// A temp HOME with `.docker/config.json` holding `config`.
    fn home_with(config: &str) -> tempfile::TempDir {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".docker")).unwrap();
        std::fs::write(home.path().join(".docker/config.json"), config).unwrap();
        home
    }

    fn store_in(home: &Path, helper_path: Option<OsString>) -> CredentialStore {
        let environment = |name: &str| (name == "HOME").then(|| home.as_os_str().to_owned());
        let dir = config_dir(environment).unwrap();
        assert_eq!(dir, home.join(".docker"));
        CredentialStore::load(&dir.join("config.json"), helper_path).unwrap()
    }

    #[test]
    fn auths_entries_decode_base64_and_match_by_host() {
        // "alice:s3cr:et" and "hub-user:hub-pass"
        let home = home_with(
            r#"{"auths": {
                "https://registry.example:5000/v1/": {"auth": "YWxpY2U6czNjcjpldA=="},
                "https://index.docker.io/v1/": {"auth": "aHViLXVzZXI6aHViLXBhc3M="},
                "plain.example": {"username": "bob", "password": "pw"},
                "marker.example": {}
            }}"#,
        );
        let store = store_in(home.path(), None);
        assert_eq!(store.credential_for("registry.example:5000").unwrap(), basic("alice", "s3cr:et"));
        assert_eq!(store.credential_for("Registry.Example:5000").unwrap(), basic("alice", "s3cr:et"));
        assert_eq!(store.credential_for("index.docker.io").unwrap(), basic("hub-user", "hub-pass"));
        assert_eq!(store.credential_for("docker.io").unwrap(), basic("hub-user", "hub-pass"));
        assert_eq!(store.credential_for("plain.example").unwrap(), basic("bob", "pw"));
        assert_eq!(store.credential_for("marker.example").unwrap(), Credential::Anonymous);
        assert_eq!(store.credential_for("registry.example").unwrap(), Credential::Anonymous, "the port matters");
        assert_eq!(store.credential_for("127.0.0.1:5000").unwrap(), Credential::Anonymous);
    }

    #[test]
    fn broken_entries_and_files_are_errors_naming_the_file() {
        let home = home_with(r#"{"auths": {"bad.example": {"auth": "!!!"}, "token.example": {"identitytoken": "t"}}}"#);
        let store = store_in(home.path(), None);
        let error = store.credential_for("bad.example").unwrap_err().to_string();
        assert!(error.contains("bad.example") && error.contains("config.json") && error.contains("base64"), "{error}");
        let error = store.credential_for("token.example").unwrap_err().to_string();
        assert!(error.contains("identity token"), "{error}");

        let home = home_with("{not json");
        let environment = |name: &str| (name == "HOME").then(|| home.path().as_os_str().to_owned());
        let error = CredentialStore::load(&config_dir(environment).unwrap().join("config.json"), None).unwrap_err();
        assert!(error.to_string().contains("not a Docker client configuration"), "{error}");

        let empty = tempfile::tempdir().unwrap();
        assert_eq!(store_in_missing(empty.path()).credential_for("x.example").unwrap(), Credential::Anonymous);
    }

    fn store_in_missing(home: &Path) -> CredentialStore {
        CredentialStore::load(&home.join(".docker/config.json"), None).unwrap()
    }

    #[test]
    fn docker_config_overrides_home() {
        let environment = |name: &str| match name {
            "DOCKER_CONFIG" => Some(OsString::from("/etc/docker-client")),
            "HOME" => Some(OsString::from("/root")),
            _ => None,
        };
        assert_eq!(config_dir(environment), Some(PathBuf::from("/etc/docker-client")));
        assert_eq!(config_dir(|_| None), None);
    }

    #[test]
    fn credential_helpers_come_first_and_not_found_falls_through() {
        let helpers = tempfile::tempdir().unwrap();
        // Answers for one server, says "not found" (exit 1) for any other, like the real helpers.
        let script = r#"#!/bin/sh
read -r server
if [ "$1" = get ] && [ "$server" = "helped.example" ]; then
    printf '{"ServerURL":"%s","Username":"helper-user","Secret":"helper-secret"}' "$server"
    exit 0
fi
echo "credentials not found in native keychain"
exit 1
"#;
        for name in ["docker-credential-fake", "docker-credential-store"] {
            let path = helpers.path().join(name);
            std::fs::write(&path, script).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let home = home_with(
            r#"{"credHelpers": {"helped.example": "fake", "broken.example": "missing"},
                "credsStore": "store",
                "auths": {"helped.example": {"auth": "dTpw"}, "filed.example": {"auth": "dTpw"}}}"#,
        );
        let path = std::env::join_paths([helpers.path(), Path::new("/usr/bin"), Path::new("/bin")]).unwrap();
        let store = store_in(home.path(), Some(path));
        assert_eq!(store.credential_for("helped.example").unwrap(), basic("helper-user", "helper-secret"));
        // credsStore says "not found": the file's entry is used.
        assert_eq!(store.credential_for("filed.example").unwrap(), basic("u", "p"));
        assert_eq!(store.credential_for("nothing.example").unwrap(), Credential::Anonymous);
        let error = store.credential_for("broken.example").unwrap_err().to_string();
        assert!(error.contains("docker-credential-missing") && error.contains("broken.example"), "{error}");
    }
}
