//! The trainer task: samples the buffer and applies DRO-REBEL steps for as long as the daemon
//! runs.
//!
//! It runs on a blocking thread (libtorch calls block). It waits without spinning until the
//! buffer holds `train.min_pairs`, samples `train.batch_size` whole pairs, leaves out those
//! older than `train.max_staleness` versions, computes the anchor's (and, when needed, the
//! reference model's) log-probs once per pair and model version (cached), and steps. The
//! anchor is refreshed from the policy as [`super::anchor`] describes; a publisher drives it
//! through the [`TrainControl`] in [`TrainTask::control`]. The buffer's lock is held only to
//! sample and to mark pairs trained, never during a forward pass. Held-out events (the
//! publication gates' slice) are never sampled.
//!
//! Between two steps, every `buffer.snapshot_every`, and once more when it stops, it writes
//! the resume state (`crate::resume`): the buffer with its training counts, the weights, the
//! optimizer's moments and its counters, consistent with each other. At start it continues
//! from the newest one.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use tch::nn::VarStore;
use tch::Device;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::anchor::{is_stale, FrozenModel, LogprobCache, RefreshPolicy, TrainControl};
use super::gates::is_held_out;
use super::persist::{self, RestoreError, ResumeWriter, Resumed};
use super::publish::{PolicyView, PublishParts, Publisher};
use super::reward::RewardSpec;
use super::segments::Segments;
use super::step::{
    pair_logprobs, pair_sequences, StepConfig, StepError, StepReport, TrainPair, Trainer,
};
use crate::buffer::{BufferError, RowHandle, SampleStrategy, SampledPair};
use crate::checkpoint::CheckpointStore;
use crate::config::{BufferConfig, CheckpointConfig, ModelConfig, Sampling, TrainConfig};
use crate::failpoint;
use crate::health::Readiness;
use crate::ingest::store::SharedBuffer;
use crate::metrics::Metrics;
use crate::model::llama::{Llama, ModelError};
use crate::model::logprobs::{Limits, Sequence};
use crate::model::tokenizer::PolicyTokenizer;
use crate::resume::{Provenance, ResumeStore, TrainerProgress};

/// How long an idle trainer sleeps between looks at the buffer.
const IDLE_WAIT: Duration = Duration::from_millis(250);
/// Steps between progress log lines.
const LOG_EVERY: u64 = 10;

/// Why the trainer stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainTaskError {
    /// The policy could not be loaded.
    #[error("model.path = {path:?}: {source}")]
    Model {
        /// The folder.
        path: PathBuf,
        /// The failure.
        source: ModelError,
    },
    /// A step failed for a reason other than non-finite values.
    #[error("training step: {0}")]
    Step(#[from] StepError),
    /// Sampling failed.
    #[error("sampling the buffer: {0}")]
    Buffer(#[from] BufferError),
    /// The anchor could not be refreshed from the policy.
    #[error("refreshing the anchor: {0}")]
    Refresh(#[source] tch::TchError),
    /// The resume state does not fit the configured model.
    #[error(
        "cannot resume from {dir}: {source}; to start training afresh, move the folder aside \
         (the buffer it holds is lost and consumption restarts at the group's offsets)"
    )]
    Restore {
        /// The resume folder.
        dir: PathBuf,
        /// The failure.
        source: Box<RestoreError>,
    },
}

/// What the trainer needs.
pub struct TrainTask {
    /// `[train]`.
    pub train: TrainConfig,
    /// `[model]`.
    pub model: ModelConfig,
    /// `[buffer]` (sampling strategy).
    pub buffer: BufferConfig,
    /// The policy's tokenizer (for its EOS and pad ids), shared with ingest.
    pub tokenizer: Arc<PolicyTokenizer>,
    /// Where tensors live.
    pub device: Device,
    /// The buffer shared with ingest.
    pub shared: Arc<SharedBuffer>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness flags (the model-loaded flag is set here).
    pub readiness: Arc<Readiness>,
    /// The publisher's seam: call [`TrainControl::published`] after each published version
    /// (anchor refresh with `anchor_refresh_steps = 0`, and the staleness limit).
    pub control: Arc<TrainControl>,
    /// Where the resume state is written and restored from.
    pub resume: Arc<ResumeStore>,
    /// How often it is written.
    pub resume_every: Duration,
    /// `[checkpoint]`: publication and the held-out share.
    pub checkpoint: CheckpointConfig,
    /// Where versions are published.
    pub store: CheckpointStore,
}

