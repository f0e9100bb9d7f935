"""Engine(device="cuda") against the CPU engine on the same files: every layer on the GPU, layers split
between CPU and GPU, experts on the CPU, batched sequences, greedy generation.

Runs on the CUDA emulator everywhere (PYENGINE_CUDA_EMULATOR=1: the kernels' own source compiled for
the CPU) and on the real GPU backend where one is present (the device check, bench/gpu_check.sh)."""

import ctypes

import numpy as np
import pytest
from gguf import GGUFValueType

from cuda_backends import BACKENDS
from gguf_factory import write_gptoss_gguf

import pyengine
from pyengine.model_file import open_model

N_LAYER = 3
TOL = 1e-3  # the bound on the relative error of GPU logits vs the CPU path


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(params=[p.values[0] for p in BACKENDS], ids=[p.id for p in BACKENDS])
def gpu(request, monkeypatch):
    """Selects the backend that device="cuda" loads: the emulator or the real one."""
    if request.param.BACKEND == "emulator":
        monkeypatch.setenv("PYENGINE_CUDA_EMULATOR", "1")
    else:
        monkeypatch.delenv("PYENGINE_CUDA_EMULATOR", raising=False)
    return request.param


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda")
    out = {}
    for wtype, etype in (("f32", "f32"), ("f16", "bf16"), ("bf16", "f16"), ("q8_0", "mxfp4")):
        path = d / f"{wtype}-{etype}.gguf"
        write_gptoss_gguf(path, arch="gpt-oss", n_layer=N_LAYER, wtype=wtype, expert_type=etype, seed=5)
        out[(wtype, etype)] = path
    return out


def prompt(n, seed=0):
    return np.random.default_rng(seed).integers(0, 297, n)


def engines(path, **gpu_opts):
    # f32 KV caches: the kernels' rounding differences are compared, not whole f16 steps of K/V that
    # they flip now and then (each cache type on both backends: test_kv_cache_types.py)
    kv = dict(cache_type_k="f32", cache_type_v="f32")
    cpu = pyengine.Engine(str(path), n_ctx=256, n_threads=2, exact=True, **kv)
    gpu = pyengine.Engine(str(path), n_ctx=256, n_threads=2, exact=True, device="cuda", **gpu_opts, **kv)
    return cpu, gpu


@pytest.mark.parametrize("types", [("f32", "f32"), ("f16", "bf16"), ("bf16", "f16"), ("q8_0", "mxfp4")],
                         ids=lambda t: "-".join(t))
def test_prefill_and_decode_match_cpu(gpu, files, types):
    cpu, dev = engines(files[types])
    toks = prompt(40)
    want = cpu.logits(toks)
    got = dev.logits(toks)                      # 40 tokens: the tiled GEMM and grouped experts
    assert got.shape == want.shape
    assert rel(got, want) < TOL
    for t in prompt(6, seed=1):                 # one token at a time: matvec, experts per pair
        assert rel(dev.eval([t]), cpu.eval([t])) < TOL
    assert np.array_equal(dev.expert_counts.sum(axis=1), cpu.expert_counts.sum(axis=1))


def test_split_layers_and_cpu_experts_match_cpu(gpu, files):
    path = files[("q8_0", "mxfp4")]
    cpu = pyengine.Engine(str(path), n_ctx=256, n_threads=2, exact=True)
    toks = prompt(20, seed=2)
    want = cpu.logits(toks)
    want_next = cpu.eval([7])
    for opts in ({"n_gpu_layers": 1}, {"n_gpu_layers": 2, "cpu_moe": True}, {"cpu_moe": True}):
        dev = pyengine.Engine(str(path), n_ctx=256, n_threads=2, exact=True, device="cuda", **opts)
        assert rel(dev.logits(toks), want) < TOL, opts
        assert rel(dev.eval([7]), want_next) < TOL, opts


def greedy(eng, toks, n):
    """n argmax tokens after toks (the decode loop without a tokenizer)."""
    eng.reset()
    out = [int(np.argmax(eng.eval(toks)))]
    while len(out) < n:
        out.append(int(np.argmax(eng.eval([out[-1]]))))
    return out


def test_greedy_continuation_identical_for_32_tokens(gpu, files):
    cpu, dev = engines(files[("q8_0", "mxfp4")])
    toks = list(prompt(12, seed=3))
    want = greedy(cpu, toks, 32)
    assert len(set(want)) > 4                   # a continuation that is not one token repeated
    assert greedy(dev, toks, 32) == want


def test_graph_replay_equals_direct_launches(gpu, files):
    """Decode steps replayed from a captured CUDA graph give the same bits as launching the same
    kernels directly (on the emulator both run directly: there this only checks the option)."""
    path = files[("q8_0", "mxfp4")]
    direct = pyengine.Engine(str(path), n_ctx=256, n_threads=2, exact=True, device="cuda", cuda_graphs=False)
    graph = pyengine.Engine(str(path), n_ctx=256, n_threads=2, exact=True, device="cuda")
    assert not direct._model.graphs_active
    assert graph._model.graphs_active == (gpu.BACKEND == "cuda")
    toks = prompt(10, seed=11)
    assert np.array_equal(direct.eval(toks), graph.eval(toks))
    for t in prompt(5, seed=12):
        assert np.array_equal(direct.eval([t]), graph.eval([t]))
    assert np.array_equal(direct.expert_counts, graph.expert_counts)


