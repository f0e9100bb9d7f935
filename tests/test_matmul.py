"""Batched matmul (prefill: pe_matmul with n_tok > 1, the register-blocked kernel) against float64
numpy for every weight type, on odd shapes: n_out not a multiple of the 16-row tile or the 4-row
block, n_tok 2..70 (crossing the 6-token block and the 48-token scratch chunk), n_in with tails that
are not multiples of 64 or 16. Also the invariants the forward pass relies on: the batch gives the
same bits for any thread count, as one-token decode on F32 weights, and as F32 weights holding the
dequantized values (every type goes through the same f32 kernel), at every SIMD level."""

import numpy as np
import pytest

from test_quants import SIZES, TYPES, T, random_blocks, reference
from simd_levels import LOWER, at_level

K = pytest.importorskip("pyengine._model")

N_OUT = [1, 5, 17, 37]
N_TOK = [2, 3, 7, 13, 49, 70]


def n_ins(qtype) -> list[int]:
    blck = SIZES[qtype][0]
    if blck == 1:
        # tails of 15, 0, 2 (+ a 16-chunk), 1, 8 (+ 16-chunks); 1100: 17 64-element steps cut into
        # spans of 512 by the several-token kernel (quants_avx512.c), then a 16-chunk and 12
        return [7, 16, 50, 129, 200, 1100]
    if blck == 32:
        return [32, 96, 160]
    return [256, 768]


def weights(qtype, n_out: int, n_in: int, rng) -> np.ndarray:
    """uint8 (n_out, row_bytes) of random blocks (MXFP4 block scales 2^-8..2^8: finite products)."""
    row_bytes = n_in // SIZES[qtype][0] * SIZES[qtype][1]
    blocks = random_blocks(qtype, n_out * n_in // SIZES[qtype][0], rng, e8m0=(120, 137))
    return blocks.reshape(n_out, row_bytes)


def dequantized(rows: np.ndarray, qtype) -> np.ndarray:
    return reference(rows, qtype).reshape(rows.shape[0], -1)


def check_against_float64(qtype, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n_in in n_ins(qtype):
        for n_out in N_OUT:
            rows = weights(qtype, n_out, n_in, rng)
            w = dequantized(rows, qtype).astype(np.float64)
            for n_tok in N_TOK:
                x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
                b = rng.standard_normal(n_out).astype(np.float32)
                y = K.matmul(rows, int(qtype), n_in, x, b)
                ref = x.astype(np.float64) @ w.T + b
                bound = np.abs(x.astype(np.float64)) @ np.abs(w).T + np.abs(b)
                err = np.abs(y - ref)
                assert np.all(err <= 2e-6 * bound + 1e-30), \
                    (qtype.name, n_in, n_out, n_tok, float((err / bound).max()))


def check_bit_invariants(qtype, seed: int) -> None:
    """Same bits: 1 vs 2 threads, this type vs F32 rows of its dequantized values, and (F32) each
    row of the batch vs that token alone (the one-token path is the F32 dot_f32), and up to 8 tokens
    (the row-wise path) each token vs that token alone, for every type."""
    rng = np.random.default_rng(seed)
    n_out, n_tok = 133, 70
    for n_in in n_ins(qtype):
        rows = weights(qtype, n_out, n_in, rng)
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        y = K.matmul(rows, int(qtype), n_in, x)
        assert np.array_equal(y, K.matmul(rows, int(qtype), n_in, x, n_threads=2)), (qtype.name, n_in)
        f32 = np.ascontiguousarray(dequantized(rows, qtype)).view(np.uint8)
        assert np.array_equal(y, K.matmul(f32, int(T.F32), n_in, x)), (qtype.name, n_in)
        if qtype == T.F32:
            for t in (0, 5, 48, 69):
                assert np.array_equal(y[t:t + 1], K.matmul(rows, int(T.F32), n_in, x[t:t + 1])), (n_in, t)
        # up to 8 tokens (a batched decode step): every token gets exactly its one-token result, for
        # counts the several-token kernels split differently (AVX-512 floats: 4 tokens a pass, the
        # rest in one of 1-3; the int8 kernels: any count at once)
        one = np.concatenate([K.matmul(rows, int(qtype), n_in, x[t:t + 1]) for t in range(3, 11)])
        for n in (2, 3, 5, 8):
            assert np.array_equal(K.matmul(rows, int(qtype), n_in, x[3:3 + n]), one[:n]), (qtype.name, n_in, n)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_batched_matmul_matches_float64(qtype):
    check_against_float64(qtype, seed=int(qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_batched_matmul_bit_invariants(qtype):
    check_bit_invariants(qtype, seed=100 + int(qtype))


def test_batched_matmul_strided_rows_and_experts():
    rng = np.random.default_rng(7)
    n_exp, n_out, n_in, n_tok = 3, 21, 160, 9
    raw = weights(T.Q8_0, n_exp * 2 * n_out, n_in, rng).reshape(n_exp, 2 * n_out, -1)
    rows = raw[:, ::2]  # every other row of every expert: strided rows and experts
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    for e in range(n_exp):
        w = dequantized(np.ascontiguousarray(rows[e]), T.Q8_0).astype(np.float64)
        ref = x.astype(np.float64) @ w.T
        y = K.matmul(rows, int(T.Q8_0), n_in, x, expert=e)
        assert np.all(np.abs(y - ref) <= 2e-6 * (np.abs(x) @ np.abs(w).T)), e


@pytest.mark.parametrize("level", LOWER)
def test_batched_matmul_other_simd_levels(level, tmp_path):
    """The same checks with PYENGINE_SIMD capping the kernels."""
    at_level(level, "test_matmul", "check_against_float64(t.T.F32, 1)", "check_bit_invariants(t.T.F32, 2)",
             "check_against_float64(t.T.F16, 1)", "check_bit_invariants(t.T.F16, 2)",
             "check_against_float64(t.T.Q4_K, 1)", "check_bit_invariants(t.T.Q4_K, 2)", cwd=tmp_path)
