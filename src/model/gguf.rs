//! Reading GGUF files: the metadata, the tensor directory, and tensors dequantized to f32.
//!
//! The layout (version 2 and 3, little-endian): the magic `GGUF`, a version, the tensor and
//! metadata counts, the metadata as typed key/value pairs, one directory entry per tensor
//! (name, dimensions innermost first, ggml type, offset), then the tensor data, which starts
//! at the next multiple of `general.alignment` (32 by default).
//!
//! Dequantized types: F32, F16, BF16 and the 32-element block formats Q4_0, Q4_1 and Q8_0,
//! following ggml's reference dequantizers. Any other type is a [`GgufError::UnsupportedType`]
//! naming the tensor.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// `GGUF` read as a little-endian `u32`.
const MAGIC: u32 = 0x4655_4747;
/// The data alignment when the file does not set `general.alignment`.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Elements per block in Q4_0, Q4_1 and Q8_0.
const BLOCK: usize = 32;
/// A cap on a single string or array length, far above any real tokenizer's.
const MAX_ITEMS: u64 = 1 << 28;

/// Why a GGUF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// The bytes are not a GGUF file this reader understands.
    #[error("{path} is not a valid GGUF file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A metadata key the conversion needs is absent.
    #[error("GGUF metadata lacks `{key}`")]
    MissingKey {
        /// The key.
        key: String,
    },
    /// A metadata key holds another type than expected.
    #[error("GGUF metadata `{key}` is not {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// What was expected.
        expected: &'static str,
    },
    /// A tensor is stored in a ggml type that is not dequantized here.
    #[error(
        "tensor {tensor} is stored as {ggml_type}, which is not supported \
         (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0)"
    )]
    UnsupportedType {
        /// The tensor.
        tensor: String,
        /// The ggml type's name, or its number when unknown.
        ggml_type: String,
    },
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// Any integer type, widened.
    Int(i128),
    /// `f32` or `f64`, widened.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array of values of one type.
    Array(Vec<MetaValue>),
}

/// How a tensor's elements are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit floats.
    F32,
    /// IEEE half floats.
    F16,
    /// bfloat16.
    Bf16,
    /// Blocks of 32: an f16 scale and 4-bit values offset by 8.
    Q4_0,
    /// Blocks of 32: an f16 scale, an f16 minimum and 4-bit values.
    Q4_1,
    /// Blocks of 32: an f16 scale and 8-bit signed values.
    Q8_0,
    /// A type not dequantized here, by its ggml number.
    Other(u32),
}

impl GgmlType {
    fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::Bf16,
            other => Self::Other(other),
        }
    }

    /// The name ggml uses (`Q4_1`, …); unknown types by number.
    pub fn name(self) -> String {
        let known = match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
            Self::Other(id) => return other_type_name(id),
        };
        known.to_owned()
    }

    /// `(elements, bytes)` of one storage block, or `None` for unsupported types.
    fn block(self) -> Option<(usize, usize)> {
        match self {
            Self::F32 => Some((1, 4)),
            Self::F16 | Self::Bf16 => Some((1, 2)),
            Self::Q4_0 => Some((BLOCK, 2 + BLOCK / 2)),
            Self::Q4_1 => Some((BLOCK, 4 + BLOCK / 2)),
            Self::Q8_0 => Some((BLOCK, 2 + BLOCK)),
            Self::Other(_) => None,
        }
    }
}

fn other_type_name(id: u32) -> String {
    let name = match id {
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        _ => return format!("ggml type {id}"),
    };
    name.to_owned()
}

/// One entry of the tensor directory.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// The GGUF name (`blk.0.attn_q.weight`, …).
    pub name: String,
    /// The dimensions, innermost (contiguous) first, as ggml orders them.
    pub dims: Vec<u64>,
    /// The storage type.
    pub ggml_type: GgmlType,
    /// Where the data starts, from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The shape in PyTorch order (outermost first).
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    /// The number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A GGUF file's metadata and tensor directory; tensor data is read on demand.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    data_start: u64,
}

