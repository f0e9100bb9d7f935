"""`pyengine convert` against references no one here wrote.

- llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist) on the same tiny random
  checkpoints: same tensor names, shapes, types, bytes and metadata (f32 form, MXFP4 form);
- llama.cpp's quantizer (MXFP4_MOE) for `--outtype mxfp4`;
- llama.cpp loading and running our `gpt-oss` file, and transformers' logits on the checkpoint;
- the file-handling promises: no overwrite without --force, nothing left after a failure.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import hf_models
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from pyengine.cli import main as cli_main
from pyengine.convert import convert, repack_mxfp4
from pyengine.errors import ModelLoadError

# keys llama.cpp derives from the folder name / parameter count, not from the checkpoint
_NAMING_KEYS = {"general.name", "general.size_label"}


# ------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def hf_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "f32"
    hf_models.make_hf_gptoss(d, seed=0, dtype="float32")
    return d


@pytest.fixture(scope="module")
def hf_mx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "mx"
    hf_models.make_hf_gptoss(d, seed=1, dtype="bfloat16", mxfp4=True)
    return d


@pytest.fixture(scope="session")
def llama_cpp_dir() -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist (downloaded once per machine)."""
    try:
        import llama_cpp
        spec = f"llama-cpp-python=={llama_cpp.__version__}"
    except ImportError:
        spec = "llama-cpp-python"
    cache = hf_models.cache_dir()
    done = cache / f"{spec.replace('==', '-')}-vendor"
    if not (done / "convert_hf_to_gguf.py").exists():
        dl = cache / "sdist"
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                            "llama-cpp-python", spec, "-d", str(dl)], capture_output=True, text=True, check=False)
        tarballs = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not tarballs:
            pytest.skip(f"cannot download the llama-cpp-python sdist with pip: {r.stderr[-300:]}")
        tmp = done.with_name(done.name + f".tmp{os.getpid()}")
        with tarfile.open(tarballs[-1]) as tf:
            members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name
                       and m.name.split("/vendor/llama.cpp/", 1)[1].split("/")[0]
                       in ("convert_hf_to_gguf.py", "conversion", "gguf-py")]
            tf.extractall(tmp, members=members, filter="data")
        os.replace(next(tmp.glob("*/vendor/llama.cpp")), done)
    return done


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory, hf_f32: Path, hf_mx: Path):
    """ours(form, **options) -> our conversion of checkpoint `form` ("f32" | "mx"), made once."""
    out_dir = tmp_path_factory.mktemp("ours")
    made: dict[tuple, Path] = {}

    def get(form: str, **options: str) -> Path:
        key = (form, *sorted(options.items()))
        if key not in made:
            name = "-".join(f"{v}" for v in key).replace(".", "_") + ".gguf"
            made[key] = convert(hf_f32 if form == "f32" else hf_mx, out_dir / name, **options)
        return made[key]
    return get


def llama_convert(llama_dir: Path, hf_dir: Path, out: Path, outtype: str) -> Path:
    env = dict(os.environ, PYTHONPATH=str(llama_dir / "gguf-py"))
    r = subprocess.run([sys.executable, str(llama_dir / "convert_hf_to_gguf.py"), str(hf_dir),
                        "--outfile", str(out), "--outtype", outtype],
                       env=env, capture_output=True, text=True, cwd=out.parent, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def llama_quantize_mxfp4_moe(src: Path, dst: Path) -> Path:
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_MXFP4_MOE
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


@pytest.fixture(scope="module")
def llama_f32(llama_cpp_dir: Path, hf_f32: Path) -> Path:
    return llama_convert(llama_cpp_dir, hf_f32, hf_f32.parent / "f32.llama.gguf", "f32")


@pytest.fixture(scope="module")
def llama_mx(llama_cpp_dir: Path, hf_mx: Path) -> Path:
    return llama_convert(llama_cpp_dir, hf_mx, hf_mx.parent / "mx.llama.gguf", "bf16")


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}


@dataclass
class GGUFTensor:
    tensor_type: QT
    shape: list[int]      # GGUF ne, fastest first
    data: bytes


