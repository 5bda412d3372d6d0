//! The resume state: everything a restarted daemon needs to continue where it stopped,
//! written together as one numbered generation.
//!
//! A generation `<data_dir>/resume/g00000042/` holds the buffer snapshot (rows, how often each
//! was trained, the next offset of every partition, the dedup window), the policy's and the
//! anchor's weights, the optimizer's moments and the trainer's counters. The trainer writes it
//! between two steps, so the rows' training counts always match the weights beside them.
//!
//! A generation is written into `.tmp-g00000042/`, every file fsynced, renamed into place, and
//! completed by a marker file; a folder without its marker never counts and is removed when
//! the store is opened. Kafka offsets are committed only from the newest complete generation
//! ([`ResumeStore::durable_offsets`]), so the group never runs ahead of what a restart
//! restores: nothing consumed is lost and nothing restored is consumed twice.
//!
//! Weight files unchanged since the previous generation are hard-linked rather than
//! rewritten, so an idle trainer's checkpoints cost only the buffer snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::Tensor;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::buffer::{BufferLimits, PairRecord, SnapshotError};
use crate::ingest::offsets::PartitionOffsets;
use crate::ingest::store::{Capture, IngestState, SnapshotStore};
use crate::model::weights::{self, SaveDtype, WeightsError};
use crate::train::snapshot::TrainerCounters;

/// The marker file that completes a generation.
pub const MARKER_FILE: &str = "COMPLETE";
/// The buffer snapshot inside a generation.
pub const BUFFER_FILE: &str = "buffer.arrow";
/// The trainer's counters inside a generation.
pub const PROGRESS_FILE: &str = "trainer.json";
/// Version of [`TrainerProgress`]'s layout.
pub const PROGRESS_FORMAT: u32 = 1;

const TEMP_PREFIX: &str = ".tmp-";

/// A resume store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The file system refused an operation.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The buffer snapshot could not be written or read.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Weights could not be written or read.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// Named tensors could not be written.
    #[error("cannot write {path}: {source}")]
    Tensors {
        /// The file.
        path: PathBuf,
        /// libtorch's error.
        source: tch::TchError,
    },
    /// The trainer's state could not be copied or applied.
    #[error("trainer state: {0}")]
    State(String),
    /// `trainer.json` is unreadable.
    #[error("{path} is not a trainer progress file of format {PROGRESS_FORMAT}: {detail}")]
    Progress {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ResumeError {
    let path = path.to_owned();
    move |source| ResumeError::Io { op, path, source }
}

/// The trainer's counters, saved as `trainer.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerProgress {
    /// [`PROGRESS_FORMAT`].
    pub format: u32,
    /// Optimizer updates applied so far (the schedule's position).
    pub applied_steps: u64,
    /// The multiplier on the learning rate schedule (halved by rollbacks).
    pub lr_scale: f64,
    /// Non-finite steps in a row since the last applied one.
    pub consecutive_skips: u32,
    /// Rollbacks so far.
    pub rollbacks: u64,
    /// Pairs that went into applied updates, counted once per update.
    pub pairs_trained: u64,
    /// How many times the anchor was refreshed.
    pub anchor_version: u64,
    /// The newest version published (0 before the first).
    pub published_version: u64,
    /// What was trained since that version.
    pub since_publish: SincePublish,
}

/// What was trained since the last published version: its manifest's counts and lineage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SincePublish {
    /// Updates applied.
    pub steps: u64,
    /// Pairs trained, counted once per update.
    pub pairs: u64,
    /// Distinct events trained.
    pub events: BTreeSet<String>,
    /// First and last offset trained, per topic and partition.
    pub offsets: BTreeMap<String, BTreeMap<i32, [i64; 2]>>,
    /// Oldest and newest event time trained (Unix milliseconds), when events carried one.
    pub event_time_ms: Option<[i64; 2]>,
}

/// Where a trained pair came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provenance {
    /// The event id.
    pub id: String,
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// When the user gave the feedback, if the event said.
    pub event_time_ms: Option<i64>,
}

