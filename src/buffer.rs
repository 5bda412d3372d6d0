//! The rolling buffer of preference pairs that the consumer fills and the trainer samples.
//!
//! Rows live in Arrow [`RecordBatch`]es of [`pair_schema`], one batch per
//! [`RollingBuffer::append`] call, oldest first. Beside each batch the buffer keeps a few
//! numbers per row (handle, ingest time, byte charge, training count), so eviction and the
//! choice of a sample touch no Arrow data; only the rows a sample returns are decoded.
//!
//! The buffer is a plain struct: the daemon wraps it in a mutex. Every call holding that lock
//! is O(rows appended or evicted), O(chunks), or for sampling O(n) decodes plus, for the
//! recency strategies, O(rows) floating-point work. Writing a snapshot happens outside the
//! lock: [`RollingBuffer::image`] takes a cheap copy, and [`BufferImage::write`] does the I/O.

mod chunk;
mod columns;
mod crc;
mod dedup;
mod error;
mod record;
mod sample;
mod snapshot;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod test_support;

use std::collections::{HashSet, VecDeque};

use arrow::array::RecordBatch;
use rand::Rng;

use chunk::Chunk;
use columns::PairColumns;

pub use columns::{
    pair_schema, pair_schema_with, TokenWidth, FIXED_ROW_BYTES, SCHEMA_VERSION, SCHEMA_VERSION_KEY,
};
pub use dedup::DedupWindow;
pub use error::{BufferError, SnapshotError};
pub use record::{PairRecord, Preference};
pub use sample::SampleStrategy;
pub use snapshot::{read_snapshot, BufferImage, SnapshotMeta, SNAPSHOT_FORMAT_VERSION};

/// The bounds the buffer keeps to after every append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferLimits {
    /// Most rows held.
    pub max_rows: usize,
    /// Most bytes held, counted as [`RollingBuffer::bytes`] describes.
    pub max_bytes: usize,
    /// Rows whose ingest time lies more than this many milliseconds before `now` are dropped;
    /// `None` keeps rows of any age.
    pub max_age_ms: Option<u64>,
}

/// Rows evicted, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Rows dropped because their ingest time was older than `max_age_ms`.
    pub expired: u64,
    /// Rows dropped, oldest first, to get within `max_rows` and `max_bytes`.
    pub over_capacity: u64,
    /// Of the rows above, those the trainer had never used (`times_trained == 0`).
    pub never_trained: u64,
}

impl Evicted {
    /// All rows evicted, whatever the reason.
    pub fn total(&self) -> u64 {
        self.expired + self.over_capacity
    }

    fn add(&mut self, other: Evicted) {
        self.expired += other.expired;
        self.over_capacity += other.over_capacity;
        self.never_trained += other.never_trained;
    }
}

/// What one [`RollingBuffer::append`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Records added as rows (some may have been evicted again at once).
    pub appended: usize,
    /// Records skipped because a held row, or an earlier record of the same call, has the id.
    pub duplicates: usize,
    /// Rows evicted after adding.
    pub evicted: Evicted,
}

/// Counters and gauges of the buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferStats {
    /// Rows held.
    pub rows: usize,
    /// Bytes held; see [`RollingBuffer::bytes`].
    pub bytes: usize,
    /// Records appended as rows over the buffer's life.
    pub appended: u64,
    /// Records skipped as duplicates over the buffer's life.
    pub duplicates: u64,
    /// Rows evicted over the buffer's life.
    pub evicted: Evicted,
}

/// The buffer's lifetime counters, which a snapshot carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    appended: u64,
    duplicates: u64,
    evicted: Evicted,
}

/// Names one row for [`RollingBuffer::mark_trained`].
///
/// Handles are never reused within one buffer, so a handle to an evicted row matches
/// nothing. They are not kept in snapshots: a restored buffer issues new ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowHandle(u64);

/// One row returned by [`RollingBuffer::sample`].
#[derive(Clone, Debug, PartialEq)]
pub struct SampledPair {
    /// Handle to pass to [`RollingBuffer::mark_trained`] after training on the pair.
    pub handle: RowHandle,
    /// The whole pair, with `times_trained` as it was when sampled.
    pub pair: PairRecord,
}

