//! Length bucketing: scoring sequences of mixed lengths in a few forward passes of similar
//! lengths instead of one pass padded to the longest.
//!
//! Preference data has a long tail of lengths: padding a batch to its longest sequence can
//! make most of the forward pass work on padding. [`length_buckets`] splits sequences sorted
//! by length into at most `most` runs with the fewest padded tokens (an exact dynamic
//! programme), and [`bucketed_response_sums`] scores each run as its own [`Batch`] and puts
//! the sums back in the callers' order. Padding never changes a sequence's score (attention
//! is causal and masks padded keys), so the result equals one padded pass up to rounding, and
//! its gradient flows through every pass.

use std::cmp::Reverse;
use std::ops::Range;

use tch::{Device, Tensor};

use super::llama::Llama;
use super::logprobs::{
    response_logprobs, response_logprobs_no_grad, Batch, LogprobError, Sequence,
};

/// Splits `lengths`, sorted longest first, into at most `most` contiguous runs that minimise
/// the padded tokens `Σ |run| × longest of run`; the runs cover `0..lengths.len()` in order.
/// With `most` ≤ 1 (or fewer lengths than that) there is one run.
///
/// # Panics
/// Never; unsorted lengths still give a cover, just not the best one.
pub fn length_buckets(lengths: &[usize], most: usize) -> Vec<Range<usize>> {
    let n = lengths.len();
    let most = most.clamp(1, n.max(1));
    if n == 0 {
        return Vec::new();
    }

    // best[g][j]: the least padded tokens of the first j lengths in g + 1 runs; cut[g][j]
    // where the last of those runs starts.
    let padded = |start: usize, end: usize| (end - start) * lengths[start];
    let mut best = vec![vec![usize::MAX; n + 1]; most];
    let mut cut = vec![vec![0; n + 1]; most];
    for (j, least) in best[0].iter_mut().enumerate().skip(1) {
        *least = padded(0, j);
    }
    for g in 1..most {
        for j in g + 1..=n {
            for start in g..j {
                let before = best[g - 1][start];
                if before == usize::MAX {
                    continue;
                }
                let total = before + padded(start, j);
                if total < best[g][j] {
                    best[g][j] = total;
                    cut[g][j] = start;
                }
            }
        }
    }

    // The fewest runs that reach the least total, then walk the cuts back.
    let least = (0..most).map(|g| best[g][n]).min().unwrap_or(0);
    let mut g = (0..most).find(|&g| best[g][n] == least).unwrap_or(0);
    let (mut runs, mut end) = (Vec::with_capacity(g + 1), n);
    while g > 0 {
        let start = cut[g][end];
        runs.push(start..end);
        end = start;
        g -= 1;
    }
    runs.push(0..end);
    runs.reverse();
    runs
}

/// Per-sequence response log-prob sums of `sequences`, `[n]` in their order, computed in at
/// most `most` forward passes of similar lengths ([`length_buckets`]). With `grad` the sums
/// carry the graph of every pass; without, no graph is built.
pub fn bucketed_response_sums(
    model: &Llama,
    sequences: &[Sequence],
    pad_id: u32,
    device: Device,
    most: usize,
    grad: bool,
) -> Result<Tensor, LogprobError> {
    let score = |batch: &Batch| match grad {
        true => response_logprobs(model, batch),
        false => response_logprobs_no_grad(model, batch),
    };
    if most <= 1 || sequences.len() <= 1 {
        return Ok(score(&Batch::new(sequences, pad_id, device)?)?.sums);
    }

    let order = longest_first(sequences);
    let lengths: Vec<usize> = order.iter().map(|&i| sequences[i].ids().len()).collect();

    let mut parts = Vec::new();
    for run in length_buckets(&lengths, most) {
        let members: Vec<Sequence> = order[run].iter().map(|&i| sequences[i].clone()).collect();
        parts.push(score(&Batch::new(&members, pad_id, device)?)?.sums);
    }
    let sorted = Tensor::f_cat(&parts, 0)?;

    // rank[i]: where sequence i sits in `sorted`.
    let mut rank = vec![0_i64; sequences.len()];
    for (position, &i) in order.iter().enumerate() {
        rank[i] = position as i64;
    }
    let rank = Tensor::f_from_slice(&rank)?.f_to_device(device)?;
    Ok(sorted.f_index_select(0, &rank)?)
}

/// The indices of `sequences`, longest first (ties in their order).
pub fn longest_first<S: std::borrow::Borrow<Sequence>>(sequences: &[S]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| Reverse(sequences[i].borrow().ids().len()));
    order
}

