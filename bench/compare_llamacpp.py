"""pyengine and llama.cpp (llama-cpp-python) on the same GGUFs, in one run, side by side.

    python bench/compare_llamacpp.py MODEL.gguf [MODEL2.gguf ...] [-p 512] [-n 128] [-t 2] [-r 3]
                                     [--rounds 1] [-d 0] [--no-extra-bufts] [--no-flash-attn]
                                     [--only pyengine|llama.cpp]
                                     [--exact] [--no-mmap] [--device cuda] [--bandwidth GB/S]
                                     [--int8-peak G/S]

Both are timed by the same loop (pyengine.bench.time_test: random token ids, a warm-up run, then
`reps` repetitions of pp<N> = one batched eval and tg<N> = N one-token evals), each engine in its
own child process (one after the other, so they never share the CPU, and a crash of one is
reported, not fatal). llama.cpp runs in three CPU configurations: its default, with the repacked
weight buffers ("extra buffer types": CPU_REPACK, and AMX on Intel CPUs that have it), the same
with flash attention on (llama-bench's -fa 1; llama-cpp-python's Llama defaults to off), and
without the repacked buffers; a configuration that crashes is reported, and each test's ratio is taken against the
faster configuration that ran (named in the ratio table). On Intel CPUs with AMX, a llama-cpp-python
built natively (the package index's sdist, pip's default) puts Q8_0 weights in ggml's AMX buffer
type and its repacked configuration crashes (SIGSEGV in the first evaluation: built with GCC 12, whose
_tile_loadconfig tells the compiler it reads 8 of the tile config's 64 bytes, ggml's AMX code
loads a config whose tile shapes were never stored, bench/RESULTS.md); a build without AMX
keeps the CPU repack and runs, so that is llama.cpp's fastest configuration there:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
    -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON" \
    pip install --no-deps --no-binary :all: --target /tmp/lcp_noamx llama-cpp-python==0.3.36
then run this script with PYTHONPATH=/tmp/lcp_noamx (the header's "kernels" line shows the build:
no AMX_INT8 there). The script says so when the repacked configuration crashed with AMX built in.
Several files (the MXFP4 synth file
and the Q4_K_M-style one, `pyengine synth --mix q4_k_m`) run one after the other in the same run.
llama.cpp reads gpt-oss files only under the architecture name `gpt-oss`: write synth files with
`--arch-name gpt-oss` (the script stops at once, saying so, on a `gptoss` file).
Prints a header (date, machine, command, commit, load average) and the tables to paste into
bench/RESULTS.md: llama-bench's, then one row per file and test with the ratio and each decode
speed as a share of the limit the memory read bandwidth implies (the file's own weight bytes per
decoded token, pyengine.bench.decode_bytes, over the bandwidth). The dev VMs' bandwidth moves by
up to 1.7x from minute to minute, so it is probed (pyengine-bench-kernels --bandwidth, same
threads) right before and right after every engine's child process, and each decode speed is taken
as a share of the higher of its own two probes; --bandwidth GB/S gives a fixed value instead.
After each pyengine round on the CPU, the page cache that holds the weights it streamed (the repack
cache beside the model, else the model) is probed too (pyengine-bench-kernels --bandwidth-file):
on the dev VMs those pages read at 0.60-0.91x the fresh buffer's rate, changing with every reload,
so decode is also shown as a share of what its weights' own memory delivered.
Prefill is bound by arithmetic, not memory: its limit is the box's int8 multiply-add peak
(pyengine-bench-kernels --int8-peak, vpdpbusd on AVX-512 VNNI, probed once per run; --int8-peak G/S
gives a value) over the weight multiply-adds of a prompt token (pyengine.bench.prompt_macs), at one
int8 product per weight multiply-add, as llama.cpp's one-digit activations make; pyengine's two
digits make two, so half of that limit is its own ceiling. No limit where there is no AVX-512 VNNI
(and none with --device cuda).
--rounds K runs the whole sequence K times, the engines' order reversed every other round, merges
each engine's repetitions over the rounds (the t/s columns) and reports the median of its per-round
shares: engines compared over the same stretch of time, not minutes apart. --no-extra-bufts runs llama.cpp
without the repacked buffers only; --no-flash-attn leaves out the configuration with flash
attention (one child process less; it was llama.cpp's fastest configuration in every test of
bench/RESULTS.md's twenty-second session, at depth 0 and 4096). --exact runs pyengine with exact=True (float32 activations
everywhere; by default quantized weights get int8 activations, as llama.cpp always does).
--no-mmap runs pyengine with use_mmap=False: its weights copied into anonymous memory at load, as
llama.cpp's repacked buffers are (then there is no page cache to probe).
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
import statistics
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from pyengine.bench import (BenchResult, Runner, cpu_name, decode_bytes, markdown, model_type, n_params, prompt_macs,
                             time_test)
from pyengine.model_file import open_model
from pyengine.repack_cache import cache_path


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
                 exact=args.exact, device=args.device, use_mmap=not args.no_mmap)
    backend = "pyengine (exact)" if args.exact else "pyengine"
    if args.no_mmap:
        backend += " (no-mmap)"
    if args.device != "cpu":
        backend += " CUDA"
    return _rows(Runner(eng.reset, eng.eval), eng.n_vocab, _base(args, backend, eng.n_threads), args)


def child_llamacpp(args, repacked: bool, flash_attn: bool = False) -> list[dict]:
    import llama_cpp

    from pyengine.llama_cpp_peer import open_llama

    gpu = {"n_gpu_layers": -1, "flash_attn": True} if args.device != "cpu" else {}
    if gpu and not llama_cpp.llama_supports_gpu_offload():
        raise SystemExit("this llama-cpp-python has no GPU backend (build it with CMAKE_ARGS=-DGGML_CUDA=on)")
    llm = open_llama(args.model, extra_bufts=repacked,
                     n_ctx=args.n_depth + max(args.p, args.n) + 16, n_threads=args.t,
                     n_threads_batch=args.t, n_batch=args.b, n_ubatch=args.b, verbose=False,
                     **gpu | ({"flash_attn": True} if flash_attn else {}))
    backend = f"llama.cpp {llama_cpp.__version__}" + (" CUDA" if gpu else "") + (
        " repacked" if repacked else " (no extra bufts)") + (" flash-attn" if flash_attn else "")
    return _rows(Runner(llm.reset, llm.eval), llm.n_vocab(), _base(args, backend, args.t), args)


CHILDREN = ("pyengine", "llama.cpp", "llama.cpp-plain", "llama.cpp-fa")


def llama_system_info() -> str | None:
    """The installed llama.cpp build's feature line ("AVX512 = 1 | ... |"), or None without llama_cpp."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.llama_print_system_info().decode().strip()


