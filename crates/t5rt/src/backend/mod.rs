//! The small set of kernels T5 needs, implemented once per device.
//!
//! The model is written once against [`Backend`]; shapes live in the model, arithmetic here.
//! Every tensor is a flat f32 buffer on the device; sizes are passed explicitly, so a buffer
//! may be larger than the part an op uses (scratch is reused as batches shrink).

pub(crate) mod checks;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::config::Activation;
use crate::error::{Result, T5Error};
pub(crate) use checks::check_len;

/// How a backend stores the weights of linear layers (everything else stays f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// The checkpoint's values in f32: the parity baseline.
    #[default]
    F32,
    /// bf16 weights, accumulated in f32; activations rounded to bf16 for the product where the
    /// CPU runs `vdpbf16ps` (and in the portable code), kept f32 on the widened tiles (AVX2,
    /// AVX-512 without BF16, and Intel CPUs' default level).
    Bf16,
    /// int8 weights with one f32 scale per output channel; activations quantized to 8 bits
    /// per row at run time, products accumulated exactly in i32 (CPU).
    Int8,
    /// fp16 weights and activations in the products, accumulated in f32 (CUDA; the FFN's
    /// output projection stays f32, see [`Backend::upload_output_linear`]).
    F16,
}

impl WeightDtype {
    /// The CPU's precisions.
    pub const ALL: [WeightDtype; 3] = [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::Int8];

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::Int8 => "int8",
            WeightDtype::F16 => "f16",
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "fp16" {
            return Ok(WeightDtype::F16);
        }
        Self::ALL
            .into_iter()
            .chain([WeightDtype::F16])
            .find(|d| d.name() == s)
            .ok_or_else(|| {
                format!("unknown dtype `{s}`: expected f32, bf16 or int8 (or f16, on CUDA)")
            })
    }
}

/// Dimensions of `out[m, n] = x[m, k] · w[n, k]ᵀ` (`w` as in the checkpoint, `[out, in]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// What `T5RT_SCREEN_HEAD` asks of greedy decoding's LM-head screen
/// ([`Backend::upload_screen`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScreenChoice {
    /// Unset (or `1`): the backend's choice per head precision and CPU.
    #[default]
    Default,
    /// `0`: no screen; every logit is computed by the head.
    Off,
    /// `bf16`: f32 heads screened by a bf16 copy (bf16 heads not screened).
    Bf16,
    /// `int8`: int8 screens, also for bf16 heads at levels whose bf16 products round the
    /// activations (`vdpbf16ps`, portable).
    Int8,
}

impl ScreenChoice {
    /// Parses a value of `T5RT_SCREEN_HEAD`.
    pub fn parse(v: &str) -> Result<Self> {
        match v.trim() {
            "" | "1" => Ok(ScreenChoice::Default),
            "0" => Ok(ScreenChoice::Off),
            "bf16" => Ok(ScreenChoice::Bf16),
            "int8" => Ok(ScreenChoice::Int8),
            other => Err(T5Error::Input(format!(
                "T5RT_SCREEN_HEAD={other:?}: expected 0 (off), 1 (the default), bf16 or int8"
            ))),
        }
    }

    /// `T5RT_SCREEN_HEAD` from the environment (the default when unset).
    pub fn from_env() -> Result<Self> {
        std::env::var("T5RT_SCREEN_HEAD").map_or(Ok(ScreenChoice::Default), |v| Self::parse(&v))
    }
}

/// A cheaper copy of an LM head that greedy decoding screens the vocabulary with
/// ([`Backend::screened_argmax`]), and what bounds the copy's error per output column.
pub struct ScreenHead<W> {
    pub weight: W,
    /// The precision `weight` is stored in.
    pub kind: WeightDtype,
    /// Each column's Euclidean norm (of the head's own values), in f32, rounded up.
    pub norms: Vec<f32>,
    /// For a screen quantized with its own scales (int8): each column's quantization error
    /// `‖w_c - ŵ_c‖` (the head's values against the screen's), rounded up. Empty for a
    /// screen that rounds every value by a bounded relative error (bf16).
    pub err_norms: Vec<f32>,
}

impl<W> ScreenHead<W> {
    /// The Euclidean norm of each row of `w` (`[n, k]`, the checkpoint's layout), rounded up
    /// to f32.
    pub fn row_norms(w: &[f32], k: usize) -> Vec<f32> {
        use rayon::prelude::*;
        w.par_chunks(k.max(1))
            .map(|row| {
                // Eight running sums (vectorised); any order of f64 sums is within the slack.
                let mut acc = [0.0f64; 8];
                let blocks = row.chunks_exact(8);
                let tail: f64 = blocks
                    .remainder()
                    .iter()
                    .map(|&v| v as f64 * v as f64)
                    .sum();
                for b in blocks {
                    for (a, &v) in acc.iter_mut().zip(b) {
                        *a += v as f64 * v as f64;
                    }
                }
                let sq = acc.iter().sum::<f64>() + tail;
                (sq.sqrt() * (1.0 + 1e-6)) as f32
            })
            .collect()
    }
}

/// How a key/value cache is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvFormat {
    /// f32 values, `heads * d_kv` per position.
    F32,
    /// bf16 values, two per f32 slot (even element in the low half): from
    /// [`Backend::compress_kv`].
    Bf16,
    /// Per position, `heads * d_kv` int8 values (four per slot, in order), then one f32 scale
    /// per head: value = `q · scale`, the scale `max|x| / 127` of that head's `d_kv` values
    /// (1 when all are zero), `q = round(x · (1 / scale))` ties to even. From
    /// [`Backend::quantize_kv`]; a bit more than a quarter of f32's bytes.
    Int8,
}

