"""Random-weight gpt-oss GGUFs at the real shapes (gpt-oss-20b, gpt-oss-120b), for benchmarking.

Why: speed depends on shapes and weight types, not on what the weights say, so a file with the
real dimensions, the real quantization layout (MXFP4 experts, Q8_0 attention, embeddings and
output, F32 norms/biases/router: ggml-org's files) and the real o200k_harmony vocabulary times
exactly like the real model, without a 12 GB download. Experts are random MXFP4 codes with E8M0
scales chosen so activations stay finite; the rest comes from demo_model's RandomWeights. Written
by the converter's writer, like demo-model; `--layers` cuts the depth for quicker runs."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from pyengine import o200k
from pyengine.convert import GptOssConfig, ProgressFn, write_gguf
from pyengine.demo_model import RandomWeights, chat_template

# gpt-oss-20b / 120b (docs/gpt-oss.md): everything but depth and expert count is shared.
SHAPES = {"gpt-oss-20b": {"n_layer": 24, "n_expert": 32}, "gpt-oss-120b": {"n_layer": 36, "n_expert": 128}}


def shape_config(shape: str, n_layer: int | None = None) -> GptOssConfig:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    s = SHAPES[shape]
    layers = s["n_layer"] if n_layer is None else n_layer
    if layers < 1:
        raise ValueError(f"--layers must be >= 1, got {layers}")
    return GptOssConfig(
        n_ctx_train=131072, n_embd=2880, n_layer=layers, n_ff=2880, n_head=64, n_head_kv=8,
        head_dim=64, n_expert=s["n_expert"], n_expert_used=4, rms_eps=1e-5, sliding_window=128,
        rope_base=150000.0, vocab_size=o200k.N_VOCAB,
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                      "original_max_position_embeddings": 4096})


class SynthWeights(RandomWeights):
    """RandomWeights plus the published checkpoint's MXFP4 expert form (`*_blocks`, `*_scales`),
    so experts are written as MXFP4 directly instead of being quantized from floats."""

    def __init__(self, c: GptOssConfig, seed: int = 0):
        super().__init__(c, seed)
        self._mxfp4: dict[str, tuple[int, ...]] = {}
        for i in range(c.n_layer):
            e = f"model.layers.{i}.mlp.experts."
            for hf, n_out, n_in in (("gate_up_proj", 2 * c.n_ff, c.n_embd), ("down_proj", c.n_embd, c.n_ff)):
                self._mxfp4[e + hf + "_blocks"] = (c.n_expert, n_out, n_in // 32, 16)
                self._mxfp4[e + hf + "_scales"] = (c.n_expert, n_out, n_in // 32)

    def __contains__(self, name: str) -> bool:
        return name in self._mxfp4 or super().__contains__(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._mxfp4[name] if name in self._mxfp4 else super().shape(name)

    def raw(self, name: str) -> np.ndarray:
        if name not in self._mxfp4:
            return super().raw(name)
        shape = self._mxfp4[name]
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        if name.endswith("_blocks"):
            return rng.integers(0, 256, shape, dtype=np.uint8)
        # E8M0 2^-8 .. 2^-6: FP4 codes (|v| <= 6) then give weights of about 1/sqrt(fan_in)
        return rng.integers(119, 122, shape, dtype=np.uint8)


def write_synth_model(path: str | os.PathLike, shape: str = "gpt-oss-20b", *, n_layer: int | None = None,
                      arch_name: str = "gptoss", seed: int = 0, force: bool = False,
                      progress: ProgressFn | None = None) -> Path:
    """Write a random-weight GGUF with `shape`'s dimensions and ggml-org's type layout (atomically).
    Raises FileExistsError if `path` exists and not `force`."""
    c = shape_config(shape, n_layer)
    tok = o200k.gguf_tokenizer(chat_template())
    return write_gguf(SynthWeights(c, seed), c, tok, path, outtype="mxfp4", arch_name=arch_name,
                      name=f"{shape}-synth", force=force, progress=progress)
