"""The greedy sampler on the GPU (csrc/cuda/argmax_cuda.cu) and the pinned logits buffers: the device's
argmax is the CPU Sampler's greedy choice on the same float32 rows (ties to the lowest id, NaN never
chosen, -0 == +0), a greedy decode step brings back only the token id, and logits land in pinned
buffers that a later call never overwrites while someone holds them."""

import numpy as np
import pytest

from gguf_factory import write_gptoss_gguf
from test_cuda_engine import prompt

import pyengine
from pyengine.core import Core, Request
from pyengine.runner import Cache
from pyengine.sampling import Sampler, SamplingParams

GREEDY = Sampler(SamplingParams(temperature=0.0))


def cpu_choice(rows):
    return [GREEDY.sample(r) for r in rows]


@pytest.mark.parametrize("n", [1, 33, 4097, 70001])
def test_random_rows_and_constructed_ties(gpu, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((5, n)).astype(np.float32)
    if n > 1:
        # row 1: the maximum twice, far apart (other blocks of the grid when n is large); row 2: the
        # maximum at the very end; row 3: three equal maxima, the first not at the start
        top = x[1].max() + 1.0
        i, j = sorted(rng.choice(n, 2, replace=False))
        x[1, j], x[1, i] = top, top
        x[2, -1] = x[2].max() + 0.5
        k = sorted(rng.choice(np.arange(1, n), min(3, n - 1), replace=False))
        x[3, k] = x[3].max() + 2.0
    got = gpu.argmax_rows(x)
    assert list(got) == cpu_choice(x)
    if n > 1:
        assert got[1] == i and got[3] == k[0]


def test_special_values(gpu):
    n = 300
    rows = np.full((7, n), -np.inf, dtype=np.float32)     # row 0: all -inf -> 0
    rows[1] = np.nan                                      # all NaN -> 0 (NaN counts as -inf)
    rows[2, 0], rows[2, 9] = np.nan, -5.0                 # NaN before the finite maximum
    rows[3, [40, 7, 250]] = np.inf                        # several +inf -> the lowest id
    rows[4] = -1.0
    rows[4, [3, 5]] = [0.0, -0.0]                         # +0 then -0: equal, the lower id
    rows[5] = -1.0
    rows[5, [2, 6]] = [-0.0, 0.0]                         # -0 then +0: equal, the lower id
    rows[6] = np.nan
    rows[6, [100, 120]] = [np.finfo(np.float32).max, np.float32(1e30)]
    got = gpu.argmax_rows(rows)
    assert list(got) == cpu_choice(rows) == [0, 0, 9, 7, 3, 2, 100]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("argmax") / "q8_0-mxfp4.gguf"
    write_gptoss_gguf(p, arch="gpt-oss", n_layer=2, wtype="q8_0", expert_type="mxfp4", seed=8)
    return p


def engine(path, device="cpu", **opts):
    return pyengine.Engine(str(path), n_ctx=128, n_threads=2, device=device, cache_type_k="f32",
                           cache_type_v="f32", **opts)


def test_forward_greedy_returns_the_argmax_of_its_logits(gpu, path):
    """Two sequences per call: greedy ones get the argmax of the logits the same step gives on twin
    caches; all greedy: no logits at all; mixed: the non-greedy row's logits are the plain call's."""
    m, cu = engine(path, "cuda")._model, pyengine.cuda.backend()
    mk = lambda: [cu.CudaKVCache(m, 64, 8, "f32", "f32") for _ in range(2)]  # noqa: E731
    plain, greedy, mixed = mk(), mk(), mk()
    seqs = [prompt(4, seed=30), prompt(4, seed=31)]
    for step in range(4):
        toks = [[s[step]] for s in seqs]
        want = m.forward_seqs(plain, toks, [step] * 2, False, 1)
        none, ids = m.forward_seqs(greedy, toks, [step] * 2, False, 1, [True, True])
        assert none is None and list(ids) == cpu_choice(want)
        rows, ids = m.forward_seqs(mixed, toks, [step] * 2, False, 1, [True, False])
        assert ids[0] == GREEDY.sample(want[0]) and np.array_equal(rows[1], want[1])
    with pytest.raises(ValueError):
        m.forward_seqs(plain, [[1], [2]], [4, 4], True, 1, [True, True])


class Spy:
    """A model that records what forward_seqs was asked (greedy flags) and returned (logits or not)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_seqs(self, *args):
        out = self.model.forward_seqs(*args)
        self.calls.append((args[5] if len(args) > 5 else None, out))
        return out


class Tok:
    """What pyengine.core needs of a tokenizer for raw completions (the test file has no real one)."""
    eog_ids, special_tokens = (), {}

    def token_to_piece(self, token):
        return b"x"


def generate(runner, reqs):
    """Every request run to its end together (one batched forward pass per step); their token ids."""
    core = Core(runner, Tok())
    model = getattr(runner.model, "model", runner.model)  # caches belong to the model, not the Spy
    seqs = [core.start(Cache(runner.cache_type(model, 128, runner.n_batch), 128), r) for r in reqs]
    while not all(s.done for s in seqs):
        core.step([s for s in seqs if not s.done])
    return [[e.id for e in s.sampled] for s in seqs]


def requests(**params):
    return [Request(prompt(6, seed=5 + i), SamplingParams(**p), max_tokens=32, stop_token_ids=[], logprobs=lp)
            for i, (p, lp) in enumerate(params["reqs"])]


def test_greedy_generation_identical_and_only_ids_come_back(gpu, path):
    """32 greedy tokens on the GPU equal the CPU engine's, for a sequence alone and for a batch of a
    plain greedy sequence and one with logprobs (which needs its logits); a greedy step without
    logprobs downloaded no logits. A penalty or a sampled request still gets logits."""
    cpu, dev = engine(path), engine(path, "cuda")
    spy = dev.runner.model = Spy(dev.runner.model)
    alone = dict(reqs=[({"temperature": 0.0}, None)])
    want = generate(cpu.runner, requests(**alone))
    assert len(set(want[0])) > 4
    assert generate(dev.runner, requests(**alone)) == want
    assert len(spy.calls) == 32 and all(g == [True] and out[0] is None for g, out in spy.calls)
    spy.calls.clear()
    mixed = dict(reqs=[({"temperature": 0.0}, None), ({"temperature": 0.0}, 2)])
    assert generate(dev.runner, requests(**mixed)) == generate(cpu.runner, requests(**mixed))
    assert any(g == [True, False] and out[0] is not None for g, out in spy.calls)
    spy.calls.clear()
    other = dict(reqs=[({"temperature": 0.0, "repeat_penalty": 1.3}, None), ({"temperature": 1.0, "seed": 1}, None)])
    assert generate(dev.runner, requests(**other)) == generate(cpu.runner, requests(**other))
    assert spy.calls and all(g is None for g, _ in spy.calls)


def pinned(a):
    """Whether array a's memory is a pinned buffer of the CUDA model (a view of a view of one)."""
    while isinstance(a, np.ndarray):
        a = a.base
    return type(a).__name__ == "PinnedBuf"


def test_decode_logits_are_pinned_and_never_overwritten_while_held(gpu, path):
    dev = engine(path, "cuda")
    m, cu = dev._model, pyengine.cuda.backend()
    cache = cu.CudaKVCache(m, 64, 8, "f32", "f32")
    toks = prompt(8, seed=2)
    held = [m.forward(cache, [t], i, False, 1) for i, t in enumerate(toks[:3])]
    copies = [h.copy() for h in held]
    assert all(pinned(h) for h in held)
    addrs = {h.__array_interface__["data"][0] for h in held}
    assert len(addrs) == 3                                   # each held result has its own buffer
    for i, t in enumerate(toks[3:6], 3):
        m.forward(cache, [t], i, False, 1)                   # dropped at once: buffers come back
    assert all(np.array_equal(h, c) for h, c in zip(held, copies))
    del held
    again = m.forward(cache, [toks[6]], 6, False, 1)
    assert again.__array_interface__["data"][0] in addrs    # a released buffer is reused
    assert pinned(again)
    big = m.forward(cu.CudaKVCache(m, 64, 16, "f32", "f32"), toks, 0, True, 1)  # 8 rows: still pinned
    assert big.shape == (8, m.n_vocab) and pinned(big)
