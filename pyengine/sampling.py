"""Choosing the next token from logits: penalties, top-k/top-p/min-p, temperature, seed, logprobs.

Semantics follow llama.cpp's default sampler chain (what llama-cpp-python users get):
logit bias -> repetition/frequency/presence penalties over the last `repeat_last_n` tokens ->
top-k -> top-p -> min-p -> temperature -> draw. Note that top-p and min-p therefore see the
distribution at temperature 1 (OpenAI/HF apply temperature first). temperature <= 0 is greedy.
Logprobs describe the model's own distribution: log-softmax of the raw logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# top-p sorts candidates into buckets of 1/32 nat of probability below the best one (the last bucket
# takes everything more than 128 nats below), sums each bucket's mass in one pass and sorts only the
# bucket where the running mass reaches p: no sort of the whole vocabulary.
_TOP_P_BUCKETS_PER_NAT = 32
_TOP_P_BUCKETS = 4096
# A draw walks the cumulative mass by chunks: the chunks' sums, then one chunk's own running sum.
_DRAW_CHUNK = 4096
# top-k and top logprobs first keep the entries at or above the k-th largest of the maxima of chunks
# of this many (at least k entries, usually a few more), then order only those (_best).
_TOP_K_CHUNK = 64


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
        for name in ("temperature", "repeat_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):  # inf or NaN would turn every probability into NaN
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
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
    """float64 log-probabilities of a logit vector: x - max - log(sum(exp(x - max))), with those
    roundings, in one vocabulary-sized array (exp in place, then x - max again) instead of three
    temporaries (see Sampler.__init__)."""
    x = np.asarray(logits)
    m = np.float64(np.max(x))
    z = np.subtract(x, m, dtype=np.float64)
    lse = np.log(np.sum(np.exp(z, out=z)))
    np.subtract(x, m, out=z, dtype=np.float64)
    z -= lse
    return z


def top_logprobs(logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely (token id, logprob) pairs, best first (ties: lower id first)."""
    if n <= 0:
        return []
    return [(int(i), float(logprobs[i])) for i in _best(logprobs, n)]