def kernel_levels(only: str | None) -> str:
    """What each engine's CPU kernels use here (PYENGINE_SIMD and the llama.cpp build decide)."""
    from pyengine._cpu import amx, avx512_extensions, simd_level

    ext = "+".join(avx512_extensions() + (("amx",) if amx() else ()))
    parts = [f"pyengine {simd_level()}" + (f" ({ext})" if ext else "")]
    if only != "pyengine":
        info = llama_system_info()
        parts.append("llama.cpp not installed" if info is None else "llama.cpp " + info.rstrip("|").strip())
    return "; ".join(parts)


def amx_crash_hint(runs: list[ModelRun]) -> str:
    """The way out when llama.cpp's repacked configuration crashed in a build with AMX (see above), or ""."""
    crashed = any(isinstance(run.results.get("llama.cpp"), str) for run in runs)
    if not crashed or "AMX_INT8 = 1" not in (llama_system_info() or ""):
        return ""
    return ("llama.cpp's repacked configuration crashed, and this llama-cpp-python has AMX built in: build "
            "one without AMX (this script's docstring) and run with PYTHONPATH pointing at it")


def kernel_bench(threads: int, *what: str) -> float:
    """The number the kernel bench prints for a probe flag, or 0 when it is not installed (looked up
    on PATH, then beside this Python, where a virtual environment that is not activated has it) or
    cannot probe that here."""
    exe = shutil.which("pyengine-bench-kernels") or shutil.which("pyengine-bench-kernels",
                                                                 path=str(Path(sys.executable).parent))
    if not exe:
        return 0.0
    r = subprocess.run([exe, "-t", str(threads), *what], capture_output=True, text=True)
    return float(r.stdout.strip()) if r.returncode == 0 else 0.0


