//! `rebeld replay`: produce preference events from a JSONL (or JSONL.gz) file.
//!
//! Formats: `rebeld` and `trl` lines are sent as they are (the daemon parses both);
//! `hh-rlhf` lines are converted to rebeld events first, and a line that does not split into
//! a shared prompt and two final assistant turns is reported and skipped.
//!
//! With segments, several files are interleaved: each event is drawn from one segment as a
//! [`schedule::Schedule`] says and tagged with the segment's name (see [`tagged_event_value`]
//! for how its id stays the id of the untagged line).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::event::hh_rlhf::hh_to_event;
use crate::event::{parse_event, EventLimits};

pub mod schedule;

use schedule::{NamedFile, Schedule};

/// Deliveries awaited at once before the oldest must finish.
const MAX_IN_FLIGHT: usize = 10_000;
/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// How each input line is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplayFormat {
    /// rebeld event v1, sent unchanged.
    Rebeld,
    /// TRL preference records, sent unchanged.
    Trl,
    /// Anthropic HH-RLHF `{chosen, rejected}` dialogues, converted to rebeld events.
    #[value(name = "hh-rlhf")]
    HhRlhf,
}

/// Where the events come from.
#[derive(Clone, Debug)]
pub enum ReplayInput {
    /// One file; `.gz` is decompressed.
    File(PathBuf),
    /// Several files interleaved as named segments.
    Segments(SegmentPlan),
}

/// Segments and how their traffic is shared out.
#[derive(Clone, Debug)]
pub struct SegmentPlan {
    /// The segments, in the order of the schedule's shares.
    pub segments: Vec<NamedFile>,
    /// Each segment's share over the run.
    pub schedule: Schedule,
    /// Seed of the segment draws.
    pub seed: u64,
}

/// What to replay, where, and how fast.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// The input.
    pub input: ReplayInput,
    /// How lines are read.
    pub format: ReplayFormat,
    /// Bootstrap list.
    pub brokers: String,
    /// Destination topic.
    pub topic: String,
    /// Events per second; `None` sends as fast as the broker takes them.
    pub rate: Option<f64>,
    /// Stop after this many events; with segments, the length the schedule spans (default:
    /// the usable lines of every segment together).
    pub limit: Option<u64>,
    /// Start over at the end of the file (until `limit`); with segments, start a segment
    /// over when it runs out instead of ending the run.
    pub repeat: bool,
    /// Print progress to standard error.
    pub progress: bool,
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Events acknowledged by the broker.
    pub sent: u64,
    /// Lines skipped, by reason.
    pub skipped: BTreeMap<String, u64>,
    /// With segments: events produced from each, in the plan's order.
    pub segments: Vec<(String, u64)>,
    /// With segments and without `repeat`: the segment that ran out of lines, ending the run
    /// before `limit`.
    pub exhausted: Option<String>,
}

impl ReplaySummary {
    /// Lines skipped in all.
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A segment's file has no line that makes an event.
    #[error("--segment {}={}: no usable line", .0.name, .0.path.display())]
    EmptySegment(NamedFile),
    /// The producer could not be created.
    #[error("kafka producer: {0}")]
    Producer(#[from] KafkaError),
    /// The broker refused or timed out a delivery.
    #[error("delivery to {topic} failed after {sent} events: {source}")]
    Delivery {
        /// The topic.
        topic: String,
        /// Events acknowledged before the failure.
        sent: u64,
        /// The failure.
        source: KafkaError,
    },
}

/// Replays the file; returns once every produced event is acknowledged.
pub async fn replay(options: &ReplayOptions) -> Result<ReplaySummary, ReplayError> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &options.brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .create()?;

    let mut run = Run::new(options, producer);
    match &options.input {
        ReplayInput::File(path) => loop {
            let finished = run.pass(path).await?;
            if finished || !options.repeat {
                break;
            }
        },
        ReplayInput::Segments(plan) => run.segmented(plan).await?,
    }
    run.drain().await?;
    run.report_progress(true);
    Ok(run.summary)
}

struct Run<'a> {
    options: &'a ReplayOptions,
    producer: FutureProducer,
    in_flight: VecDeque<DeliveryFuture>,
    summary: ReplaySummary,
    produced: u64,
    started: Instant,
    last_progress: Instant,
}

impl<'a> Run<'a> {
    fn new(options: &'a ReplayOptions, producer: FutureProducer) -> Self {
        Self {
            options,
            producer,
            in_flight: VecDeque::new(),
            summary: ReplaySummary::default(),
            produced: 0,
            started: Instant::now(),
            last_progress: Instant::now(),
        }
    }

