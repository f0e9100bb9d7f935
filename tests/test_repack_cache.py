"""The repack cache file (pyengine/repack_cache.py): MXFP4 experts and Q8_0 matrices in the R16
decode layout.

It must be invisible in the results (logits bit-identical to the file's layout for prefill, decode
and batched decode), built once and then reused, rebuilt when the model file changes or the cache
is damaged, and never in the way: a cache that cannot be written or read leaves the engine on the
file's layout with a warning, and exact=True, device CUDA or --no-repack do not use it."""

import errno
import logging
import os

import numpy as np
import pytest

import gguf_factory
from pyengine import _model as K
from pyengine import repack_cache
from pyengine.engine import Engine

pytestmark = pytest.mark.skipif(not K.r16_available(), reason="no R16 kernel on this CPU (AVX-512 VNNI or AVX2)")
DIMS = dict(n_vocab=512, n_embd=128, n_ff=96, n_layer=2)


@pytest.fixture
def model(tmp_path):
    # Q8_0 matrices but a Q5_0 attn_q, as the Q4_K_M files have, a Q5_1 attn_k (Q5_K_M files) and a Q4_1 attn_v
    path = tmp_path / "mx.gguf"
    gguf_factory.write_gptoss_gguf(path, wtype="q8_0", expert_type="mxfp4", seed=3,
                                   type_overrides={"attn_q.weight": "q5_0", "attn_k.weight": "q5_1",
                                                   "attn_v.weight": "q4_1"}, **DIMS)
    return path


def cache_of(path):
    return path.with_name(path.name + repack_cache.SUFFIX)


def toks(n, seed):
    return np.random.default_rng(seed).integers(0, DIMS["n_vocab"], n)


def run(eng):
    """Prefill (the tile path for > 8 tokens, the rows path for <= 8) and a few decode steps."""
    out = [eng.eval(toks(20, 1), logits_all=True), eng.eval(toks(5, 2), logits_all=True)]
    out += [eng.eval([int(t)])[None] for t in toks(3, 3)]
    return np.concatenate(out)


def cached_names(path) -> set:
    """The tensors a cache file holds (its JSON header)."""
    import json
    import struct

    head = path.read_bytes()[:1 << 16]
    n = struct.unpack("<Q", head[16:24])[0]
    return {e["name"] for e in json.loads(head[24:24 + n])["tensors"]}


@pytest.mark.parametrize("decode_layout", ["r16", "rows"])
def test_same_logits_with_and_without_the_cache(model, caplog, monkeypatch, decode_layout):
    """Both forms one-token products of repacked matrices can read (PYENGINE_DECODE_LAYOUT: the R16
    one, or the file's rows that a repacked matrix keeps, csrc/r16.h) give the file layout's bits."""
    monkeypatch.setenv("PYENGINE_DECODE_LAYOUT", decode_layout)
    caplog.set_level(logging.INFO, logger="pyengine")
    on = Engine(model, n_ctx=64, n_threads=2, n_batch=16)
    assert on.repacked and cache_of(model).is_file()
    # the experts, and where this CPU has the Q8_0 / Q5_0 / Q5_1 / Q4_1 kernels the attention and output (not
    # the embedding)
    names = {f"blk.{l}.{w}.weight" for l in range(2) for w in repack_cache.EXPERT_WEIGHTS}
    if K.r16_available(K.Q8_0):
        names |= {f"blk.{l}.attn_output.weight" for l in range(2)} | {"output.weight"}
    for w, ty in (("attn_q", K.Q5_0), ("attn_k", K.Q5_1), ("attn_v", K.Q4_1)):
        if K.r16_available(ty):
            names |= {f"blk.{l}.{w}.weight" for l in range(2)}
    assert cached_names(cache_of(model)) == names
    off = Engine(model, n_ctx=64, n_threads=2, n_batch=16, repack=False)
    assert not off.repacked
    np.testing.assert_array_equal(run(on), run(off))
    # batched decode of several sequences over the repacked model = each alone
    caches = [on.runner.new_cache(64) for _ in range(3)]
    for i, c in enumerate(caches):
        on.runner.eval([c], [toks(4 + i, 10 + i)])
    step = on.runner.eval(caches, [[7], [8], [9]])
    for i in range(3):
        alone = Engine(model, n_ctx=64, n_threads=1, n_batch=16)
        alone.eval(toks(4 + i, 10 + i))
        np.testing.assert_array_equal(step[i], alone.eval([7 + i]))
    assert sum("Repack cache written" in r.getMessage() for r in caplog.records) == 1  # built once, then reused


