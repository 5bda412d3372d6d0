//! `rebeld run`: wires the configured parts into one supervised tree of tasks.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::ApiParts;
use crate::buffer::{BufferLimits, SnapshotError};
use crate::checkpoint::{CheckpointStore, StoreError};
use crate::config::{Brokers, Config};
use crate::device::{device_name, DeviceUnavailable};
use crate::embedded_kafka::{EmbeddedKafka, EmbeddedKafkaError};
use crate::event::EventLimits;
use crate::health::Readiness;
use crate::http::{bind, serve, BindError};
use crate::ingest::convert::{ConvertSettings, Converter};
use crate::ingest::kafka::producer_config;
use crate::ingest::store::{IngestState, SharedBuffer, SnapshotStore};
use crate::ingest::{now_ms, Ingest, IngestError, IngestParts};
use crate::metrics::{BuildFacts, Metrics, MetricsError};
use crate::model::tokenizer::{PolicyTokenizer, TokenizerError};
use crate::notices::Announcer;
use crate::resume::{ResumeError, ResumeStore, BUFFER_FILE};
use crate::supervisor::{Supervisor, SupervisorError};
use crate::train::anchor::TrainControl;
use crate::train::task::TrainTask;
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
    /// Another rebeld holds the data folder.
    #[error(
        "data folder {path} is in use by another rebeld process (it holds {path}/{LOCK_FILE})"
    )]
    DataDirInUse {
        /// The folder.
        path: std::path::PathBuf,
    },
    /// A listener could not be opened.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The checkpoint store under `<data_dir>/versions` cannot be opened.
    #[error("checkpoint store: {0}")]
    Checkpoint(#[from] StoreError),
    /// The metric registry could not be built.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The embedded Kafka cluster did not start.
    #[error(transparent)]
    EmbeddedKafka(#[from] EmbeddedKafkaError),
    /// The policy's tokenizer could not be loaded from `model.path`.
    #[error("model.path = {path:?}: {source}")]
    Tokenizer {
        /// The model folder.
        path: std::path::PathBuf,
        /// Why loading failed.
        source: TokenizerError,
    },
    /// The buffer snapshot exists but cannot be restored.
    #[error(
        "cannot restore the buffer snapshot ({0}); to start with an empty buffer, move the file \
         aside: consumption then resumes at the group's committed offsets"
    )]
    Snapshot(#[from] SnapshotError),
    /// The resume folder cannot be opened.
    #[error(transparent)]
    Resume(#[from] ResumeError),
    /// The consumer could not start.
    #[error(transparent)]
    Ingest(#[from] IngestError),
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
    let _lock = lock_data_dir(&config)?;

    let metrics = Metrics::new(&BuildFacts {
        version: REBELD_VERSION.to_owned(),
        libtorch: LIBTORCH_VERSION.to_owned(),
        librdkafka: versions.librdkafka.clone(),
        device: device_name(device),
    })?;
    if let tch::Device::Cuda(index) = device {
        metrics.watch_cuda_memory(index)?;
    }
    let readiness = Readiness::new();
    let api_listener = bind(config.server.listen, "server.listen").await?;
    let metrics_listener = bind(config.metrics.listen, "metrics.listen").await?;

    let mut supervisor = Supervisor::new();
    let metrics_router = metrics.router();
    supervisor.spawn("metrics", |token| async move {
        Ok(serve(metrics_listener, metrics_router, token).await?)
    });
    let store = CheckpointStore::open(
        &config.runtime.data_dir.join("versions"),
        config.checkpoint.keep_versions,
    )?;
    readiness.set_version_servable(store.latest().is_some());
    let api_parts = ApiParts {
        readiness: readiness.clone(),
        metrics: metrics.clone(),
        store: Some(store.clone()),
        server: config.server.clone(),
        shutdown: CancellationToken::new(),
    };
    supervisor.spawn("api", |token| {
        let api_router = crate::api::router(ApiParts {
            shutdown: token.clone(),
            ..api_parts
        });
        async move { Ok(serve(api_listener, api_router, token).await?) }
    });
    let brokers = start_brokers(&config, &mut supervisor)?;
    let resume = Arc::new(ResumeStore::open(&config.runtime.data_dir)?);
    let shared = restore_buffer(&config, &resume)?;
    metrics.record_buffer(&shared.lock().buffer.stats(), &Default::default());
    let tokenizer = load_tokenizer(&config)?;

    // Announcements start before the trainer, which may promote its first version at once.
    if let Some(announcer) = announcer(&config, &brokers, store.clone(), metrics.clone())? {
        supervisor.spawn("notices", |token| async move {
            announcer.run(token).await;
            Ok(())
        });
    }

    // The trainer starts before ingest so that it stops after it: its final resume state then
    // holds every event ingest appended.
    let trainer = TrainTask {
        train: config.train.clone(),
        model: config.model.clone(),
        buffer: config.buffer.clone(),
        tokenizer: tokenizer.clone(),
        device,
        shared: shared.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        resume: resume.clone(),
        resume_every: config.buffer.snapshot_every,
        checkpoint: config.checkpoint.clone(),
        store,
        control: Arc::new(TrainControl::new()),
    };
    supervisor.spawn("trainer", |token| async move {
        tokio::task::spawn_blocking(move || trainer.run(&token)).await??;
        Ok(())
    });
    let ingest = start_ingest(
        &config,
        &brokers,
        tokenizer,
        shared,
        &resume,
        metrics.clone(),
        readiness.clone(),
    )?;
    supervisor.spawn(
        "ingest",
        |token| async move { Ok(ingest.run(token).await?) },
    );

    info!(
        device = %device_name(device),
        api = %config.server.listen,
        metrics = %config.metrics.listen,
        brokers = %brokers,
        objective = ?config.train.objective,
        "rebeld started"
    );
    supervisor
        .run(stop, config.runtime.shutdown_timeout)
        .await?;
    info!("rebeld stopped");
    Ok(())
}

/// File in the data folder that a running daemon holds an exclusive lock on.
pub const LOCK_FILE: &str = "rebeld.lock";

/// Takes the data folder for this process: two daemons writing one snapshot would each
/// overwrite the other's rows. The lock lasts as long as the returned file is open.
fn lock_data_dir(config: &Config) -> Result<std::fs::File, DaemonError> {
    let path = &config.runtime.data_dir;
    let io_error = |source| DaemonError::DataDir {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.join(LOCK_FILE))
        .map_err(io_error)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(DaemonError::DataDirInUse { path: path.clone() })
        }
        Err(std::fs::TryLockError::Error(source)) => Err(io_error(source)),
    }
}

