//! One DRO-REBEL optimizer step over a batch of pairs.
//!
//! For pair `i` with responses `a` and `b`, policy `π_θ`, frozen anchor `π_t` and reward
//! difference `Δr_i` (see [`super::reward`]), the pointwise loss is REBEL's regression
//!
//! ```text
//! ℓ_i = ( (1/η)·[(log π_θ(a) − log π_t(a)) − (log π_θ(b) − log π_t(b))] − Δr_i )²
//! ```
//!
//! (or a baseline's loss, see [`super::objective`]). `rebel`, `dpo` and `ipo` minimize the
//! mean; `chi2` and `kl` minimize `Σ q_i ℓ_i` with the worst-case weights `q` of
//! [`robust::solve`], taken on the detached losses and held constant in the backward;
//! `wasserstein` adds a gradient penalty (see [`super::wasserstein`]). The weights and the
//! penalty depend on the whole optimizer step, so a step runs in two passes: a first pass over
//! every micro-batch gives all `ℓ_i` (and the penalty's gradient norms), the weights are
//! solved once, then each micro-batch is run again with gradients and back-propagates its
//! share of the objective. The accumulated gradient is that of the one-batch objective. A
//! step without the penalty whose pairs fit one micro-batch needs one pass: its forward pass
//! with a graph gives the losses, the weights are solved on their detached values, and the
//! same graph is back-propagated. Without the penalty, a micro-batch's sequences go through
//! at most `length_buckets` forward passes of similar lengths ([`crate::model::buckets`]), so
//! little of the work is padding.
//!
//! A step whose loss or gradient is not finite is skipped: the gradients are zeroed, the
//! optimizer is not stepped, and the weights stay bit-identical. After
//! `max_consecutive_skips` skips in a row the trainer rolls back: the weights and optimizer
//! state from before the last applied update are put back and the learning rate is halved
//! (a multiplier on the schedule, kept from then on).

use tch::nn::VarStore;
use tch::{Device, Kind, TchError, Tensor};

use crate::buffer::PairRecord;
use crate::config::TrainConfig;
use crate::failpoint;
use crate::model::buckets::{bucketed_response_sums, longest_first};
use crate::model::llama::{with_math_attention, Llama};
use crate::model::logprobs::{
    response_logprobs_from_embeds, response_logprobs_no_grad, Batch, Limits, LogprobError, Sequence,
};
use crate::train::robust::{self, RobustError, RobustSolution};

use super::adamw::{self, AdamW, AdamWConfig, AdamWError};
use super::objective::{pair_losses, LossSettings, ObjectiveError, StepObjective, Weighting};
use super::schedule::LrSchedule;
use super::snapshot::{SnapshotError, TrainerCounters, TrainerState, WeightSnapshot};
use super::wasserstein::{self, PenaltyPlan};

