//! Greedy decoding's LM head without every logit ([`Backend::screened_argmax`]).
//!
//! The LM head is the largest product of a decoding step (t5-base: 32128 x 768, a fifth of
//! the bytes a batch-1 f32 step reads; t5-small: 32128 x 512, 43% of a step's multiply-adds).
//! Greedy search only needs the index of each row's largest logit, so the head is first run
//! on a cheaper copy, the screen, and the head's own logits are then computed only for the
//! columns that the screen's error bound cannot rule out. The result is the head's argmax,
//! bit for bit. The screen is an int8 copy of the head (a quarter of an f32 head's bytes, half
//! a bf16 head's): for f32 heads, and for bf16 heads at the levels whose bf16 products are
//! widened (int8 products run at 1.6x-3.2x the widened bf16 tiles' rate there; against
//! `vdpbf16ps` the screen gained nothing measurable, see [`screen_kind`]).
//! `T5RT_SCREEN_HEAD=bf16` screens an f32 head with a bf16 copy instead (the screen of earlier
//! versions: fewer candidates, a slower screen) and bf16 heads not at all. Neither changes any
//! result.
//!
//! **bf16 screen of an f32 head.**
//! - For column `c`, the exact logit `L = Σ x_i w_i`, the f32 one `F` (the tiles' fused
//!   multiply-adds in order of `k`) and the screen's `B` (both operands rounded to bf16, each
//!   by at most 2^-8 relative; products exact in f32; f32 sums) satisfy `|F - L| <= γ_k Σ|x_i
//!   w_i|` and `|B - L| <= (2^-7 + 2^-16 + γ_k (1 + 2^-7)) Σ|x_i w_i|`, with `γ_k = k u / (1 -
//!   k u)`, `u = 2^-24` (rounding error of any order of f32 sums of `k` terms). Σ|x_i w_i| <=
//!   ‖x‖ ‖w_c‖ (Cauchy-Schwarz), so `|F - B| <= δ_k ‖x‖ ‖w_c‖` with `δ_k` the sum of the two,
//!   1% larger (which also covers the f32 rounding of the bound's own arithmetic). Subnormal
//!   values escape the relative bounds: `vdpbf16ps` reads subnormal operands as zero and
//!   flushes subnormal results, and bf16 rounds a subnormal with an absolute error (up to
//!   2^-134), so a term loses at most `2^-126` times its other operand, and each of the `k`
//!   roundings at most `2^-126`. Hence `E_c = δ_k ‖x‖ ‖w_c‖ + 2^-126 (1 + 2^-7) (‖x‖₁ + √k
//!   ‖w_c‖) + k 2^-126`, with `‖w_c‖₁ <= √k ‖w_c‖`.
//!
//! **int8 screen of a bf16 or f32 head.**
//! - The head's values `w` (the bf16-rounded weights, exact in f32) are quantized per column
//!   as int8 weights are, `ŵ = s_c p` with `e = w - ŵ`, and each activation row as the int8
//!   products do it, `x̂ = center + s q` with `d = x - x̂` (recomputed here with the scalar
//!   rule, which the vector kernels match bit for bit). The screen's logit `Q` is `Σ x̂_i ŵ_i`
//!   (exact i32 sums) up to its f32 epilogue's rounding, at most `8u (127 s + |center|) √k
//!   (‖w_c‖ + ‖e_c‖)` (a few roundings of terms bounded by `(127 s + |center|) ‖ŵ_c‖₁`).
//!   Since `Σ x̂ ŵ - Σ x w = -Σ d w - Σ x e + Σ d e`, Cauchy-Schwarz gives `|Q - L| <= ‖d‖
//!   ‖w_c‖ + ‖x‖ ‖e_c‖ + ‖d‖ ‖e_c‖` plus that rounding; `‖e_c‖` is computed at load.
//! - The head's own logit `F`: where a bf16 head's products round the activations to bf16
//!   (`vdpbf16ps`, and the portable code), at most 2^-8 relative, products are exact and the
//!   sums f32, so `|F - L| <= (2^-8 + γ_k (1 + 2^-8)) ‖x‖ ‖w_c‖`, with the same subnormal
//!   terms as above (here with `2k` flushes of at most `2^-126`, should a CPU flush a product
//!   apart from its sum; the int8 epilogue's own underflows are far smaller); an f32 head, and
//!   a bf16 head in the widened tiles (activations kept in f32), have `γ_k` alone. So
//!   `E_c = a ‖w_c‖ + b ‖e_c‖ + abs`, with per-row `a`, `b` and `abs`, all 1% larger. Heads
//!   with more than 130000 inputs (past int8's exact i32 sums) get no int8 screen.
//!
//! **Both.**
//! - `lb = max_c (S_c - E_c)` (`S` the screen's logits) is at most the largest of the head's
//!   logits; a column with `S_c + E_c < lb` has `F_c < max F` and cannot be chosen, nor tie.
//!   The others (the candidates) get their logits from the head's own tiles on a weight of
//!   just those columns: each column's sum runs in the same order in any panel, so they are
//!   the full product's values bit for bit; the first largest of them in column order is
//!   [`crate::math::argmax`]'s choice.
//! - A batch with a row whose screen logits or norms are not all finite, or whose bound could
//!   overflow, or whose candidates are more than an eighth of the vocabulary, is left
//!   undecided: the caller runs the full head for the whole batch then.
//!
//! [`Backend::screened_argmax`]: crate::backend::Backend::screened_argmax

