//! `rebeld eval --by-segment`: the implicit-reward figures of each segment, the overall ones
//! and the worst segment.

use std::fmt;

use serde_json::{json, Value};

use super::EvalReport;
use crate::train::gates::implicit_reward;

/// One segment's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentScore {
    /// The segment's name.
    pub segment: String,
    /// Pairs evaluated.
    pub pairs: usize,
    /// Lines skipped (see [`EvalReport::skipped`]).
    pub skipped: usize,
    /// Share of pairs with a positive margin, a tie counting one half; NaN without pairs.
    pub accuracy: f64,
    /// Mean implicit reward margin; NaN without pairs.
    pub mean_margin: f64,
}

/// Every segment's figures, the overall ones and the worst segment.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentedReport {
    /// The segments, in the order they were given (or first met in a tagged file).
    pub segments: Vec<SegmentScore>,
    /// Every pair of every segment together.
    pub overall: EvalReport,
    /// Index in `segments` of the one with the lowest accuracy (then the lowest mean margin,
    /// then the first listed) among those with pairs.
    pub worst: usize,
}

/// The scores of pairs from several segments, in the order they were read.
#[derive(Debug, Clone, Copy)]
pub struct ScoredPairs<'a> {
    /// The segments' names.
    pub labels: &'a [String],
    /// Lines skipped in each segment.
    pub skipped: &'a [usize],
    /// The segment index of each pair.
    pub segment_of: &'a [usize],
    /// `(log π(chosen), log π(rejected))` of each pair under the policy.
    pub policy: &'a [(f64, f64)],
    /// The same under the reference.
    pub reference: &'a [(f64, f64)],
}

/// Aggregates scored pairs by segment; `None` when there is no pair at all.
pub fn aggregate(scored: ScoredPairs<'_>) -> Option<SegmentedReport> {
    let ScoredPairs {
        labels,
        skipped,
        segment_of,
        policy,
        reference,
    } = scored;
    let chosen_first = vec![1.0; segment_of.len()];
    let overall = implicit_reward(policy, reference, &chosen_first)?;

    let segments: Vec<SegmentScore> = labels
        .iter()
        .enumerate()
        .map(|(index, label)| {
            let members = |scores: &[(f64, f64)]| -> Vec<(f64, f64)> {
                segment_of
                    .iter()
                    .zip(scores)
                    .filter(|(&of, _)| of == index)
                    .map(|(_, &score)| score)
                    .collect()
            };
            let (policy, reference) = (members(policy), members(reference));
            let found = implicit_reward(&policy, &reference, &chosen_first[..policy.len()]);
            SegmentScore {
                segment: label.clone(),
                pairs: found.map_or(0, |f| f.pairs),
                skipped: skipped.get(index).copied().unwrap_or(0),
                accuracy: found.map_or(f64::NAN, |f| f.accuracy),
                mean_margin: found.map_or(f64::NAN, |f| f.mean_margin),
            }
        })
        .collect();

    let worst = worst(&segments)?;
    Some(SegmentedReport {
        overall: EvalReport {
            pairs: overall.pairs,
            skipped: skipped.iter().sum(),
            accuracy: overall.accuracy,
            mean_margin: overall.mean_margin,
        },
        segments,
        worst,
    })
}

/// The segment with pairs that has the lowest accuracy, then the lowest mean margin, then
/// comes first.
fn worst(segments: &[SegmentScore]) -> Option<usize> {
    let key = |s: &SegmentScore| (s.accuracy, s.mean_margin);
    segments
        .iter()
        .enumerate()
        .filter(|(_, s)| s.pairs > 0)
        .reduce(|best, next| match key(next.1).partial_cmp(&key(best.1)) {
            Some(std::cmp::Ordering::Less) => next,
            _ => best,
        })
        .map(|(index, _)| index)
}

impl SegmentedReport {
    /// The report as JSON for scripts: `segments`, `overall` and `worst` (NaN as `null`).
    pub fn to_json(&self) -> Value {
        let segments: Vec<Value> = self
            .segments
            .iter()
            .map(|s| {
                json!({
                    "segment": s.segment,
                    "pairs": s.pairs,
                    "skipped": s.skipped,
                    "accuracy": finite(s.accuracy),
                    "mean_margin": finite(s.mean_margin),
                })
            })
            .collect();
        let worst = &self.segments[self.worst];
        json!({
            "segments": segments,
            "overall": self.overall.to_json(),
            "worst": {"segment": worst.segment, "accuracy": finite(worst.accuracy)},
        })
    }
}

/// The number, or `null` when it is not finite.
fn finite(value: f64) -> Value {
    if value.is_finite() {
        json!(value)
    } else {
        Value::Null
    }
}

