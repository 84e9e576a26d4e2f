"""The Python package against the CLI (the same engine through the `t5rt` binary): every
argument, error mapping, streaming, numpy input, threads, Ctrl-C.

Run by .ci/run after `pip install ./crates/t5rt-py` into .venv-py; needs the CLI binary
(target/release/t5rt, built by `cargo test --release`) for the comparisons.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import t5rt

ROOT = Path(__file__).resolve().parents[3]
CLI = ROOT / "target" / "release" / "t5rt"
FIXTURES = ROOT / "tests" / "fixtures"
TEXTS = ["spell: 1984", "spell: 7", "spell: 31337", "spell: 500000", "spell: 12"]


@pytest.fixture(scope="module")
def model():
    return t5rt.Model(threads=2)


def cli(texts, *flags, model_dir=None):
    """`t5rt generate` on the same inputs: its JSONL output lines."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("".join(t + "\n" for t in texts))
    cmd = [str(CLI), "generate", "--input", f.name, "--output", "-", "--threads", "2", *flags]
    if model_dir:
        cmd += ["--model", str(model_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    os.unlink(f.name)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def cli_error(*args):
    out = subprocess.run([str(CLI), "generate", *args], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.startswith("error: ")
    return out.stderr.strip()


def test_bundled_model_spells(model):
    assert model.generate("spell: 1984") == "one thousand nine hundred eighty-four"
    assert model.generate(["spell: 7", "spell: 12"]) == ["seven", "twelve"]
    assert "t5rt.Model" in repr(model)
    assert t5rt.Model.from_pretrained().generate("spell: 3") == "three"


# (python keyword arguments, the same as CLI flags)
OPTIONS = [
    ({}, []),
    ({"max_new_tokens": 3}, ["--max-new-tokens", "3"]),
    ({"min_new_tokens": 9, "max_new_tokens": 12}, ["--min-new-tokens", "9", "--max-new-tokens", "12"]),
    ({"num_beams": 4}, ["--num-beams", "4"]),
    ({"num_beams": 3, "length_penalty": 0.5, "early_stopping": True},
     ["--num-beams", "3", "--length-penalty", "0.5", "--early-stopping", "true"]),
    ({"num_beams": 3, "early_stopping": "never"}, ["--num-beams", "3", "--early-stopping", "never"]),
    ({"do_sample": True, "seed": 3}, ["--do-sample", "--seed", "3"]),
    ({"do_sample": True, "seed": 5, "temperature": 1.7, "top_k": 5, "top_p": 0.9},
     ["--do-sample", "--seed", "5", "--temperature", "1.7", "--top-k", "5", "--top-p", "0.9"]),
    ({"repetition_penalty": 1.5, "no_repeat_ngram_size": 2},
     ["--repetition-penalty", "1.5", "--no-repeat-ngram-size", "2"]),
    ({"stop": "hundred"}, ["--stop", "hundred"]),
    ({"stop": ["thousand", "seven"]}, ["--stop", "thousand", "--stop", "seven"]),
    ({"batch_size": 2}, ["--batch-size", "2"]),
]


@pytest.mark.parametrize("kwargs,flags", OPTIONS)
def test_every_option_equals_the_cli(model, kwargs, flags):
    got = model.generate(TEXTS, **kwargs)
    want = [line["text"] for line in cli(TEXTS, *flags)]
    assert got == want


def test_n_best_and_details_equal_the_cli(model):
    got = model.generate(TEXTS, num_beams=4, num_return_sequences=3, return_details=True)
    want = cli(TEXTS, "--num-beams", "4", "--num-return-sequences", "3")
    assert len(got) == len(want)
    for hyps, line in zip(got, want):
        assert [h.ids for h in hyps] == [s["output_ids"] for s in line["sequences"]]
        assert [h.text for h in hyps] == [s["text"] for s in line["sequences"]]
        assert [h.score for h in hyps] == pytest.approx([s["score"] for s in line["sequences"]], rel=1e-6)
    strings = model.generate(TEXTS[:2], num_beams=4, num_return_sequences=3)
    assert strings == [[h.text for h in hyps] for hyps in got[:2]]
    single = model.generate("spell: 7", return_details=True)
    assert isinstance(single, t5rt.GenerationResult)
    assert single.text == "seven" and single.score is None and single.ids[-1] == 1


def test_sampled_copies(model):
    got = model.generate("spell: 42", do_sample=True, num_return_sequences=4, seed=9)
    want = cli(["spell: 42"], "--do-sample", "--num-return-sequences", "4", "--seed", "9")
    assert got == [s["text"] for s in want[0]["sequences"]]


def test_token_id_inputs_lists_and_numpy(model):
    tok = model.tokenizer
    ids = [tok.encode(t) for t in TEXTS[:3]]
    texts = model.generate(TEXTS[:3])
    out = model.generate(ids)
    assert [tok.decode(o) for o in out] == texts
    assert model.generate(ids[0]) == out[0]  # one flat list of ids
    same_len = [tok.encode("spell: 11"), tok.encode("spell: 99")]
    arr = np.array(same_len, dtype=np.int64)
    assert model.generate(arr) == model.generate(same_len)
    assert model.generate(arr.astype(np.int32)) == model.generate(same_len)
    # The fixtures' models have no tokenizer: ids in, ids out, and texts are refused.
    m = t5rt.Model(FIXTURES / "t5-v1_1")
    assert m.tokenizer is None
    ref = json.loads((FIXTURES / "t5-v1_1" / "reference.json").read_text())
    got = m.generate(ref["inputs"], max_new_tokens=ref["greedy"]["max_new_tokens"])
    assert got == ref["greedy"]["outputs"]
    with pytest.raises(ValueError, match="no tokenizer.json"):
        m.generate("hello")


def test_stream_equals_generate(model):
    for kwargs in [{}, {"do_sample": True, "seed": 4}, {"min_new_tokens": 15},
                   {"num_beams": 3}, {"stop": "hundred"}]:
        for text in TEXTS:
            pieces = list(model.generate_stream(text, **kwargs))
            full = model.generate(text, return_details=True, **kwargs)
            assert [i for i, _ in pieces] == full.ids, (text, kwargs)
            assert "".join(p for _, p in pieces) == full.text, (text, kwargs)
    ids = model.tokenizer.encode("spell: 64")
    assert [i for i, _ in model.generate_stream(ids)] == model.generate([ids])[0]


def test_tokenizer_and_config(model):
    tok = model.tokenizer
    ids = tok.encode("spell: 1984")
    assert ids[-1] == 1  # </s>
    assert tok.decode(model.generate([ids])[0]) == "one thousand nine hundred eighty-four"
    assert tok.vocab_size <= model.config["vocab_size"] == 104
    cfg = model.config
    assert cfg["d_model"] == 128 and cfg["eos_token_id"] == 1
    assert "num_beams" in t5rt.Model.generate.__doc__
    assert "yield" in t5rt.Model.generate_stream.__doc__.lower()


def test_errors_map_to_python_exceptions_with_the_cli_messages(model):
    with pytest.raises(FileNotFoundError) as e:
        t5rt.Model("/no/such/model")
    assert "/no/such/model" in str(e.value)
    assert str(e.value) in cli_error("--model", "/no/such/model", "x")
    with pytest.raises(ValueError, match="expected f32, bf16 or int8"):
        t5rt.Model(dtype="fp8")
    with pytest.raises(ValueError, match="CUDA"):
        t5rt.Model(device="cuda")
    with pytest.raises(ValueError, match="threads"):
        t5rt.Model(threads=100000)
    for kwargs, flags in [
        ({"temperature": 0.0, "do_sample": True}, ["--temperature", "0", "--do-sample"]),
        ({"top_p": 1.5, "do_sample": True}, ["--top-p", "1.5", "--do-sample"]),
        ({"num_return_sequences": 3, "num_beams": 2}, ["--num-return-sequences", "3", "--num-beams", "2"]),
        ({"max_new_tokens": 0}, ["--max-new-tokens", "0"]),
        ({"num_beams": 100000}, ["--num-beams", "100000"]),
        ({"max_new_tokens": 10**11}, ["--max-new-tokens", str(10**11)]),
    ]:
        with pytest.raises(ValueError) as e:
            model.generate("spell: 1", **kwargs)
        assert str(e.value) in cli_error(*flags, "spell: 1"), kwargs
    with pytest.raises(ValueError, match="empty"):
        model.generate("")
    with pytest.raises(ValueError, match="empty"):
        model.generate([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([[5, 999]])
    with pytest.raises(ValueError, match="not a valid id"):
        model.generate([[5, -1]])
    with pytest.raises(ValueError, match="2 dimensions"):
        model.generate(np.zeros((2, 2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="early_stopping"):
        model.generate("spell: 1", early_stopping="sometimes")
    for bad in [5, None, {"a": 1}, [1.5, 2.5], ["a", 5]]:
        with pytest.raises(TypeError):
            model.generate(bad)
    with pytest.raises(TypeError):
        model.generate("spell: 1", max_new_tokens="ten")
    with pytest.raises(TypeError):
        model.generate("spell: 1", stop=5)
    with pytest.raises(TypeError):
        model.generate("spell: 1", bogus=1)
    with pytest.raises(OverflowError):
        model.generate("spell: 1", max_new_tokens=-1)


def test_two_threads_on_one_model(model):
    inputs = [f"spell: {n}" for n in range(100, 140)]
    want = model.generate(inputs)
    results = {}

    def work(name):
        results[name] = model.generate(inputs, batch_size=4)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {0: want, 1: want}


def test_ctrl_c_interrupts_a_long_call():
    # The child starts with Python's own Ctrl-C handling whatever it inherits: a SIGINT left
    # blocked or ignored in this test process (say, by a library an earlier test loaded) would
    # pass to it, and the signal would never arrive (the test timed out so once in CI).
    code = (
        "import signal, t5rt, sys\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "m = t5rt.Model(threads=1)\n"
        "print('ready', flush=True)\n"
        "try:\n"
        "    m.generate(['spell: 1'] * 64, min_new_tokens=100000, max_new_tokens=100000)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(3)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    started = time.time()
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 3 and "interrupted" in out
    assert time.time() - started < 10
