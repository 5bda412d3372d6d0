//! Choosing which rows a sample takes.

use std::f64::consts::LN_2;

use rand::seq::index;
use rand::Rng;

use super::error::BufferError;

/// How [`RollingBuffer::sample`](super::RollingBuffer::sample) weighs the held rows.
///
/// Every strategy samples without replacement: one call never returns a row twice, and
/// returns all rows when asked for at least as many as are held.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SampleStrategy {
    /// Every held row is equally likely.
    Uniform,
    /// A row's weight halves for every `half_life_ms` its ingest time lies before the newest
    /// held row's: weight ∝ 2^(−(newest − ingest) / half_life_ms).
    RecencyTime {
        /// Milliseconds of ingest-time difference that halve a row's weight.
        half_life_ms: f64,
    },
    /// A row's weight halves for every `half_life_rows` rows appended after it:
    /// weight ∝ 2^(−rank / half_life_rows), where the newest row has rank 0.
    RecencyRank {
        /// Rows of difference that halve a row's weight.
        half_life_rows: f64,
    },
}

/// Picks `min(n, len)` distinct positions among `len` rows held oldest first.
///
/// `ingest_times` yields the rows' ingest times, oldest row first; only the time-weighted
/// strategy reads it. Weighted strategies give every row an exponential clock with rate equal
/// to its weight and take the rows whose clocks ring first, which is sampling without
/// replacement with probabilities proportional to weight (Efraimidis and Spirakis). The
/// clocks are compared in log space so that no weight underflows: log(clock) =
/// log(Exp(1)) − log(weight). The result is sorted by ringing time, so each prefix of it is
/// itself such a sample.
pub(crate) fn choose<R, I>(
    strategy: SampleStrategy,
    n: usize,
    len: usize,
    ingest_times: I,
    rng: &mut R,
) -> Result<Vec<usize>, BufferError>
where
    R: Rng + ?Sized,
    I: Iterator<Item = i64> + Clone,
{
    let n = n.min(len);
    match strategy {
        SampleStrategy::Uniform => Ok(index::sample(rng, len, n).into_vec()),
        SampleStrategy::RecencyTime { half_life_ms } => {
            let decay = decay_per_unit(half_life_ms)?;
            let newest = ingest_times.clone().max().unwrap_or_default();
            let ages = ingest_times.map(|t| newest.saturating_sub(t) as f64);
            Ok(first_to_ring(ages, decay, n, rng))
        }
        SampleStrategy::RecencyRank { half_life_rows } => {
            let decay = decay_per_unit(half_life_rows)?;
            let ranks = (0..len).map(|position| (len - 1 - position) as f64);
            Ok(first_to_ring(ranks, decay, n, rng))
        }
    }
}

/// The drop in log-weight per unit of age for a half-life.
fn decay_per_unit(half_life: f64) -> Result<f64, BufferError> {
    if !(half_life.is_finite() && half_life > 0.0) {
        return Err(BufferError::InvalidHalfLife { value: half_life });
    }
    Ok(LN_2 / half_life)
}

