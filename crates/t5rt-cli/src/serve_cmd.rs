//! `t5rt serve`: the HTTP server (Text Generation Inference and OpenAI routes) with
//! continuous batching.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use t5rt::engine::{Batching, EngineConfig, EngineHandle};
use t5rt::{Backend, Checkpoint, GenerationConfig, WeightDtype};
use t5rt_server::validation::Limits;
use t5rt_server::AppState;

use t5rt::bundled as default_model;

#[derive(Args)]
#[command(
    after_help = "Routes: POST /generate, /generate_stream (SSE), / (TGI's client route), \
    /v1/completions (OpenAI); GET /health, /info, /metrics (Prometheus), /v1/models.\n\
    Example: t5rt serve --model ./flan-t5-small --port 8080\n         \
    curl 127.0.0.1:8080/generate -H 'Content-Type: application/json' \
    -d '{\"inputs\": \"translate English to German: Hello\", \"parameters\": {\"max_new_tokens\": 20}}'"
)]
pub struct ServeArgs {
    /// Checkpoint directory [default: the bundled model].
    #[arg(short, long, value_name = "DIR")]
    model: Option<PathBuf>,

    /// Address to listen on. The default accepts connections from this machine only; use
    /// 0.0.0.0 to serve the network.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    /// Port to listen on (0: any free port, printed at start).
    #[arg(short, long, default_value_t = 8080)]
    port: u16,

    /// Name of the model in /info and OpenAI responses [default: the directory's name].
    #[arg(long, value_name = "NAME")]
    model_id: Option<String>,

    /// CPU threads (0 = one per core).
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: usize,

    /// Where to run: cpu, cuda (the first GPU) or cuda:N (builds with the `cuda` feature).
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: t5rt::device::Device,

    /// Precision of the linear layers' weights: f32, bf16 or int8 (as for `generate`).
    #[arg(long, value_name = "DTYPE", default_value_t = WeightDtype::F32)]
    dtype: WeightDtype,

    /// Requests in progress at once (waiting or decoding); more get HTTP 429.
    #[arg(long, value_name = "N", default_value_t = 128)]
    max_concurrent_requests: usize,

    /// Requests waiting for a place in the batch at most; more get HTTP 429.
    #[arg(long, value_name = "N", default_value_t = 128)]
    max_waiting_requests: usize,

    /// Longest input in tokens; longer ones get HTTP 422.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_input_tokens: usize,

    /// Largest max_new_tokens a request may ask for; more gets HTTP 422.
    #[arg(long, value_name = "N", default_value_t = 512)]
    max_new_tokens: usize,

    /// max_new_tokens of a request that does not say [default: the model's
    /// generation_config.json, else 128; at most --max-new-tokens].
    #[arg(long, value_name = "N")]
    default_max_new_tokens: Option<usize>,

    /// Sequences decoded together at most.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_batch_size: usize,

    /// Tokens the batch may hold, each request counting its input plus its max_new_tokens
    /// [default: what half of the available memory holds, at most 65536].
    #[arg(long, value_name = "N")]
    max_batch_tokens: Option<usize>,

    /// Stop sequences per request at most.
    #[arg(long, value_name = "N", default_value_t = 4)]
    max_stop_sequences: usize,

    /// Request bodies larger than this many bytes get HTTP 413.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    max_body_bytes: usize,

    /// continuous: requests join the running batch between any two steps; static: only when
    /// it is empty (for comparisons).
    #[arg(long, value_name = "MODE", default_value = "continuous")]
    batching: Batching,

    /// Seconds to let requests in flight finish after Ctrl-C or SIGTERM.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    grace_period: u64,
}

/// Bytes one batch token holds in the caches (self-attention keys/values at full length and
/// cross-attention keys/values), for the default token budget.
fn bytes_per_batch_token(c: &t5rt::T5Config, dtype: WeightDtype) -> u64 {
    let cross = if dtype == WeightDtype::F32 { 4 } else { 2 };
    (c.num_decoder_layers * c.inner_dim() * (2 * 4 + 2 * cross)) as u64
}

