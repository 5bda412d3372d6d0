//! The log-linear setting of the analysis, and its exact evaluation.
//!
//! A finite set of contexts, each with `M` candidate responses and features `φ(x, y) ∈ R^d`;
//! `K` reward objectives `r_k(x, y) = ⟨θ*_k, φ(x, y)⟩`; policies
//! `π_θ(y|x) ∝ exp(⟨θ, φ(x, y)⟩)` with the reference `π_ref = π_{θ_0}`. Contexts are uniform.
//!
//! Under a mixture `α` the reward is `r_α = ⟨w_α, φ⟩` with `w_α = Σ_k α_k θ*_k`, and the
//! KL-regularized objective `J_α(π) = E_x[E_{y~π} r_α − β·KL(π(·|x) ‖ π_ref(·|x))]` is
//! maximized by `π* ∝ π_ref·exp(r_α/β)`, which is the log-linear policy of
//! `θ*_α = θ_0 + w_α/β`. Its value is `J*_α = E_x[β·log Σ_y π_ref(y|x)·exp(r_α(x, y)/β)]`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The sizes of a setting and the scales of its random draws.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// `d`: the feature dimension.
    pub dim: usize,
    /// `K`: the number of reward objectives.
    pub objectives: usize,
    /// `M`: candidate responses per context.
    pub responses: usize,
    /// The number of contexts.
    pub contexts: usize,
    /// The typical size of a reward: `θ*_k` is drawn with `E‖θ*_k‖² = reward_scale²`.
    pub reward_scale: f64,
    /// β: the weight of the KL regularization toward the reference.
    pub beta: f64,
}

/// One random draw of the setting: features, reward objectives and reference.
#[derive(Debug, Clone)]
pub struct Setting {
    shape: Shape,
    /// `φ(x, y)` at `(x·M + y)·d`.
    features: Vec<f64>,
    /// `θ*_k`, one row per objective.
    objectives: Vec<Vec<f64>>,
    /// `θ_0`.
    reference: Vec<f64>,
}

/// How far the reference parameters are from zero, relative to the reward scale: the
/// reference policy prefers some responses, but less than the rewards do.
const REFERENCE_SCALE: f64 = 0.5;

impl Setting {
    /// Draws features and objectives with standard normal entries (objectives and reference
    /// scaled by `1/sqrt(d)`) from `seed`.
    pub fn draw(shape: Shape, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let per_entry = 1.0 / (shape.dim as f64).sqrt();
        let count = shape.contexts * shape.responses * shape.dim;
        let features = normal_vector(&mut rng, count, 1.0);
        let objectives = (0..shape.objectives)
            .map(|_| normal_vector(&mut rng, shape.dim, shape.reward_scale * per_entry))
            .collect();
        let scale = REFERENCE_SCALE * shape.reward_scale * per_entry;
        let reference = normal_vector(&mut rng, shape.dim, scale);
        Self {
            shape,
            features,
            objectives,
            reference,
        }
    }

    /// The sizes and scales this setting was drawn with.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// `θ_0`, the reference policy's parameters.
    pub fn reference(&self) -> &[f64] {
        &self.reference
    }

    /// `φ(x, y)`.
    pub fn feature(&self, context: usize, response: usize) -> &[f64] {
        let d = self.shape.dim;
        let start = (context * self.shape.responses + response) * d;
        &self.features[start..start + d]
    }

    /// `w_α = Σ_k α_k θ*_k`: the reward parameters of `mixture`.
    pub fn reward_parameters(&self, mixture: &[f64]) -> Vec<f64> {
        let mut w = vec![0.0; self.shape.dim];
        for (alpha, theta) in mixture.iter().zip(&self.objectives) {
            axpy(&mut w, *alpha, theta);
        }
        w
    }

    /// `r_k(x, y)` of objective `k`.
    pub fn objective_reward(&self, k: usize, context: usize, response: usize) -> f64 {
        dot(&self.objectives[k], self.feature(context, response))
    }

    /// `θ*_α = θ_0 + w_α/β`: the KL-regularized optimum under `mixture`.
    pub fn optimum(&self, mixture: &[f64]) -> Vec<f64> {
        let mut theta = self.reference.clone();
        axpy(
            &mut theta,
            1.0 / self.shape.beta,
            &self.reward_parameters(mixture),
        );
        theta
    }

    /// `⟨θ, φ(x, y)⟩` for every response of `context`.
    pub fn scores(&self, theta: &[f64], context: usize) -> Vec<f64> {
        (0..self.shape.responses)
            .map(|y| dot(theta, self.feature(context, y)))
            .collect()
    }

    /// `log π_θ(·|x)` for `context`.
    pub fn log_policy(&self, theta: &[f64], context: usize) -> Vec<f64> {
        let scores = self.scores(theta, context);
        let normalizer = log_sum_exp(&scores);
        scores.iter().map(|s| s - normalizer).collect()
    }

    /// A response drawn from `π_θ(·|x)` by inverting its distribution function.
    pub fn sample_response(&self, theta: &[f64], context: usize, rng: &mut impl Rng) -> usize {
        let probabilities: Vec<f64> = self
            .log_policy(theta, context)
            .iter()
            .map(|log_p| log_p.exp())
            .collect();
        draw_index(&probabilities, rng)
    }