impl KvFormat {
    /// f32 slots a cache of this format takes per position.
    pub fn slots_per_position(self, heads: usize, d_kv: usize) -> usize {
        let inner = heads * d_kv;
        match self {
            KvFormat::F32 => inner,
            KvFormat::Bf16 => inner / 2,
            KvFormat::Int8 => inner / 4 + heads,
        }
    }

    /// Whether keys/values of heads of `d_kv` values can be stored so.
    pub fn fits(self, d_kv: usize) -> bool {
        match self {
            KvFormat::F32 => true,
            KvFormat::Bf16 => d_kv.is_multiple_of(2),
            KvFormat::Int8 => d_kv.is_multiple_of(4),
        }
    }
}

/// Shapes of one attention call.
///
/// q, out: `[batch, q_len, heads * d_kv]`; k, v: `[batch / kv_group, kv_stride, heads * d_kv]` of
/// which the first `kv_len` rows per sequence are attended; query sequence `b` reads key/value
/// sequence `b / kv_group` (beams share their source's cross-attention keys/values); bias:
/// shared by the batch, laid out as [`BiasLayout`] says; mask: `[batch / kv_group, kv_len]`,
/// additive (0 or -inf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub d_kv: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub kv_stride: usize,
    pub kv_group: usize,
    /// How the position bias is laid out.
    pub bias: BiasLayout,
    /// How k and v are stored; anything but f32 only for one query per sequence (decoding
    /// steps).
    pub kv: KvFormat,
}

/// How an attention call's position bias (shared by the batch) is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BiasLayout {
    /// `[heads, q_len, stride]`, each row's last `kv_len` values used (`stride == kv_len`: the
    /// dense layout; a decoder step reads the last `pos + 1` values of one table made for the
    /// whole decode, whose entry `T - 1 - d` is distance `d`).
    Rows { stride: usize },
    /// `[heads, q_len + kv_len - 1]`: each head's bias by distance `key - query`, from
    /// `-(q_len - 1)` on (queries at positions `0..q_len`); query `i`'s `kv_len` values start at
    /// `q_len - 1 - i`. T5's relative bias depends on the distance alone, so an encoder's bias
    /// takes `2L - 1` values a head instead of `L²` (`L` = 2048 tokens, 12 heads: 192 KiB
    /// instead of 192 MiB).
    Lines,
}

impl AttnShape {
    /// Where head `h`'s bias for query `qi` starts (its `kv_len` values follow), in a bias laid
    /// out as [`AttnShape::bias`] says.
    #[inline(always)]
    pub fn bias_at(&self, h: usize, qi: usize) -> usize {
        match self.bias {
            BiasLayout::Rows { stride } => (h * self.q_len + qi) * stride + stride - self.kv_len,
            BiasLayout::Lines => h * (self.q_len + self.kv_len - 1) + self.q_len - 1 - qi,
        }
    }

    /// The values a bias laid out as [`AttnShape::bias`] says holds.
    pub fn bias_len(&self) -> usize {
        match self.bias {
            BiasLayout::Rows { stride } => self.heads * self.q_len * stride,
            BiasLayout::Lines => {
                crate::model::relpos::lines_len(self.heads, self.q_len, self.kv_len)
            }
        }
    }

    /// Checks the lengths of the buffers an attention call is given against this shape (the
    /// one check every backend makes): q and out, k and v (in `kv`'s format), the bias and the
    /// mask when given.
    pub fn check(
        &self,
        q: usize,
        out: usize,
        kv: (usize, usize),
        bias: Option<usize>,
        mask: Option<usize>,
    ) -> Result<()> {
        let s = self;
        let inner = s.heads * s.d_kv;
        check_len("attention q", q, s.batch * s.q_len * inner)?;
        check_len("attention out", out, s.batch * s.q_len * inner)?;
        if s.kv_group == 0 || !s.batch.is_multiple_of(s.kv_group) {
            return Err(T5Error::Backend(format!(
                "attention: batch {} is not a multiple of kv_group {}",
                s.batch, s.kv_group
            )));
        }
        let kv_batch = s.batch / s.kv_group;
        if s.kv != KvFormat::F32 && (s.q_len > 1 || !s.kv.fits(s.d_kv)) {
            return Err(T5Error::Backend(format!(
                "attention: {:?} keys/values need one query and d_kv a multiple of {} (got {} and {})",
                s.kv,
                if s.kv == KvFormat::Int8 { 4 } else { 2 },
                s.q_len,
                s.d_kv
            )));
        }
        let kv_slots = kv_batch * s.kv_stride * s.kv.slots_per_position(s.heads, s.d_kv);
        check_len("attention k", kv.0, kv_slots)?;
        check_len("attention v", kv.1, kv_slots)?;
        if s.kv_len > s.kv_stride || s.kv_len == 0 {
            return Err(T5Error::Backend(format!(
                "attention over {} keys with a stride of {}",
                s.kv_len, s.kv_stride
            )));
        }
        if let Some(b) = bias {
            if let BiasLayout::Rows { stride } = s.bias {
                if stride < s.kv_len {
                    return Err(T5Error::Backend(format!(
                        "attention bias rows of {stride} values for {} keys",
                        s.kv_len
                    )));
                }
            }
            check_len("attention bias", b, s.bias_len())?;
        }
        if let Some(m) = mask {
            check_len("attention mask", m, kv_batch * s.kv_len)?;
        }
        Ok(())
    }
}

