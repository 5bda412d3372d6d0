//! The policy's architecture, read from a Hugging Face `config.json`.
//!
//! Two stages, as `transformers` itself does: [`RawConfig`] mirrors the file's fields (serde,
//! unknown fields ignored since every model adds its own), and [`Config::from_raw`] resolves
//! defaults and the RoPE layout once, failing with the field's name.
//!
//! Supported: the Llama family (Llama 2 and 3, SmolLM2, Mistral) and Qwen2. RoPE parameters
//! are read from either layout: the top-level `rope_theta` and `rope_scaling` of
//! `transformers` 4, or the `rope_parameters` object of `transformers` 5.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// The file name inside a model folder.
pub const CONFIG_FILE: &str = "config.json";

/// `transformers`' default `rope_theta` for Llama when a config names none.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// Why a `config.json` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// The file is not JSON, or a field has the wrong type.
    #[error("config.json is not a valid model config")]
    Parse(#[source] serde_json::Error),
    /// The architecture is none that this module implements.
    #[error(
        "unsupported architecture: model_type {model_type:?}, architectures {architectures:?} \
         (supported: llama, mistral, qwen2)"
    )]
    Unsupported {
        /// `model_type` as the file gives it.
        model_type: Option<String>,
        /// `architectures` as the file gives them.
        architectures: Vec<String>,
    },
    /// A field is missing or its value cannot be used.
    #[error("config.json field `{field}`: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The fields of `config.json` this module reads, as the file spells them.
#[derive(Clone, Debug, Deserialize)]
pub struct RawConfig {
    /// `llama`, `mistral`, `qwen2`, …
    pub model_type: Option<String>,
    /// Class names such as `LlamaForCausalLM`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Width of the residual stream.
    pub hidden_size: Option<i64>,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: Option<i64>,
    /// Number of decoder layers.
    pub num_hidden_layers: Option<i64>,
    /// Number of query heads.
    pub num_attention_heads: Option<i64>,
    /// Number of key/value heads; `num_attention_heads` when absent (no GQA).
    pub num_key_value_heads: Option<i64>,
    /// Width of one head; `hidden_size / num_attention_heads` when absent or null.
    pub head_dim: Option<i64>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: Option<f64>,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: Option<i64>,
    /// The longest context the model was trained for.
    pub max_position_embeddings: Option<i64>,
    /// Whether `lm_head` shares the embedding matrix; `false` when absent, as in
    /// `LlamaConfig`, `MistralConfig` and `Qwen2Config`.
    pub tie_word_embeddings: Option<bool>,
    /// `transformers` 4 layout: the RoPE base.
    pub rope_theta: Option<f64>,
    /// `transformers` 4 layout: RoPE scaling, or null.
    pub rope_scaling: Option<RawRope>,
    /// `transformers` 5 layout: the RoPE base and scaling in one object.
    pub rope_parameters: Option<RawRope>,
    /// Biases on the attention projections (Llama: q, k, v and o).
    pub attention_bias: Option<bool>,
    /// Biases on the MLP projections (Llama).
    pub mlp_bias: Option<bool>,
    /// The MLP activation; only `silu` is implemented.
    pub hidden_act: Option<String>,
    /// Mistral's sliding window, or null.
    pub sliding_window: Option<i64>,
    /// Qwen2's switch for the sliding window.
    pub use_sliding_window: Option<bool>,
}

/// A RoPE object in either layout (`rope_scaling` or `rope_parameters`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RawRope {
    /// The base (only in `rope_parameters`).
    pub rope_theta: Option<f64>,
    /// `default`, `linear`, `llama3`, …
    pub rope_type: Option<String>,
    /// The older spelling of `rope_type`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Scaling factor (`linear`, `llama3`).
    pub factor: Option<f64>,
    /// `llama3`: wavelengths above `original_max_position_embeddings / low_freq_factor` are
    /// divided by `factor`.
    pub low_freq_factor: Option<f64>,
    /// `llama3`: wavelengths below `original_max_position_embeddings / high_freq_factor` are
    /// kept.
    pub high_freq_factor: Option<f64>,
    /// `llama3`: the context length before scaling.
    pub original_max_position_embeddings: Option<f64>,
    /// Fraction of each head that is rotated; only 1 is implemented.
    pub partial_rotary_factor: Option<f64>,
}

