//! The trainer task: samples the buffer and applies DRO-REBEL steps for as long as the daemon
//! runs.
//!
//! It runs on a blocking thread (libtorch calls block). It waits without spinning until the
//! buffer holds `train.min_pairs`, samples `train.batch_size` whole pairs, computes the anchor
//! policy's log-probs once per pair and anchor version (cached), and steps. The buffer's lock
//! is held only to sample and to mark pairs trained, never during a forward pass.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use tch::nn::VarStore;
use tch::Device;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::reward::RewardSpec;
use super::step::{
    pair_logprobs, pair_sequences, StepConfig, StepError, StepReport, TrainPair, Trainer,
};
use crate::buffer::{BufferError, RowHandle, SampleStrategy, SampledPair};
use crate::config::{BufferConfig, ModelConfig, Sampling, TrainConfig};
use crate::health::Readiness;
use crate::ingest::store::SharedBuffer;
use crate::metrics::Metrics;
use crate::model::llama::{Llama, ModelError};
use crate::model::logprobs::Limits;
use crate::model::tokenizer::PolicyTokenizer;

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
        let anchor = load_policy(&dir, self.device)?;
        self.readiness.set_model_loaded(true);
        info!(path = %dir.display(), device = ?self.device, "policy and anchor loaded");

        let step_config = StepConfig::from_config(&self.train, self.tokenizer.pad_id())?;
        let mut trainer = Trainer::new(&policy.vs, step_config)?;
        let mut state = LoopState {
            rewards: RewardSpec::from_config(&self.train),
            anchor_cache: HashMap::new(),
            rng: StdRng::seed_from_u64(self.train.seed),
            eos_id: self.tokenizer.eos_id(),
            pad_id: self.tokenizer.pad_id(),
        };

        while !token.is_cancelled() {
            let Some(sample) = self.sample(&mut state.rng)? else {
                std::thread::sleep(IDLE_WAIT);
                continue;
            };
            let started = Instant::now();
            let (pairs, handles) = self.prepare(&anchor.model, &mut state, &sample)?;
            if pairs.is_empty() {
                continue;
            }
            let report = trainer.step(&policy.model, &pairs)?;
            self.shared.lock().buffer.mark_trained(&handles);
            self.record(&report, started.elapsed(), trainer.applied_steps());
        }
        self.readiness.set_model_loaded(false);
        info!(steps = trainer.applied_steps(), "trainer stopped");
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
        Ok(Some(state.buffer.sample(
            self.train.batch_size,
            strategy,
            rng,
        )?))
    }

    /// Rewards, sequences and cached anchor log-probs; pairs that cannot be used are counted
    /// and left out.
    fn prepare(
        &self,
        anchor: &Llama,
        state: &mut LoopState,
        sample: &[SampledPair],
    ) -> Result<(Vec<TrainPair>, Vec<RowHandle>), TrainTaskError> {
        let limits = Limits {
            max_prompt_tokens: self.model.max_prompt_tokens,
            max_response_tokens: self.model.max_response_tokens,
        };
        let mut usable = Vec::new();
        for sampled in sample {
            let record = &sampled.pair;
            let reward = state.rewards.reward_difference(record);
            let sequences = pair_sequences(record, state.eos_id, limits);
            match (reward, sequences) {
                (Ok(reward), Ok(sequences)) => usable.push((sampled, reward, sequences)),
                (Err(error), _) => self.unusable(&record.id, &error.to_string()),
                (_, Err(error)) => self.unusable(&record.id, &error.to_string()),
            }
        }

        let (ids, missing): (Vec<String>, Vec<_>) = usable
            .iter()
            .filter(|(s, _, _)| !state.anchor_cache.contains_key(&s.pair.id))
            .map(|(s, _, seqs)| (s.pair.id.clone(), seqs.clone()))
            .unzip();
        let computed = pair_logprobs(
            anchor,
            &missing,
            state.pad_id,
            self.train.micro_batch_size,
            self.device,
        )?;
        state.anchor_cache.extend(ids.into_iter().zip(computed));

        let mut pairs = Vec::with_capacity(usable.len());
        let mut handles = Vec::with_capacity(usable.len());
        for (sampled, reward_diff, (a, b)) in usable {
            let (anchor_a, anchor_b) = state.anchor_cache[&sampled.pair.id];
            pairs.push(TrainPair {
                a,
                b,
                anchor_a,
                anchor_b,
                reward_diff,
            });
            handles.push(sampled.handle);
        }
        Ok((pairs, handles))
    }

    fn unusable(&self, id: &str, why: &str) {
        self.metrics.train.unusable_pairs.inc();
        warn!(id, reason = why, "pair left out of training");
    }

    fn record(&self, report: &StepReport, elapsed: Duration, step: u64) {
        self.metrics.record_step(report, elapsed);
        if report.is_skipped() {
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

struct LoopState {
    rewards: RewardSpec,
    anchor_cache: HashMap<String, (f64, f64)>,
    rng: StdRng,
    eos_id: u32,
    pad_id: u32,
}
