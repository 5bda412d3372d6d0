//! Text generation with the policy: the prompt through the chat template (with the generation
//! prompt), then one token at a time over a KV cache, greedy or sampled with temperature and
//! nucleus (top-p) filtering, until a stop id, a token budget or the context's end.
//!
//! The prompt is run once; every later step feeds only the token just chosen, whose keys and
//! values are appended to the cache ([`Llama::forward_cached`]). Sampling draws from a seeded
//! generator on the host, so a seed gives the same text on every run.

use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tch::nn::VarStore;
use tch::{Device, Kind, TchError, Tensor};

use super::llama::{Llama, ModelError};
use super::tokenizer::{PolicyTokenizer, TokenizerError};
use crate::event::Content;

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The model could not be loaded or run.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer could not be loaded, or could not render, encode or decode.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// libtorch failed while picking a token.
    #[error("libtorch failed while sampling")]
    Torch(#[from] TchError),
    /// A sampling setting is out of range.
    #[error("invalid sampling setting: {0}")]
    Setting(String),
    /// The prompt encodes to no token.
    #[error("the prompt has no tokens")]
    EmptyPrompt,
    /// The prompt leaves no room in the model's context.
    #[error("the prompt has {tokens} tokens; the model's context holds {max}")]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// `max_position_embeddings`.
        max: i64,
    },
}

