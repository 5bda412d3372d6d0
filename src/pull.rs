//! `rebeld pull`: keeps a local folder equal to the server's latest version.
//!
//! On disk, beside the target `DIR`:
//!
//! ```text
//! DIR -> DIR.v00000042          a symlink, switched atomically (new link, rename over DIR)
//! DIR.v00000042/                the version's files and its manifest.json, verified
//! DIR.v00000041/                the previous version, kept for readers that resolved the
//!                               link before the switch; older ones are removed
//! DIR.v00000043.partial/        a download in progress; rerunning resumes it with Range
//! ```
//!
//! Every file is checked against the manifest's size and SHA-256 before the switch; the link
//! moves only once the whole version is in place and flushed to disk.

mod http;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use crate::checkpoint::{
    is_publishable_name, parse_version_dir, version_dir_name, Manifest, MANIFEST_FILE,
};
use crate::config::Secret;

pub use http::Client;

/// What to pull, from where, into where.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// The server, `http://host:port` (optionally with a path prefix).
    pub server: String,
    /// The folder (a symlink rebeld pull manages) the latest version appears at.
    pub to: PathBuf,
    /// Bearer token for the read scope.
    pub token: Option<Secret>,
    /// Keep `to` current until stopped.
    pub follow: bool,
    /// Longest long-poll asked of the server while following.
    pub wait: Duration,
    /// Attempts of a one-shot pull before giving up (following retries for ever).
    pub attempts: u32,
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The invocation cannot work (a bad URL, a target that is not ours).
    #[error("{0}")]
    Usage(String),
    /// The connection failed or broke.
    #[error("{action}: {source}")]
    Transport {
        /// What was being done.
        action: String,
        /// The failure.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server answered an error.
    #[error("{url} answered {status}: {message}")]
    Status {
        /// The URL requested.
        url: String,
        /// The status code.
        status: u16,
        /// The server's `error` text, or the body.
        message: String,
        /// Seconds from `Retry-After`, if any.
        retry_after: Option<u64>,
    },
    /// No version has been promoted yet.
    #[error("the server has no latest version yet")]
    NoVersion,
    /// A local file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A downloaded file does not match its manifest entry.
    #[error(
        "{name}: expected {expected_size} bytes with SHA-256 {expected}, got {size} bytes \
             with SHA-256 {actual}"
    )]
    Verify {
        /// The file.
        name: String,
        /// The manifest's hash.
        expected: String,
        /// The manifest's size.
        expected_size: u64,
        /// The downloaded file's hash.
        actual: String,
        /// The downloaded file's size.
        size: u64,
    },
    /// The server sent something that is not what the API promises.
    #[error("unexpected answer from {url}: {detail}")]
    Protocol {
        /// The URL requested.
        url: String,
        /// What was wrong.
        detail: String,
    },
}

impl PullError {
    /// True for a mistake in how the command was called (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Usage(_))
    }

    /// True when trying again may succeed.
    fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } | Self::Verify { .. } | Self::Protocol { .. } => true,
            Self::Status { status, .. } => matches!(status, 404 | 408 | 416 | 429 | 500..=599),
            Self::Usage(_) | Self::NoVersion | Self::Io { .. } => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status {
                retry_after: Some(seconds),
                ..
            } => Some(Duration::from_secs(*seconds)),
            _ => None,
        }
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PullError {
    let path = path.to_owned();
    move |source| PullError::Io {
        action,
        path,
        source,
    }
}

/// Pulls the latest version into `options.to` once, retrying transient failures; returns
/// the version now in place.
pub async fn pull_once(options: &PullOptions) -> Result<u64, PullError> {
    let client = Client::new(&options.server, options.token.clone())?;
    let target = Target::new(&options.to)?;
    retrying(Some(options.attempts), || async {
        let manifest = client.latest().await?;
        target.install(&client, &manifest).await
    })
    .await
}

