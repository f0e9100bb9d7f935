"""The fused router (csrc/cuda/router_cuda.cu: product, bias, top-k and softmax in one launch) against
the two launches it replaces (pe_cu_matvec + pe_cu_router: the same bits) and a float64 reference with
csrc/moe.c's selection order (largest first, ties to the lower expert), for the float router types."""

import numpy as np
import pytest

from cuda_backends import BACKENDS

F32, F16, BF16 = 0, 1, 30


@pytest.fixture(params=BACKENDS)  # pytest.param objects: the real backend keeps its cuda mark
def cu(request):
    return request.param


def encode(w, t):
    """(uint8 rows, the float32 values they hold) of float32 weights w in ggml type t."""
    if t == F32:
        return w.view(np.uint8), w
    if t == F16:
        h = w.astype(np.float16)
        return h.view(np.uint8), h.astype(np.float32)
    b = (w.view(np.uint32) >> 16).astype(np.uint16)
    return b.view(np.uint8), (b.astype(np.uint32) << 16).view(np.float32)


def reference(wf, x, bias, k):
    logits = x.astype(np.float64) @ wf.astype(np.float64).T + bias
    sel = np.array([sorted(range(len(r)), key=lambda e: (-r[e], e))[:k] for r in logits], dtype=np.int32)
    top = np.take_along_axis(logits, sel, axis=1)
    p = np.exp(top - top.max(axis=1, keepdims=True))
    return sel, p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("t", [F32, F16, BF16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("n_expert,n_in,n_rows", [(32, 96, 1), (32, 200, 3), (128, 64, 8)])
def test_fused_router_matches_two_launches_and_float64(cu, t, n_expert, n_in, n_rows):
    rng = np.random.default_rng(n_expert + n_in + t)
    data, wf = encode(rng.standard_normal((n_expert, n_in)).astype(np.float32), t)
    x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    bias = rng.standard_normal(n_expert).astype(np.float32) * 0.1
    sel, wts = cu.router_fused(data, t, n_in, x, bias, 4)
    two_sel, two_wts = cu.router(cu.matmul_matvec(data, t, n_in, x, bias[None]), 4)
    assert np.array_equal(sel, two_sel) and np.array_equal(wts, two_wts)
    ref_sel, ref_wts = reference(wf, x, bias, 4)
    assert np.array_equal(sel, ref_sel)
    assert np.allclose(wts, ref_wts, rtol=1e-5, atol=1e-7)


def test_ties_go_to_the_lower_expert(cu):
    """Experts with identical rows give equal logits: ranks in expert order, equal weights."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 64)).astype(np.float32) * 0.1
    x = np.abs(rng.standard_normal((2, 64))).astype(np.float32)
    w[[29, 4, 17]] = 1.0          # the three largest, equal
    w[[30, 9]] = 0.9              # the next two, equal
    sel, wts = cu.router_fused(w.view(np.uint8), F32, 64, x, None, 4)
    assert sel.tolist() == [[4, 17, 29, 9]] * 2
    assert wts[0, 0] == wts[0, 1] == wts[0, 2] > wts[0, 3]
    assert np.array_equal(sel, reference(w, x, np.zeros(32), 4)[0])


def test_rejects_what_it_cannot_run(cu):
    w = np.zeros((32, 64), np.float32).view(np.uint8)
    x = np.ones((1, 64), np.float32)
    assert cu.router_fused_supported(F32, 32) and not cu.router_fused_supported(8, 32)  # Q8_0: two launches
    assert not cu.router_fused_supported(F32, 257)
    with pytest.raises(ValueError):
        cu.router_fused(w, F32, 64, x, None, 33)
