//! One appended batch and the light per-row state kept beside it.

use arrow::array::BooleanArray;
use arrow::compute::filter_record_batch;

use super::columns::{PairColumns, TokenWidth};
use super::error::BufferError;

/// What the buffer keeps per row outside Arrow, so eviction and sampling decode nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RowMeta {
    /// Position in append order over the buffer's life; the row's handle.
    pub(crate) seq: u64,
    /// Ingest time in Unix milliseconds, copied from the batch.
    pub(crate) ingest_ms: i64,
    /// Bytes charged against `max_bytes`; see [`PairColumns::row_bytes`].
    pub(crate) bytes: usize,
    /// How often the trainer used the row. Kept here because Arrow arrays are immutable.
    pub(crate) times_trained: u32,
}

/// A non-empty batch of rows, in append order, with one [`RowMeta`] per row.
#[derive(Clone, Debug)]
pub(crate) struct Chunk {
    cols: PairColumns,
    rows: Vec<RowMeta>,
    bytes: usize,
    min_ingest_ms: i64,
    min_event_ms: i64,
    /// Rows from the front that must go before the batch can store its ids 16 bits wide;
    /// see [`PairColumns::rows_through_last_wide_id`].
    wide_rows: usize,
}

impl Chunk {
    /// Wraps a batch whose rows get handles `first_seq..` and the given training counts.
    pub(crate) fn new(
        cols: PairColumns,
        first_seq: u64,
        times_trained: impl IntoIterator<Item = u32>,
    ) -> Chunk {
        let rows = (0..cols.len())
            .zip(times_trained)
            .map(|(row, times_trained)| RowMeta {
                seq: first_seq + row as u64,
                ingest_ms: cols.ingest_time_ms(row),
                bytes: cols.row_bytes(row),
                times_trained,
            })
            .collect();

        let wide_rows = cols.rows_through_last_wide_id();
        Chunk::from_parts(cols, rows, wide_rows)
    }

    /// `wide_rows` as [`PairColumns::rows_through_last_wide_id`] gives it for `cols`.
    fn from_parts(cols: PairColumns, rows: Vec<RowMeta>, wide_rows: usize) -> Chunk {
        let bytes = rows.iter().map(|r| r.bytes).sum();
        let min_ingest_ms = rows.iter().map(|r| r.ingest_ms).min().unwrap_or(i64::MAX);
        let events = (0..cols.len()).map(|row| cols.event_or_ingest_ms(row));
        let min_event_ms = events.min().unwrap_or(i64::MAX);

        Chunk {
            wide_rows,
            cols,
            rows,
            bytes,
            min_ingest_ms,
            min_event_ms,
        }
    }

    pub(crate) fn cols(&self) -> &PairColumns {
        &self.cols
    }

    pub(crate) fn rows(&self) -> &[RowMeta] {
        &self.rows
    }

    pub(crate) fn row_mut(&mut self, row: usize) -> &mut RowMeta {
        &mut self.rows[row]
    }

    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn min_ingest_ms(&self) -> i64 {
        self.min_ingest_ms
    }

    pub(crate) fn min_event_ms(&self) -> i64 {
        self.min_event_ms
    }

    pub(crate) fn last_seq(&self) -> u64 {
        self.rows.last().map_or(0, |r| r.seq)
    }

    /// The row holding handle `seq`, if it is in this chunk.
    pub(crate) fn position_of(&self, seq: u64) -> Option<usize> {
        self.rows.binary_search_by_key(&seq, |r| r.seq).ok()
    }

    /// How many rows from the front must go to shed `rows` rows and `bytes` bytes, as far as
    /// this chunk can.
    ///
    /// Stops after the last row holding a wide token id: once it goes, [`Chunk::narrow`]
    /// recharges the rows after it, so they are weighed again.
    pub(crate) fn front_rows_to_shed(&self, rows: usize, bytes: usize) -> usize {
        let stop = match self.wide_rows {
            0 => self.rows.len(),
            wide => wide,
        };
        let mut count = 0;
        let mut freed = 0;
        for row in &self.rows[..stop] {
            if count >= rows && freed >= bytes {
                break;
            }
            count += 1;
            freed += row.bytes;
        }
        count
    }

    /// Drops the first `count` rows, keeping the batch's buffers shared.
    ///
    /// `count` must be below `len()`: a chunk never becomes empty, the buffer removes it.
    pub(crate) fn drop_front(&mut self, count: usize) {
        let cols = self.cols.slice(count, self.len() - count);
        let rows = self.rows.split_off(count);
        let wide_rows = self.wide_rows.saturating_sub(count);
        *self = Chunk::from_parts(cols, rows, wide_rows);
    }

    /// Stores the token ids 16 bits wide when the rows held now allow it (after the rows
    /// holding wider ids left), recharging every row. Returns the bytes this saved.
    ///
    /// Keeps every batch as narrow as its rows allow, which is what a snapshot restores.
    pub(crate) fn narrow(&mut self) -> Result<usize, BufferError> {
        if self.wide_rows > 0 || self.cols.token_width() == TokenWidth::U16 {
            return Ok(0);
        }

        let cols = self.cols.at_token_width(TokenWidth::U16)?;
        let mut rows = self.rows.clone();
        for (row, meta) in rows.iter_mut().enumerate() {
            meta.bytes = cols.row_bytes(row);
        }
        let before = self.bytes;
        *self = Chunk::from_parts(cols, rows, 0);
        Ok(before - self.bytes)
    }

    /// A copy holding only the rows whose `keep` entry is true, in fresh buffers.
    pub(crate) fn retain(&self, keep: &[bool]) -> Result<Chunk, BufferError> {
        let mask = BooleanArray::from(keep.to_vec());
        let batch =
            filter_record_batch(self.cols.batch(), &mask).map_err(|source| BufferError::Arrow {
                op: "filtering expired rows",
                source,
            })?;
        let cols = PairColumns::try_new(batch)?;
        let rows = self
            .rows
            .iter()
            .zip(keep)
            .filter(|(_, &k)| k)
            .map(|(r, _)| *r)
            .collect();

        let wide_rows = cols.rows_through_last_wide_id();
        Ok(Chunk::from_parts(cols, rows, wide_rows))
    }
}
