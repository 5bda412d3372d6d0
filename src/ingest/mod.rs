//! Preference events from Kafka into the rolling buffer, exactly once, with a dead-letter topic.
//!
//! The loop receives messages into a pending batch, converts the batch on a blocking thread
//! (parse, validate, tokenize), sends the rejected ones to the dead-letter topic and waits for
//! their acknowledgement, then appends the accepted ones and advances the partition offsets,
//! all under one lock. A batch is applied whole or not at all.
//!
//! The buffer, the offsets and the dedup window are saved by the trainer as part of the resume
//! state (`crate::resume`). Periodically, on partition revoke and on shutdown, ingest commits
//! to Kafka the offsets of the newest durable resume state, never more. After a restart that
//! state is restored; Kafka resumes at the committed offsets, which never run ahead of it,
//! and messages below its offsets are skipped.

pub mod convert;
pub mod dead_letter;
pub mod group;
pub mod kafka;
pub mod offsets;
pub mod store;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientContext, Message};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::convert::Converter;
use self::dead_letter::DeadLetters;
use self::group::{GroupView, GroupWatch};
use self::offsets::PartitionOffsets;
use self::offsets::Position;
use self::store::SharedBuffer;
use crate::buffer::{BufferError, PairRecord};
use crate::config::KafkaConfig;
use crate::event::Rejection;
use crate::health::Readiness;
use crate::metrics::Metrics;

/// Most messages converted together.
const MAX_BATCH: usize = 256;
/// Longest a received message waits for its batch to fill.
const BATCH_WAIT: Duration = Duration::from_millis(50);
/// At most one warning per this interval for repeated consumer errors.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Why ingest stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A Kafka client could not be created or subscribed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The buffer refused rows.
    #[error("buffer: {0}")]
    Buffer(#[from] BufferError),
    /// A conversion thread panicked.
    #[error("conversion thread failed: {0}")]
    Conversion(#[from] tokio::task::JoinError),
}

/// Commits offsets to Kafka, never beyond the newest durable resume state: shared by the loop
/// and the rebalance callback.
pub struct Checkpointer {
    shared: Arc<SharedBuffer>,
    durable: watch::Receiver<PartitionOffsets>,
    topic: String,
    metrics: Arc<Metrics>,
}

impl Checkpointer {
    /// A committer of the offsets `durable` announces (see [`crate::resume`]).
    pub fn new(
        shared: Arc<SharedBuffer>,
        durable: watch::Receiver<PartitionOffsets>,
        topic: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            shared,
            durable,
            topic,
            metrics,
        }
    }

    /// Commits the durable offsets of `partitions` (those assigned now).
    pub fn checkpoint<C: ConsumerContext>(
        &self,
        consumer: &impl Consumer<C>,
        partitions: &[i32],
    ) -> Result<(), IngestError> {
        let offsets = self.durable.borrow().clone();
        let mut list = TopicPartitionList::new();
        for &partition in partitions {
            if let Some(next) = offsets.next_offset(&self.topic, partition) {
                list.add_partition_offset(&self.topic, partition, Offset::Offset(next))?;
            }
        }
        // Asynchronous: a synchronous commit blocks without a timeout while the broker is
        // down, freezing the runtime. A commit that fails is simply older than the resume
        // state, and messages below its offsets are skipped on restart anyway.
        if list.count() > 0 {
            consumer.commit(&list, CommitMode::Async)?;
            debug!(partitions = list.count(), "durable offsets committed");
        }
        Ok(())
    }
}

/// Consumer callbacks: log rebalances; checkpoint before partitions are taken away.
pub struct IngestContext {
    checkpointer: Arc<Checkpointer>,
    revoked: Mutex<Vec<i32>>,
    readiness: Arc<Readiness>,
}

impl ClientContext for IngestContext {
    /// librdkafka's statistics (every `statistics.interval.ms`) give each partition's high
    /// watermark; the lag is measured from rebeld's own next offset (what the buffer holds),
    /// since offsets are committed only at checkpoints.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let topic = &self.checkpointer.topic;
        let Some(partitions) = statistics.topics.get(topic).map(|t| &t.partitions) else {
            return;
        };
        let offsets = self.checkpointer.shared.lock().offsets.clone();
        let lag = &self.checkpointer.metrics.ingest.consumer_lag;

