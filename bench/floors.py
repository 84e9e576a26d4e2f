#!/usr/bin/env python3
"""Per-cell floors of the f32 speed table: how fast any system could run each case on this
machine, from the work the case needs and the rates the machine showed.

For each model and case (batch B, input L, T new tokens) the model's f32 work is counted:
- the encoder, in FLOPs (a multiply-add counts 2): linear products over B x L tokens plus
  self-attention's scores and mixing (2 x 2 x B x heads x L^2 x d_kv per layer);
- the cross-attention keys and values, projected once per request (B x L tokens);
- each decoding step: the weights a step reads (self q,k,v,o, cross q,o, feed-forward, LM
  head: once per step, whatever the batch), the cross-attention caches (B x L keys and values
  per layer, f32) and the self-attention caches (B x t), and the step's FLOPs (2 x B x the
  step's weights, plus attention over the caches).
The floor's time is the encoder's and the projections' FLOPs at the f32 product rate, plus,
per step, the larger of (bytes / read bandwidth) and (FLOPs / product rate): a roofline.
Greedy search needs only each row's largest logit, and a head screened by an int8 copy gives
the head's own choice exactly (t5rt does so for f32 heads since session 18, with a bf16 copy
since session 15, and for bf16 heads on CPUs without AVX-512 BF16; README "Precision"), so the
f32 and bf16 floors count the LM head at int8's 1 byte a weight and int8's product rate: any
system could do the same. The
read bandwidth is the streaming probe's median in `bench/results/machine_limits.json` (2
threads). The product rate is the highest f32 rate seen on the machine in that session: the
larger of numpy/OpenBLAS's 2048^3 product (`machine_limits.json`) and the fastest encoder pass
of t5rt f32 in the speed table (`bench/results/<model>.json`, from `run_peers.py`, measured in
the same session), whose FLOPs this script counts.

It is an estimate, not a proof: a system can beat it where its products run faster than
OpenBLAS's 2048^3 product did, or where the bandwidth was higher during its run than during the
probe. What it shows is which cells of the speed targets (t5rt f32 at least 1.3x the best f32 peer,
bf16 at least 1.2x and int8 at least 1.5x CTranslate2 int8) no implementation can reach on this
machine, because the peer already runs within that ratio of the floor. bf16 and int8 read 2
and 1 bytes per weight and keep bf16 caches; their product rate is the fastest seen for them
or for f32 (without AVX-512 BF16, bf16 products are f32 products on widened weights).

    python3 bench/floors.py            # prints Markdown tables, writes results/floors.json
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from run_peers import CASES, MODELS  # noqa: E402

F32_PEERS = {"hf": "HF torch", "ort": "ORT", "ct2-float32": "CT2"}
# t5rt precision -> (its system in the speed table, bytes per weight, bytes per cached key or
# value, the target's peer systems, the target ratio, the LM head's bytes per weight and the
# precision of its product rate). Reduced precisions keep bf16 caches; the f32 and bf16
# floors count the greedy head at int8 (a screen any system could run; t5rt runs it for f32,
# and for bf16 at widened kernel levels).
PRECISIONS = {
    "f32": ("t5rt", 4, 4, F32_PEERS, 1.3, 1, "int8"),
    "bf16": ("t5rt-bf16", 2, 2, {"ct2-int8": "CT2 int8"}, 1.2, 1, "int8"),
    "int8": ("t5rt-int8", 1, 2, {"ct2-int8": "CT2 int8"}, 1.5, 1, "int8"),
}


def work(spec, batch, length, new, weight_bytes=4, cache_bytes=4, head_bytes=None):
    """(encoder FLOPs, cross-projection FLOPs, [(bytes, FLOPs, head FLOPs) per decoding step]);
    the LM head's weights at `head_bytes` each (default `weight_bytes`), its FLOPs apart."""
    head_bytes = weight_bytes if head_bytes is None else head_bytes
    d, ff, heads, dkv = spec["d_model"], spec["d_ff"], spec["num_heads"], spec["d_kv"]
    inner = heads * dkv
    gated = spec["feed_forward_proj"].startswith("gated")
    ffn = (3 if gated else 2) * d * ff
    tokens = batch * length
    enc_layer = 2 * tokens * (4 * d * inner + ffn) + 2 * 2 * batch * heads * length**2 * dkv
    cross_kv = 2 * tokens * 2 * d * inner * spec["num_decoder_layers"]
    layers = spec["num_decoder_layers"]
    body_params = layers * (6 * d * inner + ffn)
    head_params = spec["vocab_size"] * d
    steps = []
    for t in range(1, new + 1):
        caches = layers * 2 * inner * batch * (length + t)  # cross and self keys and values
        nbytes = weight_bytes * body_params + head_bytes * head_params + cache_bytes * caches
        flops = 2 * batch * body_params + 2 * 2 * batch * heads * dkv * (length + t) * layers
        steps.append((nbytes, flops, 2 * batch * head_params))
    return enc_layer * spec["num_layers"], cross_kv, steps


