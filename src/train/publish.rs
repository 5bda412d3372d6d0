//! Publication: the trainer's policy becomes a numbered version in the checkpoint store,
//! judged by the gates ([`super::gates`]) before it may become `latest`.
//!
//! A version is due after `checkpoint.publish_every_steps` updates or `checkpoint.publish_every`
//! since the last attempt, once `checkpoint.min_new_pairs` pairs were trained since the latest
//! version. It is written into a draft (weights in `checkpoint.dtype`, `config.json`, and the
//! tokenizer and generation files of the model folder), scored, and committed with its
//! manifest either way: promoted when every gate passed, kept as rejected otherwise.
//!
//! The gates compare the candidate with the latest version, whose weights the publisher keeps
//! in memory (reloaded from the store when an operator promotes another version), on
//! held-out events of the buffer. The first start publishes the initial model as version 1,
//! so inference hosts have something to pull from the beginning.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tch::nn::VarStore;
use tch::Device;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::anchor::{FrozenModel, TrainControl};
use super::gates::{self, all_finite, implicit_reward, is_held_out, Bounds, Measured};
use super::reward::RewardSpec;
use super::step::{pair_logprobs, pair_sequences, StepError};
use crate::checkpoint::{
    version_dir_name, CheckpointStore, GateCheck, GateReport, Lineage, Manifest, ManifestFields,
    PartitionRange, StoreError,
};
use crate::config::{CheckpointConfig, WeightDtype};
use crate::health::Readiness;
use crate::ingest::store::SharedBuffer;
use crate::metrics::Metrics;
use crate::model::llama::{Llama, ModelError};
use crate::model::logprobs::{Limits, LogprobError, Sequence};
use crate::model::weights::{SaveDtype, WEIGHTS_FILE};
use crate::resume::{SincePublish, TrainerProgress};

/// Reference log-probs kept for held-out events before the cache starts over.
const MAX_CACHED_REFERENCE: usize = 65_536;

/// Files of the model folder published beside the weights, when present.
const MODEL_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Why a version could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The weights could not be saved or the latest version loaded.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A file of the model folder could not be copied.
    #[error("cannot copy {path} into the version: {source}")]
    Copy {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A file of the version could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// Scoring the held-out pairs failed.
    #[error("scoring held-out pairs: {0}")]
    Score(String),
    /// The daemon is stopping; the draft was discarded.
    #[error("interrupted by shutdown")]
    Interrupted,
}

impl From<StepError> for PublishError {
    fn from(error: StepError) -> Self {
        Self::Score(error.to_string())
    }
}

impl From<LogprobError> for PublishError {
    fn from(error: LogprobError) -> Self {
        Self::Score(error.to_string())
    }
}

impl From<tch::TchError> for PublishError {
    fn from(error: tch::TchError) -> Self {
        Self::Score(error.to_string())
    }
}

/// What the publisher needs besides the policy.
pub struct PublishParts {
    /// `[checkpoint]`.
    pub config: CheckpointConfig,
    /// The versions.
    pub store: CheckpointStore,
    /// The model folder (tokenizer and generation files are copied from it).
    pub model_dir: PathBuf,
    /// `train.objective`, for the manifest.
    pub objective: String,
    /// `train.radius`, for the manifest.
    pub radius: f64,
    /// Rewards of held-out pairs.
    pub rewards: RewardSpec,
    /// Token limits of the sequences.
    pub limits: Limits,
    /// Pairs per forward pass.
    pub micro_batch_size: usize,
    /// The tokenizer's pad and EOS ids.
    pub pad_id: u32,
    /// See `pad_id`.
    pub eos_id: u32,
    /// Where tensors live.
    pub device: Device,
    /// Raised once a version can be served.
    pub readiness: Arc<Readiness>,
    /// Told of each promotion (anchor refresh, staleness).
    pub control: Arc<TrainControl>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Turns the policy into versions.
pub struct Publisher {
    parts: PublishParts,
    latest: Option<(u64, FrozenModel)>,
    /// `π_ref` log-probs of held-out events, which never change.
    reference_cache: HashMap<String, (f64, f64)>,
    attempted_at_step: u64,
    attempted_at: Instant,
}

/// The trained policy, as the publisher reads it.
pub struct PolicyView<'a> {
    /// Its variables.
    pub vs: &'a VarStore,
    /// The model.
    pub model: &'a Llama,
    /// The reference `π_ref` (the initial model) implicit rewards are measured against.
    pub reference: &'a Llama,
}

