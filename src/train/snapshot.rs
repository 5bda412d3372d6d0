//! Deep copies of a policy's weights and of the whole trainer state, for rolling back after
//! repeated non-finite steps and (later) for saving to disk.

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{TchError, Tensor};

/// Why a snapshot cannot be put back.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot lacks a variable of the store, or has one the store lacks.
    #[error("the weight snapshot does not match the model: {0:?}")]
    Mismatch(String),
    /// libtorch failed.
    #[error("libtorch failed while copying weights")]
    Torch(#[from] TchError),
}

/// A deep copy of every variable of a [`VarStore`], by name, in name order.
#[derive(Debug)]
pub struct WeightSnapshot {
    /// `(variable name, copy)`.
    pub tensors: Vec<(String, Tensor)>,
}

impl WeightSnapshot {
    /// Copies every variable of `vs`.
    pub fn take(vs: &VarStore) -> Result<Self, TchError> {
        Self::of(&sorted(vs))
    }

    /// Copies `variables`.
    pub fn of(variables: &[(String, Tensor)]) -> Result<Self, TchError> {
        let tensors = variables
            .iter()
            .map(|(name, var)| Ok((name.clone(), deep_copy(var)?)))
            .collect::<Result<Vec<_>, TchError>>()?;
        Ok(Self { tensors })
    }

    /// Writes the copies back into `vs`'s variables in place (so a model holding them sees
    /// the change), converting dtype and device. Checked first: on an error nothing changed.
    pub fn restore(&self, vs: &VarStore) -> Result<(), SnapshotError> {
        self.restore_into(&sorted(vs))
    }

    /// [`WeightSnapshot::restore`] into `variables`, which must be the snapshot's names in
    /// the same order, with the same shapes.
    pub fn restore_into(&self, variables: &[(String, Tensor)]) -> Result<(), SnapshotError> {
        if variables.len() != self.tensors.len() {
            return Err(SnapshotError::Mismatch(format!(
                "{} variables, {} in the snapshot",
                variables.len(),
                self.tensors.len()
            )));
        }
        for ((name, var), (saved, copy)) in variables.iter().zip(&self.tensors) {
            if name != saved || var.size() != copy.size() {
                return Err(SnapshotError::Mismatch(saved.clone()));
            }
        }
        tch::no_grad(|| {
            for ((_, var), (_, copy)) in variables.iter().zip(&self.tensors) {
                var.shallow_clone().f_copy_(copy)?;
            }
            Ok::<_, TchError>(())
        })?;
        Ok(())
    }
}

/// A copy of `t` with its own storage, outside any autograd graph.
pub(crate) fn deep_copy(t: &Tensor) -> Result<Tensor, TchError> {
    tch::no_grad(|| {
        let mut copy = t.f_empty_like()?;
        copy.f_copy_(t)?;
        Ok(copy)
    })
}

fn sorted(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    variables
}

/// The trainer's scalars, saved beside its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainerCounters {
    /// Updates applied (the schedule's position and AdamW's step count).
    pub applied_steps: u64,
    /// The multiplier on the schedule's learning rate: halved at each rollback.
    pub lr_scale: f64,
    /// Non-finite steps in a row since the last applied one.
    pub consecutive_skips: u32,
    /// Rollbacks so far.
    pub rollbacks: u64,
}

/// Everything the trainer needs to continue exactly: its counters and AdamW's moments
/// (`exp_avg.<variable>`, `exp_avg_sq.<variable>`). The policy's weights are saved apart
/// (as a checkpoint, or a [`WeightSnapshot`]).
#[derive(Debug)]
pub struct TrainerState {
    /// The scalars.
    pub counters: TrainerCounters,
    /// The moment tensors, named after the variables.
    pub tensors: Vec<(String, Tensor)>,
}