impl GgufFile {
    /// Reads the header of `path` and checks every tensor's byte range against the file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = File::open(path).map_err(|source| read_err(path, source))?;
        let file_len = file
            .metadata()
            .map_err(|source| read_err(path, source))?
            .len();
        let mut reader = Reader {
            inner: BufReader::new(file),
            path,
            file_len,
        };
        let (metadata, tensors) = reader.header()?;
        let alignment = match metadata.get("general.alignment") {
            Some(MetaValue::Int(a)) if *a > 0 => *a as u64,
            _ => DEFAULT_ALIGNMENT,
        };
        let position = reader.position()?;
        let gguf = Self {
            path: path.to_owned(),
            metadata,
            tensors,
            data_start: position.next_multiple_of(alignment),
        };
        gguf.check_ranges(file_len)?;
        Ok(gguf)
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every metadata key and value.
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// The tensor directory, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A required string.
    pub fn string(&self, key: &str) -> Result<&str, GgufError> {
        self.opt_string(key)?.ok_or_else(|| missing(key))
    }

    /// An optional string.
    pub fn opt_string(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Str(s)) => Ok(Some(s)),
            Some(_) => Err(wrong_type(key, "a string")),
        }
    }

    /// An optional non-negative integer.
    pub fn opt_uint(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Int(v)) if *v >= 0 && *v <= u64::MAX as i128 => Ok(Some(*v as u64)),
            Some(_) => Err(wrong_type(key, "a non-negative integer")),
        }
    }

    /// A required non-negative integer.
    pub fn uint(&self, key: &str) -> Result<u64, GgufError> {
        self.opt_uint(key)?.ok_or_else(|| missing(key))
    }

    /// An optional number (integer or float).
    pub fn opt_float(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Float(v)) => Ok(Some(*v)),
            Some(MetaValue::Int(v)) => Ok(Some(*v as f64)),
            Some(_) => Err(wrong_type(key, "a number")),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(wrong_type(key, "a boolean")),
        }
    }

    /// A required array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let MetaValue::Array(items) = self.require(key)? else {
            return Err(wrong_type(key, "an array of strings"));
        };
        items
            .iter()
            .map(|item| match item {
                MetaValue::Str(s) => Ok(s.as_str()),
                _ => Err(wrong_type(key, "an array of strings")),
            })
            .collect()
    }

    /// An optional array of integers.
    pub fn opt_ints(&self, key: &str) -> Result<Option<Vec<i128>>, GgufError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let MetaValue::Array(items) = value else {
            return Err(wrong_type(key, "an array of integers"));
        };
        let ints = items.iter().map(|item| match item {
            MetaValue::Int(v) => Ok(*v),
            _ => Err(wrong_type(key, "an array of integers")),
        });
        ints.collect::<Result<Vec<_>, _>>().map(Some)
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key).ok_or_else(|| missing(key))
    }

    /// Reads one tensor and dequantizes it to f32, in ggml element order (innermost first,
    /// which is PyTorch's row-major order for [`TensorInfo::shape`]).
    pub fn read_f32(&self, file: &mut File, info: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        let nbytes = byte_len(info)?;
        let mut bytes = vec![0u8; nbytes as usize];
        file.seek(SeekFrom::Start(self.data_start + info.offset))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|source| read_err(&self.path, source))?;
        dequantize(info.ggml_type, &bytes).ok_or_else(|| unsupported(info))
    }

    fn check_ranges(&self, file_len: u64) -> Result<(), GgufError> {
        // Tensors of unsupported types are named when read, not here: their size is unknown.
        for info in self
            .tensors
            .iter()
            .filter(|t| t.ggml_type.block().is_some())
        {
            let end = byte_len(info)?
                .checked_add(self.data_start + info.offset)
                .filter(|&end| end <= file_len);
            if end.is_none() {
                let reason = format!("tensor {} runs past the end of the file", info.name);
                return Err(format_err(&self.path, reason));
            }
        }
        Ok(())
    }
}

/// Bytes of a tensor's data; an error for unsupported types or rows that split a block.
fn byte_len(info: &TensorInfo) -> Result<u64, GgufError> {
    let (per_block, block_bytes) = info.ggml_type.block().ok_or_else(|| unsupported(info))?;
    let row = info.dims.first().copied().unwrap_or(1);
    if row % per_block as u64 != 0 {
        return Err(GgufError::UnsupportedType {
            tensor: info.name.clone(),
            ggml_type: format!("{} with rows of {row} elements", info.ggml_type.name()),
        });
    }
    Ok(info.numel() / per_block as u64 * block_bytes as u64)
}

