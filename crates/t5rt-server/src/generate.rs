//! Text Generation Inference's routes: `POST /generate`, `POST /generate_stream` (Server-Sent
//! Events) and `POST /` (the list-shaped route TGI's Python clients call).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::Serialize;
use t5rt::engine::{Event, Finished, RequestStream};

use crate::error::ApiError;
use crate::metrics::RequestTimes;
use crate::text::TextStream;
use crate::validation::{parse_body, validate, GenerateRequest, Validated};
use crate::AppState;

/// One token as TGI reports it.
#[derive(Debug, Clone, Serialize)]
pub struct TokenJson {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f32>,
    pub special: bool,
}

#[derive(Debug, Serialize)]
pub struct PrefillToken {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f32>,
}

#[derive(Debug, Serialize)]
pub struct Details {
    pub finish_reason: &'static str,
    pub generated_tokens: usize,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<TokenJson>,
}

#[derive(Debug, Serialize)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

#[derive(Debug, Serialize)]
struct StreamDetails {
    finish_reason: &'static str,
    generated_tokens: usize,
    seed: Option<u64>,
    input_length: usize,
}

#[derive(Debug, Serialize)]
struct StreamResponse {
    index: usize,
    token: TokenJson,
    generated_text: Option<String>,
    details: Option<StreamDetails>,
}

/// The body turned into a running request.
pub(crate) struct Started {
    pub v: Validated,
    pub stream: RequestStream,
    pub inputs: String,
    pub started: Instant,
}

/// Reads, validates and submits a request: the first errors a client can get (400, 413,
/// 422, 429, 503), before anything streams.
pub(crate) fn start(
    app: &AppState,
    body: Result<Bytes, BytesRejection>,
    streaming: bool,
) -> Result<Started, ApiError> {
    let started = Instant::now();
    app.metrics.request();
    let result = (|| -> Result<Started, ApiError> {
        let body = body.map_err(|e| ApiError::new(e.status(), "validation", e.body_text()))?;
        let req: GenerateRequest = parse_body(&body)?;
        let v = validate(
            &req.inputs,
            &req.parameters,
            app.tokenizer.as_deref(),
            &app.defaults,
            &app.limits,
            streaming,
        )?;
        let stream = app.engine.submit(v.ids.clone(), v.cfg.clone())?;
        Ok(Started {
            v,
            stream,
            inputs: req.inputs,
            started,
        })
    })();
    if let Err(e) = &result {
        app.metrics.failure(e.kind());
    }
    result
}

/// Waits for the end of a request; 424 if it failed, 500 if the engine dropped it.
pub(crate) async fn finish(app: &AppState, s: &mut Started) -> Result<Finished, ApiError> {
    let result = loop {
        match s.stream.next().await {
            Some(Event::Token(_)) => {}
            Some(Event::Done(f)) => break Ok(f),
            Some(Event::Error(e)) => break Err(ApiError::generation(e)),
            None => {
                break Err(ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "incomplete_generation",
                    "the request ended without a result",
                ))
            }
        }
    };
    match &result {
        Ok(f) => app.record(f, s.started, "generate"),
        Err(e) => app.metrics.failure(e.kind()),
    }
    result
}

impl AppState {
    /// Metrics and the request's log line.
    pub(crate) fn record(&self, f: &Finished, started: Instant, route: &str) {
        let t = RequestTimes {
            total_secs: started.elapsed().as_secs_f64(),
            queue_secs: f.queue_time.as_secs_f64(),
            input_tokens: f.input_tokens,
            generated_tokens: f.ids.len(),
        };
        self.metrics.success(&t);
        tracing::info!(
            route,
            input_tokens = t.input_tokens,
            generated_tokens = t.generated_tokens,
            finish_reason = f.finish_reason.as_str(),
            queue_ms = (t.queue_secs * 1e3).round(),
            total_ms = (t.total_secs * 1e3).round(),
            "request done"
        );
    }

    pub(crate) fn is_special(&self, id: u32) -> bool {
        id == self.eos_token_id || id == self.pad_token_id
    }
}