impl Provenance {
    /// The provenance of a buffered pair.
    pub fn of(record: &PairRecord) -> Self {
        Self {
            id: record.id.clone(),
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            event_time_ms: record.event_time_ms,
        }
    }
}

impl TrainerProgress {
    /// A trainer that has not stepped yet.
    pub fn fresh() -> Self {
        Self {
            format: PROGRESS_FORMAT,
            lr_scale: 1.0,
            ..Self::default()
        }
    }

    /// Accounts for an applied update on `pairs`, leaving the trainer at `counters`.
    pub fn record_step(&mut self, counters: &TrainerCounters, pairs: &[Provenance]) {
        self.applied_steps = counters.applied_steps;
        self.lr_scale = counters.lr_scale;
        self.consecutive_skips = counters.consecutive_skips;
        self.rollbacks = counters.rollbacks;
        self.pairs_trained += pairs.len() as u64;

        let since = &mut self.since_publish;
        since.steps += 1;
        since.pairs += pairs.len() as u64;
        for pair in pairs {
            since.events.insert(pair.id.clone());
            let range = since
                .offsets
                .entry(pair.topic.clone())
                .or_default()
                .entry(pair.partition)
                .or_insert([pair.offset, pair.offset]);
            *range = [range[0].min(pair.offset), range[1].max(pair.offset)];
            if let Some(at) = pair.event_time_ms {
                let span = since.event_time_ms.get_or_insert([at, at]);
                *span = [span[0].min(at), span[1].max(at)];
            }
        }
    }

    /// The trainer's counters as saved.
    pub fn counters(&self) -> TrainerCounters {
        TrainerCounters {
            applied_steps: self.applied_steps,
            lr_scale: self.lr_scale,
            consecutive_skips: self.consecutive_skips,
            rollbacks: self.rollbacks,
        }
    }
}

/// Where a file of weights comes from.
pub enum TensorSource<'a> {
    /// Every variable of a store, in fp32.
    Store(&'a VarStore),
    /// Named tensors, written as they are.
    Named(&'a [(String, Tensor)]),
}

/// One safetensors file of a generation.
pub struct TensorFile<'a> {
    /// Its name inside the generation, such as `policy.safetensors`.
    pub name: &'static str,
    /// What to write.
    pub source: TensorSource<'a>,
    /// Whether the tensors changed since the previous generation; unchanged files are
    /// hard-linked from it.
    pub changed: bool,
}

/// A complete generation on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// Its number.
    pub number: u64,
    /// Its folder.
    pub dir: PathBuf,
}

impl Generation {
    /// The path of a file inside.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The trainer's counters.
    pub fn progress(&self) -> Result<TrainerProgress, ResumeError> {
        let path = self.file(PROGRESS_FILE);
        let text = fs::read_to_string(&path).map_err(io_error("read", &path))?;
        let progress: TrainerProgress =
            serde_json::from_str(&text).map_err(|e| ResumeError::Progress {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        if progress.format != PROGRESS_FORMAT {
            return Err(ResumeError::Progress {
                path,
                detail: format!("format {}", progress.format),
            });
        }
        Ok(progress)
    }
}

/// What a write did.
#[derive(Clone, Copy, Debug)]
pub struct Written {
    /// The generation's number.
    pub number: u64,
    /// Seconds the write took.
    pub seconds: f64,
    /// Size of the buffer snapshot.
    pub buffer_bytes: u64,
}

/// The generations under `<data_dir>/resume`.
pub struct ResumeStore {
    root: PathBuf,
    latest: Mutex<Option<Generation>>,
    durable: watch::Sender<PartitionOffsets>,
}

impl std::fmt::Debug for ResumeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeStore")
            .field("root", &self.root)
            .field("latest", &self.latest())
            .finish_non_exhaustive()
    }
}

