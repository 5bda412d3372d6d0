//! Per-segment loss and weight of a step: the configured segments (`train.segments`) each on
//! their own, every other segment (and pairs without one) as `other`.

/// The label of pairs outside the configured segments.
pub const OTHER: &str = "other";

/// The configured segments, in order, then `other`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segments {
    labels: Vec<String>,
}

/// One segment's share of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentSummary {
    /// The label.
    pub label: String,
    /// Pairs of the segment in the step.
    pub pairs: usize,
    /// Mean pointwise loss of those pairs; NaN when there are none.
    pub mean_loss: f64,
    /// Their total weight in the objective (0 when there are none).
    pub weight: f64,
}

impl Segments {
    /// The labels of `train.segments` (duplicates and a configured `other` folded) and
    /// `other`.
    pub fn new(configured: &[String]) -> Self {
        let mut labels: Vec<String> = Vec::new();
        for name in configured {
            if name != OTHER && !labels.contains(name) {
                labels.push(name.clone());
            }
        }
        labels.push(OTHER.to_owned());
        Self { labels }
    }

    /// Every label, `other` last: the bounded set of metric label values.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The index in [`Segments::labels`] of an event's segment.
    pub fn index(&self, segment: Option<&str>) -> usize {
        let other = self.labels.len() - 1;
        segment
            .and_then(|s| self.labels[..other].iter().position(|l| l == s))
            .unwrap_or(other)
    }

    /// Per label: pairs, mean loss and total weight of a step whose pair `i` is in segment
    /// `indices[i]` with loss `losses[i]` and weight `weights[i]` (weights may be empty when
    /// the step had none: every total is then 0).
    pub fn summarize(
        &self,
        indices: &[usize],
        losses: &[f64],
        weights: &[f64],
    ) -> Vec<SegmentSummary> {
        let mut sums = vec![(0usize, 0.0, 0.0); self.labels.len()];
        for (i, &segment) in indices.iter().enumerate() {
            let entry = &mut sums[segment];
            entry.0 += 1;
            entry.1 += losses.get(i).copied().unwrap_or(f64::NAN);
            entry.2 += weights.get(i).copied().unwrap_or(0.0);
        }
        self.labels
            .iter()
            .zip(sums)
            .map(|(label, (pairs, loss, weight))| SegmentSummary {
                label: label.clone(),
                pairs,
                mean_loss: match pairs {
                    0 => f64::NAN,
                    n => loss / n as f64,
                },
                weight,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_missing_segments_are_other() {
        let segments = Segments::new(&["enterprise".into(), "free".into(), "free".into()]);
        assert_eq!(segments.labels(), ["enterprise", "free", "other"]);
        assert_eq!(segments.index(Some("free")), 1);
        assert_eq!(segments.index(Some("pro")), 2);
        assert_eq!(segments.index(None), 2);
        assert_eq!(Segments::new(&["other".into()]).labels(), ["other"]);
    }

    #[test]
    fn summaries_average_losses_and_add_weights() {
        let segments = Segments::new(&["a".into(), "b".into()]);
        let found = segments.summarize(
            &[0, 2, 0, 2, 2],
            &[1.0, 2.0, 3.0, 4.0, 6.0],
            &[0.1, 0.2, 0.3, 0.15, 0.25],
        );
        assert_eq!(found[0].pairs, 2);
        assert_eq!(found[0].mean_loss, 2.0);
        assert!((found[0].weight - 0.4).abs() < 1e-12);
        assert_eq!(found[1].pairs, 0);
        assert!(found[1].mean_loss.is_nan());
        assert_eq!(found[1].weight, 0.0);
        assert_eq!(found[2].mean_loss, 4.0);
        assert!((found[2].weight - 0.6).abs() < 1e-12);
    }
}
