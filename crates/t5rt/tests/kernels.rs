//! Every kernel of every compiled backend against the scalar reference in
//! `t5rt::backend::cpu::reference`, on seeded random data of awkward sizes.

mod common;

use common::{assert_close, Rng};
use t5rt::backend::cpu::reference;
use t5rt::backend::{AttnShape, Backend, BiasLayout, KvFormat, MatDims};
use t5rt::{Activation, CpuBackend};

const F32_TOL: f32 = 2e-6;

fn backends() -> Vec<CpuBackend> {
    common::cpu_backends(t5rt::WeightDtype::F32)
}

fn check_matmul<B: Backend>(b: &B, rng: &mut Rng) {
    for (m, n, k) in [
        (1, 1, 1),
        (1, 64, 48),
        (3, 17, 33),
        (7, 128, 96),
        (8, 1100, 40), // the streaming kernel's widest case, tiles not a multiple of n
        (9, 70, 33),   // the first case for gemm
        (40, 100, 64),
        (1, 1000, 64),
        (13, 70, 2100), // long rows: the AVX-512 tile walks k in blocks
        (4, 40, 3072),  // CUDA: 48 KB of rows, just past gemv's shared memory
    ] {
        let d = MatDims { m, n, k };
        let (x, w, init) = (rng.vec(m * k), rng.vec(n * k), rng.vec(m * n));
        let want = reference::matmul_nt(&x, &w, d);
        let (xt, wt) = (b.upload(&x).unwrap(), b.upload_linear(&w, n, k).unwrap());
        let mut out = b.upload(&init).unwrap();
        b.matmul_nt(&xt, &wt, &mut out, d, false).unwrap();
        assert_close(
            &format!("matmul {m}x{n}x{k}"),
            &b.download(&out, m * n).unwrap(),
            &want,
            F32_TOL,
        );
        // accumulate: out += x · wᵀ
        let mut acc = b.upload(&init).unwrap();
        b.matmul_nt(&xt, &wt, &mut acc, d, true).unwrap();
        let want_acc: Vec<f32> = want.iter().zip(&init).map(|(a, b)| a + b).collect();
        assert_close(
            &format!("matmul+= {m}x{n}x{k}"),
            &b.download(&acc, m * n).unwrap(),
            &want_acc,
            F32_TOL,
        );
    }
}

fn check_rms_norm<B: Backend>(b: &B, rng: &mut Rng) {
    for (rows, d) in [(1, 8), (5, 48), (9, 512)] {
        let x: Vec<f32> = rng.vec(rows * d).iter().map(|v| v * 30.0).collect();
        let w = rng.vec(d);
        let want = reference::rms_norm(&x, &w, 1e-6);
        let mut out = b.zeros(rows * d).unwrap();
        b.rms_norm(
            &b.upload(&x).unwrap(),
            &b.upload(&w).unwrap(),
            &mut out,
            rows,
            d,
            1e-6,
        )
        .unwrap();
        assert_close(
            &format!("rms_norm {rows}x{d}"),
            &b.download(&out, rows * d).unwrap(),
            &want,
            F32_TOL,
        );
    }
}

fn check_activations<B: Backend>(b: &B, rng: &mut Rng) {
    let n = 10_000;
    let x: Vec<f32> = rng.vec(n).iter().map(|v| v * 8.0).collect();
    let up = rng.vec(n);
    for act in [Activation::Relu, Activation::GeluNew, Activation::Silu] {
        let mut t = b.upload(&x).unwrap();
        b.activate(&mut t, None, n, act).unwrap();
        let want: Vec<f32> = x.iter().map(|&v| reference::act(v, act)).collect();
        assert_close(
            &format!("{act:?}"),
            &b.download(&t, n).unwrap(),
            &want,
            F32_TOL,
        );
        let mut g = b.upload(&x).unwrap();
        b.activate(&mut g, Some(&b.upload(&up).unwrap()), n, act)
            .unwrap();
        let want: Vec<f32> = x
            .iter()
            .zip(&up)
            .map(|(&v, &u)| reference::act(v, act) * u)
            .collect();
        assert_close(
            &format!("gated {act:?}"),
            &b.download(&g, n).unwrap(),
            &want,
            F32_TOL,
        );
    }
}

/// A sublayer's norm and input products in one call (`norm_matmul_shared`, `norm_ffn_up`;
/// fused into the products on CUDA's decoding path) against the reference's norm, products
/// and activation, one after the other. Shapes: decoding's (up to 8 rows) and past them.
fn check_fused_sublayers<B: Backend>(b: &B, rng: &mut Rng, tol: f32) {
    for (m, n, k) in [
        (1, 768, 768),
        (3, 200, 512),
        (8, 64, 96),
        (9, 40, 64),
        (2, 33, 40),
    ] {
        let d = MatDims { m, n, k };
        let x: Vec<f32> = rng.vec(m * k).iter().map(|v| v * 20.0).collect();
        let norm = rng.vec(k);
        let normed = reference::rms_norm(&x, &norm, 1e-6);
        let raw: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(n * k)).collect();
        let ws: Vec<_> = raw
            .iter()
            .map(|w| b.upload_linear(w, n, k).unwrap())
            .collect();
        let (xt, nt) = (b.upload(&x).unwrap(), b.upload(&norm).unwrap());
        let mut scratch = b.zeros(m * k).unwrap();
        for count in 1..=3 {
            let mut outs: Vec<_> = (0..count).map(|_| b.zeros(m * n).unwrap()).collect();
            let refs: Vec<&_> = ws[..count].iter().collect();
            let mut muts: Vec<&mut _> = outs.iter_mut().collect();
            b.norm_matmul_shared(&xt, &nt, 1e-6, &mut scratch, &refs, &mut muts, d)
                .unwrap();
            for (i, out) in outs.iter().enumerate() {
                assert_close(
                    &format!("norm + product {i} of {count}, {m}x{n}x{k}"),
                    &b.download(out, m * n).unwrap(),
                    &reference::matmul_nt(&normed, &raw[i], d),
                    tol,
                );
            }
        }
        // A decoding step's q, k and v, the keys and values written into caches of 5
        // positions per row at position 3 (nothing else in the caches changes), as f32 and,
        // where the backend keeps them so, as bf16 (two values per slot).
        let (cap, pos) = (5, 3);
        let mut qkv: Vec<_> = (0..3).map(|_| b.zeros(m * n).unwrap()).collect();
        // Runs the step into caches of `slots` per position filled with `init`: q, and the
        // caches' content after.
        let mut step = |kv: KvFormat, init: &[Vec<f32>], slots: usize| {
            let mut caches: Vec<_> = init.iter().map(|c| b.upload(c).unwrap()).collect();
            let [q, k_out, v_out] = &mut qkv[..] else {
                unreachable!()
            };
            let [kc, vc] = &mut caches[..] else {
                unreachable!()
            };
            let cache = t5rt::backend::CacheWrite {
                k_cache: kc,
                v_cache: vc,
                capacity: cap,
                pos,
                kv,
            };
            let ws = [&ws[0], &ws[1], &ws[2]];
            b.norm_qkv_step(
                &xt,
                &nt,
                1e-6,
                &mut scratch,
                ws,
                [q, k_out, v_out],
                cache,
                d,
            )
            .unwrap();
            let caches: Vec<Vec<f32>> = caches
                .iter()
                .map(|c| b.download(c, m * cap * slots).unwrap())
                .collect();
            (b.download(&qkv[0], m * n).unwrap(), caches)
        };
        let init: Vec<Vec<f32>> = (0..2).map(|_| rng.vec(m * cap * n)).collect();
        let (q, got) = step(KvFormat::F32, &init, n);
        assert_close(
            &format!("norm + q of a step, {m}x{n}x{k}"),
            &q,
            &reference::matmul_nt(&normed, &raw[0], d),
            tol,
        );
        for (i, got) in got.iter().enumerate() {
            let new = reference::matmul_nt(&normed, &raw[1 + i], d);
            let mut want = init[i].clone();
            for r in 0..m {
                want[(r * cap + pos) * n..][..n].copy_from_slice(&new[r * n..][..n]);
            }
            assert_close(&format!("step cache {i}, {m}x{n}x{k}"), got, &want, tol);
        }
        if b.bf16_self_kv() && n % 2 == 0 {
            let half = n / 2;
            let init: Vec<Vec<f32>> = (0..2).map(|_| rng.vec(m * cap * half)).collect();
            let (_, got) = step(KvFormat::Bf16, &init, half);
            for (i, got) in got.iter().enumerate() {
                let new = reference::matmul_nt(&normed, &raw[1 + i], d);
                for r in 0..m {
                    for p in 0..cap {
                        let at = (r * cap + p) * half;
                        let slots = &got[at..at + half];
                        if p != pos {
                            let same = slots.iter().zip(&init[i][at..at + half]);
                            assert!(same.clone().all(|(a, b)| a.to_bits() == b.to_bits()));
                            continue;
                        }
                        for (j, slot) in slots.iter().enumerate() {
                            let bits = slot.to_bits();
                            for (half_bits, want) in [
                                (bits << 16, new[r * n + 2 * j]),
                                (bits & 0xffff_0000, new[r * n + 2 * j + 1]),
                            ] {
                                let got = f32::from_bits(half_bits);
                                assert!(
                                    (got - want).abs() <= want.abs() / 128.0 + tol,
                                    "bf16 step cache {i}, {m}x{n}x{k}, row {r} value {}: {got} vs {want}",
                                    2 * j
                                );
                            }
                        }
                    }
                }
            }
        }
        let up = reference::matmul_nt(&normed, &raw[1], d);
        for act in [Activation::Relu, Activation::GeluNew, Activation::Silu] {
            let gate = reference::matmul_nt(&normed, &raw[0], d);
            for gated in [false, true] {
                let (mut ff, mut ff_up) = (b.zeros(m * n).unwrap(), b.zeros(m * n).unwrap());
                let refs: Vec<&_> = ws[..1 + gated as usize].iter().collect();
                b.norm_ffn_up(
                    &xt,
                    &nt,
                    1e-6,
                    &mut scratch,
                    &refs,
                    &mut ff,
                    &mut ff_up,
                    act,
                    d,
                )
                .unwrap();
                let want: Vec<f32> = gate
                    .iter()
                    .zip(&up)
                    .map(|(&g, &u)| reference::act(g, act) * if gated { u } else { 1.0 })
                    .collect();
                assert_close(
                    &format!("norm + feed-forward up {act:?} gated {gated}, {m}x{n}x{k}"),
                    &b.download(&ff, m * n).unwrap(),
                    &want,
                    tol,
                );
            }
        }
    }
}