/// Keeps `options.to` at the server's latest version until `stop` resolves. A newer version
/// arrives through the long poll; a rollback is noticed when a long poll times out.
pub async fn follow(
    options: &PullOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), PullError> {
    let client = Client::new(&options.server, options.token.clone())?;
    let target = Target::new(&options.to)?;
    let work = async {
        let mut current = target.current_version();
        loop {
            // A failed install starts over from the latest: its version may be gone.
            let installed = retrying(None, || async {
                let manifest = client.next_latest(current, options.wait).await?;
                target.install(&client, &manifest).await
            })
            .await?;
            current = Some(installed);
        }
    };
    tokio::select! {
        result = work => result,
        () = stop => {
            info!("pull stopped");
            Ok(())
        }
    }
}

/// Runs `attempt` until it succeeds, fails for good, or `attempts` run out (`None`: never),
/// sleeping with exponential backoff (or the server's `Retry-After`) in between.
async fn retrying<T, F, Fut>(attempts: Option<u32>, mut attempt: F) -> Result<T, PullError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, PullError>>,
{
    let mut backoff = Duration::from_millis(250);
    let mut tries = 0_u32;
    loop {
        tries += 1;
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if error.is_transient() && attempts.is_none_or(|n| tries < n) => {
                let delay = error.retry_after().unwrap_or(backoff);
                warn!(%error, attempt = tries, retry_in = ?delay, "pull failed; retrying");
                tokio::time::sleep(delay).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(error) => return Err(error),
        }
    }
}

/// The managed folder and its siblings.
struct Target {
    link: PathBuf,
    parent: PathBuf,
    base: String,
}

impl Target {
    fn new(to: &Path) -> Result<Self, PullError> {
        let usage = |what: &str| PullError::Usage(format!("--to {}: {what}", to.display()));
        let base = to
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or_else(|| usage("needs a final component in UTF-8"))?
            .to_owned();
        let parent = match to.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        if let Ok(meta) = std::fs::symlink_metadata(to) {
            if !meta.file_type().is_symlink() {
                return Err(usage(
                    "exists and is not a symlink; rebeld pull manages DIR as a symlink to \
                     DIR.vNNNNNNNN, so give a new path or remove it",
                ));
            }
        }
        std::fs::create_dir_all(&parent).map_err(io("create", &parent))?;
        Ok(Self {
            link: to.to_owned(),
            parent,
            base,
        })
    }

    fn version_dir(&self, version: u64) -> PathBuf {
        self.parent
            .join(format!("{}.{}", self.base, version_dir_name(version)))
    }

    fn staging_dir(&self, version: u64) -> PathBuf {
        let mut name = self.version_dir(version).into_os_string();
        name.push(".partial");
        PathBuf::from(name)
    }

    /// The version the link points at now, from its manifest.
    fn current_version(&self) -> Option<u64> {
        let bytes = std::fs::read(self.link.join(MANIFEST_FILE)).ok()?;
        serde_json::from_slice::<Manifest>(&bytes)
            .ok()
            .map(|manifest| manifest.version)
    }

    /// Downloads, verifies and switches to `manifest`'s version; returns it.
    async fn install(&self, client: &Client, manifest: &Manifest) -> Result<u64, PullError> {
        let version = manifest.version;
        if self.current_version() == Some(version) {
            return Ok(version);
        }
        let staging = self.staging_dir(version);
        let done = self.version_dir(version);
        if done.is_dir() {
            // Kept from an earlier pull (a rollback target): switch back if it still verifies,
            // else repair it in staging.
            if verified(manifest, &done).await {
                return self.switch_to(manifest, &done);
            }
            std::fs::rename(&done, &staging).map_err(io("rename", &done))?;
        }
        std::fs::create_dir_all(&staging).map_err(io("create", &staging))?;
        for (name, entry) in &manifest.files {
            if !is_publishable_name(name) {
                return Err(PullError::Protocol {
                    url: client.url(&format!("/v1/versions/{version}")),
                    detail: format!("the manifest names a file {name:?}"),
                });
            }
            client
                .fetch_file(version, name, entry, &staging.join(name))
                .await?;
        }
        self.seal(manifest, &staging, &done)?;
        self.switch_to(manifest, &done)
    }