/// The supported families, which differ only in which projections carry biases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Llama 2 and 3, SmolLM2 (`model_type` `llama`).
    Llama,
    /// Mistral (`model_type` `mistral`).
    Mistral,
    /// Qwen2 and Qwen2.5 (`model_type` `qwen2`): biases on q, k and v.
    Qwen2,
}

/// How rotary frequencies are derived from the base.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `1 / theta^(2i/d)`.
    Default,
    /// Every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Lower edge of the smoothed band.
        low_freq_factor: f64,
        /// Upper edge of the smoothed band.
        high_freq_factor: f64,
        /// The context length before scaling.
        original_max_position_embeddings: f64,
    },
}

/// A resolved, validated architecture.
#[derive(Clone, Debug)]
pub struct Config {
    /// Which family, hence which biases.
    pub family: Family,
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: i64,
    /// Number of decoder layers.
    pub num_hidden_layers: i64,
    /// Number of query heads.
    pub num_attention_heads: i64,
    /// Number of key/value heads, a divisor of `num_attention_heads`.
    pub num_key_value_heads: i64,
    /// Width of one head.
    pub head_dim: i64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// The longest context the model was trained for.
    pub max_position_embeddings: i64,
    /// Whether `lm_head` is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// The RoPE base.
    pub rope_theta: f64,
    /// How the RoPE frequencies are scaled.
    pub rope_scaling: RopeScaling,
    /// Biases on q, k and v.
    pub qkv_bias: bool,
    /// Bias on o.
    pub o_bias: bool,
    /// Biases on gate, up and down.
    pub mlp_bias: bool,
    /// A sliding attention window, when the model uses one.
    pub sliding_window: Option<i64>,
    /// The whole file, kept so that saving writes back every field `transformers` reads.
    pub json: Value,
}

impl Config {
    /// Reads and resolves `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join(CONFIG_FILE);
        let text = fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    /// Parses and resolves the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let json: Value = serde_json::from_str(text).map_err(ConfigError::Parse)?;
        let raw = RawConfig::deserialize(&json).map_err(ConfigError::Parse)?;
        Self::from_raw(raw, json)
    }

    /// Resolves defaults and checks the fields against each other.
    pub fn from_raw(raw: RawConfig, json: Value) -> Result<Self, ConfigError> {
        let family = family(&raw)?;
        let hidden_size = positive("hidden_size", raw.hidden_size)?;
        let num_attention_heads = positive("num_attention_heads", raw.num_attention_heads)?;
        let num_key_value_heads = match raw.num_key_value_heads {
            None => num_attention_heads,
            some => positive("num_key_value_heads", some)?,
        };
        check_heads(num_attention_heads, num_key_value_heads)?;
        let head_dim = match raw.head_dim {
            None => default_head_dim(hidden_size, num_attention_heads)?,
            some => positive("head_dim", some)?,
        };
        if head_dim % 2 != 0 {
            return Err(invalid(
                "head_dim",
                format!("{head_dim} is odd; RoPE needs pairs"),
            ));
        }
        check_activation(raw.hidden_act.as_deref())?;
        let (rope_theta, rope_scaling) = rope(&raw)?;

        let attention_bias = raw.attention_bias.unwrap_or(false);
        Ok(Self {
            family,
            hidden_size,
            intermediate_size: positive("intermediate_size", raw.intermediate_size)?,
            num_hidden_layers: positive("num_hidden_layers", raw.num_hidden_layers)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            vocab_size: positive("vocab_size", raw.vocab_size)?,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            rope_theta,
            rope_scaling,
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: family != Family::Qwen2 && attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            sliding_window: sliding_window(&raw, family),
            json,
        })
    }
}

