//! Decode attention over int8 caches in AVX-512 and AVX2, keys in blocks of eight.
//!
//! The walk of [`super::attend`] (one query row, a group of heads, keys in memory order), with
//! the int8 rows widened to f32 in registers and each key's scale applied once per head (to
//! its score's sum, and to its weight before the values: `s Σ q·k` and `(p s) · v` instead of
//! `Σ q·(s k)` and `p · (s v)`, the same values in exact arithmetic; results differ from an
//! f32 cache of the dequantized values in the last bits) and the per-key costs taken out of
//! the inner loops:
//! - scores: the eight dot products of a block (one head) are reduced across their lanes
//!   together (a transpose-and-add tree, about a third of eight separate reductions); each
//!   key's sum is the same tree whatever its place in the block, so a key's score does not
//!   depend on where its row's keys start;
//! - values: each head's output stays in registers across the block instead of being loaded
//!   and stored for every key.
//!
//! Within a block the keys are read head by head, across the rows, so every key is prefetched
//! a block ahead, one key per head of the walk (a block's 8 rows asked for at once, 72 lines,
//! left the walk waiting: on the Zen 4, `examples/attend_speed` over int8 caches of 32 rows x
//! 128 keys went from 321-343 to 184-193 us a call, t5-small int8 case-d decoding 5%-9%
//! faster). In alternating runs on the 2-core Xeon (t5-small int8, batch 32), decoding
//! took 1.44-1.47 s against 1.55-1.60 s with 512 source tokens, and 1.02-1.04 s against
//! 1.12-1.17 s with 128, than dequantizing each key into memory and reading it as f32 (the
//! walk of `attend_avx512`). The AVX2 walk is the same in vectors of eight (on the Zen 4 at
//! `T5RT_ISA=avx2`, t5-small int8 decoding over 512 source tokens about 8% faster than
//! dequantizing each key, case d about 2%). f32 and bf16 caches stay on the walk of
//! `attend_avx512` / `attend_avx2`, which streams their rows whole: the same blocked walk was
//! not faster for them (f32 case d 8% slower; bf16 caches read at 16 GB/s against 26-30).

use std::arch::x86_64::*;

use super::{prefetch_ahead, to_probs, AttnArgs, Task};
use crate::backend::KvFormat;

/// Keys per block.
const B: usize = 8;

/// The sums of the lanes of eight 256-bit vectors, in order: `((y0 + y1) + (y2 + y3)) + ((y4 +
/// y5) + (y6 + y7))` for each, `y` its eight lanes (the AVX2 walk's, and the second half of
/// [`reduce8`]).
#[inline(always)]
unsafe fn reduce8_256(y: &[__m256; B]) -> __m256 {
    let t0 = _mm256_hadd_ps(y[0], y[1]);
    let t1 = _mm256_hadd_ps(y[2], y[3]);
    let t2 = _mm256_hadd_ps(y[4], y[5]);
    let t3 = _mm256_hadd_ps(y[6], y[7]);
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(u0, u1),
        _mm256_permute2f128_ps::<0x31>(u0, u1),
    )
}

/// The sums of the lanes of eight vectors, in order: `((y0 + y1) + (y2 + y3)) + ((y4 + y5) +
/// (y6 + y7))` for each, where `y` is the vector's low half plus its high half.
#[inline(always)]
unsafe fn reduce8(a: &[__m512; B]) -> __m256 {
    let half = |v: __m512| {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        _mm256_add_ps(_mm512_castps512_ps256(v), hi)
    };
    reduce8_256(&std::array::from_fn(|i| half(a[i])))
}

/// Sixteen int8 values at `p`, in f32 (exact: the scale is applied to their sums).
#[inline(always)]
unsafe fn widen16(p: *const i8) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
}

/// Eight int8 values at `p`, in f32 (exact).
#[inline(always)]
unsafe fn widen8(p: *const i8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
}

/// Where one task reads an int8 cache ([`KvFormat::Int8`]'s layout).
struct Layout {
    /// f32 slots per position.
    per: usize,
    /// The position of key `j` is `base + j`.
    base: usize,
    d: usize,
    h0: usize,
    inner: usize,
}

impl Layout {
    /// The bytes of head `h` (of this task) of key `j`.
    #[inline(always)]
    unsafe fn values(&self, cache: &[f32], j: usize, h: usize) -> *const i8 {
        let row = cache.as_ptr().add((self.base + j) * self.per) as *const i8;
        row.add((self.h0 + h) * self.d)
    }

    /// The scale of head `h` of key `j`.
    #[inline(always)]
    unsafe fn scale(&self, cache: &[f32], j: usize, h: usize) -> f32 {
        let at = (self.base + j) * self.per + self.inner / 4 + self.h0 + h;
        *cache.as_ptr().add(at)
    }
}