class Sampler:
    """Applies SamplingParams to logit vectors; owns the random generator (seeded => reproducible)."""

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)
        # vocabulary-sized scratch reused from token to token: a fresh megabyte-sized numpy temporary
        # may cost more in page faults than the arithmetic on it (glibc returns freed blocks at the
        # top of the heap to the system), depending on the heap's state
        self._scratch: dict[str, np.ndarray] = {}

    def _buffer(self, name: str, n: int, dtype: type) -> np.ndarray:
        """n elements of the scratch array `name` (their contents: whatever the last use left)."""
        b = self._scratch.get(name)
        if b is None or b.shape[0] < n:
            b = self._scratch[name] = np.empty(n, dtype)
        return b[:n]

    def adjusted_logits(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        """float64 logits after logit bias and the penalties."""
        return self._adjust(logits, history, reuse=False)

    def _adjust(self, logits: np.ndarray, history: Sequence[int], reuse: bool) -> np.ndarray:
        """adjusted_logits, in the sampler's scratch when `reuse` (valid until the next call)."""
        p = self.params
        logits = np.asarray(logits)
        if logits.ndim != 1:
            raise ValueError(f"logits must be one vector, got shape {logits.shape}")
        x = self._buffer("x", logits.shape[0], np.float64) if reuse else np.empty(logits.shape[0])
        np.copyto(x, logits)
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
        # differences stay defined), NaN becomes -inf (never drawn). A finite maximum means there is
        # neither (max propagates NaN), so the common case skips the pass.
        if not np.isfinite(np.max(x)):
            np.nan_to_num(x, copy=False, nan=-np.inf, posinf=np.finfo(np.float64).max, neginf=-np.inf)
        return x

    def candidates(self, logits: np.ndarray, history: Sequence[int] = (),
                   mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token ids in increasing order, probabilities) that remain after every filter;
        probabilities sum to 1. mask: boolean over the vocabulary, False = the token may not be drawn
        (constrained decoding, pyengine.constrain); applied after the bias and penalties, before the
        filters."""
        ids, w = self._weights(logits, history, mask)
        return (np.arange(w.shape[0]) if ids is None else ids), w / w.sum()

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        """The full-vocabulary probability vector the next draw uses (zeros where filtered)."""
        ids, probs = self.candidates(logits, history)
        out = np.zeros(np.asarray(logits).shape[0])
        out[ids] = probs
        return out

    def sample(self, logits: np.ndarray, history: Sequence[int] = (), mask: np.ndarray | None = None) -> int:
        """Draw the next token id (only where `mask` is True, when given)."""
        ids, w = self._weights(logits, history, mask)
        if ids is not None and ids.shape[0] == 1:
            return int(ids[0])
        k = _draw(w, self.rng.random())
        return k if ids is None else int(ids[k])

    def _weights(self, logits: np.ndarray, history: Sequence[int],
                 mask: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
        """(ids, w): the candidates left by every filter, in increasing id order, and their
        unnormalised probabilities. ids None: no filter ran, w covers the whole vocabulary (zero
        where a token cannot be drawn), computed in place without index arrays (a decode step's
        sampling cost is then a few passes over the logits, see docs/tokenizer.md)."""
        p = self.params
        x = self._adjust(logits, history, reuse=True)
        if mask is not None:
            x[~mask] = -np.inf
            if np.max(x) == -np.inf:  # every allowed token banned by a bias: the first allowed one
                return np.flatnonzero(mask)[:1], np.array([1.0])
        best = np.max(x)
        if p.greedy or best == -np.inf:  # greedy, or every token banned: take the argmax
            return np.array([int(np.argmax(x))]), np.array([1.0])
        ids = None
        if 0 < p.top_k < x.shape[0]:
            ids = np.sort(_best(x, p.top_k))
        if p.top_p < 1.0:
            ids = self._top_p(x, ids, p.top_p)
        if p.min_p > 0.0:
            sub = x if ids is None else x[ids]
            keep = sub >= np.max(sub) + np.log(p.min_p)
            ids = np.flatnonzero(keep) if ids is None else ids[keep]
        # subtract the maximum before dividing, so a tiny temperature cannot make inf - inf (it
        # only sends the others to -inf, probability 0: no warning needed)
        with np.errstate(over="ignore"):
            if ids is not None:
                sub = x[ids]
                return ids, np.exp((sub - np.max(sub)) / p.temperature)
            np.subtract(x, best, out=x)
            if p.temperature != 1.0:
                np.divide(x, p.temperature, out=x)
        return None, np.exp(x, out=x)

    def _top_p(self, x: np.ndarray, ids: np.ndarray | None, top_p: float) -> np.ndarray:
        """Smallest set of the best candidates (ids in increasing order; None: the whole vocabulary)
        whose probability reaches top_p (at least one; ties ordered by token id), in increasing id
        order. Only the bucket where the running mass reaches top_p is sorted (_TOP_P_BUCKETS)."""
        sub = x if ids is None else x[ids]
        n = sub.shape[0]
        d = np.subtract(np.max(sub), sub, out=self._buffer("d", n, np.float64))  # nats below the best (inf: banned)
        probs = self._buffer("probs", n, np.float64)
        np.exp(np.negative(d, out=probs), out=probs)
        probs /= probs.sum()
        bucket = self._buffer("bucket", n, np.intp)
        np.minimum(d, (_TOP_P_BUCKETS - 1) / _TOP_P_BUCKETS_PER_NAT, out=d)
        np.multiply(d, _TOP_P_BUCKETS_PER_NAT, out=d)
        np.copyto(bucket, d, casting="unsafe")  # truncation = floor (d >= 0)
        cum = np.cumsum(np.bincount(bucket, weights=probs, minlength=_TOP_P_BUCKETS))
        j = min(int(np.searchsorted(cum, top_p, side="left")), _TOP_P_BUCKETS - 1)
        edge = np.flatnonzero(bucket == j)
        edge = edge[np.lexsort((edge, -probs[edge]))]  # best first, ties by position = by id
        n = int(np.searchsorted((cum[j - 1] if j else 0.0) + np.cumsum(probs[edge]), top_p, side="left")) + 1
        keep = np.sort(np.concatenate([np.flatnonzero(bucket < j), edge[:n]]))
        return keep if ids is None else ids[keep]


def _draw(w: np.ndarray, r: float) -> int:
    """The index that r (uniform in [0, 1)) picks from weights w: the first whose cumulative weight
    exceeds r times the total, so a zero weight is never picked."""
    starts = np.arange(0, w.shape[0], _DRAW_CHUNK)
    sums = np.add.reduceat(w, starts)
    cum = np.cumsum(sums)
    u = r * cum[-1]
    j = int(np.searchsorted(cum, u, side="right"))
    if j == starts.shape[0]:  # u rounded up to the total: the last chunk with weight
        j = int(np.flatnonzero(sums)[-1])
    seg = w[starts[j]:starts[j] + _DRAW_CHUNK]
    i = int(np.searchsorted(np.cumsum(seg) + (cum[j - 1] if j else 0.0), u, side="right"))
    if i == seg.shape[0]:  # the chunk's own sum rounded differently: its last token with weight
        i = int(np.flatnonzero(seg)[-1])
    return int(starts[j]) + i


def _best(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest values of x, best first (ties: lower id first), without partitioning
    the whole vector: k chunk maxima are k distinct entries, so the k-th largest of them is a floor
    under the k-th largest value, and only the entries at or above it are ordered."""
    k = min(k, x.shape[0])
    maxima = np.maximum.reduceat(x, np.arange(0, x.shape[0], _TOP_K_CHUNK))
    cand = None
    if maxima.shape[0] > k:
        cand = np.flatnonzero(x >= np.partition(maxima, maxima.shape[0] - k)[maxima.shape[0] - k])
    if cand is None or cand.shape[0] < k:  # few chunks, or NaN in x
        cand = np.arange(x.shape[0])
    return cand[np.lexsort((cand, -x[cand]))[:k]]
