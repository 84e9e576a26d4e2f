//! Checkpoints as published: PyTorch `.bin` weights (one file and sharded) give the tokens of
//! their safetensors twin; a malicious pickle is refused and runs nothing; tokenizers from
//! `spiece.model` give Hugging Face's ids; ByT5's byte tokenizer matches HF's. Fixtures from
//! tools/make_checkpoint_fixtures.py (tests/fixtures/formats/).

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;
use t5rt::tokenizer::spiece::T5Options;
use t5rt::{generate, Checkpoint, CpuBackend, GenerationConfig, T5Error, T5Tokenizer};

fn formats() -> PathBuf {
    common::fixtures().join("formats")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// A copy of the tiny model's safetensors checkpoint (config.json, model.safetensors).
fn safetensors_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        let from = formats().join("torch-bin/safetensors").join(f);
        std::fs::copy(from, tmp.path().join(f)).unwrap();
    }
    tmp
}

fn greedy(dir: &Path, inputs: &[Vec<u32>], max_new_tokens: usize) -> Vec<Vec<u32>> {
    let ckpt = Checkpoint::open(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let model = ckpt.load_model(CpuBackend::new(1).unwrap()).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens,
        ..GenerationConfig::default()
    };
    generate(&model, inputs, &cfg, None, |_| {})
        .unwrap()
        .into_iter()
        .map(|mut h| h.swap_remove(0).ids)
        .collect()
}

