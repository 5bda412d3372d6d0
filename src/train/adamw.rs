//! AdamW with its state in plain tensors, so that it can be saved, restored and rolled back.
//!
//! libtorch's own optimizer keeps its moments where `tch` cannot read or write them; this one
//! keeps, per trainable variable, the first and second moment (`exp_avg`, `exp_avg_sq`) and
//! one step count for all of them. An update follows PyTorch's single-tensor `AdamW`:
//!
//! ```text
//! t ← t + 1
//! θ ← θ·(1 − lr·λ)
//! m ← m + (1 − β₁)(g − m)
//! v ← β₂·v + (1 − β₂)·g²
//! θ ← θ − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)
//! ```
//!
//! A variable whose gradient is undefined at a step keeps its value and moments (PyTorch
//! skips it too, but also keeps a step count per variable; here one count serves all, so such
//! a variable's next bias correction uses the shared count).

use tch::nn::VarStore;
use tch::{TchError, Tensor};

use super::snapshot::deep_copy;

/// Name prefix of the first-moment tensors in [`AdamWState::moments`].
pub const EXP_AVG: &str = "exp_avg.";
/// Name prefix of the second-moment tensors in [`AdamWState::moments`].
pub const EXP_AVG_SQ: &str = "exp_avg_sq.";

/// Why a saved state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum AdamWError {
    /// The state has no moment for one of the variables.
    #[error("the optimizer state has no tensor {0:?}")]
    Missing(String),
    /// A moment's shape differs from its variable's.
    #[error("the optimizer state's {name:?} has shape {found:?}, the variable {expected:?}")]
    Shape {
        /// The moment's name.
        name: String,
        /// Its shape in the state.
        found: Vec<i64>,
        /// The variable's shape.
        expected: Vec<i64>,
    },
    /// The state names a tensor that no variable has.
    #[error("the optimizer state has {0:?}, which matches no trainable variable")]
    Unexpected(String),
    /// libtorch failed.
    #[error("libtorch failed in the optimizer")]
    Torch(#[from] TchError),
}

/// The hyper-parameters other than the learning rate, which each step passes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β₁, the first moment's decay.
    pub beta1: f64,
    /// β₂, the second moment's decay.
    pub beta2: f64,
    /// ε, added to the bias-corrected root of the second moment.
    pub eps: f64,
    /// λ, the decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults, without weight decay.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// A copy of the optimizer's state: deep copies, unaffected by later steps.
#[derive(Debug)]
pub struct AdamWState {
    /// Updates taken.
    pub step: u64,
    /// `exp_avg.<variable>` and `exp_avg_sq.<variable>` for every trainable variable, in
    /// variable-name order, named after the [`VarStore`] variables.
    pub moments: Vec<(String, Tensor)>,
}

struct Slot {
    name: String,
    var: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over the trainable variables of one [`VarStore`].
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("config", &self.config)
            .field("variables", &self.slots.len())
            .field("step", &self.step)
            .finish()
    }
}

impl AdamW {
    /// An optimizer of `vs`'s trainable variables with zero moments.
    pub fn new(vs: &VarStore, config: AdamWConfig) -> Result<Self, TchError> {
        let slots = trainable(vs)
            .into_iter()
            .map(|(name, var)| {
                let zeros = tch::no_grad(|| var.f_zeros_like())?;
                Ok(Slot {
                    name,
                    exp_avg: deep_copy(&zeros)?,
                    exp_avg_sq: zeros,
                    var,
                })
            })
            .collect::<Result<_, TchError>>()?;
        Ok(Self {
            config,
            slots,
            step: 0,
        })
    }

    /// Updates taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Applies one update at learning rate `lr` from the variables' gradients.
    pub fn step(&mut self, lr: f64) -> Result<(), TchError> {
        self.step += 1;
        let t = self.step as f64;
        let c = self.config;
        let step_size = lr / (1.0 - c.beta1.powf(t));
        let root_correction = (1.0 - c.beta2.powf(t)).sqrt();
        tch::no_grad(|| {
            for slot in &mut self.slots {
                let grad = slot.var.grad();
                if !grad.defined() {
                    continue;
                }
                let _ = slot.var.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                let _ = slot.exp_avg.f_lerp_(&grad, 1.0 - c.beta1)?;
                let _ = slot.exp_avg_sq.f_mul_scalar_(c.beta2)?;
                let _ = slot
                    .exp_avg_sq
                    .f_add_(&grad.f_mul(&grad)?.f_mul_scalar(1.0 - c.beta2)?)?;
                let denom = slot
                    .exp_avg_sq
                    .f_sqrt()?
                    .f_div_scalar(root_correction)?
                    .f_add_scalar(c.eps)?;
                let update = slot.exp_avg.f_div(&denom)?.f_mul_scalar(step_size)?;
                let _ = slot.var.f_sub_(&update)?;
            }
            Ok(())
        })
    }

