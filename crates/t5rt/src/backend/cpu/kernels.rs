//! CPU kernels on plain slices. Checked against [`super::reference`] by the tests.

use rayon::prelude::*;

use crate::backend::{AttnShape, MatDims};
use crate::config::Activation;

/// Products smaller than this many multiply-adds run on one thread: below it, waking the
/// other threads costs more than it saves (measured on the bundled model, batch 1).
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `out[m, n] (+)= x[m, k] · w[n, k]ᵀ` through the `gemm` crate; `w` is stored transposed,
/// `[k, n]` row-major (see `upload_linear`).
pub(super) fn matmul_nt(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    d: MatDims,
    accumulate: bool,
    threads: usize,
) {
    let parallelism = if threads > 1 && d.m * d.n * d.k >= PARALLEL_MIN_MACS {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let (m, n, k) = (d.m, d.n, d.k);
    // SAFETY: the caller checked x holds m*k values, w n*k and out m*n; the strides below
    // stay inside those ranges: out, x and the stored wᵀ are all row-major.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// One row of T5's RMSNorm; the mean of squares is accumulated in f32, as HF does.
pub(super) fn rms_norm_row(x: &[f32], w: &[f32], out: &mut [f32], eps: f32) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

/// The feed-forward activation.
#[inline]
pub(super) fn act(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Relu => x.max(0.0),
        // gelu_new: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
        Activation::GeluNew => {
            const SQRT_2_OVER_PI: f32 = 0.797_884_6;
            0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
        }
        Activation::Silu => x / (1.0 + (-x).exp()),
    }
}

/// Index of the first largest value.
pub(super) fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Attention, one output row (one query position of one sequence, all heads) per task.
pub(super) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
    mask: Option<&[f32]>,
    out: &mut [f32],
    s: AttnShape,
) {
    let inner = s.heads * s.d_kv;
    let rows = s.batch * s.q_len;
    out[..rows * inner]
        .par_chunks_exact_mut(inner)
        .enumerate()
        .for_each(|(row, out_row)| {
            let (b, qi) = (row / s.q_len, row % s.q_len);
            let kv_b = b / s.kv_group; // beams read their source's keys/values
            let q_row = &q[row * inner..(row + 1) * inner];
            let mut probs = vec![0.0f32; s.kv_len];
            for h in 0..s.heads {
                let qh = &q_row[h * s.d_kv..(h + 1) * s.d_kv];
                // scores = q·k (no 1/sqrt(d_kv): T5 folds it into the weights) + bias + mask
                for (j, p) in probs.iter_mut().enumerate() {
                    let kb = ((kv_b * s.kv_stride + j) * s.heads + h) * s.d_kv;
                    let kh = &k[kb..kb + s.d_kv];
                    let mut score: f32 = qh.iter().zip(kh).map(|(a, b)| a * b).sum();
                    if let Some(bias) = bias {
                        score += bias[(h * s.q_len + qi) * s.kv_len + j];
                    }
                    if let Some(mask) = mask {
                        score += mask[kv_b * s.kv_len + j];
                    }
                    *p = score;
                }
                softmax_in_place(&mut probs);
                // out_h = Σ_j p_j · v_j
                let oh = &mut out_row[h * s.d_kv..(h + 1) * s.d_kv];
                oh.fill(0.0);
                for (j, &p) in probs.iter().enumerate() {
                    if p == 0.0 {
                        continue; // masked key: exactly zero weight
                    }
                    let vb = ((kv_b * s.kv_stride + j) * s.heads + h) * s.d_kv;
                    for (o, &val) in oh.iter_mut().zip(&v[vb..vb + s.d_kv]) {
                        *o += p * val;
                    }
                }
            }
        });
}

/// Numerically stable softmax in f32.
pub(super) fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}
