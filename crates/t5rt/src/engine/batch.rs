//! The running batch: one decoding state whose rows are requests, each with its own options,
//! sequence, sampler and stop rule. Rows join between steps ([`Batch::admit`]) and leave as
//! soon as they finish ([`Batch::step`]).

use std::time::Instant;

use super::{Event, FinishReason, Finished, Pending, Token};
use crate::backend::Backend;
use crate::error::Result;
use crate::generate::logits::{argmax, Processors};
use crate::generate::sampling::Sampler;
use crate::generate::StopStrings;
use crate::model::{DecoderState, T5Model};
use crate::tokenizer::T5Tokenizer;

/// One request in the batch.
struct Row {
    req: Pending,
    /// HF's decoder `input_ids`: the start token, then what was generated.
    seq: Vec<u32>,
    tokens: Vec<Token>,
    sampler: Option<Sampler>,
    admitted: Instant,
}

impl Row {
    fn new(req: Pending, start: u32) -> Row {
        // Stream 0: a request is one input, as `generate` numbers its first input.
        let sampler = req.cfg.do_sample.then(|| Sampler::new(req.cfg.seed, 0));
        Row {
            req,
            seq: vec![start],
            tokens: Vec::new(),
            sampler,
            admitted: Instant::now(),
        }
    }

    /// Chooses the next token from this row's logits (processed in place).
    fn choose(&mut self, scores: &mut [f32], eos: u32) -> Token {
        let cfg = &self.req.cfg;
        Processors::new(cfg, eos).apply(&self.seq, scores);
        let lse = log_sum_exp(scores);
        let (id, chosen) = match &mut self.sampler {
            Some(sampler) => {
                let mut warped = scores.to_vec();
                let id = sampler.sample(cfg, &mut warped);
                (id, scores[id as usize])
            }
            None => {
                let id = argmax(scores);
                (id, scores[id as usize])
            }
        };
        let logprob = (chosen - lse).is_finite().then_some(chosen - lse);
        Token { id, logprob }
    }

    fn finish(self, reason: FinishReason) {
        let total_time = self.req.submitted.elapsed();
        let queue_time = self.admitted.duration_since(self.req.submitted);
        let done = Finished {
            ids: self.seq[1..].to_vec(),
            tokens: self.tokens,
            finish_reason: reason,
            sequences: Vec::new(),
            input_tokens: self.req.input.len(),
            queue_time,
            total_time,
        };
        self.req.send(Event::Done(done));
    }
}

/// log Σ exp(x), stable; -inf for an all -inf row.
fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The decoding batch.
pub(super) struct Batch<T> {
    state: DecoderState<T>,
    rows: Vec<Row>,
}

impl<T> Batch<T> {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Tokens the rows hold (each: input plus its new-token limit), for the batch budget.
    pub fn tokens(&self) -> usize {
        self.rows.iter().map(|r| r.req.tokens()).sum()
    }

    /// Sends `message` to every row and empties the batch (a failed step).
    pub fn fail_all(self, message: &str, done: &impl Fn()) {
        for row in self.rows {
            row.req.send(Event::Error(message.to_string()));
            done();
        }
    }
}

/// Encodes `reqs` together and appends them to `batch` (or makes it one). The caches may
/// hold `max_steps` positions at most. On failure the requests concerned get an error event
/// (all of the batch's, when joining the running state failed half-way) and `done` is called
/// once for each.
pub(super) fn admit<B: Backend>(
    model: &T5Model<B>,
    batch: &mut Option<Batch<B::Tensor>>,
    reqs: Vec<Pending>,
    max_steps: usize,
    done: impl Fn(),
) {
    let start = model.config.decoder_start_token_id;
    // Each input is encoded alone (no encoder work on padding: arrivals differ in length),
    // then their fresh states are joined into one before joining the running batch.
    let fresh = reqs
        .iter()
        .try_fold(None, |acc: Option<DecoderState<B::Tensor>>, r| {
            let enc = model.encode(std::slice::from_ref(&r.input))?;
            let state = model.start_decoding(&enc, max_steps)?;
            Ok::<_, crate::error::T5Error>(Some(match acc {
                None => state,
                Some(mut joined) => {
                    joined.append(&model.backend, state)?;
                    joined
                }
            }))
        });
    let fresh = match fresh {
        Ok(None) => return, // nothing admitted
        Ok(Some(state)) => state,
        Err(e) => {
            for r in reqs {
                r.send(Event::Error(e.to_string()));
                done();
            }
            return;
        }
    };
    let rows: Vec<Row> = reqs.into_iter().map(|r| Row::new(r, start)).collect();
    *batch = match batch.take() {
        None => Some(Batch { state: fresh, rows }),
        Some(mut b) => match b.state.append(&model.backend, fresh) {
            Ok(()) => {
                b.rows.extend(rows);
                Some(b)
            }
            Err(e) => {
                let message = e.to_string();
                b.fail_all(&message, &done);
                for r in rows {
                    r.req.send(Event::Error(message.clone()));
                    done();
                }
                None
            }
        },
    };
}

impl<T> Batch<T> {
    /// One decoding step for every row: each chooses its token by its own options, its
    /// client gets the token, and finished or cancelled rows leave the batch. `done` is
    /// called once per request that left.
    pub fn step<B: Backend<Tensor = T>>(
        &mut self,
        model: &T5Model<B>,
        tokenizer: Option<&T5Tokenizer>,
        done: impl Fn(),
    ) -> Result<()> {
        let (vocab, eos) = (model.config.vocab_size, model.config.eos_token_id);
        let tokens: Vec<u32> = self.rows.iter().map(|r| *r.seq.last().unwrap()).collect();
        let logits = model.decode_step(&tokens, &mut self.state)?;
        let mut host = model.backend.download(logits, tokens.len() * vocab)?;
        let mut keep = Vec::with_capacity(self.rows.len());
        let mut finished = Vec::new();
        for (r, (row, scores)) in self
            .rows
            .iter_mut()
            .zip(host.chunks_exact_mut(vocab))
            .enumerate()
        {
            let token = row.choose(scores, eos);
            row.seq.push(token.id);
            row.tokens.push(token);
            let alive = row.req.send(Event::Token(token)) && !row.req.is_cancelled();
            let reason = if token.id == eos {
                Some(FinishReason::EosToken)
            } else if match tokenizer {
                Some(tokenizer) if !row.req.cfg.stop_strings.is_empty() => StopStrings {
                    strings: &row.req.cfg.stop_strings,
                    tokenizer,
                }
                .hit(&row.seq[1..])?,
                _ => false,
            } {
                Some(FinishReason::StopSequence)
            } else if row.seq.len() > row.req.cfg.new_token_limit() {
                Some(FinishReason::Length)
            } else {
                None
            };
            match (alive, reason) {
                (true, None) => keep.push(r),
                (true, Some(reason)) => finished.push((r, reason)),
                (false, _) => finished.push((r, FinishReason::Length)), // gone: no event
            }
        }
        if keep.len() < self.rows.len() {
            // Finished rows leave at once; their slots are free for the next admissions.
            let mut rows: Vec<Option<Row>> = std::mem::take(&mut self.rows)
                .into_iter()
                .map(Some)
                .collect();
            for (r, reason) in finished {
                let row = rows[r].take().expect("each row finishes once");
                if !row.req.is_cancelled() {
                    row.finish(reason);
                }
                done();
            }
            if !keep.is_empty() {
                self.state.select(&model.backend, &keep)?;
            }
            self.rows = keep
                .iter()
                .map(|&r| rows[r].take().expect("kept"))
                .collect();
        }
        Ok(())
    }
}
