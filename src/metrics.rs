//! The metric catalogue: every name, help text, unit and label set in one place.
//!
//! Names follow `rebeld_<subject>_<unit>`, counters end in `_total`, units are base units
//! (seconds, bytes), and labels take values only from bounded sets. `/metrics` is served on
//! its own listener (`metrics.listen`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::buffer::{BufferStats, Evicted};
use crate::train::segments::{SegmentSummary, OTHER};
use crate::train::step::{SkipReason, StepReport};

/// A catalogue entry: name, help and label names. Tests check dashboards against this list.
#[derive(Clone, Copy, Debug)]
pub struct MetricSpec {
    /// Full metric name.
    pub name: &'static str,
    /// Help text shown by Prometheus.
    pub help: &'static str,
    /// Label names.
    pub labels: &'static [&'static str],
}

/// `rebeld_build_info{version, libtorch, librdkafka, device}` = 1.
pub const BUILD_INFO: MetricSpec = MetricSpec {
    name: "rebeld_build_info",
    help: "Build and runtime facts of this rebeld process; the value is always 1.",
    labels: &["version", "libtorch", "librdkafka", "device"],
};

/// `rebeld_device_memory_allocated_bytes{device}`, read from the CUDA caching allocator at
/// each scrape; present only when training on CUDA.
pub const DEVICE_MEMORY_ALLOCATED: MetricSpec = MetricSpec {
    name: "rebeld_device_memory_allocated_bytes",
    help: "Bytes in live tensors on the training GPU (torch.cuda.memory_allocated).",
    labels: &["device"],
};

/// `rebeld_device_memory_reserved_bytes{device}`, like [`DEVICE_MEMORY_ALLOCATED`].
pub const DEVICE_MEMORY_RESERVED: MetricSpec = MetricSpec {
    name: "rebeld_device_memory_reserved_bytes",
    help: "Bytes the CUDA caching allocator holds on the training GPU, live or cached \
           (torch.cuda.memory_reserved).",
    labels: &["device"],
};

/// Catalogue entries exported only by a process training on CUDA.
pub const CUDA_ONLY: &[MetricSpec] = &[DEVICE_MEMORY_ALLOCATED, DEVICE_MEMORY_RESERVED];

/// `rebeld_http_requests_total{listener, route, status}`.
pub const HTTP_REQUESTS: MetricSpec = MetricSpec {
    name: "rebeld_http_requests_total",
    help: "HTTP requests answered, by listener, route template and status code.",
    labels: &["listener", "route", "status"],
};

/// Ingest catalogue entries.
pub mod ingest {
    use super::MetricSpec;

    const fn spec(name: &'static str, help: &'static str) -> MetricSpec {
        MetricSpec {
            name,
            help,
            labels: &[],
        }
    }

    /// Messages consumed and accounted for (accepted, rejected or duplicate).
    pub const RECEIVED: MetricSpec = spec(
        "rebeld_ingest_events_total",
        "Messages consumed from the preference topic and accounted for.",
    );
    /// Bytes of message values consumed.
    pub const BYTES: MetricSpec = spec(
        "rebeld_ingest_bytes_total",
        "Bytes of message values consumed from the preference topic.",
    );
    /// Pairs appended to the buffer.
    pub const ACCEPTED: MetricSpec = spec(
        "rebeld_ingest_accepted_total",
        "Preference pairs appended to the buffer.",
    );
    /// Messages dead-lettered, by reason.
    pub const REJECTED: MetricSpec = MetricSpec {
        name: "rebeld_ingest_rejected_total",
        help: "Messages sent to the dead-letter topic, by rejection reason.",
        labels: &["reason"],
    };
    /// Duplicate event ids skipped.
    pub const DUPLICATES: MetricSpec = spec(
        "rebeld_ingest_duplicates_total",
        "Events skipped because their id was seen within the dedup window.",
    );
    /// Messages skipped after a restart because the snapshot already held them.
    pub const REPLAYED: MetricSpec = spec(
        "rebeld_ingest_replayed_total",
        "Messages redelivered after a restart that the restored snapshot already accounts for.",
    );
    /// Failed dead-letter delivery attempts.
    pub const DEAD_LETTER_FAILURES: MetricSpec = spec(
        "rebeld_ingest_dead_letter_failures_total",
        "Dead-letter delivery attempts that failed and were retried.",
    );
    /// Errors reported by the consumer.
    pub const CONSUMER_ERRORS: MetricSpec = spec(
        "rebeld_ingest_consumer_errors_total",
        "Errors the Kafka consumer reported while receiving.",
    );
    /// Rejoins after the group left this consumer short of partitions.
    pub const GROUP_REJOINS: MetricSpec = spec(
        "rebeld_ingest_group_rejoins_total",
        "Times the consumer left and rejoined its group after being starved of partitions.",
    );
    /// Messages behind the partition's high watermark.
    pub const CONSUMER_LAG: MetricSpec = MetricSpec {
        name: "rebeld_ingest_consumer_lag_messages",
        help:
            "Messages between the next offset the buffer holds and the partition's high watermark.",
        labels: &["partition"],
    };
    /// Snapshot write durations.
    pub const SNAPSHOT_SECONDS: MetricSpec = spec(
        "rebeld_buffer_snapshot_duration_seconds",
        "Time to write a buffer snapshot (compress, write, fsync, rename).",
    );
    /// Last snapshot size.
    pub const SNAPSHOT_BYTES: MetricSpec = spec(
        "rebeld_buffer_snapshot_size_bytes",
        "Size of the last buffer snapshot written.",
    );
    /// Rows held.
    pub const ROWS: MetricSpec = spec("rebeld_buffer_rows", "Preference pairs held in the buffer.");
    /// Bytes held.
    pub const BUFFER_BYTES: MetricSpec = spec(
        "rebeld_buffer_bytes",
        "Bytes of Arrow memory held by the buffer.",
    );
    /// Evictions by cause.
    pub const EVICTIONS: MetricSpec = MetricSpec {
        name: "rebeld_buffer_evictions_total",
        help: "Pairs evicted from the buffer, by cause (age or capacity).",
        labels: &["cause"],
    };
    /// Evicted before any training step used them.
    pub const EVICTED_NEVER_TRAINED: MetricSpec = spec(
        "rebeld_buffer_evicted_never_trained_total",
        "Pairs evicted before any training step used them.",
    );
}

