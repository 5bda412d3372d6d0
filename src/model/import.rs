//! `rebeld import gguf`: a Hugging Face model folder from a llama-architecture GGUF file.
//!
//! The folder is what [`Llama::from_pretrained`] and [`PolicyTokenizer::from_dir`] read, and
//! what `transformers` loads:
//!
//! - `config.json` from the `llama.*` metadata; the embeddings are tied when the file has no
//!   `output.weight`;
//! - `model.safetensors`: every tensor dequantized (see [`super::gguf`]) and renamed; the
//!   query and key projections are un-permuted, since llama.cpp's converter interleaves the
//!   two halves of each head that the Hugging Face rotary layout keeps apart;
//! - `tokenizer.json`, a byte-level BPE built from `tokenizer.ggml.tokens` and `.merges`,
//!   with the tokens typed control (special) or user-defined as added tokens, and the
//!   pre-tokenizer that `tokenizer.ggml.pre` names;
//! - `tokenizer_config.json` with `tokenizer.chat_template` and the special tokens, and
//!   `generation_config.json` with the stop ids.
//!
//! The folder is written under a temporary name beside `OUT_DIR` and renamed when complete.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use super::config::Config;
use super::gguf::{GgufError, GgufFile, TensorInfo};
use super::llama::{Llama, ModelError};
use super::tokenizer::{
    PolicyTokenizer, TokenizerError, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
};
use super::weights::SaveDtype;

/// llama.cpp's token types that become added tokens.
const TOKEN_CONTROL: i128 = 3;
const TOKEN_USER_DEFINED: i128 = 4;

