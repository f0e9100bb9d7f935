# Test wrappers of the CUDA per-vector kernels and attention (csrc/cuda/ops_cuda.h, attention_cuda.h),
# included by _cuda.pyx. Each takes numpy arrays, checks every shape, dtype and index in Python (a bad
# pointer must never reach a kernel), uploads, runs on the default stream and downloads the result.

from libc.stdint cimport int32_t, int64_t, uintptr_t

cdef extern from "ops_cuda.h" nogil:
    int pe_cu_rmsnorm(float *out, const float *x, const float *g, int64_t n_rows, int64_t n, float eps,
                      void *stream)
    int pe_cu_rope(float *x, int64_t n_tok, int64_t ld, int n_heads, int head_dim, const int64_t *pos,
                   const double *omega, double mscale, void *stream)
    int pe_cu_router(const float *logits, int64_t n_rows, int n_expert, int k, int32_t *sel, float *wts,
                     void *stream)
    int pe_cu_swiglu_oai(float *out, const float *g, const float *u, int64_t n, void *stream)
    int pe_cu_add(float *x, const float *t, int64_t n, void *stream)
    int pe_cu_swiglu_oai_rows(float *out, const float *g, const float *u, int64_t n_rows, int64_t n, int64_t ld,
                              void *stream)
    int pe_cu_add_rmsnorm(float *out, float *x, const float *t, const float *g, int64_t n_rows, int64_t n,
                          float eps, void *stream)
    int pe_cu_gather_rows(float *dst, const float *src, const int32_t *idx, int64_t n_rows, int64_t d,
                          void *stream)
    int pe_cu_scatter_rows(float *dst, const float *src, const int32_t *idx, int64_t n_rows, int64_t d,
                           void *stream)
    int pe_cu_moe_combine(float *y, const float *slots, const float *wts, int64_t n_tok, int k, int64_t d,
                          void *stream)

cdef extern from "attention_cuda.h" nogil:
    int pe_cu_kv_store(void *kc, void *vc, int type_k, int type_v, int64_t n_slots, const float *k,
                       const float *v, int64_t ld, int64_t n_tok, const int64_t *pos, int64_t kv_dim, void *stream)
    size_t pe_cu_attention_scratch_floats(int64_t n_tok, int n_head, int head_dim, int64_t max_keys)
    int pe_cu_attention(float *out, int64_t ldo, const float *q, int64_t ldq, int64_t n_tok, const int64_t *pos,
                        const void *kc, const void *vc, int type_k, int type_v, int64_t n_slots, int n_head,
                        int n_head_kv, int head_dim, int64_t window, const float *sinks, int64_t max_keys,
                        float *scratch, void *stream)
    int pe_cu_attention_q8(float *out, int64_t ldo, const float *q, int64_t ldq, int64_t n_tok, const int64_t *pos,
                           const void *kc, const void *vc, int type_k, int type_v, int64_t n_slots, int n_head,
                           int n_head_kv, int head_dim, int64_t window, const float *sinks, int64_t max_keys,
                           float *scratch, uint8_t *oq, int64_t ldoq, void *stream)


cdef inline float *_cuk_f(buf):
    return <float *><uintptr_t>buf.ptr


cdef inline int32_t *_cuk_i32(buf):
    return <int32_t *><uintptr_t>buf.ptr


cdef inline int64_t *_cuk_i64(buf):
    return <int64_t *><uintptr_t>buf.ptr


def _cuk_arr(a, dtype, int ndim, str name):
    a = np.ascontiguousarray(a, dtype=dtype)
    if a.ndim != ndim or a.size == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array")
    return a


def _cuk_index(idx, int64_t n_rows, int64_t limit, str name):
    idx = _cuk_arr(idx, np.int32, 1, name)
    if idx.shape[0] != n_rows or idx.min() < 0 or idx.max() >= limit:
        raise ValueError(f"{name} needs {n_rows} indices in [0, {limit})")
    return idx


def rmsnorm(x, g, float eps, bint in_place=False):
    """RMSNorm of each row of x (n_rows, n) with gain g (n,); in_place runs with out aliasing x."""
    x = _cuk_arr(x, np.float32, 2, "x")
    g = _cuk_arr(g, np.float32, 1, "g")
    if g.shape[0] != x.shape[1]:
        raise ValueError("gain length must equal the row length")
    dx, dg = _dev_upload(x), _dev_upload(g)
    dout = dx if in_place else _dev_upload(np.zeros_like(x))
    _check(pe_cu_rmsnorm(_cuk_f(dout), _cuk_f(dx), _cuk_f(dg), x.shape[0], x.shape[1], eps, NULL))
    return dout.download(x.shape, np.float32)


