"""No input crashes the process: truncated and bit-flipped GGUF files only ever raise ModelLoadError
(or load and decode).

Run in-process on purpose: a segfault in the compiled string walker would take pytest down with it."""

import os
from pathlib import Path

import numpy as np
import pytest
from gguf_factory import write_gptoss_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyengine import Engine
from pyengine.commands.validate import validate
from pyengine.errors import ModelLoadError
from pyengine.gguf_reader import GGUFFile
from pyengine.model_file import open_model


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Valid files (tokenizer arrays big enough to be lazy) in the three layouts."""
    root = tmp_path_factory.mktemp("fuzz")
    out = []
    for layout, expert_type in (("llama.cpp", "mxfp4"), ("ollama-gen1", "mxfp4"), ("ollama-gen2", "q8_0")):
        path = root / f"{layout}.gguf"
        write_gptoss_gguf(path, layout=layout, expert_type=expert_type, with_tokenizer=True,
                          n_vocab=1100, n_merges=1200, n_embd=32, n_ff=32, n_layer=1)
        out.append(path.read_bytes())
    return out


def exercise(path: Path) -> None:
    """Everything a user can do with a file: open, read every key, validate deeply, decode."""
    try:
        with GGUFFile(path) as f:
            for key in f.metadata:
                f.metadata[key]
    except ModelLoadError as e:
        assert str(e)
    try:
        open_model(path).close()
    except ModelLoadError as e:
        assert str(e)
    assert all(isinstance(p, str) and p for p in validate(str(path), deep=True))
    try:  # a file that loads goes on into the C core: a forward pass over whatever bytes it holds
        engine = Engine(str(path), n_ctx=32, verbose=False)
    except ModelLoadError as e:
        assert str(e)
        return
    assert engine.eval([1, 2, 3]).shape == (1100,)


# More examples for a long local hunt: PYENGINE_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_reader.py
FUZZ_EXAMPLES = int(os.environ.get("PYENGINE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(which=st.integers(0, 2), cut=st.floats(0, 1))
def test_truncated_files(seeds, tmp_path_factory, which, cut):
    blob = seeds[which]
    path = tmp_path_factory.mktemp("t") / "m.gguf"
    path.write_bytes(blob[: int(len(blob) * cut)])
    exercise(path)


@FUZZ
@given(which=st.integers(0, 2), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=8),
       header_bias=st.booleans())
def test_bit_flipped_files(seeds, tmp_path_factory, which, flips, header_bias):
    blob = bytearray(seeds[which])
    # Most bytes are tensor data; bias half the examples to the header, metadata and directory.
    span = min(len(blob), 40_000) if header_bias else len(blob)
    for where, bit in flips:
        blob[int(where * (span - 1))] ^= 1 << bit
    path = tmp_path_factory.mktemp("f") / "m.gguf"
    path.write_bytes(bytes(blob))
    exercise(path)


@FUZZ
@given(data=st.binary(min_size=0, max_size=200))
def test_random_bytes_after_a_valid_header(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("r") / "m.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + data)
    exercise(path)


def test_exercise_accepts_the_seeds(seeds, tmp_path):
    for i, blob in enumerate(seeds):
        path = tmp_path / f"{i}.gguf"
        path.write_bytes(blob)
        assert validate(str(path), deep=True) == []
        with open_model(path) as mf:
            assert np.asarray(mf.metadata["tokenizer.ggml.token_type"]).size == 1100
        # the fuzzed files' way into the C core is open: every seed loads and decodes
        assert np.isfinite(Engine(str(path), n_ctx=32, verbose=False).eval([1, 2, 3])).all()