/// Training catalogue entries.
pub mod train {
    use super::MetricSpec;

    const fn spec(name: &'static str, help: &'static str) -> MetricSpec {
        MetricSpec {
            name,
            help,
            labels: &[],
        }
    }

    /// Optimizer steps applied.
    pub const STEPS: MetricSpec = spec(
        "rebeld_train_steps_total",
        "Optimizer steps applied to the policy.",
    );
    /// Steps skipped, by cause.
    pub const SKIPPED: MetricSpec = MetricSpec {
        name: "rebeld_train_skipped_steps_total",
        help: "Training steps skipped with the weights untouched, by cause.",
        labels: &["cause"],
    };
    /// The schedule's position.
    pub const POSITION: MetricSpec = spec(
        "rebeld_train_step",
        "Optimizer updates applied to the policy since training began, across restarts.",
    );
    /// Resume state writes that failed.
    pub const RESUME_FAILURES: MetricSpec = spec(
        "rebeld_train_resume_write_failures_total",
        "Resume state writes that failed; offsets stay uncommitted until one succeeds.",
    );
    /// Pairs left out of training.
    pub const UNUSABLE: MetricSpec = spec(
        "rebeld_train_unusable_pairs_total",
        "Pairs left out of training, each counted once: no usable reward, a reward difference \
         out of range, or no response token to score.",
    );
    /// Mean pointwise loss.
    pub const LOSS: MetricSpec = spec(
        "rebeld_train_loss",
        "Mean pointwise REBEL loss of the last step.",
    );
    /// Robust objective.
    pub const ROBUST_LOSS: MetricSpec = spec(
        "rebeld_train_robust_loss",
        "The last step's objective: the worst case over the ambiguity set (the mean for rebel).",
    );
    /// Dual variable.
    pub const DUAL: MetricSpec = spec(
        "rebeld_train_dual_variable",
        "The dual variable of the last step: c* for chi2, the temperature for kl.",
    );
    /// Effective sample fraction.
    pub const ESS: MetricSpec = spec(
        "rebeld_train_effective_sample_fraction",
        "1 / sum of squared robust weights, as a fraction of the batch (1 = uniform).",
    );
    /// Largest weight.
    pub const MAX_WEIGHT: MetricSpec = spec(
        "rebeld_train_max_weight",
        "Largest robust weight of the last step.",
    );
    /// Zero-weight share.
    pub const ZERO_WEIGHTS: MetricSpec = spec(
        "rebeld_train_zero_weight_share",
        "Share of the last step's pairs whose robust weight is exactly zero.",
    );
    /// Gradient norm.
    pub const GRAD_NORM: MetricSpec = spec(
        "rebeld_train_gradient_norm",
        "Global L2 norm of the last step's gradient, before clipping.",
    );
    /// Learning rate.
    pub const LEARNING_RATE: MetricSpec = spec(
        "rebeld_train_learning_rate",
        "Learning rate of the last step.",
    );
    /// Tokens per second.
    pub const TOKENS_PER_SECOND: MetricSpec = spec(
        "rebeld_train_tokens_per_second",
        "Prompt and response tokens of the last step over its wall time.",
    );
    /// Wasserstein penalty.
    pub const PENALTY: MetricSpec = spec(
        "rebeld_train_wasserstein_penalty",
        "The last wasserstein step's gradient penalty: radius times the mean \
         embedding-gradient norm.",
    );
    /// Rollbacks.
    pub const ROLLBACKS: MetricSpec = spec(
        "rebeld_train_rollbacks_total",
        "Rollbacks to the last good weights and optimizer state after repeated skipped steps.",
    );
    /// Learning-rate multiplier.
    pub const LR_SCALE: MetricSpec = spec(
        "rebeld_train_learning_rate_scale",
        "Multiplier on the scheduled learning rate; halved at each rollback.",
    );
    /// Stale pairs.
    pub const STALE: MetricSpec = spec(
        "rebeld_train_stale_pairs_total",
        "Sampled pairs left out because their policy version is older than train.max_staleness.",
    );
    /// Anchor refreshes.
    pub const ANCHOR_REFRESHES: MetricSpec = spec(
        "rebeld_train_anchor_refreshes_total",
        "Times the anchor policy was replaced by a copy of the trained policy.",
    );
    /// Anchor version.
    pub const ANCHOR_VERSION: MetricSpec = spec(
        "rebeld_train_anchor_version",
        "Refreshes of the anchor policy since start (0: the initial model).",
    );
    /// Per-segment mean loss.
    pub const SEGMENT_LOSS: MetricSpec = MetricSpec {
        name: "rebeld_train_segment_loss",
        help: "Mean pointwise loss of the last step's pairs of each segment (configured or other).",
        labels: &["segment"],
    };
    /// Per-segment weight.
    pub const SEGMENT_WEIGHT: MetricSpec = MetricSpec {
        name: "rebeld_train_segment_weight",
        help: "Total objective weight of the last step's pairs of each segment \
             (configured or other).",
        labels: &["segment"],
    };
    /// Step duration.
    pub const STEP_SECONDS: MetricSpec = spec(
        "rebeld_train_step_duration_seconds",
        "Wall time of a training step (anchor log-probs, forward, backward, optimizer).",
    );
}

