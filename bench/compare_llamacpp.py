"""pyengine and llama.cpp (llama-cpp-python) on the same GGUFs, in one run, side by side.

    python bench/compare_llamacpp.py MODEL.gguf [MODEL2.gguf ...] [-p 512] [-n 128] [-t 2] [-r 3]
                                     [-d 0] [--no-extra-bufts] [--only pyengine|llama.cpp] [--exact]
                                     [--device cuda] [--bandwidth GB/S]

Both are timed by the same loop (pyengine.bench.time_test: random token ids, a warm-up run, then
`reps` repetitions of pp<N> = one batched eval and tg<N> = N one-token evals), each engine in its
own child process (one after the other, so they never share the CPU, and a crash of one is
reported, not fatal). llama.cpp runs in both CPU configurations: its default, with the repacked
weight buffers ("extra buffer types": CPU_REPACK, and AMX on Intel CPUs that have it), and
without them; a configuration that crashes is reported, and each test's ratio is taken against the
faster configuration that ran (named in the ratio table). Several files (the MXFP4 synth file
and the Q4_K_M-style one, `pyengine synth --mix q4_k_m`) run one after the other in the same run.
Prints a header (date, machine, command, commit, load average) and the tables to paste into
bench/RESULTS.md: llama-bench's, then one row per file and test with the ratio and each decode
speed as a share of the limit the memory read bandwidth implies (the file's own weight bytes per
decoded token, pyengine.bench.decode_bytes, over the bandwidth). The bandwidth is probed
(pyengine-bench-kernels --bandwidth, same threads) before and after the engines run, both
printed, and the higher one is the limit; --bandwidth GB/S gives it instead of probing. --no-extra-bufts runs llama.cpp
without the repacked buffers only. --exact runs pyengine with exact=True (float32 activations
everywhere; by default quantized weights get int8 activations, as llama.cpp always does).
--device cuda
runs pyengine on the GPU and llama.cpp with every layer offloaded (n_gpu_layers=-1, flash attention
on): that needs a llama-cpp-python built with CUDA (CMAKE_ARGS="-DGGML_CUDA=on")."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pyengine.bench import BenchResult, Runner, cpu_name, decode_bytes, markdown, model_type, n_params, time_test
from pyengine.model_file import open_model


def _rows(runner: Runner, n_vocab: int, base: dict, args) -> list[dict]:
    rows = []
    for n_prompt, n_gen in ((args.p, 0), (0, args.n)):
        if n_prompt or n_gen:
            ns = time_test(runner, n_vocab, n_prompt, n_gen, args.n_depth, args.r)
            rows.append(BenchResult(n_prompt=n_prompt, n_gen=n_gen, samples_ns=ns, **base).to_json())
    return rows


def _base(args, backend: str, n_threads: int) -> dict:
    mf = open_model(args.model)
    return dict(model_filename=args.model, model_type=model_type(mf), model_size=mf.file_size,
                model_n_params=n_params(mf),
                n_batch=args.b, n_threads=n_threads, n_depth=args.n_depth, backends=backend)


def child_pyengine(args) -> list[dict]:
    from pyengine import Engine

    eng = Engine(args.model, n_ctx=args.n_depth + max(args.p, args.n) + 16, n_threads=args.t, n_batch=args.b,
                 exact=args.exact, device=args.device)
    backend = "pyengine (exact)" if args.exact else "pyengine"
    if args.device != "cpu":
        backend += " CUDA"
    return _rows(Runner(eng.reset, eng.eval), eng.n_vocab, _base(args, backend, eng.n_threads), args)


def child_llamacpp(args, repacked: bool) -> list[dict]:
    import llama_cpp

    from pyengine.llama_cpp_peer import open_llama

    gpu = {"n_gpu_layers": -1, "flash_attn": True} if args.device != "cpu" else {}
    if gpu and not llama_cpp.llama_supports_gpu_offload():
        raise SystemExit("this llama-cpp-python has no GPU backend (build it with CMAKE_ARGS=-DGGML_CUDA=on)")
    llm = open_llama(args.model, extra_bufts=repacked,
                     n_ctx=args.n_depth + max(args.p, args.n) + 16, n_threads=args.t,
                     n_threads_batch=args.t, n_batch=args.b, n_ubatch=args.b, verbose=False, **gpu)
    backend = f"llama.cpp {llama_cpp.__version__}" + (" CUDA" if gpu else "") + (
        " repacked" if repacked else " (no extra bufts)")
    return _rows(Runner(llm.reset, llm.eval), llm.n_vocab(), _base(args, backend, args.t), args)


CHILDREN = ("pyengine", "llama.cpp", "llama.cpp-plain")


def bandwidth(threads: int) -> float:
    """GB/s from the kernel bench's read probe, or 0 when it is not installed (looked up on PATH,
    then beside this Python, where a virtual environment that is not activated has it)."""
    exe = shutil.which("pyengine-bench-kernels") or shutil.which("pyengine-bench-kernels",
                                                                 path=str(Path(sys.executable).parent))
    if not exe:
        return 0.0
    r = subprocess.run([exe, "-t", str(threads), "--bandwidth"], capture_output=True, text=True)
    return float(r.stdout.strip()) if r.returncode == 0 else 0.0


def child_argv(args, model: str) -> list[str]:
    """The command line a child process gets for one model: the timing options, not the others."""
    argv = [model, "-p", str(args.p), "-n", str(args.n), "-t", str(args.t), "-b", str(args.b),
            "-r", str(args.r), "-d", str(args.n_depth), "--device", args.device]
    return argv + (["--exact"] if args.exact else [])


def run_child(engine: str, argv: list[str]) -> list[BenchResult] | str:
    r = subprocess.run([sys.executable, __file__, *argv, "--child", engine], capture_output=True, text=True)
    if r.returncode != 0:
        why = f"signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
        return f"{engine} failed ({why}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}"
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    fields = BenchResult.__dataclass_fields__
    return [BenchResult(**{k: v for k, v in row.items() if k in fields}) for row in rows]


@dataclass
class ModelRun:
    """One file's results: engine -> its rows, or why it failed; and the weight bytes a decoded
    token reads from it."""
    path: str
    per_token: int
    results: dict[str, list[BenchResult] | str] = field(default_factory=dict)


def best_peer(test: str, runs: ModelRun) -> BenchResult | None:
    """The fastest llama.cpp configuration's row for `test` among those that ran."""
    rows = [r for k, v in runs.results.items() if k != "pyengine" and isinstance(v, list) for r in v
            if r.test == test]
    return max(rows, key=lambda r: r.avg_ts, default=None)


