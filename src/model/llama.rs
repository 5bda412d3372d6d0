//! The Llama-family decoder (Llama 2 and 3, SmolLM2, Mistral, Qwen2) in `tch`.
//!
//! The layers mirror `transformers`' `modeling_llama.py` one to one, and their parameters
//! live in a [`VarStore`] under the checkpoint's own names (`model.layers.0.self_attn.q_proj.
//! weight`, …), so loading and saving are by name. Each layer has `load`, which declares its
//! parameters under a [`nn::Path`] (the weights are filled in afterwards by
//! [`weights::load`]), and `forward`.
//!
//! - RMSNorm normalizes in fp32 and casts back before the weight, as `LlamaRMSNorm` does.
//! - Rotary embeddings use the Hugging Face layout: the two halves of a head are the pair
//!   rotated together (`rotate_half`), with frequencies computed in fp32 as `transformers`
//!   computes them (`default`, `linear` and `llama3` scaling).
//! - Attention is grouped-query through `scaled_dot_product_attention`: causal, and also
//!   key-padding masked when a padding mask is given.
//! - Positions count from 0 in every sequence: batches are right-padded.
//!
//! Every operation uses `tch`'s fallible `f_` calls, so a shape error or an out-of-memory
//! error is a [`ModelError`] the trainer can handle, never a panic.

use std::cell::Cell;
use std::path::Path;

use tch::nn::{self, VarStore};
use tch::{Kind, TchError, Tensor};

use super::config::{Config, ConfigError, RopeScaling};
use super::weights::{self, SaveDtype, WeightsError};

/// Why the model could not be loaded, saved or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json` is missing or unsupported.
    #[error("cannot use the model's config")]
    Config(#[from] ConfigError),
    /// The weights are missing, malformed or do not match the config.
    #[error("cannot load or save the model's weights")]
    Weights(#[from] WeightsError),
    /// libtorch failed while running the model (a shape mismatch, out of memory, …).
    #[error("libtorch failed while running the model")]
    Torch(#[from] TchError),
    /// The input does not fit the model.
    #[error("invalid model input: {0}")]
    Input(String),
}

/// A linear layer, `y = x Wᵀ + b`, with `weight` of shape `[out, in]` as PyTorch stores it.
#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self, TchError> {
        let weight = p.f_zeros("weight", &[out_dim, in_dim])?;
        let bias = match bias {
            true => Some(p.f_zeros("bias", &[out_dim])?),
            false => None,
        };
        Ok(Self { weight, bias })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        xs.f_linear(&self.weight, self.bias.as_ref())
    }
}

/// Root-mean-square norm with a learned scale, computed in fp32.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(p: nn::Path, size: i64, eps: f64) -> Result<Self, TchError> {
        Ok(Self {
            weight: p.f_ones("weight", &[size])?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        let kind = xs.kind();
        let wide = at_least_f32(kind);
        let xs = xs.f_to_kind(wide)?;
        let variance = xs.f_square()?.f_mean_dim(-1, true, wide)?;
        let normed = xs.f_mul(&variance.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        self.weight.f_mul(&normed.f_to_kind(kind)?)
    }
}

/// The dtype that norms and log-softmax compute in: fp32 for fp32 and narrower weights, f64
/// for f64 ones (which finite-difference tests use).
pub(crate) fn at_least_f32(kind: Kind) -> Kind {
    match kind {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    }
}

/// The rotary frequencies `inv_freq` (one per pair of dimensions), as `transformers`
/// computes them: `1 / theta^(2i/d)` in fp32, then scaled.
pub fn rope_inv_freq(config: &Config) -> Result<Vec<f32>, TchError> {
    let dim = config.head_dim;
    let exponents = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, tch::Device::Cpu))?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(dim)?;
    let base = Tensor::f_pow_scalar(config.rope_theta, &exponents)?.f_reciprocal()?;
    let inv_freq = Vec::<f32>::try_from(base)?;

    Ok(match config.rope_scaling {
        RopeScaling::Default => inv_freq,
        RopeScaling::Linear { factor } => inv_freq.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 { .. } => llama3_inv_freq(&inv_freq, config.rope_scaling),
    })
}

/// Llama 3.1's scaling: low frequencies divided by `factor`, high ones kept, the band in
/// between interpolated (`_compute_llama3_parameters` in `transformers`).
fn llama3_inv_freq(inv_freq: &[f32], scaling: RopeScaling) -> Vec<f32> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old_len,
    } = scaling
    else {
        return inv_freq.to_vec();
    };
    let (factor, low, high, old_len) = (
        factor as f32,
        low_freq_factor as f32,
        high_freq_factor as f32,
        old_len as f32,
    );
    let low_freq_wavelen = old_len / low;
    let high_freq_wavelen = old_len / high;

    let scale = |freq: f32| {
        let wavelen = 2.0 * std::f32::consts::PI / freq;
        if wavelen > low_freq_wavelen {
            return freq / factor;
        }
        if wavelen < high_freq_wavelen {
            return freq;
        }
        let smooth = (old_len / wavelen - low) / (high - low);
        (1.0 - smooth) * freq / factor + smooth * freq
    };
    inv_freq.iter().map(|&f| scale(f)).collect()
}

