//! The Arrow schema of a pair batch, encoding records into it and decoding rows out of it.
//!
//! Also home of the byte accounting ([`PairColumns::row_bytes`]), because it follows the
//! layout of these columns.

use std::sync::{Arc, OnceLock};

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array, Int8Array,
    ListArray, MapArray, PrimitiveArray, RecordBatch, StringArray, StructArray,
    TimestampMillisecondArray, UInt16Array, UInt32Array, UInt64Array,
};
use arrow::buffer::{Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{
    ArrowPrimitiveType, DataType, Field, FieldRef, Fields, Float32Type, Int32Type, Int64Type,
    Int8Type, Schema, SchemaRef, TimeUnit, UInt64Type,
};
use arrow::error::ArrowError;

use super::error::BufferError;
use super::record::{PairRecord, Preference};

/// Column names of the pair schema, in schema order.
pub(crate) mod name {
    pub(crate) const ID: &str = "id";
    pub(crate) const TOPIC: &str = "topic";
    pub(crate) const PARTITION: &str = "partition";
    pub(crate) const OFFSET: &str = "offset";
    pub(crate) const EVENT_TIME: &str = "event_time";
    pub(crate) const INGEST_TIME: &str = "ingest_time";
    pub(crate) const PROMPT_IDS: &str = "prompt_ids";
    pub(crate) const RESPONSE_A_IDS: &str = "response_a_ids";
    pub(crate) const RESPONSE_B_IDS: &str = "response_b_ids";
    pub(crate) const TRUNCATED_A: &str = "truncated_a";
    pub(crate) const TRUNCATED_B: &str = "truncated_b";
    pub(crate) const PREFERENCE: &str = "preference";
    pub(crate) const CONFIDENCE: &str = "confidence";
    pub(crate) const SCORES_A: &str = "scores_a";
    pub(crate) const SCORES_B: &str = "scores_b";
    pub(crate) const POLICY_VERSION_A: &str = "policy_version_a";
    pub(crate) const POLICY_VERSION_B: &str = "policy_version_b";
    pub(crate) const SEGMENT: &str = "segment";
    pub(crate) const SOURCE: &str = "source";
    pub(crate) const PROMPT_TEXT: &str = "prompt_text";
    pub(crate) const RESPONSE_A_TEXT: &str = "response_a_text";
    pub(crate) const RESPONSE_B_TEXT: &str = "response_b_text";
}

/// Schema metadata key naming the version of the pair schema.
pub const SCHEMA_VERSION_KEY: &str = "rebeld.pair_schema_version";

/// Version of the pair schema written under [`SCHEMA_VERSION_KEY`].
pub const SCHEMA_VERSION: &str = "2";

/// Bytes every row is charged whatever its contents; see
/// [`RollingBuffer::bytes`](super::RollingBuffer::bytes).
///
/// 7 Utf8 and 3 token-list and 2 map columns at 4 offset bytes each (48); partition 4,
/// offset 8, event and ingest time 8 each (28); two truncation flags 1 each, preference 1,
/// confidence 4 (7); two policy versions 8 each (16); `times_trained` 4.
pub const FIXED_ROW_BYTES: usize = 48 + 28 + 7 + 16 + 4;

/// How a batch stores its token ids: as narrow as its largest id allows.
///
/// Every tokenizer with at most 65,536 entries (SmolLM2's has 49,152) gives `U16` batches,
/// half the bytes of `U32`. Snapshots always store `U32`, so their files do not depend on
/// the ids a batch happened to hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenWidth {
    /// `UInt16` items: every id in the batch is at most `u16::MAX`.
    U16,
    /// `UInt32` items.
    U32,
}

impl TokenWidth {
    /// The narrowest width that holds every id.
    pub fn fitting<'a>(mut lists: impl Iterator<Item = &'a [u32]>) -> Self {
        let fits = |list: &[u32]| list.iter().all(|&id| u16::try_from(id).is_ok());
        if lists.all(fits) {
            TokenWidth::U16
        } else {
            TokenWidth::U32
        }
    }

    /// Bytes one token id takes, and is charged against `max_bytes`.
    pub fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }

    fn item_type(self) -> DataType {
        match self {
            TokenWidth::U16 => DataType::UInt16,
            TokenWidth::U32 => DataType::UInt32,
        }
    }

    /// The width of a token-list field, or `None` for any other type.
    fn of_field(field: &Field) -> Option<Self> {
        let DataType::List(item) = field.data_type() else {
            return None;
        };
        [TokenWidth::U16, TokenWidth::U32]
            .into_iter()
            .find(|width| *item == token_item_field(*width))
    }
}

