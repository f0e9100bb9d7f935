"""The repack cache: a model's block-quantized expert weights, attention matrices and output in the R16
decode layout (csrc/r16.h), kept in a file next to the model (`MODEL.gguf.pyengine-r16`), built on
the first load and only mapped after that.

Why: in the R16 layout the CPU decode kernels do far fewer vector instructions per weight byte
(MXFP4: ~35 instead of ~54 per 16 rows x 32 elements; Q8_0: nothing to decode at all; the others:
no gathering of extra bits or packed scales), and a kernel that computes less per byte streams
closer to the memory's rate (bench/RESULTS.md), with the same bits.
Why a file rather than repacking at load (what llama.cpp does, 9 s and 21 GiB RSS for the 20b
here): a mapped file keeps load sub-second and RSS small, the page cache shares it between
processes, and the kernel may drop its pages under memory pressure. The first load pays once for
reading those weights and writing the same number of bytes.

The file: 16 bytes of MAGIC, a little-endian u64 length and a JSON header (version, the model
files' names, sizes and mtimes, and each tensor's name, shape, offset and byte count), then each
tensor's R16 bytes at a 4096-byte boundary. It is used only when its header equals the one this
model would get (so a changed model file, by size or mtime, or a different engine version makes
it stale and it is rebuilt). It is written under a temporary name with its space reserved first
(a full disk is an OSError, not a crash), then renamed, so no reader ever sees half a file."""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from pathlib import Path

import numpy as np

from pyengine import _model
from pyengine.gguf_reader import advise_huge_pages
from pyengine.log import logger

MAGIC = b"PYENGINE-R16\0\0\0\0"
VERSION = 3  # 3: Q3_K and the Q5 types as pieces of 3- and 5-bit fields; 2: entries of every R16 type (1: MXFP4 experts only)
SUFFIX = ".pyengine-r16"
ALIGN = 4096
EXPERT_WEIGHTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
MATRIX_WEIGHTS = ("attn_q", "attn_k", "attn_v", "attn_output")


def cache_path(model_file) -> Path:
    """Where the cache of an opened model lives: beside its (first) file."""
    return model_file.path.with_name(model_file.path.name + SUFFIX)


def repacked_tensors(model_file) -> list:
    """The tensors the cache holds, in layer order: the expert weights, attention matrices and
    output.weight of the types this CPU has R16 kernels for (not token_embd: the embedding lookup reads
    rows in the file's layout, and a tied output shares it)."""
    kernels = {ty for ty in _model.R16_TYPES.values() if _model.r16_available(ty)}
    out = []
    for l in range(int(model_file.hparams.n_layer)):
        for w in EXPERT_WEIGHTS + MATRIX_WEIGHTS:
            t = model_file.tensors.get(f"blk.{l}.{w}.weight")
            if t is not None and int(t.ggml_type) in kernels and len(t.shape) == (3 if w in EXPERT_WEIGHTS else 2):
                out.append(t)
    t = model_file.tensors.get("output.weight")  # a tied output is token_embd under this name
    if t is not None and t.name == "output.weight" and int(t.ggml_type) in kernels and len(t.shape) == 2:
        out.append(t)
    return out


def _shape(t) -> tuple[int, int, int]:
    """(n_in, n_out, n_expert) of a 2-D or 3-D weight."""
    shape = [int(s) for s in t.shape]
    return shape[0], shape[1], shape[2] if len(shape) == 3 else 1