def bandwidth(threads: int, file: str | None = None) -> float:
    """GB/s from the kernel bench's read probe (of a fresh buffer; with `file`, of that file's pages
    in the page cache), or 0 (kernel_bench)."""
    return kernel_bench(threads, *(["--bandwidth-file", file] if file else ["--bandwidth"]))


def int8_peak(threads: int) -> float:
    """G int8 multiply-adds a second the threads reach together (the kernel bench's vpdpbusd probe:
    prefill's ceiling), or 0 where there is no AVX-512 VNNI (kernel_bench)."""
    return kernel_bench(threads, "--int8-peak")


def streamed_file(model: str) -> str:
    """The file whose pages pyengine's decode streams: the repack cache beside the model where there
    is one (pyengine/repack_cache.py), else the model itself."""
    cache = cache_path(open_model(model))
    return str(cache) if cache.exists() else model


def child_argv(args, model: str) -> list[str]:
    """The command line a child process gets for one model: the timing options, not the others."""
    argv = [model, "-p", str(args.p), "-n", str(args.n), "-t", str(args.t), "-b", str(args.b),
            "-r", str(args.r), "-d", str(args.n_depth), "--device", args.device]
    return argv + (["--exact"] if args.exact else []) + (["--no-mmap"] if args.no_mmap else [])


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
    """One file's results: engine -> its rows (repetitions of every round merged), or why it failed;
    the weight bytes a decoded token reads from it, the weight multiply-adds a prompt token takes;
    and per (engine, test) the decode speed of each round as a share of the bandwidth probed around
    that round (empty: the table uses one bandwidth)."""
    path: str
    per_token: int
    results: dict[str, list[BenchResult] | str] = field(default_factory=dict)
    macs: int = 0  # weight multiply-adds per prompt token (pyengine.bench.prompt_macs; 0: no prefill limit)
    shares: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    pages: list[tuple[str, str, float, float]] = field(default_factory=list)  # (file, test, GB/s, share)

    def add_pages(self, got: list[BenchResult], file: str, gbs: float) -> None:
        """pyengine's decode speeds of one round as a share of the read rate of the page cache that
        holds the weights it streams (`file`), probed right after the round (0: not probed)."""
        for r in got:
            if gbs and r.n_gen:
                self.pages.append((file, r.test, gbs, r.avg_ts * self.per_token / (gbs * 1e9)))

    def add(self, engine: str, got: list[BenchResult] | str, bw: float) -> None:
        """One round of one engine, run while the bandwidth was `bw` GB/s (0: unknown)."""
        have = self.results.get(engine)
        if isinstance(got, str) or isinstance(have, str):
            self.results[engine] = got if isinstance(got, str) else have  # a failure stays reported
            return
        merged = {r.test: r for r in have or []}
        for r in got:
            if r.test in merged:
                merged[r.test] = replace(merged[r.test], samples_ns=merged[r.test].samples_ns + r.samples_ns)
            else:
                merged[r.test] = r
            if bw and r.n_gen:
                self.shares.setdefault((engine, r.test), []).append(r.avg_ts * self.per_token / (bw * 1e9))
        self.results[engine] = list(merged.values())


def best_peer(test: str, runs: ModelRun) -> tuple[str, BenchResult | None]:
    """The fastest llama.cpp configuration that ran `test`: its engine name and row ("", None if none)."""
    rows = [(k, r) for k, v in runs.results.items() if k != "pyengine" and isinstance(v, list) for r in v
            if r.test == test]
    return max(rows, key=lambda kr: kr[1].avg_ts, default=("", None))


