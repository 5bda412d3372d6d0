//! Worst-case reweighting of per-pair losses: the "DRO" in DRO-REBEL.
//!
//! A batch gives losses `ℓ_1..ℓ_n` under the empirical distribution `P` (mass `1/n` each).
//! Instead of the mean, the trainer minimizes the largest expected loss over an ambiguity set
//! of distributions `Q` near `P`, and back-propagates through the worst-case weights `q_i`
//! (which sum to one). Everything here is plain `f64` arithmetic; no tensors.
//!
//! # χ² ball
//!
//! `sup { E_Q[ℓ] : ½·E_P[(dQ/dP − 1)²] ≤ ρ }` has the dual (Duchi and Namkoong, 2021, Cressie-Read
//! family with k = 2)
//!
//! ```text
//! min_c  c + sqrt(1 + 2ρ) · sqrt(mean_i (ℓ_i − c)₊²),     q_i ∝ (ℓ_i − c*)₊
//! ```
//!
//! The objective is convex and continuously differentiable below `max ℓ`. On the piece where
//! exactly the `k` largest losses exceed `c`, with mean `μ_k` and population variance `σ_k²`,
//! the stationarity condition is a quadratic whose root is
//! `c = μ_k − σ_k · sqrt(n / ((1 + 2ρ)k − n))`. [`solve_chi2`] walks the pieces from the top
//! and keeps the first root that lies on its own piece, so the answer is exact, not searched.
//! When `ρ ≥ (n/m − 1)/2`, with `m` the number of losses tied at the maximum, the constraint
//! does not bind: `c* = max ℓ` and the weights are uniform over the maximizers.
//! At `ρ = 0` the ball is `{P}`: the value is the mean and the infimum over `c` is only
//! approached as `c → −∞`.
//!
//! # KL ball
//!
//! `sup { E_Q[ℓ] : KL(Q‖P) ≤ ρ }` has the dual (Hu and Hong, 2013)
//!
//! ```text
//! min_{τ>0}  τρ + τ · log mean_i exp(ℓ_i / τ),     q_i ∝ exp(ℓ_i / τ*)
//! ```
//!
//! Its derivative in `τ` is `ρ − KL(q_τ‖P)`, so [`solve_kl`] finds the temperature whose
//! exponential tilt has divergence exactly `ρ`, by safeguarded Newton steps inside a bracket
//! in the inverse temperature `β = 1/τ`. When `ρ ≥ log(n/m)` the bound does not bind: the
//! value is `max ℓ` and `τ* = 0`. At `ρ = 0` the value is the mean and `τ* = +∞`.
//! [`kl_fixed_temperature`] skips the search and tilts with a given `τ`.
//!
//! # Numerics
//!
//! Losses are divided by a power of two (exact) so that the largest magnitude is near one, and
//! exponentials are taken after subtracting the maximum, so no finite input can overflow.

/// Largest number of times the bracket on the inverse temperature may double.
const MAX_BRACKET_DOUBLINGS: usize = 2_100;

/// Largest number of safeguarded Newton steps: a backstop, since Newton converges in a few
/// steps near the root and every other step at least halves the bracket.
const MAX_REFINE_STEPS: usize = 1_200;

/// Why a robust loss could not be computed. The caller passed bad input and must fix it.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum RobustError {
    /// The batch has no losses, so there is no distribution to perturb.
    #[error("cannot reweight an empty batch of losses")]
    Empty,

    /// A loss is NaN or infinite.
    #[error("loss {index} is {value}, but every loss must be finite")]
    NonFiniteLoss {
        /// Position of the first offending loss.
        index: usize,
        /// The offending loss.
        value: f64,
    },

    /// The radius of the ambiguity set is negative, NaN or infinite.
    #[error("ambiguity radius is {value}, but it must be finite and at least zero")]
    InvalidRadius {
        /// The offending radius.
        value: f64,
    },

    /// The temperature of a fixed exponential tilt is not a finite positive number.
    #[error("temperature is {value}, but it must be finite and greater than zero")]
    InvalidTemperature {
        /// The offending temperature.
        value: f64,
    },
}

/// Which set of distributions around the batch the worst case is taken over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ambiguity {
    /// The χ² ball `½·E_P[(dQ/dP − 1)²] ≤ radius`; see [`solve_chi2`].
    Chi2 {
        /// Radius `ρ ≥ 0`.
        radius: f64,
    },

    /// The KL ball `KL(Q‖P) ≤ radius`; see [`solve_kl`].
    Kl {
        /// Radius `ρ ≥ 0`.
        radius: f64,
    },

    /// An exponential tilt at a fixed temperature; see [`kl_fixed_temperature`].
    KlTemperature {
        /// Temperature `τ > 0`.
        temperature: f64,
    },
}

/// The worst case over an ambiguity set.
#[derive(Debug, Clone, PartialEq)]
pub struct RobustSolution {
    /// The robust loss `Σ q_i ℓ_i`, which equals the optimal dual objective.
    pub value: f64,

    /// The optimal dual variable: the threshold `c*` for χ², the temperature `τ*` for KL.
    ///
    /// It can be infinite in the limits described on each solver.
    pub dual: f64,

    /// The worst-case weights `q_i`, one per loss, non-negative and summing to one.
    pub weights: Vec<f64>,
}

impl RobustSolution {
    /// Summary statistics of [`Self::weights`], for metrics.
    pub fn stats(&self) -> WeightStats {
        weight_stats(&self.weights)
    }
}

/// How far a set of weights is from uniform, in numbers fit for a dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WeightStats {
    /// Kish's effective sample size `(Σ q_i)² / Σ q_i²` divided by `n`: one for uniform
    /// weights, `1/n` for a point mass.
    pub effective_sample_fraction: f64,

    /// The largest weight as a share of the total, so the largest `q_i` for normalized weights.
    pub max_weight: f64,

    /// The fraction of weights that are exactly zero.
    pub zero_weight_share: f64,
}