/// Dequantizes `bytes` of `kind` to f32; `None` for types not handled here.
///
/// The block formats follow ggml's `dequantize_row_*`: Q4_0 `(q - 8) d`, Q4_1 `q d + m`
/// (the low nibbles are elements 0..16 of a block, the high nibbles 16..32), Q8_0 `q d`.
pub fn dequantize(kind: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    let values = match kind {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => bytes.chunks_exact(2).map(|b| f16_at(b, 0)).collect(),
        GgmlType::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
            .collect(),
        GgmlType::Q4_0 => blocks(bytes, 18, |b, out| {
            nibbles(&b[2..], out, |q| (q - 8.0) * f16_at(b, 0))
        }),
        GgmlType::Q4_1 => blocks(bytes, 20, |b, out| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            nibbles(&b[4..], out, |q| q * d + m)
        }),
        GgmlType::Q8_0 => blocks(bytes, 34, |b, out| {
            let d = f16_at(b, 0);
            out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
        }),
        GgmlType::Other(_) => return None,
    };
    Some(values)
}

fn blocks(bytes: &[u8], size: usize, block: impl Fn(&[u8], &mut Vec<f32>)) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len() / size * BLOCK);
    for chunk in bytes.chunks_exact(size) {
        block(chunk, &mut out);
    }
    out
}

/// Expands 16 bytes of packed 4-bit values: low nibbles first, then high nibbles.
fn nibbles(qs: &[u8], out: &mut Vec<f32>, value: impl Fn(f32) -> f32) {
    out.extend(qs.iter().map(|&q| value(f32::from(q & 0x0F))));
    out.extend(qs.iter().map(|&q| value(f32::from(q >> 4))));
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

/// IEEE 754 half to single precision, exactly (subnormals, infinities and NaN included).
pub fn f16_to_f32(half: u16) -> f32 {
    let sign = u32::from(half >> 15) << 31;
    let exponent = u32::from((half >> 10) & 0x1F);
    let mantissa = u32::from(half & 0x3FF);
    let bits = match (exponent, mantissa) {
        (0, 0) => sign,
        (0, m) => {
            let magnitude = m as f32 * f32::from_bits(0x3380_0000); // m · 2⁻²⁴
            return f32::from_bits(sign | magnitude.to_bits());
        }
        (0x1F, m) => sign | 0x7F80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

fn read_err(path: &Path, source: io::Error) -> GgufError {
    GgufError::Read {
        path: path.to_owned(),
        source,
    }
}

fn format_err(path: &Path, reason: String) -> GgufError {
    GgufError::Format {
        path: path.to_owned(),
        reason,
    }
}

fn missing(key: &str) -> GgufError {
    GgufError::MissingKey {
        key: key.to_owned(),
    }
}

fn wrong_type(key: &str, expected: &'static str) -> GgufError {
    GgufError::WrongType {
        key: key.to_owned(),
        expected,
    }
}

fn unsupported(info: &TensorInfo) -> GgufError {
    GgufError::UnsupportedType {
        tensor: info.name.clone(),
        ggml_type: info.ggml_type.name(),
    }
}

/// Reads the header's primitive values, turning short reads into format errors.
struct Reader<'a> {
    inner: BufReader<File>,
    path: &'a Path,
    file_len: u64,
}

type Header = (BTreeMap<String, MetaValue>, Vec<TensorInfo>);

impl Reader<'_> {
    fn header(&mut self) -> Result<Header, GgufError> {
        if self.u32()? != MAGIC {
            return Err(self.bad("no GGUF magic".to_owned()));
        }
        let version = self.u32()?;
        if !(2..=3).contains(&version) {
            return Err(self.bad(format!("version {version} (supported: 2 and 3)")));
        }
        let tensor_count = self.count()?;
        let kv_count = self.count()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = self.string()?;
            let kind = self.u32()?;
            let value = self.value(kind)?;
            metadata.insert(key, value);
        }
        let tensors = (0..tensor_count)
            .map(|_| self.tensor_info())
            .collect::<Result<Vec<_>, _>>()?;
        Ok((metadata, tensors))
    }

    fn tensor_info(&mut self) -> Result<TensorInfo, GgufError> {
        let name = self.string()?;
        let n_dims = self.u32()?;
        if n_dims > 4 {
            return Err(self.bad(format!("tensor {name} has {n_dims} dimensions")));
        }
        let dims = (0..n_dims)
            .map(|_| self.u64())
            .collect::<Result<Vec<_>, _>>()?;
        let ggml_type = GgmlType::from_id(self.u32()?);
        let offset = self.u64()?;
        if dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .is_none()
        {
            return Err(self.bad(format!("tensor {name} has too many elements")));
        }
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        })
    }

    fn value(&mut self, kind: u32) -> Result<MetaValue, GgufError> {
        let value = match kind {
            0 => MetaValue::Int(self.bytes::<1>()?[0].into()),
            1 => MetaValue::Int((self.bytes::<1>()?[0] as i8).into()),
            2 => MetaValue::Int(u16::from_le_bytes(self.bytes()?).into()),
            3 => MetaValue::Int(i16::from_le_bytes(self.bytes()?).into()),
            4 => MetaValue::Int(self.u32()?.into()),
            5 => MetaValue::Int(i32::from_le_bytes(self.bytes()?).into()),
            6 => MetaValue::Float(f32::from_le_bytes(self.bytes()?).into()),
            7 => MetaValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                let item_kind = self.u32()?;
                let len = self.count()?;
                let items = (0..len)
                    .map(|_| self.value(item_kind))
                    .collect::<Result<Vec<_>, _>>()?;
                MetaValue::Array(items)
            }
            10 => MetaValue::Int(self.u64()?.into()),
            11 => MetaValue::Int(i64::from_le_bytes(self.bytes()?).into()),
            12 => MetaValue::Float(f64::from_le_bytes(self.bytes()?)),
            other => return Err(self.bad(format!("metadata value type {other}"))),
        };
        Ok(value)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.count()?;
        let mut bytes = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut bytes)
            .map_err(|e| self.short(e))?;
        String::from_utf8(bytes).map_err(|_| self.bad("a string is not UTF-8".to_owned()))
    }

    /// A length or count, bounded by the file's size so a corrupt one cannot exhaust memory.
    fn count(&mut self) -> Result<u64, GgufError> {
        let n = self.u64()?;
        match n <= MAX_ITEMS.min(self.file_len) {
            true => Ok(n),
            false => Err(self.bad(format!("impossible length {n}"))),
        }
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(|e| self.short(e))?;
        Ok(buf)
    }

    fn position(&mut self) -> Result<u64, GgufError> {
        self.inner
            .stream_position()
            .map_err(|source| read_err(self.path, source))
    }

    fn short(&self, error: io::Error) -> GgufError {
        match error.kind() {
            io::ErrorKind::UnexpectedEof => self.bad("the header is truncated".to_owned()),
            _ => read_err(self.path, error),
        }
    }

    fn bad(&self, reason: String) -> GgufError {
        format_err(self.path, reason)
    }
}

