//! The HTTP server end to end, on loopback, with the bundled model: every route and error
//! code, Server-Sent Events read by an SSE parser, 64 concurrent clients whose answers equal
//! the offline results, overload, clients that hang up, graceful shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{json, Value};
use t5rt::engine::{EngineConfig, EngineHandle};
use t5rt::{generate, Backend, Checkpoint, CpuBackend, GenerationConfig, T5Model, T5Tokenizer};
use t5rt_server::validation::Limits;
use t5rt_server::AppState;

fn bundled() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/spell-numbers")
}

type Model = Arc<T5Model<CpuBackend>>;

fn model() -> (Model, Arc<T5Tokenizer>) {
    let ckpt = Checkpoint::open(&bundled()).unwrap();
    let model = ckpt.load_model(CpuBackend::new(2).unwrap()).unwrap();
    (Arc::new(model), Arc::new(ckpt.tokenizer.unwrap()))
}

struct Server {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(model: Model, tok: Arc<T5Tokenizer>, config: EngineConfig) -> Server {
        let limits = Limits {
            max_input_tokens: config.max_input_tokens,
            max_new_tokens: config.max_new_tokens,
            default_max_new_tokens: 64.min(config.max_new_tokens),
            max_stop_sequences: 4,
        };
        let engine = EngineHandle::start(model.clone(), Some(tok.clone()), config).unwrap();
        let app = Arc::new(AppState {
            engine,
            tokenizer: Some(tok),
            defaults: GenerationConfig::default(),
            limits,
            metrics: Default::default(),
            model_id: "spell-numbers".into(),
            device: model.backend.name(),
            dtype: "f32".into(),
            eos_token_id: model.config.eos_token_id,
            pad_token_id: model.config.pad_token_id,
            decoder_start_token_id: model.config.decoder_start_token_id,
            max_body_bytes: 64 * 1024,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done = tokio::spawn(t5rt_server::serve(
            listener,
            app,
            async move {
                let _ = rx.await;
            },
            Duration::from_secs(20),
        ));
        Server {
            base,
            stop: Some(tx),
            done,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.done)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn post(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// What `generate` gives offline for this text and these options.
fn offline(model: &Model, tok: &T5Tokenizer, text: &str, cfg: &GenerationConfig) -> String {
    let ids = tok.encode(text).unwrap();
    let out = generate(model, &[ids], cfg, Some(tok), |_| {}).unwrap();
    tok.decode(&out[0][0].ids).unwrap()
}

fn config() -> EngineConfig {
    EngineConfig {
        max_input_tokens: 64,
        max_new_tokens: 256,
        max_batch_size: 16,
        ..EngineConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_and_errors() {
    let (model, tok) = model();
    let s = Server::start(model.clone(), tok.clone(), config()).await;
    let c = client();
    // Health, info, models, metrics.
    assert_eq!(c.get(s.url("/health")).send().await.unwrap().status(), 200);
    let info: Value = c
        .get(s.url("/info"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["model_id"], "spell-numbers");
    assert_eq!(info["max_input_tokens"], 64);
    assert_eq!(info["max_new_tokens"], 256);
    assert_eq!(info["max_concurrent_requests"], 128);
    assert_eq!(info["batching"], "continuous");
    let models: Value = c
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "spell-numbers");

    // /generate, with details.
    let (st, v) = post(
        &c,
        &s.url("/generate"),
        json!({"inputs": "spell: 1984", "parameters": {"details": true, "max_new_tokens": 20}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["generated_text"], "one thousand nine hundred eighty-four");
    let d = &v["details"];
    assert_eq!(d["finish_reason"], "eos_token");
    let tokens = d["tokens"].as_array().unwrap();
    assert_eq!(
        d["generated_tokens"].as_u64().unwrap() as usize,
        tokens.len()
    );
    assert_eq!(tokens.last().unwrap()["special"], true);
    let joined: String = tokens.iter().map(|t| t["text"].as_str().unwrap()).collect();
    assert_eq!(joined, "one thousand nine hundred eighty-four");
    assert!(tokens.iter().all(|t| t["logprob"].as_f64().unwrap() <= 0.0));
    // Without details there is no details object; `/` answers with a list.
    let (st, v) = post(&c, &s.url("/generate"), json!({"inputs": "spell: 7"})).await;
    assert_eq!((st, v.get("details")), (200, None), "{v}");
    let (st, v) = post(
        &c,
        &s.url("/"),
        json!({"inputs": "spell: 7", "parameters": {}}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(v[0]["generated_text"], "seven");
    // A length-limited answer, and return_full_text.
    let (_, v) = post(
        &c,
        &s.url("/generate"),
        json!({"inputs": "spell: 1984", "parameters": {"max_new_tokens": 2, "details": true, "return_full_text": true}}),
    )
    .await;
    assert_eq!(v["details"]["finish_reason"], "length");
    assert!(v["generated_text"]
        .as_str()
        .unwrap()
        .starts_with("spell: 1984"));

    // Errors: status, JSON shape, the message naming what is wrong.
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({"inputs": "spell: 1", "parameters": {"max_new_tokens": 100000}}),
            422,
            "max_new_tokens",
        ),
        (json!({"inputs": "", "parameters": {}}), 422, "empty"),
        (
            json!({"inputs": "spell: 1", "parameters": {"temperature": 0.0, "do_sample": true}}),
            422,
            "temperature",
        ),
        (
            json!({"inputs": "spell: 1", "parameters": {"top_p": 1.5, "do_sample": true}}),
            422,
            "top_p",
        ),
        (
            json!({"inputs": "spell: 1", "parameters": {"bogus": 1}}),
            422,
            "bogus",
        ),
        (json!({"inputs": 5}), 422, "invalid"),
        (json!({"parameters": {}}), 422, "inputs"),
        (
            json!({"inputs": "spell: 1", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}),
            422,
            "max_stop_sequences",
        ),
        (
            json!({"inputs": "spell: 1", "parameters": {"best_of": 2}}),
            422,
            "best_of",
        ),
        (
            json!({"inputs": "spell: 1", "parameters": {"watermark": true}}),
            422,
            "watermark",
        ),
        (
            json!({"inputs": "spell: 1 ".repeat(40), "parameters": {}}),
            422,
            "max_input_tokens",
        ),
    ];
    for (body, status, needle) in cases {
        let (st, v) = post(&c, &s.url("/generate"), body.clone()).await;
        assert_eq!(st, status, "{body}: {v}");
        assert_eq!(v["error_type"], "validation", "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{body}: {v}");
    }
    for (bytes, status) in [
        (b"{not json".to_vec(), 400u16),
        (vec![0xff, 0xfe, 0x00], 400),
        (
            format!("{{\"inputs\": \"{}\"}}", "x".repeat(100_000)).into_bytes(),
            413,
        ),
    ] {
        let r = c
            .post(s.url("/generate"))
            .header("content-type", "application/json")
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].is_string(), "{v}");
    }
    let r = c.get(s.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error_type"], "not_found");

    // OpenAI completions, plain.
    let (st, v) = post(
        &c,
        &s.url("/v1/completions"),
        json!({"model": "x", "prompt": ["spell: 12", "spell: 3"], "max_tokens": 30}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "twelve");
    assert_eq!(v["choices"][1]["text"], "three");
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
    let (st, v) = post(
        &c,
        &s.url("/v1/completions"),
        json!({"prompt": "spell: 1", "n": 3}),
    )
    .await;
    assert_eq!(st, 422, "{v}");

    // Metrics count what happened.
    let m = c
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "tgi_request_count",
        "tgi_request_success",
        "tgi_request_failure{err=\"validation\"}",
        "tgi_request_duration_bucket",
        "tgi_request_queue_duration_count",
        "tgi_request_mean_time_per_token_duration",
        "tgi_request_input_length",
        "tgi_request_generated_tokens",
        "tgi_queue_size",
        "tgi_batch_current_size",
    ] {
        assert!(m.contains(name), "metrics lack {name}");
    }
    s.shutdown().await;
}

/// Reads a Server-Sent Events response with an SSE parser: the JSON of each `data:` event.
async fn sse(c: &reqwest::Client, url: &str, body: Value) -> Vec<String> {
    let r = c.post(url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut events = r.bytes_stream().eventsource();
    let mut out = Vec::new();
    while let Some(e) = events.next().await {
        out.push(e.expect("a well-formed event").data);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_server_sent_events() {
    let (model, tok) = model();
    let s = Server::start(model.clone(), tok.clone(), config()).await;
    let c = client();
    let body =
        json!({"inputs": "spell: 4321", "parameters": {"details": true, "max_new_tokens": 40}});
    let events = sse(&c, &s.url("/generate_stream"), body.clone()).await;
    let parsed: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let (last, tokens) = parsed.split_last().unwrap();
    for (i, e) in parsed.iter().enumerate() {
        assert_eq!(e["index"].as_u64(), Some(i as u64 + 1));
        assert!(e["token"]["id"].is_u64());
    }
    assert!(tokens
        .iter()
        .all(|e| e["generated_text"].is_null() && e["details"].is_null()));
    let whole = last["generated_text"].as_str().unwrap();
    assert_eq!(whole, "four thousand three hundred twenty-one");
    let pieces: String = parsed
        .iter()
        .map(|e| e["token"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(pieces, whole);
    assert_eq!(last["details"]["finish_reason"], "eos_token");
    assert_eq!(
        last["details"]["generated_tokens"].as_u64(),
        Some(parsed.len() as u64)
    );
    // The same text as the plain route.
    let (_, plain) = post(&c, &s.url("/generate"), body).await;
    assert_eq!(plain["generated_text"], whole);
    // `/` with "stream": true streams too.
    let events = sse(
        &c,
        &s.url("/"),
        json!({"inputs": "spell: 9", "stream": true}),
    )
    .await;
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["generated_text"], "nine");
    // OpenAI streaming ends with [DONE]; the chunks make the text.
    let events = sse(
        &c,
        &s.url("/v1/completions"),
        json!({"prompt": "spell: 56", "stream": true, "max_tokens": 20}),
    )
    .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "fifty-six");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    // A request refused before streaming gets its status, not a stream.
    let r = c
        .post(s.url("/generate_stream"))
        .json(&json!({"inputs": "spell: 1", "parameters": {"max_new_tokens": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    s.shutdown().await;
}

/// A request of the concurrency test: its body and the options `generate` gets offline.
fn mixed(i: usize) -> (Value, GenerationConfig, bool) {
    let n = (i * 7919 + 11) % 10usize.pow(1 + (i % 6) as u32);
    let text = format!("spell: {n}");
    let base = GenerationConfig {
        max_new_tokens: 60,
        ..GenerationConfig::default()
    };
    let (params, cfg) = match i % 4 {
        0 => (json!({"max_new_tokens": 60}), base),
        1 => (
            json!({"max_new_tokens": 60, "do_sample": true, "temperature": 0.8, "top_k": 10, "seed": i}),
            GenerationConfig {
                do_sample: true,
                temperature: 0.8,
                top_k: 10,
                seed: i as u64,
                ..base
            },
        ),
        2 => (
            json!({"max_new_tokens": 12 + i % 20, "min_new_tokens": 12 + i % 20}),
            GenerationConfig {
                max_new_tokens: 12 + i % 20,
                min_new_tokens: 12 + i % 20,
                ..base
            },
        ),
        _ => (
            json!({"max_new_tokens": 60, "repetition_penalty": 1.2, "stop": ["thousand"]}),
            GenerationConfig {
                repetition_penalty: 1.2,
                stop_strings: vec!["thousand".into()],
                ..base
            },
        ),
    };
    (
        json!({"inputs": text, "parameters": params}),
        cfg,
        i.is_multiple_of(3),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_clients_get_their_offline_results() {
    let (model, tok) = model();
    let s = Server::start(model.clone(), tok.clone(), config()).await;
    let c = client();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let (c, url, surl) = (c.clone(), s.url("/generate"), s.url("/generate_stream"));
            tokio::spawn(async move {
                let (body, _, stream) = mixed(i);
                if stream {
                    let events = sse(&c, &surl, body).await;
                    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
                    (
                        i,
                        200,
                        last["generated_text"].as_str().unwrap_or("").to_string(),
                    )
                } else {
                    let (st, v) = post(&c, &url, body).await;
                    (
                        i,
                        st,
                        v["generated_text"].as_str().unwrap_or("").to_string(),
                    )
                }
            })
        })
        .collect();
    let mut answered = 0;
    for t in tasks {
        let (i, status, text) = t.await.unwrap();
        assert_eq!(status, 200, "request {i}");
        let (body, cfg, _) = mixed(i);
        let want = offline(&model, &tok, body["inputs"].as_str().unwrap(), &cfg);
        assert_eq!(
            text, want,
            "request {i} ({body}) differs from the offline result"
        );
        answered += 1;
    }
    assert_eq!(answered, 64);
    let m = c
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("tgi_request_success 64"), "{m}");
    s.shutdown().await;
}

/// Reads a gauge from /metrics.
async fn gauge(c: &reqwest::Client, s: &Server, name: &str) -> u64 {
    let m = c
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gives_429_and_dropped_clients_free_their_slots() {
    let (model, tok) = model();
    let s = Server::start(
        model,
        tok,
        EngineConfig {
            max_concurrent_requests: 4,
            max_waiting_requests: 4,
            ..config()
        },
    )
    .await;
    let c = client();
    let long =
        json!({"inputs": "spell: 5", "parameters": {"max_new_tokens": 200, "min_new_tokens": 200}});
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (c, url, body) = (c.clone(), s.url("/generate"), long.clone());
            tokio::spawn(async move { post(&c, &url, body).await })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        let (st, v) = t.await.unwrap();
        if st == 429 {
            assert_eq!(v["error_type"], "overloaded", "{v}");
        }
        codes.push(st);
    }
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");
    assert!(codes.iter().all(|&c| c == 200 || c == 429), "{codes:?}");
    assert_eq!(c.get(s.url("/health")).send().await.unwrap().status(), 200);

    // A client that hangs up mid-stream frees its slot.
    let r = c
        .post(s.url("/generate_stream"))
        .json(&json!({"inputs": "spell: 5", "parameters": {"max_new_tokens": 256, "min_new_tokens": 256}}))
        .send()
        .await
        .unwrap();
    let mut events = r.bytes_stream().eventsource();
    for _ in 0..3 {
        events.next().await.unwrap().unwrap();
    }
    assert!(gauge(&c, &s, "t5rt_requests_in_flight").await >= 1);
    drop(events);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let busy = gauge(&c, &s, "t5rt_requests_in_flight").await
            + gauge(&c, &s, "tgi_batch_current_size").await
            + gauge(&c, &s, "tgi_queue_size").await;
        if busy == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dropped stream still holds its slot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_requests_in_flight() {
    let (model, tok) = model();
    let s = Server::start(model, tok, config()).await;
    let c = client();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (c, url) = (c.clone(), s.url("/generate"));
            tokio::spawn(async move {
                post(
                    &c,
                    &url,
                    json!({"inputs": "spell: 8", "parameters": {"max_new_tokens": 200, "min_new_tokens": 200, "details": true}}),
                )
                .await
            })
        })
        .collect();
    // Let them start, then stop the server: they still complete.
    let deadline = Instant::now() + Duration::from_secs(10);
    while gauge(&c, &s, "tgi_batch_current_size").await < 4 {
        assert!(Instant::now() < deadline, "requests did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let base = s.base.clone();
    s.shutdown().await;
    for t in tasks {
        let (st, v) = t.await.unwrap();
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["details"]["generated_tokens"], 200);
    }
    // Stopped: no more connections.
    assert!(c.get(format!("{base}/health")).send().await.is_err());
}