    /// `J*_α − J_α(π_θ)` from the definitions of the module docs.
    pub fn suboptimality(&self, theta: &[f64], mixture: &[f64]) -> f64 {
        let beta = self.shape.beta;
        let w = self.reward_parameters(mixture);
        let per_context = (0..self.shape.contexts).map(|x| {
            let log_reference = self.log_policy(&self.reference, x);
            let log_policy = self.log_policy(theta, x);
            let rewards = self.scores(&w, x);

            let tilted: Vec<f64> = log_reference
                .iter()
                .zip(&rewards)
                .map(|(lr, r)| lr + r / beta)
                .collect();
            let best = beta * log_sum_exp(&tilted);

            let achieved: f64 = (0..rewards.len())
                .map(|y| {
                    let p = log_policy[y].exp();
                    p * (rewards[y] - beta * (log_policy[y] - log_reference[y]))
                })
                .sum();
            best - achieved
        });
        per_context.sum::<f64>() / self.shape.contexts as f64
    }

    /// `β·E_x[KL(π_θ(·|x) ‖ π*_α(·|x))]`, with `π*_α` the policy of [`Self::optimum`]. It
    /// equals [`Self::suboptimality`]: a second way to compute it.
    pub fn divergence_from_optimum(&self, theta: &[f64], mixture: &[f64]) -> f64 {
        let optimum = self.optimum(mixture);
        let per_context = (0..self.shape.contexts).map(|x| {
            let log_policy = self.log_policy(theta, x);
            let log_optimum = self.log_policy(&optimum, x);
            log_policy
                .iter()
                .zip(&log_optimum)
                .map(|(lp, lo)| lp.exp() * (lp - lo))
                .sum::<f64>()
        });
        self.shape.beta * per_context.sum::<f64>() / self.shape.contexts as f64
    }
}

/// `⟨a, b⟩`.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// An index drawn with probabilities `weights` (which sum to one), by inverting their
/// distribution function.
pub fn draw_index(weights: &[f64], rng: &mut impl Rng) -> usize {
    let u: f64 = rng.random();
    let mut cumulative = 0.0;
    for (k, w) in weights.iter().enumerate() {
        cumulative += w;
        if u < cumulative {
            return k;
        }
    }
    weights.len() - 1
}

/// `‖a − b‖`.
pub fn distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// `y ← y + a·x`.
fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

fn log_sum_exp(values: &[f64]) -> f64 {
    let top = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    top + values.iter().map(|v| (v - top).exp()).sum::<f64>().ln()
}

/// `count` independent normal draws with standard deviation `scale` (Box–Muller).
fn normal_vector(rng: &mut impl Rng, count: usize, scale: f64) -> Vec<f64> {
    (0..count)
        .map(|_| {
            let radius = (-2.0 * (1.0 - rng.random::<f64>()).ln()).sqrt();
            let angle = std::f64::consts::TAU * rng.random::<f64>();
            scale * radius * angle.cos()
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn small() -> Setting {
        let shape = Shape {
            dim: 5,
            objectives: 3,
            responses: 6,
            contexts: 9,
            reward_scale: 2.0,
            beta: 0.7,
        };
        Setting::draw(shape, 3)
    }

    #[test]
    fn suboptimality_computed_two_ways_agrees() {
        let setting = small();
        let mut rng = StdRng::seed_from_u64(8);
        for _ in 0..20 {
            let theta = normal_vector(&mut rng, 5, 1.5);
            let raw: Vec<f64> = (0..3).map(|_| rng.random::<f64>()).collect();
            let total: f64 = raw.iter().sum();
            let mixture: Vec<f64> = raw.iter().map(|a| a / total).collect();

            let direct = setting.suboptimality(&theta, &mixture);
            let divergence = setting.divergence_from_optimum(&theta, &mixture);
            assert!(direct > 1e-6, "{direct}");
            assert!(
                (direct - divergence).abs() <= 1e-10 * (1.0 + direct),
                "{direct} vs {divergence}"
            );
        }
    }

    #[test]
    fn the_optimum_has_no_suboptimality_and_others_have_some() {
        let setting = small();
        let mixture = [0.2, 0.5, 0.3];
        let optimum = setting.optimum(&mixture);
        assert!(setting.suboptimality(&optimum, &mixture).abs() < 1e-12);

        let mut nudged = optimum.clone();
        nudged[0] += 0.1;
        assert!(setting.suboptimality(&nudged, &mixture) > 1e-6);
        assert!(setting.suboptimality(setting.reference(), &mixture) > 1e-3);
    }

    #[test]
    fn sampled_responses_follow_the_policy() {
        let setting = small();
        let theta = setting.optimum(&[1.0, 0.0, 0.0]);
        let mut rng = StdRng::seed_from_u64(5);
        let mut counts = [0usize; 6];
        let draws = 40_000;
        for _ in 0..draws {
            counts[setting.sample_response(&theta, 2, &mut rng)] += 1;
        }
        for (y, log_p) in setting.log_policy(&theta, 2).iter().enumerate() {
            let share = counts[y] as f64 / draws as f64;
            assert!((share - log_p.exp()).abs() < 0.01, "{y}: {share}");
        }
    }
}
