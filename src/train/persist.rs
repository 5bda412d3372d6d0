//! The trainer's side of the resume state: what it writes between steps and restores at
//! start (see [`crate::resume`] for the layout and the commit rules).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use tch::nn::VarStore;
use tch::Tensor;
use tracing::info;

use super::anchor::FrozenModel;
use super::snapshot::TrainerState;
use super::step::{StepError, Trainer};
use crate::ingest::store::SharedBuffer;
use crate::metrics::Metrics;
use crate::model::weights::{self, WeightsError};
use crate::resume::{
    Generation, ResumeError, ResumeStore, TensorFile, TensorSource, TrainerProgress,
};

/// The policy's weights inside a generation, fp32.
pub const POLICY_FILE: &str = "policy.safetensors";
/// The anchor's weights inside a generation, fp32.
pub const ANCHOR_FILE: &str = "anchor.safetensors";
/// AdamW's moments inside a generation.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Writes resume generations on a cadence, skipping weights that did not change.
pub struct ResumeWriter {
    store: Arc<ResumeStore>,
    every: Duration,
    last: Instant,
    policy_written_at: Option<u64>,
    anchor_written_at: Option<u64>,
    metrics: Arc<Metrics>,
}

impl ResumeWriter {
    /// A writer into `store` every `every`; `restored` is the state the trainer resumed
    /// from, whose weights count as written.
    pub fn new(
        store: Arc<ResumeStore>,
        every: Duration,
        restored: Option<&TrainerProgress>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            every,
            last: Instant::now(),
            policy_written_at: restored.map(|p| p.applied_steps),
            anchor_written_at: restored.map(|p| p.anchor_version),
            metrics,
        }
    }

    /// Whether the cadence calls for a generation now.
    pub fn due(&self) -> bool {
        self.last.elapsed() >= self.every
    }

    /// Writes a generation: the buffer as it is now (call between steps, so its training
    /// counts match the weights), the policy, the anchor, the optimizer and `progress`.
    pub fn write(
        &mut self,
        shared: &SharedBuffer,
        policy: &VarStore,
        anchor: Option<&FrozenModel>,
        trainer: &Trainer,
        progress: &TrainerProgress,
    ) -> Result<u64, ResumeError> {
        let capture = shared.capture();
        let policy_changed = self.policy_written_at != Some(progress.applied_steps);
        let linkable = self
            .store
            .latest()
            .is_some_and(|g| g.file(OPTIMIZER_FILE).is_file());
        let moments = match policy_changed || !linkable {
            true => trainer.state().map_err(step_error)?.tensors,
            false => Vec::new(),
        };
        let mut files = vec![
            TensorFile {
                name: POLICY_FILE,
                source: TensorSource::Store(policy),
                changed: policy_changed,
            },
            TensorFile {
                name: OPTIMIZER_FILE,
                source: TensorSource::Named(&moments),
                changed: policy_changed,
            },
        ];
        if let Some(anchor) = anchor {
            files.push(TensorFile {
                name: ANCHOR_FILE,
                source: TensorSource::Store(anchor.vs()),
                changed: self.anchor_written_at != Some(anchor.version()),
            });
        }
        let written = self.store.write(&capture, &files, progress)?;

        self.last = Instant::now();
        self.policy_written_at = Some(progress.applied_steps);
        self.anchor_written_at = anchor.map(FrozenModel::version);
        self.metrics
            .ingest
            .snapshot_seconds
            .observe(written.seconds);
        self.metrics
            .ingest
            .snapshot_bytes
            .set(i64::try_from(written.buffer_bytes).unwrap_or(i64::MAX));
        info!(
            generation = written.number,
            step = progress.applied_steps,
            seconds = written.seconds,
            "resume state written"
        );
        Ok(written.number)
    }
}

fn step_error(error: StepError) -> ResumeError {
    ResumeError::State(error.to_string())
}

/// Why the resume state could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// `trainer.json` is unreadable.
    #[error(transparent)]
    Resume(#[from] ResumeError),
    /// A weights file does not fit the model.
    #[error("{file} of resume generation {generation}: {source}")]
    Weights {
        /// The generation.
        generation: u64,
        /// The file.
        file: &'static str,
        /// The failure.
        source: WeightsError,
    },
    /// The optimizer's moments do not fit the policy.
    #[error("{OPTIMIZER_FILE} of resume generation {generation}: {detail}")]
    Optimizer {
        /// The generation.
        generation: u64,
        /// What is wrong.
        detail: String,
    },
}

/// Where training continues from.
#[derive(Clone, Debug, PartialEq)]
pub struct Resumed {
    /// The generation restored; `None` for a fresh start.
    pub generation: Option<u64>,
    /// The trainer's counters.
    pub progress: TrainerProgress,
}

impl Resumed {
    /// Nothing to resume from.
    pub fn fresh() -> Self {
        Self {
            generation: None,
            progress: TrainerProgress::fresh(),
        }
    }
}

/// Loads the policy, anchor and optimizer state of `generation` and returns its counters.
///
/// An anchor the generation lacks (the objective used none when it was written) is copied
/// from the restored policy.
pub fn restore(
    generation: &Generation,
    policy: &VarStore,
    anchor: Option<&mut FrozenModel>,
    trainer: &mut Trainer,
) -> Result<Resumed, RestoreError> {
    let progress = generation.progress()?;
    load(generation, POLICY_FILE, policy)?;
    if let Some(anchor) = anchor {
        match generation.file(ANCHOR_FILE).is_file() {
            true => load(generation, ANCHOR_FILE, anchor.vs())?,
            false => anchor
                .refresh_from(policy)
                .map_err(|e| RestoreError::Resume(ResumeError::State(e.to_string())))?,
        }
        anchor.set_version(progress.anchor_version);
    }

    let optimizer_error = |detail: String| RestoreError::Optimizer {
        generation: generation.number,
        detail,
    };
    let tensors = Tensor::read_safetensors(generation.file(OPTIMIZER_FILE))
        .map_err(|e| optimizer_error(e.to_string()))?;
    let state = TrainerState {
        counters: progress.counters(),
        tensors,
    };
    trainer
        .restore(&state)
        .map_err(|e| optimizer_error(e.to_string()))?;

    Ok(Resumed {
        generation: Some(generation.number),
        progress,
    })
}

fn load(generation: &Generation, file: &'static str, vs: &VarStore) -> Result<(), RestoreError> {
    weights::load_files(vs, &[generation.file(file)], |_| false).map_err(|source| {
        RestoreError::Weights {
            generation: generation.number,
            file,
            source,
        }
    })
}

/// The sampler's generator after generation `generation`: reseeded at every generation, so
/// a restart from it draws exactly the batches an uninterrupted run would have drawn.
pub fn rng_after(seed: u64, generation: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ generation.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}
