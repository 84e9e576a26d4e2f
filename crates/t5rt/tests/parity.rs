//! Parity with Hugging Face transformers (fp32) on the committed fixtures: encoder output and
//! per-step logits within 1e-4 of the largest magnitude, greedy tokens exactly, and batch
//! invariance (a sequence decoded alone equals the same sequence in a padded batch).

mod common;

use common::{assert_close, fixtures, load_model, Reference};
use t5rt::model::relpos::bucket;
use t5rt::{generate, Backend, EarlyStopping, GenerationConfig, Hypothesis};

const TOL: f32 = 1e-4;
const VARIANTS: [&str; 4] = ["t5-v1_0", "t5-v1_1", "mt5", "spell-numbers"];

fn model_dir(variant: &str) -> std::path::PathBuf {
    if variant == "spell-numbers" {
        common::bundled_model()
    } else {
        fixtures().join(variant)
    }
}

fn check_encoder(variant: &str) {
    let r = Reference::load(variant);
    let model = load_model(&model_dir(variant), 2);
    let inputs = r.ids("/inputs");
    let enc = model.encode(&inputs).unwrap();
    let (shape, want) = r.tensor("encoder_hidden");
    let (batch, len, d) = (shape[0], shape[1], shape[2]);
    assert_eq!((enc.batch, enc.src_len), (batch, len));
    let got = model
        .backend
        .download(&enc.hidden, batch * len * d)
        .unwrap();
    // Compare the positions that hold tokens; padding rows are not part of the output.
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for (b, seq) in inputs.iter().enumerate() {
        let range = b * len * d..(b * len + seq.len()) * d;
        g.extend_from_slice(&got[range.clone()]);
        w.extend_from_slice(&want[range]);
    }
    assert_close(&format!("{variant} encoder"), &g, &w, TOL);
}

/// Teacher-forced logits per step; `initial_capacity` 1 makes the caches grow 1 -> 2 -> 4 -> 8.
fn check_logits(variant: &str, initial_capacity: usize) {
    let r = Reference::load(variant);
    let model = load_model(&model_dir(variant), 2);
    let inputs = r.ids("/inputs");
    let dec_in = r.ids("/decoder_input_ids");
    let (shape, want) = r.tensor("logits");
    let (batch, steps, vocab) = (shape[0], shape[1], shape[2]);
    let enc = model.encode(&inputs).unwrap();
    let mut state = model
        .start_decoding_with_capacity(&enc, steps, initial_capacity, 1)
        .unwrap();
    let mut worst = 0.0f32;
    for s in 0..steps {
        let tokens: Vec<u32> = dec_in.iter().map(|seq| seq[s]).collect();
        let logits = model.decode_step(&tokens, &mut state).unwrap();
        let got = model.backend.download(logits, batch * vocab).unwrap();
        let w: Vec<f32> = (0..batch)
            .flat_map(|b| want[(b * steps + s) * vocab..(b * steps + s + 1) * vocab].to_vec())
            .collect();
        worst = worst.max(common::relative_error(&got, &w));
        assert_close(
            &format!("{variant} logits step {s} (cache from {initial_capacity})"),
            &got,
            &w,
            TOL,
        );
    }
    eprintln!("parity {variant} logits, all {steps} steps: {worst:.2e}");
}

/// The best sequence's ids of each input.
fn best_ids(out: Vec<Vec<Hypothesis>>) -> Vec<Vec<u32>> {
    out.into_iter().map(|mut h| h.swap_remove(0).ids).collect()
}

fn check_greedy(variant: &str, key: &str) {
    let r = Reference::load(variant);
    let model = load_model(&model_dir(variant), 2);
    let inputs = r.ids("/inputs");
    let want = r.ids(&format!("/{key}/outputs"));
    let opts = GenerationConfig {
        max_new_tokens: r.usize(&format!("/{key}/max_new_tokens")),
        min_new_tokens: r.usize(&format!("/{key}/min_new_tokens")),
        batch_size: inputs.len(),
        ..GenerationConfig::default()
    };
    let got = best_ids(generate(&model, &inputs, &opts, None, |_| {}).unwrap());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "{variant} {key}: input {i} differs from Hugging Face");
    }
    // Batch invariance: alone, in batches of 3, and all together give the same tokens.
    for batch_size in [1, 3] {
        let cfg = GenerationConfig {
            batch_size,
            ..opts.clone()
        };
        let again = best_ids(generate(&model, &inputs, &cfg, None, |_| {}).unwrap());
        assert_eq!(
            again, got,
            "{variant} {key}: batch size {batch_size} changed the output"
        );
    }
    let tokens: usize = got.iter().map(Vec::len).sum();
    eprintln!(
        "parity {variant} {key}: {} sequences, {tokens} tokens, all equal to HF",
        got.len()
    );
}