impl Publisher {
    /// A publisher that last attempted a version where `progress` says the latest was made.
    pub fn new(parts: PublishParts, progress: &TrainerProgress) -> Self {
        let latest = parts.store.latest();
        parts.readiness.set_version_servable(latest.is_some());
        if let Some(version) = latest {
            set_gauge(&parts.metrics.checkpoint.latest_version, version);
            parts.control.set_current(version);
        }
        Self {
            parts,
            latest: None,
            reference_cache: HashMap::new(),
            attempted_at_step: progress
                .applied_steps
                .saturating_sub(progress.since_publish.steps),
            attempted_at: Instant::now(),
        }
    }

    /// Whether a version is due after the trainer reached `progress`.
    pub fn due(&self, progress: &TrainerProgress) -> bool {
        let config = &self.parts.config;
        let steps = progress.applied_steps - self.attempted_at_step.min(progress.applied_steps);
        let cadence = (config.publish_every_steps > 0 && steps >= config.publish_every_steps)
            || self.attempted_at.elapsed() >= config.publish_every;
        cadence && steps > 0 && progress.since_publish.pairs >= config.min_new_pairs
    }

    /// Publishes the policy as it is when the store has no latest version: the initial
    /// model at a first start, or again after a crash between the first commit and its
    /// promotion (which left a committed version but nothing to serve).
    pub fn publish_initial(
        &mut self,
        policy: &PolicyView<'_>,
        shared: &SharedBuffer,
        progress: &mut TrainerProgress,
        token: &CancellationToken,
    ) -> Result<Option<Manifest>, PublishError> {
        if self.parts.store.latest().is_some() {
            return Ok(None);
        }
        self.publish(policy, shared, progress, token).map(Some)
    }

    /// Writes, judges and commits a version of `policy`; promotes it when it passed. On
    /// promotion `progress` starts counting toward the next version. Scoring stops between
    /// micro-batches once `token` fires.
    pub fn publish(
        &mut self,
        policy: &PolicyView<'_>,
        shared: &SharedBuffer,
        progress: &mut TrainerProgress,
        token: &CancellationToken,
    ) -> Result<Manifest, PublishError> {
        let started = Instant::now();
        self.attempted_at = started;
        self.attempted_at_step = progress.applied_steps;
        let parent = self.parts.store.latest();

        let draft = self.parts.store.begin()?;
        crate::failpoint::disk_full("checkpoint.disk_full").map_err(|source| {
            PublishError::Write {
                path: draft.dir().join(WEIGHTS_FILE),
                source,
            }
        })?;
        policy.model.save_pretrained(
            policy.vs,
            draft.dir(),
            save_dtype(self.parts.config.dtype),
        )?;
        copy_model_files(&self.parts.model_dir, draft.dir())?;
        let gates = self.judge(policy, shared, token)?;
        let fields = manifest_fields(&self.parts, parent, progress, gates);
        let manifest = self.parts.store.commit(draft, fields)?;
        crate::failpoint::hit("publish.after_commit");

        self.record(&manifest, started.elapsed().as_secs_f64());
        if manifest.gates.passed {
            self.promote(&manifest, policy.vs)?;
            progress.published_version = manifest.version;
            progress.since_publish = SincePublish::default();
        }
        Ok(manifest)
    }

    fn promote(&mut self, manifest: &Manifest, policy: &VarStore) -> Result<(), PublishError> {
        self.parts.store.promote(manifest.version)?;
        self.parts.readiness.set_version_servable(true);
        self.parts.control.published(manifest.version);
        set_gauge(
            &self.parts.metrics.checkpoint.latest_version,
            manifest.version,
        );
        let mut latest = match self.latest.take() {
            Some((_, model)) => model,
            None => FrozenModel::load(&self.parts.model_dir, self.parts.device)?,
        };
        latest.refresh_from(policy)?;
        self.latest = Some((manifest.version, latest));
        Ok(())
    }

