//! The bundled model does its job: exact match on its held-out numbers, measured by t5rt.

mod common;

use t5rt::{generate, Backend, Checkpoint, CpuBackend, GenerationConfig};

#[test]
fn heldout_exact_match_is_at_least_95_percent_greedy_and_beam_4() {
    let dir = common::bundled_model();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let tok = ckpt.tokenizer.as_ref().expect("bundled tokenizer");
    let model = ckpt.load_model(CpuBackend::new(2).unwrap()).unwrap();
    let (inputs, expected) = common::bundled_heldout(tok);
    for num_beams in [1, 4] {
        let opts = GenerationConfig {
            max_new_tokens: 40,
            batch_size: 64,
            num_beams,
            ..GenerationConfig::default()
        };
        let outputs = generate(&model, &inputs, &opts, None, |_| {}).unwrap();
        let correct = common::exact_matches(&outputs, &expected, tok);
        let em = correct as f64 / expected.len() as f64;
        eprintln!(
            "bundled model held-out exact match, {num_beams} beam(s): {correct}/{} = {em:.4}",
            expected.len()
        );
        assert!(
            em >= 0.95,
            "{num_beams} beam(s): held-out exact match {em:.4} < 0.95"
        );
    }
}

/// Batches of 32 rows or more decoded as two halves at once (the CPU with two threads) give
/// every input what it gets alone, in input order (greedy; `sampling.rs` has the sampled case).
#[test]
fn batches_split_in_halves_give_each_input_its_own_result() {
    let dir = common::bundled_model();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let tok = ckpt.tokenizer.as_ref().expect("bundled tokenizer");
    let load = |split: bool| {
        let backend = CpuBackend::new(2).unwrap().with_batch_split(split);
        ckpt.load_model(backend).unwrap()
    };
    let (split, whole) = (load(true), load(false));
    let (inputs, _) = common::bundled_heldout(tok);
    let inputs = &inputs[..40];
    assert!(split.backend.splits_batch(inputs.len()));
    assert!(!whole.backend.splits_batch(inputs.len()));
    let cfg = GenerationConfig {
        max_new_tokens: 40,
        batch_size: 64,
        ..GenerationConfig::default()
    };
    let halves = generate(&split, inputs, &cfg, None, |_| {}).unwrap();
    let alone = GenerationConfig {
        batch_size: 1,
        ..cfg.clone()
    };
    let want = generate(&whole, inputs, &alone, None, |_| {}).unwrap();
    assert_eq!(halves, want);
}
