"""Attention's merge quantizes its output for the int8 output product as it writes it
(pe_cu_attention_q8, csrc/cuda/attention_cuda.cu), replacing a separate pe_cu_act_q8 launch per layer of
a decode step: the same float output, bit-identical codes, and a decode engine that uses it (heads of
32 and more elements) still agrees with the CPU's int8 path."""

import numpy as np
import pytest

from gguf_factory import write_gptoss_gguf
from test_cuda_engine import TOL, prompt, rel

import pyengine


@pytest.mark.parametrize("hd,H,Hkv,pos", [(32, 4, 2, [5]), (64, 2, 1, [9, 10, 11]), (32, 6, 3, [0, 40])])
def test_attention_output_quantized_as_act_q8(gpu, hd, H, Hkv, pos):
    rng = np.random.default_rng(hd + H + len(pos))
    pos = np.array(pos, dtype=np.int64)
    n_slots, q_dim, kv_dim = 64, H * hd, Hkv * hd
    q = rng.standard_normal((len(pos), q_dim)).astype(np.float32)
    kc = rng.standard_normal((n_slots, kv_dim)).astype(np.float32)
    vc = rng.standard_normal((n_slots, kv_dim)).astype(np.float32) * 3
    sinks = rng.standard_normal(H).astype(np.float32)
    args = (q, pos, kc, vc, H, Hkv, hd, 0, sinks, int(pos.max()) + 1)
    plain = gpu.attention(*args)
    out, codes = gpu.attention(*args, q8=True)
    assert np.array_equal(out, plain)
    want = gpu.act_q8(plain)
    assert all(np.array_equal(codes[key], want[key]) for key in ("qs", "ql", "d"))
    assert np.any(codes["ql"])  # second digits in use: a real test of the rounding
    with pytest.raises(Exception):  # 16-element heads: a warp would straddle two heads
        gpu.attention(q[:, :64], pos, kc[:, :32], vc[:, :32], 4, 2, 16, 0, sinks[:4], int(pos.max()) + 1, q8=True)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("attq8") / "q8_0-mxfp4-hd32.gguf"
    write_gptoss_gguf(p, arch="gpt-oss", n_layer=2, wtype="q8_0", expert_type="mxfp4", seed=11, head_dim=32)
    return p


def test_decode_with_fused_quantize_matches_cpu_int8(gpu, path):
    kv = dict(n_ctx=128, n_threads=2, cache_type_k="f32", cache_type_v="f32")
    cpu, dev = pyengine.Engine(str(path), **kv), pyengine.Engine(str(path), device="cuda", **kv)
    toks = prompt(12, seed=14)
    for t in toks[:-1]:
        assert rel(dev.eval([t]), cpu.eval([t])) < TOL
    dev._model.profile(True)
    dev.eval([toks[-1]])
    ops = dev._model.profile_results()
    dev._model.profile(False)
    # one quantize launch per layer is left (the experts' SwiGLU output); attention's is fused
    assert ops["act_q8"][1] == 2 and ops["attention"][1] == 2
