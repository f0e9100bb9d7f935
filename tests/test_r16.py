"""MXFP4, Q8_0, Q4_1, Q5_0, Q5_1 and the K-quants' weights repacked by 16 rows (csrc/r16.h), the decode layout of the repack cache.

The R16 kernels must give the bits of the file-layout int8 kernels (that is what makes the cache
invisible in the logits): checked for 1-8 tokens (the decode kernel), 9+ tokens (the prefill
tiles), 1 and 2 threads, row counts that are not a multiple of 16, several experts with strided
source rows, and against float64 on the same two-digit activations."""

import os

import numpy as np
import pytest

from pyengine import _model as K
from simd_levels import at_level, in_child
from test_quants import SIZES, T, random_blocks, reference

pytestmark = pytest.mark.skipif(not K.r16_available(), reason="no R16 kernel on this CPU (it needs AVX2)")


def aligned(n: int) -> np.ndarray:
    """n zero bytes starting on a 64-byte boundary (what the cache file's mapping gives)."""
    buf = np.zeros(n + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + n]


def mxfp4(n_expert: int, n_out: int, n_in: int, rng) -> np.ndarray:
    blocks = random_blocks(T.MXFP4, n_expert * n_out * n_in // 32, rng, e8m0=(118, 137))
    return blocks.reshape(n_expert, n_out, n_in // 32 * SIZES[T.MXFP4][1])


def blocks_of(qtype, n_expert: int, n_out: int, n_in: int, rng) -> np.ndarray:
    """Random (n_expert, n_out, row bytes) weights of the type (MXFP4 with sane e8m0 scales)."""
    if qtype == T.MXFP4:
        return mxfp4(n_expert, n_out, n_in, rng)
    blck, size = SIZES[qtype]
    blocks = random_blocks(qtype, n_expert * n_out * n_in // blck, rng)
    return blocks.reshape(n_expert, n_out, n_in // blck * size)


def repacked(data: np.ndarray, n_in: int, qtype=T.MXFP4) -> np.ndarray:
    out = aligned(K.r16_bytes(n_in, data.shape[-2], data.shape[0] if data.ndim == 3 else 1, int(qtype)))
    K.r16_repack(data, n_in, out, n_threads=2, ggml_type=int(qtype))
    return out


def needs_r16(qtype):
    return pytest.mark.skipif(not K.r16_available(int(qtype)), reason=f"the {qtype.name} R16 kernel needs AVX-512 VNNI")


q5_r16, q4k_r16 = needs_r16(T.Q5_0), needs_r16(T.Q4_K)
TYPES = [pytest.param(T[name], id=name, marks=needs_r16(T[name])) for name in K.R16_TYPES]


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n_out,n_in", [(16, 32), (37, 96), (300, 160), (64, 2880), (5, 4096)])
def test_r16_matmul_bit_identical_to_file_layout(n_out, n_in, qtype):
    if SIZES[qtype][0] == 256:  # super-blocks
        n_in = max(256, n_in // 256 * 256)
    rng = np.random.default_rng(n_out * 7 + n_in)
    n_exp = 3
    w = blocks_of(qtype, n_exp, n_out, n_in, rng)
    r = repacked(w, n_in, qtype)
    bias = rng.standard_normal(n_out).astype(np.float32)
    for n_tok in (1, 2, 3, 5, 8, 9, 20):
        x = (rng.standard_normal((n_tok, n_in)) * rng.uniform(0.1, 10, n_in)).astype(np.float32)
        for e in (0, n_exp - 1):
            want = K.matmul(w, int(qtype), n_in, x, bias, expert=e, int8_activations=True)
            for threads in (1, 2):
                got = K.matmul(r, int(qtype), n_in, x, bias, expert=e, n_threads=threads, r16_shape=(n_out, n_exp))
                assert np.array_equal(got, want), (n_tok, e, threads)


def five_bits(r: np.ndarray, at: int, i: int, j: int, e: int) -> int:
    """The 5-bit code of element 4 j + e of row i in the five pieces at r[at:] (Q5_0, Q5_1, Q5_K; r16.h)."""
    k, byte = j // 2, int(r[at + 64 * (j // 2) + 4 * i + e])
    if j % 2 == 0:
        return byte & 31
    return (byte >> 5) | ((int(r[at + 256 + 4 * i + e]) >> (2 * k)) & 3) << 3


def nibble_or_five(r: np.ndarray, at: int, i: int, j: int, e: int, five: bool) -> int:
    """Element 4 j + e of row i in the unit at r[at:]: four pieces of nibbles (register j < 4 the low
    nibbles of piece j, j >= 4 the high ones of piece j - 4), or the Q5 types' five pieces."""
    if five:
        return five_bits(r, at, i, j, e)
    return (int(r[at + 64 * (j % 4) + 4 * i + e]) >> (4 * (j // 4))) & 15


def check_strided_against_float64(qtype, n_in: int, rng) -> None:
    """Every other row of a fused weight, repacked: one token against float64 on the dequantized
    rows, and bit for bit the file layout's int8 product."""
    n_out = 40
    view = blocks_of(qtype, 1, 2 * n_out, n_in, rng)[0][1::2]
    r = repacked(view, n_in, qtype)
    x = rng.standard_normal((1, n_in)).astype(np.float32)
    got = K.matmul(r, int(qtype), n_in, x, r16_shape=(n_out, 1))
    wf = reference(np.ascontiguousarray(view).reshape(-1), qtype).reshape(n_out, n_in).astype(np.float64)
    want = wf @ x[0].astype(np.float64)
    assert np.allclose(got[0], want, rtol=5e-3, atol=5e-3 * np.abs(want).max())
    assert np.array_equal(got, K.matmul(view, int(qtype), n_in, x, int8_activations=True))


@needs_r16(T.Q8_0)
def test_r16_q8_0_against_float64_and_layout():
    """Q8_0: the byte layout r16.h describes (piece j of block b holds row i's qs[4 j .. 4 j + 3] + 128
    at 4 i, the f16 scales after the codes, missing rows repeat the last, zero padding), and a
    strided source (every other row) against float64 on the activations the kernel sees."""
    rng = np.random.default_rng(11)
    n_in, n_out = 96, 13
    w = blocks_of(T.Q8_0, 1, n_out, n_in, rng)[0]
    r = repacked(w, n_in, T.Q8_0)
    nb = n_in // 32
    assert r.size == (16 * 34 * nb + 63) // 64 * 64
    for i in range(16):
        row = w[min(i, n_out - 1)].reshape(nb, 34)
        for b in range(nb):
            assert bytes(r[512 * nb + 32 * b + 2 * i:512 * nb + 32 * b + 2 * i + 2]) == bytes(row[b, :2])
            for j in range(8):
                got = r[512 * b + 64 * j + 4 * i:512 * b + 64 * j + 4 * i + 4]
                assert np.array_equal(got, row[b, 2 + 4 * j:6 + 4 * j] ^ 0x80)
    assert not r[544 * nb:].any()
    check_strided_against_float64(T.Q8_0, 2880, rng)


def test_r16_against_float64_and_strided_source():
    """Rows taken from a strided view (every other row of a fused tensor, as the Ollama layouts give),
    against float64 on the activations the kernels see."""
    rng = np.random.default_rng(5)
    n_in, n_out = 2880, 48
    fused = mxfp4(2, 2 * n_out, n_in, rng)
    view = fused[:, 1::2, :]
    r = repacked(view, n_in)
    x = rng.standard_normal((1, n_in)).astype(np.float32)
    got = K.matmul(r, int(T.MXFP4), n_in, x, expert=1, r16_shape=(n_out, 2))
    wf = reference(np.ascontiguousarray(view[1]).reshape(-1), T.MXFP4).reshape(n_out, n_in).astype(np.float64)
    want = wf @ x[0].astype(np.float64)
    assert np.allclose(got[0], want, rtol=5e-3, atol=5e-3 * np.abs(want).max())
    assert np.array_equal(got, K.matmul(view, int(T.MXFP4), n_in, x, expert=1, int8_activations=True))


@q5_r16
def test_r16_q5_0_against_float64_and_layout():
    """Q5_0: the byte layout r16.h describes (per block five pieces of 5-bit fields whose code of
    element 4 j + e of row i is the file's, the f16 scales after the codes, zero padding), and a
    strided source against float64."""
    rng = np.random.default_rng(12)
    n_in, n_out = 96, 13
    w = blocks_of(T.Q5_0, 1, n_out, n_in, rng)[0]
    r = repacked(w, n_in, T.Q5_0)
    nb = n_in // 32
    assert r.size == (16 * 22 * nb + 63) // 64 * 64
    for i in range(16):
        row = w[min(i, n_out - 1)].reshape(nb, 22)
        for b in range(nb):
            assert bytes(r[320 * nb + 32 * b + 2 * i:320 * nb + 32 * b + 2 * i + 2]) == bytes(row[b, :2])
            qh = int.from_bytes(bytes(row[b, 2:6]), "little")
            for el in range(32):
                code = (int(row[b, 6 + el % 16]) >> (4 * (el // 16))) & 15 | ((qh >> el) & 1) << 4
                assert five_bits(r, 320 * b, i, el // 4, el % 4) == code
    assert not r[352 * nb:].any()
    check_strided_against_float64(T.Q5_0, 2880, rng)


@pytest.mark.parametrize("qtype", [pytest.param(T[n], id=n, marks=needs_r16(T[n])) for n in ("Q4_0", "Q4_1", "Q5_1")])
def test_r16_q4_0_q4_1_q5_1_layout_and_float64(qtype):
    """Q4_0, Q4_1 and Q5_1: the codes as MXFP4's pieces (Q5_1: as Q5_0's five pieces), then per
    block the rows' f16 d (Q4_0: code - 8) and, with a minimum, their f16 m, zero padding; the
    values that layout gives are gguf-py's dequantization of the file's rows (missing rows repeat
    the last one); a strided source against float64."""
    rng = np.random.default_rng(14)
    n_in, n_out = 96, 13
    w = blocks_of(qtype, 1, n_out, n_in, rng)[0]
    r = repacked(w, n_in, qtype)
    nb, fifth, has_min = n_in // 32, qtype == T.Q5_1, qtype != T.Q4_0
    code, scale = 320 if fifth else 256, 64 if has_min else 32
    assert r.size == (16 * SIZES[qtype][1] * nb + 63) // 64 * 64
    want = reference(np.ascontiguousarray(w).reshape(-1), qtype).reshape(n_out, n_in)
    for i in range(16):
        got = np.empty(n_in, np.float32)
        for b in range(nb):
            d = r[code * nb + scale * b + 2 * i:][:2].view(np.float16)[0].astype(np.float32)
            m = r[code * nb + 64 * b + 32 + 2 * i:][:2].view(np.float16)[0].astype(np.float32) if has_min else None
            for el in range(32):
                c = nibble_or_five(r, code * b, i, el // 4, el % 4, fifth)
                got[32 * b + el] = d * np.float32(c) + m if has_min else d * np.float32(c - 8)
        np.testing.assert_array_equal(got, want[min(i, n_out - 1)])
    assert not r[(code + scale) * nb:].any()
    check_strided_against_float64(qtype, 2880, rng)


@pytest.mark.parametrize("qtype", [pytest.param(T.Q4_K, id="Q4_K", marks=q4k_r16),
                                   pytest.param(T.Q5_K, id="Q5_K", marks=needs_r16(T.Q5_K))])
def test_r16_k_quants_layout_and_float64(qtype):
    """Q4_K, Q5_K: the values r16.h's layout gives (codes as MXFP4's pieces per sub-block, Q5_K's
    as Q5_0's five pieces, unpacked 6-bit scales and minimums, f16 d and dmin) are gguf-py's
    dequantization of the file's rows (missing rows repeat the last one), and a strided source
    multiplies as float64 says."""
    rng = np.random.default_rng(13)
    n_in, n_out = 512, 13
    w = blocks_of(qtype, 1, n_out, n_in, rng)[0]
    r = repacked(w, n_in, qtype)
    nsb, cs = n_in // 256, 320 if qtype == T.Q5_K else 256
    assert r.size == (8 * cs + 320) * nsb and K.r16_bytes(n_in, n_out, 1, int(qtype)) == r.size
    want = reference(np.ascontiguousarray(w).reshape(-1), qtype).reshape(n_out, n_in)
    sc_area = r[8 * cs * nsb:].reshape(nsb, 320)
    for i in range(16):
        got = np.empty(n_in, np.float32)
        for b in range(nsb):
            d = sc_area[b, 256 + 2 * i:258 + 2 * i].view(np.float16)[0].astype(np.float32)
            dmin = sc_area[b, 288 + 2 * i:290 + 2 * i].view(np.float16)[0].astype(np.float32)
            for sub in range(8):
                sc, mn = np.float32(sc_area[b, 16 * sub + i]), np.float32(sc_area[b, 128 + 16 * sub + i])
                at = 8 * cs * b + cs * sub
                for el in range(32):
                    c = nibble_or_five(r, at, i, el // 4, el % 4, cs == 320)
                    got[256 * b + 32 * sub + el] = (d * sc) * np.float32(c) - dmin * mn
        np.testing.assert_array_equal(got, want[min(i, n_out - 1)])
    check_strided_against_float64(qtype, 2816, rng)
    with pytest.raises(ValueError, match="no R16 form"):
        K.r16_bytes(96, 16, 1, int(qtype))


@pytest.mark.parametrize("qtype", [pytest.param(T[n], id=n, marks=needs_r16(T[n])) for n in ("Q2_K", "Q3_K", "Q6_K")])
def test_r16_sub_blocks_of_16_layout_and_float64(qtype):
    """Q2_K, Q3_K, Q6_K: the values r16.h's layout gives (per 32-element unit the 2-bit fields, Q3_K's
    three pieces of 3-bit fields, Q6_K's nibbles then its high 2-bit fields; per sub-block of 16 the
    scale byte, the rows' f16 d and Q2_K's dmin) are gguf-py's dequantization of the file's rows
    (missing rows repeat the last one), and a strided source multiplies as float64 says."""
    rng = np.random.default_rng(15)
    n_in, n_out = 512, 13
    w = blocks_of(qtype, 1, n_out, n_in, rng)[0]
    r = repacked(w, n_in, qtype)
    nsb = n_in // 256
    ub, area = {T.Q2_K: (128, 320), T.Q3_K: (192, 288), T.Q6_K: (384, 288)}[qtype]
    assert r.size == (8 * ub + area) * nsb and K.r16_bytes(n_in, n_out, 1, int(qtype)) == r.size
    want = reference(np.ascontiguousarray(w).reshape(-1), qtype).reshape(n_out, n_in)

    def crumbs(p, i, j, e):  # 2-bit field of element 4 j + e of a unit whose two pieces are at p
        return (int(r[p + 64 * (j // 4) + 4 * i + e]) >> (2 * (j % 4))) & 3

    def three_bits(p, i, j, e):  # Q3_K's code of element 4 j + e of a unit whose three pieces are at p
        byte = lambda k: int(r[p + 64 * k + 4 * i + e])  # noqa: E731
        if j < 6:
            return (byte(j // 2) >> (3 * (j % 2))) & 7
        return (byte(j - 6) >> 6) | ((byte(2) >> (j % 2 + 6)) & 1) << 2

    for i in range(16):
        got = np.empty(n_in, np.float32)
        for b in range(nsb):
            sc = r[8 * ub * nsb + area * b:][:area]
            d = sc[256 + 2 * i:258 + 2 * i].view(np.float16)[0].astype(np.float32)
            dmin = sc[288 + 2 * i:290 + 2 * i].view(np.float16)[0].astype(np.float32) if qtype == T.Q2_K else 0
            for u in range(8):
                at = ub * (8 * b + u)
                for j in range(8):
                    for e in range(4):
                        if qtype == T.Q6_K:
                            code = nibble_or_five(r, at, i, j, e, False) | crumbs(at + 256, i, j, e) << 4
                        elif qtype == T.Q3_K:
                            code = three_bits(at, i, j, e)
                        else:
                            code = crumbs(at, i, j, e)
                        el = 32 * u + 4 * j + e  # within the super-block; sub-block el // 16
                        v = int(sc[16 * (el // 16) + i])
                        if qtype == T.Q2_K:
                            val = (d * np.float32(v & 15)) * np.float32(code) - dmin * np.float32(v >> 4)
                        else:
                            val = (d * np.float32(np.int8(np.uint8(v)))) * np.float32(code - (32 if qtype == T.Q6_K else 4))
                        got[256 * b + el] = val
        np.testing.assert_allclose(got, want[min(i, n_out - 1)], rtol=1e-6, atol=1e-6)
    check_strided_against_float64(qtype, 2816, rng)


def test_r16_layout_of_one_group():
    """The byte layout r16.h describes: piece j of block b holds row i's qs[4 j .. 4 j + 3] at
    4 i, the scales follow the codes, the group is padded to 64 bytes, missing rows repeat the last."""
    rng = np.random.default_rng(9)
    n_in, n_out = 64, 13
    w = mxfp4(1, n_out, n_in, rng)[0]
    r = repacked(w, n_in)
    nb = n_in // 32
    assert r.size == (16 * 17 * nb + 63) // 64 * 64
    for i in range(16):
        row = w[min(i, n_out - 1)].reshape(nb, 17)
        for b in range(nb):
            assert r[256 * nb + 16 * b + i] == row[b, 0]
            for j in range(4):
                assert bytes(r[256 * b + 64 * j + 4 * i:256 * b + 64 * j + 4 * i + 4]) == bytes(row[b, 1 + 4 * j:5 + 4 * j])
    assert not r[272 * nb:].any()


def test_r16_rejects_bad_buffers():
    rng = np.random.default_rng(1)
    w = mxfp4(1, 16, 64, rng)
    r = repacked(w, 64)
    x = np.ones((1, 64), np.float32)
    with pytest.raises(ValueError, match="R16 data must be"):
        K.matmul(r[:-1], int(T.MXFP4), 64, x, r16_shape=(16, 1))
    with pytest.raises(ValueError, match="aligned"):
        K.matmul(aligned(r.size + 1)[1:], int(T.MXFP4), 64, x, r16_shape=(16, 1))
    with pytest.raises(ValueError, match="MXFP4, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"):
        K.matmul(r, int(T.F16), 64, x, r16_shape=(16, 1))
    with pytest.raises(ValueError, match="no R16 form"):
        K.r16_bytes(64, 16, 1, int(T.BF16))
    with pytest.raises(ValueError, match="no R16 form"):
        K.r16_repack(w, 64, r, ggml_type=int(T.F32))
    with pytest.raises(ValueError, match="writable contiguous"):
        K.r16_repack(w, 64, np.zeros(r.size + 1, np.uint8))


R16_CASES = [(16, 32), (37, 96), (300, 160), (64, 2880)]


def check_r16_rows(out: str) -> None:
    """At this process's level, for every type it has an R16 kernel for: R16 products of 1-8 tokens
    (the decode kernel) bit for bit the file-layout int8 rows kernel token by token, and where this
    level has no int8 tiles (AVX2) also 9 and 20 tokens (the rows kernel 8 tokens a call); the
    results saved to `out`."""
    from pyengine import _quants as Q

    saved = {}
    for name in K.R16_TYPES:
        qtype = T[name]
        if not K.r16_available(int(qtype)):
            continue
        for n_out, n_in in R16_CASES:
            if SIZES[qtype][0] == 256:
                n_in = max(256, n_in // 256 * 256)
            rng = np.random.default_rng(n_out * 3 + n_in)
            w = blocks_of(qtype, 2, n_out, n_in, rng)
            r = repacked(w, n_in, qtype)
            bias = rng.standard_normal(n_out).astype(np.float32)
            x = (rng.standard_normal((20, n_in)) * rng.uniform(0.1, 10, n_in)).astype(np.float32)
            for n_tok in (1, 3, 8, 9, 20):
                got = K.matmul(r, int(qtype), n_in, x[:n_tok], bias, expert=1, n_threads=2, r16_shape=(n_out, 2))
                one = np.stack([K.matmul(w, int(qtype), n_in, x[t:t + 1], bias, expert=1, int8_activations=True)[0]
                                for t in range(n_tok)])
                if n_tok <= 8 or not Q.has_gemm_q8(int(qtype)):
                    assert np.array_equal(got, one), (name, n_out, n_in, n_tok)
                if n_tok <= 8:
                    saved[f"{name}-{n_out}-{n_in}-{n_tok}"] = got
                else:  # the int8 tiles (R16 tile packing) where this level has them
                    assert np.allclose(got, one, rtol=1e-4, atol=1e-4 * np.abs(one).max()), (name, n_out, n_in, n_tok)
                    if Q.has_gemm_q8(int(qtype)):
                        saved[f"tiles-{name}-{n_out}-{n_in}-{n_tok}"] = got
    np.savez(out, **saved)


@pytest.mark.parametrize("level", ["avx2", "avx512vnni"])
def test_r16_at_a_lower_level(level, tmp_path):
    """The AVX2 R16 kernel (csrc/dot_q8_avx2.c, PYENGINE_SIMD=avx2: MXFP4 only) and the AVX-512 ones
    without VBMI (MXFP4's vpshufb form and the other types; PYENGINE_SIMD=avx512vnni) in a child: the
    file layout's int8 bits there (decode, and prompts where there are no tiles), and the same bits
    as this process's R16 kernels."""
    at_level(level, "test_r16", f"check_r16_rows({str(tmp_path / 'there.npz')!r})", cwd=tmp_path)
    # AVX2: MXFP4 alone, and no tiles; the tiles' results where both processes have them
    same_as_here(tmp_path, lambda k: level != "avx2" or k.startswith("MXFP4-"))


def same_as_here(tmp_path, keep=lambda k: True) -> None:
    """A child's check_r16_rows results (tmp_path / there.npz) are this process's, bit for bit, and
    hold exactly the results of this process's that `keep` names."""
    check_r16_rows(str(tmp_path / "here.npz"))
    there, here = np.load(tmp_path / "there.npz"), np.load(tmp_path / "here.npz")
    assert sorted(there.files) == sorted(k for k in here.files if keep(k)) and there.files
    for k in there.files:
        assert np.array_equal(there[k], here[k]), k


@pytest.mark.parametrize("cursors", [1, 4])
def test_r16_prefetch_cursors_change_no_bits(cursors, tmp_path):
    """PYENGINE_R16_PF_CURSORS (how many cursors the R16 kernels prefetch a group's codes from,
    csrc/r16.h) in a child: the setting takes effect, and every type's R16 products (groups that
    prefetch the group two later among them) are this process's bits."""
    env = {k: v for k, v in os.environ.items() if k != "PYENGINE_SIMD"} | {"PYENGINE_R16_PF_CURSORS": str(cursors)}
    in_child("test_r16", f"check_r16_rows({str(tmp_path / 'there.npz')!r})", env=env, cwd=tmp_path,
             setup=f"from pyengine import _model as K; assert K.r16_prefetch_cursors() == {cursors}, "
                   "K.r16_prefetch_cursors(); ")
    assert K.r16_prefetch_cursors() in (1, 4)
    same_as_here(tmp_path)
