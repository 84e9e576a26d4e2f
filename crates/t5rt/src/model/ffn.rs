//! The feed-forward sublayer, shared by encoder and decoder layers.

use crate::backend::{Backend, MatDims};
use crate::config::T5Config;
use crate::error::Result;

use super::params::FfnWeights;

/// residual: `x += wo(act(wi_0 · normed) * (wi_1 · normed))` (gated) or `x += wo(act(wi · normed))`.
/// `ff` and `ff_up` are scratch of at least `[rows, d_ff]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn feed_forward<B: Backend>(
    b: &B,
    cfg: &T5Config,
    w: &FfnWeights<B::Weight>,
    normed: &B::Tensor,
    x: &mut B::Tensor,
    ff: &mut B::Tensor,
    ff_up: &mut B::Tensor,
    rows: usize,
) -> Result<()> {
    let (d, d_ff) = (cfg.d_model, cfg.d_ff);
    let up_dims = MatDims {
        m: rows,
        n: d_ff,
        k: d,
    };
    match &w.wi_gate_linear {
        Some(wi_1) => {
            b.matmul_nt_shared(normed, &[&w.wi, wi_1], &mut [ff, ff_up], up_dims)?;
            b.activate(ff, Some(ff_up), rows * d_ff, cfg.activation)?;
        }
        None => {
            b.matmul_nt(normed, &w.wi, ff, up_dims, false)?;
            b.activate(ff, None, rows * d_ff, cfg.activation)?
        }
    }
    // residual: x += ff · woᵀ
    b.matmul_nt(
        ff,
        &w.wo,
        x,
        MatDims {
            m: rows,
            n: d,
            k: d_ff,
        },
        true,
    )
}
