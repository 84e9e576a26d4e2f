//! Greedy decoding's LM head without every logit in f32 ([`Backend::screened_argmax`]).
//!
//! An f32 model's LM head is the largest product of a decoding step (t5-base: 32128 x 768, a
//! fifth of the bytes a batch-1 step reads). Greedy search only needs the index of each row's
//! largest logit, so the head is first run on a bf16 copy (half the bytes, and `vdpbf16ps`
//! where the CPU has it), and the f32 logits are then computed only for the columns that the
//! copy's error bound cannot rule out. The result is the f32 head's argmax, bit for bit:
//!
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
//! - `lb = max_c (B_c - E_c)` is at most the largest f32 logit; a column with `B_c + E_c < lb`
//!   has `F_c < max F` and cannot be chosen, nor tie. The others (the candidates) get their
//!   f32 logits from the f32 tiles on a weight of just those columns: each column's sum runs
//!   in the same order in any panel, so they are the full product's values bit for bit; the
//!   first largest of them in column order is [`crate::math::argmax`]'s choice.
//! - Rows with a non-finite screen logit or norm, or a bound that could overflow, and batches
//!   whose candidates are more than an eighth of the vocabulary, are left undecided: the
//!   caller runs the full f32 head then.
//!
//! [`Backend::screened_argmax`]: crate::backend::Backend::screened_argmax

use rayon::prelude::*;

use super::isa::IsaLevel as Isa;
use super::packed::{matmul_packed, PackedWeight};
use crate::backend::WeightDtype;

/// `δ_k` of the module docs: the bound on `|F_c - B_c|` per unit of `‖x‖ ‖w_c‖`.
pub(super) fn relative_bound(k: usize) -> f64 {
    let ku = k as f64 * 2f64.powi(-24);
    let gamma = ku / (1.0 - ku);
    (2f64.powi(-7) + 2f64.powi(-16) + gamma * (2.0 + 2f64.powi(-7))) * 1.01
}

/// Each row's candidates (columns its screen logits cannot rule out), in column order; `None`
/// when the row must take the full f32 head (a non-finite value, or a bound near overflow).
/// `top` is the largest of `norms`.
fn candidates(
    approx: &[f32],
    x: &[f32],
    norms: &[f32],
    top: f64,
    rel: f64,
    banned: Option<usize>,
) -> Option<Vec<u32>> {
    let xn = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    if !(xn.is_finite() && top.is_finite()) || xn * top > 1e30 {
        return None;
    }
    // E_c = norms[c] * s + abs, in f32 (the 1% in `rel` covers this arithmetic's rounding;
    // the subnormal terms are rounded up by 1% too).
    let k = x.len() as f64;
    let tiny = 2f64.powi(-126) * (1.0 + 2f64.powi(-7)) * 1.01;
    let x1: f64 = x.iter().map(|&v| (v as f64).abs()).sum();
    let s = (xn * rel + tiny * k.sqrt()) as f32;
    let abs = (tiny * x1 + 1.01 * k * 2f64.powi(-126)) as f32;
    let banned = banned.unwrap_or(usize::MAX);
    let mut lb = f32::NEG_INFINITY;
    for (c, (&b, &nc)) in approx.iter().zip(norms).enumerate() {
        if !b.is_finite() || !nc.is_finite() {
            return None;
        }
        if c != banned {
            lb = lb.max(b - (nc * s + abs));
        }
    }
    Some(
        approx
            .iter()
            .zip(norms)
            .enumerate()
            .filter(|&(c, (&b, &nc))| c != banned && b + (nc * s + abs) >= lb)
            .map(|(c, _)| c as u32)
            .collect(),
    )
}

/// [`crate::backend::Backend::screened_argmax`] on the CPU, in the thread pool it runs in:
/// `head` is the f32 LM head, `screen` its bf16 copy and `norms` its rows' norms; `None` where
/// the screen cannot decide (the caller then runs the full head).
pub(super) fn screened_argmax(
    x: &[f32],
    head: &PackedWeight,
    screen: &PackedWeight,
    norms: &[f32],
    rows: usize,
    banned: Option<usize>,
    isa: Isa,
) -> Option<Vec<u32>> {
    let (n, k) = (head.n, head.k);
    let x = &x[..rows * k];
    if rows == 0 || n < 2 {
        return None;
    }
    let mut approx = vec![0.0f32; rows * n];
    matmul_packed(x, screen, &mut approx, rows, false, isa);
    let (rel, top) = (
        relative_bound(k),
        norms.iter().fold(0.0f32, |m, &v| m.max(v)) as f64,
    );
    let found: Vec<Vec<u32>> = approx
        .par_chunks_exact(n)
        .zip(x.par_chunks_exact(k))
        .map(|(b, xr)| candidates(b, xr, norms, top, rel, banned))
        .collect::<Option<_>>()?;
    let mut union: Vec<u32> = found.iter().flatten().copied().collect();
    union.sort_unstable();
    union.dedup();
    if union.is_empty() || union.len() > n / 8 {
        return None;
    }
    // The candidates' f32 weights as a product of their own.
    let mut w = vec![0.0f32; union.len() * k];
    for (row, &c) in w.chunks_exact_mut(k).zip(&union) {
        head.read_row(c as usize, row)
            .expect("an f32 head reads back as f32");
    }
    let sub = PackedWeight::pack(&w, union.len(), k, WeightDtype::F32, isa);
    let u = union.len();
    let mut exact = vec![0.0f32; rows * u];
    matmul_packed(x, &sub, &mut exact, rows, false, isa);
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
    Some(chosen)
}

