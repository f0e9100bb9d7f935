"""Choosing the next token from logits: penalties, top-k/top-p/min-p, temperature, seed, logprobs.

Semantics follow llama.cpp's default sampler chain (what llama-cpp-python users get):
logit bias -> repetition/frequency/presence penalties over the last `repeat_last_n` tokens ->
top-k -> top-p -> min-p -> temperature -> draw. Note that top-p and min-p therefore see the
distribution at temperature 1 (OpenAI/HF apply temperature first). temperature <= 0 is greedy.
Logprobs describe the model's own distribution: log-softmax of the raw logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# top-p looks at this many best tokens first and sorts the whole vocabulary only if none of these
# sets reaches the requested mass.
_TOP_P_PROBES = (1024, 16384)


@dataclass(frozen=True)
class SamplingParams:
    """What the user asks for; defaults leave the model's distribution untouched (temperature 1)."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0  # llama.cpp: divide positive logits, multiply negative ones
    repeat_last_n: int = 64  # window for all three penalties; -1 = whole history, 0 = none
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token seen
    frequency_penalty: float = 0.0  # OpenAI: minus this times the count of the token
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise ValueError(f"repeat_last_n must be >= -1, got {self.repeat_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def plain_argmax(self) -> bool:
        """Greedy on the raw logits: no bias or penalty changes them first, so the choice is their
        argmax (lowest id on ties, NaN never chosen), which a GPU can take without sending the logits
        (pyengine.runner)."""
        no_penalty = self.repeat_last_n == 0 or (self.repeat_penalty == 1.0 and not self.presence_penalty
                                                 and not self.frequency_penalty)
        return self.greedy and not self.logit_bias and no_penalty


# The one place sampling defaults live (docs/generation.md).
# SamplingParams() itself is OpenAI's advice for gpt-oss (temperature 1.0, top-p 1.0, nothing else
# filtered): the node and the CLI use it for every field a request leaves out.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
# llama-cpp-python's defaults, kept by the library's drop-in methods (Engine.generate,
# create_completion); its create_chat_completion lowers the temperature to 0.2.
LLAMA_CPP_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
LLAMA_CPP_CHAT_TEMPERATURE = 0.2


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of a logit vector."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x)
    return x - m - np.log(np.sum(np.exp(x - m)))


def top_logprobs(logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely (token id, logprob) pairs, best first (ties: lower id first)."""
    if n <= 0:
        return []
    n = min(n, logprobs.shape[0])
    idx = np.argpartition(-logprobs, n - 1)[:n]
    idx = idx[np.lexsort((idx, -logprobs[idx]))]
    return [(int(i), float(logprobs[i])) for i in idx]


class Sampler:
    """Applies SamplingParams to logit vectors; owns the random generator (seeded => reproducible)."""

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def adjusted_logits(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        """float64 logits after logit bias and the penalties."""
        p = self.params
        x = np.array(logits, dtype=np.float64)
        if x.ndim != 1:
            raise ValueError(f"logits must be one vector, got shape {x.shape}")
        for token, bias in p.logit_bias.items():
            if not 0 <= int(token) < x.shape[0]:
                raise ValueError(f"logit_bias token {token} is outside the vocabulary")
            x[int(token)] += bias
        window = (
            list(history) if p.repeat_last_n == -1 else list(history)[-p.repeat_last_n :] if p.repeat_last_n else []
        )
        if window and (p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty):
            ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
            keep = (ids >= 0) & (ids < x.shape[0])
            ids, counts = ids[keep], counts[keep]
            seen = x[ids]
            with np.errstate(over="ignore", invalid="ignore"):  # extreme penalties: handled below
                seen = np.where(seen > 0, seen / p.repeat_penalty, seen * p.repeat_penalty)
                x[ids] = seen - counts * p.frequency_penalty - p.presence_penalty
        # Extreme penalties or biases may overflow: +inf becomes the largest finite value (so
        # differences stay defined), NaN becomes -inf (never drawn).
        np.nan_to_num(x, copy=False, nan=-np.inf, posinf=np.finfo(np.float64).max, neginf=-np.inf)
        return x

    def candidates(self, logits: np.ndarray, history: Sequence[int] = (),
                   mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) that remain after every filter; probabilities sum to 1.
        mask: boolean over the vocabulary, False = the token may not be drawn (constrained
        decoding, pyengine.constrain); applied after the bias and penalties, before the filters."""
        p = self.params
        x = self.adjusted_logits(logits, history)
        if mask is not None:
            x[~mask] = -np.inf
            if np.max(x) == -np.inf:  # every allowed token banned by a bias: the first allowed one
                return np.flatnonzero(mask)[:1], np.array([1.0])
        if p.greedy or np.max(x) == -np.inf:  # greedy, or every token banned: take the argmax
            best = int(np.argmax(x))
            return np.array([best]), np.array([1.0])
        ids = np.arange(x.shape[0])
        if 0 < p.top_k < x.shape[0]:
            ids = np.argpartition(-x, p.top_k - 1)[: p.top_k]
        if p.top_p < 1.0:
            ids = _top_p(x, ids, p.top_p)
        if p.min_p > 0.0:
            sub = x[ids]
            ids = ids[sub >= np.max(sub) + np.log(p.min_p)]
        # subtract the maximum before dividing, so a tiny temperature cannot make inf - inf
        probs = np.exp((x[ids] - np.max(x[ids])) / p.temperature)
        return ids, probs / probs.sum()

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        """The full-vocabulary probability vector the next draw uses (zeros where filtered)."""
        ids, probs = self.candidates(logits, history)
        out = np.zeros(np.asarray(logits).shape[0])
        out[ids] = probs
        return out

    def sample(self, logits: np.ndarray, history: Sequence[int] = (), mask: np.ndarray | None = None) -> int:
        """Draw the next token id (only where `mask` is True, when given)."""
        ids, probs = self.candidates(logits, history, mask)
        if ids.shape[0] == 1:
            return int(ids[0])
        if np.any(ids[1:] < ids[:-1]):  # a fixed (id) order makes a seed mean the same draw
            order = np.argsort(ids, kind="stable")
            ids, probs = ids[order], probs[order]
        cdf = np.cumsum(probs)
        k = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(k, ids.shape[0] - 1)])


def _top_p(x: np.ndarray, ids: np.ndarray, top_p: float) -> np.ndarray:
    """Smallest set of the best candidates whose probability reaches top_p (at least one);
    ties are ordered by token id."""
    if np.any(ids[1:] < ids[:-1]):
        ids = np.sort(ids)
    sub = x[ids]
    probs = np.exp(sub - np.max(sub))
    probs /= probs.sum()
    order = None
    for probe in _TOP_P_PROBES:
        if ids.shape[0] > probe:
            part = np.argpartition(-probs, probe - 1)[:probe]
            if probs[part].sum() >= top_p:
                order = part[np.lexsort((part, -probs[part]))]
                break
    if order is None:
        order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    n = int(np.searchsorted(cum, top_p, side="left")) + 1
    return ids[order[: min(n, order.shape[0])]]