        // Partition -1 is librdkafka's internal placeholder; a negative watermark is unknown.
        for (partition, stats) in partitions
            .iter()
            .filter(|(p, s)| **p >= 0 && s.hi_offset >= 0)
        {
            let consumed = offsets
                .next_offset(topic, *partition)
                .unwrap_or(stats.lo_offset.max(0));
            let behind = (stats.hi_offset - consumed).max(0);
            lag.with_label_values(&[&partition.to_string()]).set(behind);
        }
    }
}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
        info!(?partitions, "partitions revoked");
        if let Err(error) = self.checkpointer.checkpoint(consumer, &partitions) {
            warn!(%error, "checkpoint on revoke failed; the next owner reads from the last commit");
        }
        self.revoked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(partitions);
        self.readiness.set_consuming(false);
    }

    fn post_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            if partitions.is_empty() {
                warn!("the group assigned no partition to this consumer; not consuming");
            } else {
                info!(?partitions, "partitions assigned");
            }
            self.readiness.set_consuming(!partitions.is_empty());
        }
    }
}

/// What ingest needs to run.
pub struct IngestParts {
    /// `[kafka]`.
    pub kafka: KafkaConfig,
    /// Resolved bootstrap list.
    pub bootstrap: String,
    /// Message to row conversion.
    pub converter: Converter,
    /// The buffer shared with the trainer.
    pub shared: Arc<SharedBuffer>,
    /// The offsets of the newest durable resume state, the only ones ever committed.
    pub durable: watch::Receiver<PartitionOffsets>,
    /// How often to commit them.
    pub commit_every: Duration,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Raised while partitions are assigned.
    pub readiness: Arc<Readiness>,
}

/// The running consumer.
pub struct Ingest {
    consumer: Arc<StreamConsumer<IngestContext>>,
    dead_letters: DeadLetters,
    converter: Converter,
    shared: Arc<SharedBuffer>,
    checkpointer: Arc<Checkpointer>,
    commit_every: Duration,
    metrics: Arc<Metrics>,
    topic: String,
    group_id: String,
    pending: Vec<OwnedMessage>,
    last_warning: Option<Instant>,
    group: GroupWatch,
    group_undescribed: bool,
}

enum Step {
    Stop,
    Checkpoint,
    WatchGroup,
    Received(Result<OwnedMessage, KafkaError>),
    Flush,
}

/// The loop's clocks: durable offsets are committed on one, the group is watched on the other.
struct Tickers {
    checkpoint: tokio::time::Interval,
    group: tokio::time::Interval,
}

/// The outcome of converting one message.
type Converted = (OwnedMessage, Result<PairRecord, Rejection>);

impl Ingest {
    /// Creates the consumer and the dead-letter producer and subscribes.
    pub fn start(parts: IngestParts) -> Result<Self, IngestError> {
        let checkpointer = Arc::new(Checkpointer::new(
            parts.shared.clone(),
            parts.durable,
            parts.kafka.topic.clone(),
            parts.metrics.clone(),
        ));
        let context = IngestContext {
            checkpointer: checkpointer.clone(),
            revoked: Mutex::new(Vec::new()),
            readiness: parts.readiness,
        };
        let consumer: StreamConsumer<IngestContext> =
            kafka::consumer_config(&parts.kafka, &parts.bootstrap).create_with_context(context)?;
        consumer.subscribe(&[parts.kafka.topic.as_str()])?;
        let producer: FutureProducer =
            kafka::producer_config(&parts.kafka, &parts.bootstrap).create()?;

        Ok(Self {
            consumer: Arc::new(consumer),
            dead_letters: DeadLetters::new(producer, parts.kafka.dead_letter_topic.clone()),
            converter: parts.converter,
            shared: parts.shared,
            checkpointer,
            commit_every: parts.commit_every,
            metrics: parts.metrics,
            topic: parts.kafka.topic,
            group_id: parts.kafka.group_id,
            pending: Vec::new(),
            last_warning: None,
            group: GroupWatch::default(),
            group_undescribed: false,
        })
    }

