//! Snapshots: the rows with their training counts, the consumer's next offsets, its dedup
//! window and counters, in one zstd-compressed Arrow IPC file written atomically.
//!
//! # Layout
//!
//! An ordinary Arrow IPC file (readable by any Arrow tool) of [`pair_schema`] plus a
//! non-null `times_trained: UInt32` column, one record batch per buffer chunk. Token ids are
//! written 32 bits wide whatever width a chunk held them at in memory, and restored as
//! narrow as each chunk's ids allow (zstd makes the wide ids cheap on disk). The footer's
//! custom metadata holds two entries:
//!
//! - `rebeld.snapshot.meta`: JSON with the format version, the limits, the buffer's
//!   counters, the row count, the next offsets, the dedup window (capacity and ids, oldest
//!   first), the caller's counters, and the length and CRC-32 of the *body*: every byte
//!   before the end-of-stream marker, i.e. the header, schema and batch messages;
//! - `rebeld.snapshot.meta_crc32`: the CRC-32 of that JSON text, in decimal.
//!
//! Arrow's format has no checksums and its reader trusts lengths it finds in the file, so
//! [`read_snapshot`] checks both CRCs before Arrow decodes anything, and then decodes the
//! body as an IPC stream, never reading the unchecked footer beyond the metadata entries.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::{FileWriter, IpcWriteOptions};
use arrow::ipc::{CompressionType, MetadataVersion};
use serde::{Deserialize, Serialize};

use super::crc::{crc32, Crc32, HashingWriter};
use super::{
    pair_schema, BufferError, BufferLimits, Chunk, Counters, DedupWindow, Evicted, PairColumns,
    RollingBuffer, SnapshotError, TokenWidth,
};

/// The snapshot format this build writes and reads.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 2;

const META_KEY: &str = "rebeld.snapshot.meta";
const META_CRC_KEY: &str = "rebeld.snapshot.meta_crc32";
const TIMES_TRAINED: &str = "times_trained";

/// Bytes before an IPC file's first message when written with 8-byte alignment: the magic
/// `ARROW1` and 2 bytes of padding.
const FILE_HEADER_LEN: u64 = 8;

/// Bytes after an IPC file's footer: its length (4 bytes) and the magic `ARROW1`.
const FILE_TRAILER_LEN: u64 = 10;

const ARROW_MAGIC: &[u8; 6] = b"ARROW1";

/// Everything besides the rows that a snapshot carries for the consumer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SnapshotMeta {
    /// The next offset to consume from each (topic, partition).
    pub next_offsets: BTreeMap<(String, i32), i64>,
    /// The ids seen recently, to drop redelivered events after a restart.
    pub dedup: DedupWindow,
    /// Counters the caller wants to survive a restart, by name.
    pub counters: BTreeMap<String, u64>,
}

/// An immutable copy of the buffer's rows and counters, taken cheaply so that the snapshot's
/// compression and I/O happen outside the buffer's lock.
///
/// Taking it clones reference-counted Arrow batches and copies the training counts: O(rows)
/// small copies, no row data.
#[derive(Clone, Debug)]
pub struct BufferImage {
    limits: BufferLimits,
    counters: Counters,
    rows: usize,
    parts: Vec<(PairColumns, UInt32Array)>,
}

impl RollingBuffer {
    /// A copy of the rows and counters for [`BufferImage::write`].
    pub fn image(&self) -> BufferImage {
        let parts = self.chunks.iter().map(|chunk| {
            let trained = chunk.rows().iter().map(|r| r.times_trained);
            (chunk.cols().clone(), UInt32Array::from_iter_values(trained))
        });

        BufferImage {
            limits: self.limits,
            counters: self.counters,
            rows: self.rows,
            parts: parts.collect(),
        }
    }

    /// Writes a snapshot of the buffer and `meta` to `path`; see [`BufferImage::write`].
    ///
    /// This holds `&self` during the whole write; to release a lock sooner, take an
    /// [`image`](RollingBuffer::image) under the lock and write it after.
    pub fn write_snapshot(
        &self,
        path: impl AsRef<Path>,
        meta: &SnapshotMeta,
    ) -> Result<(), SnapshotError> {
        self.image().write(path, meta)
    }

