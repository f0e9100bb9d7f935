"""Timing the engine the way llama-bench does: `pp<N>` (prompt processing, one batched eval of N
tokens) and `tg<N>` (N one-token decode steps), each after an optional `depth` of tokens already
in the cache, repeated, reported as tokens/s mean ± standard deviation with llama-bench's JSON
field names. Tokens are random ids: speed does not depend on what they say."""

from __future__ import annotations

import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from pyengine.gguf_reader import type_name
from pyengine.model_file import ModelFile


@dataclass
class BenchResult:
    """One llama-bench test row (field names as llama-bench's JSON output)."""

    model_filename: str
    model_type: str
    model_size: int
    model_n_params: int
    n_batch: int
    n_threads: int
    n_prompt: int
    n_gen: int
    n_depth: int
    backends: str = "CPU"
    cpu_info: str = field(default_factory=lambda: cpu_name())
    gpu_info: str = ""
    n_gpu_layers: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    samples_ns: list[int] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self.n_gen

    @property
    def samples_ts(self) -> list[float]:
        return [self.n_tokens * 1e9 / ns for ns in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ns) > 1 else 0.0

    @property
    def test(self) -> str:
        name = f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"
        return f"{name} @ d{self.n_depth}" if self.n_depth else name

    def to_json(self) -> dict:
        out = asdict(self)
        avg_ns = statistics.fmean(self.samples_ns)
        out.update(avg_ns=int(avg_ns), stddev_ns=int(statistics.stdev(self.samples_ns)) if len(self.samples_ns) > 1 else 0,
                   avg_ts=self.avg_ts, stddev_ts=self.stddev_ts, samples_ts=self.samples_ts)
        return out


# llama.cpp's names of the general.file_type values gpt-oss files carry (llama_model_ftype_name)
FILE_TYPES = {0: "all F32", 1: "F16", 7: "Q8_0", 15: "Q4_K - Medium", 17: "Q5_K - Medium", 18: "Q6_K",
              32: "BF16", 38: "MXFP4 MoE"}


def model_type(mf: ModelFile) -> str:
    """llama-bench's model column: architecture, size label, the file type's name (else the
    dominant weight type), so that files of one shape but different mixes tell apart."""
    weights: Counter[str] = Counter()
    for t in mf.raw_tensors.values():
        weights[type_name(t.ggml_type)] += t.nbytes
    dominant = weights.most_common(1)[0][0] if weights else "?"
    label = mf.metadata.get("general.size_label") or f"{mf.hparams.n_layer}L"
    return f"{mf.arch} {label} {FILE_TYPES.get(mf.metadata.get('general.file_type'), dominant)}"


def n_params(mf: ModelFile) -> int:
    """Elements in every tensor of the file (llama-bench's model_n_params)."""
    return int(sum(int(np.prod(t.shape, dtype=np.int64)) for t in mf.raw_tensors.values()))


def decode_bytes(mf: ModelFile) -> int:
    """Weight bytes one decoded token reads: every tensor once, except the token embedding (one
    row) and the stacked experts (n_expert_used of n_expert). Divided into a measured read
    bandwidth, it gives the decode speed limit (bench/compare_llamacpp.py)."""
    return step_bytes(mf, [mf.hparams.n_expert_used] * mf.hparams.n_layer)


def step_bytes(mf: ModelFile, experts: Sequence[int], n_tokens: int = 1) -> int:
    """Weight bytes one forward step over n_tokens tokens (a decode step of n_tokens sequences)
    reads when layer l's tokens were routed to experts[l] distinct experts: every other tensor
    once, n_tokens embedding rows. Against decode_bytes it bounds what batching can gain when
    decode is bandwidth-bound (bench/batch_decode.py)."""
    hp, total = mf.hparams, 0
    for name, t in mf.raw_tensors.items():
        if name.startswith("token_embd."):
            total += t.nbytes // int(t.shape[-1]) * n_tokens
        elif "_exps." in name and len(t.shape) == 3:
            total += t.nbytes // hp.n_expert * int(experts[int(name.split(".")[1])])
        else:
            total += t.nbytes
    return int(total)


def prompt_macs(mf: ModelFile) -> int:
    """Weight multiply-adds per prompt token: every matrix's elements once (the stacked experts'
    n_expert_used of n_expert), without the token embedding (a lookup), the output head (a prompt's
    logits are taken for its last token only, in llama-bench's pp tests as in pyengine's), the biases
    (the experts' too, matrices of n_expert vectors) and the other vectors (norms, sinks). Divided into
    a measured int8 multiply-add peak, it gives prefill's compute ceiling (bench/compare_llamacpp.py)."""
    hp, total = mf.hparams, 0
    for name, t in mf.raw_tensors.items():
        if len(t.shape) < 2 or not name.endswith(".weight") or name.startswith(("token_embd.", "output.")):
            continue
        n = int(np.prod([int(d) for d in t.shape]))
        total += n // hp.n_expert * hp.n_expert_used if "_exps." in name and len(t.shape) == 3 else n
    return int(total)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Runner:
    """What a backend must offer to be timed: reset the context, evaluate tokens after it."""

    def __init__(self, reset: Callable[[], None], eval_tokens: Callable[[Sequence[int]], object]) -> None:
        self.reset = reset
        self.eval = eval_tokens


