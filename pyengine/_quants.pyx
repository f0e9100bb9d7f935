# cython: language_level=3, boundscheck=False, wraparound=False
"""Thin bridge to the C quant kernels (csrc/quants*.c). Callers validate: pyengine.quants checks
types and shapes in Python so that no bad pointer or size ever reaches C."""

from libc.stdint cimport int64_t, uint8_t
import numpy as np

cdef extern from "quants.h":
    enum:
        PE_TYPE_F32
        PE_TYPE_MXFP4
    ctypedef struct pe_type_traits:
        int type
        const char *name
        int blck_size
        int type_size
        void *dot_q8
        void (*quantize_row)(const float *src, void *dst, int64_t n) nogil
    const pe_type_traits *pe_type_traits_get(int type)
    void pe_dequantize_rows(int type, const void *src, int64_t src_stride, float *dst, int64_t n_rows,
                            int64_t n) nogil
    void pe_dot_rows(int type, const void *src, int64_t src_stride, const float *x, float *out,
                     int64_t n_rows, int64_t n) nogil
    ctypedef struct pe_act_q8:
        const signed char *qs
        const signed char *ql
        const float *d
        const float *s32
        const float *s16
        const float *s32x
        const float *s16x
        const signed char *xh
        const signed char *xl
        const short *x16
        const float *dk
    size_t pe_act_q8_bytes(int64_t n)
    pe_act_q8 pe_act_q8_quantize(const float *x, int64_t n, void *buf) nogil
    int pe_dot_rows_q8(int type, const void *src, int64_t src_stride, const float *x, float *out,
                       int64_t n_rows, int64_t n) nogil

cdef extern from "gemm_q8.h":
    int pe_gemm_q8_supported(int type)


def type_info(int ggml_type):
    """(name, elements per block, bytes per block) of a supported ggml type, else None."""
    cdef const pe_type_traits *t = pe_type_traits_get(ggml_type)
    if t == NULL:
        return None
    return t.name.decode(), t.blck_size, t.type_size


def _natural_alignment(int ggml_type) -> int:
    """Byte alignment the kernels assume for a row start: f32 elements, f16 fields, or none (MXFP4)."""
    return 4 if ggml_type == PE_TYPE_F32 else 1 if ggml_type == PE_TYPE_MXFP4 else 2


def _kernel_ready(rows, int ggml_type):
    """rows, or a C-contiguous aligned copy when its last axis is strided or its rows are misaligned."""
    align = _natural_alignment(ggml_type)
    if rows.shape[0] and (rows.strides[1] != 1 or rows.ctypes.data % align or rows.strides[0] % align):
        return np.array(rows, order="C", copy=True)
    return rows


def _check_rows(rows, int ggml_type):
    info = type_info(ggml_type)
    if info is None:
        raise ValueError(f"ggml type {ggml_type} is not supported by the quant kernels")
    if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2:
        raise ValueError("rows must be a 2-D uint8 array")
    if rows.shape[1] % info[2]:
        raise ValueError(f"row bytes ({rows.shape[1]}) are not a whole number of {info[0]} blocks "
                         f"of {info[2]} bytes")
    return rows.shape[1] // info[2] * info[1]


def dequantize_rows(rows, int ggml_type):
    """float32 (n_rows, n) from a 2-D uint8 array of whole blocks; its last axis must be contiguous."""
    cdef int64_t n = _check_rows(rows, ggml_type)
    rows = _kernel_ready(rows, ggml_type)
    out = np.empty((rows.shape[0], n), dtype=np.float32)
    if rows.size == 0 or n == 0:
        return out
    cdef const uint8_t[:, :] src = rows
    cdef float[:, ::1] dst = out
    cdef int64_t stride = rows.strides[0], n_rows = rows.shape[0]
    with nogil:
        pe_dequantize_rows(ggml_type, &src[0, 0], stride, &dst[0, 0], n_rows, n)
    return out


def dot_rows(rows, x, int ggml_type):
    """float32 (n_rows,) of each quantized row dotted with the float32 vector x (a mat-vec)."""
    cdef int64_t n = _check_rows(rows, ggml_type)
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 1 or x.shape[0] != n:
        raise ValueError(f"x must be a 1-D float32 array of {n} elements, one per row element")
    rows = _kernel_ready(rows, ggml_type)
    x = np.require(x, requirements=("C", "A"))
    out = np.zeros(rows.shape[0], dtype=np.float32)
    if rows.size == 0 or n == 0:
        return out
    cdef const uint8_t[:, :] src = rows
    cdef const float[::1] xv = x
    cdef float[::1] res = out
    cdef int64_t stride = rows.strides[0], n_rows = rows.shape[0]
    with nogil:
        pe_dot_rows(ggml_type, &src[0, 0], stride, &xv[0], &res[0], n_rows, n)
    return out


def dot(row, x, int ggml_type) -> float:
    """The dot product of one quantized row (1-D uint8, whole blocks) with float32 x."""
    if not isinstance(row, np.ndarray) or row.ndim != 1:
        raise ValueError("row must be a 1-D uint8 array")
    return float(dot_rows(row.reshape(1, -1), x, ggml_type)[0])


