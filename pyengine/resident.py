"""The weights copied out of the mapped files into anonymous memory: `Engine(use_mmap=False)`,
`--no-mmap` (llama.cpp's `--no-mmap`, llama-cpp-python's `use_mmap=False`).

Why: by default the weights stay where the files are mapped (the GGUF and the repack cache): load is
instant, RSS stays small, and processes share the page cache. But decode streams every weight byte
of a token from memory, at the rate of the memory those bytes sit in, and the page cache is not
always the fastest memory a process can get. On the 2-core dev VM of 2026-12-06 the pages of the
20b synth file's repack cache read at 27.6-29.4 GB/s (`pyengine-bench-kernels --bandwidth-file`)
while an anonymous 8 GiB buffer read at 33 (bench/RESULTS.md). The copy is one anonymous mapping
with 2 MiB pages asked for (MADV_HUGEPAGE), every array 64-byte aligned (the R16 kernels need it,
csrc/r16.h). It costs seconds at load and the weights' size in RSS, so it is not the default.
"""

from __future__ import annotations

import logging
import mmap
import time
from dataclasses import replace

import numpy as np

from pyengine.errors import ModelLoadError
from pyengine.gguf_reader import advise_huge_pages
from pyengine.tensor import Tensor

logger = logging.getLogger("pyengine")

ALIGN = 64
HUGE = 2 << 20


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def resident_copy(tensors: dict[str, Tensor], repacked: dict[str, np.ndarray], available: int | None = None
                  ) -> tuple[dict[str, Tensor], dict[str, np.ndarray]]:
    """(tensors, repacked) with every array the forward pass streams copied into one anonymous
    mapping: the repacked weights, and the file's tensors that they do not replace (a replaced
    tensor stays mapped: at most the embedding's lookup reads one row of it per token). A copy is
    C-contiguous with the same dtype, shape and bytes; the mapping lives as long as its arrays.
    available: the memory the system can give (None: unknown); a copy that would not fit is a
    ModelLoadError before anything is allocated, not an out-of-memory kill halfway through."""
    t0 = time.perf_counter()
    plain = {name: t for name, t in tensors.items() if name not in repacked}
    arrays = [t.data for t in plain.values()] + list(repacked.values())
    total = sum(_aligned(a.nbytes) for a in arrays)
    if not total:
        return tensors, repacked
    if available is not None and total > available:
        raise ModelLoadError(f"--no-mmap: the weights take {total / 1e9:.2f} GB and only {available / 1e9:.2f} GB "
                             "of memory is available; load them mapped (the default) instead")
    m = mmap.mmap(-1, total + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advise_huge_pages(m)
    buf = np.frombuffer(m, dtype=np.uint8)
    at = -buf.ctypes.data % HUGE  # the first array on a 2 MiB boundary

    def copy(a: np.ndarray) -> np.ndarray:
        nonlocal at
        out = buf[at:at + a.nbytes].view(a.dtype).reshape(a.shape)
        np.copyto(out, a)
        at += _aligned(a.nbytes)
        return out

    out_tensors = {name: replace(t, data=copy(t.data)) if name in plain else t for name, t in tensors.items()}
    out_repacked = {name: copy(a) for name, a in repacked.items()}
    logger.info("Weights copied into anonymous memory (--no-mmap): %.2f GB in %.1f s", total / 1e9,
                time.perf_counter() - t0)
    return out_tensors, out_repacked