/// How tokens are chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// The most tokens generated (the stop id not counted).
    pub max_new_tokens: usize,
    /// Divides the logits before sampling; 0 is greedy decoding (the most likely token).
    pub temperature: f64,
    /// Nucleus sampling: only the most likely tokens whose probabilities add up to `top_p`
    /// are drawn from (the single most likely one at least); 1 keeps all.
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Sampling {
    /// Greedy decoding of at most `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// Checks the ranges: temperature finite and ≥ 0, top-p in (0, 1].
    pub fn validate(&self) -> Result<(), GenerateError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            let t = self.temperature;
            return Err(GenerateError::Setting(format!(
                "temperature {t} is not a finite number ≥ 0"
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            let p = self.top_p;
            return Err(GenerateError::Setting(format!(
                "top-p {p} is not in (0, 1]"
            )));
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The model chose this stop id.
    Eos(u32),
    /// `max_new_tokens` were generated.
    MaxNewTokens,
    /// The context is full.
    ContextFull,
}

/// Generated ids, the stop id excluded, and why generation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    /// The new ids.
    pub ids: Vec<u32>,
    /// Why it ended.
    pub stop: Stop,
}

/// Continues `prompt` (ids) until one of `eos_ids`, `sampling.max_new_tokens` or the end of
/// the model's context.
pub fn generate_ids(
    model: &Llama,
    prompt: &[u32],
    eos_ids: &[u32],
    sampling: &Sampling,
) -> Result<Generated, GenerateError> {
    sampling.validate()?;
    let max = model.config().max_position_embeddings;
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if prompt.len() as i64 >= max {
        return Err(GenerateError::PromptTooLong {
            tokens: prompt.len(),
            max,
        });
    }
    tch::no_grad(|| decode(model, prompt, eos_ids, sampling))
}

fn decode(
    model: &Llama,
    prompt: &[u32],
    eos_ids: &[u32],
    sampling: &Sampling,
) -> Result<Generated, GenerateError> {
    let device = model.device();
    let max = model.config().max_position_embeddings;
    let mut rng = SmallRng::seed_from_u64(sampling.seed);
    let mut cache = model.new_cache();
    let mut input = ids_tensor(prompt, device)?;
    let mut ids = Vec::new();
    while ids.len() < sampling.max_new_tokens {
        if cache.len() + input.size()[1] > max {
            return Ok(Generated {
                ids,
                stop: Stop::ContextFull,
            });
        }
        let logits = model.forward_cached(&input, &mut cache)?;
        let last = logits.f_select(1, -1)?.f_select(0, 0)?;
        let next = pick(&last, sampling, &mut rng)?;
        if eos_ids.contains(&next) {
            return Ok(Generated {
                ids,
                stop: Stop::Eos(next),
            });
        }
        ids.push(next);
        input = ids_tensor(&[next], device)?;
    }
    Ok(Generated {
        ids,
        stop: Stop::MaxNewTokens,
    })
}

fn ids_tensor(ids: &[u32], device: Device) -> Result<Tensor, TchError> {
    let ids: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
    Tensor::f_from_slice(&ids)?
        .f_reshape([1, -1])?
        .f_to_device(device)
}

/// Chooses the next id from one row of logits `[vocab]`.
fn pick(logits: &Tensor, sampling: &Sampling, rng: &mut SmallRng) -> Result<u32, GenerateError> {
    let logits = logits.f_to_kind(Kind::Float)?;
    if sampling.temperature == 0.0 {
        return Ok(logits.f_argmax(0, false)?.int64_value(&[]) as u32);
    }
    let probs = logits
        .f_div_scalar(sampling.temperature)?
        .f_softmax(0, Kind::Float)?
        .f_to_device(Device::Cpu)?;
    let probs = Vec::<f32>::try_from(probs)?;
    Ok(sample_top_p(&probs, sampling.top_p, rng.random::<f64>()))
}

/// Draws from `probs` restricted to its nucleus: the most likely ids, in decreasing order,
/// up to and including the one whose cumulative probability reaches `top_p`. `u` is a
/// uniform draw in [0, 1).
pub fn sample_top_p(probs: &[f32], top_p: f64, u: f64) -> u32 {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut nucleus = Vec::new();
    let mut mass = 0.0f64;
    for &id in &order {
        nucleus.push(id);
        mass += f64::from(probs[id]);
        if mass >= top_p {
            break;
        }
    }
    let mut target = u * mass;
    for &id in &nucleus {
        target -= f64::from(probs[id]);
        if target < 0.0 {
            return id as u32;
        }
    }
    nucleus.last().copied().unwrap_or(0) as u32
}

/// What [`Policy::generate`] returns.
#[derive(Clone, Debug)]
pub struct Generation {
    /// The prompt as the chat template rendered it.
    pub prompt: String,
    /// The generated ids, the stop id excluded.
    pub ids: Vec<u32>,
    /// The generated text, special tokens included.
    pub text: String,
    /// Why generation ended.
    pub stop: Stop,
}

/// A model folder loaded for generation: the weights and the tokenizer with its template.
#[derive(Debug)]
pub struct Policy {
    _vs: VarStore,
    model: Llama,
    tokenizer: PolicyTokenizer,
}

impl Policy {
    /// Loads `dir` (weights in f32) onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self, GenerateError> {
        let vs = VarStore::new(device);
        let model = Llama::from_pretrained(&vs, dir)?;
        let tokenizer = PolicyTokenizer::from_dir(dir)?;
        Ok(Self {
            _vs: vs,
            model,
            tokenizer,
        })
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &PolicyTokenizer {
        &self.tokenizer
    }

    /// Answers `prompt` (rendered with the chat template and its generation prompt), stopping
    /// at any of the tokenizer's stop ids.
    pub fn generate(
        &self,
        prompt: &Content,
        sampling: &Sampling,
    ) -> Result<Generation, GenerateError> {
        let rendered = self.tokenizer.render_prompt(prompt)?;
        let prompt_ids = self.tokenizer.encode_prompt(prompt)?;
        let generated = generate_ids(&self.model, &prompt_ids, self.tokenizer.eos_ids(), sampling)?;
        let text = self.tokenizer.decode(&generated.ids)?;
        tracing::debug!(
            prompt_tokens = prompt_ids.len(),
            new_tokens = generated.ids.len(),
            stop = ?generated.stop,
            "generated"
        );
        Ok(Generation {
            prompt: rendered,
            ids: generated.ids,
            text,
            stop: generated.stop,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::testing::tiny_llama;

    /// Greedy decoding by recomputing the whole sequence at every step: no cache.
    fn greedy_by_recomputation(model: &Llama, prompt: &[u32], steps: usize) -> Vec<u32> {
        let mut ids = prompt.to_vec();
        for _ in 0..steps {
            let logits = model
                .forward(&ids_tensor(&ids, Device::Cpu).expect("ids"), None)
                .expect("forward");
            let last = logits.select(1, -1).select(0, 0);
            ids.push(last.argmax(0, false).int64_value(&[]) as u32);
        }
        ids[prompt.len()..].to_vec()
    }

    const PROMPT: [u32; 7] = [1, 40, 41, 77, 200, 13, 2];

    #[test]
    fn greedy_with_the_cache_equals_greedy_by_recomputation() {
        let (_vs, model) = tiny_llama();
        let expected = greedy_by_recomputation(&model, &PROMPT, 24);
        let found = generate_ids(&model, &PROMPT, &[], &Sampling::greedy(24)).expect("generate");
        assert_eq!(found.stop, Stop::MaxNewTokens);
        assert_eq!(found.ids, expected);
        // A random model should not just repeat one token.
        let distinct: std::collections::BTreeSet<_> = expected.iter().collect();
        assert!(distinct.len() > 2, "{expected:?}");
    }

    #[test]
    fn cached_logits_equal_full_forward_logits() {
        let (_vs, model) = tiny_llama();
        let ids: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % 512).collect();
        let full = model
            .forward(&ids_tensor(&ids, Device::Cpu).expect("ids"), None)
            .expect("forward");
        let mut cache = model.new_cache();
        let mut parts = Vec::new();
        for chunk in [&ids[..9], &ids[9..10], &ids[10..17], &ids[17..]] {
            let input = ids_tensor(chunk, Device::Cpu).expect("ids");
            parts.push(model.forward_cached(&input, &mut cache).expect("cached"));
        }
        assert_eq!(cache.len(), 20);
        let cached = Tensor::cat(&parts, 1);
        let diff = (&full - &cached).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "cached logits differ by {diff}");
    }

    #[test]
    fn generation_stops_at_a_stop_id_and_excludes_it() {
        let (_vs, model) = tiny_llama();
        let free = generate_ids(&model, &PROMPT, &[], &Sampling::greedy(6)).expect("generate");
        let stop_at = free.ids[3];
        let first = free
            .ids
            .iter()
            .position(|&id| id == stop_at)
            .expect("present");
        let stopped =
            generate_ids(&model, &PROMPT, &[stop_at], &Sampling::greedy(6)).expect("generate");
        assert_eq!(stopped.stop, Stop::Eos(stop_at));
        assert_eq!(stopped.ids, free.ids[..first]);
    }

    #[test]
    fn a_seed_repeats_and_a_tiny_nucleus_is_greedy() {
        let (_vs, model) = tiny_llama();
        let sampled = |seed, top_p| Sampling {
            max_new_tokens: 12,
            temperature: 1.0,
            top_p,
            seed,
        };
        let a = generate_ids(&model, &PROMPT, &[], &sampled(7, 1.0)).expect("a");
        let b = generate_ids(&model, &PROMPT, &[], &sampled(7, 1.0)).expect("b");
        assert_eq!(a, b);
        let greedy = generate_ids(&model, &PROMPT, &[], &Sampling::greedy(12)).expect("greedy");
        let nucleus = generate_ids(&model, &PROMPT, &[], &sampled(3, 1e-9)).expect("nucleus");
        assert_eq!(nucleus.ids, greedy.ids);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let probs = [0.1f32, 0.5, 0.3, 0.1];
        // Nucleus for p = 0.7: ids 1 (0.5) then 2 (0.3), mass 0.8.
        assert_eq!(sample_top_p(&probs, 0.7, 0.0), 1);
        assert_eq!(sample_top_p(&probs, 0.7, 0.62), 1); // 0.62 · 0.8 = 0.496 < 0.5
        assert_eq!(sample_top_p(&probs, 0.7, 0.63), 2); // 0.504 ≥ 0.5
        assert_eq!(sample_top_p(&probs, 0.7, 0.999), 2);
        assert_eq!(sample_top_p(&probs, 1.0, 0.999), 3);
    }

    #[test]
    fn bad_settings_and_prompts_are_errors() {
        let (_vs, model) = tiny_llama();
        let mut sampling = Sampling::greedy(4);
        sampling.top_p = 0.0;
        assert!(matches!(
            generate_ids(&model, &PROMPT, &[], &sampling),
            Err(GenerateError::Setting(_))
        ));
        sampling = Sampling::greedy(4);
        sampling.temperature = -1.0;
        assert!(sampling.validate().is_err());
        assert!(matches!(
            generate_ids(&model, &[], &[], &Sampling::greedy(4)),
            Err(GenerateError::EmptyPrompt)
        ));
    }
}
