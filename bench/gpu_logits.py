"""GPU logits against the CPU path on one file: the device check's correctness step at the real shape.

    python bench/gpu_logits.py MODEL.gguf [--prompt 32] [--decode 8] [--int8 8] [--tol 1e-3] [--json OUT.json]

Why: the tests compare the GPU with the CPU on small models; this compares them on the file the
bench times (the 20b shape on a GPU), so a kernel that is only wrong at real widths (2880, 201,088
rows, 32 experts) cannot pass unseen. A random prompt is prefilled on both engines (every
position's logits compared), then `decode` one-token steps feed both engines the CPU's argmax.
Per step: the relative error ||gpu - cpu|| / ||cpu|| and whether the argmaxes agree. Exit status 0
when every error is within tol and every argmax agrees, 1 otherwise (the reasons printed). The CPU
side uses float32 activations (exact=True), the GPU's arithmetic. Then the same prompt and `int8`
decode steps on a second pair of engines with int8 activations (the default, exact=False): the GPU's
int8 tensor-core prefill and dp4a decode kernels against the CPU's int8 kernels (which need AVX-512
VNNI on the host). PYENGINE_CUDA_EMULATOR=1 runs the GPU side on the emulator."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from pyengine.engine import Engine


def rel(got: np.ndarray, want: np.ndarray) -> float:
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def compare(cpu: Engine, gpu: Engine, prompt: list, n_decode: int, prefill: str, step: str) -> list:
    """Prefill the prompt on both engines (every position compared), then n_decode one-token steps fed
    the CPU's argmax: one {step, rel, argmax_agree, rows} record per evaluation."""
    want, got = cpu.logits(prompt), gpu.logits(prompt)
    steps = [{"step": f"{prefill}{len(prompt)}", "rel": rel(got, want),
              "argmax_agree": int((want.argmax(-1) == got.argmax(-1)).sum()), "rows": len(prompt)}]
    tok = int(want[-1].argmax())
    for i in range(n_decode):
        w, g = cpu.eval([tok]), gpu.eval([tok])
        steps.append({"step": f"{step}{i}", "rel": rel(g, w), "argmax_agree": int(w.argmax() == g.argmax()),
                      "rows": 1})
        tok = int(w.argmax())
    return steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=32, help="prefill tokens (default 32)")
    ap.add_argument("--decode", type=int, default=8, help="decode steps after the prefill (default 8)")
    ap.add_argument("--int8", type=int, default=8,
                    help="int8-activation decode steps after an int8 prefill (default 8; 0: no int8 pass)")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest relative error allowed (default 1e-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the per-step figures here")
    args = ap.parse_args()

    n_ctx = args.prompt + max(args.decode, args.int8) + 8
    t0 = time.perf_counter()
    cpu = Engine(args.model, n_ctx=n_ctx, exact=True)
    gpu = Engine(args.model, n_ctx=n_ctx, exact=True, device="cuda")
    load_s = time.perf_counter() - t0
    prompt = np.random.default_rng(args.seed).integers(0, cpu.n_vocab, args.prompt).tolist()

    steps = compare(cpu, gpu, prompt, args.decode, prefill="prefill", step="decode")
    if args.int8:
        del cpu, gpu
        cpu = Engine(args.model, n_ctx=n_ctx)
        gpu = Engine(args.model, n_ctx=n_ctx, device="cuda")
        steps += compare(cpu, gpu, prompt, args.int8, prefill="int8-prefill", step="int8-")

    worst = max(s["rel"] for s in steps)
    agree = sum(s["argmax_agree"] for s in steps)
    rows = sum(s["rows"] for s in steps)
    ok = worst <= args.tol and agree == rows
    for s in steps:
        print(f"{s['step']:>10}: relative error {s['rel']:.2e}, argmax agrees {s['argmax_agree']}/{s['rows']}")
    print(f"RESULT {'ok' if ok else 'FAIL'}: worst relative error {worst:.2e} (tol {args.tol:g}), "
          f"argmax agrees {agree}/{rows}; load {load_s:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ok": ok, "worst_rel": worst, "argmax_agree": agree, "rows": rows, "tol": args.tol,
                       "steps": steps}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
