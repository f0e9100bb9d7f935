"""Aggregate decode speed of several sequences decoded together, against one alone.

    python bench/batch_decode.py MODEL.gguf [-s 4] [-n 32] [-t 2] [-r 2] [--exact]

Each sequence gets a 16-token random prompt, then N decode steps; with S sequences every step is
one forward pass over all S caches (Runner.eval, what the node's continuous batching does), so
attention and output weights are read once per step for all of them. Experts are shared only when
the sequences route to the same ones. Prints tokens/s for 1 and for S sequences and their ratio
(the CPU-speed issue asks >= 2.5x at S = 4)."""

from __future__ import annotations

import argparse
import time

import numpy as np

from pyengine import Engine


def decode_rate(eng: Engine, n_seq: int, n_gen: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    caches = [eng.runner.new_cache(64 + n_gen) for _ in range(n_seq)]
    eng.runner.eval(caches, [rng.integers(0, eng.n_vocab, 16).tolist() for _ in caches])
    steps = rng.integers(0, eng.n_vocab, (n_gen, n_seq))
    start = time.perf_counter()
    for row in steps:
        eng.runner.eval(caches, [[int(t)] for t in row])
    return n_seq * n_gen / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-s", "--sequences", type=int, default=4)
    ap.add_argument("-n", type=int, default=32, help="decode steps")
    ap.add_argument("-t", type=int, default=2, help="threads")
    ap.add_argument("-r", type=int, default=2, help="repetitions (best is reported)")
    ap.add_argument("--exact", action="store_true", help="float32 activations")
    args = ap.parse_args()
    eng = Engine(args.model, n_ctx=64 + args.n, n_threads=args.t, exact=args.exact)
    decode_rate(eng, 1, 4, 99)  # warm-up: page in the weights
    one = max(decode_rate(eng, 1, args.n, r) for r in range(args.r))
    many = max(decode_rate(eng, args.sequences, args.n, r) for r in range(args.r))
    print(f"1 sequence: {one:.2f} tok/s; {args.sequences} sequences: {many:.2f} tok/s aggregate "
          f"({many / one:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