use rayon::prelude::*;

use super::check_int8_inputs;
use super::isa::IsaLevel as Isa;
use super::kernels::compiled_for;
use super::packed::{
    affine_i8, bf16_bits, bf16_value, matmul_packed, quantize_int8_row, quantize_one, PackedWeight,
};
use crate::backend::{ScreenChoice, ScreenHead, WeightDtype};
use crate::error::T5Error;

/// `u`, f32's unit roundoff.
const U: f64 = 1.0 / (1u64 << 24) as f64;

/// `γ_k = k u / (1 - k u)`: the relative error of any order of f32 sums of `k` terms.
fn gamma(k: usize) -> f64 {
    let ku = k as f64 * U;
    ku / (1.0 - ku)
}

/// `δ_k` of the module docs: the bound on `|F_c - B_c|` per unit of `‖x‖ ‖w_c‖` (a bf16
/// screen of an f32 head).
pub(super) fn relative_bound(k: usize) -> f64 {
    (2f64.powi(-7) + 2f64.powi(-16) + gamma(k) * (2.0 + 2f64.powi(-7))) * 1.01
}

/// The bound on `|F_c - L_c|` per unit of `‖x‖ ‖w_c‖` for a head stored as `head` at level
/// `isa`: f32 sums alone, unless the head's products round the activations to bf16.
fn head_bound(head: WeightDtype, k: usize, isa: Isa) -> f64 {
    if head == WeightDtype::Bf16 && isa.bf16_rounds_activations() {
        2f64.powi(-8) + gamma(k) * (1.0 + 2f64.powi(-8))
    } else {
        gamma(k)
    }
}

/// The screen a head stored as `head` with `k` inputs gets at level `isa`: int8 for f32
/// heads, and for bf16 heads where bf16 products are widened to f32 (no AVX-512 BF16; with
/// `vdpbf16ps` the screen gained nothing measurable: the head there is already half int8's
/// rate). `choice` [`ScreenChoice::Int8`] (`T5RT_SCREEN_HEAD=int8`) screens bf16 heads at
/// every level, [`ScreenChoice::Bf16`] screens f32 heads with a bf16 copy (and bf16 heads not
/// at all). Heads past int8's exact i32 sums get the bf16 screen (f32) or none.
pub(super) fn screen_kind(
    head: WeightDtype,
    k: usize,
    isa: Isa,
    choice: ScreenChoice,
) -> Option<WeightDtype> {
    let int8_exact = check_int8_inputs(k).is_ok();
    match (head, choice) {
        (_, ScreenChoice::Off) => None,
        (WeightDtype::F32, ScreenChoice::Bf16) => Some(WeightDtype::Bf16),
        (WeightDtype::F32, _) if !int8_exact => Some(WeightDtype::Bf16),
        (WeightDtype::F32, _) => Some(WeightDtype::Int8),
        (WeightDtype::Bf16, ScreenChoice::Int8) if int8_exact => Some(WeightDtype::Int8),
        (WeightDtype::Bf16, ScreenChoice::Default) if int8_exact => {
            (!isa.bf16_rounds_activations()).then_some(WeightDtype::Int8)
        }
        _ => None,
    }
}