def _header(model_file, tensors: list) -> dict:
    """The header this model's cache must carry, with every tensor's place in the file."""
    entries, offset = [], 0
    for t in tensors:
        n_in, n_out, n_expert = _shape(t)
        nbytes = _model.r16_bytes(n_in, n_out, n_expert, int(t.ggml_type))
        entries.append({"name": t.name, "type": int(t.ggml_type), "n_in": n_in, "n_out": n_out,
                        "n_expert": n_expert, "offset": offset, "nbytes": nbytes})
        offset += -(-nbytes // ALIGN) * ALIGN
    sources = []
    for p in model_file.files:
        st = os.stat(p)
        sources.append({"file": Path(p).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"version": VERSION, "layout": "r16", "sources": sources, "tensors": entries}


def _encode(header: dict) -> tuple[bytes, int]:
    """The header's bytes and where the tensor data starts."""
    text = json.dumps(header, sort_keys=True).encode()
    head = MAGIC + struct.pack("<Q", len(text)) + text
    return head, -(-len(head) // ALIGN) * ALIGN


def _views(m: mmap.mmap, header: dict, start: int) -> dict[str, np.ndarray]:
    buf = np.frombuffer(m, dtype=np.uint8)
    return {e["name"]: buf[start + e["offset"]:start + e["offset"] + e["nbytes"]] for e in header["tensors"]}


def _load(path: Path, header: dict) -> dict[str, np.ndarray] | None:
    """The cached R16 bytes of every tensor, or None (with the reason logged) when the file is
    missing, unreadable or stale."""
    head, start = _encode(header)
    need = start + header["tensors"][-1]["offset"] + header["tensors"][-1]["nbytes"]
    try:
        with open(path, "rb") as f:
            if f.read(len(head)) != head:
                logger.info("Repack cache %s is stale (another model file, version or engine): rebuilding", path)
                return None
            if os.fstat(f.fileno()).st_size < need:
                logger.warning("Repack cache %s is truncated: rebuilding", path)
                return None
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        return None
    except OSError as e:
        logger.warning("Repack cache %s cannot be read (%s): using the file's layout", path, e.strerror or e)
        return None
    advise_huge_pages(m)
    return _views(m, header, start)


def _build(path: Path, header: dict, tensors: list, n_threads: int) -> None:
    """Write the cache (OSError when it cannot be: read-only folder, full disk)."""
    head, start = _encode(header)
    last = header["tensors"][-1]
    total = start + last["offset"] + last["nbytes"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    t0 = time.perf_counter()
    logger.info("Repacking %d expert, attention and output weights (%.2f GB) into %s, "
                "once per model file", len(tensors), total / 1e9, path)
    try:
        with open(tmp, "wb+") as f:
            if hasattr(os, "posix_fallocate"):  # ENOSPC here, never SIGBUS while writing the map
                os.posix_fallocate(f.fileno(), 0, total)
            else:
                f.truncate(total)
            f.write(head)
            f.flush()
            # one tensor at a time through a reused buffer and pwrite: the cache's pages never
            # enter this process's mappings (RSS grows by one tensor, not by the whole cache)
            buf = np.empty(max(e["nbytes"] for e in header["tensors"]), np.uint8)
            for t, e in zip(tensors, header["tensors"]):
                out = buf[:e["nbytes"]]
                _model.r16_repack(t.data, int(t.shape[0]), out, n_threads, int(t.ggml_type))
                if os.pwrite(f.fileno(), out, start + e["offset"]) != e["nbytes"]:
                    raise OSError(f"short write of {t.name}")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("Repack cache written in %.1f s", time.perf_counter() - t0)


def repacked_weights(model_file, n_threads: int, build: bool = True) -> dict[str, np.ndarray]:
    """tensor name -> R16 bytes for the model's weights that repacked_tensors lists, from the
    cache file (built first when missing or stale and `build`); {} when the model has none, this CPU
    has no R16 kernel, or the cache can be neither read nor written (logged: the model then runs on
    the file's layout, only slower)."""
    tensors = repacked_tensors(model_file)
    if not tensors:
        return {}
    path = cache_path(model_file)
    header = _header(model_file, tensors)
    views = _load(path, header)
    if views is None and build:
        try:
            _build(path, header, tensors, n_threads)
        except OSError as e:
            logger.warning("Repack cache %s cannot be written (%s): using the file's layout", path,
                           e.strerror or e)
            return {}
        views = _load(path, header)
    return views or {}