fn family(raw: &RawConfig) -> Result<Family, ConfigError> {
    let by_type = match raw.model_type.as_deref() {
        Some("llama") => Some(Family::Llama),
        Some("mistral") => Some(Family::Mistral),
        Some("qwen2") => Some(Family::Qwen2),
        _ => None,
    };
    let by_class = raw.architectures.iter().find_map(|a| match a.as_str() {
        "LlamaForCausalLM" => Some(Family::Llama),
        "MistralForCausalLM" => Some(Family::Mistral),
        "Qwen2ForCausalLM" => Some(Family::Qwen2),
        _ => None,
    });
    // `model_type` decides when both are given: it is what `AutoConfig` dispatches on.
    let unknown_type = raw.model_type.is_some() && by_type.is_none();
    match by_type.or(by_class) {
        Some(family) if !unknown_type => Ok(family),
        _ => Err(ConfigError::Unsupported {
            model_type: raw.model_type.clone(),
            architectures: raw.architectures.clone(),
        }),
    }
}

fn positive(field: &'static str, value: Option<i64>) -> Result<i64, ConfigError> {
    match value {
        Some(v) if v > 0 => Ok(v),
        Some(v) => Err(invalid(field, format!("{v} is not positive"))),
        None => Err(invalid(field, "missing".to_owned())),
    }
}

fn invalid(field: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { field, reason }
}

fn check_heads(heads: i64, kv_heads: i64) -> Result<(), ConfigError> {
    if heads % kv_heads == 0 {
        return Ok(());
    }
    let reason = format!("{kv_heads} does not divide num_attention_heads {heads}");
    Err(invalid("num_key_value_heads", reason))
}

fn default_head_dim(hidden_size: i64, heads: i64) -> Result<i64, ConfigError> {
    if hidden_size % heads == 0 {
        return Ok(hidden_size / heads);
    }
    let reason = format!("absent, and num_attention_heads {heads} does not divide {hidden_size}");
    Err(invalid("head_dim", reason))
}

fn check_activation(act: Option<&str>) -> Result<(), ConfigError> {
    match act {
        None | Some("silu") | Some("swish") => Ok(()),
        Some(other) => Err(invalid(
            "hidden_act",
            format!("{other:?} is not implemented"),
        )),
    }
}

fn sliding_window(raw: &RawConfig, family: Family) -> Option<i64> {
    // Qwen2 configs carry a `sliding_window` value even when `use_sliding_window` is false.
    let used = match family {
        Family::Qwen2 => raw.use_sliding_window.unwrap_or(false),
        Family::Llama | Family::Mistral => true,
    };
    raw.sliding_window.filter(|_| used)
}

/// The RoPE base and scaling from whichever layout the file uses.
fn rope(raw: &RawConfig) -> Result<(f64, RopeScaling), ConfigError> {
    let (field, params) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(params), _) => ("rope_parameters", params.clone()),
        (None, Some(scaling)) => ("rope_scaling", scaling.clone()),
        (None, None) => ("rope_scaling", RawRope::default()),
    };
    let theta = params
        .rope_theta
        .or(raw.rope_theta)
        .unwrap_or(DEFAULT_ROPE_THETA);
    if theta <= 0.0 || !theta.is_finite() {
        return Err(invalid(
            "rope_theta",
            format!("{theta} is not a positive number"),
        ));
    }
    if params.partial_rotary_factor.is_some_and(|f| f != 1.0) {
        let reason = "partial_rotary_factor other than 1 is not implemented".to_owned();
        return Err(invalid(field, reason));
    }
    Ok((theta, scaling(field, &params)?))
}

