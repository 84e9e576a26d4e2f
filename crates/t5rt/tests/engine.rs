//! The continuous-batching engine: every request's tokens equal what `generate` gives for
//! that input alone (rows join a running batch at other positions, with other options and
//! other source lengths), limits refuse at submission, cancelled requests free their slot,
//! shutdown finishes what is running.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use t5rt::engine::{Batching, EngineConfig, EngineHandle, Event, FinishReason, SubmitError};
use t5rt::{generate, Checkpoint, CpuBackend, GenerationConfig, T5Model, T5Tokenizer, WeightDtype};

fn setup() -> (Arc<T5Model<CpuBackend>>, Arc<T5Tokenizer>) {
    setup_as(WeightDtype::F32)
}

fn setup_as(dtype: WeightDtype) -> (Arc<T5Model<CpuBackend>>, Arc<T5Tokenizer>) {
    let ckpt = Checkpoint::open(&common::bundled_model()).unwrap();
    let model = ckpt
        .load_model(CpuBackend::new(2).unwrap().with_dtype(dtype))
        .unwrap();
    let Checkpoint { tokenizer, .. } = ckpt;
    (Arc::new(model), Arc::new(tokenizer.unwrap()))
}

/// Waits for a request's end: its streamed ids and the final event.
fn collect(mut s: t5rt::engine::RequestStream) -> (Vec<u32>, t5rt::engine::Finished) {
    let mut streamed = Vec::new();
    loop {
        match s.blocking_next() {
            Some(Event::Token(t)) => streamed.push(t.id),
            Some(Event::Done(f)) => return (streamed, f),
            Some(Event::Error(e)) => panic!("request failed: {e}"),
            None => panic!("the stream ended without a result"),
        }
    }
}

/// A mix of options: greedy, forced lengths (so rows stay in the batch and others join
/// them), sampling with seeds, processors, stop strings and beams.
fn options(i: usize) -> GenerationConfig {
    let base = GenerationConfig {
        max_new_tokens: 40,
        ..GenerationConfig::default()
    };
    match i % 7 {
        0 => base,
        1 => GenerationConfig {
            min_new_tokens: 20 + i % 13,
            ..base
        },
        2 => GenerationConfig {
            do_sample: true,
            temperature: 0.9,
            top_k: 20,
            top_p: 0.95,
            seed: i as u64,
            min_new_tokens: 10,
            ..base
        },
        3 => GenerationConfig {
            repetition_penalty: 1.3,
            no_repeat_ngram_size: 2,
            min_new_tokens: 15,
            ..base
        },
        4 => GenerationConfig {
            stop_strings: vec!["hundred".into()],
            ..base
        },
        5 => GenerationConfig {
            num_beams: 3,
            num_return_sequences: 2,
            ..base
        },
        _ => GenerationConfig {
            max_new_tokens: 5 + i % 4,
            min_new_tokens: 5,
            ..base
        },
    }
}

#[test]
fn requests_equal_their_offline_results_whatever_joins_the_batch() {
    let (model, tok) = setup();
    for batching in [Batching::Continuous, Batching::Static] {
        let engine = EngineHandle::start(
            model.clone(),
            Some(tok.clone()),
            EngineConfig {
                max_batch_size: 8,
                batching,
                ..EngineConfig::default()
            },
        )
        .unwrap();
        // 40 requests from 8 client threads, staggered so that rows join a batch already
        // decoding, at other positions and with sources of other lengths.
        let results: Vec<(usize, Vec<u32>, t5rt::engine::Finished)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|client| {
                    let (engine, tok) = (engine.clone(), tok.clone());
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for k in 0..5 {
                            let i = client * 5 + k;
                            let text = format!("spell: {}", (i * 7919 + 13) % 1_000_000);
                            let ids = tok.encode(&text).unwrap();
                            std::thread::sleep(Duration::from_millis((i % 3) as u64 * 3));
                            let stream = engine.submit(ids, options(i)).unwrap();
                            let (streamed, done) = collect(stream);
                            out.push((i, streamed, done));
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(results.len(), 40);
        for (i, streamed, done) in results {
            let text = format!("spell: {}", (i * 7919 + 13) % 1_000_000);
            let ids = tok.encode(&text).unwrap();
            let cfg = options(i);
            let want =
                generate(&model, std::slice::from_ref(&ids), &cfg, Some(&tok), |_| {}).unwrap();
            assert_eq!(
                done.ids, want[0][0].ids,
                "{batching:?} request {i} ({cfg:?}) differs from generate()"
            );
            assert_eq!(streamed, done.ids, "request {i}: streamed tokens");
            assert_eq!(done.input_tokens, ids.len());
            if cfg.num_beams > 1 {
                assert_eq!(done.sequences, want[0], "request {i}: n-best list");
            } else {
                assert_eq!(done.tokens.len(), done.ids.len());
                assert!(done
                    .tokens
                    .iter()
                    .all(|t| t.logprob.is_some_and(|l| l <= 0.0)));
            }
            let eos = model.config.eos_token_id;
            let expected_reason = if done.ids.last() == Some(&eos) {
                FinishReason::EosToken
            } else if !cfg.stop_strings.is_empty()
                && tok
                    .decode(&done.ids)
                    .unwrap()
                    .contains(&cfg.stop_strings[0])
            {
                FinishReason::StopSequence
            } else {
                FinishReason::Length
            };
            assert_eq!(done.finish_reason, expected_reason, "request {i}");
        }
        let stats = engine.stats();
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.in_flight.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "requests left in flight");
            std::thread::sleep(Duration::from_millis(5));
        }
        engine.shutdown();
    }
}