@pytest.mark.skipif(not K.r16_available(K.Q8_0), reason="no R16 Q8_0 kernel on this CPU (AVX-512 VNNI)")
def test_one_token_products_read_the_file_rows_when_told(model, monkeypatch):
    """With PYENGINE_DECODE_LAYOUT=rows a one-token product of a repacked matrix reads the file's rows,
    with =r16 its R16 form, and several tokens always the R16 form: shown by an output.weight whose R16
    bytes are garbage, which only the products that read them see."""
    real = repack_cache.repacked_weights

    def spoiled(model_file, n_threads, build=True):
        got = dict(real(model_file, n_threads, build))
        r16 = got["output.weight"]
        buf = np.empty(r16.nbytes + 64, np.uint8)  # the kernels need 64-byte alignment
        at = -buf.ctypes.data % 64
        got["output.weight"] = buf[at:at + r16.nbytes].reshape(r16.shape)
        got["output.weight"][:] = np.random.default_rng(0).integers(0, 256, r16.shape, np.uint8)
        return got

    reference = Engine(model, n_ctx=64, n_threads=2, repack=False)
    want_prefill, want_step = reference.eval(toks(5, 1), logits_all=True), reference.eval([7])
    monkeypatch.setattr("pyengine.engine.repacked_weights", spoiled)
    for layout, step_is_right in (("rows", True), ("r16", False)):
        monkeypatch.setenv("PYENGINE_DECODE_LAYOUT", layout)
        assert K.r16_one_token_rows(K.Q8_0) == step_is_right
        eng = Engine(model, n_ctx=64, n_threads=2)
        assert eng.repacked
        assert not np.array_equal(eng.eval(toks(5, 1), logits_all=True), want_prefill)  # 5 tokens: R16
        assert np.array_equal(eng.eval([7]), want_step) == step_is_right


def test_q4_k_m_file_same_logits_with_and_without_the_cache(tmp_path):
    """The tiny Q4_K_M-style synth file (Q4_K attn_output, Q5_0 and Q8_0 matrices, MXFP4 experts):
    every one of those types is in the cache where this CPU has its R16 kernel, and prefill, decode
    and batched decode give the file layout's bits."""
    from pyengine.synth import write_synth_model

    path = write_synth_model(tmp_path / "k.gguf", "tiny", fast=True, mix="q4_k_m", arch_name="gpt-oss", seed=3)
    on = Engine(path, n_ctx=64, n_threads=2, n_batch=16)
    off = Engine(path, n_ctx=64, n_threads=2, n_batch=16, repack=False)
    types = {int(t.ggml_type) for t in repack_cache.repacked_tensors(on.model_file)}
    assert on.repacked and {int(K.MXFP4), int(K.Q5_0), int(K.Q4_K), int(K.Q8_0)} >= types >= {int(K.MXFP4)}
    if K.r16_available(K.Q4_K):
        assert types == {int(K.MXFP4), int(K.Q5_0), int(K.Q4_K), int(K.Q8_0)}
    n_vocab = on.n_vocab
    toks_ = np.random.default_rng(4).integers(0, n_vocab, 40)
    for eng in (on, off):
        eng.reset()
    np.testing.assert_array_equal(on.eval(toks_[:20], logits_all=True), off.eval(toks_[:20], logits_all=True))
    for t in toks_[20:24]:
        np.testing.assert_array_equal(on.eval([int(t)]), off.eval([int(t)]))


