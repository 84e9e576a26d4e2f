//! The workers: the continuous-batching step loop, and the beam-search loop beside it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::batch::{admit, Batch};
use super::queue::{Shared, Taken};
use super::{Batching, EngineConfig, Event, FinishReason, Finished, Pending, Token};
use crate::backend::Backend;
use crate::error::{Result, T5Error};
use crate::model::T5Model;
use crate::tokenizer::T5Tokenizer;

/// Starts both workers.
pub(super) fn spawn<B: Backend + 'static>(
    model: Arc<T5Model<B>>,
    tokenizer: Option<Arc<T5Tokenizer>>,
    shared: Arc<Shared>,
    config: Arc<EngineConfig>,
) -> Result<()> {
    let start = |name: &str, f: Box<dyn FnOnce() + Send>| {
        shared.alive.fetch_add(1, Ordering::SeqCst);
        let guard = AliveGuard(shared.clone());
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _guard = guard;
                f()
            })
            .map(|_| ())
            .map_err(|e| T5Error::Backend(format!("cannot start the engine's {name} thread: {e}")))
    };
    let (m, t, s, c) = (
        model.clone(),
        tokenizer.clone(),
        shared.clone(),
        config.clone(),
    );
    start(
        "t5rt-engine",
        Box::new(move || continuous(&m, t.as_deref(), &s, &c)),
    )?;
    let s2 = shared.clone();
    start(
        "t5rt-beams",
        Box::new(move || beams(&model, tokenizer.as_deref(), &s2)),
    )
}

/// Counts a worker out when it ends, however it ends.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        if self.0.alive.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The last worker: nothing will serve the queues any more.
            self.0.shutdown();
        }
    }
}

/// The step loop: admit what fits, decode one step for every row, retire finished rows.
fn continuous<B: Backend>(
    model: &T5Model<B>,
    tokenizer: Option<&T5Tokenizer>,
    shared: &Shared,
    config: &EngineConfig,
) {
    // A row's caches hold at most its input-independent new-token limit of positions.
    let max_steps = config.max_new_tokens + 1;
    let mut batch: Option<Batch<B::Tensor>> = None;
    let done = || shared.done();
    loop {
        let (rows, tokens) = batch.as_ref().map_or((0, 0), |b| (b.len(), b.tokens()));
        let (mut room_rows, mut room_tokens) = (
            config.max_batch_size.saturating_sub(rows),
            config.max_batch_tokens.saturating_sub(tokens),
        );
        let may_admit = rows == 0 || config.batching == Batching::Continuous;
        let taken = if may_admit {
            shared.take_waiting(rows == 0, |p| {
                let fits = room_rows >= 1 && room_tokens >= p.tokens();
                if fits {
                    room_rows -= 1;
                    room_tokens -= p.tokens();
                }
                fits
            })
        } else {
            Taken::Requests(Vec::new())
        };
        let admitted = match taken {
            Taken::Stop => return,
            Taken::Requests(r) => r,
        };
        if !admitted.is_empty() {
            model
                .backend
                .run(|| admit(model, &mut batch, admitted, max_steps, done));
        }
        if let Some(mut b) = batch.take() {
            let result = model.backend.run(|| b.step(model, tokenizer, done));
            shared.stats.steps.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(()) if b.len() > 0 => batch = Some(b),
                Ok(()) => {}
                Err(e) => b.fail_all(&e.to_string(), &done),
            }
        }
        let rows = batch.as_ref().map_or(0, |b| b.len());
        shared.stats.batch_rows.store(rows, Ordering::SeqCst);
    }
}

/// Beam search, one request at a time, beside the step loop.
fn beams<B: Backend>(model: &T5Model<B>, tokenizer: Option<&T5Tokenizer>, shared: &Shared) {
    while let Some(p) = shared.take_beam() {
        if !p.is_cancelled() {
            serve_beam(model, tokenizer, &p);
        }
        shared.done();
    }
}

fn serve_beam<B: Backend>(model: &T5Model<B>, tokenizer: Option<&T5Tokenizer>, p: &Pending) {
    let admitted = std::time::Instant::now();
    let cfg = crate::generate::GenerationConfig {
        batch_size: 1,
        ..p.cfg.clone()
    };
    match crate::generate(
        model,
        std::slice::from_ref(&p.input),
        &cfg,
        tokenizer,
        |_| {},
    ) {
        Ok(mut out) => {
            let sequences = out.pop().unwrap_or_default();
            let ids = sequences.first().map(|h| h.ids.clone()).unwrap_or_default();
            let tokens: Vec<Token> = ids.iter().map(|&id| Token { id, logprob: None }).collect();
            for &t in &tokens {
                if !p.send(Event::Token(t)) {
                    return;
                }
            }
            let finish_reason = if ids.last() == Some(&model.config.eos_token_id) {
                FinishReason::EosToken
            } else {
                FinishReason::Length
            };
            p.send(Event::Done(Finished {
                ids,
                tokens,
                finish_reason,
                sequences,
                input_tokens: p.input.len(),
                queue_time: admitted.duration_since(p.submitted),
                total_time: p.submitted.elapsed(),
            }));
        }
        Err(e) => {
            p.send(Event::Error(e.to_string()));
        }
    }
}