    /// Rebuilds a buffer from snapshot batches, checking each against the pair schema and
    /// storing its ids as narrow as they allow, as the append that made the batch did.
    fn restore(
        limits: BufferLimits,
        counters: Counters,
        parts: Vec<(RecordBatch, Vec<u32>)>,
    ) -> Result<Self, BufferError> {
        let mut buffer = RollingBuffer::new(limits);
        buffer.counters = counters;
        for (batch, times_trained) in parts.into_iter().filter(|(b, _)| b.num_rows() > 0) {
            let cols = PairColumns::try_new(batch)?.narrowest()?;
            let chunk = Chunk::new(cols, buffer.next_seq, times_trained);
            for id in chunk.cols().ids() {
                if !buffer.ids.insert(id.to_owned()) {
                    return Err(BufferError::DuplicateId { id: id.to_owned() });
                }
            }

            buffer.next_seq += chunk.len() as u64;
            buffer.rows += chunk.len();
            buffer.bytes += chunk.bytes();
            buffer.chunks.push_back(chunk);
        }
        Ok(buffer)
    }
}

impl BufferImage {
    /// Rows in the image.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether the image holds no rows.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Writes the snapshot to `path` atomically: to `path` + `.tmp` first, fsynced, then
    /// renamed over `path`, then the directory fsynced. A reader sees the old file or the
    /// new one, never a mix; a crash leaves at most a stale `.tmp`, which the next write
    /// replaces. Two writes to one path at the same time race on that `.tmp`: keep one
    /// writer per path.
    pub fn write(&self, path: impl AsRef<Path>, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
        let path = path.as_ref();
        let tmp = temporary_path(path);
        if let Err(error) = self.write_file(&tmp, meta) {
            // Best effort: the write error is the one worth reporting.
            let _ = fs::remove_file(&tmp);
            return Err(error);
        }

        fs::rename(&tmp, path).map_err(io_error("rename the new snapshot onto", path))?;
        sync_parent(path)
    }

    fn write_file(&self, tmp: &Path, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
        let file = File::create(tmp).map_err(io_error("create", tmp))?;
        let out = HashingWriter::new(BufWriter::new(file));
        let out = self
            .encode(out, meta)
            .map_err(|source| SnapshotError::Encode {
                path: tmp.to_owned(),
                source,
            })?;

        let flushed = out.into_inner().into_inner();
        let file = flushed.map_err(|e| io_error("flush", tmp)(e.into_error()))?;
        file.sync_all().map_err(io_error("fsync", tmp))
    }

    fn encode<W: Write>(
        &self,
        out: HashingWriter<W>,
        meta: &SnapshotMeta,
    ) -> Result<HashingWriter<W>, ArrowError> {
        // Alignment 8, the format's minimum, makes the header exactly `FILE_HEADER_LEN`.
        let options = IpcWriteOptions::try_new(8, false, MetadataVersion::V5)?
            .try_with_compression(Some(CompressionType::ZSTD))?;
        let mut writer = FileWriter::try_new_with_options(out, &snapshot_schema(), options)?;
        for (cols, times_trained) in &self.parts {
            writer.write(&with_times_trained(cols, times_trained)?)?;
        }

        let (len, crc32_value) = writer.get_ref().digest();
        let json = self.meta_json(
            meta,
            WireBody {
                len,
                crc32: crc32_value,
            },
        )?;
        writer.write_metadata(META_CRC_KEY, crc32(json.as_bytes()).to_string());
        writer.write_metadata(META_KEY, json);

        writer.finish()?;
        writer.into_inner()
    }