/// How a decoding step runs, as [`Backend::begin_step`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPlan {
    /// The decoder calls the step's operations, which run as they are called.
    Eager,
    /// The decoder calls the step's operations, which the backend records (a CUDA graph);
    /// then [`Backend::end_step`] runs the recording.
    Capture,
    /// The backend ran a recording of an earlier step of the same layout: the decoder calls
    /// nothing.
    Replayed,
}

/// A compute device. The CPU implementation is the reference every other one is tested against.
pub trait Backend: Send + Sync {
    /// A flat f32 buffer in this device's memory.
    type Tensor: Send + Sync;
    /// A linear layer's weight, in the layout and precision the backend's matmul reads.
    type Weight: Send + Sync;

    /// Runs `f` in the backend's execution context (the CPU backend's thread pool), so that
    /// the many small kernel calls of a decoding loop do not each hop between threads.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// Human-readable device name, for logs and errors.
    fn name(&self) -> String;
    fn upload(&self, data: &[f32]) -> Result<Self::Tensor>;
    /// [`Backend::upload`] of values the caller no longer needs: a host backend keeps the
    /// vector itself instead of copying it (the embedding table at load).
    fn upload_owned(&self, data: Vec<f32>) -> Result<Self::Tensor> {
        self.upload(&data)
    }
    /// Copies the first `len` values back to the host.
    fn download(&self, t: &Self::Tensor, len: usize) -> Result<Vec<f32>>;
    fn zeros(&self, len: usize) -> Result<Self::Tensor>;

    /// Uploads a linear layer's weight, given in the checkpoint's `[n = out, k = in]` layout,
    /// in whatever layout and [`WeightDtype`] this backend's [`Backend::matmul_nt`] reads.
    fn upload_linear(&self, w: &[f32], n: usize, k: usize) -> Result<Self::Weight>;

    /// [`Backend::upload_linear`] for the feed-forward block's output projection (`wo`), whose
    /// inputs exceed fp16's range in T5 v1.1 / FLAN-T5 / mT5: a backend with fp16 weights keeps
    /// this one in a range-safe precision. By default the same as `upload_linear`.
    fn upload_output_linear(&self, w: &[f32], n: usize, k: usize) -> Result<Self::Weight> {
        self.upload_linear(w, n, k)
    }

    /// [`Backend::upload_linear`] in f32, whatever [`Backend::weight_dtype`] says (for parts of
    /// a model kept exact: `T5RT_KEEP_F32`). Backends that store one precision only refuse it.
    fn upload_linear_f32(&self, w: &[f32], n: usize, k: usize) -> Result<Self::Weight> {
        if self.weight_dtype() == WeightDtype::F32 {
            return self.upload_linear(w, n, k);
        }
        Err(T5Error::Backend(format!(
            "{}: T5RT_KEEP_F32 (f32 parts in a {} model) runs on the CPU only",
            self.name(),
            self.weight_dtype()
        )))
    }

    /// [`Backend::upload_linear`] for a weight quantized ahead of time (`t5rt convert`):
    /// int8 values `q` `[n, k]` and a scale per row, as
    /// [`cpu::packed::quantize_int8`] makes them. Backends without int8 say so.
    fn upload_linear_int8(
        &self,
        q: &[i8],
        scales: &[f32],
        n: usize,
        k: usize,
    ) -> Result<Self::Weight> {
        let _ = (q, scales, n, k);
        Err(T5Error::Backend(format!(
            "{}: this checkpoint holds int8 weights (made by `t5rt convert`), which run on the CPU only",
            self.name()
        )))
    }

    /// The precision [`Backend::upload_linear`] stores weights in.
    fn weight_dtype(&self) -> WeightDtype {
        WeightDtype::F32
    }

    /// Free bytes of a device with memory of its own (a GPU), which then bounds weights and
    /// batches instead of the host's memory; `None` for a backend that works in host memory.
    fn device_memory(&self) -> Option<u64> {
        None
    }

    /// `out = x · wᵀ`, or `out += x · wᵀ` with `accumulate` (the residual add, fused);
    /// `w` comes from [`Backend::upload_linear`].
    fn matmul_nt(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        out: &mut Self::Tensor,
        dims: MatDims,
        accumulate: bool,
    ) -> Result<()>;

    /// `outs[i] = x · ws[i]ᵀ` for several weights of one shape on one input (attention's q, k
    /// and v; a gated feed-forward's two input products). Each output is what
    /// [`Backend::matmul_nt`] gives; a backend may share work between the products (the CPU
    /// prepares the input once and runs the products in one parallel pass). The default runs
    /// them one after the other.
    fn matmul_nt_shared(
        &self,
        x: &Self::Tensor,
        ws: &[&Self::Weight],
        outs: &mut [&mut Self::Tensor],
        dims: MatDims,
    ) -> Result<()> {
        checks::shared_products(ws.len(), outs.len())?;
        matmul_nt_each(self, x, ws, outs, dims)
    }

    /// A sublayer's input products on its normalized input: `normed = rms_norm(x)` (weights
    /// `norm`, `eps`; rows of `dims.k` values), then `outs[i] = normed · ws[i]ᵀ` as
    /// [`Backend::matmul_nt_shared`]. `normed` is scratch of `x`'s size: a backend that fuses
    /// the norm into the products may leave it unwritten, so callers read only `outs`.
    #[allow(clippy::too_many_arguments)]
    fn norm_matmul_shared(
        &self,
        x: &Self::Tensor,
        norm: &Self::Tensor,
        eps: f32,
        normed: &mut Self::Tensor,
        ws: &[&Self::Weight],
        outs: &mut [&mut Self::Tensor],
        dims: MatDims,
    ) -> Result<()> {
        norm_then_products(self, x, norm, eps, normed, ws, outs, dims)
    }

