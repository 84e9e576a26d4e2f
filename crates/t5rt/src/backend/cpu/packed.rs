//! Linear layers: weights packed at load time for the AVX-512 kernels that read them (f32 FMA,
//! bf16 `vdpbf16ps`, int8 `vpdpbusd`), with portable scalar versions of the same arithmetic.
//!
//! Layout: a weight `[n, k]` becomes 32-bit lanes, each holding `G` consecutive `k` values of
//! one output column (G = 1 for f32, 2 for bf16, 4 for int8; `k` padded with zeros to a
//! multiple of G, `n` to a multiple of 16). Lanes are stored in panels of 64 columns: panel
//! `p` is `[k / G, 64]` row-major and contiguous, so a task that owns those 64 output columns
//! reads one contiguous run of memory (the prefetchers stream it at full bandwidth, which a
//! `[k, n]` layout read 64 columns at a time, at a stride of `4n` bytes, does not allow).
//! Sixteen lanes are one 64-byte load; the `G` matching activation values of a row are one
//! 32-bit broadcast. A task walks its panel down the whole `k` range for 6 rows at a time
//! (12 rows and 32 columns at a time for widened bf16 in products of more than 60 rows,
//! `bf16_twelve_rows`),
//! accumulators in registers; the panel (at most a few hundred KiB) stays in L2 while the
//! rows go by. Every output is summed over `k` in order, whatever the batch or thread count,
//! so a row's result does not depend on the rest of its batch.
//!
//! Arithmetic:
//! - f32: `acc += x·w` in order of `k` (fused multiply-add on AVX-512; a multiply, then an add,
//!   in the portable version).
//! - bf16: activations are rounded to bf16 (nearest-even) and products are exact in f32. Each
//!   pair of products goes into the f32 accumulator as two rounded additions in sequence, the
//!   odd element first: `acc = (acc + x1·w1) + x0·w0`. That is `vdpbf16ps` as Intel's manual
//!   describes it (SDM vol. 2, VDPBF16PS: two FMAs per lane, round-to-nearest-even, inputs
//!   and outputs denormal-flushed), not one addition of the pair's sum. The portable tile does
//!   the same (without the denormal flushing); `bf16_dot_order` in the kernel tests measures
//!   which order the CPU's `vdpbf16ps` follows where the CPU has it. Without AVX-512 BF16
//!   (AVX2, or AVX-512 F/BW), and at `avx512-vnni` (Intel CPUs' default level, where
//!   `vdpbf16ps` is slower than fused multiply-adds) the weights are widened to f32 in
//!   registers instead and the activations are not rounded: fused multiply-adds in order of
//!   `k`, bitwise the f32 tile on bf16-rounded weights (`nodot`).
//! - int8 without VNNI: the same exact i32 sums through 16-bit products (`vpmaddwd`, `nodot`).
//! - int8: each weight column has the scale `max|w| / 127` and values `round(w · (1 / scale))`
//!   (f32 arithmetic, ties to even). Each activation row is quantized at run time around its
//!   center `c` (halfway between its smallest and largest values), with the scale `s` half
//!   their distance over 127, `q = round((x - c) · (1 / s))`, then offset by 128 to u8 (the
//!   operand type of `vpdpbusd`). Sums are exact in i32; the offset is taken back with the
//!   column sums, `Σ (q+128)·w = Σ q·w + 128·Σ w`, and the center added with them:
//!   `Σ x·w ≈ s·ws·Σ q·w + c·ws·Σ w`. The center costs nothing in the tiles and gives rows of
//!   one sign (ReLU's output) twice the resolution of symmetric quantization.

mod nodot;

use std::ops::Range;

use rayon::prelude::*;

use super::isa::IsaLevel as Isa;
use super::kernels::SharedMut;
use crate::backend::WeightDtype;
use crate::error::T5Error;

/// Output columns per task, four vectors of 16 lanes.
const BLOCK: usize = 64;
/// Rows per register tile: 6 rows x 4 vectors = 24 accumulators, plus 4 weight vectors and a
/// broadcast, in the 32 AVX-512 registers.
const MR: usize = 6;
/// Rows per task when there are many (encoder passes), so that both threads get work.
const ROWS_PER_TASK: usize = 60;

/// Values of `k` per 32-bit lane for weights of `dtype`.
fn group(dtype: WeightDtype) -> usize {
    match dtype {
        WeightDtype::F32 => 1,
        WeightDtype::Bf16 => 2,
        WeightDtype::Int8 => 4,
        WeightDtype::F16 => unreachable!("f16 is refused by CpuBackend::upload_linear"),
    }
}

/// A linear weight, packed as described in the module docs.
pub struct PackedWeight {
    pub kind: WeightDtype,
    pub n: usize,
    pub k: usize,
    /// `k / G`, rounded up.
    kg: usize,
    /// `n` rounded up to a multiple of 16.
    n_pad: usize,
    lanes: crate::hugepage::HugeBuf<u32>,
    /// int8: the scale of each column (`n_pad` values); empty otherwise.
    scales: Vec<f32>,
    /// int8: the sum of each column's quantized values (`n_pad`); empty otherwise.
    col_sums: Vec<i32>,
}

/// f32 to bf16 bits, rounding to nearest even (NaN stays NaN).
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
pub(super) fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Rounds to the nearest integer, ties to even, for `|v| <= 2^22` (all this module needs, after
/// clamping): inline and vectorisable, unlike `round_ties_even`, which is a libm call on
/// baseline x86-64.
#[inline(always)]
fn round_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    (v + MAGIC) - MAGIC
}

/// Symmetric per-row int8 quantization of a weight `w` `[n, k]`: each row's scale is
/// `max|row| / 127` and its values `round(w · (1 / scale))`, clamped to ±127 (the rule
/// [`PackedWeight::pack`] applies at load, and `t5rt convert` ahead of time). Rows in
/// parallel on the current rayon pool; `isa` picks the vectorised rounding (the same values).
/// An out-of-memory error where the buffers cannot be had.
pub fn quantize_int8(
    w: &[f32],
    n: usize,
    k: usize,
    isa: Isa,
) -> Result<(Vec<i8>, Vec<f32>), T5Error> {
    use rayon::prelude::*;
    let len = n
        .checked_mul(k)
        .ok_or_else(|| crate::alloc::out_of_memory(usize::MAX, "int8 weights"))?;
    let mut q = crate::alloc::try_zeroed::<i8>(len, "int8 weights")?;
    let mut scales = crate::alloc::try_filled(n, 1.0f32, "int8 scales")?;
    if k > 0 {
        q.par_chunks_mut(k)
            .zip(scales.par_iter_mut())
            .zip(w.par_chunks(k))
            .for_each(|((qrow, scale), row)| *scale = quantize_int8_row(row, qrow, isa));
    }
    Ok((q, scales))
}

/// One row of [`quantize_int8`]: its values into `q`, its scale returned.
pub(super) fn quantize_int8_row(row: &[f32], q: &mut [i8], isa: Isa) -> f32 {
    let scale = i8_scale(row);
    // quantize_row writes q + 128 as bytes (in place, no buffer per row: the cross-attention
    // caches quantize a row per position and head); q = byte ^ 0x80 read as i8.
    // SAFETY: an i8 slice viewed as u8 (same size, alignment and validity).
    let bytes = unsafe { std::slice::from_raw_parts_mut(q.as_mut_ptr().cast::<u8>(), q.len()) };
    quantize_row(row, bytes, 0.0, 1.0 / scale, isa);
    bytes.iter_mut().for_each(|b| *b ^= 0x80);
    scale
}

/// The scale of symmetric 8-bit quantization of `v`: `max|v| / 127` (1 if all are zero).
#[inline]
fn i8_scale(v: &[f32]) -> f32 {
    let max = crate::math::max_abs(v);
    if max > 0.0 {
        max / 127.0
    } else {
        1.0
    }
}

/// `round(v · inv)`, clamped to [-127, 127]; `inv = 1 / scale`, in f32.
#[inline(always)]
pub(super) fn quantize_one(v: f32, inv: f32) -> i8 {
    let y = v * inv;
    // (Comparisons, not `clamp`, whose NaN rules keep the loop from vectorising.)
    #[allow(clippy::manual_clamp)]
    let y = if y > 127.0 {
        127.0
    } else if y < -127.0 {
        -127.0
    } else {
        y
    };
    round_small(y) as i32 as i8
}

/// The packed layout's sizes for `[n, k]` weights of `g` values per lane: lanes per column
/// `kg`, columns padded to 16 `n_pad`, and the lanes in all, `kg · n_pad`; an out-of-memory
/// error (for `what`) where that count does not fit in a `usize` (the allocations check its
/// bytes).
fn packed_len(n: usize, k: usize, g: usize, what: &str) -> Result<(usize, usize, usize), T5Error> {
    let kg = k.div_ceil(g);
    n.checked_next_multiple_of(16)
        .and_then(|n_pad| Some((kg, n_pad, kg.checked_mul(n_pad)?)))
        .ok_or_else(|| crate::alloc::out_of_memory(usize::MAX, what))
}

impl PackedWeight {
    /// Packs a checkpoint weight `[n, k]` (row-major) as `kind`.
    /// The work is split by panel over the rayon pool it runs in; `isa` picks the
    /// vectorised quantization (the same rounding as the scalar code). An out-of-memory error
    /// where the packed buffer cannot be had.
    pub fn pack(
        w: &[f32],
        n: usize,
        k: usize,
        kind: WeightDtype,
        isa: Isa,
    ) -> Result<Self, T5Error> {
        use rayon::prelude::*;
        if kind == WeightDtype::Int8 {
            let (q, scales) = quantize_int8(w, n, k, isa)?;
            return Self::from_int8(&q, &scales, n, k);
        }
        let (kg, n_pad, len) = packed_len(n, k, group(kind), "packed weights")?;
        let mut lanes = crate::hugepage::HugeBuf::<u32>::zeroed(len, "packed weights")?;
        // One panel (64 columns, `[kg, width]` row-major, see `lane_index`) at a time, in
        // parallel: panel `p`'s lanes are one contiguous chunk of `lanes`.
        let fill = |p: usize, panel: &mut [u32]| {
            let (c0, width) = (p * BLOCK, panel_width(n_pad, p));
            for j in 0..width.min(n.saturating_sub(c0)) {
                let c = c0 + j;
                let row = &w[c * k..(c + 1) * k];
                // Each lane is built in a register from its G values and written once.
                match kind {
                    WeightDtype::F16 => unreachable!("f16 is refused by CpuBackend::upload_linear"),
                    WeightDtype::Int8 => unreachable!("packed by from_int8"),
                    WeightDtype::F32 => {
                        for (gi, &v) in row.iter().enumerate() {
                            panel[gi * width + j] = v.to_bits();
                        }
                    }
                    WeightDtype::Bf16 => {
                        for (gi, pair) in row.chunks(2).enumerate() {
                            let lane = pair
                                .iter()
                                .enumerate()
                                .fold(0u32, |l, (i, &v)| l | (bf16_bits(v) as u32) << (16 * i));
                            panel[gi * width + j] = lane;
                        }
                    }
                }
            }
        };
        if kg > 0 {
            lanes
                .par_chunks_mut(BLOCK * kg)
                .enumerate()
                .for_each(|(p, panel)| fill(p, panel));
        }
        let (scales, col_sums) = (Vec::new(), Vec::new());
        Ok(PackedWeight {
            kind,
            n,
            k,
            kg,
            n_pad,
            lanes,
            scales,
            col_sums,
        })
    }

