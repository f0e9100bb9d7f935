# Decode products on int8 activations (csrc/cuda/matvec_q8_cuda.h), included by _cuda.pyx: the C
# declarations the forward pass uses (_cuda_model.pxi) and numpy-in / numpy-out wrappers for the tests
# (upload, launch on the default stream, download, free).

cdef extern from "matvec_q8_cuda.h":
    ctypedef struct pe_cu_wq8:
        const uint8_t *qs
        const uint8_t *sc
        int type
        int64_t n_in, n_out
    int pe_cu_wq8_supported(int type, int64_t n_in) nogil
    int64_t pe_cu_wq8_code_bytes(int type, int64_t n_in, int64_t n_out, int64_t n_expert) nogil
    int64_t pe_cu_wq8_scale_bytes(int type, int64_t n_in, int64_t n_out, int64_t n_expert) nogil
    int pe_cu_wq8_relayout(const pe_cu_weight *w, int64_t n_expert, uint8_t *qs, uint8_t *sc, pe_cu_wq8 *out,
                           void *stream) nogil
    int64_t pe_cu_act_q8_ld(int64_t n) nogil
    int pe_cu_act_q8(uint8_t *xq, const float *x, int64_t ldx, int64_t n_rows, int64_t n, void *stream) nogil
    int pe_cu_matvec_q8(const pe_cu_wq8 *w, const int32_t *experts, const uint8_t *xq, int64_t ldq,
                        int64_t n_rows, const float *bias, float *y, int64_t ldy, void *stream) nogil
    int pe_cu_moe_gate_up_q8(const pe_cu_wq8 *w, const int32_t *sel, const uint8_t *xq, int64_t ldq,
                             int64_t n_tok, int k, const float *bias, float *h, void *stream) nogil
    int pe_cu_moe_down_q8(const pe_cu_wq8 *w, const int32_t *sel, const float *wts, const uint8_t *hq,
                          int64_t ldq, int64_t n_tok, int k, const float *bias, float *y, void *stream) nogil

cdef extern from "ops_cuda.h":
    int pe_cu_rmsnorm_q8(float *out, uint8_t *xq, const float *x, const float *g, int64_t n_rows, int64_t n,
                         float eps, void *stream) nogil
    int pe_cu_add_rmsnorm_q8(float *out, uint8_t *xq, float *x, const float *t, const float *g, int64_t n_rows,
                             int64_t n, float eps, void *stream) nogil


def wq8_supported(int ggml_type, int64_t n_in) -> bool:
    """True when the int8-activation kernels take this weight (Q8_0 or MXFP4, n_in a multiple of 32)."""
    return bool(pe_cu_wq8_supported(ggml_type, n_in))


cdef class WQ8:
    """A device weight re-laid for the int8-activation kernels (codes and scales apart), from a packed
    device weight; owns its two buffers."""
    cdef pe_cu_wq8 w
    cdef DevBuf qs, sc

    def __init__(self):
        raise TypeError("made by _wq8_from")


cdef WQ8 _wq8_from(const pe_cu_weight *src, int64_t n_expert):
    cdef WQ8 o = WQ8.__new__(WQ8)
    o.qs = DevBuf(pe_cu_wq8_code_bytes(src.type, src.n_in, src.n_out, n_expert))
    o.sc = DevBuf(pe_cu_wq8_scale_bytes(src.type, src.n_in, src.n_out, n_expert))
    _check(pe_cu_wq8_relayout(src, n_expert, <uint8_t *> o.qs.p, <uint8_t *> o.sc.p, &o.w, NULL))
    _check(pe_cu_synchronize())  # done before any other stream (the model's is non-blocking) reads it
    return o


