"""The generation loop over a deterministic toy engine: stops, holdback, limits, UTF-8, prefix reuse."""

from __future__ import annotations

import numpy as np
import pytest
import vocab

from pyengine.generate import Generator, common_prefix_length, generate
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


class ToyEngine:
    """eval() returns logits looked up in a fixed random table by a hash of the whole cache, so a
    wrong cache (bad prefix reuse) changes the output. Counts every token it evaluates."""

    def __init__(self, candidates: list[int], n_ctx: int = 512, seed: int = 0, eog_weight: float = -2.0) -> None:
        rng = np.random.default_rng(seed)
        self.candidates = np.array(candidates)
        self.table = rng.standard_normal((97, len(candidates))) * 2
        self.table[:, -2:] += eog_weight
        self.n_vocab, self.n_ctx = N_VOCAB, n_ctx
        self.cache: list[int] = []
        self.n_evaluated = 0

    @property
    def n_past(self) -> int:
        return len(self.cache)

    def logits_for(self, cache: list[int]) -> np.ndarray:
        h = 0
        for t in cache:
            h = (h * 1000003 + t) % 2**61
        out = np.full(self.n_vocab, -40.0, dtype=np.float32)
        out[self.candidates] = self.table[h % 97]
        return out

    def eval(self, tokens):
        assert len(tokens) >= 1 and len(self.cache) + len(tokens) <= self.n_ctx
        self.cache += list(tokens)
        self.n_evaluated += len(tokens)
        return self.logits_for(self.cache)

    def reset(self) -> None:
        self.cache = []

    def truncate(self, n: int) -> None:
        assert 0 <= n <= len(self.cache)
        del self.cache[n:]


def run(gen_or_engine, tok, prompt, **kw):
    events = (
        list(gen_or_engine.generate(prompt, **kw))
        if isinstance(gen_or_engine, Generator)
        else list(generate(gen_or_engine, tok, prompt, **kw))
    )
    return events, [e.id for e in events], "".join(e.text for e in events)


PROMPT = [200006, 1428, 200008, 13225, 200007, 200006, 173781]


def test_utf8_safe_text_equals_decoded_ids(tok):
    seen_partial_bytes = False
    for seed in range(30):
        eng = ToyEngine(candidate_ids(tok), seed=seed)
        events, ids, text = run(eng, tok, PROMPT, max_tokens=60, sampling=SamplingParams(seed=seed))
        body = [i for i in ids if i not in tok.eog_ids]
        assert text == tok.decode(body)
        data = tok.decode_bytes(body)
        seen_partial_bytes |= any(len(tok.token_to_piece(i)) == 1 and tok.token_to_piece(i)[0] >= 0x80 for i in body)
        released = b""
        for e in events:
            released += e.text.encode()
            assert "\ufffd" not in e.text or "\ufffd" in tok.decode(body)
        assert events[-1].finish_reason in ("stop", "length", "tool_calls")
        assert all(e.finish_reason is None for e in events[:-1])
        assert released == text.encode() and len(data) >= 0
    assert seen_partial_bytes


def test_stop_strings_never_leak(tok):
    hits = 0
    for seed in range(20):
        eng = ToyEngine(candidate_ids(tok), seed=seed, eog_weight=-6)
        params = SamplingParams(seed=seed)
        _, ids_free, _ = run(
            ToyEngine(candidate_ids(tok), seed=seed, eog_weight=-6), tok, PROMPT, max_tokens=80, sampling=params
        )
        full = tok.decode([i for i in ids_free if i not in tok.eog_ids])
        stops = ["STOP", "日本 😀"]
        events, ids, text = run(eng, tok, PROMPT, max_tokens=80, sampling=params, stop=stops)
        cut = min((full.find(s) for s in stops if s in full), default=-1)
        if cut >= 0:
            hits += 1
            assert text == full[:cut]
            assert events[-1].finish_reason == "stop"
            assert ids == ids_free[: len(ids)]
        else:
            assert text == full
        released = ""
        for e in events:
            released += e.text
            assert (full[:cut] if cut >= 0 else full).startswith(released)
    assert hits >= 3


def test_eog_max_tokens_and_tool_calls(tok):
    reasons = {}
    for seed in range(60):
        eng = ToyEngine(candidate_ids(tok), seed=seed, eog_weight=-1.0)
        events, ids, _ = run(eng, tok, PROMPT, max_tokens=25, sampling=SamplingParams(seed=seed))
        last = events[-1]
        reasons[last.finish_reason] = reasons.get(last.finish_reason, 0) + 1
        if last.finish_reason == "length":
            assert len(events) == 25 and ids[-1] not in tok.eog_ids
        elif last.finish_reason == "tool_calls":
            assert ids[-1] == 200012
        else:
            assert ids[-1] == 200002
        assert not any(i in tok.eog_ids for i in ids[:-1])
    assert set(reasons) == {"stop", "length", "tool_calls"}