    /// Packs int8 values `q` `[n, k]` (row-major) with their per-row `scales`, as
    /// [`quantize_int8`] makes them (at load, or ahead of time by `t5rt convert`).
    pub fn from_int8(q: &[i8], scales: &[f32], n: usize, k: usize) -> Result<Self, T5Error> {
        use rayon::prelude::*;
        let (kg, n_pad, len) = packed_len(n, k, 4, "packed int8 weights")?;
        let mut lanes = crate::hugepage::HugeBuf::<u32>::zeroed(len, "packed int8 weights")?;
        let mut col_sums = crate::alloc::try_zeroed::<i32>(n_pad, "int8 column sums")?;
        let mut all_scales = crate::alloc::try_filled(n_pad, 1.0f32, "int8 scales")?;
        all_scales[..n].copy_from_slice(&scales[..n]);
        if kg > 0 {
            lanes
                .par_chunks_mut(BLOCK * kg)
                .zip(col_sums.par_chunks_mut(BLOCK))
                .enumerate()
                .for_each(|(p, (panel, sums))| {
                    let (c0, width) = (p * BLOCK, panel_width(n_pad, p));
                    let cols = width.min(n.saturating_sub(c0));
                    let rows = &q[c0 * k..(c0 + cols) * k];
                    for (sum, row) in sums.iter_mut().zip(rows.chunks_exact(k)) {
                        *sum = row.iter().map(|&v| v as i32).sum();
                    }
                    // Lanes in the order they are stored: one group of 4 values across the
                    // panel's columns at a time. k's padding holds q = 0.
                    let lane = |row: &[i8], at: usize| {
                        let mut b = [0u8; 4];
                        for (d, &v) in b.iter_mut().zip(&row[at..k.min(at + 4)]) {
                            *d = v as u8;
                        }
                        u32::from_le_bytes(b)
                    };
                    let full = k / 4;
                    for (gi, out) in panel.chunks_exact_mut(width).enumerate() {
                        if gi < full {
                            for (o, row) in out.iter_mut().zip(rows.chunks_exact(k)) {
                                let quad: [i8; 4] = row[gi * 4..gi * 4 + 4].try_into().unwrap();
                                *o = u32::from_le_bytes(quad.map(|v| v as u8));
                            }
                        } else {
                            for (o, row) in out.iter_mut().zip(rows.chunks_exact(k)) {
                                *o = lane(row, gi * 4);
                            }
                        }
                    }
                });
        }
        Ok(PackedWeight {
            kind: WeightDtype::Int8,
            n,
            k,
            kg,
            n_pad,
            lanes,
            scales: all_scales,
            col_sums,
        })
    }

    /// Row `c` of the `[n, k]` weight this was packed from, into `out` (f32 weights only:
    /// they are stored exactly).
    pub fn read_row(&self, c: usize, out: &mut [f32]) -> Result<(), T5Error> {
        if self.kind != WeightDtype::F32 {
            return Err(T5Error::Backend(format!(
                "reading rows of a {:?} weight back as f32",
                self.kind
            )));
        }
        // Column `c` runs down its panel at the panel's width.
        let (start, stride) = (
            lane_index(self.kg, self.n_pad, 0, c),
            panel_width(self.n_pad, c / BLOCK),
        );
        for (kk, o) in out.iter_mut().enumerate().take(self.k) {
            *o = f32::from_bits(self.lanes[start + kk * stride]);
        }
        Ok(())
    }

    /// The columns `cols` (each `< n`) of an f32 or bf16 weight as a weight of their own, in
    /// that order: lanes copied as stored, so each column's products are the same bits as in
    /// `self` (every column is summed in the same order of `k` in any panel). `None` for int8;
    /// an error where the memory cannot be had.
    pub fn gather(&self, cols: &[u32]) -> Result<Option<PackedWeight>, T5Error> {
        if !matches!(self.kind, WeightDtype::F32 | WeightDtype::Bf16)
            || cols.iter().any(|&c| c as usize >= self.n)
        {
            return Ok(None);
        }
        use rayon::prelude::*;
        let (n, kg) = (cols.len(), self.kg);
        let what = "gathered head columns";
        let (_, n_pad, len) = packed_len(n, kg, 1, what)?;
        let mut lanes = crate::alloc::try_zeroed::<u32>(len, what)?;
        // One output panel (`[kg, width]`, contiguous) per task, on the current rayon pool:
        // the reads, one lane per cache line, are latency-bound.
        if kg > 0 {
            lanes
                .par_chunks_mut(BLOCK * kg)
                .enumerate()
                .for_each(|(p, panel)| {
                    let width = panel_width(n_pad, p);
                    let panel_cols = &cols[p * BLOCK..(p * BLOCK + width).min(n)];
                    for (j, &c) in panel_cols.iter().enumerate() {
                        let c = c as usize;
                        let (from, stride) = (
                            lane_index(kg, self.n_pad, 0, c),
                            panel_width(self.n_pad, c / BLOCK),
                        );
                        for g in 0..kg {
                            panel[g * width + j] = self.lanes[from + g * stride];
                        }
                    }
                });
        }
        Ok(Some(PackedWeight {
            kind: self.kind,
            n,
            k: self.k,
            kg,
            n_pad,
            lanes: lanes.into(),
            scales: Vec::new(),
            col_sums: Vec::new(),
        }))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lanes.len() * 4 + self.scales.len() * 4 + self.col_sums.len() * 4
    }
}

/// Width of the panel that holds column block `p` (64, or less for the last one).
#[inline(always)]
fn panel_width(n_pad: usize, p: usize) -> usize {
    BLOCK.min(n_pad - p * BLOCK)
}

/// Where lane (`g`, column `c`) lives: panels of 64 columns, each `[kg, width]` row-major.
#[inline(always)]
fn lane_index(kg: usize, n_pad: usize, g: usize, c: usize) -> usize {
    let p = c / BLOCK;
    p * BLOCK * kg + g * panel_width(n_pad, p) + c % BLOCK
}

/// `bytes[i] = round((row[i] - center) · inv) + 128` (`center` is 0 for weights, which
/// makes the subtraction exact and a no-op).
fn quantize_row(row: &[f32], bytes: &mut [u8], center: f32, inv: f32, isa: Isa) {
    #[inline(always)]
    fn body(row: &[f32], bytes: &mut [u8], center: f32, inv: f32) {
        for i in 0..row.len().min(bytes.len()) {
            bytes[i] = (quantize_one(row[i] - center, inv) as i32 + 128) as u8;
        }
    }
    // 16 at a time: the same rounding (the product in f32, clamped, to nearest-even as
    // `round_small` does for |y| <= 127). NaN stays NaN through max(lo, y) and min(hi, y)
    // (x86 returns the second operand when one is NaN), converts to 0x8000_0000, and its low
    // byte after + 128 is 128: q = 0, as `quantize_one` gives. Tested against `body`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn body_avx512(row: &[f32], bytes: &mut [u8], center: f32, inv: f32) {
        use std::arch::x86_64::*;
        let n = row.len().min(bytes.len());
        let (vc, vinv, lo, hi) = (
            _mm512_set1_ps(center),
            _mm512_set1_ps(inv),
            _mm512_set1_ps(-127.0),
            _mm512_set1_ps(127.0),
        );
        let off = _mm512_set1_epi32(128);
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n <= both lengths.
            let x = _mm512_sub_ps(_mm512_loadu_ps(row.as_ptr().add(i)), vc);
            let y = _mm512_mul_ps(x, vinv);
            let y = _mm512_min_ps(hi, _mm512_max_ps(lo, y));
            let q = _mm512_add_epi32(_mm512_cvtps_epi32(y), off);
            _mm_storeu_si128(
                bytes.as_mut_ptr().add(i) as *mut __m128i,
                _mm512_cvtepi32_epi8(q),
            );
            i += 16;
        }
        body(&row[i..n], &mut bytes[i..n], center, inv)
    }
    // 32 at a time in AVX2: the same arithmetic; NaN is set to 0 first (q = 0, as above),
    // then the i32 values are packed to bytes (signed saturation never applies: |q| <= 127)
    // and put back in order, and + 128 is a flip of the top bit.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn body_avx2(row: &[f32], bytes: &mut [u8], center: f32, inv: f32) {
        use std::arch::x86_64::*;
        let n = row.len().min(bytes.len());
        let (vc, vinv, lo, hi) = (
            _mm256_set1_ps(center),
            _mm256_set1_ps(inv),
            _mm256_set1_ps(-127.0),
            _mm256_set1_ps(127.0),
        );
        let q = |p: *const f32| {
            // SAFETY: the caller reads 8 values at `p`, inside `row`.
            let y = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(p), vc), vinv);
            let y = _mm256_and_ps(y, _mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
            _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, y)))
        };
        // After the two packs, 32-bit group `g` holds values 4g.. of the order
        // a0-3 b0-3 c0-3 d0-3 a4-7 b4-7 c4-7 d4-7.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let flip = _mm256_set1_epi8(i8::MIN);
        let mut i = 0;
        while i + 32 <= n {
            // SAFETY: i + 32 <= n <= both lengths.
            let p = row.as_ptr().add(i);
            let ab = _mm256_packs_epi32(q(p), q(p.add(8)));
            let cd = _mm256_packs_epi32(q(p.add(16)), q(p.add(24)));
            let v = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
            _mm256_storeu_si256(
                bytes.as_mut_ptr().add(i) as *mut __m256i,
                _mm256_xor_si256(v, flip),
            );
            i += 32;
        }
        body(&row[i..n], &mut bytes[i..n], center, inv)
    }
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() {
        // SAFETY: the backend only runs at levels the CPU has.
        return unsafe { body_avx512(row, bytes, center, inv) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: as above.
        return unsafe { body_avx2(row, bytes, center, inv) };
    }
    let _ = isa;
    body(row, bytes, center, inv)
}

/// The affine 8-bit quantization of an activation row, `(center, scale)`: values become
/// `center + scale · q` with `|q| <= 127`, the center halfway between the row's smallest and
/// largest values and the scale half their distance over 127. A row whose values all have
/// one sign (ReLU's output) gets twice symmetric quantization's resolution; a symmetric row
/// gets the same. Rows with an infinity fall back to the symmetric rule (center 0).
pub(super) fn affine_i8(row: &[f32], isa: Isa) -> (f32, f32) {
    let (lo, hi) = row_range(row, isa);
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, i8_scale(row));
    }
    let (center, half) = (0.5 * lo + 0.5 * hi, 0.5 * hi - 0.5 * lo);
    (center, if half > 0.0 { half / 127.0 } else { 1.0 })
}

/// [`prepare`]'s lanes and per-row int8 centers and scales.
type Prepared = (Vec<u32>, Vec<[f32; 2]>);

