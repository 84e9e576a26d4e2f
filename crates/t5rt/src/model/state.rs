//! Per-request data: the encoder's output and the decoder's caches. Owned by the request,
//! never by the model.

use crate::backend::Backend;
use crate::error::Result;

/// What the encoder hands to the decoder.
pub struct EncoderOutput<T> {
    /// [batch, src_len, d_model]
    pub hidden: T,
    /// [batch, src_len]: 0 at tokens, -inf at padding (added to attention scores)
    pub mask: T,
    /// Unpadded length of each sequence.
    pub lengths: Vec<usize>,
    pub batch: usize,
    pub src_len: usize,
}

/// Reused activations of one decoding step; sized for the largest batch seen.
pub(crate) struct DecoderScratch<T> {
    pub rows: usize,
    /// [rows, d_model] residual stream
    pub x: T,
    /// [rows, d_model] normalised input of a sublayer
    pub normed: T,
    /// [rows, inner]
    pub q: T,
    /// [rows, inner]
    pub k: T,
    /// [rows, inner]
    pub v: T,
    /// [rows, inner]
    pub attn: T,
    /// [rows, d_ff]
    pub ff: T,
    /// [rows, d_ff] (gated variants)
    pub ff_up: T,
    /// [rows, vocab]
    pub logits: T,
}

/// Widths the scratch is made of.
#[derive(Clone, Copy)]
pub(crate) struct ScratchDims {
    pub d_model: usize,
    pub inner: usize,
    pub d_ff: usize,
    pub vocab: usize,
}

impl<T> DecoderScratch<T> {
    pub fn new<B: Backend<Tensor = T>>(b: &B, rows: usize, d: ScratchDims) -> Result<Self> {
        Ok(DecoderScratch {
            rows,
            x: b.zeros(rows * d.d_model)?,
            normed: b.zeros(rows * d.d_model)?,
            q: b.zeros(rows * d.inner)?,
            k: b.zeros(rows * d.inner)?,
            v: b.zeros(rows * d.inner)?,
            attn: b.zeros(rows * d.inner)?,
            ff: b.zeros(rows * d.d_ff)?,
            ff_up: b.zeros(rows * d.d_ff)?,
            logits: b.zeros(rows * d.vocab)?,
        })
    }
}

/// Decoding state of a batch: self-attention caches that grow one position per step in
/// preallocated buffers, and cross-attention keys/values projected once from the encoder.
pub struct DecoderState<T> {
    /// Rows decoded now (rows of the self-attention caches and scratch).
    pub(crate) batch: usize,
    /// Rows per source: row `r` decodes source `r / group` (beams; 1 otherwise).
    pub(crate) group: usize,
    /// Tokens fed so far (the position of the next one).
    pub(crate) step: usize,
    /// Positions each self-attention cache holds now (grows by doubling up to `max_steps`).
    pub(crate) capacity: usize,
    /// Steps this state may decode at most.
    pub(crate) max_steps: usize,
    pub(crate) src_len: usize,
    /// Per layer: [batch, capacity, inner]
    pub(crate) self_k: Vec<T>,
    /// Per layer: [batch, capacity, inner]
    pub(crate) self_v: Vec<T>,
    /// Per layer: [batch / group, src_len, inner]
    pub(crate) cross_k: Vec<T>,
    /// Per layer: [batch / group, src_len, inner]
    pub(crate) cross_v: Vec<T>,
    /// Cross-attention keys/values are stored as bf16 pairs (reduced-precision weights).
    pub(crate) cross_bf16: bool,
    /// [batch / group, src_len] additive padding mask of the source
    pub(crate) cross_mask: T,
    pub(crate) scratch: DecoderScratch<T>,
    pub(crate) dims: ScratchDims,
}

impl<T> DecoderState<T> {
    /// Sequences currently decoded.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Tokens fed so far.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Doubles the self-attention caches (up to `max_steps` positions), keeping their content.
    pub(crate) fn grow<B: Backend<Tensor = T>>(&mut self, backend: &B) -> Result<()> {
        let inner = self.dims.inner;
        let new_capacity = (self.capacity * 2).clamp(1, self.max_steps);
        for t in self.self_k.iter_mut().chain(self.self_v.iter_mut()) {
            *t = backend.widen_rows(t, self.batch, self.capacity * inner, new_capacity * inner)?;
        }
        self.capacity = new_capacity;
        Ok(())
    }

    /// Keeps (and reorders to) the given rows: `rows[i]` becomes row `i`. Greedy search drops
    /// finished sequences with it; beam search reorders beams with it. In a grouped state
    /// (beams), row `i` must stay within its source (`rows[i] / group == i / group`): the
    /// shared cross-attention keys/values then stay where they are.
    pub fn select<B: Backend<Tensor = T>>(&mut self, backend: &B, rows: &[usize]) -> Result<()> {
        let inner = self.dims.inner;
        let self_row = self.capacity * inner;
        if self.group > 1 {
            let stays = rows.len() == self.batch
                && rows
                    .iter()
                    .enumerate()
                    .all(|(i, &r)| r / self.group == i / self.group);
            if !stays {
                return Err(crate::error::T5Error::Input(
                    "beam rows can only be reordered within their source".into(),
                ));
            }
        } else {
            let cross_row = if self.cross_bf16 {
                self.src_len * inner / 2
            } else {
                self.src_len * inner
            };
            for t in self.cross_k.iter_mut().chain(self.cross_v.iter_mut()) {
                *t = backend.gather_rows(t, rows, cross_row)?;
            }
            self.cross_mask = backend.gather_rows(&self.cross_mask, rows, self.src_len)?;
        }
        for t in self.self_k.iter_mut().chain(self.self_v.iter_mut()) {
            *t = backend.gather_rows(t, rows, self_row)?;
        }
        if rows.len() > self.scratch.rows {
            self.scratch = DecoderScratch::new(backend, rows.len(), self.dims)?;
        }
        self.batch = rows.len();
        Ok(())
    }
}