/// The response body of a finished request.
fn response(app: &AppState, s: &Started, f: &Finished) -> GenerateResponse {
    let tok = app
        .tokenizer
        .as_deref()
        .expect("text requests need the tokenizer");
    let mut text = TextStream::new(tok);
    let tokens: Vec<TokenJson> = f
        .tokens
        .iter()
        .map(|t| TokenJson {
            id: t.id,
            text: text.push(t.id),
            logprob: t.logprob,
            special: app.is_special(t.id),
        })
        .collect();
    let mut generated_text = text.finish();
    if s.v.return_full_text {
        generated_text = format!("{}{generated_text}", s.inputs);
    }
    let details = s.v.details.then(|| Details {
        finish_reason: f.finish_reason.as_str(),
        generated_tokens: f.ids.len(),
        seed: s.v.seed,
        // The decoder's input before the first generated token: its start token.
        prefill: vec![PrefillToken {
            id: app.decoder_start_token_id,
            text: tok
                .decode(&[])
                .ok()
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "<pad>".into()),
            logprob: None,
        }],
        tokens,
    });
    GenerateResponse {
        generated_text,
        details,
    }
}

/// `POST /generate`.
pub async fn generate(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<GenerateResponse>, ApiError> {
    let mut s = start(&app, body, false)?;
    let f = finish(&app, &mut s).await?;
    Ok(Json(response(&app, &s, &f)))
}

/// `POST /`: TGI's compatibility route; a list of one result, or a stream when the body
/// says `"stream": true`.
pub async fn generate_compat(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let wants_stream = body
        .as_ref()
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        .and_then(|v| v.get("stream").and_then(|s| s.as_bool()))
        .unwrap_or(false);
    if wants_stream {
        return generate_stream(State(app), body).await.into_response();
    }
    match start(&app, body, false) {
        Err(e) => e.into_response(),
        Ok(mut s) => match finish(&app, &mut s).await {
            Ok(f) => Json(vec![response(&app, &s, &f)]).into_response(),
            Err(e) => e.into_response(),
        },
    }
}

/// `POST /generate_stream`: one `data:` event per token, the last one with the whole text
/// (and `details` when asked); a failure after the start is an `{"error", "error_type"}`
/// event, then the end of the stream.
pub async fn generate_stream(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let s = start(&app, body, true)?;
    struct St {
        app: Arc<AppState>,
        s: Started,
        ids: Vec<u32>,
        /// The latest token, held back one event: TGI's last token event carries the whole
        /// text and the details.
        held: Option<StreamResponse>,
        done: bool,
    }
    let st = St {
        app,
        s,
        ids: Vec::new(),
        held: None,
        done: false,
    };
    let events = stream::unfold(st, |mut st| async move {
        let json = |v: &dyn erased::Json| Ok(SseEvent::default().data(v.json()));
        loop {
            if st.done {
                return None;
            }
            match st.s.stream.next().await {
                Some(Event::Token(t)) => {
                    st.ids.push(t.id);
                    let tok = st.app.tokenizer.as_deref().expect("text requests");
                    // The text this token adds to the sequence decoded so far.
                    let before = tok.decode(&st.ids[..st.ids.len() - 1]).unwrap_or_default();
                    let after = tok.decode(&st.ids).unwrap_or_default();
                    let text = after
                        .strip_prefix(before.as_str())
                        .filter(|t| !t.ends_with('\u{fffd}'))
                        .unwrap_or("")
                        .to_string();
                    let next = StreamResponse {
                        index: st.ids.len(),
                        token: TokenJson {
                            id: t.id,
                            text,
                            logprob: t.logprob,
                            special: st.app.is_special(t.id),
                        },
                        generated_text: None,
                        details: None,
                    };
                    if let Some(prev) = st.held.replace(next) {
                        return Some((json(&prev), st));
                    }
                }
                Some(Event::Done(f)) => {
                    st.done = true;
                    st.app.record(&f, st.s.started, "generate_stream");
                    let tok = st.app.tokenizer.as_deref().expect("text requests");
                    let mut generated_text = tok.decode(&f.ids).unwrap_or_default();
                    if st.s.v.return_full_text {
                        generated_text = format!("{}{generated_text}", st.s.inputs);
                    }
                    let mut last = st.held.take()?;
                    last.generated_text = Some(generated_text);
                    last.details = st.s.v.details.then(|| StreamDetails {
                        finish_reason: f.finish_reason.as_str(),
                        generated_tokens: f.ids.len(),
                        seed: st.s.v.seed,
                        input_length: f.input_tokens,
                    });
                    return Some((json(&last), st));
                }
                Some(Event::Error(e)) => {
                    st.done = true;
                    st.app.metrics.failure("generation");
                    return Some((json(&ApiError::generation(e).body), st));
                }
                None => {
                    st.done = true;
                    st.app.metrics.failure("incomplete_generation");
                    let err = crate::error::ErrorBody {
                        error: "the request ended without a result".into(),
                        error_type: "incomplete_generation".into(),
                    };
                    return Some((json(&err), st));
                }
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// Serialisation behind one object-safe trait, for the stream's events.
mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}
