//! Scalar reference kernels: slow, obvious, accumulated in f64. The oracle for every backend.

use crate::backend::{AttnShape, MatDims};
use crate::config::Activation;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`.
pub fn matmul_nt(x: &[f32], w: &[f32], d: MatDims) -> Vec<f32> {
    let mut out = vec![0.0; d.m * d.n];
    for i in 0..d.m {
        for j in 0..d.n {
            let mut acc = 0.0f64;
            for l in 0..d.k {
                acc += x[i * d.k + l] as f64 * w[j * d.k + l] as f64;
            }
            out[i * d.n + j] = acc as f32;
        }
    }
    out
}

/// f32 to the nearest bf16 (ties to even), as an f32.
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// `matmul_nt` with both operands rounded to bf16 first (the bf16 weight path's contract).
pub fn matmul_nt_bf16(x: &[f32], w: &[f32], d: MatDims) -> Vec<f32> {
    let x: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
    let w: Vec<f32> = w.iter().map(|&v| round_bf16(v)).collect();
    matmul_nt(&x, &w, d)
}

/// `matmul_nt` with both operands rounded to fp16 (the CUDA backend's f16 products).
pub fn matmul_nt_f16(x: &[f32], w: &[f32], d: MatDims) -> Vec<f32> {
    let r = |v: &f32| half::f16::from_f32(*v).to_f32();
    let x: Vec<f32> = x.iter().map(r).collect();
    let w: Vec<f32> = w.iter().map(r).collect();
    matmul_nt(&x, &w, d)
}

/// `matmul_nt` with the weights rounded to bf16 and the activations exact (the widened bf16
/// tiles of CPUs without AVX-512 BF16).
pub fn matmul_nt_bf16_weights(x: &[f32], w: &[f32], d: MatDims) -> Vec<f32> {
    let w: Vec<f32> = w.iter().map(|&v| round_bf16(v)).collect();
    matmul_nt(x, &w, d)
}

/// Each row of `v` (width `k`) quantized symmetrically to integers in [-127, 127]: the scale
/// is `max|row| / 127` and `q = round(x · (1 / scale))`, all in f32, ties to even; then scaled back
/// (in f64, so the product with the other operand's scale stays exact enough).
pub fn fake_quant_rows(v: &[f32], k: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(v.len());
    for row in v.chunks_exact(k) {
        let max = row.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        let inv = 1.0 / scale;
        out.extend(row.iter().map(|&x| {
            let q = (x * inv).round_ties_even().clamp(-127.0, 127.0);
            (q as f64 * scale as f64) as f32
        }));
    }
    out
}

/// Each row of `v` (width `k`, finite values) quantized to `center + scale · q`, `q` an
/// integer in [-127, 127]: the center halfway between the row's smallest and largest values,
/// the scale half their distance over 127 (1 for a constant row), `q = round((x - center) ·
/// (1 / scale))` in f32, ties to even; then mapped back in f64.
pub fn fake_quant_rows_affine(v: &[f32], k: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(v.len());
    for row in v.chunks_exact(k) {
        let lo = row.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let (center, half) = (0.5 * lo + 0.5 * hi, 0.5 * hi - 0.5 * lo);
        let scale = if half > 0.0 { half / 127.0 } else { 1.0 };
        let inv = 1.0 / scale;
        out.extend(row.iter().map(|&x| {
            let q = ((x - center) * inv).round_ties_even().clamp(-127.0, 127.0);
            (center as f64 + q as f64 * scale as f64) as f32
        }));
    }
    out
}

/// `matmul_nt` with activations quantized per row (affine, [`fake_quant_rows_affine`]) and
/// weights per output channel (symmetric, [`fake_quant_rows`]): the int8 weight path's
/// contract.
pub fn matmul_nt_int8(x: &[f32], w: &[f32], d: MatDims) -> Vec<f32> {
    matmul_nt(&fake_quant_rows_affine(x, d.k), &fake_quant_rows(w, d.k), d)
}

/// RMSNorm over rows of width `w.len()`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let mean_sq = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
        let inv = 1.0 / (mean_sq + eps as f64).sqrt();
        out.extend(
            row.iter()
                .zip(w)
                .map(|(&v, &g)| (g as f64 * v as f64 * inv) as f32),
        );
    }
    out
}

/// The activation, in f64.
pub fn act(x: f32, act: Activation) -> f32 {
    let x = x as f64;
    let y = match act {
        Activation::Relu => x.max(0.0),
        Activation::GeluNew => {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        }
        Activation::Silu => x / (1.0 + (-x).exp()),
    };
    y as f32
}

/// Attention with the same layouts as [`crate::backend::Backend::attention`].
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
    mask: Option<&[f32]>,
    s: AttnShape,
) -> Vec<f32> {
    let inner = s.heads * s.d_kv;
    let mut out = vec![0.0; s.batch * s.q_len * inner];
    for b in 0..s.batch {
        for qi in 0..s.q_len {
            for h in 0..s.heads {
                let q_at = (b * s.q_len + qi) * inner + h * s.d_kv;
                let kv_b = b / s.kv_group;
                let kv_at = |j: usize| ((kv_b * s.kv_stride + j) * s.heads + h) * s.d_kv;
                let mut scores: Vec<f64> = (0..s.kv_len)
                    .map(|j| {
                        let mut acc = 0.0f64;
                        for t in 0..s.d_kv {
                            acc += q[q_at + t] as f64 * k[kv_at(j) + t] as f64;
                        }
                        if let Some(bias) = bias {
                            acc += bias[s.bias_at(h, qi) + j] as f64;
                        }
                        if let Some(mask) = mask {
                            acc += mask[kv_b * s.kv_len + j] as f64;
                        }
                        acc
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                scores.iter_mut().for_each(|x| *x = (*x - max).exp());
                let sum: f64 = scores.iter().sum();
                for t in 0..s.d_kv {
                    let mut acc = 0.0f64;
                    for (j, p) in scores.iter().enumerate() {
                        acc += p / sum * v[kv_at(j) + t] as f64;
                    }
                    out[q_at + t] = acc as f32;
                }
            }
        }
    }
    out
}
