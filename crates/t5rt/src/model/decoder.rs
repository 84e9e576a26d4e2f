//! The decoder: cross-attention keys/values once per request, then one token per step.

use crate::backend::{
    AttnShape, Backend, BiasLayout, CacheWrite, CrossAttnCall, MatDims, SelfAttnCall, StepPlan,
};
use crate::error::{Result, T5Error};

use super::ffn::feed_forward;
use super::relpos::decoder_bias_table;
use super::state::{DecoderScratch, DecoderState, EncoderOutput, ScratchDims};
use super::T5Model;

/// Positions the self-attention caches hold before their first doubling.
pub const INITIAL_CACHE_POSITIONS: usize = 256;

impl<B: Backend> T5Model<B> {
    /// Prepares decoding of `enc`'s batch for up to `max_steps` steps: preallocates the
    /// self-attention caches (for up to [`INITIAL_CACHE_POSITIONS`] positions; they double
    /// when full) and projects the cross-attention keys/values, once.
    pub fn start_decoding(
        &self,
        enc: &EncoderOutput<B::Tensor>,
        max_steps: usize,
    ) -> Result<DecoderState<B::Tensor>> {
        let initial = max_steps.min(INITIAL_CACHE_POSITIONS);
        self.start_decoding_with_capacity(enc, max_steps, initial, 1)
    }

    /// Like [`Self::start_decoding`], with `group` decoded rows per source sequence (the beams
    /// of beam search): row `r` decodes source `r / group`, and the cross-attention keys/values
    /// are projected and stored once per source, shared by its rows.
    pub fn start_grouped_decoding(
        &self,
        enc: &EncoderOutput<B::Tensor>,
        max_steps: usize,
        group: usize,
    ) -> Result<DecoderState<B::Tensor>> {
        let initial = max_steps.min(INITIAL_CACHE_POSITIONS);
        self.start_decoding_with_capacity(enc, max_steps, initial, group)
    }

    /// [`Self::start_grouped_decoding`] with the caches first sized for `capacity` positions.
    pub fn start_decoding_with_capacity(
        &self,
        enc: &EncoderOutput<B::Tensor>,
        max_steps: usize,
        capacity: usize,
        group: usize,
    ) -> Result<DecoderState<B::Tensor>> {
        let cfg = &self.config;
        let b = &self.backend;
        let (d, inner) = (cfg.d_model, cfg.inner_dim());
        if group == 0 {
            return Err(T5Error::Input(
                "a decoding group needs at least one row".into(),
            ));
        }
        let max_steps = max_steps.max(1);
        let capacity = capacity.clamp(1, max_steps);
        let batch = enc.batch * group;
        let rows = enc.batch * enc.src_len;
        let proj = MatDims {
            m: rows,
            n: inner,
            k: d,
        };
        // With reduced-precision weights the cross-attention keys/values (the largest memory
        // stream of batched decoding) are kept in bf16, and with int8 weights in int8 where
        // the backend can (f32 keeps them exact, for parity).
        use crate::backend::{KvFormat, WeightDtype};
        let cross_kv = match b.weight_dtype() {
            _ if self.params.cross_cache_f32 => KvFormat::F32,
            WeightDtype::F32 => KvFormat::F32,
            WeightDtype::Int8 if b.int8_kv() && KvFormat::Int8.fits(cfg.d_kv) => KvFormat::Int8,
            _ if KvFormat::Bf16.fits(cfg.d_kv) => KvFormat::Bf16,
            _ => KvFormat::F32,
        };
        // The self-attention caches in bf16 likewise, where the backend can (their traffic
        // grows with the output: about a sixth of a batched bf16 step's bytes at 64 tokens).
        let self_kv = match b.weight_dtype() {
            WeightDtype::F32 => KvFormat::F32,
            _ if self.params.self_cache_f32 || !b.bf16_self_kv() => KvFormat::F32,
            _ if KvFormat::Bf16.fits(cfg.d_kv) => KvFormat::Bf16,
            _ => KvFormat::F32,
        };
        let self_slots = self_kv.slots_per_position(cfg.num_heads, cfg.d_kv);
        let mut self_k = Vec::with_capacity(cfg.num_decoder_layers);
        let mut self_v = Vec::with_capacity(cfg.num_decoder_layers);
        let mut cross_k = Vec::with_capacity(cfg.num_decoder_layers);
        let mut cross_v = Vec::with_capacity(cfg.num_decoder_layers);
        // Compressed caches are made from one pair of f32 products reused by every layer.
        let mut scratch = match cross_kv {
            KvFormat::F32 => None,
            _ => Some([b.zeros(rows * inner)?, b.zeros(rows * inner)?]),
        };
        for layer in &self.params.decoder {
            self_k.push(b.zeros(batch * capacity * self_slots)?);
            self_v.push(b.zeros(batch * capacity * self_slots)?);
            let ws = [&layer.cross_attn.k, &layer.cross_attn.v];
            let [k, v] = match scratch.as_mut() {
                None => {
                    let (mut k, mut v) = (b.zeros(rows * inner)?, b.zeros(rows * inner)?);
                    b.matmul_nt_shared(&enc.hidden, &ws, &mut [&mut k, &mut v], proj)?;
                    [k, v]
                }
                Some([k, v]) => {
                    b.matmul_nt_shared(&enc.hidden, &ws, &mut [&mut *k, &mut *v], proj)?;
                    if cross_kv == KvFormat::Bf16 {
                        [
                            b.compress_kv(k, rows * inner)?,
                            b.compress_kv(v, rows * inner)?,
                        ]
                    } else {
                        [
                            b.quantize_kv(k, rows, cfg.num_heads, cfg.d_kv)?,
                            b.quantize_kv(v, rows, cfg.num_heads, cfg.d_kv)?,
                        ]
                    }
                }
            };
            cross_k.push(k);
            cross_v.push(v);
        }
        let dims = ScratchDims {
            d_model: d,
            inner,
            d_ff: cfg.d_ff,
            vocab: cfg.vocab_size,
        };
        let all: Vec<usize> = (0..enc.batch).collect();
        Ok(DecoderState {
            batch,
            group,
            step: 0,
            capacity,
            max_steps,
            src_len: enc.src_len,
            self_k,
            self_v,
            self_kv,
            self_slots,
            cross_k,
            cross_v,
            cross_kv,
            cross_slots: cross_kv.slots_per_position(cfg.num_heads, cfg.d_kv),
            cross_mask: b.gather_rows(&enc.mask, &all, enc.src_len)?,
            starts: vec![0; batch],
            scratch: DecoderScratch::new(b, batch, dims)?,
            dims,
            self_bias: None,
            layout: super::state::new_layout(),
        })
    }

