"""Slot contents kept in host memory when a new request would overwrite them (llama-server's
`--cache-ram`), and put back into a slot when a later prompt continues them.

A node with fewer slots than conversations loses a conversation's KV cache as soon as another
conversation takes its slot, and on a CPU re-evaluating a few thousand prompt tokens takes
minutes. Before a slot's tokens are thrown away, the scheduler saves them here (the K/V rows
they wrote: Runner.used_rows; gpt-oss-20b with an f16 cache: 48 KB a token, 24 KB past the
sliding layers' rings);
when a request is admitted and an entry shares a longer usable prefix with its prompt than the
slot does, that entry is written into the slot first (Runner.write_rows) and the request then
reuses it as it reuses any cached prefix. An entry moves back into the slot (it is saved again
when that slot is next overwritten); the oldest entries go first when the bytes pass the limit
(a checkpoint that entries share, branches of one conversation, counted once).
A CUDA slot's rows are downloaded into host memory and uploaded back (CudaKVCache.used_rows /
put_rows); a cache without rows to copy takes no part. Used by the scheduler's worker thread only."""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from pyengine.runner import Cache, Checkpoint, Runner

MIN_TOKENS = 32  # shorter contents are cheaper to evaluate again than to keep


@dataclass(eq=False)  # entries compare by identity (their rows are arrays)
class Entry:
    tokens: list[int]
    rows: list[np.ndarray]
    rows_bytes: int
    checkpoints: tuple[Checkpoint, ...]  # the slot's, shared (checkpoints are never written to)


class PromptCache:
    """At most `max_bytes` of saved slot contents, the newest kept."""

    def __init__(self, runner: Runner, max_bytes: int) -> None:
        self.runner, self.max_bytes = runner, max_bytes
        self.entries: collections.deque[Entry] = collections.deque()
        self.restored = 0  # entries written back into a slot

    @property
    def nbytes(self) -> int:
        """Bytes held: every entry's rows, and each checkpoint once (entries saved from one slot
        share the checkpoints they both hold)."""
        shared = {id(c): c.nbytes for e in self.entries for c in e.checkpoints}
        return sum(e.rows_bytes for e in self.entries) + sum(shared.values())

    def save(self, slot: Cache) -> None:
        """Keep a copy of what `slot` holds (skipped when it is short, cannot be read, is larger
        than the whole limit, or is already a prefix of an entry); entries it extends go."""
        tokens = slot.tokens
        if len(tokens) < MIN_TOKENS:
            return
        rows = self.runner.used_rows(slot)
        if rows is None:
            return
        rows_bytes = sum(r.nbytes for r in rows)
        if rows_bytes + sum(c.nbytes for c in slot.checkpoints) > self.max_bytes or any(
                e.tokens[:len(tokens)] == tokens for e in self.entries):
            return
        for e in [e for e in self.entries if tokens[:len(e.tokens)] == e.tokens]:
            self.entries.remove(e)
        self.entries.append(Entry(list(tokens), [r.copy() for r in rows], rows_bytes, slot.checkpoints))
        while self.nbytes > self.max_bytes:
            self.entries.popleft()

    def restore_best(self, slot: Cache, prompt: list[int]) -> int:
        """Put into `slot` the entry that gives `prompt` the most reuse (Runner.prompt_reuse), when
        it beats what the slot holds (whose contents are saved first); the prompt tokens the slot
        now offers, or 0."""
        reuse = self.runner.prompt_reuse
        gain, best = max(((reuse(slot, prompt, e.tokens, e.checkpoints), e) for e in self.entries),
                         key=lambda pair: pair[0], default=(0, None))
        if best is None or gain <= reuse(slot, prompt):
            return 0
        self.save(slot)
        if all(e is not best for e in self.entries) or not self.runner.write_rows(slot, best.rows, best.tokens,
                                                                                   best.checkpoints):
            return 0  # the save pushed it out, or it no longer fits this slot
        self.entries.remove(best)
        self.restored += 1
        return gain