/// The cosines and sines of every position's rotation, `[seq_len, head_dim]` each.
#[derive(Debug)]
struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTables {
    fn new(inv_freq: &Tensor, seq_len: i64, kind: Kind) -> Result<Self, TchError> {
        Self::span(inv_freq, 0, seq_len, kind)
    }

    /// The tables of positions `start..start + len`.
    fn span(inv_freq: &Tensor, start: i64, len: i64, kind: Kind) -> Result<Self, TchError> {
        let positions =
            Tensor::f_arange_start(start, start + len, (Kind::Float, inv_freq.device()))?;
        let freqs = positions.f_outer(inv_freq)?;
        let angles = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let cos = angles.f_cos()?.f_to_kind(kind)?;
        let sin = angles.f_sin()?.f_to_kind(kind)?;
        Ok(Self { cos, sin })
    }

    /// Rotates `xs` (`[b, heads, seq_len, head_dim]`): `x cos + rotate_half(x) sin`.
    fn apply(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        xs.f_mul(&self.cos)?
            .f_add(&rotate_half(xs)?.f_mul(&self.sin)?)
    }
}

/// `[x1, x2] -> [-x2, x1]` over the last dimension's two halves.
fn rotate_half(xs: &Tensor) -> Result<Tensor, TchError> {
    let half = xs.size().last().copied().unwrap_or(0) / 2;
    let x1 = xs.f_narrow(-1, 0, half)?;
    let x2 = xs.f_narrow(-1, half, half)?;
    Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)
}

thread_local! {
    static MATH_ATTENTION: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with attention computed from its composite definition (matrix products and a
/// softmax) on this thread instead of a fused kernel. The fused CPU and CUDA kernels have no
/// second derivative; objectives that differentiate a gradient (double backprop) need this.
/// Slower and heavier in memory; the results agree with the fused kernels to rounding.
pub fn with_math_attention<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            MATH_ATTENTION.with(|m| m.set(self.0));
        }
    }
    let _restore = Restore(MATH_ATTENTION.with(|m| m.replace(true)));
    f()
}

