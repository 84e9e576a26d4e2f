//! Times the CPU backend's linear-layer products (`matmul_nt`) at T5 shapes, per precision and
//! kernel level, and prints GFLOP/s (2 m n k per product over wall time, best of 5 runs).
//! A tool for working on the kernels, not a benchmark against peers:
//!
//! ```text
//! cargo run --release -p t5rt --example matmul_speed -- [THREADS] [LEVEL...]
//! ```
//!
//! `MATMUL_COLD=1` cycles through copies of each weight totalling at least 256 MiB
//! (`MATMUL_COLD_MIB` to change it: more than the last-level cache, which is 260 MiB on some
//! Xeons), so that every product reads its weights from memory as a decoding step does (each
//! weight of a step is read once), instead of from the caches the repeated product leaves
//! them in.
//! `MATMUL_SHARED=N` times N products of one input run together (`matmul_nt_shared`, as the
//! attention's q, k and v are), N weights of the shape given.

mod common;

use std::time::Instant;

use t5rt::backend::{Backend, MatDims};
use t5rt::{CpuBackend, IsaLevel, WeightDtype};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads = args.first().and_then(|a| a.parse().ok()).unwrap_or(0);
    let levels: Vec<IsaLevel> = if args.len() > 1 {
        args[1..]
            .iter()
            .map(|a| a.parse::<IsaLevel>().expect("a level name"))
            .collect()
    } else {
        IsaLevel::available_levels()
    };
    // (m, n, k): encoder products of t5-small (4096 and 512 rows), a batched decoding step
    // (32 rows), and batch-1 decoding (memory-bound).
    // `MATMUL_SHAPES=MxNxK,...` and `MATMUL_DTYPES=f32,int8` pick a subset.
    let mut shapes = vec![
        (4096, 512, 512),
        (4096, 2048, 512),
        (4096, 512, 2048),
        (512, 512, 512),
        (32, 2048, 512),
        (32, 512, 2048),
        (1, 2048, 512),
    ];
    if let Ok(list) = std::env::var("MATMUL_SHAPES") {
        shapes = list
            .split(',')
            .map(|s| {
                let d: Vec<usize> = s.split('x').map(|v| v.parse().expect("MxNxK")).collect();
                (d[0], d[1], d[2])
            })
            .collect();
    }
    let dtypes: Vec<WeightDtype> = match std::env::var("MATMUL_DTYPES") {
        Ok(list) => list
            .split(',')
            .map(|d| d.parse().expect("a dtype"))
            .collect(),
        Err(_) => vec![WeightDtype::F32, WeightDtype::Bf16, WeightDtype::Int8],
    };
    let mut seed = 0x9e37_79b9u32;
    let mut rand = move |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as f32 / u32::MAX as f32 - 0.5
            })
            .collect()
    };
    println!("level        dtype      m     n     k   GFLOP/s   ms");
    for level in levels {
        for &dtype in &dtypes {
            let b = CpuBackend::with_isa(threads, level)
                .expect("level")
                .with_dtype(dtype);
            for &(m, n, k) in &shapes {
                let d = MatDims { m, n, k };
                let x = b.upload(&rand(m * k)).unwrap();
                let cold = std::env::var("MATMUL_COLD").is_ok_and(|v| v == "1");
                let bytes = n
                    * k
                    * match dtype {
                        WeightDtype::F32 => 4,
                        WeightDtype::Int8 => 1,
                        _ => 2,
                    };
                let copies = if cold {
                    (common::positive_env("MATMUL_COLD_MIB", 256, "a size in MiB above 0") << 20)
                        / bytes
                        + 1
                } else {
                    1
                };
                let w0 = rand(n * k);
                let ws: Vec<_> = (0..copies)
                    .map(|_| b.upload_linear(&w0, n, k).unwrap())
                    .collect();
                let shared: usize = std::env::var("MATMUL_SHARED")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1)
                    .max(1);
                let mut outs: Vec<_> = (0..shared).map(|_| b.zeros(m * n).unwrap()).collect();
                let reps = (2e9 / (2.0 * (shared * m * n * k) as f64)).clamp(3.0, 200.0) as usize;
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t = Instant::now();
                    for r in 0..reps {
                        if shared == 1 {
                            b.matmul_nt(&x, &ws[r % copies], &mut outs[0], d, false)
                                .unwrap();
                        } else {
                            let w: Vec<_> = (0..shared).map(|i| &ws[(r + i) % copies]).collect();
                            let mut o: Vec<_> = outs.iter_mut().collect();
                            b.matmul_nt_shared(&x, &w, &mut o, d).unwrap();
                        }
                    }
                    best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                }
                let gflops = 2.0 * (shared * m * n * k) as f64 / best / 1e9;
                println!(
                    "{:<12} {:<5} {:>6} {:>5} {:>5} {:>9.1} {:>6.3}",
                    level.name(),
                    dtype.to_string(),
                    m,
                    n,
                    k,
                    gflops,
                    best * 1e3
                );
            }
        }
    }
}
