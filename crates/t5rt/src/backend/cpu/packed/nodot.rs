//! Tiles for CPUs without the dot-product instructions (AVX-512 BF16's `vdpbf16ps`, VNNI's
//! `vpdpbusd`): most Skylake-era servers (AVX-512 F/BW) and every AVX2-only CPU.
//!
//! - bf16, widened: the weights stay bf16 in memory (half of f32's traffic) and are widened
//!   to f32 in registers (a shift, or a mask, of each 32-bit lane's pair); activations are not
//!   rounded; products are fused multiply-adds in order of `k`. The result is bitwise the f32
//!   tile's on the bf16-rounded weights.
//! - int8 through 16-bit products, AVX-512BW, and AVX2 for products of at least
//!   [`WIDE_MIN_ROWS`] rows: the weights widened to i16 in registers, the activations `q`
//!   (|q| <= 127) as i16 (widened once per product), `vpmaddwd` summing pairs into i32.
//! - int8 on AVX2 for fewer rows (batch-1 decoding): the activation `q` (u8 `q + 128` in the
//!   lanes, so `|q| <= 127`) is split into `|q|` and its sign, which goes onto the weight
//!   (`vpsignb`); `vpmaddubsw` multiplies `|q|` by `±w` and sums pairs into 16 bits (at most
//!   `2 · 127 · 127`, no saturation), `vpmaddwd` by ones sums those into 32 bits.
//!
//! All add `128 Σ w` at the end. Every product and sum is exact, so the i32 sums are bitwise
//! `vpdpbusd`'s.
//!
//! Layouts and register tiles as in the parent module; `x` rows are `2 kg` f32 values
//! (widened bf16), `2 kg` u32 holding 4 i16 per lane (int8 through 16-bit products) or `kg`
//! u32 lanes (int8, AVX2, fewer rows).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use super::{panel_width, Ahead, PackedWeight, TileAcc, BLOCK, MR};

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

