//! Buffer memory per event against the raw JSON bytes of the events, at 100,000 events:
//! `cargo bench --bench memory` (prints a table; never a test).
//!
//! The events are the HH-RLHF test files converted by `rebeld replay --format hh-rlhf`'s
//! converter, cycled with an explicit id per copy until 100,000; each is validated and tokenized
//! by the daemon's `Converter` with SmolLM2's tokenizer (prompts ≤ 512 tokens, responses
//! ≤ 256, as the default config), with `keep_text` on and off, and appended to a
//! `RollingBuffer` 256 rows at a time.

use std::path::Path;
use std::sync::Arc;

use rebeld::buffer::{BufferLimits, PairRecord, RollingBuffer};
use rebeld::config::PromptTooLong;
use rebeld::event::{parse_event, EventLimits};
use rebeld::ingest::convert::{ConvertSettings, Converter};
use rebeld::model::tokenizer::PolicyTokenizer;
use rebeld::replay::{event_value, open_lines, ReplayFormat};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const EVENTS: usize = 100_000;
const APPEND_BATCH: usize = 256;
const HH_FILES: [&str; 4] = [
    "helpful-base-test.jsonl.gz",
    "harmless-base-test.jsonl.gz",
    "helpful-online-test.jsonl.gz",
    "helpful-rejection-sampled-test.jsonl.gz",
];

/// Every convertible HH-RLHF test line as a rebeld event.
fn unique_events() -> Vec<Value> {
    let dir = Path::new(ROOT).join("../shared/data/hh-rlhf");
    let mut events = Vec::new();
    for name in HH_FILES {
        for line in open_lines(&dir.join(name)).expect("HH-RLHF file") {
            if let Ok(event) = event_value(ReplayFormat::HhRlhf, &line.expect("line")) {
                events.push(serde_json::from_str(&event).expect("event JSON"));
            }
        }
    }
    events
}

struct Filled {
    json_bytes: usize,
    rows: usize,
    counted: usize,
    arrow: usize,
}

fn fill(events: &[Value], converter: &Converter) -> Filled {
    let limits = EventLimits::default();
    let mut templates: Vec<PairRecord> = Vec::with_capacity(events.len());
    for event in events {
        let bytes = serde_json::to_vec(event).expect("serialize");
        let parsed = parse_event(Some(&bytes), &limits).expect("valid event");
        templates.push(converter.tokenize(&parsed).expect("tokenized"));
    }
    let mut buffer = RollingBuffer::new(BufferLimits {
        max_rows: usize::MAX,
        max_bytes: usize::MAX,
        max_age_ms: None,
    });
    let (mut pending, mut json_bytes) = (Vec::new(), 0);
    for i in 0..EVENTS {
        let k = i % events.len();
        let mut event = events[k].clone();
        // The converter's events carry no id (the parser derives one from the content):
        // each copy gets its own, as distinct events from users would.
        let id = format!("hh-{k:05}-{:02}", i / events.len());
        event["id"] = Value::String(id.clone());
        json_bytes += serde_json::to_vec(&event).expect("serialize").len();
        pending.push(PairRecord {
            id,
            topic: "preferences".to_owned(),
            offset: i as i64,
            ..templates[k].clone()
        });
        if pending.len() == APPEND_BATCH {
            buffer
                .append(std::mem::take(&mut pending), 0)
                .expect("append");
        }
    }
    buffer.append(pending, 0).expect("append");
    Filled {
        json_bytes,
        rows: buffer.len(),
        counted: buffer.bytes(),
        arrow: buffer.arrow_memory_bytes(),
    }
}

fn main() {
    let events = unique_events();
    let dir = Path::new(ROOT).join("models/smollm2-135m-instruct");
    let tokenizer = Arc::new(PolicyTokenizer::from_dir(&dir).expect("tokenizer"));
    println!(
        "{EVENTS} events cycled from {} distinct HH-RLHF events; SmolLM2 tokenizer",
        events.len()
    );
    println!(
        "\n| keep_text | rows | raw JSON B/event | buffer B/event (counted) | ratio \
         | Arrow B/event (allocated) | ratio |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for keep_text in [true, false] {
        let converter = Converter::new(
            tokenizer.clone(),
            ConvertSettings {
                limits: EventLimits::default(),
                max_prompt_tokens: 512,
                max_response_tokens: 256,
                prompt_too_long: PromptTooLong::Truncate,
                keep_text,
            },
        );
        let f = fill(&events, &converter);
        let per = |bytes: usize| bytes as f64 / f.rows as f64;
        let json = per(f.json_bytes);
        println!(
            "| {keep_text} | {} | {json:.0} | {:.0} | {:.2}x | {:.0} | {:.2}x |",
            f.rows,
            per(f.counted),
            per(f.counted) / json,
            per(f.arrow),
            per(f.arrow) / json
        );
    }
}
