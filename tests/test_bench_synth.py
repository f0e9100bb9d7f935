"""`pyengine synth` (real-shape random GGUFs) and `pyengine bench` (llama-bench output): the synth
file has gpt-oss-20b's exact tensor shapes and ggml-org's type layout and runs with finite logits;
bench reports every llama-bench field it names, consistent with its own samples."""

import json
import subprocess
import sys

import numpy as np
import pytest

from gguf.quants import dequantize

from gguf_factory import GPT_OSS_20B
from pyengine import Engine
from pyengine.gguf_reader import type_name
from pyengine.model_file import open_model


def pyengine(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pyengine.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    r = pyengine("synth", "--shape", "gpt-oss-20b", "--layers", "1", "--arch-name", "gpt-oss", "one.gguf", cwd=d)
    assert r.returncode == 0, r.stderr
    yield d / "one.gguf"
    (d / "one.gguf").unlink()  # 1.6 GB: gone even when a test failed (pytest keeps failed runs' files)


def test_synth_has_the_real_shapes_and_types(synth, tmp_path):
    mf = open_model(synth)
    hp, raw = mf.hparams, mf.raw_tensors
    d = GPT_OSS_20B
    assert (hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_expert, hp.n_expert_used, hp.n_layer) == (
        d["n_embd"], d["n_head"], d["n_head_kv"], d["head_dim"], d["n_expert"], d["n_expert_used"], 1)
    assert mf.metadata.count("tokenizer.ggml.tokens") == d["n_vocab"]
    assert raw["blk.0.ffn_gate_exps.weight"].shape == (d["n_embd"], d["n_ff"], d["n_expert"])
    assert raw["blk.0.ffn_down_exps.weight"].shape == (d["n_ff"], d["n_embd"], d["n_expert"])
    assert raw["token_embd.weight"].shape == (d["n_embd"], d["n_vocab"])
    types = {n: type_name(t.ggml_type) for n, t in raw.items()}
    assert {types[n] for n in types if "_exps.weight" in n} == {"MXFP4"}
    assert {types[n] for n in ("token_embd.weight", "output.weight", "blk.0.attn_q.weight")} == {"Q8_0"}
    assert types["blk.0.attn_sinks.weight"] == "F32"

    eng = Engine(mf, n_ctx=64, n_threads=2)
    logits = eng.logits(np.random.default_rng(0).integers(0, d["n_vocab"], 8))
    assert np.isfinite(logits).all() and logits.std() > 0.1

    r = pyengine("synth", "one.gguf", "--layers", "1", cwd=synth.parent)
    assert r.returncode == 1 and "exists" in r.stderr
    r = pyengine("synth", "x.gguf", "--layers", "0", cwd=tmp_path)
    assert r.returncode == 2 and "argument --layers: must be >= 1, got 0" in r.stderr and not list(tmp_path.iterdir())


def test_bench_reports_llama_bench_fields(tmp_path):
    r = pyengine("demo-model", "demo.gguf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = pyengine("bench", "demo.gguf", "-p", "16", "-n", "4", "-r", "2", "-d", "8", "-t", "1", "-o", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["n_prompt"], x["n_gen"], x["n_depth"], x["n_threads"]) for x in rows] == [(16, 0, 8, 1), (0, 4, 8, 1)]
    for x in rows:
        assert len(x["samples_ns"]) == len(x["samples_ts"]) == 2
        n = x["n_prompt"] + x["n_gen"]
        assert x["samples_ts"] == pytest.approx([n * 1e9 / ns for ns in x["samples_ns"]])
        assert x["avg_ts"] == pytest.approx(np.mean(x["samples_ts"]))
        assert x["model_size"] == (tmp_path / "demo.gguf").stat().st_size and x["model_n_params"] > 0
    r = pyengine("bench", "demo.gguf", "-p", "8", "-n", "2", "-r", "1", cwd=tmp_path)
    lines = r.stdout.splitlines()
    assert lines[0] == "| model | size | params | backend | threads | test | t/s |"
    assert lines[2].split("|")[6].strip() == "pp8" and lines[3].split("|")[6].strip() == "tg2"


def test_synth_fast_has_the_same_tensors_in_seconds(synth, tmp_path):
    """--fast: the same tensor names, types and shapes and vocabulary size as the full writer, layer
    0's bytes in every layer, Q8_0 values with the full writer's spread."""
    r = pyengine("synth", "--fast", "--layers", "1", "--arch-name", "gpt-oss", "f.gguf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fast, full = open_model(tmp_path / "f.gguf"), open_model(synth)
    assert (fast.metadata.count("tokenizer.ggml.tokens") == full.metadata.count("tokenizer.ggml.tokens")
            == GPT_OSS_20B["n_vocab"])
    assert fast.raw_tensors.keys() == full.raw_tensors.keys()
    for name, t in full.raw_tensors.items():
        f = fast.raw_tensors[name]
        assert (f.shape, f.ggml_type) == (t.shape, t.ggml_type), name

    r = pyengine("synth", "--fast", "--shape", "tiny", "t.gguf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tiny = open_model(tmp_path / "t.gguf")
    assert tiny.hparams.n_layer == 2 and tiny.hparams.n_embd == 64
    for name, t in tiny.tensors.items():
        if name.startswith("blk.1.") and type_name(t.ggml_type) in ("Q8_0", "MXFP4"):
            assert np.array_equal(t.data, tiny.tensors[name.replace("blk.1.", "blk.0.")].data), name
    for name, want in (("blk.0.attn_q.weight", 64 ** -0.5), ("token_embd.weight", 1.0)):
        q = tiny.tensors[name]
        assert abs(np.std(dequantize(np.asarray(q.data), q.ggml_type)) - want) < 0.1 * want, name
    eng = Engine(tiny, n_ctx=32, n_threads=1)
    assert eng.tokenizer.decode(eng.tokenizer.encode("Why is the sky blue?")) == "Why is the sky blue?"
    assert np.isfinite(eng.logits([1, 2, 3])).all()


def test_synthetic_vocabulary_tokenizes_like_byte_level_bpe():
    from pyengine.synth import synthetic_tokenizer
    from pyengine.tokenizer import Tokenizer

    n_normal = 256 + 256 * 256 + 300
    tok = synthetic_tokenizer(n_normal, 21)
    t = Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": tok.pre,
                                 "tokenizer.ggml.tokens": tok.tokens, "tokenizer.ggml.token_type": tok.token_types,
                                 "tokenizer.ggml.eos_token_id": tok.eos_id})
    assert t.n_vocab == n_normal + 21 and len(tok.merges) == n_normal - 256
    assert t.encode("ab") == [256 + 97 * 256 + 98]            # the pair token, through its merge
    assert t.token_id("<|start|>") == n_normal + 200006 - 199998 and t.eos_id == n_normal + 200002 - 199998
    rng = np.random.default_rng(3)
    text = "".join(chr(int(c)) for c in rng.integers(32, 0x3000, 300))
    assert t.decode(t.encode(text)) == text
    with pytest.raises(ValueError, match="n_special"):
        synthetic_tokenizer(256, 5)
