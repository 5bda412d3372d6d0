//! Online REBEL rounds on the log-linear setting, with the daemon's losses and solvers.
//!
//! Each round samples pairs from the current policy (the anchor `θ_t`), labels them, and
//! minimizes the round's objective from `θ_t`. The pointwise losses come from
//! [`pointwise_losses`], the worst-case weights from [`Weighting::solve`] (the dual solvers of
//! [`crate::train::robust`]) recomputed at every evaluation (as the daemon recomputes them at
//! every step), and the Wasserstein penalty from [`wasserstein::plan`] and
//! [`wasserstein::squared_embedding_gradients`], with the features `φ` of both responses in
//! the place of the input embeddings. Because
//! `log π_θ(a|x) − log π_θ(b|x) = ⟨θ, φ(x, a) − φ(x, b)⟩`, the policy's log-prob "sums" are
//! the scores `⟨θ, φ⟩`: the partition function cancels in every pair.
//!
//! [`Weighting::solve`]: crate::train::objective::Weighting::solve
//!
//! The regression objectives use the round's fresh pairs, as REBEL does. `dpo` has no anchor,
//! so it is fitted to every pair collected so far.
//!
//! The minimizer is gradient descent preconditioned by the inverse second moment of the pair
//! features, with a backtracking line search on the objective's value. For `rebel` the first
//! step is the exact least-squares solution.

use rand::rngs::StdRng;
use rand::Rng;
use tch::{Kind, Tensor};

use crate::config::Objective;
use crate::train::objective::{pointwise_losses, LossSettings, PairColumns, StepObjective};
use crate::train::wasserstein;

use super::setting::{dot, draw_index, Setting};
use super::ExperimentError;

/// How the training pairs are labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Labels {
    /// The labeller's reward difference. The baselines get the soft label `σ(Δr)`.
    Scores,
    /// A Bradley–Terry preference drawn from the labeller's reward difference. The regression
    /// gets `±logit(confidence)`, as the daemon gives a preference without scores.
    Preferences,
}

/// What the rounds share, whatever the objective.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// REBEL rounds; each samples its share of the pairs from the policy it starts with.
    pub rounds: usize,
    /// η of the regression target.
    pub eta: f64,
    /// `α_train`: the shares of the user types who label the pairs.
    pub train_mixture: Vec<f64>,
    /// How a pair is labelled.
    pub labels: Labels,
    /// The confidence a preference stands for, with [`Labels::Preferences`].
    pub confidence: f64,
    /// Order p of the Wasserstein ambiguity set.
    pub wasserstein_order: f64,
}

/// An objective with its radius (ignored by `rebel` and `dpo`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Method {
    /// The objective, as in `train.objective`.
    pub objective: Objective,
    /// ρ for `chi2`, `kl` and `wasserstein`.
    pub radius: f64,
}

/// The parameters after each round, `θ_0` first.
pub type Trajectory = Vec<Vec<f64>>;

/// Runs `schedule.rounds` rounds on `n` pairs in total and returns the trajectory.
pub fn train(
    setting: &Setting,
    method: Method,
    n: usize,
    schedule: &Schedule,
    rng: &mut StdRng,
) -> Result<Trajectory, ExperimentError> {
    let settings = loss_settings(setting, method, schedule);
    let mut theta = setting.reference().to_vec();
    let mut trajectory = vec![theta.clone()];
    let mut collected = Vec::new();

    for round in 0..schedule.rounds {
        let count = n / schedule.rounds + usize::from(round < n % schedule.rounds);
        let fresh = sample_pairs(setting, &theta, count, schedule, rng);
        let pairs = match method.objective {
            Objective::Dpo | Objective::Ipo => {
                collected.extend(fresh);
                collected.clone()
            }
            _ => fresh,
        };

        if !pairs.is_empty() {
            let problem = RoundProblem::new(setting, &theta, &pairs, settings)?;
            theta = problem.minimize(theta)?;
        }
        trajectory.push(theta.clone());
    }
    Ok(trajectory)
}

/// The daemon's step objective for `method`, through the same mapping as `train.objective`.
fn loss_settings(setting: &Setting, method: Method, schedule: &Schedule) -> LossSettings {
    let beta = setting.shape().beta;
    let config = crate::config::TrainConfig {
        objective: method.objective,
        radius: method.radius,
        eta: schedule.eta,
        beta,
        dpo_beta: beta,
        wasserstein_order: schedule.wasserstein_order,
        kl_temperature: None,
        ..Default::default()
    };
    LossSettings {
        objective: StepObjective::from_config(&config),
        eta: schedule.eta,
        beta,
    }
}

