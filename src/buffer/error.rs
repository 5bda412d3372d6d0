//! Typed errors of the buffer and its snapshots.

use std::io;
use std::path::PathBuf;

use arrow::error::ArrowError;

/// An error from building, slicing or decoding the buffer's Arrow batches.
///
/// Apart from [`BufferError::BatchTooLarge`] and [`BufferError::InvalidHalfLife`], which the
/// caller causes, these mean rows that do not follow the buffer's schema reached it, which
/// only a snapshot written by something else can cause.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// One appended batch holds more than `i32::MAX` bytes or items in one column.
    #[error(
        "a batch of {rows} pairs overflows the 32-bit offsets of column `{column}`; \
         append it in smaller batches"
    )]
    BatchTooLarge {
        /// The column whose offsets overflow.
        column: &'static str,
        /// Rows in the rejected batch.
        rows: usize,
    },

    /// A recency half-life that is not a finite positive number.
    #[error("the recency half-life must be finite and positive, got {value}")]
    InvalidHalfLife {
        /// The rejected half-life.
        value: f64,
    },

    /// A batch whose schema differs from [`pair_schema`](super::pair_schema).
    #[error("column `{column}` does not have the pair schema's type")]
    Schema {
        /// The column that is missing or has the wrong type.
        column: String,
    },

    /// A value that the row type cannot hold, such as a preference code outside 0..=2.
    #[error("row {row} of column `{column}` holds {value}, which a pair cannot hold")]
    InvalidValue {
        /// The column holding the value.
        column: &'static str,
        /// Row index inside its batch.
        row: usize,
        /// The offending value, rendered.
        value: String,
    },

    /// A token id too large for the width it was to be stored at.
    #[error("column `{column}` holds token id {id}, which does not fit 16 bits")]
    TokenOutOfRange {
        /// The token-list column.
        column: &'static str,
        /// The id.
        id: u32,
    },

    /// Two rows with the same id, which a snapshot can hold only if it was not ours.
    #[error("id {id:?} is held twice")]
    DuplicateId {
        /// The repeated id.
        id: String,
    },

    /// Arrow refused an operation on a batch.
    #[error("arrow failed while {op}")]
    Arrow {
        /// What the buffer was doing.
        op: &'static str,
        /// Arrow's error.
        #[source]
        source: ArrowError,
    },
}

/// An error from writing or reading a buffer snapshot.
///
/// [`SnapshotError::is_corrupt`] tells the two cases apart that need different actions: a
/// corrupt file will not read on a retry (start empty and replay from the committed Kafka
/// offsets, and keep the file for inspection), while an I/O error may pass.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file system refused an operation.
    #[error("cannot {op} {path}")]
    Io {
        /// What the snapshot code was doing, such as "create" or "rename".
        op: &'static str,
        /// The path it was working on.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// Arrow could not encode the buffer.
    #[error("cannot encode the buffer into {path}")]
    Encode {
        /// The temporary file being written.
        path: PathBuf,
        /// Arrow's error.
        #[source]
        source: ArrowError,
    },

    /// The file is truncated, is not a snapshot, or fails its checksums.
    #[error("snapshot {path} is corrupt: {detail}")]
    Corrupt {
        /// The snapshot file.
        path: PathBuf,
        /// What check failed.
        detail: String,
    },

    /// The file passed its checksums but Arrow could not decode it.
    #[error("snapshot {path} cannot be decoded")]
    Decode {
        /// The snapshot file.
        path: PathBuf,
        /// Arrow's error.
        #[source]
        source: ArrowError,
    },

    /// The file decoded but its rows do not fit the buffer.
    #[error("snapshot {path} holds rows the buffer rejects")]
    Rows {
        /// The snapshot file.
        path: PathBuf,
        /// Why the rows were rejected.
        #[source]
        source: BufferError,
    },

    /// The file was written in a format version this build does not read.
    #[error("snapshot {path} has format version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        /// The snapshot file.
        path: PathBuf,
        /// Version found in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
}

impl SnapshotError {
    /// Whether the file itself is bad, so that reading it again cannot succeed.
    pub fn is_corrupt(&self) -> bool {
        match self {
            SnapshotError::Io { .. } | SnapshotError::Encode { .. } => false,
            SnapshotError::Corrupt { .. }
            | SnapshotError::Decode { .. }
            | SnapshotError::Rows { .. }
            | SnapshotError::UnsupportedVersion { .. } => true,
        }
    }
}
