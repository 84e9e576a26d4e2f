#!/usr/bin/env python3
"""Accuracy of the reduced precisions along Hugging Face f32's greedy path, without the
butterfly effect of free-running generation (issue 14, item 6).

For each model (the harness's random-init checkpoints in bench/models/, made by run_peers.py)
and the harness's inputs of cases a (1 x 32 tokens, 32 new) and c (8 x 128, 64 new):
  1. HF f32 greedy search with EOS suppressed, as the speed cases run: the path;
  2. HF f32 forward with labels = the path: per step, the log-probability of the path token
     and HF's most likely token (raw logits, EOS included);
  3. every other system scores the same path, teacher-forced:
     - t5rt f32 / bf16 / int8 through `t5rt score` (log-probabilities and top ids);
     - CTranslate2 f32 / int8 through `score_batch` (log-probabilities only: it exposes no
       logits, hence no top-1);
  and is compared with HF: top-1 agreement (share of steps where its most likely token is
  HF's), and the mean and largest |log-probability error| of the path tokens, in nats.

    .venv-bench/bin/python bench/score_accuracy.py [--models t5-small,flan-t5-small]

Writes bench/results/score_accuracy.json and .md (the table RESULTS.md quotes).

With --ablate, it asks instead where t5rt int8's error comes from: the same path is scored by
t5rt int8 with one part of the model at a time kept in f32 (`T5RT_KEEP_F32`: the LM head, the
feed-forward products, the attention products, the cross-attention caches, the encoder, the
decoder), next to plain int8, f32 and CTranslate2 int8; writes score_ablation.json and .md.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from run_peers import CASES, MODELS, THREADS, machine, prepare, synthetic_inputs, t5rt_commit, versions  # noqa: E402

VOCAB = 32128
SCORE_CASES = ("a", "c")


def hf_reference(model_dir, ids, new):
    import torch
    from transformers import T5ForConditionalGeneration
    torch.set_num_threads(THREADS)
    model = T5ForConditionalGeneration.from_pretrained(model_dir / "hf").eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, num_beams=1, use_cache=True)
        path = out[:, 1:].contiguous()
        logits = model(input_ids=torch.tensor(ids), labels=path).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, path.unsqueeze(-1)).squeeze(-1)
    return path.tolist(), lp.tolist(), logits.argmax(-1).tolist()


ABLATE_PARTS = ("lm-head", "ffn-in", "ffn-out", "attn-qkv", "attn-out", "cross-kv", "cross-cache", "self-cache",
                "encoder", "decoder")


def t5rt_scores(binary, model_dir, ids, path, dtype, work, keep_f32=None):
    inp = work / "pairs.jsonl"
    inp.write_text("".join(json.dumps({"input_ids": s, "target_ids": t}) + "\n" for s, t in zip(ids, path)))
    env = dict(os.environ)
    env.pop("T5RT_KEEP_F32", None)
    if keep_f32:
        env["T5RT_KEEP_F32"] = keep_f32
    out = subprocess.run([binary, "score", "--model", str(model_dir / "hf"), "--input", str(inp),
                          "--dtype", dtype, "--threads", str(THREADS), "--batch-size", "32"],
                         check=True, capture_output=True, text=True, env=env)
    rows = [json.loads(l) for l in out.stdout.splitlines()]
    return [r["token_log_probs"] for r in rows], [r["top_ids"] for r in rows], out.stderr.strip()


def ct2_scores(model_dir, quant, ids, path):
    """Per-token log-probabilities from score_batch. CTranslate2 exposes no logits, so no
    top-1: translate_batch(target_prefix=path[:t], return_alternatives=True) was tried and
    ranked tokens differently from its own score_batch (and HF) at 4 of 32 steps of t5-small
    case a even in float32, so it does not measure what top-1 means here."""
    import ctranslate2
    tr = ctranslate2.Translator(str(model_dir / f"ct2-{quant}"), device="cpu", inter_threads=1,
                                intra_threads=THREADS)
    tok = {f"t{i}": i for i in range(3, VOCAB)} | {"<pad>": 0, "</s>": 1, "<unk>": 2}
    word = lambda i: "</s>" if i == 1 else ("<pad>" if i == 0 else f"t{i}")
    src = [[word(i) for i in row] for row in ids]
    tgt = [[word(i) for i in row] for row in path]
    res = tr.score_batch(src, tgt, max_batch_size=len(src))
    # score_batch also scores the EOS it appends: keep the path's own tokens.
    lps = [list(r.log_probs[:len(t)]) for r, t in zip(res, path)]
    return lps


def compare(lp, top, ref_lp, ref_top):
    err = np.abs(np.array(lp, dtype=np.float64) - np.array(ref_lp, dtype=np.float64))
    agree = None if top is None else round(float(np.mean(np.array(top) == np.array(ref_top))), 4)
    return {"top1_agreement": agree, "mean_abs_logp_error": float(err.mean()),
            "max_abs_logp_error": float(err.max()), "steps": int(err.size)}


def ablation_pivot(report):
    """One row per system, one column per (model, case): mean error (top-1), and the mean
    error relative to plain int8's in the same column."""
    cols = [(m, c) for m, cases in report["models"].items() for c in cases]
    systems = list(next(iter(next(iter(report["models"].values())).values())).keys())
    head = "| system | " + " | ".join(f"{m} {c}" for m, c in cols) + " |"
    out = ["Mean |error| per step in nats (top-1 agreement), and its ratio to plain t5rt int8's:", "",
           head, "|" + " --- |" * (len(cols) + 1)]
    for sysname in systems:
        cells = []
        for m, c in cols:
            v = report["models"][m][c][sysname]
            base = report["models"][m][c]["t5rt-int8"]["mean_abs_logp_error"]
            t1 = "" if v["top1_agreement"] is None else f" ({v['top1_agreement']:.2f})"
            cells.append(f"{v['mean_abs_logp_error']:.2e}{t1}, {v['mean_abs_logp_error'] / base:.2f}x")
        out.append(f"| {sysname} | " + " | ".join(cells) + " |")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="t5-small,flan-t5-small")
    ap.add_argument("--binary", default=str(ROOT.parent / "target/release/t5rt"))
    ap.add_argument("--ablate", action="store_true",
                    help="score t5rt int8 with each part of the model kept in f32 in turn")
    args = ap.parse_args()
    stem = "score_ablation" if args.ablate else "score_accuracy"
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "versions": versions(),
              "t5rt_commit": t5rt_commit(), "threads": THREADS, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            model_dir = ROOT / "models" / name
            prepare(name, model_dir)
            report["models"][name] = {}
            for case in SCORE_CASES:
                batch, length, new = CASES[case]
                ids = synthetic_inputs(batch, length, VOCAB)
                path, ref_lp, ref_top = hf_reference(model_dir, ids, new)
                row = {}
                for dtype in ("f32", "bf16", "int8"):
                    if args.ablate and dtype == "bf16":
                        continue
                    lp, top, summary = t5rt_scores(args.binary, model_dir, ids, path, dtype, work)
                    row[f"t5rt-{dtype}"] = compare(lp, top, ref_lp, ref_top) | {"device": summary}
                for part in ABLATE_PARTS if args.ablate else ():
                    lp, top, summary = t5rt_scores(args.binary, model_dir, ids, path, "int8", work, part)
                    row[f"int8, {part} f32"] = compare(lp, top, ref_lp, ref_top) | {"device": summary}
                for quant in ("int8",) if args.ablate else ("float32", "int8"):
                    lp = ct2_scores(model_dir, quant, ids, path)
                    row[f"ct2-{quant}"] = compare(lp, None, ref_lp, ref_top)
                report["models"][name][case] = row
                for k, v in row.items():
                    t1 = "n/a" if v["top1_agreement"] is None else f"{v['top1_agreement']:.3f}"
                    print(f"{name} case {case} {k:24} top-1 {t1}  "
                          f"mean |dlogp| {v['mean_abs_logp_error']:.2e}  max {v['max_abs_logp_error']:.2e}",
                          flush=True)
    out = ROOT / "results" / f"{stem}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    m = report["machine"]
    lines = [f"Along HF f32's greedy path (EOS suppressed), {report['date']}, {m['cpu']} "
             f"({', '.join(m['simd_flags'])}), {THREADS} threads, t5rt {report['t5rt_commit']}, "
             f"CTranslate2 {report['versions']['ctranslate2']}. Top-1: share of steps where the "
             "system's most likely token is HF's; error: |log p - HF's log p| of the path token, nats.",
             "", "| model | case | system | top-1 | mean error | max error |", "| --- | --- | --- | --- | --- | --- |"]
    for name, cases in report["models"].items():
        for case, row in cases.items():
            for k, v in row.items():
                t1 = "n/a" if v["top1_agreement"] is None else f"{v['top1_agreement']:.3f}"
                lines.append(f"| {name} | {case} | {k} | {t1} | "
                             f"{v['mean_abs_logp_error']:.2e} | {v['max_abs_logp_error']:.2e} |")
    if args.ablate:
        lines += ["", *ablation_pivot(report)]
    (ROOT / "results" / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
