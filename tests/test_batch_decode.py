"""Continuous batching: several sequences (caches) in one forward pass (pyengine.runner.Runner.eval
over _model.Model.forward_seqs), and the per-layer expert selection counters.

The reference for a batched step is each sequence run on its own Engine with the same chunking
(Engine.eval), so any cross-talk between sequences (wrong cache, wrong position, wrong RoPE row,
wrong attention span) shows up as a difference. Sequences sit at different positions, some
beyond the 128-token sliding window with small n_batch, so the sliding rings have wrapped."""

from __future__ import annotations

import gguf_factory
import numpy as np
import pytest

from pyengine import _model
from pyengine.engine import Engine
from pyengine.model_file import open_model

N_CTX = 320
N_BATCH = 32                       # sliding ring = 128 + 32 rows: wraps past position 160
PROMPTS = (3, 57, 150, 233)        # tokens already cached per sequence (the last two beyond the window)
STEPS = 6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    out = {}
    for wtype, etype in (("f32", "f32"), ("q8_0", "mxfp4")):
        path = d / f"{wtype}-{etype}.gguf"
        gguf_factory.write_gptoss_gguf(path, arch="gpt-oss", n_layer=3, wtype=wtype, expert_type=etype, seed=3)
        out[wtype] = path
    return out


def engines(path, n: int, n_threads: int = 2, **kw) -> list[Engine]:
    mf = open_model(path)
    return [Engine(mf, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=n_threads, **kw) for _ in range(n)]


class Batch:
    """n caches over one engine's runner (the node's layout: one model, a cache per slot)."""

    def __init__(self, path, n: int, n_threads: int = 2, **kw) -> None:
        self.eng = Engine(open_model(path), n_ctx=N_CTX, n_batch=N_BATCH, n_threads=n_threads, **kw)
        self.caches = [self.eng.runner.new_cache(N_CTX) for _ in range(n)]

    def eval(self, tokens):
        return self.eng.runner.eval(self.caches, tokens)

    def eval_each(self, tokens) -> None:
        for cache, t in zip(self.caches, tokens):
            self.eng.runner.eval([cache], [t])


def prompts(n_vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, n_vocab, n) for n in PROMPTS]


def single_runs(path) -> tuple[list[list[int]], np.ndarray]:
    """Each sequence on its own engine: prompt, then STEPS greedy one-token decodes. Returns the
    fed decode tokens per sequence and the logits (STEPS, n_seq, n_vocab) after each."""
    fed, logits = [], []
    for eng, p in zip(engines(path, len(PROMPTS)), prompts(300)):
        last = eng.eval(p)
        toks, rows = [], []
        for _ in range(STEPS):
            toks.append(int(np.argmax(last)))
            last = eng.eval([toks[-1]])
            rows.append(last)
        fed.append(toks)
        logits.append(rows)
    return fed, np.array(logits).transpose(1, 0, 2)


def batched_runs(path, fed, n_threads: int = 2) -> np.ndarray:
    batch = Batch(path, len(PROMPTS), n_threads)
    batch.eval_each(prompts(300))
    out = []
    for s in range(STEPS):
        out.append(batch.eval([[toks[s]] for toks in fed]))
        assert [c.n_past for c in batch.caches] == [n + s + 1 for n in PROMPTS]
    return np.array(out)


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("wtype", ["f32", "q8_0"])
def test_batched_decode_is_bit_identical_to_single_sequences(files, wtype):
    # Up to 8 tokens, every product uses the type's fused one-token dot for each token (row by
    # row), so even quantized weights give each sequence exactly its own decode logits.
    fed, ref = single_runs(files[wtype])
    got = batched_runs(files[wtype], fed)
    np.testing.assert_array_equal(got, ref)
    assert len({tuple(t) for t in fed}) == len(PROMPTS)  # the sequences really differ


def test_quantized_batched_prompt_chunks_match_within_rounding(files):
    # More than 8 tokens dequantize tiles of rows and dot in f32: a different summation order
    # than the fused dot, so a decode step that shares its pass with a prompt chunk matches its
    # single-sequence logits up to rounding. An f32 KV cache: an f16 one rounds those differences to
    # whole f16 steps of K and V. The bound: this chaotic 3-layer model turns rounding-order changes
    # anywhere (e.g. the SIMD q.k dot of the attention loop) into 1e-7 .. 3e-4 here.
    path, f32_kv = files["q8_0"], dict(cache_type_k="f32", cache_type_v="f32")
    ps = prompts(300)
    more = [[5], list(range(40)), [7], [9]]
    ref = []
    for eng, p, m in zip(engines(path, 4, **f32_kv), ps, more):
        eng.eval(p)
        ref.append(eng.eval(m))
    batch = Batch(path, 4, **f32_kv)
    batch.eval_each(ps)
    for g, r in zip(batch.eval(more), ref):
        assert rel(g, r) < 5e-4
        assert np.argmax(g) == np.argmax(r)


@pytest.mark.parametrize("wtype", ["f32", "q8_0"])
def test_thread_count_does_not_change_batched_results(files, wtype):
    fed, _ = single_runs(files[wtype])
    np.testing.assert_array_equal(batched_runs(files[wtype], fed, 1), batched_runs(files[wtype], fed, 2))