    /// Feeds one token per sequence; returns the next-token logits `[batch, vocab]`.
    pub fn decode_step<'s>(
        &self,
        tokens: &[u32],
        state: &'s mut DecoderState<B::Tensor>,
    ) -> Result<&'s mut B::Tensor> {
        self.run_step(tokens, state, true)?;
        Ok(&mut state.scratch.logits)
    }

    /// [`T5Model::decode_step`] for greedy search: each sequence's next token, the first
    /// largest of its logits with token `banned` (if any) at -inf, as
    /// [`Backend::argmax_rows`] gives it on [`T5Model::decode_step`]'s logits. With an LM head
    /// that the backend screens ([`Backend::screened_argmax`]), most logits are never computed
    /// by the head itself; the choice is the same.
    pub fn decode_step_greedy(
        &self,
        tokens: &[u32],
        state: &mut DecoderState<B::Tensor>,
        banned: Option<u32>,
    ) -> Result<Vec<u32>> {
        let (b, rows, vocab) = (&self.backend, tokens.len(), self.config.vocab_size);
        match &self.params.screen {
            Some(screen) => {
                self.run_step(tokens, state, false)?;
                let (x, head) = (&state.scratch.normed, &self.params.lm_head);
                let col = banned.map(|t| t as usize);
                let scratch = &mut state.scratch.logits;
                if let Some(ids) = b.screened_argmax(x, head, screen, rows, col, scratch)? {
                    return Ok(ids);
                }
                // The screen could not decide: the head in full, as below.
                self.lm_head(&mut state.scratch, rows)?;
            }
            None => self.run_step(tokens, state, true)?,
        }
        let logits = &mut state.scratch.logits;
        if let Some(col) = banned {
            b.fill_column(logits, rows, vocab, col as usize, f32::NEG_INFINITY)?;
        }
        b.argmax_rows(logits, rows, vocab)
    }

    /// A decoding step up to the final norm (and its scale, with tied embeddings), which
    /// leaves the decoder's output in the scratch's `normed`; then the LM head with `head`.
    fn run_step(
        &self,
        tokens: &[u32],
        state: &mut DecoderState<B::Tensor>,
        head: bool,
    ) -> Result<()> {
        let cfg = &self.config;
        let b = &self.backend;
        let batch = state.batch;
        if tokens.len() != batch {
            return Err(T5Error::Input(format!(
                "decode_step got {} tokens for a batch of {batch}",
                tokens.len()
            )));
        }
        if state.step >= state.capacity {
            // Positions no row reads any more go first (rows that joined later); then the
            // caches double.
            state.compact(b)?;
        }
        let pos = state.step;
        if pos >= state.max_steps {
            return Err(T5Error::Input(format!(
                "decoding past the {} steps the state was started for",
                state.max_steps
            )));
        }
        if pos >= state.capacity {
            state.grow(b)?;
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(T5Error::Input(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        let heads = cfg.num_heads;
        // Causal buckets for the one new query at `pos` over keys 0..=pos, shared by all layers
        // and steps: one table for the whole decode, made (and uploaded) at the first step.
        // Rows of max_steps values cover every step (pos < max_steps, checked above).
        if state.self_bias.is_none() {
            state.self_bias = Some(b.upload(&decoder_bias_table(
                &self.params.decoder_relpos,
                heads,
                state.max_steps,
                cfg.relative_attention_max_distance,
            ))?);
        }
        // Rows that joined a running batch mask the positions before their first token.
        let self_mask = state.self_mask().map(|m| b.upload(&m)).transpose()?;
        // A step with a mask is not recorded (the mask changes every step), nor one without
        // the head (recordings are of whole steps).
        let layout = (self_mask.is_none() && head).then_some(state.layout);
        match b.begin_step(layout, pos, tokens)? {
            StepPlan::Replayed => {}
            StepPlan::Eager => self.step_ops(tokens, state, self_mask.as_ref(), head)?,
            StepPlan::Capture => {
                let recorded = self.step_ops(tokens, state, self_mask.as_ref(), head);
                if !b.end_step(recorded.is_ok())? {
                    // The recording failed: run the step as it comes.
                    self.step_ops(tokens, state, self_mask.as_ref(), head)?;
                }
            }
        }
        state.step += 1;
        Ok(())
    }

    /// The operations of one decoding step at position `state.step`, logits in the scratch
    /// (without `head`: the decoder's output, normed and scaled for the head).
    fn step_ops(
        &self,
        tokens: &[u32],
        state: &mut DecoderState<B::Tensor>,
        self_mask: Option<&B::Tensor>,
        head: bool,
    ) -> Result<()> {
        let cfg = &self.config;
        let b = &self.backend;
        let batch = state.batch;
        let pos = state.step;
        let (d, inner, heads, eps) = (
            cfg.d_model,
            cfg.inner_dim(),
            cfg.num_heads,
            cfg.layer_norm_epsilon,
        );
        let bias = state
            .self_bias
            .as_ref()
            .ok_or_else(|| T5Error::Input("decoding step before its bias table".into()))?;
        let self_shape = AttnShape {
            batch,
            heads,
            d_kv: cfg.d_kv,
            q_len: 1,
            kv_len: pos + 1,
            kv_stride: state.capacity,
            kv_group: 1,
            // The decode's table: query `pos` reads the last `pos + 1` values of each row.
            bias: BiasLayout::Rows {
                stride: state.max_steps,
            },
            kv: state.self_kv,
        };
        let cross_shape = AttnShape {
            kv_len: state.src_len,
            kv_stride: state.src_len,
            kv_group: state.group,
            kv: state.cross_kv,
            ..self_shape
        };
        let proj = MatDims {
            m: batch,
            n: inner,
            k: d,
        };
        let out_proj = MatDims {
            m: batch,
            n: d,
            k: inner,
        };
        let s = &mut state.scratch;

        self.embed(tokens, &mut s.x)?;
        for (l, layer) in self.params.decoder.iter().enumerate() {
            // self-attention over the cache, extended by this position; x += attention · oᵀ
            let call = SelfAttnCall {
                norm: &layer.self_norm,
                eps,
                ws: [&layer.self_attn.q, &layer.self_attn.k, &layer.self_attn.v],
                o: &layer.self_attn.o,
                bias: Some(bias),
                mask: self_mask,
                shape: self_shape,
                proj,
                out_proj,
            };
            let cache = CacheWrite {
                k_cache: &mut state.self_k[l],
                v_cache: &mut state.self_v[l],
                capacity: state.capacity,
                pos,
                kv: state.self_kv,
            };
            let qkv = [&mut s.q, &mut s.k, &mut s.v];
            b.self_attention_out(call, &mut s.x, &mut s.normed, qkv, cache, &mut s.attn)?;

            // cross-attention over the encoder output (keys/values projected at start); no
            // position bias, only the source padding mask
            let call = CrossAttnCall {
                norm: &layer.cross_norm,
                eps,
                wq: &layer.cross_attn.q,
                o: &layer.cross_attn.o,
                k: &state.cross_k[l],
                v: &state.cross_v[l],
                mask: Some(&state.cross_mask),
                shape: cross_shape,
                proj,
                out_proj,
            };
            b.cross_attention_out(call, &mut s.x, &mut s.normed, &mut s.q, &mut s.attn)?;

            // feed-forward
            feed_forward(
                b,
                cfg,
                &layer.ffn,
                &layer.ffn_norm,
                &mut s.x,
                &mut s.normed,
                &mut s.ff,
                &mut s.ff_up,
                batch,
            )?;
        }
        b.rms_norm(
            &s.x,
            &self.params.decoder_norm,
            &mut s.normed,
            batch,
            d,
            eps,
        )?;
        if cfg.tie_word_embeddings {
            // Tied embeddings (t5 v1.0): scale by d_model ** -0.5 before the shared head.
            b.scale(&mut s.normed, batch * d, (d as f32).powf(-0.5))?;
        }
        if head {
            self.lm_head(s, batch)?;
        }
        Ok(())
    }

    /// The LM head on the decoder's output in the scratch (normed, and scaled with tied
    /// embeddings): `batch` rows of logits.
    fn lm_head(&self, s: &mut DecoderScratch<B::Tensor>, batch: usize) -> Result<()> {
        let cfg = &self.config;
        let dims = MatDims {
            m: batch,
            n: cfg.vocab_size,
            k: cfg.d_model,
        };
        self.backend
            .matmul_nt(&s.normed, &self.params.lm_head, &mut s.logits, dims, false)
    }
}
