//! Attention for few queries (decoding steps): the generic loop, and the same walk in explicit
//! AVX-512 and AVX2 vectors.

#[cfg(target_arch = "x86_64")]
mod int8;

use rayon::prelude::*;

use super::isa::IsaLevel;
use crate::backend::{AttnShape, KvFormat};
use crate::math::{exp, softmax_stats_in_place};

/// Keys per part of a long row: a row over more keys than this is split into parts of this
/// many keys (from its first unmasked key), each part a task over all the row's heads, and
/// the parts' softmaxes merged at the end. The split depends only on the row's own keys, so
/// a row's result does not depend on its batch or on the thread count.
///
/// Why: a task over a part of the heads reads a part of each key (the keys of all heads of
/// a position are one contiguous run), a pattern the hardware prefetchers follow poorly. On
/// the 2-core Xeon, batch-1 decoding attention over 512 keys (8 heads, split in 4 tasks of
/// 2 heads) read its caches at 9.5-12.4 GB/s, against 17.3-18.6 GB/s for 4 rows of whole
/// keys (`examples/attend_speed`).
pub(super) const KEY_PART: usize = 128;

/// Attention for few queries (decoding steps). A task takes one query row, a group of heads
/// and a part of the row's keys ([`KEY_PART`]), and walks the keys in order: key `j` of all
/// its heads is one contiguous run of memory, so the caches stream at full bandwidth (one task
/// per head would read them with a 2 KiB stride that defeats the prefetchers). Rows too
/// short to split into parts split their heads into groups, so that every thread has work.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
    mask: Option<&[f32]>,
    out: &mut [f32],
    s: AttnShape,
    isa: IsaLevel,
) {
    let inner = s.heads * s.d_kv;
    let rows = s.batch * s.q_len;
    let parts = s.kv_len.div_ceil(KEY_PART).max(1);
    let threads = rayon::current_num_threads();
    // Whole rows of keys when there are parts enough for every thread; else heads in groups.
    let want = if parts > 1 { threads } else { 2 * threads };
    let groups = (1..=s.heads)
        .find(|g| s.heads.is_multiple_of(*g) && rows * parts * g >= want)
        .unwrap_or(s.heads);
    let a = AttnArgs {
        q,
        k,
        v,
        bias,
        mask,
        s,
        heads_per_task: s.heads / groups,
        parts,
        whole_keys_ahead: super::isa::intel_cpu(),
    };
    if parts == 1 {
        out[..rows * inner]
            .par_chunks_exact_mut(a.heads_per_task * s.d_kv)
            .enumerate()
            .for_each(|(task, oh)| attend_task(&a, task, oh, isa));
        return;
    }
    // Each task's result (its heads' outputs over its keys, then each head's largest score
    // and sum of exponentials), merged per row.
    let per_task = a.heads_per_task * (s.d_kv + 2);
    let mut partial = vec![0.0f32; rows * parts * groups * per_task];
    partial
        .par_chunks_exact_mut(per_task)
        .enumerate()
        .for_each(|(task, oh)| attend_task(&a, task, oh, isa));
    out[..rows * inner]
        .par_chunks_exact_mut(inner)
        .enumerate()
        .for_each(|(row, o)| {
            let per_row = &partial[row * parts * groups * per_task..];
            merge_parts(o, per_row, s, a.heads_per_task, parts)
        });
}

