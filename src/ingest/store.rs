//! The buffer, the partition offsets and the dedup window: one state, one lock, one snapshot.
//!
//! The consumer appends, the trainer samples, and a checkpoint copies all three under the lock
//! (cheap: Arrow batches are reference counted) and writes them outside it.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::sync::Notify;

use super::offsets::PartitionOffsets;
use crate::buffer::{
    read_snapshot, BufferImage, BufferLimits, DedupWindow, RollingBuffer, SnapshotError,
    SnapshotMeta,
};

/// What the consumer has accounted for.
pub struct IngestState {
    /// The rolling window of pairs.
    pub buffer: RollingBuffer,
    /// Next offset of each partition.
    pub offsets: PartitionOffsets,
    /// Ids seen recently.
    pub dedup: DedupWindow,
}

impl IngestState {
    /// An empty state.
    pub fn new(limits: BufferLimits, dedup_window: usize) -> Self {
        Self {
            buffer: RollingBuffer::new(limits),
            offsets: PartitionOffsets::default(),
            dedup: DedupWindow::new(dedup_window),
        }
    }
}

/// The state shared by the consumer and the trainer.
pub struct SharedBuffer {
    state: Mutex<IngestState>,
    appended: Notify,
}

impl SharedBuffer {
    /// Wraps a state.
    pub fn new(state: IngestState) -> Self {
        Self {
            state: Mutex::new(state),
            appended: Notify::new(),
        }
    }

    /// Locks the state. A panic while it was held does not make it unusable: every update
    /// leaves the state consistent before it can panic.
    pub fn lock(&self) -> MutexGuard<'_, IngestState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes whoever waits for new pairs.
    pub fn notify_appended(&self) {
        self.appended.notify_waiters();
    }

    /// Resolves after the next append.
    pub async fn appended(&self) {
        self.appended.notified().await;
    }

    /// A consistent copy for a snapshot.
    pub fn capture(&self) -> Capture {
        let state = self.lock();
        Capture {
            image: state.buffer.image(),
            meta: SnapshotMeta {
                next_offsets: state.offsets.as_map().clone(),
                dedup: state.dedup.clone(),
                counters: Default::default(),
            },
        }
    }
}

/// A copy of the state taken under the lock.
pub struct Capture {
    image: BufferImage,
    meta: SnapshotMeta,
}

impl Capture {
    /// The offsets this capture holds.
    pub fn offsets(&self) -> PartitionOffsets {
        PartitionOffsets::from_map(self.meta.next_offsets.clone())
    }
}

/// Where snapshots live.
#[derive(Clone, Debug)]
pub struct SnapshotStore {
    path: PathBuf,
}

/// A written snapshot.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotWritten {
    /// Seconds the write took (copy excluded).
    pub seconds: f64,
    /// Size of the file.
    pub bytes: u64,
}

impl SnapshotStore {
    /// A snapshot file at `path`.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// `<data_dir>/ingest/buffer.arrow`, where snapshots lived before the resume state
    /// (`crate::resume`) held them; read once to carry a buffer over.
    pub fn legacy_in_data_dir(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join("ingest").join("buffer.arrow"),
        }
    }

    /// The snapshot file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last snapshot, with the configured limits, or an empty state when there is none.
    pub fn restore(
        &self,
        limits: BufferLimits,
        dedup_window: usize,
        now_ms: i64,
    ) -> Result<Option<IngestState>, SnapshotError> {
        if !self.path.exists() {
            return Ok(None);
        }
        let (mut buffer, meta) = read_snapshot(&self.path)?;
        buffer
            .set_limits(limits, now_ms)
            .map_err(|source| SnapshotError::Rows {
                path: self.path.clone(),
                source,
            })?;
        let mut dedup = meta.dedup;
        dedup.set_capacity(dedup_window);

        Ok(Some(IngestState {
            buffer,
            offsets: PartitionOffsets::from_map(meta.next_offsets),
            dedup,
        }))
    }

    /// Writes a capture atomically (temporary file, fsync, rename, fsync of the folder).
    pub fn write(&self, capture: &Capture) -> Result<SnapshotWritten, SnapshotError> {
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| SnapshotError::Io {
                op: "create folder",
                path: parent.to_owned(),
                source,
            })?;
        }
        let started = Instant::now();
        capture.image.write(&self.path, &capture.meta)?;

        let bytes = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        Ok(SnapshotWritten {
            seconds: started.elapsed().as_secs_f64(),
            bytes,
        })
    }
}
