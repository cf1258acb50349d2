//! Loading an image into the local Docker engine, sending only what the engine lacks.
//!
//! The engine's classic image store (Docker 20.10 to 28 without the containerd store) loads a
//! `docker save` tar by reading its `manifest.json`, and for each layer first looks up the
//! layer chain it would make: a chain the engine already holds is reused and the layer's file
//! in the tar is never opened. So a load stream may leave out the files of the layers the
//! engine has. Which those are is learned by asking the engine: the image the tag names now
//! (the previous build, most often) and, when that shares nothing, the other images it holds;
//! a layer counts as held when the whole chain below it matches one image's `RootFS.Layers`.
//! The stream then holds `manifest.json`, the config and the missing layers only, so a
//! rebuild that changed one layer sends that layer. Should the engine still refuse the
//! trimmed stream, the whole image is sent once more.
//!
//! The stream is written straight to the engine's socket (chunked HTTP/1.1), never to a file
//! and never whole into memory.
//!
//! Why a load and not a pull from a registry on loopback: Docker 20.10 applies each new layer
//! the same way on both routes (a re-executed `docker-untar` into the layer's directory), and
//! that is most of the time. Measured on W4 after one file changed (three new layers, two of
//! them holding the app's 300 files), a pull took 712 ms and this route 687 ms; a load of a
//! stream whose layers the engine all holds takes 85–97 ms. An engine-side cost proportional
//! to the files of the changed layers remains, which BuildKit inside dockerd avoids by writing
//! to the layer store.
//!
//! What it deliberately is not: a Docker client library. It speaks the three requests it needs
//! (`GET /images/json`, `GET /images/{name}/json`, `POST /images/load`), over a Unix socket
//! or plain TCP (`DOCKER_HOST=unix://…` or `tcp://…`; TLS engines are not supported). An engine
//! using the containerd image store imports the tar through containerd, which needs every
//! blob in it: there, the layers it holds would have to be offered through its content store
//! (or a registry on loopback) instead.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use thiserror::Error;

use super::blobs::copy_verified_blob;
use super::documents::{blob_member, image_blob_sizes};
use super::tags::ImageReference;
use super::tar_archive::{TarMember, write_members};
use super::{ExportError, ImageParts};
use crate::oci::canonical::to_bytes as canonical_json;

/// The Engine API version spoken: Docker 20.10's, which every later engine accepts.
const API_VERSION: &str = "v1.41";

/// How many images are inspected, at most, to find layers the engine already holds.
const MAX_IMAGES_INSPECTED: usize = 64;

/// How long a request may wait for the engine before it is given up (a load of a large layer
/// streams for longer: the limit applies to each read and write).
const IO_TIMEOUT: Duration = Duration::from_secs(300);

/// Why an image could not be loaded into the Docker engine.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LoadError {
    /// No engine answers at the address (`DOCKER_HOST`, or `/var/run/docker.sock`).
    #[error("no Docker engine answers at {address}: {source} (start dockerd, or set DOCKER_HOST)")]
    NoEngine {
        /// The address tried.
        address: String,
        /// What connecting said.
        source: io::Error,
    },
    /// `DOCKER_HOST` names a transport this client does not speak.
    #[error("DOCKER_HOST={address} is not supported: use unix:///path/to/docker.sock or tcp://host:port")]
    UnsupportedAddress {
        /// The value of `DOCKER_HOST`.
        address: String,
    },
    /// The conversation with the engine broke off.
    #[error("talking to the Docker engine at {address}: {source}")]
    Io {
        /// The engine's address.
        address: String,
        /// What failed.
        source: io::Error,
    },
    /// The engine answered with an error.
    #[error("the Docker engine refused to load {tag}: {message}")]
    Refused {
        /// The tag being loaded.
        tag: String,
        /// What the engine said.
        message: String,
    },
    /// The tag is not a valid image name.
    #[error(transparent)]
    Export(#[from] ExportError),
}

