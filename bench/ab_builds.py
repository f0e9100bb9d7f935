"""Two builds of pyengine on one model, timed in alternation: the paired speed ratio of a change.

    python bench/ab_builds.py MODEL.gguf SITE_A SITE_B [--test tg|pp] [-n 12] [-r 20] [-t 2] [--each]
                              [--b-no-repack | --b-without TYPE[,TYPE...]]

SITE_A / SITE_B: folders holding a built `pyengine` package (e.g. `pip install --no-deps --target
/tmp/base-site .` in a checkout of the base commit); "" means the installed one. Why: the dev VMs'
memory bandwidth moves by up to 1.7x from one minute to the next (bench/RESULTS.md), so two
benchmark runs minutes apart compare the machine, not the code. Here both builds stay loaded in two
worker processes (the weights mapped once in the page cache) and take turns: A runs a block of
N decode steps (tg) or one N-token prefill (pp), then B, then B, then A, ...; each adjacent pair
sees the same machine, and the script prints the median and spread of the B/A ratios.
--b-no-repack runs B with Engine(repack=False): with SITE_A = SITE_B = "" it pairs the repack
cache's R16 weights (A) against the file's layout (B) in one build (pyengine/repack_cache.py).
--b-without q5_0,q4_k runs B with the cache's weights but those of the named types (any with an R16
form: mxfp4, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k) from the file's layout: the gain of those types' R16 forms alone, both workers mapping
one cache file (two caches, or the file's experts besides the cache, would not fit the 20b shape in
24 GiB of page cache)."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


R16_TYPES = ("mxfp4", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")  # csrc/r16.h


def worker(model: str, threads: int, repack: bool, without: list[str]) -> None:
    """Serve "tg N" / "pp N" lines from stdin: run that, answer tokens/s. without: types whose
    weights are taken from the file's layout although the cache holds them."""
    import numpy as np

    from pyengine import Engine, _model
    from pyengine import engine as engine_mod

    if without:
        drop = {int(getattr(_model, name.upper())) for name in without}
        full = engine_mod.repacked_weights

        def some(model_file, *a, **k):
            return {name: v for name, v in full(model_file, *a, **k).items()
                    if int(model_file.tensors[name].ggml_type) not in drop}

        engine_mod.repacked_weights = some
    eng = Engine(model, n_ctx=1024, n_threads=threads, repack=repack)
    tokens = np.random.default_rng(0).integers(0, eng.n_vocab, 1024).tolist()
    eng.reset()
    eng.eval(tokens[:8])
    pos = 8
    print("ready", flush=True)
    for line in sys.stdin:
        test, n = line.split()
        n = int(n)
        if test == "pp" or pos + n > 1000:
            eng.reset()
            pos = 0
        start = time.perf_counter()
        if test == "pp":
            eng.eval(tokens[:n])
        else:
            for t in tokens[pos:pos + n]:
                eng.eval([t])
        elapsed = time.perf_counter() - start
        pos += n
        print(n / elapsed, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("site_a", help='folder with build A\'s pyengine package ("" = the installed one)')
    ap.add_argument("site_b", help="folder with build B's pyengine package")
    ap.add_argument("--test", choices=("tg", "pp"), default="tg", help="decode steps or one prefill (default tg)")
    ap.add_argument("-n", type=int, default=12, help="decode steps per block, or prefill tokens (default 12)")
    ap.add_argument("-r", "--rounds", type=int, default=20, help="blocks per build (default 20)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--each", action="store_true",
                    help="print every round's pair too (to split the rounds by the memory mode they drew)")
    b_mode = ap.add_mutually_exclusive_group()
    b_mode.add_argument("--b-no-repack", action="store_true", help="B without the repack cache (Engine(repack=False))")
    b_mode.add_argument("--b-without", default="", metavar="TYPES",
                        help=f"B takes the weights of these types ({', '.join(R16_TYPES)}; comma-separated) "
                             "from the file's layout, the rest from the cache")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-repack", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    without = [t for t in args.b_without.lower().split(",") if t]
    if any(t not in R16_TYPES for t in without):
        ap.error(f"--b-without takes {', '.join(R16_TYPES)}")
    if args.worker:
        worker(args.model, args.threads, not args.no_repack, without)
        return 0
    if not 1 <= args.n <= 512 or args.rounds < 1:
        ap.error("-n must be in 1..512 and -r >= 1")
    procs = []
    for site, flags in ((args.site_a, []), (args.site_b, ["--no-repack"] if args.b_no_repack else
                                                         ["--b-without", args.b_without] if without else [])):
        env = dict(os.environ, PYTHONPATH=site)
        p = subprocess.Popen([sys.executable, "-P", __file__, args.model, "", "", "-t", str(args.threads), "--worker",
                              *flags],
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if p.stdout.readline().strip() != "ready":
            print(f"[ERROR] the worker for {site or 'the installed build'!r} did not start", file=sys.stderr)
            return 1
        procs.append(p)
    rates: list[list[float]] = [[], []]
    for r in range(args.rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            time.sleep(0.05)  # let the other build's idle OpenMP threads stop spinning
            procs[i].stdin.write(f"{args.test} {args.n}\n")
            procs[i].stdin.flush()
            rates[i].append(float(procs[i].stdout.readline()))
        if args.each:
            print(f"round {r + 1}: A {rates[0][-1]:.2f} B {rates[1][-1]:.2f} tok/s, B/A {rates[1][-1] / rates[0][-1]:.3f}",
                  flush=True)
    for p in procs:
        p.stdin.close()
        p.wait()
    ratio = [b / a for a, b in zip(*rates)]
    print(f"{args.test}{args.n}, {args.rounds} rounds, {args.threads} threads: A median {statistics.median(rates[0]):.2f} "
          f"tok/s, B median {statistics.median(rates[1]):.2f} tok/s; paired B/A median {statistics.median(ratio):.3f}, "
          f"mean {statistics.mean(ratio):.3f}, range [{min(ratio):.3f}, {max(ratio):.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
