"""The engine's view of one model tensor: canonical name, ggml type, GGUF shape and its raw bytes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Tensor:
    """A tensor under its canonical (llama.cpp) name.

    `shape` is in GGUF ne order, fastest first: (n_in,), (n_in, n_out) or (n_in, n_out, n_expert).
    `data` is a uint8 array whose LAST axis holds one row's bytes and is contiguous; the other axes
    may be strided (views into fused tensors), so read `.strides`, never assume C-contiguity:
    1-D tensor -> (1, row_bytes); 2-D -> (n_out, row_bytes); 3-D -> (n_expert, n_out, row_bytes).
    Usually a read-only view of the memory-mapped file; repacked or widened tensors are copies."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data: np.ndarray

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, type={self.ggml_type}, shape={self.shape})"


def rows_view(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reshape a tensor's flat bytes to the Tensor.data convention for its ne-shape."""
    outer = shape[1:][::-1] or (1,)
    n_rows = 1
    for d in outer:
        n_rows *= d
    return raw.reshape(*outer, raw.size // n_rows)
