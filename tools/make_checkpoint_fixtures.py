#!/usr/bin/env python3
"""Make the fixtures of the checkpoint-format tests (tests/fixtures/formats/), from Hugging Face
transformers, sentencepiece and torch:

  torch-bin/          a tiny random T5 saved three ways: safetensors/ (model.safetensors),
                      bin/ (pytorch_model.bin, torch.save's zip) and bin-sharded/
                      (pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json), with
                      reference.json: HF's greedy outputs for a few inputs (the Rust tests
                      require all three to give them)
  evil-bin/           a pytorch_model.bin whose pickle calls os.system (made with torch.save of
                      an object whose __reduce__ names it): t5rt must refuse it, run nothing
  spiece/             a SentencePiece Unigram model trained here on a small text, in a T5
                      checkpoint layout (spiece.model + tokenizer_config.json as HF saves it),
                      and reference.json: several hundred strings (accents, CJK, emoji,
                      whitespace runs, empty strings, sentinels) with the ids of HF's slow
                      T5Tokenizer and of the fast one converted from it, and their decodings
  byt5.json           HF ByT5Tokenizer: strings -> ids, and id lists (some invalid UTF-8) ->
                      decoded text

Versions and seeds are recorded in each reference.json.

    .venv/bin/pip install sentencepiece protobuf     # besides tools/requirements.txt
    .venv/bin/python tools/make_checkpoint_fixtures.py
"""

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
import transformers
from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5ForConditionalGeneration, T5Tokenizer, T5TokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "formats"
SEED = 20261126


def versions():
    import importlib.metadata as md
    return {p: md.version(p) for p in ("torch", "transformers", "tokenizers", "sentencepiece", "safetensors")}


def torch_bin():
    torch.manual_seed(SEED)
    cfg = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    base = OUT / "torch-bin"
    shutil.rmtree(base, ignore_errors=True)
    model.save_pretrained(base / "safetensors", safe_serialization=True)
    model.save_pretrained(base / "bin", safe_serialization=False)
    model.save_pretrained(base / "bin-sharded", safe_serialization=False, max_shard_size="100KB")
    for d in ("bin", "bin-sharded"):
        assert not list((base / d).glob("*.safetensors")), d
    assert len(list((base / "bin-sharded").glob("pytorch_model-*.bin"))) > 1
    rng = random.Random(SEED)
    inputs = [[rng.randrange(2, 384) for _ in range(n)] + [1] for n in (3, 9, 1, 14)]
    outputs = []
    for ids in inputs:
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, num_beams=1)
        outputs.append(out[0, 1:].tolist())
    assert len({tuple(o) for o in outputs}) > 1, "outputs do not vary"
    (base / "reference.json").write_text(json.dumps(
        {"versions": versions(), "seed": SEED, "inputs": inputs, "max_new_tokens": 12,
         "outputs": outputs}, indent=1) + "\n")


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/t5rt-pickle-ran",))


def evil_bin():
    d = OUT / "evil-bin"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(OUT / "torch-bin" / "bin", d)
    state = {"shared.weight": torch.zeros(2, 2), "payload": Evil()}
    torch.save(state, d / "pytorch_model.bin")


TEXT = """The quick brown fox jumps over the lazy dog. Translate English to German: How old are you?
summarize: studies have shown that owning a dog is good for you. Café, naïve, résumé, Ångström.
Москва — столица России. 東京は日本の首都です。 北京是中国的首都。 서울은 한국의 수도입니다.
question: what is the capital of France? context: Paris is the capital and largest city of France.
Numbers 1984, 3.14159, 42 and 1,000,000. Emoji 😀🎉👍 and symbols €£¥ © ® ™ … « » „ “ ”.
""" * 20


def strings():
    base = [
        "", " ", "   ", "\t", "\n", "a", "Hello world", "Hello  world", "  leading", "trailing  ",
        "multiple   spaces   inside", "tabs\tand\nnewlines", "Café naïve résumé", "ÅNGSTRÖM",
        "東京は日本の首都です", "北京是中国的首都", "서울은 한국의 수도입니다", "Москва — столица",
        "😀🎉👍", "a😀b", "€£¥", "<extra_id_0>", "fill <extra_id_0> the <extra_id_1> blanks",
        "<extra_id_99> end", "x<extra_id_5>y", "</s>", "a </s> b", "<pad>", "<unk>",
        "translate English to German: How old are you?", "zzzzzzzzzz", "1984", "3.14159",
        "ﬁ ligature", "e\u0301 combining", "\u00a0nbsp", "ZW\u200bspace", "full-width ＡＢＣ",
    ]
    rng = random.Random(SEED)
    words = TEXT.split()
    for _ in range(400):
        n = rng.randint(1, 12)
        s = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.2:
            s = s.replace(" ", "  ")
        if rng.random() < 0.1:
            s = f"<extra_id_{rng.randint(0, 99)}> " + s
        base.append(s)
    return base


