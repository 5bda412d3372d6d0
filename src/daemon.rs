//! `rebeld run`: wires the configured parts into one supervised tree of tasks.

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{Brokers, Config};
use crate::device::{device_name, DeviceUnavailable};
use crate::embedded_kafka::{EmbeddedKafka, EmbeddedKafkaError};
use crate::health::Readiness;
use crate::http::{bind, serve, BindError};
use crate::metrics::{BuildFacts, Metrics, MetricsError};
use crate::supervisor::{Supervisor, SupervisorError};
use crate::version::{VersionReport, LIBTORCH_VERSION, REBELD_VERSION};

/// Why the daemon could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configured device is missing.
    #[error(transparent)]
    Device(#[from] DeviceUnavailable),
    /// The data folder cannot be created.
    #[error("cannot create data folder {path}: {source}")]
    DataDir {
        /// The folder.
        path: std::path::PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A listener could not be opened.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The metric registry could not be built.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The embedded Kafka cluster did not start.
    #[error(transparent)]
    EmbeddedKafka(#[from] EmbeddedKafkaError),
    /// A task failed, or shutdown overran its deadline.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
}

/// Runs the daemon until `stop` resolves or a task fails.
pub async fn run(
    config: Config,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let versions = VersionReport::collect();
    let device = versions.devices.resolve(config.runtime.device)?;
    configure_torch(&config);
    create_data_dir(&config)?;

    let metrics = Metrics::new(&BuildFacts {
        version: REBELD_VERSION.to_owned(),
        libtorch: LIBTORCH_VERSION.to_owned(),
        librdkafka: versions.librdkafka.clone(),
        device: device_name(device),
    })?;
    let readiness = Readiness::new();
    let api_listener = bind(config.server.listen, "server.listen").await?;
    let metrics_listener = bind(config.metrics.listen, "metrics.listen").await?;

    let mut supervisor = Supervisor::new();
    let metrics_router = metrics.router();
    supervisor.spawn("metrics", |token| async move {
        Ok(serve(metrics_listener, metrics_router, token).await?)
    });
    let api_router = crate::api::router(readiness.clone(), metrics.clone());
    supervisor.spawn("api", |token| async move {
        Ok(serve(api_listener, api_router, token).await?)
    });
    let brokers = start_brokers(&config, &mut supervisor)?;

    info!(
        device = %device_name(device),
        api = %config.server.listen,
        metrics = %config.metrics.listen,
        brokers = %brokers,
        objective = ?config.train.objective,
        "rebeld started"
    );
    supervisor.run(stop, config.runtime.shutdown_timeout).await?;
    info!("rebeld stopped");
    Ok(())
}

fn configure_torch(config: &Config) {
    if config.runtime.torch_threads > 0 {
        let threads = i32::try_from(config.runtime.torch_threads).unwrap_or(i32::MAX);
        tch::set_num_threads(threads);
    }
}

fn create_data_dir(config: &Config) -> Result<(), DaemonError> {
    let path = &config.runtime.data_dir;
    std::fs::create_dir_all(path).map_err(|source| DaemonError::DataDir {
        path: path.clone(),
        source,
    })
}

/// Starts the embedded cluster when configured; returns the bootstrap list either way.
fn start_brokers(config: &Config, supervisor: &mut Supervisor) -> Result<String, DaemonError> {
    let Brokers::Bootstrap(list) = &config.kafka.brokers else {
        let cluster = EmbeddedKafka::start(&config.kafka)?;
        let bootstrap = cluster.bootstrap_servers().to_owned();
        let file = cluster.write_bootstrap_file(&config.runtime.data_dir)?;
        info!(bootstrap = %bootstrap, file = %file.display(), "embedded Kafka cluster started");
        supervisor.spawn("embedded-kafka", |token| hold_until_cancelled(cluster, token));
        return Ok(bootstrap);
    };
    Ok(list.clone())
}

async fn hold_until_cancelled(
    cluster: EmbeddedKafka,
    token: CancellationToken,
) -> crate::supervisor::TaskResult {
    token.cancelled().await;
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};

    let (Ok(mut interrupt), Ok(mut terminate)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        tracing::error!("cannot install signal handlers; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => info!(signal = "SIGINT", "signal received"),
        _ = terminate.recv() => info!(signal = "SIGTERM", "signal received"),
    }
}