def comparison(runs: list[ModelRun], bw: float) -> str:
    """RESULTS.md's ratio table: per file and test, pyengine against the best llama.cpp
    configuration, and decode (tg) speeds as a share of the file's bandwidth limit."""
    lines = ["| model | test | pyengine t/s | best llama.cpp t/s | llama.cpp configuration | ratio | "
             "decode limit t/s | decode % of bandwidth (pyengine / llama.cpp) |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for run in runs:
        ours = run.results.get("pyengine")
        name = Path(run.path).name
        limit = bw * 1e9 / run.per_token if bw else 0.0
        rows = ours if isinstance(ours, list) else []
        tests = [r.test for r in rows] or list(dict.fromkeys(
            r.test for v in run.results.values() if isinstance(v, list) for r in v))
        for test in tests:
            a = next((r for r in rows if r.test == test), None)
            best = best_peer(test, run)
            decode = bool(limit) and (a or best).n_gen > 0
            share = (lambda r: f"{100 * r.avg_ts / limit:.0f} %" if r else "-") if decode else None
            cells = [name, test, f"{a.avg_ts:.2f}" if a else "-", f"{best.avg_ts:.2f}" if best else "-",
                     best.backends if best else "-", f"{a.avg_ts / best.avg_ts:.2f}x" if a and best else "-",
                     f"{limit:.2f}" if decode else "-", f"{share(a)} / {share(best)}" if decode else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", metavar="MODEL.gguf")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("-b", type=int, default=512)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("-d", "--n-depth", type=int, default=0)
    ap.add_argument("--no-extra-bufts", action="store_true")
    ap.add_argument("--exact", action="store_true", help="pyengine with exact=True (float32 activations)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: see above")
    ap.add_argument("--only", choices=("pyengine", "llama.cpp"))
    ap.add_argument("--bandwidth", type=float, metavar="GB/S", help="the read bandwidth to use instead of probing")
    ap.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.model = args.models[0]
        rows = child_pyengine(args) if args.child == "pyengine" else child_llamacpp(args, args.child == "llama.cpp")
        print(json.dumps(rows))
        return 0

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    print(f"### {datetime.date.today()} · {cpu_name()} ({os.cpu_count()} CPUs, {platform.system()}) · commit {commit}")
    print(f"`python bench/compare_llamacpp.py {' '.join(sys.argv[1:])}` · load average before: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    bw_before = args.bandwidth or bandwidth(args.t)
    llama = () if args.only == "pyengine" else ("llama.cpp-plain",) if args.no_extra_bufts else CHILDREN[1:]
    runs = []
    for model in args.models:
        run = ModelRun(model, decode_bytes(open_model(model)))
        for engine in (() if args.only == "llama.cpp" else ("pyengine",)) + llama:
            run.results[engine] = run_child(engine, child_argv(args, model))
            if isinstance(run.results[engine], str):
                print(f"**{Path(model).name}: {run.results[engine]}**\n")
        runs.append(run)
    bw_after = args.bandwidth or bandwidth(args.t)
    rows = [r for run in runs for v in run.results.values() if isinstance(v, list) for r in v]
    if rows:
        print(markdown(rows))
    bw = max(bw_before, bw_after)
    if args.bandwidth:
        print(f"\nmemory read bandwidth: {bw:.1f} GB/s (given, not probed)\n")
    elif bw:
        print(f"\nmemory read bandwidth ({args.t} threads, pyengine-bench-kernels --bandwidth): {bw_before:.1f} GB/s "
              f"before, {bw_after:.1f} GB/s after; the limits below use {bw:.1f} GB/s\n")
    else:
        print("\nno memory read bandwidth (pyengine-bench-kernels not found): no decode limits\n")
    for run in runs:
        print(f"- {Path(run.path).name}: a decoded token reads {run.per_token / 1e9:.3f} GB of weights"
              + (f": limit {bw * 1e9 / run.per_token:.2f} tok/s" if bw else ""))
    print("\n" + comparison(runs, bw))
    print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
