# Quantized matrix kernels of the GPU backend (csrc/cuda/matmul_cuda.h), included by _cuda.pyx.
#
# The C declarations, and numpy-in / numpy-out wrappers used by the tests and for checks: each one
# validates everything a pointer depends on (type, shapes, strides, expert ids, alignment), uploads,
# launches on the default stream, downloads and frees.

cdef extern from "matmul_cuda.h":
    ctypedef struct pe_cu_weight:
        const uint8_t *data
        int type
        int64_t n_in
        int64_t n_out
        int64_t row_stride
        int64_t expert_stride
    int pe_cu_type_supported(int type) nogil
    int pe_cu_dequant(const pe_cu_weight *w, int64_t expert, float *dst, void *stream) nogil
    int pe_cu_matvec(const pe_cu_weight *w, const int32_t *experts, const float *x, int64_t ldx,
                     int64_t n_rows, const float *bias, float *y, int64_t ldy, void *stream) nogil
    int pe_cu_gemm(const pe_cu_weight *w, int64_t expert, const float *x, int64_t ldx, int64_t n_rows,
                   const float *bias, float *y, int64_t ldy, void *stream) nogil
    int pe_cu_gemm_experts(const pe_cu_weight *w, const int64_t *start, int64_t n_expert, const float *x,
                           int64_t ldx, const float *bias, float *y, int64_t ldy, void *stream) nogil

cdef extern from "gemm_i8_cuda.h":
    int pe_cu_gemm_i8_supported(int type) nogil
    int64_t pe_cu_gemm_i8_scratch_bytes(int64_t n_rows, int64_t n_in) nogil
    int pe_cu_gemm_i8(const pe_cu_weight *w, int64_t expert, const float *x, int64_t ldx, int64_t n_rows,
                      const float *bias, float *y, int64_t ldy, void *scratch, void *stream) nogil
    int pe_cu_gemm_experts_i8(const pe_cu_weight *w, const int64_t *start, int64_t n_expert, const float *x,
                              int64_t ldx, const float *bias, float *y, int64_t ldy, void *scratch,
                              void *stream) nogil


def matmul_type_supported(int ggml_type) -> bool:
    """True for the weight types the CUDA matrix kernels read (the CPU engine's 14)."""
    return bool(pe_cu_type_supported(ggml_type))


def _cuq_weight_span(data, int ggml_type, int64_t n_in):
    """(contiguous uint8 bytes from the first row to the end of the last, n_out, n_expert, row_stride,
    expert_stride) of a weight array (n_out, row_bytes) or (n_expert, n_out, row_bytes), any positive
    row/expert strides, last axis contiguous."""
    from pyengine.quants import type_info
    if not pe_cu_type_supported(ggml_type):
        raise ValueError(f"ggml type {ggml_type} is not supported by the CUDA matrix kernels")
    _, blck, tsize = type_info(ggml_type)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim not in (2, 3):
        raise ValueError("weights must be a uint8 array (n_out, row_bytes) or (n_expert, n_out, row_bytes)")
    # (no negative indices: this module is compiled with wraparound=False)
    nd = data.ndim
    row_bytes, n_out = data.shape[nd - 1], data.shape[nd - 2]
    if n_in <= 0 or n_in % blck or row_bytes != n_in // blck * tsize:
        raise ValueError(f"rows of {row_bytes} bytes do not hold {n_in} elements of this type")
    if data.strides[nd - 1] != 1 or min(data.strides) <= 0 or min(data.shape) == 0:
        raise ValueError("weights need a contiguous last axis, positive strides and no empty axis")
    n_exp = data.shape[0] if data.ndim == 3 else 1
    row_stride = data.strides[nd - 2]
    expert_stride = data.strides[0] if data.ndim == 3 else 0
    if row_stride < row_bytes or (n_exp > 1 and expert_stride < row_stride * n_out):
        raise ValueError("weight rows or experts overlap")
    if blck == 1 and (row_stride % tsize or expert_stride % tsize):
        raise ValueError(f"{tsize}-byte elements need strides that are a multiple of {tsize}")
    span = (n_exp - 1) * expert_stride + (n_out - 1) * row_stride + row_bytes
    flat = np.ascontiguousarray(np.lib.stride_tricks.as_strided(data, shape=(span,), strides=(1,)))
    return flat, n_out, n_exp, row_stride, expert_stride


