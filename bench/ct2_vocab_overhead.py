#!/usr/bin/env python3
"""How much the old harness charged CTranslate2 for rebuilding its 32,128-entry reverse
vocabulary inside the timed call (the audit's item 5): case a (1 x 32 tokens, 32 new) on the
t5-small weights of bench/run_peers.py, timed both ways in one process, alternating; and the rebuild alone, which is the cost the
old harness added to every timed call (the end-to-end difference is within this VM's
run-to-run noise).

    .venv-bench/bin/python bench/ct2_vocab_overhead.py
"""

import statistics
import sys
import time
from pathlib import Path

import ctranslate2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from run_peers import CASES, synthetic_inputs  # noqa: E402

VOCAB = 32128


def main():
    import timeit
    build = lambda: {f"t{i}": i for i in range(3, VOCAB)} | {"<pad>": 0, "</s>": 1, "<unk>": 2}
    ms = min(timeit.repeat(build, number=10, repeat=5)) / 10 * 1e3
    print(f"building the reverse vocabulary: {ms:.1f} ms (best of 5 x 10)")
    for quant in ("int8", "float32"):
        tr = ctranslate2.Translator(str(ROOT / "bench" / "models" / "t5-small" / f"ct2-{quant}"),
                                    device="cpu", inter_threads=1, intra_threads=2)
        batch, length, new = CASES["a"]
        src = [[f"t{i}" for i in row] for row in synthetic_inputs(batch, length, VOCAB)]
        outside = {f"t{i}": i for i in range(3, VOCAB)} | {"<pad>": 0, "</s>": 1, "<unk>": 2}

        def call(build_inside):
            t0 = time.perf_counter()
            res = tr.translate_batch(src, beam_size=1, max_decoding_length=new,
                                     min_decoding_length=new, max_batch_size=batch)
            tok = ({f"t{i}": i for i in range(3, VOCAB)} | {"<pad>": 0, "</s>": 1, "<unk>": 2}
                   if build_inside else outside)
            [[tok[t] for t in r.hypotheses[0]] for r in res]
            return time.perf_counter() - t0

        call(True), call(False)  # warm-up
        inside, out = [], []
        for _ in range(15):
            inside.append(call(True))
            out.append(call(False))
        a, b = statistics.median(inside), statistics.median(out)
        print(f"CT2 {quant} case a: {batch * new / a:.1f} tokens/s with the vocabulary built in the "
              f"timed call, {batch * new / b:.1f} without ({(a - b) * 1e3:.1f} ms a call, "
              f"{(a / b - 1) * 100:.1f}% of its time)")


if __name__ == "__main__":
    main()
