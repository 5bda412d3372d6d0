//! The reward difference `Δr = r(x, a) − r(x, b)` that REBEL regresses the policy's log-ratio
//! difference onto.
//!
//! A pair gets its difference from per-objective scores when both responses carry every
//! objective that has a nonzero weight in `train.mixture`: `Σ_k w_k (s_a,k − s_b,k)`.
//! Otherwise it comes from the stated preference, Bradley–Terry style: if `P(a ≻ b) = c` then
//! `r(a) − r(b) = logit(c)`, so `+logit(c)` when A is preferred, `−logit(c)` when B is, and 0
//! for a tie, with `c` the event's confidence or `default_confidence`. A pair with neither is
//! unusable. Every difference is multiplied by `reward_scale`.

use crate::buffer::{PairRecord, Preference};
use crate::config::TrainConfig;

/// The largest magnitude a pair's scaled reward difference may have; a pair beyond it is left
/// out of training. Scores near the limits of f64 (which the event contract accepts) would
/// otherwise give an infinite difference or a squared loss that swamps every other pair's.
pub const MAX_REWARD_DIFFERENCE: f64 = 1e6;

/// Why a pair has no reward difference. The pair must be skipped; retrying cannot help.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RewardError {
    /// Neither complete scores for the mixture nor a preference.
    #[error("pair {id} has no preference and lacks scores for the mixture's objectives")]
    Unusable {
        /// The pair's event id.
        id: String,
    },

    /// The confidence is not strictly between 0 and 1, so its logit is not finite.
    #[error("pair {id} has confidence {value}, but it must lie strictly between 0 and 1")]
    InvalidConfidence {
        /// The pair's event id.
        id: String,
        /// The offending confidence.
        value: f64,
    },

    /// The scaled reward difference is not finite or exceeds [`MAX_REWARD_DIFFERENCE`].
    #[error(
        "pair {id} has reward difference {value}, beyond the ±{MAX_REWARD_DIFFERENCE} a pair \
         may carry"
    )]
    OutOfRange {
        /// The pair's event id.
        id: String,
        /// The scaled difference.
        value: f64,
    },
}

/// What turns a pair's labels into a reward difference; built once from `[train]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardSpec {
    /// Objectives with a nonzero weight, in name order.
    mixture: Vec<(String, f64)>,
    reward_scale: f64,
    default_confidence: f64,
}

impl RewardSpec {
    /// The spec of `config`'s `mixture`, `reward_scale` and `default_confidence`.
    pub fn from_config(config: &TrainConfig) -> Self {
        let mixture = config
            .mixture
            .iter()
            .filter(|(_, &w)| w != 0.0)
            .map(|(name, &w)| (name.clone(), w))
            .collect();
        Self {
            mixture,
            reward_scale: config.reward_scale,
            default_confidence: config.default_confidence,
        }
    }

    /// `Δr` for `record`, scaled (module docs).
    pub fn reward_difference(&self, record: &PairRecord) -> Result<f64, RewardError> {
        let diff = self.reward_scale * self.unscaled_difference(record)?;
        match diff.abs() <= MAX_REWARD_DIFFERENCE {
            true => Ok(diff),
            false => Err(RewardError::OutOfRange {
                id: record.id.clone(),
                value: diff,
            }),
        }
    }

    fn unscaled_difference(&self, record: &PairRecord) -> Result<f64, RewardError> {
        if let Some(diff) = self.mixture_difference(record) {
            return Ok(diff);
        }
        let diff = match record.preference {
            Some(Preference::A) => self.logit_confidence(record)?,
            Some(Preference::B) => -self.logit_confidence(record)?,
            Some(Preference::Tie) => 0.0,
            None => {
                return Err(RewardError::Unusable {
                    id: record.id.clone(),
                })
            }
        };
        Ok(diff)
    }

    /// `Σ_k w_k (s_a,k − s_b,k)` when both responses score every weighted objective.
    fn mixture_difference(&self, record: &PairRecord) -> Option<f64> {
        if self.mixture.is_empty() {
            return None;
        }
        self.mixture.iter().try_fold(0.0, |sum, (name, weight)| {
            let a = score(&record.scores_a, name)?;
            let b = score(&record.scores_b, name)?;
            Some(sum + weight * (a - b))
        })
    }

    fn logit_confidence(&self, record: &PairRecord) -> Result<f64, RewardError> {
        let c = record.confidence.map_or(self.default_confidence, f64::from);
        match c > 0.0 && c < 1.0 {
            true => Ok((c / (1.0 - c)).ln()),
            false => Err(RewardError::InvalidConfidence {
                id: record.id.clone(),
                value: c,
            }),
        }
    }
}