/// Bytes one score entry is charged besides its objective name: key offset 4, value 8.
const SCORE_ENTRY_BYTES: usize = 12;

/// The Arrow schema of the buffer's batches (without `times_trained`, which the buffer keeps
/// beside the batches because it changes).
///
/// | column | type | nullable |
/// | --- | --- | --- |
/// | `id`, `topic` | Utf8 | no |
/// | `partition` | Int32 | no |
/// | `offset` | Int64 | no |
/// | `event_time` | Timestamp(ms, "UTC") | yes |
/// | `ingest_time` | Timestamp(ms, "UTC") | no |
/// | `prompt_ids`, `response_a_ids`, `response_b_ids` | List<item: UInt32 not null> | no |
/// | `truncated_a`, `truncated_b` | Boolean | no |
/// | `preference` | Int8 (0 = A, 1 = B, 2 = tie) | yes |
/// | `confidence` | Float32 | yes |
/// | `scores_a`, `scores_b` | Map<keys: Utf8, values: Float64>, entries unsorted | no |
/// | `policy_version_a`, `policy_version_b` | UInt64 | yes |
/// | `segment`, `source` | Utf8 | yes |
/// | `prompt_text`, `response_a_text`, `response_b_text` | Utf8 | yes |
///
/// The schema metadata holds [`SCHEMA_VERSION_KEY`] = [`SCHEMA_VERSION`]. This is the schema
/// of snapshot files; batches in memory may hold their ids as `UInt16` instead
/// ([`pair_schema_with`], [`TokenWidth`]).
pub fn pair_schema() -> SchemaRef {
    pair_schema_with(TokenWidth::U32)
}

/// The pair schema with token ids of the given width.
pub fn pair_schema_with(width: TokenWidth) -> SchemaRef {
    static NARROW: OnceLock<SchemaRef> = OnceLock::new();
    static WIDE: OnceLock<SchemaRef> = OnceLock::new();
    let schema = match width {
        TokenWidth::U16 => &NARROW,
        TokenWidth::U32 => &WIDE,
    };
    schema.get_or_init(|| build_schema(width)).clone()
}

fn build_schema(width: TokenWidth) -> SchemaRef {
    let tokens = token_list_type(width);
    let fields = vec![
        Field::new(name::ID, DataType::Utf8, false),
        Field::new(name::TOPIC, DataType::Utf8, false),
        Field::new(name::PARTITION, DataType::Int32, false),
        Field::new(name::OFFSET, DataType::Int64, false),
        Field::new(name::EVENT_TIME, utc_millis(), true),
        Field::new(name::INGEST_TIME, utc_millis(), false),
        Field::new(name::PROMPT_IDS, tokens.clone(), false),
        Field::new(name::RESPONSE_A_IDS, tokens.clone(), false),
        Field::new(name::RESPONSE_B_IDS, tokens, false),
        Field::new(name::TRUNCATED_A, DataType::Boolean, false),
        Field::new(name::TRUNCATED_B, DataType::Boolean, false),
        Field::new(name::PREFERENCE, DataType::Int8, true),
        Field::new(name::CONFIDENCE, DataType::Float32, true),
        Field::new(name::SCORES_A, score_map_type(), false),
        Field::new(name::SCORES_B, score_map_type(), false),
        Field::new(name::POLICY_VERSION_A, DataType::UInt64, true),
        Field::new(name::POLICY_VERSION_B, DataType::UInt64, true),
        Field::new(name::SEGMENT, DataType::Utf8, true),
        Field::new(name::SOURCE, DataType::Utf8, true),
        Field::new(name::PROMPT_TEXT, DataType::Utf8, true),
        Field::new(name::RESPONSE_A_TEXT, DataType::Utf8, true),
        Field::new(name::RESPONSE_B_TEXT, DataType::Utf8, true),
    ];
    let metadata = [(SCHEMA_VERSION_KEY.to_owned(), SCHEMA_VERSION.to_owned())];

    Arc::new(Schema::new(fields).with_metadata(metadata.into_iter().collect()))
}

fn utc_millis() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn token_item_field(width: TokenWidth) -> FieldRef {
    Arc::new(Field::new("item", width.item_type(), false))
}