    /// A decoding step's self-attention inputs: `q, k, v = rms_norm(x) · wq/wk/wvᵀ` into
    /// `outs`, then this position's keys and values written into the caches (as
    /// [`Backend::write_position`] does: row `b` at position `cache.pos` of its
    /// `cache.capacity`). `normed` is scratch, and so are `outs[1]` and `outs[2]`: a backend that
    /// writes the keys and values straight into the caches may leave them unwritten.
    #[allow(clippy::too_many_arguments)]
    fn norm_qkv_step(
        &self,
        x: &Self::Tensor,
        norm: &Self::Tensor,
        eps: f32,
        normed: &mut Self::Tensor,
        ws: [&Self::Weight; 3],
        outs: [&mut Self::Tensor; 3],
        cache: CacheWrite<'_, Self::Tensor>,
        dims: MatDims,
    ) -> Result<()> {
        norm_qkv_then_write(self, x, norm, eps, normed, ws, outs, cache, dims)
    }

    /// A feed-forward's first half on its sublayer input `x`: `normed = rms_norm(x)`, then
    /// `ff = act(normed · ws[0]ᵀ)`, or with a gate (`ws` = [wi_0, wi_1]) `ff = act(normed ·
    /// wi_0ᵀ) * (normed · wi_1ᵀ)`. `normed` and `ff_up` are scratch (`[rows, k]`, `[rows, n]`)
    /// that a fusing backend may leave unwritten.
    #[allow(clippy::too_many_arguments)]
    fn norm_ffn_up(
        &self,
        x: &Self::Tensor,
        norm: &Self::Tensor,
        eps: f32,
        normed: &mut Self::Tensor,
        ws: &[&Self::Weight],
        ff: &mut Self::Tensor,
        ff_up: &mut Self::Tensor,
        act: Activation,
        dims: MatDims,
    ) -> Result<()> {
        norm_then_ffn_up(self, x, norm, eps, normed, ws, ff, ff_up, act, dims)
    }

    /// `out[i, :] = table[ids[i], :]`, rows of width `d`.
    fn embed(
        &self,
        ids: &[u32],
        table: &Self::Tensor,
        out: &mut Self::Tensor,
        d: usize,
    ) -> Result<()>;

    /// Whether this backend's tensors live in host memory, so that it can read an embedding
    /// table where the checkpoint stores it ([`Backend::embed_host`]) instead of a copy.
    fn embeds_from_host(&self) -> bool {
        false
    }

    /// [`Backend::embed`] from a table in host memory; only where
    /// [`Backend::embeds_from_host`] says so.
    fn embed_host(
        &self,
        ids: &[u32],
        table: &[f32],
        out: &mut Self::Tensor,
        d: usize,
    ) -> Result<()> {
        let _ = (ids, table, out, d);
        Err(T5Error::Backend(format!(
            "{}: embedding lookups in host memory are not supported",
            self.name()
        )))
    }

    /// `out[i, :]` = row `ids[i]` of a linear weight's `[n, k]` view (`k = d`): embedding
    /// lookups in a head that is tied to the embedding. Backends may support it only for
    /// weights stored exactly (f32).
    fn embed_linear(
        &self,
        ids: &[u32],
        w: &Self::Weight,
        out: &mut Self::Tensor,
        d: usize,
    ) -> Result<()>;

    /// T5's RMSNorm: `out = w * x / sqrt(mean(x²) + eps)`, no mean subtraction, no bias.
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        out: &mut Self::Tensor,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<()>;

    /// `x = act(x)`, or `x = act(x) * up` when `up` is given (gated FFN).
    fn activate(
        &self,
        x: &mut Self::Tensor,
        up: Option<&Self::Tensor>,
        len: usize,
        act: Activation,
    ) -> Result<()>;

    /// `x *= s` over the first `len` values.
    fn scale(&self, x: &mut Self::Tensor, len: usize, s: f32) -> Result<()>;

    /// The first `len` values of `t` (`len` even) rounded to bf16 and stored two per slot: a
    /// key/value cache at half the memory traffic, for attention with [`KvFormat::Bf16`].
    fn compress_kv(&self, t: &Self::Tensor, len: usize) -> Result<Self::Tensor>;

    /// Whether this backend attends over [`KvFormat::Int8`] caches ([`Backend::quantize_kv`]).
    fn int8_kv(&self) -> bool {
        false
    }

    /// Whether this backend keeps a reduced-precision model's decoder self-attention caches
    /// in bf16 ([`KvFormat::Bf16`], written through [`CacheWrite::kv`]); otherwise they stay f32.
    fn bf16_self_kv(&self) -> bool {
        false
    }

    /// The first `positions` rows of `t` (`[positions, heads * d_kv]`) as a [`KvFormat::Int8`]
    /// cache: a quarter of f32's memory traffic, for int8 weights.
    fn quantize_kv(
        &self,
        t: &Self::Tensor,
        positions: usize,
        heads: usize,
        d_kv: usize,
    ) -> Result<Self::Tensor> {
        let _ = (t, positions, heads, d_kv);
        Err(T5Error::Backend(format!(
            "{}: no int8 key/value caches",
            self.name()
        )))
    }