/// The pre-tokenizer regex of Llama 3 (`tokenizer.ggml.pre = llama-bpe`).
const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// Why a GGUF file could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be read or parsed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// `general.architecture` is not one this importer converts.
    #[error("unsupported GGUF architecture {0:?} (supported: llama)")]
    Architecture(String),
    /// `tokenizer.ggml.model` is not byte-level BPE.
    #[error("unsupported GGUF tokenizer model {0:?} (supported: gpt2, byte-level BPE)")]
    TokenizerModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this importer does not know.
    #[error(
        "unsupported GGUF pre-tokenizer {0:?} \
         (supported: default, gpt2, smollm, starcoder, refact, codeshell, llama-bpe)"
    )]
    PreTokenizer(String),
    /// A tensor has a name that maps to no Hugging Face parameter.
    #[error("GGUF tensor {0} has no counterpart in the Hugging Face Llama layout")]
    UnknownTensor(String),
    /// A tensor's shape does not match what the metadata implies.
    #[error("GGUF tensor {tensor} has shape {found:?}; the metadata implies {expected:?}")]
    Shape {
        /// The GGUF tensor.
        tensor: String,
        /// The shape of the parameter it fills.
        expected: Vec<i64>,
        /// Its shape in the file.
        found: Vec<i64>,
    },
    /// Parameters that no tensor of the file fills.
    #[error("the GGUF file lacks tensors for {}", .0.join(", "))]
    MissingTensors(Vec<String>),
    /// A metadata value cannot be used.
    #[error("GGUF metadata `{key}`: {reason}")]
    Metadata {
        /// The key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The output folder already exists.
    #[error("{0} already exists; remove it or choose another folder")]
    Exists(PathBuf),
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// The converted config or weights are not a model rebeld can build.
    #[error("the converted model is not valid")]
    Model(#[from] ModelError),
    /// The converted tokenizer files do not load.
    #[error("the converted tokenizer is not valid")]
    Tokenizer(#[from] TokenizerError),
    /// libtorch failed on a tensor.
    #[error("libtorch failed on tensor {tensor}")]
    Torch {
        /// The GGUF tensor.
        tensor: String,
        /// What libtorch said.
        #[source]
        source: tch::TchError,
    },
}

/// What an import wrote.
#[derive(Clone, Debug)]
pub struct ImportSummary {
    /// The model folder.
    pub dir: PathBuf,
    /// Tensors converted.
    pub tensors: usize,
    /// Parameters written.
    pub parameters: i64,
    /// Vocabulary size of the tokenizer.
    pub vocab_size: usize,
}

/// Converts `gguf_path` into a new Hugging Face model folder `out`, weights saved in `dtype`.
pub fn import_gguf(
    gguf_path: &Path,
    out: &Path,
    dtype: SaveDtype,
) -> Result<ImportSummary, ImportError> {
    if out.exists() {
        return Err(ImportError::Exists(out.to_owned()));
    }
    let gguf = GgufFile::open(gguf_path)?;
    let architecture = gguf.string("general.architecture")?;
    if architecture != "llama" {
        return Err(ImportError::Architecture(architecture.to_owned()));
    }
    let config_json = hf_config(&gguf)?;
    let config = Config::from_json_str(&config_json.to_string()).map_err(ModelError::from)?;

    let (vs, model, tensors) = convert_weights(&gguf, &config)?;
    let partial = partial_dir(out);
    let _ = fs::remove_dir_all(&partial);
    let written = write_folder(&gguf, &vs, &model, &partial, dtype);
    let tokenizer = match written {
        Ok(tokenizer) => tokenizer,
        Err(error) => {
            let _ = fs::remove_dir_all(&partial);
            return Err(error);
        }
    };
    fs::rename(&partial, out).map_err(|source| write_err(out, source))?;

    let parameters = vs.variables().values().map(|v| v.numel() as i64).sum();
    tracing::info!(
        gguf = %gguf_path.display(),
        dir = %out.display(),
        tensors,
        parameters,
        "imported GGUF model"
    );
    Ok(ImportSummary {
        dir: out.to_owned(),
        tensors,
        parameters,
        vocab_size: tokenizer.vocab_size(),
    })
}

/// Writes every file into `dir` and checks that the tokenizer files load.
fn write_folder(
    gguf: &GgufFile,
    vs: &VarStore,
    model: &Llama,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<PolicyTokenizer, ImportError> {
    model.save_pretrained(vs, dir, dtype)?;
    write_tokenizer_files(gguf, dir)?;
    Ok(PolicyTokenizer::from_dir(dir)?)
}

fn partial_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

fn write_err(path: &Path, source: io::Error) -> ImportError {
    ImportError::Write {
        path: path.to_owned(),
        source,
    }
}

fn metadata_err(key: &'static str, reason: impl Into<String>) -> ImportError {
    ImportError::Metadata {
        key,
        reason: reason.into(),
    }
}

/// `config.json` for `LlamaForCausalLM` from the `llama.*` metadata.
fn hf_config(gguf: &GgufFile) -> Result<Value, ImportError> {
    let hidden = gguf.uint("llama.embedding_length")?;
    let heads = gguf.uint("llama.attention.head_count")?;
    let kv_heads = gguf
        .opt_uint("llama.attention.head_count_kv")?
        .unwrap_or(heads);
    let head_dim = match gguf.opt_uint("llama.rope.dimension_count")? {
        Some(dim) => dim,
        None if heads > 0 => hidden / heads,
        None => return Err(metadata_err("llama.attention.head_count", "is 0")),
    };
    let embed = tensor(gguf, "token_embd.weight")
        .ok_or_else(|| ImportError::MissingTensors(vec!["token_embd.weight".to_owned()]))?;
    let vocab_size = match gguf.opt_uint("llama.vocab_size")? {
        Some(v) => v,
        None => embed.dims.get(1).copied().unwrap_or(0),
    };
    let special = SpecialIds::read(gguf)?;
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": gguf.uint("llama.feed_forward_length")?,
        "num_hidden_layers": gguf.uint("llama.block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": gguf.opt_float("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        "vocab_size": vocab_size,
        "max_position_embeddings": gguf.opt_uint("llama.context_length")?.unwrap_or(2048),
        "rope_theta": gguf.opt_float("llama.rope.freq_base")?.unwrap_or(10_000.0),
        "tie_word_embeddings": tensor(gguf, "output.weight").is_none(),
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
    });
    if let Some(scaling) = rope_scaling(gguf)? {
        config["rope_scaling"] = scaling;
    }
    Ok(config)
}

fn rope_scaling(gguf: &GgufFile) -> Result<Option<Value>, ImportError> {
    match gguf.opt_string("llama.rope.scaling.type")? {
        None | Some("none") => Ok(None),
        Some("linear") => {
            let factor = gguf
                .opt_float("llama.rope.scaling.factor")?
                .ok_or_else(|| metadata_err("llama.rope.scaling.factor", "missing"))?;
            Ok(Some(json!({"rope_type": "linear", "factor": factor})))
        }
        Some(other) => Err(metadata_err(
            "llama.rope.scaling.type",
            format!("{other:?} is not supported (supported: none, linear)"),
        )),
    }
}

fn tensor<'a>(gguf: &'a GgufFile, name: &str) -> Option<&'a TensorInfo> {
    gguf.tensors().iter().find(|t| t.name == name)
}

/// The Hugging Face name of a GGUF tensor, and whether it is a rotary-permuted projection
/// (`Some(heads)` with the head count that permutation used).
fn hf_name(name: &str, config: &Config) -> Option<(String, Option<i64>)> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(top) = top {
        return Some((top.to_owned(), None));
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: u64 = layer.parse().ok()?;
    let (module, param) = rest.split_once('.')?;
    let (hf_module, heads) = match module {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "attn_q" => ("self_attn.q_proj", Some(config.num_attention_heads)),
        "attn_k" => ("self_attn.k_proj", Some(config.num_key_value_heads)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return None,
    };
    let full = format!("model.layers.{layer}.{hf_module}.{param}");
    Some((full, heads))
}

/// Dequantizes every tensor into a fresh f32 model, checking names and shapes; returns the
/// store, the model and the number of tensors converted.
fn convert_weights(
    gguf: &GgufFile,
    config: &Config,
) -> Result<(VarStore, Llama, usize), ImportError> {
    let vs = VarStore::new(Device::Cpu);
    let model = Llama::load(&vs.root(), config)?;
    let variables = vs.variables();
    let mut unfilled: std::collections::BTreeSet<String> = variables.keys().cloned().collect();
    let mut file = File::open(gguf.path()).map_err(|source| GgufError::Read {
        path: gguf.path().to_owned(),
        source,
    })?;

    for info in gguf.tensors() {
        let (name, heads) = hf_name(&info.name, config)
            .ok_or_else(|| ImportError::UnknownTensor(info.name.clone()))?;
        let var = variables
            .get(&name)
            .ok_or_else(|| ImportError::UnknownTensor(info.name.clone()))?;
        if var.size() != info.shape() {
            return Err(ImportError::Shape {
                tensor: info.name.clone(),
                expected: var.size(),
                found: info.shape(),
            });
        }
        let values = gguf.read_f32(&mut file, info)?;
        let torch_err = |source| ImportError::Torch {
            tensor: info.name.clone(),
            source,
        };
        let mut tensor = Tensor::f_from_slice(&values)
            .and_then(|t| t.f_reshape(info.shape()))
            .map_err(torch_err)?;
        if let Some(heads) = heads {
            tensor = unpermute_rotary(&tensor, heads).map_err(torch_err)?;
        }
        let mut var = var.shallow_clone();
        tch::no_grad(|| var.f_copy_(&tensor)).map_err(torch_err)?;
        unfilled.remove(&name);
    }
    if !unfilled.is_empty() {
        return Err(ImportError::MissingTensors(unfilled.into_iter().collect()));
    }
    Ok((vs, model, gguf.tensors().len()))
}

/// Undoes llama.cpp's rotary permutation of a `[heads * head_dim, in]` projection.
///
/// llama.cpp's converter views the rows of each head as `[2, head_dim / 2]` (the two halves
/// `rotate_half` pairs) and transposes them to `[head_dim / 2, 2]`, so that pairs sit side by
/// side; this transposes them back.
pub fn unpermute_rotary(weight: &Tensor, heads: i64) -> Result<Tensor, tch::TchError> {
    let size = weight.size();
    let rows = size.first().copied().unwrap_or(0);
    let half = rows / heads / 2;
    let mut grouped = vec![heads, half, 2];
    grouped.extend_from_slice(&size[1..]);
    weight
        .f_reshape(grouped.as_slice())?
        .f_transpose(1, 2)?
        .f_contiguous()?
        .f_reshape(size.as_slice())
}

/// The special token ids the metadata names.
#[derive(Debug)]
struct SpecialIds {
    bos: Option<u64>,
    eos: Value,
    eos_first: Option<u64>,
    pad: Option<u64>,
    unk: Option<u64>,
}

impl SpecialIds {
    fn read(gguf: &GgufFile) -> Result<Self, ImportError> {
        let eos = gguf.opt_uint("tokenizer.ggml.eos_token_id")?;
        let mut stops: Vec<u64> = eos.into_iter().collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = gguf.opt_uint(key)? {
                if !stops.contains(&id) {
                    stops.push(id);
                }
            }
        }
        let eos_value = match stops.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        Ok(Self {
            bos: gguf.opt_uint("tokenizer.ggml.bos_token_id")?,
            eos: eos_value,
            eos_first: stops.first().copied(),
            pad: gguf.opt_uint("tokenizer.ggml.padding_token_id")?,
            unk: gguf.opt_uint("tokenizer.ggml.unknown_token_id")?,
        })
    }
}

/// Writes `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` into `dir`.
fn write_tokenizer_files(gguf: &GgufFile, dir: &Path) -> Result<(), ImportError> {
    let model = gguf.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(ImportError::TokenizerModel(model.to_owned()));
    }
    let tokens = gguf.strings("tokenizer.ggml.tokens")?;
    let types = gguf
        .opt_ints("tokenizer.ggml.token_type")?
        .unwrap_or_default();
    let merges = gguf.strings("tokenizer.ggml.merges")?;
    let pre = gguf.opt_string("tokenizer.ggml.pre")?;
    let tokenizer = tokenizer_json(&tokens, &types, &merges, pre_tokenizer(pre)?);
    write_json(&dir.join(TOKENIZER_FILE), &tokenizer)?;

    let special = SpecialIds::read(gguf)?;
    let config = tokenizer_config(gguf, &tokens, &types, &special)?;
    write_json(&dir.join(TOKENIZER_CONFIG_FILE), &config)?;

    let generation = json!({
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
    });
    write_json(&dir.join(GENERATION_CONFIG_FILE), &generation)
}