fn token_list_type(width: TokenWidth) -> DataType {
    DataType::List(token_item_field(width))
}

fn score_entry_fields() -> Fields {
    Fields::from(vec![
        Field::new("keys", DataType::Utf8, false),
        Field::new("values", DataType::Float64, false),
    ])
}

fn score_entries_field() -> FieldRef {
    Arc::new(Field::new(
        "entries",
        DataType::Struct(score_entry_fields()),
        false,
    ))
}

fn score_map_type() -> DataType {
    DataType::Map(score_entries_field(), false)
}

fn arrow_error(op: &'static str) -> impl FnOnce(ArrowError) -> BufferError {
    move |source| BufferError::Arrow { op, source }
}

/// Encodes records into one batch of the pair schema, with the narrowest [`TokenWidth`]
/// that holds every token id of every record.
pub(crate) fn encode(records: &[PairRecord]) -> Result<RecordBatch, BufferError> {
    let lists = records.iter().flat_map(|r| {
        let lists = [&r.prompt_ids, &r.response_a_ids, &r.response_b_ids];
        lists.map(Vec::as_slice)
    });
    let width = TokenWidth::fitting(lists);
    let e = Encoder { records, width };
    let columns = vec![
        e.utf8(name::ID, |r| Some(&r.id))?,
        e.utf8(name::TOPIC, |r| Some(&r.topic))?,
        e.required::<Int32Type>(|r| r.partition),
        e.required::<Int64Type>(|r| r.offset),
        e.timestamps(|r| r.event_time_ms),
        e.timestamps(|r| Some(r.ingest_time_ms)),
        e.tokens(name::PROMPT_IDS, |r| &r.prompt_ids)?,
        e.tokens(name::RESPONSE_A_IDS, |r| &r.response_a_ids)?,
        e.tokens(name::RESPONSE_B_IDS, |r| &r.response_b_ids)?,
        Arc::new(BooleanArray::from_iter(
            records.iter().map(|r| r.truncated_a),
        )),
        Arc::new(BooleanArray::from_iter(
            records.iter().map(|r| r.truncated_b),
        )),
        e.optional::<Int8Type>(|r| r.preference.map(Preference::code)),
        e.optional::<Float32Type>(|r| r.confidence),
        e.scores(name::SCORES_A, |r| &r.scores_a)?,
        e.scores(name::SCORES_B, |r| &r.scores_b)?,
        e.optional::<UInt64Type>(|r| r.policy_version_a),
        e.optional::<UInt64Type>(|r| r.policy_version_b),
        e.utf8(name::SEGMENT, |r| r.segment.as_ref())?,
        e.utf8(name::SOURCE, |r| r.source.as_ref())?,
        e.utf8(name::PROMPT_TEXT, |r| r.prompt_text.as_ref())?,
        e.utf8(name::RESPONSE_A_TEXT, |r| r.response_a_text.as_ref())?,
        e.utf8(name::RESPONSE_B_TEXT, |r| r.response_b_text.as_ref())?,
    ];

    RecordBatch::try_new(pair_schema_with(width), columns)
        .map_err(arrow_error("assembling a pair batch"))
}

/// Builds one column from one field of every record.
struct Encoder<'a> {
    records: &'a [PairRecord],
    width: TokenWidth,
}

impl<'a> Encoder<'a> {
    fn required<T: ArrowPrimitiveType>(&self, field: fn(&PairRecord) -> T::Native) -> ArrayRef {
        let values = self.records.iter().map(field);
        Arc::new(PrimitiveArray::<T>::from_iter_values(values))
    }

    fn optional<T: ArrowPrimitiveType>(
        &self,
        field: fn(&PairRecord) -> Option<T::Native>,
    ) -> ArrayRef {
        Arc::new(
            self.records
                .iter()
                .map(field)
                .collect::<PrimitiveArray<T>>(),
        )
    }

    fn timestamps(&self, field: fn(&PairRecord) -> Option<i64>) -> ArrayRef {
        let array: TimestampMillisecondArray = self.records.iter().map(field).collect();
        Arc::new(array.with_timezone("UTC"))
    }