/// Checkpoint serving catalogue entries.
pub mod serve {
    use super::MetricSpec;

    const fn spec(name: &'static str, help: &'static str) -> MetricSpec {
        MetricSpec {
            name,
            help,
            labels: &[],
        }
    }

    /// Downloads streaming now.
    pub const DOWNLOADS_IN_FLIGHT: MetricSpec = spec(
        "rebeld_serve_downloads_in_flight",
        "Checkpoint file downloads being streamed now.",
    );
    /// Body bytes of checkpoint files sent.
    pub const BYTES: MetricSpec = spec(
        "rebeld_serve_bytes_total",
        "Bytes of checkpoint file bodies sent to clients.",
    );
    /// Downloads refused at the cap.
    pub const REFUSED: MetricSpec = spec(
        "rebeld_serve_downloads_refused_total",
        "Downloads answered 503 because server.max_concurrent_downloads were in progress.",
    );
    /// Long polls waiting.
    pub const LONG_POLLS: MetricSpec = spec(
        "rebeld_serve_long_polls_waiting",
        "Requests waiting on GET /v1/versions/latest?after=N for a newer version.",
    );
}

/// Publication catalogue entries.
pub mod checkpoint {
    use super::MetricSpec;

    const fn spec(name: &'static str, help: &'static str) -> MetricSpec {
        MetricSpec {
            name,
            help,
            labels: &[],
        }
    }

    /// Versions promoted to latest by the trainer.
    pub const PUBLISHED: MetricSpec = spec(
        "rebeld_checkpoint_versions_published_total",
        "Versions that passed every publication gate and became latest.",
    );
    /// Versions rejected, by the gate that failed.
    pub const REJECTED: MetricSpec = MetricSpec {
        name: "rebeld_checkpoint_versions_rejected_total",
        help: "Versions kept as rejected, by failed gate (a version failing two counts twice).",
        labels: &["gate"],
    };
    /// Publications that failed outright.
    pub const FAILURES: MetricSpec = spec(
        "rebeld_checkpoint_publish_failures_total",
        "Publication attempts that failed before a version was committed (I/O, scoring).",
    );
    /// The latest version.
    pub const LATEST: MetricSpec = spec(
        "rebeld_checkpoint_latest_version",
        "The version inference hosts pull as latest.",
    );
    /// Publication time.
    pub const PUBLISH_SECONDS: MetricSpec = spec(
        "rebeld_checkpoint_publish_duration_seconds",
        "Time to save, judge and commit a version.",
    );
    /// Bytes of committed versions.
    pub const BYTES_WRITTEN: MetricSpec = spec(
        "rebeld_checkpoint_bytes_written_total",
        "Bytes of files committed in versions.",
    );
    /// Notices not produced.
    pub const NOTICE_FAILURES: MetricSpec = spec(
        "rebeld_checkpoint_notice_failures_total",
        "Promotion notices that could not be produced to kafka.checkpoints_topic.",
    );
}

