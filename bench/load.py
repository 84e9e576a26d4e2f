#!/usr/bin/env python3
"""Load benchmark of `t5rt serve`: Poisson arrivals at several rates, mixed input lengths
(16-512 tokens) and output lengths (8-128 tokens, forced with min_new_tokens so that both
modes do the same work), against the same server with continuous batching and with
`--batching static` (a batch is admitted only when the previous one is done, as padded-batch
servers do). Reports throughput, p50 / p99 time to first token and end-to-end latency.

    bench/setup.sh && cargo build --release -j2
    .venv-bench/bin/python bench/load.py [--rates 0.5,1,2,4,8] [--requests 48]

The model is t5-small-sized with random weights (bench/models/t5-small/hf, made as
bench/run_peers.py makes it; needs torch the first time). Stdlib HTTP client, one thread per
request, streaming route (`/generate_stream`), so time to first token is measured at the
first SSE event. Results: bench/results/load.json and a table in bench/RESULTS.md.
"""

import argparse
import datetime
import json
import http.client
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

SEED = 0
THREADS = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary, model_dir, batching, port, max_batch_size):
    cmd = [binary, "serve", "--model", str(model_dir), "--port", str(port), "--threads",
           str(THREADS), "--batching", batching, "--max-new-tokens", "128",
           "--max-input-tokens", "600", "--max-batch-size", str(max_batch_size),
           "--max-concurrent-requests", "1000", "--max-waiting-requests", "1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"t5rt serve did not start: {' '.join(cmd)}")


def workload(n, rate, seed):
    """n requests: (arrival offset s, input words, new tokens), Poisson arrivals at `rate`/s."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        length = rng.randint(16, 512)
        new = rng.randint(8, 128)
        words = " ".join(f"t{rng.randint(3, 32127)}" for _ in range(length))
        out.append((t, words, new))
    return out


def one_request(port, words, new, result):
    body = json.dumps({"inputs": words,
                       "parameters": {"max_new_tokens": new, "min_new_tokens": new}})
    start = time.perf_counter()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        c.request("POST", "/generate_stream", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            result.update(error=f"HTTP {r.status}")
            return
        first, tokens = None, 0
        for line in r:
            if line.startswith(b"data:"):
                if first is None:
                    first = time.perf_counter() - start
                event = json.loads(line[5:])
                if "error" in event:
                    result.update(error=event["error"])
                    return
                tokens += 1
        result.update(ttft=first, e2e=time.perf_counter() - start, tokens=tokens)
    except OSError as e:
        result.update(error=str(e))


def run_rate(port, rate, n, seed):
    load = workload(n, rate, seed)
    results = [dict() for _ in load]
    threads = []
    t0 = time.perf_counter()
    for (offset, words, new), res in zip(load, results):
        delay = offset - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one_request, args=(port, words, new, res))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "e2e" in r]
    errors = [r["error"] for r in results if "error" in r]

    def pct(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else None

    return {
        "rate": rate, "requests": n, "completed": len(ok), "errors": errors[:5],
        "wall_s": wall,
        "throughput_req_s": len(ok) / wall,
        "throughput_tok_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50_s": pct([r["ttft"] for r in ok], 50), "ttft_p99_s": pct([r["ttft"] for r in ok], 99),
        "e2e_p50_s": pct([r["e2e"] for r in ok], 50), "e2e_p99_s": pct([r["e2e"] for r in ok], 99),
    }


def machine():
    info = open("/proc/cpuinfo").read()
    cpu = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
    flags = next((l for l in info.splitlines() if l.startswith("flags")), "").split()
    simd = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16") if f in flags]
    return f"{cpu} ({' '.join(simd)}), {os.cpu_count()} cores"


def write_markdown(res):
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    marker = "## Serving under load"
    before, _, after = text.partition(marker)
    rest = after.split("\n## ", 1)
    tail = ("\n## " + rest[1]) if len(rest) > 1 else ""
    text = before.rstrip() + "\n\n"
    lines = [marker, "",
             f"Made by `bench/load.py` on {res['date']}: {res['machine']}; t5rt at commit "
             f"{res['commit']}, `t5rt serve --threads {THREADS} --max-batch-size "
             f"{res['max_batch_size']}` on t5-small-sized random weights (f32). Poisson arrivals, "
             f"{res['requests']} requests per rate, inputs of 16-512 tokens and outputs of 8-128 "
             "(forced), streamed; time to first token (TTFT) at the first SSE event, end-to-end "
             "latency (E2E) at the last. Throughput is completed requests (and generated tokens) "
             "over the wall time from the first arrival to the last answer.", "",
             "| arrivals/s | batching | req/s | tokens/s | TTFT p50 | TTFT p99 | E2E p50 | E2E p99 | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in res["runs"]:
        lines.append(
            f"| {row['rate']} | {row['batching']} | {row['throughput_req_s']:.2f} | "
            f"{row['throughput_tok_s']:.0f} | {row['ttft_p50_s']:.2f} s | {row['ttft_p99_s']:.2f} s | "
            f"{row['e2e_p50_s']:.2f} s | {row['e2e_p99_s']:.2f} s | {len(row['errors'])} |")
    lines.append("")
    path.write_text(text + "\n".join(lines) + "\n" + tail)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0.5,1,2,4")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--t5rt", default=str(ROOT / "target" / "release" / "t5rt"))
    args = ap.parse_args()
    model_dir = ROOT / "bench" / "models" / "t5-small"
    if not (model_dir / "hf" / "model.safetensors").is_file():
        from run_peers import prepare_hf
        prepare_hf("t5-small", model_dir)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    runs = []
    for rate in [float(r) for r in args.rates.split(",")]:
        for batching in ("continuous", "static"):
            port = free_port()
            proc = start_server(args.t5rt, model_dir / "hf", batching, port, args.max_batch_size)
            try:
                row = run_rate(port, rate, args.requests, SEED)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            row["batching"] = batching
            print(json.dumps(row), flush=True)
            runs.append(row)
    res = {"date": datetime.date.today().isoformat(), "machine": machine(), "commit": commit,
           "requests": args.requests, "max_batch_size": args.max_batch_size, "runs": runs}
    out = ROOT / "bench" / "results" / "load.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res)


if __name__ == "__main__":
    main()