/// A minimal GGUF writer for tests: string and integer metadata, raw tensor bytes.
#[cfg(test)]
pub(crate) mod test_writer {
    use std::path::Path;

    /// A metadata value to write.
    pub(crate) enum Kv<'a> {
        Str(&'a str),
        U32(u32),
    }

    /// One tensor: name, dims innermost first, ggml type id, bytes.
    pub(crate) struct RawTensor<'a> {
        pub(crate) name: &'a str,
        pub(crate) dims: &'a [u64],
        pub(crate) ggml_type: u32,
        pub(crate) data: Vec<u8>,
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// Writes a version-3 file with 32-byte alignment.
    pub(crate) fn write(path: &Path, kvs: &[(&str, Kv<'_>)], tensors: &[RawTensor<'_>]) {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((kvs.len() as u64).to_le_bytes());
        for (key, value) in kvs {
            string(&mut out, key);
            match value {
                Kv::Str(s) => {
                    out.extend(8u32.to_le_bytes());
                    string(&mut out, s);
                }
                Kv::U32(v) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
            }
        }
        let mut offset = 0u64;
        for tensor in tensors {
            string(&mut out, tensor.name);
            out.extend((tensor.dims.len() as u32).to_le_bytes());
            for d in tensor.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(tensor.ggml_type.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (tensor.data.len() as u64).next_multiple_of(32);
        }
        out.resize(out.len().next_multiple_of(32), 0);
        for tensor in tensors {
            out.extend(&tensor.data);
            out.resize(out.len().next_multiple_of(32), 0);
        }
        std::fs::write(path, out).expect("write the test GGUF");
    }
}

#[cfg(test)]
mod tests {
    use super::test_writer::{write, Kv, RawTensor};
    use super::*;

    #[test]
    fn half_floats_convert_exactly() {
        assert_eq!(f16_to_f32(0x3C00), 1.0);
        assert_eq!(f16_to_f32(0xC000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95); // 1365/4096
        assert_eq!(f16_to_f32(0x7BFF), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03FF), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(f16_to_f32(0x7C00), f32::INFINITY);
        assert!(f16_to_f32(0x7E00).is_nan());
    }

    /// A block of 16 nibble bytes whose low nibble is `i % 16` and high nibble `15 - i % 16`.
    fn nibble_bytes() -> Vec<u8> {
        (0..16u8).map(|i| i | ((15 - i) << 4)).collect()
    }

    #[test]
    fn block_formats_follow_ggml() {
        // d = 0.5 (0x3800), m = -1 (0xBC00).
        let mut q4_0 = vec![0x00, 0x38];
        q4_0.extend(nibble_bytes());
        let values = dequantize(GgmlType::Q4_0, &q4_0).expect("Q4_0");
        let expected: Vec<f32> = (0..32)
            .map(|j| {
                let q = if j < 16 { j } else { 15 - (j - 16) };
                (q as f32 - 8.0) * 0.5
            })
            .collect();
        assert_eq!(values, expected);

        let mut q4_1 = vec![0x00, 0x38, 0x00, 0xBC];
        q4_1.extend(nibble_bytes());
        let values = dequantize(GgmlType::Q4_1, &q4_1).expect("Q4_1");
        let expected: Vec<f32> = expected
            .iter()
            .map(|v| (v / 0.5 + 8.0) * 0.5 - 1.0)
            .collect();
        assert_eq!(values, expected);

        let mut q8_0 = vec![0x00, 0x38];
        q8_0.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let values = dequantize(GgmlType::Q8_0, &q8_0).expect("Q8_0");
        let expected: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect();
        assert_eq!(values, expected);

        let bf16 = dequantize(GgmlType::Bf16, &[0x80, 0x3F, 0x40, 0xC0]).expect("BF16");
        assert_eq!(bf16, [1.0, -3.0]);
        assert_eq!(dequantize(GgmlType::Other(12), &[0; 144]), None);
    }

    #[test]
    fn reads_metadata_and_tensors_and_names_unsupported_types() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.gguf");
        let f32_data: Vec<u8> = [1.5f32, -2.0, 0.25, 8.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        write(
            &path,
            &[
                ("general.architecture", Kv::Str("llama")),
                ("llama.block_count", Kv::U32(2)),
            ],
            &[
                RawTensor {
                    name: "a.weight",
                    dims: &[2, 2],
                    ggml_type: 0,
                    data: f32_data,
                },
                RawTensor {
                    name: "k.weight",
                    dims: &[256],
                    ggml_type: 12,
                    data: vec![0; 144],
                },
            ],
        );
        let gguf = GgufFile::open(&path).expect("open");
        assert_eq!(gguf.string("general.architecture").expect("arch"), "llama");
        assert_eq!(gguf.uint("llama.block_count").expect("blocks"), 2);
        assert!(matches!(
            gguf.string("llama.block_count"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(matches!(
            gguf.uint("nope"),
            Err(GgufError::MissingKey { .. })
        ));
        let mut file = File::open(&path).expect("file");
        let a = &gguf.tensors()[0];
        assert_eq!(a.shape(), [2, 2]);
        assert_eq!(
            gguf.read_f32(&mut file, a).expect("a"),
            [1.5, -2.0, 0.25, 8.0]
        );
        let error = gguf
            .read_f32(&mut file, &gguf.tensors()[1])
            .expect_err("Q4_K");
        let text = error.to_string();
        assert!(text.contains("k.weight") && text.contains("Q4_K"), "{text}");
    }

    #[test]
    fn truncated_and_foreign_files_are_format_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.gguf");
        write(&path, &[("general.architecture", Kv::Str("llama"))], &[]);
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 40]).expect("truncate");
        assert!(matches!(
            GgufFile::open(&path),
            Err(GgufError::Format { .. })
        ));
        std::fs::write(&path, b"PK\x03\x04 not a gguf file at all").expect("write");
        let error = GgufFile::open(&path).expect_err("zip").to_string();
        assert!(error.contains("magic"), "{error}");
    }
}
