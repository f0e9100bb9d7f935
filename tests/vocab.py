"""Test helper: the o200k_harmony vocabulary as GGUF metadata dicts and files, plus openai-harmony.

The vocabulary itself (ranks from bpe-openai, GPT-2 token strings, harmony specials, merges) is
pyengine.o200k; this adds what only tests need: the metadata dict ModelFile would hold, a vocab-only
GGUF, the o200k_base.tiktoken file openai-harmony loads, and a fast GGUF metadata reader.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path

import numpy as np

from pyengine.o200k import (  # noqa: F401  (re-exported for the tests)
    BYTE_TO_UNICODE,
    HARMONY_SPECIALS,
    N_BASE,
    N_VOCAB,
    harmony_specials,
    merges,
    merges_from_ranks,
    o200k_pattern,
    o200k_ranks,
    special_token_text,
    to_gpt2_text,
    token_types,
    tokens,
)


@functools.lru_cache(maxsize=4)
def harmony_metadata(pre: str = "gpt-4o", arch: str = "gpt-oss", with_merges: bool = False) -> dict:
    """The tokenizer part of a gpt-oss GGUF's metadata as a dict (what ModelFile.metadata holds).

    Ollama's gptoss files use pre="default", arch "gptoss", and eos 199999 with eos_token_ids.
    """
    meta = {
        "general.architecture": arch,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": list(tokens()),
        "tokenizer.ggml.token_type": np.array(token_types(), dtype=np.int32),
        "tokenizer.ggml.bos_token_id": 199998,
        "tokenizer.ggml.eos_token_id": 200002,
        "tokenizer.ggml.padding_token_id": 199999,
    }
    if arch == "gptoss":
        meta["tokenizer.ggml.eos_token_id"] = 199999
        meta["tokenizer.ggml.eos_token_ids"] = [199999, 200002, 200012]
        meta["tokenizer.ggml.add_bos_token"] = False
    if with_merges:
        meta["tokenizer.ggml.merges"] = list(merges())
    return meta


def write_vocab_gguf(path: Path, pre: str = "gpt-4o", arch: str = "gpt-oss") -> Path:
    """A vocab-only GGUF (metadata, no tensors) like llama.cpp's models/ggml-vocab-*.gguf."""
    import gguf

    meta = harmony_metadata(pre, arch, with_merges=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"].tolist())
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    writer.add_pad_token_id(meta["tokenizer.ggml.padding_token_id"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiktoken_file(folder: Path) -> Path:
    """o200k_base.tiktoken (base64 token, space, rank per line) for TIKTOKEN_ENCODINGS_BASE."""
    path = Path(folder) / "o200k_base.tiktoken"
    ranks = o200k_ranks()
    lines = [f"{base64.b64encode(p).decode()} {r}\n" for p, r in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("".join(lines))
    return path


def load_harmony_encoding(folder: Path):
    """openai-harmony's HARMONY_GPT_OSS encoding, offline, from an o200k file written to folder."""
    import os

    import openai_harmony

    write_tiktoken_file(folder)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)


def read_gguf_metadata(path: Path) -> dict:
    """Every KV pair of a GGUF v3 file (gguf-py's reader takes a minute on a 201k-token vocab)."""
    import struct

    data = Path(path).read_bytes()
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return data[pos - n : pos].decode("utf-8")

    def value(kind: int):
        if kind == 8:
            return string()
        if kind == 9:
            item_kind, count = take("<I"), take("<Q")
            return [value(item_kind) for _ in range(count)]
        return take(scalar[kind])

    if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] != 3:
        raise ValueError(f"{path} is not a GGUF v3 file")
    pos = 8
    _n_tensors, n_kv = take("<Q"), take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("<I"))
    return meta


def gguf_keys(arch: str = "gpt-oss", **int_keys: int) -> dict:
    """The o200k_harmony vocabulary as write_gptoss_gguf(extra_keys=...) takes it, plus uint32
    hyperparameters given as suffix=value (e.g. attention_sliding_window=32 for
    ARCH.attention.sliding_window; drop the factory's own key with drop_keys)."""
    from gguf import GGUFValueType

    meta = harmony_metadata()
    keys = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": meta["tokenizer.ggml.pre"],
            "tokenizer.ggml.tokens": (meta["tokenizer.ggml.tokens"], GGUFValueType.ARRAY),
            "tokenizer.ggml.token_type": (meta["tokenizer.ggml.token_type"].tolist(), GGUFValueType.ARRAY),
            "tokenizer.ggml.bos_token_id": (meta["tokenizer.ggml.bos_token_id"], GGUFValueType.UINT32),
            "tokenizer.ggml.eos_token_id": (meta["tokenizer.ggml.eos_token_id"], GGUFValueType.UINT32)}
    for suffix, value in int_keys.items():
        keys[f"{arch}.{suffix.replace('_', '.', 1)}"] = (value, GGUFValueType.UINT32)
    return keys