/// One task of [`attention`], in the widest vectors the CPU and the shape allow. `oh` holds
/// the task's heads' outputs, then (when the row is split into parts) each head's largest
/// score and sum of exponentials.
fn attend_task(a: &AttnArgs, task: usize, oh: &mut [f32], isa: IsaLevel) {
    #[cfg(target_arch = "x86_64")]
    {
        let s = a.s;
        // Whole vectors per head: d_kv a multiple of 16 (32 for bf16 caches, whose
        // slots hold two values) on AVX-512, of 8 (16) on AVX2. T5's d_kv is 64.
        // (int8 caches are dequantized to f32 rows first.)
        let per_head = if s.kv == KvFormat::Bf16 {
            s.d_kv / 2
        } else {
            s.d_kv
        };
        let even = |lanes: usize| s.d_kv.is_multiple_of(2) && per_head.is_multiple_of(lanes);
        if isa.avx512() && even(16) {
            // SAFETY: the backend only runs at levels the CPU has
            // (`IsaLevel::checked`); d_kv checked just above.
            return unsafe {
                if s.kv == KvFormat::Int8 {
                    int8::attend_int8(a, task, oh)
                } else {
                    attend_avx512(a, task, oh)
                }
            };
        }
        if isa >= IsaLevel::Avx2 && even(8) {
            // SAFETY: as above.
            return unsafe {
                if s.kv == KvFormat::Int8 {
                    int8::attend_int8_avx2(a, task, oh)
                } else {
                    attend_avx2(a, task, oh)
                }
            };
        }
    }
    let _ = isa;
    attend(a, task, oh)
}

/// One row's output from its parts' ([`attention`] with [`KEY_PART`]): for each head, the
/// parts' outputs weighted by their share of the row's softmax, `l_p · e^(m_p - m)` over the
/// sum of those (`m_p`, `l_p`: the part's largest score and sum of exponentials, `m` the
/// largest of the `m_p`), in order of the parts. Parts with no key (past the row's end) have
/// `l_p = 0` and weigh nothing.
fn merge_parts(out: &mut [f32], partial: &[f32], s: AttnShape, hn: usize, parts: usize) {
    let d = s.d_kv;
    let groups = s.heads / hn;
    let per_task = hn * (d + 2);
    // The task of part `p`, group `g` of this row.
    let task = |p: usize, g: usize| &partial[(p * groups + g) * per_task..][..per_task];
    for (h, o) in out.chunks_exact_mut(d).enumerate() {
        let (g, hh) = (h / hn, h % hn);
        let stats = |p: usize| {
            let t = task(p, g);
            (t[hn * d + 2 * hh], t[hn * d + 2 * hh + 1])
        };
        let m = (0..parts)
            .map(stats)
            .filter(|&(_, l)| l > 0.0)
            .fold(f32::NEG_INFINITY, |m, (mp, _)| m.max(mp));
        let weight = |p: usize| match stats(p) {
            (mp, l) if l > 0.0 => l * exp(mp - m),
            _ => 0.0,
        };
        let total: f32 = (0..parts).map(weight).sum();
        o.fill(0.0);
        for p in 0..parts {
            let w = weight(p);
            if w == 0.0 {
                continue;
            }
            let share = w / total;
            for (o, &x) in o.iter_mut().zip(&task(p, g)[hh * d..(hh + 1) * d]) {
                *o += share * x;
            }
        }
    }
}

/// The inputs of one decode-attention call.
struct AttnArgs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    bias: Option<&'a [f32]>,
    mask: Option<&'a [f32]>,
    s: AttnShape,
    heads_per_task: usize,
    /// Parts of [`KEY_PART`] keys per row (1: rows whole).
    parts: usize,
    /// Whether tasks over all heads (whole keys) ask for keys ahead too (see
    /// [`PREFETCH_KEYS`]): on Intel CPUs only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    whole_keys_ahead: bool,
}

