#!/usr/bin/env python3
"""The machine's limits next to the results: memory read bandwidth, f32 matmul peak, and the
resulting floor for one batch-1 decoding step of each benchmark model (weights read per step
divided by bandwidth).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python bench/machine_limits.py

(OPENBLAS_CORETYPE is set on some machines here for old OpenBLAS builds; it slows a current
numpy, so the measurement unsets it for this command only.)
"""

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

THREADS = 2
MODELS = {  # d_model, d_ff, decoder layers, vocab, gated
    "t5-small": (512, 2048, 6, 32128, False),
    "t5-base": (768, 3072, 12, 32128, False),
    "flan-t5-small": (512, 1024, 8, 32128, True),
}


PROBE_SRC = Path(__file__).resolve().parent / "probe" / "bandwidth.rs"


def probe_binary():
    """bench/probe/bandwidth.rs, built with the Rust toolchain that builds t5rt (numpy's sum
    is not a bandwidth test: it is compute-bound near 22 GB/s per core here)."""
    out = Path(__file__).resolve().parent / "probe" / "target" / "bandwidth"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["rustc", "-O", "-C", "target-cpu=native", str(PROBE_SRC), "-o", str(out)],
                   check=True)
    return out


def bandwidth_gbs(threads, probe, size=1 << 30, trials=9, passes=10):
    """Read bandwidth of summing `size` bytes of f32 split over `threads` threads: the best
    pass of each of `trials` runs, a few seconds apart. This VM's figure moves a lot from one
    moment to the next (other tenants share its memory), so both the median and the best run
    are kept."""
    runs = []
    for _ in range(trials):
        out = subprocess.run([str(probe), str(size), str(threads), str(passes)], check=True,
                             capture_output=True, text=True).stdout
        runs.append(float(out.split()[0]))
        time.sleep(2)
    runs.sort()
    return {"median": round(runs[len(runs) // 2], 1), "best": round(runs[-1], 1),
            "worst": round(runs[0], 1)}


def matmul_gflops():
    n = 2048
    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)
    a @ b
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def decoder_bytes_per_step(d, ff, layers, vocab, gated):
    """f32 weights a batch-1 step reads: self q,k,v,o + cross q,o (cross k,v are cached per
    request) + FFN per layer, and the LM head."""
    ffn = (3 if gated else 2) * d * ff
    per_layer = 6 * d * d + ffn
    return 4 * (layers * per_layer + vocab * d)


def main():
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    probe = probe_binary()
    bw1, bw2 = bandwidth_gbs(1, probe), bandwidth_gbs(THREADS, probe)
    peak = matmul_gflops()
    floors = {}
    for name, spec in MODELS.items():
        b = decoder_bytes_per_step(*spec)
        floors[name] = {"weight_mib_per_step": round(b / 2**20, 1),
                        "floor_ms_per_step": round(b / (bw2["median"] * 1e9) * 1e3, 2),
                        "floor_ms_per_step_best_bw": round(b / (bw2["best"] * 1e9) * 1e3, 2)}
    out = {"read_bandwidth_gbs": {"1_thread": bw1, f"{THREADS}_threads": bw2},
           "f32_matmul_gflops_numpy": round(peak, 1), "batch1_decode_floor": floors}
    print(json.dumps(out, indent=1))
    path = Path(__file__).resolve().parent / "results" / "machine_limits.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