    fn meta_json(&self, meta: &SnapshotMeta, body: WireBody) -> Result<String, ArrowError> {
        let next_offsets = meta
            .next_offsets
            .iter()
            .map(|((topic, partition), &next_offset)| WireOffset {
                topic: topic.clone(),
                partition: *partition,
                next_offset,
            });
        let wire = WireMeta {
            format_version: SNAPSHOT_FORMAT_VERSION,
            body,
            rows: self.rows,
            limits: WireLimits::from(self.limits),
            buffer_counters: WireCounters::from(self.counters),
            next_offsets: next_offsets.collect(),
            dedup: WireDedup {
                capacity: meta.dedup.capacity(),
                ids: meta.dedup.iter().collect(),
            },
            counters: meta.counters.clone(),
        };

        serde_json::to_string(&wire).map_err(|e| ArrowError::ExternalError(Box::new(e)))
    }
}

/// The schema of snapshot files: the pair schema plus `times_trained`.
fn snapshot_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    let build = || {
        let pairs = pair_schema();
        let mut fields: Vec<_> = pairs.fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(TIMES_TRAINED, DataType::UInt32, false)));
        Arc::new(Schema::new(fields).with_metadata(pairs.metadata().clone()))
    };
    SCHEMA.get_or_init(build).clone()
}

/// The batch as a snapshot stores it: token ids widened to `UInt32`, `times_trained` added.
fn with_times_trained(
    cols: &PairColumns,
    times_trained: &UInt32Array,
) -> Result<RecordBatch, ArrowError> {
    let wide = cols
        .at_token_width(TokenWidth::U32)
        .map_err(|error| ArrowError::ExternalError(Box::new(error)))?;
    let mut columns = wide.batch().columns().to_vec();
    columns.push(Arc::new(times_trained.clone()));
    RecordBatch::try_new(snapshot_schema(), columns)
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Makes the rename durable: on Linux a rename is persisted by fsyncing the directory.
fn sync_parent(path: &Path) -> Result<(), SnapshotError> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = parent.unwrap_or(Path::new("."));
    let handle = File::open(dir).map_err(io_error("open the directory of", dir))?;
    handle
        .sync_all()
        .map_err(io_error("fsync the directory", dir))
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SnapshotError {
    let path = path.to_owned();
    move |source| SnapshotError::Io { op, path, source }
}

fn rows_error(path: &Path, source: BufferError) -> SnapshotError {
    let path = path.to_owned();
    SnapshotError::Rows { path, source }
}

fn corrupt(path: &Path, detail: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

/// Reads a snapshot written by [`BufferImage::write`], restoring the buffer exactly: the
/// same rows in the same order and batches, training counts, limits and counters.
///
/// Row handles issued before are not valid for the restored buffer. A file that is
/// truncated, damaged or not a snapshot gives an error for which
/// [`SnapshotError::is_corrupt`] is true; no input makes this panic.
pub fn read_snapshot(
    path: impl AsRef<Path>,
) -> Result<(RollingBuffer, SnapshotMeta), SnapshotError> {
    let path = path.as_ref();
    let mut file = File::open(path).map_err(io_error("open", path))?;
    let (wire, footer_start) = read_meta(&mut file, path)?;
    check_body(&mut file, path, &wire.body, footer_start)?;

    let parts = read_batches(file, path, wire.body.len)?;
    let counters = Counters::from(wire.buffer_counters);
    let buffer = RollingBuffer::restore(wire.limits.into(), counters, parts)
        .map_err(|source| rows_error(path, source))?;
    if buffer.len() != wire.rows {
        let detail = format!("{} rows decoded, metadata says {}", buffer.len(), wire.rows);
        return Err(corrupt(path, detail));
    }

    let meta = snapshot_meta(path, wire.next_offsets, wire.dedup, wire.counters)?;
    Ok((buffer, meta))
}

/// Reads and checks the metadata from the footer; returns it and where the footer starts.
fn read_meta(file: &mut File, path: &Path) -> Result<(WireMeta<String>, u64), SnapshotError> {
    let (footer, footer_start) = read_footer(file, path)?;
    let footer = arrow::ipc::root_as_footer(&footer)
        .map_err(|e| corrupt(path, format!("the Arrow footer does not parse: {e}")))?;
    let entry = |key: &str| {
        let entries = footer.custom_metadata().into_iter().flatten();
        let mut found = entries
            .filter(|kv| kv.key() == Some(key))
            .filter_map(|kv| kv.value());
        found
            .next()
            .ok_or_else(|| corrupt(path, format!("no `{key}` entry in the footer")))
    };

    let json = entry(META_KEY)?;
    let expected_crc = entry(META_CRC_KEY)?;
    if expected_crc.parse::<u32>().ok() != Some(crc32(json.as_bytes())) {
        return Err(corrupt(path, "the metadata fails its CRC-32"));
    }

    Ok((parse_meta(path, json)?, footer_start))
}

fn read_footer(file: &mut File, path: &Path) -> Result<(Vec<u8>, u64), SnapshotError> {
    let len = file.metadata().map_err(io_error("stat", path))?.len();
    if len < FILE_HEADER_LEN + FILE_TRAILER_LEN {
        return Err(corrupt(
            path,
            format!("{len} bytes is too short for an Arrow file"),
        ));
    }

    let mut trailer = [0_u8; FILE_TRAILER_LEN as usize];
    file.seek(SeekFrom::Start(len - FILE_TRAILER_LEN))
        .map_err(io_error("seek in", path))?;
    file.read_exact(&mut trailer)
        .map_err(io_error("read", path))?;
    if &trailer[4..] != ARROW_MAGIC {
        return Err(corrupt(
            path,
            "no Arrow magic at the end: truncated or not a snapshot",
        ));
    }

    let footer_len = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let footer_len = u64::from(footer_len);
    if footer_len > len - FILE_HEADER_LEN - FILE_TRAILER_LEN {
        return Err(corrupt(
            path,
            format!("footer length {footer_len} exceeds the file"),
        ));
    }

    let footer_start = len - FILE_TRAILER_LEN - footer_len;
    let mut footer = vec![0; footer_len as usize];
    file.seek(SeekFrom::Start(footer_start))
        .map_err(io_error("seek in", path))?;
    file.read_exact(&mut footer)
        .map_err(io_error("read", path))?;
    Ok((footer, footer_start))
}

fn parse_meta(path: &Path, json: &str) -> Result<WireMeta<String>, SnapshotError> {
    let version: WireVersion = serde_json::from_str(json)
        .map_err(|e| corrupt(path, format!("the metadata is not snapshot JSON: {e}")))?;
    if version.format_version != SNAPSHOT_FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            path: path.to_owned(),
            found: version.format_version,
            supported: SNAPSHOT_FORMAT_VERSION,
        });
    }

    serde_json::from_str(json).map_err(|e| corrupt(path, format!("bad snapshot metadata: {e}")))
}