/// The `kind` screen of a head `w` (`[n, k]`, the checkpoint's values) stored as `head`, with
/// its norms, on the current rayon pool.
pub(super) fn build(
    w: &[f32],
    n: usize,
    k: usize,
    head: WeightDtype,
    kind: WeightDtype,
    isa: Isa,
) -> Result<ScreenHead<PackedWeight>, T5Error> {
    if kind != WeightDtype::Int8 {
        return Ok(ScreenHead {
            weight: PackedWeight::pack(w, n, k, kind, isa)?,
            kind,
            norms: ScreenHead::<()>::row_norms(w, k),
            err_norms: Vec::new(),
        });
    }
    // Per column: the head's values, their int8 form and the two norms.
    let mut q = crate::alloc::try_zeroed::<i8>(n * k, "the screen's int8 head")?;
    let mut scales = crate::alloc::try_filled(n, 1.0f32, "the screen's scales")?;
    let mut norms = crate::alloc::try_zeroed::<f32>(n, "the screen's norms")?;
    let mut err_norms = crate::alloc::try_zeroed::<f32>(n, "the screen's norms")?;
    let up = |sq: f64| (sq.sqrt() * (1.0 + 1e-6)) as f32;
    if k > 0 {
        q.par_chunks_mut(k)
            .zip(w.par_chunks(k))
            .zip(scales.par_iter_mut())
            .zip(norms.par_iter_mut().zip(err_norms.par_iter_mut()))
            .for_each_init(
                || vec![0.0f32; k],
                |row, (((qrow, src), scale), (norm, err))| {
                    for (r, &v) in row.iter_mut().zip(src) {
                        *r = match head {
                            WeightDtype::Bf16 => bf16_value(bf16_bits(v)),
                            _ => v,
                        };
                    }
                    // The int8 weights' own rule (`quantize_int8`).
                    *scale = quantize_int8_row(row, qrow, isa);
                    // Both norms in f64, eight running sums each (any order is within the
                    // slack).
                    let (mut sq, mut esq) = ([0.0f64; 8], [0.0f64; 8]);
                    let s = *scale as f64;
                    for (vs, qs) in row.chunks(8).zip(qrow.chunks(8)) {
                        for (j, (&v, &qv)) in vs.iter().zip(qs).enumerate() {
                            let e = v as f64 - s * qv as f64;
                            sq[j] += v as f64 * v as f64;
                            esq[j] += e * e;
                        }
                    }
                    (*norm, *err) = (up(sq.iter().sum()), up(esq.iter().sum()));
                },
            );
    }
    Ok(ScreenHead {
        weight: PackedWeight::from_int8(&q, &scales, n, k)?,
        kind,
        norms,
        err_norms,
    })
}

/// One row's error bound per column, `E_c = per_norm ‖w_c‖ + per_err ‖e_c‖ + abs`.
#[derive(Clone, Copy)]
struct Bound {
    per_norm: f32,
    per_err: f32,
    abs: f32,
}

impl Bound {
    /// `E_c` for a column of norm `nc` and error norm `ec`, in f32 (the 1% in the factors
    /// covers this arithmetic's rounding).
    #[inline(always)]
    fn at(self, nc: f32, ec: f32) -> f32 {
        (nc * self.per_norm + ec * self.per_err) + self.abs
    }
}

/// `2^-126 (1 + 2^-7)`, 1% larger: the subnormal terms' factor.
fn tiny() -> f64 {
    2f64.powi(-126) * (1.0 + 2f64.powi(-7)) * 1.01
}

/// A row's bound for a bf16 screen of an f32 head; `None` where it could overflow.
fn bf16_bound(x: &[f32], top: f64, rel: f64) -> Option<Bound> {
    let xn = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    if !(xn.is_finite() && top.is_finite()) || xn * top > 1e30 {
        return None;
    }
    let k = x.len() as f64;
    let x1: f64 = x.iter().map(|&v| (v as f64).abs()).sum();
    Some(Bound {
        per_norm: (xn * rel + tiny() * k.sqrt()) as f32,
        per_err: 0.0,
        abs: (tiny() * x1 + 1.01 * k * 2f64.powi(-126)) as f32,
    })
}

