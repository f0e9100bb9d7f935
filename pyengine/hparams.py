"""gpt-oss hyperparameters read from GGUF metadata, with the documented defaults and sanity checks.

Keys are read under the file's own prefix (`gptoss.` for Ollama files, `gpt-oss.` for llama.cpp
files). Required keys raise `Missing required key: <prefix>.<key>`; defaults cover what Ollama never
writes (expert_feed_forward_length: from the expert tensor shape; rope.scaling.type: yarn when the
factor is > 1) and what llama.cpp hard-codes (YaRN betas 32 / 1; value_length = key_length)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyengine.errors import ModelLoadError

# Plausibility bounds: far above any real gpt-oss, low enough that a corrupt value cannot make the
# loader loop over billions of layers or allocate absurd shapes.
MAX_DIM = 1 << 20
MAX_LAYERS = 4096
MAX_CTX = 1 << 31
REQUIRED_KEYS = (
    "context_length", "embedding_length", "block_count", "attention.head_count",
    "attention.head_count_kv", "attention.key_length", "attention.layer_norm_rms_epsilon",
    "attention.sliding_window", "expert_count", "expert_used_count", "rope.freq_base",
)


@dataclass(frozen=True)
class GptOssHParams:
    """Everything the gpt-oss graph needs to know about its shape (one config dataclass)."""

    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    value_dim: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    rms_eps: float
    sliding_window: int
    rope_base: float
    rope_base_swa: float
    rope_scaling: str
    rope_factor: float
    rope_orig_ctx: int
    yarn_beta_fast: float
    yarn_beta_slow: float
    swa_layers: tuple[bool, ...]


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


class _Reader:
    def __init__(self, metadata: Mapping[str, Any], prefix: str):
        self.md = metadata
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def raw(self, name: str, required: bool) -> Any:
        key = self.key(name)
        if key not in self.md:
            if required:
                raise ModelLoadError(f"Missing required key: {key}")
            return None
        return self.md[key]

    def uint(self, name: str, required: bool = True, default: int | None = None, minimum: int = 1,
             maximum: int = MAX_DIM) -> int:
        """An unsigned integer, or a per-layer array whose entries are all equal."""
        v = self.raw(name, required)
        if v is None:
            return default
        if isinstance(v, list) and v and all(_is_int(x) for x in v):
            if len(set(v)) != 1:
                raise ModelLoadError(f"Key {self.key(name)} varies per layer ({sorted(set(v))}); "
                                     f"gpt-oss expects one value for every layer")
            v = v[0]
        if not _is_int(v):
            raise ModelLoadError(f"Key {self.key(name)} must be an unsigned integer, got {_describe(v)}")
        if not minimum <= v <= maximum:
            raise ModelLoadError(f"Key {self.key(name)} must be from {minimum} to {maximum}, got {v}")
        return int(v)

    def float(self, name: str, required: bool = True, default: float | None = None,
              positive: bool = True) -> float:
        v = self.raw(name, required)
        if v is None:
            return default
        if not (isinstance(v, (float, np.floating)) or _is_int(v)):
            raise ModelLoadError(f"Key {self.key(name)} must be a number, got {_describe(v)}")
        v = float(v)
        if not math.isfinite(v) or (positive and v <= 0):
            raise ModelLoadError(f"Key {self.key(name)} must be a finite positive number, got {v}")
        return v

    def string(self, name: str) -> str | None:
        v = self.raw(name, False)
        if v is not None and not isinstance(v, str):
            raise ModelLoadError(f"Key {self.key(name)} must be a string, got {_describe(v)}")
        return v


def _describe(v: Any) -> str:
    if isinstance(v, str):
        return f"the string {v[:40]!r}"
    if isinstance(v, (list, np.ndarray)):
        return f"an array of {len(v)} elements"
    return f"{type(v).__name__} {v!r}"


def swa_pattern(metadata_value: Any, n_layer: int, key: str) -> tuple[bool, ...]:
    """Which layers use sliding-window attention.

    Absent: period 2, even layers sliding (llama.cpp's gpt-oss pattern, transformers' layer_types).
    A u32 period n: layer i slides when i % n < n - 1 (so n = 2 gives the even layers).
    A bool array: one flag per layer."""
    if metadata_value is None:
        metadata_value = 2
    if isinstance(metadata_value, list):
        if len(metadata_value) != n_layer or not all(isinstance(x, bool) for x in metadata_value):
            raise ModelLoadError(f"Key {key} must be {n_layer} booleans (one per layer)")
        return tuple(metadata_value)
    if not _is_int(metadata_value) or metadata_value < 0:
        raise ModelLoadError(f"Key {key} must be an unsigned integer period or a boolean array, "
                             f"got {_describe(metadata_value)}")
    n = int(metadata_value)
    return tuple(n == 0 or i % n < n - 1 for i in range(n_layer))


def read_hparams(metadata: Mapping[str, Any], prefix: str, n_ff_exp_from_tensors: int | None) -> GptOssHParams:
    """Read and check gpt-oss hyperparameters; `n_ff_exp_from_tensors` is the expert FFN width seen in
    the expert tensors (used when expert_feed_forward_length is absent, as in Ollama files)."""
    r = _Reader(metadata, prefix)
    for name in REQUIRED_KEYS:
        r.raw(name, True)
    n_embd = r.uint("embedding_length")
    n_layer = r.uint("block_count", maximum=MAX_LAYERS)
    n_head = r.uint("attention.head_count")
    n_head_kv = r.uint("attention.head_count_kv")
    head_dim = r.uint("attention.key_length")
    n_expert = r.uint("expert_count")
    n_expert_used = r.uint("expert_used_count")
    n_ff_exp = r.uint("expert_feed_forward_length", required=n_ff_exp_from_tensors is None,
                      default=n_ff_exp_from_tensors)
    n_ctx_train = r.uint("context_length", maximum=MAX_CTX)
    rope_factor = r.float("rope.scaling.factor", False, 1.0)
    scaling = r.string("rope.scaling.type")
    if scaling is None:
        scaling = "yarn" if rope_factor > 1 else "none"
    elif scaling not in ("yarn", "none"):
        raise ModelLoadError(f"Key {r.key('rope.scaling.type')} is {scaling!r}; gpt-oss supports "
                             f"'yarn' or 'none'")
    rope_base = r.float("rope.freq_base")
    hp = GptOssHParams(
        n_ctx_train=n_ctx_train, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_head_kv=n_head_kv, head_dim=head_dim,
        value_dim=r.uint("attention.value_length", False, head_dim),
        n_expert=n_expert, n_expert_used=n_expert_used, n_ff_exp=n_ff_exp,
        rms_eps=r.float("attention.layer_norm_rms_epsilon"),
        sliding_window=r.uint("attention.sliding_window", maximum=MAX_CTX),
        rope_base=rope_base, rope_base_swa=r.float("rope.freq_base_swa", False, rope_base),
        rope_scaling=scaling, rope_factor=rope_factor,
        rope_orig_ctx=r.uint("rope.scaling.original_context_length", False, n_ctx_train, maximum=MAX_CTX),
        yarn_beta_fast=r.float("rope.scaling.yarn_beta_fast", False, 32.0),
        yarn_beta_slow=r.float("rope.scaling.yarn_beta_slow", False, 1.0),
        swa_layers=swa_pattern(r.raw("attention.sliding_window_pattern", False), n_layer,
                               r.key("attention.sliding_window_pattern")),
    )
    _check(hp, r)
    return hp


def _check(hp: GptOssHParams, r: _Reader) -> None:
    if hp.n_head % hp.n_head_kv:
        raise ModelLoadError(f"Key {r.key('attention.head_count')} ({hp.n_head}) must be a multiple of "
                             f"{r.key('attention.head_count_kv')} ({hp.n_head_kv})")
    if hp.n_expert_used > hp.n_expert:
        raise ModelLoadError(f"Key {r.key('expert_used_count')} ({hp.n_expert_used}) must not exceed "
                             f"{r.key('expert_count')} ({hp.n_expert})")
    if hp.head_dim % 2:
        raise ModelLoadError(f"Key {r.key('attention.key_length')} must be even for RoPE, got {hp.head_dim}")
    for key, base in (("rope.freq_base", hp.rope_base), ("rope.freq_base_swa", hp.rope_base_swa)):
        if base <= 1:  # frequencies base^(-2i/d) must fall with i; YaRN divides by log(base)
            raise ModelLoadError(f"Key {r.key(key)} must be greater than 1, got {base}")
    if hp.rope_scaling == "yarn" and hp.rope_factor < 1:
        raise ModelLoadError(f"Key {r.key('rope.scaling.factor')} must be >= 1 with YaRN, got {hp.rope_factor}")
