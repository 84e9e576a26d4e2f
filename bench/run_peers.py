#!/usr/bin/env python3
"""Peer benchmark: t5rt against Hugging Face transformers, ONNX Runtime (optimum) and
CTranslate2 on the same random-init weights, same shapes, same thread count, one run.

    bench/setup.sh                      # .venv-bench with bench/requirements.txt
    cargo build --release -j2
    .venv-bench/bin/python bench/run_peers.py [--models t5-small,t5-base] [--repeats 3]

For each model (real t5-small / t5-base / flan-t5-small configurations, random weights
initialised as tools/make_fixtures.py does) it saves an HF checkpoint under bench/models/
(git-ignored), exports it for ONNX Runtime (optimum, with past key values) and CTranslate2
(float32 and int8), then measures cases a-d (see `t5rt bench --help`) with EOS suppressed
(min = max new tokens), each system and case in its own process so that peak memory is its
own; case by case, every system back to back, in an order rotated from one case to the next,
so that a ratio compares runs a few minutes apart at most.
Greedy ids on case a are checked against Hugging Face for every system. Results go to
bench/results/<model>.json and bench/RESULTS.md.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

CASES = {"a": (1, 32, 32), "b": (1, 512, 64), "c": (8, 128, 64), "d": (32, 128, 64)}
MODELS = {
    "t5-small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                     num_decoder_layers=6, num_heads=8, feed_forward_proj="relu",
                     tie_word_embeddings=True),
    "t5-base": dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                    num_decoder_layers=12, num_heads=12, feed_forward_proj="relu",
                    tie_word_embeddings=True),
    "flan-t5-small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8,
                          num_decoder_layers=8, num_heads=6, feed_forward_proj="gated-gelu",
                          tie_word_embeddings=False),
}
SEED = 0
THREADS = 2


def synthetic_inputs(batch, length, vocab, seed=SEED):
    import numpy as np
    rng = np.random.default_rng(seed)
    return rng.integers(2, vocab, size=(batch, length)).tolist()


# ---------------------------------------------------------------- model preparation

def prepare(name, out):
    """HF checkpoint + synthetic tokenizer + ONNX export + CTranslate2 conversions."""
    prepare_hf(name, out)
    onnx = out / "onnx"
    if not (onnx / "config.json").is_file():
        from optimum.onnxruntime import ORTModelForSeq2SeqLM
        ORTModelForSeq2SeqLM.from_pretrained(out / "hf", export=True, use_cache=True).save_pretrained(onnx)
    import ctranslate2.converters
    for quant in ("float32", "int8"):
        ct2 = out / f"ct2-{quant}"
        if not (ct2 / "model.bin").is_file():
            ctranslate2.converters.TransformersConverter(str(out / "hf")).convert(
                str(ct2), quantization=quant, force=True)


def save_random_model(config, out):
    """Saves under `out` the T5 of `config` (a dict of T5Config fields) with seeded random
    weights, re-initialised as tools/make_fixtures.py does; returns its T5Config."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    from make_fixtures import reinit
    torch.manual_seed(SEED)
    cfg = T5Config(dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128, **config)
    model = T5ForConditionalGeneration(cfg).eval()
    gain = 20.0 if cfg.tie_word_embeddings else 3.0
    reinit(model, SEED, 2.0, gain, q_gain=cfg.d_kv ** -0.5)
    model.save_pretrained(out, safe_serialization=True)
    return cfg


