"""open_model: every gpt-oss layout and spelling gives the same canonical tensors; hyperparameter
defaults and errors; split models; model-name resolution inside the models folder."""

import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from gguf_factory import LAYOUTS, bf16_round, write_gptoss_gguf

from pyengine.errors import ModelLoadError
from pyengine.hparams import REQUIRED_KEYS
from pyengine.model_file import GptOssHParams, ModelFile, Tensor, open_model
from pyengine.model_paths import resolve_model, resolve_model_name, router_dir_name


def values(t: Tensor) -> np.ndarray:
    """A canonical tensor dequantized by the reference (gguf.quants), numpy order."""
    flat = dequantize(np.ascontiguousarray(t.data), QT(t.ggml_type))
    return flat.reshape(t.shape[::-1])


def contiguous_bytes(t: Tensor) -> bytes:
    return np.ascontiguousarray(t.data).tobytes()


@pytest.fixture(scope="module")
def layout_files(tmp_path_factory):
    """The same random weights in every layout, spelling and expert type."""
    root = tmp_path_factory.mktemp("layouts")
    files = {}
    for layout in LAYOUTS:
        for arch in ("gptoss", "gpt-oss"):
            for expert_type, wtype in (("mxfp4", "q8_0"), ("f32", "bf16"), ("q8_0", "f16")):
                path = root / f"{layout}-{arch}-{expert_type}.gguf"
                weights = write_gptoss_gguf(path, arch=arch, layout=layout, expert_type=expert_type,
                                            wtype=wtype, seed=3)
                files[layout, arch, expert_type] = (path, weights)
    return files


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ["gptoss", "gpt-oss"])
@pytest.mark.parametrize("expert_type", ["mxfp4", "f32", "q8_0"])
def test_every_layout_gives_the_weights_written(layout_files, layout, arch, expert_type):
    path, weights = layout_files[layout, arch, expert_type]
    with open_model(path) as mf:
        assert isinstance(mf, ModelFile) and mf.arch == arch
        assert set(mf.tensors) == set(weights)
        for name, want in weights.items():
            t = mf.tensors[name]
            assert t.name == name
            assert t.data.dtype == np.uint8 and t.data.strides[-1] == 1
            np.testing.assert_array_equal(values(t), want, err_msg=name)
        if expert_type == "mxfp4":
            assert mf.tensors["blk.0.ffn_down_exps.weight"].ggml_type == int(QT.MXFP4)


@pytest.mark.parametrize("expert_type", ["mxfp4", "f32", "q8_0"])
def test_layouts_are_byte_identical_after_normalisation(layout_files, expert_type):
    base_path, _ = layout_files["llama.cpp", "gptoss", expert_type]
    with open_model(base_path) as base:
        for key, (path, _) in layout_files.items():
            if key[2] != expert_type:
                continue
            with open_model(path) as other:
                for name, t in base.tensors.items():
                    o = other.tensors[name]
                    assert (o.ggml_type, o.shape) == (t.ggml_type, t.shape), (key, name)
                    if key[0] == "ollama-gen1" and name.endswith("_exps.bias"):
                        # Gen-1 stored expert biases as BF16: equal to the F32 ones rounded to BF16.
                        np.testing.assert_array_equal(values(o), bf16_round(values(t)), err_msg=name)
                    else:
                        assert contiguous_bytes(o) == contiguous_bytes(t), (key, name)


def test_gen1_type4_mxfp4_is_repacked_to_type_39(layout_files):
    with open_model(layout_files["ollama-gen1", "gptoss", "mxfp4"][0]) as gen1, \
            open_model(layout_files["llama.cpp", "gptoss", "mxfp4"][0]) as ref:
        assert gen1.raw_tensors["blk.0.ffn_down_exps.weight"].ggml_type == 4
        for part in ("gate", "up", "down"):
            name = f"blk.1.ffn_{part}_exps.weight"
            assert gen1.tensors[name].ggml_type == 39
            assert contiguous_bytes(gen1.tensors[name]) == contiguous_bytes(ref.tensors[name])
        assert gen1.tensors["blk.0.ffn_up_exps.bias"].ggml_type == int(QT.F32)


