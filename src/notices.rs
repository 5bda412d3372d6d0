//! Promotion notices: each time `latest` moves (a publication, an operator's promote or
//! rollback), a small JSON record goes to `kafka.checkpoints_topic` for fleets that prefer
//! listening to polling.
//!
//! ```json
//! {"version": 3, "manifest_url": "http://host:8080/v1/versions/3",
//!  "weights_sha256": "…", "created_at": "2026-12-04T19:20:21Z"}
//! ```
//!
//! The record's key is the version, so a compacted topic keeps one record per version. A
//! notice that cannot be produced is counted and logged; the pull API stays the source of
//! truth.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::checkpoint::{CheckpointStore, Manifest};
use crate::metrics::Metrics;

/// The weights file whose checksum a notice carries.
const WEIGHTS_FILE: &str = "model.safetensors";
/// How long one notice may wait for the broker's acknowledgement.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);

/// One promotion notice.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Notice {
    /// The new latest version.
    pub version: u64,
    /// Where its manifest is served.
    pub manifest_url: String,
    /// SHA-256 of its `model.safetensors`, lowercase hex.
    pub weights_sha256: Option<String>,
    /// When it was committed.
    pub created_at: String,
}

impl Notice {
    /// The notice of `manifest`, served under `public_url`.
    pub fn of(manifest: &Manifest, public_url: &str) -> Self {
        Self {
            version: manifest.version,
            manifest_url: format!("{public_url}/v1/versions/{}", manifest.version),
            weights_sha256: manifest.files.get(WEIGHTS_FILE).map(|f| f.sha256.clone()),
            created_at: manifest.created_at.clone(),
        }
    }
}

/// Produces a notice each time the store's latest version changes.
pub struct Announcer {
    /// The store watched.
    pub store: CheckpointStore,
    /// Producer of the notices.
    pub producer: FutureProducer,
    /// `kafka.checkpoints_topic`.
    pub topic: String,
    /// `server.public_url`.
    pub public_url: String,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Announcer {
    /// Announces until `token` fires. The version latest at start is not announced again.
    pub async fn run(self, token: CancellationToken) {
        let mut latest: watch::Receiver<Option<u64>> = self.store.subscribe();
        latest.mark_unchanged();
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                changed = latest.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
            let version = *latest.borrow_and_update();
            if let Some(version) = version {
                self.announce(version).await;
            }
        }
    }

    async fn announce(&self, version: u64) {
        let store = self.store.clone();
        let manifest = tokio::task::spawn_blocking(move || store.manifest(version)).await;
        let manifest = match manifest {
            Ok(Ok(manifest)) => manifest,
            Ok(Err(error)) => return self.failed(version, &error.to_string()),
            Err(error) => return self.failed(version, &error.to_string()),
        };
        let notice = Notice::of(&manifest, &self.public_url);
        let payload = serde_json::to_vec(&notice).unwrap_or_default();
        let key = version.to_string();
        let record = FutureRecord::to(&self.topic).key(&key).payload(&payload);
        match self.producer.send(record, PRODUCE_TIMEOUT).await {
            Ok(_) => info!(version, topic = %self.topic, "promotion notice produced"),
            Err((error, _)) => self.failed(version, &error.to_string()),
        }
    }

    fn failed(&self, version: u64, error: &str) {
        self.metrics.checkpoint.notice_failures.inc();
        warn!(version, topic = %self.topic, error, "promotion notice not produced");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on a broken expectation
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::checkpoint::manifest::MANIFEST_FORMAT;
    use crate::checkpoint::{FileEntry, GateReport, Lineage};

    #[test]
    fn a_notice_names_the_manifest_url_and_the_weights_checksum() {
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            version: 7,
            parent: Some(6),
            created_at: "2026-12-04T19:20:21Z".into(),
            files: BTreeMap::from([(
                WEIGHTS_FILE.to_owned(),
                FileEntry {
                    sha256: "ab".repeat(32),
                    size: 10,
                },
            )]),
            trainer_step: 40,
            objective: "chi2".into(),
            radius: 0.1,
            events_trained: 3,
            pairs_trained: 4,
            lineage: Lineage::default(),
            gates: GateReport {
                passed: true,
                checks: Vec::new(),
            },
        };
        let notice = Notice::of(&manifest, "https://fleet.example");
        let json = serde_json::to_value(&notice).unwrap();
        assert_eq!(json["manifest_url"], "https://fleet.example/v1/versions/7");
        assert_eq!(json["weights_sha256"], "ab".repeat(32));
        assert_eq!(json["version"], 7);
    }
}