/// Every metric rebeld registers itself (the `process_*` family comes from the
/// `prometheus` crate's process collector).
pub const CATALOGUE: &[MetricSpec] = &[
    BUILD_INFO,
    DEVICE_MEMORY_ALLOCATED,
    DEVICE_MEMORY_RESERVED,
    HTTP_REQUESTS,
    ingest::RECEIVED,
    ingest::BYTES,
    ingest::ACCEPTED,
    ingest::REJECTED,
    ingest::DUPLICATES,
    ingest::REPLAYED,
    ingest::DEAD_LETTER_FAILURES,
    ingest::CONSUMER_ERRORS,
    ingest::GROUP_REJOINS,
    ingest::CONSUMER_LAG,
    ingest::SNAPSHOT_SECONDS,
    ingest::SNAPSHOT_BYTES,
    ingest::ROWS,
    ingest::BUFFER_BYTES,
    ingest::EVICTIONS,
    ingest::EVICTED_NEVER_TRAINED,
    train::STEPS,
    train::SKIPPED,
    train::POSITION,
    train::RESUME_FAILURES,
    train::UNUSABLE,
    train::LOSS,
    train::ROBUST_LOSS,
    train::DUAL,
    train::ESS,
    train::MAX_WEIGHT,
    train::ZERO_WEIGHTS,
    train::GRAD_NORM,
    train::LEARNING_RATE,
    train::TOKENS_PER_SECOND,
    train::STEP_SECONDS,
    train::PENALTY,
    train::ROLLBACKS,
    train::LR_SCALE,
    train::STALE,
    train::ANCHOR_REFRESHES,
    train::ANCHOR_VERSION,
    train::SEGMENT_LOSS,
    train::SEGMENT_WEIGHT,
    checkpoint::PUBLISHED,
    checkpoint::REJECTED,
    checkpoint::FAILURES,
    checkpoint::LATEST,
    checkpoint::PUBLISH_SECONDS,
    checkpoint::BYTES_WRITTEN,
    checkpoint::NOTICE_FAILURES,
    serve::DOWNLOADS_IN_FLIGHT,
    serve::BYTES,
    serve::REFUSED,
    serve::LONG_POLLS,
];

/// Publication metrics.
#[derive(Clone)]
pub struct CheckpointMetrics {
    /// See [`checkpoint::PUBLISHED`].
    pub published: IntCounter,
    /// See [`checkpoint::REJECTED`].
    pub rejected: IntCounterVec,
    /// See [`checkpoint::FAILURES`].
    pub failures: IntCounter,
    /// See [`checkpoint::LATEST`].
    pub latest_version: IntGauge,
    /// See [`checkpoint::PUBLISH_SECONDS`].
    pub publish_seconds: Histogram,
    /// See [`checkpoint::BYTES_WRITTEN`].
    pub bytes_written: IntCounter,
    /// See [`checkpoint::NOTICE_FAILURES`].
    pub notice_failures: IntCounter,
}

impl CheckpointMetrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter = |spec: MetricSpec| IntCounter::with_opts(opts(spec));
        let seconds = checkpoint::PUBLISH_SECONDS;
        let metrics = Self {
            published: counter(checkpoint::PUBLISHED)?,
            rejected: IntCounterVec::new(opts(checkpoint::REJECTED), checkpoint::REJECTED.labels)?,
            failures: counter(checkpoint::FAILURES)?,
            latest_version: IntGauge::with_opts(opts(checkpoint::LATEST))?,
            publish_seconds: Histogram::with_opts(
                HistogramOpts::new(seconds.name, seconds.help)
                    .buckets(prometheus::exponential_buckets(0.05, 2.0, 14)?),
            )?,
            bytes_written: counter(checkpoint::BYTES_WRITTEN)?,
            notice_failures: counter(checkpoint::NOTICE_FAILURES)?,
        };
        // Every gate's series exists from the start, so rates and alerts see zeros.
        for gate in crate::train::gates::GATE_NAMES {
            metrics.rejected.with_label_values(&[gate]);
        }
        let collectors: [Box<dyn prometheus::core::Collector>; 7] = [
            Box::new(metrics.published.clone()),
            Box::new(metrics.rejected.clone()),
            Box::new(metrics.failures.clone()),
            Box::new(metrics.latest_version.clone()),
            Box::new(metrics.publish_seconds.clone()),
            Box::new(metrics.bytes_written.clone()),
            Box::new(metrics.notice_failures.clone()),
        ];
        for collector in collectors {
            registry.register(collector)?;
        }
        Ok(metrics)
    }
}

/// Checkpoint serving metrics.
#[derive(Clone)]
pub struct ServeMetrics {
    /// See [`serve::DOWNLOADS_IN_FLIGHT`].
    pub downloads_in_flight: IntGauge,
    /// See [`serve::BYTES`].
    pub bytes: IntCounter,
    /// See [`serve::REFUSED`].
    pub refused: IntCounter,
    /// See [`serve::LONG_POLLS`].
    pub long_polls: IntGauge,
}

