"""pyengine and llama.cpp (llama-cpp-python) on the same GGUF, in one run, side by side.

    python bench/compare_llamacpp.py MODEL.gguf [-p 512] [-n 128] [-t 2] [-r 3] [-d 0]
                                     [--no-extra-bufts] [--only pyengine|llama.cpp]

Both are timed by the same loop (pyengine.bench.time_test: random token ids, a warm-up run, then
`reps` repetitions of pp<N> = one batched eval and tg<N> = N one-token evals), so the only
difference is the engine. Prints both llama-bench tables, the pyengine/llama.cpp ratio per test,
and a header (date, machine, command, commit) to paste into bench/RESULTS.md.
--no-extra-bufts turns off llama.cpp's repacked CPU weight buffers (its 0.3.36 build crashes on
some Q8_0 files with them)."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

from pyengine.bench import BenchResult, Runner, cpu_name, markdown, time_test


def pyengine_rows(args) -> list[BenchResult]:
    from pyengine import Engine
    from pyengine.commands.bench import model_type, n_params

    eng = Engine(args.model, n_ctx=args.n_depth + max(args.p, args.n) + 16, n_threads=args.t, n_batch=args.b)
    base = dict(model_filename=args.model, model_type=model_type(eng), model_size=eng.model_file.file_size,
                model_n_params=n_params(eng), n_batch=args.b, n_threads=eng.n_threads, n_depth=args.n_depth,
                backends="pyengine CPU")
    return _run(Runner(eng.reset, eng.eval), eng.n_vocab, base, args)


def llamacpp_rows(args) -> list[BenchResult]:
    import llama_cpp
    import llama_cpp.llama as high_level

    default = llama_cpp.llama_model_default_params
    if args.no_extra_bufts:
        def params():
            p = default()
            p.use_extra_bufts = False
            return p
        high_level.llama_cpp.llama_model_default_params = params
    try:
        llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.n_depth + max(args.p, args.n) + 16,
                              n_threads=args.t, n_threads_batch=args.t, n_batch=args.b, n_ubatch=args.b,
                              verbose=False)
    finally:
        high_level.llama_cpp.llama_model_default_params = default
    base = dict(model_filename=args.model, model_type=f"llama.cpp {llama_cpp.__version__}",
                model_size=os.path.getsize(args.model), model_n_params=llm.model.n_params() if hasattr(llm.model, "n_params") else 0,
                n_batch=args.b, n_threads=args.t, n_depth=args.n_depth, backends="llama.cpp CPU")
    return _run(Runner(llm.reset, llm.eval), llm.n_vocab(), base, args)


def _run(runner: Runner, n_vocab: int, base: dict, args) -> list[BenchResult]:
    rows = []
    for n_prompt, n_gen in ((args.p, 0), (0, args.n)):
        if n_prompt or n_gen:
            ns = time_test(runner, n_vocab, n_prompt, n_gen, args.n_depth, args.r)
            rows.append(BenchResult(n_prompt=n_prompt, n_gen=n_gen, samples_ns=ns, **base))
            print(f"  {base['backends']}: {rows[-1].test} {rows[-1].avg_ts:.2f} t/s", file=sys.stderr, flush=True)
    return rows


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
    ap.add_argument("--only", choices=("pyengine", "llama.cpp"))
    args = ap.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    print(f"### {datetime.date.today()} · {cpu_name()} ({os.cpu_count()} CPUs, {platform.system()}) · commit {commit}")
    print(f"`python bench/compare_llamacpp.py {' '.join(sys.argv[1:])}` · load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    ours = [] if args.only == "llama.cpp" else pyengine_rows(args)
    theirs = [] if args.only == "pyengine" else llamacpp_rows(args)
    print(markdown(ours + theirs))
    if ours and theirs:
        print("\n| test | pyengine t/s | llama.cpp t/s | ratio |\n| --- | ---: | ---: | ---: |")
        for a, b in zip(ours, theirs):
            print(f"| {a.test} | {a.avg_ts:.2f} | {b.avg_ts:.2f} | {a.avg_ts / b.avg_ts:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