/// `tokenizer_config.json`: the special tokens by name, the control tokens, the template.
fn tokenizer_config(
    gguf: &GgufFile,
    tokens: &[&str],
    types: &[i128],
    special: &SpecialIds,
) -> Result<Value, ImportError> {
    let mut config = Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    let add_bos = gguf.opt_bool("tokenizer.ggml.add_bos_token")?;
    config.insert("add_bos_token".into(), json!(add_bos.unwrap_or(false)));
    let named = [
        ("bos_token", special.bos, "tokenizer.ggml.bos_token_id"),
        (
            "eos_token",
            special.eos_first,
            "tokenizer.ggml.eos_token_id",
        ),
        ("pad_token", special.pad, "tokenizer.ggml.padding_token_id"),
        ("unk_token", special.unk, "tokenizer.ggml.unknown_token_id"),
    ];
    for (name, id, key) in named {
        let token = match id {
            None => Value::Null,
            Some(id) => tokens
                .get(id as usize)
                .map(|t| json!(t))
                .ok_or_else(|| metadata_err(key, format!("id {id} is outside the vocabulary")))?,
        };
        config.insert(name.into(), token);
    }
    let control: Vec<&str> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &kind)| kind == TOKEN_CONTROL)
        .map(|(token, _)| *token)
        .collect();
    config.insert("additional_special_tokens".into(), json!(control));
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(length) = gguf.opt_uint("llama.context_length")? {
        config.insert("model_max_length".into(), json!(length));
    }
    if let Some(template) = gguf.opt_string("tokenizer.chat_template")? {
        config.insert("chat_template".into(), json!(template));
    }
    Ok(Value::Object(config))
}

