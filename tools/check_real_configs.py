#!/usr/bin/env python3
"""Greedy parity of the t5rt binary with Hugging Face at real model sizes.

Builds random models with the real t5-small (relu, tied, 6+6 layers) and flan-t5-small
(gated-gelu, untied, 8+8 layers) configurations, initialised as in make_fixtures.py so that
outputs vary, saves them as checkpoints, runs Hugging Face greedy decoding (fp32, padded
batches of 16) on 100 inputs of mixed length, then runs

    t5rt generate --model DIR --input ids.jsonl --batch-size 16 --output out.jsonl

and compares every output exactly. For a mismatch it reports the first differing step and
Hugging Face's margin between its top two logits there (a near-tie explains a flip).

    cargo build --release -j2
    .venv/bin/python tools/check_real_configs.py [--t5rt target/release/t5rt]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import T5Config, T5ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import pad_batch, reinit, strip_generated, versions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEED = 7
CONFIGS = {
    "t5-small": dict(
        config=dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                    num_decoder_layers=6, num_heads=8, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, feed_forward_proj="relu",
                    tie_word_embeddings=True),
        residual_gain=20.0, eos_boost=3.0,
    ),
    "flan-t5-small": dict(
        config=dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8,
                    num_decoder_layers=8, num_heads=6, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False),
        residual_gain=3.0, eos_boost=2.0,
    ),
}


def hf_greedy(model, inputs, batch, max_new_tokens):
    outs = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            ids, mask = pad_batch(inputs[i : i + batch])
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1)
            outs += [strip_generated(r, model.config.eos_token_id) for r in gen.tolist()]
    return outs


def hf_f64_agrees_with_hf_f32(model64, inp, want, max_new_tokens):
    """Whether HF in float64 gives HF-f32's tokens for this input: when it does not, the
    model is too sensitive there for f32 to decide, and a flip is rounding, not a bug."""
    with torch.no_grad():
        out = model64.generate(input_ids=torch.tensor([inp]), max_new_tokens=max_new_tokens,
                               do_sample=False, num_beams=1)
    return strip_generated(out.tolist()[0], model64.config.eos_token_id) == want


def margin_at(model, inp, prefix, step):
    """HF's gap between its best and second-best logit at `step`, given `prefix`."""
    with torch.no_grad():
        dec = torch.tensor([[model.config.decoder_start_token_id] + prefix[:step]])
        logits = model(input_ids=torch.tensor([inp]), decoder_input_ids=dec).logits[0, -1]
        top = torch.topk(logits, 2).values
        return float(top[0] - top[1])


def check(name, spec, args, work):
    torch.manual_seed(SEED)
    cfg = T5Config(dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                   **spec["config"])
    model = T5ForConditionalGeneration(cfg).eval()
    reinit(model, SEED, spec["eos_boost"], spec["residual_gain"],
           q_gain=cfg.d_kv ** -0.5)
    model_dir = work / name
    model.save_pretrained(model_dir, safe_serialization=True)

    rng = np.random.default_rng(SEED)
    lengths = rng.integers(1, 120, args.count)
    inputs = [[int(t) for t in rng.integers(2, cfg.vocab_size, n)] + [1] for n in lengths]
    t0 = time.time()
    want = hf_greedy(model, inputs, args.batch_size, args.max_new_tokens)
    hf_secs = time.time() - t0

    ids_path, out_path = work / f"{name}.ids.jsonl", work / f"{name}.out.jsonl"
    ids_path.write_text("".join(json.dumps({"input_ids": x}) + "\n" for x in inputs))
    t0 = time.time()
    subprocess.run([args.t5rt, "generate", "--model", str(model_dir), "--input", str(ids_path),
                    "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
                    "--output", str(out_path)], check=True)
    t5rt_secs = time.time() - t0
    got = [json.loads(l)["output_ids"] for l in out_path.read_text().splitlines()]

    mismatches = []
    model64 = None
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            if model64 is None:
                model64 = T5ForConditionalGeneration.from_pretrained(model_dir).double().eval()
            step = next((s for s, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            mismatches.append({"input": i, "step": step,
                               "hf_top2_margin": margin_at(model, inputs[i], w, step),
                               "hf_f64_agrees_with_hf_f32": hf_f64_agrees_with_hf_f32(
                                   model64, inputs[i], w, args.max_new_tokens)})
    distinct = len({tuple(w) for w in want})
    stopped = sum(1 for w in want if w and w[-1] == 1)
    result = {
        "config": name, "inputs": len(inputs), "input_lengths": [int(lengths.min()) + 1, int(lengths.max()) + 1],
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "exact_matches": len(inputs) - len(mismatches), "mismatches": mismatches,
        "hf_distinct_outputs": distinct, "hf_outputs_ending_in_eos": stopped,
        "hf_tokens": sum(len(w) for w in want),
        "hf_mean_distinct_tokens_per_output": round(sum(len(set(w)) for w in want) / len(want), 1),
        "hf_generate_seconds": round(hf_secs, 2),
        "t5rt_process_seconds": round(t5rt_secs, 2),
    }
    print(json.dumps(result), flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t5rt", default=str(ROOT / "target" / "release" / "t5rt"))
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / "real_configs.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        results = [check(name, spec, args, Path(tmp)) for name, spec in CONFIGS.items()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"seed": SEED, "versions": versions(),
                                          "results": results}, indent=2) + "\n")
    bad = sum(len(r["mismatches"]) for r in results)
    print(f"{'OK' if bad == 0 else 'MISMATCH'}: "
          + ", ".join(f"{r['config']} {r['exact_matches']}/{r['inputs']}" for r in results))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
