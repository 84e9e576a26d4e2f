#!/usr/bin/env python3
"""The Python package's overhead against the CLI, and Ray Data throughput with 1 and 2 actors.

    scripts/test.sh   (or: python3 -m venv .venv-py && .venv-py/bin/pip install ./crates/t5rt-py "ray[data]" numpy)
    .venv-py/bin/python bench/python_api.py

1. Overhead: `t5rt bench` (the CLI) and `Model.generate` time the same input ids (batch 16,
   EOS suppressed with min_new_tokens = max_new_tokens), on the bundled model and on
   t5-small-sized random weights (bench/models/t5-small/hf, made by bench/run_peers.py or
   bench/load.py); tokens/s, median of the timed runs, each after one warm-up.
2. Ray: examples/ray_batch.py over 1024 rows on the bundled model, with 1 actor x 2 threads and
   2 actors x 1 thread (this machine has 2 cores); rows/s including Ray's start.

Writes bench/results/python_api.json and a section of bench/RESULTS.md.
"""

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import t5rt

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "target" / "release" / "t5rt"
BATCH, REPEATS = 16, 15


def ids_for(vocab, length, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(2, vocab, size=(BATCH, length)).tolist()


def cli_tokens_per_s(model_dir, ids, new):
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "ids.jsonl"
        inp.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in ids))
        out = Path(tmp) / "out.json"
        cmd = [str(CLI), "bench", "--threads", "2", "--case", f"{BATCH}:{len(ids[0])}:{new}",
               "--inputs", str(inp), "--repeats", str(REPEATS), "--warmup", "1", "--json", str(out)]
        if model_dir:
            cmd += ["--model", str(model_dir)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["cases"][0]["tokens_per_s"]["median"]


def python_tokens_per_s(model, ids, new):
    runs = []
    for i in range(1 + REPEATS):
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, batch_size=BATCH)
        dt = time.perf_counter() - t0
        assert all(len(o) == new for o in out)
        if i > 0:
            runs.append(BATCH * new / dt)
    return statistics.median(runs)


def ray_rows_per_s(actors, threads, rows=1024):
    sys.path.insert(0, str(ROOT / "examples"))
    import ray
    import ray_batch

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        src.write_text("".join(json.dumps({"id": i, "text": f"spell: {i * 7919 % 1000003}"}) + "\n"
                               for i in range(rows)))
        t0 = time.perf_counter()
        # One logical CPU per actor thread, and one for Ray Data's read/write tasks.
        ray.init(num_cpus=actors * threads + 1, include_dashboard=False, log_to_driver=False)
        try:
            ray_batch.run(src, Path(tmp) / "out", actors=actors, threads=threads, batch_size=64)
        finally:
            ray.shutdown()
        return rows / (time.perf_counter() - t0)


def main():
    res = {"date": datetime.date.today().isoformat(),
           "cpu": next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
           "overhead": [], "ray": []}
    cases = [("bundled spell-numbers", None, 104, 24, 24)]
    t5_small = ROOT / "bench" / "models" / "t5-small" / "hf"
    if (t5_small / "model.safetensors").is_file():
        cases.append(("t5-small (random weights)", t5_small, 32128, 64, 32))
    for name, path, vocab, length, new in cases:
        ids = ids_for(vocab, length)
        model = t5rt.Model(str(path) if path else None, threads=2)
        py = python_tokens_per_s(model, ids, new)
        cli = cli_tokens_per_s(path, ids, new)
        row = {"model": name, "batch": BATCH, "input": length, "new": new,
               "cli_tokens_per_s": cli, "python_tokens_per_s": py, "python_over_cli": py / cli}
        print(json.dumps(row), flush=True)
        res["overhead"].append(row)
        del model
    for actors, threads in [(1, 2), (2, 1)]:
        row = {"actors": actors, "threads_per_actor": threads, "rows_per_s": ray_rows_per_s(actors, threads)}
        print(json.dumps(row), flush=True)
        res["ray"].append(row)
    (ROOT / "bench" / "results" / "python_api.json").write_text(json.dumps(res, indent=1) + "\n")
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text()
    marker = "## Python API and Ray"
    before, _, after = text.partition(marker)
    rest = after.split("\n## ", 1)
    tail = ("\n## " + rest[1]) if len(rest) > 1 else ""
    lines = [marker, "", f"Made by `bench/python_api.py` on {res['date']}: {res['cpu']}, 2 threads.", "",
             "| model | batch x input, new | CLI tokens/s | Python tokens/s | Python / CLI |", "|---|---|---|---|---|"]
    for r in res["overhead"]:
        lines.append(f"| {r['model']} | {r['batch']} x {r['input']}, {r['new']} | {r['cli_tokens_per_s']:.0f} | "
                     f"{r['python_tokens_per_s']:.0f} | {r['python_over_cli']:.3f} |")
    lines += ["", "Ray Data (`examples/ray_batch.py`, 1024 rows of the bundled model, Ray's start included):", "",
              "| actors x threads | rows/s |", "|---|---|"]
    for r in res["ray"]:
        lines.append(f"| {r['actors']} x {r['threads_per_actor']} | {r['rows_per_s']:.0f} |")
    path.write_text(before.rstrip() + "\n\n" + "\n".join(lines) + "\n" + tail)


if __name__ == "__main__":
    main()
