//! Model weights in the safetensors format: strict loading into a [`VarStore`], and saving one
//! the way `transformers` saves a model.
//!
//! The format is small enough to read and write here: an 8-byte little-endian header length,
//! a JSON header mapping each tensor name to its dtype, shape and byte range, then the bytes.
//! Reading seeks to one tensor at a time, so loading a shard never holds the whole file in
//! memory, and every failure is an error naming the file and tensor, never a panic.
//!
//! Loading is strict, as `VarStore` names are the checkpoint's names: a tensor the model needs
//! but the checkpoint lacks, a tensor the checkpoint has but the model does not use, and a
//! tensor of another shape are each an error naming the tensors. Stored dtypes (f32, f16,
//! bf16, …) are converted to the dtype of the variable they fill.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use tch::nn::VarStore;
use tch::{Device, Kind, TchError, Tensor};

use super::config::{Config, CONFIG_FILE};

/// A checkpoint in one file.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// A sharded checkpoint's index: `weight_map` from tensor name to shard file.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// The largest header accepted, as in the reference implementation (100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// The header key holding free-form metadata rather than a tensor.
const METADATA_KEY: &str = "__metadata__";

/// Why weights could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// The folder holds no weights.
    #[error("{dir} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}")]
    NoWeights {
        /// The model folder.
        dir: PathBuf,
    },
    /// A file is not valid safetensors, or an index is not a valid index.
    #[error("{path} is not valid: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint lacks tensors the model needs.
    #[error("the checkpoint lacks {} tensor(s) the model needs: {}", .names.len(),
            .names.join(", "))]
    Missing {
        /// Their names, sorted.
        names: Vec<String>,
    },
    /// The checkpoint has tensors the model does not use.
    #[error("the checkpoint has {} tensor(s) the model does not use: {}", .names.len(),
            .names.join(", "))]
    Unexpected {
        /// Their names, sorted.
        names: Vec<String>,
    },
    /// A tensor has another shape than the model's variable.
    #[error("tensor {name} in {path} has shape {found:?}, the model expects {expected:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// The file it is in.
        path: PathBuf,
        /// The variable's shape.
        expected: Vec<i64>,
        /// The stored shape.
        found: Vec<i64>,
    },
    /// libtorch failed while converting or copying a tensor.
    #[error("libtorch failed on tensor {name}")]
    Torch {
        /// The tensor.
        name: String,
        /// What libtorch said.
        #[source]
        source: TchError,
    },
}

/// The dtype weights are saved in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    /// 32-bit floats.
    F32,
    /// bfloat16, the usual dtype of published checkpoints.
    BF16,
}

impl SaveDtype {
    fn kind(self) -> Kind {
        match self {
            SaveDtype::F32 => Kind::Float,
            SaveDtype::BF16 => Kind::BFloat16,
        }
    }

    /// The name `config.json` uses for it (`dtype`, formerly `torch_dtype`).
    pub fn config_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::BF16 => "bfloat16",
        }
    }
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<i64>,
    data_offsets: [u64; 2],
}

/// A tensor's place in a file, checked against the file's length.
#[derive(Clone, Debug)]
struct Entry {
    kind: Kind,
    shape: Vec<i64>,
    start: u64,
    len: usize,
}

/// The header of one safetensors file.
#[derive(Debug)]
struct Header {
    path: PathBuf,
    entries: BTreeMap<String, Entry>,
}

impl Header {
    /// Reads and checks the header of `path`.
    fn read(path: &Path) -> Result<Self, WeightsError> {
        let read_err = |source| WeightsError::Read {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(read_err)?;
        let file_len = file.metadata().map_err(read_err)?.len();

        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes).map_err(read_err)?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
            return Err(format_err(
                path,
                format!("header length {header_len} is impossible"),
            ));
        }
        let mut text = vec![0u8; header_len as usize];
        file.read_exact(&mut text).map_err(read_err)?;

