//! `/v1/versions`: listing, manifests, the long-polled latest and the admin routes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::auth::Scope;
use super::{files, ApiError, Serving};
use crate::checkpoint::{CheckpointStore, StoreError};

/// The checkpoint routes.
pub(super) fn router(state: Arc<Serving>) -> Router {
    Router::new()
        .route("/v1/versions", get(list))
        .route("/v1/versions/latest", get(latest))
        .route("/v1/versions/{version}", get(manifest))
        .route("/v1/versions/{version}/files/{name}", get(files::download))
        .route(
            "/v1/versions/{version}/promote",
            post(admin(CheckpointStore::promote)),
        )
        .route(
            "/v1/versions/{version}/pin",
            post(admin(CheckpointStore::pin)).delete(admin(CheckpointStore::unpin)),
        )
        .with_state(state)
}

/// The handler of an admin route that runs `action`.
fn admin(
    action: AdminAction,
) -> impl Fn(State<Arc<Serving>>, HeaderMap, Path<String>) -> AdminFuture + Clone + Send + Sync {
    move |state, headers, version| Box::pin(admin_call(state, headers, version, action))
}

/// A version number from the path: decimal digits only, else 404.
pub(super) fn parse_version(text: &str) -> Result<u64, ApiError> {
    let valid = !text.is_empty() && text.len() <= 20 && text.bytes().all(|b| b.is_ascii_digit());
    valid
        .then(|| text.parse().ok())
        .flatten()
        .ok_or_else(|| ApiError::not_found(format!("no version {text:?}")))
}

async fn list(State(state): State<Arc<Serving>>, headers: HeaderMap) -> Result<Response, ApiError> {
    state.auth.check(&headers, Scope::Read)?;
    let (versions, latest) = state
        .blocking(|store| Ok((store.list(), store.latest())))
        .await?;
    let body = serde_json::json!({ "latest": latest, "versions": versions });
    Ok(Json(body).into_response())
}

/// `?after=N&wait=30s`.
#[derive(Deserialize)]
struct LatestQuery {
    after: Option<u64>,
    wait: Option<String>,
}

/// The latest manifest; with `after`, waits up to `wait` for a version newer than `after`
/// to become latest and answers 204 if none does. A rollback to an older version does not
/// end the wait.
async fn latest(
    State(state): State<Arc<Serving>>,
    headers: HeaderMap,
    Query(query): Query<LatestQuery>,
) -> Result<Response, ApiError> {
    state.auth.check(&headers, Scope::Read)?;
    let Some(after) = query.after else {
        let latest = state.store.latest().ok_or_else(none_yet)?;
        return manifest_of(&state, latest).await;
    };
    let wait = wait_duration(query.wait.as_deref(), state.max_long_poll)?;
    let mut latest = state.store.subscribe();
    let _waiting = InFlight::new(&state.metrics.serve.long_polls);
    let newer = |version: &Option<u64>| version.is_some_and(|v| v > after);
    tokio::select! {
        _ = tokio::time::timeout(wait, latest.wait_for(newer)) => {}
        () = state.shutdown.cancelled() => {}
    }
    match state.store.latest() {
        Some(version) if version > after => manifest_of(&state, version).await,
        _ => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

fn none_yet() -> ApiError {
    ApiError::not_found("no version has been promoted yet")
}

/// `wait` as a humantime duration (`30s`, `2m`), capped by `server.max_long_poll`.
fn wait_duration(text: Option<&str>, cap: Duration) -> Result<Duration, ApiError> {
    let Some(text) = text else {
        return Ok(Duration::ZERO);
    };
    let wait = humantime::parse_duration(text).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("wait = {text:?}: {error} (e.g. wait=30s)"),
        )
    })?;
    Ok(wait.min(cap))
}

async fn manifest_of(state: &Serving, version: u64) -> Result<Response, ApiError> {
    let manifest = state.blocking(move |store| store.manifest(version)).await?;
    Ok(Json(manifest).into_response())
}

async fn manifest(
    State(state): State<Arc<Serving>>,
    headers: HeaderMap,
    Path(version): Path<String>,
) -> Result<Response, ApiError> {
    state.auth.check(&headers, Scope::Read)?;
    manifest_of(&state, parse_version(&version)?).await
}

/// An admin action on one version.
type AdminAction = fn(&CheckpointStore, u64) -> Result<(), StoreError>;

/// What an admin route's handler returns.
type AdminFuture = Pin<Box<dyn Future<Output = Result<Response, ApiError>> + Send>>;

/// Runs an admin action on one version; answers the version's new listing row.
async fn admin_call(
    State(state): State<Arc<Serving>>,
    headers: HeaderMap,
    Path(version): Path<String>,
    action: AdminAction,
) -> Result<Response, ApiError> {
    state.auth.check(&headers, Scope::Admin)?;
    let version = parse_version(&version)?;
    let row = state
        .blocking(move |store| {
            action(store, version)?;
            let rows = store.list();
            Ok(rows.into_iter().find(|row| row.version == version))
        })
        .await?;
    Ok(Json(row).into_response())
}

/// Counts something in progress in a gauge for as long as it lives.
pub(super) struct InFlight(prometheus::IntGauge);

impl InFlight {
    pub(super) fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
