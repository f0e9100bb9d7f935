"""What sharing the prompt saves for `n` > 1 (docs/node.md): one request for n choices, with the
prompt's K/V rows copied from the first choice's slot (the node's way) and with every choice
evaluating the prompt itself (copy_cache disabled, as on CUDA), against n single requests in turn.

Serves a random gpt-oss GGUF with the real o200k vocabulary (the tests' gguf_factory) with n
slots; greedy /v1/completions of a `--prompt`-token prompt, `--tokens` tokens per choice
(end-of-generation biased away). Prints wall seconds per variant, best of `--reps`.

    python bench/node_n_choices.py --size mid --prompt 512 --tokens 16 -n 3
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

import httpx
from node_concurrency import NO_EOG, SIZES
from node_server import run_node
from test_node_engine import write_model

from pyengine.node.config import NodeConfig
from pyengine.node.engine_backend import EngineBackend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="mid")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.gguf"
        write_model(path, **SIZES[args.size])
        per_slot = args.prompt + args.tokens + 64
        backend = EngineBackend.load(NodeConfig(model=str(path), parallel=args.n, ctx_size=per_slot * args.n,
                                                threads=args.threads))
        runner = backend.core.runner
        copy = runner.copy_cache
        with run_node(backend, parallel=args.n) as (url, _):
            def request(n: int) -> None:
                # a fresh prompt each time, so no slot's cache holds it already
                prompt = [random.randrange(1000, 190000) for _ in range(args.prompt)]
                r = httpx.post(f"{url}/v1/completions", timeout=600, json={
                    "prompt": prompt, "max_tokens": args.tokens, "temperature": 0, "n": n, "logit_bias": NO_EOG})
                assert r.status_code == 200, r.text

            def timed(fn) -> float:
                best = float("inf")
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - t0)
                return best

            shared = timed(lambda: request(args.n))
            runner.copy_cache = lambda src, dst: False
            each = timed(lambda: request(args.n))
            runner.copy_cache = copy
            single = timed(lambda: [request(1) for _ in range(args.n)])
    print(f"size={args.size} prompt={args.prompt} tokens={args.tokens} n={args.n} (best of {args.reps}, seconds)")
    print(f"n={args.n}, prompt shared (KV copy): {shared:.2f}")
    print(f"n={args.n}, each choice evaluates the prompt: {each:.2f}")
    print(f"{args.n} single requests in turn: {single:.2f}")


if __name__ == "__main__":
    main()
