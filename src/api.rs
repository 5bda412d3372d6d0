//! The daemon's HTTP API on `server.listen`: liveness, readiness and the checkpoint API
//! (`/v1/versions…`, see the README for the routes and their rules).

mod auth;
mod files;
mod versions;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{CheckpointStore, StoreError};
use crate::config::ServerConfig;
use crate::health::Readiness;
use crate::metrics::Metrics;

/// What the API router serves.
pub struct ApiParts {
    /// Readiness flags behind `/readyz`.
    pub readiness: Arc<Readiness>,
    /// The metric catalogue (requests, downloads).
    pub metrics: Arc<Metrics>,
    /// The checkpoint store; without one, only `/healthz` and `/readyz` are served.
    pub store: Option<CheckpointStore>,
    /// `[server]`: tokens, timeouts, download cap, long-poll cap.
    pub server: ServerConfig,
    /// Fired at shutdown: long polls answer at once and downloads in flight are cut (the
    /// client resumes them with `Range`).
    pub shutdown: CancellationToken,
}

/// The API router.
pub fn router(parts: ApiParts) -> Router {
    let health = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(parts.readiness);
    let router = match parts.store {
        Some(store) => health.merge(versions::router(Arc::new(Serving::new(
            store,
            &parts.server,
            parts.metrics.clone(),
            parts.shutdown,
        )))),
        None => health,
    };
    router.layer(axum::middleware::from_fn(json_errors)).layer(
        axum::middleware::from_fn_with_state(parts.metrics, count_requests),
    )
}

/// State of the checkpoint routes.
struct Serving {
    store: CheckpointStore,
    auth: auth::Auth,
    downloads: Arc<Semaphore>,
    request_timeout: Duration,
    max_long_poll: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Serving {
    fn new(
        store: CheckpointStore,
        server: &ServerConfig,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        let auth = auth::Auth::new(server);
        tracing::info!(
            open_reads = auth.reads_are_open(),
            read_tokens = server.read_tokens.len(),
            admin_tokens = server.admin_tokens.len(),
            "checkpoint API enabled"
        );
        Self {
            store,
            auth,
            downloads: Arc::new(Semaphore::new(server.max_concurrent_downloads)),
            request_timeout: server.request_timeout,
            max_long_poll: server.max_long_poll,
            metrics,
            shutdown,
        }
    }

    /// Runs a store call on a blocking thread, under `server.request_timeout`.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&CheckpointStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.store.clone();
        let task = tokio::task::spawn_blocking(move || call(&store));
        match tokio::time::timeout(self.request_timeout, task).await {
            Ok(Ok(result)) => result.map_err(ApiError::from),
            Ok(Err(join)) => Err(ApiError::internal(&join)),
            Err(_) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the request timed out (server.request_timeout)",
            )),
        }
    }
}

/// An error answer: a status and `{"error": "..."}`, plus headers where the status needs
/// them (`WWW-Authenticate`, `Retry-After`).
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    fn with_header(mut self, name: HeaderName, value: &'static str) -> Self {
        self.headers.push((name, HeaderValue::from_static(value)));
        self
    }

    fn internal(error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, "checkpoint API request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match &error {
            StoreError::UnknownVersion(_) | StoreError::UnknownFile { .. } => {
                Self::not_found(error.to_string())
            }
            StoreError::Rejected { .. } => Self::new(StatusCode::CONFLICT, error.to_string()),
            _ => Self::internal(&error),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "error": self.message }));
        let mut response = (self.status, body).into_response();
        response.headers_mut().extend(self.headers);
        response
    }
}

/// Alive as long as the process answers.
async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

/// 200 when every readiness flag is up, else 503; the body lists the flags either way.
async fn readyz(State(readiness): State<Arc<Readiness>>) -> impl IntoResponse {
    let report = readiness.report();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
}

/// Rewrites axum's own plain-text errors (bad query, bad path, no route, wrong method) as
/// `{"error": "..."}`, like every other error of this API.
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let is_error = response.status().is_client_error() || response.status().is_server_error();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if !is_error || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .ok()
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| {
            let reason = parts.status.canonical_reason().unwrap_or("error");
            reason.to_lowercase()
        });
    let mut rewritten = ApiError::new(parts.status, text).into_response();
    for name in [
        axum::http::header::ALLOW,
        axum::http::header::WWW_AUTHENTICATE,
    ] {
        if let Some(value) = parts.headers.get(&name) {
            rewritten.headers_mut().insert(name, value.clone());
        }
    }
    rewritten
}

/// Counts every answer by route template (never the raw path) and status.
async fn count_requests(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    metrics
        .http_requests
        .with_label_values(&["api", &route, response.status().as_str()])
        .inc();
    response
}
