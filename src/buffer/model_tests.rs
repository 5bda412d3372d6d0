//! The buffer against a naive model: a `VecDeque` of records with the same rules written
//! the obvious way.

use std::collections::{HashMap, VecDeque};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use rand::rngs::SmallRng;
use rand::SeedableRng;

use super::test_support::{
    expected_row_bytes, expected_token_bytes, plain_record, record, ID_POOL,
};
use super::{
    AppendOutcome, BufferLimits, Evicted, PairRecord, RollingBuffer, RowHandle, SampleStrategy,
};

#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// Advance the clock, then append; each record's `ingest_time_ms` is a lag behind it.
    Append {
        advance: i64,
        records: Vec<PairRecord>,
    },
    /// Sample, then mark the chosen handles whose flag is set.
    Sample {
        n: usize,
        strategy: SampleStrategy,
        seed: u64,
        mark: Vec<bool>,
    },
    /// Mark handles from any earlier sample, possibly evicted, possibly twice.
    MarkOld { picks: Vec<Index> },
    /// Advance the clock and evict without appending.
    Evict { advance: i64 },
    /// Replace the limits, which evicts at once.
    SetLimits { limits: BufferLimits },
}

pub(crate) fn limits() -> impl Strategy<Value = BufferLimits> {
    let max_bytes = prop_oneof![1 => Just(usize::MAX), 3 => 0..4_000_usize];
    let max_age_ms = proptest::option::of(0..400_u64);
    (0..25_usize, max_bytes, max_age_ms).prop_map(|(max_rows, max_bytes, max_age_ms)| {
        BufferLimits {
            max_rows,
            max_bytes,
            max_age_ms,
        }
    })
}

fn strategy() -> impl Strategy<Value = SampleStrategy> {
    prop_oneof![
        Just(SampleStrategy::Uniform),
        (1.0..500.0_f64).prop_map(|half_life_ms| SampleStrategy::RecencyTime { half_life_ms }),
        (0.5..20.0_f64).prop_map(|half_life_rows| SampleStrategy::RecencyRank { half_life_rows }),
    ]
}

pub(crate) fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..60_i64, vec(record(), 0..8))
            .prop_map(|(advance, records)| Op::Append { advance, records }),
        3 => (0..30_usize, strategy(), any::<u64>(), vec(any::<bool>(), 0..30))
            .prop_map(|(n, strategy, seed, mark)| Op::Sample { n, strategy, seed, mark }),
        1 => vec(any::<Index>(), 0..6).prop_map(|picks| Op::MarkOld { picks }),
        1 => (0..200_i64).prop_map(|advance| Op::Evict { advance }),
        1 => limits().prop_map(|limits| Op::SetLimits { limits }),
    ]
}

/// A row of the model; `key` plays the part of the buffer's handle.
#[derive(Clone, Debug)]
struct ModelRow {
    key: u64,
    record: PairRecord,
    /// Which append the row came in: its rows share one batch, whose token width follows
    /// the ids of the rows it still holds.
    append: u64,
}

/// The buffer's rules, written naively.
#[derive(Debug)]
pub(crate) struct Model {
    limits: BufferLimits,
    rows: VecDeque<ModelRow>,
    next_key: u64,
    appends: u64,
    appended: u64,
    duplicates: u64,
    evicted: Evicted,
}

impl Model {
    pub(crate) fn new(limits: BufferLimits) -> Self {
        let rows = VecDeque::new();
        Model {
            limits,
            rows,
            next_key: 0,
            appends: 0,
            appended: 0,
            duplicates: 0,
            evicted: Evicted::default(),
        }
    }

    fn holds(&self, id: &str) -> bool {
        self.rows.iter().any(|row| row.record.id == id)
    }

    fn bytes(&self) -> usize {
        self.rows
            .iter()
            .map(|row| expected_row_bytes(&row.record, self.token_bytes(row.append)))
            .sum()
    }

