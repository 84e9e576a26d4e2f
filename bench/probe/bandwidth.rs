//! Read-bandwidth probe for bench/machine_limits.py: sums a buffer of the given size over
//! the given number of threads, 16 independent lanes per thread (vectorised with
//! `-C target-cpu=native`), several passes, and prints the best pass in GB/s.
//! Usage: bandwidth <bytes> <threads> <passes>

use std::time::Instant;

fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    for c in x.chunks_exact(16) {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("usage: bandwidth <bytes> <threads> <passes>"))
        .collect();
    let (bytes, threads, passes) = (args[0], args[1], args[2]);
    let n = bytes / 4 / 16 / threads * 16 * threads;
    let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let part = n / threads;
    let mut best = 0.0f64;
    let mut check = 0.0f32;
    for _ in 0..passes {
        let t0 = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = data
                .chunks(part)
                .map(|c| s.spawn(move || sum(c)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let secs = t0.elapsed().as_secs_f64();
        check += total;
        best = best.max((n * 4) as f64 / secs / 1e9);
    }
    println!("{best:.2} {check}");
}
