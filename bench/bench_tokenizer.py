"""Tokenizer and sampler speed on this machine (numbers for docs/tokenizer.md).

Run from the worktree root after installing: python bench/bench_tokenizer.py
Text: Python standard-library sources and /usr/share/common-licenses (code and English prose),
plus llama.cpp's multilingual tokenizer test inputs.
"""

from __future__ import annotations

import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import vocab

from pyengine.sampling import Sampler, SamplingParams, log_softmax, top_logprobs
from pyengine.tokenizer import Tokenizer


def corpus() -> dict[str, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = "".join(p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:60])
    licenses = Path("/usr/share/common-licenses")
    docs = "".join(p.read_text(errors="ignore") for p in sorted(licenses.glob("*")) if p.is_file())
    inp = (
        Path(__file__).resolve().parents[2]
        / "shared"
        / "vendor-data"
        / "llama.cpp-vocab"
        / "ggml-vocab-qwen35.gguf.inp"
    )
    multi = inp.read_text() * 200 if inp.exists() else ""
    return {"python code": code, "English licence texts": docs, "llama.cpp .inp x200": multi}


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    t = time.perf_counter()
    meta = vocab.harmony_metadata()
    t_meta = time.perf_counter() - t
    t = time.perf_counter()
    tok = Tokenizer.from_metadata(meta)
    print(f"from_metadata: {time.perf_counter() - t:.2f} s (building the metadata dict: {t_meta:.2f} s)")
    for name, text in corpus().items():
        if not text:
            continue
        ids = tok.encode(text)
        dt = best_of(lambda text=text: tok.encode(text))
        dt_dec = best_of(lambda ids=ids: tok.decode(ids))
        det_times = []
        det = tok.streaming_detokenizer()
        t = time.perf_counter()
        for i in ids[:200000]:
            det.add(i)
        det_times.append(time.perf_counter() - t)
        print(
            f"{name}: {len(text) / 1e6:.2f} M chars, {len(ids)} tokens | encode 1 thread "
            f"{len(ids) / dt / 1e6:.2f} M tok/s | "
            f"decode {len(ids) / dt_dec / 1e6:.1f} M tok/s | streaming detok "
            f"{min(len(ids), 200000) / det_times[0] / 1e6:.2f} M tok/s"
        )
    logits = np.random.default_rng(0).standard_normal(201088).astype(np.float32) * 3
    history = list(range(100))
    steps = [
        (f"sample ({label})", lambda s=Sampler(params): s.sample(logits, history))
        for label, params in [
            ("greedy", SamplingParams(temperature=0)),
            ("temperature 1", SamplingParams(seed=1)),
            (
                "top_k 40 + top_p 0.95 + min_p 0.05 + penalties",
                SamplingParams(top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, seed=1),
            ),
            ("top_p 0.9", SamplingParams(top_p=0.9, seed=1)),
        ]
    ]
    steps += [("log_softmax", lambda: log_softmax(logits)),
              ("top_logprobs(5)", lambda lp=log_softmax(logits): top_logprobs(lp, 5))]
    for label, step in steps:
        times = []
        for _ in range(50):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        print(f"{label}, 201088 logits: median {statistics.median(times) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
