//! Times the CPU backend's decoding-step attention (one query per sequence over a key/value
//! cache) with the caches cold, as in a decoding step, where the weights read between two
//! attention calls push the caches out of L3: each call reads its own copy of k and v from a
//! set of copies totalling at least 256 MiB. Prints GB/s (cache bytes over wall time, best of
//! 5 runs). A tool for working on the kernels:
//!
//! ```text
//! cargo run --release -p t5rt --example attend_speed -- [THREADS] [BATCHxKEYS...]
//! ```
//!
//! `ATTEND_KV=bf16` or `ATTEND_KV=int8` times caches in that format (default f32); GB/s counts
//! the format's own bytes.

use std::time::Instant;

use t5rt::backend::{AttnShape, Backend, KvFormat};
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
    let (heads, d_kv) = (8, 64);
    let inner = heads * d_kv;
    let b = CpuBackend::new(threads).expect("backend");
    let kv = match std::env::var("ATTEND_KV").as_deref() {
        Ok("bf16") => KvFormat::Bf16,
        Ok("int8") => KvFormat::Int8,
        _ => KvFormat::F32,
    };
    println!("{kv:?} caches");
    println!("batch  keys   GB/s     us");
    for (batch, keys) in cases {
        let len = batch * keys * inner;
        let copies = if std::env::var_os("ATTEND_HOT").is_some() {
            1
        } else {
            (256 << 20) / (2 * 4 * len) + 1
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
            bias_stride: keys,
            kv,
        };
        let reps = if copies == 1 { 500 } else { copies.max(20) };
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            // Inside the backend's pool, as decoding runs (see `Backend::run`).
            b.run(|| {
                for r in 0..reps {
                    let (k, v) = &caches[r % copies];
                    b.attention(&q, k, v, None, None, &mut out, shape).unwrap();
                }
            });
            best = best.min(t.elapsed().as_secs_f64() / reps as f64);
        }
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