/// A labelled pair: the context, the two responses, and what the losses read.
#[derive(Debug, Clone, Copy)]
struct Pair {
    context: usize,
    a: usize,
    b: usize,
    reward: f64,
    label: f64,
}

/// Pairs drawn from `π_θ`, each labelled by a user type drawn from the training mixture.
fn sample_pairs(
    setting: &Setting,
    theta: &[f64],
    count: usize,
    schedule: &Schedule,
    rng: &mut StdRng,
) -> Vec<Pair> {
    let contexts = setting.shape().contexts;
    (0..count)
        .map(|_| {
            let context = rng.random_range(0..contexts);
            let a = setting.sample_response(theta, context, rng);
            let b = setting.sample_response(theta, context, rng);
            let k = draw_index(&schedule.train_mixture, rng);
            let diff =
                setting.objective_reward(k, context, a) - setting.objective_reward(k, context, b);
            let (reward, label) = label_pair(diff, schedule, rng);
            Pair {
                context,
                a,
                b,
                reward,
                label,
            }
        })
        .collect()
}

/// `(Δr, y)` of a pair whose labeller's reward difference is `diff`.
fn label_pair(diff: f64, schedule: &Schedule, rng: &mut StdRng) -> (f64, f64) {
    let soft = 1.0 / (1.0 + (-diff).exp());
    match schedule.labels {
        Labels::Scores => (diff, soft),
        Labels::Preferences => {
            let logit = (schedule.confidence / (1.0 - schedule.confidence)).ln();
            match rng.random::<f64>() < soft {
                true => (logit, 1.0),
                false => (-logit, 0.0),
            }
        }
    }
}

/// Most preconditioned steps a round may take.
const MAX_STEPS: usize = 200;

/// A step is abandoned once the line search has shrunk it this far.
const SMALLEST_STEP: f64 = 1e-10;

/// The round stops when a step promises less than this decrease, relative to the value.
const TOLERANCE: f64 = 1e-13;

/// One round's objective as a function of `θ`.
struct RoundProblem {
    /// `φ(x, a)` of every pair, then `φ(x, b)`: `[2m, 1, d]`, the "input embeddings".
    features: Tensor,
    columns: PairColumns,
    settings: LossSettings,
    /// `(Σ Δφ Δφᵀ/m)⁻¹` scaled by the step a unit-curvature loss would take.
    preconditioner: Tensor,
}

/// The objective's value at a point, and the gradient when asked for.
struct Evaluation {
    value: f64,
    gradient: Option<Vec<f64>>,
}

impl RoundProblem {
    fn new(
        setting: &Setting,
        anchor: &[f64],
        pairs: &[Pair],
        settings: LossSettings,
    ) -> Result<Self, ExperimentError> {
        let d = setting.shape().dim as i64;
        let m = pairs.len() as i64;
        let rows: Vec<f64> = pairs
            .iter()
            .map(|p| setting.feature(p.context, p.a))
            .chain(pairs.iter().map(|p| setting.feature(p.context, p.b)))
            .flatten()
            .copied()
            .collect();
        let features = Tensor::f_from_slice(&rows)?.f_view([2 * m, 1, d])?;

        let log_ratio = |theta: &[f64]| -> Vec<f64> {
            pairs
                .iter()
                .map(|p| {
                    let a = dot(theta, setting.feature(p.context, p.a));
                    a - dot(theta, setting.feature(p.context, p.b))
                })
                .collect()
        };
        let columns = PairColumns {
            anchor: Tensor::f_from_slice(&log_ratio(anchor))?,
            reference: Tensor::f_from_slice(&log_ratio(setting.reference()))?,
            reward: Tensor::f_from_slice(&pairs.iter().map(|p| p.reward).collect::<Vec<_>>())?,
            labels: Tensor::f_from_slice(&pairs.iter().map(|p| p.label).collect::<Vec<_>>())?,
        };
        let preconditioner = preconditioner(&features, m, d, settings)?;
        Ok(Self {
            features,
            columns,
            settings,
            preconditioner,
        })
    }