def test_views_are_zero_copy_where_the_layout_allows(layout_files):
    with open_model(layout_files["ollama-gen1", "gptoss", "f32"][0]) as mf:
        q, k = mf.tensors["blk.0.attn_q.weight"], mf.tensors["blk.0.attn_k.weight"]
        gate = mf.tensors["blk.0.ffn_gate_exps.weight"]
        for t in (q, k, gate):
            assert not t.data.flags.owndata and not t.data.flags.writeable
        assert np.shares_memory(q.data, k.data.base) or q.data.base is k.data.base
        assert not gate.data.flags.c_contiguous  # even rows of the fused gate|up tensor
    with open_model(layout_files["llama.cpp", "gpt-oss", "mxfp4"][0]) as mf:
        for t in mf.tensors.values():
            assert not t.data.flags.owndata and not t.data.flags.writeable


def test_tied_output_and_optional_qkv_biases(tmp_path):
    path = tmp_path / "tied.gguf"
    drop = tuple(f"blk.{i}.attn_{k}.bias" for i in range(2) for k in "qkv")
    write_gptoss_gguf(path, tie_output=True, drop_tensors=drop)
    with open_model(path) as mf:
        assert mf.tensors["output.weight"] is mf.tensors["token_embd.weight"]
        assert not any(name in mf.tensors for name in drop)


def test_hparams_and_documented_defaults(tmp_path):
    path = tmp_path / "ollama.gguf"
    write_gptoss_gguf(path, layout="ollama-gen2", drop_keys=("attention.value_length",), n_ff=96)
    with open_model(path) as mf:
        hp = mf.hparams
    assert isinstance(hp, GptOssHParams)
    assert (hp.n_embd, hp.n_layer, hp.n_head, hp.n_head_kv, hp.head_dim) == (64, 2, 4, 2, 16)
    assert hp.value_dim == 16            # value_length defaults to key_length
    assert hp.n_ff_exp == 96             # from the expert tensor shape (Ollama never writes the key)
    assert hp.rope_scaling == "yarn"     # factor 32 > 1 and no rope.scaling.type key
    assert (hp.yarn_beta_fast, hp.yarn_beta_slow) == (32.0, 1.0)
    assert hp.rope_base == hp.rope_base_swa == 150000.0
    assert hp.rms_eps == pytest.approx(1e-5) and hp.sliding_window == 128
    assert (hp.rope_factor, hp.rope_orig_ctx, hp.n_ctx_train) == (32.0, 4096, 4096)
    assert hp.swa_layers == (True, False)
    assert (hp.n_expert, hp.n_expert_used) == (4, 2)


def test_plain_rope_and_explicit_swa_pattern(tmp_path):
    path = tmp_path / "m.gguf"
    write_gptoss_gguf(path, arch="gpt-oss", n_layer=4,
                      drop_keys=("rope.scaling.factor", "rope.scaling.type"),
                      extra_keys={"gpt-oss.attention.sliding_window_pattern": ([False, True, True, False], VT.ARRAY),
                                  "gpt-oss.rope.scaling.yarn_beta_fast": (16.0, VT.FLOAT32)})
    with open_model(path) as mf:
        assert mf.hparams.rope_scaling == "none" and mf.hparams.rope_factor == 1.0
        assert mf.hparams.swa_layers == (False, True, True, False)
        assert mf.hparams.yarn_beta_fast == 16.0


def test_load_logs_the_three_lines(tmp_path):
    path = tmp_path / "gpt-oss-20b.gguf"
    write_gptoss_gguf(path, arch="gpt-oss")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("pyengine")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        open_model("gpt-oss-20b", models_dir=tmp_path).close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert [r.getMessage() for r in records] == [
        "Loading model: gpt-oss-20b", "Architecture detected: gptoss (LLM_ARCH_OPENAI_MOE)",
        "Model loaded successfully"]


@pytest.mark.parametrize("arch", ["gptoss", "gpt-oss"])
@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_each_required_key_is_required(tmp_path, arch, key):
    path = tmp_path / "m.gguf"
    write_gptoss_gguf(path, arch=arch, drop_keys=(key,))
    with pytest.raises(ModelLoadError) as e:
        open_model(path)
    assert str(e.value) == f"Missing required key: {arch}.{key}"


def test_missing_expert_ff_width_everywhere_is_an_error(tmp_path):
    path = tmp_path / "m.gguf"
    write_gptoss_gguf(path, layout="ollama-gen2",
                      drop_tensors=tuple(f"blk.0.ffn_gate_exps.{k}" for k in ("weight", "bias")))
    with pytest.raises(ModelLoadError, match="Missing required key: gptoss.expert_feed_forward_length"):
        open_model(path)


