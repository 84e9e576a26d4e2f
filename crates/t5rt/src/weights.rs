//! Checkpoint tensors: `model.safetensors` or a sharded `model.safetensors.index.json`
//! (preferred), else PyTorch's `pytorch_model.bin` or a sharded `pytorch_model.bin.index.json`
//! (zip archives read through a restricted unpickler, [`pickle`], that never runs code);
//! memory-mapped and converted once to f32 on request.
//!
//! Values are read with `from_le_bytes`, so tensors at misaligned offsets load as well as
//! aligned ones (the copy is the fallback and the rule: the compute layout is f32 anyway).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors};

use crate::error::{Result, T5Error};

pub mod pickle;
mod torch_zip;

/// Where one tensor's bytes lie in its file, and how to read them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range in the file.
    pub start: usize,
    pub end: usize,
}

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
    bytes: std::sync::Arc<Bytes>,
    tensors: HashMap<String, TensorEntry>,
}

impl Shard {
    /// A safetensors file, or (by its content) a PyTorch zip archive.
    fn parse(name: String, bytes: Bytes) -> Result<Self> {
        if torch_zip::is_zip(bytes.as_slice()) || name.ends_with(".bin") {
            let tensors = torch_zip::tensors(bytes.as_slice()).map_err(|message| {
                T5Error::TorchCheckpoint {
                    path: PathBuf::from(&name),
                    message,
                }
            })?;
            return Ok(Shard {
                name,
                bytes: std::sync::Arc::new(bytes),
                tensors,
            });
        }
        let corrupt = |message: String| T5Error::Safetensors {
            path: PathBuf::from(&name),
            message,
        };
        // `deserialize` checks the header and that every tensor lies inside the file.
        SafeTensors::deserialize(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        let data_start = 8 + header_len;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(n, info)| {
                let (b, e) = info.data_offsets;
                let entry = TensorEntry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + b,
                    end: data_start + e,
                };
                (n, entry)
            })
            .collect();
        Ok(Shard {
            name,
            bytes: std::sync::Arc::new(bytes),
            tensors,
        })
    }
}

/// An f32 tensor viewed where it is stored (a file mapping, or bytes built into the program),
/// which keeps its file's mapping alive: a model reads its embedding table this way instead
/// of copying it out at load ([`TensorStore::stored_f32`]). The mapping is read-only and
/// shared with the file: the file must not be rewritten or truncated in place while the model
/// is in use (replacing it by a new file, as a rename does, is safe).
pub struct StoredF32 {
    /// Owns the memory `values` points into.
    _bytes: std::sync::Arc<Bytes>,
    values: std::ptr::NonNull<f32>,
    len: usize,
}

// SAFETY: `values` points into `_bytes`, which is immutable and shared (`Arc`) for the view's
// whole life; reading it from any thread is reading a `&[f32]`.
unsafe impl Send for StoredF32 {}
// SAFETY: as above.
unsafe impl Sync for StoredF32 {}

