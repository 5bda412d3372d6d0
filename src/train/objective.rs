//! The pointwise loss of each pair, per objective, from the policy's log-probabilities.
//!
//! With `h_θ = log π_θ(a) − log π_θ(b)` (and `h_t`, `h_ref` the same under the anchor and the
//! reference model):
//!
//! - `rebel`, `chi2`, `kl`, `wasserstein` regress: `ℓ = ((h_θ − h_t)/η − Δr')²`, where the
//!   reward difference is shaped toward the reference when β > 0:
//!   `Δr' = Δr − β·(h_t − h_ref)` (REBEL's KL-in-reward);
//! - `dpo`: `ℓ = −[y·log σ(z) + (1 − y)·log σ(−z)]` with `z = β_dpo·(h_θ − h_ref)`;
//! - `ipo`: `ℓ = (h_θ − h_ref − (2y − 1)/(2β_dpo))²`.
//!
//! `y` is the label of the baselines: 1 when `Δr > 0` (A preferred), 0 when `Δr < 0`, ½ for a
//! tie, so a hard preference gives the published DPO and IPO losses.

use tch::{Device, Kind, TchError, Tensor};

use crate::config::{Objective, TrainConfig};
use crate::train::robust::{self, Ambiguity, RobustError, RobustSolution};

use super::step::TrainPair;

/// How the step's pointwise losses are weighted by the regression objectives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Weighting {
    /// `1/n` each: REBEL.
    Uniform,
    /// The worst case over an ambiguity set.
    Robust(Ambiguity),
}

impl Weighting {
    /// The weights of `losses` and the loss they give: `1/n` each and the mean (dual NaN) for
    /// [`Weighting::Uniform`], the worst case over the ambiguity set for [`Weighting::Robust`].
    pub fn solve(&self, losses: &[f64]) -> Result<RobustSolution, RobustError> {
        match *self {
            Weighting::Uniform => {
                let n = losses.len() as f64;
                Ok(RobustSolution {
                    value: losses.iter().sum::<f64>() / n,
                    dual: f64::NAN,
                    weights: vec![1.0 / n; losses.len()],
                })
            }
            Weighting::Robust(ambiguity) => robust::solve(losses, ambiguity),
        }
    }
}

/// The objective of a step, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepObjective {
    /// `rebel`, `chi2` or `kl`: the REBEL regression, weighted.
    Regression(Weighting),
    /// The REBEL regression plus the first-order Wasserstein gradient penalty
    /// (see [`super::wasserstein`]).
    Wasserstein {
        /// ρ.
        radius: f64,
        /// p ≥ 1.
        order: f64,
    },
    /// DPO against the reference model.
    Dpo {
        /// β of DPO.
        beta: f64,
    },
    /// IPO against the reference model.
    Ipo {
        /// β (τ) of IPO.
        beta: f64,
    },
}

impl StepObjective {
    /// The objective of `config`.
    pub fn from_config(config: &TrainConfig) -> Self {
        match (config.objective, config.kl_temperature) {
            (Objective::Rebel, _) => Self::Regression(Weighting::Uniform),
            (Objective::Chi2, _) => Self::Regression(Weighting::Robust(Ambiguity::Chi2 {
                radius: config.radius,
            })),
            (Objective::Kl, Some(temperature)) => {
                Self::Regression(Weighting::Robust(Ambiguity::KlTemperature { temperature }))
            }
            (Objective::Kl, None) => Self::Regression(Weighting::Robust(Ambiguity::Kl {
                radius: config.radius,
            })),
            (Objective::Wasserstein, _) => Self::Wasserstein {
                radius: config.radius,
                order: config.wasserstein_order,
            },
            (Objective::Dpo, _) => Self::Dpo {
                beta: config.dpo_beta,
            },
            (Objective::Ipo, _) => Self::Ipo {
                beta: config.dpo_beta,
            },
        }
    }

    /// How the pointwise losses are weighted: robust for `chi2` and `kl`, uniform otherwise.
    pub fn weighting(&self) -> Weighting {
        match self {
            Self::Regression(weighting) => *weighting,
            _ => Weighting::Uniform,
        }
    }

    /// Whether the objective reads the reference model's log-probs.
    pub fn uses_reference(&self) -> bool {
        matches!(self, Self::Dpo { .. } | Self::Ipo { .. })
    }

    /// Whether the objective reads the anchor's log-probs.
    pub fn uses_anchor(&self) -> bool {
        !self.uses_reference()
    }
}

/// What the pointwise losses of a micro-batch need besides the policy's log-probs.
#[derive(Debug, Clone, Copy)]
pub struct LossSettings {
    /// The objective and its parameters.
    pub objective: StepObjective,
    /// η of the regression target.
    pub eta: f64,
    /// β of the reward's KL-to-reference shaping; 0 turns it off.
    pub beta: f64,
}

