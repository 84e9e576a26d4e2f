//! `pytorch_model.bin` as `torch.save` writes it since PyTorch 1.6: a zip archive (entries
//! stored, not compressed) holding `<name>/data.pkl`, the state dict's pickle (read by the
//! restricted [`super::pickle`]), and `<name>/data/<key>`, the raw little-endian bytes of each
//! storage. Tensors are located in the archive's bytes, so they are read straight from the
//! memory map like safetensors' (no copy of the file).

use std::collections::HashMap;
use std::io::Cursor;

use safetensors::Dtype;

use super::pickle::{self, Value};
use super::TensorEntry;

fn element_size(dtype: Dtype) -> usize {
    match dtype {
        Dtype::F32 => 4,
        _ => 2,
    }
}

/// Whether `bytes` start like a zip archive.
pub fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// The tensors of a `torch.save` zip archive, by name, as byte ranges of `bytes`.
pub fn tensors(bytes: &[u8]) -> Result<HashMap<String, TensorEntry>, String> {
    if !is_zip(bytes) {
        if bytes.first() == Some(&0x80) {
            return Err(
                "this is PyTorch's legacy (before 1.6) serialization, which t5rt does not read; \
                 re-save it with a recent PyTorch (torch.save(torch.load(F), F)) or convert it to \
                 model.safetensors"
                    .into(),
            );
        }
        return Err("not a PyTorch checkpoint (neither a zip archive nor a pickle)".into());
    }
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a valid zip archive: {e}"))?;
    // Where each entry's data lies in `bytes`, for the stored (uncompressed) entries.
    let mut entries: HashMap<String, (usize, usize)> = HashMap::new();
    let mut pickle_name = None;
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| format!("entry {i} of the archive: {e}"))?;
        let name = f.name().to_string();
        if f.compression() != zip::CompressionMethod::Stored {
            // PyTorch never compresses; a compressed archive was repacked by something else.
            if name.ends_with("data.pkl") || name.contains("/data/") {
                return Err(format!(
                    "entry {name} is compressed; PyTorch writes uncompressed archives"
                ));
            }
            continue;
        }
        let start = usize::try_from(f.data_start()).map_err(|_| "an entry past 2^64")?;
        let len = usize::try_from(f.size()).map_err(|_| "an entry past 2^64")?;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| format!("entry {name} runs past the end of the file (truncated?)"))?;
        if name.ends_with("/data.pkl") || name == "data.pkl" {
            pickle_name = Some(name.clone());
        }
        entries.insert(name, (start, end));
    }
    let pkl = pickle_name.ok_or("the archive has no data.pkl")?;
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or_default().to_string();
    if let Some(&(s, e)) = entries.get(&format!("{prefix}byteorder")) {
        if &bytes[s..e] != b"little" {
            return Err("the checkpoint was saved on a big-endian machine".into());
        }
    }
    let (ps, pe) = entries[&pkl];
    let root = pickle::load(&bytes[ps..pe])?;
    let Value::Dict(items) = root else {
        return Err("the pickle is not a state dict (a dict of tensors)".into());
    };
    let mut out = HashMap::new();
    for (k, v) in items {
        let Value::Str(name) = k else {
            return Err("a state dict key that is not a string".into());
        };
        let t = match v {
            Value::Tensor(t) => t,
            Value::Dict(_) => {
                return Err(format!(
                    "`{name}` holds a nested dict: save the model's state_dict() itself"
                ))
            }
            _ => continue, // a non-tensor entry (none in T5 checkpoints): not a weight
        };
        let storage = entries
            .get(&format!("{prefix}data/{}", t.key))
            .ok_or_else(|| format!("`{name}`: storage {} is missing from the archive", t.key))?;
        let esize = element_size(t.dtype);
        // Row-major and contiguous, as every saved T5 weight is.
        let mut expected = 1usize;
        for (&dim, &stride) in t.shape.iter().zip(&t.stride).rev() {
            if dim > 1 && stride != expected {
                return Err(format!(
                    "`{name}` is not contiguous (strides {:?})",
                    t.stride
                ));
            }
            expected = expected.saturating_mul(dim);
        }
        let numel = expected;
        if t.stride.len() != t.shape.len()
            || t.offset.saturating_add(numel) > t.storage_numel
            || t.storage_numel.saturating_mul(esize) > storage.1 - storage.0
        {
            return Err(format!(
                "`{name}` lies outside its storage (truncated file?)"
            ));
        }
        let start = storage.0 + t.offset * esize;
        out.insert(
            name,
            TensorEntry {
                dtype: t.dtype,
                shape: t.shape,
                start,
                end: start + numel * esize,
            },
        );
    }
    Ok(out)
}