    /// The gates' report for `policy` against the latest version. Without a latest version
    /// there is nothing to compare, and only the weights are checked.
    fn judge(
        &mut self,
        policy: &PolicyView<'_>,
        shared: &SharedBuffer,
        token: &CancellationToken,
    ) -> Result<GateReport, PublishError> {
        self.load_latest()?;
        let mut measured = Measured {
            finite: all_finite(policy.vs)?,
            candidate: None,
            latest: None,
            kl_to_latest: None,
        };
        if self.latest.is_some() {
            let held = self.held_out(shared)?;
            let reference = self.reference_logprobs(policy.reference, &held, token)?;
            let diffs: Vec<f64> = held.iter().map(|pair| pair.reward_diff).collect();
            let on_candidate = self.logprobs(policy.model, &held, token)?;
            if let Some((_, latest)) = &self.latest {
                let on_latest = self.logprobs(latest.model(), &held, token)?;
                measured.latest = implicit_reward(&on_latest, &reference, &diffs);
                measured.kl_to_latest = self.kl(policy.model, latest.model(), &held, token)?;
            }
            measured.candidate = implicit_reward(&on_candidate, &reference, &diffs);
        }
        let bounds = Bounds {
            max_accuracy_drop: self.parts.config.max_accuracy_drop,
            max_kl: self.parts.config.max_kl,
        };
        Ok(gate_report(&gates::judge(&measured, bounds)))
    }

    /// `(log π(a), log π(b))` of every held-out pair under `model`, a micro-batch at a time.
    fn logprobs(
        &self,
        model: &Llama,
        held: &[HeldOut],
        token: &CancellationToken,
    ) -> Result<Vec<(f64, f64)>, PublishError> {
        let micro = self.parts.micro_batch_size.max(1);
        let mut out = Vec::with_capacity(held.len());
        for chunk in held.chunks(micro) {
            if token.is_cancelled() {
                return Err(PublishError::Interrupted);
            }
            let pairs: Vec<(Sequence, Sequence)> =
                chunk.iter().map(|p| (p.a.clone(), p.b.clone())).collect();
            let (pad_id, device) = (self.parts.pad_id, self.parts.device);
            out.extend(pair_logprobs(model, &pairs, pad_id, micro, device)?);
        }
        Ok(out)
    }

    /// The reference's log-probs of the held-out pairs, cached by event id.
    fn reference_logprobs(
        &mut self,
        reference: &Llama,
        held: &[HeldOut],
        token: &CancellationToken,
    ) -> Result<Vec<(f64, f64)>, PublishError> {
        let missing: Vec<HeldOut> = held
            .iter()
            .filter(|p| !self.reference_cache.contains_key(&p.id))
            .cloned()
            .collect();
        let computed = self.logprobs(reference, &missing, token)?;
        if self.reference_cache.len() + missing.len() > MAX_CACHED_REFERENCE {
            self.reference_cache.clear();
        }
        for (pair, values) in missing.iter().zip(computed) {
            self.reference_cache.insert(pair.id.clone(), values);
        }
        let nan = (f64::NAN, f64::NAN);
        Ok(held
            .iter()
            .map(|p| self.reference_cache.get(&p.id).copied().unwrap_or(nan))
            .collect())
    }

    /// Mean per-token KL from the candidate to the latest over the held-out responses, two
    /// sequences per pair, a micro-batch of pairs at a time.
    fn kl(
        &self,
        candidate: &Llama,
        latest: &Llama,
        held: &[HeldOut],
        token: &CancellationToken,
    ) -> Result<Option<f64>, PublishError> {
        let sequences: Vec<Sequence> = held
            .iter()
            .flat_map(|p| [p.a.clone(), p.b.clone()])
            .collect();
        let micro = 2 * self.parts.micro_batch_size.max(1);
        let (pad_id, device) = (self.parts.pad_id, self.parts.device);
        let stop = || token.is_cancelled();
        let kl = gates::mean_token_kl(candidate, latest, &sequences, pad_id, micro, device, stop)?;
        match token.is_cancelled() {
            true => Err(PublishError::Interrupted),
            false => Ok(kl),
        }
    }

