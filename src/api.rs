//! The daemon's HTTP API on `server.listen`. This part answers liveness and readiness.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::health::Readiness;
use crate::metrics::Metrics;

#[derive(Clone)]
struct ApiState {
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
}

/// The API router.
pub fn router(readiness: Arc<Readiness>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(ApiState { readiness, metrics })
}

/// Alive as long as the process answers.
async fn healthz(State(state): State<ApiState>) -> impl IntoResponse {
    count(&state, "/healthz", StatusCode::OK);
    (StatusCode::OK, "ok\n")
}

/// 200 when every readiness flag is up, else 503; the body lists the flags either way.
async fn readyz(State(state): State<ApiState>) -> impl IntoResponse {
    let report = state.readiness.report();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    count(&state, "/readyz", status);
    (status, Json(report))
}

fn count(state: &ApiState, route: &str, status: StatusCode) {
    state
        .metrics
        .http_requests
        .with_label_values(&["api", route, status.as_str()])
        .inc();
}
