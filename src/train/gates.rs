//! What a candidate version must pass before it becomes `latest`: finite weights, held-out
//! implicit-reward accuracy no worse than the latest's by more than `max_accuracy_drop`, and
//! a mean per-token KL to the latest of at most `max_kl`.
//!
//! Held-out events are chosen by a hash of their id, so every rank and every restart agrees
//! on them without coordination, and the trainer never samples them.

use tch::nn::VarStore;
use tch::Device;

use crate::model::llama::Llama;
use crate::model::logprobs::{response_token_kl, Batch, LogprobError, Sequence};

/// The gates' names, in the order [`judge`] reports them.
pub const GATE_NAMES: [&str; 3] = ["finite_weights", "heldout_accuracy", "kl_to_latest"];

/// Whether the event `id` belongs to the held-out slice of share `fraction` (FNV-1a of the
/// id's bytes, as a fraction of 2⁶⁴).
pub fn is_held_out(id: &str, fraction: f64) -> bool {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = id
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash as f64) < fraction * (u64::MAX as f64)
}

/// Implicit-reward agreement of a policy with the users on some pairs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImplicitReward {
    /// Share of pairs whose implicit reward difference has the sign of the users' (an exact
    /// tie counts one half).
    pub accuracy: f64,
    /// Mean implicit reward margin toward the response the users preferred.
    pub mean_margin: f64,
    /// Pairs counted: those with a non-zero reward difference.
    pub pairs: usize,
}

/// Scores pairs: `policy[i]` and `reference[i]` are `(log π(a), log π(b))` of pair i under
/// the policy and the reference, `reward_diffs[i]` the users' `r(a) − r(b)`. The implicit
/// reward of a response is `log π(y) − log π_ref(y)`. `None` when no pair has a preference.
pub fn implicit_reward(
    policy: &[(f64, f64)],
    reference: &[(f64, f64)],
    reward_diffs: &[f64],
) -> Option<ImplicitReward> {
    let mut correct = 0.0;
    let mut margin_sum = 0.0;
    let mut pairs = 0;
    for ((&(pa, pb), &(ra, rb)), &diff) in policy.iter().zip(reference).zip(reward_diffs) {
        if diff == 0.0 || !diff.is_finite() {
            continue;
        }
        let margin = diff.signum() * ((pa - ra) - (pb - rb));
        correct += match margin {
            m if m > 0.0 => 1.0,
            0.0 => 0.5,
            _ => 0.0,
        };
        margin_sum += margin;
        pairs += 1;
    }
    (pairs > 0).then(|| ImplicitReward {
        accuracy: correct / pairs as f64,
        mean_margin: margin_sum / pairs as f64,
        pairs,
    })
}

/// Whether every variable of `vs` is finite.
pub fn all_finite(vs: &VarStore) -> Result<bool, tch::TchError> {
    for (_, var) in vs.variables() {
        let finite = var.f_isfinite()?.f_all()?;
        if !bool::try_from(finite)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Mean per-token KL from `from` to `to` over the response tokens of `sequences`, `micro`
/// sequences at a time; `None` when there is no sequence, or when `stop` said so before a
/// micro-batch.
pub fn mean_token_kl(
    from: &Llama,
    to: &Llama,
    sequences: &[Sequence],
    pad_id: u32,
    micro: usize,
    device: Device,
    stop: impl Fn() -> bool,
) -> Result<Option<f64>, LogprobError> {
    let (mut total, mut count) = (0.0, 0i64);
    for chunk in sequences.chunks(micro.max(1)) {
        if stop() {
            return Ok(None);
        }
        let batch = Batch::new(chunk, pad_id, device)?;
        let (sum, n) = response_token_kl(from, to, &batch)?;
        total += sum;
        count += n;
    }
    Ok((count > 0).then(|| total / count as f64))
}

/// One gate's verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// `finite_weights`, `heldout_accuracy` or `kl_to_latest`.
    pub name: &'static str,
    /// Whether it passed.
    pub passed: bool,
    /// The measured value (NaN when not measured).
    pub value: f64,
    /// The bound it was held to (NaN when none applies).
    pub threshold: f64,
    /// One line for operators.
    pub detail: String,
}

/// The bounds of [`judge`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bounds {
    /// Largest allowed fall of held-out accuracy below the latest's.
    pub max_accuracy_drop: f64,
    /// Largest allowed mean per-token KL to the latest.
    pub max_kl: f64,
}