/// The buffer of the newest resume state (or of a snapshot in the layout before resume
/// states), or an empty buffer; its offsets are declared durable.
fn restore_buffer(config: &Config, resume: &ResumeStore) -> Result<Arc<SharedBuffer>, DaemonError> {
    let limits = buffer_limits(config);
    let window = config.buffer.dedup_window;
    let legacy = SnapshotStore::legacy_in_data_dir(&config.runtime.data_dir);
    let (restored, file) = match resume.latest() {
        Some(generation) => (
            resume.restore_buffer(limits, window, now_ms())?,
            generation.file(BUFFER_FILE),
        ),
        None => (
            legacy.restore(limits, window, now_ms())?,
            legacy.path().to_owned(),
        ),
    };

    let state = match restored {
        Some(mut state) => {
            if config.kafka.brokers == Brokers::Embedded {
                // The embedded cluster starts empty each time: offsets of the last one
                // would make the new one's messages look already seen.
                state.offsets = Default::default();
            }
            info!(
                rows = state.buffer.len(),
                partitions = state.offsets.as_map().len(),
                file = %file.display(),
                "buffer restored"
            );
            state
        }
        None => IngestState::new(limits, window),
    };
    resume.set_durable(state.offsets.clone());
    Ok(Arc::new(SharedBuffer::new(state)))
}