/// One row's step in the widened bf16 walks in assembly: the row's value at `[$base $off]`
/// broadcast into `$b`, then one multiply-add into each sum register `$a` with its weight
/// register `$w`.
#[cfg(target_arch = "x86_64")]
macro_rules! bf16_row {
    ($b:literal, $base:literal, $off:tt, $($a:literal * $w:literal),+) => {
        concat!(
            "vbroadcastss {", $b, "}, dword ptr [", $base, $off, "]\n",
            $("vfmadd231ps {", $a, "}, {", $b, "}, {", $w, "}\n",)+
        )
    };
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
    ahead: Ahead,
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
    let from = ks.start;
    // Whether the walks in assembly ask for their own panel's lines (else the next panel's).
    let lines = matches!(ahead, Ahead::Rows(_));
    if let (12, 2, false) = (R, V, ks.is_empty()) {
        // The twelve-row tile's walk in assembly.
        let acc12 = &mut *(acc.as_mut_ptr() as *mut [[__m512; 2]; 12]);
        bf16_avx512_walk12(
            xp.add(2 * from),
            kg,
            wp,
            pw,
            ks.len(),
            ahead.plan(wp, pw),
            lines,
            acc12,
        );
    } else if let (6, 4, false) = (R, V, ks.is_empty()) {
        // The full tile's walk in assembly.
        let acc6 = &mut *(acc.as_mut_ptr() as *mut [[__m512; 4]; 6]);
        bf16_avx512_walk6(
            xp.add(2 * from),
            kg,
            wp,
            pw,
            ks.len(),
            ahead.plan(wp, pw),
            lines,
            acc6,
        );
    } else {
        for g in ks {
            ahead.fetch(wp, pw, 16 * V, g - from);
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
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        for (v, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(o.as_mut_ptr().add(sub + 16 * v) as *mut f32, *a);
        }
    }
}

/// [`bf16_avx512`]'s full tile (6 rows, 4 vectors of 16 columns) over `steps` steps of `k`, in
/// assembly: the same widening (a shift for the even values, a mask for the odd ones) and the
/// same fused multiply-adds in the same order, so the same sums bit for bit, with no scalar
/// work in the loop but its three pointers and count (the compiled walk recomputed row
/// addresses, whose instructions can take the ports of the multiply-adds), and the weights
/// widened straight from memory. On the 2-core Emerald Rapids Xeon, t5-base case d bf16
/// (`t5rt bench`, 4 alternating pairs) ran at 292-333 against 271-294 tokens/s, faster in
/// every pair (encoder 2.97-3.28 against 3.25-3.58 s; the decoding steps' 32-row products
/// take it too); one thread on encoder shapes, ahead in 9 of 12 alternating
/// `examples/matmul_speed` runs (4096 x 768 x 768: 126-133 against 110-128 GFLOP/s).
///
/// `x`: the first row's values at the first step (rows `2 kg` f32 apart); `wp`, `pw`: the panel
/// row and its width in lanes; `(pf, pf_step)`: the prefetch plan ([`Ahead::plan`]). With
/// `lines` ([`Ahead::Rows`]) each step asks for the four lines of the panel row at the plan's
/// distance (the row it reads when that is 0, as [`bf16_avx2_walk6`] does, where the compiled
/// walk asked for nothing); without ([`Ahead::Next`]) for the one line of the next panel the
/// plan names, four times over (three redundant requests a step, kept for one loop body);
/// `acc`: the sums, in and out.
///
/// # Safety
/// AVX-512F; six rows `2 kg` f32 apart, each `2 steps` f32 from `x`; `steps` panel rows of 64
/// lanes from `wp`; `steps` > 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn bf16_avx512_walk6(
    x: *const f32,
    kg: usize,
    wp: *const u32,
    pw: usize,
    steps: usize,
    (pf, pf_step): (*const u32, usize),
    lines: bool,
    acc: &mut [[__m512; 4]; 6],
) {
    let mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let [[mut a00, mut a01, mut a02, mut a03], [mut a10, mut a11, mut a12, mut a13], [mut a20, mut a21, mut a22, mut a23], [mut a30, mut a31, mut a32, mut a33], [mut a40, mut a41, mut a42, mut a43], [mut a50, mut a51, mut a52, mut a53]] =
        *acc;
    let s = kg * 8;
    let o = if lines { 64usize } else { 0 };
    macro_rules! row {
        ($b:literal, $base:literal, $off:tt, $a0:literal, $a1:literal, $a2:literal, $a3:literal) => {
            bf16_row!(
                $b,
                $base,
                $off,
                $a0 * "w0",
                $a1 * "w1",
                $a2 * "w2",
                $a3 * "w3"
            )
        };
    }
    macro_rules! rows {
        ($off:literal) => {
            concat!(
                row!("b", "{x}", $off, "a00", "a01", "a02", "a03"),
                row!("c", "{x} + {s}", $off, "a10", "a11", "a12", "a13"),
                row!("b", "{x} + {s}*2", $off, "a20", "a21", "a22", "a23"),
                row!("c", "{x} + {s3}", $off, "a30", "a31", "a32", "a33"),
                row!("b", "{x} + {s}*4", $off, "a40", "a41", "a42", "a43"),
                row!("c", "{x} + {s5}", $off, "a50", "a51", "a52", "a53"),
            )
        };
    }
    // SAFETY: the caller's: every address read is inside the rows and panel rows it names
    // (prefetches never fault).
    std::arch::asm!(
        "2:",
        "prefetcht0 [{pf}]",
        "prefetcht0 [{pf} + {o}]",
        "prefetcht0 [{pf} + {o}*2]",
        "prefetcht0 [{pf} + {o3}]",
        "vpslld {w0}, zmmword ptr [{wp}], 16",
        "vpslld {w1}, zmmword ptr [{wp} + 64], 16",
        "vpslld {w2}, zmmword ptr [{wp} + 128], 16",
        "vpslld {w3}, zmmword ptr [{wp} + 192], 16",
        rows!(""),
        "vpandd {w0}, {m}, zmmword ptr [{wp}]",
        "vpandd {w1}, {m}, zmmword ptr [{wp} + 64]",
        "vpandd {w2}, {m}, zmmword ptr [{wp} + 128]",
        "vpandd {w3}, {m}, zmmword ptr [{wp} + 192]",
        rows!(" + 4"),
        "add {wp}, {pwb}",
        "add {pf}, {pfb}",
        "add {x}, 8",
        "dec {n}",
        "jnz 2b",
        x = inout(reg) x => _,
        wp = inout(reg) wp => _,
        pf = inout(reg) pf => _,
        n = inout(reg) steps => _,
        s = in(reg) s,
        s3 = in(reg) 3 * s,
        s5 = in(reg) 5 * s,
        o = in(reg) o,
        o3 = in(reg) 3 * o,
        pwb = in(reg) pw * 4,
        pfb = in(reg) pf_step * 4,
        m = in(zmm_reg) mask,
        w0 = out(zmm_reg) _,
        w1 = out(zmm_reg) _,
        w2 = out(zmm_reg) _,
        w3 = out(zmm_reg) _,
        b = out(zmm_reg) _,
        c = out(zmm_reg) _,
        a00 = inout(zmm_reg) a00,
        a01 = inout(zmm_reg) a01,
        a02 = inout(zmm_reg) a02,
        a03 = inout(zmm_reg) a03,
        a10 = inout(zmm_reg) a10,
        a11 = inout(zmm_reg) a11,
        a12 = inout(zmm_reg) a12,
        a13 = inout(zmm_reg) a13,
        a20 = inout(zmm_reg) a20,
        a21 = inout(zmm_reg) a21,
        a22 = inout(zmm_reg) a22,
        a23 = inout(zmm_reg) a23,
        a30 = inout(zmm_reg) a30,
        a31 = inout(zmm_reg) a31,
        a32 = inout(zmm_reg) a32,
        a33 = inout(zmm_reg) a33,
        a40 = inout(zmm_reg) a40,
        a41 = inout(zmm_reg) a41,
        a42 = inout(zmm_reg) a42,
        a43 = inout(zmm_reg) a43,
        a50 = inout(zmm_reg) a50,
        a51 = inout(zmm_reg) a51,
        a52 = inout(zmm_reg) a52,
        a53 = inout(zmm_reg) a53,
        options(nostack, readonly),
    );
    *acc = [
        [a00, a01, a02, a03],
        [a10, a11, a12, a13],
        [a20, a21, a22, a23],
        [a30, a31, a32, a33],
        [a40, a41, a42, a43],
        [a50, a51, a52, a53],
    ];
}