/// One task: query row `task / groups`, heads `[h0, h0 + heads_per_task)`;
/// `oh[h] = softmax(q_h·k_hᵀ + bias + mask)·v_h`.
#[inline(always)]
fn attend(a: &AttnArgs, task: usize, oh: &mut [f32]) {
    let s = a.s;
    let t = Task::of(a, task);
    let Task {
        inner: _,
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
    // scores[h, j] = q_h·k_h[j] (no 1/sqrt(d_kv): T5 folds it into the weights).
    // (Plain loops, not iterator adaptors: those are separate functions that would not be
    // compiled with the caller's target features.)
    let mut probs = vec![0.0f32; hn * n];
    // bf16 and int8 caches: each key/value row is widened here first.
    let mut wide = vec![0.0f32; if s.kv == KvFormat::F32 { 0 } else { hn * d }];
    for j in j0..j1 {
        let key = kv_row(a.k, s, kv_b * s.kv_stride + j, h0, hn, &mut wide);
        for h in 0..hn {
            probs[h * n + j - j0] = dot(&q[h * d..(h + 1) * d], &key[h * d..(h + 1) * d]);
        }
    }
    to_probs(a, &t, &mut probs, stats);
    // out_h = Σ_j p_hj · v_h[j]
    oh.fill(0.0);
    for j in j0..j1 {
        let val = kv_row(a.v, s, kv_b * s.kv_stride + j, h0, hn, &mut wide);
        for h in 0..hn {
            let p = probs[h * n + j - j0];
            if p == 0.0 {
                continue; // masked key: exactly zero weight
            }
            let (o, val) = (&mut oh[h * d..(h + 1) * d], &val[h * d..(h + 1) * d]);
            for t in 0..d {
                o[t] += p * val[t];
            }
        }
    }
}

/// The keys a mask row leaves in: from its first to its last entry that is not -inf (the
/// whole row when every entry is -inf, which no caller makes).
#[inline(always)]
fn unmasked_range(mask: &[f32]) -> (usize, usize) {
    let first = mask.iter().position(|&m| m != f32::NEG_INFINITY);
    let last = mask.iter().rposition(|&m| m != f32::NEG_INFINITY);
    match (first, last) {
        (Some(f), Some(l)) => (f, l + 1),
        _ => (0, mask.len()),
    }
}

/// Heads `[h0, h0 + hn)` of the key/value at position `pos` of a cache (`kv_b · kv_stride + j`):
/// a slice of an f32 cache, or the values widened (bf16 pairs) or dequantized (int8, `q ·
/// scale`, in f32) into `wide`.
#[inline(always)]
fn kv_row<'a>(
    cache: &'a [f32],
    s: AttnShape,
    pos: usize,
    h0: usize,
    hn: usize,
    wide: &'a mut [f32],
) -> &'a [f32] {
    let (d, inner) = (s.d_kv, s.heads * s.d_kv);
    let len = hn * d;
    match s.kv {
        KvFormat::F32 => {
            let at = pos * inner + h0 * d;
            &cache[at..at + len]
        }
        KvFormat::Bf16 => {
            let at = (pos * inner + h0 * d) / 2;
            for (pair, slot) in wide.chunks_exact_mut(2).zip(&cache[at..at + len / 2]) {
                let bits = slot.to_bits();
                pair[0] = f32::from_bits(bits << 16);
                pair[1] = f32::from_bits(bits & 0xffff_0000);
            }
            &wide[..len]
        }
        KvFormat::Int8 => {
            let base = pos * KvFormat::Int8.slots_per_position(s.heads, d);
            let (values, scales) = (
                &cache[base..base + inner / 4],
                &cache[base + inner / 4 + h0..base + inner / 4 + h0 + hn],
            );
            // SAFETY: the f32 slots viewed as the int8 values they hold, four per slot in
            // memory order (`quantize_kv`'s layout); i8 has no alignment or validity
            // requirements.
            let q = unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<i8>(), inner) };
            let q = &q[h0 * d..h0 * d + len];
            for ((w, q), &scale) in wide[..len]
                .chunks_exact_mut(d)
                .zip(q.chunks_exact(d))
                .zip(scales)
            {
                for t in 0..d {
                    w[t] = q[t] as f32 * scale;
                }
            }
            &wide[..len]
        }
    }
}

