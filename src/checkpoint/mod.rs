//! The checkpoint store: committed, immutable versions of the policy on disk, the `latest`
//! pointer, pins and retention.
//!
//! Layout under the root (the daemon uses `<runtime.data_dir>/versions`):
//!
//! ```text
//! v00000042/            a committed version: the model files (flat), manifest.json and
//!   config.json …       the completion marker `.complete`, written last
//!   manifest.json
//!   .complete
//! .draft-v00000043/     a version being written (never parses as a version)
//! latest                {"version": 42}, replaced atomically
//! pins.json             {"pinned": [40]}, replaced atomically
//! ```
//!
//! Only folders named `v` + 8 digits holding a marker are versions. On open, drafts, version
//! folders without a marker and leftovers of interrupted deletions are removed; anything
//! else (a symlink, a stray file) is ignored, never served and never followed.

mod fsio;
pub mod manifest;
mod store;

pub(crate) use fsio::hash_reader;
pub use manifest::{
    FileEntry, GateCheck, GateReport, Lineage, Manifest, ManifestFields, PartitionRange,
};
pub use store::{CheckpointStore, DownloadLease, Draft, VersionInfo, VersionStatus};

use std::path::PathBuf;

/// The manifest's file name inside a version folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The completion marker's file name inside a version folder, written last.
pub const MARKER_FILE: &str = ".complete";
/// The file naming the latest version.
pub const LATEST_FILE: &str = "latest";
/// The file listing pinned versions.
pub const PINS_FILE: &str = "pins.json";
/// Prefix of the folders that hold a version being written.
const DRAFT_PREFIX: &str = ".draft-";
/// Prefix of the folders that hold a version being deleted.
const TRASH_PREFIX: &str = ".trash-";
/// Suffix of the temporary files that `latest` and `pins.json` are written through.
const TMP_SUFFIX: &str = ".tmp";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system call failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A manifest, `latest` or `pins.json` does not parse.
    #[error("cannot parse {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: serde_json::Error,
    },
    /// No committed version has this number.
    #[error("version {0} does not exist")]
    UnknownVersion(u64),
    /// The version failed its gates and cannot become latest.
    #[error("version {version} was rejected by its gates: {}", reasons.join("; "))]
    Rejected {
        /// The version.
        version: u64,
        /// One line per failed check.
        reasons: Vec<String>,
    },
    /// The version's manifest lists no such file.
    #[error("version {version} has no file {name:?}")]
    UnknownFile {
        /// The version.
        version: u64,
        /// The requested name.
        name: String,
    },
    /// A file on disk no longer matches its manifest entry.
    #[error("{path} is {actual} bytes on disk, the manifest says {expected}")]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Size in the manifest.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A draft holds something that cannot be published.
    #[error("draft {path}: {reason}")]
    BadDraft {
        /// The offending entry.
        path: PathBuf,
        /// Why it cannot be published.
        reason: &'static str,
    },
}

/// The folder name of a version: `v` and the number on at least 8 digits.
pub fn version_dir_name(version: u64) -> String {
    format!("v{version:08}")
}

/// The version a folder name stands for, if it is exactly what [`version_dir_name`] writes.
pub fn parse_version_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix('v')?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let version: u64 = digits.parse().ok()?;
    (version_dir_name(version) == name).then_some(version)
}

/// True for a name a version may hold and serve: one plain path component of printable
/// ASCII, not hidden, not the manifest.
pub fn is_publishable_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name != MANIFEST_FILE
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests;