def read_gguf(path: Path) -> tuple[dict, dict[str, GGUFTensor]]:
    """(metadata {key: value}, tensors {name: GGUFTensor}) of a GGUF file. A plain parse of the
    container (spec §1.1): gguf.GGUFReader takes ~11 s per file on a 201k-token vocabulary."""
    buf = memoryview(Path(path).read_bytes())
    assert bytes(buf[:4]) == b"GGUF"
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return bytes(buf[pos - n:pos]).decode("utf-8")

    def value(vtype: int):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if etype in (8, 9):
                return [value(etype) for _ in range(count)]
            fmt = _SCALARS[etype]
            size = struct.calcsize(fmt)
            pos += count * size
            return np.frombuffer(buf[pos - count * size:pos], dtype=fmt).tolist()
        fmt = _SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    kv = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        kv[key] = value(vtype)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        ne = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, QT(qtype), ne, offset))
    align = kv.get("general.alignment", 32)
    start = (pos + align - 1) // align * align
    tensors = {}
    for name, qtype, ne, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(ne[1:])) * ne[0] // block * size
        data = bytes(buf[start + offset:start + offset + nbytes])
        tensors[name] = GGUFTensor(qtype, ne, data)
    return kv, tensors


def raw_bytes(t: GGUFTensor) -> bytes:
    return t.data


def assert_same_gguf(ours: Path, theirs: Path) -> None:
    """Same metadata (except naming keys), tensor names, types, shapes and bytes."""
    a_kv, a_t = read_gguf(ours)
    b_kv, b_t = read_gguf(theirs)
    assert set(a_kv) - _NAMING_KEYS == set(b_kv) - _NAMING_KEYS
    for k in set(a_kv) - _NAMING_KEYS:
        assert a_kv[k] == b_kv[k], k
    assert set(a_t) == set(b_t)
    for name, t in a_t.items():
        u = b_t[name]
        assert (t.tensor_type, list(t.shape)) == (u.tensor_type, list(u.shape)), name
        assert raw_bytes(t) == raw_bytes(u), name


def run_cli(*args: str) -> int:
    return cli_main(["convert", *map(str, args)])


# --------------------------------------------------------------------------- the test checkpoints

