"""CUDA quantized matrix kernels (csrc/cuda/matmul_cuda.cu) on every backend of cuda_backends.BACKENDS
(the CPU emulator always, the real GPU when present), against references no one here wrote:
dequantization bit-identical to gguf.quants.dequantize (random blocks with random scales, every finite
F16/BF16 bit pattern), matvec (plain, batched, per-row experts) and gemm against float64 numpy on the
gguf-dequantized weights and against the CPU engine's pyengine._model.matmul. Shapes are small (the
emulator runs ~1 us per thread switch) but cross every tile edge: n_out not a multiple of the 8-row
matvec block or the 64-row gemm tile, x rows crossing the 8-row batch and the 64-row tile, float rows
whose length is not a multiple of 32, an odd number of MXFP4 blocks; padded strides with NaN in the
padding (a read past a row poisons the result) and NaN-filled output padding (must stay untouched)."""

import numpy as np
import pytest

from cuda_backends import BACKENDS
from test_quants import F16_FIELDS, SIZES, TYPES, T, random_blocks, reference

K = pytest.importorskip("pyengine._model")

# Max |y - y64| / (|x| @ |W|.T + |b|) measured on the emulator over these tests is about 1e-7 (see
# docs/cuda-matmul.md); one wrong weight or x element would cost ~1/n_in of that bound (>= 1e-3 here).
REL_TOL = 2e-6
# The tensor-core gemm (3xTF32, n_rows >= 16): measured <= 1.3e-6 in the emulator at n_in 2880; the
# bound leaves 3x room for the tensor cores' own f32 accumulation order and is still 10x below what plain
# TF32 inputs give on the same data (>= 5e-5, see test_gemm_tensor_cores).
TC_REL_TOL = 4e-6


def n_in_for(qtype) -> int:
    blck = SIZES[qtype][0]
    return {1: 75, 32: 160, 256: 512}[blck]  # float: 2 groups + tail; 5 blocks (odd); 2 super-blocks