def test_stacked_qkv_and_gate_up_equal_separate_products(gpu, files):
    """The fused upload (q|k|v rows in one matrix, each expert's gate|up rows in one) computes what
    the separate matrices do, which files whose q/k/v or gate/up types differ still use."""
    path = files[("q8_0", "mxfp4")]
    fused = pyengine.Engine(str(path), n_ctx=64, n_threads=2, exact=True, device="cuda")
    cpu_model = pyengine.Engine(str(path), n_ctx=64, n_threads=2, exact=True)._model
    apart = gpu.CudaModel(cpu_model, fused.hparams, fuse=False)
    cache = gpu.CudaKVCache(apart, 64, 512)
    toks = prompt(12, seed=13)
    got = apart.forward(cache, toks, 0, True, 2)
    np.testing.assert_allclose(got, fused.logits(toks), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apart.forward(cache, [3], 12, False, 2), fused.eval([3]), rtol=1e-5, atol=1e-5)
    assert apart.weight_bytes == fused._model.weight_bytes


def test_batched_sequences_match_single(gpu, files):
    path = files[("q8_0", "mxfp4")]
    mf = open_model(str(path))
    a, b = (pyengine.Engine(mf, n_ctx=256, n_threads=2, exact=True, device="cuda") for _ in range(2))
    assert a._model is b._model                 # engines sharing a ModelFile share one upload
    caches = [a._cache, a.runner.new_cache(256)]  # two sequences over one model
    pa, pb = prompt(9, seed=4), prompt(5, seed=5)
    la, lb = a.runner.eval(caches, [pa, pb])
    cpu = pyengine.Engine(str(path), n_ctx=256, n_threads=2, exact=True)
    assert rel(la, cpu.logits(pa)[-1]) < TOL
    assert rel(lb, cpu.logits(pb)[-1]) < TOL
    la, lb = a.runner.eval(caches, [[3], [4]])  # a decode round of two sequences
    assert rel(lb, cpu.logits(list(pb) + [4])[-1]) < TOL
    assert rel(la, cpu.logits(list(pa) + [3])[-1]) < TOL


def test_sliding_ring_wraps_on_gpu(gpu, tmp_path):
    """A context longer than the sliding window (ring caches wrap) still matches the CPU."""
    path = tmp_path / "swa.gguf"
    write_gptoss_gguf(path, arch="gpt-oss", n_layer=2, seed=6, drop_keys=("attention.sliding_window",),
                      extra_keys={"gpt-oss.attention.sliding_window": (16, GGUFValueType.UINT32)})
    cpu = pyengine.Engine(str(path), n_ctx=128, n_threads=2, exact=True, n_batch=8)
    dev = pyengine.Engine(str(path), n_ctx=128, n_threads=2, exact=True, n_batch=8, device="cuda")
    toks = prompt(40, seed=7)
    assert rel(dev.logits(toks), cpu.logits(toks)) < TOL


KQ_FTYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K")


@pytest.fixture(scope="module")
def kquant_files(tmp_path_factory):
    """llama.cpp's own quantizer on a 256-wide model (K-quant rows are whole 256-element blocks)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    d = tmp_path_factory.mktemp("kq")
    src = d / "f32.gguf"
    write_gptoss_gguf(src, arch="gpt-oss", n_layer=2, seed=8, n_embd=256, n_ff=256, n_head=4, head_dim=64)
    out = {}
    for name in KQ_FTYPES:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
        params.nthread = 2
        dst = d / f"{name}.gguf"
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
        out[name] = dst
    return out


@pytest.mark.parametrize("ftype", KQ_FTYPES)
def test_llama_cpp_quantized_files_match_cpu(gpu, kquant_files, ftype):
    cpu, dev = engines(kquant_files[ftype])
    toks = prompt(12, seed=9)
    types = {t.ggml_type for t in cpu.model_file.tensors.values()}
    assert len(types) > 1
    assert rel(dev.logits(toks), cpu.logits(toks)) < TOL
    assert rel(dev.eval([5]), cpu.eval([5])) < TOL


def test_bad_input_raises_before_the_gpu_sees_it(gpu, files):
    dev = pyengine.Engine(str(files[("f32", "f32")]), n_ctx=32, n_threads=2, exact=True, device="cuda")
    with pytest.raises(ValueError, match="out of range"):
        dev.eval([dev.n_vocab])
    with pytest.raises(ValueError, match="exceed the context"):
        dev.eval(list(range(33)))
    with pytest.raises(ValueError, match="another model"):
        dev._model.forward(pyengine.Engine(str(files[("f32", "f32")]), n_ctx=32, exact=True)._cache.native, [1], 0, False, 1)
    assert dev.n_past == 0
    assert dev.eval([1, 2]).shape == (dev.n_vocab,)   # still usable


def test_device_errors(files, monkeypatch):
    path = str(files[("f32", "f32")])
    with pytest.raises(ValueError, match="unknown device"):
        pyengine.Engine(path, device="tpu")
    monkeypatch.setenv("PYENGINE_CUDA_EMULATOR", "1")
    with pytest.raises(ValueError, match="n_gpu_layers=0"):
        pyengine.Engine(path, device="cuda", n_gpu_layers=0)
    with pytest.raises(ValueError, match="cuda:3"):
        pyengine.Engine(path, device="cuda:3")
