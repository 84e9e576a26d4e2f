//! The engine: one worker thread that owns a model and a decoding batch whose rows come and go
//! (continuous batching). Between two decoding steps it admits waiting requests (encodes
//! them, projects their cross-attention keys/values and appends their rows to the running
//! batch) and retires finished ones at once. Each row keeps its own options (greedy or
//! sampling, processors, stop strings, seed), so a request's tokens do not depend on its
//! neighbours: with f32 weights they equal what [`crate::generate()`] gives for that input alone.
//! Beam-search requests decode in their own group, on a second worker.
//!
//! Frontends (the HTTP server, the Python package) hold an [`EngineHandle`], submit requests
//! and read [`Event`]s back; no batching logic lives outside this module.

mod batch;
mod queue;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::error::T5Error;
use crate::generate::GenerationConfig;
use crate::model::T5Model;
use crate::tokenizer::T5Tokenizer;

pub use queue::SubmitError;
/// What [`RequestStream::events`]`.try_recv()` answers when no event is there.
pub use tokio::sync::mpsc::error::TryRecvError;

/// When waiting requests join the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Batching {
    /// Between any two decoding steps, as long as the batch has room.
    #[default]
    Continuous,
    /// Only when the batch is empty (padded static batches, as simple servers do): for
    /// comparisons.
    Static,
}

impl std::str::FromStr for Batching {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "continuous" => Ok(Batching::Continuous),
            "static" => Ok(Batching::Static),
            other => Err(format!("`{other}`: expected continuous or static")),
        }
    }
}

/// The engine's limits. Requests past them are refused when submitted.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests in the engine at once, waiting or decoding (more: [`SubmitError::Overloaded`]).
    pub max_concurrent_requests: usize,
    /// Requests waiting for a place in the batch at most.
    pub max_waiting_requests: usize,
    /// Longest input, in tokens ([`SubmitError::Invalid`] beyond).
    pub max_input_tokens: usize,
    /// `max_new_tokens` of a request at most.
    pub max_new_tokens: usize,
    /// Rows decoded together at most.
    pub max_batch_size: usize,
    /// Tokens the batch may hold at once, counting each row as its input length plus its
    /// `max_new_tokens` (what its caches can grow to).
    pub max_batch_tokens: usize,
    pub batching: Batching,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_concurrent_requests: 128,
            max_waiting_requests: 128,
            max_input_tokens: 1024,
            max_new_tokens: 512,
            max_batch_size: 64,
            max_batch_tokens: 64 * 1024,
            batching: Batching::Continuous,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` (or `max_length`) reached.
    Length,
    /// The model produced EOS.
    EosToken,
    /// A stop string appeared in the text.
    StopSequence,
}

impl FinishReason {
    /// Text Generation Inference's name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
        }
    }
}

/// One generated token as it is decoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Token {
    pub id: u32,
    /// log-probability of the token under the processed distribution (after the logits
    /// processors, before the sampling warpers); `None` in beam search.
    pub logprob: Option<f32>,
}

/// A finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// The generated ids (best sequence), EOS included when produced.
    pub ids: Vec<u32>,
    /// Per id: its log-probability where known.
    pub tokens: Vec<Token>,
    pub finish_reason: FinishReason,
    /// Beam search: the n best sequences with their scores, best first (else empty).
    pub sequences: Vec<crate::generate::Hypothesis>,
    /// Tokens of the input.
    pub input_tokens: usize,
    /// Time from submission to joining the batch.
    pub queue_time: Duration,
    /// Time from submission to the end.
    pub total_time: Duration,
}

/// What a request's stream yields: tokens as they are decoded, then `Done` or `Error`.
#[derive(Debug, Clone)]
pub enum Event {
    Token(Token),
    Done(Finished),
    Error(String),
}

/// Counters and gauges for metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests waiting for the batch now.
    pub waiting: AtomicUsize,
    /// Rows in the running batch now.
    pub batch_rows: AtomicUsize,
    /// Requests in the engine now (waiting, decoding, or beam search).
    pub in_flight: AtomicUsize,
    /// Decoding steps run.
    pub steps: AtomicUsize,
}

/// A submitted request: its events, in order. Dropping it (or calling [`cancel`]) cancels the
/// request and frees its place in the batch at the next step.
///
/// [`cancel`]: RequestStream::cancel
pub struct RequestStream {
    pub events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    cancelled: Arc<AtomicBool>,
}

impl RequestStream {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Blocks for the next event (for callers outside an async runtime).
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }

    /// The next event.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// A request as the worker holds it.
pub(crate) struct Pending {
    pub input: Vec<u32>,
    pub cfg: GenerationConfig,
    pub submitted: Instant,
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
    pub cancelled: Arc<AtomicBool>,
}

impl Pending {
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed) || self.events.is_closed()
    }

    /// Sends an event; false when the client has gone.
    pub fn send(&self, e: Event) -> bool {
        self.events.send(e).is_ok()
    }

    /// The batch tokens this request holds: its input and what its caches can grow to.
    pub fn tokens(&self) -> usize {
        self.input.len() + self.cfg.new_token_limit()
    }
}

/// The frontends' side of a running engine. Cheap to clone; the workers stop when the last
/// handle is dropped or [`EngineHandle::shutdown`] is called, after finishing what they hold.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<queue::Shared>,
    config: Arc<EngineConfig>,
}

impl EngineHandle {
    /// Starts the workers on `model` (shared, `Arc`). `tokenizer` is needed for stop strings.
    pub fn start<B: Backend + 'static>(
        model: Arc<T5Model<B>>,
        tokenizer: Option<Arc<T5Tokenizer>>,
        config: EngineConfig,
    ) -> Result<EngineHandle, T5Error> {
        if config.max_batch_size == 0 || config.max_concurrent_requests == 0 {
            return Err(T5Error::Input(
                "the engine needs a batch of at least one row and at least one request".into(),
            ));
        }
        let shared = Arc::new(queue::Shared::new(
            model.config.clone(),
            tokenizer.is_some(),
        ));
        let config = Arc::new(config);
        worker::spawn(model, tokenizer, shared.clone(), config.clone())?;
        Ok(EngineHandle { shared, config })
    }

    /// Queues a request: `input` ids, decoded with `cfg` (validated here against the model
    /// and the engine's limits). Refused at once when the engine is full or shutting down.
    pub fn submit(
        &self,
        input: Vec<u32>,
        cfg: GenerationConfig,
    ) -> Result<RequestStream, SubmitError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let pending = Pending {
            input,
            cfg,
            submitted: Instant::now(),
            events: tx,
            cancelled: cancelled.clone(),
        };
        self.shared.submit(pending, &self.config)?;
        Ok(RequestStream {
            events: rx,
            cancelled,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn stats(&self) -> &EngineStats {
        &self.shared.stats
    }

    /// Stops accepting requests; the workers finish the ones they hold, then exit.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }

    /// Whether the workers are still running.
    pub fn is_running(&self) -> bool {
        self.shared.workers_alive()
    }
}
