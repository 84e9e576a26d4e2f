//! Teacher-forced scoring: the log-probability the model gives each token of a given target,
//! as Hugging Face's forward pass with `labels` (log-softmax of the logits, gathered at the
//! labels) and CTranslate2's `score_batch` give. Useful on its own (ranking candidates,
//! evaluation) and to measure reduced precisions along a fixed path, without the butterfly
//! effect of free-running generation.

use std::sync::atomic::AtomicBool;

use crate::backend::Backend;
use crate::error::{Result, T5Error};
use crate::model::T5Model;

use super::config::{GenerationConfig, Limits};
use super::memory;

/// What [`score`] gives for one pair, one entry per target token.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TargetScore {
    /// The natural-log probability of each target token given the input and the target
    /// tokens before it.
    pub log_probs: Vec<f32>,
    /// The model's most likely token at each position (the first maximum of the logits):
    /// where it equals the target token, greedy search would have chosen it.
    pub top_ids: Vec<u32>,
}

/// Per pair (`inputs[i]`, `targets[i]`), the natural-log probability of each target token
/// given the input and the target tokens before it (the decoder starts from the model's
/// decoder start token, as in Hugging Face's `labels`). Targets are scored as given: a
/// tokenizer's ids for a text end with EOS, and that EOS is scored too.
///
/// Of `cfg`, `batch_size`, `max_input_tokens` and `max_memory` apply; pairs are batched by
/// input length and a pair's scores do not depend on its batch. Every input is checked
/// before any work starts.
pub fn score<B: Backend>(
    model: &T5Model<B>,
    inputs: &[Vec<u32>],
    targets: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<TargetScore>> {
    score_cancellable(model, inputs, targets, cfg, &AtomicBool::new(false))
}

/// [`score`] that stops with [`T5Error::Cancelled`] at the next step once `cancel` is set.
pub fn score_cancellable<B: Backend>(
    model: &T5Model<B>,
    inputs: &[Vec<u32>],
    targets: &[Vec<u32>],
    cfg: &GenerationConfig,
    cancel: &AtomicBool,
) -> Result<Vec<TargetScore>> {
    if inputs.len() != targets.len() {
        return Err(T5Error::Input(format!(
            "{} inputs but {} targets: give one target per input",
            inputs.len(),
            targets.len()
        )));
    }
    if cfg.batch_size == 0 {
        return Err(T5Error::Input("batch_size must be at least 1".into()));
    }
    model.check_inputs(inputs)?;
    let vocab = model.config.vocab_size;
    let most = Limits::MAX_NEW_TOKENS;
    for (i, (input, target)) in inputs.iter().zip(targets).enumerate() {
        if input.len() > cfg.max_input_tokens {
            return Err(T5Error::Input(format!(
                "input {i} has {} tokens, more than the limit of {} (raise --max-input-tokens to allow it)",
                input.len(),
                cfg.max_input_tokens
            )));
        }
        if target.is_empty() {
            return Err(T5Error::Input(format!("target {i} is empty")));
        }
        if target.len() > most {
            return Err(T5Error::Input(format!(
                "target {i} has {} tokens, more than the limit of {most}",
                target.len()
            )));
        }
        if let Some(&bad) = target.iter().find(|&&id| id as usize >= vocab) {
            return Err(T5Error::Input(format!(
                "target {i} holds token id {bad}, outside the vocabulary of {vocab} ids"
            )));
        }
    }
    // Longest inputs first, so each padded batch holds inputs of similar length.
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(inputs[i].len()));
    let longest_input = inputs.iter().map(Vec::len).max().unwrap_or(0);
    let longest_target = targets.iter().map(Vec::len).max().unwrap_or(0);
    let per_batch = memory::fit_batch(
        &model.config,
        model.backend.weight_dtype(),
        cfg,
        memory::available_for(&model.backend),
        cfg.batch_size,
        |n| memory::BatchShape::on(model, n, 1, longest_input, longest_target),
    )?;
    let mut out = vec![TargetScore::default(); inputs.len()];
    for chunk in order.chunks(per_batch) {
        let scores = model
            .backend
            .run(|| score_batch(model, inputs, targets, chunk, cancel))?;
        for (&i, s) in chunk.iter().zip(scores) {
            out[i] = s;
        }
    }
    Ok(out)
}

/// One padded batch of pair indices: the decoder is fed the start token, then each target's
/// tokens one step at a time (the cache makes this the same computation as one causal pass);
/// a row leaves the batch after its last target token.
fn score_batch<B: Backend>(
    model: &T5Model<B>,
    inputs: &[Vec<u32>],
    targets: &[Vec<u32>],
    chunk: &[usize],
    cancel: &AtomicBool,
) -> Result<Vec<TargetScore>> {
    let (backend, vocab) = (&model.backend, model.config.vocab_size);
    let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| inputs[i].clone()).collect();
    let steps = chunk.iter().map(|&i| targets[i].len()).max().unwrap_or(0);
    let enc = model.encode(&batch)?;
    let mut state = model.start_decoding(&enc, steps)?;
    drop(enc);
    let mut scores: Vec<TargetScore> = chunk
        .iter()
        .map(|&i| TargetScore {
            log_probs: Vec::with_capacity(targets[i].len()),
            top_ids: Vec::with_capacity(targets[i].len()),
        })
        .collect();
    // active[r]: the chunk position decoded in row r.
    let mut active: Vec<usize> = (0..chunk.len()).collect();
    let mut tokens = vec![model.config.decoder_start_token_id; chunk.len()];
    for step in 0..steps {
        super::check_cancel(cancel)?;
        let rows = active.len();
        let logits = model.decode_step(&tokens, &mut state)?;
        let host = backend.download(logits, rows * vocab)?;
        let mut keep = Vec::with_capacity(rows);
        for (r, row) in host.chunks_exact(vocab).enumerate() {
            let target = &targets[chunk[active[r]]];
            let s = &mut scores[active[r]];
            s.log_probs.push(log_softmax_at(row, target[step] as usize));
            s.top_ids.push(crate::math::argmax(row));
            if step + 1 < target.len() {
                keep.push(r);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < rows {
            state.select(backend, &keep)?;
        }
        tokens = keep
            .iter()
            .map(|&r| targets[chunk[active[r]]][step])
            .collect();
        active = keep.iter().map(|&r| active[r]).collect();
    }
    Ok(scores)
}

/// `log(softmax(row))[at]`, with the sum in f64.
pub(crate) fn log_softmax_at(row: &[f32], at: usize) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    (row[at] as f64 - max - sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::log_softmax_at;

    #[test]
    fn log_softmax_sums_to_one_and_is_shift_free() {
        let row = [1.0f32, 2.0, 3.0, -50.0];
        let total: f64 = (0..4).map(|i| (log_softmax_at(&row, i) as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        let shifted: Vec<f32> = row.iter().map(|x| x + 1000.0).collect();
        assert!((log_softmax_at(&row, 2) - log_softmax_at(&shifted, 2)).abs() < 1e-4);
        assert!(log_softmax_at(&row, 3) < -50.0);
    }
}
