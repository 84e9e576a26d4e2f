//! Products with few rows (decoding steps): `out[m, n] (+)= x[m, k] · W[k, n]`, `W` stored
//! `[k, n]` row-major. The weight is streamed from memory once: each thread takes a contiguous
//! block of its rows and walks it in column tiles whose accumulators stay in L1, so batch-1
//! decoding runs near memory bandwidth. Each output row accumulates over `k` in the same order
//! whatever `m` is, so a row's result does not depend on the rest of its batch (it does depend
//! on the thread count, through the order the per-thread partial sums are added).

use rayon::prelude::*;

/// Most rows the streaming kernel takes; larger products go to `gemm`.
pub(super) const MAX_ROWS: usize = 4;

/// Columns per tile: `MAX_ROWS * TILE` accumulators (8 KiB) stay in L1.
const TILE: usize = 512;

/// Shape of one call: `m` rows, `n` columns, `k` inner; and the tile `[c0, c0 + width)`.
#[derive(Clone, Copy)]
struct Tile {
    m: usize,
    n: usize,
    k: usize,
    c0: usize,
    width: usize,
    /// The rows of the weight this call covers.
    k0: usize,
    k1: usize,
}

/// One column tile for all `m` rows, accumulated into `acc` (`[m, width]`).
#[inline(always)]
fn tile_body(x: &[f32], w: &[f32], acc: &mut [f32], t: Tile) {
    for kk in t.k0..t.k1 {
        let wrow = &w[kk * t.n + t.c0..kk * t.n + t.c0 + t.width];
        for mi in 0..t.m {
            let xv = x[mi * t.k + kk];
            let a = &mut acc[mi * t.width..(mi + 1) * t.width];
            for (a, &wv) in a.iter_mut().zip(wrow) {
                *a += xv * wv;
            }
        }
    }
}

/// The tile body compiled for AVX-512 (the same arithmetic, 16 lanes at a time).
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512VL and FMA (checked by the caller at run time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma")]
unsafe fn tile_body_avx512(x: &[f32], w: &[f32], acc: &mut [f32], t: Tile) {
    tile_body(x, w, acc, t)
}

/// Whether the AVX-512 body may run on this CPU.
pub(super) fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[m, n] (+)= x[m, k] · w[k, n]` for `m <= MAX_ROWS`, tiles spread over the pool.
pub(super) fn matmul_small_m(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    simd: bool,
) {
    debug_assert!(m <= MAX_ROWS);
    // Threads split the rows of the weight (the k range): each streams a contiguous block of
    // it into its own partial sums, summed afterwards in task order.
    let tasks = rayon::current_num_threads().clamp(1, k.div_ceil(64));
    let rows_per = k.div_ceil(tasks);
    let partials: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let (k0, k1) = (t * rows_per, ((t + 1) * rows_per).min(k));
            let mut part = vec![0.0f32; m * n];
            let mut acc = vec![0.0f32; m * TILE];
            for c0 in (0..n).step_by(TILE) {
                let width = TILE.min(n - c0);
                let acc = &mut acc[..m * width];
                acc.fill(0.0);
                let tile = Tile {
                    m,
                    n,
                    k,
                    c0,
                    width,
                    k0,
                    k1,
                };
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: `simd` is only set when `avx512_available()` said yes.
                    unsafe { tile_body_avx512(x, w, acc, tile) };
                } else {
                    tile_body(x, w, acc, tile);
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = simd;
                    tile_body(x, w, acc, tile);
                }
                for mi in 0..m {
                    part[mi * n + c0..mi * n + c0 + width]
                        .copy_from_slice(&acc[mi * width..(mi + 1) * width]);
                }
            }
            part
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut sum = partials.next().expect("at least one task");
    for p in partials {
        sum.iter_mut().zip(&p).for_each(|(s, p)| *s += p);
    }
    let out = &mut out[..m * n];
    if accumulate {
        out.iter_mut().zip(&sum).for_each(|(d, s)| *d += s);
    } else {
        out.copy_from_slice(&sum);
    }
}
