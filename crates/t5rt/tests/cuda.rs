//! The CUDA backend (feature `cuda`). Without a GPU: every kernel compiles through NVRTC for
//! sm_80 and sm_90 (NVRTC from PyPI's nvidia-cuda-nvrtc, which .ci/run installs). With one
//! (scripts/gpu-check.sh; skipped, and said so, elsewhere): f32 greedy and beam search
//! token-exact with Hugging Face on every parity fixture; bf16 and f16 held-out exact match
//! within a point of f32 on the bundled model; the fp16 overflow fixture finite, with the fp32
//! tokens.
#![cfg(feature = "cuda")]

mod common;

use t5rt::backend::cuda::{compile_kernels, nvrtc_available, KERNEL_NAMES};
use t5rt::{generate, Backend, Checkpoint, GenerationConfig, WeightDtype};

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_available() {
        let required = std::env::var("T5RT_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "T5RT_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded (LD_LIBRARY_PATH?)"
        );
        common::once("SKIPPED NVRTC compile test: libnvrtc cannot be loaded".into());
        return;
    }
    for arch in ["compute_80", "compute_90"] {
        let ptx = compile_kernels(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let text = ptx.to_src();
        for name in KERNEL_NAMES {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "{arch}: no kernel {name}"
            );
        }
        common::once(format!(
            "ran NVRTC: {} kernels compiled for {arch}",
            KERNEL_NAMES.len()
        ));
    }
}

fn model_dir(variant: &str) -> std::path::PathBuf {
    if variant == "spell-numbers" {
        common::bundled_model()
    } else {
        common::fixtures().join(variant)
    }
}

#[test]
fn f32_tokens_equal_hugging_face_on_every_fixture() {
    for variant in ["t5-v1_0", "t5-v1_1", "mt5", "spell-numbers"] {
        let Some(b) = common::cuda_backend(WeightDtype::F32) else {
            return;
        };
        let r = common::Reference::load(variant);
        let model = Checkpoint::open(&model_dir(variant))
            .unwrap()
            .load_model(b)
            .unwrap();
        let inputs = r.ids("/inputs");
        let cfg = GenerationConfig {
            max_new_tokens: r.usize("/greedy/max_new_tokens"),
            batch_size: inputs.len(),
            ..GenerationConfig::default()
        };
        let got: Vec<Vec<u32>> = generate(&model, &inputs, &cfg, None, |_| {})
            .unwrap()
            .into_iter()
            .map(|mut h| h.swap_remove(0).ids)
            .collect();
        assert_eq!(got, r.ids("/greedy/outputs"), "{variant} greedy on CUDA");
        for case in r.json["beam"].as_array().unwrap() {
            let p = &case["params"];
            let u = |k: &str| p.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
            let early_stopping = match &p["early_stopping"] {
                serde_json::Value::Bool(true) => t5rt::EarlyStopping::True,
                serde_json::Value::String(s) if s == "never" => t5rt::EarlyStopping::Never,
                _ => t5rt::EarlyStopping::False,
            };
            let cfg = GenerationConfig {
                max_new_tokens: u("max_new_tokens").unwrap(),
                min_new_tokens: u("min_new_tokens").unwrap_or(0),
                num_beams: u("num_beams").unwrap_or(1),
                num_return_sequences: u("num_return_sequences").unwrap_or(1),
                length_penalty: p
                    .get("length_penalty")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(1.0),
                early_stopping,
                no_repeat_ngram_size: u("no_repeat_ngram_size").unwrap_or(0),
                repetition_penalty: p
                    .get("repetition_penalty")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(1.0) as f32,
                batch_size: inputs.len(),
                ..GenerationConfig::default()
            };
            let want: Vec<Vec<Vec<u32>>> = serde_json::from_value(case["outputs"].clone()).unwrap();
            let got: Vec<Vec<Vec<u32>>> = generate(&model, &inputs, &cfg, None, |_| {})
                .unwrap()
                .into_iter()
                .map(|hyps| hyps.into_iter().map(|h| h.ids).collect())
                .collect();
            assert_eq!(got, want, "{variant} beam {p} on CUDA");
        }
        common::once(format!("CUDA f32: {variant} greedy and beam equal to HF"));
    }
}

#[test]
fn half_precisions_hold_the_bundled_models_accuracy() {
    let dir = common::bundled_model();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let tok = ckpt.tokenizer.as_ref().unwrap();
    let (inputs, expected) = common::bundled_heldout(tok);
    let cfg = GenerationConfig {
        max_new_tokens: 40,
        batch_size: 64,
        ..GenerationConfig::default()
    };
    let mut rates = Vec::new();
    for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
        let Some(b) = common::cuda_backend(dtype) else {
            return;
        };
        let model = Checkpoint::open(&dir).unwrap().load_model(b).unwrap();
        let out = generate(&model, &inputs, &cfg, None, |_| {}).unwrap();
        let correct = common::exact_matches(&out, &expected, tok);
        common::once(format!(
            "CUDA held-out exact match, {dtype}: {correct}/{}",
            expected.len()
        ));
        rates.push(correct as f64 / expected.len() as f64);
    }
    for r in &rates[1..] {
        assert!(*r >= rates[0] - 0.01, "{rates:?}");
    }
}

