//! bf16 and int8 weights: the packed kernels against their scalar references (which state the
//! quantization contract independently), and the bundled model's accuracy in each precision.

mod common;

use common::{assert_close, Rng};
use t5rt::backend::cpu::reference;
use t5rt::backend::{Backend, MatDims};
use t5rt::{generate, Checkpoint, CpuBackend, GenerationConfig, WeightDtype};

const SHAPES: [(usize, usize, usize); 10] = [
    (1, 1, 1),
    (1, 64, 48),
    (3, 17, 33), // k odd: padded lanes for both bf16 pairs and int8 quads
    (4, 130, 34),
    (5, 70, 66),
    (7, 128, 96),
    (9, 1100, 40),
    (40, 100, 64),
    (70, 200, 35), // more rows than one task takes
    (1, 1000, 512),
];

fn run(b: &CpuBackend, x: &[f32], w: &[f32], init: &[f32], d: MatDims, acc: bool) -> Vec<f32> {
    let (xt, wt) = (b.upload(x).unwrap(), b.upload_linear(w, d.n, d.k).unwrap());
    let mut out = b.upload(init).unwrap();
    b.matmul_nt(&xt, &wt, &mut out, d, acc).unwrap();
    b.download(&out, d.m * d.n).unwrap()
}

fn check(dtype: WeightDtype, tol: f32) {
    let want_fn = match dtype {
        WeightDtype::Bf16 => reference::matmul_nt_bf16,
        WeightDtype::Int8 => reference::matmul_nt_int8,
        WeightDtype::F32 => unreachable!(),
    };
    let mut rng = Rng::new(11);
    for (m, n, k) in SHAPES {
        let d = MatDims { m, n, k };
        // Rows of different magnitudes, as activations have.
        let x: Vec<f32> = (0..m * k)
            .map(|i| rng.f32() * (1 + i / k) as f32 * 3.0)
            .collect();
        let (w, init) = (rng.vec(n * k), rng.vec(m * n));
        let want = want_fn(&x, &w, d);
        let want_acc: Vec<f32> = want.iter().zip(&init).map(|(a, b)| a + b).collect();
        let mut first: Option<Vec<f32>> = None;
        for b in common::cpu_backends(dtype) {
            let what = format!("{dtype} matmul {m}x{n}x{k} on {}", b.name());
            let got = run(&b, &x, &w, &init, d, false);
            assert_close(&what, &got, &want, tol);
            assert_close(
                &format!("{what} +="),
                &run(&b, &x, &w, &init, d, true),
                &want_acc,
                tol,
            );
            // The SIMD tiles and the portable ones sum in the same order (for bf16: the order
            // Intel's manual gives `vdpbf16ps`; a CPU that rounds the pair otherwise stays
            // within this bound too, see `bf16_dot_order` in kernels.rs).
            match &first {
                None => first = Some(got),
                Some(f) => assert_close(&format!("{what} vs first backend"), &got, f, 1e-6),
            }
        }
    }
}

#[test]
fn bf16_matmul_matches_reference() {
    // Only accumulation order separates the f32 sums from the f64 reference.
    check(WeightDtype::Bf16, 2e-6);
}

#[test]
fn int8_matmul_matches_reference() {
    // Integer sums are exact: the rest is the final f32 scaling.
    check(WeightDtype::Int8, 1e-6);
}

#[test]
fn quantized_matmul_is_near_f32() {
    // The contract is not vacuous: the quantized results differ from f32 by about the
    // precision of the format, not more, and not zero.
    let mut rng = Rng::new(12);
    let d = MatDims {
        m: 3,
        n: 256,
        k: 512,
    };
    let (x, w) = (rng.vec(d.m * d.k), rng.vec(d.n * d.k));
    let exact = reference::matmul_nt(&x, &w, d);
    for (dtype, lo, hi) in [
        (WeightDtype::Bf16, 1e-4, 2e-2),
        (WeightDtype::Int8, 1e-3, 5e-2),
    ] {
        let b = CpuBackend::new(2).unwrap().with_dtype(dtype);
        let got = run(&b, &x, &w, &vec![0.0; d.m * d.n], d, false);
        let err = common::relative_error(&got, &exact);
        eprintln!("{dtype} vs f32 on random data: {err:.2e}");
        assert!(
            err > lo && err < hi,
            "{dtype}: error {err:e} outside ({lo:e}, {hi:e})"
        );
    }
}

#[test]
fn bundled_model_heldout_within_one_point_of_f32() {
    let dir = common::bundled_model();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let tok = ckpt.tokenizer.as_ref().expect("bundled tokenizer");
    let (inputs, expected) = common::bundled_heldout(tok);
    let opts = GenerationConfig {
        max_new_tokens: 40,
        batch_size: 64,
        ..GenerationConfig::default()
    };
    let mut em = Vec::new();
    for dtype in WeightDtype::ALL {
        let model = Checkpoint::open(&dir)
            .unwrap()
            .load_model(CpuBackend::new(2).unwrap().with_dtype(dtype))
            .unwrap();
        let outputs = generate(&model, &inputs, &opts, None, |_| {}).unwrap();
        let correct = common::exact_matches(&outputs, &expected, tok);
        let rate = correct as f64 / expected.len() as f64;
        eprintln!(
            "bundled model held-out exact match, {dtype}: {correct}/{}",
            expected.len()
        );
        em.push((dtype, rate));
    }
    let f32_rate = em[0].1;
    for (dtype, rate) in &em[1..] {
        assert!(
            *rate >= f32_rate - 0.01,
            "{dtype}: exact match {rate:.4} is more than 1 point below f32's {f32_rate:.4}"
        );
    }
}
