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
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::buffer::{BufferStats, Evicted};

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

/// Every metric rebeld registers itself (the `process_*` family comes from the
/// `prometheus` crate's process collector).
pub const CATALOGUE: &[MetricSpec] = &[
    BUILD_INFO,
    HTTP_REQUESTS,
    ingest::RECEIVED,
    ingest::BYTES,
    ingest::ACCEPTED,
    ingest::REJECTED,
    ingest::DUPLICATES,
    ingest::REPLAYED,
    ingest::DEAD_LETTER_FAILURES,
    ingest::CONSUMER_ERRORS,
    ingest::CONSUMER_LAG,
    ingest::SNAPSHOT_SECONDS,
    ingest::SNAPSHOT_BYTES,
    ingest::ROWS,
    ingest::BUFFER_BYTES,
    ingest::EVICTIONS,
    ingest::EVICTED_NEVER_TRAINED,
];

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
        let collectors: [Box<dyn prometheus::core::Collector>; 15] = [
            Box::new(metrics.received.clone()),
            Box::new(metrics.bytes.clone()),
            Box::new(metrics.accepted.clone()),
            Box::new(metrics.rejected.clone()),
            Box::new(metrics.duplicates.clone()),
            Box::new(metrics.replayed.clone()),
            Box::new(metrics.dead_letter_failures.clone()),
            Box::new(metrics.consumer_errors.clone()),
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

        Ok(Arc::new(Self {
            registry,
            http_requests,
            ingest,
        }))
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
        for spec in CATALOGUE {
            assert!(
                text.contains(&format!("# TYPE {}", spec.name)),
                "{} missing",
                spec.name
            );
        }
        assert!(text.contains("libtorch=\"2.11.0\""), "{text}");
    }
}
