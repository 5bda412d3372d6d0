//! Serving an axum router as a supervised task.

use std::net::SocketAddr;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} ({purpose}): {source}")]
pub struct BindError {
    /// The address.
    pub address: SocketAddr,
    /// What the listener is for, e.g. `metrics.listen`.
    pub purpose: &'static str,
    /// The failure.
    pub source: std::io::Error,
}

/// Binds now, so a taken port fails start-up rather than a task later.
pub async fn bind(address: SocketAddr, purpose: &'static str) -> Result<TcpListener, BindError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| BindError {
            address,
            purpose,
            source,
        })
}

/// Serves until `token` fires, then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    token: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(token.cancelled_owned())
        .await
}