    fn token_bytes(&self, append: u64) -> usize {
        let batch = self.rows.iter().filter(|row| row.append == append);
        expected_token_bytes(batch.map(|row| &row.record))
    }

    pub(crate) fn append(&mut self, records: Vec<PairRecord>, now: i64) -> AppendOutcome {
        let mut outcome = AppendOutcome::default();
        let mut fresh: Vec<PairRecord> = Vec::new();
        for record in records {
            if self.holds(&record.id) || fresh.iter().any(|r| r.id == record.id) {
                outcome.duplicates += 1;
                continue;
            }
            fresh.push(record);
        }

        for record in fresh {
            self.rows.push_back(ModelRow {
                key: self.next_key,
                record,
                append: self.appends,
            });
            self.next_key += 1;
            outcome.appended += 1;
        }

        self.appends += 1;
        self.appended += outcome.appended as u64;
        self.duplicates += outcome.duplicates as u64;
        outcome.evicted = self.evict(now);
        outcome
    }

    fn evict(&mut self, now: i64) -> Evicted {
        let mut evicted = Evicted::default();
        if let Some(max_age) = self.limits.max_age_ms {
            let cutoff = now - max_age as i64;
            let (expired, kept) = self
                .rows
                .drain(..)
                .partition::<Vec<_>, _>(|row| row.record.ingest_time_ms < cutoff);
            self.rows = kept.into();
            evicted.expired = expired.len() as u64;
            evicted.never_trained += count_untrained(&expired);
        }

        while self.rows.len() > self.limits.max_rows || self.bytes() > self.limits.max_bytes {
            let Some(row) = self.rows.pop_front() else {
                break;
            };
            evicted.over_capacity += 1;
            evicted.never_trained += u64::from(row.record.times_trained == 0);
        }

        self.evicted.expired += evicted.expired;
        self.evicted.over_capacity += evicted.over_capacity;
        self.evicted.never_trained += evicted.never_trained;
        evicted
    }

    fn mark(&mut self, key: u64) -> bool {
        let row = self.rows.iter_mut().find(|row| row.key == key);
        row.map(|row| row.record.times_trained += 1).is_some()
    }

    fn by_id(&self, id: &str) -> Option<&ModelRow> {
        self.rows.iter().find(|row| row.record.id == id)
    }

    fn records(&self) -> Vec<PairRecord> {
        self.rows.iter().map(|row| row.record.clone()).collect()
    }
}

fn count_untrained(rows: &[ModelRow]) -> u64 {
    rows.iter()
        .filter(|row| row.record.times_trained == 0)
        .count() as u64
}

/// Drives a buffer and a model through the same operations.
pub(crate) struct Harness {
    pub(crate) buffer: RollingBuffer,
    pub(crate) model: Model,
    pub(crate) now: i64,
    /// Every handle seen, with the model key it must name.
    handles: HashMap<RowHandle, u64>,
    seen: Vec<RowHandle>,
}

impl Harness {
    pub(crate) fn new(limits: BufferLimits) -> Self {
        Harness {
            buffer: RollingBuffer::new(limits),
            model: Model::new(limits),
            now: 1_000,
            handles: HashMap::new(),
            seen: Vec::new(),
        }
    }