/// The twelve-row tile of [`bf16_avx512`] (12 rows, 2 vectors of 16 columns) over `steps` steps
/// of `k`, in assembly: as [`bf16_avx512_walk6`] (the same widening, multiply-adds and order, so
/// the same sums bit for bit), with half as many weight vectors per row of sums. Widening takes
/// the multiply-adds' ports (a shift and a mask per vector of weights on Intel's cores): per step
/// the 6 x 4 tile issues 8 of them beside 48 multiply-adds, this one 4, which lifts the ceiling
/// from 48/56 to 48/52 of the multiply-add rate (`bench/ceilings/bf16_widen_tiles.c`: 160-161
/// GFLOP/s against the 6 x 4 tile's 149-150 on one core of the Emerald Rapids Xeon). Each pass
/// reads 32 columns of the panel, and each weight line serves 12 rows instead of 6.
///
/// `x`, `kg`, `wp`, `pw`, the prefetch plan and `lines` as [`bf16_avx512_walk6`]'s, with two
/// lines a step (the 32 lanes it reads) when `lines`; `acc`: the sums, in and out.
///
/// # Safety
/// AVX-512F; twelve rows `2 kg` f32 apart, each `2 steps` f32 from `x`; `steps` panel rows of
/// 32 lanes from `wp`; `steps` > 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn bf16_avx512_walk12(
    x: *const f32,
    kg: usize,
    wp: *const u32,
    pw: usize,
    steps: usize,
    (pf, pf_step): (*const u32, usize),
    lines: bool,
    acc: &mut [[__m512; 2]; 12],
) {
    let mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let [[mut a00, mut a01], [mut a10, mut a11], [mut a20, mut a21], [mut a30, mut a31], [mut a40, mut a41], [mut a50, mut a51], [mut a60, mut a61], [mut a70, mut a71], [mut a80, mut a81], [mut a90, mut a91], [mut aa0, mut aa1], [mut ab0, mut ab1]] =
        *acc;
    let s = kg * 8;
    let o = if lines { 64usize } else { 0 };
    macro_rules! row {
        ($b:literal, $base:literal, $off:tt, $a0:literal, $a1:literal) => {
            bf16_row!($b, $base, $off, $a0 * "w0", $a1 * "w1")
        };
    }
    macro_rules! rows {
        ($off:literal) => {
            concat!(
                row!("b", "{x}", $off, "a00", "a01"),
                row!("c", "{x} + {s}", $off, "a10", "a11"),
                row!("b", "{x} + {s}*2", $off, "a20", "a21"),
                row!("c", "{x} + {s3}", $off, "a30", "a31"),
                row!("b", "{x} + {s}*4", $off, "a40", "a41"),
                row!("c", "{x} + {s5}", $off, "a50", "a51"),
                row!("b", "{y}", $off, "a60", "a61"),
                row!("c", "{y} + {s}", $off, "a70", "a71"),
                row!("b", "{y} + {s}*2", $off, "a80", "a81"),
                row!("c", "{y} + {s3}", $off, "a90", "a91"),
                row!("b", "{y} + {s}*4", $off, "aa0", "aa1"),
                row!("c", "{y} + {s5}", $off, "ab0", "ab1"),
            )
        };
    }
    // SAFETY: the caller's: every address read is inside the rows and panel rows it names
    // (prefetches never fault).
    std::arch::asm!(
        "2:",
        "prefetcht0 [{pf}]",
        "prefetcht0 [{pf} + {o}]",
        "vpslld {w0}, zmmword ptr [{wp}], 16",
        "vpslld {w1}, zmmword ptr [{wp} + 64], 16",
        rows!(""),
        "vpandd {w0}, {m}, zmmword ptr [{wp}]",
        "vpandd {w1}, {m}, zmmword ptr [{wp} + 64]",
        rows!(" + 4"),
        "add {wp}, {pwb}",
        "add {pf}, {pfb}",
        "add {x}, 8",
        "add {y}, 8",
        "dec {n}",
        "jnz 2b",
        x = inout(reg) x => _,
        y = inout(reg) x.add(6 * 2 * kg) => _,
        wp = inout(reg) wp => _,
        pf = inout(reg) pf => _,
        n = inout(reg) steps => _,
        s = in(reg) s,
        s3 = in(reg) 3 * s,
        s5 = in(reg) 5 * s,
        o = in(reg) o,
        pwb = in(reg) pw * 4,
        pfb = in(reg) pf_step * 4,
        m = in(zmm_reg) mask,
        w0 = out(zmm_reg) _,
        w1 = out(zmm_reg) _,
        b = out(zmm_reg) _,
        c = out(zmm_reg) _,
        a00 = inout(zmm_reg) a00,
        a01 = inout(zmm_reg) a01,
        a10 = inout(zmm_reg) a10,
        a11 = inout(zmm_reg) a11,
        a20 = inout(zmm_reg) a20,
        a21 = inout(zmm_reg) a21,
        a30 = inout(zmm_reg) a30,
        a31 = inout(zmm_reg) a31,
        a40 = inout(zmm_reg) a40,
        a41 = inout(zmm_reg) a41,
        a50 = inout(zmm_reg) a50,
        a51 = inout(zmm_reg) a51,
        a60 = inout(zmm_reg) a60,
        a61 = inout(zmm_reg) a61,
        a70 = inout(zmm_reg) a70,
        a71 = inout(zmm_reg) a71,
        a80 = inout(zmm_reg) a80,
        a81 = inout(zmm_reg) a81,
        a90 = inout(zmm_reg) a90,
        a91 = inout(zmm_reg) a91,
        aa0 = inout(zmm_reg) aa0,
        aa1 = inout(zmm_reg) aa1,
        ab0 = inout(zmm_reg) ab0,
        ab1 = inout(zmm_reg) ab1,
        options(nostack, readonly),
    );
    *acc = [
        [a00, a01],
        [a10, a11],
        [a20, a21],
        [a30, a31],
        [a40, a41],
        [a50, a51],
        [a60, a61],
        [a70, a71],
        [a80, a81],
        [a90, a91],
        [aa0, aa1],
        [ab0, ab1],
    ];
}