struct Policy {
    vs: VarStore,
    model: Llama,
}

fn load_policy(dir: &std::path::Path, device: Device) -> Result<Policy, TrainTaskError> {
    let vs = VarStore::new(device);
    let model = Llama::from_pretrained(&vs, dir).map_err(|source| TrainTaskError::Model {
        path: dir.to_owned(),
        source,
    })?;
    Ok(Policy { vs, model })
}

impl TrainTask {
    /// Trains until `token` fires. Call on a blocking thread.
    pub fn run(self, token: &CancellationToken) -> Result<(), TrainTaskError> {
        let dir = self.model.path.clone();
        let policy = load_policy(&dir, self.device)?;
        let step_config = StepConfig::from_config(&self.train, self.tokenizer.pad_id())?;
        let frozen = |wanted: bool| {
            wanted
                .then(|| FrozenModel::load(&dir, self.device))
                .transpose()
                .map_err(|source| TrainTaskError::Model {
                    path: dir.clone(),
                    source,
                })
        };
        // The reference is always loaded: the publication gates measure implicit rewards
        // against it.
        let mut models = FrozenModels {
            anchor: frozen(step_config.objective.uses_anchor())?,
            reference: FrozenModel::load(&dir, self.device).map_err(|source| {
                TrainTaskError::Model {
                    path: dir.clone(),
                    source,
                }
            })?,
            reference_in_loss: step_config.needs_reference(),
        };
        self.readiness.set_model_loaded(true);
        info!(
            path = %dir.display(),
            device = ?self.device,
            anchor = models.anchor.is_some(),
            reference_in_loss = models.reference_in_loss,
            "policy loaded"
        );

        let mut trainer = Trainer::new(&policy.vs, step_config)?;
        let resumed = self.restore(&policy, &mut models, &mut trainer)?;
        let mut progress = resumed.progress.clone();
        let mut writer = ResumeWriter::new(
            self.resume.clone(),
            self.resume_every,
            resumed.generation.map(|_| &progress),
            self.metrics.clone(),
        );
        let mut publisher = Publisher::new(self.publish_parts(), &progress);
        if let Err(error) =
            publisher.publish_initial(&models.view(&policy), &self.shared, &mut progress, token)
        {
            warn!(%error, "cannot publish the initial model; retrying at the next version");
        }
        let segments = Segments::new(&self.train.segments);
        self.metrics.train.register_segments(segments.labels());
        let capacity = self.buffer.max_rows.saturating_mul(2);
        let mut state = LoopState {
            rewards: RewardSpec::from_config(&self.train),
            anchor_cache: LogprobCache::new(capacity),
            reference_cache: LogprobCache::new(capacity),
            refresh: RefreshPolicy::new(self.train.anchor_refresh_steps),
            segments,
            rng: persist::rng_after(self.train.seed, resumed.generation.unwrap_or(0)),
            eos_id: self.tokenizer.eos_id(),
            pad_id: self.tokenizer.pad_id(),
            left_out: HashSet::new(),
            resume_failures: FailureStreak::new(
                "cannot write the resume state; offsets stay uncommitted until it works",
                "resume state",
            ),
            publish_failures: FailureStreak::new(
                "publication failed; retrying at the next cadence",
                "publication",
            ),
        };

        while !token.is_cancelled() {
            if writer.due() {
                self.write_resume(
                    &mut writer,
                    &policy,
                    &models,
                    &trainer,
                    &progress,
                    &mut state,
                );
            }
            if state.refresh.due(trainer.applied_steps(), &self.control) {
                self.refresh_anchor(&mut models, &policy.vs, &mut state)?;
                progress.anchor_version = models.anchor_version();
            }
            let Some(sample) = self.sample(&mut state.rng)? else {
                std::thread::sleep(IDLE_WAIT);
                continue;
            };
            let started = Instant::now();
            let batch = self.prepare(&models, &mut state, &sample)?;
            if batch.pairs.is_empty() {
                std::thread::sleep(IDLE_WAIT);
                continue;
            }
            if failpoint::fires("train.slow_step") {
                std::thread::sleep(SLOW_STEP);
            }
            let report = trainer.step(&policy.model, &batch.pairs)?;
            self.record(&report, started.elapsed(), &trainer);
            if !report.is_skipped() {
                self.shared.lock().buffer.mark_trained(&batch.handles);
                progress.record_step(&trainer.counters(), &batch.provenance);
                let summaries =
                    state
                        .segments
                        .summarize(&batch.segments, &report.losses, &report.weights);
                self.metrics.train.record_segments(&summaries);
            }
            if publisher.due(&progress) {
                match publisher.publish(&models.view(&policy), &self.shared, &mut progress, token) {
                    Ok(manifest) => {
                        if let Some(failures) = state.publish_failures.succeed() {
                            info!(failures, version = manifest.version, "publishing again");
                        }
                        self.write_resume(
                            &mut writer,
                            &policy,
                            &models,
                            &trainer,
                            &progress,
                            &mut state,
                        );
                    }
                    Err(error) => {
                        self.metrics.checkpoint.failures.inc();
                        state.publish_failures.fail(&error);
                    }
                }
            }
        }
        self.write_resume(
            &mut writer,
            &policy,
            &models,
            &trainer,
            &progress,
            &mut state,
        );
        self.readiness.set_model_loaded(false);
        info!(steps = trainer.applied_steps(), "trainer stopped");
        Ok(())
    }