/// Activations in the weight's lane format: `[m, kg]` lanes, and for int8 each row's center
/// and scale ([`affine_i8`]); an out-of-memory error where they cannot be had.
fn prepare(x: &[f32], m: usize, k: usize, w: &PackedWeight, isa: Isa) -> Result<Prepared, T5Error> {
    let kg = w.kg;
    // int8 padding holds u8 128 (q = 0) against zero weights: it adds nothing, so the
    // column-sum corrections stay exact. Filled once here; the rows' values overwrite it.
    let pad = if w.kind == WeightDtype::Int8 {
        0x8080_8080
    } else {
        0
    };
    let what = "a product's activations";
    let mut lanes = if pad == 0 {
        crate::alloc::try_zeroed(m * kg, what)? // fresh zero pages, written once below
    } else {
        crate::alloc::try_filled(m * kg, pad, what)?
    };
    let mut scales = crate::alloc::try_filled(m, [0.0f32; 2], "a product's activation scales")?;
    // Big batches (encoder passes) are converted in parallel, a few rows per task.
    let rows_per_task = (4096 / k.max(1)).max(1);
    let row_tasks = lanes
        .par_chunks_mut(kg * rows_per_task)
        .zip(x.par_chunks(k * rows_per_task))
        .zip(scales.par_chunks_mut(rows_per_task));
    match w.kind {
        WeightDtype::F32 | WeightDtype::F16 => unreachable!("f32 activations are read in place"),
        WeightDtype::Bf16 => row_tasks.for_each(|((dst, x), _)| {
            for (dst, row) in dst.chunks_exact_mut(kg).zip(x.chunks_exact(k)) {
                bf16_row(row, dst, isa);
            }
        }),
        WeightDtype::Int8 => row_tasks.for_each(|((dst, x), scales)| {
            for ((dst, row), cs) in dst.chunks_exact_mut(kg).zip(x.chunks_exact(k)).zip(scales) {
                *cs = affine_i8(row, isa).into();
                let [center, scale] = *cs;
                // SAFETY: a u32 slice viewed as its bytes (u8 has no alignment or validity
                // requirements). Byte `kk` of the row lands in memory byte `kk % 4` of lane
                // `kk / 4`, which on little-endian targets is the value's byte `kk % 4`, the
                // order `pack` uses; big-endian targets swap it back below.
                let bytes = unsafe {
                    std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u8, dst.len() * 4)
                };
                quantize_row(row, &mut bytes[..row.len()], center, 1.0 / scale, isa);
                #[cfg(target_endian = "big")]
                dst.iter_mut().for_each(|l| *l = l.swap_bytes());
            }
        }),
    }
    Ok((lanes, scales))
}

/// One register tile's raw sums: f32 for f32 and bf16, i32 (as bits) for int8.
type TileAcc = [[u32; BLOCK]; MR];

/// The portable tile: `rows` rows from `x` (row stride `kg`), the panel of columns starting at
/// `c0`, `width` of them, lanes `ks` of `k`, added to the sums in `acc`.
#[inline(always)]
fn tile_portable(
    x: &[u32],
    w: &PackedWeight,
    rows: usize,
    c0: usize,
    width: usize,
    ks: Range<usize>,
    acc: &mut TileAcc,
) {
    let kg = w.kg;
    let pw = panel_width(w.n_pad, c0 / BLOCK);
    let panel = &w.lanes[c0 * kg..c0 * kg + kg * pw];
    for (r, acc) in acc.iter_mut().enumerate().take(rows) {
        let xr = &x[r * kg..(r + 1) * kg];
        match w.kind {
            WeightDtype::F16 => unreachable!("f16 is refused by CpuBackend::upload_linear"),
            WeightDtype::F32 => {
                let mut a = acc.map(f32::from_bits);
                for g in ks.clone() {
                    let xv = f32::from_bits(xr[g]);
                    let wrow = &panel[g * pw..g * pw + width];
                    for c in 0..width {
                        a[c] += xv * f32::from_bits(wrow[c]);
                    }
                }
                for c in 0..BLOCK {
                    acc[c] = a[c].to_bits();
                }
            }
            WeightDtype::Bf16 => {
                let mut a = acc.map(f32::from_bits);
                for g in ks.clone() {
                    let xv = xr[g];
                    let (x0, x1) = (bf16_value(xv as u16), bf16_value((xv >> 16) as u16));
                    let wrow = &panel[g * pw..g * pw + width];
                    for c in 0..width {
                        let wv = wrow[c];
                        let (w0, w1) = (bf16_value(wv as u16), bf16_value((wv >> 16) as u16));
                        // Two rounded additions, odd element first (the exact products
                        // make each an FMA), as `vdpbf16ps` per Intel's manual.
                        a[c] = (a[c] + x1 * w1) + x0 * w0;
                    }
                }
                for c in 0..BLOCK {
                    acc[c] = a[c].to_bits();
                }
            }
            WeightDtype::Int8 => {
                let mut a = acc.map(|v| v as i32);
                for g in ks.clone() {
                    let xb = xr[g].to_le_bytes();
                    let wrow = &panel[g * pw..g * pw + width];
                    for c in 0..width {
                        let wb = wrow[c].to_le_bytes();
                        for i in 0..4 {
                            a[c] = a[c].wrapping_add(xb[i] as i32 * wb[i] as i8 as i32);
                        }
                    }
                }
                for c in 0..BLOCK {
                    acc[c] = a[c] as u32;
                }
            }
        }
    }
}

/// [`tile_portable`] compiled for AVX2 (the same arithmetic: no fused multiply-adds).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_portable_avx2(
    x: &[u32],
    w: &PackedWeight,
    rows: usize,
    c0: usize,
    width: usize,
    ks: Range<usize>,
    acc: &mut TileAcc,
) {
    tile_portable(x, w, rows, c0, width, ks, acc)
}

/// The loop every AVX-512 tile shares: load the running sums from `$out`; for each group `g`
/// of `k` in `$ks`, load `V` weight vectors of the panel, broadcast each of the `R` rows'
/// activation lane, and apply `$step(acc, x, w) -> acc` (all `__m512i`); then store the sums
/// back. Expanded inside each tile function so that its intrinsics compile with that
/// function's target features.
///
/// The prefetch variant ([`Ahead`]) is chosen once per walk, not matched at every step, and
/// tiles of several rows take two steps of `k` per turn of the loop: the match (a load and a
/// test from the stack) and the loop's own counting were some ten scalar instructions per
/// 24 multiply-adds, competing for the ports the vector units use. f32 encoder products at
/// one thread 5% to 15% faster (`examples/matmul_speed`, alternating runs, Emerald Rapids
/// Xeon VM; 4096 x 768 x 3072 112-142 against 105-135 GFLOP/s, the register-only FMA ceiling
/// 131-156 in the same minutes), t5-base's f32 encoder at batch 32 (case d) 3.2-3.6 s against
/// 3.9-4.1 s. One-row tiles (batch-1 decoding, bound by memory) keep one step per turn.
#[cfg(target_arch = "x86_64")]
macro_rules! avx512_tile_loop {
    ($x:ident, $w:ident, $c0:ident, $ks:ident, $out:ident, $ahead:ident, $R:ident, $V:ident, $step:expr) => {{
        use std::arch::x86_64::*;
        let kg = $w.kg;
        let pw = panel_width($w.n_pad, $c0 / BLOCK);
        debug_assert!($x.len() >= $R * kg && 16 * $V <= pw && $ks.end <= kg);
        let xp = $x.as_ptr();
        let mut wp = $w.lanes.as_ptr().add($c0 * kg + $ks.start * pw);
        let mut acc = [[_mm512_setzero_si512(); $V]; $R];
        for (o, acc) in $out.iter().zip(acc.iter_mut()) {
            for (v, a) in acc.iter_mut().enumerate() {
                *a = _mm512_loadu_si512(o.as_ptr().add(16 * v) as *const _);
            }
        }
        let (from, end) = ($ks.start, $ks.end);
        // One step of `k`: group `g`, its panel row at `wp`.
        macro_rules! step {
            ($g:expr) => {{
                let g = $g;
                let mut wv = [_mm512_setzero_si512(); $V];
                for (v, wv) in wv.iter_mut().enumerate() {
                    *wv = _mm512_loadu_si512(wp.add(16 * v) as *const _);
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_epi32(*xp.add(r * kg + g) as i32);
                    for (a, &wv) in acc.iter_mut().zip(&wv) {
                        *a = $step(*a, xb, wv);
                    }
                }
                wp = wp.add(pw);
            }};
        }
        // The walk, with the prefetch chosen once (`$fetch(step)`); two steps per turn for
        // several rows.
        macro_rules! walk {
            ($fetch:expr) => {{
                let mut g = from;
                while $R > 1 && g + 2 <= end {
                    $fetch(g - from);
                    step!(g);
                    $fetch(g + 1 - from);
                    step!(g + 1);
                    g += 2;
                }
                while g < end {
                    $fetch(g - from);
                    step!(g);
                    g += 1;
                }
            }};
        }
        match $ahead {
            Ahead::Rows(0) => walk!(|_: usize| ()),
            Ahead::Rows(rows) => {
                walk!(|_: usize| prefetch_lines(wp.wrapping_add(rows * pw), 16 * $V))
            }
            Ahead::Next(p) => walk!(|s: usize| prefetch_lines(p.wrapping_add(16 * s), 16)),
        }
        for (o, acc) in $out.iter_mut().zip(&acc) {
            for (v, a) in acc.iter().enumerate() {
                _mm512_storeu_si512(o.as_mut_ptr().add(16 * v) as *mut _, *a);
            }
        }
    }};
}

/// The AVX-512 f32 tile for `R` rows and `V` vectors of 16 columns: fused multiply-adds.
///
/// # Safety
/// The CPU must support AVX-512F and FMA; `x` holds `R` rows of `kg` lanes and the panel at
/// `c0` is at least `16 V` lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn tile_avx512_f32<const R: usize, const V: usize>(
    x: &[u32],
    w: &PackedWeight,
    c0: usize,
    ks: Range<usize>,
    out: &mut TileAcc,
    ahead: Ahead,
) {
    avx512_tile_loop!(
        x,
        w,
        c0,
        ks,
        out,
        ahead,
        R,
        V,
        |a: __m512i, xb: __m512i, wv: __m512i| {
            let sum = _mm512_fmadd_ps(
                _mm512_castsi512_ps(xb),
                _mm512_castsi512_ps(wv),
                _mm512_castsi512_ps(a),
            );
            _mm512_castps_si512(sum)
        }
    )
}

/// The AVX-512 bf16 tile (`vdpbf16ps`).
///
/// # Safety
/// As [`tile_avx512_f32`], with AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_avx512_bf16<const R: usize, const V: usize>(
    x: &[u32],
    w: &PackedWeight,
    c0: usize,
    ks: Range<usize>,
    out: &mut TileAcc,
    ahead: Ahead,
) {
    avx512_tile_loop!(
        x,
        w,
        c0,
        ks,
        out,
        ahead,
        R,
        V,
        |a: __m512i, xb: __m512i, wv: __m512i| {
            let sum = _mm512_dpbf16_ps(
                _mm512_castsi512_ps(a),
                std::mem::transmute::<__m512i, __m512bh>(xb),
                std::mem::transmute::<__m512i, __m512bh>(wv),
            );
            _mm512_castps_si512(sum)
        }
    )
}