    /// Preconditioned descent with backtracking from `theta`.
    fn minimize(&self, mut theta: Vec<f64>) -> Result<Vec<f64>, ExperimentError> {
        let mut current = self.evaluate(&theta, true)?;
        for _ in 0..MAX_STEPS {
            let Some(gradient) = current.gradient.take() else {
                break;
            };
            let direction = self.direction(&gradient)?;
            let promised = -dot(&gradient, &direction);
            if promised <= TOLERANCE * (1.0 + current.value.abs()) {
                break;
            }
            match self.line_search(&theta, &direction, current.value, promised)? {
                Some(next) => {
                    theta = next;
                    current = self.evaluate(&theta, true)?;
                }
                None => break,
            }
        }
        Ok(theta)
    }

    /// The first point along `direction` that decreases the value enough (Armijo).
    fn line_search(
        &self,
        theta: &[f64],
        direction: &[f64],
        value: f64,
        promised: f64,
    ) -> Result<Option<Vec<f64>>, ExperimentError> {
        let mut step = 1.0;
        while step >= SMALLEST_STEP {
            let candidate: Vec<f64> = theta
                .iter()
                .zip(direction)
                .map(|(t, g)| t + step * g)
                .collect();
            if self.evaluate(&candidate, false)?.value <= value - 1e-4 * step * promised {
                return Ok(Some(candidate));
            }
            step /= 2.0;
        }
        Ok(None)
    }

    /// `−P·gradient`.
    fn direction(&self, gradient: &[f64]) -> Result<Vec<f64>, ExperimentError> {
        let gradient = Tensor::f_from_slice(gradient)?;
        let step = self.preconditioner.f_mv(&gradient)?.f_neg()?;
        Ok(Vec::<f64>::try_from(step)?)
    }

    /// The objective at `theta` as the daemon forms it: the weighted pointwise losses with the
    /// worst-case weights, plus the Wasserstein penalty.
    fn evaluate(&self, theta: &[f64], with_gradient: bool) -> Result<Evaluation, ExperimentError> {
        let theta = Tensor::f_from_slice(theta)?.set_requires_grad(with_gradient);
        let penalized = matches!(self.settings.objective, StepObjective::Wasserstein { .. });
        let features = self.features.f_detach()?.set_requires_grad(penalized);

        let m = self.columns.reward.size1()?;
        let sums = features.f_squeeze_dim(1)?.f_mv(&theta)?;
        let h_theta = sums.f_narrow(0, 0, m)?.f_sub(&sums.f_narrow(0, m, m)?)?;
        let losses = pointwise_losses(self.settings, &h_theta, &self.columns)?;
        let values = Vec::<f64>::try_from(losses.f_detach()?)?;
        let solution = self.settings.objective.weighting().solve(&values)?;
        let q = Tensor::f_from_slice(&solution.weights)?;
        let mut objective = losses.f_mul(&q)?.f_sum(Kind::Double)?;
        let mut value = solution.value;

        if let StepObjective::Wasserstein { radius, order } = self.settings.objective {
            let squared =
                wasserstein::squared_embedding_gradients(&losses, &features, with_gradient)?;
            let norms = Vec::<f64>::try_from(squared.f_detach()?.f_sqrt()?)?;
            let plan = wasserstein::plan(&norms, radius, order);
            value += plan.value;
            if with_gradient {
                let a = Tensor::f_from_slice(&plan.coefficients)?;
                objective = objective.f_add(&squared.f_mul(&a)?.f_sum(Kind::Double)?)?;
            }
        }
        if !with_gradient {
            return Ok(Evaluation {
                value,
                gradient: None,
            });
        }

        let grads = Tensor::f_run_backward(&[objective], &[&theta], false, false)?;
        let gradient = match grads.into_iter().next() {
            Some(g) => Vec::<f64>::try_from(g)?,
            None => return Err(ExperimentError::NoGradient),
        };
        Ok(Evaluation {
            value,
            gradient: Some(gradient),
        })
    }
}

