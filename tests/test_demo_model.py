"""`pyengine demo-model`: the random-weight gpt-oss GGUF opens in pyengine and in llama.cpp, with the
real o200k_harmony tokenizer (checked against bpe-openai) and the same logits in both engines."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

import pyengine
from pyengine.demo_model import write_demo_model
from pyengine.tokenizer import Tokenizer

bpe_openai = pytest.importorskip("bpe_openai")

TEMPLATE = Path(__file__).parent / "data" / "openai-gpt-oss-120b.jinja"


def cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyengine.cli", "demo-model", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The default file (gptoss, MXFP4 experts + Q8_0) from the CLI, the same spelled gpt-oss, and
    an all-F32 one for llama.cpp."""
    d = tmp_path_factory.mktemp("demo")
    r = cli(cwd=d)
    assert r.returncode == 0, r.stderr
    assert "RANDOM" in r.stderr and "nonsense" in r.stderr
    return {"gptoss": d / "gpt-oss-demo.gguf",
            "gpt-oss": write_demo_model(d / "llama.gguf", arch_name="gpt-oss"),
            "f32": write_demo_model(d / "llama-f32.gguf", arch_name="gpt-oss", outtype="f32")}


def random_texts(n: int, seed: int, marks: bool = True) -> list[str]:
    """Random mixes of scripts, digits, spaces, contractions and emoji; marks=False leaves out
    combining marks (Unicode category M), around which llama.cpp's o200k regex differs from o200k."""
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.;:!?'\"()-_\n\t")
    alphabet += list("éüßçøñÆΩπλжДяשׁعربي中文日本語한국어हिन्दी😀🚀👍🏽\u200d\u00a0")
    alphabet += ["  ", "'s", "'LL", "\r\n", "...", "1234567"]
    if not marks:
        alphabet = [a for a in alphabet if not any(unicodedata.category(ch).startswith("M") for ch in a)]
    return ["".join(rng.choice(alphabet, size=rng.integers(1, 80))) for _ in range(n)]


def test_engine_opens_both_spellings_with_gpt_oss_structure(files) -> None:
    toks = [200006, 1428, 200008, 13225, 2375, 11, 495, 382, 261, 1746, 13, 200007]
    logits = {}
    for arch in ("gptoss", "gpt-oss"):
        path = files[arch]
        eng = pyengine.Engine(path, n_ctx=256, n_threads=2)
        assert eng.metadata["general.architecture"] == arch
        hp = eng.hparams
        assert (hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim) == (2, 64, 8, 2, 64)
        assert (hp.n_expert, hp.n_expert_used, hp.sliding_window, hp.n_ctx_train) == (8, 4, 128, 131072)
        assert hp.swa_layers == (True, False) and hp.rope_scaling == "yarn"
        assert (hp.rope_factor, hp.rope_orig_ctx) == (32.0, 4096)
        assert eng.n_vocab == 201088
        assert eng.metadata["tokenizer.chat_template"] == TEMPLATE.read_text(encoding="utf-8")
        logits[arch] = eng.logits(toks)
        assert np.isfinite(logits[arch]).all() and logits[arch].std() > 0.1
    # same seed: the two spellings hold the same weights
    np.testing.assert_array_equal(logits["gptoss"], logits["gpt-oss"])


def test_engine_tokenization_is_o200k(files) -> None:
    eng = pyengine.Engine(files["gptoss"], n_ctx=64)
    tok = Tokenizer.from_metadata(eng.metadata)
    ref = bpe_openai.get_encoding("o200k_base")
    n_tokens = 0
    for text in random_texts(500, seed=5):
        ids = tok.encode(text)
        assert ids == ref.encode_ordinary(text), repr(text)
        n_tokens += len(ids)
    assert n_tokens > 5000
    assert tok.encode("<|start|>user<|message|>hi<|end|>", special=True) == [200006, 1428, 200008, 3686, 200007]
    assert len(eng.metadata["tokenizer.ggml.merges"]) == 446189