def comparison(runs: list[ModelRun], bw: float, peak: float = 0.0) -> str:
    """RESULTS.md's ratio table: per file and test, pyengine against the best llama.cpp
    configuration, and each speed as a share of the file's limit: decode (tg) against the bandwidth,
    the median of the per-round shares where the run probed around each round (ModelRun.shares),
    else against `bw`, the limit column at `bw` (the highest probe of the run); prefill (pp) against
    the int8 multiply-add peak `peak` (G/s) at one product per weight multiply-add (0: no limit)."""
    lines = ["| model | test | pyengine t/s | best llama.cpp t/s | llama.cpp configuration | ratio | "
             "limit t/s (tg: bandwidth, pp: int8 peak) | % of the limit (pyengine / llama.cpp) |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for run in runs:
        ours = run.results.get("pyengine")
        name = Path(run.path).name
        rows = ours if isinstance(ours, list) else []
        tests = [r.test for r in rows] or list(dict.fromkeys(
            r.test for v in run.results.values() if isinstance(v, list) for r in v))
        for test in tests:
            a = next((r for r in rows if r.test == test), None)
            peer, best = best_peer(test, run)
            gen = (a or best).n_gen > 0
            limit = (bw * 1e9 / run.per_token if bw else 0.0) if gen else (
                peak * 1e9 / run.macs if peak and run.macs else 0.0)

            def share(engine: str, r: BenchResult | None) -> str:
                if r is None:
                    return "-"
                per_round = run.shares.get((engine, test)) if gen else None
                return f"{100 * statistics.median(per_round):.0f} %" if per_round else f"{100 * r.avg_ts / limit:.0f} %"

            cells = [name, test, f"{a.avg_ts:.2f}" if a else "-", f"{best.avg_ts:.2f}" if best else "-",
                     best.backends if best else "-", f"{a.avg_ts / best.avg_ts:.2f}x" if a and best else "-",
                     f"{limit:.2f}" if limit else "-", f"{share('pyengine', a)} / {share(peer, best)}" if limit else "-"]
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
    ap.add_argument("--rounds", type=int, default=1, help="run every engine this many times, order alternating")
    ap.add_argument("-d", "--n-depth", type=int, default=0)
    ap.add_argument("--no-extra-bufts", action="store_true")
    ap.add_argument("--no-flash-attn", action="store_true",
                    help="leave out llama.cpp's repacked configuration with flash attention on")
    ap.add_argument("--exact", action="store_true", help="pyengine with exact=True (float32 activations)")
    ap.add_argument("--no-mmap", action="store_true", help="pyengine with use_mmap=False (weights copied at load)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: see above")
    ap.add_argument("--only", choices=("pyengine", "llama.cpp"))
    ap.add_argument("--bandwidth", type=float, metavar="GB/S", help="the read bandwidth to use instead of probing")
    ap.add_argument("--int8-peak", type=float, metavar="G/S",
                    help="the int8 multiply-add peak (prefill's ceiling) to use instead of probing")
    ap.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.child:
        args.model = args.models[0]
        rows = child_pyengine(args) if args.child == "pyengine" else child_llamacpp(
            args, args.child != "llama.cpp-plain", flash_attn=args.child == "llama.cpp-fa")
        print(json.dumps(rows))
        return 0

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    print(f"### {datetime.date.today()} · {cpu_name()} ({os.cpu_count()} CPUs, {platform.system()}) · commit {commit}")
    print(f"`python bench/compare_llamacpp.py {' '.join(sys.argv[1:])}` · load average before: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(f"kernels: {kernel_levels(args.only)}\n")
    llama = () if args.only == "pyengine" else ("llama.cpp-plain",) if args.no_extra_bufts else CHILDREN[1:]
    if args.no_flash_attn or args.device != "cpu":  # on the GPU every configuration has flash attention on
        llama = tuple(c for c in llama if c != "llama.cpp-fa")
    engines = (() if args.only == "llama.cpp" else ("pyengine",)) + llama
    files = {model: open_model(model) for model in args.models}
    if llama:
        for model, mf in files.items():
            if mf.arch != "gpt-oss":
                raise SystemExit(f"{model}: general.architecture is {mf.arch!r}, and llama.cpp loads gpt-oss files "
                                 "only as 'gpt-oss': write it with `pyengine synth --arch-name gpt-oss` (or "
                                 "`pyengine convert --arch-name gpt-oss`), or pass --only pyengine")
    runs = [ModelRun(model, decode_bytes(mf), macs=prompt_macs(mf)) for model, mf in files.items()]
    peak = args.int8_peak or (int8_peak(args.t) if args.device == "cpu" else 0.0)
    probes = []  # (file, engine, round, before, after)
    for rnd in range(args.rounds):
        for run in runs:
            for engine in engines if rnd % 2 == 0 else engines[::-1]:
                before = args.bandwidth or bandwidth(args.t)
                got = run_child(engine, child_argv(args, run.path))
                after = args.bandwidth or bandwidth(args.t)
                probes.append((Path(run.path).name, engine, rnd + 1, before, after))
                run.add(engine, got, max(before, after))
                if (engine == "pyengine" and args.device == "cpu" and not args.bandwidth and not args.no_mmap
                        and not isinstance(got, str)):
                    pages = streamed_file(run.path)
                    run.add_pages(got, pages, bandwidth(args.t, pages))
                if isinstance(got, str):
                    print(f"**{Path(run.path).name}, round {rnd + 1}: {got}**\n")
    rows = [r for run in runs for v in run.results.values() if isinstance(v, list) for r in v]
    if rows:
        print(markdown(rows))
    bw = max((max(b, a) for *_, b, a in probes), default=0.0)
    if args.bandwidth:
        print(f"\nmemory read bandwidth: {bw:.1f} GB/s (given, not probed)\n")
    elif bw:
        print(f"\nmemory read bandwidth ({args.t} threads, pyengine-bench-kernels --bandwidth) right before / after "
              "each engine ran; each decode share below is against the higher of its own two probes, the "
              f"limits against the highest of the run, {bw:.1f} GB/s:")
        for name, engine, rnd, b, a in probes:
            print(f"- {name}, {engine}, round {rnd}: {b:.1f} / {a:.1f} GB/s")
        print()
    else:
        print("\nno memory read bandwidth (pyengine-bench-kernels not found): no decode limits\n")
    if peak:
        print(f"int8 multiply-add peak ({args.t} threads, " + ("given" if args.int8_peak else
              "pyengine-bench-kernels --int8-peak") + f"): {peak:.1f} G/s; a prompt token's weight multiply-adds "
              "at one int8 product each give the prefill limit (pyengine's two int8 digits per activation "
              "take two products each: its own ceiling is half of it)\n")
    for run in runs:
        print(f"- {Path(run.path).name}: a decoded token reads {run.per_token / 1e9:.3f} GB of weights"
              + (f": limit {bw * 1e9 / run.per_token:.2f} tok/s" if bw else "")
              + (f"; a prompt token takes {run.macs / 1e9:.3f} G weight multiply-adds: limit "
                 f"{peak * 1e9 / run.macs:.2f} tok/s" if peak and run.macs else ""))
        for (engine, test), shares in run.shares.items():
            if len(shares) > 1:
                print(f"  - {engine} {test}, share of the bandwidth round by round: "
                      + ", ".join(f"{100 * x:.0f} %" for x in shares))
        for file, test, gbs, share in run.pages:
            print(f"  - pyengine {test}: its weights' pages ({Path(file).name}, pyengine-bench-kernels "
                  f"--bandwidth-file) read at {gbs:.1f} GB/s right after the round: decode at {100 * share:.1f} % of that")
    print("\n" + comparison(runs, bw, peak))
    hint = amx_crash_hint(runs)
    if hint:
        print(f"\n**{hint}**")
    print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
