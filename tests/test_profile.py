"""The forward pass's per-operation profile (csrc/profile.h, `pyengine bench --profile`): every
operation counted once per layer and pass, the weight bytes each product reads equal to the
tensors' sizes, the parts inside the whole, nothing counted while profiling is off."""
import subprocess
import sys

import numpy as np
import pytest

from pyengine import Engine, _model
from pyengine.bench import profile_table
from pyengine.model_file import open_model
from pyengine.synth import write_synth_model

PER_LAYER = ("qkv", "rope", "attention", "attn_out", "router", "expert_up", "swiglu", "expert_down", "expert_sum")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synth_model(tmp_path_factory.mktemp("prof") / "tiny.gguf", "tiny", fast=True, arch_name="gpt-oss")


def nbytes(mf, name: str) -> int:
    return int(mf.tensors[name].data.nbytes)


def test_counts_and_bytes_of_decode_steps(tiny):
    mf = open_model(tiny)
    n_layer = mf.hparams.n_layer
    eng = Engine(str(tiny), n_ctx=64, n_threads=2)
    toks = np.random.default_rng(1).integers(0, eng.n_vocab, 12).tolist()
    eng.reset()
    eng.eval(toks[:4])
    _model.profile_reset()
    eng.eval(toks[4:6])                      # off: not counted
    assert all(v == (0, 0, 0) for v in _model.profile_read().values())
    _model.profile_enable(True)
    try:
        before = eng.expert_counts.copy()
        for t in toks[6:11]:
            eng.eval([t])
        chosen = eng.expert_counts - before
    finally:
        _model.profile_enable(False)
    prof = _model.profile_read()
    steps = 5
    assert prof["forward"][1] == steps and prof["embed"][1] == steps and prof["output"][1] == steps
    for op in PER_LAYER:
        assert prof[op][1] == steps * n_layer, op
    assert prof["norm"][1] == steps * (2 * n_layer + 1) and prof["residual"][1] == steps * 2 * n_layer
    parts = sum(v[0] for k, v in prof.items() if k != "forward")
    assert 0 < parts <= prof["forward"][0]
    # weight bytes: the tensors' own sizes (attention and head every step; each chosen expert once)
    qkv = sum(nbytes(mf, f"blk.{i}.attn_{x}.weight") for i in range(n_layer) for x in "qkv")
    assert prof["qkv"][2] == steps * qkv
    assert prof["attn_out"][2] == steps * sum(nbytes(mf, f"blk.{i}.attn_output.weight") for i in range(n_layer))
    assert prof["output"][2] == steps * nbytes(mf, "output.weight")
    # experts: each chosen expert once per step and layer (one token: its n_expert_used distinct ones)
    n_expert, k = mf.hparams.n_expert, mf.hparams.n_expert_used
    per_up = sum(nbytes(mf, f"blk.0.ffn_{x}_exps.weight") for x in ("gate", "up")) // n_expert
    per_down = nbytes(mf, "blk.0.ffn_down_exps.weight") // n_expert
    assert chosen.sum() == steps * n_layer * k
    assert prof["expert_up"][2] == steps * n_layer * k * per_up
    assert prof["expert_down"][2] == steps * n_layer * k * per_down


def test_cli_prints_a_table_per_test(tiny):
    r = subprocess.run([sys.executable, "-m", "pyengine.cli", "bench", str(tiny), "-p", "8", "-n", "4", "-r", "2",
                        "-t", "1", "--profile"], capture_output=True, text=True, timeout=300, cwd=tiny.parent)
    assert r.returncode == 0, r.stderr
    for test in ("pp8", "tg4"):
        block = r.stdout.split(f"profile of {test} (2 repetitions; per forward pass):")[1].split("\n\n")[0]
        rows = {line.split("|")[1].strip(): line for line in block.splitlines() if line.startswith("| ")}
        assert {"qkv", "expert_up", "output", "other", "**forward pass**", "outside the pass"} <= set(rows)
        assert rows["**forward pass**"].split("|")[4].strip() == "100.0 %"
    bad = subprocess.run([sys.executable, "-m", "pyengine.cli", "bench", str(tiny), "--profile", "--device", "cuda"], cwd=tiny.parent,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--profile times the CPU forward pass" in bad.stderr


def test_table_shares_and_rates():
    ns = lambda ms: int(ms * 1e6)  # noqa: E731
    ops = {"qkv": (ns(20), 48, 2_000_000_000), "attention": (ns(10), 48, 0), "forward": (ns(40), 2, 0)}
    table = profile_table(ops, ns(50)).splitlines()
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert cells["qkv"] == ["24", "10.000", "50.0 %", "1000.0", "100.0"]
    assert cells["attention"] == ["24", "5.000", "25.0 %", "-", "-"]
    assert cells["other"][1:3] == ["5.000", "25.0 %"]
    assert cells["**forward pass**"][:3] == ["1", "20.000", "100.0 %"]
    assert cells["outside the pass"][1] == "5.000"
    assert profile_table({"forward": (0, 0, 0)}, 0) == "(no forward pass was profiled)"