/// Grouped-query self-attention.
#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn load(p: nn::Path, cfg: &Config) -> Result<Self, TchError> {
        let (hidden, head_dim) = (cfg.hidden_size, cfg.head_dim);
        let q_dim = cfg.num_attention_heads * head_dim;
        let kv_dim = cfg.num_key_value_heads * head_dim;
        Ok(Self {
            q_proj: Linear::load(&p / "q_proj", hidden, q_dim, cfg.qkv_bias)?,
            k_proj: Linear::load(&p / "k_proj", hidden, kv_dim, cfg.qkv_bias)?,
            v_proj: Linear::load(&p / "v_proj", hidden, kv_dim, cfg.qkv_bias)?,
            o_proj: Linear::load(&p / "o_proj", q_dim, hidden, cfg.o_bias)?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim,
        })
    }

    /// `xs`: `[b, seq_len, hidden]`; `mask`: `[b, 1, seq_len, keys]`, true where a query
    /// may attend a key, or `None` for causal attention alone.
    ///
    /// With `cache`, the new keys and values are appended to the cached ones (created on the
    /// first call) and the queries attend all of them; `mask` must then cover every key.
    fn forward(
        &self,
        xs: &Tensor,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor, TchError> {
        let (b_sz, seq_len, _hidden) = xs.size3()?;
        let heads = |proj: &Linear, n: i64| {
            proj.forward(xs)?
                .f_reshape([b_sz, seq_len, n, self.head_dim])?
                .f_transpose(1, 2)
        };
        let q = rope.apply(&heads(&self.q_proj, self.num_heads)?)?;
        let mut k = rope.apply(&heads(&self.k_proj, self.num_kv_heads)?)?;
        let mut v = heads(&self.v_proj, self.num_kv_heads)?;
        if let Some(cache) = cache {
            if let Some((past_k, past_v)) = cache.as_ref() {
                k = Tensor::f_cat(&[past_k, &k], 2)?;
                v = Tensor::f_cat(&[past_v, &v], 2)?;
            }
            *cache = Some((k.shallow_clone(), v.shallow_clone()));
        }

        let ys = self.attend(&q, &k, &v, mask)?.f_transpose(1, 2)?;
        let ys = ys.f_reshape([b_sz, seq_len, self.num_heads * self.head_dim])?;
        self.o_proj.forward(&ys)
    }

    /// Scaled dot-product attention, causal when `mask` is `None`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor, TchError> {
        // Kernels that take a mask do not all take `enable_gqa`: share the heads here then.
        let (k, v, gqa) = match mask {
            None => (
                k.shallow_clone(),
                v.shallow_clone(),
                self.num_kv_heads != self.num_heads,
            ),
            Some(_) => (self.repeat_kv(k)?, self.repeat_kv(v)?, false),
        };
        if MATH_ATTENTION.with(Cell::get) {
            // This kernel adds a mask to the scores as it is: a boolean one becomes 0 / −∞.
            let additive = mask
                .map(|m| {
                    Tensor::f_zeros(m.size(), (q.kind(), q.device()))?
                        .f_masked_fill(&m.f_logical_not()?, f64::NEG_INFINITY)
                })
                .transpose()?;
            let (ys, _weights) = Tensor::f_internal_scaled_dot_product_attention_math(
                q,
                &k,
                &v,
                additive.as_ref(),
                0.0,
                mask.is_none(),
                None,
                None,
                gqa,
            )?;
            return Ok(ys);
        }
        Tensor::f_scaled_dot_product_attention(q, &k, &v, mask, 0.0, mask.is_none(), None, gqa)
    }

    /// `[b, kv_heads, t, d] -> [b, heads, t, d]`, query head `h` reading kv head `h / n_rep`.
    fn repeat_kv(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        let n_rep = self.num_heads / self.num_kv_heads;
        if n_rep == 1 {
            return Ok(xs.shallow_clone());
        }
        let (b_sz, kv_heads, seq_len, head_dim) = xs.size4()?;
        xs.f_unsqueeze(2)?
            .f_expand([b_sz, kv_heads, n_rep, seq_len, head_dim], false)?
            .f_reshape([b_sz, kv_heads * n_rep, seq_len, head_dim])
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(p: nn::Path, cfg: &Config) -> Result<Self, TchError> {
        let (hidden, inter, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: Linear::load(&p / "gate_proj", hidden, inter, bias)?,
            up_proj: Linear::load(&p / "up_proj", hidden, inter, bias)?,
            down_proj: Linear::load(&p / "down_proj", inter, hidden, bias)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        let gate = self.gate_proj.forward(xs)?.f_silu()?;
        self.down_proj
            .forward(&gate.f_mul(&self.up_proj.forward(xs)?)?)
    }
}

/// One pre-norm decoder layer: attention then MLP, each added to the residual stream.
#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(p: nn::Path, cfg: &Config) -> Result<Self, TchError> {
        let (hidden, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(&p / "input_layernorm", hidden, eps)?,
            self_attn: Attention::load(&p / "self_attn", cfg)?,
            post_attention_layernorm: RmsNorm::load(&p / "post_attention_layernorm", hidden, eps)?,
            mlp: Mlp::load(&p / "mlp", cfg)?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor, TchError> {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(xs)?, rope, mask, cache)?;
        let xs = xs.f_add(&attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&xs)?)?;
        xs.f_add(&mlp)
    }
}

/// One layer's cached keys and values, `[b, kv_heads, seen, head_dim]` each.
type LayerCache = Option<(Tensor, Tensor)>;

/// The keys and values of every token seen so far, per layer, for incremental decoding with
/// [`Llama::forward_cached`]. Made by [`Llama::new_cache`]; one per sequence being decoded.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: i64,
}

