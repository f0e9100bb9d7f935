"""The forward pass over KV caches: one model's weights, any number of sequences.

A `Cache` is one sequence's KV cache and the tokens it holds; it is not an Engine. A `Runner`
owns the (shared) model and evaluates tokens into caches, several caches in one forward pass
(`pe_gptoss_forward_seqs`: every weight matrix is read once per pass for all sequences). The
library's Engine holds one Runner and one Cache; the node holds one Runner and one Cache per
slot. Both drive them through pyengine.core."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_CHECKPOINTS = 8  # sliding-ring checkpoints a cache keeps unless told (see Runner)
DEFAULT_CHECKPOINT_MIN_STEP = 4096  # prompt tokens between checkpoints inside one long prompt (see Runner)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of a and b (slice comparisons: C speed, log steps)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo + 1 < hi:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _fits(array: Any, shape: tuple[tuple[int, ...], np.dtype]) -> bool:
    """Whether `array` is a numpy array of the (shape, dtype) a native cache asks for."""
    return isinstance(array, np.ndarray) and array.shape == tuple(shape[0]) and array.dtype == shape[1]


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """Copies of a cache's sliding-window rings as they were when it held its first `n` tokens.

    The full-attention layers keep every position, so rewinding a cache to any point is cheap for
    them; the sliding layers keep only their last window + n_batch positions, so once more tokens
    than that follow the point, their rings no longer hold the keys it needs. A checkpoint taken at
    the end of each prompt, and every checkpoint_min_step tokens inside a long one (pyengine.core),
    brings those rings back: a conversation's next turn,
    which drops the reasoning the model generated after that prompt, then reuses the whole earlier
    prompt instead of evaluating it again (Runner.rewind); a prompt that leaves the cache a little
    before that point (the same prompt again, an edited last message) rewinds from the checkpoint as
    from a cache that holds n tokens. Never written to once taken."""

    n: int
    rings: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rings)


class Cache:
    """A KV cache (`native`, the C-side rings; None for a model that needs none) and the tokens
    it holds, in order, with checkpoints of its sliding rings at earlier points (oldest first).
    Only a Runner writes to it."""

    def __init__(self, native: Any, n_ctx: int) -> None:
        self.native = native
        self.n_ctx = int(n_ctx)
        self.tokens: list[int] = []
        self.checkpoints: tuple[Checkpoint, ...] = ()

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return int(getattr(self.native, "nbytes", 0))

    def common_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading `tokens` this cache already holds."""
        return common_prefix(self.tokens, list(tokens))

    def reset(self) -> None:
        self.tokens = []
        self.checkpoints = ()