pub fn run(args: ServeArgs) -> Result<()> {
    let (ckpt, name) = match &args.model {
        Some(dir) => (
            Checkpoint::open(dir).with_context(|| format!("loading {}", dir.display()))?,
            dir.file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned()),
        ),
        None => (
            default_model::checkpoint().context(default_model::NAME)?,
            default_model::NAME.to_string(),
        ),
    };
    if args.max_new_tokens == 0 || args.max_input_tokens == 0 {
        bail!("--max-new-tokens and --max-input-tokens must be at least 1");
    }
    let Checkpoint {
        config,
        store,
        tokenizer,
        generation,
    } = ckpt;
    let smallest = args.max_new_tokens.min(args.max_input_tokens) + 1;
    if args.max_batch_tokens.is_some() {
        // Before loading: a given budget too small for one request (the memory check waits
        // for the device).
        batch_tokens(args.max_batch_tokens, None, 0, smallest).map_err(anyhow::Error::msg)?;
    }
    let mut defaults = GenerationConfig::from_model(&generation);
    defaults.max_new_tokens = args
        .default_max_new_tokens
        .unwrap_or(defaults.max_new_tokens)
        .min(args.max_new_tokens);
    let engine_config = EngineConfig {
        max_concurrent_requests: args.max_concurrent_requests,
        max_waiting_requests: args.max_waiting_requests,
        max_input_tokens: args.max_input_tokens,
        max_new_tokens: args.max_new_tokens,
        max_batch_size: args.max_batch_size,
        max_batch_tokens: args.max_batch_tokens.unwrap_or(0), // set once the device is known
        batching: args.batching,
    };
    let (eos, pad, start) = (
        config.eos_token_id,
        config.pad_token_id,
        config.decoder_start_token_id,
    );
    let tokenizer = tokenizer.map(Arc::new);
    let work = StartEngine {
        config,
        store,
        tokenizer: tokenizer.clone(),
        engine: engine_config,
        requested_batch_tokens: args.max_batch_tokens,
        smallest,
    };
    let (engine, device, max_batch_tokens) =
        t5rt::device::with_backend(args.device, args.threads, args.dtype, work)?;
    let app = Arc::new(AppState {
        engine,
        tokenizer,
        defaults,
        limits: Limits {
            max_input_tokens: args.max_input_tokens,
            max_new_tokens: args.max_new_tokens,
            default_max_new_tokens: 0,
            max_stop_sequences: args.max_stop_sequences,
        },
        metrics: Default::default(),
        model_id: args.model_id.clone().unwrap_or(name),
        device,
        dtype: args.dtype.to_string(),
        eos_token_id: eos,
        pad_token_id: pad,
        decoder_start_token_id: start,
        max_body_bytes: args.max_body_bytes,
    });
    let app = {
        // The default max_new_tokens lives in `defaults`; the limits carry it too.
        let mut a = Arc::try_unwrap(app).ok().expect("not shared yet");
        a.limits.default_max_new_tokens = a.defaults.max_new_tokens;
        Arc::new(a)
    };

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let addr: SocketAddr = format!("{}:{}", args.host, args.port)
            .parse()
            .with_context(|| format!("`{}:{}` is not an address", args.host, args.port))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(
            address = %local,
            model = %app.model_id,
            device = %app.device,
            batching = ?args.batching,
            max_batch_tokens,
            "t5rt serving on http://{local}"
        );
        t5rt_server::serve(
            listener,
            app,
            shutdown_signal(),
            Duration::from_secs(args.grace_period),
        )
        .await
        .context("server failed")
    })
}

/// Loads the model on the backend `--device` gives and starts the engine on it.
struct StartEngine {
    config: t5rt::T5Config,
    store: t5rt::TensorStore,
    tokenizer: Option<Arc<t5rt::T5Tokenizer>>,
    engine: EngineConfig,
    /// --max-batch-tokens, if given.
    requested_batch_tokens: Option<usize>,
    /// The fewest batch tokens one request needs.
    smallest: usize,
}

/// The batch's token budget: `requested`, or what half of the device's available memory
/// holds in caches (at most 65536); an error when it cannot hold one request or its caches
/// exceed what is available.
fn batch_tokens(
    requested: Option<usize>,
    available: Option<u64>,
    per_token: u64,
    smallest: usize,
) -> std::result::Result<usize, String> {
    use t5rt::generate::memory::human_bytes;
    let n = match requested {
        Some(n) => n,
        None => available
            .map_or(65_536, |a| (a / 2 / per_token.max(1)) as usize)
            .min(65_536),
    };
    if n < smallest {
        return Err(format!(
            "--max-batch-tokens {n} cannot hold one request; give at least {smallest} (or more memory)"
        ));
    }
    if let Some(a) = available {
        let need = per_token.saturating_mul(n as u64);
        if need > a {
            return Err(format!(
                "--max-batch-tokens {n} needs about {} of caches, more than the {} available",
                human_bytes(need),
                human_bytes(a)
            ));
        }
    }
    Ok(n)
}

impl t5rt::device::WithBackend for StartEngine {
    /// The engine, the device's name and the batch's token budget.
    type Output = (EngineHandle, String, usize);

    fn run<B: Backend + 'static>(mut self, backend: B) -> t5rt::Result<Self::Output> {
        let mut model = t5rt::T5Model::load(self.config, &self.store, backend)?;
        drop(self.store);
        // The server reports each token's log-probability, so it computes every logit: the
        // LM head's screening copy would only hold memory.
        model.drop_head_screen();
        // The budget comes from the memory of the device the caches live on.
        let per_token = bytes_per_batch_token(&model.config, model.backend.weight_dtype());
        self.engine.max_batch_tokens = batch_tokens(
            self.requested_batch_tokens,
            t5rt::generate::memory::available_for(&model.backend),
            per_token,
            self.smallest,
        )
        .map_err(t5rt::T5Error::Input)?;
        let name = model.backend.name();
        let tokens = self.engine.max_batch_tokens;
        Ok((
            EngineHandle::start(Arc::new(model), self.tokenizer, self.engine)?,
            name,
            tokens,
        ))
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
