//! Snapshot round trips, and damaged files that must give errors rather than panics.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use proptest::collection::vec;
use proptest::prelude::*;
use rand::SeedableRng;

use super::model_tests::{limits, op, Harness};
use super::test_support::{plain_record, record};
use super::{read_snapshot, BufferLimits, DedupWindow, RollingBuffer, SnapshotError, SnapshotMeta};

fn meta() -> impl Strategy<Value = SnapshotMeta> {
    let offsets = vec((("[a-z]{1,5}", 0..8_i32), any::<i64>()), 0..6);
    let dedup = (0..20_usize, vec("[a-z0-9-]{0,8}", 0..40));
    let counters = vec(("[a-z_]{1,8}", any::<u64>()), 0..4);

    (offsets, dedup, counters).prop_map(|(offsets, (capacity, ids), counters)| {
        let mut dedup = DedupWindow::new(capacity);
        for id in &ids {
            dedup.insert(id);
        }
        SnapshotMeta {
            next_offsets: offsets.into_iter().collect(),
            dedup,
            counters: counters.into_iter().collect(),
        }
    })
}

fn assert_same(restored: &RollingBuffer, original: &RollingBuffer) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        restored.to_records().expect("decode"),
        original.to_records().expect("decode")
    );
    prop_assert_eq!(restored.stats(), original.stats());
    prop_assert_eq!(restored.limits(), original.limits());
    prop_assert_eq!(restored.batches().count(), original.batches().count());
    let schemas_match = restored
        .batches()
        .zip(original.batches())
        .all(|(r, o)| r.schema() == o.schema());
    prop_assert!(schemas_match);
    Ok(())
}

/// A buffer of a few rows, some trained, and the path of its snapshot.
fn small_snapshot(dir: &Path) -> (RollingBuffer, SnapshotMeta, Vec<u8>) {
    let limits = BufferLimits {
        max_rows: 50,
        max_bytes: usize::MAX,
        max_age_ms: Some(10_000),
    };
    let mut buffer = RollingBuffer::new(limits);
    for batch in 0..3 {
        let records = (0..4).map(|i| plain_record(&format!("id-{batch}-{i}"), 100 * batch));
        buffer.append(records.collect(), 500).expect("append");
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let sampled = buffer
        .sample(5, super::SampleStrategy::Uniform, &mut rng)
        .expect("sample");
    buffer.mark_trained(&sampled.iter().map(|s| s.handle).collect::<Vec<_>>());

    let mut meta = SnapshotMeta::default();
    meta.next_offsets.insert(("feedback".to_owned(), 3), 42);
    meta.dedup = DedupWindow::new(8);
    meta.dedup.insert("id-0-0");
    meta.counters.insert("consumed".to_owned(), 12);

    let path = dir.join("snapshot.arrow");
    buffer.write_snapshot(&path, &meta).expect("write");
    let bytes = fs::read(&path).expect("read back");
    (buffer, meta, bytes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip_restores_everything(
        limits in limits(),
        ops in vec(op(), 0..25),
        meta in meta(),
        more in vec(record(), 0..6),
    ) {
        let mut harness = Harness::new(limits);
        for op in ops {
            harness.apply(op)?;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("buffer.arrow");
        harness.buffer.write_snapshot(&path, &meta).expect("write");
        prop_assert!(!dir.path().join("buffer.arrow.tmp").exists());

        let (mut restored, restored_meta) = read_snapshot(&path).expect("read");
        assert_same(&restored, &harness.buffer)?;
        prop_assert_eq!(&restored_meta, &meta);
        prop_assert!(restored_meta.dedup.iter().eq(meta.dedup.iter()));

        // The restored buffer goes on to behave exactly like the original.
        let now = harness.now + 10;
        let a = restored.append(more.clone(), now).expect("append");
        let b = harness.buffer.append(more, now).expect("append");
        prop_assert_eq!(a, b);
        assert_same(&restored, &harness.buffer)?;
    }

    #[test]
    fn truncated_files_are_corrupt(cut in any::<prop::sample::Index>()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, _, bytes) = small_snapshot(dir.path());
        let path = dir.path().join("cut.arrow");
        fs::write(&path, &bytes[..cut.index(bytes.len())]).expect("write");

        let error = read_snapshot(&path).expect_err("a truncated file must not read");
        prop_assert!(error.is_corrupt(), "{error:?}");
    }

    #[test]
    fn a_flipped_byte_fails_or_changes_nothing(
        at in any::<prop::sample::Index>(),
        mask in 1..=255_u8,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (buffer, meta, mut bytes) = small_snapshot(dir.path());
        let at = at.index(bytes.len());
        bytes[at] ^= mask;
        let path = dir.path().join("flipped.arrow");
        fs::write(&path, &bytes).expect("write");

        // Flatbuffer padding in the footer is read by no one, so a flip there is harmless;
        // anywhere else it must be caught.
        match read_snapshot(&path) {
            Ok((restored, restored_meta)) => {
                assert_same(&restored, &buffer)?;
                prop_assert_eq!(restored_meta, meta);
            }
            Err(error) => prop_assert!(error.is_corrupt(), "{error:?}"),
        }
    }

    #[test]
    fn garbage_is_corrupt(mut bytes in vec(any::<u8>(), 0..400), arrow_tail in any::<bool>()) {
        if arrow_tail {
            bytes.extend_from_slice(&[16, 0, 0, 0]);
            bytes.extend_from_slice(b"ARROW1");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("garbage.arrow");
        fs::write(&path, &bytes).expect("write");

        let error = read_snapshot(&path).expect_err("garbage must not read");
        prop_assert!(error.is_corrupt(), "{error:?}");
    }
}

#[test]
fn truncations_across_the_file_and_every_one_in_the_footer_are_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, _, bytes) = small_snapshot(dir.path());
    let path = dir.path().join("cut.arrow");
    // Each write costs milliseconds here, so the body is cut at a stride; the footer, where
    // the reader starts, is cut at every byte.
    let len = bytes.len();
    let footer_len = u32::from_le_bytes([0, 1, 2, 3].map(|i| bytes[len - 10 + i])) as usize;
    let footer_start = len - 10 - footer_len;
    let cuts = (0..footer_start).step_by(37).chain(footer_start..len);
    for len in cuts {
        fs::write(&path, &bytes[..len]).expect("write");
        let error = read_snapshot(&path).expect_err("a truncated file must not read");
        assert!(error.is_corrupt(), "cut at {len}: {error:?}");
    }
}

#[test]
fn an_arrow_file_without_our_metadata_is_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("foreign.arrow");
    let mut buffer = RollingBuffer::new(BufferLimits {
        max_rows: 10,
        max_bytes: usize::MAX,
        max_age_ms: None,
    });
    buffer
        .append(vec![plain_record("a", 0)], 0)
        .expect("append");

    let file = fs::File::create(&path).expect("create");
    let batch = buffer.batches().next().expect("a batch").clone();
    let mut writer =
        arrow::ipc::writer::FileWriter::try_new(file, &batch.schema()).expect("writer");
    writer.write(&batch).expect("write");
    writer.finish().expect("finish");

    let error = read_snapshot(&path).expect_err("not a snapshot");
    assert!(matches!(error, SnapshotError::Corrupt { .. }), "{error:?}");
}

