"""Show a GGUF model's architecture, hyperparameters, tokenizer and tensor summary.

Reads only the header, metadata and tensor directory (nothing is checked beyond what parsing
needs: use `pyengine validate` for that), so it works on files the engine would refuse."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

import numpy as np
from gguf import GGUFValueType

from pyengine.gguf_reader import type_name
from pyengine.model_file import check_files, open_gguf_files
from pyengine.model_paths import resolve_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="FILE", help="a .gguf file, or a model name in the models folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.add_argument("--models-dir", help="models folder for names (default $LLM_NODE_MODELS_DIR, "
                                        "else ~/.llm-router/models)")


def _plain(v: Any, vtype: GGUFValueType) -> Any:
    if vtype == GGUFValueType.FLOAT32:
        return float(str(np.float32(v)))  # the shortest decimal that is this f32 (1e-05, not 9.99e-06)
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list) and len(v) > 16:
        return f"[{', '.join(map(repr, v[:8]))}, ... ({len(v)} elements)]"
    return v


def summarize(model: str, models_dir: str | None = None) -> dict[str, Any]:
    """The facts `info` prints, as a JSON-ready dict."""
    files = open_gguf_files(resolve_model(model, models_dir))
    try:
        raw, problems = check_files(files)
        md = files[0].metadata
        arch = md.get("general.architecture")
        prefix = f"{arch}." if isinstance(arch, str) else None
        hparams = {k: _plain(md[k], md.types[k]) for k in md if prefix and k.startswith(prefix)}
        counts = Counter("MXFP4 (type 4, OpenAI order)" if t.openai_mxfp4 else type_name(t.ggml_type)
                         for t in raw.values())
        return {
            "file": str(files[0].path),
            "files": len(files),
            "general.architecture": arch,
            "general.name": md.get("general.name"),
            "hyperparameters": hparams,
            "tokenizer": {
                "model": md.get("tokenizer.ggml.model"),
                "pre": md.get("tokenizer.ggml.pre"),
                "vocab_size": md.count("tokenizer.ggml.tokens") if "tokenizer.ggml.tokens" in md else None,
                "merges": md.count("tokenizer.ggml.merges") if "tokenizer.ggml.merges" in md else None,
            },
            "tensors": {
                "count": len(raw),
                "types": dict(sorted(counts.items())),
                "parameters": int(sum(int(np.prod(t.shape, dtype=np.int64)) for t in raw.values())),
                "file_size": sum(f.size for f in files),
            },
            "problems": len(problems),
        }
    finally:
        for f in files:
            f.close()


def run(args: argparse.Namespace) -> int:
    s = summarize(args.model, args.models_dir)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"general.architecture: {s['general.architecture']}")
    print(f"general.name: {s['general.name']}")
    for k, v in s["hyperparameters"].items():
        print(f"{k}: {v}")
    tok = s["tokenizer"]
    print(f"tokenizer: model {tok['model']}, pre {tok['pre']}, vocab size {tok['vocab_size']}, "
          f"merges {tok['merges']}")
    t = s["tensors"]
    types = ", ".join(f"{name} {n}" for name, n in t["types"].items())
    print(f"tensors: {t['count']} ({types}); parameters: {t['parameters']:,}; "
          f"file size: {t['file_size']:,} bytes in {s['files']} file(s)")
    if s["problems"]:
        print(f"problems: {s['problems']} (run `pyengine validate`)")
    return 0
