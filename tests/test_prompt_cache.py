"""pyengine/node/prompt_cache.py on a real Runner and KV caches (a tiny random gpt-oss with a
sliding window shorter than the prompts): what is saved, what is put back and when, the byte
limit, and that a slot restored from host memory continues exactly as the uninterrupted one.
The node-level behaviour (--cache-ram across two conversations on one slot) is in
tests/test_node_engine.py."""

from __future__ import annotations

import gguf_factory
import numpy as np
import pytest
from gguf import GGUFValueType

from pyengine import Engine
from pyengine.node.prompt_cache import MIN_TOKENS, PromptCache
from pyengine.runner import common_prefix

WINDOW = 16


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    path = tmp_path_factory.mktemp("pc") / "tiny.gguf"
    gguf_factory.write_gptoss_gguf(path, arch="gpt-oss", n_layer=2, seed=5, drop_keys=("attention.sliding_window",),
                                   extra_keys={"gpt-oss.attention.sliding_window": (WINDOW, GGUFValueType.UINT32)})
    return Engine(path, n_ctx=256, n_threads=2, n_batch=32)


def tokens(seed: int, n: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def filled(eng: Engine, toks: list[int]):
    cache = eng.runner.new_cache(eng.n_ctx)
    eng.runner.eval([cache], [toks])
    return cache


def test_common_prefix_matches_a_plain_scan():
    rng = np.random.default_rng(0)
    for _ in range(500):
        a = rng.integers(0, 3, int(rng.integers(0, 40))).tolist()
        b = a[:int(rng.integers(0, len(a) + 1))] + rng.integers(0, 3, int(rng.integers(0, 10))).tolist()
        want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == want


def test_a_restored_slot_continues_bit_for_bit(eng):
    v = eng.n_vocab
    a, b = tokens(1, 120, v), tokens(2, 100, v)  # past the sliding rings (window + n_batch = 48 slots)
    pc = PromptCache(eng.runner, 64 << 20)
    slot = filled(eng, a)
    pc.save(slot)
    assert len(pc.entries) == 1 and pc.nbytes > 0
    eng.runner.truncate(slot, 0)
    eng.runner.eval([slot], [b])  # another conversation takes the slot
    follow = a + tokens(3, 10, v)
    assert pc.restore_best(slot, follow) == len(a)  # a's entry beats b's contents; b's are saved first
    assert slot.tokens == a and pc.restored == 1 and [e.tokens for e in pc.entries] == [b]
    got = eng.runner.eval([slot], [follow[len(a):]], logits_all=True)[0]
    want = eng.runner.eval([filled(eng, a)], [follow[len(a):]], logits_all=True)[0]
    np.testing.assert_array_equal(got, want)


def test_what_is_saved_and_what_is_put_back(eng):
    v = eng.n_vocab
    a = tokens(4, 100, v)
    pc = PromptCache(eng.runner, 64 << 20)
    pc.save(filled(eng, a[:MIN_TOKENS - 1]))  # too short to keep
    assert not pc.entries
    pc.save(filled(eng, a[:60]))
    pc.save(filled(eng, a[:50]))  # a prefix of a kept entry: nothing new
    assert [len(e.tokens) for e in pc.entries] == [60]
    pc.save(filled(eng, a))  # extends the entry: replaces it
    assert [len(e.tokens) for e in pc.entries] == [100]
    slot = filled(eng, a[:90])
    assert pc.restore_best(slot, a + [1]) == 100  # more than the slot's own 90
    assert pc.restore_best(slot, a + [1]) == 0  # the slot now holds the best
    empty = eng.runner.new_cache(eng.n_ctx)
    pc.save(filled(eng, a))
    far = a[:40] + tokens(5, 20, v)  # shares 40, but the entry's rings cannot rewind 60 tokens
    entry = pc.entries[0]
    assert eng.runner.prompt_reuse(empty, far, entry.tokens, entry.checkpoints) == 0 and pc.restore_best(empty, far) == 0
    assert eng.runner.prompt_reuse(empty, a[:90], entry.tokens, entry.checkpoints) == 89  # within reach of the rings


def test_an_entry_comes_back_to_its_prompt_past_what_the_rings_can_rewind(eng):
    """A conversation's slot saved after a long generation (more tokens than the sliding rings can
    rewind) still gives the next turn its whole earlier prompt: the entry keeps the checkpoint
    taken at the prompt's end, and the restored slot continues bit for bit."""
    v = eng.n_vocab
    prompt, generated = tokens(12, 80, v), tokens(13, 60, v)  # 60 > n_batch + 1: past rewinding
    slot = filled(eng, prompt)
    eng.runner.take_checkpoint(slot)  # what the core does once a prompt is in
    eng.runner.eval([slot], [generated])
    pc = PromptCache(eng.runner, 64 << 20)
    pc.save(slot)
    assert pc.entries[0].checkpoints == slot.checkpoints and [c.n for c in slot.checkpoints] == [len(prompt)]
    eng.runner.truncate(slot, 0)
    eng.runner.eval([slot], [tokens(14, 50, v)])  # another conversation takes the slot
    follow = prompt + tokens(15, 12, v)  # the next turn: the reasoning is not rendered again
    assert pc.restore_best(slot, follow) == len(prompt)
    assert eng.runner.rewind(slot, len(prompt)) == len(prompt) and slot.tokens == prompt
    got = eng.runner.eval([slot], [follow[len(prompt):]], logits_all=True)[0]
    want = eng.runner.eval([filled(eng, prompt)], [follow[len(prompt):]], logits_all=True)[0]
    np.testing.assert_array_equal(got, want)
    bare = PromptCache(eng.runner, 64 << 20)  # the same contents without a checkpoint: unusable
    other = filled(eng, prompt + generated)
    bare.save(other)
    assert eng.runner.prompt_reuse(other, follow, bare.entries[0].tokens, ()) == 0


def test_the_oldest_go_first_past_the_byte_limit(eng):
    v = eng.n_vocab
    one = sum(r.nbytes for r in eng.runner.used_rows(filled(eng, tokens(6, 64, v))))
    pc = PromptCache(eng.runner, int(2.5 * one))
    for seed in range(7, 11):
        pc.save(filled(eng, tokens(seed, 64, v)))
    assert [e.tokens for e in pc.entries] == [tokens(9, 64, v), tokens(10, 64, v)]
    assert pc.nbytes == 2 * one <= pc.max_bytes
    small = PromptCache(eng.runner, one - 1)  # larger than the whole limit: not kept
    small.save(filled(eng, tokens(11, 64, v)))
    assert not small.entries and small.nbytes == 0


def test_a_checkpoint_two_entries_share_is_counted_once(eng):
    """Two branches of one conversation saved from one slot share the checkpoint at their common
    prompt's end: the limit counts its bytes once, so both fit where counting it twice would have
    evicted the first."""
    v = eng.n_vocab
    prompt = tokens(16, 80, v)
    slot = filled(eng, prompt)
    eng.runner.take_checkpoint(slot)
    eng.runner.eval([slot], [tokens(17, 60, v)])  # a first answer, then saved
    rows_a = sum(r.nbytes for r in eng.runner.used_rows(slot))
    checkpoint = slot.checkpoints[0]
    pc = PromptCache(eng.runner, 64 << 20)
    pc.save(slot)
    assert eng.runner.rewind(slot, len(prompt)) == len(prompt)  # a second answer from the same prompt
    eng.runner.eval([slot], [tokens(18, 70, v)])
    rows_b = sum(r.nbytes for r in eng.runner.used_rows(slot))
    assert slot.checkpoints == (checkpoint,) and checkpoint.nbytes > 0
    pc.max_bytes = rows_a + rows_b + checkpoint.nbytes
    pc.save(slot)
    assert len(pc.entries) == 2 and pc.nbytes == rows_a + rows_b + checkpoint.nbytes
    other = filled(eng, tokens(19, 40, v))  # one more entry: the oldest branch goes; the checkpoint stays with B
    rows_c = sum(r.nbytes for r in eng.runner.used_rows(other))
    assert rows_c <= rows_a
    pc.save(other)
    assert [len(e.tokens) for e in pc.entries] == [len(prompt) + 70, 40]
    assert pc.nbytes == rows_b + checkpoint.nbytes + rows_c

