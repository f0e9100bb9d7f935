"""The generation core (pyengine.core) over a deterministic toy runner: stops, holdback, limits,
UTF-8, prefix reuse, logprobs. Raw (non-chat) sequences; Harmony output is tested in test_harmony.py
and test_output_rules.py."""

from __future__ import annotations

import numpy as np
import pytest
import vocab
from scripted_model import Unbounded

from pyengine.core import Core, Finished, Request, Sampled, Text
from pyengine.runner import Cache, Runner
from pyengine.sampling import SamplingParams, log_softmax
from pyengine.tokenizer import Tokenizer

N_VOCAB = 201088


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_metadata(vocab.harmony_metadata())


def candidate_ids(tok: Tokenizer) -> list[int]:
    """Tokens the toy model may produce: words, stop-string pieces, lone UTF-8 bytes, emoji, EOGs."""
    ranks = vocab.o200k_ranks()
    words = ["Hello", " world", ",", " the", " ST", "ST", "OP", " STOP", "\n", " é", "日本", " 😀"]
    ids = [i for w in words for i in tok.encode(w)]
    ids += [ranks[bytes([b])] for b in (0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80, 0xC3, 0xA9)]
    return sorted(set(ids)) + [200002, 200012]


class _Model:
    n_vocab, window = N_VOCAB, 0


class ToyRunner(Runner):
    """Logits looked up in a fixed random table by a hash of the whole context, so a wrong cache
    (bad prefix reuse) changes the output. Counts every token it evaluates."""

    def __init__(self, candidates: list[int], n_ctx: int = 512, seed: int = 0, eog_weight: float = -2.0) -> None:
        super().__init__(_Model(), n_threads=1, n_batch=512)
        rng = np.random.default_rng(seed)
        self.candidates = np.array(candidates)
        self.table = rng.standard_normal((97, len(candidates))) * 2
        self.table[:, -2:] += eog_weight
        self.n_ctx = n_ctx
        self.n_evaluated = 0

    def new_cache(self, n_ctx: int | None = None) -> Cache:
        return Cache(Unbounded(n_ctx or self.n_ctx), n_ctx or self.n_ctx)

    def logits_for(self, context: list[int]) -> np.ndarray:
        h = 0
        for t in context:
            h = (h * 1000003 + t) % 2**61
        out = np.full(self.n_vocab, -40.0, dtype=np.float32)
        out[self.candidates] = self.table[h % 97]
        return out

    def _forward(self, caches, chunks, logits_all):
        assert not logits_all
        self.n_evaluated += sum(len(c) for c in chunks)
        return np.stack([self.logits_for(c.tokens + [int(t) for t in x]) for c, x in zip(caches, chunks)])


class Gen:
    """A core and one cache kept between calls (as Engine keeps its own)."""

    def __init__(self, runner: ToyRunner, tok: Tokenizer) -> None:
        self.runner, self.core, self.cache = runner, Core(runner, tok), runner.new_cache()
        self.n_prompt_reused = 0

    def generate(self, prompt, max_tokens=None, sampling=None, stop=(), logprobs=None):
        """[(id, text, logprob, top, finish_reason)] per generated token."""
        seq = self.core.start(self.cache, Request(list(prompt), sampling or SamplingParams(), max_tokens,
                                                  list(stop), logprobs))
        self.n_prompt_reused = seq.n_cached
        out = []
        while not seq.done:
            (events,) = self.core.step([seq])
            token = next((e for e in events if isinstance(e, Sampled)), None)
            fin = next((e for e in events if isinstance(e, Finished)), None)
            if token is not None:
                text = "".join(e.text for e in events if isinstance(e, Text))
                out.append((token.id, text, token.logprob, token.top, fin.reason if fin else None))
        return out


def run(gen_or_runner, tok, prompt, **kw):
    gen = gen_or_runner if isinstance(gen_or_runner, Gen) else Gen(gen_or_runner, tok)
    events = gen.generate(prompt, **kw)
    return events, [e[0] for e in events], "".join(e[1] for e in events)


PROMPT = [200006, 1428, 200008, 13225, 200007, 200006, 173781]


def test_utf8_safe_text_equals_decoded_ids(tok):
    seen_partial_bytes = False
    for seed in range(30):
        eng = ToyRunner(candidate_ids(tok), seed=seed)
        events, ids, text = run(eng, tok, PROMPT, max_tokens=60, sampling=SamplingParams(seed=seed))
        body = [i for i in ids if i not in tok.eog_ids]
        assert text == tok.decode(body)
        data = tok.decode_bytes(body)
        seen_partial_bytes |= any(len(tok.token_to_piece(i)) == 1 and tok.token_to_piece(i)[0] >= 0x80 for i in body)
        released = b""
        for e in events:
            released += e[1].encode()
            assert "\ufffd" not in e[1] or "\ufffd" in tok.decode(body)
        assert events[-1][4] in ("stop", "length", "tool_calls")
        assert all(e[4] is None for e in events[:-1])
        assert released == text.encode() and len(data) >= 0
    assert seen_partial_bytes


