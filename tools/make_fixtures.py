#!/usr/bin/env python3
"""Make the parity fixtures the Rust tests compare against, from Hugging Face transformers (fp32).

For each tiny variant (t5 v1.0 relu tied, T5 v1.1 gated-gelu untied, mT5-like) it builds a
random model with a seeded, re-scaled initialisation (HF's default init makes tied models emit
the start token forever, which would make token parity vacuous), saves it as a checkpoint as
published (config.json + safetensors; stored as f32, bf16 or f16, one sharded), and dumps:

  reference.safetensors  encoder hidden states [B, L, d] and teacher-forced decoder logits
                         [B, S, V] for a padded batch of inputs of mixed lengths
  reference.json         versions, seed, inputs, greedy outputs (with and without
                         min_new_tokens), the decoder inputs used for the logits, and HF's
                         relative-position buckets for a range of distances

It does the same for the bundled model (models/spell-numbers) on held-out inputs.
The script asserts that greedy outputs vary between inputs and across steps, and that some
sequences stop at EOS while others run to the limit.

    .venv/bin/python tools/make_fixtures.py            # writes tests/fixtures/
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import tokenizers
import torch
import transformers
from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

ROOT = Path(__file__).resolve().parent.parent
SEED = 20261126

VARIANTS = {
    # t5 v1.0: relu, tied embeddings (d_model ** -0.5 before the shared head), f32 storage.
    "t5-v1_0": dict(
        cls="t5", storage="float32", shard=None, eos_boost=2.2, residual_gain=20.0,
        config=dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                    num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, feed_forward_proj="relu",
                    tie_word_embeddings=True),
    ),
    # T5 v1.1 / FLAN-T5: gated-gelu, untied lm_head; short max_distance to reach the log
    # buckets and their cap with short inputs; bf16 storage.
    "t5-v1_1": dict(
        cls="t5", storage="bfloat16", shard=None, eos_boost=2.2, residual_gain=3.0,
        config=dict(vocab_size=320, d_model=48, d_kv=12, d_ff=96, num_layers=2,
                    num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                    relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False),
    ),
    # mT5-like: model_type mt5, larger vocab, heads * d_kv != d_model, f16 storage, sharded.
    "mt5": dict(
        cls="mt5", storage="float16", shard="150KB", eos_boost=2.2, residual_gain=3.0,
        config=dict(vocab_size=1000, d_model=64, d_kv=8, d_ff=112, num_layers=3,
                    num_decoder_layers=2, num_heads=6, relative_attention_num_buckets=16,
                    relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False),
    ),
}

INPUT_LENGTHS = [3, 11, 1, 29, 7, 18, 40]  # plus the trailing EOS each
MAX_NEW_TOKENS = 24
MIN_NEW_TOKENS = (8, 12)  # (min_new_tokens, max_new_tokens) of the second greedy run
LOGIT_STEPS = 6
BEAM_MAX_NEW_TOKENS = 12
# Beam search and processor cases (HF generate() keyword arguments), run on the padded batch.
BEAM_CASES = [
    dict(num_beams=2, length_penalty=1.0, early_stopping=False, num_return_sequences=1),
    dict(num_beams=4, length_penalty=1.0, early_stopping=True, num_return_sequences=2),
    dict(num_beams=3, length_penalty=0.6, early_stopping="never", num_return_sequences=3),
    dict(num_beams=4, length_penalty=2.0, early_stopping=False, num_return_sequences=4,
         no_repeat_ngram_size=2),
    dict(num_beams=4, length_penalty=-0.5, early_stopping=False, num_return_sequences=2,
         repetition_penalty=1.5),
    dict(num_beams=5, length_penalty=1.0, early_stopping="never", num_return_sequences=2,
         min_new_tokens=4, no_repeat_ngram_size=3, repetition_penalty=0.8),
]
GREEDY_PROCESSOR_CASES = [
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=3, repetition_penalty=1.3),
    dict(repetition_penalty=0.7, min_new_tokens=3),
]
RELPOS_RANGE = 300


def versions():
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
            "numpy": np.__version__}


def reinit(model, seed, eos_boost, residual_gain=3.0, q_gain=1.0, eos_id=1):
    """Seeded normal init with per-matrix scales chosen so greedy outputs vary.

    The residual-producing projections (attention `o`, FFN `wo`) get `residual_gain` times the
    usual 1/sqrt(fan_in) scale, so the layers outweigh the token's own embedding in the residual
    stream; otherwise a tied model mostly predicts the token it was fed. `q_gain` scales the
    query projections (d_kv ** -0.5 gives T5's own init, where the attention scaling is folded
    into q; without it attention logits are sqrt(d_kv) times larger and, over many layers,
    amplify rounding noise until f32 itself cannot decide greedy tokens).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5)
            elif name in ("shared.weight",) or "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # Linear weights [out, in]
                gain = residual_gain if name.endswith((".o.weight", ".wo.weight")) else 1.0
                gain *= q_gain if name.endswith(".q.weight") else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / p.shape[1] ** 0.5)
        # Make EOS likely enough that some sequences stop early and others do not.
        head = model.shared.weight if model.config.tie_word_embeddings else model.lm_head.weight
        head[eos_id] *= eos_boost
    return model