def main():
    limits = json.loads((ROOT / "results" / "machine_limits.json").read_text())
    bandwidth = limits["read_bandwidth_gbs"]["2_threads"]["median"] * 1e9
    numpy_rate = limits["f32_matmul_gflops_numpy"] * 1e9
    tables = {name: json.loads((ROOT / "results" / f"{name}.json").read_text())
              for name in MODELS if (ROOT / "results" / f"{name}.json").exists()}

    def seen(system):
        """The fastest encoder pass of `system` in the run, in FLOP/s (0 if none)."""
        return max([work(MODELS[name], *CASES[case])[0] / c["encode_s"]
                    for name, table in tables.items() if system in table
                    for case, c in table[system]["cases"].items() if c.get("encode_s")], default=0)

    f32_rate = max(numpy_rate, seen("t5rt"))
    # Without AVX-512 BF16, bf16 products are f32 products on widened weights.
    rates = {"f32": f32_rate, "bf16": max(f32_rate, seen("t5rt-bf16")),
             "int8": max(f32_rate, seen("t5rt-int8"))}
    out = {"numpy_gflops": numpy_rate / 1e9, "read_bandwidth_gbs": bandwidth / 1e9,
           "product_gflops": {p: r / 1e9 for p, r in rates.items()}, "rows": []}
    print(f"Rates: read bandwidth {bandwidth / 1e9:.1f} GB/s; products (GFLOP/s, the fastest seen "
          f"in the run; numpy's f32 2048^3 product: {numpy_rate / 1e9:.1f}): "
          + ", ".join(f"{p} {r / 1e9:.0f}" for p, r in rates.items()) + ".")
    for prec, (system, wbytes, cbytes, peers, target, hbytes, hrate) in PRECISIONS.items():
        print(f"\n{prec}: target {target}x {' / '.join(peers.values())}\n")
        print("| model | case | peer, tokens/s | t5rt | floor | floor / peer | reachable? | t5rt / floor |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        rate, head_rate = rates[prec], rates[hrate]
        for name, table in tables.items():
            if system not in table:
                continue
            for case, (batch, length, new) in CASES.items():
                enc, cross_kv, steps = work(MODELS[name], batch, length, new, wbytes, cbytes, hbytes)
                floor_s = (enc + cross_kv) / rate + sum(
                    max(b / bandwidth, f / rate + h / head_rate) for b, f, h in steps)
                floor = batch * new / floor_s
                have = {label: table[k]["cases"][case]["tokens_per_s"] for k, label in peers.items()
                        if k in table}
                peer = max(have, key=have.get)
                ours = table[system]["cases"][case]["tokens_per_s"]
                row = {"precision": prec, "model": name, "case": case, "peer": peer,
                       "peer_tps": have[peer], "target": target, "t5rt_tps": ours, "floor_tps": floor,
                       "floor_over_peer": floor / have[peer], "reachable": floor / have[peer] >= target,
                       "t5rt_over_floor": ours / floor}
                out["rows"].append(row)
                print(f"| {name} | {case} | {peer} {have[peer]:.1f} | {ours:.1f} | {floor:.1f} "
                      f"| {row['floor_over_peer']:.2f}x | {'yes' if row['reachable'] else 'no'} "
                      f"| {row['t5rt_over_floor']:.2f}x |")
    (ROOT / "results" / "floors.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
