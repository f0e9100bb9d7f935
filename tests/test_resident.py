"""Engine(use_mmap=False) / --no-mmap (pyengine/resident.py): the weights copied out of the mapped
files into anonymous memory at load. The copy must be real (no array the forward pass reads still
points into a file mapping, each one 64-byte aligned), invisible in the results (logits bit-identical
to the mapped weights', with and without the repack cache, on the exact path too), and reachable
from every command that loads a model."""

import argparse

import numpy as np
import pytest

import gguf_factory
from pyengine import _model as K
from pyengine import cli
from pyengine.commands import _terminal
from pyengine.demo_model import write_demo_model
from pyengine.engine import Engine
from pyengine.model_file import open_model
from pyengine.node.config import NodeConfig
from pyengine.node.engine_backend import EngineBackend
from pyengine.repack_cache import repacked_weights
from pyengine.resident import resident_copy

DIMS = dict(n_vocab=512, n_embd=128, n_ff=96, n_layer=2)


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "mx.gguf"
    gguf_factory.write_gptoss_gguf(path, wtype="q8_0", expert_type="mxfp4", seed=5,
                                   type_overrides={"attn_q.weight": "q5_0", "attn_k.weight": "q4_1"}, **DIMS)
    return path


def run(eng):
    """Prefill, a short prompt and a few decode steps, every position's logits."""
    rng = np.random.default_rng(11)
    out = [eng.eval(rng.integers(0, DIMS["n_vocab"], 20), logits_all=True),
           eng.eval(rng.integers(0, DIMS["n_vocab"], 5), logits_all=True)]
    out += [eng.eval([int(t)])[None] for t in rng.integers(0, DIMS["n_vocab"], 3)]
    return np.concatenate(out)


@pytest.mark.parametrize("opts", [{}, {"repack": False}, {"exact": True}])
def test_same_logits_from_anonymous_memory(model, opts):
    mapped = run(Engine(model, n_ctx=64, n_threads=2, n_batch=16, **opts))
    copied = Engine(model, n_ctx=64, n_threads=2, n_batch=16, use_mmap=False, **opts)
    np.testing.assert_array_equal(run(copied), mapped)


def test_the_copy_leaves_no_array_in_the_files(model):
    mf = open_model(model)
    repacked = repacked_weights(mf, 2) if K.r16_available() else {}
    tensors, copies = resident_copy(mf.tensors, repacked)
    assert tensors.keys() == mf.tensors.keys() and copies.keys() == repacked.keys()
    for name, t in tensors.items():
        src = mf.tensors[name]
        if name in repacked:  # replaced by its R16 form: left where it is
            assert t is src
            continue
        assert t.name == src.name and t.ggml_type == src.ggml_type and t.shape == src.shape
        assert t.data.dtype == src.data.dtype and t.data.shape == src.data.shape and t.data.ctypes.data % 64 == 0
        assert not np.shares_memory(t.data, src.data) and np.array_equal(t.data, src.data)
    for name, a in copies.items():
        assert a.ctypes.data % 64 == 0 and not np.shares_memory(a, repacked[name]) and np.array_equal(a, repacked[name])
    assert resident_copy({}, {}) == ({}, {})


def test_no_mmap_reaches_the_engine_from_every_command(model, tmp_path, monkeypatch, caplog):
    seen = []
    real = Engine.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("use_mmap", True))
        real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "__init__", spy)
    assert cli.main(["bench", str(model), "-p", "8", "-n", "2", "-r", "1", "--no-mmap"]) == 0
    assert seen == [False] and "Weights copied into anonymous memory" in caplog.text
    for flag, want in ((["--no-mmap"], False), ([], True)):
        p = argparse.ArgumentParser()
        _terminal.add_arguments(p)
        seen.clear()
        _terminal.open_engine(p.parse_args([str(model), "-c", "64", *flag]))
        assert seen == [want]
    seen.clear()
    assert NodeConfig().use_mmap is True
    demo = write_demo_model(tmp_path / "demo.gguf", n_layer=1)  # the node needs a real tokenizer
    EngineBackend.load(NodeConfig(model=str(demo), ctx_size=64, use_mmap=False))
    assert seen == [False]


RSS_SCRIPT = """
import sys
from pyengine import Engine

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

before = rss()
eng = Engine(sys.argv[1], n_ctx=64, n_threads=1, repack=False, use_mmap=sys.argv[2] == "1")
print(rss() - before)
"""


def test_without_mmap_the_weights_are_resident_after_load(tmp_path):
    """Mapped, loading adds almost no anonymous memory for a 40+ MB file (the weights stay in its
    pages); copied, all of its weights are in anonymous memory (RssAnon: the file pages the copy
    read count apart, in RssFile)."""
    import subprocess
    import sys

    path = tmp_path / "big.gguf"
    gguf_factory.write_gptoss_gguf(path, arch="gpt-oss", n_embd=256, n_ff=512, n_expert=16, n_expert_used=2,
                                   n_head=4, n_head_kv=2, head_dim=64, n_layer=2)
    size = path.stat().st_size
    grew = {m: int(subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), m], cwd=tmp_path, check=True,
                                  capture_output=True, text=True).stdout) for m in ("1", "0")}
    assert size > 40 * 2 ** 20
    assert grew["1"] < 0.2 * size and 0.9 * size < grew["0"] < 1.5 * size, (grew, size)


def test_a_copy_that_does_not_fit_is_a_clear_error(model, monkeypatch):
    """With less memory available than the weights take, --no-mmap stops before allocating, naming
    both sizes and the way out; the mapped default loads as before."""
    from pyengine import engine as engine_mod
    from pyengine.errors import ModelLoadError

    mf = open_model(model)
    with pytest.raises(ModelLoadError, match=r"--no-mmap: the weights take .* GB and only 0\.00 GB .* mapped"):
        resident_copy(mf.tensors, {}, available=1000)
    # memory for the KV cache of 64 positions (the mapped default needs nothing else), not for a copy
    per_pos, fixed = Engine(model, n_ctx=64, n_threads=1)._model.kv_bytes_per_token(512, "f16", "f16")
    kv = 64 * per_pos + fixed
    assert kv < sum(t.data.nbytes for t in mf.tensors.values())
    monkeypatch.setattr(engine_mod, "available_memory", lambda: kv)
    with pytest.raises(ModelLoadError, match="--no-mmap"):
        Engine(model, n_ctx=64, n_threads=1, use_mmap=False)
    assert Engine(model, n_ctx=64, n_threads=1).n_vocab == DIMS["n_vocab"]
    monkeypatch.setattr(engine_mod, "available_memory", lambda: None)  # unknown: no check
    assert Engine(model, n_ctx=64, n_threads=1, use_mmap=False).n_vocab == DIMS["n_vocab"]
