"""Samplers vs direct float64 numpy computations of the same definitions, and seed reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from pyengine.sampling import Sampler, SamplingParams, log_softmax, top_logprobs


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_distribution(logits, history, p: SamplingParams):
    """The llama.cpp chain written out the slow, obvious way (full sorts, python loops)."""
    x = logits.astype(np.float64).copy()
    for t, b in p.logit_bias.items():
        x[t] += b
    window = history if p.repeat_last_n == -1 else history[-p.repeat_last_n :] if p.repeat_last_n else []
    for t in set(window):
        c = window.count(t)
        x[t] = x[t] / p.repeat_penalty if x[t] > 0 else x[t] * p.repeat_penalty
        x[t] -= c * p.frequency_penalty + p.presence_penalty
    if p.temperature <= 0:
        out = np.zeros_like(x)
        out[np.argmax(x)] = 1.0
        return out
    keep = np.ones(x.shape[0], dtype=bool)
    order = sorted(range(x.shape[0]), key=lambda i: (-x[i], i))
    if p.top_k:
        keep[:] = False
        keep[order[: p.top_k]] = True
    if p.top_p < 1.0:
        kept = [i for i in order if keep[i]]
        probs = softmax(x[kept])
        cum, n = 0.0, 0
        for n, q in enumerate(probs, start=1):
            cum += q
            if cum >= p.top_p:
                break
        keep[:] = False
        keep[kept[:n]] = True
    if p.min_p > 0:
        probs = softmax(np.where(keep, x, -np.inf))
        keep &= probs >= p.min_p * probs.max()
    out = np.where(keep, x / p.temperature, -np.inf)
    return softmax(out)


CASES = [
    SamplingParams(),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=0.0),
    SamplingParams(top_k=5),
    SamplingParams(top_p=0.9),
    SamplingParams(top_p=0.5, temperature=1.3),
    SamplingParams(min_p=0.05),
    SamplingParams(top_k=40, top_p=0.95, min_p=0.02, temperature=0.8),
    SamplingParams(repeat_penalty=1.3, repeat_last_n=8),
    SamplingParams(repeat_penalty=1.1, repeat_last_n=-1, frequency_penalty=0.4, presence_penalty=0.6),
    SamplingParams(frequency_penalty=-0.5, presence_penalty=1.0, repeat_last_n=0),
    SamplingParams(logit_bias={3: 5.0, 7: -100.0}, top_k=10),
]


@pytest.mark.parametrize("params", CASES, ids=repr)
def test_distribution_matches_reference(params):
    rng = np.random.default_rng(0)
    for trial in range(5):
        logits = (rng.standard_normal(300) * rng.uniform(0.5, 4)).astype(np.float32)
        history = [int(t) for t in rng.integers(0, 300, size=40)] + [3, 3, 3]
        got = Sampler(params).distribution(logits, history)
        want = reference_distribution(logits, history, params)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        assert abs(got.sum() - 1) < 1e-12


def test_top_p_fast_path_on_a_full_vocabulary():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(201088) * 3).astype(np.float32)
    for top_p in (0.1, 0.5, 0.9, 0.999):
        params = SamplingParams(top_p=top_p)
        ids, _ = Sampler(params).candidates(logits)
        full = softmax(logits.astype(np.float64))
        order = np.lexsort((np.arange(full.shape[0]), -full))
        n = int(np.searchsorted(np.cumsum(full[order]), top_p)) + 1
        assert set(ids.tolist()) == set(order[:n].tolist())


def test_samples_follow_the_distribution():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal(12).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_k=8, seed=42)
    sampler = Sampler(params)
    n = 40000
    counts = np.bincount([sampler.sample(logits) for _ in range(n)], minlength=12)
    expected = sampler.distribution(logits) * n
    assert counts[expected == 0].sum() == 0
    mask = expected > 0
    chi2 = (((counts - expected) ** 2)[mask] / expected[mask]).sum()
    assert chi2 < 30  # 7 degrees of freedom: p < 1e-4 of failing by chance


def test_seed_reproducible_and_seeds_differ():
    logits = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    a = Sampler(SamplingParams(seed=7, temperature=1.5))
    b = Sampler(SamplingParams(seed=7, temperature=1.5))
    c = Sampler(SamplingParams(seed=8, temperature=1.5))
    sa = [a.sample(logits) for _ in range(50)]
    assert sa == [b.sample(logits) for _ in range(50)]
    assert sa != [c.sample(logits) for _ in range(50)]


def test_greedy_is_argmax_after_bias():
    logits = np.random.default_rng(4).standard_normal(500).astype(np.float32)
    s = Sampler(SamplingParams(temperature=0))
    assert s.sample(logits) == int(np.argmax(logits))
    s = Sampler(SamplingParams(temperature=0, logit_bias={17: 100.0}))
    assert s.sample(logits) == 17


def test_logprobs_and_top_alternatives():
    logits = np.random.default_rng(5).standard_normal(2000).astype(np.float32) * 3
    lp = log_softmax(logits)
    ref = logits.astype(np.float64) - np.log(np.sum(np.exp(logits.astype(np.float64))))
    np.testing.assert_allclose(lp, ref, rtol=1e-12, atol=1e-12)
    top = top_logprobs(lp, 5)
    want = np.argsort(-lp, kind="stable")[:5]
    assert [i for i, _ in top] == want.tolist()
    assert [v for _, v in top] == [float(lp[i]) for i in want]
    assert top_logprobs(lp, 0) == []


def test_invalid_params_rejected():
    inf, nan = float("inf"), float("nan")
    for bad in ({"top_p": 1.5}, {"min_p": -0.1}, {"top_k": -1}, {"repeat_penalty": 0}, {"repeat_last_n": -2},
                {"top_p": nan}, {"temperature": inf}, {"temperature": nan}, {"repeat_penalty": inf},
                {"presence_penalty": -inf}, {"frequency_penalty": nan}):  # every probability NaN
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="outside"):
        Sampler(SamplingParams(logit_bias={5000: 1.0})).sample(np.zeros(10, dtype=np.float32))


def llama_cpp_distribution(llama_cpp, logits, history, p: SamplingParams):
    """llama.cpp's own samplers (via llama-cpp-python) applied one by one, then the softmax."""
    import ctypes

    n = logits.shape[0]
    data = (llama_cpp.llama_token_data * n)(*[llama_cpp.llama_token_data(i, float(logits[i]), 0.0) for i in range(n)])
    arr = llama_cpp.llama_token_data_array(data, n, -1, False)
    samplers = []
    if p.logit_bias:
        bias = (llama_cpp.llama_logit_bias * len(p.logit_bias))(
            *[llama_cpp.llama_logit_bias(t, b) for t, b in p.logit_bias.items()]
        )
        samplers.append(llama_cpp.llama_sampler_init_logit_bias(n, len(p.logit_bias), bias))
    penalties = llama_cpp.llama_sampler_init_penalties(
        n, p.repeat_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
    )
    for t in history:
        llama_cpp.llama_sampler_accept(penalties, t)
    samplers.append(penalties)
    if p.top_k:
        samplers.append(llama_cpp.llama_sampler_init_top_k(p.top_k))
    samplers.append(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
    samplers.append(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
    samplers.append(llama_cpp.llama_sampler_init_temp(p.temperature))
    for s in samplers:
        llama_cpp.llama_sampler_apply(s, ctypes.byref(arr))
        llama_cpp.llama_sampler_free(s)
    ids = np.array([arr.data[i].id for i in range(arr.size)])
    kept = np.array([arr.data[i].logit for i in range(arr.size)], dtype=np.float64)
    out = np.zeros(n)
    finite = np.isfinite(kept)
    out[ids[finite]] = softmax(kept[finite])
    return out


LLAMA_CASES = [c for c in CASES if c.repeat_last_n >= 1 and c.temperature > 0]


@pytest.mark.parametrize("params", LLAMA_CASES, ids=repr)
def test_distribution_matches_llama_cpp_samplers(params):
    llama_cpp = pytest.importorskip("llama_cpp")
    rng = np.random.default_rng(10)
    for _ in range(3):
        logits = (rng.standard_normal(300) * rng.uniform(0.5, 4)).astype(np.float32)
        history = [int(t) for t in rng.integers(0, 300, size=40)] + [3, 3, 3]
        got = Sampler(params).distribution(logits, history)
        want = llama_cpp_distribution(llama_cpp, logits, history, params)
        assert set(np.flatnonzero(got)) == set(np.flatnonzero(want))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1e-300), SamplingParams(temperature=1e300),
                                    SamplingParams(repeat_penalty=1e-300), SamplingParams(repeat_penalty=1e300),
                                    SamplingParams(temperature=0.7, top_p=0.5, logit_bias={3: 1e308, 4: 1e308}),
                                    SamplingParams(logit_bias={i: -np.inf for i in range(50)})])