def time_test(runner: Runner, n_vocab: int, n_prompt: int, n_gen: int, n_depth: int, reps: int,
              seed: int = 0, profiler: Callable[[bool], None] | None = None) -> list[int]:
    """Nanoseconds of each repetition of one test (a warm-up run first, not counted). `profiler(on)`
    is called around each timed part (pyengine._model.profile_enable), so only those are profiled."""
    rng = np.random.default_rng(seed)
    depth = rng.integers(0, n_vocab, n_depth).tolist()
    tokens = rng.integers(0, n_vocab, max(n_prompt, n_gen)).tolist()

    def once() -> int:
        runner.reset()
        if depth:
            runner.eval(depth)
        if profiler:
            profiler(True)
        start = time.perf_counter_ns()
        if n_prompt:
            runner.eval(tokens[:n_prompt])
        for t in tokens[:n_gen]:
            runner.eval([t])
        elapsed = time.perf_counter_ns() - start
        if profiler:
            profiler(False)
        return elapsed

    runner.reset()
    runner.eval(tokens[: min(max(n_prompt, 1), 16)])  # warm-up: page in the weights, spin up threads
    return [once() for _ in range(reps)]


def markdown(rows: Sequence[BenchResult]) -> str:
    """llama-bench's table: model | size | params | backend | [ngl |] threads | [type_k | type_v |] test
    | t/s (the ngl column, layers on the GPU, only when a row ran on one; the KV cache types only when
    a row's differ from the f16 default, as llama-bench)."""
    gpu = any(r.n_gpu_layers for r in rows)
    kv = any((r.type_k, r.type_v) != ("f16", "f16") for r in rows)
    lines = ["| model | size | params | backend | " + ("ngl | " if gpu else "") + "threads | "
             + ("type_k | type_v | " if kv else "") + "test | t/s |",
             "| --- | ---: | ---: | --- | " + ("---: | " if gpu else "") + "---: | " + ("---: | ---: | " if kv else "")
             + "---: | ---: |"]
    for r in rows:
        ngl = f"{r.n_gpu_layers} | " if gpu else ""
        types = f"{r.type_k} | {r.type_v} | " if kv else ""
        lines.append(f"| {r.model_type} | {r.model_size / 2 ** 30:.2f} GiB | {r.model_n_params / 1e9:.2f} B | "
                     f"{r.backends} | {ngl}{r.n_threads} | {types}{r.test} | {r.avg_ts:.2f} ± {r.stddev_ts:.2f} |")
    return "\n".join(lines)


def profile_table(ops: dict[str, tuple[int, int, int]], wall_ns: int) -> str:
    """Where the forward passes' time went (pyengine._model.profile_read after a profiled test):
    per operation calls, ms and weight MB per pass, share of the pass and GB/s of its own weight
    bytes; "other" is the pass's time outside the timed operations, "outside the pass" the test's
    wall time outside the forward calls (Python, sampling)."""
    fwd_ns, passes, _ = ops["forward"]
    if not passes:
        return "(no forward pass was profiled)"
    rows = ["| op | calls/pass | ms/pass | % of pass | weight MB/pass | GB/s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]

    def line(name: str, ns: int, calls: int | str, nbytes: int) -> str:
        calls = f"{calls / passes:.0f}" if isinstance(calls, int) else calls
        gbs = f"{nbytes / ns:.1f}" if nbytes and ns else "-"
        mb = f"{nbytes / passes / 1e6:.1f}" if nbytes else "-"
        return f"| {name} | {calls} | {ns / passes / 1e6:.3f} | {100 * ns / fwd_ns:.1f} % | {mb} | {gbs} |"

    parts = {k: v for k, v in ops.items() if k != "forward"}
    for name, (ns, calls, nbytes) in sorted(parts.items(), key=lambda kv: -kv[1][0]):
        if calls:
            rows.append(line(name, ns, calls, nbytes))
    rows.append(line("other", max(fwd_ns - sum(v[0] for v in parts.values()), 0), "-", 0))
    weight = sum(v[2] for v in parts.values())
    rows.append(line("**forward pass**", fwd_ns, passes, weight))
    outside = max(wall_ns - fwd_ns, 0)
    rows.append(f"| outside the pass | - | {outside / passes / 1e6:.3f} | - | - | - |")
    return "\n".join(rows)