/// (batch, heads, d_kv, q_len, kv_len, kv_stride, kv_group)
type AttnCase = (usize, usize, usize, usize, usize, usize, usize);

const ATTN_CASES: &[AttnCase] = &[
    (1, 1, 4, 1, 1, 1, 1),
    (2, 3, 8, 5, 5, 5, 1),
    (3, 4, 16, 1, 7, 12, 1),
    (2, 6, 8, 9, 9, 9, 1),
    (6, 2, 8, 1, 7, 7, 3), // beams: 2 sources x 3 rows share keys/values
    // T5's d_kv: whole 16-lane vectors per head for f32 and bf16 caches (the AVX-512 path)
    (4, 8, 64, 1, 37, 40, 1),
    (6, 2, 32, 1, 9, 9, 3),
    // batch 1 (heads split between tasks, a part of each key read), and heads of 80 and 96
    // values (whole blocks of 64 values and a remainder in the AVX-512 walk)
    (1, 8, 64, 1, 70, 72, 1),
    (2, 2, 80, 1, 11, 11, 1),
    (3, 2, 96, 1, 13, 16, 1),
    // t5-base's cross-attention over 512 source tokens (more keys than a GPU block's
    // threads), and a self-attention cache longer than the positions read
    (1, 12, 64, 1, 512, 512, 1),
    (3, 4, 64, 1, 200, 256, 1),
    // many queries in whole vectors (the AVX-512 encoder path): query blocks of 64 and a
    // remainder, keys padded to blocks of 32, heads of 80 values (a 64-value tile and a
    // 16-value one), more queries than keys, keys shared by groups of rows
    (2, 4, 64, 150, 150, 150, 1),
    (1, 2, 80, 70, 40, 48, 1),
    (6, 2, 32, 5, 9, 9, 3),
    // more queries x keys than the CPU's block of scores (512 Ki values): queries in blocks
    // of 476, the last one short; and two sequences in blocks of 655 (the second's offsets)
    (1, 2, 16, 1100, 1100, 1100, 1),
    (2, 2, 16, 800, 800, 800, 1),
];

fn check_attention<B: Backend>(b: &B, rng: &mut Rng) {
    check_attention_cases(b, rng, ATTN_CASES);
    check_leading_mask(b, rng);
    check_rows_alone(b, rng);
    check_bias_lines(b, rng);
}

/// An encoder's position bias as the backend takes it (`upload_position_bias`: lines of
/// distances on the CPU, rows elsewhere) gives, bit for bit, what the same bias expanded into
/// rows gives, and those rows are each pair's value of its distance. Square (encoder) and
/// ragged shapes, with and without a mask, one query and many.
fn check_bias_lines<B: Backend>(b: &B, rng: &mut Rng) {
    use t5rt::model::relpos::rows_of_lines;
    for (batch, heads, d_kv, q_len, kv_len) in [
        (2, 4, 16, 37, 37),
        (1, 12, 64, 130, 130),
        (3, 2, 32, 5, 19),
        (1, 3, 64, 1, 40),
        // more than one block of the CPU's scores (queries 689 at a time)
        (2, 2, 16, 760, 760),
    ] {
        let inner = heads * d_kv;
        let span = q_len + kv_len - 1;
        let lines = rng.vec(heads * span);
        let rows = rows_of_lines(&lines, heads, q_len, kv_len).unwrap();
        for h in 0..heads {
            for i in 0..q_len {
                for j in 0..kv_len {
                    // Distance j - i at index j - i + q_len - 1 of the head's line.
                    assert_eq!(
                        rows[(h * q_len + i) * kv_len + j],
                        lines[h * span + j + q_len - 1 - i]
                    );
                }
            }
        }
        let q = b.upload(&rng.vec(batch * q_len * inner)).unwrap();
        let (k, v) = (
            b.upload(&rng.vec(batch * kv_len * inner)).unwrap(),
            b.upload(&rng.vec(batch * kv_len * inner)).unwrap(),
        );
        let mut mask = vec![0.0f32; batch * kv_len];
        mask[batch * kv_len - 1] = f32::NEG_INFINITY;
        let mask = b.upload(&mask).unwrap();
        let (taken, layout) = b
            .upload_position_bias(&lines, heads, q_len, kv_len)
            .unwrap();
        let dense = b.upload(&rows).unwrap();
        let s = AttnShape {
            batch,
            heads,
            d_kv,
            q_len,
            kv_len,
            kv_stride: kv_len,
            kv_group: 1,
            bias: BiasLayout::Rows { stride: kv_len },
            kv: KvFormat::F32,
        };
        for m in [None, Some(&mask)] {
            let run = |bias: &B::Tensor, s: AttnShape| {
                let mut out = b.zeros(batch * q_len * inner).unwrap();
                b.attention(&q, &k, &v, Some(bias), m, &mut out, s).unwrap();
                b.download(&out, batch * q_len * inner).unwrap()
            };
            assert!(
                run(&taken, AttnShape { bias: layout, ..s }) == run(&dense, s),
                "{}: bias as {layout:?} differs from rows, {q_len} x {kv_len}, mask {}",
                b.name(),
                m.is_some()
            );
        }
    }
    // Lines of the wrong length are an error, not a read past their end: at upload, and given
    // to the attention as lines.
    let short = vec![0.0f32; 2 * 9];
    assert!(b.upload_position_bias(&short, 2, 5, 6).is_err());
    let (heads, d_kv, len) = (2, 16, 6);
    let x = b.upload(&rng.vec(len * heads * d_kv)).unwrap();
    let mut out = b.zeros(len * heads * d_kv).unwrap();
    let s = AttnShape {
        batch: 1,
        heads,
        d_kv,
        q_len: len,
        kv_len: len,
        kv_stride: len,
        kv_group: 1,
        bias: BiasLayout::Lines,
        kv: KvFormat::F32,
    };
    let bias = b.upload(&short).unwrap();
    assert!(b
        .attention(&x, &x, &x, Some(&bias), None, &mut out, s)
        .is_err());
}