impl KvCache {
    /// The number of positions cached.
    pub fn len(&self) -> i64 {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A Llama-family causal language model (`LlamaForCausalLM` and its relatives).
#[derive(Debug)]
pub struct Llama {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// The embedding matrix itself when the embeddings are tied.
    lm_head: Tensor,
    inv_freq: Tensor,
    config: Config,
}

impl Llama {
    /// Declares the model's parameters under `p` (a [`VarStore`]'s root, so that names are
    /// the checkpoint's), in the store's dtype and on its device. They hold zeros and ones
    /// until [`weights::load`] fills them; [`Llama::from_pretrained`] does both.
    pub fn load(p: &nn::Path, config: &Config) -> Result<Self, ModelError> {
        let model = p / "model";
        let embed_tokens = (&model / "embed_tokens")
            .f_zeros("weight", &[config.vocab_size, config.hidden_size])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(&model / "layers" / i, config))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = RmsNorm::load(&model / "norm", config.hidden_size, config.rms_norm_eps)?;
        let lm_head = match config.tie_word_embeddings {
            true => embed_tokens.shallow_clone(),
            false => (p / "lm_head").f_zeros("weight", &[config.vocab_size, config.hidden_size])?,
        };
        let inv_freq = Tensor::f_from_slice(&rope_inv_freq(config)?)?.f_to_device(p.device())?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            config: config.clone(),
        })
    }

    /// Loads the model folder `dir` (`config.json` and the safetensors weights) into `vs`,
    /// strictly, converting the stored weights to `vs`'s dtype (`vs.set_kind` before the
    /// call: f32 on the CPU, bf16 on CUDA if wanted).
    pub fn from_pretrained(vs: &VarStore, dir: &Path) -> Result<Self, ModelError> {
        let config = Config::from_dir(dir)?;
        let model = Self::load(&vs.root(), &config)?;
        weights::load(vs, dir, |name| model.ignores(name))?;
        Ok(model)
    }

    /// Saves `config.json` and `model.safetensors` (in `dtype`) into `dir`, which
    /// `transformers` loads unchanged. `vs` is the store the model was loaded into.
    pub fn save_pretrained(
        &self,
        vs: &VarStore,
        dir: &Path,
        dtype: SaveDtype,
    ) -> Result<(), ModelError> {
        Ok(weights::save_pretrained(vs, &self.config, dir, dtype)?)
    }

    /// Whether a checkpoint tensor the model has no variable for may be skipped: the rotary
    /// `inv_freq` buffers of old checkpoints, and an `lm_head` saved beside tied embeddings
    /// (which `transformers` also ignores).
    pub fn ignores(&self, name: &str) -> bool {
        name.ends_with(".rotary_emb.inv_freq")
            || (self.config.tie_word_embeddings && name == "lm_head.weight")
    }

    /// The architecture.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The input embeddings of `input_ids` (`[b, seq_len]` int64): `[b, seq_len, hidden]`.
    ///
    /// Together with [`Llama::forward_embeds`], this lets an objective take gradients with
    /// respect to the embeddings (detach, `set_requires_grad`, forward).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor, ModelError> {
        Ok(Tensor::f_embedding(
            &self.embed_tokens,
            input_ids,
            -1,
            false,
            false,
        )?)
    }

    /// The final hidden states, after the last norm: `[b, seq_len, hidden]`.
    ///
    /// `embeds`: `[b, seq_len, hidden]`, positions counted from 0. `key_padding`: `[b,
    /// seq_len]` bool, true for real tokens; with it, attention is causal AND masks padded
    /// keys; without it, causal alone (exact for the real tokens of right-padded rows).
    pub fn hidden_states(
        &self,
        embeds: &Tensor,
        key_padding: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        let (b_sz, seq_len, hidden) = embeds.size3()?;
        self.check_input(seq_len, hidden)?;
        let rope = RopeTables::new(&self.inv_freq, seq_len, embeds.kind())?;
        let mask = key_padding
            .map(|m| attention_mask(m, b_sz, seq_len))
            .transpose()?;

        let mut xs = embeds.shallow_clone();
        for layer in &self.layers {
            xs = layer.forward(&xs, &rope, mask.as_ref(), None)?;
        }
        Ok(self.norm.forward(&xs)?)
    }

    /// Logits over the vocabulary for hidden states `[…, hidden]`, in the weights' dtype.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        Ok(hidden.f_linear(&self.lm_head, None::<&Tensor>)?)
    }

    /// Logits `[b, seq_len, vocab]` for input embeddings; see [`Llama::hidden_states`].
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        key_padding: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        self.logits(&self.hidden_states(embeds, key_padding)?)
    }

    /// Logits `[b, seq_len, vocab]` for token ids `[b, seq_len]`; see
    /// [`Llama::hidden_states`].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        key_padding: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        self.forward_embeds(&self.embed(input_ids)?, key_padding)
    }

    /// An empty cache for [`Llama::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: self.layers.iter().map(|_| None).collect(),
            len: 0,
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> tch::Device {
        self.embed_tokens.device()
    }

    /// Logits `[b, t, vocab]` for `input_ids` (`[b, t]`) that continue the sequences whose
    /// keys and values `cache` holds, at positions `cache.len()..cache.len() + t`; the new
    /// keys and values are appended to `cache`. Attention is causal, over the cached and the
    /// new tokens. From an empty cache this gives [`Llama::forward`]'s logits.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        let embeds = self.embed(input_ids)?;
        let (_b_sz, len, hidden) = embeds.size3()?;
        let start = cache.len;
        self.check_input(start + len, hidden)?;
        if cache.layers.len() != self.layers.len() {
            return Err(ModelError::Input(format!(
                "a cache of {} layers for a model of {}",
                cache.layers.len(),
                self.layers.len()
            )));
        }
        let rope = RopeTables::span(&self.inv_freq, start, len, embeds.kind())?;
        let mask = match start {
            0 => None,
            _ => Some(offset_causal_mask(start, len, embeds.device())?),
        };
        let mut xs = embeds;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            xs = layer.forward(&xs, &rope, mask.as_ref(), Some(layer_cache))?;
        }
        cache.len += len;
        self.logits(&self.norm.forward(&xs)?)
    }

    fn check_input(&self, seq_len: i64, hidden: i64) -> Result<(), ModelError> {
        if hidden != self.config.hidden_size {
            let expected = self.config.hidden_size;
            return Err(ModelError::Input(format!(
                "embeddings of width {hidden}, not {expected}"
            )));
        }
        match self.config.sliding_window {
            Some(window) if seq_len > window => Err(ModelError::Input(format!(
                "{seq_len} tokens exceed the sliding window of {window}, which is not implemented"
            ))),
            _ => Ok(()),
        }
    }
}

