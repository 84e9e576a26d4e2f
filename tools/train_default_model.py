#!/usr/bin/env python3
"""Train the bundled default model: a small T5 that spells out numbers.

    spell: 1984  ->  one thousand nine hundred eighty-four

Usage (from the repo root, after `tools/setup_venv.sh`):

    .venv/bin/python tools/train_default_model.py --out models/spell-numbers

Everything is seeded; the script records versions, seed and the recipe in
`training.json` beside the weights. The held-out set (numbers never seen in training)
is written to `heldout.jsonl` so that t5rt can measure its own exact match on it.
"""

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import transformers
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import T5Config, T5ForConditionalGeneration

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
MAX_NUMBER = 999_999


def below_100(n: int) -> str:
    if n < 20:
        return ONES[n]
    tens, units = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[units]}" if units else "")


def below_1000(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    parts = []
    if hundreds:
        parts.append(f"{ONES[hundreds]} hundred")
    if rest or not hundreds:
        parts.append(below_100(rest))
    return " ".join(parts)


def spell(n: int) -> str:
    """American English, no 'and': 1984 -> 'one thousand nine hundred eighty-four'."""
    thousands, rest = divmod(n, 1000)
    parts = []
    if thousands:
        parts.append(f"{below_1000(thousands)} thousand")
    if rest or not thousands:
        parts.append(below_1000(rest))
    return " ".join(parts)


def sample_number(rng: random.Random) -> int:
    # Uniform over the number of digits, so small numbers are not drowned out.
    digits = rng.randint(1, 6)
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


def build_tokenizer() -> Tokenizer:
    """A SentencePiece-style unigram tokenizer whose pieces are the task's words.

    Whole words (with and without the `▁` word-start marker), digits, punctuation and
    single letters as a fallback; ids 0, 1, 2 are `<pad>`, `</s>`, `<unk>` as in T5.
    """
    words = ONES + TENS[2:] + ["hundred", "thousand", "spell"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0) for w in words] + [(w, -3.0) for w in words]
    pieces += [(c, -2.0) for c in list("0123456789") + ["-", ":", "\u2581"]]
    pieces += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1
    assert tok.token_to_id("<unk>") == 2
    return tok


def encode_batch(tok: Tokenizer, texts, device="cpu"):
    encs = [tok.encode(t).ids for t in texts]
    width = max(len(e) for e in encs)
    ids = torch.zeros((len(encs), width), dtype=torch.long)
    mask = torch.zeros((len(encs), width), dtype=torch.long)
    for i, e in enumerate(encs):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids.to(device), mask.to(device)


def exact_match(model, tok, numbers, batch=256) -> float:
    model.eval()
    good = 0
    with torch.no_grad():
        for i in range(0, len(numbers), batch):
            chunk = numbers[i : i + batch]
            ids, mask = encode_batch(tok, [f"spell: {n}" for n in chunk])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40,
                                 do_sample=False, num_beams=1)
            for n, row in zip(chunk, out.tolist()):
                good += tok.decode(row, skip_special_tokens=True) == spell(n)
    model.train()
    return good / len(numbers)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/spell-numbers")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--heldout", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    padded_vocab = (vocab + 7) // 8 * 8

    # Held-out numbers are drawn from 1000..999999 only: every number below 1000 is a word
    # pattern the model must see in training (all ten one-digit numbers would otherwise
    # likely land in the held-out set and never be learnt).
    heldout = set()
    while len(heldout) < args.heldout:
        n = sample_number(rng)
        if n >= 1000:
            heldout.add(n)
    heldout = sorted(heldout, key=lambda n: (len(str(n)), n))
    eval_numbers = random.Random(args.seed + 1).sample(heldout, min(300, len(heldout)))

    config = T5Config(
        vocab_size=padded_vocab, d_model=128, d_kv=32, d_ff=512, num_layers=3,
        num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = 200

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    held = set(heldout)
    log = []
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        numbers = []
        while len(numbers) < args.batch:
            n = sample_number(rng)
            if n not in held:
                numbers.append(n)
        ids, mask = encode_batch(tok, [f"spell: {n}" for n in numbers])
        labels, _ = encode_batch(tok, [spell(n) for n in numbers])
        labels[labels == 0] = -100
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % 1000 == 0 or step == args.steps - 1:
            em = exact_match(model, tok, eval_numbers)
            log.append({"step": step + 1, "loss": loss.item(), "eval_exact_match": em})
            print(f"  eval exact match {em:.4f}", flush=True)

    model.eval()
    final_em = exact_match(model, tok, heldout)
    print(f"HF greedy exact match on {len(heldout)} held-out numbers: {final_em:.4f}")
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    with open(out / "heldout.jsonl", "w") as f:
        for n in heldout:
            f.write(json.dumps({"text": f"spell: {n}", "expected": spell(n)}) + "\n")
    params = sum(p.numel() for p in model.parameters())
    (out / "training.json").write_text(json.dumps({
        "task": "spell out integers 0..999999 in American English words",
        "heldout_range": "1000..999999 (numbers below 1000 are all trainable)",
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "optimizer": "AdamW(weight_decay=0.01), 200 warm-up steps, cosine decay, clip 1.0",
        "parameters": params, "vocab_size": vocab,
        "heldout_numbers": len(heldout), "hf_greedy_exact_match": final_em,
        "eval_log": log, "train_seconds": round(time.time() - t0),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