/// A row's bound for an int8 screen of a head stored as `head`; `None` where it could
/// overflow. `top`: the largest of the norms and error norms.
fn int8_bound(x: &[f32], head: WeightDtype, top: f64, isa: Isa) -> Option<Bound> {
    let (center, scale) = affine_i8(x, isa);
    let inv = 1.0 / scale;
    let (mut xsq, mut dsq, mut x1) = (0.0f64, 0.0f64, 0.0f64);
    for &v in x {
        // The quantized value the int8 tiles use (`quantize_row`'s scalar rule).
        let q = quantize_one(v - center, inv) as f64;
        let d = v as f64 - (center as f64 + scale as f64 * q);
        xsq += v as f64 * v as f64;
        dsq += d * d;
        x1 += (v as f64).abs();
    }
    let (xn, dn) = (xsq.sqrt(), dsq.sqrt());
    if !(xn.is_finite() && dn.is_finite() && top.is_finite()) || (xn + dn) * top > 1e30 {
        return None;
    }
    let k = x.len() as f64;
    let r = 8.0 * U * (127.0 * scale as f64 + (center as f64).abs()) * k.sqrt();
    Some(Bound {
        per_norm: ((dn + head_bound(head, x.len(), isa) * xn + r + tiny() * k.sqrt()) * 1.01)
            as f32,
        per_err: ((xn + dn + r) * 1.01) as f32,
        // (Twice `k` flushes: each multiply-add's result and, should the CPU flush it apart,
        // its product.)
        abs: ((tiny() * x1 + 2.02 * k * 2f64.powi(-126)) * 1.01) as f32,
    })
}

/// Columns per step of the candidate scans (one AVX-512 vector).
const LANES: usize = 16;

/// `max_c (S_c - E_c)` over `approx` (one row's screen logits), and whether every screen
/// value and norm (and error norm) is finite ([`Bound::at`] gives `E_c`). `errs` has
/// `approx`'s length (a bf16 screen passes its norms with `per_err` 0). In blocks of 16 with
/// no early exit, so that it vectorises.
#[inline(always)]
#[allow(clippy::eq_op)]
fn floor_of(approx: &[f32], norms: &[f32], errs: &[f32], b: Bound) -> (f32, bool) {
    let mut top = [f32::NEG_INFINITY; LANES];
    // (v - v) + ... is 0 for finite values and NaN otherwise; NaN stays in the sums.
    let mut check = [0.0f32; LANES];
    let mut one = |j: usize, v: f32, nc: f32, ec: f32| {
        let t = v - b.at(nc, ec);
        top[j] = if t > top[j] { t } else { top[j] };
        check[j] += (v - v) + (nc - nc) + (ec - ec);
    };
    let (a, n, e) = (
        approx.chunks_exact(LANES),
        norms.chunks_exact(LANES),
        errs.chunks_exact(LANES),
    );
    let tails = (a.remainder(), n.remainder(), e.remainder());
    for ((a, n), e) in a.zip(n).zip(e) {
        for j in 0..LANES {
            one(j, a[j], n[j], e[j]);
        }
    }
    for ((&v, &nc), &ec) in tails.0.iter().zip(tails.1).zip(tails.2) {
        one(0, v, nc, ec);
    }
    let lb = top
        .iter()
        .fold(f32::NEG_INFINITY, |m, &t| if t > m { t } else { m });
    (lb, check.iter().all(|&c| c == 0.0))
}

/// Appends to `out` the columns `c0 + i` of `approx` with `S_c + E_c >= lb`.
#[inline(always)]
fn pick(
    approx: &[f32],
    norms: &[f32],
    errs: &[f32],
    (b, lb, c0): (Bound, f32, usize),
    out: &mut Vec<u32>,
) {
    let keep = |v: f32, nc: f32, ec: f32| v + b.at(nc, ec) >= lb;
    let (a, n, e) = (
        approx.chunks_exact(LANES),
        norms.chunks_exact(LANES),
        errs.chunks_exact(LANES),
    );
    let full = approx.len() / LANES * LANES;
    let tails = (a.remainder(), n.remainder(), e.remainder());
    for (i, ((a, n), e)) in a.zip(n).zip(e).enumerate() {
        let mut hit = [false; LANES];
        for j in 0..LANES {
            hit[j] = keep(a[j], n[j], e[j]);
        }
        if hit.iter().any(|&h| h) {
            let base = c0 + i * LANES;
            out.extend((0..LANES).filter(|&j| hit[j]).map(|j| (base + j) as u32));
        }
    }
    for (j, ((&v, &nc), &ec)) in tails.0.iter().zip(tails.1).zip(tails.2).enumerate() {
        if keep(v, nc, ec) {
            out.push((c0 + full + j) as u32);
        }
    }
}

