//! The one place tokio and `oci-client` are set up: a client for one image reference (its
//! transport and credentials), a runtime to drive it, and the translation of its errors into
//! [`RegistryError`]s that name the registry, the repository and the HTTP status.

use std::future::Future;
use std::sync::Once;
use std::time::Duration;

use layerwright_cache::Digest;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};

use super::RegistryError;
use super::credentials::{Credential, CredentialStore};
use super::reference::RegistryReference;

/// How long a client waits for a connection, and for the next bytes of an answer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
}

impl Timeouts {
    /// Pushes and pulls of images: the user asked for this transfer, so be patient.
    pub const TRANSFER: Timeouts = Timeouts { connect: Duration::from_secs(30), read: Duration::from_secs(120) };
    /// The remote cache: only an accelerator, so a registry that stalls is given up on soon and
    /// the build goes on locally.
    pub const CACHE: Timeouts = Timeouts { connect: Duration::from_secs(5), read: Duration::from_secs(20) };
}

/// The most bytes of a manifest, an index or an image config that are read: the 4 MiB
/// distribution accepts for a manifest. A manifest is read while streaming and refused as soon
/// as it passes this (a hostile registry cannot make the builder hold gigabytes); a config is
/// refused by its descriptor's size, and its download stops at that size.
pub(crate) const MAX_DOCUMENT_BYTES: u64 = 4 << 20;

/// A client bound to one reference's registry and repository.
pub(crate) struct RegistryClient {
    pub client: Client,
    pub reference: RegistryReference,
    pub auth: RegistryAuth,
    /// Plain HTTP (a loopback registry, or one marked insecure): a token realm may be HTTP too.
    plain_http: bool,
    /// For the requests made here rather than through `client` (manifests, read while
    /// streaming; the token challenge), configured as `oci-client` configures its own.
    http: reqwest::Client,
    /// The bearer token [`RegistryClient::authenticate`] got, if the registry uses tokens.
    token: std::sync::Mutex<Option<String>>,
}

impl RegistryClient {
    /// A client for `reference`, with the Docker configuration's credentials for its registry.
    /// `insecure` means plain HTTP even for a registry that is not on this machine.
    pub fn new(reference: &RegistryReference, insecure: bool) -> Result<RegistryClient, RegistryError> {
        RegistryClient::with_timeouts(reference, insecure, Timeouts::TRANSFER)
    }