#[cfg(test)]
mod tests {
    use super::{screened_argmax, Isa};
    use crate::backend::cpu::packed::PackedWeight;
    use crate::backend::cpu::{CpuBackend, IsaLevel};
    use crate::backend::{Backend, MatDims, ScreenHead, WeightDtype};

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

    /// What greedy search chose before screening: the f32 logits, `banned` at -inf, the
    /// first largest of each row.
    fn oracle(
        b: &CpuBackend,
        x: &[f32],
        w: &[f32],
        rows: usize,
        n: usize,
        k: usize,
        banned: Option<usize>,
    ) -> Vec<u32> {
        let head = b.upload_linear(w, n, k).unwrap();
        let mut logits = b.zeros(rows * n).unwrap();
        let d = MatDims { m: rows, n, k };
        b.matmul_nt(&x.to_vec(), &head, &mut logits, d, false)
            .unwrap();
        if let Some(c) = banned {
            b.fill_column(&mut logits, rows, n, c, f32::NEG_INFINITY)
                .unwrap();
        }
        b.argmax_rows(&logits, rows, n).unwrap()
    }

    /// The screened choice (`None`: the screen left it to the full head) and the f32
    /// oracle's choice, at `level`.
    fn both(
        level: IsaLevel,
        x: &[f32],
        w: &[f32],
        rows: usize,
        n: usize,
        k: usize,
        banned: Option<usize>,
    ) -> (Option<Vec<u32>>, Vec<u32>) {
        let b = CpuBackend::with_isa(2, level).unwrap();
        let isa: Isa = level;
        let head = PackedWeight::pack(w, n, k, WeightDtype::F32, isa);
        let screen = PackedWeight::pack(w, n, k, WeightDtype::Bf16, isa);
        let norms = ScreenHead::<()>::row_norms(w, k);
        let got = b.run(|| screened_argmax(x, &head, &screen, &norms, rows, banned, isa));
        (got, oracle(&b, x, w, rows, n, k, banned))
    }

    /// Rows whose best columns are exact ties (identical weights: the first wins), near ties a
    /// few f32 ulps apart (which the bf16 screen cannot tell apart, so the f32 values decide),
    /// the best column banned, and plain random rows, on shapes with odd `k`, `k` past the
    /// AVX-512 f32 tile's block (2048) with several register tiles of rows, and more rows than
    /// one task takes: the screen decides (no fallback), and its choice is the f32 one, at
    /// every kernel level.
    #[test]
    fn screened_argmax_is_the_f32_argmax() {
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
                for banned in [None, Some(90), Some(40), Some(n - 1)] {
                    let (got, want) = both(level, &x, &w, rows, n, k, banned);
                    let what = format!("{level}, {rows}x{n}x{k}, banned {banned:?}");
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
        let (n, k) = (16, 2);
        for level in IsaLevel::available_levels() {
            // A subnormal input times a huge weight: the f32 best is column 0.
            let mut w = vec![0.0f32; n * k];
            w[0] = 1e21;
            w[2 * k + 1] = 1e19;
            let x = [1e-39f32, 2e-38];
            // (Undecided rows get the full head, the oracle's own path.)
            let (got, want) = both(level, &x, &w, 1, n, k, None);
            assert_eq!(
                got.unwrap_or(want.clone()),
                want,
                "{level}: subnormal input"
            );
            // A subnormal weight that bf16 rounds up by a third, times huge inputs.
            let mut w = vec![0.0f32; n * k];
            w[0] = 1.5 * 2f32.powi(-133);
            w[2 * k + 1] = 2f32.powi(-133);
            let x = [1e25f32, 1.6e25];
            let (got, want) = both(level, &x, &w, 1, n, k, None);
            assert_eq!(
                got.unwrap_or(want.clone()),
                want,
                "{level}: subnormal weight"
            );
        }
    }

    /// Non-finite or overflowing inputs are left to the full f32 head.
    #[test]
    fn non_finite_rows_take_the_full_head() {
        let (n, k) = (64, 16);
        let mut rng = Rng(3);
        let w = rng.vec(n * k);
        for level in IsaLevel::available_levels() {
            for bad in [f32::NAN, f32::INFINITY, 3e38] {
                let mut x = rng.vec(2 * k);
                x[k + 3] = bad;
                let (got, _) = both(level, &x, &w, 2, n, k, None);
                assert_eq!(got, None, "{level}, {bad}: screened");
            }
        }
    }
}