/// Solves the worst case for `ambiguity` by calling the matching solver.
pub fn solve(losses: &[f64], ambiguity: Ambiguity) -> Result<RobustSolution, RobustError> {
    match ambiguity {
        Ambiguity::Chi2 { radius } => solve_chi2(losses, radius),
        Ambiguity::Kl { radius } => solve_kl(losses, radius),
        Ambiguity::KlTemperature { temperature } => kl_fixed_temperature(losses, temperature),
    }
}

/// The worst-case expected loss over the χ² ball `½·E_P[(dQ/dP − 1)²] ≤ radius`.
///
/// The dual variable is the threshold `c*`: losses above it get weight proportional to their
/// excess, losses at or below it get zero. When the ball contains the uniform distribution over
/// the maximal losses (`radius ≥ (n/m − 1)/2`, `m` of them tied), `c* = max ℓ`. At `radius = 0`
/// with unequal losses the value is the mean and `c*` is `−∞`; it can also round to `−∞` for
/// radii so small that the weights are uniform to machine precision.
pub fn solve_chi2(losses: &[f64], radius: f64) -> Result<RobustSolution, RobustError> {
    validate_losses(losses)?;
    validate_radius(radius)?;

    let scaled = Scaled::new(losses);
    let mut descending = scaled.values.clone();
    descending.sort_by(|a, b| b.total_cmp(a));

    let solution = match chi2_threshold(&descending, radius) {
        Some(threshold) if threshold.is_finite() => chi2_at_threshold(&scaled, threshold),
        _ => scaled.solution(uniform_weights(losses.len()), f64::NEG_INFINITY),
    };
    Ok(solution)
}

/// The worst-case expected loss over the KL ball `KL(Q‖P) ≤ radius`.
///
/// The dual variable is the temperature `τ*` of the tilt `q_i ∝ exp(ℓ_i/τ*)`. It is `0` when
/// the ball contains the uniform distribution over the maximal losses
/// (`radius ≥ log(n/m)`, `m` of them tied), and `+∞` at `radius = 0` with unequal losses.
pub fn solve_kl(losses: &[f64], radius: f64) -> Result<RobustSolution, RobustError> {
    validate_losses(losses)?;
    validate_radius(radius)?;

    let scaled = Scaled::new(losses);
    let shifted = scaled.shifted();
    if radius >= concentrated_kl(&shifted) {
        return Ok(scaled.concentrated(0.0));
    }
    if radius == 0.0 {
        return Ok(scaled.solution(uniform_weights(losses.len()), f64::INFINITY));
    }

    let solution = match kl_inverse_temperature(&shifted, radius) {
        Some(beta) => scaled.solution(tilt(&shifted, beta).weights, scaled.scale / beta),
        None => scaled.concentrated(0.0),
    };
    Ok(solution)
}

/// Exponential tilting at a fixed temperature: `q_i ∝ exp(ℓ_i/τ)`, value `Σ q_i ℓ_i`.
///
/// This is the KL worst case whose radius is implied by the temperature instead of chosen:
/// the value equals [`solve_kl`] at `radius = KL(q‖P)` (see [`kl_divergence_from_uniform`]).
/// Small temperatures approach the maximum loss, large ones the mean. It is also the maximizer
/// of the penalized problem `E_Q[ℓ] − τ·KL(Q‖P)`, whose optimal value `τ log mean exp(ℓ/τ)`
/// is *not* what `value` holds. The dual field holds `temperature`.
pub fn kl_fixed_temperature(
    losses: &[f64],
    temperature: f64,
) -> Result<RobustSolution, RobustError> {
    validate_losses(losses)?;
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(RobustError::InvalidTemperature { value: temperature });
    }

    let scaled = Scaled::new(losses);
    let beta = scaled.scale / temperature;
    let weights = tilt(&scaled.shifted(), beta).weights;
    Ok(scaled.solution(weights, temperature))
}

/// Effective sample fraction, largest share and share of zeros of non-negative `weights`.
///
/// The weights need not be normalized. An empty slice, or one of all zeros, gives all zeros.
pub fn weight_stats(weights: &[f64]) -> WeightStats {
    let total: f64 = weights.iter().sum();
    let total_sq: f64 = weights.iter().map(|w| w * w).sum();
    if weights.is_empty() || total_sq <= 0.0 {
        return WeightStats::default();
    }

    let n = weights.len() as f64;
    let heaviest = largest(weights);
    let zeros = weights.iter().filter(|&&w| w == 0.0).count() as f64;
    WeightStats {
        effective_sample_fraction: total * total / total_sq / n,
        max_weight: heaviest / total,
        zero_weight_share: zeros / n,
    }
}

/// `½·E_P[(nq − 1)²]` for normalized `weights` against the uniform distribution: the radius
/// of the smallest χ² ball that contains them. Zero for an empty slice.
pub fn chi2_divergence_from_uniform(weights: &[f64]) -> f64 {
    if weights.is_empty() {
        return 0.0;
    }

    let n = weights.len() as f64;
    let squares: f64 = weights.iter().map(|q| (n * q - 1.0).powi(2)).sum();
    0.5 * squares / n
}

/// `KL(Q‖P) = Σ q_i log(n q_i)` for normalized `weights` against the uniform distribution: the
/// radius of the smallest KL ball that contains them. Zero for an empty slice.
pub fn kl_divergence_from_uniform(weights: &[f64]) -> f64 {
    let n = weights.len() as f64;
    weights
        .iter()
        .filter(|&&q| q > 0.0)
        .map(|q| q * (n * q).ln())
        .sum()
}

fn validate_losses(losses: &[f64]) -> Result<(), RobustError> {
    if losses.is_empty() {
        return Err(RobustError::Empty);
    }
    match losses.iter().position(|loss| !loss.is_finite()) {
        Some(index) => Err(RobustError::NonFiniteLoss {
            index,
            value: losses[index],
        }),
        None => Ok(()),
    }
}

fn validate_radius(radius: f64) -> Result<(), RobustError> {
    if radius.is_finite() && radius >= 0.0 {
        Ok(())
    } else {
        Err(RobustError::InvalidRadius { value: radius })
    }
}

