//! t5rt's HTTP server: Hugging Face Text Generation Inference's protocol (`/generate`,
//! `/generate_stream`, `/`, `/info`, `/health`, `/metrics`) and OpenAI's `/v1/completions`,
//! over the continuous-batching engine ([`t5rt::engine`]). A request flows through named
//! stages: validation ([`validation`]), the engine's queue (admission, 429 when full), the
//! engine's step loop, and the response or its stream ([`generate`], [`openai`]).

pub mod error;
pub mod generate;
pub mod metrics;
pub mod openai;
pub mod text;
pub mod validation;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use t5rt::engine::EngineHandle;
use t5rt::{GenerationConfig, T5Tokenizer};

use error::ApiError;
use metrics::Metrics;
use validation::Limits;

/// Everything the routes share.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Option<Arc<T5Tokenizer>>,
    /// The model's generation defaults (its `generation_config.json`).
    pub defaults: GenerationConfig,
    pub limits: Limits,
    pub metrics: Metrics,
    /// The name `/info` and OpenAI responses give the model.
    pub model_id: String,
    /// What `/info` says of the device and precision, e.g. `cpu (2 threads, f32, ...)`.
    pub device: String,
    pub dtype: String,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    pub decoder_start_token_id: u32,
    /// Request bodies larger than this get 413.
    pub max_body_bytes: usize,
}

impl AppState {
    pub(crate) fn fingerprint(&self) -> String {
        format!("t5rt-{}", env!("CARGO_PKG_VERSION"))
    }
}

/// `GET /info`: the model and every limit (TGI's field names, old and new).
#[derive(Debug, Serialize)]
pub struct Info {
    pub model_id: String,
    pub model_sha: Option<String>,
    pub model_dtype: String,
    pub model_device_type: String,
    pub model_pipeline_tag: &'static str,
    pub max_concurrent_requests: usize,
    pub max_waiting_requests: usize,
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_input_tokens: usize,
    pub max_input_length: usize,
    pub max_new_tokens: usize,
    pub max_total_tokens: usize,
    pub max_batch_size: usize,
    pub max_batch_total_tokens: usize,
    pub max_client_batch_size: usize,
    pub max_body_bytes: usize,
    pub batching: String,
    pub validation_workers: usize,
    pub router: &'static str,
    pub version: &'static str,
    pub sha: Option<String>,
    pub docker_label: Option<String>,
}

async fn info(State(app): State<Arc<AppState>>) -> Json<Info> {
    let c = app.engine.config();
    Json(Info {
        model_id: app.model_id.clone(),
        model_sha: None,
        model_dtype: app.dtype.clone(),
        model_device_type: app.device.clone(),
        model_pipeline_tag: "text2text-generation",
        max_concurrent_requests: c.max_concurrent_requests,
        max_waiting_requests: c.max_waiting_requests,
        max_best_of: 1,
        max_stop_sequences: app.limits.max_stop_sequences,
        max_input_tokens: app.limits.max_input_tokens,
        max_input_length: app.limits.max_input_tokens,
        max_new_tokens: app.limits.max_new_tokens,
        max_total_tokens: app.limits.max_input_tokens + app.limits.max_new_tokens,
        max_batch_size: c.max_batch_size,
        max_batch_total_tokens: c.max_batch_tokens,
        max_client_batch_size: 32,
        max_body_bytes: app.max_body_bytes,
        batching: format!("{:?}", c.batching).to_lowercase(),
        validation_workers: 0,
        router: "t5rt",
        version: env!("CARGO_PKG_VERSION"),
        sha: None,
        docker_label: None,
    })
}

/// `GET /health`: 200 while the engine runs, 503 otherwise.
async fn health(State(app): State<Arc<AppState>>) -> Response {
    if app.engine.is_running() {
        StatusCode::OK.into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "healthcheck",
            "unhealthy: the engine has stopped",
        )
        .into_response()
    }
}

async fn metrics_route(State(app): State<Arc<AppState>>) -> Response {
    let body = app.metrics.render(app.engine.stats());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route: see /info; generation is POST /generate, /generate_stream or /v1/completions",
    )
}

/// The routes.
pub fn router(app: Arc<AppState>) -> Router {
    let limit = app.max_body_bytes;
    Router::new()
        .route("/", get(health).post(generate::generate_compat))
        .route("/generate", post(generate::generate))
        .route("/generate_stream", post(generate::generate_stream))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/health", get(health))
        .route("/ping", get(health))
        .route("/info", get(info))
        .route("/metrics", get(metrics_route))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting connections,
/// lets the requests in flight finish for up to `grace`, and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let engine = app.engine.clone();
    let server = axum::serve(listener, router(app)).with_graceful_shutdown(async move {
        let _ = rx.changed().await;
    });
    let mut server = std::pin::pin!(server.into_future());
    tokio::select! {
        r = &mut server => return r,
        () = shutdown => {}
    }
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    let _ = tx.send(true);
    let result = tokio::time::timeout(grace, &mut server).await;
    engine.shutdown();
    match result {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("grace period of {grace:?} over: closing the remaining connections");
            Ok(())
        }
    }
}