/// `[buffer]` bounds in the buffer's units.
pub fn buffer_limits(config: &Config) -> BufferLimits {
    BufferLimits {
        max_rows: config.buffer.max_rows,
        max_bytes: usize::try_from(config.buffer.max_bytes.bytes()).unwrap_or(usize::MAX),
        max_age_ms: u64::try_from(config.buffer.max_age.as_millis()).ok(),
    }
}

/// The policy's tokenizer, loaded once for ingest and the trainer.
fn load_tokenizer(config: &Config) -> Result<Arc<PolicyTokenizer>, DaemonError> {
    let tokenizer =
        PolicyTokenizer::from_dir(&config.model.path).map_err(|source| DaemonError::Tokenizer {
            path: config.model.path.clone(),
            source,
        })?;
    Ok(Arc::new(tokenizer))
}

/// The producer of promotion notices, unless `kafka.checkpoints_topic` is empty.
fn announcer(
    config: &Config,
    bootstrap: &str,
    store: CheckpointStore,
    metrics: Arc<Metrics>,
) -> Result<Option<Announcer>, DaemonError> {
    let topic = config.kafka.checkpoints_topic.clone();
    if topic.is_empty() {
        return Ok(None);
    }
    let producer = producer_config(&config.kafka, bootstrap)
        .create()
        .map_err(IngestError::from)?;
    Ok(Some(Announcer {
        store,
        producer,
        topic,
        public_url: config.server.public_url.clone(),
        metrics,
    }))
}

/// Creates the consumer.
fn start_ingest(
    config: &Config,
    bootstrap: &str,
    tokenizer: Arc<PolicyTokenizer>,
    shared: Arc<SharedBuffer>,
    resume: &ResumeStore,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
) -> Result<Ingest, DaemonError> {
    let converter = Converter::new(tokenizer, convert_settings(config));

    Ok(Ingest::start(IngestParts {
        kafka: config.kafka.clone(),
        bootstrap: bootstrap.to_owned(),
        converter,
        shared,
        durable: resume.durable_offsets(),
        commit_every: config.buffer.snapshot_every,
        metrics,
        readiness,
    })?)
}

/// Event limits and token limits from the configuration.
pub fn convert_settings(config: &Config) -> ConvertSettings {
    let known_objectives = config
        .train
        .strict_objectives
        .then(|| config.train.mixture.keys().cloned().collect());
    ConvertSettings {
        limits: EventLimits {
            max_bytes: usize::try_from(config.kafka.max_message_bytes.bytes())
                .unwrap_or(usize::MAX),
            strict_objectives: config.train.strict_objectives,
            known_objectives,
            ..EventLimits::default()
        },
        max_prompt_tokens: config.model.max_prompt_tokens,
        max_response_tokens: config.model.max_response_tokens,
        prompt_too_long: config.model.prompt_too_long,
        keep_text: config.buffer.keep_text,
    }
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
        let mut cluster = EmbeddedKafka::start(&config.kafka)?;
        let bootstrap = cluster.bootstrap_servers().to_owned();
        let file = cluster.write_bootstrap_file(&config.runtime.data_dir)?;
        info!(bootstrap = %bootstrap, file = %file.display(), "embedded Kafka cluster started");
        supervisor.spawn("embedded-kafka", |token| {
            hold_until_cancelled(cluster, token)
        });
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

/// SIGINT and SIGTERM handlers, installed before anything starts so an early signal is
/// never met by the default action (immediate termination).
pub struct TerminationSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl TerminationSignals {
    /// Installs the handlers; call from inside the runtime, first thing.
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};

        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Resolves on the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => info!(signal = "SIGINT", "signal received"),
            _ = self.terminate.recv() => info!(signal = "SIGTERM", "signal received"),
        }
    }
}
