//! Model weights on the device, read once from a [`TensorStore`] and never changed.

use crate::backend::{Backend, ScreenChoice, ScreenHead, WeightDtype};
use crate::config::T5Config;
use crate::error::{Result, T5Error};
use crate::weights::TensorStore;

use super::keep::KeepF32;

/// q, k, v, o projections. Shapes below are the checkpoint's `[out, in]`; on the device each
/// linear weight is in the layout its backend chose in [`Backend::upload_linear`].
pub struct AttentionWeights<T> {
    /// [inner, d_model]
    pub q: T,
    /// [inner, d_model]
    pub k: T,
    /// [inner, d_model]
    pub v: T,
    /// [d_model, inner]
    pub o: T,
}

/// The feed-forward block: `wo(act(wi x))` or, gated, `wo(act(wi_0 x) * wi_1 x)`.
pub struct FfnWeights<T> {
    /// [d_ff, d_model] (`wi` or `wi_0`)
    pub wi: T,
    /// [d_ff, d_model] (`wi_1`, gated variants only)
    pub wi_gate_linear: Option<T>,
    /// [d_model, d_ff]
    pub wo: T,
}

pub struct EncoderLayer<T, W> {
    /// `[d_model]`
    pub attn_norm: T,
    pub attn: AttentionWeights<W>,
    /// `[d_model]`
    pub ffn_norm: T,
    pub ffn: FfnWeights<W>,
}

pub struct DecoderLayer<T, W> {
    /// `[d_model]`
    pub self_norm: T,
    pub self_attn: AttentionWeights<W>,
    /// `[d_model]`
    pub cross_norm: T,
    pub cross_attn: AttentionWeights<W>,
    /// `[d_model]`
    pub ffn_norm: T,
    pub ffn: FfnWeights<W>,
}

/// The embedding table: on the device, or read where the checkpoint stores it (a backend
/// whose device is the host: [`crate::backend::Backend::embeds_from_host`]), which spares
/// loading a copy of it (66 MiB for t5-small, most of an int8 checkpoint's bytes).
pub enum Table<T> {
    Device(T),
    Stored(crate::weights::StoredF32),
}

/// Every weight of a T5 model, on the device (relative-bias tables stay on the host, where
/// the bias is computed once per pass; the embedding table may stay in the checkpoint's
/// mapping, see [`Table`]).
pub struct T5Params<T, W> {
    /// [vocab, d_model], the embedding table; `None` when it is tied to `lm_head` and the
    /// head is stored exactly (f32): lookups then read the head, and the model holds the
    /// table once.
    pub shared: Option<Table<T>>,
    pub encoder: Vec<EncoderLayer<T, W>>,
    /// `[d_model]`
    pub encoder_norm: T,
    /// [num_buckets, heads], host
    pub encoder_relpos: Vec<f32>,
    pub decoder: Vec<DecoderLayer<T, W>>,
    /// `[d_model]`
    pub decoder_norm: T,
    /// [num_buckets, heads], host
    pub decoder_relpos: Vec<f32>,
    /// [vocab, d_model] as a linear weight; with tied embeddings, a copy of `shared` in the
    /// linear layout (the decoder output is then scaled by `d_model ** -0.5`).
    pub lm_head: W,
    /// A cheaper copy of `lm_head` that greedy decoding screens the vocabulary with
    /// ([`Backend::screened_argmax`]: int8, for f32 heads and widened bf16 heads on the CPU),
    /// where the backend has that path; `None` otherwise, or with `T5RT_SCREEN_HEAD=0`.
    pub screen: Option<ScreenHead<W>>,
    /// Keep the cross-attention keys and values in f32 even with reduced-precision weights
    /// (`T5RT_KEEP_F32=cross-cache`).
    pub cross_cache_f32: bool,
    /// Keep the decoder's self-attention keys and values in f32 even with reduced-precision
    /// weights (`T5RT_KEEP_F32=self-cache`).
    pub self_cache_f32: bool,
}

/// Suffixes of the tensors `t5rt convert` writes for a linear weight `name`: its int8 values
/// (`{name}.t5rt_int8`, `[out, in]`, I8) and their per-row scales (`{name}.t5rt_scale`, F32).
pub const INT8_SUFFIX: &str = "t5rt_int8";
pub const SCALE_SUFFIX: &str = "t5rt_scale";

/// A backend's error while loading (or converting) weight `name` (out of memory, say), with
/// the name where the message does not give it already.
pub(crate) fn named<T>(name: &str, r: Result<T>) -> Result<T> {
    r.map_err(|e| match e {
        T5Error::Backend(m) if !m.contains(name) => T5Error::Backend(format!("{name}: {m}")),
        e => e,
    })
}

