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
    /// Per layer: [batch, capacity, self_slots]
    pub(crate) self_k: Vec<T>,
    /// Per layer: [batch, capacity, self_slots]
    pub(crate) self_v: Vec<T>,
    /// How the self-attention keys/values are stored (f32; bf16 with reduced-precision
    /// weights where the backend can), and the f32 slots that takes per position.
    pub(crate) self_kv: crate::backend::KvFormat,
    pub(crate) self_slots: usize,
    /// Per layer: [batch / group, src_len, inner]
    pub(crate) cross_k: Vec<T>,
    /// Per layer: [batch / group, src_len, inner]
    pub(crate) cross_v: Vec<T>,
    /// How the cross-attention keys/values are stored (f32; bf16 or int8 with
    /// reduced-precision weights), and the f32 slots that takes per source position.
    pub(crate) cross_kv: crate::backend::KvFormat,
    pub(crate) cross_slots: usize,
    /// [batch / group, src_len] additive padding mask of the source
    pub(crate) cross_mask: T,
    /// Per row: the cache position of its first token. 0 for every row of a batch started
    /// together; a row that joins a running batch ([`DecoderState::append`]) starts at the
    /// batch's current position, and its self-attention masks the positions before it.
    pub(crate) starts: Vec<usize>,
    pub(crate) scratch: DecoderScratch<T>,
    pub(crate) dims: ScratchDims,
    /// The self-attention position bias for every step, `[heads, max_steps]`, made at the
    /// first step ([`crate::model::relpos::decoder_bias_table`]).
    pub(crate) self_bias: Option<T>,
    /// Names where this state's buffers are: a new id whenever one of them moves (rows dropped
    /// or joined, caches grown or compacted). A backend that records decoding steps replays a
    /// recording only for the layout it was made with.
    pub(crate) layout: u64,
}

