//! Experiments that measure rebeld's objectives outside the daemon.
//!
//! - [`setting`]: the log-linear setting of the analysis and its exact evaluation;
//! - [`learner`]: online REBEL rounds on it, with the daemon's losses and dual solvers;
//! - [`shift`]: `rebeld experiment shift`, the preference-shift comparison across objectives,
//!   sample sizes, radii and seeds.

pub mod learner;
pub mod setting;
pub mod shift;

use crate::train::robust::RobustError;

/// Why an experiment could not run.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// An option is out of range; the caller must change it.
    #[error("{option}: {reason}")]
    InvalidOption {
        /// The flag, as written on the command line.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The dual solver rejected a batch of losses.
    #[error("the dual solver failed")]
    Robust(#[from] RobustError),
    /// libtorch failed.
    #[error("libtorch failed")]
    Torch(#[from] tch::TchError),
    /// Autograd returned no gradient for the parameters.
    #[error("autograd returned no gradient for the policy's parameters")]
    NoGradient,
    /// A worker thread panicked.
    #[error("a worker thread of the experiment panicked")]
    Worker,
}