/// Each row of a decoding attention call gets, bit for bit, what it gets alone (batch 1, its
/// own keys, values and mask row), in every cache format: rows over many keys are split into
/// parts (the CPU backend's key parts) and short ones into head groups, by rules that must
/// not depend on the batch. Rows over 300, 170 (padded) and 40 (padded) keys.
fn check_rows_alone<B: Backend>(b: &B, rng: &mut Rng) {
    let (heads, d_kv, kv_len) = (8, 64, 300);
    let inner = heads * d_kv;
    let keep = [kv_len, 170, 40];
    let batch = keep.len();
    let shape = |batch: usize, kv: KvFormat| AttnShape {
        batch,
        kv,
        ..one_query(heads, d_kv, kv_len, kv_len)
    };
    let q: Vec<f32> = rng.vec(batch * inner).iter().map(|v| v * 3.0).collect();
    let (k, v) = (
        rng.vec(batch * kv_len * inner),
        rng.vec(batch * kv_len * inner),
    );
    let bias = b.upload(&rng.vec(heads * kv_len)).unwrap();
    let mut mask = vec![0.0f32; batch * kv_len];
    for (row, &n) in mask.chunks_exact_mut(kv_len).zip(&keep) {
        row[n..].fill(f32::NEG_INFINITY);
    }
    let mut formats = vec![KvFormat::F32, KvFormat::Bf16];
    if b.int8_kv() && KvFormat::Int8.fits(d_kv) {
        formats.push(KvFormat::Int8);
    }
    for kv in formats {
        let cache = |x: &[f32], batch: usize| {
            let t = b.upload(x).unwrap();
            match kv {
                KvFormat::F32 => t,
                KvFormat::Bf16 => b.compress_kv(&t, x.len()).unwrap(),
                KvFormat::Int8 => b.quantize_kv(&t, batch * kv_len, heads, d_kv).unwrap(),
            }
        };
        let run = |q: &[f32], k: &[f32], v: &[f32], mask: &[f32], batch: usize| {
            let mut out = b.zeros(batch * inner).unwrap();
            let m = b.upload(mask).unwrap();
            let (kt, vt) = (cache(k, batch), cache(v, batch));
            let qt = b.upload(q).unwrap();
            b.attention(
                &qt,
                &kt,
                &vt,
                Some(&bias),
                Some(&m),
                &mut out,
                shape(batch, kv),
            )
            .unwrap();
            b.download(&out, batch * inner).unwrap()
        };
        let together = run(&q, &k, &v, &mask, batch);
        for (r, n) in keep.iter().enumerate() {
            let kv_rows = r * kv_len * inner..(r + 1) * kv_len * inner;
            let alone = run(
                &q[r * inner..(r + 1) * inner],
                &k[kv_rows.clone()],
                &v[kv_rows],
                &mask[r * kv_len..(r + 1) * kv_len],
                1,
            );
            assert!(
                alone == together[r * inner..(r + 1) * inner],
                "{}: {kv:?} caches, the row over {n} keys differs in a batch of {batch}",
                b.name()
            );
        }
    }
}

/// One query of one sequence over `kv_len` f32 keys (a decoding step).
fn one_query(heads: usize, d_kv: usize, kv_len: usize, bias_stride: usize) -> AttnShape {
    AttnShape {
        batch: 1,
        heads,
        d_kv,
        q_len: 1,
        kv_len,
        kv_stride: kv_len,
        kv_group: 1,
        bias: BiasLayout::Rows {
            stride: bias_stride,
        },
        kv: KvFormat::F32,
    }
}

/// Keys masked at the start of a row (a row that joined a running batch late) are left out:
/// the result equals, bit for bit, attention over the keys after them alone (the bias rows
/// end where they did). One query per sequence, as in decoding.
fn check_leading_mask<B: Backend>(b: &B, rng: &mut Rng) {
    for (heads, d_kv, kv_len, lead) in [(2, 8, 9, 3), (4, 64, 300, 37), (12, 64, 40, 39)] {
        let inner = heads * d_kv;
        let bias_stride = kv_len + 5;
        let full = one_query(heads, d_kv, kv_len, bias_stride);
        let short = AttnShape {
            kv_len: kv_len - lead,
            kv_stride: kv_len - lead,
            ..full
        };
        let q: Vec<f32> = rng.vec(inner).iter().map(|v| v * 3.0).collect();
        let (k, v) = (rng.vec(kv_len * inner), rng.vec(kv_len * inner));
        let bias = b.upload(&rng.vec(heads * bias_stride)).unwrap();
        let mut mask = vec![0.0f32; kv_len];
        mask[..lead].fill(f32::NEG_INFINITY);
        let run = |k: &[f32], v: &[f32], mask: Option<&[f32]>, s: AttnShape| {
            let mut out = b.zeros(inner).unwrap();
            let m = mask.map(|m| b.upload(m).unwrap());
            let (kt, vt) = (b.upload(k).unwrap(), b.upload(v).unwrap());
            b.attention(
                &b.upload(&q).unwrap(),
                &kt,
                &vt,
                Some(&bias),
                m.as_ref(),
                &mut out,
                s,
            )
            .unwrap();
            b.download(&out, inner).unwrap()
        };
        let with_mask = run(&k, &v, Some(&mask), full);
        let without = run(&k[lead * inner..], &v[lead * inner..], None, short);
        assert!(
            with_mask == without,
            "{}: {lead} leading masked keys of {kv_len} change the result",
            b.name()
        );
    }
}

