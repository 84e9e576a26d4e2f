//! `T5RT_KEEP_F32` (the diagnostic that keeps parts of a reduced-precision model in f32): with
//! every part named, an int8 model computes what the f32 model computes, bit for bit, and a
//! part left out changes the result. Its own test binary, since it sets the environment.

mod common;

use t5rt::{score, Checkpoint, CpuBackend, GenerationConfig, WeightDtype};

#[test]
fn int8_with_every_part_kept_f32_is_the_f32_model() {
    let dir = common::fixtures().join("t5-v1_1");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let inputs = vec![vec![37u32, 8, 203, 19, 1], vec![5, 9, 1]];
    let targets = vec![vec![0u32, 12, 7, 1], vec![3, 3, 1]];
    let cfg = GenerationConfig::default();
    let run = |dtype: WeightDtype, keep: &str| {
        // SAFETY of set_var: this binary's only test, so no other thread reads the environment.
        std::env::set_var("T5RT_KEEP_F32", keep);
        let backend = CpuBackend::new(2).unwrap().with_dtype(dtype);
        let model = ckpt.load_model(backend).unwrap();
        let scores = score(&model, &inputs, &targets, &cfg).unwrap();
        scores.into_iter().map(|s| s.log_probs).collect::<Vec<_>>()
    };
    let f32 = run(WeightDtype::F32, "");
    let all = "encoder,decoder,lm-head,cross-cache,self-cache";
    assert_eq!(run(WeightDtype::Int8, all), f32);
    assert_eq!(run(WeightDtype::Bf16, all), f32);
    assert_ne!(
        run(WeightDtype::Int8, "encoder,decoder,lm-head,self-cache"),
        f32,
        "int8 cross-attention caches"
    );
    assert_ne!(
        run(WeightDtype::Bf16, "encoder,decoder,lm-head,cross-cache"),
        f32,
        "bf16 self-attention caches"
    );
    assert_ne!(
        run(WeightDtype::Int8, "encoder,lm-head,cross-cache"),
        f32,
        "int8 decoder"
    );
    std::env::set_var("T5RT_KEEP_F32", "lm_head");
    let err = Checkpoint::open(&dir)
        .unwrap()
        .load_model(CpuBackend::new(1).unwrap().with_dtype(WeightDtype::Int8))
        .err()
        .expect("an unknown part is refused");
    assert!(err.to_string().contains("lm-head"), "{err}");
}
