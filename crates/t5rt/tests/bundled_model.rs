//! The bundled model does its job: exact match on its held-out numbers, measured by t5rt.

mod common;

use t5rt::{generate, Checkpoint, CpuBackend, GenerationConfig};

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