impl fmt::Display for SegmentedReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .segments
            .iter()
            .map(|s| s.segment.len())
            .chain([7])
            .max()
            .unwrap_or(7);
        let number = |value: f64| {
            if value.is_finite() {
                format!("{value:.6}")
            } else {
                "-".to_owned()
            }
        };
        writeln!(
            f,
            "{:<width$} {:>6} {:>7} {:>9} {:>12}",
            "segment", "pairs", "skipped", "accuracy", "mean_margin"
        )?;
        let overall = &self.overall;
        let rows = self
            .segments
            .iter()
            .map(|s| {
                (
                    &s.segment[..],
                    s.pairs,
                    s.skipped,
                    s.accuracy,
                    s.mean_margin,
                )
            })
            .chain([(
                "overall",
                overall.pairs,
                overall.skipped,
                overall.accuracy,
                overall.mean_margin,
            )]);
        for (name, pairs, skipped, accuracy, margin) in rows {
            writeln!(
                f,
                "{name:<width$} {pairs:>6} {skipped:>7} {:>9} {:>12}",
                number(accuracy),
                number(margin)
            )?;
        }
        write!(f, "worst {}", self.segments[self.worst].segment)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        vec!["helpful".into(), "harmless".into(), "empty".into()]
    }

    /// Pairs whose policy margins are `margins` (the reference scores every response 0).
    fn report(segment_of: &[usize], margins: &[f64], skipped: &[usize]) -> SegmentedReport {
        let policy: Vec<(f64, f64)> = margins.iter().map(|&m| (m, 0.0)).collect();
        let reference = vec![(0.0, 0.0); margins.len()];
        aggregate(ScoredPairs {
            labels: &labels(),
            skipped,
            segment_of,
            policy: &policy,
            reference: &reference,
        })
        .unwrap()
    }

    #[test]
    fn each_segment_is_scored_on_its_own_pairs() {
        // helpful: +1, +3, −1 → 2 of 3 right, mean 1; harmless: −2, 0 → ½ of 2, mean −1.
        let found = report(&[0, 1, 0, 0, 1], &[1.0, -2.0, 3.0, -1.0, 0.0], &[1, 0, 2]);
        let helpful = &found.segments[0];
        assert_eq!((helpful.pairs, helpful.skipped), (3, 1));
        assert!((helpful.accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert!((helpful.mean_margin - 1.0).abs() < 1e-12);
        let harmless = &found.segments[1];
        assert_eq!(harmless.pairs, 2);
        assert_eq!(harmless.accuracy, 0.25, "a tie counts half");
        assert_eq!(harmless.mean_margin, -1.0);
        let empty = &found.segments[2];
        assert_eq!((empty.pairs, empty.skipped), (0, 2));
        assert!(empty.accuracy.is_nan() && empty.mean_margin.is_nan());

        assert_eq!(found.worst, 1, "the empty segment is not the worst");
        assert_eq!(found.overall.pairs, 5);
        assert_eq!(found.overall.skipped, 3);
        assert_eq!(found.overall.accuracy, 2.5 / 5.0);
        assert!((found.overall.mean_margin - 0.2).abs() < 1e-12);
    }

    #[test]
    fn equal_accuracies_go_to_the_lower_margin_then_the_first_listed() {
        // Both 0.5; harmless has the lower mean margin.
        let found = report(&[0, 0, 1, 1], &[1.0, -1.0, 0.5, -3.0], &[0, 0, 0]);
        assert_eq!(found.segments[0].accuracy, found.segments[1].accuracy);
        assert_eq!(found.worst, 1);

        // A model against itself: every pair a tie, every segment 0.5 and 0.
        let found = report(&[1, 0, 1], &[0.0, 0.0, 0.0], &[0, 0, 0]);
        assert_eq!(found.segments[0].accuracy, 0.5);
        assert_eq!(found.segments[1].accuracy, 0.5);
        assert_eq!(found.worst, 0);
    }

    #[test]
    fn no_pair_at_all_is_no_report() {
        let found = aggregate(ScoredPairs {
            labels: &labels(),
            skipped: &[3, 0, 0],
            segment_of: &[],
            policy: &[],
            reference: &[],
        });
        assert_eq!(found, None);
    }

    #[test]
    fn the_table_and_the_json_name_the_worst_segment() {
        let found = report(&[0, 1], &[1.0, -1.0], &[0, 4]);
        let table = found.to_string();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 6, "{table}");
        assert!(lines[0].starts_with("segment"), "{table}");
        assert!(lines[2].starts_with("harmless") && lines[2].contains("0.000000"));
        assert!(
            lines[3].starts_with("empty") && lines[3].contains(" - "),
            "{table}"
        );
        assert!(lines[4].starts_with("overall") && lines[4].contains("0.500000"));
        assert_eq!(lines[5], "worst harmless");

        let json = found.to_json();
        assert_eq!(json["worst"]["segment"], "harmless");
        assert_eq!(json["segments"][2]["accuracy"], Value::Null);
        assert_eq!(json["segments"][1]["skipped"], 4);
        assert_eq!(json["overall"]["accuracy"], 0.5);
    }
}