/// `(Σ Δφ Δφᵀ/m + εI)⁻¹` times the curvature scale of the loss: `η²/2` for the regression,
/// `4/β²` for the logistic loss of DPO (the inverse of its largest curvature) and `1/2` for
/// IPO's square, whose target does not scale the margin.
fn preconditioner(
    features: &Tensor,
    m: i64,
    d: i64,
    settings: LossSettings,
) -> Result<Tensor, ExperimentError> {
    let flat = features.f_squeeze_dim(1)?;
    let diffs = flat.f_narrow(0, 0, m)?.f_sub(&flat.f_narrow(0, m, m)?)?;
    let moment = diffs.f_tr()?.f_mm(&diffs)?.f_div_scalar(m as f64)?;
    let ridge = moment.f_trace()?.double_value(&[]) / d as f64 * 1e-6 + 1e-12;
    let eye = Tensor::f_eye(d, (Kind::Double, tch::Device::Cpu))?;
    let inverse = moment.f_add(&eye.f_mul_scalar(ridge)?)?.f_inverse()?;
    let scale = match settings.objective {
        StepObjective::Dpo { beta } => 4.0 / (beta * beta),
        StepObjective::Ipo { .. } => 0.5,
        _ => settings.eta * settings.eta / 2.0,
    };
    Ok(inverse.f_mul_scalar(scale)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::experiment::setting::{distance, Shape};

    fn setting(seed: u64) -> Setting {
        let shape = Shape {
            dim: 4,
            objectives: 2,
            responses: 5,
            contexts: 16,
            reward_scale: 2.0,
            beta: 1.0,
        };
        Setting::draw(shape, seed)
    }

    fn schedule() -> Schedule {
        Schedule {
            rounds: 3,
            eta: 0.5,
            train_mixture: vec![0.7, 0.3],
            labels: Labels::Scores,
            confidence: 0.75,
            wasserstein_order: 2.0,
        }
    }

    fn trajectory(setting: &Setting, objective: Objective, radius: f64, n: usize) -> Trajectory {
        let mut rng = StdRng::seed_from_u64(21);
        let method = Method { objective, radius };
        train(setting, method, n, &schedule(), &mut rng).unwrap()
    }

    /// The largest distance between the parameters of two trajectories, round by round.
    fn gap(a: &Trajectory, b: &Trajectory) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| distance(x, y))
            .fold(0.0, f64::max)
    }

    #[test]
    fn vanishing_radius_reproduces_the_rebel_trajectory() {
        let setting = setting(1);
        let rebel = trajectory(&setting, Objective::Rebel, 0.0, 300);
        let moved = distance(&rebel[0], &rebel[3]);
        assert!(moved > 0.5, "rebel barely moved: {moved}");

        for objective in [Objective::Chi2, Objective::Kl, Objective::Wasserstein] {
            let tiny = trajectory(&setting, objective, 1e-12, 300);
            let tiny_gap = gap(&rebel, &tiny);
            assert!(tiny_gap < 1e-4, "{objective:?}: {tiny_gap}");

            let wide = trajectory(&setting, objective, 0.5, 300);
            let wide_gap = gap(&rebel, &wide);
            assert!(
                wide_gap > 1e-2,
                "{objective:?} ignores its radius: {wide_gap}"
            );
        }
    }

    #[test]
    fn rebel_parameter_error_shrinks_as_n_grows() {
        let mean_error = |n: usize| -> f64 {
            let errors = (0..4).map(|seed| {
                let setting = setting(seed);
                let last = trajectory(&setting, Objective::Rebel, 0.0, n)
                    .pop()
                    .unwrap();
                distance(&last, &setting.optimum(&schedule().train_mixture))
            });
            errors.sum::<f64>() / 4.0
        };
        let errors: Vec<f64> = [60, 600, 6000].into_iter().map(mean_error).collect();
        assert!(errors[1] < 0.7 * errors[0], "{errors:?}");
        assert!(errors[2] < 0.7 * errors[1], "{errors:?}");
    }

    #[test]
    fn rebel_rounds_solve_the_regression_exactly() {
        // One round without noise in the labels (a single user type) recovers REBEL's mirror
        // step θ_1 = θ_0 + η·w: every pair's residual is zero there.
        let setting = setting(2);
        let mut schedule = schedule();
        schedule.rounds = 1;
        schedule.train_mixture = vec![1.0, 0.0];
        let mut rng = StdRng::seed_from_u64(3);
        let method = Method {
            objective: Objective::Rebel,
            radius: 0.0,
        };
        let last = train(&setting, method, 200, &schedule, &mut rng)
            .unwrap()
            .pop()
            .unwrap();

        let mut expected = setting.reference().to_vec();
        let w = setting.reward_parameters(&[1.0, 0.0]);
        expected
            .iter_mut()
            .zip(&w)
            .for_each(|(t, wi)| *t += schedule.eta * wi);
        assert!(
            distance(&last, &expected) < 1e-6,
            "{last:?} vs {expected:?}"
        );
    }
}
