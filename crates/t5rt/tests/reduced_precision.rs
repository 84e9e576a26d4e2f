//! bf16 and int8 weights: the packed kernels against their scalar references (which state the
//! quantization contract independently), and the bundled model's accuracy in each precision.

mod common;

use common::{assert_close, Rng};
use t5rt::backend::cpu::reference;
use t5rt::backend::{Backend, MatDims};
use t5rt::{generate, Checkpoint, CpuBackend, GenerationConfig, WeightDtype};

const SHAPES: [(usize, usize, usize); 18] = [
    (1, 1, 1),
    (1, 64, 48),
    (3, 17, 33), // k odd: padded lanes for both bf16 pairs and int8 quads
    (4, 130, 34),
    (5, 70, 66),
    (7, 128, 96),
    (8, 96, 70), // a register tile of 6 rows and one of 2
    (9, 1100, 40),
    (40, 100, 64),
    (70, 200, 35),   // more rows than one task takes
    (70, 130, 1030), // several register tiles walking k in blocks
    (1, 1000, 512),
    // Widened bf16 at AVX-512 takes twelve rows at once past one task (60 rows): the last
    // task's rest of 11, 8, 7 or 9 rows at once, k odd, and panels of 48 and 16 columns; a
    // rest of 3 rows (one six-row tile) and of 30 (12 + 12 + 6).
    (71, 80, 35),
    (68, 112, 770),
    (67, 48, 40),
    (69, 48, 24),
    (63, 80, 33),
    (90, 48, 40),
];

fn run(b: &CpuBackend, x: &[f32], w: &[f32], init: &[f32], d: MatDims, acc: bool) -> Vec<f32> {
    let (xt, wt) = (b.upload(x).unwrap(), b.upload_linear(w, d.n, d.k).unwrap());
    let mut out = b.upload(init).unwrap();
    b.matmul_nt(&xt, &wt, &mut out, d, acc).unwrap();
    b.download(&out, d.m * d.n).unwrap()
}

/// The scalar reference of a path: bf16 rounds the activations where `vdpbf16ps` (or the
/// portable code that follows it) runs, and keeps them in f32 in the widened tiles.
fn reference_for(
    dtype: WeightDtype,
    level: t5rt::IsaLevel,
) -> fn(&[f32], &[f32], MatDims) -> Vec<f32> {
    match dtype {
        WeightDtype::Bf16 if level.bf16_rounds_activations() => reference::matmul_nt_bf16,
        WeightDtype::Bf16 => reference::matmul_nt_bf16_weights,
        WeightDtype::Int8 => reference::matmul_nt_int8,
        WeightDtype::F32 | WeightDtype::F16 => unreachable!("CPU reduced precisions only"),
    }
}

fn check(dtype: WeightDtype, tol: f32) {
    let mut rng = Rng::new(11);
    for (m, n, k) in SHAPES {
        let d = MatDims { m, n, k };
        // Rows of different magnitudes, as activations have.
        let x: Vec<f32> = (0..m * k)
            .map(|i| rng.f32() * (1 + i / k) as f32 * 3.0)
            .collect();
        let (w, init) = (rng.vec(n * k), rng.vec(m * n));
        // The first result of each contract, which the other paths of that contract must match.
        let mut first: Vec<(bool, Vec<f32>)> = Vec::new();
        for b in common::cpu_backends(dtype) {
            let what = format!("{dtype} matmul {m}x{n}x{k} on {}", b.name());
            let contract = dtype == WeightDtype::Bf16 && b.isa().bf16_rounds_activations();
            let want = reference_for(dtype, b.isa())(&x, &w, d);
            let want_acc: Vec<f32> = want.iter().zip(&init).map(|(a, b)| a + b).collect();
            let got = run(&b, &x, &w, &init, d, false);
            assert_close(&what, &got, &want, tol);
            assert_close(
                &format!("{what} +="),
                &run(&b, &x, &w, &init, d, true),
                &want_acc,
                tol,
            );
            // The SIMD tiles and the portable ones of one contract sum in the same order (for
            // bf16 with rounded activations: the order Intel's manual gives `vdpbf16ps`; a CPU
            // that rounds the pair otherwise stays within this bound too, see
            // `bf16_dot_order` in kernels.rs).
            match first.iter().find(|(c, _)| *c == contract) {
                None => first.push((contract, got)),
                Some((_, f)) => assert_close(&format!("{what} vs first backend"), &got, f, 1e-6),
            }
        }
    }
}

