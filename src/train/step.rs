//! One DRO-REBEL optimizer step over a batch of pairs.
//!
//! For pair `i` with responses `a` and `b`, policy `π_θ`, frozen anchor `π_t` and reward
//! difference `Δr_i` (see [`super::reward`]), the pointwise loss is REBEL's regression
//!
//! ```text
//! ℓ_i = ( (1/η)·[(log π_θ(a) − log π_t(a)) − (log π_θ(b) − log π_t(b))] − Δr_i )²
//! ```
//!
//! `rebel` minimizes the mean; `chi2` and `kl` minimize `Σ q_i ℓ_i` with the worst-case
//! weights `q` of [`robust::solve`], taken on the detached losses and held constant in the
//! backward. The weights must sum to one over the whole optimizer step, so a step runs in two
//! passes: a no-grad forward over every micro-batch gives all `ℓ_i`, the dual is solved once,
//! then each micro-batch is run again with gradients and back-propagates `Σ_{i∈micro} q_i ℓ_i`.
//! The accumulated gradient is that of the one-batch objective.
//!
//! A step whose loss or gradient is not finite is skipped: the gradients are zeroed, the
//! optimizer is not stepped, and the weights stay bit-identical.

use tch::nn::{self, OptimizerConfig, VarStore};
use tch::{Device, Kind, TchError, Tensor};

use crate::buffer::PairRecord;
use crate::config::{Objective, TrainConfig};
use crate::model::llama::Llama;
use crate::model::logprobs::{
    response_logprobs, response_logprobs_no_grad, Batch, Limits, LogprobError, Sequence,
};
use crate::train::robust::{self, Ambiguity, RobustError, RobustSolution};

use super::schedule::LrSchedule;

/// Why a step could not run. Configuration errors must be fixed by the operator; the others
/// mean the batch or the model is bad.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The objective is not implemented by this trainer yet.
    #[error("train.objective = {0:?} is not supported yet")]
    Unsupported(Objective),

    /// η must be finite and positive.
    #[error("train.eta is {0}, but it must be finite and greater than zero")]
    InvalidEta(f64),

    /// A micro-batch needs at least one pair.
    #[error("train.micro_batch_size must be at least 1")]
    ZeroMicroBatch,

    /// A step needs at least one pair.
    #[error("a step needs at least one pair")]
    EmptyStep,

    /// A pair could not be scored.
    #[error("scoring a micro-batch failed")]
    Logprob(#[from] LogprobError),

    /// The worst-case weights could not be computed.
    #[error("the robust weights could not be computed")]
    Robust(#[from] RobustError),

    /// libtorch failed.
    #[error("libtorch failed during the step")]
    Torch(#[from] TchError),
}

/// One pair ready to train on: both sequences, the anchor's log-probabilities of them
/// (cached by the caller) and the reward difference.
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
/// gradients, `micro` pairs at a time: the anchor's values for [`TrainPair`].
pub fn pair_logprobs(
    model: &Llama,
    pairs: &[(Sequence, Sequence)],
    pad_id: u32,
    micro: usize,
    device: Device,
) -> Result<Vec<(f64, f64)>, StepError> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(micro.max(1)) {
        let seqs: Vec<Sequence> = chunk
            .iter()
            .map(|p| p.0.clone())
            .chain(chunk.iter().map(|p| p.1.clone()))
            .collect();
        let batch = Batch::new(&seqs, pad_id, device)?;
        let sums = response_logprobs_no_grad(model, &batch)?.sums;
        let sums = Vec::<f64>::try_from(sums.f_to_kind(Kind::Double)?)?;
        let (a, b) = sums.split_at(chunk.len());
        out.extend(a.iter().copied().zip(b.iter().copied()));
    }
    Ok(out)
}

/// The settings of a step, validated from `[train]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepConfig {
    /// Which weights the pointwise losses get.
    pub weighting: Weighting,
    /// REBEL's η.
    pub eta: f64,
    /// Pairs per forward/backward.
    pub micro_batch_size: usize,
    /// Global gradient L2 norm clip; 0 disables it.
    pub max_grad_norm: f64,
    /// The learning rate per applied update.
    pub schedule: LrSchedule,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW ε; `1e-8` from [`StepConfig::from_config`], as in PyTorch.
    pub adam_eps: f64,
    /// The pad id of the tokenizer.
    pub pad_id: u32,
}

