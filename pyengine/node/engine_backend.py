"""EngineBackend: the node's Backend over the real model — one shared Model (weights mapped once
from the GGUF file), one KV cache per slot, the file's own tokenizer and the Harmony renderer (or
a jinja chat template given with --chat-template-file). Generation is pyengine.core's, the same as
the library's. As in llama-server, --ctx-size is the total context: each of the n_slots caches
holds ctx_size // n_slots tokens."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np

from pyengine import chat_template, harmony
from pyengine.engine import Engine
from pyengine.engine_state import EngineState
from pyengine.errors import ModelLoadError
from pyengine.gguf_reader import type_name
from pyengine.model_file import ModelFile, open_model
from pyengine.node.backend import Backend, ModelInfo
from pyengine.node.config import NodeConfig
from pyengine.runner import DEFAULT_CHECKPOINT_MIN_STEP, DEFAULT_CHECKPOINTS, Cache

MIN_SLOT_CTX = 512


class EngineBackend(Backend):
    """The loaded model: `n_slots` caches of n_ctx tokens each over one model (n_ctx: per slot;
    EngineBackend.load turns the node's total --ctx-size into it). `chat_template`: jinja text
    that renders chats instead of Harmony."""

    def __init__(self, model_file: ModelFile, n_slots: int = 1, n_ctx: int | None = None,
                 n_threads: int | None = None, verbose: bool = False, name: str | None = None,
                 device: str = "cpu", n_gpu_layers: int | None = None, cpu_moe: bool = False,
                 chat_template: str | None = None, cache_type_k: str = "f16", cache_type_v: str = "f16",
                 repack: bool = True, use_mmap: bool = True, n_batch: int | None = None,
                 ctx_checkpoints: int = DEFAULT_CHECKPOINTS,
                 checkpoint_min_step: int = DEFAULT_CHECKPOINT_MIN_STEP) -> None:
        self.model_file = model_file
        self.chat_template = chat_template
        opts = dict(n_threads=n_threads, verbose=verbose, device=device, n_gpu_layers=n_gpu_layers,
                    cpu_moe=cpu_moe, cache_type_k=cache_type_k, cache_type_v=cache_type_v, repack=repack,
                    use_mmap=use_mmap, ctx_checkpoints=ctx_checkpoints,
                    checkpoint_min_step=checkpoint_min_step, **({"n_batch": n_batch} if n_batch else {}))
        engine = Engine(model_file, n_ctx=n_ctx, **opts)
        if n_ctx is None and n_slots > 1:
            # The engine's default context fits one KV cache in memory; n_slots caches share it.
            engine = Engine(model_file, n_ctx=max(MIN_SLOT_CTX, engine.n_ctx // n_slots), **opts)
        engine.check_slots_fit(n_slots)  # every slot's cache, not only the first
        self.engine = engine  # its model, tokenizer and core serve every slot
        self._spare: Cache | None = engine._cache  # the first slot's cache
        self.tokenizer = engine.tokenizer
        self.core = engine.core
        self.device, self.n_threads, self.path = engine.device, engine.n_threads, str(model_file.path)
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
        file's general.name. --ctx-size is the total, split across --parallel slots."""
        template = None
        if config.chat_template_file:
            try:
                template = Path(config.chat_template_file).expanduser().read_text(encoding="utf-8")
                chat_template.compile_template(template)
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise ModelLoadError(f"--chat-template-file {config.chat_template_file}: {e}") from None
        mf = open_model(config.model, models_dir=config.models_dir)
        by_name = "/" not in config.model and not config.model.endswith(".gguf")
        per_slot = config.ctx_size // config.parallel if config.ctx_size else None
        return cls(mf, config.parallel, per_slot, config.threads, config.verbose,
                   config.model if by_name else None, config.device, config.n_gpu_layers, config.cpu_moe,
                   template, config.cache_type_k, config.cache_type_v, config.repack, config.use_mmap,
                   config.n_batch, config.ctx_checkpoints, config.checkpoint_min_step)

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    reasoning_effort: str | None) -> list[int]:
        if self.chat_template is None:
            return harmony.render_chat(self.tokenizer, messages, tools, reasoning_effort or "medium")
        # jinja templates read OpenAI's shapes: calls and tools nest their function
        openai_messages = [{**m, "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in m["tool_calls"]] if m.get("tool_calls") else None} for m in messages]
        openai_tools = [{"type": "function", "function": t} for t in tools] if tools else None
        return chat_template.apply_chat_template(self.tokenizer, {}, openai_messages, openai_tools,
                                                 reasoning_effort or "medium", chat_template=self.chat_template)

    def chat_template_text(self) -> str:
        """The jinja template chats are rendered with, else the file's embedded one ("" if none)."""
        return self.chat_template or str(self.engine.metadata.get("tokenizer.chat_template", ""))

    def describe(self) -> dict[str, Any]:
        by_type: collections.Counter[int] = collections.Counter()
        for t in self.model_file.tensors.values():
            by_type[t.ggml_type] += int(np.prod(t.shape))
        return {**super().describe(), "arch": self.model_file.arch,
                "quantization": type_name(by_type.most_common(1)[0][0]) if by_type else ""}

    def save_slot(self, cache: Cache) -> EngineState:
        return self.engine.cache_state(cache)

    def restore_slot(self, cache: Cache, state: EngineState) -> None:
        self.engine.restore_cache(cache, state)

    def new_cache(self) -> Cache:
        if self._spare is not None:
            cache, self._spare = self._spare, None
            return cache
        return super().new_cache()

    def close(self) -> None:
        self.model_file.close()
