"""Engine.logits against transformers' GptOssForCausalLM and llama.cpp, plus the engine's own
invariants (prefill = one-token decode, 1 thread = 2 threads, every file layout = the same logits).

The GGUF files come from tests/gguf_factory.py (random weights, sliding window 128, YaRN factor 32);
transformers runs on exactly the float values each file represents (tests/gptoss_reference.py).
Prompts of 400 tokens cross the 128-token window three times."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from gguf_factory import write_gptoss_gguf  # noqa: E402
from gptoss_reference import hf_logits, hf_model_from_gguf_weights, to_float64  # noqa: E402

import pyengine  # noqa: E402

N_TOK = 400
F32_KV = dict(cache_type_k="f32", cache_type_v="f32")  # the exact math (the f16 default: test_kv_cache_types.py)
N_LAYER = 3


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def prompt(n_vocab, n=N_TOK, seed=0):
    return np.random.default_rng(seed).integers(0, n_vocab - 3, n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (path, represented weights) for the file types the tests share."""
    d = tmp_path_factory.mktemp("fwd")
    out = {}
    for wtype, etype in (("f32", "f32"), ("f16", "f16"), ("bf16", "bf16"), ("q8_0", "mxfp4"),
                         ("f32", "mxfp4")):
        path = d / f"{wtype}-{etype}.gguf"
        out[(wtype, etype)] = (path, write_gptoss_gguf(path, arch="gpt-oss", n_layer=N_LAYER,
                                                       wtype=wtype, expert_type=etype, with_tokenizer=True))
    return out


def reference(eng, weights, toks):
    """(float64 transformers logits, float32 transformers logits)."""
    m = hf_model_from_gguf_weights(weights, eng.hparams)
    r32 = hf_logits(m, toks)
    return hf_logits(to_float64(m, eng.hparams), toks), r32


def test_f32_matches_transformers(models):
    path, w = models[("f32", "f32")]
    eng = pyengine.Engine(path, n_ctx=1024, n_threads=2, n_batch=64, **F32_KV)  # 64-token chunks: SWA ring wraps
    toks = prompt(eng.n_vocab)
    got = eng.logits(toks)
    assert got.shape == (N_TOK, eng.n_vocab) and got.dtype == np.float32
    r64, r32 = reference(eng, w, toks)
    err, hf_err = rel(got, r64), rel(r32, r64)
    print(f"f32: engine vs transformers(float64) {err:.2e}; transformers(float32) itself {hf_err:.2e}; "
          f"engine vs transformers(float32) {rel(got, r32):.2e}")
    assert err <= 1e-4
    assert err <= hf_err  # no further from the exact math than transformers' own float32 run


@pytest.mark.parametrize("types", [("f16", "f16"), ("bf16", "bf16"), ("q8_0", "mxfp4")])
def test_quantized_matches_transformers_on_dequantized_weights(models, types):
    """exact=True: float32 activations everywhere; the default: int8 activations (two digits) for
    the quantized weights, in prefill (tiled kernel) and in decode (n_batch=8: row kernels)."""
    path, w = models[types]
    toks = prompt(300, seed=1)
    ref = reference(pyengine.Engine(path, n_ctx=1024), w, toks)[0]
    for opts, bound in ((dict(exact=True), 1e-4), ({}, 1e-2), (dict(n_batch=8), 1e-2)):
        err = rel(pyengine.Engine(path, n_ctx=1024, n_threads=2, **opts, **F32_KV).logits(toks), ref)
        print(f"{types} {opts}: engine vs transformers(float64, dequantized weights) {err:.2e}")
        assert err <= bound


@pytest.mark.parametrize("types", [("f32", "f32"), ("q8_0", "mxfp4")])
def test_decode_one_token_at_a_time_equals_prefill(models, types):
    path, _ = models[types]
    eng = pyengine.Engine(path, n_ctx=1024, n_threads=2, n_batch=16, exact=True)  # ring of 144 < 400: wraps
    toks = prompt(eng.n_vocab, n=300, seed=2)
    prefill = eng.logits(toks)
    eng.reset()
    decode = np.stack([eng.eval([t]) for t in toks])
    assert eng.n_past == len(toks)
    eng.reset()
    mixed = np.concatenate([eng.eval(toks[:137], logits_all=True), eng.eval(toks[137:], logits_all=True)])
    if types == ("f32", "f32"):
        assert np.array_equal(prefill, decode) and np.array_equal(mixed, prefill)
    else:  # one-token products use the type's fused dot, batches dequantize then dot in f32
        # Typical positions differ by ~1e-5; the random tiny model amplifies those differences where
        # they flip a router's top-4 choice, which moves a few positions by up to ~2e-3 and the whole by
        # 0.7-1.5e-4 depending on the build's rounding (the same test at the AVX2 level before the
        # vector SwiGLU/attention: 1.2e-4). So: the median position tight, the whole looser.
        for got in (decode, mixed):
            per_pos = [rel(a, b.astype(np.float64)) for a, b in zip(got, prefill)]
            assert np.median(per_pos) < 1e-4
            assert rel(got, prefill.astype(np.float64)) < 5e-4


