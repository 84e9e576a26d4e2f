//! The bad-input gauntlet, through the library API (the layer the server and the Python
//! package call): hostile values of every generation option, absurd configs, truncated and
//! corrupted checkpoint and tokenizer files. Every case must end in a result or a clear
//! one-line error within a time bound: never a panic, an abort or a hang. The CLI's share is
//! in `crates/t5rt-cli/tests/gauntlet.rs`, run under a memory limit.

mod common;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use proptest::prelude::*;
use t5rt::{
    generate, Checkpoint, CpuBackend, EarlyStopping, GenerationConfig, Hypothesis, Limits, T5Error,
    T5Model,
};

/// Seconds any one case may take.
const BOUND: Duration = Duration::from_secs(30);

/// Runs `f` on its own thread: its value, or a test failure if it panics or outlives
/// [`BOUND`].
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(BOUND) {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => panic!("{what}: panicked"),
        Err(_) => panic!("{what}: no answer within {BOUND:?}"),
    }
}

/// A clear error: one line, saying something.
fn assert_clear(what: &str, e: &T5Error) {
    let msg = e.to_string();
    assert!(
        !msg.is_empty() && !msg.contains('\n'),
        "{what}: unclear error {msg:?}"
    );
}

fn bundled() -> Arc<T5Model<CpuBackend>> {
    static MODEL: std::sync::OnceLock<Arc<T5Model<CpuBackend>>> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| Arc::new(common::load_model(&common::bundled_model(), 2)))
        .clone()
}

/// `generate` on the bundled model, bounded; checks the shape of a result, or the clarity
/// of an error.
fn run(what: &str, inputs: Vec<Vec<u32>>, cfg: GenerationConfig) -> Result<(), String> {
    let model = bundled();
    let (n_inputs, cfg2) = (inputs.len(), cfg.clone());
    let out = bounded(what, move || generate(&model, &inputs, &cfg, None, |_| {}));
    match out {
        Ok(out) => {
            check_result(what, &out, n_inputs, &cfg2);
            Ok(())
        }
        Err(e) => {
            assert_clear(what, &e);
            Err(e.to_string())
        }
    }
}

fn check_result(what: &str, out: &[Vec<Hypothesis>], n_inputs: usize, cfg: &GenerationConfig) {
    assert_eq!(out.len(), n_inputs, "{what}: one result per input");
    for hyps in out {
        assert_eq!(hyps.len(), cfg.num_return_sequences, "{what}: sequences");
        for h in hyps {
            assert!(h.ids.len() <= cfg.new_token_limit(), "{what}: too long");
            assert!(
                h.ids.iter().all(|&id| id < 104),
                "{what}: id outside the vocabulary"
            );
        }
    }
}

fn spell(n: u32) -> Vec<u32> {
    let ckpt = Checkpoint::open(&common::bundled_model()).unwrap();
    ckpt.tokenizer
        .as_ref()
        .unwrap()
        .encode(&format!("spell: {n}"))
        .unwrap()
}

/// The table, through the library: each is refused before any work.
#[test]
fn absurd_requests_are_refused_at_once() {
    let input = || vec![spell(5)];
    let cases: Vec<(&str, GenerationConfig, &str)> = vec![
        (
            "max_new_tokens 1e11",
            GenerationConfig {
                max_new_tokens: 100_000_000_000,
                ..Default::default()
            },
            "max_new_tokens",
        ),
        (
            "num_beams 100000",
            GenerationConfig {
                num_beams: 100_000,
                ..Default::default()
            },
            "num_beams",
        ),
        (
            "num_beams 5000",
            GenerationConfig {
                num_beams: 5000,
                ..Default::default()
            },
            "num_beams",
        ),
        (
            "num_beams above the vocabulary",
            GenerationConfig {
                num_beams: 105,
                ..Default::default()
            },
            "vocabulary",
        ),
        (
            "10M sampled sequences",
            GenerationConfig {
                do_sample: true,
                num_return_sequences: 10_000_000,
                ..Default::default()
            },
            "num_return_sequences",
        ),
        (
            "a budget of one byte",
            GenerationConfig {
                max_memory: Some(1),
                ..Default::default()
            },
            "max_memory",
        ),
        (
            "a million tokens in 100 MiB",
            GenerationConfig {
                max_new_tokens: 1 << 20,
                max_memory: Some(100 << 20),
                ..Default::default()
            },
            "lower max_new_tokens",
        ),
        (
            "100 stop strings",
            GenerationConfig {
                stop_strings: vec!["x".into(); 100],
                ..Default::default()
            },
            "stop strings",
        ),
        (
            "a 1 MB stop string",
            GenerationConfig {
                stop_strings: vec!["x".repeat(1 << 20)],
                ..Default::default()
            },
            "stop string",
        ),
        (
            "n-gram of 10^9",
            GenerationConfig {
                no_repeat_ngram_size: 1_000_000_000,
                ..Default::default()
            },
            "no_repeat_ngram_size",
        ),
    ];
    for (what, cfg, needle) in cases {
        let started = std::time::Instant::now();
        let err = run(what, input(), cfg).expect_err(what);
        assert!(err.contains(needle), "{what}: {err}");
        // Refused before any work: well under the bound (not a timing claim about speed).
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: slow refusal"
        );
    }
    let err = CpuBackend::new(100_000).err().expect("100000 threads");
    assert!(err.to_string().contains("threads"), "{err}");
}