def corpus():
    """A few thousand lines of varied text: the fixed sentences, and seeded random words made of
    Latin syllables (some accented), Cyrillic, CJK characters, digits and emoji."""
    rng = random.Random(SEED)
    latin = [c + v for c in "bcdfghjklmnprstvwz" for v in ["a", "e", "i", "o", "u", "é", "ö", "à"]]
    cyr = list("абвгдежзиклмнопрстуфхцчшщыэюя")
    lines = TEXT.splitlines()
    for _ in range(3000):
        words = []
        for _ in range(rng.randint(3, 12)):
            kind = rng.random()
            if kind < 0.6:
                words.append("".join(rng.choice(latin) for _ in range(rng.randint(1, 4))))
            elif kind < 0.75:
                words.append("".join(rng.choice(cyr) for _ in range(rng.randint(2, 7))))
            elif kind < 0.9:
                words.append("".join(chr(rng.randint(0x4E00, 0x4E80)) for _ in range(rng.randint(1, 3))))
            elif kind < 0.97:
                words.append(str(rng.randint(0, 100000)))
            else:
                words.append(rng.choice("😀🎉👍€£"))
        lines.append(" ".join(words))
    return "\n".join(lines) + "\n"


def sentencepiece_fixture():
    d = OUT / "spiece"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus_path = Path(tmp) / "corpus.txt"
        corpus_path.write_text(corpus())
        spm.SentencePieceTrainer.train(
            input=str(corpus_path), model_prefix=str(Path(tmp) / "spiece"), vocab_size=400,
            model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            character_coverage=1.0, num_threads=1)
        shutil.copy(Path(tmp) / "spiece.model", d / "spiece.model")
    slow = T5Tokenizer(str(d / "spiece.model"), extra_ids=100)
    slow.save_pretrained(str(d / "hf-slow"))
    # The fast tokenizer a user gets from a checkpoint that ships only spiece.model and
    # tokenizer_config.json: AutoTokenizer converts the slow one.
    fast = AutoTokenizer.from_pretrained(str(d / "hf-slow"), use_fast=True)
    assert isinstance(fast, T5TokenizerFast)
    # Only tokenizer_config.json is kept (the tests read its options); spiece.model is at d.
    for f in (d / "hf-slow").iterdir():
        if f.name != "tokenizer_config.json":
            f.unlink()
    cases = []
    for s in strings():
        ids_slow = slow(s).input_ids
        ids_fast = fast(s).input_ids
        cases.append({"text": s, "slow": ids_slow, "fast": ids_fast,
                      "decoded_fast": fast.decode(ids_fast, skip_special_tokens=True),
                      "decoded_slow": slow.decode(ids_slow, skip_special_tokens=True)})
    agree = sum(c["slow"] == c["fast"] for c in cases)
    (d / "reference.json").write_text(json.dumps(
        {"versions": versions(), "seed": SEED, "vocab_size": 400, "extra_ids": 100,
         "slow_fast_agree": agree, "cases": cases}, indent=1, ensure_ascii=False) + "\n")
    print(f"spiece: {len(cases)} strings, slow and fast agree on {agree}")


def byt5_fixture():
    tok = ByT5Tokenizer()
    rng = random.Random(SEED)
    encode = [{"text": s, "ids": tok(s).input_ids} for s in strings()]
    decode = []
    for _ in range(200):
        ids = [rng.choice([0, 1, 2] + list(range(3, 259)) + [259, 300, 383]) for _ in range(rng.randint(0, 12))]
        decode.append({"ids": ids, "text": tok.decode(ids, skip_special_tokens=True)})
    # Invalid UTF-8 runs on purpose: lone continuation bytes, truncated sequences.
    for bad in ([0x80], [0xe4, 0xb8], [0x61, 0xff, 0x62], [0xf0, 0x9f, 0x98], [0xc3, 0x28]):
        ids = [b + 3 for b in bad]
        decode.append({"ids": ids, "text": tok.decode(ids, skip_special_tokens=True)})
    (OUT / "byt5.json").write_text(json.dumps(
        {"versions": versions(), "seed": SEED, "extra_id_0": tok.convert_tokens_to_ids("<extra_id_0>"),
         "vocab_size": len(tok), "encode": encode, "decode": decode}, indent=1, ensure_ascii=False) + "\n")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch_bin()
    evil_bin()
    sentencepiece_fixture()
    byt5_fixture()
    print("transformers", transformers.__version__, "->", OUT)


if __name__ == "__main__":
    main()
