//! Summed log-probabilities of responses given their prompts: what the trainer's objectives
//! are built on.
//!
//! A [`Sequence`] is one prompt and one response, tokenized separately and concatenated (no
//! BPE merge across the boundary), after the truncation rules:
//!
//! - the prompt keeps its last `max_prompt_tokens` ids (a left cut);
//! - a response longer than `max_response_tokens` is cut there and counts as truncated;
//! - a response that is not truncated gets the EOS id appended, and the EOS is scored;
//! - a prompt or a response left with no token is an error: never scored as 0.
//!
//! A [`Batch`] right-pads sequences into one tensor. Everything that tells real tokens from
//! padding is derived from the sequences' LENGTHS, never from token ids: the pad id may equal
//! the EOS id, and an EOS-valued token may occur inside a prompt or response. Positions count
//! from 0; attention is causal and masks padded keys, so a sequence scores the same alone or
//! beside longer neighbours.
//!
//! [`response_logprobs`] runs the model and returns, per sequence, the SUM of the response
//! tokens' log-probabilities, with log-softmax computed in fp32 whatever the weights' dtype
//! (in f64 for f64 weights, which finite-difference tests use).
//! Only the positions that predict a response token go through `lm_head`, so prompt logits
//! are never materialized.

use tch::{Device, TchError, Tensor};

use super::llama::{at_least_f32, Llama, ModelError};

/// Why a sequence or batch could not be scored.
#[derive(Debug, thiserror::Error)]
pub enum LogprobError {
    /// The prompt has no token left: nothing to condition the first response token on.
    #[error("the prompt has no token (after truncation to max_prompt_tokens)")]
    EmptyPrompt,
    /// The response has no token to score: empty and truncated, or cut to nothing.
    #[error("the response has no token to score (empty, or truncated to nothing)")]
    NoResponseTokens,
    /// A batch needs at least one sequence.
    #[error("a batch needs at least one sequence")]
    EmptyBatch,
    /// A token id is not in the model's vocabulary.
    #[error("token id {id} is outside the model's vocabulary of {vocab_size}")]
    IdOutOfRange {
        /// The largest id of the batch.
        id: i64,
        /// The model's vocabulary size.
        vocab_size: i64,
    },
    /// Embeddings passed in do not have the batch's shape.
    #[error("the embeddings have shape {found:?}, the batch needs [{b_sz}, {seq_len}, _]")]
    EmbeddingShape {
        /// Their shape.
        found: Vec<i64>,
        /// The batch's size.
        b_sz: i64,
        /// The batch's padded length.
        seq_len: i64,
    },
    /// The model failed.
    #[error("the model failed")]
    Model(#[from] ModelError),
    /// libtorch failed while building the batch or gathering log-probs.
    #[error("libtorch failed while scoring")]
    Torch(#[from] TchError),
}

/// Token limits; the ingest path applies the same ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A longer prompt keeps its last this many ids.
    pub max_prompt_tokens: usize,
    /// A longer response is cut to this many ids and gets no EOS.
    pub max_response_tokens: usize,
}

impl Limits {
    /// No limit on either side.
    pub const NONE: Limits = Limits {
        max_prompt_tokens: usize::MAX,
        max_response_tokens: usize::MAX,
    };
}

/// One prompt and response, truncated, ready to score.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    ids: Vec<i64>,
    prompt_len: usize,
    truncated: bool,
}

impl Sequence {
    /// Applies the truncation rules (module docs) to separately tokenized `prompt` and
    /// `response`. `truncated` says the response was already cut upstream (no EOS then).
    pub fn new(
        prompt: &[u32],
        response: &[u32],
        truncated: bool,
        eos_id: u32,
        limits: Limits,
    ) -> Result<Self, LogprobError> {
        let prompt = &prompt[prompt.len().saturating_sub(limits.max_prompt_tokens)..];
        let cut = response.len() > limits.max_response_tokens;
        let response = &response[..response.len().min(limits.max_response_tokens)];
        let truncated = truncated || cut;
        if prompt.is_empty() {
            return Err(LogprobError::EmptyPrompt);
        }

        let eos = (!truncated).then_some(eos_id);
        let ids: Vec<i64> = prompt
            .iter()
            .chain(response)
            .chain(eos.as_ref())
            .map(|&id| i64::from(id))
            .collect();
        if ids.len() == prompt.len() {
            return Err(LogprobError::NoResponseTokens);
        }
        Ok(Self {
            ids,
            prompt_len: prompt.len(),
            truncated,
        })
    }

