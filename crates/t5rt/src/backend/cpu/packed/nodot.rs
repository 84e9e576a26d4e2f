//! Tiles for CPUs without the dot-product instructions (AVX-512 BF16's `vdpbf16ps`, VNNI's
//! `vpdpbusd`): most Skylake-era servers (AVX-512 F/BW) and every AVX2-only CPU.
//!
//! - bf16, widened: the weights stay bf16 in memory (half of f32's traffic) and are widened
//!   to f32 in registers (a shift, or a mask, of each 32-bit lane's pair); activations are not
//!   rounded; products are fused multiply-adds in order of `k`. The result is bitwise the f32
//!   tile's on the bf16-rounded weights.
//! - int8 through 16-bit products: the activation `q` (u8 `q + 128` in the lanes, so `|q| <=
//!   127`) is split into `|q|` and its sign, which goes onto the weight (`vpsignb`, or a masked
//!   negation on AVX-512); `vpmaddubsw` multiplies `|q|` by `±w` and sums pairs into 16 bits
//!   (at most `2 · 127 · 127`, no saturation), `vpmaddwd` by ones sums those into 32 bits, and
//!   `128 Σ w` is added at the end. Every product and sum is exact, so the i32 sums are
//!   bitwise `vpdpbusd`'s.
//!
//! Layouts and register tiles as in the parent module; `x` rows are `2 kg` f32 values
//! (widened bf16) or `kg` u32 lanes (int8).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use std::ops::Range;

use super::{panel_width, prefetch_panel, PackedWeight, TileAcc, BLOCK, MR};

/// Column sub-blocks of `lanes * V` columns, rows in groups of at most `$group` (the largest
/// of `$rows_n`): one row (batch-1 decoding) reads the panel in blocks of 4 vectors, several
/// rows in blocks of `$vmax` vectors (as many accumulators as the registers hold), and the
/// rest one vector at a time.
#[cfg(target_arch = "x86_64")]
macro_rules! by_shape {
    ($f:ident, $x:expr, $w:expr, $rows:expr, $c0:expr, $ks:expr, $xs:expr, $lanes:expr, $vmax:literal, [$($rn:literal),+], $group:literal, $acc:expr, $ahead:expr) => {{
        let pw = panel_width($w.n_pad, $c0 / BLOCK);
        let mut r0 = 0;
        while r0 < $rows {
            let n = ($rows - r0).min($group);
            let x = &$x[r0 * $xs..];
            let out = &mut $acc[r0..];
            let mut sub = 0;
            if n == 1 {
                while sub + 4 * $lanes <= pw {
                    $f::<1, 4>(x, $w, $c0, sub, $ks.clone(), out, $ahead);
                    sub += 4 * $lanes;
                }
            } else {
                while sub + $vmax * $lanes <= pw {
                    match n {
                        $($rn => $f::<$rn, $vmax>(x, $w, $c0, sub, $ks.clone(), out, $ahead),)+
                        _ => unreachable!(),
                    }
                    sub += $vmax * $lanes;
                }
            }
            while sub < pw {
                match n {
                    1 => $f::<1, 1>(x, $w, $c0, sub, $ks.clone(), out, $ahead),
                    $($rn => $f::<$rn, 1>(x, $w, $c0, sub, $ks.clone(), out, $ahead),)+
                    _ => unreachable!(),
                }
                sub += $lanes;
            }
            r0 += n;
        }
    }};
}

/// `p`, through an empty `asm!` block: the same address, which the compiler can no longer
/// prove equal to `p` (so it does not merge loads from the two).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
// The block neither reads nor writes memory: it only hands the pointer back.
#[allow(clippy::pointers_in_nomem_asm_block)]
fn opaque<T>(mut p: *const T) -> *const T {
    // SAFETY: the block is empty; it only claims to read and write the register.
    unsafe { std::arch::asm!("/* {0} */", inout(reg) p, options(pure, nomem, nostack)) };
    p
}