impl ServeMetrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            downloads_in_flight: IntGauge::with_opts(opts(serve::DOWNLOADS_IN_FLIGHT))?,
            bytes: IntCounter::with_opts(opts(serve::BYTES))?,
            refused: IntCounter::with_opts(opts(serve::REFUSED))?,
            long_polls: IntGauge::with_opts(opts(serve::LONG_POLLS))?,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 4] = [
            Box::new(metrics.downloads_in_flight.clone()),
            Box::new(metrics.bytes.clone()),
            Box::new(metrics.refused.clone()),
            Box::new(metrics.long_polls.clone()),
        ];
        for collector in collectors {
            registry.register(collector)?;
        }
        Ok(metrics)
    }
}

/// Training metrics.
#[derive(Clone)]
pub struct TrainMetrics {
    /// See [`train::STEPS`].
    pub steps: IntCounter,
    /// See [`train::SKIPPED`].
    pub skipped: IntCounterVec,
    /// See [`train::POSITION`].
    pub position: IntGauge,
    /// See [`train::RESUME_FAILURES`].
    pub resume_failures: IntCounter,
    /// See [`train::UNUSABLE`].
    pub unusable_pairs: IntCounter,
    /// See [`train::LOSS`].
    pub loss: Gauge,
    /// See [`train::ROBUST_LOSS`].
    pub robust_loss: Gauge,
    /// See [`train::DUAL`].
    pub dual: Gauge,
    /// See [`train::ESS`].
    pub effective_sample_fraction: Gauge,
    /// See [`train::MAX_WEIGHT`].
    pub max_weight: Gauge,
    /// See [`train::ZERO_WEIGHTS`].
    pub zero_weight_share: Gauge,
    /// See [`train::GRAD_NORM`].
    pub gradient_norm: Gauge,
    /// See [`train::LEARNING_RATE`].
    pub learning_rate: Gauge,
    /// See [`train::TOKENS_PER_SECOND`].
    pub tokens_per_second: Gauge,
    /// See [`train::STEP_SECONDS`].
    pub step_seconds: Histogram,
    /// See [`train::PENALTY`].
    pub penalty: Gauge,
    /// See [`train::ROLLBACKS`].
    pub rollbacks: IntCounter,
    /// See [`train::LR_SCALE`].
    pub learning_rate_scale: Gauge,
    /// See [`train::STALE`].
    pub stale_pairs: IntCounter,
    /// See [`train::ANCHOR_REFRESHES`].
    pub anchor_refreshes: IntCounter,
    /// See [`train::ANCHOR_VERSION`].
    pub anchor_version: IntGauge,
    /// See [`train::SEGMENT_LOSS`].
    pub segment_loss: GaugeVec,
    /// See [`train::SEGMENT_WEIGHT`].
    pub segment_weight: GaugeVec,
}

impl TrainMetrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge = |spec: MetricSpec| Gauge::with_opts(opts(spec));
        let metrics = Self {
            steps: IntCounter::with_opts(opts(train::STEPS))?,
            skipped: IntCounterVec::new(opts(train::SKIPPED), train::SKIPPED.labels)?,
            position: IntGauge::with_opts(opts(train::POSITION))?,
            resume_failures: IntCounter::with_opts(opts(train::RESUME_FAILURES))?,
            unusable_pairs: IntCounter::with_opts(opts(train::UNUSABLE))?,
            loss: gauge(train::LOSS)?,
            robust_loss: gauge(train::ROBUST_LOSS)?,
            dual: gauge(train::DUAL)?,
            effective_sample_fraction: gauge(train::ESS)?,
            max_weight: gauge(train::MAX_WEIGHT)?,
            zero_weight_share: gauge(train::ZERO_WEIGHTS)?,
            gradient_norm: gauge(train::GRAD_NORM)?,
            learning_rate: gauge(train::LEARNING_RATE)?,
            tokens_per_second: gauge(train::TOKENS_PER_SECOND)?,
            step_seconds: Histogram::with_opts(
                HistogramOpts::new(train::STEP_SECONDS.name, train::STEP_SECONDS.help)
                    .buckets(prometheus::exponential_buckets(0.01, 2.0, 14)?),
            )?,
            penalty: gauge(train::PENALTY)?,
            rollbacks: IntCounter::with_opts(opts(train::ROLLBACKS))?,
            learning_rate_scale: gauge(train::LR_SCALE)?,
            stale_pairs: IntCounter::with_opts(opts(train::STALE))?,
            anchor_refreshes: IntCounter::with_opts(opts(train::ANCHOR_REFRESHES))?,
            anchor_version: IntGauge::with_opts(opts(train::ANCHOR_VERSION))?,
            segment_loss: GaugeVec::new(opts(train::SEGMENT_LOSS), train::SEGMENT_LOSS.labels)?,
            segment_weight: GaugeVec::new(
                opts(train::SEGMENT_WEIGHT),
                train::SEGMENT_WEIGHT.labels,
            )?,
        };
        metrics.learning_rate_scale.set(1.0);
        let collectors: [Box<dyn prometheus::core::Collector>; 23] = [
            Box::new(metrics.steps.clone()),
            Box::new(metrics.skipped.clone()),
            Box::new(metrics.position.clone()),
            Box::new(metrics.resume_failures.clone()),
            Box::new(metrics.unusable_pairs.clone()),
            Box::new(metrics.loss.clone()),
            Box::new(metrics.robust_loss.clone()),
            Box::new(metrics.dual.clone()),
            Box::new(metrics.effective_sample_fraction.clone()),
            Box::new(metrics.max_weight.clone()),
            Box::new(metrics.zero_weight_share.clone()),
            Box::new(metrics.gradient_norm.clone()),
            Box::new(metrics.learning_rate.clone()),
            Box::new(metrics.tokens_per_second.clone()),
            Box::new(metrics.step_seconds.clone()),
            Box::new(metrics.penalty.clone()),
            Box::new(metrics.rollbacks.clone()),
            Box::new(metrics.learning_rate_scale.clone()),
            Box::new(metrics.stale_pairs.clone()),
            Box::new(metrics.anchor_refreshes.clone()),
            Box::new(metrics.anchor_version.clone()),
            Box::new(metrics.segment_loss.clone()),
            Box::new(metrics.segment_weight.clone()),
        ];
        for collector in collectors {
            registry.register(collector)?;
        }
        for cause in ["non_finite_loss", "non_finite_gradient"] {
            metrics.skipped.with_label_values(&[cause]);
        }
        metrics.register_segments(&[OTHER.to_owned()]);
        Ok(metrics)
    }

    /// Creates the per-segment series of `labels` (the configured segments and `other`), so
    /// that they exist before the first step.
    pub fn register_segments(&self, labels: &[String]) {
        for label in labels {
            // NaN until a step holds pairs of the segment: no data is not a zero loss.
            self.segment_loss
                .with_label_values(&[label.as_str()])
                .set(f64::NAN);
            self.segment_weight
                .with_label_values(&[label.as_str()])
                .set(0.0);
        }
    }

    /// The per-segment gauges after an applied step: each segment's total weight, and its
    /// mean loss when the step had pairs of it.
    pub fn record_segments(&self, summaries: &[SegmentSummary]) {
        for summary in summaries {
            let label = [summary.label.as_str()];
            self.segment_weight
                .with_label_values(&label)
                .set(summary.weight);
            if summary.pairs > 0 {
                self.segment_loss
                    .with_label_values(&label)
                    .set(summary.mean_loss);
            }
        }
    }
}