impl StoredF32 {
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `values` and `len` came from an aligned `&[f32]` inside `_bytes` (see
        // `TensorStore::stored_f32`), which this view keeps alive and nobody mutates.
        unsafe { std::slice::from_raw_parts(self.values.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for StoredF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoredF32({} values)", self.len)
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
    /// Opens the weights of a checkpoint directory: `model.safetensors` (or its sharded
    /// index) when present, else `pytorch_model.bin` (or its sharded index).
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let description = dir.display().to_string();
        for (single, index) in [
            ("model.safetensors", "model.safetensors.index.json"),
            ("pytorch_model.bin", "pytorch_model.bin.index.json"),
        ] {
            let single = dir.join(single);
            if single.is_file() {
                return Self::open_files(&[single], description);
            }
            let index = dir.join(index);
            if index.is_file() {
                let files = shard_files(dir, &index)?;
                return Self::open_files(&files, description);
            }
        }
        Err(T5Error::MissingFile {
            path: dir.join("model.safetensors"),
            hint: "a checkpoint directory needs model.safetensors or pytorch_model.bin (or a sharded index of either)"
                .into(),
        })
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
                    hint: "listed in the checkpoint's index but absent; download every shard"
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
            for name in shard.tensors.keys() {
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
        shard.tensors.get(name).map(|t| t.shape.clone())
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Reads a tensor as f32, checking its shape.
    pub fn read(&self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        self.with_bytes(name, expected, |shard, info, bytes| {
            let data = decode(name, info.dtype, bytes)?;
            debug_assert_eq!(data.len(), expected.iter().product::<usize>(), "{shard}");
            Ok(HostTensor {
                shape: info.shape.clone(),
                data,
            })
        })?
    }

    /// Calls `f` on a tensor as f32, checking its shape: borrowed from the mapped file when
    /// it is stored as f32 at an aligned offset (no copy: loading packs straight from the
    /// file), otherwise converted as [`Self::read`] does.
    pub fn with_f32<R>(
        &self,
        name: &str,
        expected: &[usize],
        f: impl FnOnce(&[f32]) -> R,
    ) -> Result<R> {
        self.with_bytes(name, expected, |_, info, bytes| {
            Ok(match as_f32(info.dtype, bytes) {
                Some(values) => {
                    populate(bytes);
                    f(values)
                }
                None => f(&decode(name, info.dtype, bytes)?),
            })
        })?
    }

    /// The f32 tensor `name` where it is stored, checked against `expected`, when it can be
    /// read in place (stored as f32 at an aligned offset on a little-endian host); `None`
    /// otherwise (the caller reads a copy instead).
    pub fn stored_f32(&self, name: &str, expected: &[usize]) -> Result<Option<StoredF32>> {
        let (shard, info) = self.locate(name, expected)?;
        let bytes = &shard.bytes.as_slice()[info.start..info.end];
        Ok(as_f32(info.dtype, bytes).map(|values| StoredF32 {
            _bytes: shard.bytes.clone(),
            values: std::ptr::NonNull::from(values).cast(),
            len: values.len(),
        }))
    }

    /// Calls `f` on an int8 tensor (safetensors `I8`) as stored, such as the weights `t5rt
    /// convert` quantized, borrowed from the mapped file (no copy); an error for any other
    /// dtype.
    pub fn with_i8<R>(
        &self,
        name: &str,
        expected: &[usize],
        f: impl FnOnce(&[i8]) -> R,
    ) -> Result<R> {
        self.with_bytes(name, expected, |_, info, bytes| {
            if info.dtype != Dtype::I8 {
                return Err(T5Error::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{:?} (expected I8)", info.dtype),
                });
            }
            // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern is
            // valid for both.
            let values =
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<i8>(), bytes.len()) };
            Ok(f(values))
        })?
    }

    /// Calls `f` on the stored bytes of `name` (with its shard's name and its entry), checked
    /// against the `expected` shape, then releases the tensor's pages from this process, so
    /// that loading never holds the file and its converted copy at once.
    fn with_bytes<R>(
        &self,
        name: &str,
        expected: &[usize],
        f: impl FnOnce(&str, &TensorEntry, &[u8]) -> R,
    ) -> Result<R> {
        let (shard, info) = self.locate(name, expected)?;
        let out = f(
            &shard.name,
            info,
            &shard.bytes.as_slice()[info.start..info.end],
        );
        shard.bytes.release(info.start, info.end);
        Ok(out)
    }

    /// The shard and entry of `name`, checked against the `expected` shape.
    fn locate(&self, name: &str, expected: &[usize]) -> Result<(&Shard, &TensorEntry)> {
        let shard = self
            .index
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| T5Error::MissingTensor {
                name: name.to_string(),
                source_name: self.description.clone(),
            })?;
        let info = shard
            .tensors
            .get(name)
            .expect("indexed tensor has an entry");
        if info.shape != expected {
            return Err(T5Error::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        Ok((shard, info))
    }
}

/// The shard files a sharded index names (`weight_map` values), each once, sorted.
fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| T5Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| T5Error::Json {
        path: index.to_path_buf(),
        message: e.to_string(),
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| T5Error::Json {
            path: index.to_path_buf(),
            message: "no `weight_map` object".into(),
        })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for file in map.values() {
        let name = file.as_str().ok_or_else(|| T5Error::Json {
            path: index.to_path_buf(),
            message: "`weight_map` values must be file names".into(),
        })?;
        // Shards live next to the index: no other directory.
        if name.contains('/') || name.contains('\\') || name == ".." {
            return Err(T5Error::Json {
                path: index.to_path_buf(),
                message: format!("`{name}` is not a file name in this directory"),
            });
        }
        let path = dir.join(name);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Stored f32 values viewed in place, where the host is little-endian and they are aligned.
fn as_f32(dtype: Dtype, bytes: &[u8]) -> Option<&[f32]> {
    if dtype != Dtype::F32 || cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: every bit pattern is a valid f32; `align_to` splits off any unaligned ends.
    match unsafe { bytes.align_to::<f32>() } {
        ([], values, []) => Some(values),
        _ => None,
    }
}

/// Maps the pages of `bytes` (part of a file mapping) in one call instead of one fault per
/// 4 KiB page as they are first read; a kernel without `MADV_POPULATE_READ` (before 5.14)
/// refuses it and the pages fault in as usual.
fn populate(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = bytes.as_ptr() as usize;
        let (lo, hi) = (
            start / PAGE * PAGE,
            (start + bytes.len()).div_ceil(PAGE) * PAGE,
        );
        // SAFETY: the range covers the pages of a read-only file mapping this process holds
        // (rounded out to whole pages, all inside the mapping); populating reads them and
        // changes nothing.
        unsafe {
            libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_POPULATE_READ);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}

/// Stored 16-bit values widened to f32 by `f`, in a fallibly allocated buffer.
fn widen(name: &str, bytes: &[u8], f: impl Fn([u8; 2]) -> f32) -> Result<Vec<f32>> {
    let mut out = crate::alloc::try_zeroed::<f32>(bytes.len() / 2, name)?;
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = f([b[0], b[1]]);
    }
    Ok(out)
}

/// Converts little-endian stored values to f32. Works at any alignment.
fn decode(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => {
            let mut out = crate::hugepage::zeroed::<f32>(bytes.len() / 4, name)?;
            // Little-endian hosts hold f32 as stored: one copy (the map need not be aligned),
            // in chunks on the current rayon pool (the backend's, as the model loads inside
            // it): a large table's fresh pages are faulted in by every thread.
            #[cfg(target_endian = "little")]
            {
                use rayon::prelude::*;
                const CHUNK: usize = 1 << 20;
                out.par_chunks_mut(CHUNK)
                    .zip(bytes.par_chunks(CHUNK * 4))
                    .for_each(|(o, b)| {
                        // SAFETY: `o` holds b.len() / 4 f32s; any bit pattern is a valid f32.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                b.as_ptr(),
                                o.as_mut_ptr() as *mut u8,
                                o.len() * 4,
                            );
                        }
                    });
            }
            #[cfg(not(target_endian = "little"))]
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            out
        }
        Dtype::F16 => widen(name, bytes, |b| half::f16::from_le_bytes(b).to_f32())?,
        Dtype::BF16 => widen(name, bytes, |b| half::bf16::from_le_bytes(b).to_f32())?,
        other => {
            return Err(T5Error::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file by hand: `c` (f32, aligned), `a` (one byte), then `b` (f32 at an
    /// odd offset), so that both paths of [`TensorStore::with_f32`] run.
    fn store() -> TensorStore {
        let header = r#"{"c":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"U8","shape":[1],"data_offsets":[8,9]},"b":{"dtype":"F32","shape":[2],"data_offsets":[9,17]}}"#;
        let mut header = header.as_bytes().to_vec();
        while !header.len().is_multiple_of(8) {
            header.push(b' ');
        }
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&header);
        for v in [1.5f32, -2.0] {
            file.extend_from_slice(&v.to_le_bytes());
        }
        file.push(7);
        for v in [3.25f32, f32::MIN_POSITIVE] {
            file.extend_from_slice(&v.to_le_bytes());
        }
        // A u64-aligned copy, so that the data's alignment is the offsets'.
        let words: Vec<u64> = file
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        let bytes: &'static [u64] = Box::leak(words.into_boxed_slice());
        // SAFETY: u64s viewed as their bytes, trimmed to the file's length.
        let bytes = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<u8>(), file.len()) };
        TensorStore::from_static(bytes, "hand-made").unwrap()
    }