    pub(crate) fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Append { advance, records } => self.append(advance, records),
            Op::Sample {
                n,
                strategy,
                seed,
                mark,
            } => self.sample(n, strategy, seed, &mark),
            Op::MarkOld { picks } => {
                if self.seen.is_empty() {
                    return Ok(());
                }
                let handles: Vec<_> = picks.iter().map(|i| *i.get(&self.seen)).collect();
                self.mark(&handles)
            }
            Op::Evict { advance } => {
                self.now += advance;
                let evicted = self.buffer.evict(self.now).expect("evict");
                prop_assert_eq!(evicted, self.model.evict(self.now));
                Ok(())
            }
            Op::SetLimits { limits } => {
                let evicted = self
                    .buffer
                    .set_limits(limits, self.now)
                    .expect("set limits");
                self.model.limits = limits;
                prop_assert_eq!(evicted, self.model.evict(self.now));
                Ok(())
            }
        }
    }

    fn append(&mut self, advance: i64, mut records: Vec<PairRecord>) -> Result<(), TestCaseError> {
        self.now += advance;
        for record in &mut records {
            record.ingest_time_ms = self.now - record.ingest_time_ms;
        }

        let outcome = self
            .buffer
            .append(records.clone(), self.now)
            .expect("append");
        prop_assert_eq!(outcome, self.model.append(records, self.now));
        Ok(())
    }

    fn sample(
        &mut self,
        n: usize,
        strategy: SampleStrategy,
        seed: u64,
        mark: &[bool],
    ) -> Result<(), TestCaseError> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let sampled = self.buffer.sample(n, strategy, &mut rng).expect("sample");
        prop_assert_eq!(sampled.len(), n.min(self.model.rows.len()));

        let mut keys = Vec::new();
        for pair in &sampled {
            // The pair must be exactly what was appended under its id, both responses included.
            let row = self.model.by_id(&pair.pair.id);
            let row = row.ok_or_else(|| TestCaseError::fail("sampled an id not held"))?;
            prop_assert_eq!(&pair.pair, &row.record);

            let key = *self.handles.entry(pair.handle).or_insert(row.key);
            prop_assert_eq!(key, row.key, "one handle named two rows");
            keys.push(key);
            self.seen.push(pair.handle);
        }
        keys.sort_unstable();
        keys.dedup();
        prop_assert_eq!(keys.len(), sampled.len(), "a row came twice in one sample");

        let chosen = sampled
            .iter()
            .zip(mark)
            .filter(|(_, &m)| m)
            .map(|(p, _)| p.handle);
        self.mark(&chosen.collect::<Vec<_>>())
    }

    fn mark(&mut self, handles: &[RowHandle]) -> Result<(), TestCaseError> {
        let expected = handles
            .iter()
            .filter(|h| self.model.mark(self.handles[*h]))
            .count();
        prop_assert_eq!(self.buffer.mark_trained(handles), expected);
        Ok(())
    }

    pub(crate) fn check(&self) -> Result<(), TestCaseError> {
        let (buffer, model) = (&self.buffer, &self.model);
        let limits = buffer.limits();
        prop_assert_eq!(buffer.len(), model.rows.len());
        prop_assert_eq!(buffer.bytes(), model.bytes());
        prop_assert!(buffer.len() <= limits.max_rows);
        prop_assert!(buffer.bytes() <= limits.max_bytes);

        let ids: Vec<&str> = buffer.ids().collect();
        let model_ids: Vec<&str> = model.rows.iter().map(|r| r.record.id.as_str()).collect();
        prop_assert_eq!(ids, model_ids);
        for id in (0..ID_POOL).map(|i| format!("id-{i}")) {
            prop_assert_eq!(buffer.contains_id(&id), model.holds(&id));
        }

        let stats = buffer.stats();
        prop_assert_eq!(stats.evicted, model.evicted);
        prop_assert_eq!(stats.appended, model.appended);
        prop_assert_eq!(stats.duplicates, model.duplicates);
        prop_assert_eq!((stats.rows, stats.bytes), (model.rows.len(), model.bytes()));

        let oldest = model
            .rows
            .iter()
            .map(|r| r.record.event_time_ms.unwrap_or(r.record.ingest_time_ms))
            .min();
        let age = oldest.map(|t| u64::try_from(self.now - t).unwrap_or(0));
        prop_assert_eq!(buffer.oldest_event_age(self.now), age);

        prop_assert_eq!(buffer.to_records().expect("decode"), model.records());
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn buffer_matches_the_model(limits in limits(), ops in vec(op(), 0..40)) {
        let mut harness = Harness::new(limits);
        for op in ops {
            harness.apply(op)?;
            harness.check()?;
        }
    }

    #[test]
    fn sampling_at_least_len_returns_every_row_once(
        records in vec(record(), 0..30),
        strategy in strategy(),
        extra in 0..5_usize,
        seed in any::<u64>(),
    ) {
        let limits = BufferLimits { max_rows: 100, max_bytes: usize::MAX, max_age_ms: None };
        let mut buffer = RollingBuffer::new(limits);
        buffer.append(records, 0).expect("append");

        let mut rng = SmallRng::seed_from_u64(seed);
        let sampled = buffer.sample(buffer.len() + extra, strategy, &mut rng).expect("sample");
        let mut ids: Vec<String> = sampled.into_iter().map(|s| s.pair.id).collect();
        ids.sort();
        let mut held: Vec<String> = buffer.ids().map(str::to_owned).collect();
        held.sort();
        prop_assert_eq!(ids, held);
    }
}

