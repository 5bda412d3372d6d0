//! The first-order dual of the Wasserstein DRO objective: a gradient penalty on the input
//! embeddings.
//!
//! For a transport cost of order `p ≥ 1` on the embeddings and radius `ρ`, the worst-case loss
//! is, to first order in `ρ`,
//!
//! ```text
//! mean_i ℓ_i + ρ·(mean_i ‖∇_{E_i} ℓ_i‖^{p*})^{1/p*},   p* = p/(p − 1)
//! ```
//!
//! with `E_i` the input embeddings of pair `i`'s two sequences (the norm is the Euclidean
//! norm of both sequences' embedding gradients together; padding gets none) and, for `p = 1`,
//! the largest `‖∇_{E_i} ℓ_i‖` instead of the mean.
//!
//! The penalty couples the pairs, so a step accumulated over micro-batches needs the norms of
//! every pair before any gradient: a first pass computes `n_i = ‖∇_{E_i} ℓ_i‖`, [`plan`] turns
//! them into the penalty and coefficients `a_i` with `∇_θ penalty = Σ_i a_i ∇_θ n_i²`, and a
//! second pass back-propagates `Σ_i (ℓ_i/n + a_i n_i²)` through `n_i²` itself (double
//! backprop). The accumulated gradient is the one-batch gradient.

use tch::{Kind, TchError, Tensor};

/// The penalty of a step and what the second pass needs.
#[derive(Debug, Clone, PartialEq)]
pub struct PenaltyPlan {
    /// `ρ·(mean_i n_i^{p*})^{1/p*}` (`ρ·max_i n_i` for `p = 1`).
    pub value: f64,
    /// `a_i` per pair: the penalty's derivative in `n_i`, over `2 n_i` (0 when `n_i = 0`).
    pub coefficients: Vec<f64>,
}

/// The penalty and coefficients for per-pair gradient norms `norms` (all finite, ≥ 0).
pub fn plan(norms: &[f64], radius: f64, order: f64) -> PenaltyPlan {
    let n = norms.len() as f64;
    let largest = norms.iter().copied().fold(0.0, f64::max);
    let mut derivative = vec![0.0; norms.len()];
    let value = if largest == 0.0 {
        0.0
    } else if order <= 1.0 {
        if let Some(first) = norms.iter().position(|&x| x == largest) {
            derivative[first] = radius;
        }
        radius * largest
    } else {
        // Scaled by the largest norm, so large dual exponents cannot overflow.
        let q = order / (order - 1.0);
        let mean = norms.iter().map(|x| (x / largest).powf(q)).sum::<f64>() / n;
        for (d, x) in derivative.iter_mut().zip(norms) {
            *d = radius * (x / largest).powf(q - 1.0) * mean.powf(1.0 / q - 1.0) / n;
        }
        radius * largest * mean.powf(1.0 / q)
    };
    let coefficients = derivative
        .iter()
        .zip(norms)
        .map(|(d, &x)| match x > 0.0 {
            true => d / (2.0 * x),
            false => 0.0,
        })
        .collect();
    PenaltyPlan {
        value,
        coefficients,
    }
}

/// `n_i²` per pair as a `[m]` f64 tensor: the squared norm of the gradient of `Σ losses` with
/// respect to `embeds` (`[2m, t, hidden]`, pair `i`'s sequences in rows `i` and `m + i`).
/// With `create_graph` the result can itself be differentiated, and the graph of `losses` is
/// kept for a later backward.
pub fn squared_embedding_gradients(
    losses: &Tensor,
    embeds: &Tensor,
    create_graph: bool,
) -> Result<Tensor, TchError> {
    let m = losses.size1()?;
    let total = losses.f_sum(Kind::Double)?;
    let grads = Tensor::f_run_backward(&[total], &[embeds], create_graph, create_graph)?;
    let grad = grads.into_iter().next().ok_or_else(|| {
        TchError::Torch("autograd returned no gradient for the embeddings".into())
    })?;
    let rows = grad
        .f_to_kind(Kind::Double)?
        .f_square()?
        .f_sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Double)?;
    rows.f_narrow(0, 0, m)?.f_add(&rows.f_narrow(0, m, m)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The penalty by brute force, for derivatives by finite differences.
    fn penalty(norms: &[f64], radius: f64, order: f64) -> f64 {
        let n = norms.len() as f64;
        match order {
            1.0 => radius * norms.iter().copied().fold(0.0, f64::max),
            p => {
                let q = p / (p - 1.0);
                radius * (norms.iter().map(|x| x.powf(q)).sum::<f64>() / n).powf(1.0 / q)
            }
        }
    }

    #[test]
    fn value_and_coefficients_match_the_definition() {
        let norms = [0.3, 1.7, 0.0, 2.2, 0.9];
        for order in [1.0, 1.5, 2.0, 3.0, 50.0] {
            let found = plan(&norms, 0.7, order);
            let want = penalty(&norms, 0.7, order);
            assert!((found.value - want).abs() < 1e-12, "p = {order}");
            for i in [0, 1, 3, 4] {
                let h = 1e-6;
                let mut up = norms;
                up[i] += h;
                let mut down = norms;
                down[i] -= h;
                let derivative =
                    (penalty(&up, 0.7, order) - penalty(&down, 0.7, order)) / (2.0 * h);
                let from_plan = found.coefficients[i] * 2.0 * norms[i];
                assert!(
                    (from_plan - derivative).abs() < 1e-6,
                    "p = {order}, i = {i}"
                );
            }
            assert_eq!(found.coefficients[2], 0.0);
        }
        // p = 2 is the root mean square.
        let rms = (norms.iter().map(|x| x * x).sum::<f64>() / 5.0).sqrt();
        assert!((plan(&norms, 1.0, 2.0).value - rms).abs() < 1e-12);
    }

    #[test]
    fn large_norms_and_dual_exponents_stay_finite() {
        let found = plan(&[1e200, 3e199], 1.0, 1.001);
        assert!(found.value.is_finite() && found.value > 5e199);
        assert!(found.coefficients.iter().all(|c| c.is_finite()));
        assert_eq!(plan(&[0.0, 0.0], 1.0, 2.0).value, 0.0);
    }
}
