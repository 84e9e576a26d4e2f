//! Bad input gets a clear error value, never a panic: broken checkpoints, unsupported
//! configs, bad requests. Broken checkpoints are made from a copy of a good fixture.

mod common;

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use t5rt::{generate, Checkpoint, CpuBackend, GenerationConfig, T5Error, TensorStore};

/// A copy of the t5-v1_1 fixture checkpoint in a temporary directory.
fn fixture_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for name in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(
            common::fixtures().join("t5-v1_1").join(name),
            dir.join(name),
        )
        .unwrap();
    }
    (tmp, dir)
}

fn open_and_load(dir: &Path) -> Result<(), T5Error> {
    let ckpt = Checkpoint::open(dir)?;
    ckpt.load_model(CpuBackend::new(1)?)?;
    Ok(())
}

fn err_text(dir: &Path) -> String {
    match open_and_load(dir) {
        Ok(()) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites model.safetensors (as f32) after `edit` changed the tensor list.
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let path = dir.join("model.safetensors");
    let store = TensorStore::open_file(&path).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = store
        .names()
        .into_iter()
        .map(|n| {
            let shape = store.shape(&n).unwrap();
            let t = store.read(&n, &shape).unwrap();
            (n, t.shape, t.data)
        })
        .collect();
    drop(store);
    edit(&mut tensors);
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn the_untouched_copy_loads() {
    let (_tmp, dir) = fixture_copy();
    open_and_load(&dir).unwrap();
    // ...and so does an f32 rewrite of it, the control for the edits below.
    rewrite_weights(&dir, |_| {});
    open_and_load(&dir).unwrap();
}

#[test]
fn missing_directory_and_files() {
    let (tmp, dir) = fixture_copy();
    assert!(err_text(&tmp.path().join("nope")).contains("nope"));
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert!(err_text(&dir).contains("config.json"));
    let (_tmp2, dir) = fixture_copy();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(err_text(&dir).contains("model.safetensors"));
}

#[test]
fn a_pytorch_bin_that_is_not_one_is_a_clear_error() {
    // (Real pytorch_model.bin files load: tests/formats.rs.)
    let (_tmp, dir) = fixture_copy();
    std::fs::rename(dir.join("model.safetensors"), dir.join("pytorch_model.bin")).unwrap();
    let msg = err_text(&dir);
    assert!(
        msg.contains("pytorch_model.bin") && msg.contains("not a PyTorch checkpoint"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors() {
    let (_tmp, dir) = fixture_copy();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() - 1, bytes.len() / 2, 100, 7, 0] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let msg = err_text(&dir);
        assert!(
            msg.contains("truncated or corrupt"),
            "kept {keep} bytes: {msg}"
        );
    }
}

#[test]
fn corrupt_header() {
    let (_tmp, dir) = fixture_copy();
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..24].copy_from_slice(b"this is not json");
    std::fs::write(&path, &bytes).unwrap();
    assert!(err_text(&dir).contains("truncated or corrupt"));
}

#[test]
fn tensor_of_the_wrong_shape() {
    let (_tmp, dir) = fixture_copy();
    rewrite_weights(&dir, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.0 == "encoder.block.1.layer.0.SelfAttention.k.weight")
            .unwrap();
        t.1 = vec![t.1[0] - 1, t.1[1]];
        t.2.truncate(t.1[0] * t.1[1]);
    });
    let msg = err_text(&dir);
    assert!(
        msg.contains("encoder.block.1.layer.0.SelfAttention.k.weight") && msg.contains("[47, 48]"),
        "{msg}"
    );
}

#[test]
fn missing_tensor() {
    let (_tmp, dir) = fixture_copy();
    rewrite_weights(&dir, |ts| ts.retain(|t| t.0 != "lm_head.weight"));
    assert!(err_text(&dir).contains("`lm_head.weight` is missing"));
}

#[test]
fn unsupported_feed_forward_proj() {
    let (_tmp, dir) = fixture_copy();
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("gated-gelu", "gated-tanh");
    std::fs::write(&path, text).unwrap();
    let msg = err_text(&dir);
    assert!(
        msg.contains("feed_forward_proj") && msg.contains("gated-tanh"),
        "{msg}"
    );
}

#[test]
fn malformed_config_json() {
    let (_tmp, dir) = fixture_copy();
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let msg = err_text(&dir);
    assert!(
        msg.contains("config.json") && msg.contains("invalid JSON"),
        "{msg}"
    );
}