    /// Prompt ids then scored response ids (EOS included when not truncated).
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    /// How many ids are the prompt's.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// How many response tokens are scored (at least 1).
    pub fn response_len(&self) -> usize {
        self.ids.len() - self.prompt_len
    }

    /// Whether the response was cut (and so has no EOS).
    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

/// Sequences right-padded into one batch, with what scoring needs, all from lengths.
#[derive(Debug)]
pub struct Batch {
    /// `[b, t]` int64; padding holds the pad id, which nothing reads.
    input_ids: Tensor,
    /// `[b, t]` bool, true on real tokens.
    key_padding: Tensor,
    /// `[n]` int64: flat index `row * t + k` of each position `k` that predicts a response
    /// token.
    positions: Tensor,
    /// `[n]` int64: the id each of those positions predicts (the id at `k + 1`).
    targets: Tensor,
    /// `[n]` int64: the row each of those positions belongs to.
    rows: Tensor,
    counts: Vec<i64>,
    max_id: i64,
}

impl Batch {
    /// Right-pads `sequences` with `pad_id` onto `device`.
    pub fn new(sequences: &[Sequence], pad_id: u32, device: Device) -> Result<Self, LogprobError> {
        let seq_len = sequences
            .iter()
            .map(|s| s.ids.len())
            .max()
            .ok_or(LogprobError::EmptyBatch)?;
        let b_sz = sequences.len();
        let mut input_ids = vec![i64::from(pad_id); b_sz * seq_len];
        let mut key_padding = vec![false; b_sz * seq_len];
        let (mut positions, mut targets, mut rows) = (Vec::new(), Vec::new(), Vec::new());

        for (row, seq) in sequences.iter().enumerate() {
            let start = row * seq_len;
            input_ids[start..start + seq.ids.len()].copy_from_slice(&seq.ids);
            key_padding[start..start + seq.ids.len()].fill(true);
            // Position k predicts token k + 1: the response starts at prompt_len.
            for k in seq.prompt_len - 1..seq.ids.len() - 1 {
                positions.push((start + k) as i64);
                targets.push(seq.ids[k + 1]);
                rows.push(row as i64);
            }
        }

        let shape = [b_sz as i64, seq_len as i64];
        let on_device = |t: Tensor| t.f_to_device(device);
        Ok(Self {
            input_ids: on_device(Tensor::f_from_slice(&input_ids)?.f_reshape(shape)?)?,
            key_padding: on_device(Tensor::f_from_slice(&key_padding)?.f_reshape(shape)?)?,
            positions: on_device(Tensor::f_from_slice(&positions)?)?,
            targets: on_device(Tensor::f_from_slice(&targets)?)?,
            rows: on_device(Tensor::f_from_slice(&rows)?)?,
            counts: sequences.iter().map(|s| s.response_len() as i64).collect(),
            max_id: input_ids.iter().copied().max().unwrap_or(0),
        })
    }

    /// `[b, t]` int64 input ids, right-padded.
    pub fn input_ids(&self) -> &Tensor {
        &self.input_ids
    }

    /// `[b, t]` bool, true on real tokens.
    pub fn key_padding(&self) -> &Tensor {
        &self.key_padding
    }

    /// How many response tokens each sequence sums.
    pub fn counts(&self) -> &[i64] {
        &self.counts
    }