/// Why a step could not run. Configuration errors must be fixed by the operator; the others
/// mean the batch or the model is bad.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// η must be finite and positive.
    #[error("train.eta is {0}, but it must be finite and greater than zero")]
    InvalidEta(f64),

    /// The Wasserstein radius must be finite and not negative.
    #[error("train.radius is {0}, but it must be finite and at least zero")]
    InvalidRadius(f64),

    /// A micro-batch needs at least one pair.
    #[error("train.micro_batch_size must be at least 1")]
    ZeroMicroBatch,

    /// A step needs at least one pair.
    #[error("a step needs at least one pair")]
    EmptyStep,

    /// A pair could not be scored.
    #[error("scoring a micro-batch failed")]
    Logprob(#[from] LogprobError),

    /// A pair's loss could not be formed.
    #[error("forming the losses failed")]
    Objective(#[from] ObjectiveError),

    /// The worst-case weights could not be computed.
    #[error("the robust weights could not be computed")]
    Robust(#[from] RobustError),

    /// The optimizer state could not be restored.
    #[error("the optimizer state could not be restored")]
    Optimizer(#[from] AdamWError),

    /// The weights could not be restored.
    #[error("the weights could not be restored")]
    Snapshot(#[from] SnapshotError),

    /// libtorch failed.
    #[error("libtorch failed during the step")]
    Torch(#[from] TchError),
}

/// One pair ready to train on: both sequences, the anchor's and reference model's
/// log-probabilities of them (cached by the caller) and the reward difference.
#[derive(Debug, Clone)]
pub struct TrainPair {
    /// Prompt and response A.
    pub a: Sequence,
    /// Prompt and response B.
    pub b: Sequence,
    /// `log π_t(a | x)` under the frozen anchor.
    pub anchor_a: f64,
    /// `log π_t(b | x)` under the frozen anchor.
    pub anchor_b: f64,
    /// `(log π_ref(a | x), log π_ref(b | x))` under the initial model; needed by `dpo`,
    /// `ipo` and by shaping (β > 0), `None` otherwise.
    pub reference: Option<(f64, f64)>,
    /// `Δr`, already scaled.
    pub reward_diff: f64,
}

/// The two sequences of `record`, truncated by `limits`.
pub fn pair_sequences(
    record: &PairRecord,
    eos_id: u32,
    limits: Limits,
) -> Result<(Sequence, Sequence), LogprobError> {
    let a = Sequence::new(
        &record.prompt_ids,
        &record.response_a_ids,
        record.truncated_a,
        eos_id,
        limits,
    )?;
    let b = Sequence::new(
        &record.prompt_ids,
        &record.response_b_ids,
        record.truncated_b,
        eos_id,
        limits,
    )?;
    Ok((a, b))
}

/// `(log π(a), log π(b))` per pair under `model` (whose weights are on `device`), without
/// gradients, `micro` pairs at a time: the anchor's and reference's values for [`TrainPair`].
pub fn pair_logprobs(
    model: &Llama,
    pairs: &[(Sequence, Sequence)],
    pad_id: u32,
    micro: usize,
    device: Device,
) -> Result<Vec<(f64, f64)>, StepError> {
    // Without a graph to keep, every sequence can be batched with others of its length:
    // longest first, 2 × micro at a time, so each batch pads little.
    let sequences: Vec<&Sequence> = pairs.iter().flat_map(|(a, b)| [a, b]).collect();
    let order = longest_first(&sequences);

    let mut sums = vec![0.0; sequences.len()];
    for chunk in order.chunks(2 * micro.max(1)) {
        let members: Vec<Sequence> = chunk.iter().map(|&i| sequences[i].clone()).collect();
        let batch = Batch::new(&members, pad_id, device)?;
        let scored = response_logprobs_no_grad(model, &batch)?.sums;
        let scored = Vec::<f64>::try_from(scored.f_to_kind(Kind::Double)?)?;
        for (&i, value) in chunk.iter().zip(scored) {
            sums[i] = value;
        }
    }
    Ok(sums.chunks_exact(2).map(|ab| (ab[0], ab[1])).collect())
}

/// Both sequences of every pair of `chunk`, A sequences first.
fn a_then_b(chunk: &[TrainPair]) -> Vec<Sequence> {
    chunk
        .iter()
        .map(|p| p.a.clone())
        .chain(chunk.iter().map(|p| p.b.clone()))
        .collect()
}

/// The settings of a step, validated from `[train]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepConfig {
    /// The objective and its parameters.
    pub objective: StepObjective,
    /// REBEL's η.
    pub eta: f64,
    /// β of the shaping toward the reference model; 0 disables it.
    pub beta: f64,
    /// Pairs per forward/backward.
    pub micro_batch_size: usize,
    /// The most forward passes a micro-batch's sequences are split into, by length, so that
    /// few positions are padding; 1 pads every sequence to the micro-batch's longest.
    pub length_buckets: usize,
    /// Global gradient L2 norm clip; 0 disables it.
    pub max_grad_norm: f64,
    /// The learning rate per applied update, before the rollback multiplier.
    pub schedule: LrSchedule,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW ε; `1e-8` from [`StepConfig::from_config`], as in PyTorch.
    pub adam_eps: f64,
    /// The pad id of the tokenizer.
    pub pad_id: u32,
    /// Skipped steps in a row that trigger a rollback; 0 never rolls back.
    pub max_consecutive_skips: u32,
}

impl StepConfig {
    /// The step settings of `config`, with the tokenizer's `pad_id`.
    pub fn from_config(config: &TrainConfig, pad_id: u32) -> Result<Self, StepError> {
        let objective = StepObjective::from_config(config);
        if !(config.eta.is_finite() && config.eta > 0.0) {
            return Err(StepError::InvalidEta(config.eta));
        }
        if config.micro_batch_size == 0 {
            return Err(StepError::ZeroMicroBatch);
        }
        match objective {
            // A bad radius or temperature fails here, at start-up, not at the first step.
            StepObjective::Regression(Weighting::Robust(ambiguity)) => {
                robust::solve(&[0.0, 1.0], ambiguity)?;
            }
            StepObjective::Wasserstein { radius, .. } if !(radius.is_finite() && radius >= 0.0) => {
                return Err(StepError::InvalidRadius(radius));
            }
            _ => {}
        }
        Ok(Self {
            objective,
            eta: config.eta,
            beta: config.beta,
            micro_batch_size: config.micro_batch_size,
            length_buckets: config.length_buckets.max(1),
            max_grad_norm: config.max_grad_norm,
            schedule: LrSchedule::from_config(config),
            weight_decay: config.weight_decay,
            adam_eps: 1e-8,
            pad_id,
            max_consecutive_skips: config.max_consecutive_skips,
        })
    }

    /// Whether the pairs must carry [`TrainPair::reference`]: for `dpo`, `ipo`, or β > 0.
    pub fn needs_reference(&self) -> bool {
        self.objective.uses_reference() || self.beta != 0.0
    }

    fn loss_settings(&self) -> LossSettings {
        LossSettings {
            objective: self.objective,
            eta: self.eta,
            beta: self.beta,
        }
    }
}

/// Why a step was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// A pointwise loss was NaN or infinite (a bad reward, anchor or forward).
    NonFiniteLoss,
    /// The accumulated gradient had a NaN or infinite entry.
    NonFiniteGradient,
}

/// What one step did, for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Pairs in the step.
    pub pairs: usize,
    /// Mean pointwise loss `mean ℓ_i`, before the update.
    pub loss: f64,
    /// The objective's value: `Σ q_i ℓ_i` (the mean for `rebel`, `dpo`, `ipo`; plus the
    /// penalty for `wasserstein`).
    pub robust_loss: f64,
    /// The Wasserstein penalty `ρ·(mean ‖∇_E ℓ‖^{p*})^{1/p*}`; NaN for other objectives.
    pub penalty: f64,
    /// The dual variable: χ² threshold `c*`, KL temperature `τ*`; NaN otherwise.
    pub dual: f64,
    /// Kish effective sample size of the weights over `n`.
    pub effective_sample_fraction: f64,
    /// The largest weight.
    pub max_weight: f64,
    /// Share of pairs with weight exactly zero.
    pub zero_weight_share: f64,
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    /// The learning rate the update used (the one it would have used when skipped).
    pub learning_rate: f64,
    /// Tokens forwarded per pass: prompt and response ids of both sequences of every pair.
    pub tokens: usize,
    /// `ℓ_i` per pair, in the order of the step's pairs.
    pub losses: Vec<f64>,
    /// The weight of each pair in the objective (summing to 1); empty when a loss was not
    /// finite.
    pub weights: Vec<f64>,
    /// Why the step was skipped; `None` when the update was applied.
    pub skipped: Option<SkipReason>,
    /// Whether this skip triggered a rollback (see the module docs).
    pub rolled_back: bool,
}

impl StepReport {
    /// Whether the update was skipped.
    pub fn is_skipped(&self) -> bool {
        self.skipped.is_some()
    }
}

/// The losses and weights of a step whose gradient is accumulated in the variables.
#[derive(Debug, Clone, PartialEq)]
pub struct Accumulated {
    /// `ℓ_i` per pair, from the first pass.
    pub losses: Vec<f64>,
    /// The weights and dual; `None` when a loss was not finite (nothing was accumulated).
    pub solution: Option<RobustSolution>,
    /// The Wasserstein penalty; `None` for other objectives or when a loss was not finite.
    pub penalty: Option<f64>,
    /// See [`StepReport::tokens`].
    pub tokens: usize,
}

/// The state put back by a rollback: taken before each applied update.
struct GoodState {
    weights: WeightSnapshot,
    moments: Vec<(String, Tensor)>,
    counters: TrainerCounters,
}

/// AdamW over a policy's trainable variables, stepping DRO-REBEL.
pub struct Trainer {
    config: StepConfig,
    adamw: AdamW,
    variables: Vec<(String, Tensor)>,
    device: Device,
    counters: TrainerCounters,
    last_good: Option<GoodState>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// An AdamW trainer of `vs`'s trainable variables.
    pub fn new(vs: &VarStore, config: StepConfig) -> Result<Self, StepError> {
        let adamw = AdamW::new(
            vs,
            AdamWConfig {
                weight_decay: config.weight_decay,
                eps: config.adam_eps,
                ..AdamWConfig::default()
            },
        )?;
        Ok(Self {
            config,
            adamw,
            variables: adamw::trainable(vs),
            device: vs.device(),
            counters: TrainerCounters {
                applied_steps: 0,
                lr_scale: 1.0,
                consecutive_skips: 0,
                rollbacks: 0,
            },
            last_good: None,
        })
    }

    /// Updates applied so far (skipped steps excluded); the schedule's position.
    pub fn applied_steps(&self) -> u64 {
        self.counters.applied_steps
    }

    /// The counters: applied steps, learning-rate multiplier, skips in a row, rollbacks.
    pub fn counters(&self) -> TrainerCounters {
        self.counters
    }

    /// The settings.
    pub fn config(&self) -> &StepConfig {
        &self.config
    }

    /// A deep copy of the optimizer state and counters, for saving (the weights are saved
    /// apart, from the policy's store).
    pub fn state(&self) -> Result<TrainerState, StepError> {
        Ok(TrainerState {
            counters: self.counters,
            tensors: self.adamw.state()?.moments,
        })
    }

    /// Continues from `state` (with the weights it was saved beside already in the policy).
    /// The rollback point is cleared: the next applied update sets a new one.
    pub fn restore(&mut self, state: &TrainerState) -> Result<(), StepError> {
        self.adamw
            .restore(state.counters.applied_steps, &state.tensors)?;
        self.counters = state.counters;
        self.last_good = None;
        Ok(())
    }

    /// One optimizer step of `model` (whose variables this trainer holds) on `pairs`.
    pub fn step(&mut self, model: &Llama, pairs: &[TrainPair]) -> Result<StepReport, StepError> {
        let accumulated = self.accumulate(model, pairs)?;
        self.apply(&accumulated)
    }

    /// The two passes of the module docs: zeroes the gradients, then leaves in them the
    /// gradient of the step's objective. [`Trainer::apply`] completes the step.
    pub fn accumulate(
        &mut self,
        model: &Llama,
        pairs: &[TrainPair],
    ) -> Result<Accumulated, StepError> {
        if pairs.is_empty() {
            return Err(StepError::EmptyStep);
        }
        self.adamw.zero_grad()?;
        let tokens = pairs
            .iter()
            .map(|p| p.a.ids().len() + p.b.ids().len())
            .sum();
        match self.config.objective {
            StepObjective::Wasserstein { radius, order } => with_math_attention(|| {
                self.accumulate_penalized(model, pairs, radius, order, tokens)
            }),
            _ => self.accumulate_weighted(model, pairs, tokens),
        }
    }

    fn accumulate_weighted(
        &mut self,
        model: &Llama,
        pairs: &[TrainPair],
        tokens: usize,
    ) -> Result<Accumulated, StepError> {
        if pairs.len() <= self.config.micro_batch_size {
            return self.accumulate_in_one_pass(model, pairs, tokens);
        }
        let losses = inject_loss_fault(self.losses(model, pairs)?);
        if losses.iter().any(|l| !l.is_finite()) {
            return Ok(non_finite(losses, tokens));
        }
        let solution = self.weights(&losses)?;
        let micro = self.config.micro_batch_size;
        for (chunk, q) in pairs.chunks(micro).zip(solution.weights.chunks(micro)) {
            let q = Tensor::f_from_slice(q)?.f_to_device(self.device)?;
            let weighted = self
                .pointwise(model, chunk, true)?
                .f_mul(&q)?
                .f_sum(Kind::Double)?;
            weighted.f_backward()?;
        }
        Ok(Accumulated {
            losses,
            solution: Some(solution),
            penalty: None,
            tokens,
        })
    }

    /// The weighted objective of pairs that fit one micro-batch, from one forward pass.
    fn accumulate_in_one_pass(
        &mut self,
        model: &Llama,
        pairs: &[TrainPair],
        tokens: usize,
    ) -> Result<Accumulated, StepError> {
        let pointwise = self.pointwise(model, pairs, true)?;
        let losses = inject_loss_fault(Vec::<f64>::try_from(pointwise.f_detach()?)?);
        if losses.iter().any(|l| !l.is_finite()) {
            return Ok(non_finite(losses, tokens));
        }
        let solution = self.weights(&losses)?;
        let q = Tensor::f_from_slice(&solution.weights)?.f_to_device(self.device)?;
        pointwise.f_mul(&q)?.f_sum(Kind::Double)?.f_backward()?;
        Ok(Accumulated {
            losses,
            solution: Some(solution),
            penalty: None,
            tokens,
        })
    }

    fn accumulate_penalized(
        &mut self,
        model: &Llama,
        pairs: &[TrainPair],
        radius: f64,
        order: f64,
        tokens: usize,
    ) -> Result<Accumulated, StepError> {
        let (losses, norms) = self.embedding_gradient_norms(model, pairs)?;
        let losses = inject_loss_fault(losses);
        if losses.iter().chain(&norms).any(|l| !l.is_finite()) {
            return Ok(non_finite(losses, tokens));
        }
        let mut solution = self.weights(&losses)?;
        let PenaltyPlan {
            value,
            coefficients,
        } = wasserstein::plan(&norms, radius, order);
        let micro = self.config.micro_batch_size;
        let chunks = pairs.chunks(micro).zip(solution.weights.chunks(micro));
        for ((chunk, q), a) in chunks.zip(coefficients.chunks(micro)) {
            let q = Tensor::f_from_slice(q)?.f_to_device(self.device)?;
            let a = Tensor::f_from_slice(a)?.f_to_device(self.device)?;
            let (losses, squared) = self.penalized(model, chunk, true)?;
            let objective = losses.f_mul(&q)?.f_add(&squared.f_mul(&a)?)?;
            objective.f_sum(Kind::Double)?.f_backward()?;
        }
        solution.value += value;
        Ok(Accumulated {
            losses,
            solution: Some(solution),
            penalty: Some(value),
            tokens,
        })
    }

    /// `(ℓ_i, ‖∇_{E_i} ℓ_i‖)` for every pair, a micro-batch at a time: the first pass of
    /// `wasserstein`. Gradients reach the embeddings only, not the variables.
    pub fn embedding_gradient_norms(
        &self,
        model: &Llama,
        pairs: &[TrainPair],
    ) -> Result<(Vec<f64>, Vec<f64>), StepError> {
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        with_math_attention(|| {
            for chunk in pairs.chunks(self.config.micro_batch_size) {
                let (l, squared) = self.penalized(model, chunk, false)?;
                losses.extend(Vec::<f64>::try_from(l.f_detach()?)?);
                norms.extend(Vec::<f64>::try_from(squared.f_sqrt()?)?);
            }
            Ok::<_, StepError>(())
        })?;
        Ok((losses, norms))
    }

    /// `ℓ_i` and `‖∇_{E_i} ℓ_i‖²` of `chunk`, each `[m]` f64; differentiable (twice) with
    /// `create_graph`.
    fn penalized(
        &self,
        model: &Llama,
        chunk: &[TrainPair],
        create_graph: bool,
    ) -> Result<(Tensor, Tensor), StepError> {
        let batch = self.batch(chunk)?;
        let embeds = model.embed(batch.input_ids()).map_err(LogprobError::from)?;
        let embeds = match embeds.requires_grad() {
            true => embeds,
            // A frozen embedding table: the penalty still needs the embeddings' gradient.
            false => embeds.f_detach()?.set_requires_grad(true),
        };
        let sums = response_logprobs_from_embeds(model, &batch, &embeds)?.sums;
        let losses = pair_losses(self.config.loss_settings(), &sums, chunk, self.device)?;
        let squared = wasserstein::squared_embedding_gradients(&losses, &embeds, create_graph)?;
        Ok((losses, squared))
    }

    /// Checks, clips and applies the gradient left by [`Trainer::accumulate`]; after
    /// `max_consecutive_skips` skips in a row, rolls back.
    pub fn apply(&mut self, accumulated: &Accumulated) -> Result<StepReport, StepError> {
        let n = accumulated.losses.len();
        let loss = accumulated.losses.iter().sum::<f64>() / n as f64;
        let mut report = StepReport {
            pairs: n,
            loss,
            robust_loss: f64::NAN,
            penalty: accumulated.penalty.unwrap_or(f64::NAN),
            dual: f64::NAN,
            effective_sample_fraction: f64::NAN,
            max_weight: f64::NAN,
            zero_weight_share: f64::NAN,
            grad_norm: f64::NAN,
            learning_rate: self.learning_rate(),
            tokens: accumulated.tokens,
            losses: accumulated.losses.clone(),
            weights: Vec::new(),
            skipped: None,
            rolled_back: false,
        };
        let Some(solution) = &accumulated.solution else {
            return self.skip(report, SkipReason::NonFiniteLoss);
        };
        let stats = solution.stats();
        report.robust_loss = solution.value;
        report.dual = match self.config.objective.weighting() {
            Weighting::Uniform => f64::NAN,
            Weighting::Robust(_) => solution.dual,
        };
        report.effective_sample_fraction = stats.effective_sample_fraction;
        report.max_weight = stats.max_weight;
        report.zero_weight_share = stats.zero_weight_share;
        report.weights = solution.weights.clone();

        if failpoint::fires("train.nan_gradient") {
            self.poison_gradient()?;
        }
        report.grad_norm = self.grad_norm()?;
        if !report.grad_norm.is_finite() {
            return self.skip(report, SkipReason::NonFiniteGradient);
        }
        self.clip(report.grad_norm)?;
        if self.config.max_consecutive_skips > 0 {
            self.keep_rollback_point()?;
        }
        self.adamw.step(report.learning_rate)?;
        self.adamw.zero_grad()?;
        self.counters.applied_steps += 1;
        self.counters.consecutive_skips = 0;
        Ok(report)
    }

    /// Copies the weights, moments and counters as they are before an update, into the
    /// previous copy's storage when there is one (no allocation per step).
    fn keep_rollback_point(&mut self) -> Result<(), StepError> {
        match &mut self.last_good {
            Some(good) => {
                tch::no_grad(|| {
                    for ((_, copy), (_, var)) in
                        good.weights.tensors.iter_mut().zip(&self.variables)
                    {
                        copy.f_copy_(var)?;
                    }
                    Ok::<_, TchError>(())
                })?;
                self.adamw.copy_moments_into(&mut good.moments)?;
                good.counters = self.counters;
            }
            None => {
                self.last_good = Some(GoodState {
                    weights: WeightSnapshot::of(&self.variables)?,
                    moments: self.adamw.state()?.moments,
                    counters: self.counters,
                });
            }
        }
        Ok(())
    }

    /// The rate of the next update: the schedule's times the rollback multiplier.
    pub fn learning_rate(&self) -> f64 {
        self.config.schedule.rate(self.counters.applied_steps) * self.counters.lr_scale
    }

    fn skip(
        &mut self,
        mut report: StepReport,
        reason: SkipReason,
    ) -> Result<StepReport, StepError> {
        self.adamw.zero_grad()?;
        report.skipped = Some(reason);
        self.counters.consecutive_skips += 1;
        let limit = self.config.max_consecutive_skips;
        if limit > 0 && self.counters.consecutive_skips >= limit {
            self.roll_back()?;
            report.rolled_back = true;
        }
        Ok(report)
    }

    /// Puts back the state from before the last applied update (if any) and halves the
    /// learning-rate multiplier.
    fn roll_back(&mut self) -> Result<(), StepError> {
        let lr_scale = self.counters.lr_scale * 0.5;
        let rollbacks = self.counters.rollbacks + 1;
        if let Some(good) = &self.last_good {
            good.weights.restore_into(&self.variables)?;
            self.adamw
                .restore(good.counters.applied_steps, &good.moments)?;
            self.counters = good.counters;
        }
        self.counters.lr_scale = lr_scale;
        self.counters.rollbacks = rollbacks;
        self.counters.consecutive_skips = 0;
        Ok(())
    }

    /// `ℓ_i` for every pair, without gradients, a micro-batch at a time.
    pub fn losses(&self, model: &Llama, pairs: &[TrainPair]) -> Result<Vec<f64>, StepError> {
        if let StepObjective::Wasserstein { .. } = self.config.objective {
            return Ok(self.embedding_gradient_norms(model, pairs)?.0);
        }
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(self.config.micro_batch_size) {
            let losses = tch::no_grad(|| self.pointwise(model, chunk, false))?;
            out.extend(Vec::<f64>::try_from(losses)?);
        }
        Ok(out)
    }

    /// The sequences of `chunk` ([`a_then_b`]) in one padded batch.
    fn batch(&self, chunk: &[TrainPair]) -> Result<Batch, LogprobError> {
        Batch::new(&a_then_b(chunk), self.config.pad_id, self.device)
    }

    /// `ℓ_i` of `chunk` as a `[m]` f64 tensor, with a graph when `grad`; the sequences go
    /// through at most `length_buckets` forward passes of similar lengths.
    fn pointwise(
        &self,
        model: &Llama,
        chunk: &[TrainPair],
        grad: bool,
    ) -> Result<Tensor, StepError> {
        let sums = bucketed_response_sums(
            model,
            &a_then_b(chunk),
            self.config.pad_id,
            self.device,
            self.config.length_buckets,
            grad,
        )?;
        Ok(pair_losses(
            self.config.loss_settings(),
            &sums,
            chunk,
            self.device,
        )?)
    }

    fn weights(&self, losses: &[f64]) -> Result<RobustSolution, StepError> {
        Ok(self.config.objective.weighting().solve(losses)?)
    }

    /// Global L2 norm of the accumulated gradient, in f64 so that large entries cannot
    /// overflow; NaN or infinite when any entry is.
    fn grad_norm(&self) -> Result<f64, StepError> {
        let mut squares = 0.0;
        for (_, var) in &self.variables {
            let grad = var.grad();
            if grad.defined() {
                let g = grad.f_to_kind(Kind::Double)?;
                squares += g.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
            }
        }
        Ok(squares.sqrt())
    }

    /// Fills the first accumulated gradient with NaN: the `train.nan_gradient` fault.
    fn poison_gradient(&self) -> Result<(), StepError> {
        let first = self
            .variables
            .iter()
            .map(|(_, var)| var.grad())
            .find(Tensor::defined);
        if let Some(mut grad) = first {
            let _filled = grad.f_fill_(f64::NAN)?;
        }
        Ok(())
    }

    fn clip(&self, norm: f64) -> Result<(), StepError> {
        let max = self.config.max_grad_norm;
        if max <= 0.0 || norm <= max {
            return Ok(());
        }
        let scale = max / (norm + 1e-6);
        tch::no_grad(|| {
            for (_, var) in &self.variables {
                let mut grad = var.grad();
                if grad.defined() {
                    let _scaled = grad.f_mul_scalar_(scale)?;
                }
            }
            Ok(())
        })
    }
}

/// `losses` with the first made NaN when the `train.nan_loss` fault point fires.
fn inject_loss_fault(mut losses: Vec<f64>) -> Vec<f64> {
    if failpoint::fires("train.nan_loss") {
        if let Some(first) = losses.first_mut() {
            *first = f64::NAN;
        }
    }
    losses
}

/// A first pass with a non-finite loss: nothing is accumulated.
fn non_finite(losses: Vec<f64>, tokens: usize) -> Accumulated {
    Accumulated {
        losses,
        solution: None,
        penalty: None,
        tokens,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::{Objective, Schedule};
    use crate::train::robust::Ambiguity;

    const PAD: u32 = 0;
    const EOS: u32 = 0;

    fn fixture() -> PathBuf {
        let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        match local.is_dir() {
            true => local,
            false => PathBuf::from("/work/main/tests/fixtures/tiny-llama"),
        }
    }

    fn tiny() -> (VarStore, Llama) {
        let vs = VarStore::new(Device::Cpu);
        let model = Llama::from_pretrained(&vs, &fixture()).expect("the fixture loads");
        (vs, model)
    }

    /// Eight pairs of assorted lengths, so every micro-batch needs padding.
    fn sequences(count: usize) -> Vec<(Sequence, Sequence)> {
        let mut state = 12_345u64;
        let mut ids = |len: usize| -> Vec<u32> {
            (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1);
                    1 + ((state >> 33) % 511) as u32
                })
                .collect()
        };
        (0..count)
            .map(|i| {
                let prompt = ids(2 + i % 4);
                let a = Sequence::new(&prompt, &ids(1 + i % 3), false, EOS, Limits::NONE);
                let b = Sequence::new(&prompt, &ids(4 - i % 3), i % 5 == 0, EOS, Limits::NONE);
                (a.expect("a"), b.expect("b"))
            })
            .collect()
    }

    const REWARDS: [f64; 8] = [0.5, -1.0, 2.0, 0.0, 1.5, -0.3, 0.8, -2.2];

    /// Pairs whose anchor is the fixture shifted per pair, so the log-ratios are not zero.
    fn pairs(model: &Llama) -> Vec<TrainPair> {
        let seqs = sequences(REWARDS.len());
        let anchors = pair_logprobs(model, &seqs, PAD, 3, Device::Cpu).expect("anchors");
        seqs.into_iter()
            .zip(anchors)
            .enumerate()
            .map(|(i, ((a, b), (la, lb)))| TrainPair {
                a,
                b,
                anchor_a: la + 0.1 * i as f64,
                anchor_b: lb - 0.05 * i as f64,
                reference: Some((la - 0.07 * i as f64, lb + 0.03 * i as f64)),
                reward_diff: REWARDS[i],
            })
            .collect()
    }

    fn config(objective: Objective, radius: f64, micro: usize) -> StepConfig {
        let train = TrainConfig {
            objective,
            radius,
            eta: 2.0,
            learning_rate: 1e-3,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            max_grad_norm: 0.0,
            micro_batch_size: micro,
            // One padded pass per micro-batch, so that accumulation is compared on exactly
            // the same f32 arithmetic; bucketing is checked in f64 on its own.
            length_buckets: 1,
            ..TrainConfig::default()
        };
        StepConfig::from_config(&train, PAD).expect("valid")
    }

    /// Copies of every variable, in the store's (sorted) order.
    fn snapshot(vs: &VarStore) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(name, t)| (name, t.detach().copy()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    fn grads(vs: &VarStore) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(name, t)| {
                let g = t.grad();
                let g = match g.defined() {
                    true => g.copy(),
                    false => t.zeros_like(),
                };
                (name, g)
            })
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    fn max_abs_diff(x: &[(String, Tensor)], y: &[(String, Tensor)]) -> f64 {
        assert_eq!(x.len(), y.len());
        x.iter()
            .zip(y)
            .map(|((n, a), (m, b))| {
                assert_eq!(n, m);
                (a - b).abs().max().double_value(&[])
            })
            .fold(0.0, f64::max)
    }

    fn bit_identical(x: &[(String, Tensor)], y: &[(String, Tensor)]) -> bool {
        x.iter().zip(y).all(|((_, a), (_, b))| a.equal(b))
    }

    type Params = Vec<(String, Tensor)>;

    /// Runs one step, returning the report, the weights before, the gradient and the weights
    /// after.
    fn run(config: StepConfig) -> (StepReport, Params, Params, Params) {
        let (vs, model) = tiny();
        let pairs = pairs(&model);
        let before = snapshot(&vs);
        let mut trainer = Trainer::new(&vs, config).expect("trainer");
        let accumulated = trainer.accumulate(&model, &pairs).expect("accumulate");
        let grad = grads(&vs);
        let report = trainer.apply(&accumulated).expect("apply");
        (report, before, grad, snapshot(&vs))
    }

    /// Every objective, with shaping on for one of the regressions.
    const OBJECTIVES: [(Objective, f64, f64, f64); 8] = [
        (Objective::Rebel, 0.0, 2.0, 0.0),
        (Objective::Rebel, 0.0, 2.0, 0.5),
        (Objective::Chi2, 0.5, 2.0, 0.0),
        (Objective::Kl, 0.3, 2.0, 0.0),
        (Objective::Wasserstein, 0.5, 2.0, 0.0),
        (Objective::Wasserstein, 0.5, 1.0, 0.0),
        (Objective::Dpo, 0.0, 2.0, 0.0),
        (Objective::Ipo, 0.0, 2.0, 0.0),
    ];

    fn objective_config(case: (Objective, f64, f64, f64), micro: usize) -> StepConfig {
        let (objective, radius, order, beta) = case;
        let mut config = config(objective, radius, micro);
        config.beta = beta;
        if let StepObjective::Wasserstein { radius, .. } = config.objective {
            config.objective = StepObjective::Wasserstein { radius, order };
        }
        config
    }

    #[test]
    fn accumulated_micro_batches_equal_one_batch() {
        for case in OBJECTIVES {
            let (one, before, g_one, w_one) = run(objective_config(case, 8));
            let (two, _, g_two, w_two) = run(objective_config(case, 4));
            assert!(!one.is_skipped() && !two.is_skipped(), "{case:?}");
            // The model is f32: a micro-batch of another shape may round differently (the
            // CPU's matrix kernels block by shape), so agreement is to f32 precision.
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-6 * x.abs().max(1.0);
            assert!(close(one.loss, two.loss), "{case:?}");
            assert!(close(one.robust_loss, two.robust_loss), "{case:?}");
            if case.0 == Objective::Wasserstein {
                assert!(one.penalty > 1e-3, "{case:?}: penalty {}", one.penalty);
                assert!(close(one.penalty, two.penalty), "{case:?}");
                assert!((one.robust_loss - one.loss - one.penalty).abs() <= 1e-9);
            } else {
                assert!(one.penalty.is_nan());
            }
            let scale = g_one
                .iter()
                .map(|(_, g)| g.abs().max().double_value(&[]))
                .fold(0.0, f64::max);
            let g_diff = max_abs_diff(&g_one, &g_two);
            assert!(g_diff <= 1e-5 * scale.max(1.0), "{case:?}: {g_diff}");
            let update = max_abs_diff(&before, &w_one);
            assert!(update > 1e-4, "{case:?}: the step moved nothing");
            let w_diff = max_abs_diff(&w_one, &w_two);
            assert!(w_diff <= 1e-5, "{case:?}: updates differ by {w_diff}");
        }
    }

    #[test]
    fn robust_objectives_weight_the_worst_pairs() {
        let (chi2, ..) = run(config(Objective::Chi2, 0.5, 4));
        let (rebel, ..) = run(config(Objective::Rebel, 0.0, 4));
        assert!(chi2.robust_loss > rebel.robust_loss);
        assert!(chi2.max_weight > 1.0 / 8.0 + 0.01);
        assert!(chi2.effective_sample_fraction < 1.0);
        assert_eq!(rebel.effective_sample_fraction, 1.0);
        assert!((rebel.robust_loss - rebel.loss).abs() < 1e-12);
    }

    #[test]
    fn non_finite_reward_or_anchor_skips_the_step_bit_identically() {
        for (case, poison) in OBJECTIVES.iter().flat_map(|&c| [(c, 0), (c, 1)]) {
            let config = objective_config(case, 4);
            let (vs, model) = tiny();
            let mut bad = pairs(&model);
            match (poison, config.needs_reference() && case.3 == 0.0) {
                (0, _) => bad[5].reward_diff = f64::NAN,
                (_, false) => bad[2].anchor_b = f64::INFINITY,
                (_, true) => bad[2].reference = Some((0.0, f64::INFINITY)),
            }
            let good = pairs(&model);
            let before = snapshot(&vs);
            let mut trainer = Trainer::new(&vs, config).expect("trainer");

            let report = trainer.step(&model, &bad).expect("a skip is not an error");
            assert_eq!(report.skipped, Some(SkipReason::NonFiniteLoss), "{case:?}");
            assert!(
                bit_identical(&before, &snapshot(&vs)),
                "{case:?}: weights moved"
            );
            assert_eq!(trainer.applied_steps(), 0);
            assert!(vs
                .trainable_variables()
                .iter()
                .all(|v| !v.grad().defined() || v.grad().abs().max().double_value(&[]) == 0.0));

            // The optimizer was untouched: the next step equals a fresh trainer's first.
            let report = trainer.step(&model, &good).expect("step");
            assert!(!report.is_skipped());
            let (_, _, _, fresh) = run(config);
            assert!(
                bit_identical(&snapshot(&vs), &fresh),
                "{case:?}: optimizer state changed"
            );
        }
    }

    #[test]
    fn non_finite_gradient_skips_the_step_bit_identically() {
        let (vs, model) = tiny();
        let pairs = pairs(&model);
        let before = snapshot(&vs);
        let mut trainer = Trainer::new(&vs, config(Objective::Kl, 0.3, 4)).expect("trainer");
        let accumulated = trainer.accumulate(&model, &pairs).expect("accumulate");
        let grad = vs.trainable_variables()[0].grad();
        let _ = grad.narrow(0, 0, 1).fill_(f64::NAN);

        let report = trainer.apply(&accumulated).expect("a skip is not an error");
        assert_eq!(report.skipped, Some(SkipReason::NonFiniteGradient));
        assert!(report.grad_norm.is_nan());
        assert!(bit_identical(&before, &snapshot(&vs)), "weights moved");
        assert_eq!(trainer.applied_steps(), 0);
    }

    #[test]
    fn clipping_scales_the_gradient_to_the_limit() {
        let mut config = config(Objective::Rebel, 0.0, 4);
        config.max_grad_norm = 1e-3;
        let (vs, model) = tiny();
        let pairs = pairs(&model);
        let mut trainer = Trainer::new(&vs, config).expect("trainer");
        trainer.accumulate(&model, &pairs).expect("accumulate");
        let norm = trainer.grad_norm().expect("norm");
        assert!(
            norm > 1e-2,
            "the test needs a gradient above the limit: {norm}"
        );
        trainer.clip(norm).expect("clip");
        let clipped = trainer.grad_norm().expect("norm");
        assert!((clipped - 1e-3).abs() < 1e-8, "{clipped}");
    }

    #[test]
    fn chi2_backward_uses_the_solved_weights() {
        let config = config(Objective::Chi2, 0.5, 4);
        let (vs, model) = tiny();
        let pairs = pairs(&model);
        let mut trainer = Trainer::new(&vs, config).expect("trainer");
        let accumulated = trainer.accumulate(&model, &pairs).expect("accumulate");
        let found = grads(&vs);

        let expected =
            robust::solve(&accumulated.losses, Ambiguity::Chi2 { radius: 0.5 }).expect("solve");
        let solution = accumulated.solution.as_ref().expect("finite");
        assert_eq!(solution.weights, expected.weights);
        let largest = expected.weights.iter().copied().fold(0.0, f64::max);
        assert!(
            largest > 1.0 / 8.0 + 0.01,
            "the weights must not be uniform"
        );

        // Manual reweighting on a fresh copy, one batch, no trainer.
        let (vs2, model2) = tiny();
        let other = Trainer::new(&vs2, config).expect("trainer");
        let losses = other.pointwise(&model2, &pairs, true).expect("losses");
        let q = Tensor::from_slice(&expected.weights);
        (losses * q).sum(Kind::Double).backward();
        let manual = grads(&vs2);
        let diff = max_abs_diff(&found, &manual);
        assert!(diff <= 1e-6, "{diff}");

        // Uniform weights give a different gradient, so the comparison can fail.
        let (vs3, model3) = tiny();
        let losses = other.pointwise(&model3, &pairs, true).expect("losses");
        losses.mean(Kind::Double).backward();
        assert!(max_abs_diff(&found, &grads(&vs3)) > 1e-4);
    }

    #[test]
    fn zero_radius_reproduces_rebel() {
        let (rebel, _, g_rebel, w_rebel) = run(config(Objective::Rebel, 0.0, 4));
        let scale = g_rebel
            .iter()
            .map(|(_, g)| g.abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        for objective in [Objective::Chi2, Objective::Kl] {
            let (report, _, _, robust) = run(config(objective, 0.0, 4));
            assert!(!report.is_skipped());
            let diff = max_abs_diff(&w_rebel, &robust);
            assert!(diff <= 1e-5, "{objective:?} at 0: {diff}");

            // Near zero the weights are uniform up to O(sqrt(radius)), so the gradient is
            // close. The update is not compared: AdamW's first step is lr·g/(|g| + ε), which
            // flips with tiny changes of a gradient entry near zero.
            let (report, _, g_robust, _) = run(config(objective, 1e-12, 4));
            assert!((report.robust_loss - rebel.robust_loss).abs() <= 1e-5 * rebel.loss);
            let diff = max_abs_diff(&g_rebel, &g_robust);
            assert!(diff <= 1e-4 * scale, "{objective:?} at 1e-12: {diff}");
        }
    }

    #[test]
    fn bad_settings_fail_when_the_config_is_read() {
        let with = |objective, radius, kl_temperature, eta| TrainConfig {
            objective,
            radius,
            kl_temperature,
            eta,
            ..TrainConfig::default()
        };
        let cases = [
            with(Objective::Chi2, -0.1, None, 1.0),
            with(Objective::Kl, f64::NAN, None, 1.0),
            with(Objective::Kl, 0.1, Some(0.0), 1.0),
        ];
        for train in cases {
            assert!(matches!(
                StepConfig::from_config(&train, PAD),
                Err(StepError::Robust(_))
            ));
        }
        let train = with(Objective::Rebel, 0.0, None, 0.0);
        assert!(matches!(
            StepConfig::from_config(&train, PAD),
            Err(StepError::InvalidEta(_))
        ));
        let train = TrainConfig {
            micro_batch_size: 0,
            ..TrainConfig::default()
        };
        assert!(matches!(
            StepConfig::from_config(&train, PAD),
            Err(StepError::ZeroMicroBatch)
        ));
    }

    #[test]
    fn rebel_recovers_a_known_policy() {
        let eta = 2.0;
        let (_anchor_vs, anchor) = tiny();
        let (star_vs, star) = tiny();
        tch::manual_seed(7);
        tch::no_grad(|| {
            for mut v in star_vs.trainable_variables() {
                let noise = v.randn_like() * 0.05;
                let _ = v.g_add_(&noise);
            }
        });

        let seqs = sequences(8);
        let at_anchor = pair_logprobs(&anchor, &seqs, PAD, 8, Device::Cpu).expect("anchor");
        let at_star = pair_logprobs(&star, &seqs, PAD, 8, Device::Cpu).expect("star");
        let pairs: Vec<TrainPair> = seqs
            .into_iter()
            .zip(at_anchor.iter().zip(&at_star))
            .map(|((a, b), (&(ta, tb), &(sa, sb)))| TrainPair {
                a,
                b,
                anchor_a: ta,
                anchor_b: tb,
                reference: None,
                reward_diff: ((sa - ta) - (sb - tb)) / eta,
            })
            .collect();

        let (vs, model) = tiny();
        let mut config = config(Objective::Rebel, 0.0, 4);
        config.eta = eta;
        config.schedule.peak = 3e-3;
        config.max_grad_norm = 10.0;
        let mut trainer = Trainer::new(&vs, config).expect("trainer");
        let mean = |t: &Trainer| {
            t.losses(&model, &pairs)
                .expect("losses")
                .iter()
                .sum::<f64>()
                / 8.0
        };
        let start = mean(&trainer);
        assert!(start > 1e-3, "the targets must be nontrivial: {start}");
        for _ in 0..60 {
            let report = trainer.step(&model, &pairs).expect("step");
            assert!(!report.is_skipped());
        }
        let end = mean(&trainer);
        eprintln!("known policy: mean loss {start} -> {end}");
        assert!(end < 0.1 * start, "{start} -> {end}");
    }

    /// Poisons one pair's reward so that the step is skipped.
    fn poisoned(model: &Llama) -> Vec<TrainPair> {
        let mut bad = pairs(model);
        bad[1].reward_diff = f64::NAN;
        bad
    }

    #[test]
    fn repeated_skips_roll_back_and_halve_the_learning_rate() {
        let mut config = config(Objective::Chi2, 0.5, 4);
        config.max_consecutive_skips = 3;
        let (vs, model) = tiny();
        let good = pairs(&model);
        let mut trainer = Trainer::new(&vs, config).expect("trainer");
        trainer.step(&model, &good).expect("step");
        let after_first = snapshot(&vs);
        trainer.step(&model, &good).expect("step");
        let after_second = snapshot(&vs);
        assert!(!bit_identical(&after_first, &after_second));

        for skip in 1..=3 {
            let report = trainer.step(&model, &poisoned(&model)).expect("skip");
            assert!(report.is_skipped());
            assert_eq!(report.rolled_back, skip == 3, "skip {skip}");
        }
        let counters = trainer.counters();
        assert!(
            bit_identical(&snapshot(&vs), &after_first),
            "not rolled back"
        );
        assert_eq!(counters.applied_steps, 1);
        assert_eq!(counters.lr_scale, 0.5);
        assert_eq!(counters.rollbacks, 1);
        assert_eq!(counters.consecutive_skips, 0);

        // The next update starts from the first update's moments at half the rate: the same
        // as a trainer that took the first update and then had its multiplier halved.
        let report = trainer.step(&model, &good).expect("step");
        assert_eq!(report.learning_rate, 0.5 * config.schedule.rate(1));
        let (vs2, model2) = tiny();
        let mut other = Trainer::new(&vs2, config).expect("trainer");
        other.step(&model2, &good).expect("step");
        let mut state = other.state().expect("state");
        state.counters.lr_scale = 0.5;
        other.restore(&state).expect("restore");
        other.step(&model2, &good).expect("step");
        assert!(bit_identical(&snapshot(&vs), &snapshot(&vs2)));
    }

    #[test]
    fn skips_below_the_limit_or_with_rollback_off_keep_the_state() {
        for limit in [0, 4] {
            let mut config = config(Objective::Rebel, 0.0, 4);
            config.max_consecutive_skips = limit;
            let (vs, model) = tiny();
            let mut trainer = Trainer::new(&vs, config).expect("trainer");
            trainer.step(&model, &pairs(&model)).expect("step");
            let before = snapshot(&vs);
            for _ in 0..3 {
                let report = trainer.step(&model, &poisoned(&model)).expect("skip");
                assert!(!report.rolled_back);
            }
            assert!(bit_identical(&snapshot(&vs), &before));
            assert_eq!(trainer.counters().lr_scale, 1.0);
            assert_eq!(trainer.counters().consecutive_skips, 3);
        }
    }

    #[test]
    fn a_saved_state_resumes_bit_identically() {
        let config = config(Objective::Kl, 0.3, 4);
        let (vs, model) = tiny();
        let good = pairs(&model);
        let mut trainer = Trainer::new(&vs, config).expect("trainer");
        for _ in 0..2 {
            trainer.step(&model, &good).expect("step");
        }
        let weights = WeightSnapshot::take(&vs).expect("weights");
        let state = trainer.state().expect("state");
        assert_eq!(state.counters.applied_steps, 2);
        assert_eq!(state.tensors.len(), 2 * vs.trainable_variables().len());

        let (vs2, model2) = tiny();
        weights.restore(&vs2).expect("weights");
        let mut resumed = Trainer::new(&vs2, config).expect("trainer");
        resumed.restore(&state).expect("restore");
        trainer.step(&model, &good).expect("step");
        resumed.step(&model2, &good).expect("step");
        assert!(bit_identical(&snapshot(&vs), &snapshot(&vs2)));
        assert_eq!(resumed.applied_steps(), 3);

        // A fresh trainer (zero moments) on the same weights takes another step.
        let (vs3, model3) = tiny();
        weights.restore(&vs3).expect("weights");
        let mut fresh = Trainer::new(&vs3, config).expect("trainer");
        fresh.step(&model3, &good).expect("step");
        assert!(!bit_identical(&snapshot(&vs), &snapshot(&vs3)));
    }

    #[test]
    fn length_buckets_leave_the_losses_and_gradient_unchanged() {
        let run = |length_buckets: usize| {
            let (vs, model) = tiny_f64();
            let config = StepConfig {
                length_buckets,
                ..config(Objective::Chi2, 0.5, 8)
            };
            let mut trainer = Trainer::new(&vs, config).expect("trainer");
            let pairs = pairs(&model);
            let accumulated = trainer.accumulate(&model, &pairs).expect("accumulate");
            (accumulated.losses, grads(&vs))
        };

        let (padded, padded_grads) = run(1);
        for length_buckets in [2, 4, 16] {
            let (bucketed, bucketed_grads) = run(length_buckets);
            let gap = padded
                .iter()
                .zip(&bucketed)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            assert!(gap < 1e-10, "{length_buckets}: losses differ by {gap}");
            let gap = max_abs_diff(&padded_grads, &bucketed_grads);
            assert!(gap < 1e-10, "{length_buckets}: gradients differ by {gap}");
        }
    }

    fn tiny_f64() -> (VarStore, Llama) {
        let mut vs = VarStore::new(Device::Cpu);
        vs.set_kind(Kind::Double);
        let model = Llama::from_pretrained(&vs, &fixture()).expect("the fixture loads");
        (vs, model)
    }

    fn wasserstein(radius: f64, order: f64) -> StepConfig {
        let mut config = config(Objective::Rebel, 0.0, 3);
        config.objective = StepObjective::Wasserstein { radius, order };
        config
    }

    /// `θ ← θ + t·v` for every trainable variable, in name order.
    fn shift(vs: &VarStore, direction: &[Tensor], t: f64) {
        tch::no_grad(|| {
            for ((_, mut var), v) in adamw::trainable(vs).into_iter().zip(direction) {
                let _ = var.g_add_(&(v * t));
            }
        });
    }

    #[test]
    fn wasserstein_penalty_gradient_matches_finite_differences() {
        for order in [2.0, 3.0] {
            let (vs, model) = tiny_f64();
            let pairs = pairs(&model);
            let penalty = |t: &Trainer| {
                let (_, norms) = t.embedding_gradient_norms(&model, &pairs).expect("norms");
                wasserstein::plan(&norms, 1.0, order).value
            };
            // The penalty's gradient: the objective's at ρ = 1 minus its gradient at ρ = 0.
            let mut with = Trainer::new(&vs, wasserstein(1.0, order)).expect("trainer");
            with.accumulate(&model, &pairs).expect("accumulate");
            let g_with = grads(&vs);
            let mut without = Trainer::new(&vs, wasserstein(0.0, order)).expect("trainer");
            without.accumulate(&model, &pairs).expect("accumulate");
            let g_without = grads(&vs);

            tch::manual_seed(11);
            let trainable = adamw::trainable(&vs);
            let direction: Vec<Tensor> = trainable.iter().map(|(_, v)| v.randn_like()).collect();
            let analytic: f64 = trainable
                .iter()
                .zip(&direction)
                .map(|((name, _), v)| {
                    let of = |g: &Params| g.iter().find(|(n, _)| n == name).expect("grad").1.copy();
                    ((of(&g_with) - of(&g_without)) * v)
                        .sum(Kind::Double)
                        .double_value(&[])
                })
                .sum();

            let h = 1e-6;
            shift(&vs, &direction, h);
            let up = penalty(&with);
            shift(&vs, &direction, -2.0 * h);
            let down = penalty(&with);
            shift(&vs, &direction, h);
            let numeric = (up - down) / (2.0 * h);
            eprintln!("p = {order}: analytic {analytic}, numeric {numeric}");
            assert!(numeric.abs() > 1e-3, "the penalty must move: {numeric}");
            assert!(
                (analytic - numeric).abs() <= 1e-6 * numeric.abs().max(1.0),
                "p = {order}: {analytic} vs {numeric}"
            );
        }
    }

    /// Pairs whose reference is the fixture itself, so every policy-to-reference ratio is 0.
    fn pairs_at_reference(model: &Llama) -> Vec<TrainPair> {
        pairs(model)
            .into_iter()
            .map(|p| TrainPair {
                reference: Some((p.anchor_a, p.anchor_b)),
                ..p
            })
            .collect()
    }

    #[test]
    fn dpo_and_ipo_start_from_their_closed_forms() {
        let (vs, model) = tiny();
        let seqs = sequences(REWARDS.len());
        let own = pair_logprobs(&model, &seqs, PAD, 8, Device::Cpu).expect("own");
        let at_reference: Vec<TrainPair> = pairs_at_reference(&model)
            .into_iter()
            .zip(&own)
            .map(|(p, &r)| TrainPair {
                reference: Some(r),
                ..p
            })
            .collect();
        let dpo = Trainer::new(&vs, config(Objective::Dpo, 0.0, 4)).expect("trainer");
        for loss in dpo.losses(&model, &at_reference).expect("losses") {
            assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "{loss}");
        }
        let ipo = Trainer::new(&vs, config(Objective::Ipo, 0.0, 4)).expect("trainer");
        let beta = TrainConfig::default().dpo_beta;
        let target = 1.0 / (2.0 * beta);
        for (loss, reward) in ipo
            .losses(&model, &at_reference)
            .expect("losses")
            .iter()
            .zip(REWARDS)
        {
            let want = if reward == 0.0 { 0.0 } else { target * target };
            assert!((loss - want).abs() < 1e-4, "{loss} vs {want}");
        }
    }

    #[test]
    fn dpo_steps_raise_the_preferred_margin() {
        let (vs, model) = tiny();
        let seqs = sequences(REWARDS.len());
        let mut config = config(Objective::Dpo, 0.0, 4);
        config.schedule.peak = 1e-2;
        let pairs = pairs(&model);
        let margin = |m: &Llama| -> f64 {
            let lp = pair_logprobs(m, &seqs, PAD, 8, Device::Cpu).expect("logprobs");
            lp.iter()
                .zip(&pairs)
                .map(|(&(a, b), p)| {
                    let (ra, rb) = p.reference.expect("reference");
                    p.reward_diff.signum() * ((a - ra) - (b - rb))
                })
                .sum()
        };
        let start = margin(&model);
        let mut trainer = Trainer::new(&vs, config).expect("trainer");
        for _ in 0..5 {
            trainer.step(&model, &pairs).expect("step");
        }
        let end = margin(&model);
        assert!(end > start + 1.0, "{start} -> {end}");
    }

    #[test]
    fn shaping_subtracts_beta_times_the_anchor_to_reference_ratio() {
        let (vs, model) = tiny();
        let pairs = pairs(&model);
        let mut shaped = config(Objective::Rebel, 0.0, 4);
        shaped.beta = 0.5;
        let found = Trainer::new(&vs, shaped)
            .expect("trainer")
            .losses(&model, &pairs)
            .expect("losses");
        let manual: Vec<TrainPair> = pairs
            .iter()
            .map(|p| {
                let (ra, rb) = p.reference.expect("reference");
                let shaping = 0.5 * ((p.anchor_a - ra) - (p.anchor_b - rb));
                TrainPair {
                    reward_diff: p.reward_diff - shaping,
                    reference: None,
                    ..p.clone()
                }
            })
            .collect();
        let plain = Trainer::new(&vs, config(Objective::Rebel, 0.0, 4)).expect("trainer");
        let want = plain.losses(&model, &manual).expect("losses");
        let unshaped = plain.losses(&model, &pairs).expect("losses");
        // Pair 0's anchor equals its reference, so shaping leaves it alone; not the others.
        for (i, ((f, w), u)) in found.iter().zip(&want).zip(&unshaped).enumerate() {
            assert!((f - w).abs() < 1e-9, "{f} vs {w}");
            assert_eq!((f - u).abs() > 1e-6, i > 0, "pair {i}");
        }
        // Without reference log-probs, shaping is an error, not a silent zero.
        let bare: Vec<TrainPair> = manual;
        let error = Trainer::new(&vs, shaped)
            .expect("trainer")
            .losses(&model, &bare)
            .expect_err("missing reference");
        assert!(matches!(
            error,
            StepError::Objective(ObjectiveError::MissingReference { index: 0 })
        ));
    }
}