/// What was measured of a candidate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// Every weight finite.
    pub finite: bool,
    /// The candidate's held-out agreement.
    pub candidate: Option<ImplicitReward>,
    /// The latest version's, on the same pairs.
    pub latest: Option<ImplicitReward>,
    /// Mean per-token KL from the latest to the candidate on held-out prompts.
    pub kl_to_latest: Option<f64>,
}

/// The gates' verdicts. A gate with nothing to compare (no latest yet, no held-out pair with
/// a preference) passes and says why.
pub fn judge(measured: &Measured, bounds: Bounds) -> Vec<Verdict> {
    let finite = Verdict {
        name: GATE_NAMES[0],
        passed: measured.finite,
        value: if measured.finite { 1.0 } else { 0.0 },
        threshold: 1.0,
        detail: match measured.finite {
            true => "every weight is finite".into(),
            false => "a weight is NaN or infinite".into(),
        },
    };
    vec![
        finite,
        accuracy_verdict(measured, bounds),
        kl_verdict(measured, bounds),
    ]
}

fn accuracy_verdict(measured: &Measured, bounds: Bounds) -> Verdict {
    let name = GATE_NAMES[1];
    match (measured.candidate, measured.latest) {
        (Some(candidate), Some(latest)) => {
            let floor = latest.accuracy - bounds.max_accuracy_drop;
            let passed = candidate.accuracy >= floor;
            Verdict {
                name,
                passed,
                value: candidate.accuracy,
                threshold: floor,
                detail: format!(
                    "accuracy {:.4} on {} held-out pairs against the latest's {:.4} (floor {:.4})",
                    candidate.accuracy, candidate.pairs, latest.accuracy, floor
                ),
            }
        }
        (Some(candidate), None) => Verdict {
            name,
            passed: true,
            value: candidate.accuracy,
            threshold: f64::NAN,
            detail: "no latest version to compare with".into(),
        },
        (None, _) => Verdict {
            name,
            passed: true,
            value: f64::NAN,
            threshold: f64::NAN,
            detail: "no held-out pair with a preference yet".into(),
        },
    }
}

