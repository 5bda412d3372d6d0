//! `rebeld replay --segment` against a real broker, and `rebeld eval --by-segment`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use rdkafka::Message;
use rebeld::event::hh_rlhf::hh_to_event;
use rebeld::event::{parse_event, EventLimits};
use rebeld::replay::open_lines;
use rebeld::train::gates::is_held_out;
use support::{hh_file, wait_for, Tansu, BINARY, TINY_MODEL, TOPIC};

fn helpful_file() -> PathBuf {
    hh_file().with_file_name("helpful-base-test.jsonl.gz")
}

/// The ids of a HH-RLHF file's usable lines, in file order, computed by the library alone.
fn usable_ids(path: &Path) -> Vec<String> {
    open_lines(path)
        .expect("HH file")
        .map_while(Result::ok)
        .filter_map(|line| hh_to_event(&line).ok())
        .map(|event| {
            let bytes = event.to_string().into_bytes();
            parse_event(Some(&bytes), &EventLimits::default())
                .expect("valid event")
                .id
        })
        .collect()
}

fn replay(bootstrap: &str, args: &[&str]) -> Output {
    let output = Command::new(BINARY)
        .args([
            "replay",
            "--format",
            "hh-rlhf",
            "--quiet",
            "--brokers",
            bootstrap,
        ])
        .args(args)
        .output()
        .expect("run rebeld replay");
    assert!(output.status.success(), "replay failed: {output:?}");
    output
}

/// The `segment NAME: N events` lines of a replay's report.
fn reported_counts(output: &Output) -> BTreeMap<String, u64> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.trim().strip_prefix("segment "))
        .filter_map(|rest| {
            let (name, count) = rest.split_once(": ")?;
            Some((
                name.to_owned(),
                count.strip_suffix(" events")?.parse().ok()?,
            ))
        })
        .collect()
}

/// One event as it arrived.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Arrival {
    id: String,
    segment: String,
    partition: i32,
    offset: i64,
}

/// Every event on the topic, once `expected` have arrived.
fn arrived(consumer: &BaseConsumer, expected: usize) -> Vec<Arrival> {
    let mut events = Vec::new();
    wait_for("the replayed events", Duration::from_secs(60), || {
        while let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let value: serde_json::Value =
                serde_json::from_slice(message.payload().expect("a value")).expect("JSON");
            let text = |key: &str| value[key].as_str().expect(key).to_owned();
            events.push(Arrival {
                id: text("id"),
                segment: text("segment"),
                partition: message.partition(),
                offset: message.offset(),
            });
        }
        events.len() >= expected
    });
    events
}

fn count(events: &[Arrival], segment: &str) -> usize {
    events.iter().filter(|e| e.segment == segment).count()
}

/// The mean place of a segment's events in the order they were sent, from 0 (first) to 1
/// (last), judged within each partition (where the broker keeps that order).
fn mean_place(events: &[Arrival], segment: &str) -> f64 {
    let mut places = Vec::new();
    for partition in 0..3 {
        let mut sent: Vec<&Arrival> = events.iter().filter(|e| e.partition == partition).collect();
        sent.sort_by_key(|e| e.offset);
        let last = (sent.len().max(2) - 1) as f64;
        places.extend(
            sent.iter()
                .enumerate()
                .filter(|(_, e)| e.segment == segment)
                .map(|(rank, _)| rank as f64 / last),
        );
    }
    places.iter().sum::<f64>() / places.len() as f64
}

