//! Search strategies: greedy, sampling ([`greedy`], [`sampling`]) and beam search ([`beam`]),
//! with Hugging Face's logits processors ([`logits`]). They only call `encode`,
//! `start_decoding` / `start_grouped_decoding`, `decode_step` and `DecoderState::select`;
//! grouping requests into padded batches happens here, once.

mod beam;
mod config;
mod greedy;
mod logits;
mod sampling;
mod stop;

use crate::backend::Backend;
use crate::error::{Result, T5Error};
use crate::model::T5Model;
use crate::tokenizer::T5Tokenizer;

pub use config::{EarlyStopping, GenerationConfig};
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
    mut progress: impl FnMut(usize),
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
    let mut outputs = vec![Vec::new(); inputs.len()];
    let mut done = 0;
    let mut stats = GenerationStats::default();
    for chunk in order.chunks(cfg.batch_size) {
        let started = std::time::Instant::now();
        let (results, encode_secs) = model
            .backend
            .run(|| generate_batch(model, inputs, chunk, cfg, stop.as_ref()))?;
        stats.encode_secs += encode_secs;
        stats.decode_secs += started.elapsed().as_secs_f64() - encode_secs;
        stats.new_tokens += results.iter().flatten().map(|h| h.ids.len()).sum::<usize>();
        for (&i, out) in chunk.iter().zip(results) {
            outputs[i] = out;
        }
        done += chunk.len();
        progress(done);
    }
    Ok((outputs, stats))
}

/// One padded batch: the inputs `chunk` names. Also returns the seconds spent encoding.
fn generate_batch<B: Backend>(
    model: &T5Model<B>,
    inputs: &[Vec<u32>],
    chunk: &[usize],
    cfg: &GenerationConfig,
    stop: Option<&StopStrings>,
) -> Result<(Vec<Vec<Hypothesis>>, f64)> {
    if cfg.num_beams > 1 {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| inputs[i].clone()).collect();
        return beam::beam_search(model, &batch, cfg);
    }
    // Greedy or sampling: each input decoded num_return_sequences times, each copy with its
    // own random stream (input index * n + copy), so results do not depend on batching.
    let n = cfg.num_return_sequences;
    let mut batch = Vec::with_capacity(chunk.len() * n);
    let mut streams = Vec::with_capacity(chunk.len() * n);
    for &i in chunk {
        for j in 0..n {
            batch.push(inputs[i].clone());
            streams.push((i * n + j) as u64);
        }
    }
    let (outs, encode_secs) = greedy::decode_rows(model, &batch, cfg, &streams, stop)?;
    let hyps = outs
        .chunks(n)
        .map(|copies| {
            copies
                .iter()
                .map(|ids| Hypothesis {
                    ids: ids.clone(),
                    score: None,
                })
                .collect()
        })
        .collect();
    Ok((hyps, encode_secs))
}
