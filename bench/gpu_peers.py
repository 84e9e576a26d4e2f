#!/usr/bin/env python3
"""GPU peer benchmark (issue 9): t5rt --device cuda against Hugging Face transformers on the
GPU, on the same random-init weights, in one run on one card.

Built for the GPU machine, which has PyTorch and transformers but no network and no Rust:
the script makes the weights itself from the configurations (seeded, re-initialised as
tools/make_fixtures.py does, saved as safetensors), and runs the t5rt binary carried there
(gpu/t5rt, from scripts/build-gpu-bundle.sh).

Systems: Hugging Face in fp32, fp16 and bf16 (use_cache=True; SDPA attention where the model
supports it, eager otherwise), and t5rt in f32, bf16 and f16. Cases: a-d as on the CPU
(1x32, 1x512, 8x128, 32x128 input tokens; 32 or 64 new), plus the seed's t5-base cases: 512
input tokens at batch 1, 4, 15 and 32 (64 new). EOS is suppressed (min = max new tokens), so
every system decodes the same number of steps. Reported per case: tokens/s, time per decoding
step, encoder time, peak GPU memory (HF: torch's allocator; t5rt: the CUDA memory pool's
high-water mark, both with the weights), and the
share of sequences whose greedy ids equal HF fp32's.

    python3 bench/gpu_peers.py --out $OUT              # on the GPU machine
    python3 bench/gpu_peers.py --dry-run --out /tmp/x  # here: tiny model, CPU, plumbing only

`--dry-run` runs everything on the CPU with a tiny configuration and two small cases, so that
the script itself is tested without a GPU; its timings mean nothing.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

sys.path.insert(0, str(ROOT / "bench"))
from run_peers import CASES as CPU_CASES, MODELS, save_random_model, synthetic_inputs  # noqa: E402

# The CPU harness's models, plus a tiny one for --dry-run.
CONFIGS = MODELS | {
    "tiny": dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                 num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False),
}
# Cases a-d as on the CPU, and the seed's t5-base cases (512 input tokens).
CASES = CPU_CASES | {f"seed-{b}": (b, 512, 64) for b in (1, 4, 15, 32)}
PLAN = {"t5-small": ["a", "b", "c", "d"], "flan-t5-small": ["a", "b", "c", "d"],
        "t5-base": ["a", "b", "c", "d", "seed-1", "seed-4", "seed-15", "seed-32"]}
DRY_PLAN = {"tiny": ["a", "c"]}
HF_DTYPES = ["fp32", "fp16", "bf16"]
T5RT_DTYPES = ["f32", "bf16", "f16"]
# One `t5rt bench` call (one case, load and warm-up included) that runs longer has failed.
T5RT_TIMEOUT = 120


inputs = synthetic_inputs  # the CPU harness's seeded ids


def make_model(name, out):
    """The seeded random-init checkpoint of `name` under `out` (made once)."""
    if not (out / "model.safetensors").is_file():
        save_random_model(CONFIGS[name], out)


def hf_run(model_dir, dtype, cases, device, repeats):
    import torch
    from transformers import T5ForConditionalGeneration
    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    try:
        model = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=tdtype, attn_implementation="sdpa")
        attn = "sdpa"
    except (ValueError, ImportError):
        model = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=tdtype)
        attn = "eager"
    model = model.to(device).eval()
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res = {}
    for case, (batch, length, new) in cases.items():
        ids = torch.tensor(inputs(batch, length, model.config.vocab_size), device=device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, enc_times = [], []
        with torch.no_grad():
            for run in range(1 + repeats):  # one warm-up
                sync()
                t0 = time.perf_counter()
                model.encoder(input_ids=ids)
                sync()
                t1 = time.perf_counter()
                out = model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, num_beams=1, use_cache=True)
                sync()
                t2 = time.perf_counter()
                if run:
                    enc_times.append(t1 - t0)
                    times.append(t2 - t1)
        times.sort()
        enc_times.sort()
        total, enc = times[len(times) // 2], enc_times[len(enc_times) // 2]
        res[case] = {"tokens_per_s": batch * new / total, "total_s": total, "encode_s": enc,
                     "step_ms": 1000 * max(total - enc, 0.0) / new,
                     "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                     "ids": [r[1:] for r in out.tolist()], "attention": attn}
    del model
    if cuda:
        torch.cuda.empty_cache()
    return res


def t5rt_run(binary, model_dir, dtype, cases, device, repeats, work, variant=None):
    """t5rt on each case; `variant` = (name, {VAR: value}): the same run with those
    environment variables set (its files named after it)."""
    res = {}
    env = dict(os.environ, **(variant[1] if variant else {}))
    tag = f"-{variant[0]}" if variant else ""
    for case, (batch, length, new) in cases.items():
        inp = work / f"{case}.jsonl"
        inp.write_text("".join(json.dumps({"input_ids": r}) + "\n"
                               for r in inputs(batch, length, json.loads((model_dir / "config.json").read_text())["vocab_size"])))
        out = work / f"t5rt-{dtype}{tag}-{case}.json"
        cmd = [binary, "bench", "--model", str(model_dir), "--device", device, "--dtype", dtype,
               "--case", f"{batch}:{length}:{new}", "--inputs", str(inp), "--repeats", str(repeats),
               "--warmup", "1", "--json", str(out)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=T5RT_TIMEOUT)
        except subprocess.TimeoutExpired:
            res[case] = {"error": f"timed out after {T5RT_TIMEOUT} s"}
            continue
        if p.returncode != 0:
            res[case] = {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
            continue
        rep = json.loads(out.read_text())
        c = rep["cases"][0]
        total, enc = c["total_s"]["median"], c["encode_s"]["median"]
        res[case] = {"tokens_per_s": c["tokens_per_s"]["median"], "total_s": total, "encode_s": enc,
                     "step_ms": 1000 * c["decode_s"]["median"] / new, "peak_mib": c.get("gpu_peak_mib"),
                     "host_peak_rss_mib": c["peak_rss_mib"], "load_s": rep.get("load_s"),
                     "ids": c["output_ids"], "device": rep["device"]}
    return res


def agreement(got, want):
    pairs = [(g, w) for g, w in zip(got, want)]
    return sum(g == w for g, w in pairs) / max(len(pairs), 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    ap.add_argument("--binary", default=str(ROOT / "gpu" / "t5rt"))
    ap.add_argument("--models", default=None, help="comma-separated (default: t5-small,flan-t5-small,t5-base)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: tests the script")
    ap.add_argument("--work", default=None, help="where the weights and inputs go (default: OUT/gpu-peers-work)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                    help="also run t5rt with these environment variables (rows t5rt-<dtype>-NAME), "
                         "e.g. chain:T5RT_CUDA_CHAIN=1; may be repeated")
    ap.add_argument("--weights-only", action="store_true",
                    help="make the models' weights under --work and stop (for t5rt-only runs)")
    args = ap.parse_args()
    variants = []
    for v in args.variant:
        name, _, assigns = v.partition(":")
        pairs = [a.split("=", 1) for a in assigns.split(",") if a]
        if not name or not pairs or any(len(p) != 2 or not p[0] for p in pairs):
            ap.error(f"--variant {v!r}: expected NAME:VAR=VALUE[,VAR=VALUE]")
        variants.append((name, dict(pairs)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = DRY_PLAN if args.dry_run else PLAN
    if args.models:
        plan = {m: plan.get(m, ["a", "b", "c", "d"]) for m in args.models.split(",")}
    hf_device = "cpu" if args.dry_run else "cuda"
    t5rt_device = "cpu" if args.dry_run else "cuda"
    binary = args.binary
    if args.dry_run and not Path(binary).is_file():
        binary = str(ROOT / "target" / "release" / "t5rt")
    if args.weights_only:
        work = Path(args.work) if args.work else out / "gpu-peers-work"
        for name in plan:
            make_model(name, work / name)
            print("weights:", work / name, flush=True)
        return
    import torch
    import transformers
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": args.dry_run, "torch": torch.__version__, "transformers": transformers.__version__,
              "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "repeats": args.repeats, "models": {}}
    work = Path(args.work) if args.work else out / "gpu-peers-work"
    work.mkdir(parents=True, exist_ok=True)
    for name, case_names in plan.items():
        model_dir = work / name
        make_model(name, model_dir)
        cases = {c: CASES[c] for c in case_names}
        rows = report["models"][name] = {}
        # HF fp32 and fp16 first (every ratio divides by them), then t5rt, HF bf16 last; the
        # report is rewritten after each row, so a run cut off by its time limit keeps the rows
        # it finished.
        order = [("hf", "fp32"), ("hf", "fp16")]
        order += [("t5rt", d, v) for d in T5RT_DTYPES if not (args.dry_run and d == "f16")  # f16: CUDA only
                  for v in [None] + variants]
        order += [("hf", "bf16")]
        for job in order:
            if job[0] == "hf":
                row = f"hf-{job[1]}"
                res = hf_run(model_dir, job[1], cases, hf_device, args.repeats)
            else:
                row = f"t5rt-{job[1]}" + (f"-{job[2][0]}" if job[2] else "")
                res = t5rt_run(binary, model_dir, job[1], cases, t5rt_device, args.repeats, work, job[2])
            if row == "hf-fp32":
                ref_ids = {case: r["ids"] for case, r in res.items()}
            for case, r in res.items():
                if "ids" in r:
                    r["ids_equal_hf_fp32"] = agreement(r.pop("ids"), ref_ids[case])
            rows[row] = res
            print(name, row, {c: round(r["tokens_per_s"], 1) if "tokens_per_s" in r else r.get("error")
                              for c, r in res.items()}, flush=True)
            write_report(out, report, plan, args.repeats)
    write_report(out, report, plan, args.repeats)
    print((out / "gpu_peers.md").read_text())


def write_report(out, report, plan, repeats):
    """gpu_peers.json and gpu_peers.md from the rows measured so far."""
    write_atomic(out / "gpu_peers.json", json.dumps(report, indent=1) + "\n")
    lines = [f"{report['date']}, {report['card'] or 'CPU (dry run)'}, torch {report['torch']}, "
             f"transformers {report['transformers']}, median of {repeats}.", "",
             "| model | case | system | tokens/s | step ms | encoder s | peak MiB | sequences = HF fp32 | x HF fp32 | x HF fp16 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, rows in report["models"].items():
        for case in plan[name]:
            for system, res in rows.items():
                r = res.get(case, {})
                if "error" in r or not r:
                    lines.append(f"| {name} | {case} | {system} | {r.get('error', 'n/a')} | | | | | | |")
                    continue
                ratio = lambda base: (f"{r['tokens_per_s'] / rows[base][case]['tokens_per_s']:.2f}x"
                                      if base in rows and "tokens_per_s" in rows[base].get(case, {}) else "")
                peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
                lines.append(f"| {name} | {case} | {system} | {r['tokens_per_s']:.1f} | {r['step_ms']:.2f} | "
                             f"{r['encode_s']:.4f} | {peak} | {r['ids_equal_hf_fp32']:.2f} | "
                             f"{ratio('hf-fp32')} | {ratio('hf-fp16')} |")
    write_atomic(out / "gpu_peers.md", "\n".join(lines) + "\n")


def write_atomic(path, text):
    """`text` into `path` through a temporary file, so a run killed mid-write (its time limit)
    leaves the previous complete report."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

if __name__ == "__main__":
    main()