/// Each row's candidates (columns its screen logits cannot rule out), in column order; `None`
/// when a screen value or norm is not finite (the row must take the full head). The banned
/// column takes no part.
#[inline(always)]
fn candidates_scalar(
    approx: &[f32],
    norms: &[f32],
    errs: &[f32],
    b: Bound,
    banned: Option<usize>,
) -> Option<Vec<u32>> {
    let n = approx.len().min(norms.len());
    // A screen without error norms (bf16) reads its norms there, times `per_err` = 0.
    let errs = if errs.is_empty() { norms } else { errs };
    // The columns before and after the banned one.
    let parts = match banned {
        Some(c) if c < n => [(0, c), (c + 1, n)],
        _ => [(0, n), (n, n)],
    };
    let mut lb = f32::NEG_INFINITY;
    for &(a, z) in &parts {
        let (t, ok) = floor_of(&approx[a..z], &norms[a..z], &errs[a..z], b);
        if !ok {
            return None;
        }
        lb = if t > lb { t } else { lb };
    }
    if let Some(c) = banned.filter(|&c| c < n) {
        // The banned column's own values still have to be finite.
        if !(approx[c].is_finite() && norms[c].is_finite()) {
            return None;
        }
    }
    let mut out = Vec::new();
    for &(a, z) in &parts {
        pick(
            &approx[a..z],
            &norms[a..z],
            &errs[a..z],
            (b, lb, a),
            &mut out,
        );
    }
    Some(out)
}

compiled_for!(
    /// [`candidates_scalar`] compiled for AVX-512.
    candidates_avx512, "avx512f,avx512vl,fma",
    candidates_scalar(approx: &[f32], norms: &[f32], errs: &[f32], b: Bound,
                      banned: Option<usize>) -> Option<Vec<u32>>
);
compiled_for!(
    /// [`candidates_scalar`] compiled for AVX2.
    candidates_avx2, "avx2,fma",
    candidates_scalar(approx: &[f32], norms: &[f32], errs: &[f32], b: Bound,
                      banned: Option<usize>) -> Option<Vec<u32>>
);

/// [`candidates_scalar`], compiled for the vector width `isa` allows (the same results).
fn candidates(
    approx: &[f32],
    norms: &[f32],
    errs: &[f32],
    b: Bound,
    banned: Option<usize>,
    isa: Isa,
) -> Option<Vec<u32>> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `isa` is at most what this CPU has (checked where the backend was made).
        if isa.avx512() {
            return unsafe { candidates_avx512(approx, norms, errs, b, banned) };
        }
        if isa >= Isa::Avx2 {
            return unsafe { candidates_avx2(approx, norms, errs, b, banned) };
        }
    }
    let _ = isa;
    candidates_scalar(approx, norms, errs, b, banned)
}