#[test]
fn a_missing_file_is_an_io_error_not_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let error = read_snapshot(dir.path().join("absent.arrow")).expect_err("no file");
    assert!(
        matches!(error, SnapshotError::Io { op: "open", .. }),
        "{error:?}"
    );
    assert!(!error.is_corrupt());
}

#[test]
fn writing_into_a_missing_directory_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("no-such-dir").join("snapshot.arrow");
    let buffer = RollingBuffer::new(BufferLimits {
        max_rows: 1,
        max_bytes: 1,
        max_age_ms: None,
    });

    let error = buffer
        .write_snapshot(&path, &SnapshotMeta::default())
        .expect_err("no dir");
    assert!(
        matches!(error, SnapshotError::Io { op: "create", .. }),
        "{error:?}"
    );
}

#[test]
fn rewriting_replaces_the_old_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut buffer, meta, _) = small_snapshot(dir.path());
    let path = dir.path().join("snapshot.arrow");
    // A stale temporary file from a crash must not get in the way.
    fs::write(dir.path().join("snapshot.arrow.tmp"), b"half a snapshot").expect("write");

    buffer
        .append(vec![plain_record("late", 600)], 600)
        .expect("append");
    buffer.write_snapshot(&path, &meta).expect("rewrite");

    let (restored, _) = read_snapshot(&path).expect("read");
    assert!(restored.contains_id("late"));
    assert!(!dir.path().join("snapshot.arrow.tmp").exists());
}

#[test]
fn an_empty_buffer_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("empty.arrow");
    let limits = BufferLimits {
        max_rows: 3,
        max_bytes: 99,
        max_age_ms: Some(7),
    };
    let meta = SnapshotMeta {
        counters: BTreeMap::from([("x".to_owned(), 1)]),
        ..Default::default()
    };
    RollingBuffer::new(limits)
        .write_snapshot(&path, &meta)
        .expect("write");

    let (restored, restored_meta) = read_snapshot(&path).expect("read");
    assert!(restored.is_empty());
    assert_eq!(restored.limits(), limits);
    assert_eq!(restored_meta, meta);
}

#[test]
fn snapshots_store_ids_32_bits_wide_and_restore_each_batch_at_its_width() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("widths.arrow");
    let mut buffer = RollingBuffer::new(BufferLimits {
        max_rows: 10,
        max_bytes: usize::MAX,
        max_age_ms: None,
    });
    let mut wide = plain_record("wide", 0);
    wide.response_a_ids = vec![70_000, 3];
    buffer
        .append(vec![plain_record("a", 0)], 0)
        .expect("append");
    buffer.append(vec![wide], 0).expect("append");
    buffer
        .write_snapshot(&path, &SnapshotMeta::default())
        .expect("write");

    // The file holds one schema, the canonical one, whatever the batches held in memory.
    let file = fs::File::open(&path).expect("open");
    let reader = arrow::ipc::reader::FileReader::try_new(file, None).expect("an Arrow file");
    let file_ids = reader.schema().field_with_name("prompt_ids").cloned();
    let canonical = super::pair_schema().field_with_name("prompt_ids").cloned();
    assert_eq!(file_ids.expect("ids"), canonical.expect("ids"));

    let (restored, _) = read_snapshot(&path).expect("read");
    let widths: Vec<_> = restored.batches().map(|b| b.schema()).collect();
    assert_eq!(widths[0], super::pair_schema_with(super::TokenWidth::U16));
    assert_eq!(widths[1], super::pair_schema_with(super::TokenWidth::U32));
    assert_eq!(restored.bytes(), buffer.bytes());
    assert_eq!(
        restored.to_records().expect("decode"),
        buffer.to_records().expect("decode")
    );
}