cdef pe_cu_weight _cuq_weight(object dev, int ggml_type, int64_t n_in, int64_t n_out, int64_t row_stride,
                              int64_t expert_stride):
    cdef pe_cu_weight w
    w.data = <const uint8_t *><uintptr_t>dev.ptr
    w.type = ggml_type
    w.n_in = n_in
    w.n_out = n_out
    w.row_stride = row_stride
    w.expert_stride = expert_stride
    return w


def _cuq_f32_2d(a, int64_t min_cols, str what):
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] < min_cols:
        raise ValueError(f"{what} must be 2-D float32 with at least {min_cols} columns")
    return a


def matmul_dequant(data, int ggml_type, int64_t n_in, int64_t expert=0) -> np.ndarray:
    """float32 (n_out, n_in): every row of expert `expert` of the weights, dequantized on the GPU."""
    flat, n_out, n_exp, row_stride, expert_stride = _cuq_weight_span(data, ggml_type, n_in)
    if not 0 <= expert < n_exp:
        raise ValueError("expert out of range")
    dw = _dev_upload(flat)
    dy = _dev_upload(np.empty((n_out, n_in), dtype=np.float32))
    cdef pe_cu_weight w = _cuq_weight(dw, ggml_type, n_in, n_out, row_stride, expert_stride)
    _check(pe_cu_dequant(&w, expert, <float *><uintptr_t>dy.ptr, NULL))
    return dy.download((n_out, n_in), np.float32)


def _cuq_int8_check(int ggml_type, bint int8):
    if int8 and not pe_cu_gemm_i8_supported(ggml_type):
        raise ValueError(f"ggml type {ggml_type} has no int8 tensor-core gemm (Q8_0 and MXFP4 have)")


def _cuq_products(data, int ggml_type, int64_t n_in, x, bias, experts, int64_t expert, y, bint gemm,
                  bint int8=False):
    flat, n_out, n_exp, row_stride, expert_stride = _cuq_weight_span(data, ggml_type, n_in)
    _cuq_int8_check(ggml_type, int8)
    xa = _cuq_f32_2d(x, n_in, "x")
    n_rows = xa.shape[0]
    ya = _cuq_f32_2d(np.full((n_rows, n_out), np.nan, np.float32) if y is None else y, n_out, "y")
    if ya.shape[0] != n_rows:
        raise ValueError("y needs one row per row of x")
    ea = None
    if experts is not None:
        ea = np.ascontiguousarray(experts, dtype=np.int32)
        if ea.shape != (n_rows,) or (ea < 0).any() or (ea >= n_exp).any():
            raise ValueError("experts must be one id in [0, n_expert) per row of x")
    if not 0 <= expert < n_exp:
        raise ValueError("expert out of range")
    ba = None
    if bias is not None:
        ba = np.ascontiguousarray(bias, dtype=np.float32)
        want = (n_out,) if gemm else (n_exp, n_out)
        if ba.shape != want:
            raise ValueError(f"bias must have shape {want}")
    dw, dx, dy = _dev_upload(flat), _dev_upload(xa), _dev_upload(ya)
    de = _dev_upload(ea) if ea is not None else None
    db = _dev_upload(ba) if ba is not None else None
    cdef pe_cu_weight w = _cuq_weight(dw, ggml_type, n_in, n_out, row_stride, expert_stride)
    cdef const float *bp = <const float *><uintptr_t>db.ptr if db is not None else NULL
    cdef const int32_t *ep = <const int32_t *><uintptr_t>de.ptr if de is not None else NULL
    cdef const float *xp = <const float *><uintptr_t>dx.ptr
    cdef float *yp = <float *><uintptr_t>dy.ptr
    if gemm and int8:
        ds = DevBuf(pe_cu_gemm_i8_scratch_bytes(n_rows, n_in))
        _check(pe_cu_gemm_i8(&w, expert, xp, xa.shape[1], n_rows, bp, yp, ya.shape[1], <void *><uintptr_t>ds.ptr,
                             NULL))
    elif gemm:
        _check(pe_cu_gemm(&w, expert, xp, xa.shape[1], n_rows, bp, yp, ya.shape[1], NULL))
    else:
        _check(pe_cu_matvec(&w, ep, xp, xa.shape[1], n_rows, bp, yp, ya.shape[1], NULL))
    return dy.download(ya.shape, np.float32)