    /// Uploads an encoder's position bias, given as `lines` (`[heads, q_len + kv_len - 1]`,
    /// [`BiasLayout::Lines`]), in a layout this backend's [`Backend::attention`] reads, and
    /// says which. By default the lines expanded into rows (`[heads, q_len, kv_len]`, the
    /// layout every backend reads); the CPU reads the lines themselves.
    fn upload_position_bias(
        &self,
        lines: &[f32],
        heads: usize,
        q_len: usize,
        kv_len: usize,
    ) -> Result<(Self::Tensor, BiasLayout)> {
        let rows = crate::model::relpos::rows_of_lines(lines, heads, q_len, kv_len)?;
        Ok((self.upload(&rows)?, BiasLayout::Rows { stride: kv_len }))
    }

    /// Bytes the encoder's attention holds at once besides its inputs and outputs (the position
    /// bias and the scores in flight) for `heads` heads over `sources` sequences of up to
    /// `src_len` tokens, where this
    /// backend counts them itself; `None` (the default): the memory plan counts a bias of rows
    /// and a `[src_len, src_len]` matrix of scores per head (`generate::memory::plan`).
    fn encoder_attention_bytes(&self, heads: usize, sources: usize, src_len: usize) -> Option<u64> {
        let _ = (heads, sources, src_len);
        None
    }