#[test]
fn handles_to_evicted_rows_are_ignored() {
    let limits = BufferLimits {
        max_rows: 2,
        max_bytes: usize::MAX,
        max_age_ms: None,
    };
    let mut buffer = RollingBuffer::new(limits);
    buffer
        .append(vec![plain_record("a", 0), plain_record("b", 0)], 0)
        .expect("append");
    let mut rng = SmallRng::seed_from_u64(1);
    let sampled = buffer
        .sample(2, SampleStrategy::Uniform, &mut rng)
        .expect("sample");
    let handles: Vec<_> = sampled.iter().map(|s| s.handle).collect();

    // "c" pushes "a" out; "a"'s handle must not touch "c", which reuses nothing.
    let outcome = buffer
        .append(vec![plain_record("c", 0)], 0)
        .expect("append");
    assert_eq!(outcome.evicted.never_trained, 1);
    assert_eq!(buffer.mark_trained(&handles), 1);

    let trained: Vec<_> = buffer
        .to_records()
        .expect("decode")
        .iter()
        .map(|r| r.times_trained)
        .collect();
    assert_eq!(trained, [1, 0]);
}

#[test]
fn expiry_reaches_rows_behind_younger_ones() {
    let limits = BufferLimits {
        max_rows: 10,
        max_bytes: usize::MAX,
        max_age_ms: Some(100),
    };
    let mut buffer = RollingBuffer::new(limits);
    let records = vec![
        plain_record("young", 950),
        plain_record("old", 850),
        plain_record("mid", 920),
    ];
    buffer.append(records, 1_000).expect("append");

    let ids: Vec<_> = buffer.ids().collect();
    assert_eq!(ids, ["young", "mid"]);
    assert_eq!(buffer.stats().evicted.expired, 1);
}

#[test]
fn bytes_follow_arrow_buffers() {
    // The charge per row must add up to Arrow's own value and offset buffers, corrected only
    // by what the documented rule sets aside.
    let records: Vec<_> = (0..13)
        .map(|i| {
            let mut r = plain_record(&format!("id-{i}"), 0);
            r.segment = (i % 2 == 0).then(|| "segment".repeat(i));
            r.scores_b = vec![("ok".to_owned(), 1.0); i % 3];
            r
        })
        .collect();
    let mut buffer = RollingBuffer::new(BufferLimits {
        max_rows: 100,
        max_bytes: usize::MAX,
        max_age_ms: None,
    });
    buffer.append(records, 0).expect("append");

    let batch = buffer.batches().next().expect("one batch");
    let arrow_bytes: usize = batch
        .columns()
        .iter()
        .map(|c| buffer_len(&c.to_data()))
        .sum();
    let n = batch.num_rows();
    // Rule minus times_trained (4) and the two booleans' bytes, plus the booleans' bits, plus
    // the leading offset of 7 strings, 3 lists, 2 maps and the maps' 2 key columns.
    let expected = buffer.bytes() - 4 * n - 2 * n + 2 * n.div_ceil(8) + 4 * (7 + 3 + 2 + 2);
    assert_eq!(arrow_bytes, expected);
}

