//! Sampling: reproducible per seed, independent of batching, and distributed as the softmax
//! of the (warped) logits; top-k and top-p never emit a token outside their set.

mod common;

use t5rt::{generate, Backend, CpuBackend, GenerationConfig, T5Model};

fn model() -> T5Model<CpuBackend> {
    common::load_model(&common::fixtures().join("t5-v1_1"), 2)
}

fn inputs() -> Vec<Vec<u32>> {
    common::Reference::load("t5-v1_1").ids("/inputs")
}

/// First-step logits of `input`, as the sampler sees them.
fn first_logits(model: &T5Model<CpuBackend>, input: &[u32]) -> Vec<f32> {
    let enc = model.encode(&[input.to_vec()]).unwrap();
    let mut state = model.start_decoding(&enc, 1).unwrap();
    let start = model.config.decoder_start_token_id;
    let logits = model.decode_step(&[start], &mut state).unwrap();
    model
        .backend
        .download(logits, model.config.vocab_size)
        .unwrap()
}

fn softmax(x: &[f32], temperature: f32) -> Vec<f64> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = x
        .iter()
        .map(|&v| ((v as f64 - max) / temperature as f64).exp())
        .collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

/// `draws` first tokens sampled for one input (one step, independent streams).
fn first_tokens(
    model: &T5Model<CpuBackend>,
    input: &[u32],
    cfg: GenerationConfig,
    draws: usize,
) -> Vec<u32> {
    let cfg = GenerationConfig {
        do_sample: true,
        max_new_tokens: 1,
        num_return_sequences: draws,
        ..cfg
    };
    let out = generate(model, &[input.to_vec()], &cfg, None, |_| {}).unwrap();
    out[0].iter().map(|h| h.ids[0]).collect()
}

#[test]
fn same_seed_same_samples_and_batching_does_not_matter() {
    let (model, inputs) = (model(), inputs());
    let cfg = GenerationConfig {
        do_sample: true,
        seed: 7,
        max_new_tokens: 16,
        num_return_sequences: 2,
        ..Default::default()
    };
    let a = generate(&model, &inputs, &cfg, None, |_| {}).unwrap();
    let b = generate(
        &model,
        &inputs,
        &GenerationConfig {
            batch_size: 1,
            ..cfg.clone()
        },
        None,
        |_| {},
    )
    .unwrap();
    assert_eq!(a, b, "batching changed the samples");
    let c = generate(
        &model,
        &inputs,
        &GenerationConfig {
            seed: 8,
            ..cfg.clone()
        },
        None,
        |_| {},
    )
    .unwrap();
    assert_ne!(a, c, "another seed gave the same samples");
    assert_ne!(
        a[0][0], a[0][1],
        "two return sequences of one input are independent draws"
    );
}

