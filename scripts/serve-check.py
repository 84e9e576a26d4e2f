#!/usr/bin/env python3
"""`t5rt serve` on a device, checked end to end: starts the server on the bundled model, sends
requests from several threads at once (so that they share decoding steps: continuous
batching), and requires each answer to equal `t5rt generate`'s on the same device for the
same input (both greedy). Standard library only (the GPU machine has no extra packages).

    python3 scripts/serve-check.py --binary gpu/t5rt --device cuda     # scripts/gpu-check.sh
    python3 scripts/serve-check.py --binary target/release/t5rt        # here, on the CPU

Exit status 0 when every answer matches, 1 otherwise (the server's log is printed then).
"""

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

INPUTS = [f"spell: {n}" for n in (1984, 42, 7, 100000, 31, 2026, 999, 15, 12345, 8)]


def post(url, body, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="gpu/t5rt")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    args = ap.parse_args()

    want = subprocess.run([args.binary, "generate", "--device", args.device, "--dtype", args.dtype, *INPUTS],
                          capture_output=True, text=True, timeout=120)
    if want.returncode != 0:
        print("t5rt generate failed:", want.stderr, file=sys.stderr)
        return 1
    expected = want.stdout.strip().splitlines()
    assert len(expected) == len(INPUTS), want.stdout

    if not args.port:
        with socket.socket() as sock:  # a port nothing listens on now
            sock.bind(("127.0.0.1", 0))
            args.port = sock.getsockname()[1]
    log = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen([args.binary, "serve", "--device", args.device, "--dtype", args.dtype,
                               "--port", str(args.port)],
                              stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{args.port}"
    ok = False
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if server.poll() is not None:
                print(f"t5rt serve exited with status {server.returncode}", file=sys.stderr)
                return 1
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            print("the server did not become healthy in 60 s", file=sys.stderr)
            return 1
        info = json.loads(urllib.request.urlopen(base + "/info", timeout=5).read())
        got = [None] * len(INPUTS)
        errors = []

        def ask(i):
            try:
                got[i] = post(base + "/generate", {"inputs": INPUTS[i]})["generated_text"]
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"{INPUTS[i]!r}: {e}")

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(INPUTS))]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.time() - t0
        # Streaming (server-sent events) for one input: the tokens' texts end in the same answer.
        req = urllib.request.Request(base + "/generate_stream", data=json.dumps({"inputs": INPUTS[0]}).encode(),
                                     headers={"Content-Type": "application/json"})
        streamed = None
        with urllib.request.urlopen(req, timeout=60) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("data:"):
                    ev = json.loads(line[5:])
                    if ev.get("generated_text") is not None:
                        streamed = ev["generated_text"]
        mismatches = [(x, g, w) for x, g, w in zip(INPUTS, got, expected) if g != w]
        print(f"serve on {info.get('model_device_type', '?')}: {len(INPUTS)} concurrent requests in {dt:.2f} s, "
              f"{len(INPUTS) - len(mismatches)} equal to t5rt generate; streamed: {streamed!r}")
        for x, g, w in mismatches:
            print(f"  {x!r}: served {g!r}, generate {w!r}")
        for e in errors:
            print("  error:", e)
        ok = not mismatches and not errors and streamed == expected[0]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if not ok:
            log.seek(0)
            print("server log:\n" + log.read()[-4000:], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