/// Ingest and buffer metrics.
#[derive(Clone)]
pub struct IngestMetrics {
    /// See [`ingest::RECEIVED`].
    pub received: IntCounter,
    /// See [`ingest::BYTES`].
    pub bytes: IntCounter,
    /// See [`ingest::ACCEPTED`].
    pub accepted: IntCounter,
    /// See [`ingest::REJECTED`].
    pub rejected: IntCounterVec,
    /// See [`ingest::DUPLICATES`].
    pub duplicates: IntCounter,
    /// See [`ingest::REPLAYED`].
    pub replayed: IntCounter,
    /// See [`ingest::DEAD_LETTER_FAILURES`].
    pub dead_letter_failures: IntCounter,
    /// See [`ingest::CONSUMER_ERRORS`].
    pub consumer_errors: IntCounter,
    /// See [`ingest::GROUP_REJOINS`].
    pub group_rejoins: IntCounter,
    /// See [`ingest::CONSUMER_LAG`].
    pub consumer_lag: IntGaugeVec,
    /// See [`ingest::SNAPSHOT_SECONDS`].
    pub snapshot_seconds: Histogram,
    /// See [`ingest::SNAPSHOT_BYTES`].
    pub snapshot_bytes: IntGauge,
    /// See [`ingest::ROWS`].
    pub rows: IntGauge,
    /// See [`ingest::BUFFER_BYTES`].
    pub buffer_bytes: IntGauge,
    /// See [`ingest::EVICTIONS`].
    pub evictions: IntCounterVec,
    /// See [`ingest::EVICTED_NEVER_TRAINED`].
    pub evicted_never_trained: IntCounter,
}

