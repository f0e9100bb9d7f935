"""CUDA per-vector kernels and attention (csrc/cuda/ops_cuda.cu, attention_cuda.cu) against the CPU
kernels of pyengine._model and float64 numpy, on every CUDA backend: the CPU emulator always, the real
GPU where one is present."""


import numpy as np
import pytest
from cuda_backends import BACKENDS
from test_forward_kernels import attention_ref

from pyengine import _model as K

RNG = np.random.default_rng(20261127)
backends = pytest.mark.parametrize("cu", BACKENDS)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def f32(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


@backends
@pytest.mark.parametrize("n_rows,n", [(37, 64), (9, 100), (3, 2880)])
def test_rmsnorm(cu, n_rows, n):
    x, g = f32(n_rows, n, scale=3.0), f32(n)
    x64 = x.astype(np.float64)
    ref = g * x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5)
    out = cu.rmsnorm(x, g, 1e-5)
    assert rel(out, ref) < 1e-6
    np.testing.assert_allclose(out, K.rmsnorm(x, g, 1e-5), rtol=3e-7, atol=1e-30)
    assert np.array_equal(cu.rmsnorm(x, g, 1e-5, in_place=True), out)


@backends
def test_swiglu_rows_of_stacked_gate_and_up(cu):
    gu = f32(5, 2 * 37, scale=6.0)
    want = np.stack([K.swiglu_oai(r[:37], r[37:]) for r in gu])
    # the CPU's AVX-512 loop has its own e^x (csrc/vexp_avx512.h): equal to a few ulps, not bit for bit
    np.testing.assert_allclose(cu.swiglu_oai_rows(gu), want, rtol=1e-6, atol=1e-7)


@backends
@pytest.mark.parametrize("n_rows,n", [(1, 2880), (3, 100)])
def test_add_rmsnorm_is_add_then_rmsnorm(cu, n_rows, n):
    x, t, g = f32(n_rows, n, scale=3.0), f32(n_rows, n), f32(n)
    s, out = cu.add_rmsnorm(x, t, g, 1e-5)
    assert np.array_equal(s, x + t)
    assert np.array_equal(out, cu.rmsnorm(x + t, g, 1e-5))


@backends
@pytest.mark.parametrize("head_dim,yarn", [(16, False), (64, True)])
def test_rope_strided_rows_far_positions(cu, head_dim, yarn):
    n_heads, extra = 3, 5  # rows of a fused buffer: the columns after the rotated heads stay untouched
    omega, m = K.rope_freqs(head_dim, 150000.0, yarn, 32.0, 4096.0, 32.0, 1.0)
    pos = np.array([0, 1, 7, 130, 999, 4100, 131071], dtype=np.int64)
    x = f32(len(pos), n_heads * head_dim + extra)
    out = cu.rope(x, n_heads, head_dim, pos, omega, m)
    assert np.array_equal(out[:, n_heads * head_dim:], x[:, n_heads * head_dim:])
    heads = x[:, : n_heads * head_dim].reshape(len(pos), n_heads, head_dim)
    got = out[:, : n_heads * head_dim].reshape(heads.shape)
    half = head_dim // 2
    a = pos[:, None, None] * omega
    c, s = m * np.cos(a), m * np.sin(a)
    x1, x2 = heads[..., :half].astype(np.float64), heads[..., half:].astype(np.float64)
    assert rel(got, np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)) < 1e-6
    np.testing.assert_allclose(got, K.rope(heads, pos, omega, m), rtol=1e-6, atol=1e-7)


@backends
@pytest.mark.parametrize("n_expert,k,ties", [(32, 4, False), (128, 4, True), (7, 7, True), (256, 3, False),
                                             (40, 1, True)])
