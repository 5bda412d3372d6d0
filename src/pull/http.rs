//! The pull client's HTTP/1.1 calls (plain HTTP: TLS is left to a proxy).

use std::path::Path;
use std::time::Duration;

use axum::http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{io, PullError};
use crate::checkpoint::{hash_reader, FileEntry, Manifest};
use crate::config::Secret;

/// Longest wait for a connection, an answer's head, or the next piece of a body.
const STALL: Duration = Duration::from_secs(60);

/// A connection-per-request client of one rebeld server.
#[derive(Clone, Debug)]
pub struct Client {
    authority: String,
    prefix: String,
    token: Option<Secret>,
}

impl Client {
    /// A client of `server` (`http://host[:port][/prefix]`).
    pub fn new(server: &str, token: Option<Secret>) -> Result<Self, PullError> {
        let usage = |what: &str| PullError::Usage(format!("--server {server:?}: {what}"));
        let uri: Uri = server.parse().map_err(|_| usage("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(usage(
                    "TLS is not supported; reach the server over plain HTTP (terminate TLS \
                     at a proxy in front of the client)",
                ));
            }
            _ => return Err(usage("the URL must start with http://")),
        }
        let authority = uri.authority().ok_or_else(|| usage("no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(Self {
            authority: format!("{}:{port}", authority.host()),
            prefix: uri.path().trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// The full URL of an API path, for messages.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{path}", self.authority, self.prefix)
    }

    /// Sends a GET with the token and `headers`; returns the answer once its head arrived.
    async fn get(
        &self,
        path: &str,
        headers: &[(header::HeaderName, String)],
        head_timeout: Duration,
    ) -> Result<Response<Incoming>, PullError> {
        let url = self.url(path);
        let transport = |source: Box<dyn std::error::Error + Send + Sync>| PullError::Transport {
            action: format!("GET {url}"),
            source,
        };
        let mut request = Request::get(format!("{}{path}", self.prefix))
            .header(header::HOST, &self.authority)
            .header(
                header::USER_AGENT,
                concat!("rebeld-pull/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|error| transport(error.into()))?;
        let exchange = async {
            let stream = TcpStream::connect(&self.authority).await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(sender.send_request(request).await?)
        };
        match tokio::time::timeout(head_timeout, exchange).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(transport(error)),
            Err(elapsed) => Err(transport(elapsed.into())),
        }
    }

    /// A whole small body (a manifest, an error), read under the stall timeout.
    async fn body(&self, path: &str, response: Response<Incoming>) -> Result<Bytes, PullError> {
        let collect = tokio::time::timeout(STALL, response.into_body().collect());
        match collect.await {
            Ok(Ok(body)) => Ok(body.to_bytes()),
            Ok(Err(error)) => Err(PullError::Transport {
                action: format!("reading {}", self.url(path)),
                source: error.into(),
            }),
            Err(elapsed) => Err(PullError::Transport {
                action: format!("reading {}", self.url(path)),
                source: elapsed.into(),
            }),
        }
    }

    /// An error answer as a [`PullError::Status`].
    async fn status_error(&self, path: &str, response: Response<Incoming>) -> PullError {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok()?.trim().parse().ok());
        let body = self.body(path, response).await.unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|value| value.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        PullError::Status {
            url: self.url(path),
            status,
            message,
            retry_after,
        }
    }

    async fn manifest(
        &self,
        path: &str,
        response: Response<Incoming>,
    ) -> Result<Manifest, PullError> {
        let body = self.body(path, response).await?;
        serde_json::from_slice(&body).map_err(|error| PullError::Protocol {
            url: self.url(path),
            detail: format!("not a manifest: {error}"),
        })
    }

    /// The latest manifest.
    pub async fn latest(&self) -> Result<Manifest, PullError> {
        let path = "/v1/versions/latest";
        let response = self.get(path, &[], STALL).await?;
        match response.status() {
            StatusCode::OK => self.manifest(path, response).await,
            StatusCode::NOT_FOUND => Err(PullError::NoVersion),
            _ => Err(self.status_error(path, response).await),
        }
    }

    /// The next version to hold after `current`: a newer one through the long poll, or,
    /// when a poll times out, whatever is latest if it differs (a rollback).
    pub async fn next_latest(
        &self,
        current: Option<u64>,
        wait: Duration,
    ) -> Result<Manifest, PullError> {
        loop {
            let after = current.unwrap_or(0);
            let path = format!(
                "/v1/versions/latest?after={after}&wait={}s",
                wait.as_secs().max(1)
            );
            let response = self.get(&path, &[], wait + STALL).await?;
            match response.status() {
                StatusCode::OK => return self.manifest(&path, response).await,
                StatusCode::NO_CONTENT => {}
                _ => return Err(self.status_error(&path, response).await),
            }
            match self.latest().await {
                Ok(manifest) if Some(manifest.version) != current => return Ok(manifest),
                Ok(_) | Err(PullError::NoVersion) => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// Brings `dest` to `entry`: resumes a partial file with `Range`, refetches a wrong one,
    /// and verifies size and SHA-256 at the end.
    pub async fn fetch_file(
        &self,
        version: u64,
        name: &str,
        entry: &FileEntry,
        dest: &Path,
    ) -> Result<(), PullError> {
        let have = std::fs::metadata(dest).map(|meta| meta.len()).unwrap_or(0);
        if have == entry.size && verify(name, entry, dest).await.is_ok() {
            return Ok(());
        }
        let have = if have >= entry.size {
            remove(dest)?;
            0
        } else {
            have
        };
        let path = format!("/v1/versions/{version}/files/{name}");
        let mut headers = Vec::new();
        if have > 0 {
            headers.push((header::RANGE, format!("bytes={have}-")));
            headers.push((header::IF_RANGE, format!("\"{}\"", entry.sha256)));
        }
        let response = self.get(&path, &headers, STALL).await?;
        let append = match response.status() {
            StatusCode::OK => false,
            StatusCode::PARTIAL_CONTENT if resumes_at(&response, have) => true,
            StatusCode::PARTIAL_CONTENT => {
                remove(dest)?;
                return Err(PullError::Protocol {
                    url: self.url(&path),
                    detail: format!("a range that does not start at byte {have}"),
                });
            }
            _ => {
                let error = self.status_error(&path, response).await;
                if matches!(error, PullError::Status { status: 416, .. }) {
                    remove(dest)?;
                }
                return Err(error);
            }
        };
        if append {
            tracing::info!(file = name, from = have, "resuming a partial download");
        }
        self.write_body(&path, response, dest, append).await?;
        verify(name, entry, dest).await.inspect_err(|_| {
            let _ = std::fs::remove_file(dest);
        })
    }

    /// Streams a body into `dest` (appending or from scratch), never holding it whole.
    async fn write_body(
        &self,
        path: &str,
        response: Response<Incoming>,
        dest: &Path,
        append: bool,
    ) -> Result<(), PullError> {
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(dest)
            .await
            .map_err(io("open", dest))?;
        let mut body = response.into_body();
        loop {
            let frame = match tokio::time::timeout(STALL, body.frame()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(None) => break,
                Ok(Some(Err(error))) => return Err(self.cut(path, file, error.into()).await),
                Err(elapsed) => return Err(self.cut(path, file, elapsed.into()).await),
            };
            if let Ok(data) = frame.into_data() {
                file.write_all(&data).await.map_err(io("write", dest))?;
            }
        }
        file.flush().await.map_err(io("write", dest))
    }

    /// A body that broke off: keeps what arrived (the next attempt resumes from there).
    async fn cut(
        &self,
        path: &str,
        mut file: tokio::fs::File,
        source: Box<dyn std::error::Error + Send + Sync>,
    ) -> PullError {
        let _ = file.flush().await;
        PullError::Transport {
            action: format!("download of {} broke off", self.url(path)),
            source,
        }
    }
}

fn resumes_at(response: &Response<Incoming>, have: u64) -> bool {
    response
        .headers()
        .get(header::CONTENT_RANGE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("bytes "))
        .and_then(|range| range.split_once('-'))
        .is_some_and(|(start, _)| start.parse::<u64>().ok() == Some(have))
}

fn remove(path: &Path) -> Result<(), PullError> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(io("remove", path)(error))
        }
        _ => Ok(()),
    }
}

/// Checks a file against its manifest entry (hashing on a blocking thread).
pub(super) async fn verify(name: &str, entry: &FileEntry, path: &Path) -> Result<(), PullError> {
    let owned = path.to_owned();
    let hashed = tokio::task::spawn_blocking(move || hash_reader(std::fs::File::open(owned)?))
        .await
        .map_err(|error| PullError::Io {
            action: "hash",
            path: path.to_owned(),
            source: std::io::Error::other(error),
        })?
        .map_err(io("hash", path))?;
    if hashed == *entry {
        return Ok(());
    }
    Err(PullError::Verify {
        name: name.to_owned(),
        expected: entry.sha256.clone(),
        expected_size: entry.size,
        actual: hashed.sha256,
        size: hashed.size,
    })
}