struct Loader<'a, B: Backend> {
    store: &'a TensorStore,
    backend: &'a B,
    cfg: &'a T5Config,
    keep: &'a KeepF32,
}

impl<B: Backend> Loader<'_, B> {
    fn host(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.store.read(name, shape)?.data)
    }

    /// Calls `f` on a weight as f32, borrowed from the file where it is stored so.
    fn with_host<R>(
        &self,
        name: &str,
        shape: &[usize],
        f: impl FnOnce(&[f32]) -> Result<R>,
    ) -> Result<R> {
        self.store.with_f32(name, shape, f)?
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<B::Tensor> {
        self.backend.upload_owned(self.host(name, shape)?)
    }

    /// A linear weight `[out, in]`, stored as the backend's matmul wants it.
    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<B::Weight> {
        self.linear_as(name, out, inp, false)
    }

    /// [`Loader::linear`]; `head`: the weight is the LM head.
    fn linear_as(&self, name: &str, out: usize, inp: usize, head: bool) -> Result<B::Weight> {
        named(name, self.linear_as_inner(name, out, inp, head))
    }

    fn linear_as_inner(&self, name: &str, out: usize, inp: usize, head: bool) -> Result<B::Weight> {
        if self.keep.weight(name, head) {
            return self.with_host(name, &[out, inp], |w| {
                self.backend.upload_linear_f32(w, out, inp)
            });
        }
        if let Some(w) = self.quantized(name, out, inp)? {
            return Ok(w);
        }
        self.with_host(name, &[out, inp], |w| {
            self.backend.upload_linear(w, out, inp)
        })
    }

    /// The feed-forward output projection, which may need a range-safe precision.
    fn output_linear(&self, name: &str, out: usize, inp: usize) -> Result<B::Weight> {
        if self.keep.weight(name, false) {
            return self.linear(name, out, inp);
        }
        named(
            name,
            self.quantized(name, out, inp).and_then(|q| match q {
                Some(w) => Ok(w),
                None => self.with_host(name, &[out, inp], |w| {
                    self.backend.upload_output_linear(w, out, inp)
                }),
            }),
        )
    }

    /// The int8 form `t5rt convert` stored for `name` (`{name}.t5rt_int8` and
    /// `{name}.t5rt_scale`), if the checkpoint has it.
    fn quantized(&self, name: &str, out: usize, inp: usize) -> Result<Option<B::Weight>> {
        let (qname, sname) = (
            format!("{name}.{INT8_SUFFIX}"),
            format!("{name}.{SCALE_SUFFIX}"),
        );
        if !self.store.contains(&qname) {
            return Ok(None);
        }
        let scales = self.store.read(&sname, &[out])?.data;
        self.store
            .with_i8(&qname, &[out, inp], |q| {
                self.backend.upload_linear_int8(q, &scales, out, inp)
            })?
            .map(Some)
    }

    fn attention(&self, prefix: &str) -> Result<AttentionWeights<B::Weight>> {
        let (d, inner) = (self.cfg.d_model, self.cfg.inner_dim());
        Ok(AttentionWeights {
            q: self.linear(&format!("{prefix}.q.weight"), inner, d)?,
            k: self.linear(&format!("{prefix}.k.weight"), inner, d)?,
            v: self.linear(&format!("{prefix}.v.weight"), inner, d)?,
            o: self.linear(&format!("{prefix}.o.weight"), d, inner)?,
        })
    }

    fn ffn(&self, prefix: &str) -> Result<FfnWeights<B::Weight>> {
        let (d, ff) = (self.cfg.d_model, self.cfg.d_ff);
        let (wi, wi_gate_linear) = if self.cfg.is_gated_act {
            (
                self.linear(&format!("{prefix}.wi_0.weight"), ff, d)?,
                Some(self.linear(&format!("{prefix}.wi_1.weight"), ff, d)?),
            )
        } else {
            (self.linear(&format!("{prefix}.wi.weight"), ff, d)?, None)
        };
        Ok(FfnWeights {
            wi,
            wi_gate_linear,
            wo: self.output_linear(&format!("{prefix}.wo.weight"), d, ff)?,
        })
    }

    fn norm(&self, name: &str) -> Result<B::Tensor> {
        self.tensor(name, &[self.cfg.d_model])
    }

    fn relpos(&self, stack: &str) -> Result<Vec<f32>> {
        let name = format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight");
        self.host(
            &name,
            &[self.cfg.relative_attention_num_buckets, self.cfg.num_heads],
        )
    }
}