def prepare_hf(name, out):
    """The HF checkpoint (random weights, seeded) with a word-level tokenizer: `t{id}` words."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = out / "hf"
    if not (hf / "model.safetensors").is_file():
        cfg = save_random_model(MODELS[name], hf)
        # A word-level tokenizer with one token per id, so CTranslate2 has a vocabulary.
        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
        vocab.update({f"t{i}": i for i in range(3, cfg.vocab_size)})
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                unk_token="<unk>").save_pretrained(hf)


# ---------------------------------------------------------------- one system, one process

def run_system(system, model_dir, cases, repeats, warmup):
    """Runs in a worker process; returns per-case timings and case-a greedy ids."""
    results = {}
    vocab = 32128
    if system == "hf":
        import torch
        from transformers import T5ForConditionalGeneration
        torch.set_num_threads(THREADS)
        model = T5ForConditionalGeneration.from_pretrained(model_dir / "hf").eval()

        def generate(ids, new):
            with torch.no_grad():
                out = model.generate(input_ids=torch.tensor(ids), max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False, num_beams=1, use_cache=True)
            return [r[1:] for r in out.tolist()]
    elif system == "ort":
        import onnxruntime
        import torch
        from optimum.onnxruntime import ORTModelForSeq2SeqLM
        torch.set_num_threads(THREADS)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        model = ORTModelForSeq2SeqLM.from_pretrained(model_dir / "onnx", session_options=opts,
                                                     use_cache=True)

        def generate(ids, new):
            out = model.generate(input_ids=torch.tensor(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, num_beams=1)
            return [r[1:] for r in out.tolist()]
    elif system.startswith("ct2-"):
        import ctranslate2
        translator = ctranslate2.Translator(str(model_dir / system), device="cpu",
                                            inter_threads=1, intra_threads=THREADS)

        # The reverse vocabulary is built once, outside the timed calls (as t5rt's tokenizer
        # is loaded outside its own).
        tok = {f"t{i}": i for i in range(3, vocab)} | {"<pad>": 0, "</s>": 1, "<unk>": 2}

        def generate(ids, new):
            src = [[f"t{i}" for i in row] for row in ids]
            res = translator.translate_batch(src, beam_size=1, max_decoding_length=new,
                                             min_decoding_length=new, max_batch_size=len(src))
            return [[tok[t] for t in r.hypotheses[0]] for r in res]
    else:
        raise SystemExit(f"unknown system {system}")

    for case in cases:
        batch, length, new = CASES[case]
        ids = synthetic_inputs(batch, length, vocab)
        times = []
        for run in range(warmup + repeats):
            t0 = time.perf_counter()
            out = generate(ids, new)
            dt = time.perf_counter() - t0
            assert all(len(r) == new for r in out), f"{system} {case}: lengths {[len(r) for r in out]}"
            if run >= warmup:
                times.append(dt)
        times.sort()
        results[case] = {"tokens_per_s": batch * new / times[len(times) // 2],
                         "min_s": times[0], "max_s": times[-1]}
        if case == "a":
            results[case]["ids"] = out  # from the last timed run
    return {"system": system, "cases": results, "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib():
    """VmHWM of this process (ru_maxrss would include the parent's peak at fork time)."""
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def probe_gbs():
    """Read bandwidth right now (bench/probe, built by machine_limits.py), or None."""
    probe = ROOT / "bench" / "probe" / "target" / "bandwidth"
    if not probe.is_file():
        return None
    runs = [float(subprocess.run([str(probe), str(1 << 30), str(THREADS), "10"], check=True,
                                 capture_output=True, text=True).stdout.split()[0]) for _ in range(3)]
    return round(sorted(runs)[1], 1)


def run_t5rt(binary, model_dir, cases, repeats, warmup, work, dtype="f32", env=None):
    """t5rt bench, one process per case, timing the same ids as the peers (`--inputs`);
    `env` adds variables to its environment (`T5RT_ISA`)."""
    # This VM's bandwidth moves from minute to minute: measure it next to the run it bounds
    # (case a's decoding step, set against the bandwidth estimate in RESULTS.md).
    probe = probe_gbs if "a" in cases else (lambda: None)
    bw_before = probe()
    res, peak = {}, 0.0
    for case in cases:
        batch, length, new = CASES[case]
        inp = work / f"case_{case}.jsonl"
        inp.write_text("".join(json.dumps({"input_ids": r}) + "\n"
                               for r in synthetic_inputs(batch, length, 32128)))
        out = work / f"t5rt-{dtype}-{case}.json"
        cmd = [binary, "bench", "--model", str(model_dir / "hf"), "--threads", str(THREADS),
               "--dtype", dtype, "--repeats", str(repeats), "--warmup", str(warmup),
               "--case", case, "--inputs", str(inp), "--json", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, **(env or {})))
        rep = json.loads(out.read_text())
        c = rep["cases"][0]
        res[case] = {"tokens_per_s": c["tokens_per_s"]["median"],
                     "min_s": c["total_s"]["min"], "max_s": c["total_s"]["max"],
                     "encode_s": c["encode_s"]["median"], "decode_s": c["decode_s"]["median"]}
        if case == "a":
            res[case]["ids"] = c["output_ids"]  # from the last timed run
        peak = max(peak, c["peak_rss_mib"] or 0)
        device = rep["device"]
    return {"system": f"t5rt-{dtype}", "cases": res, "peak_rss_mib": peak, "device": device,
            "bandwidth_gbs_before": bw_before, "bandwidth_gbs_after": probe()}