/// The AVX-512 int8 tile (`vpdpbusd`: u8 activations times i8 weights, summed in i32).
///
/// # Safety
/// As [`tile_avx512_f32`], with AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn tile_avx512_int8<const R: usize, const V: usize>(
    x: &[u32],
    w: &PackedWeight,
    c0: usize,
    ks: Range<usize>,
    out: &mut TileAcc,
    ahead: Ahead,
) {
    avx512_tile_loop!(
        x,
        w,
        c0,
        ks,
        out,
        ahead,
        R,
        V,
        |a: __m512i, xb: __m512i, wv: __m512i| { _mm512_dpbusd_epi32(a, xb, wv) }
    )
}

/// The AVX2 f32 tile for CPUs without AVX-512: the panel in blocks of `8 S` columns (`S` ymm
/// vectors: 8 for one row, so batch-1 decoding reads the panel in one pass; 2 for 3 to 6 rows,
/// 12 accumulators in the 16 ymm registers). Fused multiply-adds in order of `k`, so results
/// equal the AVX-512 tile's.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x` holds `rows` rows of `kg` lanes.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_avx2_f32(
    x: &[u32],
    w: &PackedWeight,
    rows: usize,
    c0: usize,
    ks: Range<usize>,
    acc: &mut TileAcc,
    ahead: Ahead,
) {
    /// Columns `[from, to)` of the panel at `c0` (a multiple of `8 S` of them); returns `to`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const R: usize, const S: usize>(
        x: &[u32],
        w: &PackedWeight,
        c0: usize,
        (from, to): (usize, usize),
        ks: Range<usize>,
        acc: &mut TileAcc,
        ahead: Ahead,
    ) -> usize {
        use std::arch::x86_64::*;
        let kg = w.kg;
        let pw = panel_width(w.n_pad, c0 / BLOCK);
        debug_assert!(x.len() >= R * kg && to <= pw && (to - from) % (8 * S) == 0);
        let xp = x.as_ptr() as *const f32;
        let panel = w.lanes.as_ptr().add(c0 * kg) as *const f32;
        for sub in (from..to).step_by(8 * S) {
            let mut a = [[_mm256_setzero_ps(); S]; R];
            for (r, a) in a.iter_mut().enumerate() {
                for (v, a) in a.iter_mut().enumerate() {
                    *a = _mm256_loadu_ps(acc[r].as_ptr().add(sub + 8 * v) as *const f32);
                }
            }
            let mut wp = panel.add(sub + ks.start * pw);
            for g in ks.clone() {
                ahead.fetch(wp as *const u32, pw, 8 * S, g - ks.start);
                let mut wv = [_mm256_setzero_ps(); S];
                for (v, wv) in wv.iter_mut().enumerate() {
                    *wv = _mm256_loadu_ps(wp.add(8 * v));
                }
                for (r, a) in a.iter_mut().enumerate() {
                    let xb = _mm256_set1_ps(*xp.add(r * kg + g));
                    for (a, &wv) in a.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xb, wv, *a);
                    }
                }
                wp = wp.add(pw);
            }
            for (r, a) in a.iter().enumerate() {
                for (v, a) in a.iter().enumerate() {
                    _mm256_storeu_ps(acc[r].as_mut_ptr().add(sub + 8 * v) as *mut f32, *a);
                }
            }
        }
        to
    }
    /// Wide blocks of `8 S` columns first, then 16-column blocks for the rest (panel widths
    /// are multiples of 16).
    #[inline(always)]
    unsafe fn rows_of<const R: usize, const S: usize>(
        x: &[u32],
        w: &PackedWeight,
        c0: usize,
        ks: Range<usize>,
        acc: &mut TileAcc,
        ahead: Ahead,
    ) {
        let pw = panel_width(w.n_pad, c0 / BLOCK);
        let wide = pw / (8 * S) * (8 * S);
        let done = block::<R, S>(x, w, c0, (0, wide), ks.clone(), acc, ahead);
        block::<R, 2>(x, w, c0, (done, pw), ks, acc, ahead);
    }
    // Whole vectors of the panel; the caller stores `width` columns of them.
    match rows {
        1 => rows_of::<1, 8>(x, w, c0, ks, acc, ahead),
        2 => rows_of::<2, 4>(x, w, c0, ks, acc, ahead),
        3 => rows_of::<3, 2>(x, w, c0, ks, acc, ahead),
        4 => rows_of::<4, 2>(x, w, c0, ks, acc, ahead),
        5 => rows_of::<5, 2>(x, w, c0, ks, acc, ahead),
        _ => rows_of::<6, 2>(x, w, c0, ks, acc, ahead),
    }
}

/// Dispatches to the AVX-512 tile instantiated for `rows` rows and `width / 16` vectors.
///
/// # Safety
/// The CPU must have the tile's level: AVX-512BW (f32), AVX-512 BF16 (bf16) or VNNI (int8).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_simd(
    x: &[u32],
    w: &PackedWeight,
    rows: usize,
    c0: usize,
    width: usize,
    ks: Range<usize>,
    acc: &mut TileAcc,
    ahead: Ahead,
) {
    macro_rules! by_width {
        ($f:ident, $r:literal) => {
            match width.div_ceil(16) {
                1 => $f::<$r, 1>(x, w, c0, ks, acc, ahead),
                2 => $f::<$r, 2>(x, w, c0, ks, acc, ahead),
                3 => $f::<$r, 3>(x, w, c0, ks, acc, ahead),
                _ => $f::<$r, 4>(x, w, c0, ks, acc, ahead),
            }
        };
    }
    macro_rules! by_rows {
        ($f:ident) => {
            match rows {
                1 => by_width!($f, 1),
                2 => by_width!($f, 2),
                3 => by_width!($f, 3),
                4 => by_width!($f, 4),
                5 => by_width!($f, 5),
                _ => by_width!($f, 6),
            }
        };
    }
    match w.kind {
        WeightDtype::F32 => by_rows!(tile_avx512_f32),
        WeightDtype::Bf16 => by_rows!(tile_avx512_bf16),
        WeightDtype::Int8 => by_rows!(tile_avx512_int8),
        WeightDtype::F16 => unreachable!("f16 is refused by CpuBackend::upload_linear"),
    }
}

/// One tile on the best path `isa` allows: `rows` rows of `x` times the panel at `c0`, over
/// the lanes `ks` of `k`, added to the running sums in `acc` (each output's sum over `k`
/// continues in order, whatever the split of `k`); the SIMD tiles prefetch the panel `ahead`
/// rows ahead of the row they read (see [`prefetch_rows`]), or, given `next`, the next task's
/// panel from there on instead ([`Ahead::Next`]). `nodot_kind`: the tile of
/// [`nodot`] the product chose ([`no_dot`], and the layout of `x` it prepared), if any.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile(
    x: &[u32],
    w: &PackedWeight,
    rows: usize,
    c0: usize,
    width: usize,
    ks: Range<usize>,
    acc: &mut TileAcc,
    isa: Isa,
    nodot_kind: Option<nodot::NoDot>,
    ahead: usize,
    next: Option<*const u32>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let simd = match w.kind {
            WeightDtype::F32 => isa.avx512(),
            WeightDtype::Bf16 => isa >= Isa::Avx512Bf16,
            WeightDtype::Int8 => isa >= Isa::Avx512Vnni,
            WeightDtype::F16 => false,
        };
        let ahead = match next {
            Some(p) => Ahead::Next(p),
            None => Ahead::Rows(ahead),
        };
        if simd {
            // SAFETY: the backend only runs at levels the CPU has (`IsaLevel::checked`).
            return unsafe { tile_simd(x, w, rows, c0, width, ks, acc, ahead) };
        }
        if w.kind == WeightDtype::F32 && isa >= Isa::Avx2 {
            // SAFETY: as above.
            return unsafe { tile_avx2_f32(x, w, rows, c0, ks, acc, ahead) };
        }
        if let Some(kind) = nodot_kind {
            // SAFETY: as above; `matmul_packed_shared` prepared `x` for this tile (widened
            // bf16 rows of `2 kg` values, int8 as `kind` reads it).
            return unsafe { nodot::tile(x, w, rows, c0, ks, acc, kind, ahead) };
        }
        if isa >= Isa::Avx2 {
            // SAFETY: as above.
            return unsafe { tile_portable_avx2(x, w, rows, c0, width, ks, acc) };
        }
    }
    let _ = (isa, nodot_kind, ahead, next);
    tile_portable(x, w, rows, c0, width, ks, acc)
}

/// The tile of [`nodot`] that `kind` runs at level `isa`, if any: bf16 widened to f32 and
/// int8 through 16-bit products, where the CPU has AVX2 but not the dot-product instruction.
fn no_dot(kind: WeightDtype, isa: Isa) -> Option<nodot::NoDot> {
    use nodot::NoDot;
    match kind {
        WeightDtype::Bf16 if isa >= Isa::Avx512Bf16 => None,
        WeightDtype::Bf16 if isa.avx512() => Some(NoDot::Bf16Avx512),
        WeightDtype::Bf16 if isa >= Isa::Avx2 => Some(NoDot::Bf16Avx2),
        WeightDtype::Int8 if isa >= Isa::Avx512Vnni => None,
        WeightDtype::Int8 if isa.avx512() => Some(NoDot::Int8Avx512bw),
        WeightDtype::Int8 if isa >= Isa::Avx2 => Some(NoDot::Int8Avx2),
        _ => None,
    }
}

/// Rows of `k` f32 values, each padded with zeros to `k_pad` values.
fn pad_rows(x: &[f32], m: usize, k: usize, k_pad: usize) -> Result<Vec<u32>, T5Error> {
    let mut out = crate::alloc::try_zeroed::<u32>(m * k_pad, "a product's padded activations")?;
    for (dst, row) in out.chunks_exact_mut(k_pad).zip(x.chunks_exact(k)) {
        for (d, v) in dst.iter_mut().zip(row) {
            *d = v.to_bits();
        }
    }
    Ok(out)
}