fn check_attention_cases<B: Backend>(b: &B, rng: &mut Rng, cases: &[AttnCase]) {
    for &(batch, heads, d_kv, q_len, kv_len, kv_stride, kv_group) in cases {
        // Rounding grows with the terms summed, about as their square root past the 16
        // F32_TOL was set on: the keys (softmax and the weighted values) and the d_kv terms of
        // each score, whose error the softmax's exponential carries into the weights (the
        // GPU's expf and summation order met this at 64-value heads, 37 keys: 3.2e-6).
        let tol = F32_TOL * (kv_len.max(d_kv) as f32 / 16.0).sqrt().max(1.0);
        let s = AttnShape {
            batch,
            heads,
            d_kv,
            q_len,
            kv_len,
            kv_stride,
            kv_group,
            bias: BiasLayout::Rows { stride: kv_len },
            kv: KvFormat::F32,
        };
        let kv_batch = batch / kv_group;
        let inner = heads * d_kv;
        let q: Vec<f32> = rng
            .vec(batch * q_len * inner)
            .iter()
            .map(|v| v * 3.0)
            .collect();
        let k = rng.vec(kv_batch * kv_stride * inner);
        let v = rng.vec(kv_batch * kv_stride * inner);
        let bias = rng.vec(heads * q_len * kv_len);
        // Pad the tail of each sequence but the first, keeping at least one key.
        let mut mask = vec![0.0f32; kv_batch * kv_len];
        for bi in 1..kv_batch {
            let keep = 1 + rng.below(kv_len);
            mask[bi * kv_len + keep..(bi + 1) * kv_len].fill(f32::NEG_INFINITY);
        }
        for (use_bias, use_mask) in [(false, false), (true, false), (false, true), (true, true)] {
            let want = reference::attention(
                &q,
                &k,
                &v,
                use_bias.then_some(&bias[..]),
                use_mask.then_some(&mask[..]),
                s,
            );
            let (bt, mt) = (b.upload(&bias).unwrap(), b.upload(&mask).unwrap());
            let mut out = b.zeros(want.len()).unwrap();
            b.attention(
                &b.upload(&q).unwrap(),
                &b.upload(&k).unwrap(),
                &b.upload(&v).unwrap(),
                use_bias.then_some(&bt),
                use_mask.then_some(&mt),
                &mut out,
                s,
            )
            .unwrap();
            let what = format!("attention {s:?} bias={use_bias} mask={use_mask}");
            let got = b.download(&out, want.len()).unwrap();
            assert_close(&what, &got, &want, tol);
            if use_bias {
                // The same bias in longer rows (a decoder's table for every step: each row's
                // last kv_len values are read): the same result, bit for bit.
                let stride = kv_len + 5;
                let mut wide = rng.vec(heads * q_len * stride);
                for (row, src) in wide.chunks_exact_mut(stride).zip(bias.chunks_exact(kv_len)) {
                    row[stride - kv_len..].copy_from_slice(src);
                }
                let mut out = b.zeros(want.len()).unwrap();
                b.attention(
                    &b.upload(&q).unwrap(),
                    &b.upload(&k).unwrap(),
                    &b.upload(&v).unwrap(),
                    Some(&b.upload(&wide).unwrap()),
                    use_mask.then_some(&mt),
                    &mut out,
                    AttnShape {
                        bias: BiasLayout::Rows { stride },
                        ..s
                    },
                )
                .unwrap();
                assert_eq!(
                    b.download(&out, want.len()).unwrap(),
                    got,
                    "{what} bias rows of {stride}"
                );
            }
            if q_len > 1 {
                continue;
            }
            // bf16 caches: the same as the reference on keys/values rounded to bf16.
            let round =
                |x: &[f32]| -> Vec<f32> { x.iter().map(|&v| reference::round_bf16(v)).collect() };
            let s16 = AttnShape {
                kv: KvFormat::Bf16,
                ..s
            };
            let want = reference::attention(
                &q,
                &round(&k),
                &round(&v),
                use_bias.then_some(&bias[..]),
                use_mask.then_some(&mask[..]),
                s,
            );
            let pack = |x: &[f32]| b.compress_kv(&b.upload(x).unwrap(), x.len()).unwrap();
            let mut out = b.zeros(want.len()).unwrap();
            b.attention(
                &b.upload(&q).unwrap(),
                &pack(&k),
                &pack(&v),
                use_bias.then_some(&bt),
                use_mask.then_some(&mt),
                &mut out,
                s16,
            )
            .unwrap();
            assert_close(
                &format!("{what} bf16 k/v"),
                &b.download(&out, want.len()).unwrap(),
                &want,
                tol,
            );
            if !b.int8_kv() || !KvFormat::Int8.fits(d_kv) {
                continue;
            }
            // int8 caches: the reference on keys/values quantized per (position, head) by the
            // documented rule, and the backend's own f32 path on those values (to rounding:
            // AVX-512 walks int8 caches in blocks of keys, summing scores in another order).
            let dequant = |x: &[f32]| -> Vec<f32> {
                x.chunks_exact(d_kv)
                    .flat_map(|head| {
                        let max = head.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
                        let inv = 1.0 / scale;
                        head.iter()
                            .map(move |&v| (v * inv).round_ties_even().clamp(-127.0, 127.0) * scale)
                    })
                    .collect()
            };
            let (kq, vq) = (dequant(&k), dequant(&v));
            let args = (use_bias.then_some(&bias[..]), use_mask.then_some(&mask[..]));
            let want = reference::attention(&q, &kq, &vq, args.0, args.1, s);
            let positions = kv_batch * kv_stride;
            let quant = |x: &[f32]| {
                b.quantize_kv(&b.upload(x).unwrap(), positions, heads, d_kv)
                    .unwrap()
            };
            let run = |k: &B::Tensor, v: &B::Tensor, s: AttnShape| {
                let mut out = b.zeros(want.len()).unwrap();
                let (bias, mask) = (use_bias.then_some(&bt), use_mask.then_some(&mt));
                b.attention(&b.upload(&q).unwrap(), k, v, bias, mask, &mut out, s)
                    .unwrap();
                b.download(&out, want.len()).unwrap()
            };
            let s8 = AttnShape {
                kv: KvFormat::Int8,
                ..s
            };
            let got = run(&quant(&k), &quant(&v), s8);
            assert_close(&format!("{what} int8 k/v"), &got, &want, tol);
            let f32_path = run(&b.upload(&kq).unwrap(), &b.upload(&vq).unwrap(), s);
            assert_close(
                &format!("{what} int8 k/v against f32 on the same values"),
                &got,
                &f32_path,
                tol,
            );
        }
    }
}

/// Odd shapes (the CUDA issue's list): batch 1 and 33, lengths 1, 7 and 513, heads x d_kv
/// of 120 (not a multiple of 128), a cache stride past the length, beams sharing keys.
fn check_odd_shapes<B: Backend>(b: &B, rng: &mut Rng) {
    check_attention_cases(
        b,
        rng,
        &[
            (33, 5, 24, 1, 513, 520, 1),
            (1, 6, 20, 7, 7, 7, 1),
            (33, 3, 40, 1, 7, 9, 1),
            (1, 5, 24, 513, 513, 513, 1),
            (33, 5, 24, 1, 1, 4, 3),
        ],
    );
    for (m, n, k) in [(33, 120, 513), (1, 120, 7), (513, 130, 120)] {
        let d = MatDims { m, n, k };
        let (x, w) = (rng.vec(m * k), rng.vec(n * k));
        let mut out = b.zeros(m * n).unwrap();
        let (xt, wt) = (b.upload(&x).unwrap(), b.upload_linear(&w, n, k).unwrap());
        b.matmul_nt(&xt, &wt, &mut out, d, false).unwrap();
        assert_close(
            &format!("matmul {m}x{n}x{k}"),
            &b.download(&out, m * n).unwrap(),
            &reference::matmul_nt(&x, &w, d),
            1e-5,
        );
    }
    for (rows, d) in [(33, 120), (513, 120), (1, 7)] {
        let x: Vec<f32> = rng.vec(rows * d).iter().map(|v| v * 30.0).collect();
        let w = rng.vec(d);
        let mut out = b.zeros(rows * d).unwrap();
        let (xt, wt) = (b.upload(&x).unwrap(), b.upload(&w).unwrap());
        b.rms_norm(&xt, &wt, &mut out, rows, d, 1e-6).unwrap();
        assert_close(
            &format!("rms_norm {rows}x{d}"),
            &b.download(&out, rows * d).unwrap(),
            &reference::rms_norm(&x, &w, 1e-6),
            F32_TOL,
        );
    }
}