fn kl_verdict(measured: &Measured, bounds: Bounds) -> Verdict {
    let name = GATE_NAMES[2];
    match measured.kl_to_latest {
        Some(kl) => Verdict {
            name,
            passed: kl <= bounds.max_kl,
            value: kl,
            threshold: bounds.max_kl,
            detail: format!(
                "mean per-token KL {kl:.6} to the latest (at most {})",
                bounds.max_kl
            ),
        },
        None => Verdict {
            name,
            passed: true,
            value: f64::NAN,
            threshold: bounds.max_kl,
            detail: "no latest version or no held-out prompt to compare on".into(),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on a broken expectation
mod tests {
    use tch::{Kind, Tensor};

    use super::*;
    use crate::model::llama::testing::tiny_llama;
    use crate::model::logprobs::Limits;

    #[test]
    fn the_held_out_share_matches_the_fraction_and_is_stable() {
        let ids: Vec<String> = (0..20_000).map(|i| format!("event-{i}")).collect();
        let held = ids.iter().filter(|id| is_held_out(id, 0.1)).count();
        // Binomial(20000, 0.1): sd ≈ 42; six sd either side.
        assert!((1_750..=2_250).contains(&held), "{held}");
        assert!(ids.iter().all(|id| !is_held_out(id, 0.0)));
        assert!(ids.iter().all(|id| is_held_out(id, 1.0)));
        let again = ids.iter().filter(|id| is_held_out(id, 0.1)).count();
        assert_eq!(held, again);
    }

    #[test]
    fn implicit_reward_counts_sign_agreement_and_signed_margins() {
        // Pair 0: a preferred, policy moved toward a by 0.5 - (-0.25) = 0.75: correct.
        // Pair 1: b preferred (diff < 0), margin -( (0.0) - (1.0) ) = 1.0: correct.
        // Pair 2: a preferred, no movement: a tie, one half.
        // Pair 3: no preference: left out.
        let policy = [(-1.5, -3.25), (-2.0, -1.0), (-1.0, -1.0), (-9.0, 0.0)];
        let reference = [(-2.0, -3.0), (-2.0, -2.0), (-1.0, -1.0), (0.0, 0.0)];
        let diffs = [1.0, -0.5, 2.0, 0.0];
        let scored = implicit_reward(&policy, &reference, &diffs).unwrap();
        assert_eq!(scored.pairs, 3);
        assert!((scored.accuracy - 2.5 / 3.0).abs() < 1e-12);
        assert!((scored.mean_margin - (0.75 + 1.0 + 0.0) / 3.0).abs() < 1e-12);
        assert_eq!(
            implicit_reward(&policy[3..], &reference[3..], &diffs[3..]),
            None
        );
    }

    #[test]
    fn verdicts_hold_the_candidate_to_the_latest() {
        let bounds = Bounds {
            max_accuracy_drop: 0.05,
            max_kl: 0.1,
        };
        let at = |accuracy| {
            Some(ImplicitReward {
                accuracy,
                mean_margin: 0.0,
                pairs: 10,
            })
        };
        let measured = Measured {
            finite: true,
            candidate: at(0.6),
            latest: at(0.7),
            kl_to_latest: Some(0.2),
        };
        let verdicts = judge(&measured, bounds);
        let passed: Vec<bool> = verdicts.iter().map(|v| v.passed).collect();
        assert_eq!(passed, vec![true, false, false]);

        let within = Measured {
            candidate: at(0.66),
            kl_to_latest: Some(0.1),
            ..measured
        };
        assert!(judge(&within, bounds).iter().all(|v| v.passed));
        let first = Measured {
            finite: false,
            candidate: None,
            latest: None,
            kl_to_latest: None,
        };
        let passed: Vec<bool> = judge(&first, bounds).iter().map(|v| v.passed).collect();
        assert_eq!(passed, vec![false, true, true]);
    }

    /// KL at each response position computed the long way: full logits of both models, one
    /// position at a time.
    fn kl_by_positions(p: &Llama, q: &Llama, seq: &Sequence) -> (f64, i64) {
        let ids = Tensor::from_slice(seq.ids()).unsqueeze(0);
        let lp = p.forward(&ids, None).unwrap().log_softmax(-1, Kind::Double);
        let lq = q.forward(&ids, None).unwrap().log_softmax(-1, Kind::Double);
        let mut total = 0.0;
        let mut count = 0;
        for k in seq.prompt_len() - 1..seq.ids().len() - 1 {
            let a = lp.get(0).get(k as i64);
            let b = lq.get(0).get(k as i64);
            total += f64::try_from((a.exp() * (&a - &b)).sum(Kind::Double)).unwrap();
            count += 1;
        }
        (total, count)
    }

    #[test]
    fn mean_token_kl_matches_a_position_by_position_sum() {
        let (p_vs, p) = tiny_llama();
        let (q_vs, q) = tiny_llama();
        tch::no_grad(|| {
            for (_, var) in q_vs.variables() {
                let noise = var.randn_like() * 0.02;
                let _ = var.shallow_clone().g_add_(&noise);
            }
        });
        let limits = Limits {
            max_prompt_tokens: 64,
            max_response_tokens: 64,
        };
        let seqs = vec![
            Sequence::new(&[5, 6, 7], &[8, 9], false, 0, limits).unwrap(),
            Sequence::new(&[11, 12, 13, 14, 15], &[16], false, 0, limits).unwrap(),
        ];
        let (mut total, mut count) = (0.0, 0);
        for seq in &seqs {
            let (t, c) = tch::no_grad(|| kl_by_positions(&p, &q, seq));
            total += t;
            count += c;
        }
        let expected = total / count as f64;

        let kl = mean_token_kl(&p, &q, &seqs, 0, 1, Device::Cpu, || false)
            .unwrap()
            .unwrap();
        assert!(expected > 1e-6, "the perturbation must move the model");
        assert!(
            (kl - expected).abs() < 1e-5 * expected.max(1.0),
            "{kl} vs {expected}"
        );
        let same = mean_token_kl(&p, &p, &seqs, 0, 2, Device::Cpu, || false)
            .unwrap()
            .unwrap();
        assert!(same.abs() < 1e-9, "{same}");
        assert!(all_finite(&p_vs).unwrap());
    }
}
