"""The token-streaming loop: prompt -> cache (reusing the common prefix) -> sample -> stream text.

Works over any engine object with eval(tokens) -> last-token logits, reset(), truncate(n), n_past,
n_vocab and n_ctx. A Generator remembers which tokens the engine's cache holds, so a follow-up
prompt that shares a prefix with the previous one (a chat that grew by a turn) evaluates only
the new suffix. Text is released UTF-8-safe, and text that might be the start of a stop string
is held back until it is decided, so a stop string never leaks into the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pyengine.sampling import Sampler, SamplingParams, log_softmax, top_logprobs
from pyengine.stops import StopMatcher
from pyengine.tokenizer import Tokenizer


class EvalEngine(Protocol):
    n_past: int
    n_vocab: int
    n_ctx: int

    def eval(self, tokens: Sequence[int]) -> np.ndarray: ...
    def reset(self) -> None: ...
    def truncate(self, n: int) -> None: ...


@dataclass
class TokenEvent:
    """One generated token. text is what it releases (may be empty: held back or incomplete UTF-8);
    the last event of a generation carries finish_reason "stop", "length" or "tool_calls"."""

    id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Generator:
    """Generation over one engine, keeping its KV cache between calls for prefix reuse."""

    def __init__(self, engine: EvalEngine, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._cached: list[int] = []
        self.n_prompt_reused = 0
        self.n_prompt_evaluated = 0
        call_id = tokenizer.special_tokens.get("<|call|>")
        self._call_ids = frozenset() if call_id is None else frozenset({call_id})

    def _prefill(self, prompt: list[int], cancelled: Callable[[], bool]) -> np.ndarray | None:
        """Logits after the prompt, evaluating only what the cache lacks; None when cancelled."""
        eng = self.engine
        if eng.n_past != len(self._cached):
            eng.reset()
            self._cached = []
        keep = common_prefix_length(self._cached, prompt)
        keep = min(keep, len(prompt) - 1)  # the last prompt token is evaluated again for its logits
        if keep < eng.n_past:
            try:
                eng.truncate(keep)
            except (ValueError, NotImplementedError):
                # The engine cannot rewind that far (e.g. a sliding-window cache): start over.
                eng.reset()
                keep = 0
        self._cached = prompt[:keep]
        self.n_prompt_reused = keep
        self.n_prompt_evaluated = len(prompt) - keep
        rest = prompt[keep:]
        step = max(1, int(getattr(eng, "n_batch", len(rest))))
        for start in range(0, len(rest), step):
            if cancelled():
                return None
            logits = self._eval(rest[start:start + step])
        return logits

    def _eval(self, tokens: list[int]) -> np.ndarray:
        try:
            logits = np.asarray(self.engine.eval(tokens))
        except BaseException:
            self._cached = []
            self.engine.reset()
            raise
        self._cached += tokens
        if logits.ndim == 2:
            logits = logits[-1]
        return logits

    def generate(
        self,
        prompt: Sequence[int],
        max_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        stop: Iterable[str] = (),
        logprobs: int | None = None,
        stop_token_ids: Iterable[int] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Iterator[TokenEvent]:
        """TokenEvents until an end-of-generation token, a stop string, max_tokens or a full context.

        Arguments are checked here (ValueError), before the first token is evaluated.

        logprobs=None: no logprobs; an int n: each event gets its token's logprob and the n best.
        stop_token_ids default to the tokenizer's EOG ids; <|call|> finishes with "tool_calls".
        cancelled: polled between prompt chunks and between tokens; when it returns True the
        generation ends (after the current token, finish_reason "stop"; during the prompt, with
        no event at all).
        """
        prompt = [int(t) for t in prompt]
        n_vocab, n_ctx = self.engine.n_vocab, self.engine.n_ctx
        if logprobs is not None and logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {logprobs}")
        if not prompt:
            raise ValueError("the prompt is empty")
        bad = next((t for t in prompt if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token {bad} is outside the vocabulary (0..{n_vocab - 1})")
        if len(prompt) >= n_ctx:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {n_ctx}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        stops = [s for s in stop if s]
        eog = frozenset(self.tokenizer.eog_ids if stop_token_ids is None else stop_token_ids)
        return self._run(prompt, max_tokens, Sampler(sampling), stops, logprobs, eog, cancelled or (lambda: False))

    def _run(
        self,
        prompt: list[int],
        max_tokens: int | None,
        sampler: Sampler,
        stops: list[str],
        logprobs: int | None,
        eog: frozenset[int],
        cancelled: Callable[[], bool],
    ) -> Iterator[TokenEvent]:
        n_ctx = self.engine.n_ctx
        history = list(prompt)
        detok = self.tokenizer.streaming_detokenizer()
        matcher = StopMatcher(stops)

        logits = self._prefill(prompt, cancelled)
        if logits is None:
            return
        n_generated = 0
        while True:
            token = sampler.sample(logits, history)
            n_generated += 1
            lp = top = None
            if logprobs is not None:
                all_lp = log_softmax(logits)
                lp = float(all_lp[token])
                top = top_logprobs(all_lp, logprobs)
            if token in eog:
                reason = "tool_calls" if token in self._call_ids else "stop"
                yield TokenEvent(token, matcher.flush() + detok.flush(), lp, top, reason)
                return
            text, hit = matcher.feed(detok.add(token))
            if hit:
                yield TokenEvent(token, text, lp, top, "stop")
                return
            if (max_tokens is not None and n_generated >= max_tokens) or len(self._cached) >= n_ctx:
                yield TokenEvent(token, text + matcher.flush() + detok.flush(), lp, top, "length")
                return
            if cancelled():
                yield TokenEvent(token, text + matcher.flush() + detok.flush(), lp, top, "stop")
                return
            yield TokenEvent(token, text, lp, top)
            history.append(token)
            logits = self._eval([token])


def generate(
    engine: EvalEngine,
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    **kwargs: Any,
) -> Iterator[TokenEvent]:
    """One-off generation without keeping cache state between calls (see Generator for reuse)."""
    return Generator(engine, tokenizer).generate(prompt, **kwargs)