/// [`crate::backend::Backend::screened_argmax`] on the CPU, in the thread pool it runs in:
/// `head` is the LM head (f32 or bf16) and `screen` its screen from [`build`]; `None` where
/// the screen cannot decide (the caller then runs the full head); an error where its buffers
/// cannot be had.
pub(super) fn screened_argmax(
    x: &[f32],
    head: &PackedWeight,
    screen: &ScreenHead<PackedWeight>,
    rows: usize,
    banned: Option<usize>,
    scratch: &mut [f32],
    isa: Isa,
) -> Result<Option<Vec<u32>>, T5Error> {
    let (n, k) = (head.n, head.k);
    let x = &x[..rows * k];
    if rows == 0 || n < 2 {
        return Ok(None);
    }
    let (norms, err_norms) = (&screen.norms, &screen.err_norms);
    let approx = &mut scratch[..rows * n];
    matmul_packed(x, &screen.weight, approx, rows, false, isa)?;
    let approx = &*approx;
    let top = norms.iter().chain(err_norms).fold(0.0f32, |m, &v| m.max(v)) as f64;
    let rel = relative_bound(k);
    let int8 = screen.weight.kind == WeightDtype::Int8;
    let found: Option<Vec<Vec<u32>>> = approx
        .par_chunks_exact(n)
        .zip(x.par_chunks_exact(k))
        .map(|(s, xr)| {
            let b = if int8 {
                int8_bound(xr, head.kind, top, isa)?
            } else {
                bf16_bound(xr, top, rel)?
            };
            candidates(s, norms, err_norms, b, banned, isa)
        })
        .collect();
    let Some(found) = found else {
        return Ok(None);
    };
    let mut union: Vec<u32> = found.iter().flatten().copied().collect();
    union.sort_unstable();
    union.dedup();
    if union.is_empty() || union.len() > n / 8 {
        return Ok(None);
    }
    // The candidates' columns of the head, as a product of their own (`gather` refuses
    // anything but f32 and bf16: the full head then).
    let Some(sub) = head.gather(&union)? else {
        return Ok(None);
    };
    let u = union.len();
    let mut exact = crate::alloc::try_zeroed::<f32>(rows * u, "the screen's candidates")?;
    matmul_packed(x, &sub, &mut exact, rows, false, isa)?;
    let chosen = found
        .iter()
        .zip(exact.chunks_exact(u))
        .map(|(cands, vals)| {
            // Each candidate's value, in column order; the first largest wins (NaNs skipped,
            // as `math::argmax` does; none arise here: every screen value was finite).
            let value = |c: u32| vals[union.binary_search(&c).expect("in the union")];
            let mut best: Option<(u32, f32)> = None;
            for &c in cands {
                let v = value(c);
                if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
                    best = Some((c, v));
                }
            }
            best.map_or(0, |(c, _)| c)
        })
        .collect();
    Ok(Some(chosen))
}

#[cfg(test)]
mod tests {
    use super::{build, screened_argmax, Isa};
    use crate::backend::cpu::packed::PackedWeight;
    use crate::backend::cpu::{CpuBackend, IsaLevel};
    use crate::backend::{Backend, MatDims, WeightDtype};

    /// A small deterministic generator (values in [-1, 1)).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    /// What greedy search chose before screening: the head's logits (`head`: its precision),
    /// `banned` at -inf, the first largest of each row.
    #[allow(clippy::too_many_arguments)]
    fn oracle(
        b: &CpuBackend,
        head: WeightDtype,
        x: &[f32],
        w: &[f32],
        rows: usize,
        n: usize,
        k: usize,
        banned: Option<usize>,
    ) -> Vec<u32> {
        let weight = match head {
            WeightDtype::F32 => b.upload_linear_f32(w, n, k),
            _ => b.upload_linear(w, n, k),
        }
        .unwrap();
        let mut logits = b.zeros(rows * n).unwrap();
        let d = MatDims { m: rows, n, k };
        b.matmul_nt(&x.to_vec(), &weight, &mut logits, d, false)
            .unwrap();
        if let Some(c) = banned {
            b.fill_column(&mut logits, rows, n, c, f32::NEG_INFINITY)
                .unwrap();
        }
        b.argmax_rows(&logits, rows, n).unwrap()
    }

    /// The pairs of head precision and screen the tests run (whatever `screen_kind` picks at
    /// each level): int8 screens of f32 and bf16 heads, and the bf16 screen of an f32 head.
    const PAIRS: [(WeightDtype, WeightDtype); 3] = [
        (WeightDtype::F32, WeightDtype::Bf16),
        (WeightDtype::Bf16, WeightDtype::Int8),
        (WeightDtype::F32, WeightDtype::Int8),
    ];

    /// The screened choice (`None`: the screen left it to the full head) and the oracle's
    /// choice, at `level`, for a `head` precision screened as `kind`.
    #[allow(clippy::too_many_arguments)]
    fn both(
        level: IsaLevel,
        (head, kind): (WeightDtype, WeightDtype),
        x: &[f32],
        w: &[f32],
        rows: usize,
        n: usize,
        k: usize,
        banned: Option<usize>,
    ) -> (Option<Vec<u32>>, Vec<u32>) {
        let b = CpuBackend::with_isa(2, level).unwrap().with_dtype(head);
        let isa: Isa = level;
        let packed = PackedWeight::pack(w, n, k, head, isa).unwrap();
        let screen = b.run(|| build(w, n, k, head, kind, isa)).unwrap();
        let mut scratch = vec![f32::NAN; rows * n];
        let got = b
            .run(|| screened_argmax(x, &packed, &screen, rows, banned, &mut scratch, isa))
            .unwrap();
        (got, oracle(&b, head, x, w, rows, n, k, banned))
    }

