"""The forward pass's C kernels against float64 numpy (and transformers' rotary embedding)."""

import math

import numpy as np
import pytest

from pyengine import _model as K
from simd_levels import LOWER, at_level

RNG = np.random.default_rng(1234)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_rmsnorm_matches_float64():
    x = RNG.standard_normal((5, 96)).astype(np.float32) * 3
    g = RNG.standard_normal(96).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = g * x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5)
    assert rel(K.rmsnorm(x, g, 1e-5), ref) < 1e-6


def yarn_omega_ref(d, base, factor, orig, beta_fast, beta_slow):
    """YaRN frequencies written from the paper's formulas (fractional correction range)."""
    def corr(beta):
        return d * math.log(orig / (beta * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(corr(beta_fast), 0.0), min(corr(beta_slow), d - 1.0)
    i = np.arange(d // 2, dtype=np.float64)
    ramp = np.clip((i - low) / (high - low), 0, 1)
    omega = base ** (-2 * i / d)
    return omega / factor * ramp + omega * (1 - ramp), 0.1 * math.log(factor) + 1


def test_rope_yarn_frequencies_gpt_oss_config():
    omega, m = K.rope_freqs(64, 150000.0, True, 32.0, 4096.0, 32.0, 1.0)
    ref, m_ref = yarn_omega_ref(64, 150000.0, 32.0, 4096.0, 32.0, 1.0)
    np.testing.assert_allclose(omega, ref, rtol=1e-13)
    assert m == pytest.approx(1.3465735902799727, rel=1e-12) and m == pytest.approx(m_ref)
    plain, m1 = K.rope_freqs(64, 10000.0, False, 1.0, 1.0, 32.0, 1.0)
    np.testing.assert_allclose(plain, 10000.0 ** (-np.arange(32) / 32), rtol=1e-13)
    assert m1 == 1.0


def test_rope_matches_transformers_rotary_embedding():
    torch = pytest.importorskip("torch")
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    from transformers import GptOssConfig

    hd, heads = 64, 3
    cfg = GptOssConfig(hidden_size=128, num_attention_heads=heads, head_dim=hd, max_position_embeddings=131072,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                        "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                                        "beta_slow": 1.0, "truncate": False})
    rot = gpt_oss.GptOssRotaryEmbedding(cfg)
    pos = np.array([0, 1, 7, 130, 999, 4100], dtype=np.int64)
    x = RNG.standard_normal((len(pos), heads, hd)).astype(np.float32)
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1), torch.tensor(pos)[None])
    cos, sin = cos[0].double().numpy()[:, None, :], sin[0].double().numpy()[:, None, :]
    x1, x2 = x[..., : hd // 2].astype(np.float64), x[..., hd // 2:].astype(np.float64)
    ref = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    omega, m = K.rope_freqs(hd, 150000.0, True, 32.0, 4096.0, 32.0, 1.0)
    out = K.rope(x, pos, omega, m)
    assert rel(out, ref) < 5e-5  # transformers forms the angle p * omega in float32
    a = pos[:, None, None] * omega
    c, s = m * np.cos(a), m * np.sin(a)
    assert rel(out, np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)) < 1e-6


def attention_ref(q, k, v, sinks, positions, window):
    """float64 attention of q (n_tok, H, hd) at the given positions over k, v (positions, Hkv, hd),
    with per-head sinks and an optional sliding window (shared with the CUDA tests)."""
    _, H, hd = q.shape
    group = H // k.shape[1]
    out = np.zeros(q.shape)
    for t, p in enumerate(positions):
        lo = max(0, p - window + 1) if window else 0
        for h in range(H):
            z = k[lo:p + 1, h // group].astype(np.float64) @ q[t, h] / math.sqrt(hd)
            mx = max(z.max(), sinks[h])
            e = np.exp(z - mx)
            out[t, h] = e @ v[lo:p + 1, h // group] / (e.sum() + math.exp(sinks[h] - mx))
    return out


@pytest.mark.parametrize("window,n_slots", [(0, 40), (5, 5 - 1 + 9), (5, 40), (64, 40)])
def test_attention_sinks_gqa_window(window, n_slots):
    pos0, n_tok, H, Hkv, hd = 31, 9, 4, 2, 16
    q = RNG.standard_normal((n_tok, H, hd)).astype(np.float32)
    k = RNG.standard_normal((pos0 + n_tok, Hkv, hd)).astype(np.float32)
    v = RNG.standard_normal((pos0 + n_tok, Hkv, hd)).astype(np.float32)
    sinks = RNG.standard_normal(H).astype(np.float32) * 2
    out = K.attention(q, k, v, sinks, pos0, window, n_slots)
    assert rel(out, attention_ref(q, k, v, sinks, range(pos0, pos0 + q.shape[0]), window)) < 1e-5
    assert np.array_equal(out, K.attention(q, k, v, sinks, pos0, window, n_slots, n_threads=2))


def test_swiglu_oai_clamps():
    g = np.concatenate([RNG.standard_normal(200) * 5, [8.0, -30.0, 7.5]]).astype(np.float32)
    u = np.concatenate([RNG.standard_normal(200) * 5, [9.0, -9.0, 0.5]]).astype(np.float32)
    g64, u64 = np.minimum(g.astype(np.float64), 7), np.clip(u.astype(np.float64), -7, 7)
    ref = g64 / (1 + np.exp(-1.702 * g64)) * (u64 + 1)
    np.testing.assert_allclose(K.swiglu_oai(g, u), ref, rtol=1e-5, atol=1e-6)


def check_swiglu_accuracy() -> None:
    """SwiGLU over the whole range its exponential sees (g down to -60: e^102) and past the clamps,
    against float64: within a few float32 ulps of the result (the AVX-512 loop's own e^x, ops_avx512.c,
    or expf); NaN in g clamps to 7, NaN in u stays NaN; 1 thread = 3 threads bit for bit (a prefill's
    length is split between threads)."""
    rng = np.random.default_rng(5)
    n = 300_001  # > 4 chunks of 16384: threaded, and a tail of one
    g = np.concatenate([rng.uniform(-60, 9, n - 4), [np.nan, 1.0, -0.0, 7.0]]).astype(np.float32)
    u = np.concatenate([rng.uniform(-9, 9, n - 4), [0.5, np.nan, 2.0, -8.0]]).astype(np.float32)
    g32 = np.minimum(np.nan_to_num(g, nan=7.0), np.float32(7))
    g64, u64 = g32.astype(np.float64), np.clip(u.astype(np.float64), -7, 7)
    # the exponent as float32 computes it (-1.702 g rounds to ~6e-8 relative, which e^x turns into up to
    # ~4e-6 at g = -60 in any float32 implementation); the rest in float64
    ref = g64 / (1 + np.exp((np.float32(-1.702) * g32).astype(np.float64))) * (u64 + 1)
    got = K.swiglu_oai(g, u)
    ok = ~np.isnan(ref)
    assert np.isnan(got[n - 3]) and not np.isnan(got[n - 4])
    err = np.abs(got[ok] - ref[ok]) / np.maximum(np.abs(ref[ok]), 1e-30)
    assert err[np.abs(ref[ok]) > 1e-30].max() < 4e-7
    assert np.array_equal(got, K.swiglu_oai(g, u, n_threads=3), equal_nan=True)


def test_swiglu_accuracy_and_threads():
    check_swiglu_accuracy()


@pytest.mark.parametrize("level", LOWER)
def test_swiglu_at_lower_simd_levels(level, tmp_path):
    """The expf loop that machines without AVX-512 take."""
    at_level(level, "test_forward_kernels", "check_swiglu_accuracy()", cwd=tmp_path)


def test_topk_order():
    x = RNG.standard_normal(32).astype(np.float32)
    assert list(K.topk(x, 4)) == list(np.argsort(-x)[:4])


def float_rows(w, ty):
    if ty == 0:
        return w.astype(np.float32), w.astype(np.float32).view(np.uint8)
    if ty == 1:
        h = w.astype(np.float16)
        return h.astype(np.float32), h.view(np.uint8)
    b = (w.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # bf16 by truncation
    return (b.astype(np.uint32) << 16).view(np.float32), b.view(np.uint8)


@pytest.mark.parametrize("ty", [0, 1, 30])
def test_matmul_float_types_strided(ty):
    n_in, n_out, n_tok = 96, 37, 5
    w = RNG.standard_normal((2 * n_out, n_in)).astype(np.float32)
    wf, raw = float_rows(w, ty)
    rows = raw[::2]  # every other row: a strided view, like Ollama's interleaved gate/up
    assert not rows.flags.c_contiguous
    x = RNG.standard_normal((n_tok, n_in)).astype(np.float32)
    b = RNG.standard_normal(n_out).astype(np.float32)
    ref = x.astype(np.float64) @ wf[::2].T.astype(np.float64) + b
    y = K.matmul(rows, ty, n_in, x, b)
    assert rel(y, ref) < 1e-6
    assert np.array_equal(y, K.matmul(rows, ty, n_in, x, b, n_threads=2))
    y1 = K.matmul(rows, ty, n_in, x[2:3], b)
    assert rel(y1, ref[2:3]) < 1e-6


def test_matmul_expert_stride():
    E, n_out, n_in = 3, 20, 64
    w = RNG.standard_normal((E, n_out, n_in)).astype(np.float32)
    x = RNG.standard_normal((4, n_in)).astype(np.float32)
    raw = w.view(np.uint8)
    for e in range(E):
        assert rel(K.matmul(raw, 0, n_in, x, expert=e), x.astype(np.float64) @ w[e].T) < 1e-6


def test_matmul_rejects_bad_views():
    raw = np.zeros((4, 40), np.uint8)
    with pytest.raises(ValueError):
        K.matmul(raw, 0, 12, np.ones((1, 12), np.float32))  # 12 f32 = 48 bytes, not 40
    with pytest.raises(ValueError):
        K.matmul(raw, 77, 10, np.ones((1, 10), np.float32))  # unknown type
    with pytest.raises(ValueError):
        K.matmul(raw, 0, 10, np.ones((1, 9), np.float32))


def moe_ref(x, rw, rb, gw, gb, uw, ub, dw, db, k):
    x = x.astype(np.float64)
    out = np.zeros_like(x)
    for t in range(len(x)):
        logits = rw @ x[t] + rb
        sel = np.argsort(-logits, kind="stable")[:k]
        w = np.exp(logits[sel] - logits[sel].max())
        w /= w.sum()
        for e, we in zip(sel, w):
            g = np.minimum(gw[e] @ x[t] + gb[e], 7)
            u = np.clip(uw[e] @ x[t] + ub[e], -7, 7)
            h = g / (1 + np.exp(-1.702 * g)) * (u + 1)
            out[t] += we * (dw[e] @ h + db[e])
    return out


def test_moe_grouping_matches_per_token_reference():
    E, D, F, k, n = 6, 32, 48, 2, 11

    def r(*s):
        return RNG.standard_normal(s).astype(np.float32)

    args = [r(E, D), r(E), r(E, F, D) * 0.3, r(E, F), r(E, F, D) * 0.3, r(E, F), r(E, D, F) * 0.3, r(E, D)]
    x = r(n, D)
    y = K.moe(x, *args, k)
    assert rel(y, moe_ref(x, *[a.astype(np.float64) for a in args], k)) < 1e-5
    assert np.array_equal(y, K.moe(x, *args, k, n_threads=2))
    one = np.concatenate([K.moe(x[i:i + 1], *args, k) for i in range(n)])
    assert np.array_equal(y, one)  # f32 weights: batch grouping and one-token calls agree exactly


def test_rope_yarn_truncated_range_like_llama_cpp():
    omega, _ = K.rope_freqs(64, 150000.0, True, 32.0, 4096.0, 32.0, 1.0, truncate=True)
    base = 150000.0 ** (-np.arange(32) / 32)
    ramp = np.clip((np.arange(32) - 8.0) / (18.0 - 8.0), 0, 1)  # [floor(8.09), ceil(17.40)]
    np.testing.assert_allclose(omega, base / 32 * ramp + base * (1 - ramp), rtol=1e-13)
