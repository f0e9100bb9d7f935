"""One decode step under Nsight Compute, and the per-kernel table of what ncu measured.

    ncu --profile-from-start off --clock-control none --graph-profiling node --print-units base \
        --csv --metrics "$(python bench/ncu_decode.py --metrics)" \
        python bench/ncu_decode.py MODEL.gguf [--depth 512] > ncu.csv
    python bench/ncu_decode.py --summarize ncu.csv [--json OUT.json]

Why: docs/cuda.md estimates the bytes and instructions each decode kernel needs per token; this
is the measurement that confirms or refutes them. The run prefills `depth` random tokens, decodes
a few steps (the CUDA graph is captured), then opens the profiler for exactly one decode step
(cudaProfilerStart/Stop), so ncu sees that step's kernels alone; `--graph-profiling node` profiles
each node of the replayed graph as its own kernel and `--clock-control none` keeps the clocks the
bench runs at. `--summarize` folds ncu's CSV (one row per kernel and metric) into one line per
kernel name: launches, total time, DRAM bytes read and written, warp instructions, and the mean
share of cycles an instruction was issued (issue-active). Without ncu the step still runs (the
profiler calls are no-ops in the emulator), which is how the device check's dry mode tests it."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict

import numpy as np

# metric -> column of the summary
METRICS = {
    "gpu__time_duration.sum": "ns",
    "dram__bytes_read.sum": "dram_read",
    "dram__bytes_write.sum": "dram_write",
    "smsp__inst_executed.sum": "warp_inst",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue_active_pct",
}


def profile_one_step(model: str, depth: int, warmup: int) -> None:
    from pyengine import cuda
    from pyengine.engine import Engine

    eng = Engine(model, n_ctx=depth + warmup + 8, device="cuda")
    toks = np.random.default_rng(0).integers(0, eng.n_vocab, depth + warmup + 1).tolist()
    eng.eval(toks[:depth])
    for t in toks[depth:depth + warmup]:
        eng.eval([t])  # the first one-token step captures the graph
    cu = cuda.backend()
    cu.synchronize()
    cu.profiler(True)
    eng.eval([toks[-1]])
    cu.synchronize()
    cu.profiler(False)
    print(f"profiled one decode step at depth {depth + warmup} (graphs {'on' if eng._model.graphs_active else 'off'})",
          file=sys.stderr)


def summarize(path: str) -> list[dict]:
    """Per kernel name: launches and the sums (issue-active: the mean) of METRICS over its launches."""
    rows: dict[str, dict] = defaultdict(lambda: {"launches": set(), **{c: 0.0 for c in METRICS.values()},
                                                 "issue_n": 0})
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu prints its own log lines too
    for r in csv.DictReader(lines):
        metric = r.get("Metric Name")
        if metric not in METRICS:
            continue
        k = rows[r["Kernel Name"]]
        k["launches"].add(r["ID"])
        value = float(r["Metric Value"].replace(",", ""))
        if METRICS[metric] == "issue_active_pct":
            k["issue_active_pct"] += value
            k["issue_n"] += 1
        else:
            k[METRICS[metric]] += value
    out = []
    for name, k in rows.items():
        out.append({"kernel": name, "launches": len(k["launches"]),
                    **{c: k[c] for c in METRICS.values() if c != "issue_active_pct"},
                    "issue_active_pct": k["issue_active_pct"] / k["issue_n"] if k["issue_n"] else float("nan")})
    return sorted(out, key=lambda k: -k["ns"])


def table(kernels: list[dict]) -> str:
    total_ns = sum(k["ns"] for k in kernels) or 1.0
    lines = ["| kernel | launches | us | share | DRAM read MB | DRAM write MB | GB/s | warp inst (M) | "
             "bytes/inst | issue-active % |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k in kernels:
        moved = k["dram_read"] + k["dram_write"]
        lines.append(
            f"| {k['kernel'][:60]} | {k['launches']} | {k['ns'] / 1e3:.1f} | {100 * k['ns'] / total_ns:.0f}% | "
            f"{k['dram_read'] / 1e6:.2f} | {k['dram_write'] / 1e6:.2f} | {moved / k['ns'] if k['ns'] else 0:.0f} | "
            f"{k['warp_inst'] / 1e6:.3f} | {k['dram_read'] / k['warp_inst'] if k['warp_inst'] else 0:.1f} | "
            f"{k['issue_active_pct']:.0f} |")
    launches = sum(k["launches"] for k in kernels)
    lines.append(f"\none decode step: {launches} kernel launches, {total_ns / 1e3:.0f} us of kernel time, "
                 f"{sum(k['dram_read'] for k in kernels) / 1e6:.1f} MB read from DRAM")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--depth", type=int, default=512, help="tokens in the cache before the step (default 512)")
    ap.add_argument("--warmup", type=int, default=3, help="decode steps before the profiled one (default 3)")
    ap.add_argument("--metrics", action="store_true", help="print the metric list for ncu --metrics and exit")
    ap.add_argument("--summarize", metavar="CSV", help="summarize ncu's CSV output instead of running")
    ap.add_argument("--json", help="with --summarize: also write the per-kernel rows here")
    args = ap.parse_args()
    if args.metrics:
        print(",".join(METRICS))
        return 0
    if args.summarize:
        kernels = summarize(args.summarize)
        if not kernels:
            print(f"[ERROR] {args.summarize}: no kernel metrics found", file=sys.stderr)
            return 1
        print(table(kernels))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(kernels, f, indent=2)
        return 0
    if not args.model:
        ap.error("MODEL is required unless --metrics or --summarize")
    profile_one_step(args.model, args.depth, args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