fn scaling(field: &'static str, params: &RawRope) -> Result<RopeScaling, ConfigError> {
    let kind = params
        .rope_type
        .as_deref()
        .or(params.kind.as_deref())
        .unwrap_or("default");
    let need = |name: &str, value: Option<f64>| {
        value.ok_or_else(|| invalid(field, format!("rope type {kind:?} needs `{name}`")))
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear {
            factor: need("factor", params.factor)?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: need("factor", params.factor)?,
            low_freq_factor: need("low_freq_factor", params.low_freq_factor)?,
            high_freq_factor: need("high_freq_factor", params.high_freq_factor)?,
            original_max_position_embeddings: need(
                "original_max_position_embeddings",
                params.original_max_position_embeddings,
            )?,
        }),
        other => Err(invalid(
            field,
            format!("rope type {other:?} is not implemented"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 512,
            "rms_norm_eps": 1e-5,
        })
    }

    fn parse(json: Value) -> Result<Config, ConfigError> {
        Config::from_json_str(&json.to_string())
    }

    #[test]
    fn defaults_follow_transformers() {
        let config = parse(base()).expect("valid");
        assert_eq!(config.family, Family::Llama);
        assert_eq!(config.num_key_value_heads, 4);
        assert_eq!(config.head_dim, 16);
        assert_eq!(config.rope_theta, 10_000.0);
        assert_eq!(config.rope_scaling, RopeScaling::Default);
        assert!(!config.tie_word_embeddings);
        assert!(!config.qkv_bias && !config.o_bias && !config.mlp_bias);
    }

    #[test]
    fn reads_the_tiny_llama_fixture() {
        let text = include_str!("../../tests/fixtures/tiny-llama/config.json");
        let config = Config::from_json_str(text).expect("valid");
        assert_eq!(
            (config.num_attention_heads, config.num_key_value_heads),
            (4, 2)
        );
        assert_eq!(config.head_dim, 16);
        assert_eq!(config.rope_theta, 10_000.0);
        assert_eq!(config.rms_norm_eps, 1e-5);
    }

    #[test]
    fn reads_llama3_scaling_in_both_layouts() {
        let scaling = serde_json::json!({
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        });
        let mut old = base();
        old["rope_theta"] = 500_000.0.into();
        old["rope_scaling"] = scaling.clone();
        old["rope_scaling"]["type"] = "llama3".into();
        let mut new = base();
        new["rope_parameters"] = scaling;
        new["rope_parameters"]["rope_type"] = "llama3".into();
        new["rope_parameters"]["rope_theta"] = 500_000.0.into();

        let expected = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        for json in [old, new] {
            let config = parse(json).expect("valid");
            assert_eq!(config.rope_theta, 500_000.0);
            assert_eq!(config.rope_scaling, expected);
        }
    }

    #[test]
    fn qwen2_has_qkv_biases_and_ignores_an_unused_window() {
        let mut json = base();
        json["model_type"] = "qwen2".into();
        json["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        json["sliding_window"] = 4096.into();
        json["use_sliding_window"] = false.into();
        json["tie_word_embeddings"] = true.into();
        let config = parse(json).expect("valid");
        assert_eq!(config.family, Family::Qwen2);
        assert!(config.qkv_bias && !config.o_bias);
        assert_eq!(config.sliding_window, None);
        assert!(config.tie_word_embeddings);
    }

    #[test]
    fn mistral_null_head_dim_and_window_are_defaults() {
        let mut json = base();
        json["model_type"] = "mistral".into();
        json["head_dim"] = Value::Null;
        json["sliding_window"] = Value::Null;
        let config = parse(json).expect("valid");
        assert_eq!(config.family, Family::Mistral);
        assert_eq!(config.head_dim, 16);
        assert_eq!(config.sliding_window, None);
    }

    #[test]
    fn unknown_architectures_are_named() {
        let mut json = base();
        json["model_type"] = "gemma3".into();
        json["architectures"] = serde_json::json!(["Gemma3ForCausalLM"]);
        let error = parse(json).expect_err("unsupported").to_string();
        assert!(
            error.contains("gemma3") && error.contains("Gemma3ForCausalLM"),
            "{error}"
        );
    }

    #[test]
    fn unimplemented_rope_types_and_bad_heads_fail_with_the_field() {
        let mut json = base();
        json["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let error = parse(json).expect_err("yarn").to_string();
        assert!(
            error.contains("rope_scaling") && error.contains("yarn"),
            "{error}"
        );

        let mut json = base();
        json["num_key_value_heads"] = 3.into();
        let error = parse(json).expect_err("3 does not divide 4").to_string();
        assert!(error.contains("num_key_value_heads"), "{error}");

        let mut json = base();
        json.as_object_mut().expect("object").remove("hidden_size");
        let error = parse(json).expect_err("missing").to_string();
        assert!(
            error.contains("hidden_size") && error.contains("missing"),
            "{error}"
        );
    }
}