impl ResumeStore {
    /// Opens `<data_dir>/resume`, creating it, and removes every temporary or incomplete
    /// generation and every complete one older than the newest.
    pub fn open(data_dir: &Path) -> Result<Self, ResumeError> {
        let root = data_dir.join("resume");
        fs::create_dir_all(&root).map_err(io_error("create folder", &root))?;

        let mut complete = Vec::new();
        for entry in fs::read_dir(&root).map_err(io_error("list", &root))? {
            let path = entry.map_err(io_error("list", &root))?.path();
            match generation_number(&path) {
                Some(number) if path.join(MARKER_FILE).is_file() => complete.push(number),
                Some(_) => remove_leftover(&path, "incomplete resume generation"),
                None if is_temporary(&path) => remove_leftover(&path, "unfinished resume write"),
                None => {}
            }
        }
        complete.sort_unstable();
        let latest = complete.pop().map(|number| Generation {
            number,
            dir: root.join(generation_name(number)),
        });
        for number in complete {
            remove_leftover(
                &root.join(generation_name(number)),
                "superseded resume generation",
            );
        }

        let (durable, _) = watch::channel(PartitionOffsets::default());
        Ok(Self {
            root,
            latest: Mutex::new(latest),
            durable,
        })
    }

    /// The folder of the generations.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The newest complete generation.
    pub fn latest(&self) -> Option<Generation> {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The buffer state of the newest generation, with the configured limits applied.
    pub fn restore_buffer(
        &self,
        limits: BufferLimits,
        dedup_window: usize,
        now_ms: i64,
    ) -> Result<Option<IngestState>, SnapshotError> {
        match self.latest() {
            Some(generation) => SnapshotStore::at(generation.file(BUFFER_FILE)).restore(
                limits,
                dedup_window,
                now_ms,
            ),
            None => Ok(None),
        }
    }

    /// Declares `offsets` durable: what the consumer may commit until the next generation.
    /// Called once at start with the restored state's offsets.
    pub fn set_durable(&self, offsets: PartitionOffsets) {
        self.durable.send_replace(offsets);
    }

    /// The offsets of the newest complete generation, updated after every write.
    pub fn durable_offsets(&self) -> watch::Receiver<PartitionOffsets> {
        self.durable.subscribe()
    }

    /// Writes a new generation: the captured buffer, `tensors`, and `progress`.
    pub fn write(
        &self,
        capture: &Capture,
        tensors: &[TensorFile<'_>],
        progress: &TrainerProgress,
    ) -> Result<Written, ResumeError> {
        let started = Instant::now();
        let previous = self.latest();
        let number = previous.as_ref().map_or(1, |g| g.number + 1);
        let temp = self
            .root
            .join(format!("{TEMP_PREFIX}{}", generation_name(number)));
        if temp.exists() {
            fs::remove_dir_all(&temp).map_err(io_error("remove", &temp))?;
        }
        fs::create_dir(&temp).map_err(io_error("create folder", &temp))?;

        let buffer_path = temp.join(BUFFER_FILE);
        crate::failpoint::disk_full("resume.disk_full").map_err(io_error("write", &buffer_path))?;
        SnapshotStore::at(buffer_path.clone()).write(capture)?;
        for file in tensors {
            write_tensors(file, &temp, previous.as_ref())?;
        }
        write_synced(&temp.join(PROGRESS_FILE), &progress_json(progress))?;
        sync_dir(&temp)?;

        let generation = Generation {
            number,
            dir: self.root.join(generation_name(number)),
        };
        fs::rename(&temp, &generation.dir).map_err(io_error("rename", &temp))?;
        sync_dir(&self.root)?;
        crate::failpoint::hit("resume.before_marker");
        write_synced(&generation.file(MARKER_FILE), b"")?;
        sync_dir(&generation.dir)?;

        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) = Some(generation);
        if let Some(old) = previous {
            remove_leftover(&old.dir, "superseded resume generation");
        }
        self.durable.send_replace(capture.offsets());

        let buffer_bytes = fs::metadata(generation_dir_file(&self.root, number, BUFFER_FILE))
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(Written {
            number,
            seconds: started.elapsed().as_secs_f64(),
            buffer_bytes,
        })
    }
}

fn generation_dir_file(root: &Path, number: u64, name: &str) -> PathBuf {
    root.join(generation_name(number)).join(name)
}

fn progress_json(progress: &TrainerProgress) -> Vec<u8> {
    let mut text = serde_json::to_vec_pretty(progress).unwrap_or_default();
    text.push(b'\n');
    text
}

/// Writes one tensor file into `dir`, or links it from `previous` when unchanged.
fn write_tensors(
    file: &TensorFile<'_>,
    dir: &Path,
    previous: Option<&Generation>,
) -> Result<(), ResumeError> {
    let path = dir.join(file.name);
    if !file.changed {
        if let Some(old) = previous.map(|g| g.file(file.name)).filter(|p| p.is_file()) {
            return fs::hard_link(&old, &path).map_err(io_error("link", &path));
        }
    }
    match &file.source {
        TensorSource::Store(vs) => weights::save(vs, &path, SaveDtype::F32)?,
        TensorSource::Named(named) => {
            Tensor::write_safetensors(named, &path).map_err(|source| ResumeError::Tensors {
                path: path.clone(),
                source,
            })?;
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_error("sync", &path))?;
        }
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ResumeError> {
    fs::write(path, bytes).map_err(io_error("write", path))?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_error("sync", path))
}

fn sync_dir(dir: &Path) -> Result<(), ResumeError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_error("sync folder", dir))
}