def add_rmsnorm(x, t, g, float eps):
    """(x + t, RMSNorm of x + t) for rows x, t (n_rows, n) and gain g (n,): the fused residual add."""
    x = _cuk_arr(x, np.float32, 2, "x")
    t = _cuk_arr(t, np.float32, 2, "t")
    g = _cuk_arr(g, np.float32, 1, "g")
    if t.shape[0] != x.shape[0] or t.shape[1] != x.shape[1] or g.shape[0] != x.shape[1]:
        raise ValueError("shape mismatch")
    dx, dt, dg = _dev_upload(x), _dev_upload(t), _dev_upload(g)
    dout = _dev_upload(np.zeros_like(x))
    _check(pe_cu_add_rmsnorm(_cuk_f(dout), _cuk_f(dx), _cuk_f(dt), _cuk_f(dg), x.shape[0], x.shape[1], eps, NULL))
    return dx.download(x.shape, np.float32), dout.download(x.shape, np.float32)


def rope(x, int n_heads, int head_dim, positions, omega, double mscale):
    """NeoX RoPE of the first n_heads*head_dim columns of each row of x (n_tok, ld) at positions."""
    x = _cuk_arr(x, np.float32, 2, "x")
    pos = _cuk_arr(positions, np.int64, 1, "positions")
    om = _cuk_arr(omega, np.float64, 1, "omega")
    if (pos.shape[0] != x.shape[0] or head_dim <= 0 or head_dim % 2 or head_dim > 256 or n_heads <= 0
            or om.shape[0] * 2 != head_dim or n_heads * head_dim > x.shape[1]):
        raise ValueError("shape mismatch")
    dx, dp, do = _dev_upload(x), _dev_upload(pos), _dev_upload(om)
    _check(pe_cu_rope(_cuk_f(dx), x.shape[0], x.shape[1], n_heads, head_dim, _cuk_i64(dp),
                      <double *><uintptr_t>do.ptr, mscale, NULL))
    return dx.download(x.shape, np.float32)


def router(logits, int k):
    """(sel int32 (n_rows, k), wts float32 (n_rows, k)): top-k of each row of logits, softmax of those."""
    x = _cuk_arr(logits, np.float32, 2, "logits")
    if not 0 < k <= x.shape[1] <= 256:
        raise ValueError("need 0 < k <= n_expert <= 256")
    dx = _dev_upload(x)
    dsel = _dev_upload(np.zeros((x.shape[0], k), np.int32))
    dw = _dev_upload(np.zeros((x.shape[0], k), np.float32))
    _check(pe_cu_router(_cuk_f(dx), x.shape[0], x.shape[1], k, _cuk_i32(dsel), _cuk_f(dw), NULL))
    return dsel.download((x.shape[0], k), np.int32), dw.download((x.shape[0], k), np.float32)


def swiglu_oai(g, u):
    """SwiGLU-OAI of equal-length vectors."""
    g = _cuk_arr(g, np.float32, 1, "g")
    u = _cuk_arr(u, np.float32, 1, "u")
    if g.shape[0] != u.shape[0]:
        raise ValueError("shape mismatch")
    dg, du, dout = _dev_upload(g), _dev_upload(u), _dev_upload(np.zeros_like(g))
    _check(pe_cu_swiglu_oai(_cuk_f(dout), _cuk_f(dg), _cuk_f(du), g.shape[0], NULL))
    return dout.download(g.shape, np.float32)


def swiglu_oai_rows(gu):
    """SwiGLU-OAI of each row of gu (n_rows, 2n): its first half the gate, its second the up values."""
    gu = _cuk_arr(gu, np.float32, 2, "gu")
    if gu.shape[1] % 2:
        raise ValueError("rows must hold gate and up halves of equal length")
    cdef int64_t n_rows = gu.shape[0], n = gu.shape[1] // 2
    dgu, dout = _dev_upload(gu), _dev_upload(np.zeros((n_rows, n), np.float32))
    cdef float *g = _cuk_f(dgu)
    _check(pe_cu_swiglu_oai_rows(_cuk_f(dout), g, g + n, n_rows, n, 2 * n, NULL))
    return dout.download((n_rows, n), np.float32)


