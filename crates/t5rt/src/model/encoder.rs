//! The encoder: a padded batch of token ids -> hidden states, one pass.

use crate::backend::{AttnShape, Backend, MatDims};
use crate::error::{Result, T5Error};

use super::ffn::feed_forward;
use super::relpos::bias_lines;
use super::state::EncoderOutput;
use super::T5Model;

impl<B: Backend> T5Model<B> {
    /// Encodes a batch of sequences (padded here to the longest, with an attention mask).
    pub fn encode(&self, inputs: &[Vec<u32>]) -> Result<EncoderOutput<B::Tensor>> {
        let cfg = &self.config;
        let b = &self.backend;
        self.check_inputs(inputs)?;
        let batch = inputs.len();
        let src_len = inputs.iter().map(Vec::len).max().unwrap_or(0);
        let rows = batch * src_len;
        let (d, inner, heads) = (cfg.d_model, cfg.inner_dim(), cfg.num_heads);

        // Pad to [batch, src_len]; padding is masked out of every attention.
        let mut ids = vec![cfg.pad_token_id; rows];
        let mut mask = vec![f32::NEG_INFINITY; rows];
        for (i, seq) in inputs.iter().enumerate() {
            ids[i * src_len..i * src_len + seq.len()].copy_from_slice(seq);
            mask[i * src_len..i * src_len + seq.len()].fill(0.0);
        }
        let mask = b.upload(&mask)?;
        // Bidirectional buckets; layer 0's table, computed once and shared by all layers: a
        // line of distances per head, which the backend keeps or expands into rows.
        let lines = bias_lines(
            &self.params.encoder_relpos,
            heads,
            0,
            src_len,
            src_len,
            true,
            cfg.relative_attention_max_distance,
        );
        let (bias, bias_layout) = b.upload_position_bias(&lines, heads, src_len, src_len)?;
        drop(lines);

        let mut x = b.zeros(rows * d)?; // [batch, src_len, d_model]
        let mut normed = b.zeros(rows * d)?;
        let mut q = b.zeros(rows * inner)?;
        let mut k = b.zeros(rows * inner)?;
        let mut v = b.zeros(rows * inner)?;
        let mut attn = b.zeros(rows * inner)?;
        let mut ff = b.zeros(rows * cfg.d_ff)?;
        let mut ff_up = b.zeros(if cfg.is_gated_act { rows * cfg.d_ff } else { 0 })?;
        let shape = AttnShape {
            batch,
            heads,
            d_kv: cfg.d_kv,
            q_len: src_len,
            kv_len: src_len,
            kv_stride: src_len,
            kv_group: 1,
            bias: bias_layout,
            kv: crate::backend::KvFormat::F32,
        };
        let proj = MatDims {
            m: rows,
            n: inner,
            k: d,
        };
        let out_proj = MatDims {
            m: rows,
            n: d,
            k: inner,
        };

        self.embed(&ids, &mut x)?;
        for layer in &self.params.encoder {
            // self-attention sublayer
            b.norm_matmul_shared(
                &x,
                &layer.attn_norm,
                cfg.layer_norm_epsilon,
                &mut normed,
                &[&layer.attn.q, &layer.attn.k, &layer.attn.v],
                &mut [&mut q, &mut k, &mut v],
                proj,
            )?;
            b.attention(&q, &k, &v, Some(&bias), Some(&mask), &mut attn, shape)?;
            // residual: x += attn · oᵀ
            b.matmul_nt(&attn, &layer.attn.o, &mut x, out_proj, true)?;
            // feed-forward sublayer
            feed_forward(
                b,
                cfg,
                &layer.ffn,
                &layer.ffn_norm,
                &mut x,
                &mut normed,
                &mut ff,
                &mut ff_up,
                rows,
            )?;
        }
        let mut hidden = normed;
        b.rms_norm(
            &x,
            &self.params.encoder_norm,
            &mut hidden,
            rows,
            d,
            cfg.layer_norm_epsilon,
        )?;
        Ok(EncoderOutput {
            hidden,
            mask,
            lengths: inputs.iter().map(Vec::len).collect(),
            batch,
            src_len,
        })
    }

    /// Checks a batch before any work: at least one sequence, none empty, every id inside
    /// the vocabulary. Errors name the input by its index.
    pub fn check_inputs(&self, inputs: &[Vec<u32>]) -> Result<()> {
        if inputs.is_empty() {
            return Err(T5Error::Input("no sequences to encode".into()));
        }
        for (i, seq) in inputs.iter().enumerate() {
            if seq.is_empty() {
                return Err(T5Error::Input(format!("input {i} is empty")));
            }
            if let Some(&bad) = seq
                .iter()
                .find(|&&id| id as usize >= self.config.vocab_size)
            {
                return Err(T5Error::Input(format!(
                    "input {i} holds token id {bad}, outside the vocabulary of {} ids",
                    self.config.vocab_size
                )));
            }
        }
        Ok(())
    }
}