/// Positions of the `n` rows whose clocks ring first; a row of age `a` has log-weight
/// `−a · decay`.
fn first_to_ring<R: Rng + ?Sized>(
    ages: impl Iterator<Item = f64>,
    decay: f64,
    n: usize,
    rng: &mut R,
) -> Vec<usize> {
    let mut clocks: Vec<(f64, usize)> = ages
        .enumerate()
        .map(|(position, age)| (log_exponential(rng) + age * decay, position))
        .collect();
    if n == 0 {
        return Vec::new();
    }

    let by_time = |a: &(f64, usize), b: &(f64, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    if n < clocks.len() {
        clocks.select_nth_unstable_by(n - 1, by_time);
        clocks.truncate(n);
    }
    clocks.sort_unstable_by(by_time);
    clocks.into_iter().map(|(_, position)| position).collect()
}

/// log(E) for E ~ Exp(1).
fn log_exponential<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    // `random` is in [0, 1), so 1 − u is in (0, 1] and its log is finite.
    let u: f64 = rng.random();
    (-(1.0 - u).ln()).ln()
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    use super::{choose, BufferError, SampleStrategy};

    fn frequencies(strategy: SampleStrategy, ingest: &[i64], draws: usize) -> Vec<f64> {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = vec![0_usize; ingest.len()];
        for _ in 0..draws {
            let picked = choose(strategy, 1, ingest.len(), ingest.iter().copied(), &mut rng)
                .expect("valid strategy");
            counts[picked[0]] += 1;
        }
        counts
            .into_iter()
            .map(|c| c as f64 / draws as f64)
            .collect()
    }

    /// Weights 1/8, 1/4, 1/2, 1 (oldest first) normalise to 1/15, 2/15, 4/15, 8/15.
    const HALVING: [f64; 4] = [1.0 / 15.0, 2.0 / 15.0, 4.0 / 15.0, 8.0 / 15.0];

    #[test]
    fn rank_weights_halve_per_half_life() {
        let strategy = SampleStrategy::RecencyRank {
            half_life_rows: 1.0,
        };
        let seen = frequencies(strategy, &[0, 0, 0, 0], 40_000);
        for (seen, expected) in seen.iter().zip(HALVING) {
            assert!((seen - expected).abs() < 0.01, "{seen} vs {expected}");
        }
    }

    #[test]
    fn time_weights_halve_per_half_life_whatever_the_order() {
        // Ingest times are not sorted: weight follows time, not position.
        let strategy = SampleStrategy::RecencyTime {
            half_life_ms: 100.0,
        };
        let seen = frequencies(strategy, &[1_300, 1_000, 1_200, 1_100], 40_000);
        let expected = [HALVING[3], HALVING[0], HALVING[2], HALVING[1]];
        for (seen, expected) in seen.iter().zip(expected) {
            assert!((seen - expected).abs() < 0.01, "{seen} vs {expected}");
        }
    }

    #[test]
    fn uniform_is_flat() {
        let seen = frequencies(SampleStrategy::Uniform, &[5, 4, 3, 2, 1], 40_000);
        for seen in seen {
            assert!((seen - 0.2).abs() < 0.01, "{seen}");
        }
    }

    /// Successive sampling without replacement, worked by hand: with rank weights 1, 2, 4
    /// (oldest first, total 7), P(the two picks are {1, 2}) = P(2 then 1) + P(1 then 2) =
    /// 4/7 · 2/3 + 2/7 · 4/5 = 8/21 + 8/35 = 64/105.
    #[test]
    fn pairs_follow_successive_sampling() {
        let strategy = SampleStrategy::RecencyRank {
            half_life_rows: 1.0,
        };
        let mut rng = SmallRng::seed_from_u64(11);
        let draws = 40_000;
        let mut newest_two = 0;
        for _ in 0..draws {
            let mut picked =
                choose(strategy, 2, 3, [0_i64; 3].into_iter(), &mut rng).expect("valid");
            picked.sort_unstable();
            assert_eq!(picked.len(), 2);
            if picked == [1, 2] {
                newest_two += 1;
            }
        }
        let seen = newest_two as f64 / draws as f64;
        assert!((seen - 64.0 / 105.0).abs() < 0.01, "{seen}");
    }

    #[test]
    fn never_repeats_and_caps_at_len() {
        let mut rng = SmallRng::seed_from_u64(3);
        let strategies = [
            SampleStrategy::Uniform,
            SampleStrategy::RecencyTime {
                half_life_ms: 0.001,
            },
            SampleStrategy::RecencyRank {
                half_life_rows: 0.01,
            },
        ];
        let ingest: Vec<i64> = (0..50).map(|t| t * 1_000_000).collect();
        for strategy in strategies {
            for n in [0, 1, 10, 49, 50, 80] {
                let mut picked =
                    choose(strategy, n, 50, ingest.iter().copied(), &mut rng).expect("valid");
                assert_eq!(picked.len(), n.min(50));
                picked.sort_unstable();
                picked.dedup();
                assert_eq!(picked.len(), n.min(50), "{strategy:?} repeated a row");
            }
        }
    }

    #[test]
    fn rejects_bad_half_lives() {
        let mut rng = SmallRng::seed_from_u64(1);
        for value in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let strategy = SampleStrategy::RecencyRank {
                half_life_rows: value,
            };
            let result = choose(strategy, 1, 3, [0_i64; 3].into_iter(), &mut rng);
            assert!(matches!(result, Err(BufferError::InvalidHalfLife { .. })));
        }
    }
}
