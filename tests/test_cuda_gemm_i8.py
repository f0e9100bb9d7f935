"""The int8 tensor-core prefill (csrc/cuda/gemm_i8_cuda.cu, docs/cuda-matmul.md "Int8 tensor-core gemm")
on every backend of cuda_backends.BACKENDS (the CPU emulator always, the real GPU when present).

- The instruction: mma.sync m16n8k32 s8 through compat.h's fragment layout (pe_mma_s8_*, the one
  place the kernels take it from) against a numpy int64 matmul on random int8, and the layout itself
  against the PTX ISA figures (a bijection onto each matrix, spot elements).
- The products (Q8_0, MXFP4): against float64 numpy on the activations as the CPU path quantizes them
  (pyengine._quants.quantize_act_q8: the same two int8 digits per 32-block), against float32 x (the
  quantization error, bounded), and against the CPU engine's int8 prefill (pyengine._model.matmul);
  grouped experts equal per-expert products bit for bit.
- The engine: Engine(device="cuda") with int8 activations (exact=False, the default) against the CPU
  engine's int8 path: prefill logits within 1e-3 relative, greedy continuation identical for 32 tokens."""

import numpy as np
import pytest

from cuda_backends import BACKENDS
from test_cuda_engine import engines, greedy, prompt, rel
from test_cuda_matmul import dequant64, nan_padded, padded_weights
from test_quants import T, act_values

import pyengine._quants as Q

K = pytest.importorskip("pyengine._model")

I8_TYPES = [T.Q8_0, T.MXFP4]
# max |y - y64| / (|xq| @ |W|.T + |b|) against float64 on the quantized activations xq: measured
# <= 2.2e-7 in the emulator (f32 sums of the per-block int32 products); one wrong code costs ~1/n_in
REL_TOL = 1e-6


def quantized_x(x: np.ndarray) -> np.ndarray:
    """float64 values of each row of x as pe_act_q8 (the CPU's int8 activations) represents them."""
    return np.stack([act_values(Q.quantize_act_q8(np.ascontiguousarray(r))) for r in x])


def check(y, n_out, x, w64, b, what, tol=REL_TOL):
    """y[:, :n_out] against float64 on the quantized x, and against float32 x within the activations'
    rounding (each element within d / 508 of x, d = max|x| / 127 of its 32-block); the padding columns
    of y untouched (NaN)."""
    assert np.isnan(y[:, n_out:]).all(), (what, "padding written")
    y = y[:, :n_out].astype(np.float64)
    assert np.isfinite(y).all(), what
    xq = quantized_x(x)
    bound = np.abs(xq) @ np.abs(w64).T + np.abs(b)
    err = float((np.abs(y - (xq @ w64.T + b)) / bound).max())
    assert err <= tol, (what, err)
    x64 = x.astype(np.float64)
    d = np.repeat(np.abs(x64).reshape(len(x), -1, 32).max(2) / 127, 32, axis=1)
    slack = (d / 508) @ np.abs(w64).T + tol * (np.abs(x64) @ np.abs(w64).T + np.abs(b))
    assert (np.abs(y - (x64 @ w64.T + b)) <= slack).all(), what


def test_mma_layout_is_the_ptx_isa_one():
    """Each element of A (16 x 32), B (32 x 8) and C (16 x 8) held by exactly one (lane, element), and
    the spots the PTX ISA figures for mma.m16n8k32 (.s8) show: lane 4g + t holds A row g, columns
    4t .. 4t+3 in a0; row g+8 in a1; columns + 16 in a2/a3; B k = 4t .. (+16 in b1), column g; C row g
    (+8 for c2, c3), columns 2t, 2t+1."""
    from pyengine import _cuda_emu as cu
    a, b, c = cu.mma_s8_layout()
    for lay, shape in ((a, (16, 32)), (b, (32, 8)), (c, (16, 8))):
        seen = np.zeros(shape, int)
        np.add.at(seen, (lay[..., 0].ravel(), lay[..., 1].ravel()), 1)
        assert (seen == 1).all()
    assert [tuple(a[0, i]) for i in range(4)] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert tuple(a[5, 13]) == (9, 21) and tuple(a[31, 15]) == (15, 31) and tuple(a[6, 8]) == (1, 24)
    assert tuple(b[6, 5]) == (25, 1) and tuple(b[31, 3]) == (15, 7) and tuple(b[1, 4]) == (20, 0)
    assert tuple(c[31, 3]) == (15, 7) and tuple(c[5, 2]) == (9, 2) and tuple(c[2, 1]) == (0, 5)