class Runner:
    """Evaluates tokens into caches with `model` (pyengine._model.Model or a CUDA model).

    n_batch: most tokens of one sequence per forward call (longer inputs take several rounds).
    `cache_type(model, n_ctx, n_batch)` builds the native cache. n_checkpoints: most checkpoints a
    cache keeps (llama-server's --ctx-checkpoints, 8 by default as in llama.cpp's earlier
    releases, which later raised it to 32; here each is ~16 MB for gpt-oss-20b); 0 takes none.
    checkpoint_min_step: inside a prompt, a checkpoint once this many tokens followed the latest
    (llama-server's --checkpoint-min-step, 8192 there; 4096 here, where a CPU reads a 20b prompt at
    ~50 tokens/s, so that an edit inside a long prompt evaluates at most ~80 s of it again); 0 or
    -1: checkpoints at prompt ends only."""

    def __init__(self, model: Any, n_threads: int, n_batch: int, cache_type: Any = None,
                 n_checkpoints: int = DEFAULT_CHECKPOINTS,
                 checkpoint_min_step: int = DEFAULT_CHECKPOINT_MIN_STEP) -> None:
        self.model = model
        self.n_vocab = int(model.n_vocab)
        self.n_threads = int(n_threads)
        self.n_batch = int(n_batch)
        self.cache_type = cache_type
        if n_checkpoints < 0:
            raise ValueError(f"n_checkpoints must be >= 0, not {n_checkpoints}")
        self.n_checkpoints = int(n_checkpoints)
        if checkpoint_min_step < -1:
            raise ValueError(f"checkpoint_min_step must be >= -1, not {checkpoint_min_step}")
        self.checkpoint_min_step = int(checkpoint_min_step)

    def new_cache(self, n_ctx: int) -> Cache:
        return Cache(self.cache_type(self.model, n_ctx, self.n_batch), n_ctx)

    @property
    def expert_counts(self) -> np.ndarray:
        """int64 (n_layer, n_expert): expert selections of every forward pass so far."""
        return self.model.expert_counts

    def chunk_size(self, cache: Cache) -> int:
        """Most tokens one forward call may add to `cache`."""
        return min(self.n_batch, cache.native.max_batch(self.model.window))

    def check(self, cache: Cache, tokens: Sequence[int]) -> np.ndarray:
        """int32 ids of `tokens` after checking them against the vocabulary and the context."""
        arr = np.asarray(tokens)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError("tokens must be a 1-D sequence of integer token ids")
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_vocab):
            bad = int(arr[(arr < 0) | (arr >= self.n_vocab)][0])
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.n_vocab}")
        if cache.n_past + arr.size > cache.n_ctx:
            raise ValueError(f"{cache.n_past} cached + {arr.size} new tokens exceed the context "
                             f"window n_ctx={cache.n_ctx}")
        if arr.size == 0:
            raise ValueError("eval needs at least one token")
        return arr.astype(np.int32)

    @property
    def device_argmax(self) -> bool:
        """Whether the model can pick a greedy token itself (the CUDA model: only the id comes
        back from the GPU, not the n_vocab logits)."""
        return bool(getattr(self.model, "device_argmax", False))

    def eval(self, caches: Sequence[Cache], tokens: Sequence[Sequence[int]],
             logits_all: bool = False, greedy: Sequence[bool] = ()) -> list[np.ndarray | int]:
        """Append tokens[i] to caches[i], all sequences in one forward pass per round. Returns
        each sequence's last-token logits (n_vocab,), or with logits_all every new token's
        (len(tokens[i]), n_vocab). greedy (one flag per cache, not with logits_all; honoured when
        device_argmax): a flagged sequence gets the argmax of its last logits as an int instead of
        the logits (the greedy Sampler's choice when no bias or penalty applies). Everything is
        checked before anything is evaluated."""
        caches = list(caches)
        if not caches or len(tokens) != len(caches):
            raise ValueError("eval needs one token list per cache, and at least one cache")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a cache appears twice: each sequence needs its own")
        greedy = list(greedy) if self.device_argmax and not logits_all and any(greedy) else []
        if greedy and len(greedy) != len(caches):
            raise ValueError("greedy needs one flag per cache")
        arrays = [self.check(c, t) for c, t in zip(caches, tokens)]
        chunks = []
        for c, a in zip(caches, arrays):
            step = self.chunk_size(c)
            chunks.append([a[i:i + step] for i in range(0, a.size, step)])
        outs: list[list[Any]] = [[] for _ in caches]
        for r in range(max(len(c) for c in chunks)):
            live = [i for i, c in enumerate(chunks) if r < len(c)]
            if greedy:
                rows, ids = self.model.forward_seqs([caches[i].native for i in live], [chunks[i][r] for i in live],
                                                    [caches[i].n_past for i in live], False, self.n_threads,
                                                    [greedy[i] for i in live])
                rows = [int(ids[k]) if greedy[i] else rows[k] for k, i in enumerate(live)]
            else:
                rows = self._forward([caches[i] for i in live], [chunks[i][r] for i in live], logits_all)
            start = 0
            for k, i in enumerate(live):
                chunk = chunks[i][r]
                caches[i].tokens.extend(int(t) for t in chunk)
                if logits_all:
                    outs[i].append(rows[start:start + chunk.size])
                    start += chunk.size
                else:
                    outs[i] = [rows[k]]
        return [np.concatenate(o) if logits_all else o[0] for o in outs]

    def _forward(self, caches: list[Cache], chunks: list[np.ndarray], logits_all: bool) -> np.ndarray:
        """One forward pass: float32 (sum of lengths, n_vocab) with logits_all, else one row per
        sequence."""
        return self.model.forward_seqs([c.native for c in caches], chunks, [c.n_past for c in caches],
                                       logits_all, self.n_threads)

    def copy_cache(self, src: Cache, dst: Cache) -> bool:
        """Make `dst` hold what `src` holds by copying K/V rows, no forward pass (the n > 1 choices
        of one request share their prompt this way). False, with `dst` untouched, when the rows
        cannot be copied, or the caches differ in shape or keep their rows another way (`row_format`):
        the caller then evaluates the prompt instead."""
        rows = None if src.n_ctx != dst.n_ctx or getattr(src.native, "row_format", None) != getattr(
            dst.native, "row_format", None) else self.used_rows(src)
        return rows is not None and self.write_rows(dst, rows, src.tokens, src.checkpoints)

    @staticmethod
    def used_rows(cache: Cache) -> list[np.ndarray] | None:
        """Host arrays of the K/V rows `cache`'s tokens wrote, every layer's K then V (None where
        the cache has none to copy), in the native cache's own row format (`row_format`, part of
        a saved state's key): on the CPU head-major views, (n_head_kv, slots, row bytes) per layer,
        full layers' positions 0..n_past - 1 in their first slots rounded up to whole tiles of 16
        (on AVX-512 CPUs the keys of f32/f16/bf16 caches sit in tiles of 16 slots, dimension by
        dimension: csrc/attention_heads.h), a sliding ring whole once the tokens fill it (position
        p lives in slot p % slots); on CUDA the GPU layers' rows downloaded slot by slot."""
        return None if cache.native is None else cache.native.used_rows(cache.n_past)

    @staticmethod
    def write_rows(cache: Cache, rows: Sequence[np.ndarray], tokens: Sequence[int],
                   checkpoints: Sequence[Checkpoint] = ()) -> bool:
        """Put `rows` (as used_rows gives them) into `cache`, which then holds `tokens` and
        `checkpoints` (shared: never written to; at increasing counts within the tokens). False,
        with `cache` untouched, when they do not fit it (another model, context, cache type or
        row format)."""
        shapes = None if cache.native is None or len(tokens) > cache.n_ctx else cache.native.row_shapes(len(tokens))
        if shapes is None or len(rows) != len(shapes) or not all(_fits(r, s) for r, s in zip(rows, shapes)):
            return False
        counts = [c.n for c in checkpoints]
        if counts != sorted(set(counts)) or not all(0 < n <= len(tokens) for n in counts):
            return False
        rings = cache.native.ring_shapes() if checkpoints else []
        if not all(len(c.rings) == len(rings) and all(_fits(r, s) for r, s in zip(c.rings, rings))
                   for c in checkpoints):
            return False
        cache.native.put_rows(rows)
        cache.tokens = list(tokens)
        cache.checkpoints = tuple(checkpoints)
        return True

    def take_checkpoint(self, cache: Cache) -> None:
        """Remember `cache`'s sliding rings as they are now (see Checkpoint; for gpt-oss-20b with
        the f16 cache and n_batch 512, a copy of ~16 MB, from the device for a CUDA cache), in
        place of one at the same count; past n_checkpoints the oldest goes."""
        rings = cache.native.ring_copies() if self.n_checkpoints and cache.native is not None else ()
        if rings:
            kept = tuple(c for c in cache.checkpoints if c.n < cache.n_past)
            cache.checkpoints = (*kept, Checkpoint(cache.n_past, rings))[-self.n_checkpoints:]

    def checkpoint_due(self, cache: Cache) -> bool:
        """Whether a prompt being evaluated into `cache` has gone checkpoint_min_step tokens past its
        latest checkpoint (or the start), so that the next is taken before the prompt ends."""
        last = cache.checkpoints[-1].n if cache.checkpoints else 0
        return 0 < self.checkpoint_min_step <= cache.n_past - last

    def reusable(self, cache: Cache, n: int, held: int | None = None,
                 checkpoints: Sequence[Checkpoint] = ()) -> int:
        """How many of the first n tokens a cache like `cache` that holds `held` tokens and
        `checkpoints` (default: `cache`'s own) keeps without evaluating any (`_rewind_source`)."""
        if held is None:
            held, checkpoints = cache.n_past, cache.checkpoints
        return self._rewind_source(cache, n, held, checkpoints)[0]

    def _rewind_source(self, cache: Cache, n: int, held: int,
                       checkpoints: Sequence[Checkpoint]) -> tuple[int, Checkpoint | None]:
        """The tokens kept rewinding to n and the checkpoint whose rings that takes (None: the
        rings as they are): n when the sliding rings still hold the keys position n needs, or
        those of a checkpoint taken at most a rewind's reach after n; else the count of the latest
        checkpoint at or before n; else 0."""
        if self._rings_reach(cache, held, n):
            return n, None
        best: tuple[int, Checkpoint | None] = (0, None)
        for c in checkpoints:
            kept = c.n if c.n <= n else n if self._rings_reach(cache, c.n, n) else 0
            if kept > best[0]:
                best = (kept, c)
        return best

    def prompt_reuse(self, cache: Cache, prompt: Sequence[int], tokens: list[int] | None = None,
                     checkpoints: Sequence[Checkpoint] = ()) -> int:
        """Prompt tokens a cache like `cache` holding `tokens` and `checkpoints` (default: its own)
        gives `prompt` without evaluating any: their shared prefix, short of the prompt's last token
        (whose logits the next token needs), as far back as the cache can rewind (`reusable`)."""
        if tokens is None:
            tokens, checkpoints = cache.tokens, cache.checkpoints
        keep = min(common_prefix(tokens, list(prompt)), len(prompt) - 1)
        return self.reusable(cache, keep, len(tokens), checkpoints) if keep > 0 else 0

    def _rings_reach(self, cache: Cache, held: int, n: int) -> bool:
        """Whether a cache like `cache` holding `held` tokens still has, in its sliding rings, the
        keys position n needs (or n is 0)."""
        return n == 0 or held - n <= cache.native.max_batch(self.model.window)

    def rewind(self, cache: Cache, n: int) -> int:
        """Keep as many of the first n tokens of `cache` as it can without evaluating any
        (`reusable`; rewinding through a checkpoint puts its rings back); the tokens kept. The
        caller evaluates the rest. Checkpoints past what is kept go."""
        if not 0 <= n <= cache.n_past:
            raise ValueError(f"truncate({n}): must be between 0 and n_past={cache.n_past}")
        kept, source = self._rewind_source(cache, n, cache.n_past, cache.checkpoints)
        if source is not None:  # its rings replace what came later
            cache.native.put_rings(source.rings)
        cache.tokens = cache.tokens[:kept]
        cache.checkpoints = tuple(c for c in cache.checkpoints if c.n <= kept)
        return kept

    def truncate(self, cache: Cache, n: int) -> None:
        """Keep the first n tokens of `cache` (prefix reuse); those the cache cannot rewind to
        (Runner.rewind) are evaluated again."""
        keep = cache.tokens[:n]
        kept = self.rewind(cache, n)
        if kept < n:
            self.eval([cache], [keep[kept:]])
