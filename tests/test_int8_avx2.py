"""The AVX2 int8 kernels (csrc/dot_q8_avx2.c: every block format), run in child processes
capped at AVX2 (PYENGINE_SIMD=avx2): against float64 on the same two-digit activations, the
several-token form per token bit for bit the one-token kernel, and, where this CPU also runs the
AVX-512 kernels, bit for bit the AVX-512 results on the same inputs. More than 8 tokens at AVX2 run
the same kernels 8 tokens a call (csrc/matmul.c rows_chunks), so a prompt's products are a decoded
token's bit for bit; a whole model: prompt in one batch vs token by token, batched decode vs
decoding alone, 1 vs 2 threads. The same checks at PYENGINE_SIMD=avx512vnni (AVX-512 without VBMI and
BITALG, as Cascade Lake: AVX2's kernels for Q4_0/MXFP4/Q4_1/Q5_0/Q5_1 next to AVX-512's for the
others, the R16 kernel's vpshufb form, and the int8 tiles for prompts)."""

import numpy as np
import pytest

import gguf_factory
import pyengine
import pyengine._quants as Q
from pyengine import _model as K
from pyengine.engine import Engine
from pyengine.model_file import open_model
from simd_levels import at_level
from test_quants import SIZES, T, act_values, random_blocks, reference