/// A budget too small for the requested batch splits it: same tokens as unsplit.
#[test]
fn batches_split_to_fit_the_budget() {
    let inputs: Vec<Vec<u32>> = (0..12).map(|i| spell(1000 + 37 * i)).collect();
    let cfg = GenerationConfig {
        batch_size: 12,
        ..Default::default()
    };
    let model = bundled();
    let whole = generate(&model, &inputs, &cfg, None, |_| {}).unwrap();
    // A budget that fits one or two sequences of this shape, not twelve.
    let one = t5rt::generate::memory::plan(
        &model.config,
        t5rt::WeightDtype::F32,
        t5rt::generate::memory::BatchShape::on(
            &model,
            2,
            1,
            inputs.iter().map(Vec::len).max().unwrap(),
            cfg.max_new_tokens,
        ),
    )
    .peak();
    let mut calls = 0;
    let split = generate(
        &model,
        &inputs,
        &GenerationConfig {
            max_memory: Some(one),
            ..cfg.clone()
        },
        None,
        |_| calls += 1,
    )
    .unwrap();
    assert_eq!(split, whole);
    assert!(
        calls >= 6,
        "{calls} batches: the budget did not split the work"
    );
}

fn hostile_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        -2.0f32..4.0,
        Just(0.0),
        Just(-0.0),
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(f32::MIN_POSITIVE),
        Just(1e-30),
        Just(f32::MAX),
    ]
}

fn hostile_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        -3.0f64..3.0,
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(1e300),
    ]
}

/// Small values, and values just past or far past any limit.
fn hostile_usize(small: usize, limit: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0..small,
        1 => Just(limit + 1),
        1 => Just(usize::MAX),
    ]
}

fn hostile_id() -> impl Strategy<Value = u32> {
    prop_oneof![8 => 0u32..110, 1 => Just(u32::MAX)]
}