    /// Softmax attention without `1/sqrt(d_kv)` scaling (T5 folds it into the weights).
    /// `mask` (`[batch / kv_group, kv_len]`, added to the scores) may mask keys at the end of
    /// a row (padding) or at its start (a row that joined a running batch later than the
    /// others): leading masked keys are left out of the softmax altogether, so a row's result
    /// equals the one it gets without them, bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        mask: Option<&Self::Tensor>,
        out: &mut Self::Tensor,
        shape: AttnShape,
    ) -> Result<()>;

    /// Writes row `b` of `src` (`[batch, width]`) to row `pos` of sequence `b` in `cache`
    /// (`[batch, stride, width]`): appends one position to a key/value cache.
    fn write_position(
        &self,
        src: &Self::Tensor,
        cache: &mut Self::Tensor,
        batch: usize,
        width: usize,
        stride: usize,
        pos: usize,
    ) -> Result<()>;

    /// New tensor whose row `i` is row `rows[i]` of `src` (rows of `row_len` values).
    fn gather_rows(
        &self,
        src: &Self::Tensor,
        rows: &[usize],
        row_len: usize,
    ) -> Result<Self::Tensor>;

    /// New tensor of `rows` rows of `new_len` values: row `i` starts with row `i` of `src`
    /// (`old_len` values) and is zero after it. Grows key/value caches.
    fn widen_rows(
        &self,
        src: &Self::Tensor,
        rows: usize,
        old_len: usize,
        new_len: usize,
    ) -> Result<Self::Tensor>;

    /// Keeps rows `rows` (strictly increasing) of `t` (rows of `row_len` values), moved down
    /// in place: `t` then holds `rows.len()` rows. Drops finished sequences without copying
    /// the rows before the first one dropped.
    fn retain_rows(&self, t: &mut Self::Tensor, rows: &[usize], row_len: usize) -> Result<()>;

    /// Appends the first `len` values of `src` to `t`, which holds `t_len` values (rows
    /// joining a running batch; `t` grows in place when it can).
    fn append(
        &self,
        t: &mut Self::Tensor,
        t_len: usize,
        src: &Self::Tensor,
        len: usize,
    ) -> Result<()>;

    /// New tensor of `rows` rows of `len` values: row `i` is values `[start, start + len)` of
    /// row `i` of `src` (rows of `row_len` values). Drops the oldest cache positions.
    fn slice_rows(
        &self,
        src: &Self::Tensor,
        rows: usize,
        row_len: usize,
        start: usize,
        len: usize,
    ) -> Result<Self::Tensor>;

    /// Starts decoding step `pos` of a state whose buffers have layout id `layout` (None: this
    /// step cannot be recorded, e.g. its self-attention needs a mask), fed `tokens`. A backend
    /// that launches work from the host (CUDA) records a layout's step once and replays it
    /// for the steps after, reading the position and tokens from the device; the CPU runs
    /// every step as it comes.
    fn begin_step(&self, layout: Option<u64>, pos: usize, tokens: &[u32]) -> Result<StepPlan> {
        let _ = (layout, pos, tokens);
        Ok(StepPlan::Eager)
    }

    /// Ends a step that [`Backend::begin_step`] said to capture; `ok` says whether every
    /// operation was recorded. Returns whether the recorded step ran: false means the
    /// recording failed and the decoder runs the step's operations again, uncaptured.
    fn end_step(&self, ok: bool) -> Result<bool> {
        let _ = ok;
        Ok(false)
    }

    /// [`Backend::attention`] for a decoding step's self-attention over its cache, whose
    /// `kv_len` is the step's position + 1 (a recorded step reads that on the device).
    #[allow(clippy::too_many_arguments)]
    fn step_attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        mask: Option<&Self::Tensor>,
        out: &mut Self::Tensor,
        shape: AttnShape,
    ) -> Result<()> {
        self.attention(q, k, v, bias, mask, out, shape)
    }

    /// A sublayer's attention and its output projection, the residual added in place:
    /// `attn = attention(call)` (a decoding step's self-attention when `call.step`, as
    /// [`Backend::step_attention`]), then `x += attn · oᵀ` (`dims`: rows, `o`'s outputs and
    /// inputs). A backend may run the two as one operation (CUDA can, in one launch, with the
    /// same results bit for bit); `attn` then still holds the attention's output.
    fn attention_out(
        &self,
        call: AttnCall<'_, Self::Tensor>,
        attn: &mut Self::Tensor,
        o: &Self::Weight,
        x: &mut Self::Tensor,
        dims: MatDims,
    ) -> Result<()> {
        attention_then_out(self, call, attn, o, x, dims)
    }

    /// A decoding step's self-attention sublayer, the residual added in place:
    /// [`Backend::norm_qkv_step`] (q, k and v into `qkv`, this position's keys and values
    /// into the caches), then [`Backend::attention_out`] over the caches. A backend may run it
    /// as one operation (CUDA can, in one launch, with the same results bit for bit).
    fn self_attention_out(
        &self,
        call: SelfAttnCall<'_, Self::Tensor, Self::Weight>,
        x: &mut Self::Tensor,
        normed: &mut Self::Tensor,
        qkv: [&mut Self::Tensor; 3],
        cache: CacheWrite<'_, Self::Tensor>,
        attn: &mut Self::Tensor,
    ) -> Result<()> {
        self_attention_then_out(self, call, x, normed, qkv, cache, attn)
    }

    /// A decoding step's cross-attention sublayer, the residual added in place: q =
    /// rms_norm(x) · wqᵀ ([`Backend::norm_matmul_shared`]), then [`Backend::attention_out`]
    /// over the encoder's keys and values. A backend may run it as one operation (CUDA can).
    fn cross_attention_out(
        &self,
        call: CrossAttnCall<'_, Self::Tensor, Self::Weight>,
        x: &mut Self::Tensor,
        normed: &mut Self::Tensor,
        q: &mut Self::Tensor,
        attn: &mut Self::Tensor,
    ) -> Result<()> {
        cross_attention_then_out(self, call, x, normed, q, attn)
    }

    /// A feed-forward sublayer's products, the residual added in place:
    /// [`Backend::norm_ffn_up`] into `ff` (`call.up`: rows, d_ff, d_model; `normed` and
    /// `ff_up` scratch as there), then `x += ff · woᵀ` (`call.down`). A backend may run the two
    /// as one operation (CUDA can, in one launch, with the same results bit for bit).
    fn ffn_out(
        &self,
        call: FfnCall<'_, Self::Tensor, Self::Weight>,
        x: &mut Self::Tensor,
        normed: &mut Self::Tensor,
        ff: &mut Self::Tensor,
        ff_up: &mut Self::Tensor,
    ) -> Result<()> {
        ffn_then_out(self, call, x, normed, ff, ff_up)
    }

    /// Waits for the work queued so far (a GPU runs it asynchronously): timings of one stage,
    /// such as the encoder's, then hold that stage's work alone. The CPU has nothing to wait for.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// The most device memory this backend's allocations held at once since the last
    /// [`Backend::reset_device_peak_memory`], bytes (weights included; CUDA: the memory pool's
    /// high-water mark, comparable to torch's `max_memory_allocated`). None on the CPU, whose
    /// memory is the process's (peak RSS).
    fn device_peak_memory(&self) -> Option<u64> {
        None
    }

    /// Starts [`Backend::device_peak_memory`] again from what is held now.
    fn reset_device_peak_memory(&self) {}

    /// A line on how this backend ran its decoding steps (CUDA: graphs captured and replayed),
    /// for benchmarks; None when there is nothing to say.
    fn step_report(&self) -> Option<String> {
        None
    }

    /// Index of the largest value of each of `rows` rows of width `n` (first one on ties).
    fn argmax_rows(&self, x: &Self::Tensor, rows: usize, n: usize) -> Result<Vec<u32>>;

    /// Whether this backend screens LM heads in greedy decoding
    /// ([`Backend::upload_screen`], [`Backend::screened_argmax`]); false by default.
    fn screens_heads(&self) -> bool {
        false
    }

    /// The cheaper copy of an LM head `w` (`[n, k]`, the checkpoint's values) stored as
    /// `head` that [`Backend::screened_argmax`] reads, with its error bounds, as `choice`
    /// (`T5RT_SCREEN_HEAD`, read once by the model's loader) asks; `None` where the backend
    /// has no such path for that precision (the default).
    fn upload_screen(
        &self,
        w: &[f32],
        n: usize,
        k: usize,
        head: WeightDtype,
        choice: ScreenChoice,
    ) -> Result<Option<ScreenHead<Self::Weight>>> {
        let _ = (w, n, k, head, choice);
        Ok(None)
    }

    /// Greedy decoding's choice over the logits `x · headᵀ` (`x`: `rows` rows of the head's
    /// `k`), exactly as [`Backend::argmax_rows`] would give it on the head's logits with
    /// column `banned` set to -inf, without computing every logit with the head: the screen's
    /// logits, their error bound per column, and the head's logits of the columns that bound
    /// cannot rule out.
    /// `None` where the screen cannot decide (non-finite values, too many candidates): the
    /// caller then runs the full head. Only called with a `screen` from
    /// [`Backend::upload_screen`]. `scratch` (at least `rows * n` values, e.g. the logits'
    /// buffer) takes the screen's logits; its contents are left undefined.
    fn screened_argmax(
        &self,
        x: &Self::Tensor,
        head: &Self::Weight,
        screen: &ScreenHead<Self::Weight>,
        rows: usize,
        banned: Option<usize>,
        scratch: &mut Self::Tensor,
    ) -> Result<Option<Vec<u32>>> {
        let _ = (x, head, screen, rows, banned, scratch);
        Err(T5Error::Backend(format!(
            "{}: no screened LM head",
            self.name()
        )))
    }

    /// Sets column `col` of each of `rows` rows of width `n` to `value` (e.g. -inf to ban a token).
    fn fill_column(
        &self,
        x: &mut Self::Tensor,
        rows: usize,
        n: usize,
        col: usize,
        value: f32,
    ) -> Result<()>;
}

