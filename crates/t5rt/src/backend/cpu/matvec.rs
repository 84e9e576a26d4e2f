//! Products with few rows (decoding steps): `out[m, n] (+)= x[m, k] · W[k, n]`, `W` stored
//! `[k, n]` row-major. The weight is streamed from memory once, in column tiles whose
//! accumulators stay in L1, so batch-1 decoding runs at memory bandwidth rather than at the
//! speed of a general matrix multiply's packing. Each output row accumulates over `k` in the
//! same order whatever `m` is, so a row's result does not depend on the rest of its batch.

use rayon::prelude::*;

/// Most rows the streaming kernel takes; larger products go to `gemm`.
pub(super) const MAX_ROWS: usize = 4;

/// Columns per tile: `MAX_ROWS * TILE` accumulators (16 KiB) stay in L1.
const TILE: usize = 512;

/// Shape of one call: `m` rows, `n` columns, `k` inner; and the tile `[c0, c0 + width)`.
#[derive(Clone, Copy)]
struct Tile {
    m: usize,
    n: usize,
    k: usize,
    c0: usize,
    width: usize,
}

/// One column tile for all `m` rows, accumulated into `acc` (`[m, width]`).
#[inline(always)]
fn tile_body(x: &[f32], w: &[f32], acc: &mut [f32], t: Tile) {
    for kk in 0..t.k {
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
    let tiles = n.div_ceil(TILE);
    // Each tile computes [m, width] into its own buffer; results are scattered afterwards.
    let results: Vec<(usize, Vec<f32>)> = (0..tiles)
        .into_par_iter()
        .map(|t| {
            let c0 = t * TILE;
            let width = TILE.min(n - c0);
            let mut acc = vec![0.0f32; m * width];
            let tile = Tile { m, n, k, c0, width };
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: `simd` is only set when `avx512_available()` said yes.
                unsafe { tile_body_avx512(x, w, &mut acc, tile) };
                return (c0, acc);
            }
            let _ = simd;
            tile_body(x, w, &mut acc, tile);
            (c0, acc)
        })
        .collect();
    for (c0, acc) in results {
        let width = acc.len() / m;
        for mi in 0..m {
            let dst = &mut out[mi * n + c0..mi * n + c0 + width];
            let src = &acc[mi * width..(mi + 1) * width];
            if accumulate {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}