def test_stop_strings_never_leak(tok):
    hits = 0
    for seed in range(20):
        eng = ToyRunner(candidate_ids(tok), seed=seed, eog_weight=-6)
        params = SamplingParams(seed=seed)
        _, ids_free, _ = run(
            ToyRunner(candidate_ids(tok), seed=seed, eog_weight=-6), tok, PROMPT, max_tokens=80, sampling=params
        )
        full = tok.decode([i for i in ids_free if i not in tok.eog_ids])
        stops = ["STOP", "日本 😀"]
        events, ids, text = run(eng, tok, PROMPT, max_tokens=80, sampling=params, stop=stops)
        cut = min((full.find(s) for s in stops if s in full), default=-1)
        if cut >= 0:
            hits += 1
            assert text == full[:cut]
            assert events[-1][4] == "stop"
            assert ids == ids_free[: len(ids)]
        else:
            assert text == full
        released = ""
        for e in events:
            released += e[1]
            assert (full[:cut] if cut >= 0 else full).startswith(released)
    assert hits >= 3


def test_eog_max_tokens_and_tool_calls(tok):
    reasons = {}
    for seed in range(60):
        eng = ToyRunner(candidate_ids(tok), seed=seed, eog_weight=-1.0)
        events, ids, _ = run(eng, tok, PROMPT, max_tokens=25, sampling=SamplingParams(seed=seed))
        last = events[-1]
        reasons[last[4]] = reasons.get(last[4], 0) + 1
        if last[4] == "length":
            assert len(events) == 25 and ids[-1] not in tok.eog_ids
        elif last[4] == "tool_calls":
            assert ids[-1] == 200012
        else:
            assert ids[-1] == 200002
        assert not any(i in tok.eog_ids for i in ids[:-1])
    assert set(reasons) == {"stop", "length", "tool_calls"}


def test_context_limit_finishes_with_length(tok):
    eng = ToyRunner(candidate_ids(tok), n_ctx=20, seed=1, eog_weight=-50)
    events, ids, _ = run(eng, tok, PROMPT, sampling=SamplingParams(seed=1))
    assert events[-1][4] == "length"
    assert len(PROMPT) + len(ids) == 21  # every token but the last was evaluated; the cache is full
    with pytest.raises(ValueError, match="context"):
        run(ToyRunner(candidate_ids(tok), n_ctx=7), tok, PROMPT)
    with pytest.raises(ValueError, match="outside"):
        run(eng, tok, [N_VOCAB])
    with pytest.raises(ValueError, match="max_tokens"):
        Gen(eng, tok).generate(PROMPT, max_tokens=0)


def test_prefix_reuse_evaluates_only_the_new_suffix(tok):
    cands = candidate_ids(tok)
    eng = ToyRunner(cands, seed=3, eog_weight=-50)
    gen = Gen(eng, tok)
    params = SamplingParams(seed=5, temperature=0.8)
    _, ids1, _ = run(gen, tok, PROMPT, max_tokens=10, sampling=params)
    assert eng.n_evaluated == len(PROMPT) + 9 and gen.n_prompt_reused == 0

    follow = PROMPT + ids1 + [200007, 200006, 1428, 200008, 3160]
    before = eng.n_evaluated
    _, ids2, _ = run(gen, tok, follow, max_tokens=10, sampling=params)
    assert gen.n_prompt_reused == len(PROMPT) + 9
    assert eng.n_evaluated - before == (len(follow) - gen.n_prompt_reused) + 9
    fresh = ToyRunner(cands, seed=3, eog_weight=-50)
    _, ids2_fresh, _ = run(fresh, tok, follow, max_tokens=10, sampling=params)
    assert ids2 == ids2_fresh

    # A prompt that diverges early truncates the cache; an identical prompt re-evaluates one token.
    diverged = PROMPT[:3] + [999, 1000]
    _, ids3, _ = run(gen, tok, diverged, max_tokens=5, sampling=params)
    assert (
        gen.n_prompt_reused == 3
        and ids3 == run(ToyRunner(cands, seed=3, eog_weight=-50), tok, diverged, max_tokens=5, sampling=params)[1]
    )
    before = eng.n_evaluated
    run(gen, tok, diverged, max_tokens=1, sampling=params)
    assert eng.n_evaluated - before == 1 and gen.n_prompt_reused == len(diverged) - 1


def test_logprobs_match_the_engine_distribution(tok):
    cands = candidate_ids(tok)
    eng = ToyRunner(cands, seed=9, eog_weight=-50)
    events, ids, _ = run(eng, tok, PROMPT, max_tokens=6, logprobs=3, sampling=SamplingParams(seed=2, top_k=5))
    ref = ToyRunner(cands, seed=9, eog_weight=-50)
    for k, e in enumerate(events):
        lp = log_softmax(ref.logits_for(PROMPT + ids[:k]))
        assert e[2] == pytest.approx(lp[e[0]], abs=1e-9)
        best = np.argsort(-lp, kind="stable")[:3]
        assert [i for i, _ in e[3]] == best.tolist()


def test_common_prefix():
    cache = Cache(None, 8)
    cache.tokens = [1, 2, 3]
    assert cache.common_prefix([1, 2, 4]) == 2 and cache.common_prefix([1, 2, 3, 4]) == 3
    assert cache.common_prefix([]) == 0 and Cache(None, 8).common_prefix([1]) == 0