/// Checks the CRC-32 of the body, streaming it from disk.
fn check_body(
    file: &mut File,
    path: &Path,
    body: &WireBody,
    footer_start: u64,
) -> Result<(), SnapshotError> {
    if body.len < FILE_HEADER_LEN || body.len > footer_start {
        let detail = format!("body length {} does not fit before the footer", body.len);
        return Err(corrupt(path, detail));
    }

    file.seek(SeekFrom::Start(0))
        .map_err(io_error("seek in", path))?;
    let mut reader = BufReader::with_capacity(1 << 16, &mut *file).take(body.len);
    let mut crc = Crc32::new();
    let mut chunk = vec![0_u8; 1 << 16];
    loop {
        let read = reader.read(&mut chunk).map_err(io_error("read", path))?;
        if read == 0 {
            break;
        }
        crc.update(&chunk[..read]);
    }

    if crc.finish() != body.crc32 {
        return Err(corrupt(path, "the record batches fail their CRC-32"));
    }
    Ok(())
}

/// Decodes the checked body as an IPC stream and splits off the training counts.
fn read_batches(
    mut file: File,
    path: &Path,
    body_len: u64,
) -> Result<Vec<(RecordBatch, Vec<u32>)>, SnapshotError> {
    let decode_error = |source| SnapshotError::Decode {
        path: path.to_owned(),
        source,
    };
    file.seek(SeekFrom::Start(FILE_HEADER_LEN))
        .map_err(io_error("seek in", path))?;
    let stream = BufReader::new(file).take(body_len - FILE_HEADER_LEN);
    let reader = StreamReader::try_new(stream, None).map_err(decode_error)?;
    if reader.schema().fields() != snapshot_schema().fields() {
        return Err(corrupt(path, "the columns differ from the snapshot schema"));
    }

    let mut parts = Vec::new();
    for batch in reader {
        parts.push(split_times_trained(path, batch.map_err(decode_error)?)?);
    }
    Ok(parts)
}

