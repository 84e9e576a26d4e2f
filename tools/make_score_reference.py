#!/usr/bin/env python3
"""Teacher-forced scores from Hugging Face transformers (fp32), for `t5rt score`'s tests.

For each parity fixture (and the bundled model) it scores, per input of reference.json:
  - HF's own greedy output (reference.json "greedy"), the likely path;
  - a seeded random target of 1 to 8 ids (the last one EOS half of the time), an unlikely one,
through the model's forward pass with `labels` (padded with -100), exactly as a Hugging Face
user would: log_softmax of the logits, gathered at the labels. It also records HF's `loss`
(the mean negative log-likelihood over the batch's label tokens) as a cross-check.

Writes tests/fixtures/<name>/scores.json with versions and the seed.

    .venv/bin/python tools/make_score_reference.py      # or .venv-bench/bin/python
"""

import json
import random
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForSeq2SeqLM

ROOT = Path(__file__).resolve().parent.parent
SEED = 20261126
FIXTURES = {
    "t5-v1_0": ROOT / "tests/fixtures/t5-v1_0",
    "t5-v1_1": ROOT / "tests/fixtures/t5-v1_1",
    "mt5": ROOT / "tests/fixtures/mt5",
    "spell-numbers": ROOT / "models/spell-numbers",
}


def pad(rows, value):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def main():
    torch.manual_seed(SEED)
    for name, model_dir in FIXTURES.items():
        out_dir = ROOT / "tests/fixtures" / name
        ref = json.loads((out_dir / "reference.json").read_text())
        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        cfg = model.config
        rng = random.Random(f"{SEED}-{name}")
        inputs = ref["inputs"]
        greedy = ref["greedy"]["outputs"]
        randoms = []
        for _ in inputs:
            n = rng.randint(1, 8)
            t = [rng.randrange(2, cfg.vocab_size) for _ in range(n)]
            if rng.random() < 0.5:
                t[-1] = cfg.eos_token_id
            randoms.append(t)
        pairs = [(i, t) for i, t in zip(inputs, greedy)] + [(i, t) for i, t in zip(inputs, randoms)]
        srcs = [p[0] for p in pairs]
        tgts = [p[1] for p in pairs]
        input_ids = pad(srcs, cfg.pad_token_id)
        attention_mask = pad([[1] * len(s) for s in srcs], 0)
        labels = pad(tgts, -100)
        with torch.no_grad():
            res = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        logp = torch.log_softmax(res.logits.float(), dim=-1)
        token_log_probs = []
        for b, t in enumerate(tgts):
            token_log_probs.append([logp[b, j, t[j]].item() for j in range(len(t))])
        flat = [v for row in token_log_probs for v in row]
        loss_check = -float(np.mean(flat))
        assert abs(loss_check - res.loss.item()) < 1e-4 * max(1.0, abs(loss_check)), (
            name, loss_check, res.loss.item())
        out = {
            "fixture": name,
            "seed": SEED,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "numpy": np.__version__,
            },
            "how": "log_softmax(model(input_ids, attention_mask, labels).logits) gathered at the "
                   "labels; fp32; padded batch of all pairs; targets = HF greedy outputs, then "
                   "seeded random ids",
            "inputs": srcs,
            "targets": tgts,
            "token_log_probs": token_log_probs,
            "loss": res.loss.item(),
        }
        (out_dir / "scores.json").write_text(json.dumps(out) + "\n")
        print(f"{name}: {len(pairs)} pairs, {len(flat)} tokens, HF loss {res.loss.item():.4f}")


if __name__ == "__main__":
    main()
