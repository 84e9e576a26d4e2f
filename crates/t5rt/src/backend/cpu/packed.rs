//! Reduced-precision linear layers: bf16 and int8 weights, packed at load time for AVX-512
//! dot-product instructions (`vdpbf16ps`, `vpdpbusd`), with portable scalar versions of the
//! same arithmetic.
//!
//! Layout: a weight `[n, k]` becomes 32-bit lanes `[k / G, n_pad]`, each lane holding `G`
//! consecutive `k` values of one output column (G = 2 for bf16, 4 for int8; `k` and `n` padded
//! with zeros). A row of 16 lanes is one 64-byte load, and the `G` matching activation values
//! of a row are one 32-bit broadcast. Each task owns 64 output columns and walks them down the
//! whole `k` range for 4 rows at a time, with the accumulators in registers; the 64-column
//! block of the weight (at most a few hundred KiB) stays in L2 while the rows go by.
//!
//! Arithmetic:
//! - bf16: activations are rounded to bf16 (nearest-even), products are exact in f32, and each
//!   pair of products is summed, then added to the f32 accumulator: `acc += (x1·w1 + x0·w0)`,
//!   as `vdpbf16ps` does.
//! - int8: each weight column has the scale `max|w| / 127` and values `round(w · (1 / scale))`
//!   (f32 arithmetic, ties to even);
//!   each activation row is quantized the same way at run time, then offset by 128 to u8 (the
//!   operand type of `vpdpbusd`). Sums are exact in i32; the offset is taken back with the
//!   column sums: `Σ (q+128)·w = Σ q·w + 128·Σ w`.

use rayon::prelude::*;

use super::kernels::SharedMut;

/// Output columns per task, four vectors of 16 lanes.
const BLOCK: usize = 64;
/// Rows per register tile.
const MR: usize = 4;
/// Rows per task when there are many (encoder passes), so that both threads get work.
const ROWS_PER_TASK: usize = 64;

/// How the lanes of a [`PackedWeight`] are to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedKind {
    Bf16,
    Int8,
}

impl PackedKind {
    /// Values of `k` per 32-bit lane.
    fn group(self) -> usize {
        match self {
            PackedKind::Bf16 => 2,
            PackedKind::Int8 => 4,
        }
    }
}

