//! The learning rate of each optimizer step: a linear warm-up to the peak, then the peak or a
//! cosine decay to zero.

use crate::config::{Schedule, TrainConfig};

/// The learning-rate schedule of `[train]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// The peak rate.
    pub peak: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: u64,
    /// What follows the warm-up.
    pub schedule: Schedule,
    /// With [`Schedule::Cosine`], steps after warm-up over which the rate falls to zero.
    pub cosine_steps: u64,
}

impl LrSchedule {
    /// The schedule of `config`.
    pub fn from_config(config: &TrainConfig) -> Self {
        Self {
            peak: config.learning_rate,
            warmup_steps: config.warmup_steps,
            schedule: config.schedule,
            cosine_steps: config.cosine_steps,
        }
    }

    /// The rate of the update numbered `step`, counting applied updates from 0. Warm-up
    /// reaches the peak on its last step, so no update runs at rate zero.
    pub fn rate(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let after = step - self.warmup_steps;
        match self.schedule {
            Schedule::Constant => self.peak,
            Schedule::Cosine if self.cosine_steps == 0 => self.peak,
            Schedule::Cosine => {
                let progress = (after as f64 / self.cosine_steps as f64).min(1.0);
                self.peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(schedule: Schedule) -> LrSchedule {
        LrSchedule {
            peak: 1e-3,
            warmup_steps: 4,
            schedule,
            cosine_steps: 10,
        }
    }

    #[test]
    fn warmup_is_linear_then_constant() {
        let s = schedule(Schedule::Constant);
        let rates: Vec<f64> = (0..6).map(|i| s.rate(i)).collect();
        assert_eq!(rates, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]);
    }

    #[test]
    fn cosine_halves_midway_and_ends_at_zero() {
        let s = schedule(Schedule::Cosine);
        assert_eq!(s.rate(4), 1e-3);
        assert!((s.rate(9) - 5e-4).abs() < 1e-15);
        assert!(s.rate(14).abs() < 1e-18);
        assert!(s.rate(1_000).abs() < 1e-18);
    }
}
