//! Shared test helpers: fixture loading, tolerances, a tiny seeded random generator.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;
use t5rt::{Checkpoint, CpuBackend, T5Model, TensorStore};

/// The repository: where this test was built, or `T5RT_REPO` (a test binary carried to
/// another machine, such as the GPU one, finds its fixtures there).
pub fn repo() -> PathBuf {
    match std::env::var("T5RT_REPO") {
        Ok(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

/// Root of the committed fixtures (made by tools/make_fixtures.py).
pub fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

/// The bundled default model directory.
pub fn bundled_model() -> PathBuf {
    repo().join("models/spell-numbers")
}

/// Every CPU kernel path for `dtype` this machine has: each kernel level the CPU supports
/// that runs a different tile for `dtype` (see `IsaLevel::kernel`), with one thread and two.
/// Neither threading nor the kernel choice may change results beyond rounding. Prints which
/// paths ran and which were skipped for lack of CPU features, so that a run on a smaller CPU
/// says what it did not test.
pub fn cpu_backends(dtype: t5rt::WeightDtype) -> Vec<CpuBackend> {
    use t5rt::IsaLevel;
    // A path: the linear layers' tile, and which vectors the other kernels use.
    let path = |l: IsaLevel| {
        let rest = if l.avx512() {
            "avx512"
        } else if l >= IsaLevel::Avx2 {
            "avx2"
        } else {
            "baseline"
        };
        format!("{} tiles + {rest} elementwise", l.kernel(dtype))
    };
    let mut ran: Vec<String> = Vec::new();
    let mut levels = Vec::new();
    // Highest level first, so that the path `CpuBackend::new` picks comes first; but on Intel
    // CPUs with AVX-512 BF16 it runs `avx512-vnni`, which for bf16 is the second path (the
    // `vdpbf16ps` one comes first) and for f32 and int8 the same path as `avx512-bf16`.
    for level in IsaLevel::ALL.into_iter().rev() {
        let p = path(level);
        if level.available() && !ran.contains(&p) {
            ran.push(p);
            levels.push(level);
        } else if !IsaLevel::available_levels().iter().any(|&l| path(l) == p) {
            once(format!(
                "SKIPPED {dtype} path `{p}` (level {level}): this CPU lacks {}",
                level.features()
            ));
        }
    }
    once(format!("ran {dtype} paths: {}", ran.join("; ")));
    levels
        .into_iter()
        .flat_map(|level| {
            [1, 2].map(|threads| {
                CpuBackend::with_isa(threads, level)
                    .unwrap()
                    .with_dtype(dtype)
            })
        })
        .collect()
}

/// Writes `line` to stderr once per test binary, past the test harness's output capture
/// (which takes only `print!` / `eprint!`), so that it shows in a plain `cargo test` run.
pub fn once(line: String) {
    use std::io::Write;
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap();
    if !seen.contains(&line) {
        let _ = writeln!(std::io::stderr(), "{line}");
        seen.push(line);
    }
}

/// The bundled model's held-out set: tokenized inputs and expected texts.
pub fn bundled_heldout(tok: &t5rt::T5Tokenizer) -> (Vec<Vec<u32>>, Vec<String>) {
    let lines = std::fs::read_to_string(bundled_model().join("heldout.jsonl")).unwrap();
    let (mut inputs, mut expected) = (Vec::new(), Vec::new());
    for line in lines.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        inputs.push(tok.encode(v["text"].as_str().unwrap()).unwrap());
        expected.push(v["expected"].as_str().unwrap().to_string());
    }
    (inputs, expected)
}

/// How many best hypotheses decode to their expected text.
pub fn exact_matches(
    outputs: &[Vec<t5rt::Hypothesis>],
    expected: &[String],
    tok: &t5rt::T5Tokenizer,
) -> usize {
    outputs
        .iter()
        .zip(expected)
        .filter(|(hyps, want)| tok.decode(&hyps[0].ids).unwrap() == **want)
        .count()
}

/// One variant's Hugging Face reference: tensors and the JSON side.
pub struct Reference {
    pub json: Value,
    pub tensors: TensorStore,
}

impl Reference {
    pub fn load(variant: &str) -> Reference {
        let dir = fixtures().join(variant);
        let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
        Reference {
            json: serde_json::from_str(&text).expect("reference.json parses"),
            tensors: TensorStore::open_file(&dir.join("reference.safetensors"))
                .expect("reference.safetensors"),
        }
    }

    pub fn tensor(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let shape = self.tensors.shape(name).expect("tensor in reference");
        let t = self.tensors.read(name, &shape).unwrap();
        (t.shape, t.data)
    }

    pub fn ids(&self, pointer: &str) -> Vec<Vec<u32>> {
        self.json
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{pointer} in reference.json"))
            .as_array()
            .unwrap()
            .iter()
            .map(|seq| {
                seq.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    }

    pub fn usize(&self, pointer: &str) -> usize {
        self.json.pointer(pointer).and_then(Value::as_u64).unwrap() as usize
    }
}

/// Loads a model directory on the CPU backend.
pub fn load_model(dir: &std::path::Path, threads: usize) -> T5Model<CpuBackend> {
    let ckpt = Checkpoint::open(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    ckpt.load_model(CpuBackend::new(threads).unwrap()).unwrap()
}

/// Largest |got - want| divided by the largest |want|: the parity figure the tests bound.
pub fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length");
    let scale = want
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let worst = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
    assert!(worst.is_finite(), "non-finite values");
    worst / scale
}

/// Root-mean-square of `got - want` divided by that of `want`: the second parity figure,
/// more sensitive than the largest error to a small change that moves every value.
pub fn rms_relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length");
    let sq = |it: &mut dyn Iterator<Item = f64>| it.map(|v| v * v).sum::<f64>();
    let err = sq(&mut got.iter().zip(want).map(|(g, w)| (g - w) as f64));
    let norm = sq(&mut want.iter().map(|&w| w as f64)).max(f64::MIN_POSITIVE);
    assert!(err.is_finite(), "non-finite values");
    (err / norm).sqrt() as f32
}

/// Asserts `relative_error(got, want) <= tol` and reports the figure.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let err = relative_error(got, want);
    eprintln!("parity {what}: max abs error / max |ref| = {err:.2e}");
    assert!(err <= tol, "{what}: relative error {err:e} exceeds {tol:e}");
}

/// xorshift64*: deterministic test data without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The CUDA backend on GPU 0 with weights of `dtype`, or None (printed as SKIPPED) where this
/// machine has no usable GPU. With `T5RT_REQUIRE_GPU=1` (the GPU check script sets it) a
/// missing GPU fails instead, so that a GPU run cannot skip silently.
#[cfg(feature = "cuda")]
pub fn cuda_backend(dtype: t5rt::WeightDtype) -> Option<t5rt::backend::cuda::CudaBackend> {
    use t5rt::backend::cuda::{driver_available, CudaBackend};
    let required = std::env::var("T5RT_REQUIRE_GPU").is_ok_and(|v| v == "1");
    if !driver_available() {
        assert!(
            !required,
            "T5RT_REQUIRE_GPU=1 but the CUDA driver cannot be loaded"
        );
        once("SKIPPED CUDA tests: no NVIDIA driver on this machine".into());
        return None;
    }
    match CudaBackend::new(0, dtype) {
        Ok(b) => {
            once(format!("ran CUDA tests on {}", t5rt::Backend::name(&b)));
            Some(b)
        }
        Err(e) => {
            assert!(!required, "T5RT_REQUIRE_GPU=1 but: {e}");
            once(format!("SKIPPED CUDA tests: {e}"));
            None
        }
    }
}