/// A GenerationConfig from the fixture's HF generate() keyword arguments.
fn config_from(params: &serde_json::Value, batch_size: usize) -> GenerationConfig {
    let f = |k: &str| params.get(k).and_then(|v| v.as_f64());
    let u = |k: &str| params.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
    let early_stopping = match &params["early_stopping"] {
        serde_json::Value::Bool(true) => EarlyStopping::True,
        serde_json::Value::String(s) if s == "never" => EarlyStopping::Never,
        _ => EarlyStopping::False,
    };
    let bad_words_ids = params
        .get("bad_words_ids")
        .map(|v| serde_json::from_value(v.clone()).unwrap())
        .unwrap_or_default();
    GenerationConfig {
        max_new_tokens: u("max_new_tokens").unwrap(),
        min_new_tokens: u("min_new_tokens").unwrap_or(0),
        num_beams: u("num_beams").unwrap_or(1),
        num_return_sequences: u("num_return_sequences").unwrap_or(1),
        length_penalty: f("length_penalty").unwrap_or(1.0),
        early_stopping,
        no_repeat_ngram_size: u("no_repeat_ngram_size").unwrap_or(0),
        repetition_penalty: f("repetition_penalty").unwrap_or(1.0) as f32,
        bad_words_ids,
        batch_size,
        ..GenerationConfig::default()
    }
}

/// Beam search: identical n-best token sequences and scores within 1e-4, in the padded batch,
/// and the same again with other batch sizes.
fn check_beam(variant: &str) {
    let r = Reference::load(variant);
    let model = load_model(&model_dir(variant), 2);
    let inputs = r.ids("/inputs");
    let cases = r.json["beam"].as_array().unwrap();
    let (mut worst_abs, mut worst_rel) = (0.0f64, 0.0f64);
    for case in cases {
        let params = &case["params"];
        let cfg = config_from(params, inputs.len());
        let got = generate(&model, &inputs, &cfg, None, |_| {}).unwrap();
        let want_ids: Vec<Vec<Vec<u32>>> = serde_json::from_value(case["outputs"].clone()).unwrap();
        let want_scores: Vec<Vec<f64>> = serde_json::from_value(case["scores"].clone()).unwrap();
        for (i, hyps) in got.iter().enumerate() {
            let ids: Vec<&Vec<u32>> = hyps.iter().map(|h| &h.ids).collect();
            let want: Vec<&Vec<u32>> = want_ids[i].iter().collect();
            assert_eq!(
                ids, want,
                "{variant} {params}: input {i} differs from Hugging Face"
            );
            for (h, w) in hyps.iter().zip(&want_scores[i]) {
                let err = (h.score.unwrap() as f64 - w).abs();
                worst_abs = worst_abs.max(err);
                worst_rel = worst_rel.max(err / w.abs().max(1.0));
                assert!(
                    err <= 1e-4 * w.abs().max(1.0),
                    "{variant} {params}: input {i} score {:?} vs {w}",
                    h.score
                );
            }
        }
        for batch_size in [1, 3] {
            let again = generate(
                &model,
                &inputs,
                &GenerationConfig {
                    batch_size,
                    ..cfg.clone()
                },
                None,
                |_| {},
            )
            .unwrap();
            // Same tokens; scores equal up to rounding (batches of other sizes may take
            // another matmul kernel, summing in another order).
            for (a, g) in again.iter().flatten().zip(got.iter().flatten()) {
                assert_eq!(
                    a.ids, g.ids,
                    "{variant} {params}: batch size {batch_size} changed the output"
                );
                let (sa, sg) = (a.score.unwrap(), g.score.unwrap());
                assert!(
                    (sa - sg).abs() <= 1e-5 * sg.abs().max(1.0),
                    "{variant} {params}: score {sa} vs {sg}"
                );
            }
        }
    }
    eprintln!(
        "parity {variant} beam: {} cases, token-exact, score error worst {worst_abs:.2e} absolute, {worst_rel:.2e} relative",
        cases.len()
    );
}