def padded_weights(qtype, n_exp: int, n_out: int, n_in: int, rng, e8m0=(120, 137), odd=True) -> np.ndarray:
    """A strided uint8 view (n_exp, n_out, row_bytes) of random blocks inside a buffer with padding
    after every row and every expert (padding bytes 0xFF: NaN as F32/F16/BF16, wild codes as blocks).
    Block rows get an odd row stride (odd=True: Q8_0 then takes the byte-load loop) or an even one."""
    blck, tsize = SIZES[qtype]
    row_bytes = n_in // blck * tsize
    pad = tsize if blck == 1 else 3 if odd else 2  # float rows stay aligned
    buf = np.full((n_exp, n_out + 1, row_bytes + pad), 0xFF, dtype=np.uint8)
    blocks = random_blocks(qtype, n_exp * n_out * n_in // blck, rng, e8m0=e8m0)
    buf[:, :n_out, :row_bytes] = blocks.reshape(n_exp, n_out, row_bytes)
    return buf[:, :n_out, :row_bytes]


def dequant64(data: np.ndarray, qtype) -> np.ndarray:
    """float64 (n_exp, n_out, n_in) of gguf.quants.dequantize."""
    return reference(np.ascontiguousarray(data), qtype).astype(np.float64)


def nan_padded(a: np.ndarray, pad: int) -> np.ndarray:
    out = np.full((a.shape[0], a.shape[1] + pad), np.nan, dtype=np.float32)
    out[:, :a.shape[1]] = a
    return out


def assert_close(y: np.ndarray, ref: np.ndarray, bound: np.ndarray, what: str, tol: float = REL_TOL) -> float:
    rel = float((np.abs(y.astype(np.float64) - ref) / bound).max())
    assert np.isfinite(y).all() and rel <= tol, (what, rel)
    return rel


def check_products(y_padded: np.ndarray, n_out: int, x: np.ndarray, w64: np.ndarray, b: np.ndarray,
                   what: str, tol: float = REL_TOL) -> None:
    """y_padded[:, :n_out] against x @ w64[i].T + b[i] in float64 (w64, b per x row); pads still NaN."""
    assert np.isnan(y_padded[:, n_out:]).all(), f"{what}: wrote past n_out"
    x64 = x.astype(np.float64)
    ref = np.einsum("ik,irk->ir", x64, w64) + b
    bound = np.einsum("ik,irk->ir", np.abs(x64), np.abs(w64)) + np.abs(b) + 1e-30
    assert_close(y_padded[:, :n_out], ref, bound, what, tol)


@pytest.mark.parametrize("cu", BACKENDS)
def test_type_supported(cu):
    assert all(cu.matmul_type_supported(int(t)) for t in TYPES)
    assert not any(cu.matmul_type_supported(t) for t in (4, 5, 9, 15, 16, 20, 29, 31, 40, -1))


@pytest.mark.parametrize("cu", BACKENDS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequant_bit_identical(cu, qtype):
    rng = np.random.default_rng(int(qtype))
    n_in = n_in_for(qtype)
    data = padded_weights(qtype, 2, 9, n_in, rng, e8m0=(0, 256))
    if qtype in F16_FIELDS:  # scales: any finite f16 bit pattern, subnormals and 65504 included
        raw = np.ascontiguousarray(data).reshape(2, 9, -1, SIZES[qtype][1])
        for off in F16_FIELDS[qtype]:
            bits = rng.integers(0, 1 << 16, raw.shape[:3], dtype=np.uint16)
            bits[(bits & 0x7C00) == 0x7C00] &= 0x83FF
            raw[..., off:off + 2] = bits.view(np.uint8).reshape(*raw.shape[:3], 2)
        data[...] = raw.reshape(data.shape)
    for expert in (0, 1):
        got = cu.matmul_dequant(data, int(qtype), n_in, expert)
        ref = reference(np.ascontiguousarray(data[expert]), qtype)
        cpu = K.dequantize_rows(np.ascontiguousarray(data[expert]), int(qtype), n_in)
        assert got.shape == ref.shape == (9, n_in)
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), \
            f"{np.count_nonzero(got.view(np.uint32) != ref.view(np.uint32))} elements differ"
        assert np.array_equal(got.view(np.uint32), np.asarray(cpu, np.float32).view(np.uint32))


@pytest.mark.parametrize("cu", BACKENDS)
def test_dequant_every_finite_f16_bf16_pattern(cu):
    every = np.arange(1 << 16, dtype=np.uint16)
    for qtype, exp_mask in ((T.F16, 0x7C00), (T.BF16, 0x7F80)):
        finite = every[(every & exp_mask) != exp_mask]  # 248 resp. 255 rows of 256
        rows = finite.view(np.uint8).reshape(-1, 512)
        got = cu.matmul_dequant(rows, int(qtype), 256)
        assert np.array_equal(got.view(np.uint32), reference(rows, qtype).view(np.uint32)), qtype.name


@pytest.mark.parametrize("cu", BACKENDS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec_plain_and_batched(cu, qtype):
    rng = np.random.default_rng(100 + int(qtype))
    n_in, n_out = n_in_for(qtype), 37
    data = padded_weights(qtype, 1, n_out, n_in, rng)[0]
    w64 = dequant64(data, qtype)
    b = rng.standard_normal(n_out).astype(np.float32)
    for n_rows in (1, 2, 3, 8, 11):  # batch widths 1, 2, 4 (one idle), 8, and 8 + 3
        x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
        y = cu.matmul_matvec(data, int(qtype), n_in, nan_padded(x, 5), b[None, :],
                             y=np.full((n_rows, n_out + 3), np.nan, np.float32))
        check_products(y, n_out, x, np.broadcast_to(w64, (n_rows,) + w64.shape), b, f"rows={n_rows}")
        cpu = K.matmul(data, int(qtype), n_in, x, b)
        assert_close(y[:, :n_out], cpu.astype(np.float64),
                     np.abs(x.astype(np.float64)) @ np.abs(w64).T + np.abs(b) + 1e-30, "vs CPU")
    y = cu.matmul_matvec(data, int(qtype), n_in, x)  # no bias
    check_products(y, n_out, x, np.broadcast_to(w64, (x.shape[0],) + w64.shape), np.zeros(n_out), "no bias")


@pytest.mark.parametrize("cu", BACKENDS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec_per_row_experts(cu, qtype):
    rng = np.random.default_rng(200 + int(qtype))
    n_in, n_out, n_exp, n_rows = n_in_for(qtype), 13, 3, 7
    data = padded_weights(qtype, n_exp, n_out, n_in, rng, odd=False)
    w64 = dequant64(data, qtype)
    b = rng.standard_normal((n_exp, n_out)).astype(np.float32)
    experts = np.array([2, 0, 1, 2, 2, 0, 1], dtype=np.int32)
    x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    y = cu.matmul_matvec(data, int(qtype), n_in, nan_padded(x, 2), b, experts,
                         y=np.full((n_rows, n_out + 1), np.nan, np.float32))
    check_products(y, n_out, x, w64[experts], b[experts], "experts")


@pytest.mark.parametrize("cu", BACKENDS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gemm(cu, qtype):
    rng = np.random.default_rng(300 + int(qtype))
    n_in, n_out, n_rows = n_in_for(qtype), 67, 70  # 2 x 2 tiles, both partial
    data = padded_weights(qtype, 2, n_out, n_in, rng)
    w64 = dequant64(data, qtype)[1]
    b = rng.standard_normal(n_out).astype(np.float32)
    x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    y = cu.matmul_gemm(data, int(qtype), n_in, nan_padded(x, 3), b, 1,
                       y=np.full((n_rows, n_out + 2), np.nan, np.float32))
    check_products(y, n_out, x, np.broadcast_to(w64, (n_rows,) + w64.shape), b, "gemm", TC_REL_TOL)
    cpu = K.matmul(np.ascontiguousarray(data[1]), int(qtype), n_in, x, b)
    assert_close(y[:, :n_out], cpu.astype(np.float64),
                 np.abs(x.astype(np.float64)) @ np.abs(w64).T + np.abs(b) + 1e-30, "vs CPU", TC_REL_TOL)


@pytest.mark.parametrize("cu", BACKENDS)
@pytest.mark.parametrize("qtype", [T.MXFP4, T.Q8_0, T.BF16], ids=lambda t: t.name)
def test_gpt_oss_width(cu, qtype):
    """n_embd 2880 rows (90 blocks, even row stride: the 16-bit Q8_0 loop): x in shared memory for one
    row, from global memory for a batch of 8."""
    rng = np.random.default_rng(400 + int(qtype))
    n_in, n_out = 2880, 9
    data = padded_weights(qtype, 1, n_out, n_in, rng, odd=False)[0]
    w64 = dequant64(data, qtype)
    for n_rows in (1, 8):
        x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
        y = cu.matmul_matvec(data, int(qtype), n_in, x)
        check_products(y, n_out, x, np.broadcast_to(w64, (n_rows,) + w64.shape), np.zeros(n_out), "wide")
    y = cu.matmul_gemm(data, int(qtype), n_in, x)
    check_products(y, n_out, x, np.broadcast_to(w64, (n_rows,) + w64.shape), np.zeros(n_out), "wide gemm")


def tf32(a: np.ndarray) -> np.ndarray:
    """float32 rounded to TF32 (10 mantissa bits, to nearest, ties away from zero: cvt.rna.tf32.f32)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


@pytest.mark.parametrize("cu", BACKENDS)
@pytest.mark.parametrize("qtype", [T.F32, T.BF16, T.Q8_0, T.MXFP4, T.Q4_K], ids=lambda t: t.name)
def test_gemm_tensor_cores(cu, qtype):
    """The 3xTF32 tensor-core gemm (n_rows >= 16; 15 rows: the f32 SIMT kernel) at gpt-oss width: x rows
    crossing the 16-row fragment and the 64-row tile, n_out 67 (a partial 64-row weight tile), bias, NaN
    padding. Its error must stay near the f32 level (TC_REL_TOL) and 10x below what plain TF32 inputs
    give on the same data (a 1xTF32 kernel fails this test)."""
    rng = np.random.default_rng(500 + int(qtype))
    n_in, n_out = (2816 if SIZES[qtype][0] == 256 else 2880), 67  # 11 super-blocks; 90 blocks
    data = padded_weights(qtype, 1, n_out, n_in, rng, odd=False)[0]
    w64 = dequant64(data, qtype)
    b = rng.standard_normal(n_out).astype(np.float32)
    for n_rows in (15, 16, 17, 64, 100, 130):
        x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
        y = cu.matmul_gemm(data, int(qtype), n_in, nan_padded(x, 3), b,
                           y=np.full((n_rows, n_out + 2), np.nan, np.float32))
        x64 = x.astype(np.float64)
        ref = x64 @ w64.T + b
        bound = np.abs(x64) @ np.abs(w64).T + np.abs(b)
        tol = REL_TOL if n_rows < 16 else TC_REL_TOL
        check_products(y, n_out, x, np.broadcast_to(w64, (n_rows,) + w64.shape), b, f"rows={n_rows}", tol)
        w32 = w64.astype(np.float32)  # exact: the dequantized weights are float32 values
        plain = tf32(x).astype(np.float64) @ tf32(w32).astype(np.float64).T + b
        rel_plain = float((np.abs(plain - ref) / bound).max())
        assert TC_REL_TOL <= rel_plain / 10, (n_rows, rel_plain)


@pytest.mark.parametrize("cu", BACKENDS)
@pytest.mark.parametrize("qtype", [T.MXFP4, T.Q8_0], ids=lambda t: t.name)
def test_gemm_experts_grouped(cu, qtype):
    """One launch for every expert: rows before start[0] untouched, an empty expert, a 3-row group, a group
    crossing a 64-row tile; groups of >= 16 rows bit-identical to one pe_cu_gemm per expert (same kernel);
    130 experts (two launches of 128 groups) with rows only in experts 0, 64 and 129."""
    rng = np.random.default_rng(600 + int(qtype))
    n_in, n_out = n_in_for(qtype), 67
    for n_exp, start in ((4, [5, 25, 25, 28, 100]), (130, [0] + [2] * 64 + [20] * 65 + [37])):
        data = padded_weights(qtype, n_exp, n_out, n_in, rng)
        w64 = dequant64(data, qtype)
        b = rng.standard_normal((n_exp, n_out)).astype(np.float32)
        x = rng.standard_normal((start[-1] + 3, n_in)).astype(np.float32)
        y = cu.matmul_gemm_experts(data, int(qtype), n_in, nan_padded(x, 3), start, b,
                                   y=np.full((x.shape[0], n_out + 2), np.nan, np.float32))
        assert np.isnan(y[:start[0]]).all() and np.isnan(y[start[-1]:]).all(), "rows outside the groups"
        for e in range(n_exp):
            lo, hi = start[e], start[e + 1]
            if lo == hi:
                continue
            check_products(y[lo:hi], n_out, x[lo:hi], np.broadcast_to(w64[e], (hi - lo,) + w64[e].shape), b[e],
                           f"expert {e}", TC_REL_TOL)
            if hi - lo >= 16:
                single = cu.matmul_gemm(data, int(qtype), n_in, x[lo:hi], b[e], e)
                assert np.array_equal(y[lo:hi, :n_out], single), f"expert {e} differs from pe_cu_gemm"


@pytest.mark.parametrize("cu", BACKENDS)
def test_gemm_experts_rejects_bad_input(cu):
    rng = np.random.default_rng(7)
    data = padded_weights(T.Q8_0, 2, 4, 64, rng)
    x = rng.standard_normal((6, 64)).astype(np.float32)
    q8 = int(T.Q8_0)
    for start in ([0, 4, 2], [0, 3, 7], [-1, 3], [0], [0, 1, 2, 3], [[0, 3]]):
        with pytest.raises(ValueError):
            cu.matmul_gemm_experts(data, q8, 64, x, start)
    with pytest.raises(ValueError):
        cu.matmul_gemm_experts(data, q8, 64, x, [0, 3, 6], np.zeros(4))  # bias needs (n_expert, n_out)


@pytest.mark.parametrize("cu", BACKENDS)
def test_gemm_tensor_cores_split_is_exact(cu):
    """Identity weights: each output is x_lo * 1 + x_hi * 0 + x_hi * 1 with every sum exact (hi + lo fits
    in 23 bits), so it must equal tf32(x) + tf32(x - tf32(x)) bit for bit on any hardware. This pins the
    TF32 rounding (nearest, ties away: a truncating split gives other bits) and the hi/lo split."""
    rng = np.random.default_rng(700)
    n = 64
    eye = np.eye(n, dtype=np.float32).view(np.uint8)
    x = rng.standard_normal((16, n)).astype(np.float32)
    y = cu.matmul_gemm(eye, int(T.F32), n, x)
    hi = tf32(x)
    want = hi + tf32(x - hi)
    assert np.array_equal(y.view(np.uint32), want.view(np.uint32))
    u = x.view(np.uint32)
    hi_t = (u & np.uint32(0xFFFFE000)).view(np.float32)
    trunc = hi_t + ((x - hi_t).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
    assert (want != trunc).mean() > 0.2 and (want != x).mean() > 0.1  # measured 0.45 and 0.25


def test_tf32_reference_rounding():
    """The numpy TF32 rounding above: nearest, ties away from zero, 13 low bits cleared."""
    bits = np.array([0x3F800000, 0x3F800FFF, 0x3F801000, 0x3F803000, 0xBF801000, 0x3F7FF000], np.uint32)
    want = np.array([0x3F800000, 0x3F800000, 0x3F802000, 0x3F804000, 0xBF802000, 0x3F800000], np.uint32)
    assert np.array_equal(tf32(bits.view(np.float32)).view(np.uint32), want)


@pytest.mark.parametrize("cu", BACKENDS)
def test_rejects_bad_input(cu):
    rng = np.random.default_rng(5)
    data = padded_weights(T.Q8_0, 2, 4, 64, rng)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    q8 = int(T.Q8_0)
    bad = [
        lambda: cu.matmul_dequant(data, 16, 64),                       # unsupported type
        lambda: cu.matmul_dequant(data, q8, 96),                       # row bytes do not match
        lambda: cu.matmul_dequant(data, q8, 64, 2),                    # expert out of range
        lambda: cu.matmul_dequant(data.astype(np.int8), q8, 64),       # not uint8
        lambda: cu.matmul_matvec(data, q8, 64, x, experts=[0, 2]),     # expert id out of range
        lambda: cu.matmul_matvec(data, q8, 64, x, experts=[0]),        # one id per row
        lambda: cu.matmul_matvec(data, q8, 64, x[:, :63]),             # x too narrow
        lambda: cu.matmul_matvec(data, q8, 64, x, np.zeros(4)),        # bias needs (n_exp, n_out)
        lambda: cu.matmul_gemm(data, q8, 64, x, np.zeros(5)),          # bias length
        lambda: cu.matmul_gemm(data, q8, 64, x, None, -1),             # expert out of range
        lambda: cu.matmul_gemm(data, q8, 64, x, y=np.zeros((2, 3), np.float32)),  # y too narrow
        lambda: cu.matmul_dequant(np.zeros((2, 6), np.uint8)[:, :4], int(T.F32), 1),  # F32 rows 6 bytes apart
    ]
    for call in bad:
        with pytest.raises(ValueError):
            call()