/// What a load sent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadReport {
    /// The tag the image was loaded as (`name:tag`).
    pub tag: String,
    /// Layers whose content was sent.
    pub layers_sent: usize,
    /// Layers the engine already held, left out of the stream.
    pub layers_skipped: usize,
    /// Bytes of layer content sent.
    pub layer_bytes_sent: u64,
    /// Whether the engine refused the trimmed stream and the whole image was sent again.
    pub resent_whole: bool,
}

/// Loads the image into the engine at `DOCKER_HOST` (or the default socket) as `tag`.
pub fn load_into_docker(parts: ImageParts<'_>, tag: &str) -> Result<LoadReport, LoadError> {
    let reference = ImageReference::parse(tag)?;
    let engine = Engine::from_environment()?;
    let diff_ids = diff_ids_of(&parts)?;
    let held = engine.layers_held(&reference.full_name, &diff_ids)?;
    match engine.load(&parts, &reference, held) {
        Ok(report) => Ok(report),
        // A stream without some layers is only as good as what the engine said it held (an
        // image removed in between, say): send everything once.
        Err(LoadError::Refused { .. }) if held > 0 => {
            let report = engine.load(&parts, &reference, 0)?;
            Ok(LoadReport { resent_whole: true, ..report })
        }
        Err(error) => Err(error),
    }
}

/// The diff ids of the image's layers, from its config blob.
fn diff_ids_of(parts: &ImageParts<'_>) -> Result<Vec<String>, LoadError> {
    let path = parts.store.blob_path(parts.config);
    let bytes = std::fs::read(&path).map_err(|source| ExportError::Read { path: path.clone(), source })?;
    let config: Value = serde_json::from_slice(&bytes).map_err(|error| ExportError::Read {
        path,
        source: io::Error::new(io::ErrorKind::InvalidData, error.to_string()),
    })?;
    Ok(config["rootfs"]["diff_ids"]
        .as_array()
        .map(|ids| ids.iter().filter_map(|id| id.as_str().map(str::to_owned)).collect())
        .unwrap_or_default())
}

/// Where the engine listens.
#[derive(Debug, Clone)]
enum Engine {
    Unix(PathBuf),
    Tcp(String),
}

/// An HTTP response: status and body.
struct Response {
    status: u16,
    body: Vec<u8>,
}