def test_extreme_values_give_a_proper_distribution(params):
    logits = np.random.default_rng(1).standard_normal(50) * 5
    history = [3, 4, 5, 3]
    with np.errstate(invalid="raise"):  # inf - inf or 0 / 0 would raise; underflow to 0 is fine
        probs = Sampler(params).distribution(logits, history)
    assert np.isfinite(probs).all() and probs.min() >= 0 and probs.sum() == pytest.approx(1.0)
    assert 0 <= Sampler(params).sample(logits, history) < 50


def test_top_k_ties_go_to_the_lower_id_on_a_full_vocabulary():
    # many equal logits around the k-th place: the reference order is (-logit, id)
    rng = np.random.default_rng(11)
    logits = np.round(rng.standard_normal(201088) * 2, 1).astype(np.float32)
    for k in (1, 40, 1000):
        got, _ = Sampler(SamplingParams(top_k=k)).candidates(logits)
        want = np.lexsort((np.arange(logits.shape[0]), -logits.astype(np.float64)))[:k]
        assert got.tolist() == sorted(want.tolist())


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_top_p_buckets_match_a_full_sort(scale):
    # flat, typical and peaked distributions; rounded logits put ties inside the bucket that is cut
    rng = np.random.default_rng(12)
    logits = np.round(rng.standard_normal(201088) * scale, 2).astype(np.float32)
    full = softmax(logits.astype(np.float64))
    order = np.lexsort((np.arange(full.shape[0]), -full))
    cum = np.cumsum(full[order])
    for top_p in (0.0, 0.05, 0.5, 0.9, 0.99, 0.9999):
        ids, _ = Sampler(SamplingParams(top_p=top_p)).candidates(logits)
        n = int(np.searchsorted(cum, top_p)) + 1
        assert ids.tolist() == sorted(order[:n].tolist()), top_p