/// A bounded, append-ordered store of preference pairs in Arrow batches.
#[derive(Clone, Debug)]
pub struct RollingBuffer {
    limits: BufferLimits,
    chunks: VecDeque<Chunk>,
    ids: HashSet<String>,
    rows: usize,
    bytes: usize,
    next_seq: u64,
    counters: Counters,
}

impl RollingBuffer {
    /// An empty buffer that keeps to `limits`.
    pub fn new(limits: BufferLimits) -> Self {
        RollingBuffer {
            limits,
            chunks: VecDeque::new(),
            ids: HashSet::new(),
            rows: 0,
            bytes: 0,
            next_seq: 0,
            counters: Counters::default(),
        }
    }

    /// Adds `records` as one batch, then evicts as [`RollingBuffer::evict`] does.
    ///
    /// Records whose id the buffer already holds, or that repeat an id earlier in `records`,
    /// are skipped and counted as duplicates. When encoding fails nothing is added; after
    /// any error the buffer is consistent and keeps to its limits as far as it got.
    pub fn append(
        &mut self,
        records: Vec<PairRecord>,
        now_ms: i64,
    ) -> Result<AppendOutcome, BufferError> {
        let (fresh, duplicates) = self.without_duplicates(records);
        let appended = fresh.len();
        if !fresh.is_empty() {
            self.push(&fresh)?;
        }

        self.counters.appended += appended as u64;
        self.counters.duplicates += duplicates as u64;
        let evicted = self.evict(now_ms)?;
        Ok(AppendOutcome {
            appended,
            duplicates,
            evicted,
        })
    }

    fn without_duplicates(&self, records: Vec<PairRecord>) -> (Vec<PairRecord>, usize) {
        let mut seen = HashSet::with_capacity(records.len());
        let keep: Vec<bool> = records
            .iter()
            .map(|r| !self.ids.contains(&r.id) && seen.insert(r.id.as_str()))
            .collect();
        let duplicates = keep.iter().filter(|&&k| !k).count();

        let fresh = records
            .into_iter()
            .zip(keep)
            .filter(|(_, k)| *k)
            .map(|(r, _)| r);
        (fresh.collect(), duplicates)
    }

    fn push(&mut self, records: &[PairRecord]) -> Result<(), BufferError> {
        let cols = PairColumns::try_new(columns::encode(records)?)?;
        let chunk = Chunk::new(cols, self.next_seq, records.iter().map(|r| r.times_trained));

        self.next_seq += chunk.len() as u64;
        self.rows += chunk.len();
        self.bytes += chunk.bytes();
        self.ids.extend(records.iter().map(|r| r.id.clone()));
        self.chunks.push_back(chunk);
        Ok(())
    }

    /// Drops expired rows, then the oldest rows until within `max_rows` and `max_bytes`.
    ///
    /// A row is expired when its ingest time is before `now_ms − max_age_ms`, wherever it
    /// sits: ingest times need not grow with append order. Expiring first means no row is
    /// evicted for capacity that an expired row could have made room for. `append` calls
    /// this; call it alone to age rows out while nothing arrives.
    pub fn evict(&mut self, now_ms: i64) -> Result<Evicted, BufferError> {
        let mut evicted = self.expire(now_ms)?;
        evicted.add(self.shed_oldest()?);

        self.counters.evicted.add(evicted);
        Ok(evicted)
    }

    fn expire(&mut self, now_ms: i64) -> Result<Evicted, BufferError> {
        let mut evicted = Evicted::default();
        let Some(max_age) = self.limits.max_age_ms else {
            return Ok(evicted);
        };
        let cutoff = now_ms.saturating_sub(i64::try_from(max_age).unwrap_or(i64::MAX));

        let mut index = 0;
        while index < self.chunks.len() {
            let chunk = &self.chunks[index];
            if chunk.min_ingest_ms() >= cutoff {
                index += 1;
                continue;
            }

            let keep: Vec<bool> = chunk.rows().iter().map(|r| r.ingest_ms >= cutoff).collect();
            // Everything that can fail comes before the totals change.
            let kept = match keep.contains(&true) {
                true => Some(chunk.retain(&keep)?),
                false => None,
            };
            let narrowed = kept
                .map(|mut kept| kept.narrow().map(|saved| (saved, kept)))
                .transpose()?;
            let dropped = keep
                .iter()
                .enumerate()
                .filter(|(_, &k)| !k)
                .map(|(row, _)| row);
            let removed = self.forget(index, dropped);
            evicted.expired += removed.0;
            evicted.never_trained += removed.1;

            match narrowed {
                Some((saved, kept)) => {
                    self.bytes -= saved;
                    self.chunks[index] = kept;
                    index += 1;
                }
                None => {
                    self.chunks.remove(index);
                }
            }
        }
        Ok(evicted)
    }