/// Losses divided by a power of two, so that the largest magnitude lies in `[1, 2)` (or near
/// it, for magnitudes beyond `2^±1000`).
///
/// The division is exact, keeps ties, and keeps squares and sums of any finite input in range.
/// Values and duals are multiplied back when a solution is built.
struct Scaled {
    values: Vec<f64>,
    scale: f64,
}

impl Scaled {
    fn new(losses: &[f64]) -> Self {
        let largest = losses
            .iter()
            .fold(0.0, |acc: f64, loss| acc.max(loss.abs()));
        let scale = power_of_two_at_most(largest);
        let values = losses.iter().map(|loss| loss / scale).collect();
        Self { values, scale }
    }

    /// `x_i − max x`, with exactly `0.0` at every maximal loss.
    fn shifted(&self) -> Vec<f64> {
        let top = largest(&self.values);
        self.values.iter().map(|x| x - top).collect()
    }

    fn solution(&self, weights: Vec<f64>, dual: f64) -> RobustSolution {
        let mean: f64 = weights.iter().zip(&self.values).map(|(q, x)| q * x).sum();
        RobustSolution {
            value: mean * self.scale,
            dual,
            weights,
        }
    }

    /// Uniform weights over the maximal losses, with the value exactly the maximum (summing
    /// `q_i ℓ_i` over ties would round).
    fn concentrated(&self, dual: f64) -> RobustSolution {
        let top = largest(&self.values);
        let weights = argmax_weights(&self.values);
        RobustSolution {
            value: top * self.scale,
            dual,
            weights,
        }
    }
}

/// The power of two at or just below `x`, clamped to `2^±1000`; one for zero.
fn power_of_two_at_most(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let exponent = x.log2().floor().clamp(-1000.0, 1000.0) as i64;

    // A biased exponent in 23..=2023 with a zero mantissa is exactly 2^exponent.
    f64::from_bits(((exponent + 1023) as u64) << 52)
}