def test_unknown_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    write_gptoss_gguf(path, arch="gptossv2")
    with pytest.raises(ModelLoadError) as e:
        open_model(path)
    assert str(e.value).startswith("Unknown architecture: gptossv2")
    assert "gptoss" in str(e.value)[len("Unknown architecture: gptossv2"):]
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("key, value, message", [
    ("block_count", ("two", VT.STRING), "Key gptoss.block_count must be an unsigned integer, got the string 'two'"),
    ("rope.freq_base", ("x", VT.STRING), "Key gptoss.rope.freq_base must be a number"),
    ("attention.head_count_kv", (3, VT.UINT32), "must be a multiple of gptoss.attention.head_count_kv"),
    ("expert_used_count", (9, VT.UINT32), "must not exceed gptoss.expert_count"),
    ("block_count", (10**9, VT.UINT32), "Key gptoss.block_count must be from 1 to 4096"),
    ("attention.layer_norm_rms_epsilon", (float("nan"), VT.FLOAT32), "finite positive"),
    ("rope.freq_base", (1.0, VT.FLOAT32), "Key gptoss.rope.freq_base must be greater than 1, got 1.0"),
    ("rope.freq_base_swa", (0.5, VT.FLOAT32), "Key gptoss.rope.freq_base_swa must be greater than 1, got 0.5"),
])
def test_wrong_hyperparameter_values(tmp_path, key, value, message):
    path = tmp_path / "m.gguf"
    write_gptoss_gguf(path, drop_keys=(key,), extra_keys={f"gptoss.{key}": value})
    with pytest.raises(ModelLoadError, match=message.replace(".", r"\.").replace("(", r"\(")):
        open_model(path)


def test_missing_tensor_and_contradicting_shape(tmp_path):
    path = tmp_path / "m.gguf"
    write_gptoss_gguf(path, drop_tensors=("blk.1.attn_sinks.weight",))
    with pytest.raises(ModelLoadError, match=r"^Missing required tensor: blk\.1\.attn_sinks\.weight"):
        open_model(path)
    write_gptoss_gguf(path, drop_keys=("expert_count",), extra_keys={"gptoss.expert_count": (8, VT.UINT32)})
    with pytest.raises(ModelLoadError, match=r"Tensor blk\.0\.ffn_gate_inp\.weight has shape \[64, 4\]; "
                                             r"the hyperparameters require \[64, 8\]"):
        open_model(path)


def _patch_tensor_type(path: Path, name: str, new_type: int) -> None:
    blob = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = blob.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", blob, at)
    struct.pack_into("<I", blob, at + 4 + 8 * n_dims, new_type)
    path.write_bytes(bytes(blob))


def test_unknown_ggml_type_id(tmp_path):
    path = tmp_path / "m.gguf"
    write_gptoss_gguf(path)
    _patch_tensor_type(path, "blk.0.attn_norm.weight", 99)
    with pytest.raises(ModelLoadError, match=r"tensor blk\.0\.attn_norm\.weight has unknown ggml type id 99"):
        open_model(path)


def test_split_model_opens_as_one(tmp_path):
    whole = write_gptoss_gguf(tmp_path / "one.gguf", seed=5)
    write_gptoss_gguf(tmp_path / "gpt-oss-split.gguf", seed=5, split_max_tensors=12)
    shards = sorted(tmp_path.glob("gpt-oss-split-*-of-*.gguf"))
    assert len(shards) == 4 and shards[0].name == "gpt-oss-split-00001-of-00004.gguf"
    for start in (shards[0], shards[2]):
        with open_model(start) as mf:
            assert mf.path == shards[0] and mf.files == shards
            assert set(mf.tensors) == set(whole)
            for name, want in whole.items():
                np.testing.assert_array_equal(values(mf.tensors[name]), want)
            assert mf.hparams.n_layer == 2
    with open_model("gpt-oss-split", models_dir=tmp_path) as mf:
        assert len(mf.files) == 4
    shards[3].unlink()
    with pytest.raises(ModelLoadError, match="Cannot open model file"):
        open_model(shards[0])


# ---- model names -------------------------------------------------------------------------------