        let raw: BTreeMap<String, Value> = serde_json::from_slice(&text)
            .map_err(|e| format_err(path, format!("header is not a JSON object: {e}")))?;
        let data_start = 8 + header_len;
        let entries = raw
            .into_iter()
            .filter(|(name, _)| name != METADATA_KEY)
            .map(|(name, value)| {
                let entry = entry(path, &name, value, data_start, file_len)?;
                Ok((name, entry))
            })
            .collect::<Result<_, WeightsError>>()?;
        Ok(Self {
            path: path.to_owned(),
            entries,
        })
    }

    /// Reads one tensor's bytes into a CPU tensor of its stored dtype.
    fn tensor(&self, file: &mut File, name: &str, entry: &Entry) -> Result<Tensor, WeightsError> {
        let read_err = |source| WeightsError::Read {
            path: self.path.clone(),
            source,
        };
        let mut bytes = vec![0u8; entry.len];
        file.seek(SeekFrom::Start(entry.start)).map_err(read_err)?;
        file.read_exact(&mut bytes).map_err(read_err)?;
        Tensor::f_from_data_size(&bytes, &entry.shape, entry.kind).map_err(|source| {
            WeightsError::Torch {
                name: name.to_owned(),
                source,
            }
        })
    }
}

/// Checks one header entry: a known dtype, a byte range inside the file that fits the shape.
fn entry(
    path: &Path,
    name: &str,
    value: Value,
    data_start: u64,
    file_len: u64,
) -> Result<Entry, WeightsError> {
    let bad = |reason: String| format_err(path, format!("tensor {name}: {reason}"));
    let raw = RawEntry::deserialize(value).map_err(|e| bad(e.to_string()))?;
    let kind =
        kind_of(&raw.dtype).ok_or_else(|| bad(format!("dtype {} unsupported", raw.dtype)))?;
    if raw.shape.iter().any(|&d| d < 0) {
        return Err(bad(format!("negative dimension in {:?}", raw.shape)));
    }

    let [begin, end] = raw.data_offsets;
    let numel = raw
        .shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64));
    let bytes = numel.and_then(|n| n.checked_mul(kind.elt_size_in_bytes() as u64));
    let in_file = end >= begin && data_start.checked_add(end).is_some_and(|e| e <= file_len);
    if !in_file || bytes != Some(end - begin) {
        let reason = format!(
            "byte range {begin}..{end} does not hold shape {:?}",
            raw.shape
        );
        return Err(bad(reason));
    }
    Ok(Entry {
        kind,
        shape: raw.shape,
        start: data_start + begin,
        len: (end - begin) as usize,
    })
}

fn format_err(path: &Path, reason: String) -> WeightsError {
    WeightsError::Format {
        path: path.to_owned(),
        reason,
    }
}

fn kind_of(dtype: &str) -> Option<Kind> {
    let kind = match dtype {
        "F64" => Kind::Double,
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        _ => return None,
    };
    Some(kind)
}

fn dtype_name(kind: Kind) -> Option<&'static str> {
    let name = match kind {
        Kind::Double => "F64",
        Kind::Float => "F32",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Int16 => "I16",
        Kind::Int8 => "I8",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        _ => return None,
    };
    Some(name)
}

/// The weight files of a model folder: `model.safetensors`, or the shards its index names.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if !index.is_file() {
        return Err(WeightsError::NoWeights {
            dir: dir.to_owned(),
        });
    }

    let text = fs::read_to_string(&index).map_err(|source| WeightsError::Read {
        path: index.clone(),
        source,
    })?;
    let parsed: IndexFile = serde_json::from_str(&text)
        .map_err(|e| format_err(&index, format!("no `weight_map` of names to files: {e}")))?;
    let shards: BTreeSet<String> = parsed.weight_map.into_values().collect();
    Ok(shards.into_iter().map(|shard| dir.join(shard)).collect())
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

/// Fills every variable of `vs` from the checkpoint in `dir`, strictly.
///
/// Checkpoint tensors for which `ignore(name)` is true are skipped (say, the `inv_freq`
/// buffers old checkpoints carry). Names, shapes and dtypes are all checked, over every shard,
/// before any variable is written.
pub fn load(vs: &VarStore, dir: &Path, ignore: impl Fn(&str) -> bool) -> Result<(), WeightsError> {
    load_files(vs, &weight_files(dir)?, ignore)
}