def test_batched_prefill_with_uneven_chunks_equals_eval(files):
    """Runner.eval splits each input into n_batch chunks; sequences with fewer
    chunks drop out of later rounds. F32: bit-identical to Engine.eval with the same chunking."""
    path = files["f32"]
    ps = prompts(300)
    ref = [eng.eval(p) for eng, p in zip(engines(path, 4), ps)]
    batch = Batch(path, 4)
    got = batch.eval(ps)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
    # a mixed step: prompt chunks and single decode tokens in one pass
    more = [[5], list(range(40)), [7], list(range(20, 50))]
    ref2 = []
    for eng, p, m in zip(engines(path, 4), ps, more):
        eng.eval(p)
        ref2.append(eng.eval(m))
    for g, r in zip(batch.eval(more), ref2):
        np.testing.assert_array_equal(g, r)


def test_bad_input_raises_before_anything_is_evaluated(files):
    batch = Batch(files["f32"], 3)
    batch.eval_each([[1, 2, 3]] * 3)
    runner, c = batch.eng.runner, batch.caches
    bad = [
        ([c[0], c[1]], [[1]]),                         # mismatched lengths
        ([], []),                                      # nothing
        (c, [[1], [300], [2]]),                        # token out of range
        (c, [[1], [-1], [2]]),
        (c, [[1], [], [2]]),                           # an empty input
        (c, [[1], [2.5], [2]]),                        # not integers
        ([c[0], c[0]], [[1], [2]]),                    # the same cache twice
        (c, [[1], [2], [0] * (N_CTX - 2)]),            # past the end of that cache
    ]
    for caches, toks in bad:
        with pytest.raises(ValueError):
            runner.eval(caches, toks)
    assert [x.n_past for x in c] == [3, 3, 3]


def test_forward_seqs_validates_every_pointer(files, tmp_path):
    m, cache = engines(files["f32"], 1)[0]._model, None
    cache, c2 = _model.KVCache(m, 64, 8), _model.KVCache(m, 16, 4)
    m.forward_seqs([cache, c2], [[1], [2]], [0, 0], False, 1)
    path = tmp_path / "two-layers.gguf"
    gguf_factory.write_gptoss_gguf(path, arch="gpt-oss", n_layer=2)
    foreign = _model.KVCache(engines(path, 1)[0]._model, 64, 8)  # 2 layers: not this model's
    bad = [
        ([cache, c2], [[1], [2]], [0]),                  # lengths differ
        ([cache, cache], [[1], [2]], [0, 0]),            # a cache twice
        ([cache, "cache"], [[1], [2]], [0, 0]),          # not a cache
        ([cache, None], [[1], [2]], [0, 0]),
        ([cache, foreign], [[1], [2]], [0, 0]),          # another model's cache
        ([cache, c2], [[1], [2]], [0, -1]),              # negative position
        ([cache, c2], [[1], [2]], [0, 16]),              # full cache
        ([cache, c2], [[1], [2, 3, 4, 5, 6]], [0, 12]),  # runs past the end
        ([cache, c2], [[1], [[2]]], [0, 0]),             # not 1-D
        ([cache, c2], [[1], [2 ** 32 + 1]], [0, 0]),     # would wrap in int32
        ([cache, c2], [[1], [300]], [0, 0]),             # out of the vocabulary
        ([], [], []),
    ]
    for caches, toks, pasts in bad:
        with pytest.raises(ValueError):
            m.forward_seqs(caches, toks, pasts, False, 1)
    with pytest.raises(ValueError):
        m.forward_seqs([cache, c2], [[1], [2]], [0, 0], False, 0)
    with pytest.raises(ValueError):
        m.forward(foreign, [1], 0, False, 1)


def test_expert_counts_sum_to_tokens_times_experts_used(files):
    eng = engines(files["q8_0"], 1)[0]
    hp = eng.hparams
    assert eng.expert_counts.shape == (3, hp.n_expert) and not eng.expert_counts.any()
    eng.eval(prompts(300)[2])
    eng.eval([4])
    counts = eng.expert_counts
    np.testing.assert_array_equal(counts.sum(1), [(PROMPTS[2] + 1) * hp.n_expert_used] * 3)
    assert (counts > 0).sum() > 3  # random routing spreads over experts


def test_moe_counts_match_numpy_top_k():
    rng = np.random.default_rng(5)
    E, D, F, K, T = 6, 32, 16, 2, 40
    x = rng.normal(size=(T, D)).astype(np.float32)
    rw, rb = rng.normal(size=(E, D)).astype(np.float32), rng.normal(size=E).astype(np.float32)
    w = [rng.normal(size=s).astype(np.float32) for s in ((E, F, D), (E, F), (E, F, D), (E, F), (E, D, F), (E, D))]
    _, counts = _model.moe(x, rw, rb, *w, K, 2, return_counts=True)
    logits = x.astype(np.float64) @ rw.T.astype(np.float64) + rb
    top = np.argsort(-logits, axis=1)[:, :K]
    np.testing.assert_array_equal(counts, np.bincount(top.ravel(), minlength=E))