    fn utf8(
        &self,
        column: &'static str,
        field: fn(&'a PairRecord) -> Option<&'a String>,
    ) -> Result<ArrayRef, BufferError> {
        let values = self.records.iter().map(|r| field(r).map(String::as_str));
        utf8_column(column, self.records.len(), values)
    }

    fn tokens(
        &self,
        column: &'static str,
        field: fn(&'a PairRecord) -> &'a Vec<u32>,
    ) -> Result<ArrayRef, BufferError> {
        let lists = self.records.iter().map(|r| &field(r)[..]);
        token_column(column, self.records.len(), lists, self.width)
    }

    fn scores(
        &self,
        column: &'static str,
        field: fn(&'a PairRecord) -> &'a Vec<(String, f64)>,
    ) -> Result<ArrayRef, BufferError> {
        let maps = self.records.iter().map(|r| &field(r)[..]);
        score_column(column, self.records.len(), maps)
    }
}

/// 32-bit offsets for items of the given lengths, or `BatchTooLarge` when they overflow.
fn offsets(
    column: &'static str,
    rows: usize,
    lengths: impl IntoIterator<Item = usize>,
) -> Result<OffsetBuffer<i32>, BufferError> {
    let too_large = || BufferError::BatchTooLarge { column, rows };
    let mut out = vec![0_i32];
    let mut end = 0_i32;
    for length in lengths {
        let length = i32::try_from(length).map_err(|_| too_large())?;
        end = end.checked_add(length).ok_or_else(too_large)?;
        out.push(end);
    }

    // Starts at 0 and never decreases, as `OffsetBuffer::new` requires.
    Ok(OffsetBuffer::new(ScalarBuffer::from(out)))
}

fn utf8_column<'a>(
    column: &'static str,
    rows: usize,
    values: impl Iterator<Item = Option<&'a str>>,
) -> Result<ArrayRef, BufferError> {
    let mut bytes = Vec::new();
    let mut lengths = Vec::with_capacity(rows);
    let mut valid = Vec::with_capacity(rows);
    for value in values {
        let text = value.unwrap_or_default();
        bytes.extend_from_slice(text.as_bytes());
        lengths.push(text.len());
        valid.push(value.is_some());
    }

    // Arrow keeps the allocation whole for the rows' life: drop the growth slack.
    bytes.shrink_to_fit();
    let offsets = offsets(column, rows, lengths)?;
    let nulls = Some(NullBuffer::from(valid)).filter(|nulls| nulls.null_count() > 0);
    let array = StringArray::try_new(offsets, Buffer::from_vec(bytes), nulls)
        .map_err(arrow_error("building a Utf8 column"))?;
    Ok(Arc::new(array))
}

/// A token-list column of the given width; every id must fit it.
fn token_column<'a>(
    column: &'static str,
    rows: usize,
    lists: impl Iterator<Item = &'a [u32]>,
    width: TokenWidth,
) -> Result<ArrayRef, BufferError> {
    let mut tokens = Vec::new();
    let mut lengths = Vec::with_capacity(rows);
    for list in lists {
        tokens.extend_from_slice(list);
        lengths.push(list.len());
    }

    let offsets = offsets(column, rows, lengths)?;
    let values = token_values(tokens, width);
    let array = ListArray::try_new(token_item_field(width), offsets, values, None)
        .map_err(arrow_error("building a token list column"))?;
    Ok(Arc::new(array))
}

/// The ids as an array of `width`, allocated to size: Arrow keeps the allocation whole for
/// the rows' life. Ids that do not fit `U16` are a caller's bug, caught by the debug check.
fn token_values(mut tokens: Vec<u32>, width: TokenWidth) -> ArrayRef {
    match width {
        TokenWidth::U16 => {
            debug_assert!(TokenWidth::fitting(std::iter::once(&tokens[..])) == width);
            let narrow: Vec<u16> = tokens.iter().map(|&id| id as u16).collect();
            Arc::new(UInt16Array::from(narrow))
        }
        TokenWidth::U32 => {
            tokens.shrink_to_fit();
            Arc::new(UInt32Array::from(tokens))
        }
    }
}

fn score_column<'a>(
    column: &'static str,
    rows: usize,
    maps: impl Iterator<Item = &'a [(String, f64)]>,
) -> Result<ArrayRef, BufferError> {
    let mut keys = Vec::new();
    let mut values = Vec::new();
    let mut lengths = Vec::with_capacity(rows);
    for map in maps {
        keys.extend(map.iter().map(|(key, _)| Some(key.as_str())));
        values.extend(map.iter().map(|&(_, value)| value));
        lengths.push(map.len());
    }

    let keys = utf8_column(column, rows, keys.into_iter())?;
    let values: ArrayRef = Arc::new(Float64Array::from(values));
    let entries = StructArray::try_new(score_entry_fields(), vec![keys, values], None)
        .map_err(arrow_error("building score entries"))?;
    let offsets = offsets(column, rows, lengths)?;
    let array = MapArray::try_new(score_entries_field(), offsets, entries, None, false)
        .map_err(arrow_error("building a score map column"))?;
    Ok(Arc::new(array))
}