/// The first score named `name`.
fn score(scores: &[(String, f64)], name: &str) -> Option<f64> {
    scores.iter().find(|(n, _)| n == name).map(|&(_, s)| s)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const TOL: f64 = 1e-12;

    fn spec(mixture: &[(&str, f64)], scale: f64) -> RewardSpec {
        let config = TrainConfig {
            mixture: mixture
                .iter()
                .map(|&(n, w)| (n.to_owned(), w))
                .collect::<BTreeMap<_, _>>(),
            reward_scale: scale,
            default_confidence: 0.75,
            ..TrainConfig::default()
        };
        RewardSpec::from_config(&config)
    }

    fn scores(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|&(n, s)| (n.to_owned(), s)).collect()
    }

    fn record(preference: Option<Preference>, confidence: Option<f32>) -> PairRecord {
        PairRecord {
            id: "e1".to_owned(),
            preference,
            confidence,
            ..PairRecord::default()
        }
    }

    fn close(found: f64, expected: f64) {
        assert!((found - expected).abs() < TOL, "{found} vs {expected}");
    }

    #[test]
    fn mixture_of_scores() {
        // 0.7·(0.9 − 0.2) + 0.3·(0.1 − 0.5) = 0.49 − 0.12 = 0.37; times scale 2 = 0.74.
        let spec = spec(&[("helpful", 0.7), ("harmless", 0.3), ("unused", 0.0)], 2.0);
        let mut pair = record(Some(Preference::B), Some(0.9));
        pair.scores_a = scores(&[("harmless", 0.1), ("helpful", 0.9), ("extra", 5.0)]);
        pair.scores_b = scores(&[("helpful", 0.2), ("harmless", 0.5)]);
        close(spec.reward_difference(&pair).expect("scores"), 0.74);
    }

    #[test]
    fn incomplete_scores_fall_back_to_the_preference() {
        let spec = spec(&[("helpful", 0.7), ("harmless", 0.3)], 1.0);
        let mut pair = record(Some(Preference::A), Some(0.875));
        pair.scores_a = scores(&[("helpful", 0.9), ("harmless", 0.1)]);
        pair.scores_b = scores(&[("helpful", 0.2)]);
        // logit(7/8) = ln 7 (7/8 is exact in f32).
        close(
            spec.reward_difference(&pair).expect("preference"),
            7f64.ln(),
        );
    }

    #[test]
    fn bradley_terry_from_preference_and_confidence() {
        let spec = spec(&[], 0.5);
        // logit(0.75) = ln 3, the default confidence; scale 0.5.
        let a = record(Some(Preference::A), None);
        close(spec.reward_difference(&a).expect("a"), 0.5 * 3f64.ln());
        // logit(0.9) = ln 9, computed from the f32 0.9 as stored.
        let b = record(Some(Preference::B), Some(0.9));
        let c = f64::from(0.9f32);
        close(
            spec.reward_difference(&b).expect("b"),
            -0.5 * (c / (1.0 - c)).ln(),
        );
        assert!((spec.reward_difference(&b).expect("b") + 0.5 * 9f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn a_tie_is_zero() {
        let spec = spec(&[], 3.0);
        let tie = record(Some(Preference::Tie), Some(0.99));
        assert_eq!(spec.reward_difference(&tie), Ok(0.0));
    }

    #[test]
    fn missing_labels_and_bad_confidence_are_errors() {
        let spec = spec(&[("helpful", 1.0)], 1.0);
        let mut pair = record(None, None);
        pair.scores_a = scores(&[("helpful", 1.0)]);
        assert_eq!(
            spec.reward_difference(&pair),
            Err(RewardError::Unusable { id: "e1".into() })
        );
        for bad in [0.0, 1.0, f32::NAN] {
            let pair = record(Some(Preference::A), Some(bad));
            assert!(matches!(
                spec.reward_difference(&pair),
                Err(RewardError::InvalidConfidence { .. })
            ));
        }
    }

    #[test]
    fn differences_beyond_the_bound_are_left_out() {
        let helpful = spec(&[("helpful", 1.0)], 1.0);
        let scored = |a: f64, b: f64| {
            let mut pair = record(None, None);
            pair.scores_a = scores(&[("helpful", a)]);
            pair.scores_b = scores(&[("helpful", b)]);
            helpful.reward_difference(&pair)
        };
        assert_eq!(
            scored(MAX_REWARD_DIFFERENCE, 0.0),
            Ok(MAX_REWARD_DIFFERENCE)
        );
        // Each score is a finite f64; their difference overflows to infinity.
        for (a, b) in [(1e308, -1e308), (6e5, -6e5), (-2e6, 0.0)] {
            assert!(
                matches!(scored(a, b), Err(RewardError::OutOfRange { .. })),
                "{a} − {b}"
            );
        }
        // The bound applies after scaling.
        let scaled = spec(&[], 1e7);
        let preferred = record(Some(Preference::A), None);
        assert!(matches!(
            scaled.reward_difference(&preferred),
            Err(RewardError::OutOfRange { .. })
        ));
    }
}