impl IngestMetrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            received: IntCounter::with_opts(opts(ingest::RECEIVED))?,
            bytes: IntCounter::with_opts(opts(ingest::BYTES))?,
            accepted: IntCounter::with_opts(opts(ingest::ACCEPTED))?,
            rejected: IntCounterVec::new(opts(ingest::REJECTED), ingest::REJECTED.labels)?,
            duplicates: IntCounter::with_opts(opts(ingest::DUPLICATES))?,
            replayed: IntCounter::with_opts(opts(ingest::REPLAYED))?,
            dead_letter_failures: IntCounter::with_opts(opts(ingest::DEAD_LETTER_FAILURES))?,
            consumer_errors: IntCounter::with_opts(opts(ingest::CONSUMER_ERRORS))?,
            group_rejoins: IntCounter::with_opts(opts(ingest::GROUP_REJOINS))?,
            consumer_lag: IntGaugeVec::new(
                opts(ingest::CONSUMER_LAG),
                ingest::CONSUMER_LAG.labels,
            )?,
            snapshot_seconds: Histogram::with_opts(
                HistogramOpts::new(ingest::SNAPSHOT_SECONDS.name, ingest::SNAPSHOT_SECONDS.help)
                    .buckets(prometheus::exponential_buckets(0.005, 2.0, 14)?),
            )?,
            snapshot_bytes: IntGauge::with_opts(opts(ingest::SNAPSHOT_BYTES))?,
            rows: IntGauge::with_opts(opts(ingest::ROWS))?,
            buffer_bytes: IntGauge::with_opts(opts(ingest::BUFFER_BYTES))?,
            evictions: IntCounterVec::new(opts(ingest::EVICTIONS), ingest::EVICTIONS.labels)?,
            evicted_never_trained: IntCounter::with_opts(opts(ingest::EVICTED_NEVER_TRAINED))?,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 16] = [
            Box::new(metrics.received.clone()),
            Box::new(metrics.bytes.clone()),
            Box::new(metrics.accepted.clone()),
            Box::new(metrics.rejected.clone()),
            Box::new(metrics.duplicates.clone()),
            Box::new(metrics.replayed.clone()),
            Box::new(metrics.dead_letter_failures.clone()),
            Box::new(metrics.consumer_errors.clone()),
            Box::new(metrics.group_rejoins.clone()),
            Box::new(metrics.consumer_lag.clone()),
            Box::new(metrics.snapshot_seconds.clone()),
            Box::new(metrics.snapshot_bytes.clone()),
            Box::new(metrics.rows.clone()),
            Box::new(metrics.buffer_bytes.clone()),
            Box::new(metrics.evictions.clone()),
            Box::new(metrics.evicted_never_trained.clone()),
        ];
        for collector in collectors {
            registry.register(collector)?;
        }
        for reason in crate::event::RejectReason::ALL {
            metrics.rejected.with_label_values(&[reason.as_str()]);
        }
        for cause in ["age", "capacity"] {
            metrics.evictions.with_label_values(&[cause]);
        }
        Ok(metrics)
    }
}

/// Failure to build the registry: a catalogue entry is malformed or registered twice.
#[derive(Debug, thiserror::Error)]
#[error("metric registry: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Handles to every metric, cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// See [`HTTP_REQUESTS`].
    pub http_requests: IntCounterVec,
    /// Ingest and buffer.
    pub ingest: IngestMetrics,
    /// Training.
    pub train: TrainMetrics,
    /// Publication.
    pub checkpoint: CheckpointMetrics,
    /// Checkpoint serving.
    pub serve: ServeMetrics,
}

/// Facts reported by [`BUILD_INFO`].
#[derive(Clone, Debug)]
pub struct BuildFacts {
    /// rebeld's version.
    pub version: String,
    /// libtorch's version.
    pub libtorch: String,
    /// librdkafka's version.
    pub librdkafka: String,
    /// The training device.
    pub device: String,
}

impl Metrics {
    /// Registers the catalogue.
    pub fn new(facts: &BuildFacts) -> Result<Arc<Self>, MetricsError> {
        let registry = Registry::new();

        let build_info = IntGaugeVec::new(opts(BUILD_INFO), BUILD_INFO.labels)?;
        build_info
            .with_label_values(&[
                &facts.version,
                &facts.libtorch,
                &facts.librdkafka,
                &facts.device,
            ])
            .set(1);
        registry.register(Box::new(build_info))?;

        let http_requests = IntCounterVec::new(opts(HTTP_REQUESTS), HTTP_REQUESTS.labels)?;
        registry.register(Box::new(http_requests.clone()))?;

        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        let ingest = IngestMetrics::register(&registry)?;
        let train = TrainMetrics::register(&registry)?;
        let checkpoint = CheckpointMetrics::register(&registry)?;
        let serve = ServeMetrics::register(&registry)?;

        Ok(Arc::new(Self {
            registry,
            http_requests,
            ingest,
            train,
            checkpoint,
            serve,
        }))
    }

    /// Exports the caching allocator's byte counts for CUDA device `index`, read at each
    /// scrape; the families stay empty while the allocator cannot answer.
    pub fn watch_cuda_memory(&self, index: usize) -> Result<(), MetricsError> {
        let device = crate::device::device_name(tch::Device::Cuda(index));
        let gauge =
            |spec: MetricSpec| IntGauge::with_opts(opts(spec).const_label("device", &device));
        self.registry.register(Box::new(CudaMemoryCollector {
            index,
            allocated: gauge(DEVICE_MEMORY_ALLOCATED)?,
            reserved: gauge(DEVICE_MEMORY_RESERVED)?,
        }))?;
        Ok(())
    }