/// bf16 widened, AVX-512: `R` rows, `V` vectors of 16 columns from column `sub` of the panel.
///
/// # Safety
/// AVX-512F and FMA; `x` holds `R` rows of `2 kg` f32 values; `sub + 16 V` <= panel width.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn bf16_avx512<const R: usize, const V: usize>(
    x: &[u32],
    w: &PackedWeight,
    c0: usize,
    sub: usize,
    ks: Range<usize>,
    out: &mut [[u32; BLOCK]],
    ahead: usize,
) {
    let kg = w.kg;
    let pw = panel_width(w.n_pad, c0 / BLOCK);
    let xp = x.as_ptr() as *const f32;
    let mut wp = w.lanes.as_ptr().add(c0 * kg + sub + ks.start * pw);
    let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
    // Exactly `R` rows, so that the sums stay in registers (a zip with a longer slice left
    // them on the stack).
    let out = &mut out[..R];
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for (o, acc) in out.iter().zip(acc.iter_mut()) {
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(o.as_ptr().add(sub + 16 * v) as *const f32);
        }
    }
    for g in ks {
        prefetch_panel(wp, ahead, pw, 16 * V);
        // Even elements of every row first, then odd ones: each accumulator still takes its
        // even product before its odd one, and only `V` widened vectors are live at a time,
        // which leaves registers for 6 rows x 4 vectors of sums. The odd half reads the
        // weights again through an opaque copy of the pointer: left to see the same loads
        // twice, the compiler keeps the raw vectors live across the even half and spills.
        macro_rules! half {
            ($p:expr, $half:literal, $widen:expr) => {
                let mut wv = [_mm512_setzero_ps(); V];
                for (v, wv) in wv.iter_mut().enumerate() {
                    let raw = _mm512_loadu_si512($p.add(16 * v) as *const _);
                    *wv = _mm512_castsi512_ps($widen(raw));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_ps(*xp.add(r * 2 * kg + 2 * g + $half));
                    for (a, &wv) in acc.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(xb, wv, *a);
                    }
                }
            };
        }
        half!(wp, 0, |raw| _mm512_slli_epi32(raw, 16));
        half!(opaque(wp), 1, |raw| _mm512_and_si512(raw, hi));
        wp = wp.add(pw);
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        for (v, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(o.as_mut_ptr().add(sub + 16 * v) as *mut f32, *a);
        }
    }
}

/// bf16 widened, AVX2 (8 columns a vector).
///
/// # Safety
/// AVX2 and FMA; as [`bf16_avx512`] with `sub + 8 V` <= panel width.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_avx2<const R: usize, const V: usize>(
    x: &[u32],
    w: &PackedWeight,
    c0: usize,
    sub: usize,
    ks: Range<usize>,
    out: &mut [[u32; BLOCK]],
    ahead: usize,
) {
    let kg = w.kg;
    let pw = panel_width(w.n_pad, c0 / BLOCK);
    let xp = x.as_ptr() as *const f32;
    let mut wp = w.lanes.as_ptr().add(c0 * kg + sub + ks.start * pw);
    let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
    // Exactly `R` rows, so that the sums stay in registers (a zip with a longer slice left
    // them on the stack).
    let out = &mut out[..R];
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    for (o, acc) in out.iter().zip(acc.iter_mut()) {
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(o.as_ptr().add(sub + 8 * v) as *const f32);
        }
    }
    for g in ks {
        prefetch_panel(wp, ahead, pw, 8 * V);
        // Even elements, then odd ones, as in [`bf16_avx512`]: 6 rows x 2 vectors of sums,
        // 2 widened vectors, a broadcast and the mask fill the 16 ymm registers. Here the
        // plain pointer does better than the opaque one (97 against 37 GFLOP/s on t5-small's
        // encoder shapes, `examples/matmul_speed`): the compiler's schedule differs, not the
        // arithmetic.
        macro_rules! half {
            ($p:expr, $half:literal, $widen:expr) => {
                let mut wv = [_mm256_setzero_ps(); V];
                for (v, wv) in wv.iter_mut().enumerate() {
                    let raw = _mm256_loadu_si256($p.add(8 * v) as *const _);
                    *wv = _mm256_castsi256_ps($widen(raw));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xb = _mm256_set1_ps(*xp.add(r * 2 * kg + 2 * g + $half));
                    for (a, &wv) in acc.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xb, wv, *a);
                    }
                }
            };
        }
        half!(wp, 0, |raw| _mm256_slli_epi32(raw, 16));
        half!(wp, 1, |raw| _mm256_and_si256(raw, hi));
        wp = wp.add(pw);
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        for (v, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.as_mut_ptr().add(sub + 8 * v) as *mut f32, *a);
        }
    }
}