    fn shed_oldest(&mut self) -> Result<Evicted, BufferError> {
        let mut evicted = Evicted::default();
        while let Some(front) = self.chunks.front() {
            let excess_rows = self.rows.saturating_sub(self.limits.max_rows);
            let excess_bytes = self.bytes.saturating_sub(self.limits.max_bytes);
            let count = front.front_rows_to_shed(excess_rows, excess_bytes);
            if count == 0 {
                break;
            }

            // The rest of the front chunk, built before the totals change, since narrowing
            // can fail.
            let rest = match count == front.len() {
                true => None,
                false => {
                    let mut rest = front.clone();
                    rest.drop_front(count);
                    Some((rest.narrow()?, rest))
                }
            };
            let removed = self.forget(0, 0..count);
            evicted.over_capacity += removed.0;
            evicted.never_trained += removed.1;

            match rest {
                None => {
                    self.chunks.pop_front();
                }
                Some((saved, rest)) => {
                    self.bytes -= saved;
                    self.chunks[0] = rest;
                }
            }
        }
        Ok(evicted)
    }

    /// Takes the given rows of one chunk out of the totals and the id set; the caller then
    /// removes them from the chunk. Returns (rows, rows never trained).
    fn forget(&mut self, chunk: usize, rows: impl Iterator<Item = usize>) -> (u64, u64) {
        let chunk = &self.chunks[chunk];
        let (mut removed, mut never_trained) = (0, 0);
        for row in rows {
            let meta = chunk.rows()[row];
            self.ids.remove(chunk.cols().id(row));
            self.rows -= 1;
            self.bytes -= meta.bytes;

            removed += 1;
            never_trained += u64::from(meta.times_trained == 0);
        }
        (removed, never_trained)
    }

    /// Draws up to `n` distinct rows, or every row when `n >= len()`.
    ///
    /// See [`SampleStrategy`] for the weighting. Costs O(n) row decodes, plus for the recency
    /// strategies O(len) arithmetic over the per-row bookkeeping.
    pub fn sample<R: Rng + ?Sized>(
        &self,
        n: usize,
        strategy: SampleStrategy,
        rng: &mut R,
    ) -> Result<Vec<SampledPair>, BufferError> {
        let ingest_times = self
            .chunks
            .iter()
            .flat_map(|c| c.rows().iter().map(|r| r.ingest_ms));
        let positions = sample::choose(strategy, n, self.rows, ingest_times, rng)?;

        let starts = self.chunk_starts();
        positions
            .into_iter()
            .map(|position| self.sample_at(&starts, position))
            .collect()
    }

    /// The position of each chunk's first row.
    fn chunk_starts(&self) -> Vec<usize> {
        let lengths = self.chunks.iter().map(Chunk::len);
        lengths
            .scan(0, |start, len| Some(std::mem::replace(start, *start + len)))
            .collect()
    }

    fn sample_at(&self, starts: &[usize], position: usize) -> Result<SampledPair, BufferError> {
        let index = starts
            .partition_point(|&start| start <= position)
            .saturating_sub(1);
        let chunk = &self.chunks[index];
        let row = position - starts[index];

        let meta = chunk.rows()[row];
        let pair = chunk.cols().decode(row, meta.times_trained)?;
        Ok(SampledPair {
            handle: RowHandle(meta.seq),
            pair,
        })
    }

