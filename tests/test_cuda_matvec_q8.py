"""The int8-activation decode kernels of the CUDA backend (csrc/cuda/matvec_q8_cuda.cu): the activations
quantized on the GPU bit for bit as the CPU's pe_act_q8, the RMSNorm that quantizes its output, the dp4a
products of re-laid Q8_0 / MXFP4 weights (plain, batched, per-row experts), and the fused MoE (gate|up
with SwiGLU, down with the weighted sum) against float64 on the same quantized activations."""

import numpy as np
import pytest

from cuda_backends import BACKENDS
from test_cuda_matmul import dequant64, padded_weights
from test_quants import T

from pyengine._quants import quantize_act_q8

# |y - y64| / (|xq| . |W| + |b|): the integer sums are exact, what is left is float32 rounding of the
# per-chunk scale products and their sum (measured ~1e-7 in the emulator)
REL_TOL = 2e-6
Q8_TYPES = [T.Q8_0, T.MXFP4]


def rows(rng, n_rows, n):
    """Random rows with block magnitudes spread over 2^-6 .. 2^6 (each block its own scale)."""
    x = rng.standard_normal((n_rows, n)) * np.exp2(rng.integers(-6, 7, (n_rows, n // 32))).repeat(32, axis=1)
    return x.astype(np.float32)


def dequant_act(x: np.ndarray) -> np.ndarray:
    """float64 of the CPU's two-digit int8 activations of each row: (q + ql / 254) * d."""
    out = []
    for r in x:
        a = quantize_act_q8(r)
        out.append((a["qs"] + a["ql"] / 254.0) * np.repeat(a["d"].astype(np.float64), 32))
    return np.array(out)


def check(y, xq64, w64, b, what):
    """y (n_rows, n_out) against xq64[i] . w64[i].T + b[i] in float64."""
    ref = np.einsum("ik,irk->ir", xq64, w64) + b
    bound = np.einsum("ik,irk->ir", np.abs(xq64), np.abs(w64)) + np.abs(b) + 1e-30
    rel = float((np.abs(y.astype(np.float64) - ref) / bound).max())
    assert np.isfinite(y).all() and rel <= REL_TOL, (what, rel)


@pytest.mark.parametrize("cu", BACKENDS)
def test_activations_bit_identical_to_cpu(cu):
    rng = np.random.default_rng(1)
    x = rows(rng, 5, 320)
    x[2, 64:96] = 0.0                      # an all-zero block: scale 0, codes 0
    x[3, 5] = 127.5 * (np.abs(x[3, :32]).max() / 127.0)  # a value on a rounding tie of its own block
    got = cu.act_q8(x)
    for i in range(x.shape[0]):
        want = quantize_act_q8(x[i])
        for k in ("qs", "ql", "d"):
            assert np.array_equal(got[k][i], want[k]), (i, k)


@pytest.mark.parametrize("cu", BACKENDS)
def test_rmsnorm_quantizes_its_output(cu):
    rng = np.random.default_rng(2)
    x, t = rows(rng, 3, 2880), rows(rng, 3, 2880)
    g = rng.standard_normal(2880).astype(np.float32)
    for out, x_after, q, want_out, want_x in (
            cu.rmsnorm_q8(x, g, 1e-5) + (cu.rmsnorm(x, g, 1e-5), x),
            cu.rmsnorm_q8(x, g, 1e-5, t) + cu.add_rmsnorm(x, t, g, 1e-5)[::-1]):
        assert np.array_equal(out, want_out)   # the float output is the plain kernel's, bit for bit
        assert np.array_equal(x_after, want_x)
        for i in range(3):
            want = quantize_act_q8(out[i])
            assert all(np.array_equal(q[k][i], want[k]) for k in ("qs", "ql", "d"))


@pytest.mark.parametrize("cu", BACKENDS)
@pytest.mark.parametrize("qtype", Q8_TYPES, ids=lambda t: t.name)
def test_matvec_plain_and_batched(cu, qtype):
    rng = np.random.default_rng(10 + int(qtype))
    n_in, n_out = 320, 37                  # 10 blocks (not a multiple of the warp's 32 chunks); odd rows
    data = padded_weights(qtype, 1, n_out, n_in, rng)[0]
    w64 = dequant64(data, qtype)
    b = rng.standard_normal(n_out).astype(np.float32)
    for n_rows in (1, 2, 3, 8, 11):        # batch widths 1, 2, 4 (one idle), 8, and 8 + 3
        x = rows(rng, n_rows, n_in)
        y = cu.matvec_q8(data, int(qtype), n_in, x, b[None, :])
        check(y, dequant_act(x), np.broadcast_to(w64, (n_rows,) + w64.shape), b, f"rows={n_rows}")
    y = cu.matvec_q8(data, int(qtype), n_in, x)
    check(y, dequant_act(x), np.broadcast_to(w64, (x.shape[0],) + w64.shape), np.zeros(n_out), "no bias")


@pytest.mark.parametrize("cu", BACKENDS)
@pytest.mark.parametrize("qtype", Q8_TYPES, ids=lambda t: t.name)
def test_matvec_per_row_experts(cu, qtype):
    rng = np.random.default_rng(20 + int(qtype))
    n_in, n_out, n_exp = 1088, 13, 3       # 34 blocks: lanes take 1 or 2 chunks
    data = padded_weights(qtype, n_exp, n_out, n_in, rng, odd=False)
    w64 = dequant64(data, qtype)
    b = rng.standard_normal((n_exp, n_out)).astype(np.float32)
    experts = np.array([2, 0, 1, 2, 2, 0, 1], dtype=np.int32)
    x = rows(rng, 7, n_in)
    y = cu.matvec_q8(data, int(qtype), n_in, x, b, experts)
    check(y, dequant_act(x), w64[experts], b[experts], "experts")
    y = cu.matvec_q8(data, int(qtype), n_in, x[:1], b, experts, broadcast=True)  # one token's pairs
    check(y, np.repeat(dequant_act(x[:1]), 7, axis=0), w64[experts], b[experts], "broadcast")


def swiglu64(g, u):
    g = np.minimum(g, 7.0)
    u = np.clip(u, -7.0, 7.0)
    return g / (1.0 + np.exp(-1.702 * g)) * (u + 1.0)


@pytest.mark.parametrize("cu", BACKENDS)
@pytest.mark.parametrize("qtype", Q8_TYPES, ids=lambda t: t.name)
def test_fused_moe(cu, qtype):
    rng = np.random.default_rng(30 + int(qtype))
    D, F, E, k, n_tok = 192, 96, 5, 3, 2
    gate_up = padded_weights(qtype, E, 2 * F, D, rng, e8m0=(118, 122), odd=False)
    down = padded_weights(qtype, E, D, F, rng, e8m0=(118, 122), odd=False)
    if qtype == T.Q8_0:                    # f16 scales near 2^-9 (as e8m0 118..122): products in SwiGLU's range
        for wt in (gate_up, down):
            blocks = wt.reshape(wt.shape[:2] + (-1, 34))
            scales = (rng.uniform(0.5, 1.0, blocks.shape[:3]) / 512).astype(np.float16)
            blocks[..., :2] = scales[..., None].view(np.uint8)
    gu64, dn64 = dequant64(gate_up, qtype), dequant64(down, qtype)
    bgu = rng.standard_normal((E, 2 * F)).astype(np.float32)
    bdn = rng.standard_normal((E, D)).astype(np.float32)
    sel = np.array([[4, 0, 2], [1, 4, 3]], dtype=np.int32)
    wts = rng.dirichlet(np.ones(k), n_tok).astype(np.float32)
    x = rows(rng, n_tok, D) * 0.05
    h, y = cu.moe_q8(gate_up, down, int(qtype), x, sel, wts, bgu, bdn)
    xq = dequant_act(x)
    pairs = sel.reshape(-1)
    pre = np.einsum("pk,prk->pr", np.repeat(xq, k, axis=0), gu64[pairs]) + bgu[pairs]
    scale = np.einsum("pk,prk->pr", np.abs(np.repeat(xq, k, axis=0)), np.abs(gu64[pairs])) + np.abs(bgu[pairs])
    # SwiGLU's slope is below 1.2 where it is not clamped: the product's error bound carries over
    err = (np.abs(h - swiglu64(pre[:, :F], pre[:, F:]))
           / (1.2 * (scale[:, :F] + scale[:, F:]) * (1 + np.abs(pre[:, F:]))))
    assert np.isfinite(h).all() and float(err.max()) <= REL_TOL, float(err.max())
    assert (np.abs(pre) < 7).mean() > 0.2   # the unclamped part of SwiGLU is exercised
    hq = dequant_act(h)                    # down reads h quantized on the GPU as the CPU would
    per = np.einsum("pk,prk->pr", hq, dn64[pairs]) + bdn[pairs]
    ref = (per.reshape(n_tok, k, D) * wts[:, :, None]).sum(axis=1)
    bound = ((np.einsum("pk,prk->pr", np.abs(hq), np.abs(dn64[pairs])) + np.abs(bdn[pairs])).reshape(n_tok, k, D)
             * wts[:, :, None]).sum(axis=1)
    rel = float((np.abs(y - ref) / bound).max())
    assert np.isfinite(y).all() and rel <= REL_TOL, rel


@pytest.mark.parametrize("cu", BACKENDS)
def test_rejects_bad_input(cu):
    rng = np.random.default_rng(3)
    data = padded_weights(T.Q8_0, 1, 4, 64, rng)[0]
    assert cu.wq8_supported(int(T.Q8_0), 64) and cu.wq8_supported(int(T.MXFP4), 2880)
    assert not cu.wq8_supported(int(T.Q4_0), 64) and not cu.wq8_supported(int(T.F32), 64)
    with pytest.raises(ValueError):
        cu.matvec_q8(data, int(T.Q4_0), 64, rows(rng, 1, 64))
    with pytest.raises(ValueError):
        cu.act_q8(np.ones((1, 40), np.float32))


@pytest.mark.parametrize("cu", BACKENDS)
@pytest.mark.parametrize("qtype", Q8_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kv", ["f32", "f16", "bf16"])
def test_qkv_with_rope_and_kv_store_epilogue(cu, qtype, kv):
    """The fused q|k|v + RoPE + K/V store gives the separate kernels' results: matvec_q8, rope,
    kv_store (bit for bit in the emulator; on a GPU FMA contraction may move the last bit)."""
    rng = np.random.default_rng(40 + int(qtype))
    n_head, n_head_kv, hd, n_in, n_slots, pos = 4, 2, 16, 128, 5, 13
    kv_dim, n_out = n_head_kv * hd, (n_head + 2 * n_head_kv) * hd
    data = padded_weights(qtype, 1, n_out, n_in, rng, odd=False)[0]
    b = rng.standard_normal(n_out).astype(np.float32)
    x = rows(rng, 1, n_in)
    omega = rng.uniform(0.01, 1.0, hd // 2)
    # caches with other rows already filled (as kv_store takes them: f32 floats, else raw bytes)
    caches = [rng.standard_normal((n_slots, kv_dim)).astype(np.float32) if kv == "f32"
              else rng.integers(0, 256, (n_slots, 2 * kv_dim), dtype=np.uint8) for _ in range(2)]
    got, kc, vc = cu.qkv_rope_q8(data, int(qtype), n_in, x, b, n_head, n_head_kv, hd, pos, omega, 1.25,
                                 caches[0], caches[1], kv, kv)
    plain = cu.matvec_q8(data, int(qtype), n_in, x, b[None, :])
    want = cu.rope(plain, n_head + n_head_kv, hd, [pos], omega, 1.25)
    want_kc, want_vc = cu.kv_store(caches[0], caches[1], want, n_head * hd, n_head * hd + kv_dim, [pos], kv_dim,
                                   kv, kv, hd)
    if cu.BACKEND == "emulator":
        assert np.array_equal(got, want[0])
        assert np.array_equal(kc, want_kc) and np.array_equal(vc, want_vc)
    else:
        assert np.allclose(got, want[0], rtol=1e-6, atol=1e-6 * np.abs(want).max())
        changed = np.arange(n_slots) != pos % n_slots
        assert np.array_equal(kc[changed], want_kc[changed]) and np.array_equal(vc[changed], want_vc[changed])
    assert not np.array_equal(kc[pos % n_slots], caches[0][pos % n_slots])  # the row was written
    no_cache, _, _ = cu.qkv_rope_q8(data, int(qtype), n_in, x, b, n_head, n_head_kv, hd, pos, omega, 1.25)
    assert np.array_equal(no_cache, got)