#[test]
fn limits_are_checked_at_submission() {
    let (model, tok) = setup();
    let engine = EngineHandle::start(
        model,
        None,
        EngineConfig {
            max_input_tokens: 8,
            max_new_tokens: 16,
            max_concurrent_requests: 2,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let ids = tok.encode("spell: 12").unwrap();
    let err = |r: Result<_, SubmitError>| r.err().expect("refused");
    let e = err(engine.submit(vec![5; 9], GenerationConfig::default()));
    assert!(
        matches!(&e, SubmitError::Invalid(m) if m.contains("max_input_tokens")),
        "{e}"
    );
    let e = err(engine.submit(ids.clone(), GenerationConfig::default())); // 128 new tokens
    assert!(
        matches!(&e, SubmitError::Invalid(m) if m.contains("max_new_tokens")),
        "{e}"
    );
    let short = GenerationConfig {
        max_new_tokens: 16,
        min_new_tokens: 16,
        ..GenerationConfig::default()
    };
    let e = err(engine.submit(
        ids.clone(),
        GenerationConfig {
            stop_strings: vec!["x".into()],
            ..short.clone()
        },
    ));
    assert!(
        matches!(&e, SubmitError::Invalid(m) if m.contains("tokenizer")),
        "{e}"
    );
    let e = err(engine.submit(vec![], short.clone()));
    assert!(matches!(e, SubmitError::Invalid(_)));
    let e = err(engine.submit(vec![500], short.clone()));
    assert!(
        matches!(&e, SubmitError::Invalid(m) if m.contains("vocabulary")),
        "{e}"
    );
    // Two in flight: the third is refused as overload, and admitted once one has finished.
    let a = engine.submit(ids.clone(), short.clone()).unwrap();
    let b = engine.submit(ids.clone(), short.clone()).unwrap();
    let e = err(engine.submit(ids.clone(), short.clone()));
    assert!(matches!(e, SubmitError::Overloaded(_)), "{e}");
    collect(a);
    collect(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    let c = loop {
        match engine.submit(ids.clone(), short.clone()) {
            Ok(c) => break c,
            Err(SubmitError::Overloaded(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(collect(c).1.ids.len(), 16);
    engine.shutdown();
    let e = err(engine.submit(ids, short));
    assert_eq!(e, SubmitError::ShuttingDown);
}

#[test]
fn a_dropped_request_frees_its_slot() {
    let (model, tok) = setup();
    let engine = EngineHandle::start(model, None, EngineConfig::default()).unwrap();
    let ids = tok.encode("spell: 777").unwrap();
    let long = GenerationConfig {
        max_new_tokens: 500,
        min_new_tokens: 500,
        ..GenerationConfig::default()
    };
    let mut stream = engine.submit(ids.clone(), long.clone()).unwrap();
    // Read a few tokens, then hang up.
    for _ in 0..3 {
        assert!(matches!(stream.blocking_next(), Some(Event::Token(_))));
    }
    drop(stream);
    let stats = engine.stats();
    let deadline = Instant::now() + Duration::from_secs(5);
    use std::sync::atomic::Ordering::SeqCst;
    while stats.in_flight.load(SeqCst) + stats.batch_rows.load(SeqCst) > 0 {
        assert!(
            Instant::now() < deadline,
            "the dropped request still holds its slot"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // The engine still serves.
    let (_, done) = collect(engine.submit(ids, GenerationConfig::default()).unwrap());
    assert_eq!(
        tok.decode(&done.ids).unwrap(),
        "seven hundred seventy-seven"
    );
}

#[test]
fn shutdown_finishes_what_is_running() {
    let (model, tok) = setup();
    let engine = EngineHandle::start(model, None, EngineConfig::default()).unwrap();
    let ids = tok.encode("spell: 31").unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 200,
        min_new_tokens: 200,
        ..GenerationConfig::default()
    };
    let streams: Vec<_> = (0..4)
        .map(|_| engine.submit(ids.clone(), cfg.clone()).unwrap())
        .collect();
    engine.shutdown();
    for s in streams {
        assert_eq!(collect(s).1.ids.len(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine.is_running() {
        assert!(Instant::now() < deadline, "workers still running");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Rows that join a batch far into its decoding, past the caches' first growth, and a batch
/// that outlives its first rows (its caches are compacted): still the offline tokens. In f32,
/// and in int8, whose cross-attention caches are int8 (widened for a longer source as rows
/// join) and self-attention caches bf16 (grown, appended to and compacted in bf16 slots).
#[test]
fn late_joiners_and_compacted_caches_give_offline_tokens() {
    for dtype in [WeightDtype::F32, WeightDtype::Int8] {
        late_joiners(dtype);
    }
}

fn late_joiners(dtype: WeightDtype) {
    let (model, tok) = setup_as(dtype);
    let engine = EngineHandle::start(
        model.clone(),
        Some(tok.clone()),
        EngineConfig {
            max_new_tokens: 400,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let forced = |n: usize| GenerationConfig {
        max_new_tokens: n,
        min_new_tokens: n,
        ..GenerationConfig::default()
    };
    let reqs = [
        ("spell: 12", forced(300), 0usize),
        ("spell: 987654", forced(400), 200),
        (
            "spell: 31337",
            GenerationConfig {
                do_sample: true,
                seed: 5,
                ..forced(150)
            },
            290,
        ),
        ("spell: 4", forced(20), 395),
    ];
    // Each request is submitted once the first one has streamed `after` tokens.
    let mut first = engine
        .submit(tok.encode(reqs[0].0).unwrap(), reqs[0].1.clone())
        .unwrap();
    let mut streams = Vec::new();
    let mut first_ids = Vec::new();
    let mut next = 1;
    let first_done = loop {
        match first.blocking_next().unwrap() {
            Event::Token(t) => first_ids.push(t.id),
            Event::Done(f) => break f,
            Event::Error(e) => panic!("{e}"),
        }
        while next < reqs.len() && first_ids.len() == reqs[next].2 {
            let (text, cfg, _) = &reqs[next];
            streams.push((
                next,
                engine
                    .submit(tok.encode(text).unwrap(), cfg.clone())
                    .unwrap(),
            ));
            next += 1;
        }
    };
    // The last one joins after the first has left.
    while next < reqs.len() {
        let (text, cfg, _) = &reqs[next];
        streams.push((
            next,
            engine
                .submit(tok.encode(text).unwrap(), cfg.clone())
                .unwrap(),
        ));
        next += 1;
    }
    let mut results = vec![(0, first_done)];
    results.extend(streams.into_iter().map(|(i, s)| (i, collect(s).1)));
    for (i, done) in results {
        let (text, cfg, _) = &reqs[i];
        let want = generate(&model, &[tok.encode(text).unwrap()], cfg, None, |_| {}).unwrap();
        assert_eq!(
            done.ids, want[0][0].ids,
            "{dtype}: request {i} differs from generate()"
        );
    }
    let steps = engine
        .stats()
        .steps
        .load(std::sync::atomic::Ordering::SeqCst);
    // Far fewer steps than tokens: the requests did share the batch.
    assert!(steps < 300 + 400 + 150 + 20, "{dtype}: {steps} steps");
}