TYPES = [T.Q8_0, T.Q4_0, T.MXFP4, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def n_ins(qtype) -> list[int]:
    """Row lengths: 3, 5 and 90 blocks (partial steps of 4 and of 8) or 1, 3, 16 super-blocks."""
    return [256, 768, 4096] if SIZES[qtype][0] == 256 else [96, 160, 2880]

N_TOK = [1, 2, 3, 8]
DIMS = dict(n_vocab=512, n_embd=256, n_ff=256, n_layer=2)


def products(qtype, n_in: int):
    """Seeded rows (300 x n_in), bias and 8 + 23 tokens of activations for one case."""
    rng = np.random.default_rng(int(qtype) * 1000 + n_in)
    rows = random_blocks(qtype, 300 * n_in // SIZES[qtype][0], rng, e8m0=(120, 137)).reshape(300, -1)
    return rows, rng.standard_normal(300).astype(np.float32), rng.standard_normal((31, n_in)).astype(np.float32)


def near_float64(y, w, x, b) -> bool:
    """y (one token's products) within 1e-5 of float64 on the same two-digit activations of x."""
    terms = w * act_values(Q.quantize_act_q8(x))
    return bool((np.abs(y - (terms.sum(1) + b)) <= 1e-5 * (np.abs(terms).sum(1) + np.abs(b))).all())


def check_rows(out: str) -> None:
    """At this process's level: every case against float64 and against the one-token kernel; the
    up-to-8-token results saved to `out` for the parent's bit comparison."""
    assert all(Q.has_dot_q8(int(t)) for t in TYPES)
    saved = {}
    for qtype in TYPES:
        for n_in in n_ins(qtype):
            rows, b, x = products(qtype, n_in)
            w = reference(rows, qtype).reshape(len(rows), -1).astype(np.float64)
            for n_tok in N_TOK:
                y = K.matmul(rows, int(qtype), n_in, x[:n_tok], b, int8_activations=True)
                assert np.array_equal(y, K.matmul(rows, int(qtype), n_in, x[:n_tok], b, n_threads=2,
                                                  int8_activations=True))
                for t in range(n_tok):
                    assert np.array_equal(y[t], Q.dot_rows_q8(rows, x[t], int(qtype)) + b), (qtype.name, n_in, n_tok)
                    assert near_float64(y[t], w, x[t], b), (qtype.name, n_in, n_tok)
                saved[f"{qtype.name}-{n_in}-{n_tok}"] = y
            # more than 8 tokens (a prompt): without int8 tiles (AVX2) the rows kernel 8 tokens a call,
            # so every token's products are the decode kernel's bit for bit; with tiles, float64's
            y = K.matmul(rows, int(qtype), n_in, x[8:], b, n_threads=2, int8_activations=True)
            for t in range(len(y)):
                if not Q.has_gemm_q8(int(qtype)):
                    assert np.array_equal(y[t], Q.dot_rows_q8(rows, x[8 + t], int(qtype)) + b), (qtype.name, n_in, t)
                assert near_float64(y[t], w, x[8 + t], b), (qtype.name, n_in, t)
    np.savez(out, **saved)


def check_model(path: str) -> None:
    """A q8_0 / mxfp4-experts model at this level: a 20-token prompt in one batch bit for bit token
    by token, batched decode bit for bit decoding alone, 1 and 2 threads the same."""
    toks = np.random.default_rng(5).integers(0, DIMS["n_vocab"], 20)
    whole = Engine(path, n_ctx=64, n_threads=2, n_batch=32).eval(toks, logits_all=True)
    eng = Engine(path, n_ctx=64, n_threads=2, n_batch=1)
    one = np.stack([eng.eval([t]) for t in toks])
    # no int8 tiles on AVX2: the prompt's products run the decode kernels (8 tokens a call), and the
    # logits are bit for bit the same (AVX-512's int8 tiles sum in another order: ~5e-5 apart)
    if Q.has_gemm_q8(int(T.Q8_0)):
        assert np.abs(whole - one).max() <= 1e-3 * np.abs(one).max()
    else:
        assert np.array_equal(whole, one), np.abs(whole - one).max()
    eng1 = Engine(path, n_ctx=64, n_threads=1, n_batch=1)
    assert np.array_equal(np.stack([eng1.eval([t]) for t in toks]), one)
    mf = open_model(path)
    prompts = [toks[:3], toks[:11]]
    alone = []
    for p in prompts:
        e = Engine(mf, n_ctx=64, n_threads=2, n_batch=16)
        e.eval(p)
        alone.append([e.eval([t]) for t in (7, 9)])
    lead = Engine(mf, n_ctx=64, n_threads=2, n_batch=16)
    caches = [lead.runner.new_cache(64) for _ in prompts]
    for c, p in zip(caches, prompts):
        lead.runner.eval([c], [p])
    got = [lead.runner.eval(caches, [[t], [t]]) for t in (7, 9)]
    assert np.array_equal(np.array(got), np.array(alone).transpose(1, 0, 2))


LEVELS = ["avx2", "avx512vnni"]


@pytest.mark.parametrize("level", LEVELS)
def test_int8_kernels_match_float64_and_the_avx512_bits(level, tmp_path):
    out = tmp_path / f"{level}.npz"
    at_level(level, "test_int8_avx2", f"check_rows({str(out)!r})", cwd=tmp_path)
    if pyengine.simd_level() != "avx512":
        return
    got = np.load(out)
    compared = 0
    for qtype in TYPES:
        if not Q.has_dot_q8(int(qtype)):
            continue
        for n_in in n_ins(qtype):
            rows, b, x = products(qtype, n_in)
            for n_tok in N_TOK:
                y = K.matmul(rows, int(qtype), n_in, x[:n_tok], b, int8_activations=True)
                assert np.array_equal(y.view(np.uint32), got[f"{qtype.name}-{n_in}-{n_tok}"].view(np.uint32)), \
                    (qtype.name, n_in, n_tok)
                compared += 1
    assert compared >= 3 * len(N_TOK)  # at least Q8_0 (AVX-512 VNNI, no VBMI needed)


@pytest.mark.parametrize("level", LEVELS)
def test_int8_model_prompt_decode_and_batch_agree(level, tmp_path):
    path = tmp_path / "q8_0-mxfp4.gguf"
    gguf_factory.write_gptoss_gguf(path, arch="gpt-oss", wtype="q8_0", expert_type="mxfp4", seed=9, **DIMS)
    at_level(level, "test_int8_avx2", f"check_model({str(path)!r})", cwd=tmp_path)