def matmul_matvec(data, int ggml_type, int64_t n_in, x, bias=None, experts=None, y=None) -> np.ndarray:
    """Decode products on the GPU: y[i, r] = dot(row r of expert experts[i] (0 without experts), x[i, :n_in])
    + bias[experts[i], r]. x (n_rows, ldx >= n_in) float32, bias (n_expert, n_out) (n_expert = 1 for a
    plain matrix), experts int32 (n_rows,); y (n_rows, ldy >= n_out), if given, is the initial output
    buffer (columns past n_out must come back untouched). Returns the downloaded y."""
    return _cuq_products(data, ggml_type, n_in, x, bias, experts, 0, y, False)


def matmul_gemm(data, int ggml_type, int64_t n_in, x, bias=None, int64_t expert=0, y=None,
                bint int8=False) -> np.ndarray:
    """Prefill products on the GPU: y[i, r] = dot(row r of expert `expert`, x[i, :n_in]) + bias[r];
    shapes as matmul_matvec, bias (n_out,). int8: the int8 tensor-core kernel (Q8_0, MXFP4: x quantized
    to int8 per 32-block with two digits, as the CPU path), else float32 x (3xTF32 / f32)."""
    return _cuq_products(data, ggml_type, n_in, x, bias, None, expert, y, True, int8)


def matmul_gemm_experts(data, int ggml_type, int64_t n_in, x, start, bias=None, y=None,
                        bint int8=False) -> np.ndarray:
    """Grouped prefill products on the GPU (one launch for all experts): for each expert e < len(start) - 1
    and row i in [start[e], start[e + 1]): y[i, r] = dot(row r of expert e, x[i, :n_in]) + bias[e, r].
    start: nondecreasing int64 offsets into the rows of x; bias (n_expert, n_out); other rows of y
    (initial buffer as in matmul_matvec) come back untouched. int8: as matmul_gemm."""
    flat, n_out, n_exp, row_stride, expert_stride = _cuq_weight_span(data, ggml_type, n_in)
    _cuq_int8_check(ggml_type, int8)
    xa = _cuq_f32_2d(x, n_in, "x")
    n_rows = xa.shape[0]
    ya = _cuq_f32_2d(np.full((n_rows, n_out), np.nan, np.float32) if y is None else y, n_out, "y")
    if ya.shape[0] != n_rows:
        raise ValueError("y needs one row per row of x")
    sa = np.ascontiguousarray(start, dtype=np.int64)
    if (sa.ndim != 1 or not 2 <= sa.shape[0] <= n_exp + 1 or sa[0] < 0 or sa[sa.shape[0] - 1] > n_rows
            or (np.diff(sa) < 0).any()):
        raise ValueError("start must be 2 .. n_expert + 1 nondecreasing row offsets within x")
    ba = None
    if bias is not None:
        ba = np.ascontiguousarray(bias, dtype=np.float32)
        if ba.shape != (n_exp, n_out):
            raise ValueError(f"bias must have shape {(n_exp, n_out)}")
    dw, dx, dy = _dev_upload(flat), _dev_upload(xa), _dev_upload(ya)
    db = _dev_upload(ba) if ba is not None else None
    cdef pe_cu_weight w = _cuq_weight(dw, ggml_type, n_in, n_out, row_stride, expert_stride)
    cdef const float *bp = <const float *><uintptr_t>db.ptr if db is not None else NULL
    cdef const int64_t[::1] sv = sa
    cdef const float *xp = <const float *><uintptr_t>dx.ptr
    cdef float *yp = <float *><uintptr_t>dy.ptr
    if int8:
        ds = DevBuf(pe_cu_gemm_i8_scratch_bytes(n_rows, n_in))
        _check(pe_cu_gemm_experts_i8(&w, &sv[0], sa.shape[0] - 1, xp, xa.shape[1], bp, yp, ya.shape[1],
                                     <void *><uintptr_t>ds.ptr, NULL))
    else:
        _check(pe_cu_gemm_experts(&w, &sv[0], sa.shape[0] - 1, xp, xa.shape[1], bp, yp, ya.shape[1], NULL))
    return dy.download(ya.shape, np.float32)