    /// Zeroes every defined gradient.
    pub fn zero_grad(&mut self) -> Result<(), TchError> {
        for slot in &self.slots {
            let mut grad = slot.var.grad();
            if grad.defined() {
                let _ = grad.f_detach_()?;
                let _ = grad.f_zero_()?;
            }
        }
        Ok(())
    }

    /// A deep copy of the step count and moments.
    pub fn state(&self) -> Result<AdamWState, TchError> {
        let mut moments = Vec::with_capacity(2 * self.slots.len());
        for slot in &self.slots {
            moments.push((format!("{EXP_AVG}{}", slot.name), deep_copy(&slot.exp_avg)?));
        }
        for slot in &self.slots {
            let name = format!("{EXP_AVG_SQ}{}", slot.name);
            moments.push((name, deep_copy(&slot.exp_avg_sq)?));
        }
        Ok(AdamWState {
            step: self.step,
            moments,
        })
    }

    /// Overwrites `moments`, taken earlier by [`AdamW::state`], with the current moments in
    /// place.
    pub fn copy_moments_into(&self, moments: &mut [(String, Tensor)]) -> Result<(), TchError> {
        let (first, second) = moments.split_at_mut(self.slots.len().min(moments.len()));
        tch::no_grad(|| {
            for (slot, ((_, m), (_, v))) in self.slots.iter().zip(first.iter_mut().zip(second)) {
                m.f_copy_(&slot.exp_avg)?;
                v.f_copy_(&slot.exp_avg_sq)?;
            }
            Ok(())
        })
    }

    /// Puts back the step count and moments of a state taken by [`AdamW::state`] (or read
    /// from disk): every moment must be
    /// there with its variable's shape, and nothing else. Values are copied in, converted to
    /// each variable's dtype and device; on an error nothing has changed.
    pub fn restore(&mut self, step: u64, moments: &[(String, Tensor)]) -> Result<(), AdamWError> {
        let find = |name: &str| {
            moments
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| AdamWError::Missing(name.to_owned()))
        };
        let mut pairs = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let m = find(&format!("{EXP_AVG}{}", slot.name))?;
            let v = find(&format!("{EXP_AVG_SQ}{}", slot.name))?;
            for (prefix, t) in [(EXP_AVG, m), (EXP_AVG_SQ, v)] {
                if t.size() != slot.var.size() {
                    return Err(AdamWError::Shape {
                        name: format!("{prefix}{}", slot.name),
                        found: t.size(),
                        expected: slot.var.size(),
                    });
                }
            }
            pairs.push((m, v));
        }
        if let Some((name, _)) = moments.get(2 * self.slots.len()) {
            return Err(AdamWError::Unexpected(name.clone()));
        }
        tch::no_grad(|| {
            for (slot, (m, v)) in self.slots.iter_mut().zip(pairs) {
                slot.exp_avg.f_copy_(m)?;
                slot.exp_avg_sq.f_copy_(v)?;
            }
            Ok::<_, TchError>(())
        })?;
        self.step = step;
        Ok(())
    }
}

