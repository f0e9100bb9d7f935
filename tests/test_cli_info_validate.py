"""`pyengine info` and `pyengine validate` as a user runs them, and the load log / error lines."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as VT
from gguf_factory import write_gptoss_gguf

from pyengine.gguf_reader import GGUFFile


def cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "pyengine.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, check=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "gpt-oss-20b.gguf"
    write_gptoss_gguf(path, arch="gpt-oss", with_tokenizer=True, wtype="q8_0", expert_type="mxfp4")
    return path


def test_info_lines(model, tmp_path):
    r = cli("info", model, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "general.architecture: gpt-oss"
    assert lines[1] == "general.name: gpt-oss-tiny"
    assert "gpt-oss.block_count: 2" in lines
    assert "gpt-oss.attention.layer_norm_rms_epsilon: 1e-05" in lines
    assert "gpt-oss.rope.scaling.type: yarn" in lines
    assert "tokenizer: model gpt2, pre gpt-4o, vocab size 300, merges 50" in lines
    summary = [line for line in lines if line.startswith("tensors: ")]
    assert summary and "MXFP4 6" in summary[0] and "Q8_0" in summary[0]
    assert f"file size: {model.stat().st_size:,} bytes" in summary[0]


def test_info_json(model, tmp_path):
    r = cli("info", model, "--json", cwd=tmp_path)
    s = json.loads(r.stdout)
    assert s["general.architecture"] == "gpt-oss"
    assert s["hyperparameters"]["gpt-oss.expert_count"] == 4
    assert s["tokenizer"]["vocab_size"] == 300
    with GGUFFile(model) as f:
        assert s["tensors"]["count"] == len(f.tensors)
        assert s["tensors"]["parameters"] == sum(int(np.prod(t.shape)) for t in f.tensors.values())
    assert s["tensors"]["file_size"] == model.stat().st_size


def test_info_accepts_a_name_and_models_dir(model, tmp_path):
    r = cli("info", "gpt-oss-20b", "--models-dir", model.parent, cwd=tmp_path)
    assert r.returncode == 0 and "general.architecture: gpt-oss" in r.stdout
    r = cli("info", "..", "--models-dir", model.parent, cwd=tmp_path)  # a folder, and not a valid name
    assert r.returncode == 1 and r.stderr.startswith("[ERROR] .. is a folder, not a GGUF file")
    assert "Invalid model name '..'" in r.stderr
    r = cli("info", ".hidden", "--models-dir", model.parent, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("[ERROR] Invalid model name '.hidden'")
    r = cli("info", "../etc/x", "--models-dir", model.parent, cwd=tmp_path)  # a path: used as given
    assert r.returncode == 1 and r.stderr == "[ERROR] Model file not found: ../etc/x\n"
    r = cli("info", "/dev/null", cwd=tmp_path)  # there, but not a file
    assert r.returncode == 1 and r.stderr == "[ERROR] /dev/null is not a regular file, so not a GGUF file\n"
    for long in ("x" * 300, f"{tmp_path}/{'y' * 300}.gguf"):  # too long to exist: an error, not a traceback
        r = cli("info", long, "--models-dir", model.parent, cwd=tmp_path)
        assert r.returncode == 1 and r.stderr.startswith("[ERROR] Model file not found: ") and "longer than the file system allows" in r.stderr


def test_validate_ok_and_deep(model, tmp_path):
    r = cli("validate", model, "--deep", cwd=tmp_path)
    assert r.returncode == 0, r.stdout
    assert r.stdout.strip().endswith("valid")


def _tensor_offset(path: Path, name: str) -> int:
    with GGUFFile(path) as f:
        return f.tensors[name].offset


def test_validate_deep_finds_nan_and_bad_scales(tmp_path):
    path = tmp_path / "m.gguf"
    write_gptoss_gguf(path, expert_type="mxfp4")
    blob = bytearray(path.read_bytes())
    struct.pack_into("<f", blob, _tensor_offset(path, "blk.0.attn_norm.weight") + 8, float("nan"))
    blob[_tensor_offset(path, "blk.1.ffn_up_exps.weight") + 17] = 0xFF   # second block's E8M0 scale
    path.write_bytes(bytes(blob))
    assert cli("validate", path, cwd=tmp_path).returncode == 0   # structure is fine
    r = cli("validate", path, "--deep", cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert "tensor blk.0.attn_norm.weight (F32) contains NaN values near element 2" in lines
    assert "tensor blk.1.ffn_up_exps.weight has an MXFP4 block scale of 0xFF (NaN)" in lines
    assert len(lines) == 2


def test_validate_lists_each_problem(tmp_path):
    path = tmp_path / "m.gguf"
    write_gptoss_gguf(path, drop_tensors=("blk.0.attn_sinks.weight", "blk.1.ffn_norm.weight"),
                      drop_keys=("expert_count",), extra_keys={"gptoss.expert_count": (4, VT.UINT32)})
    r = cli("validate", path, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        "Missing required tensor: blk.0.attn_sinks.weight (expected shape [4])",
    ]
    blob = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(blob[: len(blob) // 2])
    r = cli("validate", tmp_path / "cut.gguf", cwd=tmp_path)
    assert r.returncode == 1 and len(r.stdout.splitlines()) == 1
    assert r.stdout.startswith("cut.gguf is truncated:")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all, just text\n" * 4)
    r = cli("validate", tmp_path / "junk.gguf", cwd=tmp_path)
    assert r.returncode == 1 and "is not a GGUF file: bad magic" in r.stdout


LOAD = "import sys; from pyengine.log import configure; configure(); " \
       "from pyengine.model_file import open_model; open_model(sys.argv[1])"


def test_load_log_and_error_lines(tmp_path):
    good, bad_arch, no_ctx = tmp_path / "gpt-oss-20b.gguf", tmp_path / "v2.gguf", tmp_path / "noctx.gguf"
    write_gptoss_gguf(good, arch="gpt-oss")
    write_gptoss_gguf(bad_arch, arch="gptossv2")
    write_gptoss_gguf(no_ctx, drop_keys=("context_length",))
    r = subprocess.run([sys.executable, "-c", LOAD, str(good)], cwd=tmp_path, capture_output=True, text=True,
                       check=False)
    assert r.stderr.splitlines() == [f"[INFO] Loading model: {good}",
                                     "[INFO] Architecture detected: gptoss (LLM_ARCH_OPENAI_MOE)",
                                     "[INFO] Model loaded successfully"]
    r = cli("validate", bad_arch, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout.startswith("Unknown architecture: gptossv2 (supported: gptoss, gpt-oss)")
    r = cli("validate", no_ctx, cwd=tmp_path)
    assert r.stdout.splitlines() == ["Missing required key: gptoss.context_length"]
    r = cli("info", tmp_path / "missing.gguf", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("[ERROR] Model ")
    assert len(r.stderr.splitlines()) == 1


def _set_tensor_type(path: Path, name: str, ggml_type: int) -> None:
    """Rewrite one tensor's type in the directory (name, n_dims, dims, then the u32 type)."""
    blob = bytearray(path.read_bytes())
    at = blob.index(name.encode()) + len(name)
    n_dims = struct.unpack_from("<I", blob, at)[0]
    struct.pack_into("<I", blob, at + 4 + 8 * n_dims, ggml_type)
    path.write_bytes(bytes(blob))


def test_validate_refuses_types_the_engine_cannot_compute(model, tmp_path):
    """NVFP4 (type 40) is a type the GGUF reader knows but the kernels do not: a Q8_0 matrix of 64-element
    rows re-labelled NVFP4 still fits its bytes, so only the engine's type table can tell."""
    path = tmp_path / "nvfp4.gguf"
    path.write_bytes(model.read_bytes())
    _set_tensor_type(path, "blk.0.attn_q.weight", 40)
    r = cli("validate", path, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["tensor blk.0.attn_q.weight has type NVFP4, which this engine does not support"]
    for command in (("run", path, "hi", "--max-tokens", "1"), ("info", path)):
        r = cli(*command, cwd=tmp_path)
        errors = [line for line in r.stderr.splitlines() if not line.startswith("[INFO]")]
        if command[0] == "run":
            assert r.returncode == 1 and errors == [
                "[ERROR] tensor blk.0.attn_q.weight has type NVFP4, which this engine does not support"], r.stderr
        assert "Traceback" not in r.stderr
