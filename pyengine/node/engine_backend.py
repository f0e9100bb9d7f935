"""EngineBackend: the node's Backend over the real model — one shared Model (weights mapped once
from the GGUF file), one KV cache per slot, the file's own tokenizer and the Harmony renderer.
Generation is pyengine.core's, the same as the library's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pyengine import harmony
from pyengine.engine import Engine
from pyengine.model_file import ModelFile, open_model
from pyengine.node.backend import Backend, ModelInfo
from pyengine.node.config import NodeConfig
from pyengine.runner import Cache

MIN_SLOT_CTX = 512


class EngineBackend(Backend):
    """The loaded model: `n_slots` caches of n_ctx tokens each over one model."""

    def __init__(self, model_file: ModelFile, n_slots: int = 1, n_ctx: int | None = None,
                 n_threads: int | None = None, verbose: bool = False, name: str | None = None,
                 device: str = "cpu", n_gpu_layers: int | None = None, cpu_moe: bool = False,
                 cache_type_k: str = "f16", cache_type_v: str = "f16") -> None:
        self.model_file = model_file
        opts = dict(n_threads=n_threads, verbose=verbose, device=device, n_gpu_layers=n_gpu_layers,
                    cpu_moe=cpu_moe, cache_type_k=cache_type_k, cache_type_v=cache_type_v)
        engine = Engine(model_file, n_ctx=n_ctx, **opts)
        if n_ctx is None and n_slots > 1:
            # The engine's default context fits one KV cache in memory; n_slots caches share it.
            engine = Engine(model_file, n_ctx=max(MIN_SLOT_CTX, engine.n_ctx // n_slots), **opts)
        self.engine = engine  # its model, tokenizer and core serve every slot
        self._spare: Cache | None = engine._cache  # the first slot's cache
        self.tokenizer = engine.tokenizer
        self.core = engine.core
        hp = model_file.hparams
        path = Path(model_file.path)
        name = name or model_file.name
        names = {model_file.name, path.name, path.stem}
        if path.name == "model.gguf":
            names.add(path.parent.name)
        self.info = ModelInfo(
            name=name, n_ctx=engine.n_ctx, n_ctx_train=int(hp.n_ctx_train), n_vocab=engine.n_vocab,
            n_params=sum(int(np.prod(t.shape)) for t in model_file.tensors.values()),
            size_bytes=int(model_file.file_size), n_layer=int(hp.n_layer), n_expert=int(hp.n_expert),
            aliases=tuple(sorted(names - {name})))

    @classmethod
    def load(cls, config: NodeConfig) -> EngineBackend:
        """Open --model (a path or a name in the models folder) and build the slots. A model given
        by name is served under that name (the one the router and clients use); a path under the
        file's general.name."""
        mf = open_model(config.model, models_dir=config.models_dir)
        by_name = "/" not in config.model and not config.model.endswith(".gguf")
        return cls(mf, config.parallel, config.ctx_size, config.threads, config.verbose,
                   config.model if by_name else None, config.device, config.n_gpu_layers, config.cpu_moe,
                   config.cache_type_k, config.cache_type_v)

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    reasoning_effort: str | None) -> list[int]:
        return harmony.render_chat(self.tokenizer, messages, tools, reasoning_effort or "medium")

    def new_cache(self) -> Cache:
        if self._spare is not None:
            cache, self._spare = self._spare, None
            return cache
        return super().new_cache()

    def close(self) -> None:
        self.model_file.close()
