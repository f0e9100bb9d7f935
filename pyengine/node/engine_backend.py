"""EngineBackend: the node's Backend over the real pieces — one pyengine.Engine per slot (all over
the same memory-mapped ModelFile), the GGUF's own tokenizer, the Harmony renderer and streaming
parser, and the llama.cpp-order sampler.

A slot's step is either one chunk (n_batch tokens) of prompt evaluation or one token: sample
from the last logits, parse its text, evaluate it for the next logits. Chunking the prompt lets
other slots keep streaming while a long prompt is read. The evaluations of all slots of one
scheduler step run in one forward pass (pyengine.engine.eval_batch: continuous batching). The
pull-style loop in pyengine.generate evaluates the whole prompt in one call, which is why the
node keeps its own step loop built from the same primitives (prefix reuse, sampler, UTF-8-safe
detokenizer)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pyengine import harmony
from pyengine.engine import Engine, eval_batch
from pyengine.generate import common_prefix_length
from pyengine.log import logger
from pyengine.model_file import ModelFile, open_model
from pyengine.node.backend import (
    Backend,
    ModelInfo,
    Slot,
    StepOutput,
    TokenLogprob,
    ToolCallDelta,
)
from pyengine.node.config import NodeConfig
from pyengine.sampling import Sampler, SamplingParams, log_softmax, top_logprobs
from pyengine.tokenizer import Tokenizer

MIN_SLOT_CTX = 512


class EngineSlot(Slot):
    """One sequence on its own Engine (KV cache); `cached` mirrors the tokens that cache holds."""

    def __init__(self, backend: EngineBackend, engine: Engine) -> None:
        self.backend = backend
        self.engine = engine
        self.cached: list[int] = []
        self.pending: list[int] = []
        self.logits: np.ndarray | None = None

    @property
    def n_past(self) -> int:
        return self.engine.n_past

    def cached_prefix(self, prompt: Sequence[int]) -> int:
        return common_prefix_length(self.cached, prompt) if self.engine.n_past == len(self.cached) else 0

    def start(self, prompt: Sequence[int], params: SamplingParams, chat: bool, logprobs: int | None) -> int:
        prompt = [int(t) for t in prompt]
        if self.engine.n_past != len(self.cached):
            self.engine.reset()
            self.cached = []
        keep = min(common_prefix_length(self.cached, prompt), len(prompt) - 1)
        if keep < self.engine.n_past:
            self.engine.truncate(keep)
        self.cached = prompt[:keep]
        self.pending = prompt[keep:]
        self.history = list(prompt)
        self.sampler = Sampler(params)
        self.logprobs = logprobs
        self.detok = self.backend.tokenizer.streaming_detokenizer()
        self.parser = harmony.StreamingParser() if chat else None
        return keep

    def flush(self) -> StepOutput:
        out = StepOutput()
        text = self.detok.flush()
        if self.parser is None:
            out.content = text
        else:
            _apply(out, self.parser.feed(text) + self.parser.finish())
        return out

    def _eval(self, tokens: list[int]) -> np.ndarray:
        try:
            return self.engine.eval(tokens)
        except BaseException:
            self.engine.reset()
            self.cached = []
            raise

    def plan(self) -> tuple[StepOutput, list[int]]:
        """The host side of one step: take the next prompt chunk, or sample the next token and
        turn it into output. Returns the output and the tokens to evaluate next (none when the
        turn ended or the context is full)."""
        if self.pending:
            chunk = self.pending[:self.engine.n_batch]
            self.pending = self.pending[len(chunk):]
            return StepOutput(prompt_evaluated=len(chunk)), chunk
        b = self.backend
        token = self.sampler.sample(self.logits, self.history)
        done = token in b.tokenizer.eog_ids
        out = StepOutput(token=token, done=done, tool_call=token in b.call_ids)
        if self.logprobs is not None:
            lps = log_softmax(self.logits)
            out.logprob = b.token_logprob(token, float(lps[token]), top_logprobs(lps, self.logprobs))
        if self.parser is None:
            out.content = self.detok.flush() if done else self.detok.add(token)
        else:
            text = self.detok.add(token) + (self.detok.flush() if done else "")
            deltas = self.parser.feed(text) + (self.parser.finish() if done else [])
            _apply(out, deltas)
        if done:
            return out, []
        self.history.append(token)
        return out, [token] if self.engine.n_past < self.engine.n_ctx else []

    def evaluated(self, tokens: list[int], logits: np.ndarray) -> None:
        """Record that `tokens` (from plan) are now in the cache, followed by `logits`."""
        self.cached += tokens
        self.logits = logits

    def step(self) -> StepOutput:
        out, tokens = self.plan()
        if tokens:
            self.evaluated(tokens, self._eval(tokens))
        return out


def _apply(out: StepOutput, deltas: list[dict[str, Any]]) -> None:
    """harmony.StreamingParser deltas -> the StepOutput's reasoning / content / tool-call pieces."""
    for d in deltas:
        out.reasoning += d.get("reasoning_content", "")
        out.content += d.get("content", "")
        for call in d.get("tool_calls", []):
            fn = call.get("function", {})
            out.tool_calls.append(ToolCallDelta(int(call["index"]), fn.get("arguments") or "",
                                                call.get("id"), fn.get("name")))