/// Fills every variable of `vs` from the safetensors `files` together, strictly, as [`load`].
pub fn load_files(
    vs: &VarStore,
    files: &[PathBuf],
    ignore: impl Fn(&str) -> bool,
) -> Result<(), WeightsError> {
    let headers = files
        .iter()
        .map(|path| Header::read(path))
        .collect::<Result<Vec<_>, _>>()?;
    let variables = vs.variables();
    check_names(&variables, &headers, &ignore)?;

    for header in &headers {
        let mut file = File::open(&header.path).map_err(|source| WeightsError::Read {
            path: header.path.clone(),
            source,
        })?;
        for (name, entry) in &header.entries {
            if let Some(var) = variables.get(name) {
                let stored = header.tensor(&mut file, name, entry)?;
                copy_into(name, var, &stored)?;
            }
        }
    }
    Ok(())
}

/// Checks that the checkpoint holds exactly the model's variables, once each, in their shapes.
fn check_names(
    variables: &std::collections::HashMap<String, Tensor>,
    headers: &[Header],
    ignore: &impl Fn(&str) -> bool,
) -> Result<(), WeightsError> {
    let mut seen = BTreeSet::new();
    let mut unexpected = Vec::new();
    for header in headers {
        for (name, entry) in &header.entries {
            if !seen.insert(name.as_str()) {
                let reason = format!("tensor {name} is also in another shard");
                return Err(format_err(&header.path, reason));
            }
            match variables.get(name) {
                Some(var) => check_shape(name, var, entry, &header.path)?,
                None if ignore(name) => {}
                None => unexpected.push(name.clone()),
            }
        }
    }
    if !unexpected.is_empty() {
        return Err(WeightsError::Unexpected { names: unexpected });
    }

    let mut missing: Vec<String> = variables
        .keys()
        .filter(|name| !seen.contains(name.as_str()))
        .cloned()
        .collect();
    missing.sort();
    match missing.is_empty() {
        true => Ok(()),
        false => Err(WeightsError::Missing { names: missing }),
    }
}

fn check_shape(name: &str, var: &Tensor, entry: &Entry, path: &Path) -> Result<(), WeightsError> {
    let expected = var.size();
    if expected == entry.shape {
        return Ok(());
    }
    Err(WeightsError::Shape {
        name: name.to_owned(),
        path: path.to_owned(),
        expected,
        found: entry.shape.clone(),
    })
}

/// Copies a stored tensor into a variable, converting dtype and device, outside autograd.
fn copy_into(name: &str, var: &Tensor, stored: &Tensor) -> Result<(), WeightsError> {
    let mut var = var.shallow_clone();
    tch::no_grad(|| var.f_copy_(stored)).map_err(|source| WeightsError::Torch {
        name: name.to_owned(),
        source,
    })
}

/// Writes every variable of `vs` to the safetensors file `path`, in `dtype`, sorted by name.
///
/// The file is written under a temporary name beside `path` and renamed when complete, so a
/// crash never leaves a truncated file under the final name. The header carries
/// `{"format": "pt"}`, as `transformers` writes it.
pub fn save(vs: &VarStore, path: &Path, dtype: SaveDtype) -> Result<(), WeightsError> {
    let variables: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let partial = path.with_extension("safetensors.partial");
    let write_err = |source| WeightsError::Write {
        path: partial.clone(),
        source,
    };

    let header = header_bytes(&variables, dtype.kind())?;
    let mut out = BufWriter::new(File::create(&partial).map_err(write_err)?);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(write_err)?;
    out.write_all(&header).map_err(write_err)?;
    for (name, var) in &variables {
        out.write_all(&tensor_bytes(name, var, dtype.kind())?)
            .map_err(write_err)?;
    }
    out.into_inner()
        .map_err(|e| write_err(e.into_error()))?
        .sync_all()
        .map_err(write_err)?;

    fs::rename(&partial, path).map_err(|source| WeightsError::Write {
        path: path.to_owned(),
        source,
    })
}

