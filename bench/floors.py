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
per step, the larger of (bytes / read bandwidth) and (FLOPs / product rate): a roofline. The
read bandwidth is the streaming probe's median in `bench/results/machine_limits.json` (2
threads). The product rate is the highest f32 rate seen on the machine in that session: the
larger of numpy/OpenBLAS's 2048^3 product (`machine_limits.json`) and the fastest encoder pass
of t5rt f32 in the speed table (`bench/results/<model>.json`, from `run_peers.py`, measured in
the same session), whose FLOPs this script counts.

It is an estimate, not a proof: a system can beat it where its products run faster than
OpenBLAS's 2048^3 product did, or where the bandwidth was higher during its run than during the
probe. What it shows is which cells of the target "t5rt f32 at least 1.3x the best f32 peer"
no implementation can reach on this machine, because the best peer already runs within 1.3x
of the floor.

    python3 bench/floors.py            # prints a Markdown table, writes results/floors.json
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from run_peers import CASES, MODELS  # noqa: E402

F32_PEERS = {"hf": "HF torch", "ort": "ORT", "ct2-float32": "CT2"}
TARGET = 1.3


def work(spec, batch, length, new):
    """(encoder FLOPs, cross-projection FLOPs, [(bytes, FLOPs) per decoding step])."""
    d, ff, heads, dkv = spec["d_model"], spec["d_ff"], spec["num_heads"], spec["d_kv"]
    inner = heads * dkv
    gated = spec["feed_forward_proj"].startswith("gated")
    ffn = (3 if gated else 2) * d * ff
    tokens = batch * length
    enc_layer = 2 * tokens * (4 * d * inner + ffn) + 2 * 2 * batch * heads * length**2 * dkv
    cross_kv = 2 * tokens * 2 * d * inner * spec["num_decoder_layers"]
    layers = spec["num_decoder_layers"]
    step_params = layers * (6 * d * inner + ffn) + spec["vocab_size"] * d
    steps = []
    for t in range(1, new + 1):
        caches = layers * 2 * inner * batch * (length + t)  # cross and self keys and values
        nbytes = 4 * (step_params + caches)
        flops = 2 * batch * step_params + 2 * 2 * batch * heads * dkv * (length + t) * layers
        steps.append((nbytes, flops))
    return enc_layer * spec["num_layers"], cross_kv, steps


def main():
    limits = json.loads((ROOT / "results" / "machine_limits.json").read_text())
    bandwidth = limits["read_bandwidth_gbs"]["2_threads"]["median"] * 1e9
    numpy_rate = limits["f32_matmul_gflops_numpy"] * 1e9
    tables = {name: json.loads((ROOT / "results" / f"{name}.json").read_text())
              for name in MODELS if (ROOT / "results" / f"{name}.json").exists()}
    # The fastest t5rt f32 encoder pass of the run, in FLOP/s.
    seen = [work(MODELS[name], *CASES[case])[0] / c["encode_s"]
            for name, table in tables.items()
            for case, c in table["t5rt"]["cases"].items() if c.get("encode_s")]
    peak = max([numpy_rate] + seen)
    rows = []
    for name, table in tables.items():
        spec = MODELS[name]
        for case, (batch, length, new) in CASES.items():
            enc, cross_kv, steps = work(spec, batch, length, new)
            floor_s = (enc + cross_kv) / peak + sum(max(b / bandwidth, f / peak) for b, f in steps)
            floor = batch * new / floor_s
            peers = {F32_PEERS[k]: table[k]["cases"][case]["tokens_per_s"]
                     for k in F32_PEERS if k in table}
            best_name = max(peers, key=peers.get)
            ours = table["t5rt"]["cases"][case]
            # t5rt times its encoder pass alone (the cross projections run at the first step).
            enc_gflops = enc / ours["encode_s"] / 1e9 if ours.get("encode_s") else None
            rows.append({"model": name, "case": case, "best_f32_peer": best_name,
                         "best_f32_peer_tps": peers[best_name], "t5rt_f32_tps": ours["tokens_per_s"],
                         "floor_tps": floor, "floor_over_best_peer": floor / peers[best_name],
                         "t5rt_over_floor": ours["tokens_per_s"] / floor,
                         "t5rt_encoder_gflops": enc_gflops})
    out = {"product_gflops": peak / 1e9, "numpy_gflops": numpy_rate / 1e9,
           "read_bandwidth_gbs": bandwidth / 1e9, "target": TARGET, "rows": rows}
    (ROOT / "results" / "floors.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"Rates: f32 products {peak / 1e9:.1f} GFLOP/s (numpy's 2048^3 product: "
          f"{numpy_rate / 1e9:.1f}), read bandwidth {bandwidth / 1e9:.1f} GB/s.\n")
    print("| model | case | best f32 peer, tokens/s | t5rt f32 | floor | floor / best peer "
          f"| {TARGET}x the best peer reachable? | t5rt / floor | t5rt encoder GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        reach = "yes" if r["floor_over_best_peer"] >= TARGET else "no"
        enc = f"{r['t5rt_encoder_gflops']:.0f}" if r["t5rt_encoder_gflops"] else ""
        print(f"| {r['model']} | {r['case']} | {r['best_f32_peer']} {r['best_f32_peer_tps']:.1f} "
              f"| {r['t5rt_f32_tps']:.1f} | {r['floor_tps']:.1f} | {r['floor_over_best_peer']:.2f}x "
              f"| {reach} | {r['t5rt_over_floor']:.2f}x | {enc} |")


if __name__ == "__main__":
    main()
