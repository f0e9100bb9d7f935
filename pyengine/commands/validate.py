"""Check a GGUF model file and list every problem found (exit 0 when valid, 1 otherwise).

Structure: magic, version, truncation, tensor offsets and sizes inside the file, alignment, duplicate
names, known types the engine supports; then the architecture, required keys, required tensors and their shapes.
--deep also reads all tensor data: NaN/Inf values and impossible block scales."""

from __future__ import annotations

import argparse
import sys

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from pyengine.errors import ModelLoadError
from pyengine.gguf_reader import GGUFFile, RawTensor, type_name
from pyengine.model_file import check_files, model_arch, open_gguf_files, type_problems, vocab_problems
from pyengine.model_paths import resolve_model

MXFP4 = int(GGMLQuantizationType.MXFP4)
E8M0_NAN = 0xFF  # the one E8M0 exponent that encodes NaN, not a scale
CHUNK_BYTES = 1 << 24


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="FILE", help="a .gguf file, or a model name in the models folder")
    p.add_argument("--deep", action="store_true", help="also scan tensor data for NaN/Inf and bad scales")
    p.add_argument("--models-dir", help="models folder for names (default $LLM_NODE_MODELS_DIR, "
                                        "else ~/.llm-router/models)")


def scan_tensor(f: GGUFFile, t: RawTensor) -> str | None:
    """The first data problem of a tensor (NaN/Inf value, NaN block scale), or None."""
    data = f.tensor_bytes(t)
    # OpenAI-order MXFP4 holds the same values in another order: the order does not matter here.
    ggml_type = MXFP4 if t.openai_mxfp4 else t.ggml_type
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if ggml_type == MXFP4 and np.any(data.reshape(-1, size)[:, 0] == E8M0_NAN):
        return f"tensor {t.name} has an MXFP4 block scale of 0xFF (NaN)"
    step = max(size, CHUNK_BYTES // size * size)
    for start in range(0, data.size, step):
        values = dequantize(data[start:start + step], GGMLQuantizationType(ggml_type))
        if not np.all(np.isfinite(values)):
            bad = "NaN" if np.isnan(values).any() else "Inf"
            return f"tensor {t.name} ({type_name(t.ggml_type)}) contains {bad} values near element " \
                   f"{start // size * block + int(np.argmin(np.isfinite(values.ravel())))}"
    return None


def validate(model: str, models_dir: str | None = None, deep: bool = False) -> list[str]:
    """Every problem found in a model file; empty when it is valid."""
    try:
        files = open_gguf_files(resolve_model(model, models_dir))
    except ModelLoadError as e:
        return [str(e)]
    try:
        raw, problems = check_files(files)
        problems += type_problems(raw)
        try:
            arch_name, arch = model_arch(files[0].metadata)
            hparams = arch.read_hparams(files[0].metadata, arch_name, raw)
            tensors, found = arch.normalise(raw, lambda t: files[t.file_index].tensor_bytes(t), hparams)
            found += vocab_problems(files[0].metadata, tensors)
            if problems:  # tensors the directory lost are not also reported missing
                found = [p for p in found if not p.startswith("Missing required tensor")]
            problems += found
        except ModelLoadError as e:
            problems.append(str(e))
        if deep:
            for t in raw.values():
                found = scan_tensor(files[t.file_index], t)
                if found:
                    problems.append(found)
        return problems
    finally:
        for f in files:
            f.close()


def run(args: argparse.Namespace) -> int:
    problems = validate(args.model, args.models_dir, args.deep)
    for p in problems:
        print(p, file=sys.stdout)
    if not problems:
        print(f"{args.model}: valid")
    return 1 if problems else 0
