//! Malformed messages interleaved with good ones, against a real tansu broker: each bad one
//! reaches the dead-letter topic with its bytes and reason, and every good one the buffer.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use support::{snapshot_contents, wait_for, Daemon, DaemonConfig, Tansu, DEAD_LETTER_TOPIC, TOPIC};

/// Strict objectives, a small size limit and dropping long prompts, so every reason can fire.
const STRICT: &str = "[kafka]\nmax_message_bytes = \"16KB\"\n\
                      [model]\nmax_prompt_tokens = 64\nprompt_too_long = \"drop\"\n\
                      [train]\nstrict_objectives = true\n[train.mixture]\nhelpful = 1.0\n";

fn good(i: usize) -> Vec<u8> {
    format!(
        r#"{{"id":"good-{i}","prompt":"Question {i}?","responses":[{{"text":"Answer A {i}"}},
        {{"text":"Answer B {i}"}}],"preference":0,"segment":"tests"}}"#
    )
    .into_bytes()
}

/// A v1 event with `fields` spliced in front of a valid body's remaining fields.
fn v1(fields: &str) -> Vec<u8> {
    format!(r#"{{"id":"bad",{fields}}}"#).into_bytes()
}

const TWO: &str = r#""responses":[{"text":"a"},{"text":"b"}],"preference":0"#;

/// At least one malformed message per reason, with the reason it must be rejected for.
fn corpus() -> Vec<(Option<Vec<u8>>, &'static str)> {
    let nested = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let long_prompt = "word ".repeat(400);
    let big = "x".repeat(20_000);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (Vec::new(), "empty_message"),
        (b"{\"id\":\"caf\xe9\"}".to_vec(), "invalid_utf8"),
        (
            v1(&format!(r#""prompt":"hi","pad":"{big}",{TWO}"#)),
            "too_large",
        ),
        (b"{".to_vec(), "invalid_json"),
        (b"{\"id\":\"a\",\"id\":\"b\"}".to_vec(), "invalid_json"),
        (
            v1(&format!(r#""prompt":"hi","x":{nested},{TWO}"#)),
            "invalid_json",
        ),
        (v1(&format!(r#""prompt":5,{TWO}"#)), "wrong_type"),
        (v1(&format!(r#""prompt":{{"a":1}},{TWO}"#)), "wrong_type"),
        (
            v1(r#""prompt":"hi","responses":"x","preference":0"#),
            "wrong_type",
        ),
        (v1(r#""prompt":"hi""#), "missing_field"),
        (
            v1(r#""prompt":"hi","responses":[{"text":"a"},{"text":"b"}]"#),
            "missing_field",
        ),
        (
            v1(concat!(
                r#""prompt":"hi","responses":[{"text":"a"},"#,
                r#"{"text":"b"},{"text":"c"}],"preference":0"#
            )),
            "bad_shape",
        ),
        (
            v1(&format!(
                r#""prompt":"hi","messages":[{{"role":"user","content":"x"}}],{TWO}"#
            )),
            "bad_shape",
        ),
        (br#"{"prompt":"hi","chosen":"a"}"#.to_vec(), "bad_shape"),
        (format!(r#"{{"id":"",{}}}"#, &TWO).into_bytes(), "bad_id"),
        (
            format!(r#"{{"id":"{}","prompt":"hi",{TWO}}}"#, "x".repeat(200)).into_bytes(),
            "bad_id",
        ),
        (
            v1(&format!(r#""time":"yesterday","prompt":"hi",{TWO}"#)),
            "bad_time",
        ),
        (
            v1(&format!(r#""time":1e30,"prompt":"hi",{TWO}"#)),
            "bad_time",
        ),
        (v1(&format!(r#""prompt":"   ",{TWO}"#)), "empty_text"),
        (
            v1(r#""prompt":"hi","responses":[{"text":""},{"text":"b"}],"preference":0"#),
            "empty_text",
        ),
        (
            v1(&format!(
                r#""messages":[{{"role":"wizard","content":"x"}}],{TWO}"#
            )),
            "unknown_role",
        ),
        (
            v1(r#""prompt":"hi","responses":[{"text":"same"},{"text":"same"}],"preference":0"#),
            "identical_responses",
        ),
        (
            v1(r#""prompt":"hi","responses":[{"text":"a"},{"text":"b"}],"preference":2"#),
            "bad_preference",
        ),
        (
            v1(r#""prompt":"hi","responses":[{"text":"a"},{"text":"b"}],"preference":"first""#),
            "bad_preference",
        ),
        (
            v1(concat!(
                r#""prompt":"hi","responses":[{"text":"a","scores":{"helpful":1e400}},"#,
                r#"{"text":"b","scores":{"helpful":1}}]"#
            )),
            "non_finite_score",
        ),
        (
            v1(concat!(
                r#""prompt":"hi","responses":[{"text":"a","scores":{"creativity":1}},"#,
                r#"{"text":"b","scores":{"creativity":2}}]"#
            )),
            "unknown_objective",
        ),
        (
            v1(concat!(
                r#""prompt":"hi","responses":[{"text":"a","policy_version":-1},"#,
                r#"{"text":"b"}],"preference":0"#
            )),
            "bad_policy_version",
        ),
        (
            v1(&format!(r#""prompt":"hi","confidence":0.3,{TWO}"#)),
            "bad_confidence",
        ),
        (
            v1(&format!(r#""prompt":"hi","confidence":1.5,{TWO}"#)),
            "bad_confidence",
        ),
        (
            v1(&format!(r#""prompt":"{long_prompt}",{TWO}"#)),
            "prompt_too_long",
        ),
    ];
    let mut all: Vec<(Option<Vec<u8>>, &str)> = vec![(None, "empty_message")];
    all.extend(
        cases
            .into_iter()
            .map(|(bytes, reason)| (Some(bytes), reason)),
    );
    all
}

fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .create()
        .expect("producer")
}

/// Produces every message to partition 0, in order; returns each one's offset.
async fn produce_all(producer: &FutureProducer, values: &[Option<Vec<u8>>]) -> Vec<i64> {
    let mut offsets = Vec::new();
    for value in values {
        let mut record = FutureRecord::<[u8], [u8]>::to(TOPIC).partition(0);
        if let Some(bytes) = value {
            record = record.payload(bytes);
        }
        let delivery = producer
            .send(record, Duration::from_secs(30))
            .await
            .expect("delivered");
        offsets.push(delivery.offset);
    }
    offsets
}

/// Reads the dead-letter topic until `expected` messages arrived: source offset → (reason,
/// value).
fn read_dead_letters(bootstrap: &str, expected: usize) -> BTreeMap<i64, (String, Option<Vec<u8>>)> {
    let consumer = support::read_from_start(bootstrap, "dead-letter-reader", DEAD_LETTER_TOPIC);

    let mut letters = BTreeMap::new();
    wait_for("the dead letters", Duration::from_secs(60), || {
        while let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let header = |key: &str| {
                let headers = message.headers()?;
                let value = headers.iter().find(|h| h.key == key)?.value?;
                Some(String::from_utf8_lossy(value).into_owned())
            };
            let offset: i64 = header("rebeld.source.offset")
                .and_then(|o| o.parse().ok())
                .expect("offset header");
            let reason = header("rebeld.reason").expect("reason header");
            letters.insert(offset, (reason, message.payload().map(<[u8]>::to_vec)));
        }
        letters.len() >= expected
    });
    letters
}

#[test]
fn malformed_messages_reach_the_dead_letter_topic_and_good_ones_the_buffer() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&DaemonConfig::new(dir.path(), &broker.bootstrap, STRICT));

    let bad = corpus();
    assert!(bad.len() >= 30, "corpus has {} cases", bad.len());
    let mut values = Vec::new();
    for (i, (value, _)) in bad.iter().enumerate() {
        values.push(Some(good(i)));
        values.push(value.clone());
    }
    values.push(Some(good(bad.len())));

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let offsets = runtime.block_on(produce_all(&producer(&broker.bootstrap), &values));
    let goods = bad.len() + 1;

    wait_for(
        "every good event in the buffer",
        Duration::from_secs(60),
        || daemon.metric("rebeld_ingest_accepted_total") == Some(goods as f64),
    );
    let letters = read_dead_letters(&broker.bootstrap, bad.len());

    let mut wrong = Vec::new();
    for (i, (value, reason)) in bad.iter().enumerate() {
        let offset = offsets[2 * i + 1];
        match letters.get(&offset) {
            Some((got, bytes)) if got == reason && bytes == value => {}
            other => wrong.push(format!(
                "case {i} ({reason}): got {:?}",
                other.map(|o| &o.0)
            )),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(letters.len(), bad.len());

    let status = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let (ids, _) = snapshot_contents(dir.path());
    let expected: Vec<String> = (0..goods).map(|i| format!("good-{i}")).collect();
    let mut held = ids;
    held.sort();
    let mut wanted = expected;
    wanted.sort();
    assert_eq!(held, wanted);
}