    /// Gauges and counters after a training step.
    pub fn record_step(&self, report: &StepReport, elapsed: std::time::Duration) {
        let train = &self.train;
        train.step_seconds.observe(elapsed.as_secs_f64());
        if report.rolled_back {
            train.rollbacks.inc();
        }
        if let Some(cause) = report.skipped {
            let label = match cause {
                SkipReason::NonFiniteLoss => "non_finite_loss",
                SkipReason::NonFiniteGradient => "non_finite_gradient",
            };
            train.skipped.with_label_values(&[label]).inc();
            return;
        }
        train.steps.inc();
        train.loss.set(report.loss);
        train.robust_loss.set(report.robust_loss);
        if report.dual.is_finite() {
            train.dual.set(report.dual);
        }
        if report.penalty.is_finite() {
            train.penalty.set(report.penalty);
        }
        train
            .effective_sample_fraction
            .set(report.effective_sample_fraction);
        train.max_weight.set(report.max_weight);
        train.zero_weight_share.set(report.zero_weight_share);
        train.gradient_norm.set(report.grad_norm);
        train.learning_rate.set(report.learning_rate);
        train
            .tokens_per_second
            .set(report.tokens as f64 / elapsed.as_secs_f64().max(1e-9));
    }

    /// Buffer gauges after an append, and the evictions it caused.
    pub fn record_buffer(&self, stats: &BufferStats, evicted: &Evicted) {
        let ingest = &self.ingest;
        ingest.rows.set(stats.rows as i64);
        ingest.buffer_bytes.set(stats.bytes as i64);
        ingest
            .evictions
            .with_label_values(&["age"])
            .inc_by(evicted.expired);
        ingest
            .evictions
            .with_label_values(&["capacity"])
            .inc_by(evicted.over_capacity);
        ingest.evicted_never_trained.inc_by(evicted.never_trained);
    }

    /// The text exposition format of every registered metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buffer = Vec::new();
        let families = self.registry.gather();
        if let Err(error) = TextEncoder::new().encode(&families, &mut buffer) {
            tracing::warn!(%error, "cannot encode metrics");
        }
        buffer
    }

    /// The `/metrics` router.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/metrics", get(scrape))
            .with_state(self.clone())
    }
}

/// The GPU memory gauges, refreshed from the allocator when Prometheus scrapes.
struct CudaMemoryCollector {
    index: usize,
    allocated: IntGauge,
    reserved: IntGauge,
}

impl Collector for CudaMemoryCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.allocated.desc();
        descs.extend(self.reserved.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(memory) = crate::device::cuda_memory(self.index) else {
            return Vec::new();
        };
        self.allocated
            .set(i64::try_from(memory.allocated_bytes).unwrap_or(i64::MAX));
        self.reserved
            .set(i64::try_from(memory.reserved_bytes).unwrap_or(i64::MAX));

        let mut families = self.allocated.collect();
        families.extend(self.reserved.collect());
        families
    }
}

fn opts(spec: MetricSpec) -> Opts {
    Opts::new(spec.name, spec.help)
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    metrics
        .http_requests
        .with_label_values(&["metrics", "/metrics", "200"])
        .inc();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> BuildFacts {
        BuildFacts {
            version: "0.0.0".into(),
            libtorch: "2.11.0".into(),
            librdkafka: "2.12.1".into(),
            device: "cpu".into(),
        }
    }

    #[test]
    fn catalogue_names_follow_the_template() {
        for spec in CATALOGUE {
            assert!(spec.name.starts_with("rebeld_"), "{}", spec.name);
            assert!(!spec.help.is_empty(), "{}", spec.name);
        }
    }

    #[test]
    fn rendering_exposes_every_catalogued_family() {
        let metrics = Metrics::new(&facts()).expect("registry");
        metrics
            .http_requests
            .with_label_values(&["api", "/healthz", "200"])
            .inc();
        metrics.ingest.consumer_lag.with_label_values(&["0"]).set(3);

        let text = String::from_utf8(metrics.render()).expect("utf-8");
        let on_cuda_only = |spec: &MetricSpec| CUDA_ONLY.iter().any(|c| c.name == spec.name);
        for spec in CATALOGUE.iter().filter(|spec| !on_cuda_only(spec)) {
            assert!(
                text.contains(&format!("# TYPE {}", spec.name)),
                "{} missing",
                spec.name
            );
        }
        assert!(text.contains("libtorch=\"2.11.0\""), "{text}");
    }

    #[test]
    fn gpu_memory_families_appear_only_when_the_allocator_answers() {
        let metrics = Metrics::new(&facts()).expect("registry");
        metrics.watch_cuda_memory(0).expect("register");

        let text = String::from_utf8(metrics.render()).expect("utf-8");
        match crate::device::cuda_memory(0) {
            None => {
                for spec in CUDA_ONLY {
                    assert!(
                        !text.contains(spec.name),
                        "{} exported without a GPU",
                        spec.name
                    );
                }
            }
            Some(memory) => {
                let line = format!("{}{{device=\"cuda:0\"}} ", DEVICE_MEMORY_RESERVED.name);
                let exported: u64 = text
                    .lines()
                    .find_map(|l| l.strip_prefix(line.as_str()))
                    .and_then(|value| value.parse().ok())
                    .expect("reserved bytes exported");
                assert!(exported >= memory.allocated_bytes, "{text}");
            }
        }
    }
}