    /// Consumes until `token` fires, then checkpoints once more.
    pub async fn run(mut self, token: CancellationToken) -> Result<(), IngestError> {
        let mut tickers = Tickers {
            checkpoint: tokio::time::interval(self.commit_every),
            group: tokio::time::interval(group::CHECK_EVERY),
        };
        tickers.checkpoint.tick().await;
        tickers.group.tick().await;
        let mut flush_at = None;

        loop {
            let step = self.next_step(&token, &mut tickers, flush_at).await;
            match step {
                Step::Stop => break,
                Step::Checkpoint => {
                    self.flush(&token).await?;
                    self.checkpoint_assigned()?;
                }
                Step::WatchGroup => self.rejoin_if_starved().await?,
                Step::Received(Ok(message)) => {
                    self.drop_revoked();
                    flush_at.get_or_insert_with(|| tokio::time::Instant::now() + BATCH_WAIT);
                    self.pending.push(message);
                    if self.pending.len() >= MAX_BATCH {
                        self.flush(&token).await?;
                        flush_at = None;
                    }
                }
                Step::Received(Err(error)) => self.consumer_error(&error),
                Step::Flush => {
                    self.flush(&token).await?;
                    flush_at = None;
                }
            }
        }

        self.flush(&token).await?;
        self.checkpoint_assigned()?;
        self.consumer.context().readiness.set_consuming(false);
        info!("ingest stopped after a final commit");

        // Closing the consumer leaves the group and may wait on an unreachable broker: do it
        // off the runtime, so the shutdown deadline still governs.
        tokio::task::spawn_blocking(move || drop(self)).await?;
        Ok(())
    }

    async fn next_step(
        &self,
        token: &CancellationToken,
        tickers: &mut Tickers,
        flush_at: Option<tokio::time::Instant>,
    ) -> Step {
        let flush = async {
            match flush_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = token.cancelled() => Step::Stop,
            _ = tickers.checkpoint.tick() => Step::Checkpoint,
            _ = tickers.group.tick() => Step::WatchGroup,
            () = flush => Step::Flush,
            received = self.consumer.recv() => Step::Received(received.map(|m| m.detach())),
        }
    }

    /// Drops pending messages of partitions revoked since they were received: their next
    /// owner reads them from the committed offset.
    fn drop_revoked(&mut self) {
        let revoked = std::mem::take(
            &mut *self
                .consumer
                .context()
                .revoked
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if !revoked.is_empty() {
            self.pending.retain(|m| !revoked.contains(&m.partition()));
        }
    }

    fn consumer_error(&mut self, error: &KafkaError) {
        self.metrics.ingest.consumer_errors.inc();
        let quiet = self
            .last_warning
            .is_some_and(|at| at.elapsed() < WARN_EVERY);
        if !quiet {
            warn!(%error, "consumer error (repeats within 30 s are counted, not logged)");
            self.last_warning = Some(Instant::now());
        }
    }

    /// Commits the durable offsets of the assigned partitions.
    fn checkpoint_assigned(&mut self) -> Result<(), IngestError> {
        let partitions = self.assigned_partitions()?;
        self.checkpointer.checkpoint(&*self.consumer, &partitions)?;
        Ok(())
    }

    /// Leaves and rejoins the group after being starved for a while (see [`group`]): a
    /// coordinator can leave a survivor holding only its old share after a member died.
    async fn rejoin_if_starved(&mut self) -> Result<(), IngestError> {
        let assigned = self.assigned_partitions()?.len();
        if self.group.should_ask(assigned) {
            let view = self.ask_about_group().await?;
            self.group.record(view);
        }
        if !self.group.should_rejoin(assigned, Instant::now()) {
            return Ok(());
        }

        warn!(
            assigned,
            seconds = group::REJOIN_AFTER.as_secs(),
            "short of partitions for a while; rejoining the group for a fresh assignment"
        );
        self.metrics.ingest.group_rejoins.inc();
        self.consumer.unsubscribe();
        self.consumer.subscribe(&[self.topic.as_str()])?;
        Ok(())
    }

    /// The broker's view of the group, or `None` when it gave none that can be relied on.
    /// The first failure in a row is a warning: without the view, only a consumer holding
    /// no partition rejoins.
    async fn ask_about_group(&mut self) -> Result<Option<GroupView>, IngestError> {
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let group_id = self.group_id.clone();
        let answer =
            tokio::task::spawn_blocking(move || GroupView::fetch(&*consumer, &topic, &group_id))
                .await?;
        let failed_before = std::mem::replace(&mut self.group_undescribed, answer.is_err());
        match answer {
            Ok(Some(view)) => {
                debug!(
                    members = view.members,
                    partitions = view.partitions,
                    "group described"
                );
                Ok(Some(view))
            }
            Ok(None) => {
                debug!("group not settled or topic unknown; no view this time");
                Ok(None)
            }
            Err(error) if failed_before => {
                debug!(%error, "group still not described");
                Ok(None)
            }
            Err(error) => {
                warn!(%error, "could not describe the consumer group; retrying every 10 s");
                Ok(None)
            }
        }
    }

    fn assigned_partitions(&self) -> Result<Vec<i32>, IngestError> {
        let assignment = self.consumer.assignment()?;
        let partitions = assignment
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        drop(assignment);
        Ok(partitions)
    }

    /// Converts, dead-letters and appends the pending batch.
    async fn flush(&mut self, token: &CancellationToken) -> Result<(), IngestError> {
        self.drop_revoked();
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.pending);
        let fresh = self.skip_already_seen(batch);

        let converter = self.converter.clone();
        let now = now_ms();
        let converted: Vec<Converted> = tokio::task::spawn_blocking(move || {
            fresh
                .into_iter()
                .map(|m| {
                    let result = converter.convert(&m, now);
                    (m, result)
                })
                .collect()
        })
        .await?;

        if !self.dead_letter(&converted, token).await {
            // Shutdown interrupted a delivery: nothing of this batch is applied, nothing of it
            // is committed, and the next start reads it again.
            return Ok(());
        }
        self.apply(converted, now)
    }