fn generation_name(number: u64) -> String {
    format!("g{number:08}")
}

/// The number of a folder named like a generation.
fn generation_number(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_prefix('g')?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) || !path.is_dir() {
        return None;
    }
    digits.parse().ok()
}

fn is_temporary(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(TEMP_PREFIX))
        && path.is_dir()
        && !path.is_symlink()
}

fn remove_leftover(path: &Path, what: &'static str) {
    match fs::remove_dir_all(path) {
        Ok(()) => info!(path = %path.display(), what, "removed"),
        Err(error) => warn!(path = %path.display(), what, %error, "cannot remove"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on a broken expectation
mod tests {
    use super::*;
    use crate::buffer::BufferLimits;
    use crate::ingest::store::SharedBuffer;

    fn limits() -> BufferLimits {
        BufferLimits {
            max_rows: 100,
            max_bytes: 1 << 20,
            max_age_ms: None,
        }
    }

    fn shared_with_offsets(next: i64) -> SharedBuffer {
        let mut state = IngestState::new(limits(), 10);
        state.offsets.advance("t", 0, next - 1);
        SharedBuffer::new(state)
    }

    fn progress(steps: u64) -> TrainerProgress {
        TrainerProgress {
            applied_steps: steps,
            ..TrainerProgress::fresh()
        }
    }

    #[test]
    fn generations_replace_each_other_and_publish_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResumeStore::open(dir.path()).unwrap();
        assert_eq!(store.latest(), None);
        let durable = store.durable_offsets();

        let shared = shared_with_offsets(5);
        store.write(&shared.capture(), &[], &progress(1)).unwrap();
        let shared = shared_with_offsets(9);
        let written = store.write(&shared.capture(), &[], &progress(2)).unwrap();

        assert_eq!(written.number, 2);
        let latest = store.latest().unwrap();
        assert_eq!(latest.progress().unwrap().applied_steps, 2);
        assert_eq!(durable.borrow().next_offset("t", 0), Some(9));
        let names: Vec<_> = fs::read_dir(store.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["g00000002".to_owned()]);

        let reopened = ResumeStore::open(dir.path()).unwrap();
        let state = reopened.restore_buffer(limits(), 10, 0).unwrap().unwrap();
        assert_eq!(state.offsets.next_offset("t", 0), Some(9));
    }

    #[test]
    fn open_removes_unfinished_and_unmarked_generations() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResumeStore::open(dir.path()).unwrap();
        let shared = shared_with_offsets(3);
        store.write(&shared.capture(), &[], &progress(7)).unwrap();

        // A crash after the rename but before the marker, and one mid-write.
        let unmarked = store.root().join("g00000002");
        fs::create_dir(&unmarked).unwrap();
        fs::write(unmarked.join(PROGRESS_FILE), b"{}").unwrap();
        let temp = store.root().join(".tmp-g00000003");
        fs::create_dir(&temp).unwrap();
        let stray = store.root().join("notes.txt");
        fs::write(&stray, b"kept").unwrap();

        let reopened = ResumeStore::open(dir.path()).unwrap();
        assert_eq!(reopened.latest().unwrap().number, 1);
        assert_eq!(
            reopened.latest().unwrap().progress().unwrap().applied_steps,
            7
        );
        assert!(!unmarked.exists());
        assert!(!temp.exists());
        assert!(
            stray.exists(),
            "files the store does not own are left alone"
        );
    }

    #[test]
    fn unchanged_weights_are_linked_and_changed_ones_rewritten() {
        use std::os::unix::fs::MetadataExt;

        let dir = tempfile::tempdir().unwrap();
        let store = ResumeStore::open(dir.path()).unwrap();
        let shared = shared_with_offsets(1);
        let named = vec![("w".to_owned(), Tensor::from_slice(&[1.0f32, 2.0]))];
        let file = |changed| TensorFile {
            name: "moments.safetensors",
            source: TensorSource::Named(&named),
            changed,
        };

        store
            .write(&shared.capture(), &[file(true)], &progress(1))
            .unwrap();
        let first = store.latest().unwrap().file("moments.safetensors");
        let inode = fs::metadata(&first).unwrap().ino();
        store
            .write(&shared.capture(), &[file(false)], &progress(1))
            .unwrap();
        let linked = store.latest().unwrap().file("moments.safetensors");
        assert_eq!(fs::metadata(&linked).unwrap().ino(), inode);
        store
            .write(&shared.capture(), &[file(true)], &progress(2))
            .unwrap();
        let rewritten = store.latest().unwrap().file("moments.safetensors");
        assert_ne!(fs::metadata(&rewritten).unwrap().ino(), inode);

        let read = Tensor::read_safetensors(&rewritten).unwrap();
        assert_eq!(read[0].0, "w");
        assert_eq!(Vec::<f32>::try_from(&read[0].1).unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn a_progress_file_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResumeStore::open(dir.path()).unwrap();
        let shared = shared_with_offsets(1);
        let future = TrainerProgress {
            format: PROGRESS_FORMAT + 1,
            ..TrainerProgress::fresh()
        };
        store.write(&shared.capture(), &[], &future).unwrap();
        let error = store.latest().unwrap().progress().unwrap_err();
        assert!(error.to_string().contains("format 2"), "{error}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on a broken expectation
mod progress_tests {
    use super::*;

    fn pair(id: &str, partition: i32, offset: i64, at: Option<i64>) -> Provenance {
        Provenance {
            id: id.into(),
            topic: "t".into(),
            partition,
            offset,
            event_time_ms: at,
        }
    }

    #[test]
    fn steps_accumulate_counts_offset_ranges_and_event_times() {
        let mut progress = TrainerProgress::fresh();
        let counters = |applied_steps| TrainerCounters {
            applied_steps,
            lr_scale: 0.5,
            consecutive_skips: 0,
            rollbacks: 1,
        };
        progress.record_step(
            &counters(1),
            &[pair("a", 0, 7, Some(50)), pair("b", 1, 3, None)],
        );
        progress.record_step(
            &counters(2),
            &[pair("a", 0, 7, Some(50)), pair("c", 0, 2, Some(90))],
        );

        assert_eq!(progress.applied_steps, 2);
        assert_eq!(progress.pairs_trained, 4);
        assert_eq!(progress.counters(), counters(2));
        let since = &progress.since_publish;
        assert_eq!((since.steps, since.pairs, since.events.len()), (2, 4, 3));
        assert_eq!(since.offsets["t"][&0], [2, 7]);
        assert_eq!(since.offsets["t"][&1], [3, 3]);
        assert_eq!(since.event_time_ms, Some([50, 90]));

        let text = serde_json::to_string(&progress).unwrap();
        let back: TrainerProgress = serde_json::from_str(&text).unwrap();
        assert_eq!(back, progress);
    }
}
