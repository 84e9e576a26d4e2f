//! Checkpoint tensors: `model.safetensors` or a sharded `model.safetensors.index.json`,
//! memory-mapped and converted once to f32 on request.
//!
//! Values are read with `from_le_bytes`, so tensors at misaligned offsets load as well as
//! aligned ones (the copy is the fallback and the rule: the compute layout is f32 anyway).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata, SafeTensors};

use crate::error::{Result, T5Error};

/// A tensor in host memory, f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The bytes of one safetensors file: a memory map or a borrowed static slice.
enum Bytes {
    Mapped(memmap2::Mmap),
    Static(&'static [u8]),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Static(s) => s,
        }
    }

    /// Drops the pages of `[start, end)` from this process's resident memory once a tensor
    /// was converted, so that loading never holds the file and its converted copy at once
    /// (peak memory is then the model, not twice the checkpoint). The pages stay in the OS
    /// page cache and fault back in if read again.
    fn release(&self, start: usize, end: usize) {
        #[cfg(unix)]
        if let Bytes::Mapped(m) = self {
            const PAGE: usize = 4096;
            let (lo, hi) = (start / PAGE * PAGE, end.div_ceil(PAGE) * PAGE);
            let hi = hi.min(m.len());
            if hi > lo {
                // SAFETY: the map is read-only and file-backed: dropped pages are re-read
                // from the file on the next access, so no data is lost. A failure only
                // means the memory stays resident.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo)
                };
            }
        }
        #[cfg(not(unix))]
        let _ = (start, end);
    }
}

struct Shard {
    name: String,
    bytes: Bytes,
    /// Offset of the data section (after the 8-byte length and the JSON header).
    data_start: usize,
    metadata: Metadata,
}

impl Shard {
    fn parse(name: String, bytes: Bytes) -> Result<Self> {
        let corrupt = |message: String| T5Error::Safetensors {
            path: PathBuf::from(&name),
            message,
        };
        // `deserialize` checks the header and that every tensor lies inside the file.
        SafeTensors::deserialize(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        Ok(Shard {
            name,
            bytes,
            data_start: 8 + header_len,
            metadata,
        })
    }
}

/// All tensors of a checkpoint, by name, still in their stored dtype until read.
pub struct TensorStore {
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
    description: String,
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = File::open(path).map_err(|e| T5Error::io(path, e))?;
    // SAFETY: the map is read-only; a checkpoint modified while loaded is the caller's bug,
    // as with every mmap-based loader.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| T5Error::io(path, e))
}

impl TensorStore {
    /// Opens the weights of a checkpoint directory.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            return Self::open_files(&[single], dir.display().to_string());
        }
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| T5Error::io(&index, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| T5Error::Json {
                    path: index.clone(),
                    message: e.to_string(),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| T5Error::Json {
                    path: index.clone(),
                    message: "no `weight_map` object".into(),
                })?;
            let mut files: Vec<PathBuf> = Vec::new();
            for file in map.values() {
                let name = file.as_str().ok_or_else(|| T5Error::Json {
                    path: index.clone(),
                    message: "`weight_map` values must be file names".into(),
                })?;
                let path = dir.join(name);
                if !files.contains(&path) {
                    files.push(path);
                }
            }
            files.sort();
            return Self::open_files(&files, dir.display().to_string());
        }
        let hint = if dir.join("pytorch_model.bin").is_file() {
            "this checkpoint only has pytorch_model.bin; convert it once with Python: \
             `T5ForConditionalGeneration.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`"
                .to_string()
        } else {
            "a checkpoint directory needs model.safetensors (or model.safetensors.index.json with its shards)"
                .to_string()
        };
        Err(T5Error::MissingFile { path: single, hint })
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open_files(&[path.to_path_buf()], path.display().to_string())
    }

    fn open_files(files: &[PathBuf], description: String) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        for path in files {
            if !path.is_file() {
                return Err(T5Error::MissingFile {
                    path: path.clone(),
                    hint: "listed in model.safetensors.index.json but absent; download every shard"
                        .into(),
                });
            }
            let bytes = Bytes::Mapped(map_file(path)?);
            shards.push(Shard::parse(path.display().to_string(), bytes)?);
        }
        Self::from_shards(shards, description)
    }

    /// Reads weights from bytes that live for the whole program (a model built into the binary).
    pub fn from_static(bytes: &'static [u8], description: &str) -> Result<Self> {
        let shard = Shard::parse(description.to_string(), Bytes::Static(bytes))?;
        Self::from_shards(vec![shard], description.to_string())
    }

    fn from_shards(shards: Vec<Shard>, description: String) -> Result<Self> {
        let mut index = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.metadata.tensors().keys() {
                index.insert(name.clone(), i);
            }
        }
        Ok(TensorStore {
            shards,
            index,
            description,
        })
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort();
        names
    }

    /// Shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let shard = &self.shards[*self.index.get(name)?];
        shard.metadata.info(name).map(|i| i.shape.clone())
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Reads a tensor as f32, checking its shape.
    pub fn read(&self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let shard = self
            .index
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| T5Error::MissingTensor {
                name: name.to_string(),
                source_name: self.description.clone(),
            })?;
        let info = shard
            .metadata
            .info(name)
            .expect("indexed tensor has metadata");
        if info.shape != expected {
            return Err(T5Error::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (begin, end) = info.data_offsets;
        let (start, end) = (shard.data_start + begin, shard.data_start + end);
        let data = decode(name, info.dtype, &shard.bytes.as_slice()[start..end])?;
        shard.bytes.release(start, end);
        debug_assert_eq!(
            data.len(),
            expected.iter().product::<usize>(),
            "{}",
            shard.name
        );
        Ok(HostTensor {
            shape: info.shape.clone(),
            data,
        })
    }
}

/// Converts little-endian stored values to f32. Works at any alignment.
fn decode(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(T5Error::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    })
}
