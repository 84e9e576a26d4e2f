//! The argument checks every backend makes before a data-movement op, in one place, so that
//! the backends refuse the same calls with the same messages (buffer lengths are passed in,
//! whatever memory they live in).

use super::MatDims;
use crate::error::{Result, T5Error};

/// An error unless a buffer of `have` values holds the `need` an op reads or writes.
pub(crate) fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(T5Error::Backend(format!(
            "{what}: buffer holds {have} values, the op needs {need}"
        )));
    }
    Ok(())
}

/// [`super::Backend::matmul_nt`]: `x` holds `[m, k]`, `out` `[m, n]`, and the weight (`w_n` x
/// `w_k`) is the op's `n` x `k`.
pub(crate) fn matmul(x: usize, out: usize, (w_n, w_k): (usize, usize), d: MatDims) -> Result<()> {
    check_len("matmul x", x, d.m * d.k)?;
    check_len("matmul out", out, d.m * d.n)?;
    if (w_n, w_k) != (d.n, d.k) {
        return Err(T5Error::Backend(format!(
            "matmul: the weight is {w_n}x{w_k}, the op wants {}x{}",
            d.n, d.k
        )));
    }
    Ok(())
}

/// [`super::Backend::matmul_nt_shared`]: one output per weight.
pub(crate) fn shared_products(weights: usize, outs: usize) -> Result<()> {
    if weights != outs {
        return Err(T5Error::Backend(format!(
            "matmul_nt_shared: {weights} weights for {outs} outputs"
        )));
    }
    Ok(())
}

/// [`super::Backend::write_position`]: `src` `[batch, width]` into position `pos` of a cache
/// `[batch, stride, width]`.
pub(crate) fn write_position(
    src: usize,
    cache: usize,
    batch: usize,
    width: usize,
    stride: usize,
    pos: usize,
) -> Result<()> {
    if pos >= stride {
        return Err(T5Error::Backend(format!(
            "cache position {pos} is beyond its capacity {stride}"
        )));
    }
    check_len("write_position src", src, batch * width)?;
    check_len("write_position cache", cache, batch * stride * width)
}

/// [`super::Backend::gather_rows`]: every row index inside `src`.
pub(crate) fn gather_rows(src: usize, rows: &[usize], row_len: usize) -> Result<()> {
    let have = src / row_len.max(1);
    match rows.iter().find(|&&r| r >= have && row_len > 0) {
        Some(r) => Err(T5Error::Backend(format!(
            "gather_rows: row {r} is out of range"
        ))),
        None => Ok(()),
    }
}

/// [`super::Backend::widen_rows`]: `rows` rows of `old_len` widened to `new_len`.
pub(crate) fn widen_rows(src: usize, rows: usize, old_len: usize, new_len: usize) -> Result<()> {
    check_len("widen_rows", src, rows * old_len)?;
    if new_len < old_len {
        return Err(T5Error::Backend(format!(
            "widen_rows: {new_len} < {old_len}"
        )));
    }
    Ok(())
}

/// [`super::Backend::retain_rows`]: increasing row indices inside `t`.
pub(crate) fn retain_rows(t: usize, rows: &[usize], row_len: usize) -> Result<()> {
    if rows.windows(2).any(|w| w[0] >= w[1]) {
        return Err(T5Error::Backend("retain_rows: rows must increase".into()));
    }
    if let Some(&last) = rows.last() {
        check_len("retain_rows", t, (last + 1).saturating_mul(row_len))?;
    }
    Ok(())
}

/// [`super::Backend::append`]: `t` holds `t_len` values and `src` holds `len`.
pub(crate) fn append(t: usize, t_len: usize, src: usize, len: usize) -> Result<()> {
    check_len("append t", t, t_len)?;
    check_len("append src", src, len)
}

/// [`super::Backend::slice_rows`]: columns `[start, start + len)` of `rows` rows of `row_len`.
pub(crate) fn slice_rows(
    src: usize,
    rows: usize,
    row_len: usize,
    start: usize,
    len: usize,
) -> Result<()> {
    check_len("slice_rows", src, rows.saturating_mul(row_len))?;
    if start.saturating_add(len) > row_len {
        return Err(T5Error::Backend(format!(
            "slice_rows: [{start}, {start} + {len}) is outside rows of {row_len}"
        )));
    }
    Ok(())
}