def test_refuses_to_overwrite_without_force_and_is_reproducible(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    r = cli(out, "--layers", 1, "--outtype", "f32", cwd=tmp_path)
    assert r.returncode == 1 and "[ERROR]" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == b"precious"
    assert cli(out, "--layers", 1, "--outtype", "f32", "--force", cwd=tmp_path).returncode == 0
    first = out.read_bytes()
    assert first[:4] == b"GGUF"
    assert cli(out, "--layers", 1, "--outtype", "f32", "--force", cwd=tmp_path).returncode == 0
    assert out.read_bytes() == first  # same seed, same file
    assert cli(out, "--layers", 1, "--outtype", "f32", "--force", "--seed", 1, cwd=tmp_path).returncode == 0
    assert out.read_bytes() != first and len(out.read_bytes()) == len(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary files left


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    def stop(i: int, n: int, t) -> None:
        if i == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_demo_model(tmp_path / "m.gguf", n_layer=1, progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_bad_shape_is_refused(tmp_path: Path) -> None:
    r = cli(tmp_path / "m.gguf", "--embd", 48, cwd=tmp_path)
    assert r.returncode == 1 and "multiple of 32" in r.stderr
    assert list(tmp_path.iterdir()) == []


LLAMA_SCRIPT = """
import json, sys
import numpy as np
from pyengine.llama_cpp_peer import open_llama

path, toks, texts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
ll = open_llama(path, logits_all=True, n_threads=2, n_ctx=512, verbose=False)
ll.eval(toks)
np.save(sys.argv[4], np.array(ll.scores[:len(toks)], dtype=np.float32))
print(json.dumps([ll.tokenize(t.encode(), add_bos=False, special=False) for t in texts]))
"""


@pytest.mark.parametrize(("name", "max_err", "rms_err"), [("f32", 2e-3, 1e-3), ("gpt-oss", 0.2, 0.05)])
def test_llama_cpp_runs_it_like_pyengine(files, name: str, max_err: float, rms_err: float,
                                         tmp_path: Path) -> None:
    """llama.cpp (merges-based BPE, its own gpt-oss graph) agrees with bpe-openai's tokens and with
    pyengine's logits (yarn_truncate=True: llama.cpp's YaRN rounding). Texts without combining
    marks: there llama.cpp's own o200k regex splits differently (e.g. "\\u0940's"), whatever the
    merges. On the Q8_0/MXFP4 file llama.cpp quantizes activations to Q8_0 (pyengine keeps f32),
    which moves logits ~1% and at a few positions flips a near-tied expert choice."""
    pytest.importorskip("llama_cpp")
    path = files[name]
    rng = np.random.default_rng(3)
    toks = [int(t) for t in rng.integers(0, 200000, size=150)]  # longer than the sliding window
    texts = random_texts(100, seed=8, marks=False)
    out = tmp_path / "llama.npy"
    # a subprocess: a crash inside llama.cpp must not take the test run with it
    r = subprocess.run([sys.executable, "-c", LLAMA_SCRIPT, str(path), json.dumps(toks), json.dumps(texts),
                        str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = bpe_openai.get_encoding("o200k_base")
    for text, ids in zip(texts, json.loads(r.stdout.strip().splitlines()[-1])):
        assert ids == ref.encode_ordinary(text), repr(text)
    theirs = np.load(out).astype(np.float64)
    ours = pyengine.Engine(path, n_ctx=512, n_threads=2, yarn_truncate=True).logits(toks).astype(np.float64)
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    rms = np.sqrt(((ours - theirs) ** 2).mean() / (theirs ** 2).mean())
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    print(f"{name}: engine(yarn_truncate) vs llama.cpp: max rel {err:.2e}, rms rel {rms:.2e}, top-1 {top1:.3f}")
    assert err < max_err and rms < rms_err and top1 > 0.95