def test_stale_or_damaged_cache_is_rebuilt(model, caplog):
    Engine(model, n_ctx=32)
    cache = cache_of(model)
    ref = cache.read_bytes()
    caplog.set_level(logging.INFO, logger="pyengine")
    st = os.stat(model)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the model file changed
    Engine(model, n_ctx=32)
    assert "is stale" in caplog.text
    new = cache.read_bytes()
    assert new != ref and new[4096:] == ref[4096:]  # a new header (the mtime), the same tensors
    with open(cache, "r+b") as f:                    # cut short
        f.truncate(len(new) - 100)
    caplog.clear()
    eng = Engine(model, n_ctx=32)
    assert "truncated" in caplog.text and eng.repacked and cache.read_bytes() == new
    cache.write_bytes(b"garbage" * 10)
    caplog.clear()
    assert Engine(model, n_ctx=32).repacked and "is stale" in caplog.text and cache.read_bytes() == new


def test_unwritable_cache_falls_back_to_the_file_layout(model, caplog, monkeypatch):
    ref = run(Engine(model, n_ctx=64, repack=False))
    cache_of(model).mkdir()  # something else in the way (a folder cannot be read or replaced)
    caplog.set_level(logging.INFO, logger="pyengine")
    eng = Engine(model, n_ctx=64)
    assert not eng.repacked and "cannot be written" in caplog.text
    np.testing.assert_array_equal(run(eng), ref)
    cache_of(model).rmdir()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)  # a full disk: no half file left behind
    caplog.clear()
    assert not Engine(model, n_ctx=64).repacked and "No space left" in caplog.text
    assert sorted(p.name for p in model.parent.iterdir()) == [model.name]


def test_not_used_where_it_cannot_serve(model, tmp_path):
    Engine(model, n_ctx=32, exact=True)
    Engine(model, n_ctx=32, repack=False)
    assert not cache_of(model).exists()
    plain = tmp_path / "f16.gguf"  # no block-quantized weights: nothing to repack
    gguf_factory.write_gptoss_gguf(plain, wtype="f16", expert_type="f16", **DIMS)
    assert not Engine(plain, n_ctx=32).repacked and not cache_of(plain).exists()
    tied = tmp_path / "tied.gguf"  # Q8_0 experts and matrices; a tied output is the embedding, not repacked
    gguf_factory.write_gptoss_gguf(tied, wtype="q8_0", expert_type="q8_0", tie_output=True, **DIMS)
    eng = Engine(tied, n_ctx=64, n_threads=2, n_batch=16)
    if not K.r16_available(K.Q8_0):
        assert not eng.repacked and not cache_of(tied).exists()
        return
    assert eng.repacked
    assert cached_names(cache_of(tied)) == {f"blk.{l}.{w}.weight" for l in range(2)
                                            for w in repack_cache.MATRIX_WEIGHTS + repack_cache.EXPERT_WEIGHTS}
    np.testing.assert_array_equal(run(eng), run(Engine(tied, n_ctx=64, n_threads=2, n_batch=16, repack=False)))


def test_cli_no_repack_reaches_the_engine(model, capsys):
    import argparse

    from pyengine import cli
    from pyengine.commands import _terminal
    from pyengine.node.config import NodeConfig

    assert cli.main(["bench", str(model), "-p", "8", "-n", "2", "-r", "1", "--no-repack"]) == 0
    assert not cache_of(model).exists()
    for flag, want in ((["--no-repack"], False), ([], True)):
        p = argparse.ArgumentParser()
        _terminal.add_arguments(p)
        assert _terminal.open_engine(p.parse_args([str(model), "-c", "64", *flag])).repacked is want
    assert cache_of(model).is_file() and NodeConfig().repack is True