/// The tiles for CPUs without the dot-product instructions are bitwise what the others
/// compute: widened bf16 is the f32 tile on bf16-rounded weights; int8 through 16-bit
/// products is `vpdpbusd`'s exact sums (compared where the CPU has VNNI, else with the
/// portable sums).
#[test]
fn no_dot_tiles_are_bitwise_exact() {
    use t5rt::IsaLevel;
    let mut rng = Rng::new(13);
    for (m, n, k) in SHAPES {
        let d = MatDims { m, n, k };
        let (x, w) = (rng.vec(m * k), rng.vec(n * k));
        let rounded: Vec<f32> = w.iter().map(|&v| reference::round_bf16(v)).collect();
        let zero = vec![0.0; m * n];
        for level in [IsaLevel::Avx512bw, IsaLevel::Avx2] {
            if !level.available() {
                common::once(format!(
                    "SKIPPED widened bf16 / 16-bit int8 at {level}: this CPU lacks {}",
                    level.features()
                ));
                continue;
            }
            let f32_tile = CpuBackend::with_isa(2, level).unwrap();
            let widened = CpuBackend::with_isa(2, level)
                .unwrap()
                .with_dtype(WeightDtype::Bf16);
            assert_eq!(
                run(&widened, &x, &w, &zero, d, false),
                run(&f32_tile, &x, &rounded, &zero, d, false),
                "bf16 widened at {level}, {m}x{n}x{k}"
            );
            let exact_level = if IsaLevel::Avx512Vnni.available() {
                IsaLevel::Avx512Vnni
            } else {
                IsaLevel::Portable
            };
            let int8 = |l| {
                CpuBackend::with_isa(2, l)
                    .unwrap()
                    .with_dtype(WeightDtype::Int8)
            };
            // Rows centered near zero, and rows of one sign (ReLU's output), whose center
            // the quantization moves.
            let relu: Vec<f32> = x.iter().map(|v| v.abs() * 3.0).collect();
            for x in [&x, &relu] {
                assert_eq!(
                    run(&int8(level), x, &w, &zero, d, false),
                    run(&int8(exact_level), x, &w, &zero, d, false),
                    "int8 at {level} vs {exact_level}, {m}x{n}x{k}"
                );
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

/// The bundled model's held-out exact match in each precision, within a point of f32's; and
/// greedy search with the screened LM head gives the full head's tokens in each.
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
        // Greedy search screens f32 heads with an int8 copy, and bf16 heads where bf16
        // products are widened (unless T5RT_SCREEN_HEAD says otherwise): the same tokens as
        // the full head.
        let screen = model.head_screen_dtype();
        if std::env::var("T5RT_SCREEN_HEAD").is_err() {
            let level = t5rt::IsaLevel::from_env().unwrap();
            let screened = match dtype {
                WeightDtype::F32 => true,
                WeightDtype::Bf16 => !level.bf16_rounds_activations(),
                _ => false,
            };
            let want = screened.then_some(WeightDtype::Int8);
            assert_eq!(screen, want, "{dtype} at {level}: the head's screen");
        }
        if screen.is_some() {
            let mut full = Checkpoint::open(&dir)
                .unwrap()
                .load_model(CpuBackend::new(2).unwrap().with_dtype(dtype))
                .unwrap();
            full.drop_head_screen();
            let plain = generate(&full, &inputs, &opts, None, |_| {}).unwrap();
            let ids = |o: &Vec<Vec<t5rt::Hypothesis>>| -> Vec<Vec<u32>> {
                o.iter().map(|h| h[0].ids.clone()).collect()
            };
            assert_eq!(
                ids(&plain),
                ids(&outputs),
                "{dtype}: screened and full heads differ"
            );
        }
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

/// Several products of one input in one call (`matmul_nt_shared`: the input prepared once,
/// the products' tasks in one parallel pass) give each product's `matmul_nt` result bit for
/// bit, in every precision at every level this CPU has; weights of different precisions
/// (as `T5RT_KEEP_F32` can mix) fall back to separate products; a count mismatch is an error.
#[test]
fn shared_input_products_equal_separate_ones() {
    use t5rt::IsaLevel;
    let mut rng = Rng::new(17);
    for level in IsaLevel::available_levels() {
        for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::Int8] {
            let b = CpuBackend::with_isa(2, level).unwrap().with_dtype(dtype);
            for (m, n, k) in [(1, 70, 66), (7, 64, 33), (70, 130, 40), (13, 100, 2100)] {
                let d = MatDims { m, n, k };
                let x = b.upload(&rng.vec(m * k)).unwrap();
                let ws: Vec<_> = (0..3)
                    .map(|_| b.upload_linear(&rng.vec(n * k), n, k).unwrap())
                    .collect();
                let separate: Vec<Vec<f32>> = ws
                    .iter()
                    .map(|w| {
                        let mut out = b.zeros(m * n).unwrap();
                        b.matmul_nt(&x, w, &mut out, d, false).unwrap();
                        out
                    })
                    .collect();
                let (mut o0, mut o1, mut o2) = (
                    b.upload(&vec![7.0; m * n]).unwrap(),
                    b.zeros(m * n).unwrap(),
                    b.zeros(m * n).unwrap(),
                );
                b.matmul_nt_shared(
                    &x,
                    &[&ws[0], &ws[1], &ws[2]],
                    &mut [&mut o0, &mut o1, &mut o2],
                    d,
                )
                .unwrap();
                for (i, got) in [o0, o1, o2].iter().enumerate() {
                    assert_eq!(
                        got, &separate[i],
                        "{level} {dtype:?} {m}x{n}x{k}, product {i}"
                    );
                }
            }
        }
        // Mixed precisions: each product as `matmul_nt` gives it.
        let (m, n, k) = (5, 40, 24);
        let d = MatDims { m, n, k };
        let b = CpuBackend::with_isa(2, level)
            .unwrap()
            .with_dtype(WeightDtype::Int8);
        let x = b.upload(&rng.vec(m * k)).unwrap();
        let (wi, wf) = (rng.vec(n * k), rng.vec(n * k));
        let (w8, w32) = (
            b.upload_linear(&wi, n, k).unwrap(),
            b.upload_linear_f32(&wf, n, k).unwrap(),
        );
        let (mut a, mut c) = (b.zeros(m * n).unwrap(), b.zeros(m * n).unwrap());
        b.matmul_nt_shared(&x, &[&w8, &w32], &mut [&mut a, &mut c], d)
            .unwrap();
        let (mut a1, mut c1) = (b.zeros(m * n).unwrap(), b.zeros(m * n).unwrap());
        b.matmul_nt(&x, &w8, &mut a1, d, false).unwrap();
        b.matmul_nt(&x, &w32, &mut c1, d, false).unwrap();
        assert_eq!((a, c), (a1, c1), "{level}: mixed precisions");
        let mut only = b.zeros(m * n).unwrap();
        assert!(b
            .matmul_nt_shared(&x, &[&w8, &w32], &mut [&mut only], d)
            .is_err());
    }
}
