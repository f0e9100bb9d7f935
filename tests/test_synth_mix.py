"""`pyengine synth --mix q4_k_m`: the per-tensor types of unsloth's "Q4_K_M" gpt-oss files (at the
20b shape: F32 289, Q5_0 61, Q8_0 13, Q4_K 24, MXFP4 72), random blocks with the intended spread,
and a file that pyengine and (when llama_cpp is importable) llama.cpp both load and decode alike.
`--mix f16`: the "F16" files' types (F16 where the default mix has Q8_0), decoded alike too."""

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from pyengine import Engine
from pyengine.convert import _Planner
from pyengine.gguf_reader import type_name
from pyengine.model_file import open_model
from pyengine.synth import SynthWeights, _Replan, shape_config, write_synth_model


def planned_types(shape: str, mix: str) -> dict[str, QT]:
    c = shape_config(shape, fast=True)
    replan = _Replan(0, mix, True, c.n_layer)
    return {t.name: replan(t).qtype for t in _Planner(SynthWeights(c), c, "mxfp4", "llama.cpp").plan()}


def test_q4_k_m_plan_has_the_published_files_type_counts():
    types = planned_types("gpt-oss-20b", "q4_k_m")
    assert Counter(t.name for t in types.values()) == {"F32": 289, "Q5_0": 61, "Q8_0": 13, "Q4_K": 24, "MXFP4": 72}
    assert {n for n, t in types.items() if t == QT.Q4_K} == {f"blk.{i}.attn_output.weight" for i in range(24)}
    # llama.cpp's use_more_bits layers for 24: the first and last 3, and every third from 5
    assert {n for n, t in types.items() if t == QT.Q8_0} == {"output.weight"} | {
        f"blk.{i}.attn_v.weight" for i in (0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23)}
    assert types["token_embd.weight"] == QT.Q5_0
    default = planned_types("gpt-oss-20b", "mxfp4")
    assert Counter(t.name for t in default.values()) == {"F32": 289, "Q8_0": 98, "MXFP4": 72}


def decodes_like_exact_and_llama_cpp(mf, path, seed):
    """Six random tokens: the default logits (int8 activations) and llama.cpp's within 5 % rms of
    the exact path's (llama.cpp's one-digit int8 activations give ~1 % on these files)."""
    eng = Engine(mf, n_ctx=32, n_threads=1, exact=True)
    tokens = np.random.default_rng(seed).integers(0, eng.n_vocab, 6).tolist()
    exact = eng.logits(tokens)
    default = Engine(mf, n_ctx=32, n_threads=1).logits(tokens)
    assert np.isfinite(exact).all() and exact.std() > 0.1
    rms = lambda other: float(np.sqrt(np.mean((other - exact) ** 2)) / exact.std())  # noqa: E731
    assert rms(default) < 0.05

    pytest.importorskip("llama_cpp")
    from pyengine.llama_cpp_peer import open_llama

    llm = open_llama(path, n_ctx=32, n_threads=1, logits_all=True, verbose=False)
    llm.eval(tokens)
    assert rms(np.asarray(llm.scores[: len(tokens)]).reshape(exact.shape)) < 0.05


def test_q5_k_m_plan_is_q4_k_m_with_the_5_bit_types():
    q4, q5 = planned_types("gpt-oss-20b", "q4_k_m"), planned_types("gpt-oss-20b", "q5_k_m")
    assert q4.keys() == q5.keys()
    assert {n: {QT.Q4_K: QT.Q5_K, QT.Q5_0: QT.Q5_1}.get(t, t) for n, t in q4.items()} == q5


@pytest.mark.parametrize("mix,k,fallback,file_type", [("q4_k_m", "Q4_K", "Q5_0", 15), ("q5_k_m", "Q5_K", "Q5_1", 17)])
@pytest.mark.parametrize("fast", [True, False])
def test_k_mix_file_loads_and_decodes(tmp_path, fast, mix, k, fallback, file_type):
    path = write_synth_model(tmp_path / "k.gguf", "tiny", fast=fast, mix=mix, arch_name="gpt-oss", seed=3)
    mf = open_model(path)
    types = {n: type_name(t.ggml_type) for n, t in mf.raw_tensors.items()}
    assert types["blk.0.attn_output.weight"] == types["blk.1.attn_output.weight"] == k  # 512 wide
    assert types["blk.0.attn_v.weight"] == fallback and types["blk.1.attn_v.weight"] == "Q8_0"
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == fallback and types["output.weight"] == "Q8_0"
    assert {types[n] for n in types if "_exps.weight" in n} == {"MXFP4"}
    assert mf.metadata["general.file_type"] == file_type
    for name, want in (("blk.1.attn_output.weight", 512 ** -0.5), ("blk.0.attn_k.weight", 64 ** -0.5),
                       ("token_embd.weight", 1.0)):
        q = mf.tensors[name]
        values = dequantize(np.asarray(q.data), q.ggml_type)
        assert abs(values.std() - want) < 0.15 * want and abs(values.mean()) < 0.1 * want, name
    if fast:
        blk0 = mf.tensors["blk.0.attn_output.weight"].data
        assert np.array_equal(blk0, mf.tensors["blk.1.attn_output.weight"].data)

    decodes_like_exact_and_llama_cpp(mf, path, seed=1)


def test_f16_plan_is_the_default_with_f16_for_q8_0():
    default, f16 = planned_types("gpt-oss-20b", "mxfp4"), planned_types("gpt-oss-20b", "f16")
    assert default.keys() == f16.keys()
    assert {n: (QT.F16 if t == QT.Q8_0 else t) for n, t in default.items()} == f16
    assert Counter(t.name for t in f16.values()) == {"F32": 289, "F16": 98, "MXFP4": 72}


@pytest.mark.parametrize("fast", [True, False])
def test_f16_file_loads_and_decodes(tmp_path, fast):
    path = write_synth_model(tmp_path / "h.gguf", "tiny", fast=fast, mix="f16", arch_name="gpt-oss", seed=5)
    mf = open_model(path)
    types = {n: type_name(t.ggml_type) for n, t in mf.raw_tensors.items()}
    for name in ("token_embd.weight", "output.weight", "blk.1.attn_q.weight", "blk.0.attn_output.weight"):
        assert types[name] == "F16", name
    assert {types[n] for n in types if "_exps.weight" in n} == {"MXFP4"}
    assert mf.metadata["general.file_type"] == 1
    k = mf.tensors["blk.0.attn_k.weight"]
    values = dequantize(np.asarray(k.data), k.ggml_type)
    assert abs(values.std() - 64 ** -0.5) < 0.15 * 64 ** -0.5

    decodes_like_exact_and_llama_cpp(mf, path, seed=2)  # int8 activations reach only the MXFP4 experts here


def test_cli_mix_flag(tmp_path):
    def synth(*args):
        return subprocess.run([sys.executable, "-m", "pyengine.cli", "synth", *args], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)

    r = synth("--fast", "--shape", "tiny", "--mix", "q4_k_m", "k.gguf")
    assert r.returncode == 0, r.stderr
    counts = Counter(type_name(t.ggml_type) for t in open_model(tmp_path / "k.gguf").raw_tensors.values())
    assert counts == {"F32": 25, "Q5_0": 6, "Q8_0": 2, "Q4_K": 2, "MXFP4": 6}
    r = synth("--fast", "--shape", "tiny", "--mix", "q2_k", "x.gguf")
    assert r.returncode == 2 and r.stderr.startswith("[ERROR] ") and "--mix" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "x.gguf").exists()