/// How the step's pointwise losses are weighted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Weighting {
    /// `1/n` each: REBEL.
    Uniform,
    /// The worst case over an ambiguity set.
    Robust(Ambiguity),
}

impl StepConfig {
    /// The step settings of `config`, with the tokenizer's `pad_id`.
    pub fn from_config(config: &TrainConfig, pad_id: u32) -> Result<Self, StepError> {
        let weighting = match (config.objective, config.kl_temperature) {
            (Objective::Rebel, _) => Weighting::Uniform,
            (Objective::Chi2, _) => Weighting::Robust(Ambiguity::Chi2 {
                radius: config.radius,
            }),
            (Objective::Kl, Some(temperature)) => {
                Weighting::Robust(Ambiguity::KlTemperature { temperature })
            }
            (Objective::Kl, None) => Weighting::Robust(Ambiguity::Kl {
                radius: config.radius,
            }),
            (other, _) => return Err(StepError::Unsupported(other)),
        };
        if !(config.eta.is_finite() && config.eta > 0.0) {
            return Err(StepError::InvalidEta(config.eta));
        }
        if config.micro_batch_size == 0 {
            return Err(StepError::ZeroMicroBatch);
        }
        if let Weighting::Robust(ambiguity) = weighting {
            // A bad radius or temperature fails here, at start-up, not at the first step.
            robust::solve(&[0.0, 1.0], ambiguity)?;
        }
        Ok(Self {
            weighting,
            eta: config.eta,
            micro_batch_size: config.micro_batch_size,
            max_grad_norm: config.max_grad_norm,
            schedule: LrSchedule::from_config(config),
            weight_decay: config.weight_decay,
            adam_eps: 1e-8,
            pad_id,
        })
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
    /// The objective's value: `Σ q_i ℓ_i` (the mean for `rebel`).
    pub robust_loss: f64,
    /// The dual variable: χ² threshold `c*`, KL temperature `τ*`; NaN for `rebel`.
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
    /// Why the step was skipped; `None` when the update was applied.
    pub skipped: Option<SkipReason>,
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
    /// `ℓ_i` per pair, from the no-grad pass.
    pub losses: Vec<f64>,
    /// The weights and dual; `None` when a loss was not finite (nothing was accumulated).
    pub solution: Option<RobustSolution>,
    /// See [`StepReport::tokens`].
    pub tokens: usize,
}

/// AdamW over a policy's trainable variables, stepping DRO-REBEL.
pub struct Trainer {
    config: StepConfig,
    optimizer: nn::Optimizer,
    variables: Vec<Tensor>,
    device: Device,
    applied: u64,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// An AdamW trainer of `vs`'s trainable variables.
    pub fn new(vs: &VarStore, config: StepConfig) -> Result<Self, StepError> {
        let adamw = nn::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            wd: config.weight_decay,
            eps: config.adam_eps,
            amsgrad: false,
        };
        let optimizer = adamw.build(vs, config.schedule.rate(0))?;
        Ok(Self {
            config,
            optimizer,
            variables: vs.trainable_variables(),
            device: vs.device(),
            applied: 0,
        })
    }

    /// Updates applied so far (skipped steps excluded); the schedule's position.
    pub fn applied_steps(&self) -> u64 {
        self.applied
    }