fn check_data_movement<B: Backend>(b: &B, rng: &mut Rng) {
    // retain_rows (in place) and append: rows of 3
    let rows = rng.vec(5 * 3);
    let mut t = b.upload(&rows).unwrap();
    b.retain_rows(&mut t, &[1, 3, 4], 3).unwrap();
    let want: Vec<f32> = [1, 3, 4]
        .iter()
        .flat_map(|&r| rows[r * 3..r * 3 + 3].to_vec())
        .collect();
    assert_eq!(b.download(&t, 9).unwrap(), want);
    assert!(
        b.retain_rows(&mut t, &[1, 0], 3).is_err(),
        "rows must increase"
    );
    let extra = b.upload(&rows[..6]).unwrap();
    b.append(&mut t, 9, &extra, 6).unwrap();
    let mut want2 = want.clone();
    want2.extend_from_slice(&rows[..6]);
    assert_eq!(b.download(&t, 15).unwrap(), want2);
    assert!(
        b.append(&mut t, 99, &extra, 6).is_err(),
        "t shorter than said"
    );
    // embed
    let table = rng.vec(10 * 4);
    let mut out = b.zeros(3 * 4).unwrap();
    b.embed(&[7, 0, 7], &b.upload(&table).unwrap(), &mut out, 4)
        .unwrap();
    let got = b.download(&out, 12).unwrap();
    assert_eq!(&got[..4], &table[28..32]);
    assert_eq!(&got[4..8], &table[..4]);
    assert!(
        b.embed(&[10], &b.upload(&table).unwrap(), &mut out, 4)
            .is_err(),
        "id past the table"
    );
    // write_position then gather_rows (reordering a cache)
    let (batch, stride, width) = (3, 5, 2);
    let mut cache = b.zeros(batch * stride * width).unwrap();
    let src = rng.vec(batch * width);
    b.write_position(
        &b.upload(&src).unwrap(),
        &mut cache,
        batch,
        width,
        stride,
        4,
    )
    .unwrap();
    let c = b.download(&cache, batch * stride * width).unwrap();
    for bi in 0..batch {
        let at = (bi * stride + 4) * width;
        assert_eq!(&c[at..at + width], &src[bi * width..(bi + 1) * width]);
    }
    assert!(b
        .write_position(
            &b.upload(&src).unwrap(),
            &mut cache,
            batch,
            width,
            stride,
            5
        )
        .is_err());
    let g = b.gather_rows(&cache, &[2, 0], stride * width).unwrap();
    let g = b.download(&g, 2 * stride * width).unwrap();
    assert_eq!(&g[..stride * width], &c[2 * stride * width..]);
    assert_eq!(&g[stride * width..], &c[..stride * width]);
    // widen_rows: each row keeps its values and gains zeros
    let w = b
        .widen_rows(&b.upload(&[1.0, 2.0, 3.0, 4.0]).unwrap(), 2, 2, 3)
        .unwrap();
    assert_eq!(
        b.download(&w, 6).unwrap(),
        vec![1.0, 2.0, 0.0, 3.0, 4.0, 0.0]
    );
    assert!(b.widen_rows(&b.upload(&[1.0]).unwrap(), 2, 2, 3).is_err());
    // argmax (first maximum wins) and fill_column
    let mut x = b
        .upload(&[1.0, 5.0, 5.0, 0.0, -1.0, -3.0, -2.0, -1.0])
        .unwrap();
    assert_eq!(b.argmax_rows(&x, 2, 4).unwrap(), vec![1, 0]);
    b.fill_column(&mut x, 2, 4, 1, f32::NEG_INFINITY).unwrap();
    assert_eq!(b.argmax_rows(&x, 2, 4).unwrap(), vec![2, 0]);
    // scale
    let mut s = b.upload(&[2.0, 4.0, 8.0]).unwrap();
    b.scale(&mut s, 2, 0.5).unwrap();
    assert_eq!(b.download(&s, 3).unwrap(), vec![1.0, 2.0, 8.0]);
}

#[test]
fn odd_shapes_match_reference() {
    for b in backends() {
        check_odd_shapes(&b, &mut Rng::new(7));
    }
}

#[test]
fn matmul_matches_reference() {
    for b in backends() {
        check_matmul(&b, &mut Rng::new(1));
    }
}

#[test]
fn rms_norm_matches_reference() {
    for b in backends() {
        check_rms_norm(&b, &mut Rng::new(2));
    }
}

#[test]
fn fused_sublayers_match_reference() {
    for b in backends() {
        check_fused_sublayers(&b, &mut Rng::new(9), 1e-5);
    }
}

#[test]
fn activations_match_reference() {
    for b in backends() {
        check_activations(&b, &mut Rng::new(3));
    }
}

#[test]
fn attention_matches_reference() {
    for b in backends() {
        check_attention(&b, &mut Rng::new(4));
    }
}

#[test]
fn data_movement_is_exact() {
    for b in backends() {
        check_data_movement(&b, &mut Rng::new(5));
    }
}

#[test]
fn undersized_buffers_are_errors_not_panics() {
    let b = CpuBackend::new(1).unwrap();
    let small = b.zeros(3).unwrap();
    let mut out = b.zeros(4).unwrap();
    let d = MatDims { m: 2, n: 2, k: 2 };
    let w = b.upload_linear(&[0.0; 3], 3, 1).unwrap();
    assert!(b.matmul_nt(&small, &w, &mut out, d, false).is_err());
    assert!(b.download(&small, 4).is_err());
    assert!(b.argmax_rows(&small, 2, 2).is_err());
}

/// The default level is the highest the CPU has, except that Intel's `avx512-bf16` gives way
/// to `avx512-vnni` (its `vdpbf16ps` runs at half the FMA's rate); nothing else steps down.
#[test]
fn preferred_level_steps_down_only_for_intel_bf16() {
    use t5rt::IsaLevel;
    for top in IsaLevel::ALL {
        assert_eq!(IsaLevel::preferred_of(top, false), top, "{top}, not Intel");
        let want = if top == IsaLevel::Avx512Bf16 {
            IsaLevel::Avx512Vnni
        } else {
            top
        };
        assert_eq!(IsaLevel::preferred_of(top, true), want, "{top}, Intel");
    }
    let here = IsaLevel::preferred();
    assert!(here.available() && here <= IsaLevel::detect(), "{here}");
    // The vendor check, against what Linux reports.
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        if cfg!(target_arch = "x86_64") {
            let intel = info
                .lines()
                .find(|l| l.starts_with("vendor_id"))
                .is_some_and(|l| l.ends_with("GenuineIntel"));
            assert_eq!(here, IsaLevel::preferred_of(IsaLevel::detect(), intel));
        }
    }
    if std::env::var_os("T5RT_ISA").is_none() {
        assert_eq!(IsaLevel::from_env().unwrap(), here, "the default level");
    }
    // The summary names the CPU's highest level when the backend runs below it.
    let top = IsaLevel::detect();
    for level in IsaLevel::available_levels() {
        let name = CpuBackend::with_isa(1, level).unwrap().name();
        let want = if level < top {
            format!("at level {level} of {top})")
        } else {
            format!("at level {level})")
        };
        assert!(name.ends_with(&want), "{name}: expected to end with {want}");
    }
}

#[test]
fn f32_tiles_agree_bitwise_across_instruction_sets() {
    // The AVX-512 and AVX2 f32 tiles both sum fused multiply-adds in order of k, so where a
    // CPU has both they must agree exactly; the portable tile (multiply, then add) only
    // within rounding, which `matmul_matches_reference` checks.
    use t5rt::IsaLevel;
    if !IsaLevel::Avx512bw.available() {
        common::once("SKIPPED f32 avx512 vs avx2 tiles: this CPU lacks avx512bw".into());
        return;
    }
    let (fast, avx2) = (
        CpuBackend::with_isa(2, IsaLevel::Avx512bw).unwrap(),
        CpuBackend::with_isa(2, IsaLevel::Avx2).unwrap(),
    );
    eprintln!("ran: comparing {} with {}", fast.name(), avx2.name());
    let mut rng = Rng::new(21);
    for (m, n, k) in [(1, 100, 64), (7, 130, 33), (13, 64, 300)] {
        let d = MatDims { m, n, k };
        let (x, w) = (rng.vec(m * k), rng.vec(n * k));
        let run = |b: &CpuBackend| {
            let (xt, wt) = (b.upload(&x).unwrap(), b.upload_linear(&w, n, k).unwrap());
            let mut out = b.zeros(m * n).unwrap();
            b.matmul_nt(&xt, &wt, &mut out, d, false).unwrap();
            b.download(&out, m * n).unwrap()
        };
        assert_eq!(run(&fast), run(&avx2), "{m}x{n}x{k}");
    }
}

/// How a bf16 tile adds a pair of products `x1·w1`, `x0·w0` (exact in f32) to its f32
/// accumulator, measured on values where the orders differ. The weight path's first pair puts
/// 1.0 in the accumulator; the second pair is the probe.
#[derive(Debug, PartialEq)]
enum DotOrder {
    /// `(acc + x1·w1) + x0·w0`, each addition rounded: Intel's manual for `vdpbf16ps`.
    OddFirst,
    /// `(acc + x0·w0) + x1·w1`.
    EvenFirst,
    /// `acc + (x1·w1 + x0·w0)`: the pair summed first (exactly or rounded).
    PairFirst,
    Other(f32, f32),
}