/// Padded tokens of scoring `lengths` in the runs of [`length_buckets`]: what a step pays
/// for its forward passes, against `lengths.len() × longest` for one padded pass.
pub fn padded_tokens(lengths: &[usize], most: usize) -> usize {
    let mut sorted = lengths.to_vec();
    sorted.sort_unstable_by_key(|&len| Reverse(len));
    length_buckets(&sorted, most)
        .into_iter()
        .map(|run| run.len() * sorted[run.start])
        .sum()
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::super::llama::testing::fixtures_dir;
    use super::super::logprobs::Limits;
    use super::*;

    /// Every way to cut `n` items into contiguous runs, by brute force over the cut points.
    fn every_cover(n: usize) -> Vec<Vec<Range<usize>>> {
        (0_u32..1 << (n - 1))
            .map(|mask| {
                let mut runs = Vec::new();
                let mut start = 0;
                for i in 1..n {
                    if mask & (1 << (i - 1)) != 0 {
                        runs.push(start..i);
                        start = i;
                    }
                }
                runs.push(start..n);
                runs
            })
            .collect()
    }

    fn cost(lengths: &[usize], runs: &[Range<usize>]) -> usize {
        runs.iter()
            .map(|run| run.len() * lengths[run.clone()].iter().max().copied().unwrap_or(0))
            .sum()
    }

    #[test]
    fn the_runs_are_the_cheapest_cover_found_by_brute_force() {
        let cases: [&[usize]; 5] = [
            &[90, 88, 40, 39, 38, 12, 11, 3],
            &[50, 50, 50, 50],
            &[300, 20, 19, 18, 17, 16, 15, 2, 1],
            &[7],
            &[64, 63, 33, 32, 31, 30, 9, 8, 8, 1],
        ];
        for lengths in cases {
            for most in 1..=4 {
                let runs = length_buckets(lengths, most);
                let cheapest = every_cover(lengths.len())
                    .into_iter()
                    .filter(|cover| cover.len() <= most)
                    .map(|cover| cost(lengths, &cover))
                    .min()
                    .expect("a cover");

                assert!(runs.len() <= most, "{lengths:?} {most}: {runs:?}");
                assert_eq!(runs.first().map(|r| r.start), Some(0));
                assert_eq!(runs.last().map(|r| r.end), Some(lengths.len()));
                assert!(runs
                    .windows(2)
                    .all(|w| w[0].end == w[1].start && !w[0].is_empty()));
                assert_eq!(
                    cost(lengths, &runs),
                    cheapest,
                    "{lengths:?} {most}: {runs:?}"
                );
            }
        }
        assert!(length_buckets(&[], 3).is_empty());
    }

    #[test]
    fn equal_lengths_stay_in_one_pass() {
        assert_eq!(length_buckets(&[5, 5, 5, 5], 4), vec![0..4]);
        assert_eq!(padded_tokens(&[3, 9, 9, 3], 2), 9 * 2 + 3 * 2);
        assert_eq!(padded_tokens(&[3, 9, 9, 3], 1), 9 * 4);
    }

    fn sequences() -> Vec<Sequence> {
        let lengths = [(3, 2), (12, 9), (1, 1), (7, 4), (2, 11), (5, 5), (20, 3)];
        lengths
            .iter()
            .enumerate()
            .map(|(i, &(prompt, response))| {
                let ids = |n: usize, offset: usize| -> Vec<u32> {
                    (0..n)
                        .map(|k| ((k * 7 + offset + i * 13) % 250) as u32 + 3)
                        .collect()
                };
                Sequence::new(
                    &ids(prompt, 1),
                    &ids(response, 5),
                    i % 2 == 0,
                    2,
                    Limits::NONE,
                )
                .expect("sequence")
            })
            .collect()
    }

    fn gradients(vs: &tch::nn::VarStore) -> Vec<Tensor> {
        vs.trainable_variables()
            .iter()
            .map(|v| v.grad().copy())
            .collect()
    }

    #[test]
    fn bucketed_sums_and_gradients_equal_one_padded_pass() {
        let mut vs = tch::nn::VarStore::new(Device::Cpu);
        vs.set_kind(Kind::Double);
        let model = Llama::from_pretrained(&vs, &fixtures_dir().join("tiny-llama")).expect("load");
        let seqs = sequences();
        let run = |most: usize| {
            vs.trainable_variables().iter().for_each(|v| {
                let mut grad = v.grad();
                if grad.defined() {
                    let _ = grad.zero_();
                }
            });
            let sums =
                bucketed_response_sums(&model, &seqs, 0, Device::Cpu, most, true).expect("sums");
            let weights = Tensor::arange(seqs.len() as i64, (Kind::Double, Device::Cpu));
            (sums.shallow_clone() * weights)
                .sum(Kind::Double)
                .backward();
            (
                Vec::<f64>::try_from(sums.detach()).expect("f64"),
                gradients(&vs),
            )
        };

        let (one_pass, one_grads) = run(1);
        for most in [2, 3, 7] {
            let (bucketed, grads) = run(most);
            for (x, y) in one_pass.iter().zip(&bucketed) {
                assert!((x - y).abs() < 1e-10, "{most}: {x} vs {y}");
            }
            for (x, y) in one_grads.iter().zip(&grads) {
                let gap = (x - y).abs().max().double_value(&[]);
                assert!(gap < 1e-10, "{most}: gradient gap {gap}");
            }
        }

        let no_grad =
            bucketed_response_sums(&model, &seqs, 0, Device::Cpu, 3, false).expect("sums");
        assert!(!no_grad.requires_grad());
        let no_grad = Vec::<f64>::try_from(no_grad).expect("f64");
        assert!(one_pass
            .iter()
            .zip(&no_grad)
            .all(|(x, y)| (x - y).abs() < 1e-10));
    }
}