def add(x, t):
    """x + t of equal-length vectors (the kernel adds in place on the device)."""
    x = _cuk_arr(x, np.float32, 1, "x")
    t = _cuk_arr(t, np.float32, 1, "t")
    if x.shape[0] != t.shape[0]:
        raise ValueError("shape mismatch")
    dx, dt = _dev_upload(x), _dev_upload(t)
    _check(pe_cu_add(_cuk_f(dx), _cuk_f(dt), x.shape[0], NULL))
    return dx.download(x.shape, np.float32)


def gather_rows(src, idx):
    """src[idx] for rows of src (n_src, d)."""
    src = _cuk_arr(src, np.float32, 2, "src")
    idx = _cuk_arr(idx, np.int32, 1, "idx")
    idx = _cuk_index(idx, idx.shape[0], src.shape[0], "idx")
    shape = (idx.shape[0], src.shape[1])
    ds, di, dd = _dev_upload(src), _dev_upload(idx), _dev_upload(np.zeros(shape, np.float32))
    _check(pe_cu_gather_rows(_cuk_f(dd), _cuk_f(ds), _cuk_i32(di), shape[0], shape[1], NULL))
    return dd.download(shape, np.float32)


def scatter_rows(dst, src, idx):
    """A copy of dst (n_dst, d) with row idx[i] replaced by src row i."""
    dst = _cuk_arr(dst, np.float32, 2, "dst")
    src = _cuk_arr(src, np.float32, 2, "src")
    if src.shape[1] != dst.shape[1]:
        raise ValueError("row length mismatch")
    idx = _cuk_index(idx, src.shape[0], dst.shape[0], "idx")
    dd, ds, di = _dev_upload(dst), _dev_upload(src), _dev_upload(idx)
    _check(pe_cu_scatter_rows(_cuk_f(dd), _cuk_f(ds), _cuk_i32(di), src.shape[0], src.shape[1], NULL))
    return dd.download(dst.shape, np.float32)


def moe_combine(slots, wts):
    """y (n_tok, d): rank-ordered weighted sum of slots (n_tok*k, d) with weights wts (n_tok, k)."""
    slots = _cuk_arr(slots, np.float32, 2, "slots")
    wts = _cuk_arr(wts, np.float32, 2, "wts")
    n_tok, k = wts.shape[0], wts.shape[1]
    if slots.shape[0] != n_tok * k:
        raise ValueError("slots must have n_tok * k rows")
    shape = (n_tok, slots.shape[1])
    ds, dw, dy = _dev_upload(slots), _dev_upload(wts), _dev_upload(np.zeros(shape, np.float32))
    _check(pe_cu_moe_combine(_cuk_f(dy), _cuk_f(ds), _cuk_f(dw), n_tok, k, shape[1], NULL))
    return dy.download(shape, np.float32)


def _cuk_cache(c, type_name, int64_t kv_dim, int64_t head_dim, str name):
    """A cache argument as its raw rows: float32 (n_slots, kv_dim) for f32, else uint8 (n_slots, row
    bytes) in the type's layout (as pyengine._model.KVCache stores it)."""
    type_name = kv_cache_type(type_name, name)
    if type_name == "f32":
        c = _cuk_arr(c, np.float32, 2, name)
        ok = c.shape[1] == kv_dim
    else:
        c = _cuk_arr(c, np.uint8, 2, name)
        ok = c.shape[1] == kv_row_bytes(type_name, kv_dim, head_dim)
    if not ok:
        raise ValueError(f"{name} rows do not hold {kv_dim} elements of {type_name}")
    return c, KV_CACHE_TYPES[type_name]


def kv_store(kc, vc, rows, int64_t k_col, int64_t v_col, positions, int64_t kv_dim, type_k="f32",
             type_v="f32", int64_t head_dim=0):
    """Copies of the caches kc, vc (raw rows, see _cuk_cache) with row pos[t] % n_slots set to columns
    k_col.. / v_col.. (kv_dim each) of row t of rows (n_tok, ld), e.g. fused q|k|v projections, written in
    type_k / type_v (head_dim: the head length, for the block check; 0: kv_dim)."""
    head_dim = head_dim or kv_dim
    if kv_dim <= 0 or head_dim <= 0 or kv_dim % head_dim:
        raise ValueError("shape mismatch")
    kc, tk = _cuk_cache(kc, type_k, kv_dim, head_dim, "kc")
    vc, tv = _cuk_cache(vc, type_v, kv_dim, head_dim, "vc")
    rows = _cuk_arr(rows, np.float32, 2, "rows")
    pos = _cuk_arr(positions, np.int64, 1, "positions")
    ld = rows.shape[1]
    if (vc.shape[0] != kc.shape[0] or not 0 <= k_col <= ld - kv_dim or not 0 <= v_col <= ld - kv_dim
            or pos.shape[0] != rows.shape[0] or pos.min() < 0):
        raise ValueError("shape mismatch")
    dkc, dvc, dr, dp = _dev_upload(kc), _dev_upload(vc), _dev_upload(rows), _dev_upload(pos)
    _check(pe_cu_kv_store(<void *><uintptr_t>dkc.ptr, <void *><uintptr_t>dvc.ptr, tk, tv, kc.shape[0],
                          _cuk_f(dr) + k_col, _cuk_f(dr) + v_col, ld, rows.shape[0], _cuk_i64(dp), kv_dim, NULL))
    return dkc.download(kc.shape, kc.dtype), dvc.download(vc.shape, vc.dtype)