    /// Points the link at the verified folder `done`, then removes what is no longer kept.
    fn switch_to(&self, manifest: &Manifest, done: &Path) -> Result<u64, PullError> {
        let previous = std::fs::read_link(&self.link).ok();
        self.switch(done)?;
        self.remove_stale(done, previous.as_deref());
        let version = manifest.version;
        info!(version, files = manifest.files.len(), dir = %self.link.display(), "version pulled");
        Ok(version)
    }

    /// Writes the manifest, flushes the folder and moves it to its final name.
    fn seal(&self, manifest: &Manifest, staging: &Path, done: &Path) -> Result<(), PullError> {
        let path = staging.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(manifest).map_err(|error| PullError::Io {
            action: "encode",
            path: path.clone(),
            source: error.into(),
        })?;
        std::fs::write(&path, json).map_err(io("write", &path))?;
        for name in manifest
            .files
            .keys()
            .map(String::as_str)
            .chain([MANIFEST_FILE])
        {
            let file = staging.join(name);
            std::fs::File::open(&file)
                .and_then(|handle| handle.sync_all())
                .map_err(io("fsync", &file))?;
        }
        sync_dir(staging)?;
        std::fs::rename(staging, done).map_err(io("rename", staging))?;
        sync_dir(&self.parent)
    }

    /// Points the link at `done`: a new link beside it, renamed over the old one.
    fn switch(&self, done: &Path) -> Result<(), PullError> {
        let tmp = self.parent.join(format!(".{}.link", self.base));
        match std::fs::remove_file(&tmp) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove", &tmp)(error));
            }
            _ => {}
        }
        let relative = done.file_name().map(PathBuf::from).unwrap_or_default();
        std::os::unix::fs::symlink(&relative, &tmp).map_err(io("symlink", &tmp))?;
        std::fs::rename(&tmp, &self.link).map_err(io("rename", &tmp))?;
        sync_dir(&self.parent)
    }

    /// Removes versions and partial downloads other than `current` and `previous`: only
    /// folders named exactly `DIR.vNNNNNNNN` or `DIR.vNNNNNNNN.partial`.
    fn remove_stale(&self, current: &Path, previous: Option<&Path>) {
        let Ok(entries) = std::fs::read_dir(&self.parent) else {
            return;
        };
        let previous = previous.and_then(Path::file_name);
        for entry in entries.flatten() {
            let name = entry.file_name();
            let kept =
                Some(name.as_os_str()) == current.file_name() || Some(name.as_os_str()) == previous;
            let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
            if !kept && is_dir && name.to_str().is_some_and(|n| self.is_ours(n)) {
                if let Err(error) = std::fs::remove_dir_all(entry.path()) {
                    warn!(dir = %entry.path().display(), %error, "cannot remove an old version");
                }
            }
        }
    }

    /// True for the names this target's versions and downloads take.
    fn is_ours(&self, name: &str) -> bool {
        let Some(rest) = name
            .strip_prefix(self.base.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
        else {
            return false;
        };
        parse_version_dir(rest.strip_suffix(".partial").unwrap_or(rest)).is_some()
    }
}

/// True when every file of `manifest` in `dir` has its size and hash.
async fn verified(manifest: &Manifest, dir: &Path) -> bool {
    for (name, entry) in &manifest.files {
        if !is_publishable_name(name) || http::verify(name, entry, &dir.join(name)).await.is_err() {
            return false;
        }
    }
    true
}

fn sync_dir(dir: &Path) -> Result<(), PullError> {
    std::fs::File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(io("fsync folder", dir))
}