@pytest.fixture
def models_dir(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    write_gptoss_gguf(root / "gpt-oss-20b.gguf")
    (root / "gpt-oss_20b").mkdir()
    write_gptoss_gguf(root / "gpt-oss_20b" / "model.gguf", arch="gpt-oss")
    (root / "gpt-oss_latest").mkdir()
    write_gptoss_gguf(root / "gpt-oss_latest" / "model.gguf")
    return root


def test_names_resolve_in_the_models_folder(models_dir, monkeypatch):
    assert router_dir_name("gpt-oss:20b") == "gpt-oss_20b" and router_dir_name("gpt-oss") == "gpt-oss_latest"
    assert resolve_model_name("gpt-oss-20b", models_dir) == models_dir / "gpt-oss-20b.gguf"
    assert resolve_model_name("gpt-oss-20b.gguf", models_dir) == models_dir / "gpt-oss-20b.gguf"
    assert resolve_model_name("gpt-oss:20b", models_dir) == models_dir / "gpt-oss_20b" / "model.gguf"
    assert resolve_model_name("gpt-oss", models_dir) == models_dir / "gpt-oss_latest" / "model.gguf"
    monkeypatch.setenv("LLM_NODE_MODELS_DIR", str(models_dir))
    assert resolve_model("gpt-oss:20b") == models_dir / "gpt-oss_20b" / "model.gguf"
    with open_model("gpt-oss:20b") as mf:
        assert mf.arch == "gpt-oss" and mf.name == "gpt-oss-tiny"
    file_path = models_dir / "gpt-oss-20b.gguf"
    assert resolve_model(str(file_path), "/nonexistent") == file_path
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_name("gpt-oss:120b", models_dir)


@pytest.mark.parametrize("name", ["../outside", "..", "a/../../outside", "/etc/passwd", "sub/x", ".hidden",
                                  "..\\outside", "x\0y", ""])
def test_names_never_leave_the_models_folder(models_dir, name):
    outside = models_dir.parent / "outside.gguf"
    write_gptoss_gguf(outside)
    with pytest.raises(ModelLoadError):
        resolve_model_name(name, models_dir)


def test_symlinks_the_folder_owner_made_are_followed(models_dir):
    """An Ollama blob linked into the folder (file or folder link) loads; the client's name is
    what stays confined, not the target of the owner's links."""
    blobs = models_dir.parent / "ollama" / "blobs"
    blobs.mkdir(parents=True)
    write_gptoss_gguf(blobs / "sha256-0123abcd", arch="gpt-oss")
    (models_dir / "gpt-oss_120b").mkdir()
    os.symlink(blobs / "sha256-0123abcd", models_dir / "gpt-oss_120b" / "model.gguf")
    os.symlink(blobs / "sha256-0123abcd", models_dir / "blob.gguf")
    os.symlink(blobs.parent, models_dir / "linked_latest")
    (blobs.parent / "model.gguf").symlink_to(blobs / "sha256-0123abcd")
    for name, want in (("gpt-oss:120b", models_dir / "gpt-oss_120b" / "model.gguf"),
                       ("blob", models_dir / "blob.gguf"), ("linked", models_dir / "linked_latest" / "model.gguf")):
        assert resolve_model_name(name, models_dir) == want
        with open_model(name, models_dir=models_dir) as mf:
            assert mf.arch == "gpt-oss"
    # the name itself still cannot walk out, even next to those links
    for name in ("../ollama/blobs/sha256-0123abcd", "gpt-oss_120b/model.gguf", "linked_latest/model.gguf"):
        with pytest.raises(ModelLoadError, match="Invalid model name"):
            resolve_model_name(name, models_dir)
    # a dangling link is "not found", not a crash
    os.symlink(blobs / "gone", models_dir / "dangling.gguf")
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_name("dangling", models_dir)


def test_model_names_are_one_plain_entry_name(models_dir):
    """Names from a request: control and format characters, lone surrogates and names over 255
    bytes are invalid; a name whose candidates run past the file system's limit (NAME_latest) is
    "not found", not an OSError."""
    for name in ("tab\tname", "nul\x00", "rtl\u202e", "\ud800", "x" * 256, "é" * 128, ".", ".."):
        with pytest.raises(ModelLoadError, match="Invalid model name"):
            resolve_model_name(name, models_dir)
    write_gptoss_gguf(models_dir / ("y" * 250 + ".gguf"), arch="gptoss")
    assert resolve_model_name("y" * 250, models_dir).name == "y" * 250 + ".gguf"
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_name("z" * 250, models_dir)


def test_vocabulary_must_match_the_embedding(tmp_path):
    path = tmp_path / "m.gguf"
    write_gptoss_gguf(path, extra_keys={"tokenizer.ggml.tokens": (["a", "b"], VT.ARRAY)}, n_vocab=300)
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.tokens has"):
        open_model(path)


# ---- llama.cpp as the judge: canonical tensors are what llama.cpp's gpt-oss loader expects ---------

LLAMA_LOGITS = """
import json, sys
import llama_cpp
import numpy as np
m = llama_cpp.Llama(sys.argv[1], n_ctx=64, logits_all=True, verbose=False, n_threads=1)
m.eval([5, 17, 3, 250, 9, 42, 0, 299])
print(json.dumps(np.array(m.scores[:8]).tolist()))
"""


def llama_cpp_logits(path: Path, cwd: Path) -> np.ndarray:
    r = subprocess.run([sys.executable, "-c", LLAMA_LOGITS, str(path)], cwd=cwd, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.array(json.loads(r.stdout.strip().splitlines()[-1]))


def export_llama_cpp(src: Path, dst: Path, round_expert_biases: bool = False) -> None:
    """Write a model's canonical tensors (bytes as the loader gives them) as a llama.cpp gpt-oss file."""
    with open_model(src) as mf:
        w = GGUFWriter(str(dst), "gpt-oss")
        for key in mf.metadata:
            if key.startswith("general."):
                continue
            name = "gpt-oss." + key[len(mf.arch) + 1:] if key.startswith(f"{mf.arch}.") else key
            value, vtype = mf.metadata[key], mf.metadata.types[key]
            if vtype == VT.ARRAY:
                w.add_array(name, value.tolist() if isinstance(value, np.ndarray) else value)
            else:
                w.add_key_value(name, value, vtype)
        if "gpt-oss.expert_feed_forward_length" not in {f"gpt-oss.{k[len(mf.arch) + 1:]}" for k in mf.metadata}:
            w.add_uint32("gpt-oss.expert_feed_forward_length", mf.hparams.n_ff_exp)  # llama.cpp requires it
            w.add_string("gpt-oss.rope.scaling.type", mf.hparams.rope_scaling)
        for name, t in mf.tensors.items():
            data = np.ascontiguousarray(t.data)
            if round_expert_biases and name.endswith("_exps.bias"):
                data = quantize(values(t), QT.BF16).view(np.uint16)
                data = (data.astype(np.uint32) << 16).view(np.uint8)
            w.add_tensor(name, data.reshape(*t.shape[::-1][:-1], -1), raw_dtype=QT(t.ggml_type))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def test_llama_cpp_gives_the_same_logits_for_every_layout(tmp_path):
    pytest.importorskip("llama_cpp")
    # Q8_0 matrices crash this llama.cpp build's AMX path at these tiny shapes; BF16 + MXFP4 do not.
    kw = {"with_tokenizer": True, "expert_type": "mxfp4", "wtype": "bf16", "seed": 7}
    write_gptoss_gguf(tmp_path / "ll.gguf", arch="gpt-oss", layout="llama.cpp", **kw)
    write_gptoss_gguf(tmp_path / "g2.gguf", arch="gptoss", layout="ollama-gen2", **kw)
    write_gptoss_gguf(tmp_path / "g1.gguf", arch="gptoss", layout="ollama-gen1", **kw)
    export_llama_cpp(tmp_path / "g2.gguf", tmp_path / "g2-ll.gguf")
    export_llama_cpp(tmp_path / "g1.gguf", tmp_path / "g1-ll.gguf")
    export_llama_cpp(tmp_path / "ll.gguf", tmp_path / "ll-bf16-biases.gguf", round_expert_biases=True)
    reference = llama_cpp_logits(tmp_path / "ll.gguf", tmp_path)
    assert reference.shape == (8, 300) and np.isfinite(reference).all() and np.abs(reference).max() > 1
    np.testing.assert_array_equal(llama_cpp_logits(tmp_path / "g2-ll.gguf", tmp_path), reference)
    # Gen-1 (fused, type-4 MXFP4, BF16 expert biases) = the type-39 file with BF16-rounded biases.
    np.testing.assert_array_equal(llama_cpp_logits(tmp_path / "g1-ll.gguf", tmp_path),
                                  llama_cpp_logits(tmp_path / "ll-bf16-biases.gguf", tmp_path))