/// `dst (+)= ` one row of an int8 tile's results: `Σ (xc + xs·q)·ws·qw = xs·ws·Σ q·qw + xc·ws·Σ
/// qw`, from the i32 sums of `q + 128` (`acc`), the column sums `Σ qw` and scales `ws`, and the
/// row's center `xc` and scale `xs`. The true sum fits in i32 (|q| <= 127, k < 2^17), so
/// wrapping arithmetic gives it exactly; so does the column sum in f32 (|Σ qw| < 2^24). The
/// AVX-512 and AVX2 versions do the same operations in the same order, so the same bits.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn int8_out(
    dst: &mut [f32],
    acc: &[u32],
    sums: &[i32],
    scales: &[f32],
    xc: f32,
    xs: f32,
    accumulate: bool,
    isa: Isa,
) {
    let n = dst.len().min(acc.len()).min(sums.len()).min(scales.len());
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(
        dst: &mut [f32],
        acc: &[u32],
        sums: &[i32],
        scales: &[f32],
        xc: f32,
        xs: f32,
        accumulate: bool,
        n: usize,
    ) {
        use std::arch::x86_64::*;
        let (vxc, vxs) = (_mm512_set1_ps(xc), _mm512_set1_ps(xs));
        for j in (0..n).step_by(16) {
            let m = lanes_before(n, j);
            // SAFETY: lanes at and past `n` are masked off; the rest are in every slice.
            let a = _mm512_maskz_loadu_epi32(m, acc.as_ptr().add(j) as *const i32);
            let cs = _mm512_maskz_loadu_epi32(m, sums.as_ptr().add(j));
            let ws = _mm512_maskz_loadu_ps(m, scales.as_ptr().add(j));
            let dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(a, _mm512_slli_epi32(cs, 7)));
            let center = _mm512_mul_ps(vxc, _mm512_mul_ps(_mm512_cvtepi32_ps(cs), ws));
            let v = _mm512_add_ps(_mm512_mul_ps(dot, _mm512_mul_ps(vxs, ws)), center);
            put_lanes(dst.as_mut_ptr().add(j), m, v, accumulate);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx2(
        dst: &mut [f32],
        acc: &[u32],
        sums: &[i32],
        scales: &[f32],
        xc: f32,
        xs: f32,
        accumulate: bool,
        n: usize,
    ) -> usize {
        use std::arch::x86_64::*;
        let (vxc, vxs) = (_mm256_set1_ps(xc), _mm256_set1_ps(xs));
        let mut j = 0;
        while j + 8 <= n {
            // SAFETY: j + 8 <= n, which every slice holds.
            let a = _mm256_loadu_si256(acc.as_ptr().add(j) as *const __m256i);
            let cs = _mm256_loadu_si256(sums.as_ptr().add(j) as *const __m256i);
            let ws = _mm256_loadu_ps(scales.as_ptr().add(j));
            let dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(a, _mm256_slli_epi32::<7>(cs)));
            let center = _mm256_mul_ps(vxc, _mm256_mul_ps(_mm256_cvtepi32_ps(cs), ws));
            let v = _mm256_add_ps(_mm256_mul_ps(dot, _mm256_mul_ps(vxs, ws)), center);
            put8(dst.as_mut_ptr().add(j), v, accumulate);
            j += 8;
        }
        j
    }
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() {
        // SAFETY: the backend only runs at levels the CPU has.
        return unsafe { avx512(dst, acc, sums, scales, xc, xs, accumulate, n) };
    }
    #[cfg(target_arch = "x86_64")]
    let done = if isa >= Isa::Avx2 {
        // SAFETY: as above.
        unsafe { avx2(dst, acc, sums, scales, xc, xs, accumulate, n) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    let _ = isa;
    let vals = (done..n).map(|j| {
        let dot = (acc[j] as i32).wrapping_sub(sums[j].wrapping_mul(128)) as f32;
        dot * (xs * scales[j]) + xc * (sums[j] as f32 * scales[j])
    });
    store(&mut dst[done..n], vals, accumulate)
}

/// The lanes of the 16-value vector at `j` that come before `n`, as a mask.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lanes_before(n: usize, j: usize) -> u16 {
    if n - j >= 16 {
        0xffff
    } else {
        (1u16 << (n - j)) - 1
    }
}

/// Writes the lanes `m` of `v` to `d`, added to what is there when `accumulate`.
///
/// # Safety
/// AVX-512F; the lanes `m` of `d` are writable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn put_lanes(d: *mut f32, m: u16, v: std::arch::x86_64::__m512, accumulate: bool) {
    use std::arch::x86_64::*;
    let v = if accumulate {
        _mm512_add_ps(_mm512_maskz_loadu_ps(m, d), v)
    } else {
        v
    };
    _mm512_mask_storeu_ps(d, m, v);
}

/// Writes the 8 values `v` to `d`, added to what is there when `accumulate` (`put_lanes` in
/// AVX2).
///
/// # Safety
/// AVX2; 8 values at `d` are writable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn put8(d: *mut f32, v: std::arch::x86_64::__m256, accumulate: bool) {
    use std::arch::x86_64::*;
    let v = if accumulate {
        _mm256_add_ps(_mm256_loadu_ps(d), v)
    } else {
        v
    };
    _mm256_storeu_ps(d, v);
}

/// A tile's f32 sums (`acc`, as bits) into `dst`: `dst = acc` or `dst += acc` ([`store`]; in
/// AVX-512 or AVX2 vectors where the CPU has them, the same values).
#[inline(always)]
fn f32_out(dst: &mut [f32], acc: &[u32], accumulate: bool, isa: Isa) {
    let n = dst.len().min(acc.len());
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(dst: &mut [f32], acc: &[u32], accumulate: bool, n: usize) {
        use std::arch::x86_64::*;
        for j in (0..n).step_by(16) {
            let m = lanes_before(n, j);
            // SAFETY: lanes at and past `n` are masked off; the rest are in both slices.
            let v = _mm512_maskz_loadu_ps(m, acc.as_ptr().add(j) as *const f32);
            put_lanes(dst.as_mut_ptr().add(j), m, v, accumulate);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(dst: &mut [f32], acc: &[u32], accumulate: bool, n: usize) -> usize {
        use std::arch::x86_64::*;
        let mut j = 0;
        while j + 8 <= n {
            // SAFETY: j + 8 <= n, which both slices hold.
            let v = _mm256_loadu_ps(acc.as_ptr().add(j) as *const f32);
            put8(dst.as_mut_ptr().add(j), v, accumulate);
            j += 8;
        }
        j
    }
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() {
        // SAFETY: the backend only runs at levels the CPU has.
        return unsafe { avx512(dst, acc, accumulate, n) };
    }
    #[cfg(target_arch = "x86_64")]
    let done = if isa >= Isa::Avx2 {
        // SAFETY: as above.
        unsafe { avx2(dst, acc, accumulate, n) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    let _ = isa;
    store(
        &mut dst[done..n],
        acc[done..n].iter().map(|&a| f32::from_bits(a)),
        accumulate,
    )
}

/// A row of f32 activations rounded to bf16 ([`bf16_bits`]), two to a lane (the odd value in
/// the high half; a last odd value alone in its lane), in AVX-512 or AVX2 vectors where the
/// CPU has them: the same bits.
pub(super) fn bf16_row(row: &[f32], dst: &mut [u32], isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn avx512(row: &[f32], dst: &mut [u32]) -> usize {
        use std::arch::x86_64::*;
        let (one, round, quiet) = (
            _mm512_set1_epi32(1),
            _mm512_set1_epi32(0x7fff),
            _mm512_set1_epi32(0x40),
        );
        let whole = row.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: 16 values from `i`, and 8 lanes from `i / 2` (`dst` holds a lane per
            // pair of `row`).
            let x = _mm512_loadu_ps(row.as_ptr().add(i));
            let b = _mm512_castps_si512(x);
            let high = _mm512_srli_epi32(b, 16);
            let even = _mm512_add_epi32(round, _mm512_and_si512(high, one));
            let rounded = _mm512_srli_epi32(_mm512_add_epi32(b, even), 16);
            let nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
            let r = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, quiet));
            // The 16 halves in order: lane `i / 2 + j` gets values 2j and 2j + 1.
            _mm256_storeu_si256(
                dst.as_mut_ptr().add(i / 2) as *mut __m256i,
                _mm512_cvtepi32_epi16(r),
            );
        }
        whole
    }
    /// `avx512` in AVX2: the same integer rounding, 16 values at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(row: &[f32], dst: &mut [u32]) -> usize {
        use std::arch::x86_64::*;
        let (one, round, quiet) = (
            _mm256_set1_epi32(1),
            _mm256_set1_epi32(0x7fff),
            _mm256_set1_epi32(0x40),
        );
        let half = |x: __m256| {
            let b = _mm256_castps_si256(x);
            let high = _mm256_srli_epi32::<16>(b);
            let even = _mm256_add_epi32(round, _mm256_and_si256(high, one));
            let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, even));
            let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
            _mm256_blendv_epi8(rounded, _mm256_or_si256(high, quiet), nan)
        };
        let whole = row.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: 16 values from `i`, and 8 lanes from `i / 2`, as in `avx512`.
            let a = half(_mm256_loadu_ps(row.as_ptr().add(i)));
            let b = half(_mm256_loadu_ps(row.as_ptr().add(i + 8)));
            // Values below 2^16 each: the unsigned pack keeps them; the pack works within
            // 128-bit halves (a0-3 b0-3 | a4-7 b4-7), which the permutation puts in order.
            let r = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(a, b));
            _mm256_storeu_si256(dst.as_mut_ptr().add(i / 2) as *mut __m256i, r);
        }
        whole
    }
    #[cfg(target_arch = "x86_64")]
    let done = if isa.avx512() {
        // SAFETY: the backend only runs at levels the CPU has.
        unsafe { avx512(row, dst) }
    } else if isa >= Isa::Avx2 {
        // SAFETY: as above.
        unsafe { avx2(row, dst) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    let _ = isa;
    let pairs = row[done..].chunks_exact(2);
    let tail = pairs.remainder();
    for (d, p) in dst[done / 2..].iter_mut().zip(pairs) {
        *d = bf16_bits(p[0]) as u32 | (bf16_bits(p[1]) as u32) << 16;
    }
    if let [last] = tail {
        dst[row.len() / 2] = bf16_bits(*last) as u32;
    }
}

/// The smallest and largest values of `row` ([`crate::math::min_max`]; in AVX-512 or AVX2
/// vectors where the CPU has them, the same values, but for the sign of a zero).
fn row_range(row: &[f32], isa: Isa) -> (f32, f32) {
    /// The lane-wise smallest and largest values of `row`'s whole vectors, and its tail.
    /// min/max return the second operand when the first is NaN, so NaNs are skipped, as in
    /// `min_max`.
    #[cfg(target_arch = "x86_64")]
    macro_rules! lanes_range {
        ($row:expr, $lanes:literal, $set1:ident, $load:ident, $min:ident, $max:ident) => {{
            let (mut lo, mut hi) = ($set1(f32::INFINITY), $set1(f32::NEG_INFINITY));
            let chunks = $row.chunks_exact($lanes);
            let tail = chunks.remainder();
            for c in chunks {
                // SAFETY: a whole vector of values.
                let x = $load(c.as_ptr());
                lo = $min(x, lo);
                hi = $max(x, hi);
            }
            (lo, hi, tail)
        }};
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(row: &[f32]) -> (f32, f32) {
        use std::arch::x86_64::*;
        let (lo, hi, tail) = lanes_range!(
            row,
            16,
            _mm512_set1_ps,
            _mm512_loadu_ps,
            _mm512_min_ps,
            _mm512_max_ps
        );
        let lanes = (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
        crate::math::min_max_with(lanes, tail)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(row: &[f32]) -> (f32, f32) {
        use std::arch::x86_64::*;
        let (lo, hi, tail) = lanes_range!(
            row,
            8,
            _mm256_set1_ps,
            _mm256_loadu_ps,
            _mm256_min_ps,
            _mm256_max_ps
        );
        let (mut l, mut h) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(l.as_mut_ptr(), lo);
        _mm256_storeu_ps(h.as_mut_ptr(), hi);
        let lanes = (
            l.iter().fold(f32::INFINITY, |a, &v| a.min(v)),
            h.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)),
        );
        crate::math::min_max_with(lanes, tail)
    }
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() {
        // SAFETY: the backend only runs at levels the CPU has.
        return unsafe { avx512(row) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: as above.
        return unsafe { avx2(row) };
    }
    let _ = isa;
    crate::math::min_max(row)
}

/// `dst = vals` or `dst += vals`.
#[inline(always)]
fn store(dst: &mut [f32], vals: impl Iterator<Item = f32>, accumulate: bool) {
    if accumulate {
        dst.iter_mut().zip(vals).for_each(|(d, v)| *d += v);
    } else {
        dst.iter_mut().zip(vals).for_each(|(d, v)| *d = v);
    }
}

/// A tuning knob from the environment: `var` as a number, if it is set and parses.
fn tuning(var: &str) -> Option<usize> {
    std::env::var(var).ok().and_then(|v| v.parse().ok())
}

/// Lanes of `k` per block when a task walks several register tiles of rows with the AVX2 f32
/// or widened bf16 tile (see [`matmul_packed`]): 48 lanes of a 64-column panel are 12 KiB,
/// under half of a typical L1. Those tiles walk a panel in several column passes, each of
/// which would otherwise come from L2 once per row tile: blocks made the f32 products about
/// 25% faster and the bf16 ones about 10% (`examples/matmul_speed`, alternating runs on a
/// 2-core Xeon VM). The AVX-512 tiles read a whole panel row per pass (half of one for
/// widened bf16 in twelve rows, [`bf16_twelve_rows`]) and gained nothing (3% slower encoders
/// in A/B runs, before the twelve-row tile), and the AVX2 int8 tile showed no clear
/// difference, so they walk `k` in one go, except the AVX-512 f32 tile on long rows (see
/// [`AVX512_KC`]).
/// `T5RT_KC` overrides the block, for tuning.
fn k_block() -> usize {
    static KC: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *KC.get_or_init(|| tuning("T5RT_KC").filter(|&v| v > 0).unwrap_or(48))
}

/// The AVX-512 f32 tile walks `k` in blocks of this many lanes when `k` exceeds
/// [`AVX512_LONG_K`] (t5-base's and larger models' feed-forward output, k = 3072 or more):
/// a block of the panel is then 128 KiB and stays in L2 while the row tiles go by, instead of
/// the whole 768 KiB panel streaming once per tile. About 8% faster on 512 x 768 x 3072 in
/// alternating `examples/matmul_speed` runs (median of 5); no gain at k = 2048 and a loss at
/// k = 768, so shorter rows are walked in one go.
const AVX512_KC: usize = 512;
const AVX512_LONG_K: usize = 2048;

/// How many rows of a panel (steps of `k`) ahead the SIMD tiles ask for the weights they
/// will read: 16 rows of a 64-column f32 panel are 4 KiB. The hardware prefetchers alone left
/// the tiles waiting on L2 (encoder passes, where every row tile walks the panel again) and on
/// memory (decoding): in alternating `examples/matmul_speed` runs on a 2-core Xeon VM, products
/// got 15% to 50% faster (f32 512 x 3072 x 768 from about 100 to 150 GFLOP/s; bf16 and int8 at
/// batch 1 to 8 by 10% to 30%), and t5-small's f32 encoder 13% faster in `t5rt bench`. Distances
/// from 8 to 64 rows did about as well. `T5RT_PREFETCH` overrides it (0: none; the next-panel
/// prefetch has its own switch, [`prefetch_next`]), for tuning.
fn prefetch_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| tuning("T5RT_PREFETCH").unwrap_or(16))
}

/// Whether the widened bf16 tile of AVX-512 runs twelve rows at once
/// (`nodot::bf16_avx512_rows`) in products of more than [`ROWS_PER_TASK`] rows: encoder passes
/// of more than 60 tokens in all, the cross-attention keys and values of such sources, and
/// decoding steps of more than 60 rows (64 sequences, or 32 x 4 beams). Widening the weights
/// takes the multiply-adds' ports on Intel's cores, and twelve rows share each widened vector
/// where six did. Measured on the Emerald Rapids Xeon: one core, weights in cache
/// (`examples/matmul_speed`, 3 alternating runs), 4096 x 768 x 768 137-139 against 130-131
/// GFLOP/s, 4096 x 3072 x 768 138-140 against 130-131, 4096 x 768 x 3072 149-150 against
/// 141-143; t5-base's bf16 encoder over case d's 32 x 128 tokens (`t5rt bench --case
/// 32:128:1`, 5 alternating pairs) 2.69-2.80 against 2.86-3.10 s, faster in every pair (4 more
/// pairs: faster in 3); t5-small's greedy bf16 decoding of 64 sequences (`--case 64:128:32`)
/// 1.26-1.55 against 1.36-1.59 s, faster in 4 alternating pairs of 4. Decoding steps of 32 rows
/// (one row task, where the next-panel prefetch runs) keep six: their products wait on memory
/// as much as on the multiply-adds, and t5-base case d's decoding was slower with twelve in 13
/// of 20 alternating pairs (3.06-4.48 against 3.12-3.99 s). `T5RT_BF16_12=0` turns it off, for
/// tuning.
fn bf16_twelve_rows() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| tuning("T5RT_BF16_12").unwrap_or(1) > 0)
}

