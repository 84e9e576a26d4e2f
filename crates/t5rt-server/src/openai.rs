//! OpenAI-compatible `POST /v1/completions` (and `GET /v1/models`), as TGI implements them:
//! a prompt or a list of prompts, `stream: true` for Server-Sent Events ending with
//! `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use serde::{Deserialize, Serialize};
use t5rt::engine::{Event, FinishReason, RequestStream};

use crate::error::ApiError;
use crate::validation::{parse_body, validate, Parameters};
use crate::AppState;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The request. Fields OpenAI defines that t5rt does not do are refused when not neutral.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionRequest {
    /// Ignored: the response names the served model.
    #[serde(default)]
    model: Option<String>,
    prompt: OneOrMany,
    max_tokens: Option<usize>,
    /// 0 (or absent) is greedy search; above 0, sampling at that temperature.
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<serde_json::Value>,
    n: Option<usize>,
    best_of: Option<usize>,
    echo: Option<bool>,
    logprobs: Option<serde_json::Value>,
    logit_bias: Option<serde_json::Value>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    suffix: Option<String>,
    user: Option<String>,
}

#[derive(Debug, Serialize)]
struct Choice {
    index: usize,
    text: String,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
}

#[derive(Debug, Serialize)]
struct Completion {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    system_fingerprint: String,
    choices: Vec<Choice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

/// OpenAI's reasons: `stop` for EOS and stop sequences, `length` for the limit.
fn openai_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::EosToken | FinishReason::StopSequence => "stop",
    }
}

fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Prompts per request at most.
const MAX_PROMPTS: usize = 32;

/// Validates and submits every prompt.
fn start(
    app: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<(CompletionRequest, Vec<(RequestStream, usize)>), ApiError> {
    app.metrics.request();
    let result = (|| -> Result<(CompletionRequest, Vec<(RequestStream, usize)>), ApiError> {
        let body = body.map_err(|e| ApiError::new(e.status(), "validation", e.body_text()))?;
        let mut req: CompletionRequest = parse_body(&body)?;
        let bad = |m: &str| Err(ApiError::validation(m.to_string()));
        if req.suffix.is_some() {
            return bad("`suffix` is not supported");
        }
        if req.n.is_some_and(|n| n != 1) || req.best_of.is_some_and(|n| n != 1) {
            return bad("`n` and `best_of` must be 1");
        }
        if req.echo == Some(true) {
            return bad("`echo` is not supported");
        }
        if req.logprobs.as_ref().is_some_and(|l| !l.is_null()) {
            return bad("`logprobs` is not supported");
        }
        if req
            .logit_bias
            .as_ref()
            .is_some_and(|l| !l.is_null() && l.as_object().is_none_or(|o| !o.is_empty()))
        {
            return bad("`logit_bias` is not supported");
        }
        if req.frequency_penalty.is_some_and(|v| v != 0.0)
            || req.presence_penalty.is_some_and(|v| v != 0.0)
        {
            return bad("`frequency_penalty` and `presence_penalty` are not supported; use `repetition_penalty`");
        }
        let _ = (&req.model, &req.user, &req.stream_options);
        let prompts = std::mem::replace(&mut req.prompt, OneOrMany::Many(Vec::new())).into_vec();
        if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
            return bad("`prompt`: give 1 to 32 prompts");
        }
        let sampling = req.temperature.is_some_and(|t| t != 0.0);
        let params = Parameters {
            max_new_tokens: req.max_tokens,
            do_sample: Some(sampling),
            temperature: req.temperature.filter(|_| sampling),
            top_p: req.top_p,
            seed: req.seed,
            stop: req.stop.take().map(OneOrMany::into_vec),
            repetition_penalty: req.repetition_penalty,
            num_beams: Some(1),
            ..Parameters::default()
        };
        let mut streams = Vec::new();
        for prompt in &prompts {
            let v = validate(
                prompt,
                &params,
                app.tokenizer.as_deref(),
                &app.defaults,
                &app.limits,
                req.stream,
            )?;
            let n = v.ids.len();
            streams.push((app.engine.submit(v.ids, v.cfg)?, n));
        }
        req.prompt = OneOrMany::Many(prompts);
        Ok((req, streams))
    })();
    if let Err(e) = &result {
        app.metrics.failure(e.kind());
    }
    result
}