fn measure_dot_order(b: &CpuBackend) -> DotOrder {
    let run = |p1: (f32, f32), p0: (f32, f32)| {
        // k = 4: lanes (x0, x1) = (1, 0) then the probe pair; weights likewise.
        let x = [1.0, 0.0, p0.0, p1.0];
        let w = [1.0, 0.0, p0.1, p1.1];
        let d = MatDims { m: 1, n: 1, k: 4 };
        let (xt, wt) = (b.upload(&x).unwrap(), b.upload_linear(&w, 1, 4).unwrap());
        let mut out = b.zeros(1).unwrap();
        b.matmul_nt(&xt, &wt, &mut out, d, false).unwrap();
        b.download(&out, 1).unwrap()[0]
    };
    let tiny = 2f32.powi(-12); // products of 2^-24: half an ulp of 1.0
                               // a: 1 + 2^-24 + 2^-24. In sequence each addition ties back to 1.0; the pair first
                               // gives 2^-23, which 1.0 keeps: 1 + 2^-23.
    let a = run((tiny, tiny), (tiny, tiny));
    // b: 1 - 1 + 2^-30. Odd first: 0 + 2^-30. Even first: 1 + 2^-30 rounds to 1, minus 1 is 0.
    let small = 2f32.powi(-15);
    let b2 = run((-1.0, 1.0), (small, small));
    match (a, b2) {
        (1.0, v) if v == 2f32.powi(-30) => DotOrder::OddFirst,
        (1.0, 0.0) => DotOrder::EvenFirst,
        (v, _) if v == 1.0 + 2f32.powi(-23) => DotOrder::PairFirst,
        (a, b) => DotOrder::Other(a, b),
    }
}

#[test]
fn bf16_dot_order() {
    use t5rt::{IsaLevel, WeightDtype};
    // The portable tile follows Intel's description of `vdpbf16ps`; the widened tiles of CPUs
    // without it sum in order of k, as the f32 tiles do.
    for level in [IsaLevel::Portable, IsaLevel::Avx2, IsaLevel::Avx512bw] {
        if level.available() {
            let b = CpuBackend::with_isa(1, level)
                .unwrap()
                .with_dtype(WeightDtype::Bf16);
            let want = if level.bf16_rounds_activations() {
                DotOrder::OddFirst
            } else {
                DotOrder::EvenFirst
            };
            assert_eq!(measure_dot_order(&b), want, "{}", b.name());
        }
    }
    // The hardware: measured and reported; either way the tiles stay within the reduced
    // precision tests' bound of the f64 reference (one rounding of a pair more or less).
    if IsaLevel::Avx512Bf16.available() {
        let b = CpuBackend::with_isa(1, IsaLevel::Avx512Bf16)
            .unwrap()
            .with_dtype(WeightDtype::Bf16);
        let order = measure_dot_order(&b);
        common::once(format!("vdpbf16ps on this CPU adds a pair as: {order:?}"));
        assert!(
            matches!(order, DotOrder::OddFirst | DotOrder::PairFirst),
            "vdpbf16ps: {order:?}"
        );
    } else {
        common::once("SKIPPED vdpbf16ps order: this CPU lacks avx512_bf16".into());
    }
}

/// The CUDA backend in each precision (f32, bf16, f16), one at a time; none without a GPU.
#[cfg(feature = "cuda")]
fn cuda_each_precision(
) -> impl Iterator<Item = (t5rt::WeightDtype, t5rt::backend::cuda::CudaBackend)> {
    use t5rt::WeightDtype::{Bf16, F16, F32};
    [F32, Bf16, F16]
        .into_iter()
        .map_while(|dtype| common::cuda_backend(dtype).map(|b| (dtype, b)))
}

/// Whether `gemv` runs at its default 8 columns per block (the chained attention kernels need
/// it).
#[cfg(feature = "cuda")]
fn gemv_warps_default() -> bool {
    std::env::var("T5RT_CUDA_GEMV_WARPS").map_or(true, |v| v == "8")
}