    /// Rows whose best columns are exact ties (identical weights: the first wins), near ties a
    /// few f32 ulps apart (which the bf16 screen cannot tell apart, so the f32 values decide),
    /// the best column banned, and plain random rows, on shapes with odd `k`, `k` past the
    /// AVX-512 f32 tile's block (2048) with several register tiles of rows, and more rows than
    /// one task takes: the screen decides (no fallback), and its choice is the head's own, at
    /// every kernel level, for every pair of head precision and screen.
    #[test]
    fn screened_argmax_is_the_heads_argmax() {
        let mut rng = Rng(7);
        let shapes = [
            (1, 300, 40),
            (5, 1000, 64),
            (7, 600, 97),
            (33, 2000, 96),
            (3, 300, 1030),
            (7, 4000, 2050),
            (61, 3000, 33),
        ];
        for level in IsaLevel::available_levels() {
            for (rows, n, k) in shapes {
                let x = rng.vec(rows * k);
                let mut w = rng.vec(n * k);
                // Column 150 points along row 0's input: that row's clear best. Columns 40 and
                // 260 copy it exactly (40 then wins the tie), column 90 a few ulps above.
                let x0 = &x[..k];
                w[150 * k..151 * k].copy_from_slice(x0);
                let best = x0.to_vec();
                w[40 * k..41 * k].copy_from_slice(&best);
                w[260 * k..261 * k].copy_from_slice(&best);
                let mut near = best.clone();
                let big = (0..k)
                    .max_by(|&a, &c| x0[a].abs().total_cmp(&x0[c].abs()))
                    .unwrap();
                near[big] = f32::from_bits(near[big].to_bits() + 3);
                w[90 * k..91 * k].copy_from_slice(&near);
                for (pair, banned) in PAIRS
                    .into_iter()
                    .flat_map(|p| [None, Some(90), Some(40), Some(n - 1)].map(|b| (p, b)))
                {
                    let (got, want) = both(level, pair, &x, &w, rows, n, k, banned);
                    let what = format!("{level}, {pair:?}, {rows}x{n}x{k}, banned {banned:?}");
                    let got = got.unwrap_or_else(|| panic!("{what}: fell back to the full head"));
                    assert_eq!(got, want, "{what}");
                }
            }
        }
    }

    /// Subnormal and huge values, which escape the relative bounds (`vdpbf16ps` reads
    /// subnormal operands as zero; bf16 rounds subnormals with a large relative error): the
    /// absolute terms keep the wrong column out, at every level.
    #[test]
    fn subnormal_values_stay_inside_the_bound() {
        let (n, k) = (32, 2);
        for level in IsaLevel::available_levels() {
            // A subnormal input times a huge weight: the f32 best is column 0. (The absolute
            // terms, near the logits' size here, may leave the row to the full head, the
            // oracle's own path.)
            let mut w = vec![0.0f32; n * k];
            w[0] = 1e21;
            w[2 * k + 1] = 1e19;
            let x = [1e-39f32, 2e-38];
            for pair in PAIRS {
                let (got, want) = both(level, pair, &x, &w, 1, n, k, None);
                assert_eq!(
                    got.unwrap_or(want.clone()),
                    want,
                    "{level}, {pair:?}: subnormal input"
                );
            }
            // A subnormal weight that bf16 rounds up by a third, times huge inputs; every other
            // column far below, so that the screen decides.
            let mut w = vec![-1e-20f32; n * k];
            w[..k].copy_from_slice(&[1.5 * 2f32.powi(-133), 0.0]);
            w[2 * k..3 * k].copy_from_slice(&[0.0, 2f32.powi(-133)]);
            let x = [1e25f32, 1.6e25];
            for pair in PAIRS {
                let (got, want) = both(level, pair, &x, &w, 1, n, k, None);
                assert_eq!(got, Some(want), "{level}, {pair:?}: subnormal weight");
            }
        }
    }

