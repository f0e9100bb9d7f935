"""Time prompt processing and decoding like llama-bench: `pyengine bench MODEL -p 512 -n 128`.

Prints llama-bench's markdown table (pp512 / tg128, t/s as mean ± stddev) or its JSON fields
(-o json). Random token ids; a warm-up run first; the page cache is whatever it is (run twice
for warm numbers)."""

from __future__ import annotations

import argparse
import json
import sys

from pyengine import cuda
from pyengine import _model
from pyengine.bench import BenchResult, Runner, markdown, model_type, n_params, profile_table, time_test
from pyengine.commands._args import integer
from pyengine.commands._device import cache_arguments, cache_options, gpu_arguments, gpu_options
from pyengine.engine import Engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a .gguf file, or a model name in the models folder")
    p.add_argument("-p", "--n-prompt", type=integer(0), default=512, help="prompt tokens of the pp test (0: none)")
    p.add_argument("-n", "--n-gen", type=integer(0), default=128, help="decoded tokens of the tg test (0: none)")
    p.add_argument("-d", "--n-depth", type=integer(0), default=0, help="tokens already in the cache before each test")
    p.add_argument("-t", "--threads", type=integer(1), default=None,
                   help="threads (default: the physical cores this process may use)")
    p.add_argument("-b", "--batch-size", type=integer(1), default=512, help="n_batch (default 512)")
    p.add_argument("-r", "--repetitions", type=integer(1), default=5, help="repetitions of each test (default 5)")
    p.add_argument("-o", "--output", choices=("md", "json"), default="md",
                   help="md: llama-bench's table (default); json: its JSON fields")
    p.add_argument("--models-dir", help="models folder for names")
    p.add_argument("--exact", action="store_true",
                   help="float32 activations in every product (default: int8 activations for quantized "
                        "weights, as llama.cpp; see docs/forward.md)")
    p.add_argument("--profile", action="store_true",
                   help="after the table, where each test's forward passes spent their time on the CPU: per "
                        "operation ms per pass, weight MB per pass and GB/s (csrc/profile.h)")
    gpu_arguments(p)
    cache_arguments(p)


def device_fields(eng: Engine) -> dict:
    """backends / gpu_info / n_gpu_layers of a GPU engine (llama-bench's names); {} on the CPU."""
    if eng.device == "cpu":
        return {}
    cu = cuda.backend()
    backend = "CUDA" if cu.BACKEND == "cuda" else "CUDA (emulator)"
    return {"backends": backend, "gpu_info": cu.device_info(int(eng.device.partition(":")[2] or 0))["name"],
            "n_gpu_layers": int(eng.hparams.n_layer) - eng._model.first_gpu_layer}


def run(args: argparse.Namespace) -> int:
    if args.profile and ((args.device or "cpu") != "cpu" or args.n_gpu_layers):
        print("[ERROR] --profile times the CPU forward pass: not with --device cuda or --n-gpu-layers", file=sys.stderr)
        return 2
    n_ctx = args.n_depth + max(args.n_prompt, args.n_gen) + 16
    eng = Engine(args.model, n_ctx=n_ctx, n_threads=args.threads, n_batch=args.batch_size,
                 models_dir=args.models_dir, exact=args.exact, **gpu_options(args), **cache_options(args))
    runner = Runner(eng.reset, eng.eval)
    base = dict(model_filename=str(eng.model_file.path), model_type=model_type(eng.model_file),
                model_size=eng.model_file.file_size, model_n_params=n_params(eng.model_file),
                n_batch=eng.n_batch, n_threads=eng.n_threads, n_depth=args.n_depth, type_k=eng.cache_type_k,
                type_v=eng.cache_type_v, **device_fields(eng))
    rows, profiles = [], []
    for n_prompt, n_gen in ((args.n_prompt, 0), (0, args.n_gen)):
        if n_prompt or n_gen:
            if args.profile:
                _model.profile_reset()
            ns = time_test(runner, eng.n_vocab, n_prompt, n_gen, args.n_depth, args.repetitions,
                           profiler=_model.profile_enable if args.profile else None)
            rows.append(BenchResult(n_prompt=n_prompt, n_gen=n_gen, samples_ns=ns, **base))
            if args.profile:
                profiles.append((rows[-1].test, profile_table(_model.profile_read(), sum(ns))))
    print(json.dumps([r.to_json() for r in rows], indent=2) if args.output == "json" else markdown(rows))
    for test, table in profiles:
        print(f"\nprofile of {test} ({args.repetitions} repetitions; per forward pass):\n{table}")
    return 0