/// The CUDA backend against the same scalar references (skipped, and said so, without a GPU).
#[cfg(feature = "cuda")]
#[test]
fn cuda_kernels_match_reference() {
    let Some(b) = common::cuda_backend(t5rt::WeightDtype::F32) else {
        return;
    };
    check_matmul(&b, &mut Rng::new(1));
    check_rms_norm(&b, &mut Rng::new(2));
    check_activations(&b, &mut Rng::new(3));
    // The encoder's attention (several queries per sequence) in each of its modes (the
    // default first); decoding's one-query attention is the same in all three.
    use t5rt::backend::cuda::EncoderAttention;
    let default = b.encoder_attention();
    for mode in [
        default,
        EncoderAttention::Gemm,
        EncoderAttention::Step,
        EncoderAttention::Block,
    ] {
        common::once(format!("cuda encoder attention: {mode:?}"));
        b.set_encoder_attention(mode);
        check_attention(&b, &mut Rng::new(4));
    }
    b.set_encoder_attention(default);
    // The decoding sublayers' fused norm (and activation) in `gemv`, on and off.
    check_fused_sublayers(&b, &mut Rng::new(9), 1e-5);
    b.set_fused_gemv(false);
    check_fused_sublayers(&b, &mut Rng::new(9), 1e-5);
    b.set_fused_gemv(true);
    check_data_movement(&b, &mut Rng::new(5));
    check_odd_shapes(&b, &mut Rng::new(7));
    // Half-precision products through cuBLAS: both operands rounded, products exact, sums in
    // f32. Through the `gemv` kernel (up to 8 rows, k a multiple of 8, the rows in 48 KB of
    // shared memory): the weights rounded, the activations exact.
    let mut rng = Rng::new(6);
    for dtype in [t5rt::WeightDtype::Bf16, t5rt::WeightDtype::F16] {
        let Some(h) = common::cuda_backend(dtype) else {
            return;
        };
        for (m, n, k) in [
            (1, 1, 1),
            (3, 17, 33),
            (33, 130, 513),
            (1, 1000, 512),
            (2, 3072, 768),
            (1, 768, 3072),
            (8, 300, 1024),
            (9, 40, 64),
            // rows of 48 KB, past gemv's room once its own shared values are counted:
            // cuBLAS (a launch over the limit failed on a GPU)
            (4, 64, 3072),
        ] {
            let d = MatDims { m, n, k };
            let (x, w) = (rng.vec(m * k), rng.vec(n * k));
            let gemv = t5rt::backend::cuda::gemv_fits(d);
            let want = match (dtype, gemv) {
                (t5rt::WeightDtype::Bf16, true) => reference::matmul_nt_bf16_weights(&x, &w, d),
                (t5rt::WeightDtype::Bf16, false) => reference::matmul_nt_bf16(&x, &w, d),
                (_, true) => {
                    let w16: Vec<f32> =
                        w.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
                    reference::matmul_nt(&x, &w16, d)
                }
                (_, false) => reference::matmul_nt_f16(&x, &w, d),
            };
            let (xt, wt) = (h.upload(&x).unwrap(), h.upload_linear(&w, n, k).unwrap());
            let mut out = h.zeros(m * n).unwrap();
            h.matmul_nt(&xt, &wt, &mut out, d, false).unwrap();
            assert_close(
                &format!("cuda {dtype} matmul {m}x{n}x{k}"),
                &h.download(&out, m * n).unwrap(),
                &want,
                1e-5,
            );
        }
    }
    // Products of one input in one `gemv` launch (`set_shared_gemv`, on by default): each
    // output bit for bit what its own launch gives, for two and three products, in every
    // precision; shapes past gemv's limits take cuBLAS, one product at a time, as before.
    for (dtype, h) in cuda_each_precision() {
        for (m, n, k, count) in [
            (1, 768, 768, 3),
            (8, 300, 1024, 2),
            (3, 17, 64, 3),
            (9, 40, 64, 3),
        ] {
            let d = MatDims { m, n, k };
            let x = h.upload(&rng.vec(m * k)).unwrap();
            let ws: Vec<_> = (0..count)
                .map(|_| h.upload_linear(&rng.vec(n * k), n, k).unwrap())
                .collect();
            let separate: Vec<Vec<f32>> = ws
                .iter()
                .map(|w| {
                    let mut out = h.zeros(m * n).unwrap();
                    h.matmul_nt(&x, w, &mut out, d, false).unwrap();
                    h.download(&out, m * n).unwrap()
                })
                .collect();
            h.set_shared_gemv(true);
            let mut outs: Vec<_> = (0..count).map(|_| h.zeros(m * n).unwrap()).collect();
            let refs: Vec<&_> = ws.iter().collect();
            let mut muts: Vec<&mut _> = outs.iter_mut().collect();
            h.matmul_nt_shared(&x, &refs, &mut muts, d).unwrap();
            for (i, out) in outs.iter().enumerate() {
                assert_eq!(
                    h.download(out, m * n).unwrap(),
                    separate[i],
                    "cuda {dtype} shared gemv {m}x{n}x{k}, product {i} of {count}"
                );
            }
        }
    }
    // A half-precision head is not an embedding table: the loader keeps an f32 table beside
    // a tied bf16/f16 head (reading the head's rounded rows was measured on an H200 in
    // session 20: 94 MiB less for t5-base, but slower and less accurate; removed).
    for dtype in [t5rt::WeightDtype::Bf16, t5rt::WeightDtype::F16] {
        let Some(h) = common::cuda_backend(dtype) else {
            return;
        };
        let (n, k) = (50, 24);
        let w = h.upload_linear(&rng.vec(n * k), n, k).unwrap();
        let mut out = h.zeros(k).unwrap();
        assert!(h.embed_linear(&[3], &w, &mut out, k).is_err(), "{dtype}");
    }
    // A sublayer's attention and output projection in one `attention_o` launch
    // (`set_chain`, off by default until this has passed on a GPU): the attention output and
    // the residual bit for bit what `attention_step` then `gemv` give, in every precision;
    // self-attention (position bias, f32 cache longer than the keys read) and
    // cross-attention (padding mask, f32 and bf16 keys/values), 1 to 8 rows.
    for (dtype, h) in cuda_each_precision() {
        // (the last case: 1548 blocks, more than an H100/H200 holds at once)
        for (batch, heads, d_kv, kv_len, cross, kv, d_model) in [
            (1, 12, 64, 7, false, KvFormat::F32, 768),
            (3, 8, 64, 40, false, KvFormat::F32, 576),
            (1, 12, 64, 512, true, KvFormat::F32, 768),
            (4, 8, 64, 33, true, KvFormat::Bf16, 576),
            (8, 6, 64, 128, true, KvFormat::Bf16, 448),
            (2, 4, 32, 5, true, KvFormat::F32, 192),
            (1, 12, 64, 9, false, KvFormat::F32, 12288),
        ] {
            let inner = heads * d_kv;
            let stride = if cross { kv_len } else { kv_len + 9 };
            let shape = AttnShape {
                batch,
                heads,
                d_kv,
                q_len: 1,
                kv_len,
                kv_stride: stride,
                kv_group: 1,
                bias: BiasLayout::Rows { stride: kv_len + 3 },
                kv: KvFormat::F32,
            };
            let kv_vals = batch * stride * inner;
            let (mut k, mut v) = (
                h.upload(&rng.vec(kv_vals)).unwrap(),
                h.upload(&rng.vec(kv_vals)).unwrap(),
            );
            if kv == KvFormat::Bf16 {
                k = h.compress_kv(&k, kv_vals).unwrap();
                v = h.compress_kv(&v, kv_vals).unwrap();
            }
            let shape = AttnShape { kv, ..shape };
            let q = h.upload(&rng.vec(batch * inner)).unwrap();
            let bias = (!cross).then(|| h.upload(&rng.vec(heads * (kv_len + 3))).unwrap());
            let mask = cross.then(|| {
                let mut m = vec![0.0f32; batch * kv_len];
                // the last row's final keys are padding
                for j in kv_len - kv_len / 3..kv_len {
                    m[(batch - 1) * kv_len + j] = f32::NEG_INFINITY;
                }
                h.upload(&m).unwrap()
            });
            let o = h
                .upload_linear(&rng.vec(d_model * inner), d_model, inner)
                .unwrap();
            let x0 = rng.vec(batch * d_model);
            let d = MatDims {
                m: batch,
                n: d_model,
                k: inner,
            };
            let run = |chain: bool| {
                h.set_chain(chain);
                let mut attn = h.zeros(batch * inner).unwrap();
                let mut x = h.upload(&x0).unwrap();
                let call = t5rt::backend::AttnCall {
                    q: &q,
                    k: &k,
                    v: &v,
                    bias: bias.as_ref(),
                    mask: mask.as_ref(),
                    shape,
                    step: !cross,
                };
                h.attention_out(call, &mut attn, &o, &mut x, d).unwrap();
                h.set_chain(false);
                (
                    h.download(&attn, batch * inner).unwrap(),
                    h.download(&x, batch * d_model).unwrap(),
                )
            };
            let apart = run(false);
            let launches = h.chained_launches();
            let chained = run(true);
            let what = format!(
                "cuda {dtype} attention_o {batch}x{heads}x{d_kv}, {kv_len} keys {kv:?}, {d_model} outputs"
            );
            // (gemv at other than 8 columns per block does not chain)
            if gemv_warps_default() {
                assert_eq!(
                    h.chained_launches()[0],
                    launches[0] + 1,
                    "{what}: not chained"
                );
            }
            assert_eq!(chained.0, apart.0, "{what}: attention");
            assert_eq!(chained.1, apart.1, "{what}: residual");
            // twice in a row: the counters are back to zero after a launch
            assert_eq!(run(true), apart, "{what}: second launch");
        }
    }
    // A whole attention sublayer in one `gemv_attention_o` launch (`set_chain`): the norm and
    // input product(s) (self-attention: q, k and v, this position's keys and values written
    // into the caches), the attention, the output product: q, the caches, the attention
    // output and the residual bit for bit what the separate launches give.
    for (dtype, h) in cuda_each_precision() {
        // (a self-attention row that joined later masks its first positions; the 8192-wide
        // case has 1324 blocks, more than an H100/H200 holds at once)
        for (batch, heads, d_kv, d_model, pos, cross, kv) in [
            (1, 12, 64, 768, 0, false, KvFormat::F32),
            (1, 12, 64, 8192, 3, false, KvFormat::F32),
            (1, 12, 64, 768, 13, false, KvFormat::F32),
            (3, 8, 64, 512, 30, false, KvFormat::F32),
            (8, 6, 64, 512, 5, false, KvFormat::F32),
            (1, 12, 64, 768, 511, true, KvFormat::F32),
            (4, 8, 64, 512, 40, true, KvFormat::Bf16),
        ] {
            let inner = heads * d_kv;
            // self: the cache holds `capacity` positions, this step writes `pos`; cross: the
            // encoder's pos + 1 keys
            let (kv_len, capacity) = (pos + 1, if cross { pos + 1 } else { pos + 7 });
            let shape = AttnShape {
                batch,
                heads,
                d_kv,
                q_len: 1,
                kv_len,
                kv_stride: capacity,
                kv_group: 1,
                bias: BiasLayout::Rows { stride: capacity },
                kv,
            };
            let x0 = rng.vec(batch * d_model);
            let norm = h.upload(&rng.vec(d_model)).unwrap();
            let ws: Vec<_> = (0..3)
                .map(|_| {
                    h.upload_linear(&rng.vec(inner * d_model), inner, d_model)
                        .unwrap()
                })
                .collect();
            let o = h
                .upload_linear(&rng.vec(d_model * inner), d_model, inner)
                .unwrap();
            let cache_vals = batch * capacity * inner;
            let (k0, v0) = (rng.vec(cache_vals), rng.vec(cache_vals));
            let bias = h.upload(&rng.vec(heads * capacity)).unwrap();
            let mut m = vec![0.0f32; batch * kv_len];
            for j in 0..kv_len / 4 {
                // cross: the last row's final keys are padding; self: its first positions
                // came before it joined
                let j = if cross { kv_len - 1 - j } else { j };
                m[(batch - 1) * kv_len + j] = f32::NEG_INFINITY;
            }
            let mask = h.upload(&m).unwrap();
            let proj = MatDims {
                m: batch,
                n: inner,
                k: d_model,
            };
            let out_proj = MatDims {
                m: batch,
                n: d_model,
                k: inner,
            };
            let run = |chain: bool| {
                h.set_chain(chain);
                let mut x = h.upload(&x0).unwrap();
                let mut normed = h.zeros(batch * d_model).unwrap();
                let mut attn = h.zeros(batch * inner).unwrap();
                let mut qkv: Vec<_> = (0..3).map(|_| h.zeros(batch * inner).unwrap()).collect();
                let (mut kc, mut vc) = (h.upload(&k0).unwrap(), h.upload(&v0).unwrap());
                if kv == KvFormat::Bf16 {
                    kc = h.compress_kv(&kc, cache_vals).unwrap();
                    vc = h.compress_kv(&vc, cache_vals).unwrap();
                }
                if cross {
                    let call = t5rt::backend::CrossAttnCall {
                        norm: &norm,
                        eps: 1e-6,
                        wq: &ws[0],
                        o: &o,
                        k: &kc,
                        v: &vc,
                        mask: Some(&mask),
                        shape,
                        proj,
                        out_proj,
                    };
                    h.cross_attention_out(call, &mut x, &mut normed, &mut qkv[0], &mut attn)
                        .unwrap();
                } else {
                    let call = t5rt::backend::SelfAttnCall {
                        norm: &norm,
                        eps: 1e-6,
                        ws: [&ws[0], &ws[1], &ws[2]],
                        o: &o,
                        bias: Some(&bias),
                        mask: (batch > 1).then_some(&mask),
                        shape,
                        proj,
                        out_proj,
                    };
                    let cache = t5rt::backend::CacheWrite {
                        k_cache: &mut kc,
                        v_cache: &mut vc,
                        capacity,
                        pos,
                        kv: KvFormat::F32,
                    };
                    let [q, k, v] = &mut qkv[..] else {
                        unreachable!()
                    };
                    h.self_attention_out(call, &mut x, &mut normed, [q, k, v], cache, &mut attn)
                        .unwrap();
                }
                h.set_chain(false);
                let slots = if kv == KvFormat::Bf16 {
                    cache_vals / 2
                } else {
                    cache_vals
                };
                [
                    h.download(&x, batch * d_model).unwrap(),
                    h.download(&attn, batch * inner).unwrap(),
                    h.download(&qkv[0], batch * inner).unwrap(),
                    h.download(&kc, slots).unwrap(),
                    h.download(&vc, slots).unwrap(),
                ]
            };
            let apart = run(false);
            let launches = h.chained_launches();
            let chained = run(true);
            let what = format!(
                "cuda {dtype} gemv_attention_o {} {batch}x{heads}x{d_kv}, position {pos} {kv:?}",
                if cross { "cross" } else { "self" }
            );
            if gemv_warps_default() {
                assert_eq!(
                    h.chained_launches()[2],
                    launches[2] + 1,
                    "{what}: not chained"
                );
            }
            for (i, part) in ["residual", "attention", "q", "k cache", "v cache"]
                .iter()
                .enumerate()
            {
                assert_eq!(chained[i], apart[i], "{what}: {part}");
            }
            assert_eq!(run(true), apart, "{what}: second launch");
        }
    }
    // A feed-forward sublayer's two products in one `gemv_gemv` launch (`set_chain`, off by
    // default until this has passed on a GPU): the residual bit for bit what the fused
    // input product then the output product give, gated and not, 1 to 8 rows.
    for (dtype, h) in cuda_each_precision() {
        // (the last case: 1056 blocks of 32 KB of shared memory, more than a GPU holds at once)
        for (m, d, d_ff, gated) in [
            (1, 768, 3072, true),
            (3, 768, 3072, false),
            (2, 512, 1024, true),
            (8, 64, 128, false),
            (1, 256, 8192, false),
        ] {
            let x0 = rng.vec(m * d);
            let norm = h.upload(&rng.vec(d)).unwrap();
            let ws: Vec<_> = (0..if gated { 2 } else { 1 })
                .map(|_| h.upload_linear(&rng.vec(d_ff * d), d_ff, d).unwrap())
                .collect();
            let wo = h.upload_output_linear(&rng.vec(d * d_ff), d, d_ff).unwrap();
            let refs: Vec<&_> = ws.iter().collect();
            let run = |chain: bool| {
                h.set_chain(chain);
                let mut x = h.upload(&x0).unwrap();
                let mut normed = h.zeros(m * d).unwrap();
                let (mut ff, mut ff_up) = (h.zeros(m * d_ff).unwrap(), h.zeros(m * d_ff).unwrap());
                let call = t5rt::backend::FfnCall {
                    norm: &norm,
                    eps: 1e-6,
                    ws: &refs,
                    act: if gated {
                        Activation::GeluNew
                    } else {
                        Activation::Relu
                    },
                    wo: &wo,
                    up: MatDims { m, n: d_ff, k: d },
                    down: MatDims { m, n: d, k: d_ff },
                };
                h.ffn_out(call, &mut x, &mut normed, &mut ff, &mut ff_up)
                    .unwrap();
                h.set_chain(false);
                h.download(&x, m * d).unwrap()
            };
            let apart = run(false);
            let what = format!("cuda {dtype} gemv_gemv {m}x{d}x{d_ff}, gated {gated}");
            let launches = h.chained_launches();
            assert_eq!(run(true), apart, "{what}");
            assert_eq!(
                h.chained_launches()[1],
                launches[1] + 1,
                "{what}: not chained"
            );
            assert_eq!(run(true), apart, "{what}: second launch");
        }
    }
    // Half-precision weights: the fused norm and feed-forward products against the same
    // operations launched one by one (the same rounded weights; only the norm's sums differ).
    for dtype in [t5rt::WeightDtype::Bf16, t5rt::WeightDtype::F16] {
        let Some(h) = common::cuda_backend(dtype) else {
            return;
        };
        for (m, n, k) in [(1, 768, 768), (4, 3072, 768), (8, 64, 96)] {
            let d = MatDims { m, n, k };
            let x = h.upload(&rng.vec(m * k)).unwrap();
            let norm = h.upload(&rng.vec(k)).unwrap();
            let ws: Vec<_> = (0..2)
                .map(|_| h.upload_linear(&rng.vec(n * k), n, k).unwrap())
                .collect();
            let refs: Vec<&_> = ws.iter().collect();
            let run = |fused: bool| {
                h.set_fused_gemv(fused);
                let mut scratch = h.zeros(m * k).unwrap();
                let (mut ff, mut ff_up) = (h.zeros(m * n).unwrap(), h.zeros(m * n).unwrap());
                h.norm_ffn_up(
                    &x,
                    &norm,
                    1e-6,
                    &mut scratch,
                    &refs,
                    &mut ff,
                    &mut ff_up,
                    Activation::GeluNew,
                    d,
                )
                .unwrap();
                let mut q = h.zeros(m * n).unwrap();
                h.norm_matmul_shared(&x, &norm, 1e-6, &mut scratch, &refs[..1], &mut [&mut q], d)
                    .unwrap();
                h.set_fused_gemv(true);
                [
                    h.download(&ff, m * n).unwrap(),
                    h.download(&q, m * n).unwrap(),
                ]
            };
            let (fused, apart) = (run(true), run(false));
            for (i, what) in ["gated feed-forward up", "norm + product"]
                .iter()
                .enumerate()
            {
                assert_close(
                    &format!("cuda {dtype} fused {what} {m}x{n}x{k}"),
                    &fused[i],
                    &apart[i],
                    1e-5,
                );
            }
        }
    }
}