/// The walk of the module docs, for one vector width: `$name` the task, `$values` its
/// weighted-values helper; `$lanes` f32 per vector, `$wide` the rows' vectors in registers
/// across a block of keys (64 values).
macro_rules! int8_walk {
    ($name:ident, $values:ident, $feat:literal, $lanes:literal, $wide:literal, $vec:ty,
     $zero:expr, $load:ident, $store:ident, $set1:ident, $fmadd:ident, $widen:ident,
     $reduce:ident) => {
        /// One task of [`super::attention`] over int8 caches (see the module docs).
        ///
        /// # Safety
        /// The CPU must have the features named; `d_kv` is a multiple of the vector width;
        /// the shape was checked against the buffers.
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn $name(a: &AttnArgs, task: usize, oh: &mut [f32]) {
            let s = a.s;
            debug_assert_eq!(s.kv, KvFormat::Int8);
            let t = Task::of(a, task);
            let Task {
                inner,
                hn,
                d,
                h0,
                qi: _,
                kv_b,
                q,
                j0,
                j1,
            } = t;
            let (oh, stats) = oh.split_at_mut(hn * d);
            let n = j1 - j0;
            let l = Layout {
                per: KvFormat::Int8.slots_per_position(s.heads, d),
                base: kv_b * s.kv_stride,
                d,
                h0,
                inner,
            };
            // Every key asked for a block ahead: its whole row when the task has all heads,
            // else its heads' values.
            let whole = hn == s.heads;
            let prefetch = |cache: &[f32], j: usize| {
                let row = (l.base + j) * l.per;
                if whole {
                    prefetch_ahead(cache, row, l.per, l.per)
                } else {
                    prefetch_ahead(cache, row + h0 * d / 4, hn * d / 4, l.per)
                }
            };
            let mut probs = vec![0.0f32; hn * n];
            for jb in (j0..j1).step_by(B) {
                let je = (jb + B).min(j1);
                for h in 0..hn {
                    // The next block's keys asked for one by one across the heads, not in
                    // one burst.
                    for j in (jb + h..je).step_by(hn) {
                        prefetch(a.k, j);
                    }
                    let qh = q.as_ptr().add(h * d);
                    let mut acc: [$vec; B] = [$zero; B];
                    let mut scales = [0.0f32; B];
                    for (i, j) in (jb..je).enumerate() {
                        let kb = l.values(a.k, j, h);
                        scales[i] = l.scale(a.k, j, h);
                        for c in (0..d).step_by($lanes) {
                            let k = $widen(kb.add(c));
                            acc[i] = $fmadd($load(qh.add(c)), k, acc[i]);
                        }
                    }
                    // Each key's sum of q · k, times its scale.
                    let mut sums = [0.0f32; B];
                    let scaled = _mm256_mul_ps($reduce(&acc), _mm256_loadu_ps(scales.as_ptr()));
                    _mm256_storeu_ps(sums.as_mut_ptr(), scaled);
                    let at = h * n + jb - j0;
                    probs[at..at + je - jb].copy_from_slice(&sums[..je - jb]);
                }
            }
            to_probs(a, &t, &mut probs, stats);
            // out_h = Σ_j p_hj · v_h[j], 64 values (or one vector) at a time in registers
            // across the block.
            oh.fill(0.0);
            for jb in (j0..j1).step_by(B) {
                let je = (jb + B).min(j1);
                for h in 0..hn {
                    for j in (jb + h..je).step_by(hn) {
                        prefetch(a.v, j);
                    }
                    let p = &probs[h * n + jb - j0..h * n + je - j0];
                    let o = oh.as_mut_ptr().add(h * d);
                    let mut c = 0;
                    while c + $wide * $lanes <= d {
                        $values::<$wide>(a, &l, o.add(c), p, jb, h, c);
                        c += $wide * $lanes;
                    }
                    while c < d {
                        $values::<1>(a, &l, o.add(c), p, jb, h, c);
                        c += $lanes;
                    }
                }
            }
        }

        /// `out[..lanes V] += Σ_j p_j · v_j[c..c + lanes V]` for head `h` over the block's
        /// keys (from `jb`, one per entry of `p`); masked keys (p = 0) skipped.
        #[inline(always)]
        unsafe fn $values<const V: usize>(
            a: &AttnArgs,
            l: &Layout,
            out: *mut f32,
            p: &[f32],
            jb: usize,
            h: usize,
            c: usize,
        ) {
            let mut acc: [$vec; V] = std::array::from_fn(|t| $load(out.add($lanes * t)));
            for (i, &pj) in p.iter().enumerate() {
                if pj == 0.0 {
                    continue; // masked key: exactly zero weight
                }
                // The weight times the value's scale, then the raw values.
                let j = jb + i;
                let pv = $set1(pj * l.scale(a.v, j, h));
                let vb = l.values(a.v, j, h).add(c);
                for (t, acc) in acc.iter_mut().enumerate() {
                    *acc = $fmadd(pv, $widen(vb.add($lanes * t)), *acc);
                }
            }
            for (t, acc) in acc.iter().enumerate() {
                $store(out.add($lanes * t), *acc);
            }
        }
    };
}

int8_walk!(
    attend_int8,
    values,
    "avx512f,fma",
    16,
    4,
    __m512,
    _mm512_setzero_ps(),
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    widen16,
    reduce8
);

int8_walk!(
    attend_int8_avx2,
    values_avx2,
    "avx2,fma",
    8,
    8,
    __m256,
    _mm256_setzero_ps(),
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    widen8,
    reduce8_256
);