#[test]
fn pytorch_bin_gives_the_tokens_of_its_safetensors_twin() {
    let base = formats().join("torch-bin");
    let r = json(&base.join("reference.json"));
    let inputs = ids(&r["inputs"]);
    let want = ids(&r["outputs"]);
    let n = r["max_new_tokens"].as_u64().unwrap() as usize;
    for dir in ["safetensors", "bin", "bin-sharded"] {
        assert_eq!(greedy(&base.join(dir), &inputs, n), want, "{dir}");
    }
    // The same tensors, bit for bit.
    let a = t5rt::TensorStore::open_dir(&base.join("safetensors")).unwrap();
    let b = t5rt::TensorStore::open_dir(&base.join("bin-sharded")).unwrap();
    for name in a.names() {
        let shape = a.shape(&name).unwrap();
        assert_eq!(
            a.read(&name, &shape).unwrap(),
            b.read(&name, &shape).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn safetensors_is_preferred_when_both_are_present() {
    let tmp = safetensors_copy();
    let base = formats().join("torch-bin");
    std::fs::write(tmp.path().join("pytorch_model.bin"), b"not read").unwrap();
    let r = json(&base.join("reference.json"));
    let n = r["max_new_tokens"].as_u64().unwrap() as usize;
    assert_eq!(
        greedy(tmp.path(), &ids(&r["inputs"]), n),
        ids(&r["outputs"])
    );
}

fn load_err(dir: &Path) -> String {
    match Checkpoint::open(dir).and_then(|c| c.load_model(CpuBackend::new(1)?)) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_malicious_pickle_is_refused_and_nothing_runs() {
    let marker = Path::new("/tmp/t5rt-pickle-ran");
    let _ = std::fs::remove_file(marker);
    let err = load_err(&formats().join("evil-bin"));
    assert!(err.contains("refusing to load global"), "{err}");
    assert!(err.contains("system"), "{err}");
    assert!(!marker.exists(), "the pickle's payload ran");
}

#[test]
fn broken_pytorch_files_are_clear_errors() {
    let base = formats().join("torch-bin").join("bin");
    let bytes = std::fs::read(base.join("pytorch_model.bin")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(base.join("config.json"), tmp.path().join("config.json")).unwrap();
    let bin = tmp.path().join("pytorch_model.bin");
    for keep in [0, 10, bytes.len() / 3, bytes.len() - 30] {
        std::fs::write(&bin, &bytes[..keep]).unwrap();
        let err = load_err(tmp.path());
        assert!(err.contains("pytorch_model.bin"), "cut at {keep}: {err}");
    }
    // The legacy (pre-1.6) format starts with a pickle, not a zip.
    std::fs::write(&bin, [0x80, 0x02, 0x8a, 0x0a]).unwrap();
    assert!(load_err(tmp.path()).contains("legacy"));
}

/// (text, HF slow ids, HF fast ids, HF fast decoding)
type SpieceCase = (String, Vec<u32>, Vec<u32>, String);

fn spiece_cases() -> (Value, Vec<SpieceCase>) {
    let r = json(&formats().join("spiece").join("reference.json"));
    let cases = r["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["text"].as_str().unwrap().to_string(),
                serde_json::from_value(c["slow"].clone()).unwrap(),
                serde_json::from_value(c["fast"].clone()).unwrap(),
                c["decoded_fast"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (r, cases)
}

#[test]
fn spiece_model_tokenizes_as_hugging_face() {
    let dir = formats().join("spiece");
    let (r, cases) = spiece_cases();
    assert!(cases.len() >= 400);
    let with_config =
        T5Options::from_config(&json(&dir.join("hf-slow").join("tokenizer_config.json")));
    for (what, opts) in [
        ("defaults", T5Options::default()),
        ("tokenizer_config", with_config),
    ] {
        let tok = T5Tokenizer::from_spiece(&dir.join("spiece.model"), &opts).unwrap();
        let (mut fast, mut slow) = (0, 0);
        for (text, want_slow, want_fast, decoded) in &cases {
            let got = tok.encode(text).unwrap();
            assert_eq!(
                &got, want_fast,
                "{what}: {text:?} differs from HF's fast tokenizer"
            );
            fast += 1;
            slow += usize::from(&got == want_slow);
            assert_eq!(
                &tok.decode(&got).unwrap(),
                decoded,
                "{what}: decoding {text:?}"
            );
        }
        eprintln!(
            "spiece ({what}): {fast}/{} equal to HF fast, {slow}/{} to HF slow (HF slow and fast agree on {})",
            cases.len(),
            cases.len(),
            r["slow_fast_agree"]
        );
    }
    // Through a checkpoint directory: spiece.model is found when tokenizer.json is absent.
    let tmp = safetensors_copy();
    std::fs::copy(dir.join("spiece.model"), tmp.path().join("spiece.model")).unwrap();
    let mut cfg = json(&tmp.path().join("config.json"));
    cfg["vocab_size"] = serde_json::json!(512);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let tok = ckpt.tokenizer.as_ref().expect("spiece.model found");
    assert_eq!(tok.vocab_size(), 500);
    assert_eq!(tok.encode(&cases[6].0).unwrap(), cases[6].2);
    // (The fixture's weights are for 384 ids, so this config is refused at load.)
    let err = ckpt.load_model(CpuBackend::new(1).unwrap()).err();
    assert!(
        matches!(err, Some(T5Error::ShapeMismatch { .. })),
        "{err:?}"
    );
}

#[test]
fn byt5_tokenizes_as_hugging_face() {
    let r = json(&formats().join("byt5.json"));
    assert_eq!(r["extra_id_0"], 259);
    let tok = T5Tokenizer::byt5(125);
    assert_eq!(tok.vocab_size(), r["vocab_size"].as_u64().unwrap() as usize);
    for c in r["encode"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
    }
    for c in r["decode"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(
            tok.decode(&ids).unwrap(),
            c["text"].as_str().unwrap(),
            "{ids:?}"
        );
    }
    // A checkpoint whose tokenizer_config.json names ByT5Tokenizer takes text.
    let tmp = safetensors_copy();
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"tokenizer_class": "ByT5Tokenizer", "extra_ids": 125}"#,
    )
    .unwrap();
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let tok = ckpt.tokenizer.as_ref().expect("the byte tokenizer");
    assert_eq!(tok.encode("hi").unwrap(), vec![107, 108, 1]);
    let model = ckpt.load_model(CpuBackend::new(1).unwrap()).unwrap();
    let out = generate(
        &model,
        &[tok.encode("hello").unwrap()],
        &GenerationConfig::default(),
        Some(tok),
        |_| {},
    )
    .unwrap();
    assert!(!out[0][0].ids.is_empty());
}
