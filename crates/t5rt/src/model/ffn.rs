//! The feed-forward sublayer, shared by encoder and decoder layers.

use crate::backend::{Backend, FfnCall, MatDims};
use crate::config::T5Config;
use crate::error::Result;

use super::params::FfnWeights;

/// The sublayer with its norm and residual: `x += wo(act(wi_0 · n) * (wi_1 · n))` (gated) or
/// `x += wo(act(wi · n))`, where `n = rms_norm(x)` (weights `norm`). `normed` is scratch of
/// `x`'s size, `ff` and `ff_up` of at least `[rows, d_ff]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn feed_forward<B: Backend>(
    b: &B,
    cfg: &T5Config,
    w: &FfnWeights<B::Weight>,
    norm: &B::Tensor,
    x: &mut B::Tensor,
    normed: &mut B::Tensor,
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
    let (gated, wi);
    let ws: &[&B::Weight] = match &w.wi_gate_linear {
        Some(wi_1) => {
            gated = [&w.wi, wi_1];
            &gated
        }
        None => {
            wi = [&w.wi];
            &wi
        }
    };
    let call = FfnCall {
        norm,
        eps: cfg.layer_norm_epsilon,
        ws,
        act: cfg.activation,
        wo: &w.wo,
        up: up_dims,
        down: MatDims {
            m: rows,
            n: d,
            k: d_ff,
        },
    };
    // residual: x += ff · woᵀ
    b.ffn_out(call, x, normed, ff, ff_up)
}