impl Engine {
    fn from_environment() -> Result<Engine, LoadError> {
        let address = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned());
        if let Some(path) = address.strip_prefix("unix://") {
            return Ok(Engine::Unix(PathBuf::from(path)));
        }
        if let Some(host) = address.strip_prefix("tcp://") {
            return Ok(Engine::Tcp(host.trim_end_matches('/').to_owned()));
        }
        Err(LoadError::UnsupportedAddress { address })
    }

    fn address(&self) -> String {
        match self {
            Engine::Unix(path) => format!("unix://{}", path.display()),
            Engine::Tcp(host) => format!("tcp://{host}"),
        }
    }

    fn io_error(&self) -> impl Fn(io::Error) -> LoadError + '_ {
        move |source| LoadError::Io { address: self.address(), source }
    }

    fn connect(&self) -> Result<Box<dyn Connection>, LoadError> {
        let no_engine = |source| LoadError::NoEngine { address: self.address(), source };
        let connection: Box<dyn Connection> = match self {
            Engine::Unix(path) => {
                let stream = UnixStream::connect(path).map_err(no_engine)?;
                stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(self.io_error())?;
                stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(self.io_error())?;
                Box::new(stream)
            }
            Engine::Tcp(host) => {
                let stream = TcpStream::connect(host).map_err(no_engine)?;
                stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(self.io_error())?;
                stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(self.io_error())?;
                Box::new(stream)
            }
        };
        Ok(connection)
    }

    fn get(&self, path: &str) -> Result<Response, LoadError> {
        let mut connection = self.connect()?;
        let request = format!("GET /{API_VERSION}{path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n");
        connection.write_all(request.as_bytes()).map_err(self.io_error())?;
        read_response(&mut BufReader::new(connection)).map_err(self.io_error())
    }

    /// How many of `diff_ids`, bottom up, the engine already holds as one chain.
    fn layers_held(&self, tag: &str, diff_ids: &[String]) -> Result<usize, LoadError> {
        let layers_of = |name: &str| -> Result<Option<Vec<String>>, LoadError> {
            let response = self.get(&format!("/images/{}/json", percent_encode(name)))?;
            if response.status != 200 {
                return Ok(None);
            }
            let inspected: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
            Ok(inspected["RootFS"]["Layers"]
                .as_array()
                .map(|layers| layers.iter().filter_map(|layer| layer.as_str().map(str::to_owned)).collect()))
        };
        let common = |layers: &[String]| layers.iter().zip(diff_ids).take_while(|(held, ours)| held == ours).count();
        // The previous build under the same tag shares the most, most often.
        let mut best = layers_of(tag)?.map_or(0, |layers| common(&layers));
        if best == diff_ids.len() {
            return Ok(best);
        }
        let response = self.get("/images/json")?;
        if response.status != 200 {
            return Ok(best);
        }
        let images: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        let ids: Vec<String> = images
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|image| image["Id"].as_str().map(str::to_owned))
            .take(MAX_IMAGES_INSPECTED)
            .collect();
        for id in ids {
            if let Some(layers) = layers_of(&id)? {
                best = best.max(common(&layers));
            }
            if best == diff_ids.len() {
                break;
            }
        }
        Ok(best)
    }

    /// Streams the image, without the content of its bottom `held` layers, to `POST /images/load`.
    fn load(&self, parts: &ImageParts<'_>, reference: &ImageReference, held: usize) -> Result<LoadReport, LoadError> {
        let io_error = self.io_error();
        let mut connection = self.connect()?;
        let request = format!(
            "POST /{API_VERSION}/images/load?quiet=1 HTTP/1.1\r\nHost: docker\r\nContent-Type: application/x-tar\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        connection.write_all(request.as_bytes()).map_err(&io_error)?;
        let mut chunked = ChunkedWriter { inner: &mut connection, buffer: Vec::with_capacity(CHUNK) };
        let layer_bytes_sent = write_load_stream(parts, reference, held, &mut chunked)?;
        chunked.finish().map_err(&io_error)?;
        let response = read_response(&mut BufReader::new(connection)).map_err(&io_error)?;
        let refused = |message: String| LoadError::Refused { tag: reference.full_name.clone(), message };
        if response.status != 200 {
            return Err(refused(engine_message(&response.body)));
        }
        // The body is a stream of JSON messages; an error arrives as one of them.
        for line in response.body.split(|byte| *byte == b'\n') {
            let Ok(message) = serde_json::from_slice::<Value>(line) else { continue };
            if let Some(error) = message.get("errorDetail").or_else(|| message.get("error")) {
                let text = error.get("message").and_then(Value::as_str).map(str::to_owned);
                return Err(refused(text.unwrap_or_else(|| error.to_string())));
            }
        }
        Ok(LoadReport {
            tag: reference.full_name.clone(),
            layers_sent: parts.layers.len() - held,
            layers_skipped: held,
            layer_bytes_sent,
            resent_whole: false,
        })
    }
}

/// A byte stream to the engine.
trait Connection: Read + Write {}
impl<T: Read + Write> Connection for T {}

/// Writes the load tar: `manifest.json` naming every layer, the config, and the content of the
/// layers above the bottom `held` ones. Returns the layer bytes written.
fn write_load_stream(
    parts: &ImageParts<'_>,
    reference: &ImageReference,
    held: usize,
    output: &mut impl Write,
) -> Result<u64, ExportError> {
    let manifest = json!([{
        "Config": blob_member(parts.config),
        "RepoTags": [reference.full_name],
        "Layers": parts.layers.iter().map(|layer| blob_member(&layer.digest)).collect::<Vec<_>>(),
    }]);
    let config_size = image_blob_sizes(parts)?.get(parts.config).copied().unwrap_or(0);
    let mut members = BTreeMap::from([
        ("manifest.json".to_owned(), TarMember::Document(canonical_json(&manifest))),
        (blob_member(parts.config), TarMember::Blob { digest: parts.config.clone(), size: config_size }),
    ]);
    let sent = &parts.layers[held.min(parts.layers.len())..];
    for layer in sent {
        members.insert(blob_member(&layer.digest), TarMember::Blob { digest: layer.digest.clone(), size: layer.size });
    }
    let stream = PathBuf::from("docker load stream");
    write_members(&members, output, &stream, &mut |digest, size, output| {
        copy_verified_blob(parts.store, digest, *size, output, &stream)
    })?;
    Ok(sent.iter().map(|layer| layer.size).sum())
}