impl<T, W> T5Params<T, W> {
    /// Reads every tensor the config calls for, checking names and shapes.
    pub fn load<B: Backend<Tensor = T, Weight = W>>(
        store: &TensorStore,
        backend: &B,
        cfg: &T5Config,
    ) -> Result<Self> {
        if let Some(free) = backend.device_memory() {
            use crate::generate::memory::{human_bytes, weight_bytes};
            let need = weight_bytes(cfg, backend.weight_dtype());
            if need > free {
                return Err(crate::error::T5Error::Backend(format!(
                    "{}: the model's weights need about {} in {}, more than the {} free on the device (try --dtype bf16 or f16, or another GPU)",
                    backend.name(),
                    human_bytes(need),
                    backend.weight_dtype(),
                    human_bytes(free)
                )));
            }
        }
        let keep = KeepF32::from_env()?;
        let l = Loader {
            store,
            backend,
            cfg,
            keep: &keep,
        };
        let vocab_shape = [cfg.vocab_size, cfg.d_model];
        // Older exports store the embedding only as encoder.embed_tokens.
        let shared_name = if store.contains("shared.weight") {
            "shared.weight"
        } else if store.contains("encoder.embed_tokens.weight") {
            "encoder.embed_tokens.weight"
        } else {
            "shared.weight"
        };
        let shared_in_head = cfg.tie_word_embeddings
            && backend.weight_dtype() == crate::backend::WeightDtype::F32
            && keep == KeepF32::default();
        let shared = if shared_in_head {
            None
        } else {
            let stored = if backend.embeds_from_host() && !copy_embeddings() {
                store.stored_f32(shared_name, &vocab_shape)?
            } else {
                None
            };
            Some(match stored {
                Some(table) => Table::Stored(table),
                None => Table::Device(l.tensor(shared_name, &vocab_shape)?),
            })
        };
        let encoder = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("encoder.block.{i}.layer");
                Ok(EncoderLayer {
                    attn_norm: l.norm(&format!("{p}.0.layer_norm.weight"))?,
                    attn: l.attention(&format!("{p}.0.SelfAttention"))?,
                    ffn_norm: l.norm(&format!("{p}.1.layer_norm.weight"))?,
                    ffn: l.ffn(&format!("{p}.1.DenseReluDense"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder = (0..cfg.num_decoder_layers)
            .map(|i| {
                let p = format!("decoder.block.{i}.layer");
                Ok(DecoderLayer {
                    self_norm: l.norm(&format!("{p}.0.layer_norm.weight"))?,
                    self_attn: l.attention(&format!("{p}.0.SelfAttention"))?,
                    cross_norm: l.norm(&format!("{p}.1.layer_norm.weight"))?,
                    cross_attn: l.attention(&format!("{p}.1.EncDecAttention"))?,
                    ffn_norm: l.norm(&format!("{p}.2.layer_norm.weight"))?,
                    ffn: l.ffn(&format!("{p}.2.DenseReluDense"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head_name = if cfg.tie_word_embeddings {
            shared_name
        } else {
            "lm_head.weight"
        };
        let lm_head = l.linear_as(head_name, cfg.vocab_size, cfg.d_model, true)?;
        let head_dtype = if keep.weight(head_name, true) {
            WeightDtype::F32
        } else {
            backend.weight_dtype()
        };
        let choice = ScreenChoice::from_env()?;
        let wanted = choice != ScreenChoice::Off;
        let screen = if head_dtype != WeightDtype::Int8 && backend.screens_heads() && wanted {
            let screen = l.with_host(head_name, &vocab_shape, |w| {
                backend.upload_screen(w, cfg.vocab_size, cfg.d_model, head_dtype, choice)
            });
            named(head_name, screen)?
        } else {
            None
        };
        Ok(T5Params {
            shared,
            encoder,
            encoder_norm: l.norm("encoder.final_layer_norm.weight")?,
            encoder_relpos: l.relpos("encoder")?,
            decoder,
            decoder_norm: l.norm("decoder.final_layer_norm.weight")?,
            decoder_relpos: l.relpos("decoder")?,
            lm_head,
            screen,
            cross_cache_f32: keep.cross_cache(),
            self_cache_f32: keep.self_cache(),
        })
    }
}

/// `T5RT_COPY_EMBEDDINGS=1` loads a copy of the embedding table even where it could be read
/// in the checkpoint's mapping (for a checkpoint file that may be rewritten in place while
/// the model runs).
fn copy_embeddings() -> bool {
    std::env::var("T5RT_COPY_EMBEDDINGS").is_ok_and(|v| v == "1")
}