def attention_scratch_floats(int64_t n_tok, int n_head, int head_dim, int64_t max_keys):
    """Scratch floats pe_cu_attention needs (also tells how many chunks it splits each key range into)."""
    return pe_cu_attention_scratch_floats(n_tok, n_head, head_dim, max_keys)


def attention(q, positions, kc, vc, int n_head, int n_head_kv, int head_dim, int64_t window, sinks,
              int64_t max_keys, int64_t ldo=0, type_k="f32", type_v="f32", bint q8=False):
    """Attention of q (n_tok, ldq; heads in the first n_head*head_dim columns) at positions over the
    ring caches kc, vc (n_slots rows of n_head_kv*head_dim elements of type_k / type_v, raw rows as in
    kv_store); out (n_tok, ldo or n_head*head_dim). q8: pe_cu_attention_q8, returns (out, the int8
    activations of out's rows as act_q8 gives them)."""
    q = _cuk_arr(q, np.float32, 2, "q")
    pos = _cuk_arr(positions, np.int64, 1, "positions")
    if n_head <= 0 or n_head_kv <= 0 or not 0 < head_dim <= 256:
        raise ValueError("shape mismatch")
    kc, tk = _cuk_cache(kc, type_k, n_head_kv * head_dim, head_dim, "kc")
    vc, tv = _cuk_cache(vc, type_v, n_head_kv * head_dim, head_dim, "vc")
    sinks = _cuk_arr(sinks, np.float32, 1, "sinks")
    q_dim = n_head * head_dim
    if ldo == 0:
        ldo = q_dim
    if (n_head % n_head_kv or q.shape[1] < q_dim or ldo < q_dim or pos.shape[0] != q.shape[0] or pos.min() < 0
            or vc.shape[0] != kc.shape[0] or sinks.shape[0] != n_head or window < 0 or max_keys <= 0):
        raise ValueError("shape mismatch")
    n_tok = q.shape[0]
    scratch = pe_cu_attention_scratch_floats(n_tok, n_head, head_dim, max_keys)
    dq, dp, dkc, dvc, ds = _dev_upload(q), _dev_upload(pos), _dev_upload(kc), _dev_upload(vc), _dev_upload(sinks)
    dsc = _dev_upload(np.zeros(scratch, np.float32))
    dout = _dev_upload(np.zeros((n_tok, ldo), np.float32))
    if not q8:
        _check(pe_cu_attention(_cuk_f(dout), ldo, _cuk_f(dq), q.shape[1], n_tok, _cuk_i64(dp),
                               <const void *><uintptr_t>dkc.ptr, <const void *><uintptr_t>dvc.ptr, tk, tv, kc.shape[0],
                               n_head, n_head_kv, head_dim, window, _cuk_f(ds), max_keys, _cuk_f(dsc), NULL))
        return dout.download((n_tok, ldo), np.float32)
    cdef int64_t ldoq = pe_cu_act_q8_ld(q_dim)
    doq = DevBuf(n_tok * ldoq)
    _check(pe_cu_attention_q8(_cuk_f(dout), ldo, _cuk_f(dq), q.shape[1], n_tok, _cuk_i64(dp),
                              <const void *><uintptr_t>dkc.ptr, <const void *><uintptr_t>dvc.ptr, tk, tv, kc.shape[0],
                              n_head, n_head_kv, head_dim, window, _cuk_f(ds), max_keys, _cuk_f(dsc),
                              <uint8_t *> (<DevBuf> doq).p, ldoq, NULL))
    return dout.download((n_tok, ldo), np.float32), _q8_split(doq, n_tok, q_dim)