def test_draw_picks_the_token_whose_cumulative_mass_covers_the_uniform():
    from pyengine.sampling import _draw

    rng = np.random.default_rng(13)
    for n in (1, 7, 4096, 4097, 201088):
        w = rng.exponential(size=n) * (rng.random(n) < 0.7)  # zero weights mixed in
        if not w.any():
            w[-1] = 1.0
        cdf = np.cumsum(w)
        for r in [*rng.random(300), 0.0, 1.0 - 2.0 ** -53]:
            k = _draw(w, r)
            assert w[k] > 0
            u = r * cdf[-1]
            want = min(int(np.searchsorted(cdf, u, side="right")), n - 1)
            # chunked sums round differently from one running sum: only a draw within rounding of
            # a boundary may land on the neighbouring token
            assert k == want or abs(cdf[min(k, want)] - u) <= 1e-12 * cdf[-1]
    w = np.zeros(10000)
    w[[0, 4095, 4096, 9999]] = 1.0  # mass only at chunk edges
    assert {_draw(w, r) for r in (0.1, 0.3, 0.6, 0.9)} == {0, 4095, 4096, 9999}


def test_draws_over_a_full_vocabulary_follow_the_distribution():
    rng = np.random.default_rng(14)
    logits = np.full(201088, -30.0, dtype=np.float32)
    hot = rng.choice(201088, 6, replace=False)  # spread over several draw chunks
    logits[hot] = rng.standard_normal(6).astype(np.float32)
    sampler = Sampler(SamplingParams(seed=3))
    n = 5000
    drawn = np.array([sampler.sample(logits) for _ in range(n)])
    expected = sampler.distribution(logits)[hot] * n
    counts = np.array([(drawn == h).sum() for h in hot])
    assert np.isin(drawn, hot).mean() > 0.999
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 25  # 5 degrees of freedom: p < 1e-3 of failing by chance


def test_top_logprobs_on_a_full_vocabulary_with_ties():
    rng = np.random.default_rng(15)
    logits = np.round(rng.standard_normal(201088) * 3, 1).astype(np.float32)
    lp = log_softmax(logits)
    np.testing.assert_array_equal(lp, logits.astype(np.float64) - logits.max()
                                  - np.log(np.sum(np.exp(logits.astype(np.float64) - logits.max()))))
    for n in (1, 5, 20):
        want = np.argsort(-lp, kind="stable")[:n]
        assert top_logprobs(lp, n) == [(int(i), float(lp[i])) for i in want]
    with np.errstate(invalid="ignore"):
        bad = log_softmax(np.where(np.arange(300) == 7, np.nan, logits[:300]))
    assert len(top_logprobs(bad, 5)) == 5  # NaN logits still give n entries
