"""Engine(device="cuda") against the CPU engine on the same files: every layer on the GPU, layers split
between CPU and GPU, experts on the CPU, batched sequences, greedy generation.

Runs on the CUDA emulator everywhere (PYENGINE_CUDA_EMULATOR=1: the kernels' own source compiled for
the CPU) and on the real GPU backend where one is present (the device check, bench/gpu_check.sh)."""

import ctypes

import numpy as np
import pytest
from gguf import GGUFValueType

from gguf_factory import write_gptoss_gguf

import pyengine
from pyengine.model_file import open_model

N_LAYER = 3
TOL = 1e-3  # the bound on the relative error of GPU logits vs the CPU path


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


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
    kernels directly (the emulator records a capture and replays it, as a GPU does)."""
    path = files[("q8_0", "mxfp4")]
    direct = pyengine.Engine(str(path), n_ctx=256, n_threads=2, exact=True, device="cuda", cuda_graphs=False)
    graph = pyengine.Engine(str(path), n_ctx=256, n_threads=2, exact=True, device="cuda")
    assert not direct._model.graphs_active
    assert graph._model.graphs_active
    toks = prompt(10, seed=11)
    assert np.array_equal(direct.eval(toks), graph.eval(toks))
    for t in prompt(5, seed=12):
        assert np.array_equal(direct.eval([t]), graph.eval([t]))
    assert np.array_equal(direct.expert_counts, graph.expert_counts)


@pytest.fixture(scope="module")
def swa_file(tmp_path_factory):
    """Two layers, the first with a 16-token sliding window: its ring size depends on n_batch."""
    path = tmp_path_factory.mktemp("swa") / "swa.gguf"
    write_gptoss_gguf(path, arch="gpt-oss", n_layer=2, seed=6, drop_keys=("attention.sliding_window",),
                      extra_keys={"gpt-oss.attention.sliding_window": (16, GGUFValueType.UINT32)})
    return path


def test_graph_follows_the_cache(gpu, swa_file):
    """The decode graph bakes in every layer's K/V buffers and ring sizes: caches of the same n_ctx
    but another n_batch (another sliding ring), a cache made after another was freed (which can
    reuse its addresses), and alternating caches must each get a graph of their own. The emulator
    replays a capture as a GPU does, so a stale graph shows up here as wrong logits."""
    cpu_model = pyengine.Engine(str(swa_file), n_ctx=64, n_threads=2, exact=True)._model
    hp = pyengine.Engine(str(swa_file), n_ctx=64, exact=True).hparams
    graph = gpu.CudaModel(cpu_model, hp, graphs=True)
    direct = gpu.CudaModel(cpu_model, hp, graphs=False)
    rng = np.random.default_rng(21)

    def pair(n_batch):
        return gpu.CudaKVCache(graph, 64, n_batch), gpu.CudaKVCache(direct, 64, n_batch)

    def step(caches, toks, n_past):
        got = graph.forward(caches[0], toks, n_past, False, 2)
        assert np.array_equal(got, direct.forward(caches[1], toks, n_past, False, 2))

    a = pair(8)
    step(a, rng.integers(0, 297, 8), 0)
    step(a, rng.integers(0, 297, 8), 8)  # 16 positions: the next steps wrap the 24-slot ring
    for i in range(10):
        step(a, [int(rng.integers(0, 297))], 16 + i)
    del a  # freed: the next cache may land on its addresses, with other ring sizes
    b, c = pair(24), pair(8)
    step(b, rng.integers(0, 297, 20), 0)
    step(c, rng.integers(0, 297, 8), 0)
    for i in range(4):  # alternating caches, each step replays the right one
        step(b, [int(rng.integers(0, 297))], 20 + i)
        step(c, [int(rng.integers(0, 297))], 8 + i)
    assert graph.graphs_active


def test_checkpoints_rewind_past_the_rings_on_gpu(gpu, tmp_path):
    """A CUDA cache's sliding-ring checkpoints (its rings copied to the host and back; here layer 0
    runs on the CPU and slides, layer 2 slides on the GPU): rewinding further back than the rings
    keep, to a checkpoint or from one taken a little after the point, continues as a fresh context
    on the same device that evaluated the same chunks."""
    path = tmp_path / "swa3.gguf"
    write_gptoss_gguf(path, arch="gpt-oss", n_layer=3, seed=6, drop_keys=("attention.sliding_window",),
                      extra_keys={"gpt-oss.attention.sliding_window": (16, GGUFValueType.UINT32)})
    toks = prompt(36, seed=31)

    def engine():
        return pyengine.Engine(str(path), n_ctx=128, n_threads=2, exact=True, n_batch=8, device="cuda",
                               n_gpu_layers=2)

    eng, fresh = engine(), engine()
    runner, cache = eng.runner, eng._cache
    assert [n < 128 for n in cache.native.n_slots] == [True, False, True]
    assert 20 - 18 <= cache.native.max_batch(16) < 36 - 25  # 25: past what the rings keep; 18: within reach of 20
    eng.eval(toks[:20])
    runner.take_checkpoint(cache)
    eng.eval(toks[20:])
    assert [c.n for c in cache.checkpoints] == [20]
    for n, kept in ((25, 20), (18, 18)):  # to the checkpoint; from it
        assert runner.rewind(cache, n) == kept
        got = eng.eval(toks[kept:], logits_all=True)
        fresh.reset()
        fresh.eval(toks[:20])
        fresh.truncate(kept)
        assert rel(got, fresh.eval(toks[kept:], logits_all=True)) < 1e-6, n
    assert cache.checkpoints == ()  # the rewind to 18 went before it


def test_states_prompt_cache_and_copies_of_a_gpu_cache(gpu, tmp_path):
    """A CUDA cache's rows (its GPU layers' downloaded slot by slot, its CPU layers' as the CPU keeps
    them) and ring checkpoints go into a state file and back into another engine on the device, into
    the node's prompt cache and back, and into another cache (the n > 1 choices): each continues as
    the uninterrupted cache. States of other row formats are refused both ways."""
    from pyengine.node.prompt_cache import PromptCache

    path = tmp_path / "swa3.gguf"
    write_gptoss_gguf(path, arch="gpt-oss", n_layer=3, seed=6, drop_keys=("attention.sliding_window",),
                      extra_keys={"gpt-oss.attention.sliding_window": (16, GGUFValueType.UINT32)})
    toks, more = prompt(36, seed=32), prompt(5, seed=33)

    def engine(**opts):
        return pyengine.Engine(str(path), n_ctx=128, n_threads=2, exact=True, n_batch=8, **opts)

    eng, later = engine(device="cuda", n_gpu_layers=2), engine(device="cuda", n_gpu_layers=2)
    eng.eval(toks[:20])
    eng.runner.take_checkpoint(eng._cache)
    eng.eval(toks[20:])  # past what the rings keep of position 20
    state = eng.save_state()
    assert state.key[-1] == ("cuda", 1, ("cpu", "key tiles of 16" if pyengine.simd_level() == "avx512" else "rows"))
    state.save(tmp_path / "gpu.pyestate")
    want = eng.eval(more, logits_all=True)
    later.load_state(pyengine.EngineState.load(tmp_path / "gpu.pyestate"))
    assert later.n_past == 36 and [c.n for c in later._cache.checkpoints] == [20]
    assert rel(later.eval(more, logits_all=True), want) < 1e-6
    assert later.runner.rewind(later._cache, 24) == 20  # through the file's checkpoint
    later.eval(toks[20:])
    assert rel(later.eval(more, logits_all=True), want) < 1e-6
    for other in (engine(), engine(device="cuda", n_gpu_layers=3)):  # CPU rows; no CPU-run layer
        with pytest.raises(ValueError, match="another way"):
            other.load_state(state)
        with pytest.raises(ValueError, match="another way"):
            eng.load_state(other.save_state())
    runner, slot = eng.runner, eng.runner.new_cache(128)  # the prompt cache and n > 1 copies
    eng.truncate(36)
    pc = PromptCache(runner, 64 << 20)
    pc.save(eng._cache)
    runner.truncate(eng._cache, 0)
    runner.eval([eng._cache], [prompt(30, seed=34)])  # another conversation takes the cache
    assert pc.restore_best(eng._cache, [*toks, *more]) == 36
    assert rel(eng.eval(more, logits_all=True), want) < 1e-6
    eng.truncate(36)
    assert runner.copy_cache(eng._cache, slot) and slot.tokens == list(toks)
    assert rel(runner.eval([slot], [more], logits_all=True)[0], want) < 1e-6


def test_profile_times_every_operation_once_per_call(gpu, files):
    """Profile mode: one (start, end) event pair per operation, read after the call; each decode
    step adds one call of every per-layer operation per layer, and the times fit in the wall time."""
    import time

    eng = pyengine.Engine(str(files[("q8_0", "mxfp4")]), n_ctx=64, n_threads=2, exact=True, device="cuda")
    eng.eval(prompt(4, seed=22))
    eng._model.profile(True)
    t0 = time.perf_counter()
    eng.eval([5])
    wall_ms = (time.perf_counter() - t0) * 1e3
    first = eng._model.profile_results()
    eng.eval([6])
    second = eng._model.profile_results()
    eng._model.profile(False)
    assert all(calls == 0 and ms == 0 for ms, calls in eng._model.profile_results().values())
    per_layer = ("qkv", "rope", "kv_store", "attention", "attn_out", "router", "experts_gate_up",
                 "swiglu", "experts_down", "moe_combine")
    for op in per_layer:
        assert first[op][1] == N_LAYER, op
    assert first["topk"][1] == 0  # decode: the router's product, top-k and softmax are one kernel
    assert first["output_head"][1] == 1 and first["rmsnorm"][1] == 3  # first layer's norm, gather + final norm
    assert first["add_rmsnorm"][1] == 2 * N_LAYER - 1 and first["add"][1] == 1
    assert all(ms >= 0 for ms, _ in first.values()) and sum(ms for ms, _ in first.values()) <= wall_ms
    for op, (ms, calls) in second.items():
        assert calls == 2 * first[op][1] and ms >= first[op][0], op


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