/// The item array of a token-list column, downcast.
#[derive(Clone, Debug)]
enum TokenItems {
    U16(UInt16Array),
    U32(UInt32Array),
}

/// A token-list column with its item array already downcast.
#[derive(Clone, Debug)]
struct TokenColumn {
    list: ListArray,
    items: TokenItems,
}

impl TokenColumn {
    fn new(list: ListArray, column: &'static str) -> Result<Self, BufferError> {
        let items = match list.value_type() {
            DataType::UInt16 => TokenItems::U16(downcast(list.values(), column)?),
            _ => TokenItems::U32(downcast(list.values(), column)?),
        };
        Ok(TokenColumn { list, items })
    }

    fn width(&self) -> TokenWidth {
        match self.items {
            TokenItems::U16(_) => TokenWidth::U16,
            TokenItems::U32(_) => TokenWidth::U32,
        }
    }

    fn range(&self, row: usize) -> std::ops::Range<usize> {
        let offsets = self.list.value_offsets();
        offsets[row] as usize..offsets[row + 1] as usize
    }

    /// How many ids the row holds.
    fn count(&self, row: usize) -> usize {
        self.range(row).len()
    }

    /// The row's ids.
    fn tokens(&self, row: usize) -> Vec<u32> {
        self.ids_in(self.range(row))
    }

    /// Every id of every row, in row order: the item values between the first row's start
    /// and the last row's end, which a slice leaves in place.
    fn all_ids(&self) -> Vec<u32> {
        let offsets = self.list.value_offsets();
        self.ids_in(offsets[0] as usize..offsets[self.list.len()] as usize)
    }

    fn ids_in(&self, items: std::ops::Range<usize>) -> Vec<u32> {
        match &self.items {
            TokenItems::U16(values) => values.values()[items].iter().map(|&id| id.into()).collect(),
            TokenItems::U32(values) => values.values()[items].to_vec(),
        }
    }

    /// Whether the row holds an id above `u16::MAX`, read in place.
    fn has_wide_id(&self, row: usize) -> bool {
        match &self.items {
            TokenItems::U16(_) => false,
            TokenItems::U32(items) => items.values()[self.range(row)]
                .iter()
                .any(|&id| u16::try_from(id).is_err()),
        }
    }

    /// The column re-encoded at `width`, with the same offsets.
    fn at_width(&self, column: &'static str, width: TokenWidth) -> Result<ArrayRef, BufferError> {
        let ids = self.all_ids();
        if width == TokenWidth::U16 {
            if let Some(&id) = ids.iter().find(|&&id| u16::try_from(id).is_err()) {
                return Err(BufferError::TokenOutOfRange { column, id });
            }
        }

        let lengths = (0..self.list.len()).map(|row| self.count(row));
        let offsets = offsets(column, self.list.len(), lengths)?;
        let array = ListArray::try_new(
            token_item_field(width),
            offsets,
            token_values(ids, width),
            None,
        )
        .map_err(arrow_error("re-encoding a token list column"))?;
        Ok(Arc::new(array))
    }

    fn slice(&self, offset: usize, len: usize) -> Self {
        let list = self.list.slice(offset, len);
        TokenColumn {
            list,
            items: self.items.clone(),
        }
    }
}

/// A score-map column with its keys and values already downcast.
#[derive(Clone, Debug)]
struct ScoreColumn {
    map: MapArray,
    keys: StringArray,
    values: Float64Array,
}

impl ScoreColumn {
    fn new(map: MapArray, column: &'static str) -> Result<Self, BufferError> {
        let keys = downcast::<StringArray>(map.keys(), column)?;
        let values = downcast::<Float64Array>(map.values(), column)?;
        Ok(ScoreColumn { map, keys, values })
    }

    fn entries(&self, row: usize) -> std::ops::Range<usize> {
        let offsets = self.map.value_offsets();
        offsets[row] as usize..offsets[row + 1] as usize
    }