/// The JSON header for `variables` stored as `kind`, padded with spaces to 8 bytes.
fn header_bytes(variables: &BTreeMap<String, Tensor>, kind: Kind) -> Result<Vec<u8>, WeightsError> {
    let mut header = serde_json::Map::new();
    header.insert(METADATA_KEY.to_owned(), serde_json::json!({"format": "pt"}));
    let mut offset = 0u64;
    for (name, var) in variables {
        let dtype = match var.is_floating_point() {
            true => kind,
            false => var.kind(),
        };
        let name_of = dtype_name(dtype).ok_or_else(|| WeightsError::Torch {
            name: name.clone(),
            source: TchError::Convert(format!("safetensors cannot store {dtype:?}")),
        })?;
        let size = (var.numel() * dtype.elt_size_in_bytes()) as u64;
        let entry = serde_json::json!({
            "dtype": name_of,
            "shape": var.size(),
            "data_offsets": [offset, offset + size],
        });
        header.insert(name.clone(), entry);
        offset += size;
    }

    let mut bytes = serde_json::to_vec(&header).map_err(|e| WeightsError::Torch {
        name: "header".to_owned(),
        source: TchError::Convert(e.to_string()),
    })?;
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    Ok(bytes)
}

/// One variable's bytes, converted to `kind` when it is floating point.
fn tensor_bytes(name: &str, var: &Tensor, kind: Kind) -> Result<Vec<u8>, WeightsError> {
    let torch_err = |source| WeightsError::Torch {
        name: name.to_owned(),
        source,
    };
    let stored = match var.is_floating_point() {
        true => var.f_to_kind(kind).map_err(torch_err)?,
        false => var.shallow_clone(),
    };
    let stored = stored.f_to_device(Device::Cpu).map_err(torch_err)?;
    let numel = stored.numel();
    let mut bytes = vec![0u8; numel * stored.kind().elt_size_in_bytes()];
    stored
        .f_copy_data_u8(&mut bytes, numel)
        .map_err(torch_err)?;
    Ok(bytes)
}

