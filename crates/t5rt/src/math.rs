//! Small f32 helpers on host slices, shared by the CPU kernels and the search code.

/// Index of the first largest value (NaNs skipped; 0 when there is none).
pub(crate) fn argmax(row: &[f32]) -> u32 {
    // The maximum first, in 16 lanes (one accumulator would be a chain of dependent
    // comparisons the compiler cannot reorder: the whole vocabulary at a few cycles each);
    // then its first position, 16 values tested at a time.
    let max = reduce16(row, f32::NEG_INFINITY, |m, v| if v > m { v } else { m });
    let mut base = 0;
    for c in row.chunks(16) {
        if c.iter().fold(false, |hit, &v| hit | (v == max)) {
            return (base + c.iter().position(|&v| v == max).unwrap_or(0)) as u32;
        }
        base += c.len();
    }
    0
}

/// Numerically stable softmax in place, in f32 (max subtracted first). Written as plain
/// loops with 16 partial results, so that it inlines and vectorises in callers compiled with
/// wider SIMD (a float reduction in one accumulator cannot be reordered, so cannot vectorise).
#[inline(always)]
pub(crate) fn softmax_in_place(x: &mut [f32]) {
    softmax_stats_in_place(x);
}

/// [`softmax_in_place`], returning the row's largest value and the sum of `e^(x - max)` it
/// divided by: what merging the softmaxes of parts of a row needs. A row with no finite value
/// (every entry -inf, or none) becomes zeros and gives `(-inf, 0)`.
#[inline(always)]
pub(crate) fn softmax_stats_in_place(x: &mut [f32]) -> (f32, f32) {
    let max = reduce16(x, f32::NEG_INFINITY, |m, v| if v > m { v } else { m });
    if max == f32::NEG_INFINITY {
        x.fill(0.0);
        return (max, 0.0);
    }
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let sum = reduce16(x, 0.0, |a, v| a + v);
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
    (max, sum)
}

/// The largest `|v|` (0 for an empty slice).
#[inline(always)]
pub(crate) fn max_abs(x: &[f32]) -> f32 {
    reduce16(x, 0.0, |m, v| if v.abs() > m { v.abs() } else { m })
}

/// The smallest and largest values of `x`, NaNs skipped (the comparisons skip them); `(0, 0)`
/// when there are none. One pass in 16 interleaved lanes.
pub(crate) fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = ([f32::INFINITY; 16], [f32::NEG_INFINITY; 16]);
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
        }
    }
    let (mut l, mut h) = (f32::INFINITY, f32::NEG_INFINITY);
    for (&a, &b) in lo.iter().zip(&hi) {
        l = if a < l { a } else { l };
        h = if b > h { b } else { h };
    }
    min_max_with((l, h), tail)
}

/// [`min_max`]'s end, shared with its vector versions: the range `(l, h)` found so far
/// (infinities for none) widened by the values of `tail`, then `(0, 0)` if it is empty.
#[inline(always)]
pub(crate) fn min_max_with((mut l, mut h): (f32, f32), tail: &[f32]) -> (f32, f32) {
    for &v in tail {
        l = if v < l { v } else { l };
        h = if v > h { v } else { h };
    }
    if l <= h {
        (l, h)
    } else {
        (0.0, 0.0)
    }
}

/// Folds `x` with `f` in 16 interleaved lanes, then folds the lanes: the order a vector
/// unit uses, so the compiler may vectorise it.
#[inline(always)]
fn reduce16(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            lanes[i] = f(lanes[i], c[i]);
        }
    }
    let mut acc = init;
    for &v in tail {
        acc = f(acc, v);
    }
    for l in lanes {
        acc = f(acc, l);
    }
    acc
}

/// `e^x` in f32, within 2 ulp of the exact value for x in [-87, 88]; 0 below -87 (and for
/// -inf), +inf above 88. Plain arithmetic (Cephes' `expf` polynomial), so loops over it
/// vectorise, where `f32::exp` is a libm call per value.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' coefficients, as published
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    #[allow(clippy::manual_clamp)] // `clamp`'s NaN rules keep loops from vectorising
    let xc = if x < -87.0 {
        -87.0
    } else if x > 88.0 {
        88.0
    } else {
        x
    };
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // n as an integer, read from t's low mantissa bits (t lies in [2^23, 2^24), where one
    // unit is one step): integer arithmetic that vectorises, where `n as i32` (a saturating
    // conversion) made the compiler convert lane by lane.
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        y * scale
    }
}

/// `tanh(x)` in f32, within 3e-7 of the exact value: Cephes' `tanhf` (an odd polynomial
/// below 0.625, `1 - 2 / (e^2|x| + 1)` above), in plain arithmetic that vectorises.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' coefficients, as published
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let small =
        ((((-5.704_988_7e-3 * z + 2.063_908_9e-2) * z - 5.373_971_6e-2) * z + 1.333_144_2e-1) * z
            - 3.333_328_2e-1)
            * z
            * x
            + x;
    let big = 1.0 - 2.0 / (exp(2.0 * a.min(44.0)) + 1.0);
    let big = if x < 0.0 { -big } else { big };
    if a < 0.625 {
        small
    } else {
        big
    }
}

#[cfg(test)]
mod tests {
    /// The first index of the largest value, as a plain scan finds it: ties, NaNs, infinities,
    /// signed zeros, and rows shorter and longer than a vector, maxima in the tail.
    #[test]
    fn argmax_is_the_first_largest() {
        let naive = |row: &[f32]| {
            let mut best: Option<usize> = None;
            for (i, &v) in row.iter().enumerate() {
                if !v.is_nan() && best.is_none_or(|b| v > row[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0) as u32
        };
        let mut x = 0x2545_f491u32;
        let mut rows: Vec<Vec<f32>> = vec![
            vec![],
            vec![f32::NAN; 40],
            vec![f32::NEG_INFINITY; 33],
            vec![-0.0, 0.0, -0.0],
            vec![1.0, f32::NAN, 3.0, 3.0],
        ];
        for len in [1usize, 7, 16, 17, 100, 32128] {
            let row: Vec<f32> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x % 1000) as f32 - 500.0
                })
                .collect();
            rows.push(row.clone());
            let mut tail_max = row.clone();
            tail_max[len - 1] = 1e6;
            rows.push(tail_max);
            let mut tie = row.clone();
            tie[len / 3] = 2e6;
            tie[len - 1] = 2e6;
            tie[0] = f32::NAN;
            rows.push(tie);
        }
        for row in &rows {
            assert_eq!(super::argmax(row), naive(row), "{} values", row.len());
        }
    }

    #[test]
    fn tanh_is_within_3e_7() {
        let mut worst = 0.0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            let err = (super::tanh(x) as f64 - (x as f64).tanh()).abs();
            worst = worst.max(err);
            x += 0.000_71;
        }
        assert!(worst < 3e-7, "tanh: {worst:e}");
        assert_eq!(super::tanh(1e30), 1.0);
        assert_eq!(super::tanh(-1e30), -1.0);
        assert_eq!(super::tanh(0.0), 0.0);
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = super::exp(x) as f64;
            let ulp = (want as f32).to_bits();
            let ulp = (f32::from_bits(ulp + 1) as f64 - want as f32 as f64).abs();
            worst = worst.max((got - want).abs() / ulp);
            x += 0.000_37;
        }
        assert!(worst <= 2.0, "exp: {worst} ulp");
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(-1e30), 0.0);
        assert_eq!(super::exp(0.0), 1.0);
        assert_eq!(super::exp(100.0), f32::INFINITY);
    }
}