/// Why a pair's loss could not be formed.
#[derive(Debug, thiserror::Error)]
pub enum ObjectiveError {
    /// The objective or the shaping needs the reference model's log-probs, which the pair
    /// lacks.
    #[error("pair {index} of the step has no reference log-probs, which the objective needs")]
    MissingReference {
        /// The pair's position in the step.
        index: usize,
    },
    /// libtorch failed.
    #[error("libtorch failed while forming the losses")]
    Torch(#[from] TchError),
}

/// A micro-batch's per-pair inputs besides the policy, each a `[m]` f64 tensor.
#[derive(Debug)]
pub struct PairColumns {
    /// `h_t`: the anchor's log-ratio difference.
    pub anchor: Tensor,
    /// `h_ref`: the reference model's; zeros where the objective and the shaping ignore it.
    pub reference: Tensor,
    /// `Δr`: the reward difference.
    pub reward: Tensor,
    /// `y`: the baselines' label, 1 when A is preferred; a probability in between is a soft
    /// label.
    pub labels: Tensor,
}

/// `ℓ_i` as a `[m]` f64 tensor from the policy's log-ratio difference `h_θ` (the formulas of
/// the module docs). Differentiable in `h_θ`.
pub fn pointwise_losses(
    settings: LossSettings,
    h_theta: &Tensor,
    columns: &PairColumns,
) -> Result<Tensor, TchError> {
    match settings.objective {
        StepObjective::Regression(_) | StepObjective::Wasserstein { .. } => {
            let mut reward = columns.reward.shallow_clone();
            if settings.beta != 0.0 {
                let log_ratio = columns.anchor.f_sub(&columns.reference)?;
                reward = reward.f_sub(&log_ratio.f_mul_scalar(settings.beta)?)?;
            }
            let residual = h_theta
                .f_sub(&columns.anchor)?
                .f_div_scalar(settings.eta)?
                .f_sub(&reward)?;
            residual.f_square()
        }
        StepObjective::Dpo { beta } => {
            let z = h_theta.f_sub(&columns.reference)?.f_mul_scalar(beta)?;
            let y = &columns.labels;
            let chosen = y.f_mul(&z.f_log_sigmoid()?)?;
            let rejected = y
                .f_neg()?
                .f_add_scalar(1.0)?
                .f_mul(&z.f_neg()?.f_log_sigmoid()?)?;
            chosen.f_add(&rejected)?.f_neg()
        }
        StepObjective::Ipo { beta } => {
            let target = columns.labels.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?;
            let target = target.f_div_scalar(2.0 * beta)?;
            let residual = h_theta.f_sub(&columns.reference)?.f_sub(&target)?;
            residual.f_square()
        }
    }
}

impl LossSettings {
    /// Whether the losses read the reference model: the baselines, and the shaping when β ≠ 0.
    fn reads_reference(&self) -> bool {
        self.objective.uses_reference() || self.beta != 0.0
    }
}

/// `ℓ_i` as a `[m]` f64 tensor from the policy's `[2m]` log-prob sums (A sequences first).
pub(crate) fn pair_losses(
    settings: LossSettings,
    sums: &Tensor,
    chunk: &[TrainPair],
    device: Device,
) -> Result<Tensor, ObjectiveError> {
    let m = chunk.len() as i64;
    let sums = sums.f_to_kind(Kind::Double)?;
    let h_theta = sums.f_narrow(0, 0, m)?.f_sub(&sums.f_narrow(0, m, m)?)?;
    let column = |values: Vec<f64>| -> Result<Tensor, TchError> {
        Tensor::f_from_slice(&values)?.f_to_device(device)
    };

    let reference = match settings.reads_reference() {
        true => chunk
            .iter()
            .enumerate()
            .map(|(index, p)| {
                p.reference
                    .map(|(a, b)| a - b)
                    .ok_or(ObjectiveError::MissingReference { index })
            })
            .collect::<Result<Vec<f64>, _>>()?,
        false => vec![0.0; chunk.len()],
    };
    let columns = PairColumns {
        anchor: column(chunk.iter().map(|p| p.anchor_a - p.anchor_b).collect())?,
        reference: column(reference)?,
        reward: column(chunk.iter().map(|p| p.reward_diff).collect())?,
        labels: column(chunk.iter().map(|p| label(p.reward_diff)).collect())?,
    };
    Ok(pointwise_losses(settings, &h_theta, &columns)?)
}

/// The baselines' label of a reward difference: 1, 0, ½ for a tie, and NaN for a NaN, so that
/// a bad reward skips the step as it does under the regression objectives.
fn label(reward_diff: f64) -> f64 {
    match reward_diff {
        d if d > 0.0 => 1.0,
        d if d < 0.0 => 0.0,
        0.0 => 0.5,
        _ => f64::NAN,
    }
}
