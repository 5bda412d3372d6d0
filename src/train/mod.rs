//! The DRO-REBEL update.
//!
//! - [`adamw`]: AdamW with its moments in plain tensors, so they can be saved and restored;
//! - [`anchor`]: the anchor and reference models, their log-prob caches, and the seam that
//!   publication drives (anchor refresh, staleness);
//! - [`objective`]: each objective's pointwise loss;
//! - [`reward`]: a pair's reward difference from its raw signals and the configured mixture;
//! - [`robust`]: the worst case of a batch's pointwise losses over a chi-squared or KL
//!   ambiguity set, and the weights that attain it;
//! - [`gates`]: the checks a version passes before it becomes `latest`;
//! - [`persist`]: the trainer's side of the resume state;
//! - [`publish`]: versions of the policy, judged by the gates;
//! - [`schedule`]: the learning-rate schedule;
//! - [`segments`]: per-segment loss and weight of a step;
//! - [`step`]: one optimizer step over a batch, with gradient accumulation and skips of
//!   non-finite steps;
//! - [`snapshot`]: deep copies of the weights and the trainer's state, for rollback and resume;
//! - [`task`]: the daemon's trainer loop over the buffer;
//! - [`wasserstein`]: the Wasserstein objective's gradient penalty.

pub mod adamw;
pub mod anchor;
pub mod gates;
pub mod objective;
pub mod persist;
pub mod publish;
pub mod reward;
pub mod robust;
pub mod schedule;
pub mod segments;
pub mod snapshot;
pub mod step;
pub mod task;
pub mod wasserstein;