#[test]
fn segments_arrive_tagged_in_scheduled_shares_with_their_untagged_ids() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let (helpful, harmless) = (helpful_file(), hh_file());
    let segments = [
        format!("helpful={}", helpful.display()),
        format!("harmless={}", harmless.display()),
    ];
    let args = [
        "--segment",
        &segments[0],
        "--segment",
        &segments[1],
        "--schedule",
        "helpful:1-0,harmless:0-1",
        "--limit",
        "400",
        "--seed",
        "5",
    ];

    let first = replay(&broker.bootstrap, &args);
    let counts = reported_counts(&first);
    let consumer = support::read_from_start(&broker.bootstrap, "segment-reader", TOPIC);
    let events = arrived(&consumer, 400);
    assert_eq!(events.len(), 400);
    assert_eq!(count(&events, "helpful") + count(&events, "harmless"), 400);
    assert_eq!(
        counts["helpful"],
        count(&events, "helpful") as u64,
        "{counts:?}"
    );
    assert_eq!(
        counts["harmless"],
        count(&events, "harmless") as u64,
        "{counts:?}"
    );

    // The helpful share falls linearly from 1 to 0: 200 expected, a variance of at most
    // 400/4, so five standard deviations are at most 50.
    let drawn = count(&events, "helpful") as f64;
    assert!(
        (drawn - 200.0).abs() <= 50.0,
        "{drawn} helpful events of 400"
    );
    // Helpful events come early (a mean place of 1/3 under this schedule), harmless ones late
    // (2/3); equal shares throughout would put both near 1/2.
    let (early, late) = (
        mean_place(&events, "helpful"),
        mean_place(&events, "harmless"),
    );
    assert!(
        early < 0.42 && late > 0.58,
        "helpful at {early}, harmless at {late}"
    );

    // Each segment is read in file order, and a tag leaves the id of the untagged line.
    for (segment, path) in [("helpful", &helpful), ("harmless", &harmless)] {
        let sent: BTreeSet<&str> = events
            .iter()
            .filter(|e| e.segment == segment)
            .map(|e| e.id.as_str())
            .collect();
        let expected = usable_ids(path);
        let n = count(&events, segment);
        let expected: BTreeSet<&str> = expected[..n].iter().map(|s| &s[..]).collect();
        assert_eq!(sent, expected, "{segment}");
    }

    // The same seed sends the same events again: every id arrives twice, with one tag.
    let again = replay(&broker.bootstrap, &args);
    assert_eq!(reported_counts(&again), counts);
    let id_and_tag = |events: Vec<Arrival>| {
        let mut pairs: Vec<(String, String)> =
            events.into_iter().map(|e| (e.id, e.segment)).collect();
        pairs.sort();
        pairs
    };
    let more = arrived(&consumer, 400);
    assert_eq!(id_and_tag(events), id_and_tag(more));
}

#[test]
fn a_segment_that_runs_out_ends_the_run_unless_it_loops() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let short = dir.path().join("short.jsonl");
    let lines: Vec<String> = usable_lines(&helpful_file()).take(3).collect();
    std::fs::write(&short, lines.join("\n")).expect("write");
    let segments = [
        format!("short={}", short.display()),
        format!("harmless={}", hh_file().display()),
    ];
    let base = [
        "--segment",
        &segments[0],
        "--segment",
        &segments[1],
        "--limit",
        "60",
    ];

    let ended = replay(&broker.bootstrap, &base);
    let report = String::from_utf8_lossy(&ended.stdout);
    assert!(
        report.contains("segment short ran out of lines after"),
        "{report}"
    );
    let counts = reported_counts(&ended);
    assert_eq!(counts["short"], 3, "{report}");
    assert!(counts["harmless"] < 57, "{report}");

    let looped = replay(&broker.bootstrap, &[&base[..], &["--loop"]].concat());
    let counts = reported_counts(&looped);
    assert_eq!(counts["short"] + counts["harmless"], 60, "{counts:?}");
    assert!(counts["short"] > 3, "{counts:?}");
}

/// The usable lines of a HH-RLHF file, as they are.
fn usable_lines(path: &Path) -> impl Iterator<Item = String> {
    open_lines(path)
        .expect("HH file")
        .map_while(Result::ok)
        .filter(|line| hh_to_event(line).is_ok())
}

fn eval(args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(["eval", "--model", TINY_MODEL, "--reference", TINY_MODEL])
        .args(["--device", "cpu", "--by-segment"])
        .args(args)
        .output()
        .expect("run rebeld eval")
}

/// Pairs of the held-out slice of 5% of a file, computed by the library alone.
fn held_out_pairs(path: &Path) -> usize {
    usable_ids(path)
        .iter()
        .filter(|id| is_held_out(id, 0.05))
        .count()
}

