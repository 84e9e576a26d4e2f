//! Search strategies. They only call `encode`, `start_decoding`, `decode_step` and
//! `DecoderState::select`; batching of requests into padded batches happens here, once.

mod greedy;

use crate::backend::Backend;
use crate::error::{Result, T5Error};
use crate::model::T5Model;

pub use greedy::greedy_batch;

/// Options of greedy generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Tokens generated at most per sequence (EOS included).
    pub max_new_tokens: usize,
    /// EOS is banned until this many tokens were generated (as HF's `min_new_tokens`).
    pub min_new_tokens: usize,
    /// Sequences decoded together at most.
    pub batch_size: usize,
    /// Longest input accepted, in tokens; longer inputs are refused, not truncated.
    pub max_input_tokens: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            min_new_tokens: 0,
            batch_size: 16,
            max_input_tokens: 1024,
        }
    }
}

impl GenerateOptions {
    fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            return Err(T5Error::Input("max_new_tokens must be at least 1".into()));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(T5Error::Input(format!(
                "min_new_tokens ({}) is larger than max_new_tokens ({})",
                self.min_new_tokens, self.max_new_tokens
            )));
        }
        if self.batch_size == 0 {
            return Err(T5Error::Input("batch_size must be at least 1".into()));
        }
        Ok(())
    }
}

/// Greedy generation for any number of inputs. Inputs are grouped by length into padded
/// batches of at most `batch_size` (a sequence's tokens do not depend on its batch), and the
/// outputs come back in input order: the ids after the decoder start token, up to and
/// including EOS when produced. `progress` is called with the number of sequences finished
/// after each batch. Every input is checked before any work starts.
pub fn generate<B: Backend>(
    model: &T5Model<B>,
    inputs: &[Vec<u32>],
    opts: &GenerateOptions,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Vec<u32>>> {
    opts.validate()?;
    model.check_inputs(inputs)?;
    if let Some((i, seq)) = inputs
        .iter()
        .enumerate()
        .find(|(_, seq)| seq.len() > opts.max_input_tokens)
    {
        return Err(T5Error::Input(format!(
            "input {i} has {} tokens, more than the limit of {} (raise --max-input-tokens to allow it)",
            seq.len(),
            opts.max_input_tokens
        )));
    }
    // Longest first, so each padded batch holds sequences of similar length.
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(inputs[i].len()));
    let mut outputs = vec![Vec::new(); inputs.len()];
    let mut done = 0;
    for chunk in order.chunks(opts.batch_size) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| inputs[i].clone()).collect();
        let results = model
            .backend
            .run(|| greedy_batch(model, &batch, opts.max_new_tokens, opts.min_new_tokens))?;
        for (&i, out) in chunk.iter().zip(results) {
            outputs[i] = out;
        }
        done += chunk.len();
        progress(done);
    }
    Ok(outputs)
}