def pack_regs(m: np.ndarray, lay: np.ndarray, n_regs: int) -> np.ndarray:
    """The lanes' registers holding int8 matrix m in layout lay (element i = byte i % 4 of register i // 4)."""
    regs = np.zeros((32, n_regs), np.uint32)
    byte = m.astype(np.int8).view(np.uint8)[lay[..., 0], lay[..., 1]].astype(np.uint32)  # (32, 4 n_regs)
    for i in range(lay.shape[1]):
        regs[:, i // 4] |= byte[:, i] << np.uint32(8 * (i % 4))
    return regs


@pytest.mark.parametrize("cu", BACKENDS)
def test_mma_s8_equals_numpy_matmul(cu):
    la, lb, lc = cu.mma_s8_layout()
    rng = np.random.default_rng(11)
    cases = [(rng.integers(-128, 128, (16, 32)), rng.integers(-128, 128, (32, 8)), rng.integers(-2**20, 2**20, (16, 8)))
             for _ in range(3)]
    cases.append((np.full((16, 32), -128), np.full((32, 8), -128), np.full((16, 8), 2**31 - 2**19 - 1)))  # max sum
    for A, B, C in cases:
        d = cu.mma_s8_run(pack_regs(A, la, 4), pack_regs(B, lb, 2), C[lc[..., 0], lc[..., 1]].astype(np.int32))
        want = A.astype(np.int64) @ B.astype(np.int64) + C
        assert np.array_equal(d, want[lc[..., 0], lc[..., 1]])


@pytest.mark.parametrize("cu", BACKENDS)
@pytest.mark.parametrize("qtype", I8_TYPES, ids=lambda t: t.name)
def test_gemm_i8_products(cu, qtype):
    """5 blocks (n_in 160), n_out 67 (partial 64-tile), rows crossing 16 and 64, bias, expert 1 of 2,
    odd row strides, NaN padding in x and y; gpt-oss width 2880."""
    rng = np.random.default_rng(900 + int(qtype))
    for n_in, all_rows in ((160, (1, 15, 16, 70)), (2880, (20,))):
        data = padded_weights(qtype, 2, 67, n_in, rng)
        w64 = dequant64(data, qtype)[1]
        b = rng.standard_normal(67).astype(np.float32)
        for rows in all_rows:
            x = rng.standard_normal((rows, n_in)).astype(np.float32)
            x[:, :32] *= 1e-3  # blocks of very different scales
            y = cu.matmul_gemm(data, int(qtype), n_in, nan_padded(x, 3), b, expert=1, int8=True,
                               y=np.full((rows, 69), np.nan, np.float32))
            check(y, 67, x, w64, b, f"{qtype.name} n_in {n_in} rows {rows}")


@pytest.mark.parametrize("cu", BACKENDS)
def test_gemm_i8_quantizes_as_the_cpu(cu):
    """Identity Q8_0 weights (code 1, scale 1) read back each quantized activation: y[i, k] must be the
    CPU's d (q + l / 254) to float rounding (|y| <= 127.5 d, a few roundings of 2^-24: <= ~2.3e-5 d);
    one digit off by one would be off by d / 254 = 3.9e-3 d, two codes' rounding mode the same."""
    n = 64
    rows = np.zeros((n, n // 32, 34), np.uint8)
    rows[:, :, :2] = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    for k in range(n):
        rows[k, k // 32, 2 + k % 32] = 1
    rng = np.random.default_rng(21)
    x = (rng.standard_normal((20, n)) * np.exp2(rng.integers(-20, 20, (20, 1)))).astype(np.float32)
    y = cu.matmul_gemm(rows.reshape(n, -1), int(T.Q8_0), n, x, int8=True).astype(np.float64)
    xq = quantized_x(x)
    d = np.repeat(np.abs(x.astype(np.float64)).reshape(20, -1, 32).max(2) / 127, 32, axis=1)
    assert (np.abs(y - xq) <= 5e-5 * d).all()


@pytest.mark.parametrize("cu", BACKENDS)
@pytest.mark.parametrize("qtype", I8_TYPES, ids=lambda t: t.name)
def test_gemm_i8_close_to_cpu_int8_prefill(cu, qtype):
    """The CPU engine's int8 prefill (more than 8 tokens: the repacked-tile kernel) on the same rows: the
    same integers, only the float sums differ."""
    if not Q.has_dot_q8(int(qtype)):
        pytest.skip("no int8 kernels on this CPU (AVX-512 VNNI)")
    rng = np.random.default_rng(950 + int(qtype))
    data = np.ascontiguousarray(padded_weights(qtype, 1, 70, 256, rng)[0])
    x = rng.standard_normal((24, 256)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    want = K.matmul(data, int(qtype), 256, x, b, int8_activations=True)
    got = cu.matmul_gemm(data, int(qtype), 256, x, b, int8=True)
    bound = np.abs(quantized_x(x)) @ np.abs(dequant64(data, qtype)).T + np.abs(b)
    assert (np.abs(got.astype(np.float64) - want) / bound).max() <= 2 * REL_TOL


@pytest.mark.parametrize("cu", BACKENDS)
@pytest.mark.parametrize("qtype", I8_TYPES, ids=lambda t: t.name)
def test_gemm_experts_i8_grouped(cu, qtype):
    """Rows before the first group untouched, an empty expert, a 3-row group, a group crossing a tile;
    130 experts (two launches); every group equal bit for bit to its expert's own product."""
    rng = np.random.default_rng(960 + int(qtype))
    n_in, n_out = 96, 67
    for n_exp, start in ((4, [5, 25, 25, 28, 100]), (130, [0] + [2] * 64 + [20] * 65 + [37])):
        data = padded_weights(qtype, n_exp, n_out, n_in, rng)
        w64 = dequant64(data, qtype)
        b = rng.standard_normal((n_exp, n_out)).astype(np.float32)
        x = rng.standard_normal((start[-1] + 3, n_in)).astype(np.float32)
        y = cu.matmul_gemm_experts(data, int(qtype), n_in, nan_padded(x, 3), start, b, int8=True,
                                   y=np.full((x.shape[0], n_out + 2), np.nan, np.float32))
        assert np.isnan(y[:start[0]]).all() and np.isnan(y[start[-1]:]).all(), "rows outside the groups"
        for e in range(n_exp):
            lo, hi = start[e], start[e + 1]
            if lo < hi:
                check(y[lo:hi], n_out, x[lo:hi], w64[e], b[e], f"expert {e}")
                assert np.array_equal(y[lo:hi, :n_out], cu.matmul_gemm(data, int(qtype), n_in, x[lo:hi], b[e], e,
                                                                       int8=True)), e


@pytest.mark.parametrize("cu", BACKENDS)
def test_gemm_i8_rejects_other_types(cu):
    rng = np.random.default_rng(5)
    for qtype in (T.F32, T.Q4_0, T.Q4_K):
        n_in = 256 if qtype == T.Q4_K else 64
        data = padded_weights(qtype, 1, 4, n_in, rng)
        x = rng.standard_normal((20, n_in)).astype(np.float32)
        with pytest.raises(ValueError, match="int8"):
            cu.matmul_gemm(data[0], int(qtype), n_in, x, int8=True)
        with pytest.raises(ValueError, match="int8"):
            cu.matmul_gemm_experts(data, int(qtype), n_in, x, [0, 20], int8=True)


def int8_engines(path, cu, monkeypatch):
    """CPU and GPU engines with int8 activations (exact=False), f32 KV caches as test_cuda_engine's; the
    GPU one on backend cu (parametrized over BACKENDS, so `-m cuda` selects the real one)."""
    import pyengine
    if cu.BACKEND == "emulator":
        monkeypatch.setenv("PYENGINE_CUDA_EMULATOR", "1")
    else:
        monkeypatch.delenv("PYENGINE_CUDA_EMULATOR", raising=False)
    kv = dict(cache_type_k="f32", cache_type_v="f32")
    cpu = pyengine.Engine(str(path), n_ctx=256, n_threads=2, **kv)
    dev = pyengine.Engine(str(path), n_ctx=256, n_threads=2, device="cuda", **kv)
    return cpu, dev


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory):
    from gguf_factory import write_gptoss_gguf
    path = tmp_path_factory.mktemp("i8") / "q8_0-mxfp4.gguf"
    write_gptoss_gguf(path, arch="gpt-oss", n_layer=3, wtype="q8_0", expert_type="mxfp4", seed=5)
    return path


@pytest.mark.parametrize("cu", BACKENDS)
def test_int8_prefill_matches_cpu_int8(cu, q8_file, monkeypatch):
    """40-token prefill (dense Q8_0 products and grouped MXFP4 experts on the int8 kernels) against the
    CPU's int8 path within 1e-3; and the int8 path really ran (the float-activation GPU run differs)."""
    if not Q.has_dot_q8(int(T.Q8_0)):
        pytest.skip("the CPU path has no int8 kernels here (AVX-512 VNNI): nothing int8 to compare with")
    cpu, dev = int8_engines(q8_file, cu, monkeypatch)
    toks = prompt(40)
    got, want = dev.logits(toks), cpu.logits(toks)
    assert rel(got, want) < 1e-3
    _, exact_dev = engines(q8_file)
    assert not np.array_equal(exact_dev.logits(toks), got)


@pytest.mark.parametrize("cu", BACKENDS)
def test_int8_greedy_identical_for_32_tokens(cu, q8_file, monkeypatch):
    if not Q.has_dot_q8(int(T.Q8_0)):
        pytest.skip("the CPU path has no int8 kernels here (AVX-512 VNNI)")
    cpu, dev = int8_engines(q8_file, cu, monkeypatch)
    toks = list(prompt(12, seed=3))          # 12 tokens: the prefill takes the int8 gemm (> 8 rows)
    want = greedy(cpu, toks, 32)
    assert len(set(want)) > 4
    assert greedy(dev, toks, 32) == want