@pytest.mark.parametrize("types", [("f32", "f32"), ("q8_0", "mxfp4")])
def test_thread_count_does_not_change_logits(models, types):
    path, _ = models[types]
    toks = prompt(300, n=200, seed=3)
    one = pyengine.Engine(path, n_ctx=512, n_threads=1).logits(toks)
    two = pyengine.Engine(path, n_ctx=512, n_threads=2).logits(toks)
    assert np.array_equal(one, two)
    single = [pyengine.Engine(path, n_ctx=512, n_threads=n).eval(toks[:1]) for n in (1, 2)]
    assert np.array_equal(single[0], single[1])


def test_truncate_then_continue_equals_fresh(models):
    path, _ = models[("f32", "f32")]
    eng = pyengine.Engine(path, n_ctx=1024, n_threads=2, n_batch=32)
    toks = prompt(eng.n_vocab, n=300, seed=4)
    full = eng.logits(toks)
    for keep in (290, 100):  # near: cache kept; far: the sliding rings were overwritten, recomputed
        eng.truncate(keep)
        assert eng.n_past == keep
        assert np.array_equal(eng.eval(toks[keep:], logits_all=True), full[keep:])


def test_rewind_to_a_checkpoint_past_the_rings_equals_fresh(models):
    """Once more tokens follow a point than the sliding rings keep, a checkpoint of the rings taken
    at or a little after that point (pyengine.runner.Checkpoint) lets the cache rewind to it and
    continue bit for bit: to the latest checkpoint before it, or to the point itself from a
    checkpoint at most a rewind's reach after it; further back the prefix is evaluated again."""
    path, _ = models[("f32", "f32")]
    eng = pyengine.Engine(path, n_ctx=1024, n_threads=2, n_batch=32)
    toks = prompt(eng.n_vocab, n=420, seed=6)
    full = eng.logits(toks)
    runner, cache = eng.runner, eng._cache
    ring, reach = min(cache.native.n_slots), cache.native.max_batch(eng.runner.model.window)
    assert reach < 80 and ring < 200 < 200 + ring < 420  # the checkpoints' points are left far behind

    def continues(n: int, kept: int) -> None:
        assert runner.rewind(cache, n) == kept and eng.n_past == kept
        np.testing.assert_array_equal(eng.eval(toks[kept:], logits_all=True), full[kept:])

    eng.reset()
    for end in (120, 200):
        eng.eval(toks[eng.n_past:end])
        runner.take_checkpoint(cache)
    eng.eval(toks[200:200 + ring])
    assert [c.n for c in cache.checkpoints] == [120, 200]
    assert [runner.reusable(cache, n) for n in (250, 200, 199, 200 - reach, 199 - reach, 119, 119 - reach)] == [
        200, 200, 199, 200 - reach, 120, 119, 0]
    continues(250, 200)
    continues(200, 200)  # exactly to the checkpoint, from 420 tokens
    eng.truncate(400)  # within the rings' reach: no checkpoint needed, the checkpoints stay
    assert [c.n for c in cache.checkpoints] == [120, 200]
    np.testing.assert_array_equal(eng.eval(toks[400:], logits_all=True), full[400:])
    continues(190, 190)  # from the checkpoint at 200, which goes (what follows 190 may change)
    assert [c.n for c in cache.checkpoints] == [120]
    continues(150, 120)  # the older checkpoint
    continues(119, 119)
    assert cache.checkpoints == ()
    eng.truncate(50)  # before every checkpoint: evaluated again
    assert eng.n_past == 50
    np.testing.assert_array_equal(eng.eval(toks[50:], logits_all=True), full[50:])
    runner.n_checkpoints = 2  # at most two kept, the newest; one at the same count is replaced
    runner.truncate(cache, 50)
    for end in (60, 70, 80, 80):
        if end > eng.n_past:
            eng.eval(toks[eng.n_past:end])
        runner.take_checkpoint(cache)
    assert [c.n for c in cache.checkpoints] == [70, 80]
    runner.n_checkpoints = 0
    runner.take_checkpoint(cache)
    assert [c.n for c in cache.checkpoints] == [70, 80]