    /// One pass over the file; true when the limit was reached.
    async fn pass(&mut self, path: &Path) -> Result<bool, ReplayError> {
        for (number, line) in open_lines(path)?.enumerate() {
            let line = match line {
                Ok(line) => line,
                Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                    self.skip(number + 1, "invalid_utf8");
                    continue;
                }
                Err(source) => {
                    return Err(ReplayError::Read {
                        path: path.to_owned(),
                        source,
                    })
                }
            };
            if self
                .options
                .limit
                .is_some_and(|limit| self.produced >= limit)
            {
                return Ok(true);
            }
            if line.trim().is_empty() {
                continue;
            }
            match event_value(self.options.format, &line) {
                Ok(value) => self.produce(value).await?,
                Err(reason) => self.skip(number + 1, reason),
            }
            self.report_progress(false);
        }
        Ok(self
            .options
            .limit
            .is_some_and(|limit| self.produced >= limit))
    }

    fn skip(&mut self, line_number: usize, reason: &'static str) {
        self.skip_at(format_args!("line {line_number}"), reason);
    }

    /// Counts a skipped line and reports `place` (where it was).
    fn skip_at(&mut self, place: std::fmt::Arguments<'_>, reason: &'static str) {
        *self.summary.skipped.entry(reason.to_owned()).or_default() += 1;
        if self.options.progress {
            eprintln!("replay: {place} skipped: {reason}");
        }
    }

    /// Every segment's events, tagged; the schedule's draws pick which goes next.
    async fn segmented(&mut self, plan: &SegmentPlan) -> Result<(), ReplayError> {
        let mut pools = Vec::with_capacity(plan.segments.len());
        for segment in &plan.segments {
            pools.push(self.load_segment(segment)?);
        }
        self.summary.segments = plan.segments.iter().map(|s| (s.name.clone(), 0)).collect();
        let total = self
            .options
            .limit
            .unwrap_or_else(|| pools.iter().map(|pool| pool.len() as u64).sum());

        let mut next = vec![0; pools.len()];
        for index in plan.schedule.draws(total, plan.seed) {
            if next[index] == pools[index].len() && self.options.repeat {
                next[index] = 0;
            }
            let Some(value) = pools[index].get(next[index]) else {
                self.summary.exhausted = Some(plan.segments[index].name.clone());
                break;
            };
            next[index] += 1;
            self.produce(value.clone()).await?;
            self.summary.segments[index].1 += 1;
            self.report_progress(false);
        }
        Ok(())
    }

    /// The tagged events of a segment's usable lines, in file order.
    fn load_segment(&mut self, segment: &NamedFile) -> Result<Vec<String>, ReplayError> {
        let mut events = Vec::new();
        for (number, line) in open_lines(&segment.path)?.enumerate() {
            let name = &segment.name;
            let line = match line {
                Ok(line) => line,
                Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                    self.skip_at(format_args!("{name} line {}", number + 1), "invalid_utf8");
                    continue;
                }
                Err(source) => {
                    return Err(ReplayError::Read {
                        path: segment.path.clone(),
                        source,
                    })
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            match tagged_event_value(self.options.format, &line, name) {
                Ok(value) => events.push(value),
                Err(reason) => self.skip_at(format_args!("{name} line {}", number + 1), reason),
            }
        }
        if events.is_empty() {
            return Err(ReplayError::EmptySegment(segment.clone()));
        }
        Ok(events)
    }

    async fn produce(&mut self, value: String) -> Result<(), ReplayError> {
        self.pace().await;
        let key = hex::encode(&Sha256::digest(value.as_bytes())[..8]);
        loop {
            let record = FutureRecord::to(&self.options.topic)
                .key(&key)
                .payload(&value);
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.in_flight.push_back(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    self.settle_oldest().await?;
                }
                Err((source, _)) => return Err(self.delivery_error(source)),
            }
        }
        self.produced += 1;
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    async fn pace(&self) {
        if let Some(rate) = self.options.rate.filter(|r| *r > 0.0) {
            let due = self.started + Duration::from_secs_f64(self.produced as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
    }

    /// Waits for the oldest delivery (or a moment, if none is in flight).
    async fn settle_oldest(&mut self) -> Result<(), ReplayError> {
        let Some(delivery) = self.in_flight.pop_front() else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            return Ok(());
        };
        match delivery.await {
            Ok(Ok(_)) => {
                self.summary.sent += 1;
                Ok(())
            }
            Ok(Err((source, _))) => Err(self.delivery_error(source)),
            Err(_) => Err(self.delivery_error(KafkaError::Canceled)),
        }
    }

    fn delivery_error(&self, source: KafkaError) -> ReplayError {
        ReplayError::Delivery {
            topic: self.options.topic.clone(),
            sent: self.summary.sent,
            source,
        }
    }

    async fn drain(&mut self) -> Result<(), ReplayError> {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    fn report_progress(&mut self, last: bool) {
        if !self.options.progress || (!last && self.last_progress.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.last_progress = Instant::now();
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        let segments = match self.summary.segments.as_slice() {
            [] => String::new(),
            counts => {
                let each: Vec<String> = counts.iter().map(|(n, c)| format!("{n} {c}")).collect();
                format!(" ({})", each.join(", "))
            }
        };
        eprintln!(
            "replay: {} produced{segments}, {} acknowledged, {} skipped, {:.0} events/s",
            self.produced,
            self.summary.sent,
            self.summary.skipped_total(),
            self.produced as f64 / seconds
        );
    }
}

/// The message value for one line, or why the line is skipped.
pub fn event_value(format: ReplayFormat, line: &str) -> Result<String, &'static str> {
    match format {
        ReplayFormat::Rebeld | ReplayFormat::Trl => Ok(line.to_owned()),
        ReplayFormat::HhRlhf => hh_to_event(line)
            .map(|event| event.to_string())
            .map_err(|error| error.as_str()),
    }
}

/// The message value for one line of segment `segment`: the event with `segment` set to the
/// name and `id` set to the id the untagged event has (its own `id`, or the hash of its
/// content, which would otherwise change with the tag). A resent or untagged copy of the line
/// is therefore a duplicate of this one, and the held-out slice (chosen by id) is the same as
/// for a replay without segments. A line that is not a valid event under the default limits
/// cannot be tagged and is skipped, with the parser's reason.
pub fn tagged_event_value(
    format: ReplayFormat,
    line: &str,
    segment: &str,
) -> Result<String, &'static str> {
    let value = event_value(format, line)?;
    let event = parse_event(Some(value.as_bytes()), &EventLimits::default())
        .map_err(|rejection| rejection.reason.as_str())?;
    let Ok(Value::Object(mut object)) = serde_json::from_str::<Value>(&value) else {
        return Err("invalid_json");
    };
    object.insert("id".to_owned(), Value::String(event.id));
    object.insert("segment".to_owned(), Value::String(segment.to_owned()));
    Ok(Value::Object(object).to_string())
}

/// Lines of a plain or gzip-compressed file.
pub fn open_lines(
    path: &Path,
) -> Result<Box<dyn Iterator<Item = std::io::Result<String>>>, ReplayError> {
    let file = File::open(path).map_err(|source| ReplayError::Read {
        path: path.to_owned(),
        source,
    })?;
    let gzipped = path.extension().is_some_and(|ext| ext == "gz");
    let reader: Box<dyn BufRead> = if gzipped {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    Ok(Box::new(reader.lines()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parsed(value: &str) -> crate::event::PreferenceEvent {
        parse_event(Some(value.as_bytes()), &EventLimits::default()).unwrap()
    }

    #[test]
    fn a_tag_keeps_the_id_of_the_untagged_line() {
        let hh = r#"{"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.",
            "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}"#;
        let trl = r#"{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}"#;
        let with_id = r#"{"id": "e7", "prompt": "Hi", "chosen": "Hello", "rejected": "No"}"#;
        for (format, line) in [
            (ReplayFormat::HhRlhf, hh),
            (ReplayFormat::Trl, trl),
            (ReplayFormat::Rebeld, with_id),
        ] {
            let untagged = parsed(&event_value(format, line).unwrap());
            let tagged = parsed(&tagged_event_value(format, line, "helpful").unwrap());
            assert_eq!(tagged.id, untagged.id, "{line}");
            assert_eq!(tagged.segment.as_deref(), Some("helpful"));
            assert_eq!(tagged.prompt, untagged.prompt);
        }
        assert_eq!(parsed(with_id).id, "e7");
    }

    #[test]
    fn a_line_that_is_no_event_cannot_be_tagged() {
        let found = tagged_event_value(ReplayFormat::Rebeld, "[1, 2]", "s");
        assert_eq!(found, Err("wrong_type"));
        let found = tagged_event_value(ReplayFormat::Trl, "{\"prompt\": \"Hi\"", "s");
        assert_eq!(found, Err("invalid_json"));
    }
}
