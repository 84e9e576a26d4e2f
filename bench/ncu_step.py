#!/usr/bin/env python3
"""Per-kernel GPU time of one decoding step from scripts/gpu-ncu.sh's Nsight Compute CSV.

The last step of the run: the launches after the second-to-last `argmax_rows` up to the last
one. Prints each (kernel, grid, block) with its launches, total and mean duration.

    python3 bench/ncu_step.py bench/results/gpu-h200-2026-11-27-s10/call3/ncu-bf16-1x32x8.csv.gz
"""
import csv
import gzip
import io
import sys
from collections import defaultdict


def main(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        lines = f.read().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))[1:]  # row 0: units
    ends = [i for i, r in enumerate(rows) if r["Kernel Name"].startswith("argmax")]
    step = rows[ends[-2] + 1:ends[-1] + 1]
    agg = defaultdict(lambda: [0, 0.0])
    for r in step:
        key = (r["Kernel Name"][:40], r["Grid Size"], r["Block Size"])
        agg[key][0] += 1
        agg[key][1] += float(r["gpu__time_duration.sum"].replace(",", ""))
    total = sum(v[1] for v in agg.values())
    print(f"{path}: {len(step)} launches in the last step, {total / 1000:.1f} us of kernel time")
    print(f"{'total us':>9} {'launches':>8} {'mean us':>8}  kernel, grid, block")
    for (name, grid, block), (n, t) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        print(f"{t / 1000:9.1f} {n:8d} {t / n / 1000:8.2f}  {name} {grid} {block}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        main(p)