def _q8_split(buf, int64_t n_rows, int64_t n) -> dict:
    """qs, ql (int8 (n_rows, n)) and d (float32 (n_rows, n / 32)) of downloaded quantized rows."""
    cdef int64_t ld = pe_cu_act_q8_ld(n)
    raw = (<DevBuf> buf).download((n_rows, ld), np.uint8)
    return {"qs": raw[:, :n].view(np.int8).copy(), "ql": raw[:, n:2 * n].view(np.int8).copy(),
            "d": np.ascontiguousarray(raw[:, 2 * n:2 * n + n // 8]).view(np.float32).copy()}


def _q8_rows(x):
    xa = np.ascontiguousarray(x, dtype=np.float32)
    if xa.ndim != 2 or xa.shape[0] == 0 or xa.shape[1] == 0 or xa.shape[1] % 32:
        raise ValueError("x must be 2-D float32 with a multiple of 32 columns")
    return xa


def act_q8(x) -> dict:
    """The int8 activations of each row of x (n_rows, n), quantized on the GPU: {"qs", "ql", "d"}."""
    xa = _q8_rows(x)
    cdef int64_t n_rows = xa.shape[0], n = xa.shape[1]
    dx = _dev_upload(xa)
    dq = DevBuf(n_rows * pe_cu_act_q8_ld(n))
    _check(pe_cu_act_q8(<uint8_t *> dq.p, <const float *> (<DevBuf> dx).p, n, n_rows, n, NULL))
    return _q8_split(dq, n_rows, n)


def rmsnorm_q8(x, g, float eps, t=None) -> tuple:
    """(out, x after the add, its int8 activations) of pe_cu_rmsnorm_q8, or of pe_cu_add_rmsnorm_q8
    with t (x += t first)."""
    xa = _q8_rows(x)
    cdef int64_t n_rows = xa.shape[0], n = xa.shape[1]
    ga = np.ascontiguousarray(g, dtype=np.float32)
    if ga.shape != (n,):
        raise ValueError("g must hold one weight per column")
    dx, dg = _dev_upload(xa), _dev_upload(ga)
    dout = DevBuf(n_rows * n * 4)
    dq = DevBuf(n_rows * pe_cu_act_q8_ld(n))
    if t is None:
        _check(pe_cu_rmsnorm_q8(<float *> dout.p, <uint8_t *> dq.p, <const float *> (<DevBuf> dx).p,
                                <const float *> (<DevBuf> dg).p, n_rows, n, eps, NULL))
    else:
        ta = np.ascontiguousarray(t, dtype=np.float32)
        if ta.shape != xa.shape:
            raise ValueError("t must have the shape of x")
        dt = _dev_upload(ta)
        _check(pe_cu_add_rmsnorm_q8(<float *> dout.p, <uint8_t *> dq.p, <float *> (<DevBuf> dx).p,
                                    <const float *> (<DevBuf> dt).p, <const float *> (<DevBuf> dg).p, n_rows, n,
                                    eps, NULL))
    return (dout.download((n_rows, n), np.float32), (<DevBuf> dx).download((n_rows, n), np.float32),
            _q8_split(dq, n_rows, n))


cdef WQ8 _wq8_upload(data, int ggml_type, int64_t n_in, list keep):
    """The re-laid device copy of a host weight array (n_out, row_bytes) or (n_expert, n_out, row_bytes)."""
    if not pe_cu_wq8_supported(ggml_type, n_in):
        raise ValueError(f"ggml type {ggml_type} with n_in {n_in}: not an int8-activation weight")
    flat, n_out, n_exp, row_stride, expert_stride = _cuq_weight_span(data, ggml_type, n_in)
    dw = _dev_upload(flat)
    keep.append(dw)
    cdef pe_cu_weight w = _cuq_weight(dw, ggml_type, n_in, n_out, row_stride, expert_stride)
    return _wq8_from(&w, n_exp)


def matvec_q8(data, int ggml_type, int64_t n_in, x, bias=None, experts=None, bint broadcast=False) -> np.ndarray:
    """Decode products on int8 activations: x (n_rows, n_in) quantized on the GPU, then y[i, r] =
    dot(row r of expert experts[i], activations of row i) + bias[experts[i], r] (expert 0 without
    experts). broadcast (with experts): every row reads x's first row (the forward pass's ldq = 0)."""
    keep = []
    cdef WQ8 w = _wq8_upload(data, ggml_type, n_in, keep)
    xa = _q8_rows(x)
    if xa.shape[1] != n_in:
        raise ValueError("x must have n_in columns")
    cdef int64_t n_rows = experts.shape[0] if experts is not None else xa.shape[0], n_exp = 1
    if data.ndim == 3:
        n_exp = data.shape[0]
    ea = None
    if experts is not None:
        ea = np.ascontiguousarray(experts, dtype=np.int32)
        if ea.ndim != 1 or (ea < 0).any() or (ea >= n_exp).any() or (not broadcast and ea.shape[0] != xa.shape[0]):
            raise ValueError("experts must be one id in [0, n_expert) per row of x")
    elif broadcast:
        raise ValueError("broadcast needs experts")
    ba = None
    if bias is not None:
        ba = np.ascontiguousarray(bias, dtype=np.float32)
        if ba.shape != (n_exp, w.w.n_out):
            raise ValueError(f"bias must have shape {(n_exp, w.w.n_out)}")
    cdef int64_t ld = pe_cu_act_q8_ld(n_in)
    dx = _dev_upload(xa)
    dq = DevBuf(xa.shape[0] * ld)
    _check(pe_cu_act_q8(<uint8_t *> dq.p, <const float *> (<DevBuf> dx).p, n_in, xa.shape[0], n_in, NULL))
    dy = _dev_upload(np.full((n_rows, w.w.n_out), np.nan, np.float32))
    de = _dev_upload(ea) if ea is not None else None
    db = _dev_upload(ba) if ba is not None else None
    _check(pe_cu_matvec_q8(&w.w, <const int32_t *> (<DevBuf> de).p if de is not None else NULL,
                           <const uint8_t *> dq.p, 0 if broadcast else ld, n_rows,
                           <const float *> (<DevBuf> db).p if db is not None else NULL,
                           <float *> (<DevBuf> dy).p, w.w.n_out, NULL))
    return (<DevBuf> dy).download((n_rows, w.w.n_out), np.float32)


def moe_q8(gate_up, down, int ggml_type, x, sel, wts, gate_up_bias, down_bias) -> tuple:
    """The fused int8 MoE of n_tok tokens: x (n_tok, n_embd) quantized on the GPU; gate_up (n_expert,
    2 n_ff, row_bytes) gate rows then up rows; down (n_expert, n_embd, row_bytes); sel, wts (n_tok, k)
    in rank order. Returns (h (n_tok * k, n_ff): SwiGLU of each pair, y (n_tok, n_embd): the weighted
    sum of the pairs' down products)."""
    keep = []
    xa = _q8_rows(x)
    sa = np.ascontiguousarray(sel, dtype=np.int32)
    wa = np.ascontiguousarray(wts, dtype=np.float32)
    cdef int64_t n_tok = xa.shape[0], D = xa.shape[1]
    if sa.ndim != 2 or sa.shape[0] != n_tok or wa.shape != sa.shape:
        raise ValueError("sel and wts must be (n_tok, k)")
    if gate_up.ndim != 3 or down.ndim != 3 or gate_up.shape[0] != down.shape[0]:
        raise ValueError("gate_up and down must be expert-stacked")
    cdef int k = sa.shape[1]
    cdef int64_t E = gate_up.shape[0], F = gate_up.shape[1] // 2
    if (sa < 0).any() or (sa >= E).any():
        raise ValueError("expert id out of range")
    cdef WQ8 gu = _wq8_upload(gate_up, ggml_type, D, keep)
    cdef WQ8 dn = _wq8_upload(down, ggml_type, F, keep)
    if dn.w.n_out != D:
        raise ValueError("down must have n_embd rows")
    bgu = np.ascontiguousarray(gate_up_bias, dtype=np.float32)
    bdn = np.ascontiguousarray(down_bias, dtype=np.float32)
    if bgu.shape != (E, 2 * F) or bdn.shape != (E, D):
        raise ValueError("biases must be (n_expert, 2 n_ff) and (n_expert, n_embd)")
    dx, ds, dwt, dbgu, dbdn = _dev_upload(xa), _dev_upload(sa), _dev_upload(wa), _dev_upload(bgu), _dev_upload(bdn)
    dq = DevBuf(n_tok * pe_cu_act_q8_ld(D))
    dh = DevBuf(n_tok * k * F * 4)
    dhq = DevBuf(n_tok * k * pe_cu_act_q8_ld(F))
    dy = _dev_upload(np.full((n_tok, D), np.nan, np.float32))
    _check(pe_cu_act_q8(<uint8_t *> dq.p, <const float *> (<DevBuf> dx).p, D, n_tok, D, NULL))
    _check(pe_cu_moe_gate_up_q8(&gu.w, <const int32_t *> (<DevBuf> ds).p, <const uint8_t *> dq.p,
                                pe_cu_act_q8_ld(D), n_tok, k, <const float *> (<DevBuf> dbgu).p, <float *> dh.p, NULL))
    _check(pe_cu_act_q8(<uint8_t *> dhq.p, <const float *> dh.p, F, n_tok * k, F, NULL))
    _check(pe_cu_moe_down_q8(&dn.w, <const int32_t *> (<DevBuf> ds).p, <const float *> (<DevBuf> dwt).p,
                             <const uint8_t *> dhq.p, pe_cu_act_q8_ld(F), n_tok, k,
                             <const float *> (<DevBuf> dbdn).p, <float *> (<DevBuf> dy).p, NULL))
    return dh.download((n_tok * k, F), np.float32), (<DevBuf> dy).download((n_tok, D), np.float32)


cdef extern from "matvec_q8_cuda.h":
    int pe_cu_qkv_rope_q8_stores(int type_k, int type_v) nogil
    int pe_cu_qkv_rope_q8(const pe_cu_wq8 *w, const uint8_t *xq, const float *bias, float *qkv, int n_head,
                          int n_head_kv, int head_dim, const int64_t *pos, const double *omega, double mscale,
                          void *kc, void *vc, int type_k, int type_v, int64_t n_slots, void *stream) nogil


def qkv_rope_q8(data, int ggml_type, int64_t n_in, x, bias, int n_head, int n_head_kv, int head_dim,
                int64_t position, omega, double mscale, kc=None, vc=None, type_k="f32", type_v="f32") -> tuple:
    """One token's q|k|v product on int8 activations (x (1, n_in) quantized on the GPU) with RoPE and,
    given caches kc / vc (raw rows as kv_store takes them; f32, f16 or bf16), the K/V store as its
    epilogue. Returns (qkv row, kc, vc) after the call (the caches None without them)."""
    keep = []
    cdef WQ8 w = _wq8_upload(data, ggml_type, n_in, keep)
    xa = _q8_rows(x)
    ba = np.ascontiguousarray(bias, dtype=np.float32)
    om = np.ascontiguousarray(omega, dtype=np.float64)
    cdef int64_t kv_dim = n_head_kv * head_dim
    if xa.shape != (1, n_in) or ba.shape != (w.w.n_out,) or om.shape != (head_dim // 2,) or head_dim % 2:
        raise ValueError("shape mismatch")
    if w.w.n_out != (n_head + 2 * n_head_kv) * head_dim:
        raise ValueError("weights must hold the q, k and v heads")
    cdef int tk = 0, tv = 0
    cdef int64_t n_slots = 0
    dkc = dvc = None
    if (kc is None) != (vc is None):
        raise ValueError("kc and vc go together")
    if kc is not None:
        kc, tk = _cuk_cache(kc, type_k, kv_dim, head_dim, "kc")
        vc, tv = _cuk_cache(vc, type_v, kv_dim, head_dim, "vc")
        if not pe_cu_qkv_rope_q8_stores(tk, tv) or kc.shape[0] != vc.shape[0]:
            raise ValueError("the fused store takes f32, f16 or bf16 caches of equal length")
        n_slots = kc.shape[0]
        dkc, dvc = _dev_upload(kc), _dev_upload(vc)
    dx, db, do = _dev_upload(xa), _dev_upload(ba), _dev_upload(om)
    dpos = _dev_upload(np.array([position], dtype=np.int64))
    dq = DevBuf(pe_cu_act_q8_ld(n_in))
    dy = _dev_upload(np.full(w.w.n_out, np.nan, np.float32))
    _check(pe_cu_act_q8(<uint8_t *> dq.p, <const float *> (<DevBuf> dx).p, n_in, 1, n_in, NULL))
    _check(pe_cu_qkv_rope_q8(&w.w, <const uint8_t *> dq.p, <const float *> (<DevBuf> db).p,
                             <float *> (<DevBuf> dy).p, n_head, n_head_kv, head_dim,
                             <const int64_t *> (<DevBuf> dpos).p, <const double *> (<DevBuf> do).p, mscale,
                             (<DevBuf> dkc).p if dkc is not None else NULL,
                             (<DevBuf> dvc).p if dvc is not None else NULL, tk, tv, n_slots, NULL))
    out = (<DevBuf> dy).download((w.w.n_out,), np.float32)
    if kc is None:
        return out, None, None
    return out, (<DevBuf> dkc).download(kc.shape, kc.dtype), (<DevBuf> dvc).download(vc.shape, vc.dtype)