/// Widened bf16 at AVX-512 for 7 to [`WIDE_BF16_ROWS`] rows at once: the panel in blocks of 2
/// vectors (32 columns), each walked down `k` for all the rows ([`bf16_avx512_walk12`] for 12),
/// then a last block of one vector where the panel's width is an odd multiple of 16. Results equal
/// [`tile`]'s for the same rows taken six at a time (each sum's products in the same order).
/// `ahead`: as [`tile`]'s, [`Ahead::Rows`] (the caller never asks for the next panel here).
///
/// # Safety
/// AVX-512F and FMA; `x` holds `rows` rows of `2 kg` f32 values; `acc` at least `rows` rows.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn bf16_avx512_rows(
    x: &[u32],
    w: &PackedWeight,
    rows: usize,
    c0: usize,
    ks: Range<usize>,
    acc: &mut [[u32; BLOCK]],
    ahead: Ahead,
) {
    debug_assert!((MR + 1..=WIDE_BF16_ROWS).contains(&rows) && acc.len() >= rows);
    let pw = panel_width(w.n_pad, c0 / BLOCK);
    let mut sub = 0;
    while sub < pw {
        let v = if sub + 32 <= pw { 2 } else { 1 };
        macro_rules! shape {
            ($($r:literal),+) => {
                match (rows, v) {
                    $(($r, 2) => bf16_avx512::<$r, 2>(x, w, c0, sub, ks.clone(), acc, ahead),
                      ($r, _) => bf16_avx512::<$r, 1>(x, w, c0, sub, ks.clone(), acc, ahead),)+
                    _ => unreachable!(),
                }
            };
        }
        shape!(7, 8, 9, 10, 11, 12);
        sub += 16 * v;
    }
}

/// The most rows `bf16_avx512_rows` takes at once: two tiles of [`super::MR`].
pub(super) const WIDE_BF16_ROWS: usize = 2 * super::MR;

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
    ahead: Ahead,
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
    let from = ks.start;
    if let (6, 2, false) = (R, V, ks.is_empty()) {
        // The full tile's walk in assembly.
        let acc6 = &mut *(acc.as_mut_ptr() as *mut [[__m256; 2]; 6]);
        bf16_avx2_walk6(
            xp.add(2 * from),
            kg,
            wp,
            pw,
            ks.len(),
            ahead.plan(wp, pw),
            acc6,
        );
    } else {
        for g in ks {
            ahead.fetch(wp, pw, 8 * V, g - from);
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
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        for (v, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.as_mut_ptr().add(sub + 8 * v) as *mut f32, *a);
        }
    }
}

/// [`bf16_avx2`]'s full tile (6 rows, 2 vectors of 8 columns) over `steps` steps of `k`, in
/// assembly: the same widening (a shift for the even values, a mask for the odd ones) and the
/// same fused multiply-adds in the same order, so the same sums bit for bit; the mask is read
/// from memory and two broadcasts alternate, so that two rows' products are in flight in the 16
/// ymm registers (the compiled walk keeps one). `x`: the first row's values at the first step
/// (rows `2 kg` f32 apart); `wp`, `pw`, the prefetch plan: as the int8 walks' (`int8_walk6`);
/// `acc`: the sums, in and out.
///
/// # Safety
/// AVX2 and FMA; six rows of `2 steps` f32 from `x`; `steps` panel rows of 16 lanes from `wp`;
/// `steps` > 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_avx2_walk6(
    x: *const f32,
    kg: usize,
    wp: *const u32,
    pw: usize,
    steps: usize,
    (pf, pf_step): (*const u32, usize),
    acc: &mut [[__m256; 2]; 6],
) {
    let mask = [0xffff_0000u32; 8];
    let [[mut a00, mut a01], [mut a10, mut a11], [mut a20, mut a21], [mut a30, mut a31], [mut a40, mut a41], [mut a50, mut a51]] =
        *acc;
    let s = kg * 8;
    // SAFETY: the caller's: every address read is inside the rows and panel rows it names
    // (prefetches never fault); `mask` is 32 bytes.
    std::arch::asm!(
        "2:",
        "prefetcht0 [{pf}]",
        "vmovdqu {w0}, ymmword ptr [{wp}]",
        "vmovdqu {w1}, ymmword ptr [{wp} + 32]",
        "vpslld {w0}, {w0}, 16",
        "vpslld {w1}, {w1}, 16",
        "vbroadcastss {b}, dword ptr [{x}]",
        "vbroadcastss {c}, dword ptr [{x} + {s}]",
        "vfmadd231ps {a00}, {b}, {w0}",
        "vfmadd231ps {a01}, {b}, {w1}",
        "vbroadcastss {b}, dword ptr [{x} + {s}*2]",
        "vfmadd231ps {a10}, {c}, {w0}",
        "vfmadd231ps {a11}, {c}, {w1}",
        "vbroadcastss {c}, dword ptr [{x} + {s3}]",
        "vfmadd231ps {a20}, {b}, {w0}",
        "vfmadd231ps {a21}, {b}, {w1}",
        "vbroadcastss {b}, dword ptr [{x} + {s}*4]",
        "vfmadd231ps {a30}, {c}, {w0}",
        "vfmadd231ps {a31}, {c}, {w1}",
        "vbroadcastss {c}, dword ptr [{x} + {s5}]",
        "vfmadd231ps {a40}, {b}, {w0}",
        "vfmadd231ps {a41}, {b}, {w1}",
        "vfmadd231ps {a50}, {c}, {w0}",
        "vfmadd231ps {a51}, {c}, {w1}",
        "vmovdqu {w0}, ymmword ptr [{wp}]",
        "vpand {w0}, {w0}, ymmword ptr [{m}]",
        "vmovdqu {w1}, ymmword ptr [{wp} + 32]",
        "vpand {w1}, {w1}, ymmword ptr [{m}]",
        "vbroadcastss {b}, dword ptr [{x} + 4]",
        "vbroadcastss {c}, dword ptr [{x} + {s} + 4]",
        "vfmadd231ps {a00}, {b}, {w0}",
        "vfmadd231ps {a01}, {b}, {w1}",
        "vbroadcastss {b}, dword ptr [{x} + {s}*2 + 4]",
        "vfmadd231ps {a10}, {c}, {w0}",
        "vfmadd231ps {a11}, {c}, {w1}",
        "vbroadcastss {c}, dword ptr [{x} + {s3} + 4]",
        "vfmadd231ps {a20}, {b}, {w0}",
        "vfmadd231ps {a21}, {b}, {w1}",
        "vbroadcastss {b}, dword ptr [{x} + {s}*4 + 4]",
        "vfmadd231ps {a30}, {c}, {w0}",
        "vfmadd231ps {a31}, {c}, {w1}",
        "vbroadcastss {c}, dword ptr [{x} + {s5} + 4]",
        "vfmadd231ps {a40}, {b}, {w0}",
        "vfmadd231ps {a41}, {b}, {w1}",
        "vfmadd231ps {a50}, {c}, {w0}",
        "vfmadd231ps {a51}, {c}, {w1}",
        "add {wp}, {pwb}",
        "add {pf}, {pfb}",
        "add {x}, 8",
        "dec {n}",
        "jnz 2b",
        x = inout(reg) x => _,
        wp = inout(reg) wp => _,
        pf = inout(reg) pf => _,
        n = inout(reg) steps => _,
        m = in(reg) mask.as_ptr(),
        s = in(reg) s,
        s3 = in(reg) 3 * s,
        s5 = in(reg) 5 * s,
        pwb = in(reg) pw * 4,
        pfb = in(reg) pf_step * 4,
        w0 = out(ymm_reg) _,
        w1 = out(ymm_reg) _,
        b = out(ymm_reg) _,
        c = out(ymm_reg) _,
        a00 = inout(ymm_reg) a00,
        a01 = inout(ymm_reg) a01,
        a10 = inout(ymm_reg) a10,
        a11 = inout(ymm_reg) a11,
        a20 = inout(ymm_reg) a20,
        a21 = inout(ymm_reg) a21,
        a30 = inout(ymm_reg) a30,
        a31 = inout(ymm_reg) a31,
        a40 = inout(ymm_reg) a40,
        a41 = inout(ymm_reg) a41,
        a50 = inout(ymm_reg) a50,
        a51 = inout(ymm_reg) a51,
        options(nostack, readonly),
    );
    *acc = [
        [a00, a01],
        [a10, a11],
        [a20, a21],
        [a30, a31],
        [a40, a41],
        [a50, a51],
    ];
}