#[test]
fn eval_by_segment_of_a_model_against_itself_is_one_half_in_every_segment() {
    let segments = [
        format!("helpful={}", helpful_file().display()),
        format!("harmless={}", hh_file().display()),
    ];
    let out = eval(&[
        "--segment",
        &segments[0],
        "--segment",
        &segments[1],
        "--format",
        "hh-rlhf",
        "--held-out",
        "0.05",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");

    let mut total = 0;
    for (i, (name, path)) in [("helpful", helpful_file()), ("harmless", hh_file())]
        .iter()
        .enumerate()
    {
        let segment = &report["segments"][i];
        let pairs = held_out_pairs(path);
        assert!(pairs > 20, "{name}: {pairs}");
        assert_eq!(segment["segment"], *name);
        assert_eq!(segment["pairs"], pairs, "{name}");
        assert_eq!(segment["accuracy"], 0.5, "{name}: every pair is a tie");
        assert_eq!(segment["mean_margin"], 0.0, "{name}");
        total += pairs;
    }
    assert_eq!(report["overall"]["pairs"], total);
    assert_eq!(report["overall"]["accuracy"], 0.5);
    // Equal accuracies and margins: the first listed is the worst.
    assert_eq!(report["worst"]["segment"], "helpful");
}

#[test]
fn eval_by_segment_reads_the_tags_of_one_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("tagged.jsonl");
    let tagged: Vec<String> = [("helpful", helpful_file()), ("harmless", hh_file())]
        .iter()
        .flat_map(|(name, path)| {
            usable_lines(path).take(5).map(move |line| {
                rebeld::replay::tagged_event_value(
                    rebeld::replay::ReplayFormat::HhRlhf,
                    &line,
                    name,
                )
                .expect("tagged")
            })
        })
        .chain(["{\"prompt\": \"untagged\", \"chosen\": \"a\", \"rejected\": \"b\"}".into()])
        .collect();
    std::fs::write(&data, tagged.join("\n")).expect("write");

    let out = eval(&["--data", data.to_str().expect("path")]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    let expected = [
        ["helpful", "5", "0", "0.500000", "0.000000"],
        ["harmless", "5", "0", "0.500000", "0.000000"],
        ["other", "1", "0", "0.500000", "0.000000"],
        ["overall", "11", "0", "0.500000", "0.000000"],
    ];
    assert_eq!(rows.len(), 6, "{table}");
    for (row, want) in rows[1..5].iter().zip(expected) {
        assert_eq!(row[..], want[..], "{table}");
    }
    assert_eq!(rows[5], ["worst", "helpful"], "{table}");
}

#[test]
fn bad_segments_and_schedules_exit_2_naming_the_flag() {
    let helpful = format!("helpful={}", helpful_file().display());
    let harmless = format!("harmless={}", hh_file().display());
    let cases: [(&[&str], &str); 5] = [
        (
            &["--segment", "helpful=/nonexistent.jsonl"],
            "--segment helpful=",
        ),
        (
            &["--segment", &helpful, "--schedule", "helpful:1,chatty:0"],
            "--schedule names segment \"chatty\"",
        ),
        (
            &[
                "--segment",
                &helpful,
                "--segment",
                &harmless,
                "--schedule",
                "helpful:0.5",
            ],
            "--schedule gives no share to segment \"harmless\"",
        ),
        (
            &[
                "--segment",
                &helpful,
                "--segment",
                &harmless,
                "--schedule",
                "helpful:0.75-0.25,harmless:0.5-0.75",
            ],
            "--schedule: the shares at the start sum to 1.25",
        ),
        (
            &[
                "--segment",
                &helpful,
                "--segment",
                &harmless,
                "--schedule",
                "helpful:1.5--0.5,harmless:-0.5-1.5",
            ],
            "--schedule: share 1.5 of segment \"helpful\"",
        ),
    ];
    for (args, message) in cases {
        // A closed port: validation must fail before any connection is tried.
        let out = Command::new(BINARY)
            .args(["replay", "--brokers", "127.0.0.1:9", "--format", "hh-rlhf"])
            .args(args)
            .output()
            .expect("run rebeld replay");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}
