//! CPU kernels on plain slices. Checked against [`super::reference`] by the tests.

use rayon::prelude::*;

use super::isa::IsaLevel;
use crate::backend::AttnShape;
use crate::config::Activation;
use crate::math::softmax_in_place;

/// One row of T5's RMSNorm; the mean of squares is accumulated in f32, as HF does, in order.
/// (Summed in 16 lanes instead, the reduced precisions' per-step errors along HF's path moved
/// by up to 60% on the 32-step cases, int8's past CTranslate2's on flan-t5-small case a: the
/// metric is that sensitive to the last bit of a norm, so the order that was measured stays.)
pub(super) fn rms_norm_row(x: &[f32], w: &[f32], out: &mut [f32], eps: f32) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

/// `x = act(x)`, or `x = act(x) * up`, over one chunk.
#[inline(always)]
pub(super) fn activate_chunk(x: &mut [f32], up: Option<&[f32]>, a: Activation) {
    match up {
        None => {
            for v in x.iter_mut() {
                *v = act(*v, a);
            }
        }
        Some(up) => {
            for (v, &u) in x.iter_mut().zip(up) {
                *v = act(*v, a) * u;
            }
        }
    }
}

/// `$name`: a call of `$f` compiled with the target features `$feat` (the same operations,
/// so the same bits, in the vectors those features give).
///
/// # Safety
/// The CPU must have the features.
macro_rules! compiled_for {
    ($(#[$doc:meta])* $vis:vis $name:ident, $feat:literal, $f:ident($($arg:ident: $ty:ty),*)) => {
        compiled_for!($(#[$doc])* $vis $name, $feat, $f($($arg: $ty),*) -> ());
    };
    ($(#[$doc:meta])* $vis:vis $name:ident, $feat:literal,
     $f:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// The CPU must have the features this function is compiled for.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        $vis unsafe fn $name($($arg: $ty),*) -> $ret {
            $f($($arg),*)
        }
    };
}
pub(super) use compiled_for;

compiled_for!(
    /// [`activate_chunk`] compiled for AVX-512.
    pub(super) activate_chunk_avx512, "avx512f,avx512vl,fma",
    activate_chunk(x: &mut [f32], up: Option<&[f32]>, a: Activation)
);
compiled_for!(
    /// [`activate_chunk`] compiled for AVX2.
    pub(super) activate_chunk_avx2, "avx2,fma",
    activate_chunk(x: &mut [f32], up: Option<&[f32]>, a: Activation)
);

/// The feed-forward activation.
#[inline(always)]
pub(super) fn act(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Relu => x.max(0.0),
        // gelu_new: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
        Activation::GeluNew => {
            const SQRT_2_OVER_PI: f32 = 0.797_884_6;
            0.5 * x * (1.0 + crate::math::tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
        }
        Activation::Silu => x / (1.0 + crate::math::exp(-x)),
    }
}

/// A pointer that may cross threads: tasks write disjoint elements through it.
#[derive(Clone, Copy)]
pub(super) struct SharedMut(pub(super) *mut f32);
// SAFETY: used only to let parallel tasks write disjoint parts of one buffer.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not the raw field.
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// One row of attention scores (head `h`, query `qi`, key/value sequence `kv_b`) to
/// probabilities: `softmax(scores + bias[h, qi, :] + mask[kv_b, :])`.
#[inline(always)]
fn scores_to_probs(
    row: &mut [f32],
    bias: Option<&[f32]>,
    mask: Option<&[f32]>,
    s: AttnShape,
    h: usize,
    qi: usize,
    kv_b: usize,
) {
    if let Some(bias) = bias {
        let at = s.bias_at(h, qi);
        let bias = &bias[at..at + s.kv_len];
        for i in 0..row.len() {
            row[i] += bias[i];
        }
    }
    let mut start = 0;
    if let Some(mask) = mask {
        let at = kv_b * s.kv_len;
        let mask = &mask[at..at + s.kv_len];
        for i in 0..row.len() {
            row[i] += mask[i];
        }
        // Keys masked at the start of the row (a row that joined a running batch later) are
        // left out of the softmax, so that its sums run over the same values in the same
        // lanes as without them.
        while start + 1 < mask.len() && mask[start] == f32::NEG_INFINITY {
            start += 1;
        }
        row[..start].fill(0.0);
    }
    softmax_in_place(&mut row[start..]);
}

/// [`scores_to_probs`] for every row of `scores` (`[rows, kv_len]`), the queries from `q0` on.
#[inline(always)]
fn probs_rows(
    scores: &mut [f32],
    bias: Option<&[f32]>,
    mask: Option<&[f32]>,
    s: AttnShape,
    (h, q0, kv_b): (usize, usize, usize),
) {
    for (i, row) in scores.chunks_exact_mut(s.kv_len).enumerate() {
        scores_to_probs(row, bias, mask, s, h, q0 + i, kv_b);
    }
}

compiled_for!(
    /// [`probs_rows`] compiled for AVX-512.
    probs_rows_avx512, "avx512f,avx512vl,fma",
    probs_rows(scores: &mut [f32], bias: Option<&[f32]>, mask: Option<&[f32]>, s: AttnShape,
               at: (usize, usize, usize))
);
compiled_for!(
    /// [`probs_rows`] compiled for AVX2.
    probs_rows_avx2, "avx2,fma",
    probs_rows(scores: &mut [f32], bias: Option<&[f32]>, mask: Option<&[f32]>, s: AttnShape,
               at: (usize, usize, usize))
);

/// Scores per block of queries in [`attention_gemm`]: 512 Ki values (2 MiB), whatever the
/// input's length (a whole `[L, L]` matrix was 16 MiB a task at 2048 tokens and 64 MiB at
/// 4096, written, read and written by the softmax, then read again). Chosen by measurement
/// (`bench/RESULTS.md`, session 30): blocks of 128 Ki values were slower (the `gemm` crate
/// packs the keys again for every block).
const SCORE_BLOCK: usize = 512 << 10;

/// Queries per block of [`attention_gemm`] over `kv_len` keys ([`SCORE_BLOCK`] scores; at
/// least one query, at most `q_len`).
pub(super) fn score_block_rows(q_len: usize, kv_len: usize) -> usize {
    (SCORE_BLOCK / kv_len.max(1)).clamp(1, q_len.max(1))
}

/// The most scores one task of [`attention_gemm`] holds over at most `len` queries and keys:
/// the whole matrix up to [`SCORE_BLOCK`] values, one row past it. Grows with `len` (a
/// block's own `rows · kv_len` does not quite), so a plan made for the longest input covers
/// every shorter one.
pub(super) fn most_scores_per_task(len: usize) -> usize {
    len.saturating_mul(len).min(SCORE_BLOCK).max(len)
}

/// Attention over many queries (the encoder): per (sequence, head), in blocks of queries
/// ([`SCORE_BLOCK`]), scores = q·kᵀ and out = softmax(scores + bias + mask)·v as two `gemm`
/// calls. A row's scores, softmax and weighted sum involve its own query alone, so the blocks
/// change its values only in rounding (the `gemm` crate may split the sums of a short block
/// otherwise); up to 724 tokens the block is the whole sequence.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_gemm(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
    mask: Option<&[f32]>,
    out: &mut [f32],
    s: AttnShape,
    isa: IsaLevel,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let inner = s.heads * s.d_kv;
    let dst = SharedMut(out.as_mut_ptr());
    (0..s.batch * s.heads).into_par_iter().for_each(|task| {
        let (b, h) = (task / s.heads, task % s.heads);
        let kv_b = b / s.kv_group;
        let kv0 = kv_b * s.kv_stride * inner + h * s.d_kv;
        let block = score_block_rows(s.q_len, s.kv_len);
        debug_assert!(block * s.kv_len <= most_scores_per_task(s.q_len.max(s.kv_len)));
        let mut scores = vec![0.0f32; block * s.kv_len];
        for i0 in (0..s.q_len).step_by(block) {
            let rows = block.min(s.q_len - i0);
            let scores = &mut scores[..rows * s.kv_len];
            let q0 = (b * s.q_len + i0) * inner + h * s.d_kv;
            // SAFETY: the caller checked every buffer against `s`; the strides below address
            // q[b, i, h, :], k/v[kv_b, j, h, :] and out[b, i, h, :] only, and each task writes
            // the out elements of its own (b, h), disjoint from every other task's.
            unsafe {
                // scores[i, j] = Σ_t q[b, i0 + i, h, t] · k[kv_b, j, h, t] (no 1/sqrt(d_kv):
                // T5)
                gemm_rows(
                    (rows, s.kv_len, s.d_kv),
                    (scores.as_mut_ptr(), s.kv_len),
                    (q.as_ptr().add(q0), inner),
                    (k.as_ptr().add(kv0), inner, 1),
                );
            }
            let at = (h, i0, kv_b);
            #[cfg(target_arch = "x86_64")]
            if isa.avx512() {
                // SAFETY: the backend only runs at levels the CPU has (`IsaLevel::checked`).
                unsafe { probs_rows_avx512(scores, bias, mask, s, at) };
            } else if isa >= IsaLevel::Avx2 {
                // SAFETY: as above.
                unsafe { probs_rows_avx2(scores, bias, mask, s, at) };
            } else {
                probs_rows(scores, bias, mask, s, at);
            }
            #[cfg(not(target_arch = "x86_64"))]
            probs_rows(scores, bias, mask, s, at);
            // SAFETY: as above.
            unsafe {
                // out[b, i0 + i, h, :] = Σ_j p[i, j] · v[kv_b, j, h, :]
                gemm_rows(
                    (rows, s.d_kv, s.kv_len),
                    (dst.get().add(q0), inner),
                    (scores.as_ptr(), s.kv_len),
                    (v.as_ptr().add(kv0), 1, inner),
                );
            }
        }
    });
}

/// `dst = lhs · rhs` through the `gemm` crate on the calling thread, as [`attention_gemm`]
/// runs its products: `(m, n, k)`; `dst` `[m, n]` and `lhs` `[m, k]` with unit column stride and
/// the given row stride; `rhs` `[k, n]` with the given column and row strides.
///
/// # Safety
/// Each pointer addresses every element its shape and strides name.
unsafe fn gemm_rows(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    (lhs, lhs_rs): (*const f32, usize),
    (rhs, rhs_cs, rhs_rs): (*const f32, usize, usize),
) {
    // SAFETY: the caller's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs,
            1,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// One small product of the form of [`attention_gemm`]'s second (the weighted values), so
/// that the `gemm` crate's per-thread scratch (an L2-sized buffer, allocated at a thread's
/// first product of that form, with an abort if that fails) is made when the pool starts
/// rather than midway through a run.
pub(super) fn warm_gemm() {
    const N: usize = 64;
    let (probs, v) = (vec![0.0f32; N * N], vec![0.0f32; N * N]);
    let mut out = vec![0.0f32; N * N];
    // SAFETY: three N x N row-major buffers, addressed as `attention_gemm`'s second product
    // addresses its own.
    unsafe {
        gemm_rows(
            (N, N, N),
            (out.as_mut_ptr(), N),
            (probs.as_ptr(), N),
            (v.as_ptr(), 1, N),
        )
    };
}

#[cfg(test)]
mod tests {
    use super::{most_scores_per_task, score_block_rows, SCORE_BLOCK};

    /// A task of `attention_gemm` holds `score_block_rows · kv_len` scores; the memory plan
    /// counts `most_scores_per_task` for the longest input: never less, for any input up to
    /// it (every length to 3000, then past the point where a block is one query), and the
    /// count grows with the length.
    #[test]
    fn the_counted_scores_cover_every_block() {
        let mut last = 0;
        for l in (1..3000).chain([SCORE_BLOCK - 1, SCORE_BLOCK, SCORE_BLOCK + 7]) {
            let most = most_scores_per_task(l);
            assert!(most >= last, "{l}");
            last = most;
            let rows = score_block_rows(l, l);
            assert!(rows >= 1 && rows <= l, "{l}");
            assert!(rows * l <= most, "{l}: {rows} rows");
            // Up to 724 tokens the block is the whole sequence.
            assert_eq!(rows == l, l * l <= SCORE_BLOCK, "{l}");
        }
    }
}
