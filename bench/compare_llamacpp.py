"""pyengine and llama.cpp (llama-cpp-python) on the same GGUF, in one run, side by side.

    python bench/compare_llamacpp.py MODEL.gguf [-p 512] [-n 128] [-t 2] [-r 3] [-d 0]
                                     [--no-extra-bufts] [--only pyengine|llama.cpp] [--exact]
                                     [--device cuda]

Both are timed by the same loop (pyengine.bench.time_test: random token ids, a warm-up run, then
`reps` repetitions of pp<N> = one batched eval and tg<N> = N one-token evals), each engine in its
own child process (one after the other, so they never share the CPU, and a crash of one is
reported, not fatal). llama.cpp runs in both CPU configurations: its default, with the repacked
weight buffers ("extra buffer types": CPU_REPACK, and AMX on Intel CPUs that have it), and
without them; a configuration that crashes is reported, and each test's ratio is taken against the
faster configuration that ran (named in the ratio table). Prints the llama-bench tables, the
memory read bandwidth (pyengine-bench-kernels --bandwidth, same threads), each decode speed as a
share of the limit it implies (weight bytes per token / bandwidth), and a header (date, machine,
command, commit, load average) to paste into bench/RESULTS.md. --no-extra-bufts runs llama.cpp
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
    """GB/s from the kernel bench's read probe, or 0 when it is not installed."""
    exe = shutil.which("pyengine-bench-kernels")
    if not exe:
        return 0.0
    r = subprocess.run([exe, "-t", str(threads), "--bandwidth"], capture_output=True, text=True)
    return float(r.stdout.strip()) if r.returncode == 0 else 0.0


def run_child(engine: str, argv: list[str]) -> list[BenchResult] | str:
    r = subprocess.run([sys.executable, __file__, *argv, "--child", engine], capture_output=True, text=True)
    if r.returncode != 0:
        why = f"signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
        return f"{engine} failed ({why}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}"
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    fields = BenchResult.__dataclass_fields__
    return [BenchResult(**{k: v for k, v in row.items() if k in fields}) for row in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
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
    ap.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        rows = child_pyengine(args) if args.child == "pyengine" else child_llamacpp(args, args.child == "llama.cpp")
        print(json.dumps(rows))
        return 0

    argv = sys.argv[1:]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    print(f"### {datetime.date.today()} · {cpu_name()} ({os.cpu_count()} CPUs, {platform.system()}) · commit {commit}")
    print(f"`python bench/compare_llamacpp.py {' '.join(argv)}` · load average before: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    bw = bandwidth(args.t)
    results = {}
    llama = () if args.only == "pyengine" else ("llama.cpp-plain",) if args.no_extra_bufts else CHILDREN[1:]
    for engine in (() if args.only == "llama.cpp" else ("pyengine",)) + llama:
        results[engine] = run_child(engine, argv)
        if isinstance(results[engine], str):
            print(f"**{results[engine]}**\n")
    rows = [r for v in results.values() if not isinstance(v, str) for r in v]
    if rows:
        print(markdown(rows))
    per_token = decode_bytes(open_model(args.model))
    if bw:
        print(f"\nmemory read bandwidth ({args.t} threads, pyengine-bench-kernels --bandwidth): {bw:.1f} GB/s; "
              f"a decoded token reads {per_token / 1e9:.3f} GB of weights: limit {bw * 1e9 / per_token:.2f} tok/s")
    ours = results.get("pyengine")
    peers = [v for k, v in results.items() if k != "pyengine" and isinstance(v, list)]
    if isinstance(ours, list):
        print("\n| test | pyengine t/s | best llama.cpp t/s | llama.cpp configuration | ratio | decode % of bandwidth (pyengine / llama.cpp) |")
        print("| --- | ---: | ---: | --- | ---: | ---: |")
        for i, a in enumerate(ours):
            best = max((p[i] for p in peers), key=lambda r: r.avg_ts, default=None)
            share = (lambda r: f"{100 * r.avg_ts * per_token / (bw * 1e9):.0f} %") if bw and a.n_gen else None
            print(f"| {a.test} | {a.avg_ts:.2f} | {best.avg_ts:.2f} | {best.backends} | {a.avg_ts / best.avg_ts:.2f}x | "
                  f"{share(a) + ' / ' + share(best) if share else '-'} |" if best else
                  f"| {a.test} | {a.avg_ts:.2f} | - | - | - | {share(a) if share else '-'} |")
    print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