    fn scores(&self, row: usize) -> Vec<(String, f64)> {
        let entries = self.entries(row);
        entries
            .map(|e| (self.keys.value(e).to_owned(), self.values.value(e)))
            .collect()
    }

    fn bytes(&self, row: usize) -> usize {
        let entries = self.entries(row);
        let key_bytes: usize = entries
            .clone()
            .map(|e| self.keys.value_length(e) as usize)
            .sum();
        SCORE_ENTRY_BYTES * entries.len() + key_bytes
    }

    fn slice(&self, offset: usize, len: usize) -> Self {
        let map = self.map.slice(offset, len);
        ScoreColumn {
            map,
            keys: self.keys.clone(),
            values: self.values.clone(),
        }
    }
}

fn downcast<T: Array + Clone + 'static>(array: &ArrayRef, column: &str) -> Result<T, BufferError> {
    let typed = array.as_any().downcast_ref::<T>().cloned();
    typed.ok_or_else(|| BufferError::Schema {
        column: column.to_owned(),
    })
}

fn column<T: Array + Clone + 'static>(batch: &RecordBatch, name: &str) -> Result<T, BufferError> {
    let array = batch.column_by_name(name);
    let array = array.ok_or_else(|| BufferError::Schema {
        column: name.to_owned(),
    })?;
    downcast(array, name)
}

/// A batch of the pair schema with every column downcast, so rows decode without lookups.
#[derive(Clone, Debug)]
pub(crate) struct PairColumns {
    batch: RecordBatch,
    id: StringArray,
    topic: StringArray,
    partition: Int32Array,
    offset: Int64Array,
    event_time: TimestampMillisecondArray,
    ingest_time: TimestampMillisecondArray,
    prompt: TokenColumn,
    response_a: TokenColumn,
    response_b: TokenColumn,
    truncated_a: BooleanArray,
    truncated_b: BooleanArray,
    preference: Int8Array,
    confidence: Float32Array,
    scores_a: ScoreColumn,
    scores_b: ScoreColumn,
    policy_version_a: UInt64Array,
    policy_version_b: UInt64Array,
    segment: StringArray,
    source: StringArray,
    prompt_text: StringArray,
    response_a_text: StringArray,
    response_b_text: StringArray,
}

impl PairColumns {
    /// Checks the batch against the pair schema and downcasts its columns.
    pub(crate) fn try_new(batch: RecordBatch) -> Result<Self, BufferError> {
        check_fields(&batch)?;

        let b = &batch;
        Ok(PairColumns {
            id: column(b, name::ID)?,
            topic: column(b, name::TOPIC)?,
            partition: column(b, name::PARTITION)?,
            offset: column(b, name::OFFSET)?,
            event_time: column(b, name::EVENT_TIME)?,
            ingest_time: column(b, name::INGEST_TIME)?,
            prompt: TokenColumn::new(column(b, name::PROMPT_IDS)?, name::PROMPT_IDS)?,
            response_a: TokenColumn::new(column(b, name::RESPONSE_A_IDS)?, name::RESPONSE_A_IDS)?,
            response_b: TokenColumn::new(column(b, name::RESPONSE_B_IDS)?, name::RESPONSE_B_IDS)?,
            truncated_a: column(b, name::TRUNCATED_A)?,
            truncated_b: column(b, name::TRUNCATED_B)?,
            preference: column(b, name::PREFERENCE)?,
            confidence: column(b, name::CONFIDENCE)?,
            scores_a: ScoreColumn::new(column(b, name::SCORES_A)?, name::SCORES_A)?,
            scores_b: ScoreColumn::new(column(b, name::SCORES_B)?, name::SCORES_B)?,
            policy_version_a: column(b, name::POLICY_VERSION_A)?,
            policy_version_b: column(b, name::POLICY_VERSION_B)?,
            segment: column(b, name::SEGMENT)?,
            source: column(b, name::SOURCE)?,
            prompt_text: column(b, name::PROMPT_TEXT)?,
            response_a_text: column(b, name::RESPONSE_A_TEXT)?,
            response_b_text: column(b, name::RESPONSE_B_TEXT)?,
            batch,
        })
    }

