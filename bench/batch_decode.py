"""Aggregate decode speed of several sequences decoded together, against one alone, and the bound
that the weight bytes a step really reads put on it.

    python bench/batch_decode.py MODEL.gguf [-s 4] [-n 32] [-t 2] [-r 2] [--exact] [--profile]

Each sequence gets a 16-token random prompt, then N decode steps; with S sequences every step is
one forward pass over all S caches (Runner.eval, what the node's continuous batching does), so
attention and output weights are read once per step for all of them. Experts are shared only when
the sequences route to the same ones: from the router's choices in each step (the engine's
per-layer expert counters) the script counts the distinct experts a step touches per layer, hence
the bytes it reads (pyengine.bench.step_bytes), and prints the bandwidth-bound ratio for that
routing, S x (bytes of a one-token step) / (bytes of an S-token step), next to the measured ratio
(the CPU-speed issue asks >= 2.5x at S = 4): how far decode is from what the bytes allow.
--profile prints where the S-sequence steps' time went, per operation (the table of
`pyengine bench --profile`, one forward pass = one step of all S sequences)."""

from __future__ import annotations

import argparse
import time

import numpy as np

from pyengine import Engine, _model
from pyengine.bench import decode_bytes, profile_table, step_bytes


def decode_rate(eng: Engine, n_seq: int, n_gen: int, seed: int,
                profile: bool = False) -> tuple[float, float, float]:
    """(aggregate tokens/s, mean weight bytes a step read, mean distinct experts per layer a step
    touched) of n_gen steps over n_seq sequences; `profile` times the steps' operations
    (pyengine._model.profile_enable)."""
    rng = np.random.default_rng(seed)
    caches = [eng.runner.new_cache(64 + n_gen) for _ in range(n_seq)]
    eng.runner.eval(caches, [rng.integers(0, eng.n_vocab, 16).tolist() for _ in caches])
    steps = rng.integers(0, eng.n_vocab, (n_gen, n_seq))
    touched = []
    elapsed = 0.0
    for row in steps:
        before = eng.expert_counts
        _model.profile_enable(profile)
        start = time.perf_counter()
        eng.runner.eval(caches, [[int(t)] for t in row])
        elapsed += time.perf_counter() - start
        _model.profile_enable(False)
        touched.append(((eng.expert_counts - before) > 0).sum(axis=1))
    mf = eng.model_file
    step = np.mean([step_bytes(mf, t, n_seq) for t in touched])
    return n_seq * n_gen / elapsed, float(step), float(np.mean(touched))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-s", "--sequences", type=int, default=4)
    ap.add_argument("-n", type=int, default=32, help="decode steps")
    ap.add_argument("-t", type=int, default=2, help="threads")
    ap.add_argument("-r", type=int, default=2, help="repetitions (best is reported)")
    ap.add_argument("--exact", action="store_true", help="float32 activations")
    ap.add_argument("--profile", action="store_true", help="per-operation time of the S-sequence steps")
    args = ap.parse_args()
    eng = Engine(args.model, n_ctx=64 + args.n, n_threads=args.t, exact=args.exact)
    decode_rate(eng, 1, 4, 99)  # warm-up: page in the weights
    one = max(decode_rate(eng, 1, args.n, r)[0] for r in range(args.r))
    _model.profile_reset()
    runs = [decode_rate(eng, args.sequences, args.n, r, args.profile) for r in range(args.r)]
    many = max(r[0] for r in runs)
    step, experts = np.mean([r[1] for r in runs]), np.mean([r[2] for r in runs])
    single = decode_bytes(eng.model_file)
    bound = args.sequences * single / step
    hp = eng.model_file.hparams
    print(f"1 sequence: {one:.2f} tok/s; {args.sequences} sequences: {many:.2f} tok/s aggregate "
          f"({many / one:.2f}x)")
    print(f"a step of {args.sequences} sequences touched {experts:.1f} of {hp.n_expert} experts per layer "
          f"({hp.n_expert_used} for one) and read {step / 1e9:.3f} GB of weights ({single / 1e9:.3f} GB for one "
          f"token): bandwidth-bound ratio {bound:.2f}x; measured {many / one:.2f}x = {100 * many / one / bound:.0f} % "
          "of that bound")
    if args.profile:
        ops = _model.profile_read()
        print(f"\nprofile of the {args.sequences}-sequence steps (per step):")
        print(profile_table(ops, int(sum(args.sequences * args.n / r[0] for r in runs) * 1e9)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