class EngineBackend(Backend):
    """The loaded model: a tokenizer and `n_slots` Engines sharing one ModelFile's weights."""

    def __init__(self, model_file: ModelFile, n_slots: int = 1, n_ctx: int | None = None,
                 n_threads: int | None = None, verbose: bool = False, name: str | None = None,
                 device: str = "cpu", n_gpu_layers: int | None = None, cpu_moe: bool = False) -> None:
        self.model_file = model_file
        self.tokenizer = Tokenizer.from_metadata(model_file.metadata)
        opts = dict(n_threads=n_threads, verbose=verbose, device=device, n_gpu_layers=n_gpu_layers,
                    cpu_moe=cpu_moe)
        first = Engine(model_file, n_ctx=n_ctx, **opts)
        if n_ctx is None and n_slots > 1:
            # The engine's default context fits one KV cache in memory; n_slots caches share it.
            first = Engine(model_file, n_ctx=max(MIN_SLOT_CTX, first.n_ctx // n_slots), **opts)
        self.engines = [first] + [Engine(model_file, n_ctx=first.n_ctx, **opts) for _ in range(n_slots - 1)]
        self.call_ids = frozenset(i for t, i in self.tokenizer.special_tokens.items() if t == "<|call|>")
        hp = model_file.hparams
        path = Path(model_file.path)
        name = name or model_file.name
        names = {model_file.name, path.name, path.stem}
        if path.name == "model.gguf":
            names.add(path.parent.name)
        self.info = ModelInfo(
            name=name, n_ctx=first.n_ctx, n_ctx_train=int(hp.n_ctx_train), n_vocab=first.n_vocab,
            n_params=sum(int(np.prod(t.shape)) for t in model_file.tensors.values()),
            size_bytes=int(model_file.file_size), n_layer=int(hp.n_layer), n_expert=int(hp.n_expert),
            aliases=tuple(sorted(names - {name})))
        self._slots = iter(self.engines)
        self.n_threads = first.n_threads

    @classmethod
    def load(cls, config: NodeConfig) -> EngineBackend:
        """Open --model (a path or a name in the models folder) and build the slots. A model given
        by name is served under that name (the one the router and clients use); a path under the
        file's general.name."""
        mf = open_model(config.model, models_dir=config.models_dir)
        by_name = "/" not in config.model and not config.model.endswith(".gguf")
        return cls(mf, config.parallel, config.ctx_size, config.threads, config.verbose,
                   config.model if by_name else None, config.device, config.n_gpu_layers, config.cpu_moe)

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    reasoning_effort: str | None) -> list[int]:
        return harmony.render_chat(self.tokenizer, messages, tools, reasoning_effort or "medium")

    def step(self, slots: list[Slot]) -> list[StepOutput]:
        """Continuous batching: every slot plans its step (samples its next token or takes its
        next prompt chunk), then all their tokens run in one forward pass over the slots' own
        caches, so the weights are read once per step for all sequences. If that pass fails,
        each slot is evaluated on its own, so a failure ends only the request that caused it."""
        outputs: list[StepOutput] = []
        work: list[tuple[int, EngineSlot, list[int]]] = []
        for i, slot in enumerate(slots):  # every slot here came from new_slot: an EngineSlot
            try:
                out, tokens = slot.plan()
            except Exception as e:
                logger.exception("a generation step failed")
                out, tokens = StepOutput(error=f"generation failed: {e}"), []
            outputs.append(out)
            if tokens:
                work.append((i, slot, tokens))
        if not work:
            return outputs
        try:
            logits = eval_batch([s.engine for _, s, _ in work], [t for _, _, t in work], self.n_threads)
        except Exception:
            logger.warning("batched step failed; evaluating the %d slots one by one", len(work), exc_info=True)
            for i, slot, tokens in work:
                try:
                    slot.evaluated(tokens, slot._eval(tokens))
                except Exception as e:
                    logger.exception("a generation step failed")
                    outputs[i] = StepOutput(error=f"generation failed: {e}")
            return outputs
        for (_, slot, tokens), row in zip(work, logits):
            slot.evaluated(tokens, row)
        return outputs

    def expert_counts(self) -> list[list[int]]:
        """Expert selections per layer, summed over every slot's engine."""
        return [[int(n) for n in row] for row in sum(e.expert_counts for e in self.engines)]

    def new_slot(self) -> Slot:
        return EngineSlot(self, next(self._slots))

    def token_logprob(self, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        def piece(t: int) -> tuple[str, list[int]]:
            raw = self.tokenizer.decode_bytes([t])
            return raw.decode("utf-8", "replace"), list(raw)

        text, raw = piece(token)
        return TokenLogprob(text, logprob, raw, [(*piece(t)[:1], lp, piece(t)[1]) for t, lp in top])

    def close(self) -> None:
        self.model_file.close()
