//! `rebeld replay`: produce preference events from a JSONL (or JSONL.gz) file.
//!
//! Formats: `rebeld` and `trl` lines are sent as they are (the daemon parses both);
//! `hh-rlhf` lines are converted to rebeld events first, and a line that does not split into
//! a shared prompt and two final assistant turns is reported and skipped.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sha2::{Digest, Sha256};

use crate::event::hh_rlhf::hh_to_event;

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

/// What to replay, where, and how fast.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// The input file; `.gz` is decompressed.
    pub file: PathBuf,
    /// How lines are read.
    pub format: ReplayFormat,
    /// Bootstrap list.
    pub brokers: String,
    /// Destination topic.
    pub topic: String,
    /// Events per second; `None` sends as fast as the broker takes them.
    pub rate: Option<f64>,
    /// Stop after this many events.
    pub limit: Option<u64>,
    /// Start over at the end of the file (until `limit`).
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
    loop {
        let finished = run.pass().await?;
        if finished || !options.repeat {
            break;
        }
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
    async fn pass(&mut self) -> Result<bool, ReplayError> {
        let path = &self.options.file;
        for (number, line) in open_lines(path)?.enumerate() {
            let line = match line {
                Ok(line) => line,
                Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                    self.skip(number + 1, "invalid_utf8");
                    continue;
                }
                Err(source) => {
                    return Err(ReplayError::Read {
                        path: path.clone(),
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
        *self.summary.skipped.entry(reason.to_owned()).or_default() += 1;
        if self.options.progress {
            eprintln!("replay: line {line_number} skipped: {reason}");
        }
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
        eprintln!(
            "replay: {} produced, {} acknowledged, {} skipped, {:.0} events/s",
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
