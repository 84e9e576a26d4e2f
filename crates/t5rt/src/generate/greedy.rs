//! Greedy search over one padded batch; finished sequences leave the batch at once.

use crate::backend::Backend;
use crate::error::Result;
use crate::model::T5Model;

/// Greedy decoding of one batch. Returns, per input, the generated ids after the decoder
/// start token, up to and including EOS when produced.
pub fn greedy_batch<B: Backend>(
    model: &T5Model<B>,
    inputs: &[Vec<u32>],
    max_new_tokens: usize,
    min_new_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    let cfg = &model.config;
    let backend = &model.backend;
    let enc = model.encode(inputs)?;
    let mut state = model.start_decoding(&enc, max_new_tokens)?;
    drop(enc);
    let mut outputs = vec![Vec::with_capacity(max_new_tokens); inputs.len()];
    // `active[r]` is the input index decoded in row r of the state.
    let mut active: Vec<usize> = (0..inputs.len()).collect();
    let mut tokens = vec![cfg.decoder_start_token_id; inputs.len()];
    for step in 0..max_new_tokens {
        let rows = active.len();
        let logits = model.decode_step(&tokens, &mut state)?;
        if step < min_new_tokens {
            // min_new_tokens: EOS is banned until enough tokens were generated (as HF does).
            let eos = cfg.eos_token_id as usize;
            backend.fill_column(logits, rows, cfg.vocab_size, eos, f32::NEG_INFINITY)?;
        }
        let next = backend.argmax_rows(logits, rows, cfg.vocab_size)?;
        let mut keep = Vec::with_capacity(rows);
        for (r, &id) in next.iter().enumerate() {
            outputs[active[r]].push(id);
            if id != cfg.eos_token_id {
                keep.push(r);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < rows {
            // Finished sequences stop costing compute: drop their rows from the state.
            state.select(backend, &keep)?;
            active = keep.iter().map(|&r| active[r]).collect();
        }
        tokens = keep.iter().map(|&r| next[r]).collect();
    }
    Ok(outputs)
}