fn write_json(path: &Path, value: &Value) -> Result<(), ImportError> {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    fs::write(path, text + "\n").map_err(|source| write_err(path, source))
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
           "use_regex": use_regex})
}

/// The pre-tokenizer llama.cpp applies for `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: Option<&str>) -> Result<Value, ImportError> {
    match pre {
        None | Some("default") | Some("gpt2") => Ok(byte_level(true)),
        // llama.cpp splits every digit off before the GPT-2 regex for these vocabularies.
        Some("smollm" | "starcoder" | "refact" | "codeshell") => Ok(json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)],
        })),
        Some("llama-bpe" | "llama3") => Ok(json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated",
                 "invert": false},
                byte_level(false),
            ],
        })),
        Some(other) => Err(ImportError::PreTokenizer(other.to_owned())),
    }
}

/// A `tokenizers` byte-level BPE pipeline from the GGUF vocabulary.
fn tokenizer_json(tokens: &[&str], types: &[i128], merges: &[&str], pre: Value) -> Value {
    let alphabet = byte_alphabet();
    let vocab: Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (byte_level_spelling(token, &alphabet), json!(id)))
        .collect();
    let added: Vec<Value> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &kind))| kind == TOKEN_CONTROL || kind == TOKEN_USER_DEFINED)
        .map(|(id, (token, &kind))| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": kind == TOKEN_CONTROL})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                           "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    })
}