/// What one attention call of [`Backend::attention_out`] reads: as [`Backend::attention`]'s
/// arguments; `step`: a decoding step's self-attention over its cache (see
/// [`Backend::step_attention`]).
pub struct AttnCall<'a, T> {
    pub q: &'a T,
    pub k: &'a T,
    pub v: &'a T,
    pub bias: Option<&'a T>,
    pub mask: Option<&'a T>,
    pub shape: AttnShape,
    pub step: bool,
}

/// [`Backend::attention_out`] as two operations: the attention, then the output product
/// accumulated into `x` (the trait's default, and backends' fallback).
pub(crate) fn attention_then_out<B: Backend + ?Sized>(
    b: &B,
    c: AttnCall<'_, B::Tensor>,
    attn: &mut B::Tensor,
    o: &B::Weight,
    x: &mut B::Tensor,
    dims: MatDims,
) -> Result<()> {
    if c.step {
        b.step_attention(c.q, c.k, c.v, c.bias, c.mask, attn, c.shape)?;
    } else {
        b.attention(c.q, c.k, c.v, c.bias, c.mask, attn, c.shape)?;
    }
    b.matmul_nt(attn, o, x, dims, true)
}

/// What [`Backend::self_attention_out`] computes with: the sublayer's norm, its q/k/v and
/// output weights, the position bias and mask, the attention's shape, and the shapes of the
/// input products (`proj`) and the output product (`out_proj`).
pub struct SelfAttnCall<'a, T, W> {
    pub norm: &'a T,
    pub eps: f32,
    pub ws: [&'a W; 3],
    pub o: &'a W,
    pub bias: Option<&'a T>,
    pub mask: Option<&'a T>,
    pub shape: AttnShape,
    pub proj: MatDims,
    pub out_proj: MatDims,
}

impl<'a, T, W> SelfAttnCall<'a, T, W> {
    /// The sublayer's attention: the query `q` over the caches `k` and `v` (this step's keys
    /// and values written), with the position bias and mask; its length read on the device
    /// in a recorded step.
    pub fn attention<'b>(&self, q: &'b T, k: &'b T, v: &'b T) -> AttnCall<'b, T>
    where
        'a: 'b,
    {
        AttnCall {
            q,
            k,
            v,
            bias: self.bias,
            mask: self.mask,
            shape: self.shape,
            step: true,
        }
    }
}

/// [`Backend::self_attention_out`] as two operations (the trait's default, and backends'
/// fallback).
pub(crate) fn self_attention_then_out<B: Backend + ?Sized>(
    b: &B,
    c: SelfAttnCall<'_, B::Tensor, B::Weight>,
    x: &mut B::Tensor,
    normed: &mut B::Tensor,
    qkv: [&mut B::Tensor; 3],
    cache: CacheWrite<'_, B::Tensor>,
    attn: &mut B::Tensor,
) -> Result<()> {
    let [q, k, v] = qkv;
    let write = CacheWrite {
        k_cache: &mut *cache.k_cache,
        v_cache: &mut *cache.v_cache,
        capacity: cache.capacity,
        pos: cache.pos,
        kv: cache.kv,
    };
    b.norm_qkv_step(
        x,
        c.norm,
        c.eps,
        normed,
        c.ws,
        [&mut *q, k, v],
        write,
        c.proj,
    )?;
    let call = c.attention(&*q, &*cache.k_cache, &*cache.v_cache);
    b.attention_out(call, attn, c.o, x, c.out_proj)
}

/// What [`Backend::cross_attention_out`] computes with: the sublayer's norm, its q and output
/// weights, the encoder's keys and values and their mask, the attention's shape, and the two
/// products' shapes.
pub struct CrossAttnCall<'a, T, W> {
    pub norm: &'a T,
    pub eps: f32,
    pub wq: &'a W,
    pub o: &'a W,
    pub k: &'a T,
    pub v: &'a T,
    pub mask: Option<&'a T>,
    pub shape: AttnShape,
    pub proj: MatDims,
    pub out_proj: MatDims,
}

impl<'a, T, W> CrossAttnCall<'a, T, W> {
    /// The sublayer's attention: the query `q` over the encoder's keys and values, with their
    /// mask and no position bias.
    pub fn attention<'b>(&self, q: &'b T) -> AttnCall<'b, T>
    where
        'a: 'b,
    {
        AttnCall {
            q,
            k: self.k,
            v: self.v,
            bias: None,
            mask: self.mask,
            shape: self.shape,
            step: false,
        }
    }
}

/// [`Backend::cross_attention_out`] as two operations (the trait's default, and backends'
/// fallback).
pub(crate) fn cross_attention_then_out<B: Backend + ?Sized>(
    b: &B,
    c: CrossAttnCall<'_, B::Tensor, B::Weight>,
    x: &mut B::Tensor,
    normed: &mut B::Tensor,
    q: &mut B::Tensor,
    attn: &mut B::Tensor,
) -> Result<()> {
    b.norm_matmul_shared(x, c.norm, c.eps, normed, &[c.wq], &mut [&mut *q], c.proj)?;
    let call = c.attention(&*q);
    b.attention_out(call, attn, c.o, x, c.out_proj)
}

