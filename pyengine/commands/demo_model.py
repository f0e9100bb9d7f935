"""Write a tiny random-weight gpt-oss GGUF (real o200k_harmony tokenizer) to try every command.

The file has gpt-oss's structure and vocabulary at toy sizes and writes in a few seconds; its
weights are random, so it produces nonsense text. An existing demo model at PATH is replaced (it
is this command's own output, so running the README's first command again works); any other file
is never overwritten without --force. The file is written atomically (never half-written)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pyengine.commands._args import integer
from pyengine.convert import ARCH_NAMES, OUTTYPES
from pyengine.demo_model import DEFAULT_PATH, NAME, demo_config, write_demo_model
from pyengine.errors import ModelLoadError
from pyengine.gguf_reader import GGUFFile
from pyengine.log import logger


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", nargs="?", default=DEFAULT_PATH,
                   help=f"output GGUF file (default {DEFAULT_PATH})")
    p.add_argument("--arch-name", choices=ARCH_NAMES, default="gptoss",
                   help="architecture spelling (default gptoss; gpt-oss is what llama.cpp loads)")
    p.add_argument("--outtype", choices=OUTTYPES, default="mxfp4",
                   help="weight types (default mxfp4 = MXFP4 experts + Q8_0 matrices, like the "
                        "ggml-org gpt-oss files); others put every matrix, experts included, in that type")
    p.add_argument("--seed", type=integer(0), default=0, help="random seed for the weights (default 0)")
    p.add_argument("--layers", type=integer(1), default=2, help="number of layers (default 2)")
    p.add_argument("--embd", type=integer(32), default=64, help="embedding width, a multiple of 32 (default 64)")
    p.add_argument("--force", action="store_true",
                   help="overwrite PATH if it exists (an earlier demo model is replaced without it)")


def is_demo_model(path: str) -> bool:
    """Whether PATH is a GGUF file this command wrote (general.name gpt-oss-demo)."""
    if not Path(path).is_file():
        return False
    try:
        f = GGUFFile(path)
    except ModelLoadError:
        return False
    try:
        return f.metadata.get("general.name") == NAME
    finally:
        f.close()


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    force = args.force or is_demo_model(args.path)
    if force and not args.force:
        logger.info("replacing the earlier demo model %s", args.path)
    try:
        out = write_demo_model(args.path, arch_name=args.arch_name, outtype=args.outtype,
                               seed=args.seed, n_layer=args.layers, n_embd=args.embd, force=force)
    except (FileExistsError, ValueError) as e:
        print(f"[ERROR] {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[ERROR] interrupted; no output file written", file=sys.stderr)
        return 130
    c = demo_config(args.layers, args.embd)
    logger.info("wrote %s (%.1f MiB) in %.1f s: gpt-oss structure (arch %s, %d layers, n_embd %d, "
                "%d experts / %d used, %s), real o200k_harmony tokenizer and chat template",
                out, out.stat().st_size / 2**20, time.monotonic() - start, args.arch_name,
                c.n_layer, c.n_embd, c.n_expert, c.n_expert_used, args.outtype)
    logger.info("the weights are RANDOM: this model produces nonsense text; it is for trying the "
                "commands, not for answers")
    return 0