/// `vs`'s trainable variables, sorted by name.
pub fn trainable(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use serde::Deserialize;
    use tch::{Device, Kind};

    use super::*;

    #[derive(Deserialize)]
    struct Reference {
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
        shapes: BTreeMap<String, Vec<i64>>,
        initial: BTreeMap<String, Vec<f32>>,
        steps: Vec<RefStep>,
    }

    #[derive(Deserialize)]
    struct RefStep {
        lr: f64,
        grads: BTreeMap<String, Vec<f32>>,
        after: BTreeMap<String, RefState>,
    }

    #[derive(Deserialize)]
    struct RefState {
        param: Vec<f32>,
        exp_avg: Vec<f32>,
        exp_avg_sq: Vec<f32>,
    }

    fn reference() -> Reference {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adamw_reference.json");
        let text = std::fs::read_to_string(path).expect("run make_adamw_reference.py");
        serde_json::from_str(&text).expect("reference")
    }

    fn store(reference: &Reference) -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        for (name, shape) in &reference.shapes {
            let init = Tensor::from_slice(&reference.initial[name]).reshape(shape.as_slice());
            let (parent, leaf) = name.split_once('.').expect("two parts");
            let _ = vs.root().sub(parent).var_copy(leaf, &init);
        }
        vs
    }

    fn config(reference: &Reference) -> AdamWConfig {
        AdamWConfig {
            beta1: reference.betas[0],
            beta2: reference.betas[1],
            eps: reference.eps,
            weight_decay: reference.weight_decay,
        }
    }

    /// Leaves `grads` in the variables' gradients through a backward of `Σ θ·g`.
    fn set_grads(vs: &VarStore, grads: &BTreeMap<String, Vec<f32>>) {
        let loss = trainable(vs)
            .into_iter()
            .map(|(name, var)| {
                let g = Tensor::from_slice(&grads[&name]).reshape(var.size());
                (var * g).sum(Kind::Float)
            })
            .fold(Tensor::from(0f32), |a, b| a + b);
        loss.backward();
    }

    fn max_diff(t: &Tensor, expected: &[f32]) -> f64 {
        let e = Tensor::from_slice(expected).reshape(t.size());
        (t - e).abs().max().double_value(&[])
    }

    fn moment<'a>(state: &'a AdamWState, name: &str) -> &'a Tensor {
        &state.moments.iter().find(|(n, _)| n == name).expect(name).1
    }

    #[test]
    fn steps_match_torch_adamw() {
        let reference = reference();
        let vs = store(&reference);
        let mut adamw = AdamW::new(&vs, config(&reference)).expect("adamw");
        for (i, step) in reference.steps.iter().enumerate() {
            adamw.zero_grad().expect("zero");
            set_grads(&vs, &step.grads);
            adamw.step(step.lr).expect("step");
            let state = adamw.state().expect("state");
            for (name, var) in trainable(&vs) {
                let want = &step.after[&name];
                let d_param = max_diff(&var, &want.param);
                let d_m = max_diff(moment(&state, &format!("{EXP_AVG}{name}")), &want.exp_avg);
                let d_v = max_diff(
                    moment(&state, &format!("{EXP_AVG_SQ}{name}")),
                    &want.exp_avg_sq,
                );
                assert!(d_param <= 1e-6, "step {i} {name}: param off by {d_param}");
                assert!(d_m <= 1e-6 && d_v <= 1e-6, "step {i} {name}: {d_m} {d_v}");
            }
        }
        assert_eq!(adamw.steps(), reference.steps.len() as u64);
        // The weights moved, so the comparison could fail.
        let first = &reference.initial["block.weight"];
        let (_, var) = &trainable(&vs)[0];
        assert!(max_diff(var, first) > 1e-3);
    }

    #[test]
    fn a_restored_state_continues_like_the_original() {
        let reference = reference();
        let (half, rest) = reference.steps.split_at(2);
        let vs = store(&reference);
        let mut adamw = AdamW::new(&vs, config(&reference)).expect("adamw");
        for step in half {
            adamw.zero_grad().expect("zero");
            set_grads(&vs, &step.grads);
            adamw.step(step.lr).expect("step");
        }
        let saved = adamw.state().expect("state");
        let weights: Vec<Tensor> = trainable(&vs).iter().map(|(_, v)| v.copy()).collect();

        // A fresh optimizer over a fresh store with the saved weights and state.
        let vs2 = store(&reference);
        tch::no_grad(|| {
            for ((_, mut v), w) in trainable(&vs2).into_iter().zip(&weights) {
                v.copy_(w);
            }
        });
        let mut resumed = AdamW::new(&vs2, config(&reference)).expect("adamw");
        resumed
            .restore(saved.step, &saved.moments)
            .expect("restore");
        assert_eq!(resumed.steps(), 2);
        for step in rest {
            resumed.zero_grad().expect("zero");
            set_grads(&vs2, &step.grads);
            resumed.step(step.lr).expect("step");
        }
        let last = &reference.steps[reference.steps.len() - 1].after;
        for (name, var) in trainable(&vs2) {
            assert!(max_diff(&var, &last[&name].param) <= 1e-6, "{name}");
        }
    }

    #[test]
    fn a_mismatched_state_is_refused_unchanged() {
        let reference = reference();
        let vs = store(&reference);
        let mut adamw = AdamW::new(&vs, config(&reference)).expect("adamw");
        let mut state = adamw.state().expect("state");
        state.step = 7;
        state.moments[0].1 = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        assert!(matches!(
            adamw.restore(state.step, &state.moments),
            Err(AdamWError::Shape { .. })
        ));
        let _ = state.moments.remove(0);
        assert!(matches!(
            adamw.restore(state.step, &state.moments),
            Err(AdamWError::Missing(_))
        ));
        let mut state = adamw.state().expect("state");
        state
            .moments
            .push(("exp_avg.extra".into(), Tensor::from(1f32)));
        assert!(matches!(
            adamw.restore(state.step, &state.moments),
            Err(AdamWError::Unexpected(_))
        ));
        assert_eq!(adamw.steps(), 0);
    }
}