@torch.no_grad()
def beam_reference(model, inputs, case):
    """HF beam search on the padded batch: per input, n-best ids and sequence scores."""
    ids, mask = pad_batch(inputs)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=BEAM_MAX_NEW_TOKENS,
                         do_sample=False, use_cache=False, return_dict_in_generate=True,
                         output_scores=True, **case)
    n = case["num_return_sequences"]
    eos = model.config.eos_token_id
    rows = [strip_generated(r, eos) for r in out.sequences.tolist()]
    scores = out.sequences_scores.tolist()
    return {"params": dict(case, max_new_tokens=BEAM_MAX_NEW_TOKENS),
            "outputs": [rows[i * n:(i + 1) * n] for i in range(len(inputs))],
            "scores": [scores[i * n:(i + 1) * n] for i in range(len(inputs))]}


@torch.no_grad()
def greedy_processor_reference(model, inputs, case):
    ids, mask = pad_batch(inputs)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS,
                         do_sample=False, num_beams=1, use_cache=False, **case)
    eos = model.config.eos_token_id
    return {"params": dict(case, max_new_tokens=MAX_NEW_TOKENS),
            "outputs": [strip_generated(r, eos) for r in out.tolist()]}


def pad_batch(seqs, pad=0):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def strip_generated(row, eos):
    """HF output row (start token first, pad after EOS) -> ids after start, up to EOS."""
    row = row[1:]
    return row[: row.index(eos) + 1] if eos in row else row


@torch.no_grad()
def greedy(model, inputs, max_new_tokens, min_new_tokens=0):
    # use_cache=False: transformers 4.57's cache assumes num_decoder_layers == num_layers.
    ids, mask = pad_batch(inputs)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         min_new_tokens=min_new_tokens, do_sample=False, num_beams=1,
                         use_cache=False)
    eos = model.config.eos_token_id
    return [strip_generated(r, eos) for r in out.tolist()]


@torch.no_grad()
def reference(model, inputs):
    """Greedy outputs, encoder states and teacher-forced logits for a padded batch."""
    cfg = model.config
    outputs = greedy(model, inputs, MAX_NEW_TOKENS)
    outputs_min = greedy(model, inputs, MIN_NEW_TOKENS[1], MIN_NEW_TOKENS[0])
    ids, mask = pad_batch(inputs)
    enc = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    dec_in = [([cfg.decoder_start_token_id] + o)[:LOGIT_STEPS] for o in outputs]
    dec_in = [d + [cfg.pad_token_id] * (LOGIT_STEPS - len(d)) for d in dec_in]
    logits = model(input_ids=ids, attention_mask=mask,
                   decoder_input_ids=torch.tensor(dec_in), use_cache=False).logits
    tensors = {"encoder_hidden": enc.contiguous(), "logits": logits.contiguous()}
    # Bad words: the first two tokens of the first long greedy output, so the ban bites.
    long_out = next(o for o in outputs if len(o) >= 3)
    processor_cases = GREEDY_PROCESSOR_CASES + [
        dict(bad_words_ids=[[long_out[0]], [long_out[1], long_out[2]]])]
    meta = {
        "beam": [beam_reference(model, inputs, case) for case in BEAM_CASES],
        "greedy_processors": [greedy_processor_reference(model, inputs, c) for c in processor_cases],
        "inputs": inputs,
        "greedy": {"max_new_tokens": MAX_NEW_TOKENS, "min_new_tokens": 0, "outputs": outputs},
        "greedy_min": {"max_new_tokens": MIN_NEW_TOKENS[1], "min_new_tokens": MIN_NEW_TOKENS[0],
                       "outputs": outputs_min},
        "decoder_input_ids": dec_in,
    }
    return tensors, meta