def test_mxfp4_checkpoint_is_what_transformers_loads(hf_mx: Path) -> None:
    """The helper's MXFP4 form dequantizes (transformers' own loader) to the weights our reference
    dequantization gives, and sinks/biases are non-zero."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ours = hf_models.load_hf_gptoss(hf_mx)
    theirs = transformers.GptOssForCausalLM.from_pretrained(
        hf_mx, dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True))
    ids = torch.tensor([[3, 200006, 17, 9000, 5, 1, 42, 7, 11, 13, 200008, 99]])
    with torch.no_grad():
        np.testing.assert_allclose(theirs(ids).logits.numpy(), ours(ids).logits.numpy(), atol=1e-5)
    sd = hf_models.hf_state_dict_f32(hf_mx)
    for name in ("model.layers.0.self_attn.sinks", "model.layers.1.self_attn.q_proj.bias",
                 "model.layers.0.mlp.experts.gate_up_proj_bias", "model.layers.1.mlp.router.bias"):
        assert np.all(sd[name] != 0), name


def test_repack_mxfp4_is_lossless() -> None:
    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 256, size=(3, 7, 4, 16), dtype=np.uint8)
    scales = rng.integers(100, 140, size=(3, 7, 4), dtype=np.uint8)
    ggml = repack_mxfp4(blocks, scales)
    assert ggml.shape == (3, 7, 4 * 17)
    ours = gguf.quants.dequantize(ggml, QT.MXFP4)                     # (3, 7, 128)
    want = hf_models.dequantize_hf_mxfp4(blocks, scales).transpose(0, 2, 1)
    np.testing.assert_array_equal(ours, want)


# -------------------------------------------------------------------- against llama.cpp's converter

def test_f32_matches_llama_cpp_converter(ours, llama_f32: Path) -> None:
    out = ours("f32", outtype="f32", arch_name="gpt-oss")
    assert_same_gguf(out, llama_f32)
    kv, tensors = read_gguf(out)
    assert kv["general.architecture"] == "gpt-oss"
    assert kv["gpt-oss.rope.scaling.original_context_length"] == 64
    assert kv["tokenizer.chat_template"] == hf_models.CHAT_TEMPLATE
    assert len(kv["tokenizer.ggml.tokens"]) == hf_models.VOCAB_SIZE
    assert len(tensors) == 3 + 19 * 2


def test_mxfp4_checkpoint_matches_llama_cpp_converter(ours, llama_mx: Path) -> None:
    """Experts from *_blocks/*_scales: bit-identical MXFP4 after the nibble repack."""
    out = ours("mx", outtype="bf16", arch_name="gpt-oss")
    assert_same_gguf(out, llama_mx)
    _, tensors = read_gguf(out)
    assert tensors["blk.1.ffn_up_exps.weight"].tensor_type == QT.MXFP4
    assert tensors["blk.1.attn_q.weight"].tensor_type == QT.BF16


@pytest.mark.parametrize("form", ["f32", "mx"])
def test_outtype_mxfp4_matches_llama_quantize(form: str, ours, request: pytest.FixtureRequest,
                                              tmp_path: Path) -> None:
    """--outtype mxfp4 == llama.cpp converter + llama-quantize MXFP4_MOE, byte for byte (experts
    MXFP4, from bf16 by quantizing; other matrices Q8_0; 1-D, biases and router F32)."""
    theirs = llama_quantize_mxfp4_moe(request.getfixturevalue(f"llama_{form}"),
                                      tmp_path / "theirs.gguf")
    out = ours(form, outtype="mxfp4", arch_name="gpt-oss")
    assert_same_gguf(out, theirs)
    kv, tensors = read_gguf(out)
    assert kv["general.file_type"] == 38
    types = {n: t.tensor_type for n, t in tensors.items()}
    assert types["blk.0.ffn_gate_exps.weight"] == QT.MXFP4
    assert types["token_embd.weight"] == types["blk.0.attn_k.weight"] == QT.Q8_0
    assert types["blk.0.ffn_gate_inp.weight"] == types["blk.0.ffn_down_exps.bias"] == QT.F32


# ----------------------------------------------------------------------- llama.cpp runs our files

def _llama(path: Path):
    pytest.importorskip("llama_cpp")
    from pyengine.llama_cpp_peer import open_llama

    return open_llama(path, n_ctx=64, n_threads=2, logits_all=True, verbose=False)


def test_llama_cpp_runs_our_file_like_transformers(hf_f32: Path, ours) -> None:
    """Our f32 gpt-oss file in llama.cpp gives transformers' logits on the checkpoint: every name,
    split and transpose is right, independently of llama.cpp's converter."""
    torch = pytest.importorskip("torch")
    llm = _llama(ours("f32", outtype="f32", arch_name="gpt-oss"))
    ids = [3, 200006, 17, 9000, 5, 1, 42, 7, 11, 13]   # longer than the sliding window (8)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        model = hf_models.load_hf_gptoss(hf_f32, yarn_truncate=True)  # llama.cpp rounds YaRN dims
        want = model(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 2e-3, err


def test_llama_cpp_loads_mxfp4_output(ours) -> None:
    llm = _llama(ours("mx", outtype="mxfp4", arch_name="gpt-oss"))
    llm.eval([3, 200006, 17, 9000, 5])
    scores = np.array(llm.scores[:5])
    assert np.isfinite(scores).all() and scores.std() > 0


# --------------------------------------------------------------------------- names and layouts

def test_default_arch_is_gptoss(hf_mx: Path, ours, tmp_path: Path) -> None:
    a_kv, a_t = read_gguf(convert(hf_mx, tmp_path / "a.gguf"))   # defaults: gptoss, bf16
    b_kv, b_t = read_gguf(ours("mx", outtype="bf16", arch_name="gpt-oss"))
    assert a_kv["general.architecture"] == "gptoss"
    assert {k.replace("gptoss.", "gpt-oss.", 1): v for k, v in a_kv.items()
            if k != "general.architecture"} == {k: v for k, v in b_kv.items()
                                                 if k != "general.architecture"}
    assert {n: raw_bytes(t) for n, t in a_t.items()} == {n: raw_bytes(t) for n, t in b_t.items()}


def test_ollama_layout_is_gen2(ours) -> None:
    kv, tensors = read_gguf(ours("mx", outtype="bf16", layout="ollama"))
    _, ref = read_gguf(ours("mx", outtype="bf16", arch_name="gpt-oss"))
    assert kv["general.architecture"] == "gptoss"
    assert not any(k.startswith("gptoss.") and k.endswith(("expert_feed_forward_length",
                   "scaling.type", "yarn_beta_fast", "yarn_beta_slow")) for k in kv)
    assert kv["gptoss.rope.scaling.factor"] == 32.0
    assert len(tensors) == 3 + 19 * 2
    renames = {"attn_out.weight": "attn_output.weight", "attn_out.bias": "attn_output.bias",
               "ffn_norm.weight": "post_attention_norm.weight", "attn_sinks": "attn_sinks.weight"}
    for name, t in tensors.items():
        blk, _, rest = name.partition(".") if name.startswith("blk.") else ("", "", name)
        if blk:
            n, rest = rest.split(".", 1)
            canonical = f"blk.{n}.{renames.get(rest, rest)}"
        else:
            canonical = name
        assert "attn_output" not in name and "post_attention_norm" not in name, name
        assert raw_bytes(t) == raw_bytes(ref[canonical]), name
    types = {n: t.tensor_type for n, t in tensors.items()}
    assert types["blk.0.attn_sinks"] == types["blk.1.attn_out.bias"] == QT.F32
    assert types["blk.0.ffn_norm.weight"] == types["blk.0.ffn_up_exps.bias"] == QT.F32
    assert types["blk.1.attn_out.weight"] == types["token_embd.weight"] == QT.BF16
    assert types["blk.1.ffn_down_exps.weight"] == QT.MXFP4


def test_loader_reads_both_layouts(ours) -> None:
    model_file = pytest.importorskip("pyengine.model_file")
    for layout in ("llama.cpp", "ollama"):
        with model_file.open_model(ours("mx", outtype="bf16", layout=layout)) as mf:
            hp = mf.hparams
            assert (hp.n_embd, hp.n_layer, hp.head_dim, hp.n_expert, hp.sliding_window) == (64, 2, 32, 4, 8)
            assert hp.rope_scaling == "yarn" and hp.rope_orig_ctx == 64
            assert mf.tensors["blk.1.attn_sinks.weight"].shape == (4,)


# ------------------------------------------------------------------------------ file handling

def test_refuses_to_overwrite_without_force(hf_mx: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    assert run_cli(hf_mx, out, "-q") == 1
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert run_cli(hf_mx, out, "-q", "--force") == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, MemoryError])
def test_interrupted_conversion_leaves_nothing(hf_mx: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, exc: type) -> None:
    import pyengine.convert as conv
    real, calls = conv._encode, []

    def failing(values: np.ndarray, qtype: QT) -> np.ndarray:
        calls.append(qtype)
        if len(calls) % 6 == 0:   # after the header and some tensor data are on disk
            raise exc()
        return real(values, qtype)

    monkeypatch.setattr(conv, "_encode", failing)
    old = tmp_path / "old.gguf"
    old.write_bytes(b"previous version")
    with pytest.raises(exc):
        convert(hf_mx, tmp_path / "new.gguf")
    with pytest.raises(exc):
        convert(hf_mx, old, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.gguf"]
    assert old.read_bytes() == b"previous version"


def test_cli_progress_and_result(hf_mx: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    r = subprocess.run([sys.executable, "-m", "pyengine.cli", "convert", str(hf_mx), str(out),
                        "--outtype", "q8_0"], capture_output=True, text=True, cwd=tmp_path,
                       check=False)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("[ 1/41] token_embd.weight") and "Q8_0" in lines[0]
    assert lines[-1].startswith("[INFO] wrote")
    assert os.stat(out).st_mode & 0o777 != 0o600


def test_rejects_other_checkpoints(hf_f32: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf_f32.iterdir():
        (bad / f.name).symlink_to(f)
    cfg = json.loads((hf_f32 / "config.json").read_text())
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps(dict(cfg, layer_types=["full_attention"] * 2)))
    with pytest.raises(ModelLoadError, match="layer_types"):
        convert(bad, tmp_path / "x.gguf")
    (bad / "config.json").write_text(json.dumps(dict(cfg, architectures=["LlamaForCausalLM"],
                                                     model_type="llama")))
    with pytest.raises(ModelLoadError, match="not a gpt-oss"):
        convert(bad, tmp_path / "x.gguf")
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        convert(bad, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    assert run_cli(tmp_path / "nowhere", tmp_path / "x.gguf") == 1


def test_transformers_saved_sharded_folder(hf_f32: Path, ours, tmp_path: Path) -> None:
    """A folder written by transformers' save_pretrained (rope settings as `rope_parameters`,
    several *.safetensors shards, like the published checkpoints) converts to the same file."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    saved = tmp_path / "saved"
    model = transformers.GptOssForCausalLM.from_pretrained(hf_f32, dtype=torch.float32)
    model.save_pretrained(saved, max_shard_size="30MB")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (saved / f).symlink_to(hf_f32 / f)
    assert len(list(saved.glob("*.safetensors"))) > 1
    assert "rope_scaling" not in json.loads((saved / "config.json").read_text())
    out = convert(saved, tmp_path / "m.gguf", outtype="f32", arch_name="gpt-oss")
    assert_same_gguf(out, ours("f32", outtype="f32", arch_name="gpt-oss"))