    /// As [`RegistryClient::new`], with the given patience.
    pub fn with_timeouts(
        reference: &RegistryReference,
        insecure: bool,
        timeouts: Timeouts,
    ) -> Result<RegistryClient, RegistryError> {
        install_crypto_provider();
        let plain_http = reference.uses_plain_http(insecure);
        let protocol = if plain_http { ClientProtocol::Http } else { ClientProtocol::Https };
        let config = ClientConfig {
            protocol,
            // The platform is chosen by `pull` itself, from the raw index.
            platform_resolver: None,
            connect_timeout: Some(timeouts.connect),
            // A registry that stops answering mid-transfer fails the operation instead of
            // hanging it; a slow but moving transfer is never cut.
            read_timeout: Some(timeouts.read),
            user_agent: concat!("layerwright/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        let credentials = CredentialStore::from_environment()?;
        let auth = match credentials.credential_for(reference.resolved_registry())? {
            Credential::Anonymous => RegistryAuth::Anonymous,
            Credential::Basic { username, password } => RegistryAuth::Basic(username, password),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .read_timeout(timeouts.read)
            .user_agent(concat!("layerwright/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| RegistryError::Client { reason: format!("cannot make an HTTP client: {error}") })?;
        Ok(RegistryClient {
            client: Client::new(config),
            reference: reference.clone(),
            auth,
            plain_http,
            http,
            token: std::sync::Mutex::new(None),
        })
    }

    /// `https` or, for a loopback or insecure registry, `http`.
    fn scheme(&self) -> &'static str {
        if self.plain_http { "http" } else { "https" }
    }

    /// Before credentials go to a token service: the registry's challenge names the service
    /// (its `realm`), which may be any URL. Credentials go to it only over HTTPS, unless the
    /// registry itself is on this machine or marked insecure ([`RegistryError::InsecureTokenRealm`]).
    async fn check_token_realm(&self) -> Result<(), RegistryError> {
        let url = format!("{}://{}/v2/", self.scheme(), self.reference.resolved_registry());
        let response =
            self.http.get(&url).send().await.map_err(|error| self.http_error("probing the registry", &error))?;
        let Some(challenge) = response.headers().get(reqwest::header::WWW_AUTHENTICATE) else { return Ok(()) };
        let Some(realm) = bearer_realm(&String::from_utf8_lossy(challenge.as_bytes())) else { return Ok(()) };
        if realm_may_receive_credentials(&realm, self.plain_http) {
            return Ok(());
        }
        log::warn!("registry {}: refusing to send credentials to the token realm {realm}", self.reference.registry());
        Err(RegistryError::InsecureTokenRealm { registry: self.reference.registry().to_owned(), realm })
    }

    fn http_error(&self, action: impl Into<String>, error: &reqwest::Error) -> RegistryError {
        RegistryError::Request {
            registry: self.reference.registry().to_owned(),
            repository: self.reference.repository().to_owned(),
            action: action.into(),
            status: error.status().map(|status| status.as_u16()),
            detail: crate::error_text::describe_chain(error),
        }
    }

    /// The manifest or index `reference` (of this client's repository) names, as bytes, read
    /// while streaming and refused past [`MAX_DOCUMENT_BYTES`]; `None` when the registry has no
    /// such thing (404). A `Docker-Content-Digest` the registry sends is checked.
    pub async fn fetch_manifest(
        &self,
        reference: &RegistryReference,
        accepted: &[&str],
    ) -> Result<Option<Vec<u8>>, RegistryError> {
        let target = reference.digest().or(reference.tag()).unwrap_or("latest");
        let url = format!(
            "{}://{}/v2/{}/manifests/{target}",
            self.scheme(),
            reference.resolved_registry(),
            reference.repository()
        );
        let action = format!("fetching {}", reference.whole());
        let mut request = self.http.get(&url).header(reqwest::header::ACCEPT, accepted.join(", "));
        let token = self.token.lock().expect("the token lock is never poisoned").clone();
        request = match (token, &self.auth) {
            (Some(token), _) => request.bearer_auth(token),
            (None, RegistryAuth::Basic(username, password)) => request.basic_auth(username, Some(password)),
            (None, _) => request,
        };
        let mut response = request.send().await.map_err(|error| self.http_error(action.as_str(), &error))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let too_big = || self.unusable(format!("{} is bigger than {MAX_DOCUMENT_BYTES} bytes", reference.whole()));
        if response.content_length().is_some_and(|length| length > MAX_DOCUMENT_BYTES) {
            return Err(too_big());
        }
        let expected = response
            .headers()
            .get("docker-content-digest")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| Digest::parse(value).ok());
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|error| self.http_error(action.as_str(), &error))? {
            if body.len() as u64 + chunk.len() as u64 > MAX_DOCUMENT_BYTES {
                return Err(too_big());
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(512)]).trim().to_owned();
            return Err(RegistryError::Request {
                registry: self.reference.registry().to_owned(),
                repository: self.reference.repository().to_owned(),
                action,
                status: Some(status.as_u16()),
                detail: if text.is_empty() { format!("(empty body) ({url})") } else { format!("{text} ({url})") },
            });
        }
        if let Some(expected) = expected
            && Digest::of_bytes(&body) != expected
        {
            return Err(self.unusable(format!(
                "{} arrived with digest {}, but the registry says {expected}",
                reference.whole(),
                Digest::of_bytes(&body)
            )));
        }
        Ok(Some(body))
    }

    /// Stores the credentials and, when the registry asks for bearer tokens, fetches one for
    /// `operation`, so that a refused login fails here rather than on the first blob.
    pub async fn authenticate(&self, operation: RegistryOperation) -> Result<(), RegistryError> {
        let action = match operation {
            RegistryOperation::Push => "authenticating to push",
            RegistryOperation::Pull => "authenticating to pull",
        };
        if matches!(self.auth, RegistryAuth::Basic(..)) {
            self.check_token_realm().await?;
        }
        let token = self
            .client
            .auth(&self.reference.inner, &self.auth, operation)
            .await
            .map_err(|error| self.error(action, error))?;
        *self.token.lock().expect("the token lock is never poisoned") = token;
        Ok(())
    }

    /// The error of `action` on this client's registry and repository.
    pub fn error(&self, action: impl Into<String>, error: OciDistributionError) -> RegistryError {
        let (status, detail) = status_and_detail(&error);
        RegistryError::Request {
            registry: self.reference.registry().to_owned(),
            repository: self.reference.repository().to_owned(),
            action: action.into(),
            status,
            detail,
        }
    }

    /// Whether the repository has blob `digest` (`HEAD /v2/<name>/blobs/<digest>`).
    pub async fn blob_exists(&self, digest: &Digest) -> Result<bool, RegistryError> {
        self.client
            .blob_exists(&self.reference.inner, &digest.to_string())
            .await
            .map_err(|error| self.error(format!("asking whether blob {digest} exists"), error))
    }

    /// The bytes of blob `digest` as they come (the caller checks them against `size`).
    pub async fn blob_stream(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<oci_client::client::SizedStream, RegistryError> {
        let descriptor = OciDescriptor { digest: digest.to_string(), size: size as i64, ..OciDescriptor::default() };
        self.client
            .pull_blob_stream(&self.reference.inner, &descriptor)
            .await
            .map_err(|error| self.error(format!("downloading blob {digest}"), error))
    }

    pub fn unusable(&self, reason: impl Into<String>) -> RegistryError {
        RegistryError::Unusable {
            registry: self.reference.registry().to_owned(),
            repository: self.reference.repository().to_owned(),
            reason: reason.into(),
        }
    }
}

/// The `realm` of a `Bearer` challenge (`Bearer realm="https://auth.example/token",service=...`).
fn bearer_realm(challenge: &str) -> Option<String> {
    let (scheme, parameters) = challenge.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    parameters.split(',').find_map(|parameter| {
        let (name, value) = parameter.trim().split_once('=')?;
        name.trim().eq_ignore_ascii_case("realm").then(|| value.trim().trim_matches('"').to_owned())
    })
}

/// Whether credentials may go to `realm`: over HTTPS always; over anything else only for a
/// registry that is itself spoken to in plain HTTP (loopback, or marked insecure).
fn realm_may_receive_credentials(realm: &str, plain_http_registry: bool) -> bool {
    let scheme = realm.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
    scheme.as_deref() == Some("https") || plain_http_registry
}

/// rustls needs one crypto provider per process; `ring` is the one this crate builds with. A
/// provider installed earlier by the embedding program is kept.
fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Runs `work` on a thread of its own (see `crate::runtime`).
pub(crate) fn on_own_thread<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    crate::runtime::on_own_thread("layerwright-registry", work)
}

/// Drives `future` to completion on a current-thread runtime (see `crate::runtime`).
pub(crate) fn block_on<F: Future>(future: F) -> Result<F::Output, RegistryError> {
    crate::runtime::block_on(future).map_err(|reason| RegistryError::Client { reason })
}

/// The HTTP status of a failed request, when there was one, and what else is known.
fn status_and_detail(error: &OciDistributionError) -> (Option<u16>, String) {
    match error {
        OciDistributionError::ServerError { code, message, url } => {
            let message = message.trim();
            let message = if message.is_empty() { "(empty body)" } else { message };
            (Some(*code), format!("{message} ({url})"))
        }
        OciDistributionError::UnauthorizedError { url } => {
            (Some(401), format!("unauthorized ({url}); check `docker login` for this registry"))
        }
        OciDistributionError::RegistryError { envelope, url } => {
            // oci-client keeps only the error envelope of a 4xx answer; the distribution spec
            // fixes the status of each code, so the first code's status is the answer's.
            let status = envelope.errors.first().and_then(|error| status_of_code(&error.code));
            let codes: Vec<String> = envelope
                .errors
                .iter()
                .map(|error| {
                    let code = match &error.code {
                        OciErrorCode::Other(code) => code.clone(),
                        known => serde_json::to_value(known)
                            .ok()
                            .and_then(|value| value.as_str().map(str::to_owned))
                            .unwrap_or_else(|| format!("{known:?}")),
                    };
                    if error.message.is_empty() { code } else { format!("{code}: {}", error.message) }
                })
                .collect();
            (status, format!("{} ({url})", codes.join("; ")))
        }
        OciDistributionError::RequestError(request_error) => {
            let status = request_error.status().map(|status| status.as_u16());
            (status, crate::error_text::describe_chain(request_error))
        }
        OciDistributionError::AuthenticationFailure(reason) => {
            (None, format!("the token service refused the credentials: {}", reason.trim()))
        }
        other => (None, crate::error_text::describe_chain(other)),
    }
}

/// The HTTP status the distribution spec gives each error code.
fn status_of_code(code: &OciErrorCode) -> Option<u16> {
    Some(match code {
        OciErrorCode::BlobUnknown
        | OciErrorCode::BlobUploadUnknown
        | OciErrorCode::ManifestBlobUnknown
        | OciErrorCode::ManifestUnknown
        | OciErrorCode::NameUnknown
        | OciErrorCode::NotFound => 404,
        OciErrorCode::BlobUploadInvalid
        | OciErrorCode::DigestInvalid
        | OciErrorCode::ManifestInvalid
        | OciErrorCode::ManifestUnverified
        | OciErrorCode::NameInvalid
        | OciErrorCode::SizeInvalid
        | OciErrorCode::TagInvalid => 400,
        OciErrorCode::Unauthorized => 401,
        OciErrorCode::Denied => 403,
        OciErrorCode::Unsupported => 405,
        OciErrorCode::Toomanyrequests => 429,
        OciErrorCode::Other(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_to_a_token_realm_over_https_unless_the_registry_is_plain_http_itself() {
        let realm = bearer_realm(r#"Bearer realm="http://auth.example/token",service="registry.example""#);
        assert_eq!(realm.as_deref(), Some("http://auth.example/token"));
        assert_eq!(bearer_realm(r#"Basic realm="registry""#), None);
        assert!(!realm_may_receive_credentials("http://auth.example/token", false));
        assert!(!realm_may_receive_credentials("ftp://auth.example/token", false));
        assert!(!realm_may_receive_credentials("auth.example/token", false));
        assert!(realm_may_receive_credentials("https://auth.example/token", false));
        assert!(realm_may_receive_credentials("HTTPS://auth.example/token", false));
        assert!(realm_may_receive_credentials("http://127.0.0.1:5001/token", true));
    }
}