/// Adds `128 Σ w` of each column to the sums `Σ q·w`, giving `Σ (q + 128)·w`: the raw sums of
/// `vpdpbusd` on u8 activations, which the caller's epilogue expects.
#[cfg(target_arch = "x86_64")]
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

/// The 16-bit int8 tiles' walks in assembly: a full tile (6 rows, one vector of columns) over
/// `steps` steps of `k`, `(x, kg, wp, pw, steps, (pf, pf_step))` with `x` the first row's
/// activations at the first step (rows `kg` i64 lanes apart), `wp` the panel row of that step (rows `pw` lanes apart),
/// and the prefetch address of the first step and its advance per step, in u32 lanes. Returns
/// the six rows' sums of the first and second half of the columns, as the generic walk makes
/// them. The same instructions as that walk (so the same sums, bit for bit), in an order the
/// compiler's does not give (each walk says which). The `avx512bw` one, one core, in registers
/// (`bench/ceilings`-style loop over a 60-row task): 178-190 G operations/s against the
/// compiled walk's 148-171 and GCC's 179-192 for the same C.
///
/// This macro is their frame: the arguments, the twelve sums in registers of class `$class`
/// (zeros of type `$v` at the start), the row offsets `s`, `3 s` and `5 s` of the six
/// activation rows (`s`: a row's bytes), the pointers advanced by the template, and the two
/// widened weight vectors `wl` and `wh`; `$temps` are the template's own registers.
#[cfg(target_arch = "x86_64")]
macro_rules! int8_walk6 {
    ($(#[$doc:meta])* $name:ident, $feat:literal, $v:ty, $zero:expr, $class:ident,
     [$($line:literal,)+], $($temps:ident),+) => {
        $(#[$doc])*
        #[target_feature(enable = $feat)]
        unsafe fn $name(
            x: *const i64,
            kg: usize,
            wp: *const u32,
            pw: usize,
            steps: usize,
            (pf, pf_step): (*const u32, usize),
        ) -> ([$v; 6], [$v; 6]) {
            let z: $v = $zero;
            let (mut l0, mut l1, mut l2, mut l3, mut l4, mut l5) = (z, z, z, z, z, z);
            let (mut h0, mut h1, mut h2, mut h3, mut h4, mut h5) = (z, z, z, z, z, z);
            let s = kg * 8;
            // SAFETY: the caller's: every address read is inside the rows and panel rows it
            // names (prefetches never fault).
            std::arch::asm!(
                $($line,)+
                x = inout(reg) x => _,
                wp = inout(reg) wp => _,
                pf = inout(reg) pf => _,
                n = inout(reg) steps => _,
                s = in(reg) s,
                s3 = in(reg) 3 * s,
                s5 = in(reg) 5 * s,
                pwb = in(reg) pw * 4,
                pfb = in(reg) pf_step * 4,
                wl = out($class) _,
                wh = out($class) _,
                $($temps = out($class) _,)+
                l0 = inout($class) l0,
                l1 = inout($class) l1,
                l2 = inout($class) l2,
                l3 = inout($class) l3,
                l4 = inout($class) l4,
                l5 = inout($class) l5,
                h0 = inout($class) h0,
                h1 = inout($class) h1,
                h2 = inout($class) h2,
                h3 = inout($class) h3,
                h4 = inout($class) h4,
                h5 = inout($class) h5,
                options(nostack, readonly),
            );
            ([l0, l1, l2, l3, l4, l5], [h0, h1, h2, h3, h4, h5])
        }
    };
}

#[cfg(target_arch = "x86_64")]
int8_walk6!(
    /// The walk in assembly of [`int8_avx512bw`]: three broadcasts issued before their products, two
    /// rows' products in flight.
    ///
    /// # Safety
    /// AVX-512F and BW; six rows of `steps` i64 lanes from `x` (rows `kg` lanes apart); `steps`
    /// panel rows of 16 lanes from `wp` (rows `pw` lanes apart); `steps` > 0.
    int8_avx512bw_walk6,
    "avx512f,avx512bw",
    __m512i,
    _mm512_setzero_si512(),
    zmm_reg,
    [
        "2:",
        "vpbroadcastq {b0}, qword ptr [{x}]",
        "vpbroadcastq {b1}, qword ptr [{x} + {s}]",
        "prefetcht0 [{pf}]",
        "vpmovsxbw {wl}, ymmword ptr [{wp}]",
        "vpbroadcastq {b2}, qword ptr [{x} + {s}*2]",
        "vpmovsxbw {wh}, ymmword ptr [{wp} + 32]",
        "add {wp}, {pwb}",
        "add {pf}, {pfb}",
        "vpmaddwd {t0}, {b0}, {wl}",
        "vpmaddwd {t1}, {b1}, {wl}",
        "vpmaddwd {b0}, {b0}, {wh}",
        "vpmaddwd {b1}, {b1}, {wh}",
        "vpaddd {l0}, {l0}, {t0}",
        "vpaddd {l1}, {l1}, {t1}",
        "vpaddd {h0}, {h0}, {b0}",
        "vpaddd {h1}, {h1}, {b1}",
        "vpbroadcastq {b0}, qword ptr [{x} + {s3}]",
        "vpbroadcastq {b1}, qword ptr [{x} + {s}*4]",
        "vpmaddwd {t0}, {b2}, {wl}",
        "vpmaddwd {b2}, {b2}, {wh}",
        "vpaddd {l2}, {l2}, {t0}",
        "vpaddd {h2}, {h2}, {b2}",
        "vpbroadcastq {b2}, qword ptr [{x} + {s5}]",
        "add {x}, 8",
        "vpmaddwd {t0}, {b0}, {wl}",
        "vpmaddwd {t1}, {b1}, {wl}",
        "vpmaddwd {b0}, {b0}, {wh}",
        "vpmaddwd {b1}, {b1}, {wh}",
        "vpaddd {l3}, {l3}, {t0}",
        "vpaddd {l4}, {l4}, {t1}",
        "vpaddd {h3}, {h3}, {b0}",
        "vpaddd {h4}, {h4}, {b1}",
        "vpmaddwd {t0}, {b2}, {wl}",
        "vpmaddwd {b2}, {b2}, {wh}",
        "vpaddd {l5}, {l5}, {t0}",
        "vpaddd {h5}, {h5}, {b2}",
        "dec {n}",
        "jnz 2b",
    ],
    b0,
    b1,
    b2,
    t0,
    t1
);

#[cfg(target_arch = "x86_64")]
int8_walk6!(
    /// The walk in assembly of [`int8_avx2_wide`]: the sixteen ymm registers hold the 12 sums, the two
    /// widened weight vectors, a broadcast and a product, so the rows go one after another.
    ///
    /// # Safety
    /// AVX2; as [`int8_avx512bw_walk6`], panel rows of 8 lanes.
    int8_avx2_walk6,
    "avx2",
    __m256i,
    _mm256_setzero_si256(),
    ymm_reg,
    [
        "2:",
        "vpmovsxbw {wl}, xmmword ptr [{wp}]",
        "vpmovsxbw {wh}, xmmword ptr [{wp} + 16]",
        "prefetcht0 [{pf}]",
        "add {wp}, {pwb}",
        "add {pf}, {pfb}",
        "vpbroadcastq {b}, qword ptr [{x}]",
        "vpmaddwd {t}, {b}, {wl}",
        "vpmaddwd {b}, {b}, {wh}",
        "vpaddd {l0}, {l0}, {t}",
        "vpaddd {h0}, {h0}, {b}",
        "vpbroadcastq {b}, qword ptr [{x} + {s}]",
        "vpmaddwd {t}, {b}, {wl}",
        "vpmaddwd {b}, {b}, {wh}",
        "vpaddd {l1}, {l1}, {t}",
        "vpaddd {h1}, {h1}, {b}",
        "vpbroadcastq {b}, qword ptr [{x} + {s}*2]",
        "vpmaddwd {t}, {b}, {wl}",
        "vpmaddwd {b}, {b}, {wh}",
        "vpaddd {l2}, {l2}, {t}",
        "vpaddd {h2}, {h2}, {b}",
        "vpbroadcastq {b}, qword ptr [{x} + {s3}]",
        "vpmaddwd {t}, {b}, {wl}",
        "vpmaddwd {b}, {b}, {wh}",
        "vpaddd {l3}, {l3}, {t}",
        "vpaddd {h3}, {h3}, {b}",
        "vpbroadcastq {b}, qword ptr [{x} + {s}*4]",
        "vpmaddwd {t}, {b}, {wl}",
        "vpmaddwd {b}, {b}, {wh}",
        "vpaddd {l4}, {l4}, {t}",
        "vpaddd {h4}, {h4}, {b}",
        "vpbroadcastq {b}, qword ptr [{x} + {s5}]",
        "add {x}, 8",
        "vpmaddwd {t}, {b}, {wl}",
        "vpmaddwd {b}, {b}, {wh}",
        "vpaddd {l5}, {l5}, {t}",
        "vpaddd {h5}, {h5}, {b}",
        "dec {n}",
        "jnz 2b",
    ],
    b,
    t
);

/// The int8 tiles through 16-bit products, in `$lanes`-column vectors of type `$v`: each
/// vector of weights (`$lanes` columns x 4 values of `k`) widened to two vectors of i16
/// (`$widen`: the first and second half of the columns), the activations `q` broadcast 64
/// bits at a time, `$madd` (`vpmaddwd`) summing each pair into i32 lanes, two per column,
/// which `$combine` adds together at the end. Exact, so the sums are bitwise `vpdpbusd`'s.
#[cfg(target_arch = "x86_64")]
macro_rules! int8_wide_tile {
    ($(#[$doc:meta])* $name:ident, $feat:literal, $lanes:literal, $v:ty, $zero:expr,
     $widen:expr, $set1:ident, $madd:ident, $add:ident, $combine:expr, $load:ident,
     $store:ident, $slli:ident, $walk6:ident) => {
        $(#[$doc])*
        #[target_feature(enable = $feat)]
        unsafe fn $name<const R: usize, const V: usize>(
            x: &[u32],
            w: &PackedWeight,
            c0: usize,
            sub: usize,
            ks: Range<usize>,
            out: &mut [[u32; BLOCK]],
            ahead: Ahead,
        ) {
            let kg = w.kg;
            let pw = panel_width(w.n_pad, c0 / BLOCK);
            let xp = x.as_ptr() as *const i64;
            let mut wp = w.lanes.as_ptr().add(c0 * kg + sub + ks.start * pw);
            let zero: $v = $zero;
            // Exactly `R` rows, so that the sums stay in registers.
            let out = &mut out[..R];
            let (mut lo, mut hi) = ([[zero; V]; R], [[zero; V]; R]);
            let last_block = ks.end == kg;
            let from = ks.start;
            if let (6, 1, false) = (R, V, ks.is_empty()) {
                // The full tile's walk in assembly (see `int8_walk6`).
                let (l, h) = $walk6(xp.add(from), kg, wp, pw, ks.len(), ahead.plan(wp, pw));
                for r in 0..R {
                    (lo[r][0], hi[r][0]) = (l[r], h[r]);
                }
            } else {
                for g in ks {
                    ahead.fetch(wp, pw, $lanes * V, g - from);
                    let (mut wl, mut wh) = ([zero; V], [zero; V]);
                    for v in 0..V {
                        (wl[v], wh[v]) = $widen(wp.add($lanes * v));
                    }
                    for r in 0..R {
                        let xb = $set1(*xp.add(r * kg + g));
                        for v in 0..V {
                            lo[r][v] = $add(lo[r][v], $madd(xb, wl[v]));
                            hi[r][v] = $add(hi[r][v], $madd(xb, wh[v]));
                        }
                    }
                    wp = wp.add(pw);
                }
            }
            let combine = $combine;
            let mut acc = [[zero; V]; R];
            for r in 0..R {
                for v in 0..V {
                    acc[r][v] = combine(lo[r][v], hi[r][v]);
                }
            }
            let sums = w.col_sums.as_ptr().add(c0 + sub);
            if last_block {
                offset_sums(
                    &mut acc,
                    |v| $slli::<7>($load(sums.add($lanes * v) as *const _)),
                    |a, b| $add(a, b),
                );
            }
            for (o, acc) in out.iter_mut().zip(&acc) {
                for (v, a) in acc.iter().enumerate() {
                    let o = o.as_mut_ptr().add(sub + $lanes * v) as *mut $v;
                    $store(o, $add($load(o), *a));
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
int8_wide_tile!(
    /// int8, AVX-512BW, through 16-bit products: each weight vector (16 columns x 4 values of `k`)
    /// widened to two vectors of i16 (`vpmovsxbw`: columns 0-7 and 8-15, each column's 4 values
    /// as two i16 pairs), the activations `q` (`x` rows of `kg` i64 lanes: 4 i16 each, from
    /// [`widen_activations`]) broadcast 64 bits at a time, and `vpmaddwd` summing each pair into
    /// i32: every column's sum is spread over two i32 lanes (its values 0-1 and 2-3 of each group),
    /// added together at the end. Per 64 multiply-adds and row: two `vpmaddwd` and two adds,
    /// where the sign moves, `vpmaddubsw` and `vpmaddwd` by ones of [`int8_avx2`]'s scheme took
    /// four in zmm registers (that scheme's AVX-512 tile, replaced by this one in session 12:
    /// products 1.2x to 1.3x faster, `examples/matmul_speed`, `bench/RESULTS.md`). Products and sums are
    /// exact, so the i32 sums are bitwise `vpdpbusd`'s. One vector of 16 columns a tile (half the
    /// widening per row of two, which ran slower in registers), and the full tile of 6 rows walks
    /// `k` in assembly ([`int8_avx512bw_walk6`]): the compiled walk of the same instructions
    /// reached 75-85% of its speed.
    ///
    /// # Safety
    /// AVX-512F and BW; `x` holds `R` rows of `2 kg` u32 (the i16 activations); `sub + 16 V` <=
    /// panel width.
    int8_avx512bw,
    "avx512f,avx512bw",
    16,
    __m512i,
    _mm512_setzero_si512(),
    |p: *const u32| (
        _mm512_cvtepi8_epi16(_mm256_loadu_si256(p as *const _)),
        _mm512_cvtepi8_epi16(_mm256_loadu_si256(p.add(8) as *const _)),
    ),
    _mm512_set1_epi64,
    _mm512_madd_epi16,
    _mm512_add_epi32,
    {
        // Column j's two lanes are 2j and 2j + 1 of `lo` (columns 0-7) or `hi` (8-15).
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        move |lo, hi| {
            _mm512_add_epi32(
                _mm512_permutex2var_epi32(lo, even, hi),
                _mm512_permutex2var_epi32(lo, odd, hi),
            )
        }
    },
    _mm512_loadu_si512,
    _mm512_storeu_si512,
    _mm512_slli_epi32,
    int8_avx512bw_walk6
);

#[cfg(target_arch = "x86_64")]
int8_wide_tile!(
    /// int8, AVX2, through 16-bit products: [`int8_avx512bw`]'s scheme in ymm registers. Each
    /// vector of weights (8 columns x 4 values of `k`) is widened to two vectors of i16
    /// (`vpmovsxbw`: columns 0-3 and 4-7), the activations `q` (from [`widen_activations`])
    /// are broadcast 64 bits at a time, and `vpmaddwd` sums each pair into i32; a column's two
    /// lanes are added at the end (`vphaddd`, then the 64-bit quarters put in order). Per 32
    /// multiply-adds and row: two `vpmaddwd` and two adds, against [`int8_avx2`]'s sign move,
    /// `vpmaddubsw`, `vpmaddwd` by ones and add. Exact, so the i32 sums are bitwise `vpdpbusd`'s.
    /// The full tile of 6 rows walks `k` in assembly ([`int8_avx2_walk6`]; t5-small int8 case d
    /// at `avx2` 1.14x in alternating runs).
    ///
    /// # Safety
    /// AVX2; `x` holds `R` rows of `2 kg` u32 (the i16 activations); `sub + 8 V` <= panel width.
    int8_avx2_wide,
    "avx2",
    8,
    __m256i,
    _mm256_setzero_si256(),
    |p: *const u32| (
        _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const _)),
        _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(4) as *const _)),
    ),
    _mm256_set1_epi64x,
    _mm256_madd_epi16,
    _mm256_add_epi32,
    // `vphaddd` gives columns 0, 1, 4, 5 in the low 128 bits and 2, 3, 6, 7 in the high; the
    // 64-bit quarters 0, 2, 1, 3 put them in order.
    |lo, hi| _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(lo, hi)),
    _mm256_loadu_si256,
    _mm256_storeu_si256,
    _mm256_slli_epi32,
    int8_avx2_walk6
);

/// The activations of int8 rows for the tiles through 16-bit products ([`int8_avx512bw`],
/// [`int8_avx2_wide`]): each lane of `src` (4 bytes, u8 `q + 128`) as 4 i16 `q` in two u32 of
/// `dst` (twice `src`'s length). In AVX2 for both: a pass per product, a sliver of its time.
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn widen_activations(src: &[u32], dst: &mut [u32]) {
    debug_assert_eq!(dst.len(), 2 * src.len());
    let bias = _mm256_set1_epi16(128);
    let whole = src.len() / 4 * 4;
    for i in (0..whole).step_by(4) {
        let bytes = _mm_loadu_si128(src.as_ptr().add(i) as *const _);
        let q = _mm256_sub_epi16(_mm256_cvtepu8_epi16(bytes), bias);
        _mm256_storeu_si256(dst.as_mut_ptr().add(2 * i) as *mut _, q);
    }
    for (&lane, d) in src[whole..]
        .iter()
        .zip(dst[2 * whole..].chunks_exact_mut(2))
    {
        let b = lane.to_le_bytes().map(|b| (b as i16 - 128) as u16 as u32);
        d[0] = b[0] | b[1] << 16;
        d[1] = b[2] | b[3] << 16;
    }
}

/// An int8 tile for AVX2: `vpmaddubsw` on `|q|` (u8) and `±w` (i8, the sign of `q` moved onto
/// the weight by `vpsignb`), then `vpmaddwd` by ones into i32. Each 16-bit pair sum is at most
/// `2 · 127 · 127 = 32258`, so `vpmaddubsw` never saturates and every sum is exact. A row costs
/// one broadcast, an xor and an abs per step of `k` (`|q|` and `q` made from `q + 128`). Used
/// for products of fewer than [`WIDE_MIN_ROWS`] rows, which wait on memory; the others take
/// [`int8_avx2_wide`].
///
/// # Safety
/// AVX2; `x` holds `R` rows of `kg` lanes (u8 `q + 128`); `sub + 8 V` <= panel width; weights
/// in [-127, 127].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn int8_avx2<const R: usize, const V: usize>(
    x: &[u32],
    w: &PackedWeight,
    c0: usize,
    sub: usize,
    ks: Range<usize>,
    out: &mut [[u32; BLOCK]],
    ahead: Ahead,
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
    let from = ks.start;
    for g in ks {
        ahead.fetch(wp, pw, 8 * V, g - from);
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

/// Products of at least this many rows take the AVX2 int8 tile through 16-bit products
/// ([`int8_avx2_wide`], activations widened once per product); fewer rows keep [`int8_avx2`].
/// On Zen 4 at `avx2` (`examples/matmul_speed`, cold weights, alternating runs): 4096-row
/// products 1.25x-1.35x and 8 to 32 rows up to 1.2x faster than [`int8_avx2`] with its
/// activations split ahead (the tile it replaces there), 4 rows about 7% slower (those wait on
/// memory). Its register-only ceiling there is 1.29x the sign scheme's
/// (`bench/ceilings/int8_vs_f32.c`: 170 against 132 G operations/s a core); on the Xeon of
/// session 12 the two were equal (78 and 76).
pub(super) const WIDE_MIN_ROWS: usize = 5;

/// Which of these tiles runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum NoDot {
    Bf16Avx512,
    Bf16Avx2,
    Int8Avx512bw,
    Int8Avx2,
    /// int8 on AVX2 through 16-bit products ([`int8_avx2_wide`]).
    Int8Avx2Wide,
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
    ahead: Ahead,
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
                2 * w.kg,
                16,
                1,
                [2, 3, 4, 5, 6],
                6,
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
        NoDot::Int8Avx2Wide => {
            by_shape!(
                int8_avx2_wide,
                x,
                w,
                rows,
                c0,
                ks,
                2 * w.kg,
                8,
                1,
                [2, 3, 4, 5, 6],
                6,
                acc,
                ahead
            )
        }
    }
}
