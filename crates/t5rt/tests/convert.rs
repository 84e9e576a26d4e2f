//! `t5rt::convert::convert_int8`: a checkpoint converted ahead of time loads with int8 and gives
//! the original's int8 results bit for bit (tied and untied heads, f32 / bf16 / f16 storage,
//! sharded input), and refuses what it cannot do.

mod common;

use std::path::Path;

use common::{bundled_model, fixtures};
use t5rt::convert::convert_int8;
use t5rt::{score, Checkpoint, CpuBackend, GenerationConfig, WeightDtype};

fn int8_scores(dir: &Path, inputs: &[Vec<u32>], targets: &[Vec<u32>]) -> Vec<t5rt::TargetScore> {
    let ckpt = Checkpoint::open(dir).unwrap();
    let backend = CpuBackend::new(2).unwrap().with_dtype(WeightDtype::Int8);
    let model = ckpt.load_model(backend).unwrap();
    score(&model, inputs, targets, &GenerationConfig::default()).unwrap()
}

#[test]
fn converted_checkpoints_give_the_originals_int8_results_bit_for_bit() {
    for (name, dir) in [
        ("spell-numbers", bundled_model()),      // untied, f32
        ("t5-v1_0", fixtures().join("t5-v1_0")), // tied head, f32
        ("t5-v1_1", fixtures().join("t5-v1_1")), // bf16 storage
        ("mt5", fixtures().join("mt5")),         // f16 storage, sharded
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("int8");
        let s = convert_int8(&dir, &out, 2).unwrap();
        assert!(s.quantized > 0 && s.kept > 0, "{name}: {s:?}");
        // Pairs from the score fixture: HF's greedy paths and random targets.
        let text = std::fs::read_to_string(fixtures().join(name).join("scores.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ids =
            |key: &str| -> Vec<Vec<u32>> { serde_json::from_value(json[key].clone()).unwrap() };
        let (inputs, targets) = (ids("inputs"), ids("targets"));
        let want = int8_scores(&dir, &inputs, &targets);
        let got = int8_scores(&out, &inputs, &targets);
        assert_eq!(got, want, "{name}");
        // The converted checkpoint is smaller than an f32 copy would be, and keeps its
        // tokenizer and configs.
        assert!(out.join("config.json").is_file(), "{name}");
        let ckpt = Checkpoint::open(&out).unwrap();
        assert_eq!(
            ckpt.tokenizer.is_some(),
            Checkpoint::open(&dir).unwrap().tokenizer.is_some(),
            "{name}"
        );
    }
}

#[test]
fn conversion_and_loading_refuse_what_they_cannot_do() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("int8");
    convert_int8(&bundled_model(), &out, 1).unwrap();
    // Not over a non-empty directory, and not twice.
    let err = convert_int8(&bundled_model(), &out, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not empty"), "{err}");
    let err = convert_int8(&out, &tmp.path().join("again"), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already converted"), "{err}");
    // Loading with another precision says which one to use.
    for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
        let ckpt = Checkpoint::open(&out).unwrap();
        let backend = CpuBackend::new(1).unwrap().with_dtype(dtype);
        let err = ckpt.load_model(backend).err().unwrap().to_string();
        assert!(err.contains("load it with --dtype int8"), "{dtype}: {err}");
    }
}