/// A linear weight in bf16 or int8, packed as described in the module docs.
pub struct PackedWeight {
    pub kind: PackedKind,
    pub n: usize,
    pub k: usize,
    /// `k / G`, rounded up.
    kg: usize,
    /// `n` rounded up to a multiple of 16.
    n_pad: usize,
    lanes: Vec<u32>,
    /// int8: the scale of each column (`n_pad` values); empty for bf16.
    scales: Vec<f32>,
    /// int8: the sum of each column's quantized values (`n_pad`); empty for bf16.
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
fn bf16_value(bits: u16) -> f32 {
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
fn quantize_one(v: f32, inv: f32) -> i8 {
    let y = v * inv;
    // (Comparisons, not `clamp`, whose NaN rules keep the loop from vectorising.)
    let y = if y > 127.0 {
        127.0
    } else if y < -127.0 {
        -127.0
    } else {
        y
    };
    round_small(y) as i32 as i8
}

impl PackedWeight {
    /// Packs a checkpoint weight `[n, k]` (row-major) as `kind`.
    pub fn pack(w: &[f32], n: usize, k: usize, kind: PackedKind) -> Self {
        let g = kind.group();
        let (kg, n_pad) = (k.div_ceil(g), n.div_ceil(16) * 16);
        let mut lanes = vec![0u32; kg * n_pad];
        let (mut scales, mut col_sums) = (Vec::new(), Vec::new());
        match kind {
            PackedKind::Bf16 => {
                for (c, row) in w.chunks_exact(k).take(n).enumerate() {
                    for (kk, &v) in row.iter().enumerate() {
                        lanes[(kk / 2) * n_pad + c] |= (bf16_bits(v) as u32) << (16 * (kk % 2));
                    }
                }
            }
            PackedKind::Int8 => {
                scales = vec![1.0; n_pad];
                col_sums = vec![0; n_pad];
                for (c, row) in w.chunks_exact(k).take(n).enumerate() {
                    let scale = i8_scale(row);
                    scales[c] = scale;
                    let inv = 1.0 / scale;
                    for (kk, q) in row.iter().map(|&v| quantize_one(v, inv)).enumerate() {
                        col_sums[c] += q as i32;
                        lanes[(kk / 4) * n_pad + c] |= (q as u8 as u32) << (8 * (kk % 4));
                    }
                }
            }
        }
        PackedWeight {
            kind,
            n,
            k,
            kg,
            n_pad,
            lanes,
            scales,
            col_sums,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lanes.len() * 4 + self.scales.len() * 4 + self.col_sums.len() * 4
    }
}

/// `bytes[i] = round(row[i] · inv) + 128`.
fn quantize_row(row: &[f32], bytes: &mut [u8], inv: f32) {
    #[inline(always)]
    fn body(row: &[f32], bytes: &mut [u8], inv: f32) {
        for i in 0..row.len().min(bytes.len()) {
            bytes[i] = (quantize_one(row[i], inv) as i32 + 128) as u8;
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn body_avx512(row: &[f32], bytes: &mut [u8], inv: f32) {
        body(row, bytes, inv)
    }
    #[cfg(target_arch = "x86_64")]
    if super::matvec::avx512_available() && std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: just checked.
        return unsafe { body_avx512(row, bytes, inv) };
    }
    body(row, bytes, inv)
}

/// Activations in the weight's lane format: `[m, kg]` lanes, and for int8 a scale per row.
fn prepare(x: &[f32], m: usize, k: usize, w: &PackedWeight) -> (Vec<u32>, Vec<f32>) {
    let kg = w.kg;
    let mut lanes = vec![0u32; m * kg];
    let mut scales = vec![0.0f32; m];
    // Big batches (encoder passes) are converted in parallel, a few rows per task.
    let rows_per_task = (4096 / k.max(1)).max(1);
    let row_tasks = lanes
        .par_chunks_mut(kg * rows_per_task)
        .zip(x.par_chunks(k * rows_per_task))
        .zip(scales.par_chunks_mut(rows_per_task));
    match w.kind {
        PackedKind::Bf16 => row_tasks.for_each(|((dst, x), _)| {
            for (dst, row) in dst.chunks_exact_mut(kg).zip(x.chunks_exact(k)) {
                let pairs = row.chunks_exact(2);
                let tail = pairs.remainder();
                for (d, p) in dst.iter_mut().zip(pairs) {
                    *d = bf16_bits(p[0]) as u32 | (bf16_bits(p[1]) as u32) << 16;
                }
                if let [last] = tail {
                    dst[kg - 1] = bf16_bits(*last) as u32;
                }
            }
        }),
        PackedKind::Int8 => row_tasks.for_each(|((dst, x), scales)| {
            for ((dst, row), scale) in dst.chunks_exact_mut(kg).zip(x.chunks_exact(k)).zip(scales) {
                *scale = i8_scale(row);
                // Padding holds u8 128 (q = 0), so the column-sum correction stays exact.
                dst.fill(0x8080_8080);
                // SAFETY: a u32 slice viewed as its bytes; on little-endian x86 byte `kk % 4`
                // of lane `kk / 4` is byte `kk` of the row, the order `pack` uses.
                let bytes = unsafe {
                    std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u8, dst.len() * 4)
                };
                quantize_row(row, &mut bytes[..row.len()], 1.0 / *scale);
            }
        }),
    }
    (lanes, scales)
}

/// One register tile's raw sums: f32 for bf16, i32 (as bits) for int8.
type TileAcc = [[u32; BLOCK]; MR];

/// The portable tile: `rows` rows from `x` (row stride `kg`), columns `[c0, c0 + width)`.
fn tile_portable(x: &[u32], w: &PackedWeight, rows: usize, c0: usize, width: usize) -> TileAcc {
    let (kg, n_pad) = (w.kg, w.n_pad);
    let mut acc: TileAcc = [[0; BLOCK]; MR];
    for (r, acc) in acc.iter_mut().enumerate().take(rows) {
        let xr = &x[r * kg..(r + 1) * kg];
        match w.kind {
            PackedKind::Bf16 => {
                let mut a = [0.0f32; BLOCK];
                for (g, &xv) in xr.iter().enumerate() {
                    let (x0, x1) = (bf16_value(xv as u16), bf16_value((xv >> 16) as u16));
                    let wrow = &w.lanes[g * n_pad + c0..g * n_pad + c0 + width];
                    for (a, &wv) in a.iter_mut().zip(wrow) {
                        let (w0, w1) = (bf16_value(wv as u16), bf16_value((wv >> 16) as u16));
                        *a += x1 * w1 + x0 * w0;
                    }
                }
                acc.iter_mut().zip(a).for_each(|(d, v)| *d = v.to_bits());
            }
            PackedKind::Int8 => {
                let mut a = [0i32; BLOCK];
                for (g, &xv) in xr.iter().enumerate() {
                    let xb = xv.to_le_bytes();
                    let wrow = &w.lanes[g * n_pad + c0..g * n_pad + c0 + width];
                    for (a, &wv) in a.iter_mut().zip(wrow) {
                        let wb = wv.to_le_bytes();
                        for i in 0..4 {
                            *a = a.wrapping_add(xb[i] as i32 * wb[i] as i8 as i32);
                        }
                    }
                }
                acc.iter_mut().zip(a).for_each(|(d, v)| *d = v as u32);
            }
        }
    }
    acc
}

/// The AVX-512 tile for `R` rows and `V` vectors of 16 columns.
///
/// # Safety
/// The CPU must support AVX-512F, BF16 and VNNI; `x` holds `R` rows of `kg` lanes and the
/// weight has `kg` rows of `n_pad >= c0 + 16 V` lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vnni")]
unsafe fn tile_avx512<const R: usize, const V: usize>(
    x: &[u32],
    w: &PackedWeight,
    c0: usize,
) -> TileAcc {
    use std::arch::x86_64::*;
    let (kg, n_pad) = (w.kg, w.n_pad);
    debug_assert!(x.len() >= R * kg && c0 + 16 * V <= n_pad);
    let xp = x.as_ptr();
    let mut wp = w.lanes.as_ptr().add(c0);
    let mut acc = [[_mm512_setzero_si512(); V]; R];
    match w.kind {
        PackedKind::Bf16 => {
            for g in 0..kg {
                let mut wv = [_mm512_setzero_si512(); V];
                for (v, wv) in wv.iter_mut().enumerate() {
                    *wv = _mm512_loadu_si512(wp.add(16 * v) as *const _);
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xb: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*xp.add(r * kg + g) as i32));
                    for (a, &wv) in acc.iter_mut().zip(&wv) {
                        let sum = _mm512_dpbf16_ps(
                            _mm512_castsi512_ps(*a),
                            xb,
                            std::mem::transmute::<__m512i, __m512bh>(wv),
                        );
                        *a = _mm512_castps_si512(sum);
                    }
                }
                wp = wp.add(n_pad);
            }
        }
        PackedKind::Int8 => {
            for g in 0..kg {
                let mut wv = [_mm512_setzero_si512(); V];
                for (v, wv) in wv.iter_mut().enumerate() {
                    *wv = _mm512_loadu_si512(wp.add(16 * v) as *const _);
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_epi32(*xp.add(r * kg + g) as i32);
                    for (a, &wv) in acc.iter_mut().zip(&wv) {
                        *a = _mm512_dpbusd_epi32(*a, xb, wv);
                    }
                }
                wp = wp.add(n_pad);
            }
        }
    }
    let mut out: TileAcc = [[0; BLOCK]; MR];
    for (o, acc) in out.iter_mut().zip(&acc) {
        for (v, a) in acc.iter().enumerate() {
            _mm512_storeu_si512(o.as_mut_ptr().add(16 * v) as *mut _, *a);
        }
    }
    out
}

/// Dispatches to the tile instantiated for `rows` rows and `width / 16` vectors.
#[cfg(target_arch = "x86_64")]
fn tile_simd(x: &[u32], w: &PackedWeight, rows: usize, c0: usize, width: usize) -> TileAcc {
    macro_rules! by_width {
        ($r:literal) => {
            // SAFETY: `avx512_vnni_bf16_available()` was checked by the backend; `x` holds
            // `rows` rows and the padded weight holds `c0 + width` lanes per row.
            unsafe {
                match width.div_ceil(16) {
                    1 => tile_avx512::<$r, 1>(x, w, c0),
                    2 => tile_avx512::<$r, 2>(x, w, c0),
                    3 => tile_avx512::<$r, 3>(x, w, c0),
                    _ => tile_avx512::<$r, 4>(x, w, c0),
                }
            }
        };
    }
    match rows {
        1 => by_width!(1),
        2 => by_width!(2),
        3 => by_width!(3),
        _ => by_width!(4),
    }
}

/// Whether the AVX-512 BF16 and VNNI tiles may run here.
pub(super) fn avx512_vnni_bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::matvec::avx512_available()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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

/// `out[m, n] (+)= x[m, k] · wᵀ` in the weight's precision (see the module docs).
pub(super) fn matmul_packed(
    x: &[f32],
    w: &PackedWeight,
    out: &mut [f32],
    m: usize,
    accumulate: bool,
    simd: bool,
) {
    let (n, k) = (w.n, w.k);
    let (xl, xscales) = prepare(&x[..m * k], m, k, w);
    let col_blocks = n.div_ceil(BLOCK);
    let row_tasks = m.div_ceil(ROWS_PER_TASK);
    let outp = SharedMut(out.as_mut_ptr());
    (0..col_blocks * row_tasks).into_par_iter().for_each(|t| {
        let (cb, rt) = (t % col_blocks, t / col_blocks);
        let c0 = cb * BLOCK;
        let width = BLOCK.min(n - c0);
        let r_end = ((rt + 1) * ROWS_PER_TASK).min(m);
        for r0 in (rt * ROWS_PER_TASK..r_end).step_by(MR) {
            let rows = MR.min(r_end - r0);
            let xs = &xl[r0 * w.kg..(r0 + rows) * w.kg];
            #[cfg(target_arch = "x86_64")]
            let acc = if simd {
                tile_simd(xs, w, rows, c0, width)
            } else {
                tile_portable(xs, w, rows, c0, width)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let acc = {
                let _ = simd;
                tile_portable(xs, w, rows, c0, width)
            };
            for (r, acc) in acc.iter().enumerate().take(rows) {
                // SAFETY: this task alone writes columns [c0, c0 + width) of rows
                // [r0, r0 + rows); the caller checked `out` holds m * n values.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(outp.get().add((r0 + r) * n + c0), width)
                };
                let acc = &acc[..width];
                match w.kind {
                    PackedKind::Bf16 => {
                        store(dst, acc.iter().map(|&a| f32::from_bits(a)), accumulate)
                    }
                    PackedKind::Int8 => {
                        let xs = xscales[r0 + r];
                        let sums = &w.col_sums[c0..c0 + width];
                        let scales = &w.scales[c0..c0 + width];
                        // The true sum fits in i32 (|q| <= 127, k < 2^17), so wrapping
                        // arithmetic gives it exactly.
                        let vals = acc.iter().zip(sums).zip(scales).map(|((&a, &cs), &ws)| {
                            (a as i32).wrapping_sub(cs.wrapping_mul(128)) as f32 * (xs * ws)
                        });
                        store(dst, vals, accumulate)
                    }
                }
            }
        }
    });
}
