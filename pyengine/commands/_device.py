"""The device and KV cache flags shared by run, chat, bench, serve and llm-router-node (llama.cpp's
spellings)."""

from __future__ import annotations

import argparse
from typing import Any

from pyengine.commands._args import device, integer


def gpu_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device, default=None,
                   help="cpu (default), cuda or cuda:N: where the forward pass runs")
    p.add_argument("--n-gpu-layers", "-ngl", type=integer(-1), default=None,
                   help="with --device cuda: how many of the last layers run on the GPU (default -1: all)")
    p.add_argument("--cpu-moe", action="store_true",
                   help="with --device cuda: keep the expert weights in host memory, run the experts on the CPU")


def gpu_options(args: argparse.Namespace) -> dict[str, Any]:
    """Engine keyword arguments of the device flags."""
    return {"device": args.device or "cpu", "n_gpu_layers": args.n_gpu_layers, "cpu_moe": args.cpu_moe}


def cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-type-k", "-ctk", default=None, metavar="TYPE",
                   help="KV cache type of K: f32, f16 (default), bf16 or q8_0")
    p.add_argument("--cache-type-v", "-ctv", default=None, metavar="TYPE",
                   help="KV cache type of V: f32, f16 (default), bf16 or q8_0")
    p.add_argument("--no-repack", action="store_true",
                   help="decode every weight from the model file's layout, without the repack cache file "
                        "(MODEL.gguf.pyengine-r16) that is otherwise built beside the model on first load")
    p.add_argument("--ctx-checkpoints", "--swa-checkpoints", type=integer(0), default=None, metavar="N",
                   dest="ctx_checkpoints",
                   help="checkpoints of the sliding-window layers' KV a cache (a slot) keeps, one at the end of each "
                        "prompt, so that a next turn, a regenerated or edited turn is not evaluated from the start "
                        "(default 8, ~16 MB each for gpt-oss-20b, in host memory; 0: none)")
    p.add_argument("--checkpoint-min-step", "-cms", "--checkpoint-every-n-tokens", "-cpent", type=integer(-1),
                   default=None, metavar="N", dest="checkpoint_min_step",
                   help="inside a long prompt, one more such checkpoint every N tokens, so that a prompt that changes "
                        "one in its middle is evaluated from the checkpoint before the change (default 4096; "
                        "0 or -1: only at prompt ends)")
    p.add_argument("--no-mmap", action="store_true",
                   help="copy the weights into process memory at load instead of reading them where the files "
                        "are mapped (seconds more at load, the weights' size in RSS; faster decode where the "
                        "page cache reads slower than fresh memory)")


def cache_options(args: argparse.Namespace) -> dict[str, Any]:
    """Engine keyword arguments of the KV cache and weight-memory flags; an unknown type is an OptionError."""
    from pyengine._model import DEFAULT_KV_CACHE_TYPE, kv_cache_type
    from pyengine.errors import OptionError
    from pyengine.runner import DEFAULT_CHECKPOINT_MIN_STEP, DEFAULT_CHECKPOINTS
    try:
        return {"cache_type_k": kv_cache_type(args.cache_type_k or DEFAULT_KV_CACHE_TYPE, "--cache-type-k"),
                "cache_type_v": kv_cache_type(args.cache_type_v or DEFAULT_KV_CACHE_TYPE, "--cache-type-v"),
                "repack": not args.no_repack, "use_mmap": not args.no_mmap,
                "ctx_checkpoints": DEFAULT_CHECKPOINTS if args.ctx_checkpoints is None else args.ctx_checkpoints,
                "checkpoint_min_step": (DEFAULT_CHECKPOINT_MIN_STEP if args.checkpoint_min_step is None
                                        else args.checkpoint_min_step)}
    except ValueError as e:
        raise OptionError(str(e)) from None