    /// Drops messages the restored snapshot already accounts for.
    fn skip_already_seen(&self, batch: Vec<OwnedMessage>) -> Vec<OwnedMessage> {
        let state = self.shared.lock();
        let (fresh, seen): (Vec<_>, Vec<_>) = batch.into_iter().partition(|m| {
            state.offsets.position(m.topic(), m.partition(), m.offset()) == Position::New
        });
        drop(state);
        self.metrics.ingest.replayed.inc_by(seen.len() as u64);
        fresh
    }

    /// Delivers every rejection; false when shutdown interrupted a delivery.
    async fn dead_letter(&self, converted: &[Converted], token: &CancellationToken) -> bool {
        for (message, result) in converted {
            let Err(rejection) = result else { continue };
            let delivered = self
                .dead_letters
                .deliver(message, rejection, token, |error| {
                    self.metrics.ingest.dead_letter_failures.inc();
                    warn!(%error, "dead-letter delivery failed; retrying");
                })
                .await;
            if delivered.is_err() {
                return false;
            }
            self.metrics
                .ingest
                .rejected
                .with_label_values(&[rejection.reason.as_str()])
                .inc();
        }
        true
    }

    /// Appends accepted rows and advances offsets, under one lock.
    fn apply(&self, converted: Vec<Converted>, now: i64) -> Result<(), IngestError> {
        let ingest = &self.metrics.ingest;
        let mut state = self.shared.lock();
        let mut rows = Vec::new();
        let mut duplicates = 0_u64;

        for (message, result) in converted {
            ingest.received.inc();
            ingest
                .bytes
                .inc_by(message.payload().map_or(0, <[u8]>::len) as u64);
            state
                .offsets
                .advance(message.topic(), message.partition(), message.offset());
            let Ok(record) = result else { continue };
            if state.dedup.insert(&record.id) {
                rows.push(record);
            } else {
                duplicates += 1;
            }
        }

        let outcome = state.buffer.append(rows, now)?;
        let stats = state.buffer.stats();
        drop(state);

        ingest.accepted.inc_by(outcome.appended as u64);
        ingest
            .duplicates
            .inc_by(duplicates + outcome.duplicates as u64);
        self.metrics.record_buffer(&stats, &outcome.evicted);
        self.shared.notify_appended();
        Ok(())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
