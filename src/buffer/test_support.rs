//! Record generators and an independent byte count, shared by the buffer's tests.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use super::{PairRecord, Preference};

/// Ids are drawn from `id-0` … `id-{ID_POOL - 1}` so that duplicates happen.
pub(crate) const ID_POOL: u32 = 40;

/// The bytes a record should be charged, computed from the record alone, following the
/// documented rule rather than the Arrow code: 4-byte offsets for the 7 strings, 3 token
/// lists and 2 score maps; fixed widths partition 4, offset 8, two timestamps 8 each,
/// two truncation flags 1 each, preference 1, confidence 4, two policy versions 8 each,
/// times_trained 4;
/// then string bytes, `token_bytes` per token (the width of the record's batch), and
/// 4 + 8 + name bytes per score.
pub(crate) fn expected_row_bytes(r: &PairRecord, token_bytes: usize) -> usize {
    let offsets = 4 * (7 + 3 + 2);
    let fixed = 4 + 8 + 8 + 8 + 1 + 1 + 1 + 4 + 8 + 8 + 4;
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let strings = r.id.len()
        + r.topic.len()
        + text(&r.segment)
        + text(&r.source)
        + text(&r.prompt_text)
        + text(&r.response_a_text)
        + text(&r.response_b_text);
    let tokens = r.prompt_ids.len() + r.response_a_ids.len() + r.response_b_ids.len();
    let scores = |s: &[(String, f64)]| s.iter().map(|(name, _)| 12 + name.len()).sum::<usize>();

    offsets + fixed + strings + token_bytes * tokens + scores(&r.scores_a) + scores(&r.scores_b)
}

/// Bytes per token id of a batch holding `records`, decided from the ids alone: 2 when all
/// are below 65,536.
pub(crate) fn expected_token_bytes<'a>(records: impl IntoIterator<Item = &'a PairRecord>) -> usize {
    let small = |ids: &[u32]| ids.iter().all(|&id| id < 65_536);
    let narrow = records
        .into_iter()
        .all(|r| small(&r.prompt_ids) && small(&r.response_a_ids) && small(&r.response_b_ids));
    if narrow {
        2
    } else {
        4
    }
}

/// Mostly ids of a vocabulary below 65,536 (so that batches of 16-bit ids happen), now and
/// then any 32-bit id.
fn tokens() -> impl Strategy<Value = Vec<u32>> {
    prop_oneof![
        4 => vec(0..65_536_u32, 0..6),
        1 => vec(any::<u32>(), 0..6),
    ]
}

fn scores() -> impl Strategy<Value = Vec<(String, f64)>> {
    let name = prop::sample::select(vec!["helpful", "harmless", "honest", "naïve"]);
    vec((name.prop_map(str::to_owned), -1.0e6..1.0e6_f64), 0..3)
}

fn text() -> impl Strategy<Value = Option<String>> {
    option::of("[a-zé ]{0,6}")
}

fn preference() -> impl Strategy<Value = Option<Preference>> {
    option::of(prop::sample::select(vec![
        Preference::A,
        Preference::B,
        Preference::Tie,
    ]))
}

/// A record whose `ingest_time_ms` holds a lag of 0..300 ms for the test to subtract from
/// its clock.
pub(crate) fn record() -> impl Strategy<Value = PairRecord> {
    let keys = (
        0..ID_POOL,
        prop::sample::select(vec!["feedback", "feedback-eu"]),
        0..4_i32,
        0..1_000_i64,
        option::of(0..10_000_i64),
        0..300_i64,
    );
    let tokens = (tokens(), tokens(), tokens(), any::<(bool, bool)>());
    let labels = (preference(), option::of(0.0..1.0_f32), scores(), scores());
    let extras = (
        option::of(any::<u64>()),
        option::of(any::<u64>()),
        text(),
        text(),
    );
    let texts = (
        text(),
        text(),
        text(),
        prop_oneof![3 => Just(0_u32), 1 => 1..4_u32],
    );

    (keys, tokens, labels, extras, texts).prop_map(|(k, t, l, e, x)| PairRecord {
        id: format!("id-{}", k.0),
        topic: k.1.to_owned(),
        partition: k.2,
        offset: k.3,
        event_time_ms: k.4,
        ingest_time_ms: k.5,
        prompt_ids: t.0,
        response_a_ids: t.1,
        response_b_ids: t.2,
        truncated_a: t.3 .0,
        truncated_b: t.3 .1,
        preference: l.0,
        confidence: l.1,
        scores_a: l.2,
        scores_b: l.3,
        policy_version_a: e.0,
        policy_version_b: e.1,
        segment: e.2,
        source: e.3,
        prompt_text: x.0,
        response_a_text: x.1,
        response_b_text: x.2,
        times_trained: x.3,
    })
}

/// A record with fixed contents, for unit tests.
pub(crate) fn plain_record(id: &str, ingest_time_ms: i64) -> PairRecord {
    PairRecord {
        id: id.to_owned(),
        topic: "feedback".to_owned(),
        ingest_time_ms,
        prompt_ids: vec![1, 2, 3],
        response_a_ids: vec![4, 5],
        response_b_ids: vec![6],
        preference: Some(Preference::B),
        scores_a: vec![("helpful".to_owned(), 0.5)],
        ..PairRecord::default()
    }
}