    /// The int8 screen's two quantization errors, each made large enough on its own to put
    /// the best column below another's screen logit: the weight's (a column of 0.49s beside
    /// one 127 quantizes to zeros) and the activation's (0.49s beside ±127 in one row). The
    /// bound keeps the best column in, at every level, for both head precisions.
    #[test]
    fn int8_quantization_errors_stay_inside_the_bound() {
        let (n, k) = (32, 1000);
        for level in IsaLevel::available_levels() {
            for pair in PAIRS.into_iter().filter(|p| p.1 == WeightDtype::Int8) {
                // Weights: x all ones (quantized exactly); column 3's screen logit is 127, its
                // true one 127 + 0.49 (k - 1); column 7 is 0.3s (exact, 300) in between.
                let x = vec![1.0f32; k];
                let mut w = vec![0.0f32; n * k];
                w[3 * k..4 * k].fill(0.49);
                w[3 * k] = 127.0;
                w[7 * k..8 * k].fill(0.3);
                let (got, want) = both(level, pair, &x, &w, 1, n, k, None);
                assert_eq!(want, vec![3], "{level}, {pair:?}: the oracle's pick");
                assert_eq!(got, Some(want), "{level}, {pair:?}: weight error");
                // Activations: 127, -127, then 0.49s, which quantize to zeros; column 3 (ones
                // past the first two) has screen logit 0 and true 0.49 (k - 2); column 7 reads
                // only the 127 (exactly).
                let mut x = vec![0.49f32; k];
                (x[0], x[1]) = (127.0, -127.0);
                let mut w = vec![0.0f32; n * k];
                w[3 * k + 2..4 * k].fill(1.0);
                w[7 * k] = 1.0;
                let (got, want) = both(level, pair, &x, &w, 1, n, k, None);
                assert_eq!(want, vec![3], "{level}, {pair:?}: the oracle's pick");
                assert_eq!(got, Some(want), "{level}, {pair:?}: activation error");
            }
        }
    }

    /// A bf16 head whose products round the activations to bf16 (`vdpbf16ps`, portable):
    /// 1 + 2.5 2^-8 rounds down to 1 + 2^-7, which moves column 3 (1000 such inputs) below
    /// column 7 (1009 inputs of 1) while the int8 screen, exact on these two-valued rows and
    /// 0/1 weights, ranks them the other way; the bound's rounding term keeps column 7 in. At
    /// the widened levels the head keeps the activations, and column 3 wins.
    #[test]
    fn bf16_activation_rounding_stays_inside_the_bound() {
        let (n, k) = (16, 2009);
        let hi = 1.0 + 2.5 * 2f32.powi(-8);
        let mut x = vec![1.0f32; k];
        x[..1000].fill(hi);
        let mut w = vec![0.0f32; n * k];
        w[3 * k..3 * k + 1000].fill(1.0);
        w[7 * k + 1000..8 * k].fill(1.0);
        for level in IsaLevel::available_levels() {
            let pair = (WeightDtype::Bf16, WeightDtype::Int8);
            let (got, want) = both(level, pair, &x, &w, 1, n, k, None);
            let best = if level.bf16_rounds_activations() {
                7
            } else {
                3
            };
            assert_eq!(want, vec![best], "{level}: the oracle's pick");
            assert_eq!(got, Some(want), "{level}: screened");
        }
    }

    /// `T5RT_SCREEN_HEAD`'s values, and a clear error for anything else.
    #[test]
    fn screen_choice_parses_its_values() {
        use crate::backend::ScreenChoice as C;
        for (v, want) in [
            ("", C::Default),
            ("1", C::Default),
            ("0", C::Off),
            (" bf16", C::Bf16),
            ("int8", C::Int8),
        ] {
            assert_eq!(C::parse(v).unwrap(), want, "{v:?}");
        }
        let err = C::parse("yes").unwrap_err().to_string();
        assert!(
            err.contains("T5RT_SCREEN_HEAD") && err.contains("bf16 or int8"),
            "{err}"
        );
    }

    /// Non-finite or overflowing inputs are left to the full head.
    #[test]
    fn non_finite_rows_take_the_full_head() {
        let (n, k) = (64, 16);
        let mut rng = Rng(3);
        let w = rng.vec(n * k);
        for level in IsaLevel::available_levels() {
            for bad in [f32::NAN, f32::INFINITY, 3e38] {
                let mut x = rng.vec(2 * k);
                x[k + 3] = bad;
                for pair in PAIRS {
                    let (got, _) = both(level, pair, &x, &w, 2, n, k, None);
                    assert_eq!(got, None, "{level}, {pair:?}, {bad}: screened");
                }
            }
        }
    }
}
