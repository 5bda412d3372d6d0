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
use prometheus::{Encoder, IntGaugeVec, IntCounterVec, Opts, Registry, TextEncoder};

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

/// Every metric rebeld registers itself (the `process_*` family comes from the
/// `prometheus` crate's process collector).
pub const CATALOGUE: &[MetricSpec] = &[BUILD_INFO, HTTP_REQUESTS];

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
            .with_label_values(&[&facts.version, &facts.libtorch, &facts.librdkafka, &facts.device])
            .set(1);
        registry.register(Box::new(build_info))?;

        let http_requests = IntCounterVec::new(opts(HTTP_REQUESTS), HTTP_REQUESTS.labels)?;
        registry.register(Box::new(http_requests.clone()))?;

        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;

        Ok(Arc::new(Self {
            registry,
            http_requests,
        }))
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
        metrics.http_requests.with_label_values(&["api", "/healthz", "200"]).inc();

        let text = String::from_utf8(metrics.render()).expect("utf-8");
        for spec in CATALOGUE {
            assert!(text.contains(&format!("# TYPE {}", spec.name)), "{} missing", spec.name);
        }
        assert!(text.contains("libtorch=\"2.11.0\""), "{text}");
    }
}