fn buffer_len(data: &arrow::array::ArrayData) -> usize {
    let own: usize = data.buffers().iter().map(|b| b.len()).sum();
    own + data.child_data().iter().map(buffer_len).sum::<usize>()
}

fn token_item_type(batch: &arrow::array::RecordBatch) -> arrow::datatypes::DataType {
    let schema = batch.schema();
    let field = schema.field_with_name("prompt_ids").expect("prompt_ids");
    match field.data_type() {
        arrow::datatypes::DataType::List(item) => item.data_type().clone(),
        other => panic!("prompt_ids is {other:?}"),
    }
}

#[test]
fn ids_are_stored_16_bits_wide_until_one_needs_more() {
    use arrow::datatypes::DataType;

    let limits = BufferLimits {
        max_rows: 100,
        max_bytes: usize::MAX,
        max_age_ms: None,
    };
    let mut buffer = RollingBuffer::new(limits);
    let mut wide = plain_record("wide", 0);
    wide.response_b_ids = vec![65_535, 65_536];
    let narrow = vec![plain_record("a", 0), plain_record("b", 0)];
    buffer.append(narrow.clone(), 0).expect("append narrow");
    buffer
        .append(vec![wide.clone(), plain_record("c", 0)], 0)
        .expect("append wide");

    let batches: Vec<_> = buffer.batches().collect();
    assert_eq!(token_item_type(batches[0]), DataType::UInt16);
    assert_eq!(token_item_type(batches[1]), DataType::UInt32);
    // plain_record holds 6 ids, `wide` 7: 2 bytes each in the first batch, 4 in the second;
    // `base` is a one-letter id's row without ids, and "wide" has 3 letters more.
    let base = expected_row_bytes(&plain_record("a", 0), 0);
    let expected = 2 * (base + 2 * 6) + (base + 3 + 4 * 7) + (base + 4 * 6);
    assert_eq!(buffer.bytes(), expected);
    let ids: Vec<_> = buffer.to_records().expect("decode");
    assert_eq!(ids[2].response_b_ids, vec![65_535, 65_536]);
    assert_eq!(ids[0].prompt_ids, narrow[0].prompt_ids);
}

#[test]
fn a_batch_narrows_once_its_wide_rows_are_evicted() {
    use arrow::datatypes::DataType;

    // One row with an id above 16 bits, then two that fit.
    let records = || {
        let mut wide = plain_record("wide", 0);
        wide.prompt_ids = vec![100_000];
        vec![wide, plain_record("b", 0), plain_record("c", 0)]
    };
    let base = expected_row_bytes(&plain_record("b", 0), 0);
    let mut buffer = RollingBuffer::new(BufferLimits {
        max_rows: 2,
        max_bytes: usize::MAX,
        max_age_ms: None,
    });
    buffer.append(records(), 0).expect("append");

    let ids: Vec<_> = buffer.ids().collect();
    assert_eq!(ids, ["b", "c"]);
    let batch = buffer.batches().next().expect("one batch");
    assert_eq!(token_item_type(batch), DataType::UInt16);
    assert_eq!(buffer.bytes(), 2 * (base + 2 * 6));
    assert_eq!(buffer.stats().bytes, buffer.bytes());

    // The bytes freed by narrowing count: a byte limit that two wide rows would exceed holds
    // them once the batch is narrow.
    let mut buffer = RollingBuffer::new(BufferLimits {
        max_rows: 100,
        max_bytes: 2 * (base + 2 * 6),
        max_age_ms: None,
    });
    let outcome = buffer.append(records(), 0).expect("append");
    assert_eq!(outcome.evicted.over_capacity, 1, "only the wide row goes");
    assert_eq!(buffer.len(), 2);
}
