//! Ingest throughput against the raw consume rate of the same messages, from the same tansu
//! broker, in the same run: `cargo bench --bench ingest` (prints a table; never a test).
//!
//! Modes, each consuming the same topic from the beginning:
//! - raw: poll and touch every payload;
//! - parse + validate + append: `parse_event`, a row without token ids, `RollingBuffer::append`;
//! - parse + validate + tokenize + append: the daemon's `Converter` with the tiny fixture's
//!   tokenizer (a 512-token byte-level BPE; a production vocabulary costs more per token).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use rebeld::buffer::{BufferLimits, PairRecord, RollingBuffer};
use rebeld::config::PromptTooLong;
use rebeld::event::{parse_event, EventLimits};
use rebeld::ingest::convert::{ConvertSettings, Converter};
use rebeld::model::tokenizer::PolicyTokenizer;

const COPIES: u64 = 3;
const ROUNDS: usize = 3;
const APPEND_BATCH: usize = 256;

fn consume_all(bootstrap: &str, expected: usize, mut on_message: impl FnMut(OwnedMessage)) -> f64 {
    let consumer = support::read_from_start(bootstrap, "bench", support::TOPIC);

    let started = Instant::now();
    let mut seen = 0;
    while seen < expected {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(500)) {
            on_message(message.detach());
            seen += 1;
        }
    }
    started.elapsed().as_secs_f64()
}

fn limits() -> BufferLimits {
    BufferLimits {
        max_rows: 1_000_000,
        max_bytes: usize::MAX,
        max_age_ms: None,
    }
}

fn raw(bootstrap: &str, n: usize) -> f64 {
    let mut bytes = 0_usize;
    let seconds = consume_all(bootstrap, n, |m| {
        bytes += m.payload().map_or(0, <[u8]>::len)
    });
    assert!(bytes > 0);
    seconds
}

/// Consumes the topic, turns every message into a row and appends rows in batches.
fn consume_into_buffer(
    bootstrap: &str,
    n: usize,
    mut to_row: impl FnMut(&OwnedMessage) -> PairRecord,
) -> f64 {
    let mut buffer = RollingBuffer::new(limits());
    let mut pending = Vec::new();
    let seconds = consume_all(bootstrap, n, |message| {
        pending.push(to_row(&message));
        if pending.len() == APPEND_BATCH {
            buffer
                .append(std::mem::take(&mut pending), 0)
                .expect("append");
        }
    });
    buffer.append(pending, 0).expect("append");
    seconds
}

/// A row with the event's id and coordinates but no token ids.
fn untokenized_row(message: &OwnedMessage, limits: &EventLimits) -> PairRecord {
    let event = parse_event(message.payload(), limits).expect("valid");
    PairRecord {
        id: event.id,
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        ..PairRecord::default()
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let broker = support::Tansu::start(3);
    let report = support::replay_hh(
        &broker.bootstrap,
        &["--loop", "--limit", &(2015 * COPIES).to_string()],
    );
    let n = (2015 * COPIES) as usize;
    println!(
        "broker: tansu on {}; {n} HH-RLHF events ({report:?})",
        broker.bootstrap
    );

    let tokenizer = PolicyTokenizer::from_dir(support::TINY_MODEL.as_ref()).expect("tokenizer");
    let converter = Converter::new(
        Arc::new(tokenizer),
        ConvertSettings {
            limits: EventLimits::default(),
            max_prompt_tokens: 512,
            max_response_tokens: 256,
            prompt_too_long: PromptTooLong::Truncate,
            keep_text: false,
        },
    );

    let mut rows = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        rows[0].push(raw(&broker.bootstrap, n));
        let limits = EventLimits::default();
        rows[1].push(consume_into_buffer(&broker.bootstrap, n, |m| {
            untokenized_row(m, &limits)
        }));
        rows[2].push(consume_into_buffer(&broker.bootstrap, n, |m| {
            converter.convert(m, 0).expect("valid")
        }));
    }
    let seconds: Vec<f64> = rows.into_iter().map(median).collect();
    let rate = |s: f64| n as f64 / s;

    println!("\n| mode | median events/s | ratio to raw consume |");
    println!("| --- | ---: | ---: |");
    let names = [
        "raw consume",
        "consume + parse + validate + append",
        "consume + parse + validate + tokenize + append",
    ];
    for (name, s) in names.iter().zip(&seconds) {
        println!("| {name} | {:.0} | {:.2}x |", rate(*s), seconds[0] / s);
    }
    let tokenize_us = (seconds[2] - seconds[1]) / n as f64 * 1e6;
    println!("\ntokenization alone: {tokenize_us:.1} µs per event (median of {ROUNDS} rounds)");
}