/// What a SIMD tile prefetches as it walks `k`: its own panel `Rows` rows ahead (a task's
/// first pass over its panel, which comes from memory, and every pass where the next-panel
/// prefetch does not apply), or, one 64-byte line per step of `k`, the panel of the task after
/// this one, from `Next` on (a task's later passes, which find their panel in L2 and would
/// leave the memory bus idle; see [`prefetch_next`]).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) enum Ahead {
    Rows(usize),
    Next(*const u32),
}

#[cfg(target_arch = "x86_64")]
impl Ahead {
    /// The prefetch of a walk as the address of its first step and the advance per step, in
    /// lanes (`wp`: the walk's first panel row, rows of `pw` lanes): for walks that issue one
    /// line per step whatever the kind. Without a distance (`T5RT_PREFETCH=0`), the panel row the
    /// step reads: those walks then ask for the line they are about to load.
    #[inline(always)]
    pub(super) fn plan(self, wp: *const u32, pw: usize) -> (*const u32, usize) {
        match self {
            Ahead::Rows(rows) => (wp.wrapping_add(rows * pw), pw),
            Ahead::Next(p) => (p, 16),
        }
    }

    /// The requests for step `step` of a tile's walk over `k` (`wp`: the panel row it reads,
    /// rows of `pw` lanes, `n` of them read).
    #[inline(always)]
    pub(super) fn fetch(self, wp: *const u32, pw: usize, n: usize, step: usize) {
        match self {
            Ahead::Rows(rows) => prefetch_panel(wp, rows, pw, n),
            Ahead::Next(p) => prefetch_lines(p.wrapping_add(16 * step), 16),
        }
    }
}

/// Whether, in products of one row task (at most [`ROWS_PER_TASK`] rows: batched decoding steps,
/// and encoder passes that short), a task's row tiles after its first ask for the next task's panel
/// ([`Ahead::Next`]; rayon hands each thread a run of consecutive tasks, so that is most often the
/// panel the thread reads next). There a task's first pass waits on memory (each weight is read
/// once per step) and its other passes on the multiply-adds alone, which left the memory bus idle.
/// In alternating `examples/matmul_speed` runs with weights from memory (`MATMUL_COLD=1`, median of
/// 4 to 8, 2 threads, AMD EPYC Zen 4): products of 32 rows 6% to 16% faster at `avx512-bf16` (bf16
/// 32 x 3072 x 768 from 344 to 372 GFLOP/s, int8 from 611 to 695), 7% to 23% at `avx2` and up to
/// 11% at `avx512bw` (single products; a task of a shared set asks for the set's next task's panel,
/// which may be the next product's); 8 rows 2% to 18%. Encoder products (4096 rows, many row tasks,
/// panels from L3) gained nothing at `avx512-bf16` and lost up to 10% (20% at 512 rows) with the
/// widened bf16 and 16-bit int8 tiles at `avx512bw`, whose wide activation rows the extra lines
/// push out of L1: hence one row task only. `T5RT_PREFETCH_NEXT=0` turns it off, for tuning.
fn prefetch_next() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| tuning("T5RT_PREFETCH_NEXT").unwrap_or(1) > 0)
}

/// The largest panel whose task asks for the next one ([`prefetch_next`]): 3/8 of the L2
/// cache `cpuid` reports ([`super::isa::l2_bytes`]), so that two panels stay in it, within
/// [`NEXT_MIN_BYTES`] and [`NEXT_MAX_BYTES`]. With a 2 MiB L2 (Emerald Rapids Xeon) that is
/// 768 KiB, which takes in the f32 feed-forward outputs of t5-small (k = 2048) and t5-base
/// (k = 3072): their 32-row products from memory ran at a median 150 against 127 and 157
/// against 137 GFLOP/s (5 alternating `examples/matmul_speed` runs over 1 GiB of weights; at
/// `avx2` 73 against 67 and 75 against 72), and t5-base's batched decoding (case d, f32) took
/// 5.44 against 5.83 s (median of 5 alternating `t5rt bench` runs). Larger panels keep the
/// plain prefetch. `T5RT_NEXT_MAX_KIB` overrides it, for tuning (0: no next-panel prefetch).
fn next_max_bytes() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        tuning("T5RT_NEXT_MAX_KIB")
            .map(|kib| kib.saturating_mul(1024))
            .unwrap_or_else(|| {
                let l2 = super::isa::l2_bytes().unwrap_or(0);
                (l2 / 8 * 3).clamp(NEXT_MIN_BYTES, NEXT_MAX_BYTES)
            })
    })
}

/// The least of [`next_max_bytes`] unless overridden: 384 KiB (64 columns of k = 1536 in f32,
/// 3072 in bf16, 6144 in int8), right for a 1 MiB L2 (the Zen 4) and kept where the CPU does
/// not report its L2.
const NEXT_MIN_BYTES: usize = 384 << 10;

/// The most of [`next_max_bytes`] unless overridden: 768 KiB, the largest measured (a 2 MiB
/// L2). A larger reported L2 (or a hypervisor's wrong figure, or a hybrid CPU's shared
/// E-core L2) does not raise it further.
const NEXT_MAX_BYTES: usize = 768 << 10;

/// Where each product's tasks start in [`matmul_packed_shared`]'s set: product `i` owns tasks
/// `starts[i]..starts[i + 1]`, `row_tasks` per column block of 64 (the last entry is the
/// total).
fn task_starts(ws: &[&PackedWeight], row_tasks: usize) -> Vec<usize> {
    let mut starts = Vec::with_capacity(ws.len() + 1);
    starts.push(0);
    for w in ws {
        starts.push(starts.last().copied().unwrap_or(0) + w.n.div_ceil(BLOCK) * row_tasks);
    }
    starts
}

