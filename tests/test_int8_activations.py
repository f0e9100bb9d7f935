"""int8 activations, the default for quantized weights (Engine(exact=False); pe_weight.int8_act).

Up to 8 tokens, products with weights whose type has an int8 kernel quantize each token's
activations once (pe_act_q8: int8 codes, a float scale per 32) and use the kernel. Checked here:
pe_matmul against float64 on the quantized activations and against the kernel (bit for bit, flag
on and off), the flag having no effect where it must not (types without a kernel, more than 8
tokens), and the whole model against transformers in float64 on the dequantized weights (with and
without the activations rounded as the kernels round them), thread-count determinism, batched
decode equal to decoding alone, and exact=True restoring the float32 path."""

import numpy as np
import pytest

import gguf_factory
import pyengine._quants as Q
from pyengine import _model as K
from pyengine.engine import Engine
from pyengine.gguf_reader import type_name
from pyengine.model_file import open_model
from test_quants import SIZES, T, act_values, random_blocks, reference

Q8_TYPES = [T.Q8_0, T.Q4_0, T.MXFP4]
pytestmark = pytest.mark.skipif(not Q.has_dot_q8(int(T.Q8_0)), reason="no int8 kernels on this CPU (AVX-512 VNNI)")
# wide enough that every product of one token is split across 2 threads (pe_matmul starts a second
# thread from 2 * 32768 multiply-adds), small enough for transformers in float64
DIMS = dict(n_vocab=1024, n_embd=256, n_ff=256, n_layer=2)


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def rows_of(qtype, n_out: int, n_in: int, rng) -> np.ndarray:
    blocks = random_blocks(qtype, n_out * n_in // SIZES[qtype][0], rng, e8m0=(120, 137))
    return blocks.reshape(n_out, -1)


# 32-blocks: 3 blocks (a lone partial step of 4), 5 (a step and one block), 16, 90 (22 steps and two
# blocks); K-quants: 1, 3 and 12 super-blocks
ROW_TYPES = Q8_TYPES + [T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
ROW_CASES = [(q, n) for q in ROW_TYPES for n in ([96, 160, 512, 2880] if SIZES[q][0] == 32 else [256, 768, 3072])]


@pytest.mark.parametrize("qtype,n_in", ROW_CASES, ids=lambda v: v.name if isinstance(v, T) else str(v))
def test_matmul_int8_equals_q8_kernels_and_float64(qtype, n_in):
    """Up to 8 tokens: the rows kernels (the several-token forms decode a row once for all tokens),
    per token bit for bit the one-token kernel, 1 and 2 threads alike, within float rounding of
    float64 on the same two-digit activations."""
    if not Q.has_dot_q8(int(qtype)):
        pytest.skip(f"no int8 kernel for {qtype.name} on this CPU")
    rng = np.random.default_rng(int(qtype) + n_in)
    n_out = 300                                  # n_in 512: 153600 multiply-adds per token, 2 threads
    rows = rows_of(qtype, n_out, n_in, rng)
    w = reference(rows, qtype).reshape(n_out, -1).astype(np.float64)
    b = rng.standard_normal(n_out).astype(np.float32)
    for n_tok in (1, 2, 3, 5, 8):  # several tokens: the kernels' several-token form, per token dot_q8's bits
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        y = K.matmul(rows, int(qtype), n_in, x, b, int8_activations=True)
        assert np.array_equal(y, K.matmul(rows, int(qtype), n_in, x, b, n_threads=2, int8_activations=True))
        off = K.matmul(rows, int(qtype), n_in, x, b)
        for t in range(n_tok):
            # the flag selects exactly the int8 kernel: dot_q8 on, dot_f32 off (bias added after)
            assert np.array_equal(y[t], Q.dot_rows_q8(rows, x[t], int(qtype)) + b)
            assert np.array_equal(off[t], Q.dot_rows(rows, x[t], int(qtype)) + b)
            xd = act_values(Q.quantize_act_q8(x[t]))
            terms = w * xd
            err = np.abs(y[t] - (terms.sum(1) + b))
            assert (err <= 1e-5 * (np.abs(terms).sum(1) + np.abs(b))).all(), (qtype.name, n_tok, err.max())
        assert not np.array_equal(y, off)           # the int8 path was taken
        assert rel(y, off.astype(np.float64)) < 1e-4  # and, with two digits, close to the f32 one


# the tile kernel's types: the 32-blocks (n_in 96, 160: 3 and 5 blocks) and the K-quants (256-blocks)
GEMM_TYPES = ROW_TYPES  # every type with a rows kernel has a tile kernel too
GEMM_SHAPES = {32: [(2880, 70), (96, 33), (160, 16), (512, 300)], 256: [(3072, 70), (256, 33), (768, 5), (512, 300)]}


@pytest.mark.parametrize("shape", range(4))
@pytest.mark.parametrize("qtype", GEMM_TYPES, ids=lambda t: t.name)
def test_batched_int8_products_match_float64(qtype, shape):
    """More than 8 tokens: the tiled int8 kernel (gemm_q8_avx512.c), against float64 on the same
    two-digit activations, thread-count and token-grouping independent (23 tokens: groups of 4 and
    a tail of 3; row tails nr < 16), and within float rounding of the decode kernel (the same
    integer sums, summed in another order)."""
    n_in, n_out = GEMM_SHAPES[SIZES[qtype][0]][shape]
    assert Q.has_gemm_q8(int(qtype)), f"{qtype.name} has no int8 tile kernel"
    rng = np.random.default_rng(int(qtype) * 7 + n_in)
    rows = rows_of(qtype, n_out, n_in, rng)
    w = reference(rows, qtype).reshape(n_out, -1).astype(np.float64)
    b = rng.standard_normal(n_out).astype(np.float32)
    x = rng.standard_normal((23, n_in)).astype(np.float32)
    y = K.matmul(rows, int(qtype), n_in, x, b, n_threads=2, int8_activations=True)
    assert np.array_equal(y, K.matmul(rows, int(qtype), n_in, x, b, n_threads=1, int8_activations=True))
    split = [K.matmul(rows, int(qtype), n_in, x[i:j], b, int8_activations=True) for i, j in ((0, 9), (9, 23))]
    assert np.array_equal(y, np.concatenate(split))
    for t in range(len(x)):
        terms = w * act_values(Q.quantize_act_q8(x[t]))
        scale = np.abs(terms).sum(1) + np.abs(b)
        err = np.abs(y[t] - (terms.sum(1) + b))
        assert (err <= 1e-6 * scale).all(), (qtype.name, t, (err / scale).max())
        if Q.has_dot_q8(int(qtype)):
            dec = Q.dot_rows_q8(rows, x[t], int(qtype)) + b
            assert (np.abs(y[t] - dec) <= 2e-6 * scale).all(), (qtype.name, t)
    exact = K.matmul(rows, int(qtype), n_in, x, b).astype(np.float64)
    assert not np.array_equal(y, exact)  # the int8 path was taken
    assert rel(y, exact) < 1e-4


@pytest.mark.parametrize("qtype", GEMM_TYPES, ids=lambda t: t.name)
def test_batched_int8_one_hot_tokens_pick_their_element(qtype):
    """Token t is one-hot at element t (code 127, scale 1/127): the tile kernel must return column t
    of the dequantized rows, which catches an element order (unpack, repack, per-sub-block scale
    or minimum) that is right on random data only on average."""
    rng = np.random.default_rng(int(qtype) + 11)
    n_in, n_out = 512, 21
    rows = rows_of(qtype, n_out, n_in, rng)
    deq = reference(rows, qtype).reshape(n_out, -1).astype(np.float64)
    x = np.eye(n_in, dtype=np.float32)
    y = K.matmul(rows, int(qtype), n_in, x, int8_activations=True)
    np.testing.assert_allclose(y, deq.T, rtol=1e-5, atol=1e-30, err_msg=qtype.name)


@pytest.mark.parametrize("qtype,n_tok", [(T.F32, 1), (T.F16, 8), (T.BF16, 20)], ids=lambda v: getattr(v, "name", str(v)))
def test_flag_changes_nothing_beyond_its_scope(qtype, n_tok):
    """Types without int8 kernels: the same bits with the flag on or off."""
    rng = np.random.default_rng(7)
    n_in = 256
    rows = rows_of(qtype, 40, n_in, rng)
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    on = K.matmul(rows, int(qtype), n_in, x, int8_activations=True)
    assert np.array_equal(on, K.matmul(rows, int(qtype), n_in, x))


# ---- the whole model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(path, represented float32 weights) of a q8_0 / mxfp4-experts file."""
    path = tmp_path_factory.mktemp("int8") / "q8_0-mxfp4.gguf"
    return path, gguf_factory.write_gptoss_gguf(path, arch="gpt-oss", wtype="q8_0", expert_type="mxfp4",
                                                seed=4, **DIMS)


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, DIMS["n_vocab"], n)


def q8_round_trip(x):
    """x (torch, last axis a multiple of 32) through the two int8 digits and back, as
    pe_act_q8_quantize rounds (d = amax / 127, v = x / d, q = round-half-away(v), ql =
    round-half-away((v - q) * 254), x' = d * (q + ql / 254)), in x's dtype."""
    import torch

    def away(v):
        return torch.sign(v) * torch.floor(v.abs() + 0.5)

    b = x.reshape(*x.shape[:-1], -1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    v = b * torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = away(v)
    return (d * (q + away((v - q) * 254) / 254)).reshape(x.shape)


def hf_with_q8_activations(model, float_projections=()):
    """transformers' model with every input of a Q8_0 / MXFP4 weight (attention projections, the
    output head, the experts) rounded through Q8_0 first: what int8_activations computes, in the
    model's dtype. The router (F32 in these files) keeps its float input, and so do the attention
    projections named in float_projections ("q_proj", ...: float weights in the file)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if name not in float_projections:
                getattr(layer.self_attn, name).register_forward_pre_hook(
                    lambda mod, args: (q8_round_trip(args[0]),) + args[1:])
        assert isinstance(layer.mlp.experts, GptOssExperts)
        layer.mlp.experts.forward = _q8_experts_forward.__get__(layer.mlp.experts)
    model.lm_head.register_forward_pre_hook(lambda mod, args: (q8_round_trip(args[0]),) + args[1:])
    return model


def _q8_experts_forward(self, hidden_states, router_indices=None, routing_weights=None):
    """GptOssExperts.forward (eager, per expert) with Q8_0-rounded inputs to both products."""
    import torch

    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        rank, tok = torch.where(router_indices.T == e)
        if tok.numel():
            gate_up = q8_round_trip(hidden_states[tok]) @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
            y = q8_round_trip(self._apply_gate(gate_up)) @ self.down_proj[e] + self.down_proj_bias[e]
            out.index_add_(0, tok, y * routing_weights[tok, rank, None])
    return out


def test_int8_logits_match_transformers_float64(model):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from gptoss_reference import hf_logits, hf_model_from_gguf_weights, to_float64

    path, weights = model
    toks = tokens(160, 1)                          # beyond the 128-token sliding window
    # n_batch=8: every product of every chunk takes the row-wise (int8) path; an f32 KV cache: the
    # activations' rounding alone is measured
    kv = dict(cache_type_k="f32", cache_type_v="f32")
    on = Engine(path, n_ctx=256, n_threads=2, n_batch=8, **kv)
    off = Engine(path, n_ctx=256, n_threads=2, n_batch=8, exact=True, **kv)
    got_on, got_off = on.logits(toks), off.logits(toks)
    hf = to_float64(hf_model_from_gguf_weights(weights, on.hparams), on.hparams)
    exact = hf_logits(hf, toks)
    emulated = hf_logits(hf_with_q8_activations(hf), toks)
    err_off, err_on, err_emul = rel(got_off, exact), rel(got_on, emulated), rel(emulated, exact)
    agree = np.mean(np.argmax(got_on, 1) == np.argmax(exact, 1))
    print(f"f32 activations vs transformers(float64) {err_off:.2e}; int8 activations vs transformers(float64, "
          f"Q8_0-rounded activations) {err_on:.2e}; the rounding itself {err_emul:.2e} (argmax agreement {agree:.3f})")
    assert err_off <= 1e-4
    # The distance from the emulation comes from float32 vs float64 activations sometimes rounding to
    # a neighbouring step; the two-digit rounding itself moves this random model's logits by ~2e-3
    # (one digit, as llama.cpp: ~1e-1 to 4e-1; its attention and routing amplify small changes).
    assert err_on <= 3e-3
    assert rel(got_on, exact) <= 1e-2
    assert not np.array_equal(got_on, got_off)


def test_float_and_int8_products_in_one_pass(tmp_path):
    """q|k|v run as one pass of row groups (pe_matmul_many); with an F16 attn_q among Q8_0 k and v
    the pass mixes the float dot (q reads x as it is) and the int8 kernels (k, v share one quantized
    x): the logits match transformers with exactly those inputs rounded, and 1 and 2 threads agree."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from gptoss_reference import hf_logits, hf_model_from_gguf_weights, to_float64

    path = tmp_path / "mixed.gguf"
    weights = gguf_factory.write_gptoss_gguf(path, arch="gpt-oss", wtype="q8_0", expert_type="mxfp4", seed=6,
                                             type_overrides={"attn_q.weight": "f16"}, **DIMS)
    types = {n: type_name(t.ggml_type) for n, t in open_model(path).raw_tensors.items()}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_k.weight"] == "Q8_0"
    toks = tokens(40, 5)
    kv = dict(cache_type_k="f32", cache_type_v="f32")
    engines = [Engine(path, n_ctx=64, n_threads=n, n_batch=8, **kv) for n in (1, 2)]
    runs = [eng.logits(toks) for eng in engines]
    np.testing.assert_array_equal(runs[0], runs[1])
    hp = engines[0].hparams
    hf = to_float64(hf_model_from_gguf_weights(weights, hp), hp)
    emulated = hf_logits(hf_with_q8_activations(hf, float_projections=("q_proj",)), toks)
    assert rel(runs[0], emulated) <= 3e-3


def test_thread_count_does_not_change_int8_logits(model):
    path, _ = model
    toks = tokens(40, 2)
    runs = []
    for n in (1, 2):
        eng = Engine(path, n_ctx=64, n_threads=n, n_batch=8)
        runs.append(np.concatenate([eng.eval(toks[:20], logits_all=True)] + [eng.eval([t])[None] for t in toks[20:]]))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_prefill_tiles_of_every_expert_in_one_team(model):
    """A prefill whose experts get more tokens than the row-wise kernels take runs every expert's gate
    and up (then down) in int8 tiles in one thread team, each input quantized once (csrc/matmul.c,
    tiles_many): the same logits for 1 and 2 threads, and the row-wise kernels' (n_batch=8, every
    product row-wise) up to the tiles' summation order."""
    path, _ = model
    toks = tokens(96, 5)  # 96 tokens x 4 of 8 experts: ~48 a expert, all in tiles
    tiles = [Engine(path, n_ctx=128, n_threads=n, n_batch=96).eval(toks, logits_all=True) for n in (1, 2)]
    np.testing.assert_array_equal(tiles[0], tiles[1])
    rows = Engine(path, n_ctx=128, n_threads=2, n_batch=8).eval(toks, logits_all=True)
    assert not np.array_equal(tiles[1], rows)  # the tiles did run
    # 8.4e-5 here, as before tiles_many (the same bits as one expert's product after another): the
    # tiles add a row's sub-blocks in another order, and two layers of routing and attention amplify
    # it; a job given another job's activations, constants or bias would be orders of magnitude off
    assert rel(tiles[1], rows) < 1e-3


def test_default_is_int8_and_exact_restores_f32(model):
    path, _ = model
    toks = tokens(12, 3)
    default = Engine(path, n_ctx=64, n_threads=2, n_batch=8).logits(toks[:5])
    assert Engine(path, n_ctx=64).exact is False
    np.testing.assert_array_equal(default, Engine(path, n_ctx=64, n_threads=2, n_batch=8, exact=False).logits(toks[:5]))
    exact = Engine(path, n_ctx=64, n_threads=2, n_batch=8, exact=True).logits(toks[:5])
    assert not np.array_equal(default, exact)


def test_batched_decode_equals_single_decode_with_int8(model):
    path, _ = model
    mf = open_model(path)
    prompts = [tokens(n, 10 + n) for n in (3, 30, 140)]

    def engines():
        return [Engine(mf, n_ctx=200, n_batch=16, n_threads=2) for _ in prompts]

    fed, ref = [], []
    for eng, p in zip(engines(), prompts):
        last, toks, rows = eng.eval(p), [], []
        for _ in range(4):
            toks.append(int(np.argmax(last)))
            last = eng.eval([toks[-1]])
            rows.append(last)
        fed.append(toks)
        ref.append(rows)
    lead = engines()[0]  # one int8 model, a cache per sequence (the node's layout)
    caches = [lead.runner.new_cache(200) for _ in prompts]
    for cache, p in zip(caches, prompts):
        lead.runner.eval([cache], [p])
    got = [lead.runner.eval(caches, [[t[s]] for t in fed]) for s in range(4)]
    np.testing.assert_array_equal(np.array(got), np.array(ref).transpose(1, 0, 2))


def test_cli_exact_flag_reaches_the_engine(model, capsys):
    import argparse
    import json

    from pyengine import cli
    from pyengine.commands import _terminal

    path, _ = model
    assert cli.main(["bench", str(path), "-p", "8", "-n", "4", "-r", "1", "-o", "json", "--exact"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["n_gen"] for r in rows] == [0, 4] and all(r["avg_ts"] > 0 for r in rows)
    for flag, want in (([], False), (["--exact"], True)):
        p = argparse.ArgumentParser()
        _terminal.add_arguments(p)
        assert _terminal.open_engine(p.parse_args([str(path), "-c", "64", *flag])).exact is want