/// `[1, 1, len, start + len]` bool: query `i` (at position `start + i`) may attend key `j`
/// when `j <= start + i`.
fn offset_causal_mask(start: i64, len: i64, device: tch::Device) -> Result<Tensor, TchError> {
    Tensor::f_ones([len, start + len], (Kind::Bool, device))?
        .f_tril(start)?
        .f_reshape([1, 1, len, start + len])
}

/// `[b, 1, t, t]` bool: query `i` may attend key `j` when `j <= i` and key `j` is real.
fn attention_mask(key_padding: &Tensor, b_sz: i64, seq_len: i64) -> Result<Tensor, ModelError> {
    if key_padding.size() != [b_sz, seq_len] || key_padding.kind() != Kind::Bool {
        let found = (key_padding.size(), key_padding.kind());
        return Err(ModelError::Input(format!(
            "key padding mask is {found:?}, not bool [{b_sz}, {seq_len}]"
        )));
    }
    let causal =
        Tensor::f_ones([seq_len, seq_len], (Kind::Bool, key_padding.device()))?.f_tril(0)?;
    let keys = key_padding.f_reshape([b_sz, 1, 1, seq_len])?;
    Ok(causal.f_logical_and(&keys)?)
}

/// Test helpers shared by the model modules' tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::PathBuf;

    use tch::nn::VarStore;
    use tch::Device;

    use super::Llama;

    /// `tests/fixtures`, in this crate or (when compiled from elsewhere) in rebeld's checkout.
    pub(crate) fn fixtures_dir() -> PathBuf {
        let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        match local.join("tiny-llama").is_dir() {
            true => local,
            false => PathBuf::from("/work/main/tests/fixtures"),
        }
    }

    /// The tiny random Llama of `tests/fixtures/tiny-llama`, in f32 on the CPU.
    pub(crate) fn tiny_llama() -> (VarStore, Llama) {
        let vs = VarStore::new(Device::Cpu);
        let model = Llama::from_pretrained(&vs, &fixtures_dir().join("tiny-llama"))
            .expect("the tiny-llama fixture loads");
        (vs, model)
    }

    /// The project's Python with `transformers`, when the virtual environment exists.
    pub(crate) fn python() -> Option<PathBuf> {
        // Canonical, so Python finds its `pyvenv.cfg` beside the real path.
        let root = fixtures_dir()
            .join("../..")
            .canonicalize()
            .unwrap_or_default();
        let python = root.join(".venv/bin/python");
        if python.is_file() {
            return Some(python);
        }
        println!(
            "note: no {} — skipping the comparison with transformers",
            python.display()
        );
        None
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use serde::Deserialize;
    use tch::Device;

    use super::testing::{fixtures_dir, python, tiny_llama};
    use super::*;

    #[derive(Deserialize)]
    struct ForwardReference {
        input_ids: Vec<i64>,
        shape: Vec<i64>,
        row_sum: Vec<f64>,
        row_abs_sum: Vec<f64>,
        row_max: Vec<f64>,
        row_argmax: Vec<i64>,
        columns: Vec<i64>,
        column_values: Vec<Vec<f64>>,
        last_row: Vec<f64>,
    }

    #[derive(Deserialize)]
    struct Reference {
        forward: ForwardReference,
    }

    fn reference() -> ForwardReference {
        let path = fixtures_dir().join("tiny-llama/logprob_reference.json");
        let text = std::fs::read_to_string(&path).expect("the reference exists");
        serde_json::from_str::<Reference>(&text)
            .expect("the reference parses")
            .forward
    }

    fn ids(ids: &[i64]) -> Tensor {
        Tensor::from_slice(ids).reshape([1, -1])
    }

    fn to_vec2(t: &Tensor) -> Vec<Vec<f64>> {
        Vec::<Vec<f64>>::try_from(t.to_kind(Kind::Double)).expect("a 2-d tensor")
    }

    fn assert_close(found: f64, expected: f64, tol: f64, what: &str) {
        let scale = expected.abs().max(1.0);
        assert!(
            (found - expected).abs() <= tol * scale,
            "{what}: {found} vs {expected}"
        );
    }

    #[test]
    fn logits_match_transformers() {
        let reference = reference();
        let (_vs, model) = tiny_llama();
        let logits = model
            .forward(&ids(&reference.input_ids), None)
            .expect("forward");
        assert_eq!(logits.size(), [&[1], reference.shape.as_slice()].concat());
        let logits = logits.squeeze_dim(0);
        let rows = to_vec2(&logits);

        for (t, row) in rows.iter().enumerate() {
            let sum: f64 = row.iter().sum();
            let abs_sum: f64 = row.iter().map(|v| v.abs()).sum();
            assert_close(sum, reference.row_sum[t], 1e-4, &format!("row {t} sum"));
            assert_close(
                abs_sum,
                reference.row_abs_sum[t],
                1e-4,
                &format!("row {t} |sum|"),
            );
            assert_close(
                row.iter().cloned().fold(f64::MIN, f64::max),
                reference.row_max[t],
                1e-4,
                &format!("row {t} max"),
            );
            for (c, &col) in reference.columns.iter().enumerate() {
                let expected = reference.column_values[t][c];
                assert_close(row[col as usize], expected, 1e-4, &format!("[{t}, {col}]"));
            }
        }
        let argmax = Vec::<i64>::try_from(logits.argmax(-1, false)).expect("ids");
        assert_eq!(argmax, reference.row_argmax);
        for (v, (&found, &expected)) in rows[rows.len() - 1]
            .iter()
            .zip(&reference.last_row)
            .enumerate()
        {
            assert_close(found, expected, 1e-4, &format!("last row, column {v}"));
        }
    }

    #[test]
    fn key_padding_mask_changes_nothing_for_real_tokens() {
        let (_vs, model) = tiny_llama();
        let real = reference().input_ids;
        let mut padded = real.clone();
        padded.extend([0, 0, 0, 7]);
        let n = real.len() as i64;
        let mut mask = vec![true; real.len()];
        mask.extend([false; 4]);
        let mask = Tensor::from_slice(&mask).reshape([1, -1]);

        let alone = model.forward(&ids(&real), None).expect("forward");
        let causal = model
            .forward(&ids(&padded), None)
            .expect("forward")
            .narrow(1, 0, n);
        let masked = model
            .forward(&ids(&padded), Some(&mask))
            .expect("forward")
            .narrow(1, 0, n);
        assert!(alone.allclose(&causal, 1e-5, 1e-5, false));
        assert!(alone.allclose(&masked, 1e-5, 1e-5, false));

        // The composite kernel (for double backprop) agrees, masked and causal alone; the
        // padded positions' outputs differ from the real ones', so the mask must be applied.
        let math = with_math_attention(|| model.forward(&ids(&padded), Some(&mask)))
            .expect("forward")
            .narrow(1, 0, n);
        assert!(alone.allclose(&math, 1e-5, 1e-5, false));
        let math = with_math_attention(|| model.forward(&ids(&real), None)).expect("forward");
        assert!(alone.allclose(&math, 1e-5, 1e-5, false));
        // The flag is scoped: outside, the fused kernel runs again.
        assert!(!MATH_ATTENTION.with(Cell::get));
    }

    #[test]
    fn default_inv_freq_is_one_over_theta_to_the_2i_over_d() {
        let (_vs, model) = tiny_llama();
        let inv_freq = rope_inv_freq(model.config()).expect("inv_freq");
        assert_eq!(inv_freq.len(), 8);
        for (i, f) in inv_freq.iter().enumerate() {
            let expected = 1.0 / 10_000f64.powf(2.0 * i as f64 / 16.0);
            assert_close(*f as f64, expected, 1e-6, &format!("inv_freq[{i}]"));
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_blends_between() {
        let text = include_str!("../../tests/fixtures/tiny-llama/config.json");
        let mut config = Config::from_json_str(text).expect("config");
        config.rope_theta = 500_000.0;
        config.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        };
        let scaled = rope_inv_freq(&config).expect("scaled");
        config.rope_scaling = RopeScaling::Default;
        let plain = rope_inv_freq(&config).expect("plain");
        let wavelen = |f: f32| 2.0 * std::f32::consts::PI / f;
        for (s, p) in scaled.iter().zip(&plain) {
            match wavelen(*p) {
                w if w < 16.0 => assert_eq!(s, p),
                w if w > 64.0 => assert_eq!(*s, p / 8.0),
                _ => assert!(*s < *p && *s > p / 8.0, "{s} between {p} and {}", p / 8.0),
            }
        }
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        let (_vs, model) = tiny_llama();
        let wrong_width = Tensor::zeros([1, 3, 32], (Kind::Float, Device::Cpu));
        assert!(matches!(
            model.forward_embeds(&wrong_width, None),
            Err(ModelError::Input(_))
        ));
        let ids = ids(&[1, 2, 3]);
        let wrong_mask = Tensor::ones([1, 2], (Kind::Bool, Device::Cpu));
        assert!(matches!(
            model.forward(&ids, Some(&wrong_mask)),
            Err(ModelError::Input(_))
        ));
        let out_of_vocab = Tensor::from_slice(&[1i64, 512]).reshape([1, 2]);
        assert!(model.forward(&out_of_vocab, None).is_err());
    }

    #[test]
    fn save_then_reload_gives_identical_logits() {
        let (vs, model) = tiny_llama();
        let dir = tempfile::tempdir().expect("tempdir");
        model
            .save_pretrained(&vs, dir.path(), SaveDtype::F32)
            .expect("save");

        let reloaded_vs = VarStore::new(Device::Cpu);
        let reloaded = Llama::from_pretrained(&reloaded_vs, dir.path()).expect("reload");
        let input = ids(&reference().input_ids);
        let before = model.forward(&input, None).expect("forward");
        let after = reloaded.forward(&input, None).expect("forward");
        assert!(before.equal(&after));
    }

    #[test]
    fn bf16_checkpoints_load_into_a_bf16_store() {
        let (vs, model) = tiny_llama();
        let dir = tempfile::tempdir().expect("tempdir");
        model
            .save_pretrained(&vs, dir.path(), SaveDtype::BF16)
            .expect("save");
        let config = std::fs::read_to_string(dir.path().join("config.json")).expect("config");
        assert!(config.contains("\"dtype\": \"bfloat16\""), "{config}");

        let mut bf16_vs = VarStore::new(Device::Cpu);
        bf16_vs.set_kind(Kind::BFloat16);
        let bf16 = Llama::from_pretrained(&bf16_vs, dir.path()).expect("reload");
        assert!(bf16_vs
            .variables()
            .values()
            .all(|v| v.kind() == Kind::BFloat16));
        let input = ids(&reference().input_ids);
        let f32_logits = model.forward(&input, None).expect("forward");
        let bf16_logits = bf16.forward(&input, None).expect("forward");
        assert_eq!(bf16_logits.kind(), Kind::BFloat16);
        let diff = (f32_logits - bf16_logits.to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 0.1, "bf16 logits are {diff} away from f32");
    }

    /// Runs `script` with the venv's Python; it prints one JSON value.
    fn run_python(python: &Path, script: &str, args: &[&str]) -> serde_json::Value {
        let output = Command::new(python)
            .arg("-c")
            .arg(script)
            .args(args)
            .output()
            .expect("python runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "python failed: {stderr}");
        serde_json::from_slice(&output.stdout).expect("python prints JSON")
    }

    fn assert_logits_match(found: &Tensor, expected: &serde_json::Value, tol: f64) {
        let expected: Vec<Vec<f64>> = serde_json::from_value(expected.clone()).expect("rows");
        let found = to_vec2(&found.squeeze_dim(0));
        assert_eq!(found.len(), expected.len());
        for (t, (f_row, e_row)) in found.iter().zip(&expected).enumerate() {
            for (v, (f, e)) in f_row.iter().zip(e_row).enumerate() {
                assert!(
                    (f - e).abs() <= tol * e.abs().max(1.0),
                    "logit [{t}, {v}]: {f} vs {e}"
                );
            }
        }
    }

    /// Logits of `folder` loaded by `transformers` (`tests/fixtures/logits_of_folder.py`).
    fn transformers_logits(python: &Path, folder: &Path, ids: &[i64]) -> serde_json::Value {
        let dir = tempfile::tempdir().expect("tempdir");
        let (request, response) = (dir.path().join("in.json"), dir.path().join("out.json"));
        let body = serde_json::json!({"folder": folder, "ids": ids});
        std::fs::write(&request, body.to_string()).expect("request");
        let script = fixtures_dir().join("logits_of_folder.py");
        let status = Command::new(python)
            .args([&script, &request, &response])
            .status()
            .expect("python runs");
        assert!(status.success(), "logits_of_folder.py failed: {status}");
        let text = std::fs::read_to_string(&response).expect("response");
        serde_json::from_str::<serde_json::Value>(&text).expect("JSON")["logits"].clone()
    }

    /// Saves the tiny model in `dtype` after moving every weight off the fixture's values,
    /// and compares `transformers`' logits for the folder with rebeld's: those of the model
    /// reloaded from the folder within `tol`, those of the unsaved model within `unsaved_tol`.
    fn check_saved_folder_in_transformers(dtype: SaveDtype, tol: f64, unsaved_tol: f64) {
        let Some(python) = python() else { return };
        let (vs, model) = tiny_llama();
        tch::manual_seed(5);
        tch::no_grad(|| {
            for (_, mut var) in vs.variables() {
                let noise = var.randn_like() * 0.05;
                let _ = var.g_add_(&noise);
            }
        });
        let dir = tempfile::tempdir().expect("tempdir");
        model.save_pretrained(&vs, dir.path(), dtype).expect("save");
        let input: Vec<i64> = reference().input_ids;
        let expected = transformers_logits(&python, dir.path(), &input);

        let (_fixture_vs, fixture) = tiny_llama();
        let unperturbed = fixture.forward(&ids(&input), None).expect("forward");
        let unsaved = model.forward(&ids(&input), None).expect("forward");
        let moved = (&unsaved - &unperturbed).abs().max().double_value(&[]);
        assert!(
            moved > 0.01,
            "the perturbation moved the logits by {moved} only"
        );
        assert_logits_match(&unsaved, &expected, unsaved_tol);

        let reloaded_vs = VarStore::new(Device::Cpu);
        let reloaded = Llama::from_pretrained(&reloaded_vs, dir.path()).expect("reload");
        let found = reloaded.forward(&ids(&input), None).expect("forward");
        assert_logits_match(&found, &expected, tol);
    }

    #[test]
    fn transformers_loads_a_saved_f32_folder_with_the_same_logits() {
        check_saved_folder_in_transformers(SaveDtype::F32, 1e-4, 1e-4);
    }

    #[test]
    fn transformers_loads_a_saved_bf16_folder_with_the_same_logits() {
        check_saved_folder_in_transformers(SaveDtype::BF16, 1e-4, 5e-2);
    }

    /// Builds tiny random variants in `transformers`, saves them and prints their logits.
    const MAKE_VARIANT: &str = r#"
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
kind, out = sys.argv[1], sys.argv[2]
# Weights 10x the usual init, so attention is peaked and every part of the model shows.
common = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, initializer_range=0.2)
torch.manual_seed(1)
if kind == "qwen2":
    model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True,
                                         rope_theta=1000000.0))