    /// The settings.
    pub fn config(&self) -> &StepConfig {
        &self.config
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
        self.optimizer.zero_grad();
        let tokens = pairs
            .iter()
            .map(|p| p.a.ids().len() + p.b.ids().len())
            .sum();

        let losses = self.losses(model, pairs)?;
        if losses.iter().any(|l| !l.is_finite()) {
            return Ok(Accumulated {
                losses,
                solution: None,
                tokens,
            });
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
            tokens,
        })
    }

    /// Checks, clips and applies the gradient left by [`Trainer::accumulate`].
    pub fn apply(&mut self, accumulated: &Accumulated) -> Result<StepReport, StepError> {
        let n = accumulated.losses.len();
        let loss = accumulated.losses.iter().sum::<f64>() / n as f64;
        let mut report = StepReport {
            pairs: n,
            loss,
            robust_loss: f64::NAN,
            dual: f64::NAN,
            effective_sample_fraction: f64::NAN,
            max_weight: f64::NAN,
            zero_weight_share: f64::NAN,
            grad_norm: f64::NAN,
            learning_rate: self.config.schedule.rate(self.applied),
            tokens: accumulated.tokens,
            skipped: None,
        };
        let Some(solution) = &accumulated.solution else {
            return Ok(self.skip(report, SkipReason::NonFiniteLoss));
        };
        let stats = solution.stats();
        report.robust_loss = solution.value;
        report.dual = match self.config.weighting {
            Weighting::Uniform => f64::NAN,
            Weighting::Robust(_) => solution.dual,
        };
        report.effective_sample_fraction = stats.effective_sample_fraction;
        report.max_weight = stats.max_weight;
        report.zero_weight_share = stats.zero_weight_share;

        report.grad_norm = self.grad_norm()?;
        if !report.grad_norm.is_finite() {
            return Ok(self.skip(report, SkipReason::NonFiniteGradient));
        }
        self.clip(report.grad_norm)?;
        self.optimizer.set_lr(report.learning_rate);
        self.optimizer.step();
        self.optimizer.zero_grad();
        self.applied += 1;
        Ok(report)
    }

    fn skip(&mut self, mut report: StepReport, reason: SkipReason) -> StepReport {
        self.optimizer.zero_grad();
        report.skipped = Some(reason);
        report
    }

    /// `ℓ_i` for every pair, without gradients, a micro-batch at a time.
    pub fn losses(&self, model: &Llama, pairs: &[TrainPair]) -> Result<Vec<f64>, StepError> {
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(self.config.micro_batch_size) {
            let losses = tch::no_grad(|| self.pointwise(model, chunk, false))?;
            out.extend(Vec::<f64>::try_from(losses)?);
        }
        Ok(out)
    }

    /// `ℓ_i` of `chunk` as a `[m]` f64 tensor, with a graph when `grad`.
    fn pointwise(
        &self,
        model: &Llama,
        chunk: &[TrainPair],
        grad: bool,
    ) -> Result<Tensor, StepError> {
        let m = chunk.len() as i64;
        let device = self.device;
        let seqs: Vec<Sequence> = chunk
            .iter()
            .map(|p| p.a.clone())
            .chain(chunk.iter().map(|p| p.b.clone()))
            .collect();
        let batch = Batch::new(&seqs, self.config.pad_id, device)?;
        let sums = match grad {
            true => response_logprobs(model, &batch)?.sums,
            false => response_logprobs_no_grad(model, &batch)?.sums,
        };
        let sums = sums.f_to_kind(Kind::Double)?;

        let column = |f: fn(&TrainPair) -> f64| -> Result<Tensor, TchError> {
            let values: Vec<f64> = chunk.iter().map(f).collect();
            Tensor::f_from_slice(&values)?.f_to_device(device)
        };
        let anchor_a = column(|p| p.anchor_a)?;
        let anchor_b = column(|p| p.anchor_b)?;
        let reward = column(|p| p.reward_diff)?;

        let ratio_a = sums.f_narrow(0, 0, m)?.f_sub(&anchor_a)?;
        let ratio_b = sums.f_narrow(0, m, m)?.f_sub(&anchor_b)?;
        let residual = ratio_a
            .f_sub(&ratio_b)?
            .f_div_scalar(self.config.eta)?
            .f_sub(&reward)?;
        Ok(residual.f_square()?)
    }

    fn weights(&self, losses: &[f64]) -> Result<RobustSolution, StepError> {
        match self.config.weighting {
            Weighting::Uniform => {
                let n = losses.len() as f64;
                Ok(RobustSolution {
                    value: losses.iter().sum::<f64>() / n,
                    dual: f64::NAN,
                    weights: vec![1.0 / n; losses.len()],
                })
            }
            Weighting::Robust(ambiguity) => Ok(robust::solve(losses, ambiguity)?),
        }
    }

    /// Global L2 norm of the accumulated gradient, in f64 so that large entries cannot
    /// overflow; NaN or infinite when any entry is.
    fn grad_norm(&self) -> Result<f64, StepError> {
        let mut squares = 0.0;
        for var in &self.variables {
            let grad = var.grad();
            if grad.defined() {
                let g = grad.f_to_kind(Kind::Double)?;
                squares += g.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
            }
        }
        Ok(squares.sqrt())
    }

    fn clip(&self, norm: f64) -> Result<(), StepError> {
        let max = self.config.max_grad_norm;
        if max <= 0.0 || norm <= max {
            return Ok(());
        }
        let scale = max / (norm + 1e-6);
        tch::no_grad(|| {
            for var in &self.variables {
                let mut grad = var.grad();
                if grad.defined() {
                    let _scaled = grad.f_mul_scalar_(scale)?;
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Schedule;

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

    #[test]
    fn accumulated_micro_batches_equal_one_batch() {
        for (objective, radius) in [
            (Objective::Rebel, 0.0),
            (Objective::Chi2, 0.5),
            (Objective::Kl, 0.3),
        ] {
            let (one, before, g_one, w_one) = run(config(objective, radius, 8));
            let (two, _, g_two, w_two) = run(config(objective, radius, 4));
            assert!(!one.is_skipped() && !two.is_skipped(), "{objective:?}");
            assert!((one.loss - two.loss).abs() <= 1e-9, "{objective:?}");
            assert!(
                (one.robust_loss - two.robust_loss).abs() <= 1e-9,
                "{objective:?}"
            );
            let scale = g_one
                .iter()
                .map(|(_, g)| g.abs().max().double_value(&[]))
                .fold(0.0, f64::max);
            let g_diff = max_abs_diff(&g_one, &g_two);
            assert!(g_diff <= 1e-5 * scale.max(1.0), "{objective:?}: {g_diff}");
            let update = max_abs_diff(&before, &w_one);
            assert!(update > 1e-4, "{objective:?}: the step moved nothing");
            let w_diff = max_abs_diff(&w_one, &w_two);
            assert!(w_diff <= 1e-5, "{objective:?}: updates differ by {w_diff}");
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
        for poison in 0..2 {
            let (vs, model) = tiny();
            let mut bad = pairs(&model);
            match poison {
                0 => bad[5].reward_diff = f64::NAN,
                _ => bad[2].anchor_b = f64::INFINITY,
            }
            let good = pairs(&model);
            let before = snapshot(&vs);
            let mut trainer = Trainer::new(&vs, config(Objective::Chi2, 0.5, 4)).expect("trainer");

            let report = trainer.step(&model, &bad).expect("a skip is not an error");
            assert_eq!(report.skipped, Some(SkipReason::NonFiniteLoss));
            assert!(bit_identical(&before, &snapshot(&vs)), "weights moved");
            assert_eq!(trainer.applied_steps(), 0);
            assert!(vs
                .trainable_variables()
                .iter()
                .all(|v| !v.grad().defined() || v.grad().abs().max().double_value(&[]) == 0.0));

            // The optimizer was untouched: the next step equals a fresh trainer's first.
            let report = trainer.step(&model, &good).expect("step");
            assert!(!report.is_skipped());
            let (_, _, _, fresh) = run(config(Objective::Chi2, 0.5, 4));
            assert!(
                bit_identical(&snapshot(&vs), &fresh),
                "optimizer state changed"
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
    fn unsupported_objectives_are_errors() {
        for objective in [Objective::Wasserstein, Objective::Dpo, Objective::Ipo] {
            let train = TrainConfig {
                objective,
                ..TrainConfig::default()
            };
            assert!(matches!(
                StepConfig::from_config(&train, PAD),
                Err(StepError::Unsupported(o)) if o == objective
            ));
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
}