    /// How many sequences.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Never true: a batch holds at least one sequence.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// Per-sequence response log-probabilities.
#[derive(Debug)]
pub struct ResponseLogprobs {
    /// `[b]` fp32 (f64 for an f64 model): the sum of each sequence's response-token
    /// log-probabilities; carries the autograd graph when computed with gradients.
    pub sums: Tensor,
    /// How many tokens each sum adds up (response tokens, EOS included when not truncated).
    pub counts: Vec<i64>,
}

/// Scores `batch` with `model`. Gradients flow to the model's trainable variables unless the
/// caller is in a no-grad scope; see [`response_logprobs_no_grad`] for reference scoring.
pub fn response_logprobs(model: &Llama, batch: &Batch) -> Result<ResponseLogprobs, LogprobError> {
    // Checked on the host: an out-of-range id is a device-side assert on CUDA.
    check_vocab(model, batch)?;
    response_logprobs_from_embeds(model, batch, &model.embed(&batch.input_ids)?)
}

fn check_vocab(model: &Llama, batch: &Batch) -> Result<(), LogprobError> {
    let vocab_size = model.config().vocab_size;
    match batch.max_id < vocab_size {
        true => Ok(()),
        false => Err(LogprobError::IdOutOfRange {
            id: batch.max_id,
            vocab_size,
        }),
    }
}

/// [`response_logprobs`] without building an autograd graph (reference model, evaluation).
pub fn response_logprobs_no_grad(
    model: &Llama,
    batch: &Batch,
) -> Result<ResponseLogprobs, LogprobError> {
    tch::no_grad(|| response_logprobs(model, batch))
}

/// Scores `batch` from input embeddings `[b, t, hidden]`, such as `model.embed(batch.
/// input_ids())` detached and set to require gradients, so an objective can differentiate
/// with respect to the embeddings.
pub fn response_logprobs_from_embeds(
    model: &Llama,
    batch: &Batch,
    embeds: &Tensor,
) -> Result<ResponseLogprobs, LogprobError> {
    check_vocab(model, batch)?;
    let (b_sz, seq_len) = batch.input_ids.size2()?;
    let found = embeds.size();
    if found.len() != 3 || found[..2] != [b_sz, seq_len] {
        return Err(LogprobError::EmbeddingShape {
            found,
            b_sz,
            seq_len,
        });
    }

    let logprobs = predicting_logprobs(model, batch, embeds)?
        .f_gather(1, &batch.targets.f_unsqueeze(1)?, false)?
        .f_squeeze_dim(1)?;

    let zeros = Tensor::f_zeros([b_sz], (logprobs.kind(), logprobs.device()))?;
    let sums = zeros.f_index_add(0, &batch.rows, &logprobs)?;
    Ok(ResponseLogprobs {
        sums,
        counts: batch.counts.clone(),
    })
}

/// `Σ KL(p(·|context) ‖ q(·|context))` over every position of `batch` that predicts a
/// response token, and how many positions that is: how far `q` moved from `p` where it
/// matters. Without gradients; fp32 whatever the weights' dtype.
pub fn response_token_kl(p: &Llama, q: &Llama, batch: &Batch) -> Result<(f64, i64), LogprobError> {
    check_vocab(p, batch)?;
    check_vocab(q, batch)?;
    tch::no_grad(|| {
        let log_p = predicting_logprobs(p, batch, &p.embed(&batch.input_ids)?)?;
        let log_q = predicting_logprobs(q, batch, &q.embed(&batch.input_ids)?)?;
        let kl = log_p
            .f_exp()?
            .f_mul(&log_p.f_sub(&log_q)?)?
            .f_sum(tch::Kind::Double)?;
        Ok((f64::try_from(kl)?, batch.positions.size()[0]))
    })
}

/// `[n, vocab]` log-probabilities (fp32, or f64 for an f64 model) at the positions of `batch`
/// that predict response tokens, from input embeddings `[b, t, hidden]`.
fn predicting_logprobs(
    model: &Llama,
    batch: &Batch,
    embeds: &Tensor,
) -> Result<Tensor, LogprobError> {
    let (b_sz, seq_len) = batch.input_ids.size2()?;
    let hidden = model.hidden_states(embeds, Some(&batch.key_padding))?;
    let width = hidden.size().last().copied().unwrap_or(0);
    let predicting = hidden
        .f_reshape([b_sz * seq_len, width])?
        .f_index_select(0, &batch.positions)?;
    let kind = at_least_f32(predicting.kind());
    let logits = model.logits(&predicting)?.f_to_kind(kind)?;
    Ok(logits.f_log_softmax(-1, kind)?)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use tch::nn::VarStore;
    use tch::Kind;

    use super::super::llama::testing::{fixtures_dir, tiny_llama};
    use super::*;

    const TOLERANCE: f64 = 1e-4;

    #[derive(Debug, Deserialize)]
    struct Case {
        name: String,
        prompt_ids: Vec<u32>,
        response_ids: Vec<u32>,
        truncated: bool,
        max_prompt_tokens: Option<usize>,
        max_response_tokens: Option<usize>,
        expected: Option<Expected>,
    }

    #[derive(Debug, Deserialize)]
    struct Expected {
        prompt_ids: Vec<i64>,
        scored_ids: Vec<i64>,
        truncated: bool,
        token_count: i64,
        logprob_sum: f64,
    }

    #[derive(Debug, Deserialize)]
    struct Reference {
        eos_token_id: u32,
        pad_token_id: u32,
        cases: Vec<Case>,
    }

    fn reference() -> Reference {
        let path = fixtures_dir().join("tiny-llama/logprob_reference.json");
        let text = std::fs::read_to_string(&path).expect("the reference exists");
        serde_json::from_str(&text).expect("the reference parses")
    }

    fn sequence(case: &Case, eos_id: u32) -> Result<Sequence, LogprobError> {
        let limits = Limits {
            max_prompt_tokens: case.max_prompt_tokens.unwrap_or(usize::MAX),
            max_response_tokens: case.max_response_tokens.unwrap_or(usize::MAX),
        };
        Sequence::new(
            &case.prompt_ids,
            &case.response_ids,
            case.truncated,
            eos_id,
            limits,
        )
    }

    /// The scorable cases, checked against the reference's truncation, with their expectations.
    fn scorable(reference: &Reference) -> Vec<(Sequence, &Case, &Expected)> {
        let mut out = Vec::new();
        for case in &reference.cases {
            let result = sequence(case, reference.eos_token_id);
            let Some(expected) = &case.expected else {
                let error = result.expect_err(&case.name);
                assert!(
                    matches!(error, LogprobError::NoResponseTokens),
                    "{}: {error}",
                    case.name
                );
                continue;
            };
            let seq = result.unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let (prompt, scored) = seq.ids().split_at(seq.prompt_len());
            assert_eq!(prompt, expected.prompt_ids, "{}: prompt", case.name);
            assert_eq!(scored, expected.scored_ids, "{}: scored ids", case.name);
            assert_eq!(seq.truncated(), expected.truncated, "{}", case.name);
            out.push((seq, case, expected));
        }
        out
    }

    fn score(model: &Llama, sequences: &[Sequence], pad_id: u32) -> (Vec<f64>, Vec<i64>) {
        let batch = Batch::new(sequences, pad_id, Device::Cpu).expect("batch");
        let scored = response_logprobs_no_grad(model, &batch).expect("score");
        let sums = Vec::<f64>::try_from(scored.sums.to_kind(Kind::Double)).expect("sums");
        (sums, scored.counts)
    }

    fn assert_matches(name: &str, found: (f64, i64), expected: &Expected) {
        assert_eq!(found.1, expected.token_count, "{name}: token count");
        let diff = (found.0 - expected.logprob_sum).abs();
        assert!(
            diff <= TOLERANCE,
            "{name}: {} vs {} (off by {diff})",
            found.0,
            expected.logprob_sum
        );
    }

    #[test]
    fn every_case_matches_transformers_alone() {
        let reference = reference();
        let (_vs, model) = tiny_llama();
        for (seq, case, expected) in scorable(&reference) {
            let (sums, counts) = score(&model, std::slice::from_ref(&seq), reference.pad_token_id);
            assert_matches(&case.name, (sums[0], counts[0]), expected);
        }
    }

    #[test]
    fn every_case_matches_transformers_in_one_padded_batch() {
        let reference = reference();
        assert_eq!(
            reference.pad_token_id, reference.eos_token_id,
            "the fixture pads with EOS"
        );
        let (_vs, model) = tiny_llama();
        let cases = scorable(&reference);
        let lengths: Vec<usize> = cases.iter().map(|(s, ..)| s.ids().len()).collect();
        assert!(
            lengths.iter().min() < lengths.iter().max(),
            "the batch must need padding"
        );

        let sequences: Vec<Sequence> = cases.iter().map(|(s, ..)| s.clone()).collect();
        let (sums, counts) = score(&model, &sequences, reference.pad_token_id);
        for (i, (_, case, expected)) in cases.iter().enumerate() {
            assert_matches(&case.name, (sums[i], counts[i]), expected);
        }
    }

    #[test]
    fn padding_with_any_id_changes_nothing() {
        let reference = reference();
        let (_vs, model) = tiny_llama();
        let sequences: Vec<Sequence> = scorable(&reference).into_iter().map(|c| c.0).collect();
        let (with_eos, _) = score(&model, &sequences, reference.pad_token_id);
        let (with_other, _) = score(&model, &sequences, 137);
        for (a, b) in with_eos.iter().zip(&with_other) {
            assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn gradients_flow_to_weights_and_to_input_embeddings() {
        let reference = reference();
        let (vs, model) = tiny_llama();
        let sequences: Vec<Sequence> = scorable(&reference)
            .into_iter()
            .take(3)
            .map(|c| c.0)
            .collect();
        let batch = Batch::new(&sequences, reference.pad_token_id, Device::Cpu).expect("batch");

        let scored = response_logprobs(&model, &batch).expect("score");
        assert!(scored.sums.requires_grad());
        scored.sums.sum(Kind::Float).backward();
        let grads = vs.trainable_variables();
        assert!(
            grads.iter().all(|v| v.grad().defined()),
            "every weight gets a gradient"
        );
        assert!(!response_logprobs_no_grad(&model, &batch)
            .expect("score")
            .sums
            .requires_grad());

        let embeds = tch::no_grad(|| model.embed(batch.input_ids()))
            .expect("embed")
            .set_requires_grad(true);
        let from_embeds = response_logprobs_from_embeds(&model, &batch, &embeds).expect("score");
        assert!(from_embeds
            .sums
            .allclose(&scored.sums.detach(), 1e-6, 1e-6, false));
        from_embeds.sums.sum(Kind::Float).backward();
        let grad = embeds.grad();
        assert_eq!(grad.size(), embeds.size());
        assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn bf16_weights_score_in_fp32_close_to_f32() {
        let reference = reference();
        let (vs, model) = tiny_llama();
        let dir = tempfile::tempdir().expect("tempdir");
        model
            .save_pretrained(&vs, dir.path(), super::super::weights::SaveDtype::BF16)
            .expect("save");
        let mut bf16_vs = VarStore::new(Device::Cpu);
        bf16_vs.set_kind(Kind::BFloat16);
        let bf16 = Llama::from_pretrained(&bf16_vs, dir.path()).expect("load");

        let cases = scorable(&reference);
        let sequences: Vec<Sequence> = cases.iter().map(|(s, ..)| s.clone()).collect();
        let batch = Batch::new(&sequences, reference.pad_token_id, Device::Cpu).expect("batch");
        let scored = response_logprobs_no_grad(&bf16, &batch).expect("score");
        assert_eq!(scored.sums.kind(), Kind::Float);
        let sums = Vec::<f64>::try_from(scored.sums.to_kind(Kind::Double)).expect("sums");
        for (i, (_, case, expected)) in cases.iter().enumerate() {
            let per_token = (sums[i] - expected.logprob_sum).abs() / expected.token_count as f64;
            assert!(
                per_token < 0.05,
                "{}: {} vs {}",
                case.name,
                sums[i],
                expected.logprob_sum
            );
        }
    }

    #[test]
    fn truncation_rules() {
        let limits = Limits {
            max_prompt_tokens: 3,
            max_response_tokens: 2,
        };
        let seq = Sequence::new(&[1, 2, 3, 4, 5], &[6, 7], false, 0, limits).expect("fits");
        assert_eq!(seq.ids(), [3, 4, 5, 6, 7, 0]);
        assert_eq!(
            (seq.prompt_len(), seq.response_len(), seq.truncated()),
            (3, 3, false)
        );

        let seq = Sequence::new(&[1], &[6, 7, 8], false, 0, limits).expect("cut");
        assert_eq!(seq.ids(), [1, 6, 7]);
        assert!(seq.truncated());

        let seq = Sequence::new(&[1], &[6], true, 0, limits).expect("cut upstream");
        assert_eq!(seq.ids(), [1, 6]);

        let seq = Sequence::new(&[1], &[], false, 9, limits).expect("the EOS alone is scored");
        assert_eq!(seq.ids(), [1, 9]);
    }

    #[test]
    fn nothing_to_score_is_an_error_never_zero() {
        let none = Limits {
            max_prompt_tokens: 4,
            max_response_tokens: 0,
        };
        assert!(matches!(
            Sequence::new(&[1, 2], &[3, 4], false, 0, none),
            Err(LogprobError::NoResponseTokens)
        ));
        assert!(matches!(
            Sequence::new(&[1, 2], &[], true, 0, Limits::NONE),
            Err(LogprobError::NoResponseTokens)
        ));
        assert!(matches!(
            Sequence::new(&[], &[3], false, 0, Limits::NONE),
            Err(LogprobError::EmptyPrompt)
        ));
        let no_prompt = Limits {
            max_prompt_tokens: 0,
            max_response_tokens: 4,
        };
        assert!(matches!(
            Sequence::new(&[1, 2], &[3], false, 0, no_prompt),
            Err(LogprobError::EmptyPrompt)
        ));
        assert!(matches!(
            Batch::new(&[], 0, Device::Cpu),
            Err(LogprobError::EmptyBatch)
        ));
    }

    #[test]
    fn masks_come_from_lengths_not_ids() {
        // EOS = pad = 0, and 0 occurs inside the prompt and the response.
        let a = Sequence::new(&[5, 0, 6], &[0, 7], false, 0, Limits::NONE).expect("a");
        let b = Sequence::new(&[5], &[8], false, 0, Limits::NONE).expect("b");
        let batch = Batch::new(&[a, b], 0, Device::Cpu).expect("batch");
        let mask = Vec::<Vec<bool>>::try_from(batch.key_padding()).expect("mask");
        assert_eq!(
            mask,
            [vec![true; 6], vec![true, true, true, false, false, false]]
        );
        assert_eq!(batch.counts(), [3, 2]);
        let ids = Vec::<Vec<i64>>::try_from(batch.input_ids()).expect("ids");
        assert_eq!(ids, [vec![5, 0, 6, 0, 7, 0], vec![5, 8, 0, 0, 0, 0]]);
    }

    #[test]
    fn ids_outside_the_vocabulary_are_errors() {
        let (_vs, model) = tiny_llama();
        let seq = Sequence::new(&[1, 2], &[512], false, 0, Limits::NONE).expect("seq");
        let batch = Batch::new(&[seq], 0, Device::Cpu).expect("batch");
        assert!(matches!(
            response_logprobs(&model, &batch),
            Err(LogprobError::IdOutOfRange {
                id: 512,
                vocab_size: 512
            })
        ));
    }
}