/// Task `t` (`t` < the total of [`task_starts`]): its product, its column block (of 64) and
/// its row task, column blocks first.
fn task_of(ws: &[&PackedWeight], starts: &[usize], t: usize) -> (usize, usize, usize) {
    let i = starts.partition_point(|&s| s <= t) - 1;
    let (local, col_blocks) = (t - starts[i], ws[i].n.div_ceil(BLOCK));
    (i, local % col_blocks, local / col_blocks)
}

/// The panel that task `t` reads ([`task_of`]): its first lane and its number of lanes.
fn task_panel(ws: &[&PackedWeight], starts: &[usize], t: usize) -> (*const u32, usize) {
    let (i, cb, _) = task_of(ws, starts, t);
    let w = ws[i];
    let lanes = w.kg * panel_width(w.n_pad, cb);
    (w.lanes[cb * BLOCK * w.kg..].as_ptr(), lanes)
}

/// Asks for the cache lines of the `n` values from `p` on, one request per 64-byte line.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn prefetch_lines<T>(p: *const T, n: usize) {
    for i in (0..n).step_by((64 / std::mem::size_of::<T>()).max(1)) {
        // SAFETY: a prefetch reads nothing architecturally and never faults, whatever the
        // address (outside the data it is only wasted).
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                p.wrapping_add(i) as *const i8
            )
        };
    }
}

/// Asks for the `n` lanes `ahead` rows of the panel below `wp` (rows of `pw` lanes); nothing
/// when `ahead` is 0.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn prefetch_panel(wp: *const u32, ahead: usize, pw: usize, n: usize) {
    if ahead > 0 {
        prefetch_lines(wp.wrapping_add(ahead * pw), n);
    }
}

/// `out[m, n] (+)= x[m, k] · wᵀ` in the weight's precision (see the module docs).
pub(super) fn matmul_packed(
    x: &[f32],
    w: &PackedWeight,
    out: &mut [f32],
    m: usize,
    accumulate: bool,
    isa: Isa,
) -> Result<(), T5Error> {
    matmul_packed_shared(x, &[w], &mut [out], m, accumulate, isa)
}

/// Whether [`matmul_packed_shared`] can run these weights together: one kind and one `k`
/// (so one preparation of the activations serves them all).
pub(super) fn can_share(ws: &[&PackedWeight]) -> bool {
    ws.windows(2)
        .all(|p| (p[0].kind, p[0].k, p[0].kg) == (p[1].kind, p[1].k, p[1].kg))
}

