#!/usr/bin/env python3
"""Make tests/fixtures/fp16-overflow/: a tiny T5 v1.1-style model (gated-gelu FFN) whose
feed-forward activations exceed fp16's 65504 for some inputs, as FLAN-T5-XL's do, with
reference.json recording:

  - HF in fp32: greedy outputs (finite logits) for the inputs;
  - HF in fp16 (`model.half()`, the whole model in half precision, as engines that "just use
    fp16" run it): whether its encoder output and logits hold inf or NaN on each input;
  - the largest |FFN activation| (the gated product entering `wo`) per input in fp32
    (> 65504 for the overflowing ones).

The t5rt GPU test requires fp16 to give finite logits and the fp32 tokens on every input.

    .venv/bin/python tools/make_fp16_fixture.py
"""

import json
import shutil
from pathlib import Path

import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "fp16-overflow"
SEED = 20261126


def main():
    torch.manual_seed(SEED)
    cfg = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        # An outlier dimension, as FLAN-T5-XL has: tokens >= 64 put nearly all their norm in
        # dimension 0, and the encoder's first FFN reads dimension 0 with large weights. Their
        # gated product (the input of `wo`) goes far past 65504; other tokens' stay below.
        model.shared.weight[64:] *= 0.05
        model.shared.weight[64:, 0] = 40.0
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0)  # RMSNorm weights as trained models have them, about 1
        ffn = model.encoder.block[0].layer[1].DenseReluDense
        ffn.wi_0.weight[:, 0] = 100.0
        ffn.wi_1.weight[:, 0] = 100.0
    inputs = [[5, 9, 13, 1], [70, 90, 100, 1], [7, 80, 3, 44, 1], [2, 3, 1], [120, 121, 122, 123, 1]]

    peaks = []

    def pre_hook(_m, args):
        peaks[-1] = max(peaks[-1], args[0].detach().abs().max().item())

    handle = model.encoder.block[0].layer[1].DenseReluDense.wo.register_forward_pre_hook(pre_hook)
    outputs = []
    for ids in inputs:
        peaks.append(0.0)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, num_beams=1)
        outputs.append(out[0, 1:].tolist())
    handle.remove()
    half = T5ForConditionalGeneration(cfg).eval()
    half.load_state_dict(model.state_dict())
    half = half.half()
    fp16 = []
    for ids in inputs:
        with torch.no_grad():
            enc = half.encoder(input_ids=torch.tensor([ids])).last_hidden_state
            dec = half(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([[0] + outputs[len(fp16)][:-1]]))
        fp16.append({"encoder_finite": bool(torch.isfinite(enc).all()),
                     "logits_finite": bool(torch.isfinite(dec.logits).all())})
    overflowing = [i for i, p in enumerate(peaks) if p > 65504]
    broken = [i for i, f in enumerate(fp16) if not (f["encoder_finite"] and f["logits_finite"])]
    print("peaks", [f"{p:.3g}" for p in peaks], "fp16", fp16)
    assert overflowing, "no input overflows fp16"
    assert broken, "HF fp16 stays finite on every input: the fixture does not reproduce the bug"
    assert len(overflowing) < len(inputs), "every input overflows"
    shutil.rmtree(OUT, ignore_errors=True)
    model.save_pretrained(OUT, safe_serialization=True)
    import importlib.metadata as md
    (OUT / "reference.json").write_text(json.dumps({
        "versions": {p: md.version(p) for p in ("torch", "transformers")},
        "seed": SEED, "inputs": inputs, "max_new_tokens": 10, "fp32_outputs": outputs,
        "fp32_ffn_peak": peaks, "hf_fp16": fp16, "overflowing_inputs": overflowing,
        "hf_fp16_broken_inputs": broken}, indent=1) + "\n")
    print("transformers", transformers.__version__, "->", OUT)


if __name__ == "__main__":
    main()