def relpos_buckets(cfg):
    rel = torch.arange(-RELPOS_RANGE, RELPOS_RANGE + 1)
    out = {"relative": rel.tolist(), "num_buckets": cfg.relative_attention_num_buckets,
           "max_distance": cfg.relative_attention_max_distance}
    for key, bidi in (("bidirectional", True), ("causal", False)):
        out[key] = T5Attention._relative_position_bucket(
            rel, bidirectional=bidi, num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance).tolist()
    return out


def check_variety(name, meta, max_new):
    outs = meta["greedy"]["outputs"]
    distinct_seqs = len({tuple(o) for o in outs})
    assert distinct_seqs == len(outs), f"{name}: greedy outputs repeat across inputs: {outs}"
    for o in outs:
        if len(o) >= 5:
            assert len(set(o)) >= 3, f"{name}: an output is stuck on one token: {o}"
    stopped = sum(1 for o in outs if o and o[-1] == 1 and len(o) < max_new)
    assert 0 < stopped < len(outs), f"{name}: want some but not all outputs to end at EOS: {outs}"
    assert any(len(o) == max_new for o in outs), f"{name}: no output reaches max_new_tokens"


def write_fixture(out_dir, tensors, meta):
    safetensors.torch.save_file(tensors, str(out_dir / "reference.safetensors"))
    (out_dir / "reference.json").write_text(json.dumps(meta) + "\n")


def make_variant(name, spec, out_root):
    torch.manual_seed(SEED)
    cfg_cls, model_cls = (MT5Config, MT5ForConditionalGeneration) if spec["cls"] == "mt5" \
        else (T5Config, T5ForConditionalGeneration)
    cfg = cfg_cls(dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                  **spec["config"])
    model = model_cls(cfg).eval()
    reinit(model, SEED, spec["eos_boost"], spec["residual_gain"])
    # Round weights to the storage dtype first, so the reference is the stored model's.
    storage = getattr(torch, spec["storage"])
    model = model.to(storage).to(torch.float32).eval()

    rng = np.random.default_rng(SEED)
    inputs = [[int(t) for t in rng.integers(2, cfg.vocab_size, n)] + [1] for n in INPUT_LENGTHS]
    tensors, meta = reference(model, inputs)
    check_variety(name, meta, MAX_NEW_TOKENS)
    meta.update({"variant": name, "seed": SEED, "storage_dtype": spec["storage"],
                 "versions": versions(), "relpos": relpos_buckets(cfg)})

    out_dir = out_root / name
    shutil.rmtree(out_dir, ignore_errors=True)
    save_kwargs = {"safe_serialization": True}
    if spec["shard"]:
        save_kwargs["max_shard_size"] = spec["shard"]
    model.to(storage).save_pretrained(out_dir, **save_kwargs)
    write_fixture(out_dir, tensors, meta)
    stopped = sum(1 for o in meta["greedy"]["outputs"] if o[-1] == 1)
    print(f"{name}: {len(inputs)} inputs, {stopped} stop at EOS, outputs "
          f"{[len(o) for o in meta['greedy']['outputs']]} tokens long")


def make_bundled(model_dir, out_root, count=48):
    model = T5ForConditionalGeneration.from_pretrained(model_dir).eval()
    tok = tokenizers.Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    lines = (Path(model_dir) / "heldout.jsonl").read_text().splitlines()
    texts = [json.loads(l)["text"] for l in lines]
    step = max(1, len(texts) // count)
    texts = texts[::step][:count]
    inputs = [tok.encode(t).ids for t in texts]
    tensors, meta = reference(model, inputs)
    meta.update({"variant": "spell-numbers", "texts": texts,
                 "decoded": [tok.decode(o, skip_special_tokens=True)
                             for o in meta["greedy"]["outputs"]],
                 "versions": versions(), "relpos": relpos_buckets(model.config)})
    out_dir = out_root / "spell-numbers"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    write_fixture(out_dir, tensors, meta)
    print(f"spell-numbers: {len(inputs)} held-out inputs")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures"))
    ap.add_argument("--bundled", default=str(ROOT / "models" / "spell-numbers"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    for name, spec in VARIANTS.items():
        make_variant(name, spec, out_root)
    if (Path(args.bundled) / "model.safetensors").is_file():
        make_bundled(args.bundled, out_root)
    else:
        print(f"skipping the bundled model: {args.bundled} has no model.safetensors")


if __name__ == "__main__":
    main()