    /// The rows `offset..offset + len`, sharing this batch's buffers.
    ///
    /// Panics when the range is out of bounds, as [`RecordBatch::slice`] does.
    pub(crate) fn slice(&self, offset: usize, len: usize) -> Self {
        PairColumns {
            batch: self.batch.slice(offset, len),
            id: self.id.slice(offset, len),
            topic: self.topic.slice(offset, len),
            partition: self.partition.slice(offset, len),
            offset: self.offset.slice(offset, len),
            event_time: self.event_time.slice(offset, len),
            ingest_time: self.ingest_time.slice(offset, len),
            prompt: self.prompt.slice(offset, len),
            response_a: self.response_a.slice(offset, len),
            response_b: self.response_b.slice(offset, len),
            truncated_a: self.truncated_a.slice(offset, len),
            truncated_b: self.truncated_b.slice(offset, len),
            preference: self.preference.slice(offset, len),
            confidence: self.confidence.slice(offset, len),
            scores_a: self.scores_a.slice(offset, len),
            scores_b: self.scores_b.slice(offset, len),
            policy_version_a: self.policy_version_a.slice(offset, len),
            policy_version_b: self.policy_version_b.slice(offset, len),
            segment: self.segment.slice(offset, len),
            source: self.source.slice(offset, len),
            prompt_text: self.prompt_text.slice(offset, len),
            response_a_text: self.response_a_text.slice(offset, len),
            response_b_text: self.response_b_text.slice(offset, len),
        }
    }

    /// How the batch stores its token ids.
    pub(crate) fn token_width(&self) -> TokenWidth {
        self.prompt.width()
    }

    /// The same rows with their token ids re-encoded at `width`, sharing every other column.
    ///
    /// Fails with [`BufferError::TokenOutOfRange`] when an id does not fit `width`.
    pub(crate) fn at_token_width(&self, width: TokenWidth) -> Result<PairColumns, BufferError> {
        if self.token_width() == width {
            return Ok(self.clone());
        }

        let mut columns = self.batch.columns().to_vec();
        let token_columns = [
            (name::PROMPT_IDS, &self.prompt),
            (name::RESPONSE_A_IDS, &self.response_a),
            (name::RESPONSE_B_IDS, &self.response_b),
        ];
        for (column, tokens) in token_columns {
            let index = self
                .batch
                .schema()
                .index_of(column)
                .map_err(arrow_error("finding ids"))?;
            columns[index] = tokens.at_width(column, width)?;
        }
        let batch = RecordBatch::try_new(pair_schema_with(width), columns)
            .map_err(arrow_error("re-encoding token ids"))?;
        PairColumns::try_new(batch)
    }

    /// The same rows with the narrowest token width their ids allow.
    pub(crate) fn narrowest(&self) -> Result<PairColumns, BufferError> {
        let width = match self.rows_through_last_wide_id() {
            0 => TokenWidth::U16,
            _ => TokenWidth::U32,
        };
        self.at_token_width(width)
    }

    /// How many rows from the front, up to and including the last row holding a token id
    /// above `u16::MAX`: 0 when the ids could be stored 16 bits wide. O(tokens) for a `U32`
    /// batch, O(1) for a `U16` one.
    pub(crate) fn rows_through_last_wide_id(&self) -> usize {
        if self.token_width() == TokenWidth::U16 {
            return 0;
        }
        let ids = [&self.prompt, &self.response_a, &self.response_b];
        let wide = |row: usize| ids.iter().any(|t| t.has_wide_id(row));
        (0..self.len())
            .rev()
            .find(|&row| wide(row))
            .map_or(0, |row| row + 1)
    }

    /// The underlying batch.
    pub(crate) fn batch(&self) -> &RecordBatch {
        &self.batch
    }

    /// Rows in the batch.
    pub(crate) fn len(&self) -> usize {
        self.batch.num_rows()
    }

