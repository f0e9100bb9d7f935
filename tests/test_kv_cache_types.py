"""KV cache types (-ctk/-ctv, Engine(cache_type_k=, cache_type_v=)): f32, f16, bf16, q8_0.

The writers (csrc/quants_*.c quantize_row, and the CUDA store) against numpy / gguf-py bit for bit at
every SIMD level; attention over each type against float64 attention over the same rounded K/V, on
the CPU and the CUDA backends; each type's accuracy against the f32 cache on a small random gpt-oss
(max relative logit error, greedy agreement over 32 tokens), CPU and CUDA; memory accounting;
validation of the option values."""

import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize as gguf_quantize

import vocab
from cuda_backends import BACKENDS
from gguf_factory import write_gptoss_gguf
from simd_levels import LOWER, at_level

import dataclasses

import pyengine
from pyengine import _model, _quants
from pyengine import engine as engine_mod
from pyengine.bench import BenchResult, markdown
from pyengine.convert import write_gguf
from pyengine.demo_model import RandomWeights, demo_config
from pyengine.errors import ContextMemoryError
from pyengine.hf_tokenizer import GGUFTokenizer
from pyengine.quants import dequantize

TYPES = ["f32", "f16", "bf16", "q8_0"]
GGML = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}


def bf16_rne(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even, NaN quiet (ggml's fp32_to_bf16), in numpy."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 64).astype(np.uint16), r)


def reference_bytes(x: np.ndarray, name: str) -> np.ndarray:
    """The bytes llama.cpp's cache would hold for the float32 rows x."""
    if name == "f32":
        return x.view(np.uint8)
    if name == "f16":
        with np.errstate(over="ignore"):  # beyond 65504: inf, as the writer
            return x.astype(np.float16).view(np.uint8)
    if name == "bf16":
        return bf16_rne(x).view(np.uint8)
    return gguf_quantize(x, T.Q8_0)


def random_rows(seed: int, n_rows: int = 64, n: int = 256) -> np.ndarray:
    """float32 rows spanning many binades (f16 subnormals and overflow included), some zero blocks."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n)) * np.exp2(rng.integers(-30, 20, (n_rows, 1)))
    x[::7, :32] = 0.0
    x[3, 5] = np.inf
    x[4, 7] = -np.inf
    return x.astype(np.float32)


def check_writers() -> None:
    """Every writer of this process's SIMD level equals the reference bytes (also run per level)."""
    for seed in range(3):
        x = random_rows(seed)
        for name in TYPES:
            if name == "q8_0":  # infinities have no Q8_0 code: finite rows only
                x = np.nan_to_num(x, posinf=0, neginf=0)
            got = _quants.quantize_rows(x, int(GGML[name]))
            assert np.array_equal(got, reference_bytes(x, name).reshape(got.shape)), (name, seed)


def test_writers_bit_identical_to_numpy_and_gguf():
    check_writers()


@pytest.mark.parametrize("level", LOWER)
def test_writers_at_lower_simd_levels(level, tmp_path):
    at_level(level, "test_kv_cache_types", "check_writers()", "check_attention()", cwd=tmp_path)


def test_writer_rejects_other_types():
    with pytest.raises(ValueError, match="no writer"):
        _quants.quantize_rows(np.zeros((1, 32), np.float32), int(T.Q4_0))
    with pytest.raises(ValueError, match="whole 32-element blocks"):
        _quants.quantize_rows(np.zeros((1, 31), np.float32), int(T.Q8_0))


# ---- attention over each type ------------------------------------------------------------------

def attention_ref(q, k, v, sinks, pos0, window):
    """float64 attention with sinks of q (n_tok, H, hd) at pos0.. over k, v (positions, Hkv, hd)."""
    n_tok, H, hd = q.shape
    group = H // k.shape[1]
    out = np.zeros(q.shape)
    for t in range(n_tok):
        p = pos0 + t
        lo = max(0, p - window + 1) if window else 0
        for h in range(H):
            kk, vv = k[lo:p + 1, h // group].astype(np.float64), v[lo:p + 1, h // group].astype(np.float64)
            s = kk @ q[t, h].astype(np.float64) / np.sqrt(hd)
            m = max(s.max(), sinks[h])
            e = np.exp(s - m)
            out[t, h] = e @ vv / (e.sum() + np.exp(sinks[h] - m))
    return out


def rounded(x: np.ndarray, name: str) -> np.ndarray:
    """x (positions, Hkv, hd) as the cache type stores it, read back as float32."""
    rows = x.reshape(x.shape[0], -1)
    return dequantize(_quants.quantize_rows(rows, int(GGML[name])), int(GGML[name])).reshape(x.shape)


def attention_case(seed, n_tok=5, pos0=70, H=8, Hkv=2, hd=64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n_tok, H, hd)).astype(np.float32)
    k = (rng.standard_normal((pos0 + n_tok, Hkv, hd)) * 2).astype(np.float32)
    v = rng.standard_normal((pos0 + n_tok, Hkv, hd)).astype(np.float32)
    return q, k, v, rng.standard_normal(H).astype(np.float32)


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def check_attention() -> None:
    """CPU attention over each (K, V) type pair equals float64 attention over the same rounded K/V,
    and does not depend on the thread count."""
    for window, n_slots in ((0, 75), (32, 40)):
        q, k, v, sinks = attention_case(window)
        for tk in TYPES:
            for tv in TYPES:
                got = _model.attention(q, k, v, sinks, 70, window, n_slots, 1, tk, tv)
                want = attention_ref(q, rounded(k, tk), rounded(v, tv), sinks, 70, window)
                assert rel(got, want) < 2e-6, (tk, tv, window)
                assert np.array_equal(got, _model.attention(q, k, v, sinks, 70, window, n_slots, 2, tk, tv))


def test_attention_over_each_type_matches_float64():
    check_attention()


@pytest.mark.parametrize("H,Hkv,hd", [(6, 2, 64), (16, 2, 64), (8, 2, 32), (3, 3, 96)])
def test_attention_head_groupings(H, Hkv, hd):
    """Query heads per K/V head not a multiple of the 4 an item takes (6/2: one item of 3), two items
    per K/V head (16/2), and head sizes other than 64 (the AVX-512 loop's own case): float64 again."""
    q, k, v, sinks = attention_case(11, n_tok=3, pos0=37, H=H, Hkv=Hkv, hd=hd)
    for window, n_slots in ((0, 40), (20, 23)):
        for tk, tv in (("f16", "f16"), ("f32", "q8_0") if hd % 32 == 0 else ("f32", "bf16")):
            got = _model.attention(q, k, v, sinks, 37, window, n_slots, 2, tk, tv)
            want = attention_ref(q, rounded(k, tk), rounded(v, tv), sinks, 37, window)
            assert rel(got, want) < 2e-6, (tk, tv, window)


@pytest.mark.parametrize("cu", BACKENDS)
def test_cuda_store_and_attention_match_cpu(cu):
    q, k, v, sinks = attention_case(7, n_tok=3, pos0=90)
    n_pos, Hkv, hd = k.shape
    kv_dim, n_slots = Hkv * hd, 96
    rows = np.concatenate([k.reshape(n_pos, -1), v.reshape(n_pos, -1)], axis=1)
    pos = np.arange(n_pos)
    for tk, tv in (("f16", "f16"), ("bf16", "q8_0"), ("q8_0", "f32"), ("q8_0", "q8_0")):
        def empty(name):
            return (np.zeros((n_slots, kv_dim), np.float32) if name == "f32" else
                    np.zeros((n_slots, _model.kv_row_bytes(name, kv_dim, hd)), np.uint8))
        kc, vc = cu.kv_store(empty(tk), empty(tv), rows, 0, kv_dim, pos, kv_dim, tk, tv, hd)
        # the device writes exactly the CPU's bytes
        assert np.array_equal(kc.view(np.uint8)[:n_pos], _quants.quantize_rows(k.reshape(n_pos, -1), int(GGML[tk])))
        assert np.array_equal(vc.view(np.uint8)[:n_pos], _quants.quantize_rows(v.reshape(n_pos, -1), int(GGML[tv])))
        got = cu.attention(q.reshape(3, -1), pos[-3:], kc, vc, 8, Hkv, hd, 0, sinks, n_pos,
                           type_k=tk, type_v=tv).reshape(q.shape)
        want = _model.attention(q, k, v, sinks, 90, 0, n_slots, 1, tk, tv)
        assert rel(got, want) < 1e-5, (tk, tv)
    with pytest.raises(ValueError, match="unknown KV cache type"):
        cu.attention(q.reshape(3, -1), pos[-3:], kc, vc, 8, Hkv, hd, 0, sinks, n_pos, type_k="q4_0")


# ---- the model: accuracy of each type against the f32 cache -------------------------------------

# Bounds on the small synth below (measured values are printed; README "KV cache types" has them).
# Relative logit error per position: max|logits - f32 cache's| / max|f32 cache's|. Its median shows
# the rounding; its maximum is set by the few positions where the rounding flips an expert choice
# (the router's top-4 is discontinuous), hence the looser bound.
MEDIAN_REL = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 2.5e-2}
MAX_REL = {"f32": 0.0, "f16": 0.25, "bf16": 0.25, "q8_0": 0.5}
MIN_GREEDY = {"f32": 32, "f16": 31, "bf16": 28, "q8_0": 26}
N_VOCAB = 512


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """The demo model (`pyengine demo-model`: gpt-oss-20b's structure, head_dim 64, its weight scales,
    MXFP4 experts and Q8_0 matrices) with 3 layers and a 512-token vocabulary, so the CUDA emulator
    runs it in seconds. (gguf_factory's models have 4x larger weights: attention so sharp that f16
    rounding alone changes their greedy output within a few tokens; a trained model is far smoother.)"""
    path = tmp_path_factory.mktemp("kv") / "demo-512.gguf"
    c = dataclasses.replace(demo_config(n_layer=3), vocab_size=N_VOCAB)
    tok = GGUFTokenizer(tokens=[f"t{i}" for i in range(N_VOCAB)], token_types=[1] * N_VOCAB, merges=[],
                        pre="gpt-4o", bos_id=0, eos_id=1, pad_id=2, add_bos=False, add_eos=False,
                        chat_template=None)
    return write_gguf(RandomWeights(c, seed=3), c, tok, path, outtype="mxfp4", name="kv-synth")


def greedy(eng, last_logits, n=32):
    """n argmax tokens continuing the engine's context, whose last logits are last_logits."""
    out = [int(np.argmax(last_logits))]
    while len(out) < n:
        out.append(int(np.argmax(eng.eval([out[-1]]))))
    return out


def forced(eng, last_logits, tokens):
    """The engine's argmax at each step while it is fed `tokens` (another run's greedy output)."""
    return [int(np.argmax(last_logits))] + [int(np.argmax(eng.eval([t]))) for t in tokens[:-1]]


def accuracy(path, n_prompt=200, n_batch=64, **opts) -> dict:
    """type -> (median and max over positions of the relative logit error vs the f32 cache, on a
    prompt; of the f32 cache's 32 greedy tokens after it, how many the type's engine also picks when
    fed the same tokens: one near-tie then costs one token, not the rest of a free-running run)."""
    toks = np.random.default_rng(4).integers(0, N_VOCAB, n_prompt)
    runs, g32 = {}, None
    for name in TYPES:  # f32 first: its greedy run is what the others are fed
        eng = pyengine.Engine(path, n_ctx=512, n_threads=2, n_batch=n_batch, cache_type_k=name, cache_type_v=name,
                              **opts)
        logits = eng.logits(toks)
        if g32 is None:
            g32 = greedy(eng, logits[-1])
            runs[name] = logits, g32
        else:
            runs[name] = logits, forced(eng, logits[-1], g32)
    l32 = runs["f32"][0]
    out = {}
    for name, (logits, tokens) in runs.items():
        err = np.abs(logits - l32).max(axis=1) / np.abs(l32).max(axis=1)
        agree = sum(a == b for a, b in zip(tokens, g32))
        out[name] = float(np.median(err)), float(err.max()), agree
        print(f"{opts.get('device', 'cpu')} {name}: relative logit error median {np.median(err):.2e} "
              f"max {err.max():.2e}, greedy {agree}/32")
    return out


def check_accuracy(acc: dict) -> None:
    for name, (median, worst, agree) in acc.items():
        assert median <= MEDIAN_REL[name], (name, median)
        assert worst <= MAX_REL[name], (name, worst)
        assert agree >= MIN_GREEDY[name], (name, agree)
    assert acc["f16"][0] < acc["bf16"][0] < acc["q8_0"][0]  # fewer mantissa bits, more error


def test_accuracy_against_f32_cache_cpu(model_path):
    check_accuracy(accuracy(model_path))


@pytest.mark.parametrize("cu", BACKENDS)
def test_accuracy_against_f32_cache_cuda(model_path, cu, monkeypatch):
    if cu.BACKEND == "emulator":
        monkeypatch.setenv("PYENGINE_CUDA_EMULATOR", "1")
    else:
        monkeypatch.delenv("PYENGINE_CUDA_EMULATOR", raising=False)
    # a shorter prompt than on the CPU (which also wraps the sliding ring): the emulator is slow
    check_accuracy(accuracy(model_path, n_prompt=64, device="cuda", exact=True))


@pytest.mark.parametrize("cu", BACKENDS)
def test_cuda_logits_match_cpu_per_type(model_path, cu, monkeypatch):
    """The same type on both backends: the device stores the CPU's bytes, so only the kernels'
    rounding differs (the CUDA engine's bound, 1e-3); split layers use a CPU cache of the type."""
    if cu.BACKEND == "emulator":
        monkeypatch.setenv("PYENGINE_CUDA_EMULATOR", "1")
    else:
        monkeypatch.delenv("PYENGINE_CUDA_EMULATOR", raising=False)
    toks = np.random.default_rng(5).integers(0, N_VOCAB, 40)
    for name, opts in (("f16", {}), ("q8_0", {"n_gpu_layers": 2})):
        kw = dict(n_ctx=256, n_threads=2, exact=True, cache_type_k=name, cache_type_v=name)
        want = pyengine.Engine(model_path, **kw).logits(toks)
        dev = pyengine.Engine(model_path, device="cuda", **kw, **opts)
        got = dev.logits(toks)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3, name
        if opts:
            assert dev._cache.native.cpu_cache.type_k == name


# ---- memory and options ------------------------------------------------------------------------

def test_memory_uses_the_element_size(model_path):
    sizes = {}
    for name in TYPES:
        eng = pyengine.Engine(model_path, n_ctx=1024, n_threads=1, cache_type_k=name, cache_type_v=name)
        per_pos, fixed = eng._model.kv_bytes_per_token(eng.n_batch, name, name)
        n_full = sum(1 for s in eng._model.cache_layout[3] if not s)
        row = _model.kv_row_bytes(name, 2 * 64, 64)
        assert per_pos == 2 * n_full * row
        assert eng._cache.nbytes == per_pos * 1024 + fixed  # what the cache really allocated
        sizes[name] = eng._cache.nbytes
    assert sizes["f32"] == 2 * sizes["f16"] == 2 * sizes["bf16"]
    assert sizes["q8_0"] * 32 == sizes["f16"] * 17  # 34 bytes per 32 elements
    mixed = pyengine.Engine(model_path, n_ctx=1024, n_threads=1, cache_type_k="q8_0", cache_type_v="f32")
    assert mixed._cache.nbytes == (sizes["q8_0"] + sizes["f32"]) // 2


NO_COPIES = {"ctx_checkpoints": 0}  # sizes below without the rings' checkpoint copies (counted: the test after)


def test_default_context_fits_more_positions_with_smaller_types(model_path, monkeypatch):
    # 6 MiB free: the default n_ctx is what half of it holds, so it follows the element size
    monkeypatch.setattr(engine_mod, "available_memory", lambda: 6 * 2 ** 20)
    n = {name: pyengine.Engine(model_path, n_threads=1, cache_type_k=name, cache_type_v=name, **NO_COPIES).n_ctx
         for name in ("f32", "f16")}
    assert n["f16"] > 1.5 * n["f32"]


def test_an_explicit_context_that_does_not_fit_is_refused_before_allocating(model_path, monkeypatch):
    # 6 MiB free: 1024 positions fit, a context of 10**11 positions (a typo'd -c) is refused with the
    # sizes, where it used to fail inside numpy's allocation (or, when it overcommits, in an OOM kill)
    monkeypatch.setattr(engine_mod, "available_memory", lambda: 6 * 2 ** 20)
    assert pyengine.Engine(model_path, n_ctx=1024, n_threads=1, **NO_COPIES).n_ctx == 1024
    with pytest.raises(ContextMemoryError, match=r"n_ctx=100000000000 needs .* GiB of KV cache and 0.0 GiB is available"):
        pyengine.Engine(model_path, n_ctx=10 ** 11, n_threads=1, **NO_COPIES)
    per_pos, rings = pyengine.Engine(model_path, n_ctx=64, n_threads=1)._model.kv_bytes_per_token(512, "q8_0", "q8_0")
    fits = (6 * 2 ** 20 - rings) // per_pos  # the q8_0 cache holds more positions in the same memory
    assert pyengine.Engine(model_path, n_ctx=fits, n_threads=1, cache_type_k="q8_0", cache_type_v="q8_0", **NO_COPIES).n_ctx == fits
    with pytest.raises(ContextMemoryError):
        pyengine.Engine(model_path, n_ctx=fits, n_threads=1, **NO_COPIES)  # f16 at the same n_ctx does not fit


def test_slots_count_the_engines_own_cache_once_it_holds_device_memory(model_path, monkeypatch):
    # free memory for exactly two caches: on the CPU the first cache's calloc'd pages are not yet
    # taken, so two slots fit and three do not; on a GPU the first cache is already allocated, so
    # the same check with one cache's worth left free still admits two slots
    eng = pyengine.Engine(model_path, n_ctx=1024, n_threads=1, **NO_COPIES)
    size = eng._cache.nbytes
    monkeypatch.setattr(eng, "_free_memory", lambda: 2 * size)
    eng.check_slots_fit(2)
    with pytest.raises(ContextMemoryError, match=r"^3 KV caches of n_ctx=1024 need"):
        eng.check_slots_fit(3)
    monkeypatch.setattr(eng, "device", "cuda:0")
    monkeypatch.setattr(eng, "_free_memory", lambda: size)
    eng.check_slots_fit(2)
    with pytest.raises(ContextMemoryError, match=r"^3 KV caches of n_ctx=1024 need"):
        eng.check_slots_fit(3)


def test_ring_checkpoints_count_in_what_slots_need(model_path, monkeypatch):
    """On the CPU each cache's checkpoints (ctx_checkpoints copies of its sliding rings at most)
    take the same memory, so the slots' check counts them; on a GPU they are in host memory."""
    eng = pyengine.Engine(model_path, n_ctx=1024, n_threads=1, ctx_checkpoints=3)
    size, rings = eng._cache.nbytes, sum(r.nbytes for r in eng._cache.native.rings)
    assert rings > 0
    monkeypatch.setattr(eng, "_free_memory", lambda: 2 * (size + 3 * rings))
    eng.check_slots_fit(2)
    monkeypatch.setattr(eng, "_free_memory", lambda: 2 * (size + 3 * rings) - 1)
    with pytest.raises(ContextMemoryError, match=r"^2 KV caches of n_ctx=1024 need"):
        eng.check_slots_fit(2)
    monkeypatch.setattr(eng, "device", "cuda:0")
    monkeypatch.setattr(eng, "_free_memory", lambda: size)  # one more cache's worth on the device
    eng.check_slots_fit(2)


def test_default_is_f16_and_names_are_checked(model_path):
    eng = pyengine.Engine(model_path, n_ctx=64, n_threads=1)
    assert (eng.cache_type_k, eng.cache_type_v) == ("f16", "f16")
    assert (eng._cache.native.type_k, eng._cache.native.type_v) == ("f16", "f16")
    assert pyengine.Engine(model_path, n_ctx=64, n_threads=1, cache_type_k="Q8_0").cache_type_k == "q8_0"
    for bad in ("q4_0", "fp16", "", None, 1):
        with pytest.raises(ValueError, match="unknown KV cache type"):
            pyengine.Engine(model_path, n_ctx=64, n_threads=1, cache_type_v=bad)


def test_q8_0_needs_whole_blocks_per_head(tmp_path):
    path = tmp_path / "head16.gguf"
    write_gptoss_gguf(path, arch="gpt-oss", head_dim=16)
    with pytest.raises(ValueError, match="multiple of 32"):
        pyengine.Engine(path, n_ctx=64, n_threads=1, cache_type_k="q8_0")
    assert pyengine.Engine(path, n_ctx=64, n_threads=1, cache_type_k="bf16").logits([1, 2]).shape == (2, 300)


# ---- the command line and the node -------------------------------------------------------------

def cli(*args, module="pyengine.cli", cwd=None):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_bench_flags_reach_the_engine_and_its_json(model_path, tmp_path):
    r = cli("bench", model_path, "-p", "8", "-n", "2", "-r", "1", "-o", "json", "-ctk", "q8_0",
            "--cache-type-v", "bf16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(row["type_k"], row["type_v"]) for row in rows] == [("q8_0", "bf16")] * 2
    table = [BenchResult(**{k: v for k, v in row.items() if k in BenchResult.__dataclass_fields__})
             for row in rows]
    assert "| type_k | type_v |" in markdown(table) and "| q8_0 | bf16 | pp8 |" in markdown(table)
    assert "type_k" not in markdown([dataclasses.replace(t, type_k="f16", type_v="f16") for t in table])


def test_unknown_type_is_one_error_line(model_path, tmp_path):
    for args in (("bench", model_path, "-ctk", "q4_0"), ("run", model_path, "hi", "-ctv", "f8")):
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("[ERROR] --cache-type-") and "choose one of f32, f16, bf16, q8_0" in r.stderr
    r = cli("--model", model_path, "--port", "1", "-ctk", "int4", module="pyengine.node.cli", cwd=tmp_path)
    assert r.returncode == 1 and "[ERROR] --cache-type-k: unknown KV cache type 'int4'" in r.stderr, r.stderr


def test_node_config_and_backend_carry_the_types(tmp_path):
    from pyengine.node.config import NodeConfig
    from pyengine.node.engine_backend import EngineBackend
    assert (NodeConfig().cache_type_k, NodeConfig().cache_type_v) == ("f16", "f16")
    path = tmp_path / "o200k.gguf"  # the node needs the real vocabulary
    write_gptoss_gguf(path, arch="gptoss", head_dim=32, wtype="f16", expert_type="mxfp4", tie_output=True,
                      extra_keys=vocab.gguf_keys("gptoss"), n_vocab=vocab.N_VOCAB)
    cfg = NodeConfig.from_env({}, model=str(path), ctx_size=256, parallel=2, cache_type_k="q8_0",
                              cache_type_v="f32")
    backend = EngineBackend.load(cfg)
    try:
        caches = [backend.new_cache() for _ in range(2)]
        assert all((c.native.type_k, c.native.type_v) == ("q8_0", "f32") for c in caches)
    finally:
        backend.close()
