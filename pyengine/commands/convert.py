"""Convert a Hugging Face gpt-oss checkpoint folder to a GGUF file.

Reads config.json, *.safetensors (bf16/f32 experts or the published MXFP4 *_blocks/*_scales form)
and tokenizer.json (+ chat template); writes OUT.gguf atomically (never half-written), refusing to
overwrite an existing file unless --force. One progress line per tensor on stderr (-q: none)."""

from __future__ import annotations

import argparse
import sys
import time

from pyengine.convert import ARCH_NAMES, LAYOUTS, OUTTYPES, PlannedTensor, convert


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model folder (config.json, *.safetensors)")
    p.add_argument("out", metavar="OUT.gguf", help="output GGUF file")
    p.add_argument("--outtype", choices=OUTTYPES, default="bf16",
                   help="type of the weight matrices (default bf16); mxfp4 = MXFP4 experts + Q8_0 "
                        "elsewhere, like llama.cpp's MXFP4_MOE. MXFP4 checkpoint experts stay MXFP4")
    p.add_argument("--arch-name", choices=ARCH_NAMES, default="gptoss",
                   help="architecture spelling (default gptoss; gpt-oss is what llama.cpp loads)")
    p.add_argument("--layout", choices=LAYOUTS, default="llama.cpp",
                   help="tensor names/keys: llama.cpp (default) or ollama (Ollama's Gen-2 gptoss)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()

    def progress(i: int, n: int, t: PlannedTensor) -> None:
        shape = "x".join(str(d) for d in reversed(t.shape))
        print(f"[{i:{len(str(n))}}/{n}] {t.name:<32} {t.qtype.name:<5} {shape}", file=sys.stderr, flush=True)

    try:
        out = convert(args.hf_dir, args.out, outtype=args.outtype, arch_name=args.arch_name,
                      layout=args.layout, force=args.force, progress=None if args.quiet else progress)
    except FileExistsError as e:
        print(f"[ERROR] {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[ERROR] interrupted; no output file written", file=sys.stderr)
        return 130
    size = out.stat().st_size
    print(f"[INFO] wrote {out} ({size / 2**20:.1f} MiB) in {time.monotonic() - start:.1f} s",
          file=sys.stderr)
    return 0