/// Dot product with 16 independent partial sums, so the compiler can vectorise it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let n = a.len().min(b.len());
    let whole = n / 16 * 16;
    for c in 0..whole / 16 {
        // Fixed-size chunks: no bounds checks inside, so the 16 lanes are one vector.
        let x: &[f32; 16] = a[16 * c..16 * c + 16].try_into().expect("16 values");
        let y: &[f32; 16] = b[16 * c..16 * c + 16].try_into().expect("16 values");
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for t in whole..n {
        tail += a[t] * b[t];
    }
    // A tree over the lanes (vector shuffles), not 16 dependent scalar adds.
    let mut width = 8;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// What one task of [`attention`] reads: query row `task / (parts · groups)`, heads `[h0, h0 +
/// hn)`, one part of the row's keys.
#[derive(Clone, Copy)]
struct Task<'a> {
    /// Values per position, all heads (read by the SIMD walks).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    inner: usize,
    hn: usize,
    d: usize,
    h0: usize,
    /// The query's position in its sequence.
    qi: usize,
    /// The key/value sequence it reads (beams read their source's).
    kv_b: usize,
    /// Its heads' query values.
    q: &'a [f32],
    /// The keys it reads, `[j0, j1)`: those its mask does not mask at the start (a row that
    /// joined a running batch) or at the end (a shorter source, padded). The others are
    /// skipped altogether, so a row costs its own length and gets the result it gets alone.
    /// A row split into parts: the part's keys, [`KEY_PART`] of them from the row's first
    /// (fewer at its end, none past it).
    j0: usize,
    j1: usize,
}

impl<'a> Task<'a> {
    #[inline(always)]
    fn of(a: &AttnArgs<'a>, task: usize) -> Self {
        let s = a.s;
        let (inner, hn, d) = (s.heads * s.d_kv, a.heads_per_task, s.d_kv);
        let groups = s.heads / hn;
        let (row, part, h0) = (
            task / (a.parts * groups),
            task / groups % a.parts,
            (task % groups) * hn,
        );
        let (b, qi) = (row / s.q_len, row % s.q_len);
        let kv_b = b / s.kv_group;
        let (j0, j1) = match a.mask {
            Some(m) => unmasked_range(&m[kv_b * s.kv_len..(kv_b + 1) * s.kv_len]),
            None => (0, s.kv_len),
        };
        let (j0, j1) = if a.parts > 1 {
            let start = (j0 + part * KEY_PART).min(j1);
            (start, (start + KEY_PART).min(j1))
        } else {
            (j0, j1)
        };
        Task {
            inner,
            hn,
            d,
            h0,
            qi,
            kv_b,
            q: &a.q[row * inner + h0 * d..row * inner + (h0 + hn) * d],
            j0,
            j1,
        }
    }
}

/// The task's scores (`probs[h · n + j - j0]` for its head `h`, key `j`) to probabilities:
/// `softmax(scores + bias[h, qi, :] + mask[kv_b, :])`; when the row is split into parts,
/// each head's largest value and sum of exponentials go to `stats` (else it is empty).
#[inline(always)]
fn to_probs(a: &AttnArgs, t: &Task, probs: &mut [f32], stats: &mut [f32]) {
    let (s, n) = (a.s, t.j1 - t.j0);
    for (hh, row) in probs.chunks_exact_mut(n.max(1)).take(t.hn).enumerate() {
        let h = t.h0 + hh;
        if let Some(bias) = a.bias {
            let at = s.bias_at(h, t.qi) + t.j0;
            for (r, b) in row.iter_mut().zip(&bias[at..at + n]) {
                *r += b;
            }
        }
        if let Some(mask) = a.mask {
            let at = t.kv_b * s.kv_len + t.j0;
            for (r, m) in row.iter_mut().zip(&mask[at..at + n]) {
                *r += m;
            }
        }
        let (max, sum) = softmax_stats_in_place(row);
        if !stats.is_empty() {
            stats[2 * hh] = max;
            stats[2 * hh + 1] = sum;
        }
    }
    if n == 0 && !stats.is_empty() {
        // No keys: no weight in the merge.
        stats[..2 * t.hn].chunks_exact_mut(2).for_each(|m| {
            m[0] = f32::NEG_INFINITY;
            m[1] = 0.0;
        });
    }
}

