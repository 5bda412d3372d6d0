//! `kafka.brokers = "embedded"`: librdkafka's in-process mock cluster.
//!
//! The cluster lives on a dedicated thread (librdkafka's handle is not `Send`) for as long as
//! the daemon runs, with the preference, dead-letter and checkpoint topics created up front.
//! Its bootstrap address is random; it is logged and written to
//! `<data_dir>/embedded-brokers` so tools on the same host (`rebeld replay`) can reach it.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use rdkafka::mocking::MockCluster;

use crate::config::KafkaConfig;

/// File under `data_dir` holding the embedded cluster's bootstrap address.
pub const BOOTSTRAP_FILE: &str = "embedded-brokers";

/// Starting the embedded cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedKafkaError {
    /// librdkafka refused to create the cluster or a topic.
    #[error("embedded Kafka cluster: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The cluster thread ended before reporting its address.
    #[error("embedded Kafka cluster thread ended during start-up")]
    ThreadEnded,
    /// The bootstrap file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

/// A running mock cluster; dropping it stops the cluster.
pub struct EmbeddedKafka {
    bootstrap: String,
    bootstrap_file: Option<PathBuf>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EmbeddedKafka {
    /// Starts a one-broker cluster with the configured topics.
    pub fn start(kafka: &KafkaConfig) -> Result<Self, EmbeddedKafkaError> {
        let topics = [
            kafka.topic.clone(),
            kafka.dead_letter_topic.clone(),
            kafka.checkpoints_topic.clone(),
        ];
        let partitions = kafka.embedded_partitions;
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();

        let thread = thread::Builder::new()
            .name("embedded-kafka".into())
            .spawn(move || serve(&topics, partitions, &ready_tx, &stop_rx))
            .map_err(|source| EmbeddedKafkaError::Io {
                path: PathBuf::from("<thread>"),
                source,
            })?;

        let bootstrap = ready_rx
            .recv()
            .map_err(|_| EmbeddedKafkaError::ThreadEnded)??;
        Ok(Self {
            bootstrap,
            bootstrap_file: None,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The `bootstrap.servers` value of the cluster.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Writes the bootstrap address to `<data_dir>/embedded-brokers`.
    /// The file is removed when the cluster stops, so no tool dials a dead port.
    pub fn write_bootstrap_file(&mut self, data_dir: &Path) -> Result<PathBuf, EmbeddedKafkaError> {
        let path = data_dir.join(BOOTSTRAP_FILE);
        std::fs::write(&path, format!("{}\n", self.bootstrap)).map_err(|source| {
            EmbeddedKafkaError::Io {
                path: path.clone(),
                source,
            }
        })?;
        self.bootstrap_file = Some(path.clone());
        Ok(path)
    }
}

impl Drop for EmbeddedKafka {
    fn drop(&mut self) {
        if let Some(file) = self.bootstrap_file.take() {
            let _ = std::fs::remove_file(file);
        }
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

type Ready = Result<String, rdkafka::error::KafkaError>;

fn serve(
    topics: &[String],
    partitions: i32,
    ready: &mpsc::Sender<Ready>,
    stop: &mpsc::Receiver<()>,
) {
    let started = MockCluster::new(1).and_then(|cluster| {
        for topic in topics {
            cluster.create_topic(topic, partitions, 1)?;
        }
        Ok(cluster)
    });

    match started {
        Ok(cluster) => {
            let _ = ready.send(Ok(cluster.bootstrap_servers()));
            // Blocks until the sender is dropped; the cluster is dropped after.
            let _ = stop.recv();
            drop(cluster);
        }
        Err(error) => {
            let _ = ready.send(Err(error));
        }
    }
}
