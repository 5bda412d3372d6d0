//! The DRO-REBEL update.
//!
//! - [`reward`]: a pair's reward difference from its raw signals and the configured mixture;
//! - [`robust`]: the worst case of a batch's pointwise losses over a chi-squared or KL
//!   ambiguity set, and the weights that attain it;
//! - [`schedule`]: the learning-rate schedule;
//! - [`step`]: one optimizer step over a batch, with gradient accumulation and skips of
//!   non-finite steps;
//! - [`task`]: the daemon's trainer loop over the buffer.

pub mod reward;
pub mod robust;
pub mod schedule;
pub mod step;
pub mod task;