/// Saves a model folder `transformers` loads unchanged: `model.safetensors` in `dtype` and
/// `config.json`, the loaded file with its `dtype` set to what was saved.
///
/// A tied `lm_head` is no variable of its own, so it is not written twice.
pub fn save_pretrained(
    vs: &VarStore,
    config: &Config,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<(), WeightsError> {
    fs::create_dir_all(dir).map_err(|source| WeightsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    save(vs, &dir.join(WEIGHTS_FILE), dtype)?;

    let mut json = config.json.clone();
    if let Some(fields) = json.as_object_mut() {
        fields.insert("dtype".to_owned(), dtype.config_name().into());
        if fields.contains_key("torch_dtype") {
            fields.insert("torch_dtype".to_owned(), dtype.config_name().into());
        }
    }
    let path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&json).unwrap_or_else(|_| json.to_string());
    fs::write(&path, text + "\n").map_err(|source| WeightsError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(names: &[(&str, &[i64])]) -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        for (name, dims) in names {
            let (parent, leaf) = name.rsplit_once('.').unwrap_or(("", name));
            let mut path = vs.root();
            for part in parent.split('.').filter(|p| !p.is_empty()) {
                path = path / part;
            }
            let _ = path.randn_standard(leaf, dims);
        }
        vs
    }

    fn values(vs: &VarStore, name: &str) -> Vec<f32> {
        let var = vs.variables().remove(name).expect("variable exists");
        Vec::<f32>::try_from(var.to_kind(Kind::Float).flatten(0, -1)).expect("f32 values")
    }

    #[test]
    fn save_then_load_restores_every_variable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names: &[(&str, &[i64])] = &[("a.weight", &[3, 4]), ("b.c.bias", &[5])];
        let source = store(names);
        save(&source, &dir.path().join(WEIGHTS_FILE), SaveDtype::F32).expect("save");

        let target = store(names);
        load(&target, dir.path(), |_| false).expect("load");
        for (name, _) in names {
            assert_eq!(values(&source, name), values(&target, name), "{name}");
        }
    }

    #[test]
    fn saved_files_read_back_with_tch_own_reader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(WEIGHTS_FILE);
        let source = store(&[("x.weight", &[2, 3]), ("y", &[7])]);
        save(&source, &path, SaveDtype::BF16).expect("save");

        let read = Tensor::read_safetensors(&path).expect("tch reads it");
        assert_eq!(read.len(), 2);
        for (name, tensor) in read {
            assert_eq!(tensor.kind(), Kind::BFloat16, "{name}");
            let expected = source.variables()[&name].to_kind(Kind::BFloat16);
            assert!(tensor.equal(&expected), "{name}");
        }
    }

    #[test]
    fn bf16_weights_load_into_f32_variables_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = store(&[("w", &[4, 4])]);
        save(&source, &dir.path().join(WEIGHTS_FILE), SaveDtype::BF16).expect("save");

        let target = store(&[("w", &[4, 4])]);
        load(&target, dir.path(), |_| false).expect("load");
        let rounded = Tensor::from_slice(&values(&source, "w"))
            .to_kind(Kind::BFloat16)
            .to_kind(Kind::Float);
        let rounded = Vec::<f32>::try_from(rounded).expect("f32 values");
        assert_ne!(
            values(&source, "w"),
            rounded,
            "bf16 rounding changes random values"
        );
        assert_eq!(values(&target, "w"), rounded);
        assert_eq!(target.variables()["w"].kind(), Kind::Float);
    }

    #[test]
    fn missing_unexpected_and_misshaped_tensors_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let saved = store(&[("a", &[2]), ("b", &[3])]);
        save(&saved, &dir.path().join(WEIGHTS_FILE), SaveDtype::F32).expect("save");

        let error = load(
            &store(&[("a", &[2]), ("b", &[3]), ("c", &[1])]),
            dir.path(),
            |_| false,
        )
        .expect_err("c is missing");
        assert!(
            matches!(&error, WeightsError::Missing { names } if names == &["c"]),
            "{error}"
        );

        let error = load(&store(&[("a", &[2])]), dir.path(), |_| false).expect_err("b unused");
        assert!(matches!(&error, WeightsError::Unexpected { names } if names == &["b"]));
        load(&store(&[("a", &[2])]), dir.path(), |name| name == "b").expect("b ignored");

        let error = load(&store(&[("a", &[2]), ("b", &[4])]), dir.path(), |_| false)
            .expect_err("b misshaped");
        let text = error.to_string();
        assert!(
            text.contains("tensor b") && text.contains("[3]") && text.contains("[4]"),
            "{text}"
        );
    }

    #[test]
    fn sharded_checkpoints_load_through_their_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = store(&[("a", &[2])]);
        let second = store(&[("b", &[3])]);
        save(
            &first,
            &dir.path().join("model-00001-of-00002.safetensors"),
            SaveDtype::F32,
        )
        .expect("save");
        save(
            &second,
            &dir.path().join("model-00002-of-00002.safetensors"),
            SaveDtype::F32,
        )
        .expect("save");
        let index = serde_json::json!({"metadata": {}, "weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}});
        fs::write(dir.path().join(WEIGHTS_INDEX_FILE), index.to_string()).expect("index");

        let target = store(&[("a", &[2]), ("b", &[3])]);
        load(&target, dir.path(), |_| false).expect("load");
        assert_eq!(values(&target, "a"), values(&first, "a"));
        assert_eq!(values(&target, "b"), values(&second, "b"));
    }

    #[test]
    fn corrupt_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(WEIGHTS_FILE);
        save(&store(&[("a", &[64])]), &path, SaveDtype::F32).expect("save");
        let bytes = fs::read(&path).expect("read");

        fs::write(&path, &bytes[..bytes.len() - 4]).expect("cut");
        let error = load(&store(&[("a", &[64])]), dir.path(), |_| false).expect_err("short");
        assert!(error.to_string().contains("does not hold shape"), "{error}");

        fs::write(&path, &bytes[..6]).expect("cut");
        load(&store(&[("a", &[64])]), dir.path(), |_| false).expect_err("no header");
        assert!(matches!(
            load(&store(&[]), &dir.path().join("nowhere"), |_| false),
            Err(WeightsError::NoWeights { .. })
        ));
    }

    #[test]
    fn loading_fills_variables_without_recording_gradients() {
        let dir = tempfile::tempdir().expect("tempdir");
        save(
            &store(&[("w", &[3])]),
            &dir.path().join(WEIGHTS_FILE),
            SaveDtype::F32,
        )
        .expect("save");
        let target = store(&[("w", &[3])]);
        load(&target, dir.path(), |_| false).expect("load");
        let var = target.variables().remove("w").expect("w");
        assert!(var.requires_grad() && var.is_leaf());
    }
}