def test_router_topk_softmax(cu, n_expert, k, ties):
    n_rows = 13
    if ties:  # few distinct values: the lower index must win every tie
        logits = RNG.integers(-2, 3, (n_rows, n_expert)).astype(np.float32)
    else:
        logits = f32(n_rows, n_expert, scale=2.0)
    sel, wts = cu.router(logits, k)
    for r in range(n_rows):
        assert list(sel[r]) == list(K.topk(logits[r], k))
        assert list(sel[r]) == list(np.argsort(-logits[r], kind="stable")[:k])
    v = np.take_along_axis(logits, sel, 1).astype(np.float64)
    ref = np.exp(v - v.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(wts, ref, rtol=1e-6, atol=1e-7)


@backends
def test_swiglu_oai_and_add(cu):
    n = 1000 + 3
    g = np.concatenate([RNG.standard_normal(n - 3) * 5, [8.0, -30.0, 7.5]]).astype(np.float32)
    u = np.concatenate([RNG.standard_normal(n - 3) * 5, [9.0, -9.0, 0.5]]).astype(np.float32)
    g64, u64 = np.minimum(g.astype(np.float64), 7), np.clip(u.astype(np.float64), -7, 7)
    out = cu.swiglu_oai(g, u)
    np.testing.assert_allclose(out, g64 / (1 + np.exp(-1.702 * g64)) * (u64 + 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, K.swiglu_oai(g, u), rtol=1e-6, atol=1e-7)
    x, t = f32(777), f32(777)
    assert np.array_equal(cu.add(x, t), x + t)


@backends
def test_gather_scatter_rows(cu):
    src = f32(29, 67)
    idx = RNG.integers(0, 29, 41).astype(np.int32)  # repeats allowed when gathering
    assert np.array_equal(cu.gather_rows(src, idx), src[idx])
    dst, rows = f32(50, 67), f32(23, 67)
    perm = RNG.permutation(50)[:23].astype(np.int32)
    ref = dst.copy()
    ref[perm] = rows
    assert np.array_equal(cu.scatter_rows(dst, rows, perm), ref)
    with pytest.raises(ValueError):
        cu.gather_rows(src, np.array([0, 29], np.int32))
    with pytest.raises(ValueError):
        cu.scatter_rows(dst, rows[:2], np.array([-1, 3], np.int32))


@backends
def test_moe_combine_rank_order(cu):
    n_tok, k, d = 7, 4, 333
    slots, wts = f32(n_tok * k, d), RNG.random((n_tok, k)).astype(np.float32)
    y = cu.moe_combine(slots, wts)
    s = slots.reshape(n_tok, k, d)
    ref = np.einsum("tk,tkd->td", wts.astype(np.float64), s.astype(np.float64))
    assert rel(y, ref) < 1e-6
    acc = np.zeros((n_tok, d), np.float32)  # pe_moe_forward's order: from 0, rank by rank
    for r in range(k):
        acc += wts[:, r:r + 1] * s[:, r]
    np.testing.assert_allclose(y, acc, rtol=1e-6, atol=1e-6)


@backends
def test_kv_store_ring_wraps(cu):
    n_slots, kv_dim, ld = 10, 24, 9 + 24 + 4
    kc, vc = f32(n_slots, kv_dim), f32(n_slots, kv_dim)
    rows = f32(7, ld)  # k at column 2, v at column 9 of each row
    pos = np.arange(95, 102, dtype=np.int64)  # slots 5..9 then 0..1
    got_k, got_v = cu.kv_store(kc, vc, rows, 2, 9, pos, kv_dim)
    ref_k, ref_v = kc.copy(), vc.copy()
    ref_k[pos % n_slots], ref_v[pos % n_slots] = rows[:, 2:2 + kv_dim], rows[:, 9:9 + kv_dim]
    assert np.array_equal(got_k, ref_k) and np.array_equal(got_v, ref_v)


def run_attention(cu, pos, n_slots, H, Hkv, hd, window, max_keys=None, extra=0):
    """Fills a ring cache with the keys before the batch, stores the batch's own k/v with kv_store from
    fused q|k|v rows (ld = q_dim + 2 kv_dim + extra), then attends; returns (out, q, k, v, sinks)."""
    n_tok, n_pos = len(pos), int(pos.max()) + 1
    q, k, v = f32(n_tok, H, hd), f32(n_pos, Hkv, hd), f32(n_pos, Hkv, hd)
    sinks = f32(H, scale=2.0)
    kv_dim, q_dim = Hkv * hd, H * hd
    kc, vc = np.zeros((n_slots, kv_dim), np.float32), np.zeros((n_slots, kv_dim), np.float32)
    batch = set(pos.tolist())
    for j in range(n_pos):
        if j not in batch:
            kc[j % n_slots], vc[j % n_slots] = k[j].ravel(), v[j].ravel()
    fused = np.concatenate([q.reshape(n_tok, q_dim), k[pos].reshape(n_tok, kv_dim), v[pos].reshape(n_tok, kv_dim),
                            f32(n_tok, extra)], axis=1)
    kc, vc = cu.kv_store(kc, vc, fused, q_dim, q_dim + kv_dim, pos, kv_dim)
    if max_keys is None:
        max_keys = int(max(p + 1 - (max(0, p - window + 1) if window else 0) for p in pos))
    ldo = q_dim + 3
    out = cu.attention(fused, pos, kc, vc, H, Hkv, hd, window, sinks, max_keys, ldo=ldo)
    assert not out[:, q_dim:].any()  # columns past the heads are not written
    return out[:, :q_dim].reshape(n_tok, H, hd), q, k, v, sinks


ATTENTION_CASES = {
    # name: (positions, n_slots, H, Hkv, head_dim, window, max_keys or None = exact)
    "decode_full_4chunks": (np.array([200]), 256, 4, 2, 16, 0, None),
    "decode_window_ring_far": (np.array([5000]), 128, 4, 2, 16, 128, None),
    "decode_gptoss_shape": (np.array([90]), 128, 8, 1, 64, 0, None),
    "decode_window_hd64": (np.array([300]), 133, 8, 1, 64, 128, None),
    "prefill_full": (np.arange(93, 100), 100, 4, 2, 16, 0, None),
    "prefill_from_zero": (np.arange(0, 7), 7, 4, 2, 16, 0, None),
    "prefill_window_ring_wraps": (np.arange(1000, 1007), 5 - 1 + 7, 4, 2, 16, 5, None),
    "prefill_window_wider_than_context": (np.arange(20, 27), 40, 4, 4, 16, 64, None),
    "max_keys_overestimated": (np.array([39]), 40, 4, 2, 16, 0, 1000),
    "max_keys_underestimated": (np.array([200]), 201, 4, 2, 16, 0, 130),
    "window_3_ring_3": (np.array([77]), 3, 4, 2, 16, 3, None),
    "head_dim_24": (np.arange(70, 73), 73, 6, 3, 24, 0, None),
    "head_dim_256": (np.array([150]), 151, 2, 1, 256, 0, None),
    "gqa_group_12_hd136": (np.arange(60, 62), 62, 12, 1, 136, 0, None),
    "gqa_group_7": (np.array([99]), 100, 14, 2, 16, 0, None),
    "gptoss_heads_prefill_window": (np.arange(200, 207), 128 - 1 + 7, 64, 8, 64, 128, None),
    "gptoss_heads_decode_full": (np.array([700]), 701, 64, 8, 64, 0, None),
}


@backends
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_cpu_and_float64(cu, case):
    pos, n_slots, H, Hkv, hd, window, max_keys = ATTENTION_CASES[case]
    pos = pos.astype(np.int64)
    out, q, k, v, sinks = run_attention(cu, pos, n_slots, H, Hkv, hd, window, max_keys, extra=2)
    assert rel(out, attention_ref(q, k, v, sinks, pos, window)) < 2e-6  # measured ~1.5e-7 (emulator)
    cpu = K.attention(q, k, v, sinks, int(pos[0]), window, n_slots)
    assert rel(out, cpu) < 2e-6


@backends
def test_attention_tokens_at_unrelated_positions(cu):
    pos = np.array([17, 3, 64, 0, 40], dtype=np.int64)  # each token attends its own prefix
    out, q, k, v, sinks = run_attention(cu, pos, 65, 4, 2, 16, 0)
    assert rel(out, attention_ref(q, k, v, sinks, pos, 0)) < 2e-6
    out, q, k, v, sinks = run_attention(cu, pos, 65, 4, 2, 16, 9)
    assert rel(out, attention_ref(q, k, v, sinks, pos, 9)) < 2e-6


@backends
def test_attention_scratch_and_chunks(cu):
    # one chunk per 64 keys at most, and enough chunks to fill the GPU when there are few pairs
    assert cu.attention_scratch_floats(1, 4, 16, 200) == 4 * 4 * (16 + 2)
    assert cu.attention_scratch_floats(1, 64, 64, 8192) == 64 * 33 * (64 + 2)
    assert cu.attention_scratch_floats(512, 64, 64, 8192) == 512 * 64 * (64 + 2)
    with pytest.raises(ValueError):
        cu.attention(f32(1, 16), np.array([0]), f32(4, 16), f32(4, 16), 1, 1, 16, 0, f32(1), 0)