    #[test]
    fn with_f32_borrows_aligned_values_and_converts_the_rest() {
        let s = store();
        let aligned = s.with_f32("c", &[2], |v| v.to_vec()).unwrap();
        let odd = s.with_f32("b", &[2], |v| v.to_vec()).unwrap();
        assert_eq!(aligned, s.read("c", &[2]).unwrap().data);
        assert_eq!(aligned, [1.5, -2.0]);
        assert_eq!(odd, s.read("b", &[2]).unwrap().data);
        assert_eq!(odd, [3.25, f32::MIN_POSITIVE]);
        let (shard, c) = s.locate("c", &[2]).unwrap();
        let (_, b) = s.locate("b", &[2]).unwrap();
        let bytes = shard.bytes.as_slice();
        assert!(as_f32(Dtype::F32, &bytes[c.start..c.end]).is_some());
        assert!(as_f32(Dtype::F32, &bytes[b.start..b.end]).is_none());
        assert!(s.with_f32("c", &[3], |_| ()).is_err(), "shape checked");
        assert!(s.with_i8("c", &[2], |_| ()).is_err(), "dtype checked");
    }

    /// Aligned f32 values are read where they are stored, and stay readable after the store
    /// is gone (the view holds the bytes); unaligned or other dtypes are left to a copy.
    #[test]
    fn stored_f32_views_aligned_values_in_place() {
        let s = store();
        let c = s.stored_f32("c", &[2]).unwrap().expect("aligned f32");
        assert!(s.stored_f32("b", &[2]).unwrap().is_none(), "unaligned");
        assert!(s.stored_f32("a", &[1]).unwrap().is_none(), "u8");
        assert!(s.stored_f32("c", &[3]).is_err(), "shape checked");
        assert!(s.stored_f32("z", &[2]).is_err(), "missing");
        let (shard, entry) = s.locate("c", &[2]).unwrap();
        assert_eq!(
            c.as_slice().as_ptr().cast::<u8>(),
            shard.bytes.as_slice()[entry.start..].as_ptr()
        );
        drop(s);
        assert_eq!(c.as_slice(), [1.5, -2.0]);
        // A mapped file: the view keeps the mapping after the store is dropped.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let s = store();
        std::fs::write(&path, s.shards[0].bytes.as_slice()).unwrap();
        let mapped = TensorStore::open_file(&path).unwrap();
        let c = mapped.stored_f32("c", &[2]).unwrap().expect("aligned f32");
        drop(mapped);
        assert_eq!(c.as_slice(), [1.5, -2.0]);
    }
}