    /// All ids, in row order.
    pub(crate) fn ids(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.len()).map(|row| self.id.value(row))
    }

    /// The id of a row.
    pub(crate) fn id(&self, row: usize) -> &str {
        self.id.value(row)
    }

    /// The ingest time of a row, in Unix milliseconds.
    pub(crate) fn ingest_time_ms(&self, row: usize) -> i64 {
        self.ingest_time.value(row)
    }

    /// The event time of a row, or its ingest time when the event had none.
    pub(crate) fn event_or_ingest_ms(&self, row: usize) -> i64 {
        optional(&self.event_time, row).unwrap_or_else(|| self.ingest_time_ms(row))
    }

    /// The bytes a row is charged against `max_bytes`.
    ///
    /// This is the row's share of the Arrow value and offset buffers of a batch holding
    /// only whole rows: [`FIXED_ROW_BYTES`], plus the UTF-8 bytes of every string (id,
    /// topic, segment, source, texts and objective names), plus 2 or 4 per token id (the
    /// batch's [`TokenWidth`]), plus 12 per score entry. Validity bitmaps, the one extra
    /// offset per column and batch, and allocation padding are left out, so the figure adds
    /// up row by row and does not change when rows are sliced or filtered. It depends on the
    /// other rows of the append only through the token width.
    pub(crate) fn row_bytes(&self, row: usize) -> usize {
        let strings = [
            &self.id,
            &self.topic,
            &self.segment,
            &self.source,
            &self.prompt_text,
            &self.response_a_text,
            &self.response_b_text,
        ];
        let string_bytes: usize = strings.iter().map(|a| a.value_length(row) as usize).sum();
        let tokens = [&self.prompt, &self.response_a, &self.response_b];
        let token_bytes: usize = tokens
            .iter()
            .map(|t| t.count(row) * t.width().bytes())
            .sum();
        let score_bytes = self.scores_a.bytes(row) + self.scores_b.bytes(row);

        FIXED_ROW_BYTES + string_bytes + token_bytes + score_bytes
    }

    /// Decodes one row into a record.
    pub(crate) fn decode(&self, row: usize, times_trained: u32) -> Result<PairRecord, BufferError> {
        Ok(PairRecord {
            id: self.id.value(row).to_owned(),
            topic: self.topic.value(row).to_owned(),
            partition: self.partition.value(row),
            offset: self.offset.value(row),
            event_time_ms: optional(&self.event_time, row),
            ingest_time_ms: self.ingest_time.value(row),
            prompt_ids: self.prompt.tokens(row),
            response_a_ids: self.response_a.tokens(row),
            response_b_ids: self.response_b.tokens(row),
            truncated_a: self.truncated_a.value(row),
            truncated_b: self.truncated_b.value(row),
            preference: self.preference(row)?,
            confidence: optional(&self.confidence, row),
            scores_a: self.scores_a.scores(row),
            scores_b: self.scores_b.scores(row),
            policy_version_a: optional(&self.policy_version_a, row),
            policy_version_b: optional(&self.policy_version_b, row),
            segment: optional_string(&self.segment, row),
            source: optional_string(&self.source, row),
            prompt_text: optional_string(&self.prompt_text, row),
            response_a_text: optional_string(&self.response_a_text, row),
            response_b_text: optional_string(&self.response_b_text, row),
            times_trained,
        })
    }

    fn preference(&self, row: usize) -> Result<Option<Preference>, BufferError> {
        let Some(code) = optional(&self.preference, row) else {
            return Ok(None);
        };

        let invalid = || BufferError::InvalidValue {
            column: name::PREFERENCE,
            row,
            value: code.to_string(),
        };
        Preference::from_code(code).map(Some).ok_or_else(invalid)
    }
}

/// Compares the batch's fields, ignoring schema metadata, with those of the pair schema of
/// the batch's token width (read from `prompt_ids`).
fn check_fields(batch: &RecordBatch) -> Result<(), BufferError> {
    let schema = batch.schema();
    let prompt_ids = schema.field_with_name(name::PROMPT_IDS).ok();
    let width = prompt_ids.and_then(TokenWidth::of_field);
    let width = width.ok_or_else(|| BufferError::Schema {
        column: name::PROMPT_IDS.to_owned(),
    })?;
    let expected = pair_schema_with(width);
    let found = schema.fields();
    let mismatch = expected
        .fields()
        .iter()
        .zip(found.iter())
        .find(|(e, f)| e != f);
    if let Some((field, _)) = mismatch {
        return Err(BufferError::Schema {
            column: field.name().clone(),
        });
    }

    if found.len() != expected.fields().len() {
        let column = format!(
            "<{} columns, expected {}>",
            found.len(),
            expected.fields().len()
        );
        return Err(BufferError::Schema { column });
    }
    Ok(())
}

fn optional<T: ArrowPrimitiveType>(array: &PrimitiveArray<T>, row: usize) -> Option<T::Native> {
    array.is_valid(row).then(|| array.value(row))
}

fn optional_string(array: &StringArray, row: usize) -> Option<String> {
    array.is_valid(row).then(|| array.value(row).to_owned())
}