else:
    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=scaling,
                                         attention_bias=True, mlp_bias=True))
with torch.no_grad():  # biases start at zero: make them count
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.normal_(0.0, 0.5)
model = model.float().eval()
model.save_pretrained(out)
ids = torch.tensor([[(7 * i + 3) % 96 for i in range(200)]])
with torch.no_grad():
    print(json.dumps({"ids": ids[0].tolist(), "logits": model(input_ids=ids).logits[0].tolist()}))
"#;

    fn check_variant(kind: &str, edit_config: impl Fn(&mut serde_json::Value)) {
        let Some(python) = python() else { return };
        let dir = tempfile::tempdir().expect("tempdir");
        let folder = dir.path().to_str().expect("utf-8 path");
        let made = run_python(&python, MAKE_VARIANT, &[kind, folder]);

        let config_path = dir.path().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).expect("config"))
                .expect("json");
        edit_config(&mut config);
        std::fs::write(&config_path, config.to_string()).expect("write config");

        let vs = VarStore::new(Device::Cpu);
        let model = Llama::from_pretrained(&vs, dir.path()).expect("load the variant");
        let input: Vec<i64> = serde_json::from_value(made["ids"].clone()).expect("ids");
        let found = model.forward(&ids(&input), None).expect("forward");
        assert_logits_match(&found, &made["logits"], 1e-4);
        let spread = found.std(true).double_value(&[]);
        assert!(
            spread > 0.5,
            "logits spread {spread}: too flat to show a difference"
        );
    }

    #[test]
    fn qwen2_with_biases_and_tied_embeddings_matches_transformers() {
        check_variant("qwen2", |config| {
            assert_eq!(config["tie_word_embeddings"], true);
        });
    }

    #[test]
    fn llama3_rope_in_the_old_config_layout_matches_transformers() {
        check_variant("llama3", |config| {
            // Rewrite transformers 5's `rope_parameters` as transformers 4 wrote it.
            let params = config
                .as_object_mut()
                .and_then(|c| c.remove("rope_parameters"))
                .expect("rope_parameters");
            config["rope_theta"] = params["rope_theta"].clone();
            config["rope_scaling"] = params;
            config["rope_scaling"]
                .as_object_mut()
                .expect("object")
                .remove("rope_theta");
        });
    }
}