/// `outs[i][m, n_i] (+)= x[m, k] · ws[i]ᵀ` for several weights of one kind and `k` (q, k
/// and v of attention; a gated feed-forward's two input products): the activations are
/// prepared (quantized, or rounded to bf16) once instead of once per product, and every
/// product's tasks go to the thread pool together (one fork-join instead of one each). Each
/// output is computed exactly as [`matmul_packed`] alone would (the same tiles, in the same
/// order of `k`).
pub(super) fn matmul_packed_shared(
    x: &[f32],
    ws: &[&PackedWeight],
    outs: &mut [&mut [f32]],
    m: usize,
    accumulate: bool,
    isa: Isa,
) -> Result<(), T5Error> {
    debug_assert!(can_share(ws) && ws.len() == outs.len());
    let Some(&w0) = ws.first() else {
        return Ok(());
    };
    let k = w0.k;
    let x = &x[..m * k];
    // The tile for CPUs without the dot-product instructions, if this product runs on one.
    let nodot_kind = match no_dot(w0.kind, isa) {
        Some(nodot::NoDot::Int8Avx2) if m >= nodot::WIDE_MIN_ROWS => {
            Some(nodot::NoDot::Int8Avx2Wide)
        }
        kind => kind,
    };
    // Widened bf16 reads f32 activations, two per lane of weights: rows of `2 kg` values,
    // padded when `k` is odd.
    let widened = matches!(
        nodot_kind,
        Some(nodot::NoDot::Bf16Avx512 | nodot::NoDot::Bf16Avx2)
    );
    let wide16 = matches!(
        nodot_kind,
        Some(nodot::NoDot::Int8Avx512bw | nodot::NoDot::Int8Avx2Wide)
    );
    let xstride = if widened || wide16 { 2 * w0.kg } else { w0.kg };
    let in_place = w0.kind == WeightDtype::F32 || (widened && k == xstride);
    let (prepared, xscales) = if in_place {
        (Vec::new(), Vec::new())
    } else if widened {
        (pad_rows(x, m, k, xstride)?, Vec::new())
    } else {
        prepare(x, m, k, w0, isa)?
    };
    #[cfg(target_arch = "x86_64")]
    let prepared = if wide16 {
        let mut wide = crate::alloc::try_zeroed::<u32>(2 * prepared.len(), "widened activations")?;
        // SAFETY: the AVX-512 BW or AVX2 level (`no_dot`), which the backend only runs where
        // the CPU has it.
        unsafe { nodot::widen_activations(&prepared, &mut wide) };
        wide
    } else {
        prepared
    };
    let xl: &[u32] = if in_place {
        // SAFETY: f32 and u32 have the same size and alignment; the tiles read the bits.
        unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u32, x.len()) }
    } else {
        &prepared
    };
    let row_tasks = m.div_ceil(ROWS_PER_TASK);
    let starts = task_starts(ws, row_tasks);
    let outps: Vec<SharedMut> = outs.iter_mut().map(|o| SharedMut(o.as_mut_ptr())).collect();
    let total = starts.last().copied().unwrap_or(0);
    let next_on = prefetch_next() && row_tasks == 1;
    // Twelve rows at once never where a task's tiles ask for the next panel (its walks would
    // need their own runs of it).
    #[cfg(target_arch = "x86_64")]
    let wide_bf16 = nodot_kind == Some(nodot::NoDot::Bf16Avx512)
        && m > ROWS_PER_TASK
        && !next_on
        && bf16_twelve_rows();
    #[cfg(not(target_arch = "x86_64"))]
    let wide_bf16 = false;
    // Tiles of rows per call: two where `wide_bf16`, else one.
    let per = if wide_bf16 {
        nodot::WIDE_BF16_ROWS / MR
    } else {
        1
    };
    let next_max = next_max_bytes();
    (0..total).into_par_iter().for_each(|t| {
        let (i, cb, rt) = task_of(ws, &starts, t);
        let (w, outp) = (ws[i], outps[i]);
        let n = w.n;
        let c0 = cb * BLOCK;
        let width = BLOCK.min(n - c0);
        let (r_start, r_end) = (rt * ROWS_PER_TASK, ((rt + 1) * ROWS_PER_TASK).min(m));
        // The running sums of each register tile of rows. With several tiles (and the AVX2
        // tiles), `k` is walked in blocks of `kc` lanes, every tile's sums carried from one
        // block to the next: the block of the panel (`kc` x 64 lanes) then stays in L1 while
        // the row tiles go by, instead of coming from L2 once per tile.
        let tiles = (r_end - r_start).div_ceil(MR);
        // One tile's sums on the stack (decoding steps run some two thousand tasks a token;
        // a heap allocation each, with its zeroing and its free, was some 0.7% of t5-base's
        // f32 decoding samples in `perf`, the allocator's part most of it), several on the
        // heap.
        let (mut one, mut many): ([TileAcc; 1], Vec<TileAcc>);
        let sums: &mut [TileAcc] = if tiles == 1 {
            one = [[[0; BLOCK]; MR]];
            &mut one
        } else {
            many = vec![[[0; BLOCK]; MR]; tiles];
            &mut many
        };
        let kc = if tiles > 1 && w.kind != WeightDtype::Int8 && !isa.avx512() {
            k_block()
        } else if tiles > 1 && w.kind == WeightDtype::F32 && w.k > AVX512_LONG_K {
            AVX512_KC
        } else {
            w.kg.max(1)
        };
        let ahead = prefetch_rows();
        // The next task's panel, asked for by the row tiles after the first: tile `j` asks
        // for its lines `(j - 1) kg + g`, one per step `g` of `k`. Only in products of one
        // row task (decoding steps), and not where a panel is too large for two to share L2.
        let next = (next_on && t + 1 < total && 4 * w.kg * BLOCK <= next_max)
            .then(|| task_panel(ws, &starts, t + 1));
        for g0 in (0..w.kg).step_by(kc) {
            let ks = g0..(g0 + kc).min(w.kg);
            let flat = sums.as_flattened_mut();
            for (c, accs) in flat.chunks_mut(per * MR).enumerate() {
                let j = c * per;
                let r0 = r_start + j * MR;
                let rows = (per * MR).min(r_end - r0);
                let xs = &xl[r0 * xstride..(r0 + rows) * xstride];
                let from = 16 * (j.saturating_sub(1) * w.kg + g0);
                let next = match next {
                    Some((p, lanes)) if j > 0 && from < lanes => Some(p.wrapping_add(from)),
                    _ => None,
                };
                #[cfg(target_arch = "x86_64")]
                if rows > MR {
                    debug_assert!(next.is_none(), "wide_bf16 excludes next_on");
                    // Twice the rows ahead: the same bytes as the six-row tile's distance for
                    // the 32-column blocks, which read half a panel row per step.
                    let ahead = Ahead::Rows(2 * ahead);
                    // SAFETY: `per` > 1 only for `NoDot::Bf16Avx512`, chosen for levels
                    // with AVX-512F (`no_dot`), which the backend only runs where the CPU
                    // has them; `xs` holds `rows` rows of `2 kg` values and `accs` at least
                    // `rows` rows.
                    unsafe { nodot::bf16_avx512_rows(xs, w, rows, c0, ks.clone(), accs, ahead) };
                    continue;
                }
                let acc: &mut TileAcc = (&mut accs[..MR])
                    .try_into()
                    .expect("a chunk holds at least one tile");
                tile(
                    xs,
                    w,
                    rows,
                    c0,
                    width,
                    ks.clone(),
                    acc,
                    isa,
                    nodot_kind,
                    ahead,
                    next,
                );
            }
        }
        for (i, acc) in sums.iter().enumerate() {
            let r0 = r_start + i * MR;
            let rows = MR.min(r_end - r0);
            for (r, acc) in acc.iter().enumerate().take(rows) {
                // SAFETY: this task alone writes columns [c0, c0 + width) of rows
                // [r0, r0 + rows) of its product's output; the caller checked that each
                // output holds m * n values.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(outp.get().add((r0 + r) * n + c0), width)
                };
                let acc = &acc[..width];
                match w.kind {
                    WeightDtype::F32 | WeightDtype::Bf16 | WeightDtype::F16 => {
                        f32_out(dst, acc, accumulate, isa)
                    }
                    WeightDtype::Int8 => {
                        let [xc, xs] = xscales[r0 + r];
                        let sums = &w.col_sums[c0..c0 + width];
                        let scales = &w.scales[c0..c0 + width];
                        int8_out(dst, acc, sums, scales, xc, xs, accumulate, isa)
                    }
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod alloc_tests {
    use super::{quantize_int8, PackedWeight};
    use crate::backend::WeightDtype;

    /// Weights whose packed form cannot be had are an out-of-memory error, not an abort: the
    /// buffers are allocated (and fail) before any value is read, so a shape of 2^60 values
    /// over an empty slice reaches each allocation.
    #[test]
    fn weights_too_large_to_pack_are_errors() {
        let (n, k) = (1usize << 40, 1usize << 20);
        let isa = super::Isa::Portable;
        let oom = |e: crate::error::T5Error| {
            assert!(e.to_string().contains("out of memory"), "{e}");
        };
        oom(quantize_int8(&[], n, k, isa).unwrap_err());
        for kind in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::Int8] {
            oom(PackedWeight::pack(&[], n, k, kind, isa).err().unwrap());
        }
        oom(PackedWeight::from_int8(&[], &[], n, k).err().unwrap());
        // Shapes whose value count does not fit in the address space: errors, not a wrapped
        // size (or an overflow panic in debug builds).
        let (n, k) = (1usize << 62, 64);
        oom(quantize_int8(&[], n, k, isa).unwrap_err());
        for kind in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::Int8] {
            oom(PackedWeight::pack(&[], n, k, kind, isa).err().unwrap());
        }
        oom(PackedWeight::from_int8(&[], &[], n, k).err().unwrap());
        oom(PackedWeight::from_int8(&[], &[], usize::MAX - 3, 4)
            .err()
            .unwrap());
    }
}

#[cfg(test)]
mod task_tests {
    use super::{task_of, task_panel, task_starts, Isa, PackedWeight, BLOCK};
    use crate::backend::WeightDtype;

    /// The tasks of several products in one set map to each product's column blocks and row
    /// tasks in order (column blocks first), and `task_panel` of a task is the panel that task
    /// reads, also where it belongs to the next product (the next-panel prefetch asks for
    /// `task_panel(t + 1)`; a wrong panel would only cost speed, which no other test sees).
    #[test]
    fn tasks_map_to_their_products_blocks_and_panels() {
        let k = 40;
        let shapes = [64usize, 100, 1, 130];
        let packed: Vec<PackedWeight> = shapes
            .iter()
            .map(|&n| {
                let vals: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
                PackedWeight::pack(&vals, n, k, WeightDtype::F32, Isa::Portable).unwrap()
            })
            .collect();
        let ws: Vec<&PackedWeight> = packed.iter().collect();
        for row_tasks in [1, 3] {
            let starts = task_starts(&ws, row_tasks);
            let mut t = 0;
            for (i, w) in ws.iter().enumerate() {
                for rt in 0..row_tasks {
                    for cb in 0..w.n.div_ceil(BLOCK) {
                        assert_eq!(task_of(&ws, &starts, t), (i, cb, rt), "task {t}");
                        let (p, lanes) = task_panel(&ws, &starts, t);
                        let want = &w.lanes[cb * BLOCK * w.kg..];
                        assert_eq!(p, want.as_ptr(), "task {t}");
                        assert_eq!(lanes, w.kg * BLOCK.min(w.n_pad - cb * BLOCK), "task {t}");
                        t += 1;
                    }
                }
            }
            assert_eq!(starts.last(), Some(&t));
        }
    }
}

#[cfg(test)]
mod quantize_tests {
    use super::{
        affine_i8, bf16_bits, bf16_row, f32_out, int8_out, quantize_one, quantize_row, Isa,
    };

    /// Every level's bf16 rounding of activation rows equals `bf16_bits`, bit for bit (ties,
    /// NaN, infinities, signed zeros, denormals, values that round up into the exponent), for
    /// rows of every length up to past two vectors (a lone last value included).
    #[test]
    fn bf16_rows_equal_the_scalar_rule_at_every_level() {
        let mut vals: Vec<f32> = vec![
            1.0 + f32::EPSILON * 128.0, // a tie between two bf16 values
            1.0 + f32::EPSILON * 384.0, // a tie, rounding up
            -1.0 - f32::EPSILON * 64.0,
            f32::from_bits(0x3f80_7fff),
            f32::from_bits(0x3fff_ffff), // rounds up into the next binade
            f32::NAN,
            f32::from_bits(0x7f80_0001), // a signalling NaN
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e-40,
            -1e-40,
            f32::MAX,
        ];
        let mut x = 0x9e37_79b9u32;
        for _ in 0..40 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            vals.push(f32::from_bits(x));
        }
        for len in 0..=vals.len() {
            let row = &vals[..len];
            let want: Vec<u32> = row
                .chunks(2)
                .map(|p| {
                    bf16_bits(p[0]) as u32 | p.get(1).map_or(0, |&v| (bf16_bits(v) as u32) << 16)
                })
                .collect();
            for level in Isa::available_levels() {
                let mut got = vec![0u32; len.div_ceil(2)];
                bf16_row(row, &mut got, level);
                assert_eq!(got, want, "{level}, {len} values");
            }
        }
    }

    /// Every level writes a tile's sums as `store` does: assigned or added, any width.
    #[test]
    fn f32_out_equals_store_at_every_level() {
        for n in [1, 15, 16, 17, 64] {
            let acc: Vec<u32> = (0..n)
                .map(|i| (0.37f32 * i as f32 - 3.1).to_bits())
                .collect();
            let init: Vec<f32> = (0..n).map(|i| 1.0 / (i as f32 + 0.5)).collect();
            for accumulate in [false, true] {
                let want: Vec<f32> = init
                    .iter()
                    .zip(&acc)
                    .map(|(&d, &a)| {
                        if accumulate {
                            d + f32::from_bits(a)
                        } else {
                            f32::from_bits(a)
                        }
                    })
                    .collect();
                for level in Isa::available_levels() {
                    let mut got = init.clone();
                    f32_out(&mut got, &acc, accumulate, level);
                    assert_eq!(got, want, "{level}, {n} values, accumulate {accumulate}");
                }
            }
        }
    }

    /// Every level turns a tile's int8 sums into outputs as the scalar rule does, bit for
    /// bit: assigned or added, any width (whole vectors and a tail), large and negative sums.
    #[test]
    fn int8_out_equals_the_scalar_rule_at_every_level() {
        for n in [1, 7, 8, 9, 15, 16, 17, 64] {
            let acc: Vec<u32> = (0..n)
                .map(|i| (i as i32 * 977_123 - 3_000_000) as u32)
                .collect();
            let sums: Vec<i32> = (0..n).map(|i| i as i32 * 311 - 5_000).collect();
            let scales: Vec<f32> = (0..n).map(|i| 0.001 + i as f32 * 3.7e-4).collect();
            let init: Vec<f32> = (0..n).map(|i| 1.0 / (i as f32 + 0.5)).collect();
            let (xc, xs) = (0.37f32, 0.0123f32);
            for accumulate in [false, true] {
                let want: Vec<f32> = (0..n)
                    .map(|j| {
                        let dot = (acc[j] as i32).wrapping_sub(sums[j].wrapping_mul(128)) as f32;
                        let v = dot * (xs * scales[j]) + xc * (sums[j] as f32 * scales[j]);
                        if accumulate {
                            init[j] + v
                        } else {
                            v
                        }
                    })
                    .collect();
                for level in Isa::available_levels() {
                    let mut got = init.clone();
                    int8_out(&mut got, &acc, &sums, &scales, xc, xs, accumulate, level);
                    let (g, w): (Vec<u32>, Vec<u32>) = (
                        got.iter().map(|v| v.to_bits()).collect(),
                        want.iter().map(|v| v.to_bits()).collect(),
                    );
                    assert_eq!(g, w, "{level}, {n} values, accumulate {accumulate}");
                }
            }
        }
    }

    /// Every level's row quantization equals `quantize_one`, value for value: ties, the
    /// clamp, infinities, NaN, signed zeros, denormals, and a ragged tail.
    #[test]
    fn quantize_row_equals_the_scalar_rule_at_every_level() {
        let mut row: Vec<f32> = vec![
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            126.5,
            -126.5,
            127.4,
            200.0,
            -200.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            0.0,
            -0.0,
            1e-40,
        ];
        let mut x = 0x1234_5678u32;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            row.push((x as f32 / u32::MAX as f32 - 0.5) * 300.0);
        }
        for (center, inv) in [
            (0.0, 1.0f32),
            (0.0, 0.37),
            (0.0, 3.0),
            (-1.25, 0.37),
            (40.0, 1.0),
        ] {
            let want: Vec<u8> = row
                .iter()
                .map(|&v| (quantize_one(v - center, inv) as i32 + 128) as u8)
                .collect();
            for level in Isa::available_levels() {
                let mut got = vec![0u8; row.len()];
                quantize_row(&row, &mut got, center, inv, level);
                assert_eq!(got, want, "{level} center {center} inv {inv}");
            }
        }
    }

    /// The affine rule spends all 255 levels on the row's range: a row of one sign gets half
    /// the symmetric step, a symmetric row the same step, both ends map to ±127, a constant row
    /// is its center exactly, and an infinity falls back to the symmetric rule.
    #[test]
    fn affine_activation_quantization_covers_the_row_range() {
        for isa in Isa::available_levels() {
            let relu = [0.0f32, 0.5, 2.0, 3.0, 1.0];
            let (c, s) = affine_i8(&relu, isa);
            assert_eq!((c, s), (1.5, 1.5 / 127.0));
            let q = |v: f32| quantize_one(v - c, 1.0 / s);
            assert_eq!((q(0.0), q(3.0)), (-127, 127));
            let symmetric = [-2.0f32, 0.5, 2.0];
            assert_eq!(affine_i8(&symmetric, isa), (0.0, 2.0 / 127.0));
            assert_eq!(affine_i8(&[0.75f32; 9], isa), (0.75, 1.0));
            assert_eq!(quantize_one(0.75 - 0.75, 1.0), 0);
            assert_eq!(
                affine_i8(&[1.0f32, f32::INFINITY, -3.0], isa),
                (0.0, f32::INFINITY / 127.0)
            );
        }
    }

    /// Every level finds a row's range as `min_max` does: whole vectors and a tail, NaNs
    /// skipped wherever they are, extremes in the tail.
    #[test]
    fn row_range_is_min_max_at_every_level() {
        let mut x = 0x9e37_79b9u32;
        let mut rows: Vec<Vec<f32>> = Vec::new();
        for len in [0usize, 1, 15, 16, 17, 33, 512, 515] {
            let row: Vec<f32> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x as f32 / u32::MAX as f32 - 0.3) * 10.0
                })
                .collect();
            rows.push(row.clone());
            if len > 2 {
                let mut r = row.clone();
                r[0] = f32::NAN;
                r[len - 1] = 99.0;
                r[len - 2] = -99.0;
                rows.push(r);
            }
        }
        rows.push(vec![f32::NAN; 20]);
        for row in &rows {
            let want = crate::math::min_max(row);
            for isa in Isa::available_levels() {
                assert_eq!(
                    super::row_range(row, isa),
                    want,
                    "{isa}, {} values",
                    row.len()
                );
            }
        }
    }
}