fn hostile_config() -> impl Strategy<Value = GenerationConfig> {
    let lengths = (
        hostile_usize(24, Limits::MAX_NEW_TOKENS),
        proptest::option::of(hostile_usize(30, Limits::MAX_NEW_TOKENS)),
        hostile_usize(30, usize::MAX - 1),
        hostile_usize(30, usize::MAX - 1),
        hostile_usize(12, Limits::MAX_INPUT_TOKENS),
        hostile_usize(5, 1 << 40),
    );
    let search = (
        hostile_usize(5, Limits::MAX_BEAMS),
        hostile_usize(4, Limits::MAX_RETURN_SEQUENCES),
        hostile_f64(),
        prop_oneof![
            Just(EarlyStopping::True),
            Just(EarlyStopping::False),
            Just(EarlyStopping::Never)
        ],
        any::<bool>(),
        any::<u64>(),
    );
    let warpers = (
        hostile_f32(),
        hostile_usize(200, usize::MAX - 1),
        hostile_f32(),
        hostile_f32(),
        hostile_usize(5, Limits::MAX_NGRAM),
    );
    let lists = (
        proptest::collection::vec(proptest::collection::vec(hostile_id(), 0..3), 0..3),
        proptest::option::of(hostile_id()),
        proptest::option::of(hostile_id()),
        proptest::collection::vec("[a-z \\u{e9}\\u{4e2d}]{0,4}", 0..3),
        proptest::option::of(prop_oneof![
            Just(0u64),
            Just(1),
            Just(1 << 20),
            Just(1 << 40),
            Just(u64::MAX)
        ]),
    );
    (lengths, search, warpers, lists).prop_map(
        |(
            (max_new_tokens, max_length, min_new_tokens, min_length, max_input_tokens, batch_size),
            (num_beams, num_return_sequences, length_penalty, early_stopping, do_sample, seed),
            (temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size),
            (bad_words_ids, forced_bos_token_id, forced_eos_token_id, stop_strings, max_memory),
        )| GenerationConfig {
            max_new_tokens,
            max_length,
            min_new_tokens,
            min_length,
            num_beams,
            length_penalty,
            early_stopping,
            num_return_sequences,
            do_sample,
            temperature,
            top_k,
            top_p,
            seed,
            repetition_penalty,
            no_repeat_ngram_size,
            bad_words_ids,
            forced_bos_token_id,
            forced_eos_token_id,
            stop_strings,
            batch_size,
            max_input_tokens,
            max_memory,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any options, any ids: a result of the right shape or a clear error, in bounded time.
    #[test]
    fn any_options_end_in_a_result_or_a_clear_error(
        cfg in hostile_config(),
        inputs in proptest::collection::vec(proptest::collection::vec(hostile_id(), 0..10), 0..4),
        text in any::<bool>(),
    ) {
        // Stop strings need the tokenizer: pass it half the time.
        let model = bundled();
        let (n, cfg2) = (inputs.len(), cfg.clone());
        let out = bounded("generate", move || {
            let ckpt = Checkpoint::open(&common::bundled_model()).unwrap();
            let tok = if text { ckpt.tokenizer.as_ref() } else { None };
            generate(&model, &inputs, &cfg, tok, |_| {})
        });
        match out {
            Ok(out) => check_result("generate", &out, n, &cfg2),
            Err(e) => assert_clear("generate", &e),
        }
    }
}

/// A copy of a checkpoint directory in a temporary directory.
fn copy_dir(src: &Path) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    (tmp, dir)
}

/// Opens and loads `dir`, and generates once from text: Ok or a clear error, bounded.
fn load_and_run(what: &str, dir: PathBuf) -> Result<(), String> {
    let r = bounded(what, move || -> Result<(), T5Error> {
        let ckpt = Checkpoint::open(&dir)?;
        let model = ckpt.load_model(CpuBackend::new(1)?)?;
        let ids = t5rt::Input::Text("spell: 12".into()).encode(ckpt.tokenizer.as_ref())?;
        let cfg = GenerationConfig {
            max_new_tokens: 8,
            ..Default::default()
        };
        generate(&model, &[ids], &cfg, ckpt.tokenizer.as_ref(), |_| {})?;
        Ok(())
    });
    r.map_err(|e| {
        assert_clear(what, &e);
        e.to_string()
    })
}

/// Absurd and malformed values of every dimension in config.json.
#[test]
fn absurd_configs_are_refused() {
    let fields = [
        "vocab_size",
        "d_model",
        "d_kv",
        "d_ff",
        "num_layers",
        "num_decoder_layers",
        "num_heads",
        "relative_attention_num_buckets",
        "relative_attention_max_distance",
    ];
    let values = [
        "0",
        "-1",
        "1000000000000",
        "9223372036854775807",
        "1e300",
        "1.5",
        "\"x\"",
        "[]",
        "{}",
    ];
    let (_tmp, dir) = copy_dir(&common::bundled_model());
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    for field in fields {
        for value in values {
            if field == "relative_attention_max_distance" && value == "1000000000000" {
                continue; // refused by the bound; the weights do not say it
            }
            let mut cfg = original.clone();
            cfg[field] = serde_json::from_str(value).unwrap();
            std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
            let what = format!("config {field} = {value}");
            // A changed dimension never matches the weights: refused, whichever way.
            assert!(load_and_run(&what, dir.clone()).is_err(), "{what} loaded");
        }
    }
    // Token ids and the epsilon do not shape the weights: out-of-range values are refused,
    // in-range ones may load.
    for field in [
        "pad_token_id",
        "eos_token_id",
        "decoder_start_token_id",
        "layer_norm_epsilon",
    ] {
        for value in values {
            let mut cfg = original.clone();
            cfg[field] = serde_json::from_str(value).unwrap();
            std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
            let what = format!("config {field} = {value}");
            let r = load_and_run(&what, dir.clone());
            if !["0", "1.5"].contains(&value) || field == "layer_norm_epsilon" && value == "1.5" {
                assert!(r.is_err(), "{what} loaded");
            }
        }
    }
    let mut cfg = original.clone();
    cfg["d_model"] = serde_json::json!(1_000_000_000_000u64);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = load_and_run("d_model 1e12", dir.clone()).unwrap_err();
    assert!(err.contains("d_model") && err.contains("corrupt"), "{err}");
}

/// Hostile values of every field of generation_config.json: the model's defaults for the
/// options go through the same checks as a client's.
#[test]
fn hostile_generation_configs_end_in_a_result_or_a_clear_error() {
    let fields = [
        "max_length",
        "max_new_tokens",
        "min_length",
        "min_new_tokens",
        "num_beams",
        "num_return_sequences",
        "do_sample",
        "early_stopping",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "bad_words_ids",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "eos_token_id",
    ];
    let values = [
        "-1",
        "0",
        "1e300",
        "1000000000000",
        "\"x\"",
        "[]",
        "[[-1]]",
        "null",
        "true",
        "{}",
    ];
    let (_tmp, dir) = copy_dir(&common::bundled_model());
    for field in fields {
        for value in values {
            let text = format!("{{\"{field}\": {value}}}");
            std::fs::write(dir.join("generation_config.json"), &text).unwrap();
            let what = format!("generation_config {text}");
            let dir = dir.clone();
            let r = bounded(&what, move || -> Result<(), T5Error> {
                let ckpt = Checkpoint::open(&dir)?;
                let model = ckpt.load_model(CpuBackend::new(1)?)?;
                let ids = t5rt::Input::Text("spell: 7".into()).encode(ckpt.tokenizer.as_ref())?;
                let cfg = GenerationConfig::from_model(&ckpt.generation);
                generate(&model, &[ids], &cfg, None, |_| {})?;
                Ok(())
            });
            if let Err(e) = r {
                assert_clear(&what, &e);
            }
        }
    }
}

/// Empty files, and files cut short or with flipped bytes, in each file of a checkpoint.
#[test]
fn empty_files_are_refused() {
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        let (_tmp, dir) = copy_dir(&common::bundled_model());
        std::fs::write(dir.join(name), b"").unwrap();
        let err = load_and_run(&format!("empty {name}"), dir).unwrap_err();
        assert!(err.contains(name), "empty {name}: {err}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn truncated_files_are_refused(which in 0usize..3, cut in 0.0f64..1.0) {
        let name = ["config.json", "model.safetensors", "tokenizer.json"][which];
        let (_tmp, dir) = copy_dir(&common::bundled_model());
        let bytes = std::fs::read(dir.join(name)).unwrap();
        // Cut inside the content: a JSON file without its trailing newline is still whole.
        let content = bytes.trim_ascii_end().len();
        let keep = (content as f64 * cut) as usize;
        std::fs::write(dir.join(name), &bytes[..keep]).unwrap();
        let r = load_and_run(&format!("{name} cut to {keep} bytes"), dir);
        prop_assert!(r.is_err(), "{} cut to {} of {} bytes loaded", name, keep, bytes.len());
    }

    #[test]
    fn corrupted_bytes_end_in_a_result_or_a_clear_error(
        which in 0usize..3,
        flips in proptest::collection::vec((0.0f64..1.0, any::<u8>()), 1..8),
        in_header in any::<bool>(),
    ) {
        let name = ["config.json", "model.safetensors", "tokenizer.json"][which];
        let (_tmp, dir) = copy_dir(&common::bundled_model());
        let mut bytes = std::fs::read(dir.join(name)).unwrap();
        // The safetensors header (its first few KiB) is where corruption bites hardest.
        let span = if in_header { bytes.len().min(4096) } else { bytes.len() };
        for (at, value) in flips {
            let i = ((span as f64 * at) as usize).min(bytes.len() - 1);
            bytes[i] = value;
        }
        std::fs::write(dir.join(name), &bytes).unwrap();
        // Either outcome is fine (a flipped weight byte still loads): no panic, no hang.
        let _ = load_and_run(&format!("{name} with flipped bytes"), dir);
    }
}
