"""The user-facing model object: a gpt-oss GGUF file, its KV cache and the C forward pass.

Argument names follow llama-cpp-python's `Llama` (n_ctx, n_threads, n_batch, seed, verbose,
n_gpu_layers) so code written for it reads the same here."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from pyengine._model import KVCache, Model
from pyengine.log import configure, logger
from pyengine.model_file import ModelFile, open_model

MAX_DEFAULT_CTX = 131072       # default context cap (128K)
KV_MEMORY_SHARE = 0.5          # default n_ctx keeps the KV cache under this share of free memory


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores, phys, core = set(), None, None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not key and core is not None:
                    cores.add((phys, core))
                    phys = core = None
        if core is not None:
            cores.add((phys, core))
        if cores:
            return max(1, min(len(cores), allowed))
    except OSError:
        pass
    return max(1, allowed)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Engine:
    """A loaded gpt-oss model with one sequence of context.

    model: a GGUF path, a model name in `models_dir`, or an open ModelFile. n_ctx: context length
    (None or 0: the model's trained context, capped at 128K and at what half the free memory holds
    for the f32 KV cache). n_threads: CPU threads (None: physical cores). n_batch: most tokens per
    forward call (longer inputs are split). seed: kept for sampling. verbose: debug log lines.
    n_gpu_layers: accepted for llama-cpp-python compatibility; this CPU engine runs every layer on
    the CPU and logs a warning when it is > 0. yarn_truncate: round the YaRN correction range to
    whole dimensions as llama.cpp does (default False: the reference/transformers math; the two
    differ noticeably beyond the first few dozen positions, see docs/forward.md)."""

    def __init__(self, model: str | os.PathLike | ModelFile, n_ctx: int | None = None,
                 n_threads: int | None = None, n_batch: int = 512, seed: int | None = None,
                 verbose: bool = False, n_gpu_layers: int = 0,
                 models_dir: str | os.PathLike | None = None, yarn_truncate: bool = False) -> None:
        configure(verbose)
        if n_threads is not None and int(n_threads) < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        if int(n_batch) < 1:
            raise ValueError(f"n_batch must be >= 1, got {n_batch}")
        if n_ctx is not None and int(n_ctx) < 0:
            raise ValueError(f"n_ctx must be >= 0, got {n_ctx}")
        self.model_file = model if isinstance(model, ModelFile) else open_model(model, models_dir)
        self.hparams = self.model_file.hparams
        self.metadata: dict[str, Any] = self.model_file.metadata
        self.n_threads = int(n_threads) if n_threads else physical_cores()
        self.n_batch = int(n_batch)
        self.seed = seed
        self.n_gpu_layers = int(n_gpu_layers)
        if self.n_gpu_layers > 0:
            logger.warning("n_gpu_layers=%d ignored: this engine runs on the CPU", self.n_gpu_layers)
        self._model = Model(self.model_file.tensors, self.hparams, bool(yarn_truncate))
        self.n_vocab = int(self._model.n_vocab)
        self.n_ctx = self._choose_n_ctx(n_ctx)
        self._cache = KVCache(self._model, self.n_ctx, self.n_batch)
        self._tokens: list[int] = []
        logger.debug("n_ctx=%d n_threads=%d n_batch=%d KV cache %.1f MiB (f32)", self.n_ctx,
                     self.n_threads, self.n_batch, self._cache.nbytes / 2 ** 20)

    def _choose_n_ctx(self, n_ctx: int | None) -> int:
        trained = int(self.hparams.n_ctx_train)
        if n_ctx:
            if n_ctx > trained:
                logger.warning("n_ctx=%d is larger than the model's trained context %d", n_ctx, trained)
            return int(n_ctx)
        per_pos, fixed = self._model.kv_bytes_per_token(self.n_batch)
        n = min(trained, MAX_DEFAULT_CTX)
        free = available_memory()
        if free is not None and per_pos:
            fits = int((free * KV_MEMORY_SHARE - fixed) // per_pos)
            if fits < n:
                logger.warning("n_ctx capped at %d (of %d) to fit the KV cache in memory", max(fits, 1), n)
                n = max(fits, min(n, 512), 1)
        return n

    @property
    def n_past(self) -> int:
        """Tokens in the KV cache."""
        return len(self._tokens)

    def reset(self) -> None:
        """Empty the KV cache."""
        self._tokens = []

    def _check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError("tokens must be a 1-D sequence of integer token ids")
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_vocab):
            bad = int(arr[(arr < 0) | (arr >= self.n_vocab)][0])
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.n_vocab}")
        if self.n_past + arr.size > self.n_ctx:
            raise ValueError(f"{self.n_past} cached + {arr.size} new tokens exceed the context "
                             f"window n_ctx={self.n_ctx}")
        return arr.astype(np.int32)

    def eval(self, tokens: Sequence[int], logits_all: bool = False) -> np.ndarray:
        """Append tokens after n_past; return the last token's logits (n_vocab,), or every new
        token's logits (len(tokens), n_vocab) when logits_all."""
        arr = self._check_tokens(tokens)
        if arr.size == 0:
            raise ValueError("eval needs at least one token")
        step = min(self.n_batch, self._cache.max_batch(self._model.window))
        outs = []
        for start in range(0, arr.size, step):
            chunk = arr[start:start + step]
            last = start + step >= arr.size
            out = self._model.forward(self._cache, chunk, self.n_past, logits_all, self.n_threads)
            self._tokens.extend(int(t) for t in chunk)
            if logits_all or last:
                outs.append(out)
        return np.concatenate(outs) if logits_all else outs[-1]

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 (len(tokens), n_vocab): every position's logits, in a fresh context."""
        self.reset()
        return self.eval(tokens, logits_all=True)

    def truncate(self, n: int) -> None:
        """Keep the first n cached tokens (prefix reuse). When the sliding-window rings no longer
        hold the keys position n needs, the prefix is recomputed."""
        if not 0 <= n <= self.n_past:
            raise ValueError(f"truncate({n}): must be between 0 and n_past={self.n_past}")
        keep = self._tokens[:n]
        if self.n_past - n <= self._cache.max_batch(self._model.window):
            self._tokens = keep
            return
        self.reset()
        if keep:
            self.eval(keep)
