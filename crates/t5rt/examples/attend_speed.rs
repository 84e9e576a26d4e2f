//! Times the CPU backend's decoding-step attention (one query per sequence over a key/value
//! cache) with the caches cold, as in a decoding step, where the weights read between two
//! attention calls push the caches out of L3: each call reads its own copy of k and v from a
//! set of copies totalling at least 256 MiB (`ATTEND_COLD_MIB` to change it: more than the
//! last-level cache, which is 260 MiB on some Xeons). Prints GB/s (cache bytes over wall time, best of
//! 5 runs). A tool for working on the kernels:
//!
//! ```text
//! cargo run --release -p t5rt --example attend_speed -- [THREADS] [BATCHxKEYS...]
//! ```
//!
//! `ATTEND_KV=bf16` or `ATTEND_KV=int8` times caches in that format (default f32); GB/s counts
//! the format's own bytes. `ATTEND_HEADS=N` sets the heads in either mode (default 8,
//! t5-small's; 12 for t5-base), each of 64 values.
//!
//! `ATTEND_ENCODER=1` times the encoder's attention instead: every position a query
//! (`q_len = kv_len = KEYS`), with a position bias (uploaded as `T5Model::encode` uploads
//! it: lines of distances on the CPU) and a mask, as `T5Model::encode` calls it; it prints
//! GFLOP/s (the two products' FLOPs over wall time, best of 5) and microseconds per call.

mod common;

use std::time::Instant;

use t5rt::backend::{AttnShape, Backend, BiasLayout, KvFormat};
use t5rt::CpuBackend;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads = args.first().and_then(|a| a.parse().ok()).unwrap_or(0);
    let cases: Vec<(usize, usize)> = if args.len() > 1 {
        args[1..]
            .iter()
            .map(|a| {
                let (b, n) = a.split_once('x').expect("BATCHxKEYS");
                (b.parse().expect("batch"), n.parse().expect("keys"))
            })
            .collect()
    } else {
        vec![(1, 512), (2, 512), (1, 128), (32, 128)]
    };
    let heads = common::positive_env("ATTEND_HEADS", 8, "a number of heads, 1 or more");
    let d_kv = 64;
    let inner = heads * d_kv;
    let b = CpuBackend::new(threads).expect("backend");
    let kv = match std::env::var("ATTEND_KV").as_deref() {
        Ok("bf16") => KvFormat::Bf16,
        Ok("int8") => KvFormat::Int8,
        _ => KvFormat::F32,
    };
    if std::env::var_os("ATTEND_ENCODER").is_some() {
        return encoder(&b, &cases, heads, d_kv);
    }
    println!("{kv:?} caches");
    println!("batch  keys   GB/s     us");
    for (batch, keys) in cases {
        let len = batch * keys * inner;
        let copies = if std::env::var_os("ATTEND_HOT").is_some() {
            1
        } else {
            // Bytes a value of the format takes (int8's per-row scales left out).
            let bytes = match kv {
                KvFormat::F32 => 4,
                KvFormat::Bf16 => 2,
                KvFormat::Int8 => 1,
            };
            (common::positive_env("ATTEND_COLD_MIB", 256, "a size in MiB above 0") << 20)
                / (2 * bytes * len)
                + 1
        };
        let vals: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let cache = || {
            let t = b.upload(&vals).unwrap();
            match kv {
                KvFormat::F32 => t,
                KvFormat::Bf16 => b.compress_kv(&t, len).unwrap(),
                KvFormat::Int8 => b.quantize_kv(&t, batch * keys, heads, d_kv).unwrap(),
            }
        };
        let caches: Vec<_> = (0..copies).map(|_| (cache(), cache())).collect();
        let q = b.upload(&vals[..batch * inner]).unwrap();
        let mut out = b.zeros(batch * inner).unwrap();
        let shape = AttnShape {
            batch,
            heads,
            d_kv,
            q_len: 1,
            kv_len: keys,
            kv_stride: keys,
            kv_group: 1,
            bias: BiasLayout::Rows { stride: keys },
            kv,
        };
        let reps = if copies == 1 { 500 } else { copies.max(20) };
        let best = best_of_5(&b, reps, |r| {
            let (k, v) = &caches[r % copies];
            b.attention(&q, k, v, None, None, &mut out, shape).unwrap();
        });
        let bytes = (2 * 4 * kv.slots_per_position(heads, d_kv) * batch * keys) as f64;
        println!(
            "{:>5} {:>5} {:>6.1} {:>6.1}",
            batch,
            keys,
            bytes / best / 1e9,
            best * 1e6
        );
    }
}

/// The encoder's attention (see the module docs), hot: as in the encoder, whose q, k and v
/// were just written by the projections.
fn encoder(b: &CpuBackend, cases: &[(usize, usize)], heads: usize, d_kv: usize) {
    let inner = heads * d_kv;
    println!("encoder attention, f32, {heads} heads of {d_kv}");
    println!("batch   len GFLOP/s     us");
    for &(batch, len) in cases {
        let n = batch * len * inner;
        let vals = |seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i + seed) * 7919) % 1000) as f32 / 1000.0 - 0.5)
                .collect()
        };
        let (q, k, v) = (
            b.upload(&vals(1)).unwrap(),
            b.upload(&vals(2)).unwrap(),
            b.upload(&vals(3)).unwrap(),
        );
        // A line of distances per head, in the layout the backend takes it in.
        let lines: Vec<f32> = (0..heads * (2 * len - 1))
            .map(|i| ((i * 31) % 17) as f32 * 0.1 - 0.8)
            .collect();
        let (bias, layout) = b.upload_position_bias(&lines, heads, len, len).unwrap();
        let mask = b.upload(&vec![0.0f32; batch * len]).unwrap();
        let mut out = b.zeros(n).unwrap();
        let shape = AttnShape {
            batch,
            heads,
            d_kv,
            q_len: len,
            kv_len: len,
            kv_stride: len,
            kv_group: 1,
            bias: layout,
            kv: KvFormat::F32,
        };
        let reps = (200_000_000 / (batch * len * len * inner)).clamp(3, 500);
        let best = best_of_5(b, reps, |_| {
            b.attention(&q, &k, &v, Some(&bias), Some(&mask), &mut out, shape)
                .unwrap();
        });
        let flops = (4 * batch * len * len * inner) as f64;
        println!(
            "{:>5} {:>5} {:>8.1} {:>6.0}",
            batch,
            len,
            flops / best / 1e9,
            best * 1e6
        );
    }
}

/// Seconds per call of `call(r)` for `r` in `0..reps`, the best of 5 runs, each run inside the
/// backend's pool as decoding runs (see `Backend::run`).
fn best_of_5(b: &CpuBackend, reps: usize, mut call: impl FnMut(usize) + Send) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        b.run(|| (0..reps).for_each(&mut call));
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}
