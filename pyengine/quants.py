"""Dequantization of GGUF tensor bytes with the compiled kernels.

`dequantize(data, ggml_type)` is a drop-in for `gguf.quants.dequantize`: uint8 rows of whole blocks in,
float32 out, bit-identical results. Every check happens here, in Python, so that the C kernels only
ever see well-formed input."""

from __future__ import annotations

import operator

import numpy as np

from pyengine import _quants

__all__ = ["dequantize", "dot", "type_info"]

type_info = _quants.type_info


def _block_geometry(ggml_type: int) -> tuple[str, int, int]:
    try:
        type_id = operator.index(ggml_type)
    except TypeError:
        raise ValueError(f"ggml_type must be an integer type id, not {type(ggml_type).__name__}") from None
    if isinstance(ggml_type, bool) or not -2**31 <= type_id < 2**31 or type_info(type_id) is None:
        raise ValueError(f"ggml type {ggml_type!r} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q5_0, "
                         "Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, MXFP4)")
    return type_info(type_id)


def dequantize(data: np.ndarray, ggml_type: int) -> np.ndarray:
    """float32 elements of raw GGUF bytes: shape (..., row_bytes) -> (..., row_elements).

    `data` is a uint8 array whose last axis holds whole blocks of `ggml_type` (a ggml type id or a
    gguf.GGMLQuantizationType). Raises ValueError for any other input."""
    name, blck, tsize = _block_geometry(ggml_type)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise ValueError(f"data must be a uint8 numpy array of raw {name} bytes, "
                         f"not {getattr(data, 'dtype', type(data).__name__)}")
    if data.ndim == 0:
        raise ValueError("data must have at least one axis (the row bytes)")
    if data.shape[-1] % tsize:
        raise ValueError(f"the last axis ({data.shape[-1]} bytes) is not a whole number of {name} "
                         f"blocks of {tsize} bytes")
    n = data.shape[-1] // tsize * blck
    rows = data.reshape(-1, data.shape[-1]) if data.size else np.empty((0, data.shape[-1]), np.uint8)
    out = _quants.dequantize_rows(rows, operator.index(ggml_type))
    return out.reshape(*data.shape[:-1], n)


def dot(row: np.ndarray, x: np.ndarray, ggml_type: int) -> float:
    """sum_i row[i] * x[i] for one quantized row (1-D uint8, whole blocks) and float32 x."""
    _block_geometry(ggml_type)
    return _quants.dot(row, x, operator.index(ggml_type))