/// [`attend`] in explicit vectors of `$n` lanes: one fused multiply-add chain per (key, head)
/// over `d_kv`, then a sum across the lanes; `out += p · v` in vectors. bf16 caches are
/// widened in registers (each 32-bit slot holds an even and an odd value), against the query
/// split into its even and odd values, and the output is gathered the same way and
/// interleaved at the end (int8 caches have their own walk, `int8.rs`). The sums run in a
/// different order from [`attend`]'s, so results
/// differ from it in the last bits; each (row, head) is computed alone, so a row's result
/// does not depend on its batch or on the grouping of heads into tasks.
#[cfg(target_arch = "x86_64")]
macro_rules! attend_simd {
    ($name:ident, $feat:literal, $n:literal, $zero:expr, $load:ident, $store:ident,
     $set1:ident, $fmadd:ident, $mul:ident, $sum:expr, $widen:expr) => {
        /// # Safety
        /// The CPU must have the features named; `d_kv` (half of it for bf16 caches) is a
        /// multiple of the vector width.
        #[target_feature(enable = $feat)]
        unsafe fn $name(a: &AttnArgs, task: usize, oh: &mut [f32]) {
            use std::arch::x86_64::*;
            let s = a.s;
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
            let mut probs = vec![0.0f32; hn * n];
            // Keys asked for a few keys ahead ([`prefetch_ahead`]) when the task reads a part
            // of each key (some of the heads), and, on Intel CPUs, whole keys too: see
            // [`PREFETCH_KEYS`].
            let ahead = hn < s.heads || a.whole_keys_ahead;
            let prefetch = |cache: &[f32], at: usize, len: usize, stride: usize| {
                if ahead {
                    prefetch_ahead(cache, at, len, stride)
                }
            };
            // Element offset of key/value `j`'s first head of this task (in f32 values; bf16
            // slots are at half of it).
            let at = |j: usize| (kv_b * s.kv_stride + j) * inner + h0 * d;
            // (int8 caches take the walk of `int8.rs`.)
            debug_assert!(s.kv != KvFormat::Int8);
            // Key or value `j` of an f32 cache, from this task's first head, asked for a few
            // keys ahead.
            let row = |cache: &[f32], j: usize| -> *const f32 {
                prefetch(cache, at(j), hn * d, inner);
                cache[at(j)..].as_ptr()
            };
            if s.kv == KvFormat::Bf16 {
                let half = d / 2;
                let (mut qe, mut qo) = (vec![0.0f32; hn * half], vec![0.0f32; hn * half]);
                for (i, pair) in q.chunks_exact(2).enumerate() {
                    qe[i] = pair[0];
                    qo[i] = pair[1];
                }
                debug_assert!(a.k.len() >= at(j1.max(1) - 1) / 2 + hn * half || n == 0);
                for j in j0..j1 {
                    let kp = a.k.as_ptr().add(at(j) / 2);
                    prefetch(a.k, at(j) / 2, hn * half, inner / 2);
                    for h in 0..hn {
                        let mut acc = $zero;
                        for c in (0..half).step_by($n) {
                            let (e, o) = $widen($load(kp.add(h * half + c)));
                            acc = $fmadd($load(qe.as_ptr().add(h * half + c)), e, acc);
                            acc = $fmadd($load(qo.as_ptr().add(h * half + c)), o, acc);
                        }
                        probs[h * n + j - j0] = $sum(acc);
                    }
                }
            } else {
                for j in j0..j1 {
                    let kp = row(a.k, j);
                    for h in 0..hn {
                        let qh = q.as_ptr().add(h * d);
                        let mut acc = $mul($load(qh), $load(kp.add(h * d)));
                        for c in ($n..d).step_by($n) {
                            acc = $fmadd($load(qh.add(c)), $load(kp.add(h * d + c)), acc);
                        }
                        probs[h * n + j - j0] = $sum(acc);
                    }
                }
            }
            to_probs(a, &t, &mut probs, stats);
            if s.kv == KvFormat::Bf16 {
                let half = d / 2;
                let (mut oe, mut oo) = (vec![0.0f32; hn * half], vec![0.0f32; hn * half]);
                for j in j0..j1 {
                    let vp = a.v.as_ptr().add(at(j) / 2);
                    prefetch(a.v, at(j) / 2, hn * half, inner / 2);
                    for h in 0..hn {
                        let p = probs[h * n + j - j0];
                        if p == 0.0 {
                            continue; // masked key: exactly zero weight
                        }
                        let pv = $set1(p);
                        for c in (0..half).step_by($n) {
                            let (e, o) = $widen($load(vp.add(h * half + c)));
                            let (pe, po) = (
                                oe.as_mut_ptr().add(h * half + c),
                                oo.as_mut_ptr().add(h * half + c),
                            );
                            $store(pe, $fmadd(pv, e, $load(pe)));
                            $store(po, $fmadd(pv, o, $load(po)));
                        }
                    }
                }
                for (i, pair) in oh.chunks_exact_mut(2).enumerate() {
                    pair[0] = oe[i];
                    pair[1] = oo[i];
                }
            } else {
                oh.fill(0.0);
                for j in j0..j1 {
                    let vp = row(a.v, j);
                    for h in 0..hn {
                        let p = probs[h * n + j - j0];
                        if p == 0.0 {
                            continue;
                        }
                        let pv = $set1(p);
                        for c in (0..d).step_by($n) {
                            let o = oh.as_mut_ptr().add(h * d + c);
                            $store(o, $fmadd(pv, $load(vp.add(h * d + c)), $load(o)));
                        }
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
attend_simd!(
    attend_avx512,
    "avx512f,fma",
    16,
    _mm512_setzero_ps(),
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    _mm512_mul_ps,
    |v| _mm512_reduce_add_ps(v),
    |raw: __m512| {
        let raw = _mm512_castps_si512(raw);
        (
            _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(
                raw,
                _mm512_set1_epi32(0xffff_0000u32 as i32),
            )),
        )
    }
);

#[cfg(target_arch = "x86_64")]
attend_simd!(
    attend_avx2,
    "avx2,fma",
    8,
    _mm256_setzero_ps(),
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_mul_ps,
    |v: __m256| {
        let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)))
    },
    |raw: __m256| {
        let raw = _mm256_castps_si256(raw);
        (
            _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(
                raw,
                _mm256_set1_epi32(0xffff_0000u32 as i32),
            )),
        )
    }
);

/// Keys (or values) ahead of the one being read, for [`prefetch_ahead`]. A task that reads
/// only its heads' part of each key (`len` of every `stride` values) makes a pattern the
/// hardware prefetchers follow poorly when there are few tasks (batch-1 decoding over a long
/// source), so it always asks. Tasks over whole keys (3 KiB in f32 for t5-base, 1.5 KiB in
/// bf16) read one contiguous stream, and there the CPUs differ:
/// - AMD EPYC (Zen 4), sessions 15 and 21: the hardware prefetchers did better alone (f32
///   caches, 32 x 128 keys, 24.0-29.1 GB/s without, 22.4-25.3 with; 32-40 against 25 GB/s).
/// - Intel Xeon (Emerald Rapids), session 25, whose L2 streamer stops at every 4 KiB page the
///   stream crosses (every key or two): asking made cold caches 6%-21% (f32) and 24%-41% (bf16)
///   faster at 12 heads (`examples/attend_speed`, batch 32 over 32 and 128 keys, batch 1 over
///   512, median of 8 alternating runs), and faster at `avx2` and `avx512bw` too.
///
/// So whole keys are asked for on Intel CPUs only ([`super::isa::intel_cpu`]). Distances of 2 to
/// 16 keys did about as well on the Xeon (within its noise).
#[cfg(target_arch = "x86_64")]
const PREFETCH_KEYS: usize = 8;

/// Asks for the cache lines of `cache[at + PREFETCH_KEYS · stride ..][..len]` (if inside the
/// cache): the same heads of a key a few keys on.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead(cache: &[f32], at: usize, len: usize, stride: usize) {
    let start = at + PREFETCH_KEYS * stride;
    if start + len <= cache.len() {
        super::packed::prefetch_lines(cache[start..].as_ptr(), len);
    }
}
