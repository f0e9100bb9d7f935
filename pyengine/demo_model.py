"""A tiny gpt-oss GGUF with random weights and the real o200k_harmony tokenizer.

Why: so every command (info, validate, serve, the Python API) can be tried on any machine in
seconds, without a 12 GB download. The file has gpt-oss's structure (alternating sliding-window and
full attention, YaRN rope scaling, attention sinks, 4 of 8 experts per token, head_dim 64, biases,
MXFP4 experts and Q8_0 elsewhere by default) at toy sizes, the full 201,088-token vocabulary with
its merges, and the official chat template. Its weights are random: it writes fluent-looking
nonsense. It is written by the converter's writer (pyengine.convert.write_gguf) from random
tensors under Hugging Face names, so it exercises exactly the converter's naming, splitting and
quantization.
"""

from __future__ import annotations

import os
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

from pyengine import o200k
from pyengine.convert import GptOssConfig, ProgressFn, write_gguf

DEFAULT_PATH = "gpt-oss-demo.gguf"
NAME = "gpt-oss-demo"


def demo_config(n_layer: int = 2, n_embd: int = 64) -> GptOssConfig:
    """gpt-oss-20b's hyperparameters (docs/gpt-oss.md) with the sizes cut down."""
    if n_layer < 1:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")
    if n_embd < 32 or n_embd % 32:
        raise ValueError(f"n_embd must be a positive multiple of 32 (quant blocks), got {n_embd}")
    return GptOssConfig(
        n_ctx_train=131072, n_embd=n_embd, n_layer=n_layer, n_ff=n_embd, n_head=8, n_head_kv=2,
        head_dim=64, n_expert=8, n_expert_used=4, rms_eps=1e-5, sliding_window=128,
        rope_base=150000.0, vocab_size=o200k.N_VOCAB,
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                      "original_max_position_embeddings": 4096})


class RandomWeights:
    """HF gpt-oss tensor names -> random float32 values, reproducible per (seed, name).

    Matrices are N(0, 1/fan_in) so activations stay O(1); norm weights are near 1, biases and
    sinks small. Each tensor has its own generator, so values do not depend on reading order."""

    def __init__(self, c: GptOssConfig, seed: int = 0):
        self.seed = seed
        e, f, x, q, kv = c.n_embd, c.n_ff, c.n_expert, c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        # name -> (shape, mean, std)
        spec: dict[str, tuple[tuple[int, ...], float, float]] = {
            "model.embed_tokens.weight": ((c.vocab_size, e), 0.0, 1.0),
            "model.norm.weight": ((e,), 1.0, 0.1),
            "lm_head.weight": ((c.vocab_size, e), 0.0, e ** -0.5),
        }
        for i in range(c.n_layer):
            h = f"model.layers.{i}."
            spec.update({
                h + "input_layernorm.weight": ((e,), 1.0, 0.1),
                h + "post_attention_layernorm.weight": ((e,), 1.0, 0.1),
                h + "self_attn.q_proj.weight": ((q, e), 0.0, e ** -0.5),
                h + "self_attn.q_proj.bias": ((q,), 0.0, 0.1),
                h + "self_attn.k_proj.weight": ((kv, e), 0.0, e ** -0.5),
                h + "self_attn.k_proj.bias": ((kv,), 0.0, 0.1),
                h + "self_attn.v_proj.weight": ((kv, e), 0.0, e ** -0.5),
                h + "self_attn.v_proj.bias": ((kv,), 0.0, 0.1),
                h + "self_attn.o_proj.weight": ((e, q), 0.0, q ** -0.5),
                h + "self_attn.o_proj.bias": ((e,), 0.0, 0.1),
                h + "self_attn.sinks": ((c.n_head,), 0.0, 1.0),
                h + "mlp.router.weight": ((x, e), 0.0, e ** -0.5),
                h + "mlp.router.bias": ((x,), 0.0, 0.1),
                h + "mlp.experts.gate_up_proj": ((x, e, 2 * f), 0.0, e ** -0.5),
                h + "mlp.experts.gate_up_proj_bias": ((x, 2 * f), 0.0, 0.1),
                h + "mlp.experts.down_proj": ((x, f, e), 0.0, f ** -0.5),
                h + "mlp.experts.down_proj_bias": ((x, e), 0.0, 0.1),
            })
        self._spec = spec

    def __contains__(self, name: str) -> bool:
        return name in self._spec

    def shape(self, name: str) -> tuple[int, ...]:
        return self._spec[name][0]

    def float32(self, name: str) -> np.ndarray:
        shape, mean, std = self._spec[name]
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(std)
        values += np.float32(mean)
        return values

    def raw(self, name: str) -> np.ndarray:
        raise KeyError(f"{name}: random weights have no raw (pre-quantized) form")


def chat_template() -> str:
    """The official gpt-oss chat template shipped in pyengine/data (Apache-2.0, see its README)."""
    return (resources.files("pyengine") / "data" / "gpt-oss-chat-template.jinja").read_text(encoding="utf-8")


def write_demo_model(path: str | os.PathLike = DEFAULT_PATH, *, arch_name: str = "gptoss",
                     outtype: str = "mxfp4", seed: int = 0, n_layer: int = 2, n_embd: int = 64,
                     force: bool = False, progress: ProgressFn | None = None) -> Path:
    """Write the random-weight gpt-oss GGUF to `path` (atomically) and return its path.

    outtype as for `pyengine convert`: mxfp4 (default) = MXFP4 experts + Q8_0 matrices, like the
    ggml-org gpt-oss files; f32/f16/bf16/q8_0 = every matrix, experts included, in that type.
    Raises FileExistsError if `path` exists and not `force`."""
    c = demo_config(n_layer, n_embd)
    tok = o200k.gguf_tokenizer(chat_template())
    return write_gguf(RandomWeights(c, seed), c, tok, path, outtype=outtype, arch_name=arch_name,
                      name=NAME, force=force, progress=progress)