#[test]
fn missing_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::fixtures().join("mt5");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    open_and_load(tmp.path()).unwrap();
    std::fs::remove_file(tmp.path().join("model-00002-of-00005.safetensors")).unwrap();
    assert!(err_text(tmp.path()).contains("model-00002-of-00005.safetensors"));
}

#[test]
fn misaligned_tensor_offsets_still_load() {
    // A hand-made file whose data section starts at an odd offset: every f32 is misaligned.
    let header = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"b":{"dtype":"BF16","shape":[1],"data_offsets":[12,14]}}"#;
    assert_ne!(
        (8 + header.len()) % 4,
        0,
        "the header must leave the data misaligned"
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    for v in [1.5f32, -2.25, 1e-3] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes.extend_from_slice(&half::bf16::from_f32(3.0).to_le_bytes());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("x.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let store = TensorStore::open_file(&path).unwrap();
    assert_eq!(store.read("a", &[3]).unwrap().data, vec![1.5, -2.25, 1e-3]);
    assert_eq!(store.read("b", &[1]).unwrap().data, vec![3.0]);
}

fn fixture_model() -> t5rt::T5Model<CpuBackend> {
    common::load_model(&common::fixtures().join("t5-v1_1"), 1)
}

#[test]
fn bad_requests() {
    let model = fixture_model();
    let opts = GenerationConfig {
        max_new_tokens: 4,
        ..GenerationConfig::default()
    };
    let cases: Vec<(Vec<Vec<u32>>, GenerationConfig, &str)> = vec![
        (vec![vec![]], opts.clone(), "empty"),
        (vec![vec![5, 1], vec![]], opts.clone(), "input 1 is empty"),
        (
            vec![vec![5; 11]],
            GenerationConfig {
                max_input_tokens: 10,
                ..opts.clone()
            },
            "more than the limit of 10",
        ),
        (
            vec![vec![5, 320, 1]],
            opts.clone(),
            "outside the vocabulary",
        ),
        (
            vec![vec![5, 1]],
            GenerationConfig {
                max_new_tokens: 0,
                ..opts.clone()
            },
            "max_new_tokens",
        ),
        (
            vec![vec![5, 1]],
            GenerationConfig {
                min_new_tokens: 5,
                ..opts.clone()
            },
            "min_new_tokens",
        ),
        (
            vec![vec![5, 1]],
            GenerationConfig {
                batch_size: 0,
                ..opts.clone()
            },
            "batch_size",
        ),
    ];
    for (inputs, o, needle) in cases {
        let err = generate(&model, &inputs, &o, None, |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{inputs:?}: {err}");
    }
    // The model-level seams refuse bad input too.
    assert!(model.encode(&[]).is_err());
    let enc = model.encode(&[vec![5, 1]]).unwrap();
    let mut state = model.start_decoding(&enc, 1).unwrap();
    assert!(
        model.decode_step(&[0, 0], &mut state).is_err(),
        "wrong batch"
    );
    assert!(
        model.decode_step(&[9999], &mut state).is_err(),
        "id outside the vocabulary"
    );
    model.decode_step(&[0], &mut state).unwrap();
    assert!(
        model.decode_step(&[0], &mut state).is_err(),
        "past capacity"
    );
}

#[test]
fn text_without_tokenizer_is_a_clear_error() {
    let ckpt = Checkpoint::open(&common::fixtures().join("t5-v1_1")).unwrap();
    assert!(ckpt.tokenizer.is_none());
    let err = t5rt::Input::Text("hello".into())
        .encode(ckpt.tokenizer.as_ref())
        .unwrap_err();
    assert!(matches!(err, T5Error::NoTokenizer), "{err}");
    assert!(err.to_string().contains("input_ids"), "{err}");
    // Ids need no tokenizer.
    let ids = t5rt::Input::Ids(vec![5, 1]).encode(ckpt.tokenizer.as_ref());
    assert_eq!(ids.unwrap(), vec![5, 1]);
}

/// int8 weights from a converted checkpoint must lie in [-127, 127] (what `t5rt convert`
/// writes); -128, which the tiles without VNNI could not negate, is refused, not miscomputed.
#[test]
fn int8_weights_of_minus_128_are_refused() {
    use t5rt::backend::Backend;
    let b = CpuBackend::new(1)
        .unwrap()
        .with_dtype(t5rt::WeightDtype::Int8);
    let err = b
        .upload_linear_int8(&[1, -128, 3, 4], &[0.5, 0.5], 2, 2)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("-128"), "{err}");
    assert!(b
        .upload_linear_int8(&[1, -127, 3, 4], &[0.5, 0.5], 2, 2)
        .is_ok());
}
