//! The DRO-REBEL trainer.
//!
//! [`robust`] turns a batch's pointwise losses into the worst case over an ambiguity set
//! (chi-squared or KL) and the weights that attain it.

pub mod robust;