/// Adds `128 Σ w` of each column to the sums `Σ q·w`, giving `Σ (q + 128)·w`: the raw sums of
/// `vpdpbusd` on u8 activations, which the caller's epilogue expects.
#[inline(always)]
fn offset_sums<T: Copy, const R: usize, const V: usize>(
    acc: &mut [[T; V]; R],
    col_sums: impl Fn(usize) -> T,
    add: impl Fn(T, T) -> T,
) {
    for v in 0..V {
        let cs = col_sums(v);
        for acc in acc.iter_mut() {
            acc[v] = add(acc[v], cs);
        }
    }
}

/// int8, AVX-512BW: `vpmaddubsw` on `|q|` (u8) and `±w` (i8, the sign of `q` moved onto the
/// weight), then `vpmaddwd` by ones into i32. Each 16-bit pair sum is at most
/// `2 · 127 · 127 = 32258`, so `vpmaddubsw` never saturates and every sum is exact.
///
/// # Safety
/// AVX-512F and BW; `x` holds `R` rows of `kg` lanes (u8 `q + 128`); `sub + 16 V` <= panel
/// width; weights in [-127, 127].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn int8_avx512bw<const R: usize, const V: usize>(
    x: &[u32],
    w: &PackedWeight,
    c0: usize,
    sub: usize,
    ks: Range<usize>,
    out: &mut [[u32; BLOCK]],
    ahead: usize,
) {
    let kg = w.kg;
    let pw = panel_width(w.n_pad, c0 / BLOCK);
    let xp = x.as_ptr();
    let mut wp = w.lanes.as_ptr().add(c0 * kg + sub + ks.start * pw);
    let (flip, ones, zero) = (
        _mm512_set1_epi8(0x80u8 as i8),
        _mm512_set1_epi16(1),
        _mm512_setzero_si512(),
    );
    // Exactly `R` rows, so that the sums stay in registers (a zip with a longer slice left
    // them on the stack).
    let out = &mut out[..R];
    let mut acc = [[zero; V]; R];
    for (o, acc) in out.iter().zip(acc.iter_mut()) {
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm512_loadu_si512(o.as_ptr().add(sub + 16 * v) as *const _);
        }
    }
    let last_block = ks.end == kg;
    for g in ks {
        prefetch_panel(wp, ahead, pw, 16 * V);
        let mut wv = [zero; V];
        for (v, wv) in wv.iter_mut().enumerate() {
            *wv = _mm512_loadu_si512(wp.add(16 * v) as *const _);
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // q = byte - 128, |q| <= 127.
            let q = _mm512_xor_si512(_mm512_set1_epi32(*xp.add(r * kg + g) as i32), flip);
            let (neg, abs) = (_mm512_movepi8_mask(q), _mm512_abs_epi8(q));
            for (a, &wv) in acc.iter_mut().zip(&wv) {
                let signed = _mm512_mask_sub_epi8(wv, neg, zero, wv);
                let pairs = _mm512_maddubs_epi16(abs, signed);
                *a = _mm512_add_epi32(*a, _mm512_madd_epi16(pairs, ones));
            }
        }
        wp = wp.add(pw);
    }
    let sums = w.col_sums.as_ptr().add(c0 + sub);
    if last_block {
        offset_sums(
            &mut acc,
            |v| _mm512_slli_epi32(_mm512_loadu_si512(sums.add(16 * v) as *const _), 7),
            |a, b| _mm512_add_epi32(a, b),
        );
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        for (v, a) in acc.iter().enumerate() {
            _mm512_storeu_si512(o.as_mut_ptr().add(sub + 16 * v) as *mut _, *a);
        }
    }
}