def quantize_rows(x, int ggml_type):
    """uint8 (n_rows, row bytes) of the float32 rows x (n_rows, n) written in ggml_type by the KV cache's
    writer (F32, F16, BF16, Q8_0 only; n a whole number of blocks)."""
    cdef const pe_type_traits *t = pe_type_traits_get(ggml_type)
    if t == NULL or t.quantize_row == NULL:
        raise ValueError(f"ggml type {ggml_type} has no writer (the KV cache types are F32, F16, BF16, Q8_0)")
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] % t.blck_size:
        raise ValueError(f"x must be a 2-D float32 array of rows of whole {t.blck_size}-element blocks")
    x = np.ascontiguousarray(x)
    cdef int64_t n = x.shape[1], rb = n // t.blck_size * t.type_size, r
    out = np.zeros((x.shape[0], rb), dtype=np.uint8)
    if x.size == 0:
        return out
    cdef const float[:, ::1] src = x
    cdef uint8_t[:, ::1] dst = out
    with nogil:
        for r in range(src.shape[0]):
            t.quantize_row(&src[r, 0], &dst[r, 0], n)
    return out


def has_dot_q8(int ggml_type) -> bool:
    """Whether ggml_type has an int8-activation dot kernel (dot_rows_q8)."""
    cdef const pe_type_traits *t = pe_type_traits_get(ggml_type)
    return t != NULL and t.dot_q8 != NULL


def has_gemm_q8(int ggml_type) -> bool:
    """Whether products of more than 8 tokens with ggml_type weights take the int8 tile kernel
    (csrc/gemm_q8_avx512.c) when int8 activations are on."""
    return pe_gemm_q8_supported(ggml_type) != 0


def _check_act(x):
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 1 or x.shape[0] % 32:
        raise ValueError("x must be a 1-D float32 array whose length is a multiple of 32")
    return np.require(x, requirements=("C", "A"))


def quantize_act_q8(x):
    """The int8 kernels' activations of a 1-D float32 vector (length a multiple of 32), as a dict of
    numpy arrays: qs and ql (int8, n: the two digits), d (float32, n/32: scales), s32 / s16 (code
    sums per 32 / 16), s32x / s16x (the combined two-digit sums) and xh / xl (int8, n rounded up to
    128, plus 128 zero padding: 254 q + ql in base 256, in the 32-block kernels' order), x16
    (int16, n: 254 q + ql in the AVX2 kernels' order) and dk (float32, n/32: d / 254), see pe_act_q8
    in quants.h."""
    x = _check_act(x)
    cdef int64_t n = x.shape[0]
    buf = np.zeros(pe_act_q8_bytes(n) + 64, dtype=np.uint8)
    cdef uint8_t[::1] b = buf
    cdef size_t pad = (-buf.ctypes.data) % 64
    cdef const float[::1] xv = x
    cdef pe_act_q8 a
    if n:
        with nogil:
            a = pe_act_q8_quantize(&xv[0], n, &b[pad])
    base = buf.ctypes.data
    def view(size_t ptr, dtype, int64_t count):
        off = <size_t> ptr - base
        return buf[off: off + count * np.dtype(dtype).itemsize].view(dtype).copy()
    if not n:
        return {k: np.zeros(0, np.int16 if k == "x16" else np.int8 if k in ("qs", "ql", "xh", "xl") else np.float32)
                for k in ("qs", "ql", "d", "s32", "s16", "s32x", "s16x", "xh", "xl", "x16", "dk")}
    cdef int64_t n_b256 = (n + 127) // 128 * 128 + 128
    return {"qs": view(<size_t> a.qs, np.int8, n), "ql": view(<size_t> a.ql, np.int8, n),
            "d": view(<size_t> a.d, np.float32, n // 32), "s32": view(<size_t> a.s32, np.float32, n // 32),
            "s16": view(<size_t> a.s16, np.float32, n // 16), "s32x": view(<size_t> a.s32x, np.float32, n // 32),
            "s16x": view(<size_t> a.s16x, np.float32, n // 16),
            "xh": view(<size_t> a.xh, np.int8, n_b256), "xl": view(<size_t> a.xl, np.int8, n_b256),
            "x16": view(<size_t> a.x16, np.int16, n), "dk": view(<size_t> a.dk, np.float32, n // 32)}


def dot_rows_q8(rows, x, int ggml_type):
    """float32 (n_rows,) of each quantized row dotted with float32 x through the int8 kernel (x
    quantized once as quantize_act_q8 does)."""
    cdef int64_t n = _check_rows(rows, ggml_type)
    if not has_dot_q8(ggml_type):
        raise ValueError(f"ggml type {ggml_type} has no int8-activation dot kernel")
    x = _check_act(x)
    if x.shape[0] != n:
        raise ValueError(f"x must hold {n} elements, one per row element")
    rows = _kernel_ready(rows, ggml_type)
    out = np.zeros(rows.shape[0], dtype=np.float32)
    if rows.size == 0 or n == 0:
        return out
    cdef const uint8_t[:, :] src = rows
    cdef const float[::1] xv = x
    cdef float[::1] res = out
    cdef int64_t stride = rows.strides[0], n_rows = rows.shape[0]
    cdef int rc
    with nogil:
        rc = pe_dot_rows_q8(ggml_type, &src[0, 0], stride, &xv[0], &res[0], n_rows, n)
    if rc:
        raise MemoryError("no memory for the quantized activations")
    return out