/// What [`Backend::ffn_out`] computes with: the sublayer's norm weights and epsilon, its input
/// products (`ws`: `[wi]`, or `[wi_0, wi_1]` with a gate) and activation, the output product
/// `wo`, and the two products' shapes.
pub struct FfnCall<'a, T, W> {
    pub norm: &'a T,
    pub eps: f32,
    pub ws: &'a [&'a W],
    pub act: Activation,
    pub wo: &'a W,
    pub up: MatDims,
    pub down: MatDims,
}

/// [`Backend::ffn_out`] as two operations (the trait's default, and backends' fallback).
pub(crate) fn ffn_then_out<B: Backend + ?Sized>(
    b: &B,
    c: FfnCall<'_, B::Tensor, B::Weight>,
    x: &mut B::Tensor,
    normed: &mut B::Tensor,
    ff: &mut B::Tensor,
    ff_up: &mut B::Tensor,
) -> Result<()> {
    b.norm_ffn_up(x, c.norm, c.eps, normed, c.ws, ff, ff_up, c.act, c.up)?;
    b.matmul_nt(ff, c.wo, x, c.down, true)
}

/// Where a decoding step's keys and values go ([`Backend::norm_qkv_step`]): row `b` of the
/// batch to position `pos` of `k_cache` / `v_cache`, each `[batch, capacity, slots]`, where a
/// position holds `width` f32 values ([`KvFormat::F32`]) or `width / 2` slots of two bf16
/// ([`KvFormat::Bf16`], as [`Backend::compress_kv`] packs them).
pub struct CacheWrite<'a, T> {
    pub k_cache: &'a mut T,
    pub v_cache: &'a mut T,
    pub capacity: usize,
    pub pos: usize,
    pub kv: KvFormat,
}

/// [`Backend::norm_qkv_step`] as separate operations: norm and products, then two cache
/// writes (the trait's default, and backends' fallback).
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_qkv_then_write<B: Backend + ?Sized>(
    b: &B,
    x: &B::Tensor,
    norm: &B::Tensor,
    eps: f32,
    normed: &mut B::Tensor,
    ws: [&B::Weight; 3],
    outs: [&mut B::Tensor; 3],
    cache: CacheWrite<'_, B::Tensor>,
    dims: MatDims,
) -> Result<()> {
    let [q, k, v] = outs;
    b.norm_matmul_shared(
        x,
        norm,
        eps,
        normed,
        &ws,
        &mut [&mut *q, &mut *k, &mut *v],
        dims,
    )?;
    let (rows, width) = (dims.m, dims.n);
    match cache.kv {
        KvFormat::F32 => {
            b.write_position(k, cache.k_cache, rows, width, cache.capacity, cache.pos)?;
            b.write_position(v, cache.v_cache, rows, width, cache.capacity, cache.pos)
        }
        KvFormat::Bf16 if width.is_multiple_of(2) => {
            let slots = width / 2;
            let (k, v) = (
                b.compress_kv(k, rows * width)?,
                b.compress_kv(v, rows * width)?,
            );
            b.write_position(&k, cache.k_cache, rows, slots, cache.capacity, cache.pos)?;
            b.write_position(&v, cache.v_cache, rows, slots, cache.capacity, cache.pos)
        }
        kv => Err(T5Error::Backend(format!(
            "self-attention caches of {width} values per position cannot be kept as {kv:?}"
        ))),
    }
}

/// [`Backend::norm_matmul_shared`] as separate operations: the norm into `normed`, then the
/// products (the trait's default, and backends' fallback).
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_then_products<B: Backend + ?Sized>(
    b: &B,
    x: &B::Tensor,
    norm: &B::Tensor,
    eps: f32,
    normed: &mut B::Tensor,
    ws: &[&B::Weight],
    outs: &mut [&mut B::Tensor],
    dims: MatDims,
) -> Result<()> {
    b.rms_norm(x, norm, normed, dims.m, dims.k, eps)?;
    b.matmul_nt_shared(normed, ws, outs, dims)
}

/// [`Backend::norm_ffn_up`] as separate operations: norm, products, activation.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_then_ffn_up<B: Backend + ?Sized>(
    b: &B,
    x: &B::Tensor,
    norm: &B::Tensor,
    eps: f32,
    normed: &mut B::Tensor,
    ws: &[&B::Weight],
    ff: &mut B::Tensor,
    ff_up: &mut B::Tensor,
    act: Activation,
    dims: MatDims,
) -> Result<()> {
    b.rms_norm(x, norm, normed, dims.m, dims.k, eps)?;
    let len = dims.m * dims.n;
    match ws {
        [wi] => {
            b.matmul_nt(normed, wi, ff, dims, false)?;
            b.activate(ff, None, len, act)
        }
        [wi_0, wi_1] => {
            b.matmul_nt_shared(normed, &[wi_0, wi_1], &mut [ff, ff_up], dims)?;
            b.activate(ff, Some(ff_up), len, act)
        }
        _ => Err(T5Error::Input(format!(
            "a feed-forward has one or two input products, not {}",
            ws.len()
        ))),
    }
}

/// The products of [`Backend::matmul_nt_shared`] one after the other: its default, and what a
/// backend falls back to when it cannot share the work.
pub(crate) fn matmul_nt_each<B: Backend + ?Sized>(
    b: &B,
    x: &B::Tensor,
    ws: &[&B::Weight],
    outs: &mut [&mut B::Tensor],
    dims: MatDims,
) -> Result<()> {
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        b.matmul_nt(x, w, out, dims, false)?;
    }
    Ok(())
}
