"""Write a random-weight gpt-oss GGUF at the real shape, for benchmarking without a download:
`pyengine synth --shape gpt-oss-20b [--layers N] [--fast] [--mix mxfp4|q4_k_m|q5_k_m|f16] OUT.gguf`.

Real dimensions, ggml-org's type layout (MXFP4 experts, Q8_0 attention/embeddings/output) and the
real o200k_harmony vocabulary; random finite weights, so the text is nonsense but the speed is
the real model's. --fast writes it in seconds (layer 0 repeated, quantized matrices drawn as
blocks, a synthetic vocabulary of the same size: see pyengine.synth). --mix q4_k_m writes the types of the
Q4_K_M files instead, --mix q5_k_m those of the Q5_K_M files, --mix f16 those of the "F16" files. Refuses to overwrite OUT unless --force; never leaves a half-written file."""

from __future__ import annotations

import argparse
import sys
import time

from pyengine.commands._args import integer
from pyengine.convert import ARCH_NAMES
from pyengine.log import logger
from pyengine.synth import MIXES, SHAPES, write_synth_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="OUT.gguf", help="output file")
    p.add_argument("--shape", choices=tuple(SHAPES), default="gpt-oss-20b",
                   help="the real model whose dimensions and types are used (default gpt-oss-20b)")
    p.add_argument("--layers", type=integer(1), default=None, help="number of layers (default: the shape's)")
    p.add_argument("--arch-name", choices=ARCH_NAMES, default="gptoss",
                   help="architecture spelling (default gptoss; gpt-oss is what llama.cpp loads)")
    p.add_argument("--mix", choices=MIXES, default="mxfp4",
                   help="weight types: mxfp4 (default; ggml-org's files: MXFP4 experts, Q8_0 the rest), "
                        "q4_k_m (unsloth's Q4_K_M files: MXFP4 experts, Q4_K attn_output, Q5_0/Q8_0 the rest), "
                        "q5_k_m (the Q5_K_M files: Q5_K attn_output, Q5_1/Q8_0 the rest) "
                        "or f16 (the F16 files: MXFP4 experts, F16 the rest)")
    p.add_argument("--seed", type=integer(0), default=0, help="random seed for the weights (default 0)")
    p.add_argument("--fast", action="store_true",
                   help="seconds, not minutes: layer 0 repeated, quantized matrices drawn as blocks, synthetic vocabulary")
    p.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()

    def progress(done: int, total: int, t) -> None:
        if sys.stderr.isatty():
            print(f"\r[{done}/{total}] {t.name:40s}", end="", file=sys.stderr, flush=True)

    try:
        out = write_synth_model(args.path, args.shape, n_layer=args.layers, arch_name=args.arch_name,
                                seed=args.seed, force=args.force, fast=args.fast,
                                mix=args.mix, progress=progress)
    except (FileExistsError, ValueError) as e:
        print(f"[ERROR] {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[ERROR] interrupted; no output file written", file=sys.stderr)
        return 130
    if sys.stderr.isatty():
        print(file=sys.stderr)
    logger.info("wrote %s (%.2f GiB) in %.1f s: %s shape, random weights (nonsense text, real speed)",
                out, out.stat().st_size / 2**30, time.monotonic() - start, args.shape)
    return 0