fn split_times_trained(
    path: &Path,
    batch: RecordBatch,
) -> Result<(RecordBatch, Vec<u32>), SnapshotError> {
    let mut columns = batch.columns().to_vec();
    let trained = columns.pop().filter(|c| c.null_count() == 0);
    let trained = trained
        .as_ref()
        .and_then(|c| c.as_any().downcast_ref::<UInt32Array>());
    let trained = trained.ok_or_else(|| corrupt(path, "`times_trained` is missing or null"))?;

    let batch =
        RecordBatch::try_new(pair_schema(), columns).map_err(|source| SnapshotError::Decode {
            path: path.to_owned(),
            source,
        })?;
    Ok((batch, trained.values().to_vec()))
}

fn snapshot_meta(
    path: &Path,
    next_offsets: Vec<WireOffset>,
    dedup: WireDedup<String>,
    counters: BTreeMap<String, u64>,
) -> Result<SnapshotMeta, SnapshotError> {
    if dedup.ids.len() > dedup.capacity {
        let detail = format!(
            "{} dedup ids exceed capacity {}",
            dedup.ids.len(),
            dedup.capacity
        );
        return Err(corrupt(path, detail));
    }

    let mut window = DedupWindow::new(dedup.capacity);
    if let Some(id) = dedup.ids.iter().find(|id| !window.insert(id)) {
        return Err(corrupt(path, format!("dedup id {id:?} appears twice")));
    }

    let next_offsets = next_offsets
        .into_iter()
        .map(|o| ((o.topic, o.partition), o.next_offset));
    Ok(SnapshotMeta {
        next_offsets: next_offsets.collect(),
        dedup: window,
        counters,
    })
}

/// The JSON under `rebeld.snapshot.meta`. `Id` is `&str` when writing, `String` when reading.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireMeta<Id> {
    format_version: u32,
    body: WireBody,
    rows: usize,
    limits: WireLimits,
    buffer_counters: WireCounters,
    next_offsets: Vec<WireOffset>,
    dedup: WireDedup<Id>,
    counters: BTreeMap<String, u64>,
}

/// Just the version, read first so a newer format gets a clear error.
#[derive(Deserialize)]
struct WireVersion {
    format_version: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireBody {
    len: u64,
    crc32: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireLimits {
    max_rows: usize,
    max_bytes: usize,
    max_age_ms: Option<u64>,
}

impl From<BufferLimits> for WireLimits {
    fn from(l: BufferLimits) -> Self {
        WireLimits {
            max_rows: l.max_rows,
            max_bytes: l.max_bytes,
            max_age_ms: l.max_age_ms,
        }
    }
}

impl From<WireLimits> for BufferLimits {
    fn from(l: WireLimits) -> Self {
        BufferLimits {
            max_rows: l.max_rows,
            max_bytes: l.max_bytes,
            max_age_ms: l.max_age_ms,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireCounters {
    appended: u64,
    duplicates: u64,
    expired: u64,
    over_capacity: u64,
    never_trained: u64,
}

impl From<Counters> for WireCounters {
    fn from(c: Counters) -> Self {
        WireCounters {
            appended: c.appended,
            duplicates: c.duplicates,
            expired: c.evicted.expired,
            over_capacity: c.evicted.over_capacity,
            never_trained: c.evicted.never_trained,
        }
    }
}

impl From<WireCounters> for Counters {
    fn from(c: WireCounters) -> Self {
        let evicted = Evicted {
            expired: c.expired,
            over_capacity: c.over_capacity,
            never_trained: c.never_trained,
        };
        Counters {
            appended: c.appended,
            duplicates: c.duplicates,
            evicted,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireOffset {
    topic: String,
    partition: i32,
    next_offset: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireDedup<Id> {
    capacity: usize,
    ids: Vec<Id>,
}
