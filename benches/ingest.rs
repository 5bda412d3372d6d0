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

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, Message};
use rebeld::buffer::{BufferLimits, PairRecord, RollingBuffer};
use rebeld::config::PromptTooLong;
use rebeld::event::{parse_event, EventLimits};
use rebeld::ingest::convert::{ConvertSettings, Converter};
use rebeld::model::tokenizer::PolicyTokenizer;

const COPIES: u64 = 3;
const ROUNDS: usize = 3;
const APPEND_BATCH: usize = 256;

fn consume_all(bootstrap: &str, expected: usize, mut on_message: impl FnMut(OwnedMessage)) -> f64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut list = TopicPartitionList::new();
    for partition in 0..3 {
        list.add_partition_offset(support::TOPIC, partition, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&list).expect("assign");
    drop(list);

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

fn parse_and_append(bootstrap: &str, n: usize) -> f64 {
    let mut buffer = RollingBuffer::new(limits());
    let mut pending = Vec::new();
    let event_limits = EventLimits::default();
    let seconds = consume_all(bootstrap, n, |message| {
        let event = parse_event(message.payload(), &event_limits).expect("valid");
        pending.push(PairRecord {
            id: event.id,
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            ..PairRecord::default()
        });
        if pending.len() == APPEND_BATCH {
            buffer
                .append(std::mem::take(&mut pending), 0)
                .expect("append");
        }
    });
    buffer.append(pending, 0).expect("append");
    seconds
}

fn tokenize_and_append(bootstrap: &str, n: usize, converter: &Converter) -> f64 {
    let mut buffer = RollingBuffer::new(limits());
    let mut pending = Vec::new();
    let seconds = consume_all(bootstrap, n, |message| {
        pending.push(converter.convert(&message, 0).expect("valid"));
        if pending.len() == APPEND_BATCH {
            buffer
                .append(std::mem::take(&mut pending), 0)
                .expect("append");
        }
    });
    buffer.append(pending, 0).expect("append");
    seconds
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
        rows[1].push(parse_and_append(&broker.bootstrap, n));
        rows[2].push(tokenize_and_append(&broker.bootstrap, n, &converter));
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