/// `POST /v1/completions`.
pub async fn completions(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let (req, streams) = match start(&app, body) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    if req.stream {
        return stream_completions(app, streams, started).into_response();
    }
    let mut choices = Vec::new();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (index, (mut s, n)) in streams.into_iter().enumerate() {
        let done = loop {
            match s.next().await {
                Some(Event::Token(_)) => {}
                Some(Event::Done(f)) => break Ok(f),
                Some(Event::Error(e)) => break Err(ApiError::generation(e)),
                None => break Err(ApiError::generation("the request ended without a result")),
            }
        };
        let f = match done {
            Ok(f) => f,
            Err(e) => {
                app.metrics.failure(e.kind());
                return e.into_response();
            }
        };
        app.record(&f, started, "v1/completions");
        let tok = app.tokenizer.as_deref().expect("text requests");
        prompt_tokens += n;
        completion_tokens += f.ids.len();
        choices.push(Choice {
            index,
            text: tok.decode(&f.ids).unwrap_or_default(),
            logprobs: None,
            finish_reason: Some(openai_reason(f.finish_reason)),
        });
    }
    Json(Completion {
        id: String::new(),
        object: "text_completion",
        created: created(),
        model: app.model_id.clone(),
        system_fingerprint: app.fingerprint(),
        choices,
        usage: Some(Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }),
    })
    .into_response()
}

/// The streamed form: a chunk per token (prompts one after the other; all of them decode at
/// once in the engine), the last chunk of each prompt with its finish reason and usage, then
/// `data: [DONE]`.
fn stream_completions(
    app: Arc<AppState>,
    streams: Vec<(RequestStream, usize)>,
    started: Instant,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    struct St {
        app: Arc<AppState>,
        streams: std::vec::IntoIter<(RequestStream, usize)>,
        current: Option<(usize, RequestStream, usize, Vec<u32>)>,
        next_index: usize,
        finished: bool,
        started: Instant,
    }
    let st = St {
        app,
        streams: streams.into_iter(),
        current: None,
        next_index: 0,
        finished: false,
        started,
    };
    let events = stream::unfold(st, |mut st| async move {
        {
            if st.finished {
                return None;
            }
            if st.current.is_none() {
                match st.streams.next() {
                    Some((s, n)) => {
                        st.current = Some((st.next_index, s, n, Vec::new()));
                        st.next_index += 1;
                    }
                    None => {
                        st.finished = true;
                        return Some((Ok(SseEvent::default().data("[DONE]")), st));
                    }
                }
            }
            let (index, s, n, ids) = st.current.as_mut().expect("set above");
            let (index, n) = (*index, *n);
            let chunk =
                |text: String, reason: Option<&'static str>, usage: Option<Usage>| Completion {
                    id: String::new(),
                    object: "text_completion",
                    created: created(),
                    model: st.app.model_id.clone(),
                    system_fingerprint: st.app.fingerprint(),
                    choices: vec![Choice {
                        index,
                        text,
                        logprobs: None,
                        finish_reason: reason,
                    }],
                    usage,
                };
            match s.next().await {
                Some(Event::Token(t)) => {
                    ids.push(t.id);
                    let tok = st.app.tokenizer.as_deref().expect("text requests");
                    let before = tok.decode(&ids[..ids.len() - 1]).unwrap_or_default();
                    let after = tok.decode(ids).unwrap_or_default();
                    let piece = after
                        .strip_prefix(before.as_str())
                        .filter(|t| !t.ends_with('\u{fffd}'))
                        .unwrap_or("")
                        .to_string();
                    let c = chunk(piece, None, None);
                    let data = serde_json::to_string(&c).unwrap_or_default();
                    Some((Ok(SseEvent::default().data(data)), st))
                }
                Some(Event::Done(f)) => {
                    st.app.record(&f, st.started, "v1/completions");
                    let usage = Usage {
                        prompt_tokens: n,
                        completion_tokens: f.ids.len(),
                        total_tokens: n + f.ids.len(),
                    };
                    let c = chunk(
                        String::new(),
                        Some(openai_reason(f.finish_reason)),
                        Some(usage),
                    );
                    st.current = None;
                    let data = serde_json::to_string(&c).unwrap_or_default();
                    Some((Ok(SseEvent::default().data(data)), st))
                }
                Some(Event::Error(e)) => {
                    st.finished = true;
                    st.app.metrics.failure("generation");
                    let err = serde_json::json!({"error": e, "error_type": "generation"});
                    Some((Ok(SseEvent::default().data(err.to_string())), st))
                }
                None => {
                    st.finished = true;
                    st.app.metrics.failure("incomplete_generation");
                    let err = serde_json::json!({
                        "error": "the request ended without a result",
                        "error_type": "incomplete_generation"
                    });
                    Some((Ok(SseEvent::default().data(err.to_string())), st))
                }
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// `GET /v1/models`.
pub async fn models(State(app): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{"id": app.model_id, "object": "model", "created": 0, "owned_by": "t5rt"}],
    }))
}