fn largest(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn uniform_weights(n: usize) -> Vec<f64> {
    vec![1.0 / n as f64; n]
}

/// Uniform weights over the entries equal to the maximum.
fn argmax_weights(values: &[f64]) -> Vec<f64> {
    let top = largest(values);
    let ties = values.iter().filter(|&&x| x == top).count() as f64;
    values
        .iter()
        .map(|&x| if x == top { 1.0 / ties } else { 0.0 })
        .collect()
}

/// The χ² threshold `c*` for losses sorted in descending order, or `None` when the infimum is
/// only approached as `c → −∞` (radius zero with unequal losses).
fn chi2_threshold(descending: &[f64], radius: f64) -> Option<f64> {
    let n = descending.len();
    let mut active = RunningMoments::default();
    let mut start = 0;

    while start < n {
        let top = descending[start];
        let ties = descending[start..]
            .iter()
            .take_while(|&&x| x == top)
            .count();
        descending[start..start + ties]
            .iter()
            .for_each(|&x| active.push(x));
        start += ties;

        // The piece ends where the next smaller loss would join the active set.
        let floor = descending.get(start).copied().unwrap_or(f64::NEG_INFINITY);
        if let Some(root) = piece_root(&active, n, radius).filter(|&c| c >= floor) {
            return Some(root.min(top));
        }
    }
    None
}

/// The root of the dual's derivative on the piece where exactly the `active` losses exceed `c`.
///
/// Setting the derivative to zero gives `((1 + 2ρ)k − n)·(μ − c)² = n σ²` with `c < μ`. When
/// the active losses are all equal (the top piece), a non-positive slope means the minimum sits
/// at the kink `c = max ℓ`.
fn piece_root(active: &RunningMoments, n: usize, radius: f64) -> Option<f64> {
    let k = active.count as f64;

    // (1 + 2ρ)k − n, written so that a tiny radius does not vanish against n.
    let excess = 2.0 * radius * k - (n - active.count) as f64;
    if excess < 0.0 {
        return None;
    }
    if active.m2 == 0.0 {
        return Some(active.mean);
    }
    if excess == 0.0 {
        return None;
    }

    let variance = active.m2 / k;
    Some(active.mean - (variance * n as f64 / excess).sqrt())
}

fn chi2_at_threshold(scaled: &Scaled, threshold: f64) -> RobustSolution {
    let excesses: Vec<f64> = scaled
        .values
        .iter()
        .map(|x| (x - threshold).max(0.0))
        .collect();
    let total: f64 = excesses.iter().sum();
    if total <= 0.0 {
        return scaled.concentrated(threshold * scaled.scale);
    }

    let weights = excesses.iter().map(|e| e / total).collect();
    scaled.solution(weights, threshold * scaled.scale)
}

/// Count, mean and sum of squared deviations, updated one value at a time (Welford), which
/// stays accurate when a huge outlier sits next to small losses.
#[derive(Default)]
struct RunningMoments {
    count: usize,
    mean: f64,
    m2: f64,
}

impl RunningMoments {
    fn push(&mut self, x: f64) {
        self.count += 1;
        let delta = x - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (x - self.mean);
    }
}

/// `KL` of the uniform distribution over the maximal losses: the largest divergence any tilt
/// reaches. Written exactly as [`tilt`] computes it in that limit, so the two agree bit for bit.
fn concentrated_kl(shifted: &[f64]) -> f64 {
    let ties = shifted.iter().filter(|&&y| y == 0.0).count() as f64;
    -(ties / shifted.len() as f64).ln()
}

/// The exponential tilt `q ∝ exp(β y)` of losses shifted so that their maximum is zero.
struct Tilt {
    weights: Vec<f64>,
    /// `KL(q‖P)`.
    kl: f64,
    /// Variance of the shifted losses under `q`; the derivative of `kl` in `β` is `β` times it.
    variance: f64,
}

fn tilt(shifted: &[f64], beta: f64) -> Tilt {
    // Zero stays zero even for an infinite beta, so the maximum always has weight one.
    let exponentials: Vec<f64> = shifted
        .iter()
        .map(|&y| if y == 0.0 { 1.0 } else { (beta * y).exp() })
        .collect();
    let total: f64 = exponentials.iter().sum();
    let weights: Vec<f64> = exponentials.iter().map(|e| e / total).collect();

    let mean: f64 = weights.iter().zip(shifted).map(|(q, y)| q * y).sum();
    let variance = weights
        .iter()
        .zip(shifted)
        .map(|(q, y)| q * (y - mean).powi(2))
        .sum();
    let log_mean_exp = (total / shifted.len() as f64).ln();
    Tilt {
        kl: beta * mean - log_mean_exp,
        variance,
        weights,
    }
}

/// The inverse temperature `β*` at which the tilt's divergence equals `radius`, for
/// `0 < radius < concentrated_kl`. `None` if the tilt saturates first, which the caller
/// treats as the concentrated solution.
fn kl_inverse_temperature(shifted: &[f64], radius: f64) -> Option<f64> {
    let (low, high) = bracket_inverse_temperature(shifted, radius)?;
    Some(refine_inverse_temperature(shifted, radius, low, high))
}

/// A bracket `[low, high]` with `KL(low) < radius ≤ KL(high)`, doubling from the small-radius
/// estimate `KL(β) ≈ β² Var_P / 2`.
fn bracket_inverse_temperature(shifted: &[f64], radius: f64) -> Option<(f64, f64)> {
    let n = shifted.len() as f64;
    let mean = shifted.iter().sum::<f64>() / n;
    let variance = shifted.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / n;
    let mut low = 0.0;
    let mut high = (2.0 * radius / variance).sqrt();

    for _ in 0..MAX_BRACKET_DOUBLINGS {
        if !high.is_finite() {
            return None;
        }
        if tilt(shifted, high).kl >= radius {
            return Some((low, high));
        }
        low = high;
        high *= 2.0;
    }
    None
}

/// Newton's method on `KL(β) − radius`, falling back to bisection whenever a step would leave
/// the bracket; stops when the step is within a few ulps.
fn refine_inverse_temperature(shifted: &[f64], radius: f64, mut low: f64, mut high: f64) -> f64 {
    let mut beta = high;

    for _ in 0..MAX_REFINE_STEPS {
        let at = tilt(shifted, beta);
        let gap = at.kl - radius;
        if gap == 0.0 {
            return beta;
        }
        if gap < 0.0 {
            low = beta;
        } else {
            high = beta;
        }

        let next = newton_or_bisect(beta, gap, beta * at.variance, low, high);
        if (next - beta).abs() <= 2.0 * f64::EPSILON * beta {
            return next;
        }
        beta = next;
    }
    beta
}

fn newton_or_bisect(x: f64, value: f64, slope: f64, low: f64, high: f64) -> f64 {
    let newton = x - value / slope;
    if newton > low && newton < high {
        newton
    } else {
        0.5 * (low + high)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on a broken expectation
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Agreement with the independent brute-force references.
    const AGREE: f64 = 1e-6;

    /// Agreement between a solution's primal value and its own dual objective.
    const EXACT: f64 = 1e-9;

    struct Case {
        losses: Vec<f64>,
        radius: f64,
    }

    // ---- assertions ----

    /// `|a − b| ≤ tol · max(|a|, |b|, max |ℓ|)`: relative to the magnitude of the losses,
    /// because the robust value is translation equivariant and can be near zero.
    fn assert_close(a: f64, b: f64, tol: f64, losses: &[f64], what: &str) {
        let magnitude = losses.iter().fold(f64::MIN_POSITIVE, |m, l| m.max(l.abs()));
        let bound = tol * magnitude.max(a.abs()).max(b.abs());
        assert!((a - b).abs() <= bound, "{what}: {a} vs {b} for {losses:?}");
    }

    fn assert_distribution(weights: &[f64], n: usize) {
        assert_eq!(weights.len(), n);
        assert!(
            weights.iter().all(|q| q.is_finite() && *q >= 0.0),
            "{weights:?}"
        );
        let total: f64 = weights.iter().sum();
        assert!((total - 1.0).abs() <= 1e-12, "weights sum to {total}");
    }

    fn primal_value(weights: &[f64], losses: &[f64]) -> f64 {
        weights.iter().zip(losses).map(|(q, l)| q * l).sum()
    }

    fn mean(losses: &[f64]) -> f64 {
        losses.iter().sum::<f64>() / losses.len() as f64
    }

    fn max(losses: &[f64]) -> f64 {
        losses.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }

    fn min(losses: &[f64]) -> f64 {
        losses.iter().copied().fold(f64::INFINITY, f64::min)
    }

    // ---- independent references ----

    fn chi2_dual_objective(losses: &[f64], radius: f64, c: f64) -> f64 {
        let mean_sq =
            losses.iter().map(|l| (l - c).max(0.0).powi(2)).sum::<f64>() / losses.len() as f64;
        c + (1.0 + 2.0 * radius).sqrt() * mean_sq.sqrt()
    }

    fn kl_dual_objective(losses: &[f64], radius: f64, tau: f64) -> f64 {
        let top = max(losses);
        let sum: f64 = losses.iter().map(|l| ((l - top) / tau).exp()).sum();
        tau * radius + top + tau * (sum / losses.len() as f64).ln()
    }

    fn chi2_divergence(weights: &[f64]) -> f64 {
        let n = weights.len() as f64;
        weights
            .iter()
            .map(|q| (n * q - 1.0).powi(2) / n)
            .sum::<f64>()
            / 2.0
    }

    fn kl_divergence(weights: &[f64]) -> f64 {
        let n = weights.len() as f64;
        weights
            .iter()
            .filter(|q| **q > 0.0)
            .map(|q| q * (q * n).ln())
            .sum()
    }

    /// Minimum of a unimodal `f` on `[lo, hi]`: a dense grid, then golden-section search
    /// between the neighbours of the best grid point.
    fn grid_then_golden(f: impl Fn(f64) -> f64, lo: f64, hi: f64) -> f64 {
        const POINTS: usize = 2001;
        let at = |j: usize| lo + (hi - lo) * j as f64 / (POINTS - 1) as f64;
        let best = (0..POINTS)
            .min_by(|&a, &b| f(at(a)).total_cmp(&f(at(b))))
            .unwrap();
        let (mut a, mut b) = (at(best.saturating_sub(1)), at((best + 1).min(POINTS - 1)));

        let ratio = (5f64.sqrt() - 1.0) / 2.0;
        for _ in 0..200 {
            let (x1, x2) = (b - ratio * (b - a), a + ratio * (b - a));
            if f(x1) <= f(x2) {
                b = x2;
            } else {
                a = x1;
            }
        }
        f(a).min(f(b)).min(f(at(best)))
    }

    /// The χ² dual minimized by brute force over `c`, below which nothing is optimal:
    /// `c* ≥ μ − σ/sqrt(2ρ) ≥ min ℓ − spread/sqrt(2ρ)`. At `ρ = 0` the ball is `{P}`.
    fn chi2_by_dual_search(losses: &[f64], radius: f64) -> f64 {
        if radius == 0.0 {
            return mean(losses);
        }
        let spread = max(losses) - min(losses);
        let lo = min(losses) - (spread + 1.0) * (10.0 + 1.0 / radius.sqrt());
        grid_then_golden(
            |c| chi2_dual_objective(losses, radius, c),
            lo,
            max(losses) + 1.0,
        )
    }

    /// The KL dual minimized by brute force over `log τ`.
    fn kl_by_dual_search(losses: &[f64], radius: f64) -> f64 {
        let spread = (max(losses) - min(losses)).max(1.0);
        let objective = |log_tau: f64| kl_dual_objective(losses, radius, log_tau.exp());
        grid_then_golden(objective, (1e-15 * spread).ln(), (1e9 * spread).ln())
    }

    /// Euclidean projection onto the probability simplex (sort and threshold).
    fn project_to_simplex(v: &[f64]) -> Vec<f64> {
        let mut sorted = v.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let (mut cumulative, mut theta) = (0.0, 0.0);
        for (j, &x) in sorted.iter().enumerate() {
            cumulative += x;
            let candidate = (cumulative - 1.0) / (j + 1) as f64;
            if x > candidate {
                theta = candidate;
            }
        }
        v.iter().map(|x| (x - theta).max(0.0)).collect()
    }

    /// The χ² primal solved directly: `max ⟨ℓ, q⟩` over the simplex with
    /// `‖q − 1/n‖² ≤ 2ρ/n`. For a multiplier `λ`, the maximizer of `⟨ℓ, q⟩ − λ/2 ‖q − u‖²`
    /// is the projection of `u + ℓ/λ`; bisect `log λ` until the constraint is tight.
    fn chi2_by_primal_projection(losses: &[f64], radius: f64) -> f64 {
        let n = losses.len() as f64;
        let top = max(losses);
        let budget = 2.0 * radius / n;
        let q_at = |log_lambda: f64| {
            let lambda = log_lambda.exp();
            project_to_simplex(
                &losses
                    .iter()
                    .map(|l| (l - top) / lambda)
                    .collect::<Vec<_>>(),
            )
        };
        let deviation = |q: &[f64]| q.iter().map(|x| (x - 1.0 / n).powi(2)).sum::<f64>();

        let spread = max(losses) - min(losses) + 1.0;
        let (mut lo, mut hi) = ((1e-12 * spread).ln(), (1e12 * spread).ln());
        if deviation(&q_at(lo)) <= budget {
            return primal_value(&q_at(lo), losses);
        }
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if deviation(&q_at(mid)) <= budget {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        primal_value(&q_at(hi), losses)
    }

    // ---- cases ----

    fn random_losses(rng: &mut StdRng) -> Vec<f64> {
        let n = [1, 2, 3, 4, 5, 7, 16, 33, 64][rng.random_range(0..9)];
        let uniform = |rng: &mut StdRng, lo: f64, hi: f64| -> Vec<f64> {
            (0..n).map(|_| rng.random_range(lo..hi)).collect()
        };
        match rng.random_range(0..6) {
            0 => uniform(rng, 0.0, 5.0),
            1 => (0..n).map(|_| rng.random_range(0..4) as f64).collect(),
            2 => vec![rng.random_range(-2.0..2.0); n],
            3 => {
                let mut losses = uniform(rng, 0.99, 1.01);
                let at = rng.random_range(0..n);
                losses[at] = 1e6;
                losses
            }
            4 => uniform(rng, -3.0, 3.0),
            _ => {
                let mut losses = uniform(rng, 0.0, 1.0);
                let top = max(&losses);
                (0..n).step_by(3).for_each(|i| losses[i] = top);
                losses
            }
        }
    }

    /// Random losses and radii between 1e-4 and 10, plus each vector at the radii where the
    /// constraint stops binding.
    fn cases() -> Vec<Case> {
        let mut rng = StdRng::seed_from_u64(0x0D20_2EBE);
        let mut cases = Vec::new();
        for _ in 0..400 {
            let losses = random_losses(&mut rng);
            let radius = 10f64.powf(rng.random_range(-4.0..=1.0));
            cases.push(Case { losses, radius });
        }
        for _ in 0..40 {
            let losses = random_losses(&mut rng);
            let n = losses.len() as f64;
            cases.push(Case {
                radius: (n - 1.0) / 2.0,
                losses: losses.clone(),
            });
            cases.push(Case {
                radius: n.ln(),
                losses,
            });
        }
        cases
    }

    // ---- χ² ----

    #[test]
    fn chi2_matches_brute_force_dual_search() {
        for Case { losses, radius } in cases() {
            let solution = solve_chi2(&losses, radius).unwrap();
            let reference = chi2_by_dual_search(&losses, radius);
            assert_close(
                solution.value,
                reference,
                AGREE,
                &losses,
                "chi2 vs dual search",
            );
        }
    }

    #[test]
    fn chi2_matches_brute_force_primal_projection() {
        for Case { losses, radius } in cases() {
            let solution = solve_chi2(&losses, radius).unwrap();
            let reference = chi2_by_primal_projection(&losses, radius);
            assert_close(solution.value, reference, AGREE, &losses, "chi2 vs primal");
        }
    }

    #[test]
    fn chi2_weights_are_feasible_and_attain_the_dual_objective() {
        for Case { losses, radius } in cases() {
            let solution = solve_chi2(&losses, radius).unwrap();
            assert_distribution(&solution.weights, losses.len());

            let divergence = chi2_divergence(&solution.weights);
            assert!(
                divergence <= radius * (1.0 + 1e-9) + 1e-12,
                "{divergence} > {radius}"
            );

            let primal = primal_value(&solution.weights, &losses);
            assert_close(primal, solution.value, 1e-12, &losses, "reported value");
            let dual = chi2_dual_objective(&losses, radius, solution.dual);
            assert_close(primal, dual, EXACT, &losses, "chi2 strong duality");
        }
    }

    #[test]
    fn chi2_no_feasible_point_beats_the_solution() {
        let mut rng = StdRng::seed_from_u64(7);
        for Case { losses, radius } in cases().into_iter().take(150) {
            let value = solve_chi2(&losses, radius).unwrap().value;
            let n = losses.len() as f64;
            for _ in 0..50 {
                let raw: Vec<f64> = losses.iter().map(|_| rng.random_range(-1.0..1.0)).collect();
                let direction: Vec<f64> = raw.iter().map(|d| d - mean(&raw)).collect();
                let norm = direction.iter().map(|d| d * d).sum::<f64>().sqrt();
                let to_sphere = (2.0 * radius / n).sqrt() / norm;
                let to_faces = direction
                    .iter()
                    .filter(|d| **d < 0.0)
                    .map(|d| -1.0 / (n * d))
                    .fold(f64::INFINITY, f64::min);
                let step = if norm > 0.0 {
                    to_sphere.min(to_faces)
                } else {
                    0.0
                };
                let q: Vec<f64> = direction.iter().map(|d| 1.0 / n + step * d).collect();
                let candidate = primal_value(&q, &losses);
                assert!(
                    candidate <= value + 1e-9 * (1.0 + value.abs()),
                    "{candidate} > {value}"
                );
            }
        }
    }

    #[test]
    fn chi2_zero_radius_gives_the_mean_with_uniform_weights() {
        let losses = [1.0, 2.0, 3.0, 10.0];
        let solution = solve_chi2(&losses, 0.0).unwrap();
        assert_eq!(solution.value, 4.0);
        assert_eq!(solution.weights, vec![0.25; 4]);
        assert_eq!(solution.dual, f64::NEG_INFINITY);
    }

    /// When every loss stays active, the value is the variance expansion `μ + σ·sqrt(2ρ)`
    /// (closed form; here μ = 2.5, σ² = 1.25, c* = 2.5 − sqrt(1.25/0.02) ≈ −5.4 < min ℓ).
    #[test]
    fn chi2_small_radius_matches_the_variance_expansion() {
        let losses = [1.0, 2.0, 3.0, 4.0];
        let solution = solve_chi2(&losses, 0.01).unwrap();
        assert_close(
            solution.value,
            2.5 + (1.25f64 * 0.02).sqrt(),
            1e-14,
            &losses,
            "value",
        );
        assert_close(
            solution.dual,
            2.5 - (1.25f64 / 0.02).sqrt(),
            1e-14,
            &losses,
            "c*",
        );
    }

    #[test]
    fn chi2_puts_all_mass_on_the_max_once_the_constraint_stops_binding() {
        let losses = [0.3, 0.9, 0.1, 0.5, 0.2];
        for radius in [2.0, 2.5, 100.0] {
            let solution = solve_chi2(&losses, radius).unwrap();
            assert_eq!(solution.weights, vec![0.0, 1.0, 0.0, 0.0, 0.0]);
            assert_eq!((solution.value, solution.dual), (0.9, 0.9));
        }

        let binding = solve_chi2(&losses, 1.99).unwrap();
        assert!(binding.value < 0.9 && binding.weights[1] < 1.0);
        assert!(binding.weights[3] > 0.0);
    }

    #[test]
    fn chi2_tied_maxima_share_the_mass() {
        let losses = [1.0, 3.0, 3.0, 2.0];
        for radius in [0.5, 1.0, 7.0] {
            let solution = solve_chi2(&losses, radius).unwrap();
            assert_eq!(solution.weights, vec![0.0, 0.5, 0.5, 0.0]);
            assert_eq!(solution.value, 3.0);
        }
    }

    #[test]
    fn chi2_single_and_equal_losses_keep_uniform_weights() {
        for radius in [0.0, 1e-4, 1.0, 1e6] {
            let single = solve_chi2(&[0.7], radius).unwrap();
            assert_eq!((single.value, single.weights), (0.7, vec![1.0]));

            let equal = solve_chi2(&[2.5; 7], radius).unwrap();
            assert_eq!(equal.value, 2.5);
            assert_eq!(equal.weights, vec![1.0 / 7.0; 7]);
        }
    }

    #[test]
    fn chi2_handles_a_huge_outlier() {
        let losses = [1.0, 1.01, 0.99, 1e6, 1.02];
        for radius in [1e-4, 0.1, 1.0] {
            let solution = solve_chi2(&losses, radius).unwrap();
            let reference = chi2_by_primal_projection(&losses, radius);
            assert_close(solution.value, reference, AGREE, &losses, "outlier");
            assert!(solution.weights[3] > solution.weights[1]);
        }
    }

    // ---- KL ----

    #[test]
    fn kl_matches_brute_force_dual_search() {
        for Case { losses, radius } in cases() {
            let solution = solve_kl(&losses, radius).unwrap();
            let reference = kl_by_dual_search(&losses, radius);
            assert_close(
                solution.value,
                reference,
                AGREE,
                &losses,
                "kl vs dual search",
            );
        }
    }

    #[test]
    fn kl_weights_are_feasible_and_attain_the_dual_objective() {
        for Case { losses, radius } in cases() {
            let solution = solve_kl(&losses, radius).unwrap();
            assert_distribution(&solution.weights, losses.len());

            let divergence = kl_divergence(&solution.weights);
            assert!(
                divergence <= radius * (1.0 + 1e-9) + 1e-12,
                "{divergence} > {radius}"
            );

            let primal = primal_value(&solution.weights, &losses);
            assert_close(primal, solution.value, 1e-12, &losses, "reported value");
            if solution.dual > 0.0 {
                let dual = kl_dual_objective(&losses, radius, solution.dual);
                assert_close(primal, dual, EXACT, &losses, "kl strong duality");
            } else {
                assert_eq!(solution.value, max(&losses));
            }
        }
    }

    #[test]
    fn kl_no_feasible_point_beats_the_solution() {
        let mut rng = StdRng::seed_from_u64(11);
        for Case { losses, radius } in cases().into_iter().take(150) {
            let value = solve_kl(&losses, radius).unwrap().value;
            let n = losses.len() as f64;
            for _ in 0..50 {
                let raw: Vec<f64> = losses.iter().map(|_| rng.random::<f64>().powi(4)).collect();
                let total: f64 = raw.iter().sum();
                let mix = |a: f64| -> Vec<f64> {
                    raw.iter().map(|r| (1.0 - a) / n + a * r / total).collect()
                };

                // KL is convex along the segment from uniform, so bisect to its boundary.
                let (mut lo, mut hi) = (0.0, 1.0);
                for _ in 0..60 {
                    let mid = 0.5 * (lo + hi);
                    if kl_divergence(&mix(mid)) <= radius {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                let candidate = primal_value(&mix(lo), &losses);
                assert!(
                    candidate <= value + 1e-9 * (1.0 + value.abs()),
                    "{candidate} > {value}"
                );
            }
        }
    }

    #[test]
    fn kl_tends_to_uniform_as_the_radius_vanishes() {
        let losses = [0.1, 2.0, 0.7, 1.3];
        let exact = solve_kl(&losses, 0.0).unwrap();
        assert_eq!(exact.weights, vec![0.25; 4]);
        assert_eq!((exact.value, exact.dual), (mean(&losses), f64::INFINITY));

        let mut previous = f64::INFINITY;
        for radius in [1e-2, 1e-4, 1e-6, 1e-8, 1e-10] {
            let solution = solve_kl(&losses, radius).unwrap();
            let distance = solution
                .weights
                .iter()
                .map(|q| (q - 0.25).abs())
                .fold(0.0, f64::max);
            assert!(distance < previous, "{distance} at {radius}");
            previous = distance;
        }
        assert!(previous < 1e-4);
    }

    #[test]
    fn kl_concentrates_on_the_argmax_as_the_radius_grows() {
        let losses = [0.1, 2.0, 0.7, 1.3];
        for radius in [4f64.ln(), 2.0, 50.0] {
            let solution = solve_kl(&losses, radius).unwrap();
            assert_eq!(solution.weights, vec![0.0, 1.0, 0.0, 0.0]);
            assert_eq!((solution.value, solution.dual), (2.0, 0.0));
        }

        let nearly = solve_kl(&losses, 4f64.ln() - 1e-6).unwrap();
        assert!(nearly.weights[1] > 0.99 && nearly.weights[1] < 1.0);
        assert!(nearly.dual > 0.0 && nearly.dual < 0.2);
    }

    #[test]
    fn kl_tied_maxima_share_the_mass() {
        let losses = [1.0, 3.0, 3.0, 2.0];
        let solution = solve_kl(&losses, 2f64.ln()).unwrap();
        assert_eq!(solution.weights, vec![0.0, 0.5, 0.5, 0.0]);
    }

    #[test]
    fn kl_equal_losses_keep_uniform_weights() {
        for radius in [0.0, 1e-4, 1.0, 1e6] {
            let solution = solve_kl(&[2.5; 7], radius).unwrap();
            assert_eq!(solution.value, 2.5);
            assert_eq!(solution.weights, vec![1.0 / 7.0; 7]);
        }
    }

    #[test]
    fn kl_handles_a_huge_outlier_without_overflow() {
        let losses = [1.0, 1.01, 0.99, 1e6, 1.02];
        for radius in [1e-4, 0.1, 1.0] {
            let solution = solve_kl(&losses, radius).unwrap();
            let reference = kl_by_dual_search(&losses, radius);
            assert_close(solution.value, reference, AGREE, &losses, "outlier");
            assert_distribution(&solution.weights, losses.len());
        }
    }

    #[test]
    fn value_grows_with_the_radius() {
        let losses = [0.4, 3.0, 1.1, 0.0, 2.2, 2.2];
        let (mut chi2, mut kl) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
        for step in 0..60 {
            let radius = 10f64.powf(-6.0 + step as f64 / 8.0);
            let next_chi2 = solve_chi2(&losses, radius).unwrap().value;
            let next_kl = solve_kl(&losses, radius).unwrap().value;
            assert!(
                next_chi2 >= chi2 - 1e-12 && next_kl >= kl - 1e-12,
                "at {radius}"
            );
            (chi2, kl) = (next_chi2, next_kl);
        }
        assert_eq!((chi2, kl), (3.0, 3.0));
    }

    #[test]
    fn solutions_follow_affine_maps_of_the_losses() {
        for Case { losses, radius } in cases().into_iter().take(100) {
            let mapped: Vec<f64> = losses.iter().map(|l| 0.375 * l - 2.0).collect();
            for solver in [solve_chi2, solve_kl] {
                let base = solver(&losses, radius).unwrap();
                let moved = solver(&mapped, radius).unwrap();
                let expected = 0.375 * base.value - 2.0;
                assert_close(moved.value, expected, 1e-9, &mapped, "affine value");
                for (a, b) in base.weights.iter().zip(&moved.weights) {
                    assert!((a - b).abs() <= 1e-7, "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn extreme_magnitudes_stay_finite() {
        let huge = [1e308, -1e308, 0.0, 5e307];
        let tiny = [1e-310, 2e-310, 3e-310, 0.0];
        for losses in [&huge[..], &tiny[..]] {
            for radius in [1e-3, 0.5, 10.0] {
                for solution in [solve_chi2(losses, radius), solve_kl(losses, radius)] {
                    let solution = solution.unwrap();
                    assert_distribution(&solution.weights, losses.len());
                    assert!(solution.value >= mean(losses) * (1.0 - 1e-12) - 1e-300);
                    assert!(solution.value <= max(losses));
                }
            }
        }
    }

    // ---- fixed temperature ----

    #[test]
    fn fixed_temperature_is_a_softmax() {
        let losses = [1.0, 2.0, 3.0];
        let solution = kl_fixed_temperature(&losses, 0.5).unwrap();
        let total = 1.0 + 2f64.exp() + 4f64.exp();
        let expected = [1.0 / total, 2f64.exp() / total, 4f64.exp() / total];
        for (q, e) in solution.weights.iter().zip(expected) {
            assert!((q - e).abs() <= 1e-15, "{q} vs {e}");
        }
        assert_close(
            solution.value,
            primal_value(&expected, &losses),
            1e-15,
            &losses,
            "value",
        );
        assert_eq!(solution.dual, 0.5);
    }

    #[test]
    fn fixed_temperature_limits_are_argmax_and_mean() {
        let losses = [1e6, 1.0, 2.0];
        let cold = kl_fixed_temperature(&losses, 1e-300).unwrap();
        assert_eq!((cold.value, cold.weights), (1e6, vec![1.0, 0.0, 0.0]));

        let hot = kl_fixed_temperature(&losses, 1e300).unwrap();
        assert_eq!(hot.weights, vec![1.0 / 3.0; 3]);
    }

    #[test]
    fn fixed_temperature_is_the_kl_worst_case_for_its_implied_radius() {
        let losses = [0.3, 1.7, 0.2, 2.9, 1.1];
        for temperature in [0.1, 0.5, 2.0, 30.0] {
            let tilted = kl_fixed_temperature(&losses, temperature).unwrap();
            let radius = kl_divergence_from_uniform(&tilted.weights);
            let solved = solve_kl(&losses, radius).unwrap();
            assert_close(solved.value, tilted.value, 1e-9, &losses, "value");
            assert!(
                (solved.dual / temperature - 1.0).abs() <= 1e-6,
                "{}",
                solved.dual
            );
        }
    }

    // ---- statistics and divergences ----

    #[test]
    fn weight_stats_of_known_vectors() {
        let uniform = weight_stats(&[0.25; 4]);
        assert_eq!(
            uniform,
            WeightStats {
                effective_sample_fraction: 1.0,
                max_weight: 0.25,
                zero_weight_share: 0.0
            }
        );

        let point = weight_stats(&[0.0, 1.0, 0.0, 0.0]);
        assert_eq!(
            point,
            WeightStats {
                effective_sample_fraction: 0.25,
                max_weight: 1.0,
                zero_weight_share: 0.75
            }
        );

        // (0.5 + 0.5)² / (0.25 + 0.25) / 4 = 0.5.
        let half = weight_stats(&[0.5, 0.0, 0.5, 0.0]);
        assert_eq!(half.effective_sample_fraction, 0.5);
        assert_eq!(weight_stats(&[]), WeightStats::default());
        assert_eq!(weight_stats(&[0.0, 0.0]), WeightStats::default());
    }

    #[test]
    fn solution_stats_match_weight_stats() {
        let solution = solve_chi2(&[0.3, 0.9, 0.1], 0.2).unwrap();
        assert_eq!(solution.stats(), weight_stats(&solution.weights));
    }

    #[test]
    fn divergences_from_uniform_match_closed_forms() {
        // Point mass on one of four atoms: χ² = (n − 1)/2, KL = log n.
        let point = [0.0, 1.0, 0.0, 0.0];
        assert_eq!(chi2_divergence_from_uniform(&point), 1.5);
        assert!((kl_divergence_from_uniform(&point) - 4f64.ln()).abs() <= 1e-15);
        assert_eq!(chi2_divergence_from_uniform(&[0.25; 4]), 0.0);
        assert_eq!(kl_divergence_from_uniform(&[0.25; 4]), 0.0);
        assert_eq!(chi2_divergence_from_uniform(&[]), 0.0);
    }

    #[test]
    fn solve_dispatches_on_the_ambiguity_set() {
        let losses = [0.3, 0.9, 0.1];
        let chi2 = solve(&losses, Ambiguity::Chi2 { radius: 0.2 });
        let kl = solve(&losses, Ambiguity::Kl { radius: 0.2 });
        let fixed = solve(&losses, Ambiguity::KlTemperature { temperature: 0.2 });
        assert_eq!(chi2, solve_chi2(&losses, 0.2));
        assert_eq!(kl, solve_kl(&losses, 0.2));
        assert_eq!(fixed, kl_fixed_temperature(&losses, 0.2));
    }

    // ---- errors ----

    fn all_solvers(losses: &[f64], parameter: f64) -> [Result<RobustSolution, RobustError>; 3] {
        [
            solve_chi2(losses, parameter),
            solve_kl(losses, parameter),
            kl_fixed_temperature(losses, parameter),
        ]
    }

    #[test]
    fn empty_batch_is_an_error() {
        for result in all_solvers(&[], 0.5) {
            assert_eq!(result, Err(RobustError::Empty));
        }
    }

    #[test]
    fn non_finite_loss_is_an_error_naming_its_position() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for result in all_solvers(&[0.1, 0.2, bad, f64::NAN], 0.5) {
                let error = result.unwrap_err();
                assert!(matches!(error, RobustError::NonFiniteLoss { index: 2, .. }));
                assert!(error.to_string().starts_with("loss 2 is "), "{error}");
            }
        }
    }

    #[test]
    fn bad_radius_is_an_error_naming_the_value() {
        for bad in [-1.0, -1e-300, f64::NAN, f64::INFINITY] {
            for result in [solve_chi2(&[1.0, 2.0], bad), solve_kl(&[1.0, 2.0], bad)] {
                let error = result.unwrap_err();
                assert!(matches!(error, RobustError::InvalidRadius { .. }));
                assert!(error.to_string().contains(&bad.to_string()), "{error}");
            }
        }
    }

    #[test]
    fn bad_temperature_is_an_error_naming_the_value() {
        for bad in [0.0, -2.0, f64::NAN, f64::INFINITY] {
            let error = kl_fixed_temperature(&[1.0, 2.0], bad).unwrap_err();
            assert!(matches!(error, RobustError::InvalidTemperature { .. }));
            assert!(error.to_string().contains(&bad.to_string()), "{error}");
        }
    }
}
