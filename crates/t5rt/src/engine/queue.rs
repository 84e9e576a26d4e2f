//! Admission: validation of a request against the model and the engine's limits, the waiting
//! queues (one for the continuous batch, one for beam search), and the engine's gauges.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::{EngineConfig, EngineStats, Pending};
use crate::config::T5Config;

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The request breaks a limit or is malformed (HTTP 422); the message names the limit.
    Invalid(String),
    /// The engine is full (HTTP 429); try again later.
    Overloaded(String),
    /// The engine is shutting down (HTTP 503).
    ShuttingDown,
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::Invalid(m) | SubmitError::Overloaded(m) => f.write_str(m),
            SubmitError::ShuttingDown => f.write_str("the server is shutting down"),
        }
    }
}

impl std::error::Error for SubmitError {}

#[derive(Default)]
struct Queues {
    /// Greedy and sampling requests, in arrival order.
    waiting: VecDeque<Pending>,
    /// Beam-search requests, in arrival order.
    beams: VecDeque<Pending>,
    shutdown: bool,
}

/// What the handles and the workers share.
pub(crate) struct Shared {
    queues: Mutex<Queues>,
    wake: Condvar,
    pub stats: EngineStats,
    /// The model's config, for validation at submission.
    pub model: T5Config,
    /// Workers still running.
    pub alive: AtomicUsize,
    /// Whether stop strings can be served (a tokenizer is loaded).
    pub has_tokenizer: bool,
}

/// What a worker takes from the queue.
pub(crate) enum Taken {
    Requests(Vec<Pending>),
    /// Shutting down and nothing is left to take.
    Stop,
}

impl Shared {
    pub fn new(model: T5Config, has_tokenizer: bool) -> Shared {
        Shared {
            queues: Mutex::new(Queues::default()),
            wake: Condvar::new(),
            stats: EngineStats::default(),
            model,
            alive: AtomicUsize::new(0),
            has_tokenizer,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        // A worker that panicked while holding the lock cannot leave the queues half-changed
        // (every change is one push or pop): keep serving.
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks a request and queues it.
    pub fn submit(&self, p: Pending, limits: &EngineConfig) -> Result<(), SubmitError> {
        validate(&p, limits, &self.model, self.has_tokenizer)?;
        let mut q = self.lock();
        if q.shutdown || self.alive.load(Ordering::SeqCst) == 0 {
            return Err(SubmitError::ShuttingDown);
        }
        let in_flight = self.stats.in_flight.load(Ordering::SeqCst);
        if in_flight >= limits.max_concurrent_requests {
            return Err(SubmitError::Overloaded(format!(
                "{in_flight} requests are in progress, the limit of max_concurrent_requests ({})",
                limits.max_concurrent_requests
            )));
        }
        let waiting = q.waiting.len() + q.beams.len();
        if waiting >= limits.max_waiting_requests {
            return Err(SubmitError::Overloaded(format!(
                "{waiting} requests are waiting, the limit of max_waiting_requests ({})",
                limits.max_waiting_requests
            )));
        }
        self.stats.in_flight.fetch_add(1, Ordering::SeqCst);
        if p.cfg.num_beams > 1 {
            q.beams.push_back(p);
        } else {
            q.waiting.push_back(p);
        }
        self.stats.waiting.store(waiting + 1, Ordering::SeqCst);
        drop(q);
        self.wake.notify_all();
        Ok(())
    }

    /// A request left the engine (finished, failed or cancelled).
    pub fn done(&self) {
        self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Takes waiting greedy/sampling requests from the front of the queue while `admit` says
    /// they fit (it sees each candidate in turn). Blocks for one when `block` and none is
    /// waiting. Cancelled requests are dropped on the way.
    pub fn take_waiting(&self, block: bool, mut admit: impl FnMut(&Pending) -> bool) -> Taken {
        let mut q = self.lock();
        loop {
            let mut out = Vec::new();
            while let Some(front) = q.waiting.front() {
                if front.is_cancelled() {
                    q.waiting.pop_front();
                    self.done();
                    continue;
                }
                if !admit(front) {
                    break;
                }
                out.push(q.waiting.pop_front().expect("front exists"));
            }
            self.stats
                .waiting
                .store(q.waiting.len() + q.beams.len(), Ordering::SeqCst);
            if !out.is_empty() || !block {
                return Taken::Requests(out);
            }
            if q.shutdown && q.waiting.is_empty() {
                return Taken::Stop;
            }
            q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Takes the next beam-search request, blocking until there is one (or shutdown).
    pub fn take_beam(&self) -> Option<Pending> {
        let mut q = self.lock();
        loop {
            if let Some(p) = q.beams.pop_front() {
                self.stats
                    .waiting
                    .store(q.waiting.len() + q.beams.len(), Ordering::SeqCst);
                return Some(p);
            }
            if q.shutdown {
                return None;
            }
            q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.wake.notify_all();
    }

    pub fn workers_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst) > 0
    }
}

/// The request's own checks, then the engine's limits (each error names the limit).
fn validate(
    p: &Pending,
    limits: &EngineConfig,
    model: &T5Config,
    has_tokenizer: bool,
) -> Result<(), SubmitError> {
    let invalid = |m: String| Err(SubmitError::Invalid(m));
    if p.input.is_empty() {
        return invalid("the input is empty".into());
    }
    if p.input.len() > limits.max_input_tokens {
        return invalid(format!(
            "the input has {} tokens, more than max_input_tokens ({})",
            p.input.len(),
            limits.max_input_tokens
        ));
    }
    if let Some(&bad) = p.input.iter().find(|&&id| id as usize >= model.vocab_size) {
        return invalid(format!(
            "token id {bad} is outside the vocabulary of {} ids",
            model.vocab_size
        ));
    }
    let new = p.cfg.new_token_limit();
    if new > limits.max_new_tokens {
        return invalid(format!(
            "max_new_tokens is {new}, more than the limit of {} (max_new_tokens)",
            limits.max_new_tokens
        ));
    }
    if p.tokens() > limits.max_batch_tokens {
        return invalid(format!(
            "input tokens + max_new_tokens = {} is more than max_batch_tokens ({})",
            p.tokens(),
            limits.max_batch_tokens
        ));
    }
    if p.cfg.num_return_sequences > 1 && p.cfg.num_beams <= 1 {
        return invalid("num_return_sequences > 1 is served with beam search only".into());
    }
    if p.cfg.num_beams > limits.max_batch_size {
        return invalid(format!(
            "num_beams ({}) is more than max_batch_size ({})",
            p.cfg.num_beams, limits.max_batch_size
        ));
    }
    if !p.cfg.stop_strings.is_empty() && !has_tokenizer {
        return invalid("stop sequences need the model's tokenizer.json".into());
    }
    p.cfg
        .validate(model)
        .map_err(|e| SubmitError::Invalid(e.to_string()))
}