/// A layout id no state has had before.
pub(crate) fn new_layout() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
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

    /// Per row, the tokens it has been fed (its own position).
    pub fn row_positions(&self) -> Vec<usize> {
        self.starts.iter().map(|&s| self.step - s).collect()
    }

    /// The additive self-attention mask `[batch, step + 1]` for the next step, when some row
    /// started later than position 0 (None otherwise).
    pub(crate) fn self_mask(&self) -> Option<Vec<f32>> {
        if self.starts.iter().all(|&s| s == 0) {
            return None;
        }
        let len = self.step + 1;
        let mut mask = vec![0.0f32; self.batch * len];
        for (row, &start) in mask.chunks_exact_mut(len).zip(&self.starts) {
            row[..start].fill(f32::NEG_INFINITY);
        }
        Some(mask)
    }

    /// Adds the rows of `other`, a state just started (no token fed yet, one row per source)
    /// for new sequences, to this running one (also one row per source): their caches start
    /// at this state's current position. Cross-attention keys/values of both are padded to
    /// the longer source. `other`'s rows come after this state's, in order.
    pub fn append<B: Backend<Tensor = T>>(
        &mut self,
        backend: &B,
        other: DecoderState<T>,
    ) -> Result<()> {
        use crate::error::T5Error;
        if self.group != 1 || other.group != 1 || other.step != 0 {
            return Err(T5Error::Input(
                "only fresh one-row-per-source states can join a running one".into(),
            ));
        }
        if self.cross_kv != other.cross_kv
            || self.cross_slots != other.cross_slots
            || self.self_kv != other.self_kv
            || self.self_slots != other.self_slots
            || self.dims.inner != other.dims.inner
        {
            return Err(T5Error::Input(
                "states of different models cannot be joined".into(),
            ));
        }
        let slots = self.self_slots;
        if self.step >= self.capacity {
            self.grow(backend)?;
        }
        let new_rows = other.batch;
        let self_len = self.capacity * slots;
        // Self-attention caches: the new rows appended in place, empty, at this capacity.
        for (mine, theirs) in self
            .self_k
            .iter_mut()
            .zip(other.self_k)
            .chain(self.self_v.iter_mut().zip(other.self_v))
        {
            let theirs = backend.widen_rows(&theirs, new_rows, other.capacity * slots, self_len)?;
            backend.append(mine, self.batch * self_len, &theirs, new_rows * self_len)?;
        }
        // Cross-attention keys/values and masks: both padded to the longer source (masked;
        // attention skips the padding). A longer source widens the running rows, to a
        // multiple of 64 positions so that this stays rare.
        let src_len = if other.src_len > self.src_len {
            other.src_len.div_ceil(64) * 64
        } else {
            self.src_len
        };
        let slot = |len: usize| len * self.cross_slots;
        for (mine, theirs) in self
            .cross_k
            .iter_mut()
            .zip(other.cross_k)
            .chain(self.cross_v.iter_mut().zip(other.cross_v))
        {
            if src_len != self.src_len {
                *mine = backend.widen_rows(mine, self.batch, slot(self.src_len), slot(src_len))?;
            }
            let theirs = if other.src_len == src_len {
                theirs
            } else {
                backend.widen_rows(&theirs, new_rows, slot(other.src_len), slot(src_len))?
            };
            backend.append(
                mine,
                self.batch * slot(src_len),
                &theirs,
                new_rows * slot(src_len),
            )?;
        }
        let widen_mask = |m: &T, rows: usize, from: usize| -> Result<Vec<f32>> {
            let host = backend.download(m, rows * from)?;
            let mut out = vec![f32::NEG_INFINITY; rows * src_len];
            for (dst, row) in out.chunks_exact_mut(src_len).zip(host.chunks_exact(from)) {
                dst[..from].copy_from_slice(row);
            }
            Ok(out)
        };
        let mut mask = widen_mask(&self.cross_mask, self.batch, self.src_len)?;
        mask.extend(widen_mask(&other.cross_mask, new_rows, other.src_len)?);
        self.cross_mask = backend.upload(&mask)?;
        self.src_len = src_len;
        self.starts.extend(std::iter::repeat_n(self.step, new_rows));
        self.batch += new_rows;
        if self.batch > self.scratch.rows {
            self.scratch = DecoderScratch::new(backend, self.batch, self.dims)?;
        }
        self.layout = new_layout();
        Ok(())
    }

    /// Drops the cache positions no row reads any more (those before the earliest row's
    /// start), so that a batch that runs for ever keeps caches as long as its longest row.
    pub fn compact<B: Backend<Tensor = T>>(&mut self, backend: &B) -> Result<()> {
        let shift = self.starts.iter().copied().min().unwrap_or(0);
        if shift == 0 {
            return Ok(());
        }
        let slots = self.self_slots;
        let row_len = self.capacity * slots;
        let keep = (self.step - shift) * slots;
        for t in self.self_k.iter_mut().chain(self.self_v.iter_mut()) {
            let kept = backend.slice_rows(t, self.batch, row_len, shift * slots, keep)?;
            *t = backend.widen_rows(&kept, self.batch, keep, row_len)?;
        }
        self.step -= shift;
        self.starts.iter_mut().for_each(|s| *s -= shift);
        self.layout = new_layout();
        Ok(())
    }

    /// Doubles the self-attention caches (up to `max_steps` positions), keeping their content.
    pub(crate) fn grow<B: Backend<Tensor = T>>(&mut self, backend: &B) -> Result<()> {
        let slots = self.self_slots;
        let new_capacity = (self.capacity * 2).clamp(1, self.max_steps);
        for t in self.self_k.iter_mut().chain(self.self_v.iter_mut()) {
            *t = backend.widen_rows(t, self.batch, self.capacity * slots, new_capacity * slots)?;
        }
        self.capacity = new_capacity;
        self.layout = new_layout();
        Ok(())
    }

    /// Keeps (and reorders to) the given rows: `rows[i]` becomes row `i`. Greedy search drops
    /// finished sequences with it; beam search reorders beams with it. In a grouped state
    /// (beams), row `i` must stay within its source (`rows[i] / group == i / group`): the
    /// shared cross-attention keys/values then stay where they are.
    pub fn select<B: Backend<Tensor = T>>(&mut self, backend: &B, rows: &[usize]) -> Result<()> {
        let self_row = self.capacity * self.self_slots;
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
        }
        // Dropping rows (greedy search, the engine) keeps the others in place; reordering
        // (beams) gathers.
        let increasing = rows.windows(2).all(|w| w[0] < w[1]);
        let keep = |t: &mut T, row_len: usize| -> Result<()> {
            if increasing {
                backend.retain_rows(t, rows, row_len)
            } else {
                *t = backend.gather_rows(t, rows, row_len)?;
                Ok(())
            }
        };
        if self.group == 1 {
            let cross_row = self.src_len * self.cross_slots;
            for t in self.cross_k.iter_mut().chain(self.cross_v.iter_mut()) {
                keep(t, cross_row)?;
            }
            keep(&mut self.cross_mask, self.src_len)?;
        }
        for t in self.self_k.iter_mut().chain(self.self_v.iter_mut()) {
            keep(t, self_row)?;
        }
        self.starts = rows.iter().map(|&r| self.starts[r]).collect();
        if rows.len() > self.scratch.rows {
            self.scratch = DecoderScratch::new(backend, rows.len(), self.dims)?;
        }
        self.batch = rows.len();
        self.layout = new_layout();
        Ok(())
    }
}
