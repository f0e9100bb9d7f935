"""Aggregate decode throughput of the node at 1, 2 and 4 concurrent streams (docs/node.md).

Serves a random gpt-oss GGUF with the real o200k vocabulary (written once with the tests'
gguf_factory) with 4 slots, sends N concurrent greedy /v1/completions requests of `--tokens`
tokens each (end-of-generation tokens biased away so every stream runs to the end) and prints
total generated tokens / wall time, plus each stream's own decode rate from `timings`.

    python bench/node_concurrency.py --size mid --threads 2
    python bench/node_concurrency.py --model /tmp/synth20b.gguf --threads 2 --tokens 32

--model serves a given GGUF instead (e.g. the 20b-shaped synth file of bench/RESULTS.md, whose
vocabulary is the real one); the last column is the aggregate over one stream's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

import httpx
from node_server import run_node
from test_node_engine import write_model

from pyengine.node.config import NodeConfig
from pyengine.node.engine_backend import EngineBackend

SIZES = {"tiny": {}, "mid": {"n_embd": 512, "n_layer": 4, "n_head": 8, "n_head_kv": 2, "head_dim": 64,
                             "n_expert": 8, "n_expert_used": 2, "n_ff": 512}}
NO_EOG = {"199999": -100, "200002": -100, "200012": -100}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="mid")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--model", type=Path, help="serve this GGUF instead of a random --size model")
    args = ap.parse_args()
    if args.model and not args.model.is_file():
        ap.error(f"--model {args.model}: no such file")
    path = args.model or Path(tempfile.gettempdir()) / f"pyengine-bench-{args.size}.gguf"
    if not path.exists():
        write_model(path, **SIZES[args.size])
    backend = EngineBackend.load(NodeConfig(model=str(path), parallel=4, ctx_size=512, threads=args.threads))
    with run_node(backend, parallel=4) as (url, _):
        def one(i: int) -> tuple[int, float]:
            r = httpx.post(f"{url}/v1/completions", timeout=600, json={
                "prompt": f"Story number {i}:", "max_tokens": args.tokens, "temperature": 0, "logit_bias": NO_EOG})
            j = r.json()
            return j["usage"]["completion_tokens"], j["timings"]["predicted_per_second"]

        one(0)
        print(f"| streams | tokens | wall s | aggregate tok/s | per-stream tok/s | x one |  "
              f"({args.model.name if args.model else args.size}, threads={args.threads})")
        print("|---|---|---|---|---|---|")
        single = None
        for n in (1, 2, 4):
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                res = list(pool.map(one, range(n)))
            wall = time.perf_counter() - t0
            toks = sum(r[0] for r in res)
            rates = [r[1] for r in res]
            single = single or toks / wall
            print(f"| {n} | {toks} | {wall:.2f} | {toks / wall:.1f} | {min(rates):.1f}-{max(rates):.1f} | "
                  f"{toks / wall / single:.2f} |")


if __name__ == "__main__":
    main()
