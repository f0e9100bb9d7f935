"""The GPU options on every surface: `pyengine bench --device cuda` (GPU rows in llama-bench's table),
the run/chat/bench/serve flags, the node's config and the engines it builds, and the error when no
CUDA backend is there. Uses the CUDA emulator (PYENGINE_CUDA_EMULATOR=1)."""

import json
import os
import subprocess
import sys

import pytest
from gguf_factory import write_gptoss_gguf

from pyengine import cuda
from pyengine.commands._device import gpu_arguments, gpu_options
from pyengine.node import engine_backend
from pyengine.node.cli import add_arguments
from pyengine.node.config import NodeConfig
from pyengine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("opts") / "tiny.gguf"
    write_gptoss_gguf(path, arch="gpt-oss", n_layer=2, expert_type="mxfp4", seed=3)
    return path


def cli(*args, cwd, emulator=True):
    env = dict(os.environ)
    env.pop(cuda.EMULATOR_ENV, None)
    if emulator:
        env[cuda.EMULATOR_ENV] = "1"
    return subprocess.run([sys.executable, "-m", "pyengine.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env)


def test_bench_on_the_gpu_reports_backend_and_layers(model, tmp_path):
    r = cli("bench", model, "-p", "9", "-n", "2", "-r", "1", "-o", "json", "--device", "cuda", "-ngl", "1",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {(x["backends"], x["n_gpu_layers"]) for x in rows} == {("CUDA (emulator)", 1)}
    assert rows[0]["gpu_info"] == "pyengine CUDA emulator (CPU)"
    r = cli("bench", model, "-p", "9", "-n", "2", "-r", "1", "--device", "cuda", cwd=tmp_path)
    assert r.stdout.splitlines()[0] == "| model | size | params | backend | ngl | threads | test | t/s |"
    assert r.stdout.splitlines()[2].split("|")[4:6] == [" CUDA (emulator) ", " 2 "]


def test_device_flags_reach_the_engine_options():
    import argparse

    p = argparse.ArgumentParser()
    gpu_arguments(p)
    assert gpu_options(p.parse_args([])) == {"device": "cpu", "n_gpu_layers": None, "cpu_moe": False}
    got = gpu_options(p.parse_args(["--device", "cuda:1", "-ngl", "20", "--cpu-moe"]))
    assert got == {"device": "cuda:1", "n_gpu_layers": 20, "cpu_moe": True}


def test_node_builds_gpu_engines_from_flags_and_env(model, monkeypatch):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--model", str(model), "--device", "cuda", "--n-gpu-layers", "1", "--cpu-moe", "-np", "2"])
    cfg = NodeConfig.from_env({}, model=a.model, parallel=a.parallel, ctx_size=64, device=a.device,
                              n_gpu_layers=a.n_gpu_layers, cpu_moe=a.cpu_moe)
    assert (cfg.device, cfg.n_gpu_layers, cfg.cpu_moe) == ("cuda", 1, True)
    assert NodeConfig.from_env({"LLM_NODE_DEVICE": "cuda:0"}).device == "cuda:0"
    seen = []

    class Recorder(engine_backend.Engine):
        def __init__(self, *args, **kw):
            seen.append(kw)
            super().__init__(*args, **kw)

    monkeypatch.setenv(cuda.EMULATOR_ENV, "1")
    monkeypatch.setattr(engine_backend, "Engine", Recorder)
    monkeypatch.setattr(Tokenizer, "from_metadata", staticmethod(lambda md: type(
        "T", (), {"special_tokens": {}})()))
    backend = engine_backend.EngineBackend.load(cfg)
    assert {(k["device"], k["n_gpu_layers"], k["cpu_moe"]) for k in seen} == {("cuda", 1, True)}
    eng = backend.engine
    assert eng.device == "cuda:0"
    out = backend.core.runner.eval([backend.new_cache(), backend.new_cache()], [[1, 2, 3], [4]])
    assert [o.shape for o in out] == [(eng.n_vocab,)] * 2


def test_cuda_without_a_backend_says_why(model, tmp_path):
    r = cli("bench", model, "-p", "4", "-n", "0", "-r", "1", "--device", "cuda", cwd=tmp_path, emulator=False)
    try:
        import pyengine._cuda as real
        has_gpu = real.device_count() > 0
    except ImportError:
        has_gpu = False
    if has_gpu:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode != 0
        assert "device='cuda'" in r.stderr and ("no CUDA device" in r.stderr or "without its CUDA" in r.stderr)