/// The size of the chunks of the request body.
const CHUNK: usize = 256 * 1024;

/// HTTP/1.1 chunked transfer encoding over `inner`, in chunks of [`CHUNK`] bytes.
struct ChunkedWriter<'a, W: Write + ?Sized> {
    inner: &'a mut W,
    buffer: Vec<u8>,
}

impl<W: Write + ?Sized> ChunkedWriter<'_, W> {
    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        write!(self.inner, "{:x}\r\n", self.buffer.len())?;
        self.inner.write_all(&self.buffer)?;
        self.inner.write_all(b"\r\n")?;
        self.buffer.clear();
        Ok(())
    }

    fn finish(mut self) -> io::Result<()> {
        self.send_buffer()?;
        self.inner.write_all(b"0\r\n\r\n")?;
        self.inner.flush()
    }
}

impl<W: Write + ?Sized> Write for ChunkedWriter<'_, W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buffer.len();
        let taken = room.min(bytes.len());
        self.buffer.extend_from_slice(&bytes[..taken]);
        if self.buffer.len() == CHUNK {
            self.send_buffer()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads an HTTP/1.1 response: status line, headers, and a body by `Content-Length`, chunked,
/// or up to the end of the connection.
fn read_response(reader: &mut impl BufRead) -> io::Result<Response> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("malformed HTTP response: {what}"));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line.split_whitespace().nth(1).and_then(|code| code.parse().ok()).ok_or_else(|| invalid(&line))?;
    let mut length = None;
    let mut chunked = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<u64>().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| invalid("chunk size"))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            line.clear();
            reader.read_line(&mut line)?;
        }
    } else if let Some(length) = length {
        reader.take(length).read_to_end(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(Response { status, body })
}

/// The `message` of an engine's error body, or the body itself.
fn engine_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|value| value["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned())
}

/// `name` with the characters a path segment cannot hold escaped (`/` stays: the engine's
/// routes accept names with slashes).
fn percent_encode(name: &str) -> String {
    name.bytes()
        .map(|byte| match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' | b'~' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_read_by_length_chunks_or_to_the_end() {
        let by_length = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloextra";
        let response = read_response(&mut &by_length[..]).unwrap();
        assert_eq!((response.status, response.body.as_slice()), (200, &b"hello"[..]));
        let chunked = b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let response = read_response(&mut &chunked[..]).unwrap();
        assert_eq!((response.status, response.body.as_slice()), (500, &b"abcde"[..]));
        let to_end = b"HTTP/1.0 404 Not Found\r\n\r\nno such image";
        let response = read_response(&mut &to_end[..]).unwrap();
        assert_eq!((response.status, response.body.as_slice()), (404, &b"no such image"[..]));
        assert!(read_response(&mut &b"garbage\r\n\r\n"[..]).is_err());
    }

    #[test]
    fn the_request_body_is_chunked_whatever_the_writes() {
        let mut sent = Vec::new();
        let mut writer = ChunkedWriter { inner: &mut sent, buffer: Vec::new() };
        let payload = vec![7u8; CHUNK + 10];
        writer.write_all(&payload[..3]).unwrap();
        writer.write_all(&payload[3..]).unwrap();
        writer.finish().unwrap();
        let response = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".as_slice(), &sent].concat();
        assert_eq!(read_response(&mut response.as_slice()).unwrap().body, payload);
    }

    #[test]
    fn engine_errors_and_names_are_read_and_escaped() {
        assert_eq!(engine_message(br#"{"message":"no space left"}"#), "no space left");
        assert_eq!(engine_message(b"plain text\n"), "plain text");
        assert_eq!(percent_encode("localhost:5000/app:1 x"), "localhost%3A5000/app%3A1%20x");
    }
}