    /// Up to `limit` rows whose id `keep` accepts, newest first, decoding only those.
    pub fn select_newest(
        &self,
        limit: usize,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<SampledPair>, BufferError> {
        let mut selected = Vec::new();
        for chunk in self.chunks.iter().rev() {
            let ids: Vec<&str> = chunk.cols().ids().collect();
            for row in (0..ids.len()).rev() {
                if selected.len() >= limit {
                    return Ok(selected);
                }
                if keep(ids[row]) {
                    let meta = chunk.rows()[row];
                    selected.push(SampledPair {
                        handle: RowHandle(meta.seq),
                        pair: chunk.cols().decode(row, meta.times_trained)?,
                    });
                }
            }
        }
        Ok(selected)
    }

    /// Adds one to `times_trained` of each row named, once per mention; returns how many
    /// mentions matched a held row. Handles of evicted rows are ignored.
    pub fn mark_trained(&mut self, handles: &[RowHandle]) -> usize {
        let mut marked = 0;
        for handle in handles {
            if let Some((chunk, row)) = self.locate(*handle) {
                let meta = self.chunks[chunk].row_mut(row);
                meta.times_trained = meta.times_trained.saturating_add(1);
                marked += 1;
            }
        }
        marked
    }

    fn locate(&self, handle: RowHandle) -> Option<(usize, usize)> {
        let chunk = self.chunks.partition_point(|c| c.last_seq() < handle.0);
        let row = self.chunks.get(chunk)?.position_of(handle.0)?;
        Some((chunk, row))
    }

    /// The row a handle names, decoded, or `None` when it was evicted.
    pub fn get(&self, handle: RowHandle) -> Result<Option<PairRecord>, BufferError> {
        let Some((chunk, row)) = self.locate(handle) else {
            return Ok(None);
        };

        let chunk = &self.chunks[chunk];
        chunk
            .cols()
            .decode(row, chunk.rows()[row].times_trained)
            .map(Some)
    }

    /// Every row decoded, oldest first. O(everything held); meant for tests and tools.
    pub fn to_records(&self) -> Result<Vec<PairRecord>, BufferError> {
        let rows = self
            .chunks
            .iter()
            .flat_map(|c| (0..c.len()).map(move |row| (c, row)));
        rows.map(|(c, row)| c.cols().decode(row, c.rows()[row].times_trained))
            .collect()
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Bytes held: the sum over rows of their share of Arrow's value and offset buffers.
    ///
    /// Each row is charged [`FIXED_ROW_BYTES`] plus the UTF-8 bytes of its strings
    /// (id, topic, segment, source, texts, objective names), 2 per token id (4 in a batch
    /// holding an id of 65,536 or more; see [`TokenWidth`]) and 12 per score
    /// entry. Validity bitmaps, padding and the per-row bookkeeping (32 bytes, plus the
    /// id once more in the id set) are not counted. The figure is exact and additive, so
    /// eviction can reach `max_bytes` row by row; the memory really used is
    /// [`RollingBuffer::arrow_memory_bytes`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Memory of the Arrow arrays held, as `RecordBatch::get_array_memory_size` counts it.
    ///
    /// Above [`RollingBuffer::bytes`] by bitmaps and allocation slack, and by the rows
    /// already evicted from the front batch, whose buffers stay allocated until the whole
    /// batch goes. O(chunks × columns).
    pub fn arrow_memory_bytes(&self) -> usize {
        self.chunks
            .iter()
            .map(|c| c.cols().batch().get_array_memory_size())
            .sum()
    }

    /// Milliseconds from the oldest event time held (ingest time for rows without one) to
    /// `now_ms`, 0 when that lies in the future; `None` when empty.
    pub fn oldest_event_age(&self, now_ms: i64) -> Option<u64> {
        let oldest = self.chunks.iter().map(Chunk::min_event_ms).min()?;
        Some(u64::try_from(now_ms.saturating_sub(oldest)).unwrap_or(0))
    }

    /// Whether a row with this id is held.
    pub fn contains_id(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// The ids held, oldest row first.
    pub fn ids(&self) -> impl Iterator<Item = &str> + '_ {
        self.chunks.iter().flat_map(|c| c.cols().ids())
    }

    /// The batches held, oldest first, in [`pair_schema`] (without `times_trained`).
    pub fn batches(&self) -> impl Iterator<Item = &RecordBatch> + '_ {
        self.chunks.iter().map(|c| c.cols().batch())
    }

    /// The limits in force.
    pub fn limits(&self) -> BufferLimits {
        self.limits
    }

    /// Replaces the limits and evicts to meet them at `now_ms`.
    pub fn set_limits(
        &mut self,
        limits: BufferLimits,
        now_ms: i64,
    ) -> Result<Evicted, BufferError> {
        self.limits = limits;
        self.evict(now_ms)
    }

    /// Current gauges and lifetime counters.
    pub fn stats(&self) -> BufferStats {
        BufferStats {
            rows: self.rows,
            bytes: self.bytes,
            appended: self.counters.appended,
            duplicates: self.counters.duplicates,
            evicted: self.counters.evicted,
        }
    }
}