@pytest.mark.parametrize("etype", ["f32", "mxfp4"])
def test_ollama_layouts_give_identical_logits(tmp_path, etype):
    toks = prompt(300, n=200, seed=5)
    logits = {}
    for layout, arch in (("llama.cpp", "gpt-oss"), ("ollama-gen2", "gptoss"), ("ollama-gen1", "gptoss")):
        path = tmp_path / f"{layout}.gguf"
        w = write_gptoss_gguf(path, arch=arch, layout=layout, wtype="q8_0", expert_type=etype, n_layer=2)
        eng = pyengine.Engine(path, n_ctx=512, n_threads=2, **F32_KV)
        logits[layout] = eng.logits(toks)
        if layout == "ollama-gen1":  # BF16 expert biases: other values, so check against transformers
            assert rel(logits[layout], reference(eng, w, toks)[0]) <= 1e-2  # int8 activations: ~1.5e-3
    assert np.array_equal(logits["llama.cpp"], logits["ollama-gen2"])


def test_engine_rejects_bad_input(models):
    path, _ = models[("f32", "f32")]
    eng = pyengine.Engine(path, n_ctx=64, n_threads=1, n_gpu_layers=99)
    assert eng.n_ctx == 64 and eng.n_vocab == 300 and eng.metadata["general.architecture"] == "gpt-oss"
    with pytest.raises(ValueError, match="out of range"):
        eng.logits([1, 300])
    with pytest.raises(ValueError, match="out of range"):
        eng.logits([-1])
    with pytest.raises(ValueError, match="n_ctx=64"):
        eng.logits(list(range(65)))
    with pytest.raises(ValueError):
        eng.eval([])
    with pytest.raises(ValueError):
        eng.truncate(5)
    assert eng.n_past == 0


LLAMA_SCRIPT = """
import json, sys
import numpy as np
from pyengine.llama_cpp_peer import open_llama
path, toks = sys.argv[1], json.loads(sys.argv[2])
ll = open_llama(path, logits_all=True, n_threads=2, n_ctx=1024, verbose=False)
ll.eval(toks)
np.save(sys.argv[3], np.array(ll.scores[:len(toks)], dtype=np.float32))
"""


@pytest.mark.parametrize("types", [("f32", "f32"), ("f16", "f16"), ("f32", "mxfp4"), ("q8_0", "mxfp4")])
def test_no_further_from_transformers_than_llama_cpp(models, types, tmp_path):
    pytest.importorskip("llama_cpp")
    path, w = models[types]
    eng = pyengine.Engine(path, n_ctx=1024, n_threads=2, **F32_KV)  # llama.cpp keeps its f16 default
    toks = prompt(eng.n_vocab, n=200, seed=6)
    out = tmp_path / "llama.npy"
    # a subprocess: a crash inside llama.cpp must not take the test run with it
    subprocess.run([sys.executable, "-c", LLAMA_SCRIPT, str(path), json.dumps([int(t) for t in toks]),
                    str(out)], check=True, cwd=tmp_path, timeout=300, capture_output=True)
    ref = reference(eng, w, toks)[0]
    ours, theirs = rel(eng.logits(toks), ref), rel(np.load(out), ref)
    print(f"{types}: vs transformers(float64): engine {ours:.2e}, llama.cpp {theirs:.2e}")
    assert ours <= 0.5 * theirs  # the default engine (int8 activations for MXFP4 experts) included
    # llama.cpp rounds the YaRN correction range (spec 3.4.3); with the same rounding we agree with it
    trunc = pyengine.Engine(path, n_ctx=1024, n_threads=2, yarn_truncate=True).logits(toks)
    near = rel(trunc, np.load(out).astype(np.float64))
    print(f"{types}: engine(yarn_truncate) vs llama.cpp {near:.2e}")
    # the rest: f16 KV cache, one-digit Q8_0 activations, chaotic tiny model (with Q8_0 attention
    # weights llama.cpp's activation rounding alone moves these logits by ~0.4)
    assert near < (0.9 if types[0] == "q8_0" else 0.5) * theirs


def test_engine_defaults(models):
    path, _ = models[("f32", "f32")]
    eng = pyengine.Engine(path)
    assert eng.n_ctx == eng.hparams.n_ctx_train == 4096  # tiny KV cache: the model's context fits
    assert eng.n_threads == pyengine.engine.physical_cores() >= 1
    assert eng.logits([1, 2, 3]).shape == (3, 300)