def versions():
    import importlib.metadata as md
    return {p: md.version(p) for p in ("torch", "transformers", "optimum", "optimum-onnx",
                                       "onnxruntime", "ctranslate2")}


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "amx_tile", "amx_bf16", "amx_int8")


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "").split()
    return {"cpu": cpu, "cores": os.cpu_count(),
            "simd_flags": [f for f in SIMD_FLAGS if f in flags],
            "kernel": platform.release()}


def t5rt_commit():
    """The commit the t5rt binary was built from (with `+dirty` for uncommitted changes)."""
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True,
                                    text=True).stdout.strip()
    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    # Dirty only where the binary comes from (the crates and the workspace files).
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "crates", "Cargo.toml", "Cargo.lock")
    return commit + ("+dirty" if dirty else "")


PEERS = ["hf", "ort", "ct2-float32", "ct2-int8"]
T5RT = ["t5rt", "t5rt-bf16", "t5rt-int8"]
DTYPE_OF = {"t5rt": "f32", "t5rt-bf16": "bf16", "t5rt-int8": "int8"}


def run_worker(system, model_dir, cases, repeats, warmup, env=None):
    """A peer system over `cases` in a process of its own (this script's `--worker` mode);
    `env` adds variables to its environment (CTranslate2's forced ISA)."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", system,
                          str(model_dir), "--cases", ",".join(cases), "--repeats", str(repeats),
                          "--warmup", str(warmup)],
                         env=dict(os.environ, **(env or {})), check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved(cases, systems, run_one, label):
    """`run_one(system, case)` for every case and system, case by case, every system back to
    back, in an order rotated from one case to the next (this VM's bandwidth moves over
    minutes; running each system through all its cases before the next would move whole
    columns with it). Returns the runs merged per system (`merge_case`)."""
    res = {}
    for i, case in enumerate(cases):
        for system in systems[i:] + systems[:i]:
            print(f"== {label} case {case}: {system}", flush=True)
            merge_case(res, system, run_one(system, case))
    return res


def merge_case(res, system, one):
    """Adds one case's run of `system` (a process of its own) to `res`: the cases side by
    side, the peak memory the largest of the processes', the rest (kernels, bandwidth around
    case a) as the run that has it gave it."""
    mine = res.setdefault(system, {"system": system, "cases": {}, "peak_rss_mib": 0.0})
    mine["cases"].update(one["cases"])
    mine["peak_rss_mib"] = max(mine["peak_rss_mib"], one["peak_rss_mib"] or 0)
    for k, v in one.items():
        if k not in ("system", "cases", "peak_rss_mib") and v is not None:
            mine[k] = v


def id_agreement(got, want):
    """Fraction of positions where two id lists (lists of rows) agree."""
    pairs = [(a, b) for g, w in zip(got, want) for a, b in zip(g, w)]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def write_markdown(all_results, meta, path):
    peers = PEERS
    names = {"hf": "HF torch f32", "ort": "ORT f32", "ct2-float32": "CT2 f32",
             "ct2-int8": "CT2 int8", "t5rt": "t5rt f32", "t5rt-bf16": "t5rt bf16",
             "t5rt-int8": "t5rt int8"}
    lines = ["# Benchmark results", "",
             f"Made by `bench/run_peers.py` on {meta['date']}: {meta['machine']['cpu']} "
             f"(flags: {' '.join(meta['machine'].get('simd_flags', []))}), "
             f"{meta['machine']['cores']} cores, {THREADS} threads for every system; "
             f"{meta.get('warmup', '?')} warm-up run(s), then the median of {meta.get('repeats', '?')} "
             f"timed runs per case. Versions: "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
             + f", {meta['t5rt']} at commit {meta.get('t5rt_commit', '?')}"
             + (f" ({meta['t5rt_kernels']})" if meta.get("t5rt_kernels") else "") + ". "
             "Every system times the same input ids (numpy, seed 0), and the greedy check uses "
             "the ids of its last timed case-a run.",
             "", "Tokens/s (new tokens over wall time, median of the timed runs, EOS suppressed); "
             "cases a = 1x32 in, 32 new; b = 1x512, 64; c = 8x128, 64; d = 32x128, 64. "
             "`f32 / best f32` divides t5rt f32's figure by the best f32 peer's; `bf16 / CT2 int8` and "
             "`int8 / CT2 int8` divide t5rt's reduced-precision figures by CTranslate2 int8's. "
             "`greedy = HF` says whether the system's case-a ids equal Hugging Face's (for the "
             "reduced precisions, the share of equal ids).", ""]
    for model, res in all_results.items():
        systems = peers + [s for s in T5RT if s in res]
        ratio_cols = ["f32 / best f32"] + [f"{DTYPE_OF[s]} / CT2 int8" for s in T5RT[1:] if s in res]
        lines += [f"## {model}", "",
                  "| case | " + " | ".join(names[s] for s in systems) + " | " + " | ".join(ratio_cols) + " |",
                  "|---" * (len(systems) + len(ratio_cols) + 1) + "|"]
        for case in CASES:
            row = [case]
            for s in systems:
                v = res[s]["cases"].get(case, {}).get("tokens_per_s")
                row.append(f"{v:.1f}" if v else "-")
            f32_peers = [res[s]["cases"][case]["tokens_per_s"] for s in ("hf", "ort", "ct2-float32")
                         if case in res[s]["cases"]]
            ratio = res["t5rt"]["cases"][case]["tokens_per_s"] / max(f32_peers) if f32_peers else None
            row.append(f"{ratio:.2f}x" if ratio else "-")
            for s in T5RT[1:]:
                if s in res:
                    ct2 = res["ct2-int8"]["cases"].get(case, {}).get("tokens_per_s")
                    mine = res[s]["cases"].get(case, {}).get("tokens_per_s")
                    row.append(f"{mine / ct2:.2f}x" if ct2 and mine else "-")
            lines.append("| " + " | ".join(row) + " |")
        hf_ids = res["hf"]["cases"]["a"]["ids"]

        def agree(s):
            ids = res[s]["cases"]["a"].get("ids")
            if ids == hf_ids:
                return "yes"
            if ids is None:
                return "-"
            return f"NO ({100 * id_agreement(ids, hf_ids):.0f}% of ids)"
        lines += ["", "| | " + " | ".join(names[s] for s in systems) + " |",
                  "|---" * (len(systems) + 1) + "|",
                  "| peak RSS MiB | " + " | ".join(f"{res[s]['peak_rss_mib']:.0f}" for s in systems) + " |",
                  "| greedy = HF (case a) | " + " | ".join(agree(s) for s in systems) + " |", ""]
    limits_path = path.parent / "results" / "machine_limits.json"
    if limits_path.is_file():
        lim = json.loads(limits_path.read_text())
        bw = lim["read_bandwidth_gbs"]
        b1, b2 = bw["1_thread"], bw[f"{THREADS}_threads"]
        lines += ["## The machine's limits", "",
                  f"Measured by `bench/machine_limits.py` on its own, just before or just after the harness (the closing note of each session says which): read bandwidth (a Rust "
                  f"streaming probe, 9 runs a few seconds apart) {b2['median']} GB/s median, "
                  f"{b2['worst']} to {b2['best']} GB/s, with {THREADS} threads ({b1['median']} GB/s "
                  f"median with 1); f32 matmul (numpy/OpenBLAS, 2048^3) "
                  f"{lim['f32_matmul_gflops_numpy']} GFLOP/s. This VM shares its memory with other "
                  "tenants, so bandwidth, and every batch-1 figure above, moves from one minute to the "
                  "next; the harness runs each case through every system back to back (the order "
                  "rotated from case to case), so the ratios in a row come from the same few minutes. The bandwidth "
                  "estimate of a batch-1 decoding step is the weights it must read (self q,k,v,o, "
                  "cross q,o, FFN per layer, and the LM head; cross k,v are cached per request) over "
                  "the probe's median bandwidth: f32 as measured, bf16 half of it, int8 a quarter; "
                  "the `best` column uses the probe's best run instead. It is an estimate, not a "
                  "bound: the probe's figure moves with other tenants, and a step can beat it when "
                  "the bandwidth was higher during the step than during the probe, and it counts "
                  "the LM head in the row's precision while greedy search reads f32 heads (and bf16 "
                  "heads at widened kernel levels) through an int8 copy and a few columns: the f32 "
                  "rows' ratios below 1.00x partly come from that. The harness also "
                  "runs the probe just before and just after each t5rt run (median of 3), and the "
                  "column `at the moment` divides by the estimate at the mean of those two. t5rt's "
                  "step time is its case-a decoder time over 32 steps (it includes the first "
                  "step's cross-attention projections).", "",
                  "| model | dtype | weights read per step | estimate ms/step | t5rt ms/step (case a) | "
                  "t5rt / estimate | t5rt / estimate at best bandwidth | bandwidth at the moment | "
                  "t5rt / estimate at the moment |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for model, res in all_results.items():
            f = lim["batch1_decode_floor"].get(model)
            for s in T5RT:
                dec = res.get(s, {}).get("cases", {}).get("a", {}).get("decode_s")
                if f and dec:
                    div = {"f32": 1, "bf16": 2, "int8": 4}[DTYPE_OF[s]]
                    mib, floor = f["weight_mib_per_step"] / div, f["floor_ms_per_step"] / div
                    floor_best = f["floor_ms_per_step_best_bw"] / div
                    ms = dec / CASES["a"][2] * 1e3
                    bws = [res[s].get(k) for k in ("bandwidth_gbs_before", "bandwidth_gbs_after")]
                    bws = [b for b in bws if b]
                    now = ("-", "-")
                    if bws:
                        gbs = sum(bws) / len(bws)
                        floor_now = mib * 2**20 / (gbs * 1e9) * 1e3
                        now = (f"{gbs:.1f} GB/s", f"{ms / floor_now:.2f}x")
                    lines.append(f"| {model} | {DTYPE_OF[s]} | {mib:.1f} MiB | {floor:.2f} | "
                                 f"{ms:.2f} | {ms / floor:.2f}x | {ms / floor_best:.2f}x | "
                                 f"{now[0]} | {now[1]} |")
        lines.append("")
    # Keep the serving section bench/load.py writes.
    marker = "## Serving under load"
    old = path.read_text() if path.is_file() else ""
    tail = ("\n" + marker + old.split(marker, 1)[1]) if marker in old else ""
    path.write_text("\n".join(lines) + "\n" + tail)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="t5-small,t5-base,flan-t5-small")
    ap.add_argument("--cases", default="a,b,c,d")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--t5rt", default=str(ROOT / "target" / "release" / "t5rt"))
    ap.add_argument("--worker", nargs=2, metavar=("SYSTEM", "MODEL_DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None,
                    help="directory for the JSON results (default bench/results); a run of only some "
                         "cases always goes elsewhere (default bench/results/partial-DATE) and leaves "
                         "bench/RESULTS.md alone")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite bench/RESULTS.md from bench/results/*.json without measuring")
    args = ap.parse_args()
    cases = args.cases.split(",")
    if args.markdown_only:
        results_dir = ROOT / "bench" / "results"
        meta = json.loads((results_dir / "meta.json").read_text())
        all_results = {m: json.loads((results_dir / f"{m}.json").read_text())
                       for m in args.models.split(",") if (results_dir / f"{m}.json").is_file()}
        write_markdown(all_results, meta, ROOT / "bench" / "RESULTS.md")
        return
    if args.worker:
        system, model_dir = args.worker
        print(json.dumps(run_system(system, Path(model_dir), cases, args.repeats, args.warmup)))
        return
    partial = sorted(cases) != ["a", "b", "c", "d"]
    if args.out:
        results_dir = Path(args.out)
    elif partial:
        results_dir = ROOT / "bench" / "results" / f"partial-{datetime.date.today().isoformat()}"
    else:
        results_dir = ROOT / "bench" / "results"
    if partial and results_dir.resolve() == (ROOT / "bench" / "results").resolve():
        sys.exit("a run of only some cases must not overwrite bench/results: pass another --out")
    results_dir.mkdir(parents=True, exist_ok=True)
    t5rt_version = subprocess.run([args.t5rt, "--version"], capture_output=True, text=True).stdout.strip()
    commit = t5rt_commit()  # at the start: the tree the binary was built from
    all_results = {}
    for name in args.models.split(","):
        model_dir = ROOT / "bench" / "models" / name
        print(f"== {name}: preparing", flush=True)
        prepare(name, model_dir)
        def run_one(system, case):
            if system in T5RT:
                return run_t5rt(args.t5rt, model_dir, [case], args.repeats, args.warmup,
                                model_dir, DTYPE_OF[system])
            return run_worker(system, model_dir, [case], args.repeats, args.warmup)

        res = interleaved(cases, PEERS + T5RT, run_one, name)
        for s, r in res.items():
            print(f"   {s:12s} " + "  ".join(f"{c}: {v['tokens_per_s']:.1f}" for c, v in r["cases"].items()),
                  flush=True)
        (results_dir / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
        all_results[name] = res
    meta = {"date": datetime.date.today().isoformat(), "machine": machine(), "versions": versions(),
            "t5rt": t5rt_version, "t5rt_commit": commit, "repeats": args.repeats,
            "warmup": args.warmup, "threads": THREADS,
            "t5rt_kernels": "; ".join(sorted({r[s]["device"] for r in all_results.values()
                                                for s in T5RT if s in r}))}
    (results_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if partial:
        print(f"only cases {args.cases}: results in {results_dir}, bench/RESULTS.md left as it was")
        return
    write_markdown(all_results, meta, ROOT / "bench" / "RESULTS.md")
    print((ROOT / "bench" / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