    /// Up to `checkpoint.gate_pairs` held-out pairs of the buffer, the newest, that can be
    /// scored.
    fn held_out(&self, shared: &SharedBuffer) -> Result<Vec<HeldOut>, PublishError> {
        let fraction = self.parts.config.holdout_fraction;
        let selected = shared
            .lock()
            .buffer
            .select_newest(self.parts.config.gate_pairs, |id| is_held_out(id, fraction))
            .map_err(|e| PublishError::Score(e.to_string()))?;
        Ok(selected
            .iter()
            .filter_map(|sampled| {
                let reward_diff = self.parts.rewards.reward_difference(&sampled.pair).ok()?;
                let (a, b) =
                    pair_sequences(&sampled.pair, self.parts.eos_id, self.parts.limits).ok()?;
                Some(HeldOut {
                    id: sampled.pair.id.clone(),
                    a,
                    b,
                    reward_diff,
                })
            })
            .collect())
    }

    /// Holds the weights of the store's latest version, reloading them when an operator
    /// promoted another one since.
    fn load_latest(&mut self) -> Result<(), PublishError> {
        let Some(version) = self.parts.store.latest() else {
            self.latest = None;
            return Ok(());
        };
        if self.latest.as_ref().map(|(v, _)| *v) != Some(version) {
            let dir = self.parts.store.root().join(version_dir_name(version));
            info!(
                version,
                "loading the latest version for the publication gates"
            );
            self.latest = Some((version, FrozenModel::load(&dir, self.parts.device)?));
        }
        Ok(())
    }

    fn record(&self, manifest: &Manifest, seconds: f64) {
        let metrics = &self.parts.metrics.checkpoint;
        metrics.publish_seconds.observe(seconds);
        let bytes: u64 = manifest.files.values().map(|f| f.size).sum();
        metrics.bytes_written.inc_by(bytes);
        if manifest.gates.passed {
            metrics.published.inc();
            info!(
                version = manifest.version,
                parent = ?manifest.parent,
                step = manifest.trainer_step,
                pairs = manifest.pairs_trained,
                seconds,
                "version published"
            );
            return;
        }
        for check in manifest.gates.checks.iter().filter(|c| !c.passed) {
            metrics.rejected.with_label_values(&[&check.name]).inc();
        }
        warn!(
            version = manifest.version,
            reasons = ?manifest.gates.reasons(),
            "version rejected by the publication gates; latest unchanged"
        );
    }
}

/// A held-out pair ready to score.
#[derive(Clone)]
struct HeldOut {
    id: String,
    a: Sequence,
    b: Sequence,
    reward_diff: f64,
}

fn set_gauge(gauge: &prometheus::IntGauge, version: u64) {
    gauge.set(i64::try_from(version).unwrap_or(i64::MAX));
}

fn save_dtype(dtype: WeightDtype) -> SaveDtype {
    match dtype {
        WeightDtype::Bf16 => SaveDtype::BF16,
        WeightDtype::F32 => SaveDtype::F32,
    }
}

/// Copies the tokenizer and generation files of `model_dir` that exist into `draft`.
fn copy_model_files(model_dir: &Path, draft: &Path) -> Result<(), PublishError> {
    for name in MODEL_FILES {
        let from = model_dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, draft.join(name))
                .map_err(|source| PublishError::Copy { path: from, source })?;
        }
    }
    Ok(())
}

fn gate_report(verdicts: &[gates::Verdict]) -> GateReport {
    GateReport {
        passed: verdicts.iter().all(|v| v.passed),
        checks: verdicts
            .iter()
            .map(|v| GateCheck {
                name: v.name.to_owned(),
                passed: v.passed,
                value: v.value.is_finite().then_some(v.value),
                threshold: v.threshold.is_finite().then_some(v.threshold),
                detail: v.detail.clone(),
            })
            .collect(),
    }
}

fn manifest_fields(
    parts: &PublishParts,
    parent: Option<u64>,
    progress: &TrainerProgress,
    gates: GateReport,
) -> ManifestFields {
    let since = &progress.since_publish;
    let partitions = since
        .offsets
        .iter()
        .flat_map(|(topic, partitions)| {
            partitions
                .iter()
                .map(|(partition, [first, last])| PartitionRange {
                    topic: topic.clone(),
                    partition: *partition,
                    first_offset: *first,
                    last_offset: *last,
                })
        })
        .collect();
    ManifestFields {
        parent,
        trainer_step: progress.applied_steps,
        objective: parts.objective.clone(),
        radius: parts.radius,
        events_trained: since.events.len() as u64,
        pairs_trained: since.pairs,
        lineage: Lineage {
            partitions,
            event_time_ms: since.event_time_ms,
        },
        gates,
    }
}