/// Greedy search with logits processors (no-repeat n-gram, repetition penalty, bad words).
fn check_greedy_processors(variant: &str) {
    let r = Reference::load(variant);
    let model = load_model(&model_dir(variant), 2);
    let inputs = r.ids("/inputs");
    for case in r.json["greedy_processors"].as_array().unwrap() {
        let cfg = config_from(&case["params"], inputs.len());
        let want: Vec<Vec<u32>> = serde_json::from_value(case["outputs"].clone()).unwrap();
        for batch_size in [inputs.len(), 1] {
            let cfg = GenerationConfig {
                batch_size,
                ..cfg.clone()
            };
            let got = best_ids(generate(&model, &inputs, &cfg, None, |_| {}).unwrap());
            assert_eq!(
                got, want,
                "{variant} {}: differs from Hugging Face",
                case["params"]
            );
        }
    }
}

fn check_buckets(variant: &str) {
    let r = Reference::load(variant);
    let rel = &r.json["relpos"];
    let buckets = rel["num_buckets"].as_u64().unwrap() as usize;
    let max_distance = rel["max_distance"].as_u64().unwrap() as usize;
    let relative: Vec<i64> = rel["relative"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    for (key, bidirectional) in [("bidirectional", true), ("causal", false)] {
        let want = rel[key].as_array().unwrap();
        for (r, w) in relative.iter().zip(want) {
            let got = bucket(*r, bidirectional, buckets, max_distance);
            assert_eq!(
                got as u64,
                w.as_u64().unwrap(),
                "{variant} {key} bucket of {r}"
            );
        }
    }
}

macro_rules! parity_tests {
    ($($name:ident => $variant:expr),* $(,)?) => {
        mod encoder { $(#[test] fn $name() { super::check_encoder($variant) })* }
        mod logits { $(#[test] fn $name() { super::check_logits($variant, 64) })* }
        mod logits_growing_cache { $(#[test] fn $name() { super::check_logits($variant, 1) })* }
        mod greedy { $(#[test] fn $name() { super::check_greedy($variant, "greedy") })* }
        mod greedy_min_new_tokens { $(#[test] fn $name() { super::check_greedy($variant, "greedy_min") })* }
        mod beam { $(#[test] fn $name() { super::check_beam($variant) })* }
        mod greedy_processors { $(#[test] fn $name() { super::check_greedy_processors($variant) })* }
        mod relpos_buckets { $(#[test] fn $name() { super::check_buckets($variant) })* }
    };
}

parity_tests! {
    t5_v1_0 => "t5-v1_0",
    t5_v1_1 => "t5-v1_1",
    mt5 => "mt5",
    spell_numbers => "spell-numbers",
}

#[test]
fn every_variant_has_a_fixture() {
    for v in VARIANTS {
        assert!(
            fixtures().join(v).join("reference.json").is_file(),
            "{v}: run tools/make_fixtures.py"
        );
    }
}

#[test]
fn bundled_model_text_matches_hugging_face() {
    let r = Reference::load("spell-numbers");
    let ckpt = t5rt::Checkpoint::open(&common::bundled_model()).unwrap();
    let tok = ckpt.tokenizer.as_ref().unwrap();
    let texts: Vec<String> = serde_json::from_value(r.json["texts"].clone()).unwrap();
    let decoded: Vec<String> = serde_json::from_value(r.json["decoded"].clone()).unwrap();
    // Our tokenizer gives HF's ids for the same texts...
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
    assert_eq!(ids, r.ids("/inputs"));
    // ...and decoding HF's outputs gives HF's text.
    for (out, want) in r.ids("/greedy/outputs").iter().zip(&decoded) {
        assert_eq!(&tok.decode(out).unwrap(), want);
    }
}