/// int8, AVX2: as [`int8_avx512bw`], with `vpsignb` moving the sign onto the weights.
///
/// # Safety
/// AVX2; as [`int8_avx512bw`] with `sub + 8 V` <= panel width.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn int8_avx2<const R: usize, const V: usize>(
    x: &[u32],
    w: &PackedWeight,
    c0: usize,
    sub: usize,
    ks: Range<usize>,
    out: &mut [[u32; BLOCK]],
    ahead: usize,
) {
    let kg = w.kg;
    let pw = panel_width(w.n_pad, c0 / BLOCK);
    let xp = x.as_ptr();
    let mut wp = w.lanes.as_ptr().add(c0 * kg + sub + ks.start * pw);
    let (flip, ones) = (_mm256_set1_epi8(0x80u8 as i8), _mm256_set1_epi16(1));
    // Exactly `R` rows, so that the sums stay in registers (a zip with a longer slice left
    // them on the stack).
    let out = &mut out[..R];
    let mut acc = [[_mm256_setzero_si256(); V]; R];
    for (o, acc) in out.iter().zip(acc.iter_mut()) {
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm256_loadu_si256(o.as_ptr().add(sub + 8 * v) as *const _);
        }
    }
    let last_block = ks.end == kg;
    for g in ks {
        prefetch_panel(wp, ahead, pw, 8 * V);
        let mut wv = [_mm256_setzero_si256(); V];
        for (v, wv) in wv.iter_mut().enumerate() {
            *wv = _mm256_loadu_si256(wp.add(8 * v) as *const _);
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let q = _mm256_xor_si256(_mm256_set1_epi32(*xp.add(r * kg + g) as i32), flip);
            let abs = _mm256_abs_epi8(q);
            for (a, &wv) in acc.iter_mut().zip(&wv) {
                let pairs = _mm256_maddubs_epi16(abs, _mm256_sign_epi8(wv, q));
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
            }
        }
        wp = wp.add(pw);
    }
    let sums = w.col_sums.as_ptr().add(c0 + sub);
    if last_block {
        offset_sums(
            &mut acc,
            |v| _mm256_slli_epi32(_mm256_loadu_si256(sums.add(8 * v) as *const _), 7),
            |a, b| _mm256_add_epi32(a, b),
        );
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        for (v, a) in acc.iter().enumerate() {
            _mm256_storeu_si256(o.as_mut_ptr().add(sub + 8 * v) as *mut _, *a);
        }
    }
}

/// Which of these tiles runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum NoDot {
    Bf16Avx512,
    Bf16Avx2,
    Int8Avx512bw,
    Int8Avx2,
}

/// One register tile on `kind`: `rows` (at most [`MR`]) rows of `x`, the panel at `c0`.
///
/// # Safety
/// The CPU must have the instructions `kind` names; `x` holds `rows` rows at the stride the
/// tile reads (`2 kg` f32 values for bf16, `kg` lanes for int8).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile(
    x: &[u32],
    w: &PackedWeight,
    rows: usize,
    c0: usize,
    ks: Range<usize>,
    acc: &mut TileAcc,
    kind: NoDot,
    ahead: usize,
) {
    debug_assert!(rows <= MR);
    match kind {
        NoDot::Bf16Avx512 => {
            by_shape!(
                bf16_avx512,
                x,
                w,
                rows,
                c0,
                ks,
                2 * w.kg,
                16,
                4,
                [2, 3, 4, 5, 6],
                6,
                acc,
                ahead
            )
        }
        NoDot::Bf16Avx2 => {
            by_shape!(
                bf16_avx2,
                x,
                w,
                rows,
                c0,
                ks,
                2 * w.kg,
                8,
                2,
                [2, 3, 4, 5, 6],
                6,
                acc,
                ahead
            )
        }
        NoDot::Int8Avx512bw => {
            by_shape!(
                int8_avx512bw,
                x,
                w,
                rows,
                c0,
                ks,
                w.kg,
                16,
                4,
                [2, 3, 4],
                4,
                acc,
                ahead
            )
        }
        NoDot::Int8Avx2 => {
            by_shape!(
                int8_avx2,
                x,
                w,
                rows,
                c0,
                ks,
                w.kg,
                8,
                2,
                [2, 3, 4],
                4,
                acc,
                ahead
            )
        }
    }
}
