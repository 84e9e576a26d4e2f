//! T5's relative position bias: bucketed distances, one learned scalar per (bucket, head).
//! Only layer 0 of each stack owns the table; the bias is computed once per pass and every
//! layer of the stack reuses it.

use crate::error::{Result, T5Error};

/// Hugging Face's `_relative_position_bucket`, including its f32 logarithm, so bucket edges
/// fall where they fall there. `relative = key_position - query_position`.
pub fn bucket(
    relative: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut buckets = num_buckets as i64;
    let mut ret = 0i64;
    let distance = if bidirectional {
        buckets /= 2;
        if relative > 0 {
            ret += buckets;
        }
        relative.abs()
    } else {
        // Causal (decoder): keys after the query never occur; the future maps to bucket 0.
        (-relative).max(0)
    };
    let max_exact = buckets / 2;
    if distance < max_exact {
        return (ret + distance) as usize;
    }
    let log_ratio = (distance as f32 / max_exact as f32).ln()
        / (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = max_exact + (log_ratio * (buckets - max_exact) as f32) as i64;
    (ret + large.min(buckets - 1)) as usize
}

/// Bias `[heads, q_len, k_len]` for queries at `q_offset..q_offset+q_len` and keys `0..k_len`,
/// from a table `[num_buckets, heads]` as stored in the checkpoint: [`bias_lines`] expanded
/// into a row per query.
pub fn position_bias(
    table: &[f32],
    heads: usize,
    q_offset: usize,
    q_len: usize,
    k_len: usize,
    bidirectional: bool,
    max_distance: usize,
) -> Vec<f32> {
    let lines = bias_lines(
        table,
        heads,
        q_offset,
        q_len,
        k_len,
        bidirectional,
        max_distance,
    );
    let mut bias = vec![0.0f32; heads * q_len * k_len];
    fill_rows(&lines, &mut bias, q_len, k_len);
    bias
}

/// Each head's bias by distance, for queries at `q_offset..q_offset+q_len` and keys
/// `0..k_len`: `[heads, q_len + k_len - 1]` (empty when either length is 0), entry `i` of a
/// head's line the bias at `key - query = i - (q_offset + q_len - 1)`, so query `qi`'s row is
/// the `k_len` values from `q_len - 1 - qi` on ([`crate::backend::BiasLayout::Lines`]).
///
/// A pair's bias depends only on `key - query`, which runs over
/// `-(q_offset + q_len - 1) ..= k_len - 1 - q_offset`: a bucket per distance, not per pair
/// (about a thousand logarithms instead of q_len · k_len for a 512-token input), and
/// `2L - 1` values a head instead of `L²`.
pub fn bias_lines(
    table: &[f32],
    heads: usize,
    q_offset: usize,
    q_len: usize,
    k_len: usize,
    bidirectional: bool,
    max_distance: usize,
) -> Vec<f32> {
    let mut lines = vec![0.0f32; lines_len(heads, q_len, k_len)];
    if lines.is_empty() {
        return lines;
    }
    let num_buckets = table.len() / heads;
    // Line index i holds the distance i - far; the last query sits `far` keys from key 0.
    let far = q_offset + q_len - 1;
    let span = q_len + k_len - 1;
    for i in 0..span {
        let b = bucket(
            i as i64 - far as i64,
            bidirectional,
            num_buckets,
            max_distance,
        );
        for h in 0..heads {
            lines[h * span + i] = table[b * heads + h];
        }
    }
    lines
}

/// Values in [`bias_lines`]'s lines: `heads · (q_len + k_len - 1)`, none when either length is
/// 0 ([`crate::backend::AttnShape::bias_len`] of [`crate::backend::BiasLayout::Lines`]).
pub fn lines_len(heads: usize, q_len: usize, k_len: usize) -> usize {
    if q_len == 0 || k_len == 0 {
        0
    } else {
        heads.saturating_mul(q_len + k_len - 1)
    }
}

/// An error unless `lines` holds [`lines_len`] values (the check of every backend that takes
/// them, `Backend::upload_position_bias`).
pub fn check_lines(lines: &[f32], heads: usize, q_len: usize, k_len: usize) -> Result<()> {
    let want = lines_len(heads, q_len, k_len);
    if lines.len() != want {
        return Err(T5Error::Backend(format!(
            "position bias: {} values for {heads} lines of {}",
            lines.len(),
            want / heads.max(1)
        )));
    }
    Ok(())
}

/// [`bias_lines`] expanded into rows, `[heads, q_len, k_len]` (what a backend reads that
/// reads no lines, [`crate::backend::BiasLayout::Rows`]); an error, not an abort, where
/// memory runs out (the rows grow with the square of the input).
pub fn rows_of_lines(lines: &[f32], heads: usize, q_len: usize, k_len: usize) -> Result<Vec<f32>> {
    check_lines(lines, heads, q_len, k_len)?;
    let len = heads
        .checked_mul(q_len)
        .and_then(|n| n.checked_mul(k_len))
        .ok_or_else(|| crate::alloc::out_of_memory(usize::MAX, "the position bias"))?;
    let mut rows = crate::alloc::try_zeroed(len, "the position bias")?;
    fill_rows(lines, &mut rows, q_len, k_len);
    Ok(rows)
}

/// Each query's row of `rows` (`[heads, q_len, k_len]`) from its head's line.
fn fill_rows(lines: &[f32], rows: &mut [f32], q_len: usize, k_len: usize) {
    if rows.is_empty() {
        return;
    }
    let span = q_len + k_len - 1;
    for (r, row) in rows.chunks_exact_mut(k_len).enumerate() {
        let (h, qi) = (r / q_len, r % q_len);
        let start = h * span + q_len - 1 - qi;
        row.copy_from_slice(&lines[start..start + k_len]);
    }
}

/// The decoder's causal bias for one query over the keys up to it, as one table for a whole
/// decode: `[heads, len]`, entry `len - 1 - d` holding the bias at distance `d` (key `pos - d`
/// of the query at `pos`). The query at `pos` reads the last `pos + 1` values of each row
/// (`BiasLayout::Rows { stride: len }`), which are `position_bias(.., pos, 1, pos + 1, false, ..)`.
pub fn decoder_bias_table(
    table: &[f32],
    heads: usize,
    len: usize,
    max_distance: usize,
) -> Vec<f32> {
    if len == 0 {
        return Vec::new();
    }
    // The last query's row over all `len` keys holds every distance from len - 1 to 0 (one
    // query: its line is its row).
    bias_lines(table, heads, len - 1, 1, len, false, max_distance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decoder_table_holds_every_steps_bias() {
        let (heads, buckets, len) = (3, 32, 300);
        let table: Vec<f32> = (0..heads * buckets)
            .map(|i| i as f32 * 0.25 - 7.0)
            .collect();
        let t = decoder_bias_table(&table, heads, len, 128);
        for pos in [0, 1, 7, 8, 31, 200, len - 1] {
            let want = position_bias(&table, heads, pos, 1, pos + 1, false, 128);
            for h in 0..heads {
                let row = &t[h * len + len - (pos + 1)..(h + 1) * len];
                assert_eq!(
                    row,
                    &want[h * (pos + 1)..(h + 1) * (pos + 1)],
                    "pos {pos} head {h}"
                );
            }
        }
    }

    /// Every pair's bias is its own bucket's, as the definition says: encoder and decoder,
    /// with an offset, ragged shapes, distances past `max_distance`.
    #[test]
    fn position_bias_is_each_pairs_bucket() {
        let (heads, buckets) = (3, 32);
        let table: Vec<f32> = (0..heads * buckets).map(|i| i as f32 * 0.5 - 9.0).collect();
        for (q_offset, q_len, k_len, bidirectional) in [
            (0, 7, 7, true),
            (0, 300, 300, true),
            (0, 1, 5, true),
            (0, 5, 1, true),
            (4, 3, 9, false),
            (250, 1, 251, false),
            (0, 0, 4, true),
            (0, 4, 0, true),
        ] {
            let got = position_bias(&table, heads, q_offset, q_len, k_len, bidirectional, 128);
            assert_eq!(got.len(), heads * q_len * k_len);
            for h in 0..heads {
                for qi in 0..q_len {
                    for kj in 0..k_len {
                        let rel = kj as i64 - (q_offset + qi) as i64;
                        let b = bucket(rel, bidirectional, buckets, 128);
                        assert_eq!(
                            got[(h * q_len + qi) * k_len + kj],
                            table[b * heads + h],
                            "offset {q_offset} head {h} query {qi} key {kj}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn small_distances_are_exact_and_large_ones_saturate() {
        // Encoder (bidirectional), 32 buckets: 0..8 exact to the left, +16 to the right.
        assert_eq!(bucket(0, true, 32, 128), 0);
        assert_eq!(bucket(-3, true, 32, 128), 3);
        assert_eq!(bucket(3, true, 32, 128), 19);
        assert_eq!(bucket(-10_000, true, 32, 128), 15);
        assert_eq!(bucket(10_000, true, 32, 128), 31);
        // Decoder (causal): the future is bucket 0, the far past the last bucket.
        assert_eq!(bucket(5, false, 32, 128), 0);
        assert_eq!(bucket(-5, false, 32, 128), 5);
        assert_eq!(bucket(-10_000, false, 32, 128), 31);
    }
}
