//! Ahead-of-time int8 conversion (`t5rt convert`): a checkpoint directory whose linear weights
//! are already quantized, so that loading with `--dtype int8` reads a quarter of the bytes
//! and skips the quantization. The values are exactly those [`crate::backend::cpu::packed::
//! quantize_int8`] computes at load, so a converted checkpoint gives the same results, bit for
//! bit, as the original loaded with `--dtype int8`.
//!
//! Format: one `model.safetensors` in which each linear weight `name` (attention q/k/v/o, the
//! feed-forward `wi`/`wi_0`/`wi_1`/`wo`, the LM head) is replaced by `{name}.t5rt_int8` (I8,
//! `[out, in]`) and `{name}.t5rt_scale` (F32, `[out]`: `max|row| / 127`); every other tensor
//! (embeddings, norms, relative-position tables) is kept, in f32. With tied embeddings the
//! embedding table stays f32 and its int8 copy serves as the head. The checkpoint's other
//! files (config, generation config, tokenizer) are copied. Only t5rt reads the result.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::backend::cpu::packed::quantize_int8;
use crate::backend::cpu::IsaLevel;
use crate::checkpoint::Checkpoint;
use crate::error::{Result, T5Error};
use crate::model::params::{named, INT8_SUFFIX, SCALE_SUFFIX};

/// Files copied next to the converted weights when the source has them.
const COPIED: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
];

/// What a conversion did.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertSummary {
    /// Linear weights quantized.
    pub quantized: usize,
    /// Tensors kept in f32.
    pub kept: usize,
    /// Bytes of the tensors written.
    pub bytes: u64,
    /// The weights file written.
    pub path: PathBuf,
}

/// Whether `name` is a linear layer's weight the model multiplies by (not an embedding or a
/// relative-position table, which are looked up).
fn is_linear(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && name.ends_with(".weight")
        && !name.contains("relative_attention_bias")
        && (name == "lm_head.weight"
            || [".SelfAttention.", ".EncDecAttention.", ".DenseReluDense."]
                .iter()
                .any(|part| name.contains(part)))
}

/// Writes to `out` (a new or empty directory) the checkpoint in `src` with its linear weights
/// quantized to int8, using `threads` threads (0 = one per core).
pub fn convert_int8(src: &Path, out: &Path, threads: usize) -> Result<ConvertSummary> {
    let ckpt = Checkpoint::open(src)?;
    let store = &ckpt.store;
    let names = store.names();
    if names.iter().any(|n| n.ends_with(INT8_SUFFIX)) {
        return Err(T5Error::Input(format!(
            "{}: already converted to int8 by t5rt",
            src.display()
        )));
    }
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| T5Error::io(out, e))?
            .next()
            .is_some()
    {
        return Err(T5Error::Input(format!(
            "{}: not empty; give a new or empty directory",
            out.display()
        )));
    }
    // The tensor the head reads when embeddings are tied (older exports name it so).
    let shared = ["shared.weight", "encoder.embed_tokens.weight"]
        .into_iter()
        .find(|n| store.contains(n));
    let tied_head = if ckpt.config.tie_word_embeddings {
        shared
    } else {
        None
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| T5Error::Backend(format!("thread pool: {e}")))?;
    let isa = IsaLevel::detect();
    // Name -> (dtype, shape, bytes), in memory until written.
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let (mut quantized, mut kept) = (0, 0);
    for name in &names {
        let shape = store.shape(name).expect("listed tensor has a shape");
        // On the pool, so that a large tensor's copy runs on `threads` threads.
        let data = pool.install(|| store.read(name, &shape))?.data;
        let linear = is_linear(name, &shape);
        if linear || Some(name.as_str()) == tied_head {
            let (n, k) = (shape[0], shape[1]);
            let (q, scales) = named(name, pool.install(|| quantize_int8(&data, n, k, isa)))?;
            // (For the tied head, the int8 copy sits beside the f32 table it came from.)
            tensors.push((
                format!("{name}.{INT8_SUFFIX}"),
                Dtype::I8,
                vec![n, k],
                q.into_iter().map(|v| v as u8).collect(),
            ));
            tensors.push((
                format!("{name}.{SCALE_SUFFIX}"),
                Dtype::F32,
                vec![n],
                f32_bytes(name, &scales)?,
            ));
            quantized += 1;
            if linear {
                continue;
            }
        }
        tensors.push((name.clone(), Dtype::F32, shape, f32_bytes(name, &data)?));
        kept += 1;
    }
    std::fs::create_dir_all(out).map_err(|e| T5Error::io(out, e))?;
    for file in COPIED {
        let from = src.join(file);
        if from.is_file() {
            std::fs::copy(&from, out.join(file)).map_err(|e| T5Error::io(&from, e))?;
        }
    }
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| T5Error::Backend(format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "t5rt".to_string(),
            format!(
                "int8 linear weights ({{name}}.{INT8_SUFFIX}, {{name}}.{SCALE_SUFFIX}), t5rt convert {}",
                env!("CARGO_PKG_VERSION")
            ),
        ),
    ]);
    let path = out.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(metadata), &path).map_err(|e| {
        T5Error::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        }
    })?;
    let bytes = tensors.iter().map(|t| t.3.len() as u64).sum();
    Ok(ConvertSummary {
        quantized,
        kept,
        bytes,
        path,
    })
}

/// `v` as little-endian bytes, or an out-of-memory error naming tensor `name`.
fn f32_bytes(name: &str, v: &[f32]) -> Result<Vec<u8>> {
    let mut out = crate::alloc::try_zeroed::<u8>(v.len().saturating_mul(4), name)?;
    for (o, x) in out.chunks_exact_mut(4).zip(v) {
        o.copy_from_slice(&x.to_le_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::is_linear;

    #[test]
    fn linear_weights_are_told_from_tables() {
        for name in [
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "decoder.block.1.layer.1.EncDecAttention.o.weight",
            "decoder.block.0.layer.2.DenseReluDense.wi_1.weight",
            "lm_head.weight",
        ] {
            assert!(is_linear(name, &[4, 8]), "{name}");
        }
        for name in [
            "shared.weight",
            "encoder.embed_tokens.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.final_layer_norm.weight",
        ] {
            assert!(!is_linear(name, &[4, 8]), "{name}");
        }
        assert!(!is_linear("lm_head.weight", &[8]));
    }
}