    /// What the publisher needs.
    fn publish_parts(&self) -> PublishParts {
        PublishParts {
            config: self.checkpoint.clone(),
            store: self.store.clone(),
            model_dir: self.model.path.clone(),
            objective: format!("{:?}", self.train.objective).to_lowercase(),
            radius: self.train.radius,
            rewards: RewardSpec::from_config(&self.train),
            limits: Limits {
                max_prompt_tokens: self.model.max_prompt_tokens,
                max_response_tokens: self.model.max_response_tokens,
            },
            micro_batch_size: self.train.micro_batch_size,
            pad_id: self.tokenizer.pad_id(),
            eos_id: self.tokenizer.eos_id(),
            device: self.device,
            readiness: self.readiness.clone(),
            control: self.control.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Continues from the newest resume generation, if there is one.
    fn restore(
        &self,
        policy: &Policy,
        models: &mut FrozenModels,
        trainer: &mut Trainer,
    ) -> Result<Resumed, TrainTaskError> {
        let Some(generation) = self.resume.latest() else {
            return Ok(Resumed::fresh());
        };
        let anchor = models.anchor.as_mut();
        let resumed =
            persist::restore(&generation, &policy.vs, anchor, trainer).map_err(|source| {
                TrainTaskError::Restore {
                    dir: generation.dir.clone(),
                    source: Box::new(source),
                }
            })?;
        let anchor_version = models.anchor_version();
        self.metrics
            .train
            .position
            .set(i64::try_from(resumed.progress.applied_steps).unwrap_or(i64::MAX));
        info!(
            generation = generation.number,
            step = resumed.progress.applied_steps,
            pairs_trained = resumed.progress.pairs_trained,
            anchor_version,
            "trainer resumed"
        );
        Ok(resumed)
    }

    /// Writes a resume generation; a failure is logged and retried at the next cadence
    /// (offsets are not committed meanwhile, so nothing is lost).
    fn write_resume(
        &self,
        writer: &mut ResumeWriter,
        policy: &Policy,
        models: &FrozenModels,
        trainer: &Trainer,
        progress: &TrainerProgress,
        state: &mut LoopState,
    ) {
        let anchor = models.anchor.as_ref();
        match writer.write(&self.shared, &policy.vs, anchor, trainer, progress) {
            Ok(generation) => {
                state.rng = persist::rng_after(self.train.seed, generation);
                if let Some(failures) = state.resume_failures.succeed() {
                    info!(failures, generation, "resume state written again");
                }
            }
            Err(error) => {
                self.metrics.train.resume_failures.inc();
                state.resume_failures.fail(&error);
            }
        }
    }

    /// Copies the policy into the anchor and drops the cached log-probs of older versions.
    fn refresh_anchor(
        &self,
        models: &mut FrozenModels,
        policy: &VarStore,
        state: &mut LoopState,
    ) -> Result<(), TrainTaskError> {
        let Some(anchor) = models.anchor.as_mut() else {
            return Ok(());
        };
        anchor
            .refresh_from(policy)
            .map_err(TrainTaskError::Refresh)?;
        state.anchor_cache.keep_version(anchor.version());
        self.metrics.train.anchor_refreshes.inc();
        self.metrics
            .train
            .anchor_version
            .set(i64::try_from(anchor.version()).unwrap_or(i64::MAX));
        info!(
            anchor_version = anchor.version(),
            "anchor refreshed from the policy"
        );
        Ok(())
    }

    /// A batch, once the buffer holds enough pairs.
    fn sample(&self, rng: &mut StdRng) -> Result<Option<Vec<SampledPair>>, TrainTaskError> {
        let state = self.shared.lock();
        if state.buffer.len() < self.train.min_pairs {
            return Ok(None);
        }
        let strategy = match self.buffer.sampling {
            Sampling::Uniform => SampleStrategy::Uniform,
            Sampling::Recency => SampleStrategy::RecencyTime {
                half_life_ms: self.buffer.recency_half_life.as_secs_f64() * 1e3,
            },
        };
        // Held-out events (the publication gates' slice) are never trained on: draw a few more
        // than a batch and leave them out.
        let fraction = self.checkpoint.holdout_fraction;
        let spare = (self.train.batch_size as f64 * fraction * 3.0).ceil() as usize;
        let mut drawn = state
            .buffer
            .sample(self.train.batch_size + spare, strategy, rng)?;
        drawn.retain(|sampled| !is_held_out(&sampled.pair.id, fraction));
        drawn.truncate(self.train.batch_size);
        Ok(Some(drawn))
    }

    /// Rewards, sequences and cached anchor and reference log-probs; stale pairs and pairs
    /// that cannot be used are counted and left out.
    fn prepare(
        &self,
        models: &FrozenModels,
        state: &mut LoopState,
        sample: &[SampledPair],
    ) -> Result<PreparedBatch, TrainTaskError> {
        let limits = Limits {
            max_prompt_tokens: self.model.max_prompt_tokens,
            max_response_tokens: self.model.max_response_tokens,
        };
        let current = self.control.current_version();
        let mut usable = Vec::new();
        for sampled in sample {
            let record = &sampled.pair;
            if is_stale(record, current, self.train.max_staleness) {
                self.metrics.train.stale_pairs.inc();
                continue;
            }
            let reward = state.rewards.reward_difference(record);
            let sequences = pair_sequences(record, state.eos_id, limits);
            match (reward, sequences) {
                (Ok(reward), Ok(sequences)) => usable.push((sampled, reward, sequences)),
                (Err(error), _) => self.unusable(state, &record.id, &error.to_string()),
                (_, Err(error)) => self.unusable(state, &record.id, &error.to_string()),
            }
        }

        let keyed: Vec<(&str, &(Sequence, Sequence))> = usable
            .iter()
            .map(|(s, _, seqs)| (s.pair.id.as_str(), seqs))
            .collect();
        let anchor = match &models.anchor {
            Some(m) => Some(self.cached(m, &mut state.anchor_cache, &keyed, state.pad_id)?),
            None => None,
        };
        let reference = match models.reference_in_loss {
            true => Some(self.cached(
                &models.reference,
                &mut state.reference_cache,
                &keyed,
                state.pad_id,
            )?),
            false => None,
        };

        let mut batch = PreparedBatch::default();
        for (i, (sampled, reward_diff, (a, b))) in usable.into_iter().enumerate() {
            let (anchor_a, anchor_b) = anchor.as_ref().map_or((0.0, 0.0), |v| v[i]);
            batch.pairs.push(TrainPair {
                a,
                b,
                anchor_a,
                anchor_b,
                reference: reference.as_ref().map(|v| v[i]),
                reward_diff,
            });
            batch.handles.push(sampled.handle);
            batch.provenance.push(Provenance::of(&sampled.pair));
            batch
                .segments
                .push(state.segments.index(sampled.pair.segment.as_deref()));
        }
        inject_input_faults(&mut batch.pairs);
        Ok(batch)
    }

    /// `model`'s log-probs of every pair, from `cache` or computed (in one pass for the
    /// missing ones) and cached under the model's version.
    fn cached(
        &self,
        model: &FrozenModel,
        cache: &mut LogprobCache,
        pairs: &[(&str, &(Sequence, Sequence))],
        pad_id: u32,
    ) -> Result<Vec<(f64, f64)>, TrainTaskError> {
        let version = model.version();
        let (ids, missing): (Vec<&str>, Vec<(Sequence, Sequence)>) = pairs
            .iter()
            .filter(|(id, _)| !cache.contains(id, version))
            .map(|&(id, seqs)| (id, seqs.clone()))
            .unzip();
        let computed = pair_logprobs(
            model.model(),
            &missing,
            pad_id,
            self.train.micro_batch_size,
            self.device,
        )?;
        let mut fresh = std::collections::HashMap::new();
        for (id, values) in ids.into_iter().zip(computed) {
            fresh.insert(id, values);
            cache.insert(id.to_owned(), version, values);
        }
        // Looked up in `fresh` first: a full cache may have been emptied meanwhile.
        Ok(pairs
            .iter()
            .map(|(id, _)| {
                fresh
                    .get(id)
                    .copied()
                    .or_else(|| cache.get(id, version))
                    .unwrap_or((f64::NAN, f64::NAN))
            })
            .collect())
    }

    /// Counts and logs a pair left out of training, once per pair: it stays in the buffer and
    /// may be drawn again.
    fn unusable(&self, state: &mut LoopState, id: &str, why: &str) {
        if state.left_out.len() >= MAX_REMEMBERED_LEFT_OUT {
            state.left_out.clear();
        }
        if state.left_out.insert(id.to_owned()) {
            self.metrics.train.unusable_pairs.inc();
            warn!(id, reason = why, "pair left out of training");
        }
    }

    fn record(&self, report: &StepReport, elapsed: Duration, trainer: &Trainer) {
        self.metrics.record_step(report, elapsed);
        let counters = trainer.counters();
        self.metrics
            .train
            .position
            .set(i64::try_from(counters.applied_steps).unwrap_or(i64::MAX));
        self.metrics
            .train
            .learning_rate_scale
            .set(counters.lr_scale);
        let step = counters.applied_steps;
        if report.rolled_back {
            warn!(
                step,
                rollbacks = counters.rollbacks,
                lr_scale = counters.lr_scale,
                "repeated skipped steps: rolled back to the last good state"
            );
        } else if report.is_skipped() {
            warn!(?report.skipped, "training step skipped");
        } else if step.is_multiple_of(LOG_EVERY) {
            info!(
                step,
                loss = report.loss,
                robust_loss = report.robust_loss,
                effective_sample_fraction = report.effective_sample_fraction,
                learning_rate = report.learning_rate,
                "training"
            );
        }
    }
}

/// The anchor (absent for `dpo`, `ipo`) and the reference (present for `dpo`, `ipo`, β > 0).
struct FrozenModels {
    anchor: Option<FrozenModel>,
    reference: FrozenModel,
    /// Whether the objective uses the reference (`dpo`, `ipo`, β > 0), not only the gates.
    reference_in_loss: bool,
}

impl FrozenModels {
    /// The policy with the reference, as the publisher reads them.
    fn view<'a>(&'a self, policy: &'a Policy) -> PolicyView<'a> {
        PolicyView {
            vs: &policy.vs,
            model: &policy.model,
            reference: self.reference.model(),
        }
    }

    fn anchor_version(&self) -> u64 {
        self.anchor.as_ref().map_or(0, FrozenModel::version)
    }
}

/// A step's pairs, their buffer handles and segment indices, in the same order.
#[derive(Default)]
struct PreparedBatch {
    pairs: Vec<TrainPair>,
    handles: Vec<RowHandle>,
    segments: Vec<usize>,
    provenance: Vec<Provenance>,
}

struct LoopState {
    rewards: RewardSpec,
    anchor_cache: LogprobCache,
    reference_cache: LogprobCache,
    refresh: RefreshPolicy,
    segments: Segments,
    rng: StdRng,
    eos_id: u32,
    pad_id: u32,
    /// Ids of pairs already counted as left out.
    left_out: HashSet<String>,
    resume_failures: FailureStreak,
    publish_failures: FailureStreak,
}

/// Failures in a row of one kind of write, logged so that a lasting fault (a full disk) is one
/// warning, not one per attempt.
#[derive(Debug)]
struct FailureStreak {
    /// The warning at the first failure of a streak.
    warning: &'static str,
    /// What the debug line of a later failure says is still failing.
    subject: &'static str,
    failures: u64,
}

impl FailureStreak {
    const fn new(warning: &'static str, subject: &'static str) -> Self {
        Self {
            warning,
            subject,
            failures: 0,
        }
    }

    /// Counts a failure: a warning when it starts a streak, a debug line otherwise.
    fn fail(&mut self, error: &dyn std::fmt::Display) {
        self.failures += 1;
        match self.failures == 1 {
            true => warn!(
                %error,
                "{} (further failures are logged at debug level)", self.warning
            ),
            false => debug!(%error, failures = self.failures, "{} still failing", self.subject),
        }
    }

    /// Ends the streak; how many failures it held, if any.
    fn succeed(&mut self) -> Option<u64> {
        let failures = std::mem::take(&mut self.failures);
        (failures > 0).then_some(failures)
    }
}

/// How long the `train.slow_step` fault point holds a step back.
const SLOW_STEP: Duration = Duration::from_secs(1);

/// How many left-out pair ids are remembered before the memory starts afresh (and each is
/// counted and logged once more).
const MAX_REMEMBERED_LEFT_OUT: usize = 100_000;

/// The fault points of a step's inputs (see [`crate::failpoint`]): a NaN reward difference
/// or an infinite anchor log-prob on the first pair.
fn inject_input_faults(pairs: &mut [TrainPair]) {
    let Some(first) = pairs.first_mut() else {
        return;
    };
    if failpoint::fires("train.nan_reward") {
        first.reward_diff = f64::NAN;
    }
    if failpoint::fires("train.inf_anchor") {
        first.anchor_a = f64::INFINITY;
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::buffer::{BufferLimits, PairRecord, Preference};
    use crate::config::Objective;
    use crate::ingest::store::IngestState;
    use crate::metrics::BuildFacts;

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
    }

    /// Sixteen pairs: even ones from policy version 5 in segment `enterprise`, odd ones from
    /// version 0 without a segment.
    fn records() -> Vec<PairRecord> {
        (0..16u32)
            .map(|i| PairRecord {
                id: format!("pair-{i}"),
                ingest_time_ms: 1_000,
                prompt_ids: vec![3 + i, 40, 41 + i],
                response_a_ids: vec![50 + i, 60],
                response_b_ids: vec![70, 80 + i, 90],
                preference: Some(if i % 3 == 0 {
                    Preference::B
                } else {
                    Preference::A
                }),
                policy_version_a: Some(if i % 2 == 0 { 5 } else { 0 }),
                segment: (i % 2 == 0).then(|| "enterprise".to_owned()),
                ..PairRecord::default()
            })
            .collect()
    }

    /// A store whose latest version is 5, as if the policy had been published five times.
    fn store_at_version_5(dir: &std::path::Path) -> CheckpointStore {
        use crate::checkpoint::{GateReport, Lineage, ManifestFields};

        let store = CheckpointStore::open(dir, 10).expect("store");
        for _ in 0..5 {
            let draft = store.begin().expect("draft");
            std::fs::write(draft.dir().join("config.json"), b"{}").expect("file");
            let fields = ManifestFields {
                parent: store.latest(),
                trainer_step: 0,
                objective: "rebel".into(),
                radius: 0.0,
                events_trained: 0,
                pairs_trained: 0,
                lineage: Lineage::default(),
                gates: GateReport {
                    passed: true,
                    checks: Vec::new(),
                },
            };
            let manifest = store.commit(draft, fields).expect("commit");
            store.promote(manifest.version).expect("promote");
        }
        store
    }

    fn task(train: TrainConfig, dir: &std::path::Path) -> TrainTask {
        let mut state = IngestState::new(
            BufferLimits {
                max_rows: 100,
                max_bytes: 1 << 20,
                max_age_ms: None,
            },
            100,
        );
        state.buffer.append(records(), 1_000).expect("append");
        let facts = BuildFacts {
            version: "0".into(),
            libtorch: "0".into(),
            librdkafka: "0".into(),
            device: "cpu".into(),
        };
        TrainTask {
            train,
            model: ModelConfig {
                path: fixture(),
                ..ModelConfig::default()
            },
            buffer: BufferConfig::default(),
            tokenizer: Arc::new(PolicyTokenizer::from_dir(&fixture()).expect("tokenizer")),
            device: Device::Cpu,
            shared: Arc::new(SharedBuffer::new(state)),
            metrics: Metrics::new(&facts).expect("metrics"),
            readiness: Readiness::new(),
            control: Arc::new(TrainControl::new()),
            resume: Arc::new(ResumeStore::open(dir).expect("resume store")),
            resume_every: Duration::from_secs(3600),
            checkpoint: CheckpointConfig::default(),
            store: store_at_version_5(&dir.join("versions")),
        }
    }

    /// Runs `task` on a thread until it has applied `steps` steps.
    fn train_for(task: TrainTask, steps: u64) -> Arc<Metrics> {
        let metrics = task.metrics.clone();
        let token = CancellationToken::new();
        let stop = token.clone();
        let worker = std::thread::spawn(move || task.run(&stop));
        while metrics.train.steps.get() < steps && !worker.is_finished() {
            std::thread::sleep(Duration::from_millis(20));
        }
        token.cancel();
        worker.join().expect("thread").expect("trainer");
        metrics
    }

    #[test]
    fn stale_pairs_are_left_out_and_the_anchor_follows_the_policy() {
        let train = TrainConfig {
            objective: Objective::Rebel,
            learning_rate: 1e-3,
            warmup_steps: 0,
            batch_size: 8,
            micro_batch_size: 4,
            min_pairs: 8,
            anchor_refresh_steps: 1,
            max_staleness: 2,
            segments: vec!["enterprise".into()],
            ..TrainConfig::default()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let task = task(train, dir.path());
        let metrics = train_for(task, 3);

        let train = &metrics.train;
        assert!(train.steps.get() >= 3);
        // Odd pairs are 5 versions old: about half of every sample.
        assert!(train.stale_pairs.get() > 0);
        assert!(train.anchor_refreshes.get() >= 2);
        assert_eq!(
            train.anchor_version.get(),
            train.anchor_refreshes.get() as i64
        );
        // Every pair trained on is fresh, hence in `enterprise`: it holds all the weight.
        let weight = |s: &str| train.segment_weight.with_label_values(&[s]).get();
        assert!((weight("enterprise") - 1.0).abs() < 1e-9);
        assert_eq!(weight("other"), 0.0);
        assert!(train
            .segment_loss
            .with_label_values(&["other"])
            .get()
            .is_nan());
        assert!(train.segment_loss.with_label_values(&["enterprise"]).get() > 0.0);
    }

    #[test]
    fn without_a_staleness_limit_every_segment_trains() {
        let train = TrainConfig {
            objective: Objective::Dpo,
            learning_rate: 1e-3,
            warmup_steps: 0,
            batch_size: 16,
            micro_batch_size: 8,
            min_pairs: 8,
            segments: vec!["enterprise".into()],
            ..TrainConfig::default()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let task = task(train, dir.path());
        let metrics = train_for(task, 1);
        let train = &metrics.train;
        assert_eq!(train.stale_pairs.get(), 0);
        // dpo keeps no anchor, so a publication refreshes nothing.
        assert_eq!(train.anchor_refreshes.get(), 0);
        let weight = |s: &str| train.segment_weight.with_label_values(&[s]).get();
        assert!((weight("enterprise") + weight("other") - 1.0).abs() < 1e-9);
        assert!(weight("other") > 0.0 && weight("enterprise") > 0.0);
    }
}
