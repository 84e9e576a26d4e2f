//! Search strategies: greedy, sampling (`greedy`, `sampling`) and beam search (`beam`),
//! with Hugging Face's logits processors (`logits`), and teacher-forced scoring ([`score`]). They only call `encode`,
//! `start_decoding` / `start_grouped_decoding`, `decode_step` and `DecoderState::select`;
//! grouping requests into padded batches happens here, once.

mod beam;
mod config;
mod greedy;
pub(crate) mod logits;
pub mod memory;
pub(crate) mod sampling;
mod score;
mod stop;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::backend::Backend;
use crate::error::{Result, T5Error};
use crate::model::T5Model;
use crate::tokenizer::T5Tokenizer;

pub use config::{EarlyStopping, GenerationConfig, Limits};
pub use score::{score, score_cancellable, TargetScore};
pub use stop::StopStrings;

/// One generated sequence: the ids after the decoder start token, up to and including EOS
/// when produced, and its beam score (length-normalised log-probability; beam search only).
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub ids: Vec<u32>,
    pub score: Option<f32>,
}

/// Where generation spent its time (wall clock), summed over batches.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerationStats {
    /// Seconds in the encoder.
    pub encode_secs: f64,
    /// Seconds in everything after it: cross-attention projections, decoding steps, search.
    pub decode_secs: f64,
    /// Tokens generated, over all returned sequences.
    pub new_tokens: usize,
}

/// Generates for any number of inputs and returns, per input and in input order, the
/// `num_return_sequences` best (beam search) or drawn (sampling) sequences, best first.
///
/// Inputs are grouped by length into padded batches of at most `batch_size` inputs; a
/// sequence's tokens do not depend on its batch. Every input and option is checked before
/// any work starts. `tokenizer` is needed only for stop strings. `progress` is called with
/// the number of inputs finished after each batch.
pub fn generate<B: Backend>(
    model: &T5Model<B>,
    inputs: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&T5Tokenizer>,
    progress: impl FnMut(usize),
) -> Result<Vec<Vec<Hypothesis>>> {
    Ok(generate_with_stats(model, inputs, cfg, tokenizer, progress)?.0)
}

/// [`generate`], also reporting where the time went.
pub fn generate_with_stats<B: Backend>(
    model: &T5Model<B>,
    inputs: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&T5Tokenizer>,
    progress: impl FnMut(usize),
) -> Result<(Vec<Vec<Hypothesis>>, GenerationStats)> {
    let never = AtomicBool::new(false);
    generate_cancellable(model, inputs, cfg, tokenizer, progress, &never)
}

/// [`generate_with_stats`] that stops with [`T5Error::Cancelled`] at the next decoding step
/// once `cancel` is set (from another thread: a Ctrl-C handler, a client that went away).
pub fn generate_cancellable<B: Backend>(
    model: &T5Model<B>,
    inputs: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&T5Tokenizer>,
    mut progress: impl FnMut(usize),
    cancel: &AtomicBool,
) -> Result<(Vec<Vec<Hypothesis>>, GenerationStats)> {
    cfg.validate(&model.config)?;
    model.check_inputs(inputs)?;
    if let Some((i, seq)) = inputs
        .iter()
        .enumerate()
        .find(|(_, seq)| seq.len() > cfg.max_input_tokens)
    {
        return Err(T5Error::Input(format!(
            "input {i} has {} tokens, more than the limit of {} (raise --max-input-tokens to allow it)",
            seq.len(),
            cfg.max_input_tokens
        )));
    }
    let stop = match (cfg.stop_strings.is_empty(), tokenizer) {
        (true, _) => None,
        (false, Some(tokenizer)) => Some(StopStrings {
            strings: &cfg.stop_strings,
            tokenizer,
        }),
        (false, None) => {
            return Err(T5Error::Input(
                "stop strings need the model's tokenizer.json".into(),
            ))
        }
    };
    // Longest first, so each padded batch holds sequences of similar length.
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(inputs[i].len()));
    // Units of work: sources with their beams, or (greedy, sampling) each returned copy of an
    // input, decoded as its own row with its own random stream (input index * n + copy), so
    // results do not depend on how units are batched.
    let (beams, copies) = if cfg.num_beams > 1 {
        (cfg.num_beams, 1)
    } else {
        (1, cfg.num_return_sequences)
    };
    let units: Vec<(usize, usize)> = order
        .iter()
        .flat_map(|&i| (0..copies).map(move |j| (i, j)))
        .collect();
    // As many units per batch as `batch_size` asks (inputs, each with its copies), or fewer
    // when the memory plan of the worst batch (the longest inputs come first) says so.
    let longest = inputs.iter().map(Vec::len).max().unwrap_or(0);
    let limit = cfg.new_token_limit();
    let per_batch = memory::fit_batch(
        &model.config,
        model.backend.weight_dtype(),
        cfg,
        memory::available_for(&model.backend),
        cfg.batch_size.saturating_mul(copies),
        |n| memory::BatchShape::on(model, n, beams, longest, limit),
    )?;
    let mut outputs: Vec<Vec<Hypothesis>> = vec![Vec::new(); inputs.len()];
    let mut done = 0;
    let mut stats = GenerationStats::default();
    for chunk in units.chunks(per_batch) {
        let started = std::time::Instant::now();
        let (results, encode_secs) = model
            .backend
            .run(|| generate_batch(model, inputs, chunk, cfg, stop.as_ref(), cancel))?;
        stats.encode_secs += encode_secs;
        stats.decode_secs += started.elapsed().as_secs_f64() - encode_secs;
        stats.new_tokens += results.iter().flatten().map(|h| h.ids.len()).sum::<usize>();
        for (&(i, _), out) in chunk.iter().zip(results) {
            outputs[i].extend(out);
            if outputs[i].len() == cfg.num_return_sequences {
                done += 1;
            }
        }
        progress(done);
    }
    Ok((outputs, stats))
}

/// [`T5Error::Cancelled`] once `cancel` is set: checked before each decoding step.
pub(crate) fn check_cancel(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        return Err(T5Error::Cancelled);
    }
    Ok(())
}

/// One padded batch of units (input index, copy): per unit, its hypotheses (beam search:
/// the n best; otherwise the one sequence of that copy). Also returns the seconds spent
/// encoding.
fn generate_batch<B: Backend>(
    model: &T5Model<B>,
    inputs: &[Vec<u32>],
    chunk: &[(usize, usize)],
    cfg: &GenerationConfig,
    stop: Option<&StopStrings>,
    cancel: &AtomicBool,
) -> Result<(Vec<Vec<Hypothesis>>, f64)> {
    let batch: Vec<Vec<u32>> = chunk.iter().map(|&(i, _)| inputs[i].clone()).collect();
    if cfg.num_beams > 1 {
        return beam::beam_search(model, &batch, cfg, cancel);
    }
    let n = cfg.num_return_sequences;
    let streams: Vec<u64> = chunk.iter().map(|&(i, j)| (i * n + j) as u64).collect();
    let (outs, encode_secs) = greedy::decode_rows(model, &batch, cfg, &streams, stop, cancel)?;
    let hyps = outs
        .into_iter()
        .map(|ids| vec![Hypothesis { ids, score: None }])
        .collect();
    Ok((hyps, encode_secs))
}
