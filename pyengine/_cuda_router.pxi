# Test wrapper of the fused router (csrc/cuda/router_cuda.h), included by _cuda.pyx.

cdef extern from "router_cuda.h" nogil:
    int pe_cu_router_fused_supported(int type, int64_t n_expert)
    int pe_cu_router_fused(const pe_cu_weight *w, const float *x, int64_t ldx, int64_t n_rows, const float *bias,
                           int k, int32_t *sel, float *wts, void *stream)


def router_fused_supported(int ggml_type, int64_t n_expert) -> bool:
    return bool(pe_cu_router_fused_supported(ggml_type, n_expert))


def router_fused(data, int ggml_type, int64_t n_in, x, bias, int k):
    """(sel int32 (n_rows, k), wts float32 (n_rows, k)) of the fused router over router weights
    (n_expert, row_bytes) of a float type and x (n_rows, n_in); bias None or (n_expert,)."""
    flat, n_out, n_exp, row_stride, _ = _cuq_weight_span(data, ggml_type, n_in)
    if n_exp != 1 or not pe_cu_router_fused_supported(ggml_type, n_out) or not 0 < k <= n_out:
        raise ValueError("need float router weights of at most 256 rows and 0 < k <= n_expert")
    xs = _cuq_f32_2d(x, n_in, "x")
    cdef int64_t n = xs.shape[0]
    dw, dx = _dev_upload(flat), _dev_upload(xs)
    db = _dev_upload(_cuk_arr(bias, np.float32, 1, "bias")) if bias is not None else None
    if db is not None and db.nbytes != n_out * 4:
        raise ValueError("bias needs one value per expert")
    dsel, dwts = DevBuf(n * k * 4), DevBuf(n * k * 4)
    cdef pe_cu_weight w = _cuq_weight(dw, ggml_type, n_in, n_out, row_stride, 0)
    _check(pe_cu_router_fused(&w, _cuk_f(dx), xs.shape[1], n, _cuk_f(db) if db is not None else NULL, k,
                              _cuk_i32(dsel), _cuk_f(dwts), NULL))
    return dsel.download((n, k), np.int32), dwts.download((n, k), np.float32)