/// GPT-2's map from bytes to printable characters: printable Latin-1 bytes stand for
/// themselves, the others for the code points from 256 up, in byte order.
fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (byte, slot) in table.iter_mut().enumerate() {
        let printable = matches!(byte, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = match printable {
            true => byte as u32,
            false => {
                next += 1;
                next - 1
            }
        };
        *slot = char::from_u32(code).unwrap_or('\0');
    }
    table
}

/// A token as it appears in a byte-level vocabulary: unchanged when it is spelled in the
/// byte alphabet already (as GGUF vocabularies store them), else respelled byte by byte.
fn byte_level_spelling(token: &str, alphabet: &[char; 256]) -> String {
    if token.chars().all(|c| alphabet.contains(&c)) {
        return token.to_owned();
    }
    token.bytes().map(|b| alphabet[b as usize]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Content, Role, Turn};
    use crate::model::gguf::test_writer::{write, Kv, RawTensor};
    use crate::model::llama::testing::fixtures_dir;

    fn import_tiny(dir: &Path) -> PathBuf {
        let out = dir.join("tiny");
        let gguf = fixtures_dir().join("tiny-llama-gguf/tiny-llama.gguf");
        let summary = import_gguf(&gguf, &out, SaveDtype::F32).expect("import");
        assert_eq!(summary.tensors, 21);
        assert_eq!(summary.vocab_size, 512);
        out
    }

    fn tensors(path: &Path) -> std::collections::BTreeMap<String, Tensor> {
        Tensor::read_safetensors(path)
            .expect("safetensors")
            .into_iter()
            .collect()
    }

    #[test]
    fn imported_weights_equal_the_gguf_reference_dequantization() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = import_tiny(dir.path());
        let found = tensors(&out.join("model.safetensors"));
        let fixtures = fixtures_dir();
        let reference = tensors(&fixtures.join("tiny-llama-gguf/reference.safetensors"));
        assert_eq!(
            found.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>()
        );
        for (name, expected) in &reference {
            assert!(found[name].equal(expected), "{name} differs");
        }
        // Layer 0's queries were stored as F32: un-permuted, they are the source's exactly.
        let source = tensors(&fixtures.join("tiny-llama/model.safetensors"));
        let q = "model.layers.0.self_attn.q_proj.weight";
        assert!(found[q].equal(&source[q]));
    }

    #[test]
    fn unpermute_inverts_the_llama_cpp_permutation() {
        // Rows of one head [a0 a1 a2 a3 | b0 b1 b2 b3] are stored interleaved as
        // [a0 b0 a1 b1 a2 b2 a3 b3] by llama.cpp's converter.
        let stored: Vec<f32> = vec![0., 4., 1., 5., 2., 6., 3., 7., 8., 12., 9., 13., 10., 14.];
        let stored = [stored, vec![11., 15.]].concat();
        let weight = Tensor::from_slice(&stored).reshape([16, 1]);
        let restored = unpermute_rotary(&weight, 2).expect("unpermute");
        let values = Vec::<f32>::try_from(restored.flatten(0, -1)).expect("values");
        assert_eq!(values, (0..16).map(|i| i as f32).collect::<Vec<_>>());
    }

    #[test]
    fn imported_config_and_tokenizer_match_the_source_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = import_tiny(dir.path());
        let source_dir = fixtures_dir().join("tiny-llama");
        let (found, source) = (
            Config::from_dir(&out).expect("config"),
            Config::from_dir(&source_dir).expect("config"),
        );
        assert_eq!(
            (
                found.hidden_size,
                found.intermediate_size,
                found.num_hidden_layers
            ),
            (
                source.hidden_size,
                source.intermediate_size,
                source.num_hidden_layers
            )
        );
        assert_eq!(
            (
                found.num_attention_heads,
                found.num_key_value_heads,
                found.head_dim
            ),
            (
                source.num_attention_heads,
                source.num_key_value_heads,
                source.head_dim
            )
        );
        assert_eq!(found.vocab_size, source.vocab_size);
        assert_eq!(found.rope_theta, source.rope_theta);
        assert_eq!(found.rms_norm_eps as f32, source.rms_norm_eps as f32);
        assert_eq!(found.tie_word_embeddings, source.tie_word_embeddings);

        let imported = PolicyTokenizer::from_dir(&out).expect("imported tokenizer");
        let original = PolicyTokenizer::from_dir(&source_dir).expect("source tokenizer");
        assert_eq!(imported.eos_ids(), original.eos_ids());
        assert_eq!(imported.eos_id(), original.eos_id());
        assert_eq!(imported.pad_id(), original.pad_id());
        let texts = [
            "the cat writes a short story quickly",
            "Grüße 🙂 日本語 — €5 naïve résumé",
            "  two  spaces, tabs\tand\nnew lines <|im_end|> inside",
        ];
        for text in texts {
            let content = Content::Text(text.to_owned());
            assert_eq!(
                imported.encode_response(&content).expect("encode"),
                original.encode_response(&content).expect("encode"),
                "{text:?}"
            );
        }
        let prompt = Content::Messages(vec![
            Turn {
                role: Role::User,
                content: "What is the capital of France?".to_owned(),
            },
            Turn {
                role: Role::Assistant,
                content: "Paris.".to_owned(),
            },
            Turn {
                role: Role::User,
                content: "And of Italy?".to_owned(),
            },
        ]);
        assert_eq!(
            imported.encode_prompt(&prompt).expect("prompt"),
            original.encode_prompt(&prompt).expect("prompt")
        );
    }

    #[test]
    fn pre_tokenizers_follow_llama_cpp_and_unknown_ones_are_refused() {
        let tokens = ["a", "b", "ab", "1", "2", "Ġ", "Ċ", "ĊĊ", "<|end|>"];
        let types = [1, 1, 1, 1, 1, 1, 1, 1, 3];
        let encode = |pre: &str, text: &str| {
            let pre = pre_tokenizer(Some(pre)).expect("known");
            let json = tokenizer_json(&tokens, &types, &["a b", "Ċ Ċ"], pre);
            let tokenizer: tokenizers::Tokenizer =
                json.to_string().parse().expect("tokenizers loads it");
            let encoding = tokenizer.encode_fast(text, false).expect("encode");
            encoding.get_ids().to_vec()
        };
        // The GPT-2 regex leaves the last newline before a digit to the digit's piece...
        assert_eq!(encode("gpt2", "ab\n\n12<|end|>"), [2, 6, 6, 3, 4, 8]);
        // ...while SmolLM2's vocabulary splits digits off first, so the newlines merge.
        assert_eq!(encode("smollm", "ab\n\n12<|end|>"), [2, 7, 3, 4, 8]);
        assert_eq!(encode("llama-bpe", "ab ab"), [2, 5, 2]);
        assert!(matches!(
            pre_tokenizer(Some("tekken")),
            Err(ImportError::PreTokenizer(p)) if p == "tekken"
        ));
    }

    fn minimal(dir: &Path, architecture: &str, tensor: RawTensor<'_>) -> PathBuf {
        let path = dir.join(format!("{architecture}.gguf"));
        write(
            &path,
            &[
                ("general.architecture", Kv::Str(architecture)),
                ("llama.embedding_length", Kv::U32(32)),
                ("llama.feed_forward_length", Kv::U32(32)),
                ("llama.block_count", Kv::U32(1)),
                ("llama.attention.head_count", Kv::U32(2)),
            ],
            &[
                RawTensor {
                    name: "token_embd.weight",
                    dims: &[32, 4],
                    ggml_type: 0,
                    data: vec![0; 512],
                },
                tensor,
            ],
        );
        path
    }

    fn f32_tensor(name: &'static str, dims: &'static [u64]) -> RawTensor<'static> {
        let n: u64 = dims.iter().product();
        RawTensor {
            name,
            dims,
            ggml_type: 0,
            data: vec![0; 4 * n as usize],
        }
    }

    /// One Q5_K block (256 elements), a type the importer does not dequantize.
    fn q5k(name: &'static str, dims: &'static [u64]) -> RawTensor<'static> {
        RawTensor {
            name,
            dims,
            ggml_type: 13,
            data: vec![0; 176],
        }
    }

    #[test]
    fn unsupported_files_fail_naming_the_cause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let gpt2 = minimal(dir.path(), "gpt2", f32_tensor("output_norm.weight", &[32]));
        let error = import_gguf(&gpt2, &out, SaveDtype::F32).expect_err("gpt2");
        assert!(
            matches!(&error, ImportError::Architecture(a) if a == "gpt2"),
            "{error}"
        );

        let path = minimal(dir.path(), "llama", q5k("blk.0.attn_norm.weight", &[256]));
        let shape = import_gguf(&path, &out, SaveDtype::F32).expect_err("shape");
        assert!(
            matches!(&shape, ImportError::Shape { tensor, .. }
                if tensor == "blk.0.attn_norm.weight"),
            "{shape}"
        );

        let path = minimal(dir.path(), "llama", q5k("blk.0.ffn_norm.weight", &[32]));
        let error = import_gguf(&path, &out, SaveDtype::F32)
            .expect_err("Q5_K")
            .to_string();
        assert!(
            error.contains("blk.0.ffn_norm.weight") && error.contains("Q5_K"),
            "{error}"
        );

        let path = minimal(
            dir.path(),
            "llama",
            f32_tensor("blk.0.attn_sinks.weight", &[2]),
        );
        let error = import_gguf(&path, &out, SaveDtype::F32).expect_err("unknown");
        assert!(
            matches!(&error, ImportError::UnknownTensor(t) if t == "blk.0.attn_sinks.weight"),
            "{error}"
        );
        assert!(!out.exists() && !dir.path().join("out.partial").exists());

        std::fs::create_dir(&out).expect("mkdir");
        let tiny = fixtures_dir().join("tiny-llama-gguf/tiny-llama.gguf");
        let error = import_gguf(&tiny, &out, SaveDtype::F32).expect_err("exists");
        assert!(matches!(error, ImportError::Exists(_)), "{error}");
    }
}
