"""How long a decoding stream stalls while another slot reads a long prompt, by --batch-size.

    python bench/prompt_stall.py MODEL.gguf [-b 512 128] [--prompt 1500] [--tokens 48] [-t 2]

For each batch size: serves MODEL as a node with 2 slots (in this process, over HTTP), streams one
greedy completion of --tokens tokens (end-of-generation tokens biased away), and once it has
produced 8 tokens sends a second request whose prompt is about --prompt tokens long. Prints the
stream's longest gap between two tokens while the prompt is read (every step carries the other
slot's prompt chunk of at most n_batch tokens), its median gap, and the second request's time to
its first token."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import httpx
from node_server import run_node

from pyengine.node.config import NodeConfig
from pyengine.node.engine_backend import EngineBackend

NO_EOG = {"199999": -100, "200002": -100, "200012": -100}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("-b", "--batch-size", type=int, nargs="+", default=[512, 128])
    ap.add_argument("--prompt", type=int, default=1500, help="the second request's prompt, about this many tokens")
    ap.add_argument("--tokens", type=int, default=48, help="tokens the first stream generates")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"| -b | stream's longest gap s | its median gap s | second request's first token s |  "
          f"({args.model.name}, {args.threads} threads, a {args.prompt}-token prompt)")
    print("|---:|---:|---:|---:|")
    for n_batch in args.batch_size:
        backend = EngineBackend.load(NodeConfig(model=str(args.model), parallel=2, ctx_size=2 * 4096,
                                                threads=args.threads, n_batch=n_batch))
        sentence = "The bridges of Köln cross the Rhine one after another, each with its own story. "
        text = sentence * max(1, args.prompt // len(backend.tokenize(sentence)))
        with run_node(backend, parallel=2) as (url, _):
            arrivals: list[float] = []
            started = threading.Event()

            def stream() -> None:
                body = {"prompt": "Once upon a time", "max_tokens": args.tokens, "temperature": 0,
                        "logit_bias": NO_EOG, "stream": True}
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=3600) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                            arrivals.append(time.perf_counter())
                            if len(arrivals) == 8:
                                started.set()

            first = threading.Thread(target=stream)
            first.start()
            started.wait(600)
            t0 = time.perf_counter()
            body = {"prompt": text, "max_tokens": 1, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=3600) as r:
                lines = r.iter_lines()
                ttft = next(time.perf_counter() - t0 for line in lines if line.startswith("data: {"))
                for _ in lines:
                    pass
            first.join()
        backend.close()
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        print(f"| {n_batch} | {max(gaps):.2f} | {statistics.median(gaps):.3f} | {ttft:.1f} |")


if __name__ == "__main__":
    main()
