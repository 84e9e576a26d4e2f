#!/usr/bin/env python3
"""Load time: from opening the checkpoint to the model ready to run, t5rt against
CTranslate2, per model and precision, warm page cache (the files were read just before).

t5rt: `t5rt bench --json` reports `load_s` (open, read, convert and pack the weights of the
HF safetensors checkpoint, in the process that runs it); for int8 also from the checkpoint
`t5rt convert` quantized ahead of time (as CTranslate2's converter does). CTranslate2: the construction of
`ctranslate2.Translator` on its converted model directory (f32 or int8, converted offline),
timed inside a fresh Python process after `import ctranslate2`.

    .venv-bench/bin/python bench/load_time.py [--models t5-small,t5-base] [--repeats 5]

Writes bench/results/load_time.json and prints a Markdown table.
"""

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from run_peers import THREADS, machine, prepare, t5rt_commit  # noqa: E402

CT2_LOAD = """
import sys, time, ctranslate2
t0 = time.perf_counter()
ctranslate2.Translator(sys.argv[1], device="cpu", inter_threads=1, intra_threads=int(sys.argv[2]))
print(time.perf_counter() - t0)
"""


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def t5rt_load(binary, model_dir, dtype, work, hf="hf"):
    out = work / "b.json"
    subprocess.run([binary, "bench", "--model", str(model_dir / hf), "--dtype", dtype,
                    "--threads", str(THREADS), "--case", "1:1:1", "--repeats", "1", "--warmup", "0",
                    "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["load_s"]


def ct2_load(model_dir, quant):
    out = subprocess.run([sys.executable, "-c", CT2_LOAD, str(model_dir / f"ct2-{quant}"), str(THREADS)],
                         check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="t5-small,t5-base")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--binary", default=str(ROOT.parent / "target/release/t5rt"))
    args = ap.parse_args()
    report = {"date": datetime.date.today().isoformat(), "machine": machine(),
              "t5rt_commit": t5rt_commit(), "threads": THREADS, "repeats": args.repeats, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model_dir = ROOT / "models" / name
            prepare(name, model_dir)
            for dtype, quant in (("f32", "float32"), ("bf16", None), ("int8", "int8")):
                t5rt_load(args.binary, model_dir, dtype, Path(tmp))  # warm the page cache
                if quant:
                    ct2_load(model_dir, quant)
                # t5rt and CTranslate2 alternate, so that both see the same drift of this VM.
                t, c = [], []
                for _ in range(args.repeats):
                    t.append(t5rt_load(args.binary, model_dir, dtype, Path(tmp)))
                    if quant:
                        c.append(ct2_load(model_dir, quant))
                row = {"model": name, "dtype": dtype, "t5rt_s": median(t), "t5rt_range": [min(t), max(t)]}
                if quant:
                    row |= {"ct2_s": median(c), "ct2_range": [min(c), max(c)]}
                report["rows"].append(row)
                print(row, flush=True)
            # int8 converted ahead of time (`t5rt convert`), as CTranslate2's int8 model is.
            conv = Path(tmp) / f"{name}-int8"
            subprocess.run([args.binary, "convert", "--model", str(model_dir / "hf"), "--output", str(conv),
                            "--threads", str(THREADS)], check=True, stderr=subprocess.DEVNULL)
            t5rt_load(args.binary, conv.parent, "int8", Path(tmp), hf=conv.name)
            t, c = [], []
            for _ in range(args.repeats):
                t.append(t5rt_load(args.binary, conv.parent, "int8", Path(tmp), hf=conv.name))
                c.append(ct2_load(model_dir, "int8"))
            row = {"model": name, "dtype": "int8 (t5rt convert)", "t5rt_s": median(t),
                   "t5rt_range": [min(t), max(t)], "ct2_s": median(c), "ct2_range": [min(c), max(c)]}
            report["rows"].append(row)
            print(row, flush=True)
    (ROOT / "results" / "load_time.json").write_text(json.dumps(report, indent=1) + "\n")
    m = report["machine"]
    print(f"\n{report['date']}, {m['cpu']} ({', '.join(m['simd_flags'])}), {THREADS} threads, "
          f"t5rt {report['t5rt_commit']}, median of {args.repeats}, warm page cache.\n")
    print("| model | precision | t5rt load s | CTranslate2 load s | t5rt / CT2 |")
    print("| --- | --- | --- | --- | --- |")
    for r in report["rows"]:
        ct2 = f"{r['ct2_s']:.3f}" if "ct2_s" in r else "(no bf16 on CPU)"
        ratio = f"{r['t5rt_s'] / r['ct2_s']:.2f}x" if "ct2_s" in r else ""
        print(f"| {r['model']} | {r['dtype']} | {r['t5rt_s']:.3f} | {ct2} | {ratio} |")


if __name__ == "__main__":
    main()