#[test]
fn fp16_stays_finite_where_hugging_face_overflows() {
    let dir = common::fixtures().join("fp16-overflow");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let inputs: Vec<Vec<u32>> = serde_json::from_value(r["inputs"].clone()).unwrap();
    let want: Vec<Vec<u32>> = serde_json::from_value(r["fp32_outputs"].clone()).unwrap();
    assert!(!r["hf_fp16_broken_inputs"].as_array().unwrap().is_empty());
    let Some(b) = common::cuda_backend(WeightDtype::F16) else {
        return;
    };
    let model = Checkpoint::open(&dir).unwrap().load_model(b).unwrap();
    // Finite encoder output and logits on every input...
    for ids in &inputs {
        let enc = model.encode(std::slice::from_ref(ids)).unwrap();
        let hidden = model
            .backend
            .download(&enc.hidden, ids.len() * model.config.d_model)
            .unwrap();
        assert!(
            hidden.iter().all(|v| v.is_finite()),
            "{ids:?}: encoder not finite"
        );
        let mut state = model.start_decoding(&enc, 4).unwrap();
        let logits = model.decode_step(&[0], &mut state).unwrap();
        let logits = model
            .backend
            .download(logits, model.config.vocab_size)
            .unwrap();
        assert!(
            logits.iter().all(|v| v.is_finite()),
            "{ids:?}: logits not finite"
        );
    }
    // ...and fp32's tokens.
    let cfg = GenerationConfig {
        max_new_tokens: r["max_new_tokens"].as_u64().unwrap() as usize,
        ..GenerationConfig::default()
    };
    let got: Vec<Vec<u32>> = generate(&model, &inputs, &cfg, None, |_| {})
        .unwrap()
        .into_iter()
        .map(|mut h| h.swap_remove(0).ids)
        .collect();
    assert_eq!(got, want, "f16 tokens differ from fp32's");
}

/// Decoding steps recorded as CUDA graphs and replayed give the logits of steps run launch by
/// launch, in every GPU precision: the bundled model, a batch of four, 12 steps of its own
/// greedy tokens (the first step of a layout runs as it comes, the second is recorded, the
/// rest replay; at step 9 the batch drops a row, a new layout).
#[test]
fn graph_replays_give_the_uncaptured_logits() {
    for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
        let Some(b) = common::cuda_backend(dtype) else {
            return;
        };
        let model = Checkpoint::open(&common::bundled_model())
            .unwrap()
            .load_model(b)
            .unwrap();
        let vocab = model.config.vocab_size;
        let inputs: Vec<Vec<u32>> = [
            &[10u32, 20, 30, 1][..],
            &[5, 6, 7, 8, 9, 1],
            &[42, 1],
            &[7, 7, 7, 1],
        ]
        .iter()
        .map(|r| r.to_vec())
        .collect();
        let run = |graphs: bool, chain: bool| -> (Vec<Vec<f32>>, t5rt::backend::cuda::GraphStats) {
            model.backend.set_graphs(graphs);
            model.backend.set_chain(chain);
            let before = model.backend.graph_stats();
            let enc = model.encode(&inputs).unwrap();
            let mut state = model.start_decoding(&enc, 16).unwrap();
            let mut tokens = vec![model.config.decoder_start_token_id; inputs.len()];
            let mut all = Vec::new();
            for step in 0..12 {
                if step == 9 {
                    state.select(&model.backend, &[0, 1, 3]).unwrap();
                    tokens = vec![tokens[0], tokens[1], tokens[3]];
                }
                let rows = tokens.len();
                let logits = model.decode_step(&tokens, &mut state).unwrap();
                all.push(model.backend.download(logits, rows * vocab).unwrap());
                tokens = model.backend.argmax_rows(logits, rows, vocab).unwrap();
            }
            let after = model.backend.graph_stats();
            let d = t5rt::backend::cuda::GraphStats {
                captures: after.captures - before.captures,
                replays: after.replays - before.replays,
                eager: after.eager - before.eager,
                failures: after.failures - before.failures,
            };
            (all, d)
        };
        let (eager, off) = run(false, false);
        let (graphed, on) = run(true, false);
        // Each sublayer as one launch (`set_chain`, off by default until this has passed on
        // a GPU), recorded and replayed too: the same logits bit for bit.
        let before = model.backend.chained_launches();
        let (chained, with_chain) = run(true, true);
        let after = model.backend.chained_launches();
        model.backend.set_chain(false);
        let c = with_chain;
        assert_eq!((c.captures, c.replays, c.eager, c.failures), (2, 8, 2, 0));
        // Steps 0, 1, 9 and 10 launch kernels (the others replay): per layer one feed-forward
        // and two whole attention sublayers, with the default gemv (fused, shared, 8 columns
        // per block; gpu-check also runs this file with each of those off).
        let layers = model.config.num_decoder_layers as u64;
        let default = |var: &str, v: &str| std::env::var(var).map_or(true, |x| x == v);
        let fused = default("T5RT_CUDA_FUSED_GEMV", "1");
        if fused {
            assert_eq!(
                after[1] - before[1],
                4 * layers,
                "{dtype}: gemv_gemv launches"
            );
        }
        if fused && default("T5RT_CUDA_SHARED_GEMV", "1") && default("T5RT_CUDA_GEMV_WARPS", "8") {
            assert_eq!(
                after[2] - before[2],
                8 * layers,
                "{dtype}: gemv_attention_o launches"
            );
        }
        assert!(
            chained == graphed,
            "{dtype}: chained sublayers change the logits"
        );
        assert_eq!((off.captures, off.replays, off.eager), (0, 0, 12));
        // Steps 0 and 9 run as they come, 1 and 10 are recorded, the other 8 replay.
        assert_eq!(
            (on.captures, on.replays, on.eager, on.failures),
            (2, 8, 2, 0),
            "{dtype}: {}",
            model.backend.step_report().unwrap_or_default()
        );
        let bitwise = eager == graphed;
        for (step, (e, g)) in eager.iter().zip(&graphed).enumerate() {
            common::assert_close(&format!("{dtype} step {step} graph"), g, e, 1e-6);
        }
        common::once(format!(
            "CUDA graphs {dtype}: 12 steps, logits equal to uncaptured steps bit for bit: {bitwise}"
        ));
    }
}