def test_context_limit_finishes_with_length(tok):
    eng = ToyEngine(candidate_ids(tok), n_ctx=20, seed=1, eog_weight=-50)
    events, ids, _ = run(eng, tok, PROMPT, sampling=SamplingParams(seed=1))
    assert events[-1].finish_reason == "length"
    assert len(PROMPT) + len(ids) == 21  # every token but the last was evaluated; the cache is full
    with pytest.raises(ValueError, match="context"):
        run(ToyEngine(candidate_ids(tok), n_ctx=7), tok, PROMPT)
    with pytest.raises(ValueError, match="outside"):
        run(eng, tok, [N_VOCAB])
    with pytest.raises(ValueError, match="max_tokens"):
        Generator(eng, tok).generate(PROMPT, max_tokens=0)  # raised at the call, before iteration


def test_prefix_reuse_evaluates_only_the_new_suffix(tok):
    cands = candidate_ids(tok)
    eng = ToyEngine(cands, seed=3, eog_weight=-50)
    gen = Generator(eng, tok)
    params = SamplingParams(seed=5, temperature=0.8)
    _, ids1, _ = run(gen, tok, PROMPT, max_tokens=10, sampling=params)
    assert eng.n_evaluated == len(PROMPT) + 9 and gen.n_prompt_reused == 0

    follow = PROMPT + ids1 + [200007, 200006, 1428, 200008, 3160]
    before = eng.n_evaluated
    _, ids2, _ = run(gen, tok, follow, max_tokens=10, sampling=params)
    assert gen.n_prompt_reused == len(PROMPT) + 9
    assert eng.n_evaluated - before == (len(follow) - gen.n_prompt_reused) + 9
    fresh = ToyEngine(cands, seed=3, eog_weight=-50)
    _, ids2_fresh, _ = run(fresh, tok, follow, max_tokens=10, sampling=params)
    assert ids2 == ids2_fresh

    # A prompt that diverges early truncates the cache; an identical prompt re-evaluates one token.
    diverged = PROMPT[:3] + [999, 1000]
    _, ids3, _ = run(gen, tok, diverged, max_tokens=5, sampling=params)
    assert (
        gen.n_prompt_reused == 3
        and ids3 == run(ToyEngine(cands, seed=3, eog_weight=-50), tok, diverged, max_tokens=5, sampling=params)[1]
    )
    before = eng.n_evaluated
    run(gen, tok, diverged, max_tokens=1, sampling=params)
    assert eng.n_evaluated - before == 1 and gen.n_prompt_reused == len(diverged) - 1

    # Someone else used the engine: the generator notices and starts over.
    eng.reset()
    eng.eval([5, 6, 7])
    _, ids4, _ = run(gen, tok, diverged, max_tokens=5, sampling=params)
    assert gen.n_prompt_reused == 0 and ids4 == ids3


class NoRewindEngine(ToyEngine):
    """An engine that can only drop its last 2 tokens (like a sliding-window cache)."""

    def truncate(self, n: int) -> None:
        if len(self.cache) - n > 2:
            raise ValueError("cannot rewind that far")
        super().truncate(n)


def test_engine_that_cannot_rewind_is_reset(tok):
    cands = candidate_ids(tok)
    eng = NoRewindEngine(cands, seed=4, eog_weight=-50)
    gen = Generator(eng, tok)
    params = SamplingParams(seed=1)
    run(gen, tok, PROMPT, max_tokens=8, sampling=params)
    other = PROMPT[:2] + [42, 43]
    _, ids, _ = run(gen, tok, other, max_tokens=8, sampling=params)
    assert gen.n_prompt_reused == 0 and gen.n_prompt_evaluated == len(other)
    assert ids == run(ToyEngine(cands, seed=4, eog_weight=-50), tok, other, max_tokens=8, sampling=params)[1]


def test_logprobs_match_the_engine_distribution(tok):
    cands = candidate_ids(tok)
    eng = ToyEngine(cands, seed=9, eog_weight=-50)
    events, ids, _ = run(eng, tok, PROMPT, max_tokens=6, logprobs=3, sampling=SamplingParams(seed=2, top_k=5))
    ref = ToyEngine(cands, seed=9, eog_weight=-50)
    for k, e in enumerate(events):
        lp = log_softmax(ref.logits_for(PROMPT + ids[:k]))
        assert e.logprob == pytest.approx(lp[e.id], abs=1e-9)
        best = np.argsort(-lp, kind="stable")[:3]
        assert [i for i, _ in e.top_logprobs] == best.tolist()


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
