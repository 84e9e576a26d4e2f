//! Greedy search and sampling over one padded batch: one token per sequence per step.
//! Finished sequences leave the batch at once.

use crate::backend::Backend;
use crate::error::Result;
use crate::model::T5Model;

use super::config::GenerationConfig;
use super::logits::{argmax, Processors};
use super::sampling::Sampler;
use super::stop::StopStrings;

/// Decodes each input once. `streams[i]` names input `i`'s random stream when sampling.
/// Returns the generated ids after the decoder start token, up to and including EOS, and
/// the seconds spent in the encoder.
pub(crate) fn decode_rows<B: Backend>(
    model: &T5Model<B>,
    inputs: &[Vec<u32>],
    cfg: &GenerationConfig,
    streams: &[u64],
    stop: Option<&StopStrings>,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<(Vec<Vec<u32>>, f64)> {
    let mc = &model.config;
    let backend = &model.backend;
    let (vocab, eos) = (mc.vocab_size, mc.eos_token_id);
    let limit = cfg.new_token_limit();
    let procs = Processors::new(cfg, eos);
    let on_host = cfg.do_sample || procs.needs_host();
    let mut samplers: Vec<Sampler> = if cfg.do_sample {
        streams.iter().map(|&s| Sampler::new(cfg.seed, s)).collect()
    } else {
        Vec::new()
    };

    let started = std::time::Instant::now();
    let enc = model.encode(inputs)?;
    model.backend.synchronize()?; // the encoder's own time, on a GPU too
    let encode_secs = started.elapsed().as_secs_f64();
    let mut state = model.start_decoding(&enc, limit)?;
    drop(enc);
    // seqs[i]: HF's decoder input_ids of input i: the start token, then what was generated.
    let mut seqs: Vec<Vec<u32>> = (0..inputs.len())
        .map(|_| {
            // Grows with the tokens actually produced, not with the limit.
            let mut s = Vec::with_capacity((limit + 1).min(64));
            s.push(mc.decoder_start_token_id);
            s
        })
        .collect();
    // `active[r]` is the input decoded in row r of the state.
    let mut active: Vec<usize> = (0..inputs.len()).collect();
    let mut tokens = vec![mc.decoder_start_token_id; inputs.len()];
    for step in 0..limit {
        super::check_cancel(cancel)?;
        let rows = active.len();
        let next = if on_host {
            let logits = model.decode_step(&tokens, &mut state)?;
            let mut host = backend.download(logits, rows * vocab)?;
            let mut next = Vec::with_capacity(rows);
            for (r, row) in host.chunks_exact_mut(vocab).enumerate() {
                let i = active[r];
                procs.apply(&seqs[i], row);
                next.push(if cfg.do_sample {
                    samplers[i].sample(cfg, row)
                } else {
                    argmax(row)
                });
            }
            next
        } else {
            // min_new_tokens: EOS is banned until enough tokens were generated (as HF does).
            let banned = (step < cfg.min_new_tokens).then_some(eos);
            model.decode_step_greedy(&tokens, &mut state, banned)?
        };
        let mut keep = Vec::with_capacity(rows);
        for (r, &id) in next.iter().enumerate() {
            let seq = &mut seqs[active[r]];
            seq.push(id);
            let stopped = match stop {
                Some(stop) if id != eos => stop.hit(&seq[1..])?,
                _ => false,
            };
            if id != eos && !stopped {
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
    let outputs = seqs.into_iter().map(|mut s| s.split_off(1)).collect();
    Ok((outputs, encode_secs))
}