#[test]
fn frequencies_follow_the_softmax() {
    let model = model();
    let input = &inputs()[1];
    let logits = first_logits(&model, input);
    let draws = 4000;
    for temperature in [1.0f32, 0.5] {
        let cfg = GenerationConfig {
            top_k: 0,
            temperature,
            seed: 11,
            ..Default::default()
        };
        let tokens = first_tokens(&model, input, cfg, draws);
        let p = softmax(&logits, temperature);
        let mut counts = vec![0usize; p.len()];
        tokens.iter().for_each(|&t| counts[t as usize] += 1);
        let mut checked = 0;
        for (t, &pt) in p.iter().enumerate() {
            if pt > 0.02 {
                let freq = counts[t] as f64 / draws as f64;
                let sigma = (pt * (1.0 - pt) / draws as f64).sqrt();
                assert!(
                    (freq - pt).abs() < 5.0 * sigma,
                    "T={temperature} token {t}: frequency {freq:.4} vs p {pt:.4}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 2, "the test needs a spread distribution");
    }
}

#[test]
fn top_k_and_top_p_stay_inside_their_sets() {
    let model = model();
    let input = &inputs()[3];
    let logits = first_logits(&model, input);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let top3 = &order[..3];
    let tokens = first_tokens(
        &model,
        input,
        GenerationConfig {
            top_k: 3,
            seed: 1,
            ..Default::default()
        },
        600,
    );
    assert!(
        tokens.iter().all(|t| top3.contains(&(*t as usize))),
        "top-k emitted a token outside the top 3"
    );
    assert!(
        top3.iter().all(|t| tokens.contains(&(*t as u32))),
        "each of the top 3 is drawn in 600 tries"
    );
    // top-p 0.5: the smallest set of most likely tokens whose mass reaches 0.5.
    let p = softmax(&logits, 1.0);
    let mut mass = 0.0;
    let nucleus: Vec<usize> = order
        .iter()
        .copied()
        .take_while(|&t| {
            let inside = mass < 0.5;
            mass += p[t];
            inside
        })
        .collect();
    let cfg = GenerationConfig {
        top_k: 0,
        top_p: 0.5,
        seed: 2,
        ..Default::default()
    };
    let tokens = first_tokens(&model, input, cfg, 600);
    assert!(
        tokens.iter().all(|t| nucleus.contains(&(*t as usize))),
        "top-p emitted a token outside the nucleus {nucleus:?}"
    );
}

#[test]
fn invalid_options_are_refused() {
    let (model, inputs) = (model(), inputs());
    for (cfg, needle) in [
        (
            GenerationConfig {
                num_return_sequences: 3,
                num_beams: 2,
                ..Default::default()
            },
            "num_return_sequences",
        ),
        (
            GenerationConfig {
                do_sample: true,
                temperature: 0.0,
                ..Default::default()
            },
            "temperature",
        ),
        (
            GenerationConfig {
                do_sample: true,
                top_p: 1.5,
                ..Default::default()
            },
            "top_p",
        ),
        (
            GenerationConfig {
                do_sample: true,
                num_beams: 2,
                ..Default::default()
            },
            "beam sampling",
        ),
        (
            GenerationConfig {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            "repetition_penalty",
        ),
        (
            GenerationConfig {
                bad_words_ids: vec![vec![]],
                ..Default::default()
            },
            "bad_words_ids",
        ),
        (
            GenerationConfig {
                bad_words_ids: vec![vec![99_999]],
                ..Default::default()
            },
            "outside the vocabulary",
        ),
        (
            GenerationConfig {
                stop_strings: vec!["x".into()],
                ..Default::default()
            },
            "tokenizer",
        ),
        (
            GenerationConfig {
                max_length: Some(1),
                ..Default::default()
            },
            "max_new_tokens",
        ),
    ] {
        let err = generate(&model, &inputs, &cfg, None, |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{cfg:?}: {err}");
    }
}

#[test]
fn stop_strings_end_a_sequence_where_its_text_contains_them() {
    let dir = common::bundled_model();
    let ckpt = t5rt::Checkpoint::open(&dir).unwrap();
    let tok = ckpt.tokenizer.as_ref().unwrap();
    let model = ckpt.load_model(CpuBackend::new(1).unwrap()).unwrap();
    let ids = vec![tok.encode("spell: 731999").unwrap()];
    let full = generate(
        &model,
        &ids,
        &GenerationConfig::default(),
        Some(tok),
        |_| {},
    )
    .unwrap();
    assert_eq!(
        tok.decode(&full[0][0].ids).unwrap(),
        "seven hundred thirty-one thousand nine hundred ninety-nine"
    );
    let cfg = GenerationConfig {
        stop_strings: vec!["thousand".into()],
        ..Default::default()
    };
    let cut = generate(&model, &ids, &cfg, Some(tok), |_| {}).unwrap();
    assert_eq!(
        tok.decode(&cut[0][0].ids).unwrap(),
        "seven hundred thirty-one thousand"
    );
}
