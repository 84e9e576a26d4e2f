#!/usr/bin/env python3
"""t5rt at every kernel level this CPU has (T5RT_ISA), each against CTranslate2 forced to the
same level (CT2_FORCE_CPU_ISA for its own kernels, ONEDNN_MAX_CPU_ISA and
MKL_ENABLE_INSTRUCTIONS for the libraries it calls), on the same weights and ids as
bench/run_peers.py (whose model preparation and workers it reuses).

    .venv-bench/bin/python bench/isa_levels.py [--models t5-small] [--cases a,b,c,d]

Writes bench/results/isa_levels.json and the section "Kernel levels" of bench/RESULTS.md.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import run_peers  # noqa: E402

# t5rt level -> the environment that holds CTranslate2 and its libraries to the same one.
LEVELS = {
    "avx512-bf16": {"CT2_FORCE_CPU_ISA": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx512-vnni": {"CT2_FORCE_CPU_ISA": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx512bw": {"CT2_FORCE_CPU_ISA": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
                 "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx2": {"CT2_FORCE_CPU_ISA": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def available(level, binary):
    env = dict(os.environ, T5RT_ISA=level)
    r = subprocess.run([binary, "generate", "spell: 1"], env=env, capture_output=True, text=True)
    return r.returncode == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="t5-small")
    ap.add_argument("--cases", default="a,b,c,d")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--t5rt", default=str(ROOT / "target" / "release" / "t5rt"))
    args = ap.parse_args()
    cases = args.cases.split(",")
    commit = run_peers.t5rt_commit()
    res = {"date": datetime.date.today().isoformat(), "machine": run_peers.machine(),
           "commit": commit, "repeats": args.repeats, "runs": []}
    for level, ct2_env in LEVELS.items():
        if not available(level, args.t5rt):
            print(f"== {level}: not on this CPU, skipped", flush=True)
            res["runs"].append({"level": level, "skipped": True})
            continue
        for name in args.models.split(","):
            model_dir = ROOT / "bench" / "models" / name
            run_peers.prepare(name, model_dir)
            def run_one(system, case):
                if system.startswith("t5rt-"):
                    return run_peers.run_t5rt(args.t5rt, model_dir, [case], args.repeats, 1,
                                              model_dir, system.removeprefix("t5rt-"),
                                              env={"T5RT_ISA": level})
                return run_peers.run_worker(system, model_dir, [case], args.repeats, 1, ct2_env)

            systems = ["ct2-float32", "ct2-int8", "t5rt-f32", "t5rt-bf16", "t5rt-int8"]
            row = {"level": level, "model": name,
                   "systems": run_peers.interleaved(cases, systems, run_one, f"{level} {name}")}
            res["runs"].append(row)
            print(json.dumps({s: {c: round(v["tokens_per_s"], 1) for c, v in r["cases"].items()}
                              for s, r in row["systems"].items()}), flush=True)
    (ROOT / "bench" / "results" / "isa_levels.json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, cases)


def write_markdown(res, cases):
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text()
    marker = "## Kernel levels"
    before, _, after = text.partition(marker)
    rest = after.split("\n## ", 1)
    tail = ("\n## " + rest[1]) if len(rest) > 1 else ""
    # Subsections of the old section (tables of other machines, `### ...`) stay.
    kept = rest[0].split("\n### ", 1)
    if len(kept) > 1:
        tail = "\n### " + kept[1].rstrip() + "\n" + tail
    m = res["machine"]
    lines = [marker, "",
             f"Made by `bench/isa_levels.py` on {res['date']}: {m['cpu']} (flags: "
             f"{' '.join(m.get('simd_flags', []))}), 2 threads, t5rt at commit {res['commit']}; "
             f"median of {res['repeats']} timed runs, each case run through every system back to back "
             "(the order rotated from case to case). Each level is forced on t5rt with `T5RT_ISA` "
             "and on CTranslate2 with CT2_FORCE_CPU_ISA, ONEDNN_MAX_CPU_ISA and "
             "MKL_ENABLE_INSTRUCTIONS (CTranslate2 has no level between AVX2 and AVX512; at "
             "`avx512bw` oneDNN is held below VNNI). Tokens/s; ratios are t5rt over CTranslate2 "
             "int8, and t5rt's reduced precision over t5rt f32, in the same row.", "",
             "| level | model | case | CT2 f32 | CT2 int8 | t5rt f32 | t5rt bf16 | t5rt int8 | "
             "int8 / CT2 int8 | bf16 / CT2 int8 | bf16 / f32 | int8 / f32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        if r.get("skipped"):
            lines.append(f"| {r['level']} | (not on this CPU) | | | | | | | | | | |")
            continue
        s = r["systems"]
        for c in cases:
            v = {k: s[k]["cases"][c]["tokens_per_s"] for k in s}
            lines.append(
                f"| {r['level']} | {r['model']} | {c} | {v['ct2-float32']:.1f} | {v['ct2-int8']:.1f} | "
                f"{v['t5rt-f32']:.1f} | {v['t5rt-bf16']:.1f} | {v['t5rt-int8']:.1f} | "
                f"{v['t5rt-int8'] / v['ct2-int8']:.2f}x | {v['t5rt-bf16'] / v['ct2-int8']:.2f}x | "
                f"{v['t5rt-bf16'] / v['t5rt-f32']:.2f}x | {v['t5rt-int8'] / v['t5rt-f32']:.2f}x |")
    path.write_text(before.rstrip() + "\n\n" + "\n".join(lines) + "\n" + tail)


if __name__ == "__main__":
    main()
