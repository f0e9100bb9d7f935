# cython: language_level=3, boundscheck=False, wraparound=False
"""Binding of the C gpt-oss forward pass: builds the C weight views from the loader's tensors.

Everything a pointer depends on (type id, shape, strides, byte size, token ids, positions) is checked
here before it reaches C; the numpy views are kept referenced so the memory map stays alive. The
module also exposes the individual kernels, which the tests compare against float64 numpy."""

import numpy as np
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uintptr_t
from libc.stdlib cimport malloc, free

from _core cimport PE_LAYOUT_ROWS, pe_kv_keys_tiled, pe_kv_layer, pe_layer, pe_model, pe_moe, pe_seq, pe_weight

cnp.import_array()

cdef extern from "quants.h":
    enum: PE_TYPE_MXFP4, PE_TYPE_Q4_0, PE_TYPE_Q4_1, PE_TYPE_Q5_0, PE_TYPE_Q5_1, PE_TYPE_Q2_K, PE_TYPE_Q3_K, PE_TYPE_Q4_K, PE_TYPE_Q5_K
    enum: PE_TYPE_Q6_K
    ctypedef void (*pe_dequant_row_fn)(const void *src, float *dst, int64_t n) noexcept nogil
    ctypedef struct pe_type_traits:
        int type
        const char *name
        int blck_size
        int type_size
        pe_dequant_row_fn dequant_row
    const pe_type_traits *pe_type_traits_get(int type)
    size_t pe_row_size(int type, int64_t n)
    enum:
        PE_TYPE_F32, PE_TYPE_F16, PE_TYPE_BF16, PE_TYPE_Q8_0

cdef extern from "matmul.h":
    int pe_matmul(const pe_weight *w, int64_t expert, const float *x, int64_t ldx, int64_t n_tok,
                  const float *bias, float *y, int64_t ldy, int n_threads) nogil

cdef extern from "r16.h":
    ctypedef void (*pe_r16_dot_fn)(const uint8_t *group, int64_t nb, int nr, const void *x, int n_tok, float *out,
                                   int64_t ldo, const uint8_t *pf) noexcept nogil
    int pe_r16_has_type(int type)
    int64_t pe_r16_bytes(int type, int64_t n_in, int64_t n_out, int64_t n_expert)
    pe_weight pe_r16_weight(int type, const uint8_t *data, int64_t n_in, int64_t n_out)
    void pe_r16_repack(const pe_weight *src, int64_t n_expert, uint8_t *dst, int n_threads) nogil
    pe_r16_dot_fn pe_r16_dot_get(int type)
    int pe_r16_one_token_rows(int type)
    int pe_r16_pf_cursors

cdef extern from "ops.h":
    void pe_rmsnorm(float *out, const float *x, const float *g, int64_t n, float eps) nogil
    double pe_rope_yarn_freqs(double *omega, int head_dim, double base, int yarn, double factor,
                              double orig_ctx, double beta_fast, double beta_slow, int truncate) nogil
    void pe_rope_table(float *cos_t, float *sin_t, const double *omega, int half, int64_t pos,
                       double mscale) nogil
    void pe_rope_apply(float *x, int n_heads, int head_dim, const float *cos_t, const float *sin_t) nogil
    void pe_swiglu_oai(float *out, const float *g, const float *u, int64_t n, int n_threads) nogil
    void pe_topk(const float *x, int n, int k, int *idx) nogil

cdef extern from "attention.h":
    void pe_kv_store(pe_kv_layer *kv, const float *k, const float *v, int64_t n_tok, int64_t pos0,
                     int64_t kv_dim, int head_dim) nogil
    int pe_attention(float *out, const float *q, int64_t n_tok, int64_t pos0, const pe_kv_layer *kv,
                     int n_head, int n_head_kv, int head_dim, int64_t window, const float *sinks,
                     int n_threads) nogil

cdef extern from "moe.h":
    int pe_moe_forward(const pe_moe *m, const float *x, int64_t n_tok, float *y, int n_threads,
                       int64_t *counts) nogil

cdef extern from "arena.h":
    ctypedef struct pe_arena:
        pass
    pe_arena *pe_arena_get() nogil
    size_t pe_arena_system_allocs(const pe_arena *a) nogil

cdef extern from "profile.h":
    enum: PE_OP_COUNT
    void pe_profile_enable(int on) nogil
    void pe_profile_reset() nogil
    void pe_profile_read(int64_t *ns, int64_t *calls, int64_t *nbytes) nogil
    const char *pe_profile_op_name(int op) nogil

cdef extern from "gptoss.h":
    int pe_gptoss_forward(const pe_model *m, pe_kv_layer *kv, const int32_t *tokens, int64_t n_tok,
                          int64_t n_past, float *logits, int logits_all, int n_threads,
                          int64_t *expert_counts) nogil
    int pe_gptoss_forward_seqs(const pe_model *m, const pe_seq *seqs, int64_t n_seq, const int32_t *tokens,
                               float *logits, int logits_all, int n_threads, int64_t *expert_counts) nogil


# ---- validation: the only way a weight pointer is made ------------------------------------------

cdef const pe_type_traits *_traits(int ggml_type) except NULL:
    cdef const pe_type_traits *tt = pe_type_traits_get(ggml_type)
    if tt == NULL:
        raise ValueError(f"unsupported tensor type {ggml_type}")
    return tt


cdef pe_weight _weight(object data, int ggml_type, int64_t n_in, int64_t n_out, int64_t n_expert,
                       str name, bint int8_activations=False) except *:
    """A pe_weight over `data` (uint8, (n_out, row_bytes) or (n_expert, n_out, row_bytes)) after
    checking every size and stride against the type's block layout. int8_activations: matrix-vector
    products quantize x to Q8 blocks (types with a dot_q8 kernel; others ignore it)."""
    cdef const pe_type_traits *tt = _traits(ggml_type)
    cdef pe_weight w
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise ValueError(f"{name}: data must be a uint8 numpy array")
    if n_in <= 0 or n_out <= 0 or n_expert <= 0 or n_in % tt.blck_size:
        raise ValueError(f"{name}: row of {n_in} elements is not a whole number of "
                         f"{tt.name.decode()} blocks")
    cdef int64_t row_bytes = n_in // tt.blck_size * tt.type_size
    cdef tuple expect = (n_out, row_bytes)
    if data.ndim == 3:
        expect = (n_expert, n_out, row_bytes)
    if data.ndim not in (2, 3) or (data.ndim == 2 and n_expert != 1) or tuple(data.shape) != expect:
        raise ValueError(f"{name}: data shape {data.shape} does not match {expect}")
    if data.strides[data.ndim - 1] != 1 or data.strides[data.ndim - 2] < row_bytes:
        raise ValueError(f"{name}: rows must be contiguous and must not overlap (strides {data.strides})")
    if data.ndim == 3 and data.strides[0] <= 0:
        raise ValueError(f"{name}: expert stride {data.strides[0]} must be positive")
    w.data = <const uint8_t *> cnp.PyArray_DATA(data)
    w.type = ggml_type
    w.n_in = n_in
    w.n_out = n_out
    w.row_stride = data.strides[data.ndim - 2]
    w.expert_stride = data.strides[0] if data.ndim == 3 else 0
    w.int8_act = 1 if int8_activations else 0
    w.layout = PE_LAYOUT_ROWS
    w.rows = NULL
    w.rows_stride = 0
    return w


# ---- weights repacked by 16 rows (csrc/r16.h; cache: pyengine/repack_cache.py) ----
MXFP4 = PE_TYPE_MXFP4
Q8_0 = PE_TYPE_Q8_0
Q4_0 = PE_TYPE_Q4_0
Q4_1 = PE_TYPE_Q4_1
Q5_0 = PE_TYPE_Q5_0
Q5_1 = PE_TYPE_Q5_1
Q2_K = PE_TYPE_Q2_K
Q3_K = PE_TYPE_Q3_K
Q4_K = PE_TYPE_Q4_K
Q5_K = PE_TYPE_Q5_K
Q6_K = PE_TYPE_Q6_K
# The types with an R16 form (pe_r16_has_type), by name for the error messages.
R16_TYPES = {"MXFP4": MXFP4, "Q8_0": Q8_0, "Q4_0": Q4_0, "Q4_1": Q4_1, "Q5_0": Q5_0, "Q5_1": Q5_1, "Q2_K": Q2_K,
             "Q3_K": Q3_K, "Q4_K": Q4_K, "Q5_K": Q5_K, "Q6_K": Q6_K}
_R16_NAMES = ", ".join(R16_TYPES)


def r16_available(int ggml_type=MXFP4) -> bool:
    """Whether this CPU has an R16 kernel for the type (MXFP4: AVX-512 VNNI or AVX2; the others:
    AVX-512 VNNI)."""
    return pe_r16_dot_get(ggml_type) != NULL


def r16_one_token_rows(int ggml_type) -> bool:
    """Whether one-token products of a repacked matrix of the type read its rows in the file's layout
    instead (PYENGINE_DECODE_LAYOUT, else Q8_0 on AMD CPUs: csrc/r16.h)."""
    return pe_r16_one_token_rows(ggml_type) != 0


def r16_prefetch_cursors() -> int:
    """How many cursors the R16 kernels prefetch a group's codes from (PYENGINE_R16_PF_CURSORS, else
    1 on AMD CPUs and 4 on the others: csrc/r16.h); the products' bits do not depend on it."""
    return pe_r16_pf_cursors


def r16_bytes(int64_t n_in, int64_t n_out, int64_t n_expert, int ggml_type=MXFP4) -> int:
    """Bytes of the R16 form of n_expert matrices of the type (one of R16_TYPES) of n_out rows x
    n_in elements."""
    if not pe_r16_has_type(ggml_type):
        raise ValueError(f"no R16 form for ggml type {ggml_type} (only {_R16_NAMES})")
    if n_in <= 0 or n_in % _traits(ggml_type).blck_size or n_out <= 0 or n_expert <= 0:
        raise ValueError(f"no R16 form for {n_expert} x {n_out} x {n_in}")
    return pe_r16_bytes(ggml_type, n_in, n_out, n_expert)


def r16_repack(data, int64_t n_in, out, int n_threads=1, int ggml_type=MXFP4):
    """Write the R16 form of `data` (a weight of one of R16_TYPES: uint8 (n_out, row_bytes) or (n_expert,
    n_out, row_bytes), any strides) into `out` (writable uint8, r16_bytes(...) contiguous bytes)."""
    cdef int64_t n_exp = data.shape[0] if data.ndim == 3 else 1
    if not pe_r16_has_type(ggml_type):
        raise ValueError(f"no R16 form for ggml type {ggml_type} (only {_R16_NAMES})")
    cdef pe_weight w = _weight(data, ggml_type, n_in, data.shape[data.ndim - 2] if data.ndim >= 2 else 0, n_exp,
                               "r16_repack")
    need = r16_bytes(w.n_in, w.n_out, n_exp, ggml_type)
    if (not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 1 or not out.flags.c_contiguous
            or not out.flags.writeable or out.shape[0] != need or n_threads < 1):
        raise ValueError(f"r16_repack: out must be {need} writable contiguous bytes")
    cdef cnp.ndarray o = out
    with nogil:
        pe_r16_repack(&w, n_exp, <uint8_t *> cnp.PyArray_DATA(o), n_threads)


cdef pe_weight _r16_weight(object data, int ggml_type, int64_t n_in, int64_t n_out, int64_t n_expert,
                           str name) except *:
    """A PE_LAYOUT_R16 weight (int8 activations) over `data`, checked: uint8, contiguous, exactly
    r16_bytes(n_in, n_out, n_expert, ggml_type) long, 64-byte aligned, and this CPU has the kernel."""
    if not pe_r16_has_type(ggml_type):
        raise ValueError(f"{name}: the R16 layout is for {_R16_NAMES} weights")
    if pe_r16_dot_get(ggml_type) == NULL:
        raise ValueError(f"{name}: this CPU has no R16 kernel for this type")
    cdef int64_t need = r16_bytes(n_in, n_out, n_expert, ggml_type)
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1
            or not data.flags.c_contiguous or data.shape[0] != need):
        raise ValueError(f"{name}: R16 data must be {need} contiguous uint8 bytes")
    cdef const uint8_t *p = <const uint8_t *> cnp.PyArray_DATA(data)
    if <uintptr_t> p % 64:
        raise ValueError(f"{name}: R16 data must be 64-byte aligned")
    return pe_r16_weight(ggml_type, p, n_in, n_out)


def _tensor_weight_args(t, int n_dims):
    """(data, type, n_in, n_out, n_expert) of a loader Tensor with the expected number of dimensions."""
    shape = tuple(int(s) for s in t.shape)
    if len(shape) != n_dims:
        raise ValueError(f"{t.name}: expected {n_dims} dimensions, got shape {shape}")
    n_expert = shape[2] if n_dims == 3 else 1
    return t.data, int(t.ggml_type), shape[0], shape[1], n_expert


def dequantize_rows(data, int ggml_type, int64_t n_in):
    """float32 (rows, n_in) of a uint8 (rows, row_bytes) view (any row stride), via the C kernels."""
    cdef pe_weight w = _weight(data, ggml_type, n_in, data.shape[0] if data.ndim == 2 else 0, 1,
                               "dequantize_rows")
    cdef const pe_type_traits *tt = _traits(ggml_type)
    cdef cnp.ndarray[cnp.float32_t, ndim=2] out = np.empty((w.n_out, n_in), dtype=np.float32)
    cdef int64_t r
    for r in range(w.n_out):
        tt.dequant_row(w.data + r * w.row_stride, &out[r, 0], n_in)
    return out


def _floats(t, tuple shape):
    """A small tensor (norm gain, bias, sinks) as a contiguous float32 array of the given shape."""
    got = tuple(int(s) for s in t.shape)
    n = int(np.prod(shape))
    if int(np.prod(got)) != n or got[0] != shape[len(shape) - 1]:
        raise ValueError(f"{t.name}: shape {got} does not match {tuple(reversed(shape))}")
    data = t.data
    if not isinstance(data, np.ndarray) or data.ndim != 2:
        raise ValueError(f"{t.name}: expected 2-D row data, got {getattr(data, 'shape', None)}")
    rows = dequantize_rows(data, int(t.ggml_type), got[0])
    return np.ascontiguousarray(rows.reshape(shape), dtype=np.float32)


def sequence_tokens(tokens, int64_t n_past, cache, int64_t n_vocab, int64_t window):
    """The int32 token ids of one sequence of a forward call, after checking them against the
    vocabulary and where they land in `cache` (its n_ctx and its sliding rings' max_batch): the checks
    every forward pass (CPU or GPU) makes before a pointer reaches C."""
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError("tokens must be a 1-D sequence of integer token ids")
    cdef int64_t n = arr.shape[0]
    if n <= 0:
        raise ValueError("no tokens")
    if arr.min() < 0 or arr.max() >= n_vocab:
        raise ValueError(f"token id out of range [0, {n_vocab})")
    if n_past < 0 or n_past + n > cache.n_ctx:
        raise ValueError(f"{n_past} + {n} tokens exceed the context of {cache.n_ctx}")
    if n > cache.max_batch(window):
        raise ValueError(f"{n} tokens in one call exceed the sliding-window cache")
    return np.ascontiguousarray(arr, dtype=np.int32)


# ---- KV cache element types ----------------------------------------------------------------------

# llama.cpp's --cache-type-k/v names; the ids and block geometry come from csrc/quant_formats.h.
KV_CACHE_TYPES = {"f32": PE_TYPE_F32, "f16": PE_TYPE_F16, "bf16": PE_TYPE_BF16, "q8_0": PE_TYPE_Q8_0}
DEFAULT_KV_CACHE_TYPE = "f16"


def kv_cache_type(value, what="cache type") -> str:
    """The KV cache type name `value` stands for (f32, f16, bf16, q8_0; any case), or ValueError."""
    name = value.lower() if isinstance(value, str) else value
    if name not in KV_CACHE_TYPES:
        raise ValueError(f"{what}: unknown KV cache type {value!r} (choose one of "
                         f"{', '.join(KV_CACHE_TYPES)})")
    return name


def kv_row_bytes(name, int64_t n, int64_t head_dim) -> int:
    """Bytes of one cache row of n elements of the type `name`, whose heads of head_dim elements
    must be whole blocks (Q8_0: 32 elements)."""
    cdef int t = KV_CACHE_TYPES[kv_cache_type(name)]
    cdef int blck = pe_type_traits_get(t).blck_size
    if head_dim % blck or n % head_dim:
        raise ValueError(f"KV cache type {name} needs heads of a multiple of {blck} elements; "
                         f"this model's are {head_dim}")
    return pe_row_size(t, n)


# ---- the model -----------------------------------------------------------------------------------

cdef class KVCache:
    """K and V rings per layer, in the element types type_k and type_v (KV_CACHE_TYPES): n_ctx slots
    for full layers, window + n_batch for sliding ones (allocated zeroed and lazily, so untouched
    pages cost no memory). Head-major, as csrc/attention.h reads them: k[l] and v[l] are uint8 arrays
    (n_head_kv, slots, bytes of one head's row); position p is slot p % slots. On AVX-512 CPUs the keys
    of f32, f16 and bf16 caches are stored in tiles of 16 slots, dimension by dimension
    (csrc/attention_heads.h)."""
    cdef public object k, v
    cdef public int64_t n_ctx
    cdef public object n_slots
    cdef readonly object layout   # the model shape this cache fits (Model.cache_layout)
    cdef readonly str type_k, type_v
    cdef pe_kv_layer *layers
    cdef int n_layer

    def __cinit__(self, Model model, int64_t n_ctx, int64_t n_batch, type_k=DEFAULT_KV_CACHE_TYPE,
                  type_v=DEFAULT_KV_CACHE_TYPE):
        cdef int l
        if n_ctx <= 0 or n_batch <= 0:
            raise ValueError("n_ctx and n_batch must be positive")
        self.type_k, self.type_v = kv_cache_type(type_k, "type_k"), kv_cache_type(type_v, "type_v")
        kv_dim = model.m.n_head_kv * model.m.head_dim
        row_k = kv_row_bytes(self.type_k, kv_dim, model.m.head_dim)
        row_v = kv_row_bytes(self.type_v, kv_dim, model.m.head_dim)
        self.n_layer = model.m.n_layer
        self.n_ctx = n_ctx
        self.layout = model.cache_layout
        self.k, self.v, self.n_slots = [], [], []
        for l in range(self.n_layer):
            slots = min(n_ctx, model.m.window + n_batch) if model.c_layers[l].sliding else n_ctx
            self.n_slots.append(slots)
            self.k.append(np.zeros((model.m.n_head_kv, slots, row_k // model.m.n_head_kv), dtype=np.uint8))
            self.v.append(np.zeros((model.m.n_head_kv, slots, row_v // model.m.n_head_kv), dtype=np.uint8))
        self.layers = <pe_kv_layer *> malloc(self.n_layer * sizeof(pe_kv_layer))
        if self.layers == NULL:
            raise MemoryError()
        for l in range(self.n_layer):
            self.layers[l].k = <uint8_t *> cnp.PyArray_DATA(self.k[l])
            self.layers[l].v = <uint8_t *> cnp.PyArray_DATA(self.v[l])
            self.layers[l].n_slots = self.n_slots[l]
            self.layers[l].type_k = KV_CACHE_TYPES[self.type_k]
            self.layers[l].type_v = KV_CACHE_TYPES[self.type_v]

    def __dealloc__(self):
        free(self.layers)

    def max_batch(self, int64_t window) -> int:
        """Most tokens one forward call may add without a sliding ring overwriting keys it needs."""
        return min(self.n_slots) - window + 1 if min(self.n_slots) < self.n_ctx else self.n_ctx

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    @property
    def rings(self) -> list:
        """The sliding layers' K then V arrays that wrap (fewer slots than the context): what a
        checkpoint copies (pyengine/runner.py Checkpoint)."""
        ring = [l for l in range(self.n_layer) if self.n_slots[l] < self.n_ctx]
        return [self.k[l] for l in ring] + [self.v[l] for l in ring]

    def ring_copies(self) -> tuple:
        """Copies of `rings` (a checkpoint's contents)."""
        return tuple(x.copy() for x in self.rings)

    def put_rings(self, rings) -> None:
        """Write arrays ring_copies gave back into the rings (a rewind to a checkpoint)."""
        for x, r in zip(self.rings, rings):
            x[...] = r

    def ring_shapes(self) -> list:
        """(shape, dtype) of each array ring_copies gives."""
        return [(x.shape, x.dtype) for x in self.rings]

    @property
    def row_format(self) -> tuple:
        """How the rows lie beyond the layout and types, which a copy of them (used_rows) must
        find again to be read right: head-major, the keys in tiles of 16 where this process keeps
        them so (the element types on AVX-512 CPUs: csrc/attention_heads.h)."""
        return ("cpu", "key tiles of 16" if pe_kv_keys_tiled(KV_CACHE_TYPES[self.type_k]) else "rows")

    def used_rows(self, int64_t n_past) -> list:
        """Views of the K then V rows that n_past tokens wrote, every layer's K, then every V: a
        full layer's first slots rounded up to whole tiles of 16, a sliding ring whole once the
        tokens fill it (position p lives in slot p % slots)."""
        return [x[:, :s[0][1], :] for x, s in zip([*self.k, *self.v], self.row_shapes(n_past))]

    def row_shapes(self, int64_t n_past) -> list:
        """(shape, dtype) of each array used_rows(n_past) gives."""
        n = -(-n_past // 16) * 16
        return [((x.shape[0], min(n, x.shape[1]), x.shape[2]), x.dtype) for x in [*self.k, *self.v]]

    def put_rows(self, rows) -> None:
        """Write arrays shaped as row_shapes says (checked by the caller: Runner.write_rows) back."""
        for x, r in zip([*self.k, *self.v], rows):
            x[:, :r.shape[1], :] = r

    def _c_layers(self) -> int:
        """Address of the C pe_kv_layer array (for pyengine._cuda's split CPU/GPU caches; valid
        while this object lives)."""
        return <uintptr_t> self.layers


cdef class Model:
    """C views of a gpt-oss model's tensors (as open_model returns them) and its hyperparameters."""
    cdef pe_model m
    cdef pe_layer *c_layers
    cdef object keep          # every array a C pointer points into
    cdef object omega, omega_swa
    cdef object counts        # int64 [n_layer][n_expert]: expert selections so far
    cdef public int64_t n_vocab
    cdef readonly bint int8_activations
    cdef object repacked      # tensor name -> R16 bytes used in place of the file's

    def __cinit__(self):
        self.c_layers = NULL

    def __init__(self, dict tensors, hp, bint yarn_truncate=False, bint int8_activations=False,
                 dict repacked=None):
        """repacked: tensor name -> that weight's R16 form (pyengine/repack_cache.py; types in R16_TYPES),
        used in its place (needs int8_activations)."""
        cdef int l
        self.int8_activations = int8_activations
        self.repacked = repacked or {}
        if self.repacked and not int8_activations:
            raise ValueError("repacked weights need int8 activations")
        self.keep = []
        D, H, Hkv, hd = int(hp.n_embd), int(hp.n_head), int(hp.n_head_kv), int(hp.head_dim)
        E, K, F, L = int(hp.n_expert), int(hp.n_expert_used), int(hp.n_ff_exp), int(hp.n_layer)
        if min(D, H, Hkv, hd, E, K, F, L) <= 0 or H % Hkv or K > E or hd % 2:
            raise ValueError(f"inconsistent hyperparameters: {hp}")
        if len(hp.swa_layers) != L:
            raise ValueError("swa_layers must have one entry per layer")

        def get(name):
            if name not in tensors:
                raise ValueError(f"missing tensor {name}")
            return tensors[name]

        def floats(name, shape, optional=False):
            if optional and name not in tensors:
                a = np.zeros(shape, dtype=np.float32)
            else:
                a = _floats(get(name), shape)
            self.keep.append(a)
            return a

        cdef cnp.ndarray[cnp.float32_t, ndim=1] a1
        cdef cnp.ndarray[cnp.float32_t, ndim=2] a2
        cdef pe_layer *Ly
        tok = get("token_embd.weight")
        if len(tok.shape) != 2 or int(tok.shape[0]) != D:
            raise ValueError(f"token_embd.weight: shape {tuple(tok.shape)} does not match ({D}, n_vocab)")
        self.n_vocab = int(tok.shape[1])
        if "token_embd.weight" in self.repacked:  # the embedding lookup reads rows in the file's layout
            raise ValueError("token_embd.weight has no R16 form")
        self.m.tok_embd = self._weight(tensors, "token_embd.weight", D, self.n_vocab)
        self.m.output = self._weight(tensors, "output.weight" if "output.weight" in tensors else "token_embd.weight",
                               D, self.n_vocab)
        a1 = floats("output_norm.weight", (D,))
        self.m.out_norm = &a1[0]

        self.c_layers = <pe_layer *> malloc(L * sizeof(pe_layer))
        if self.c_layers == NULL:
            raise MemoryError()
        for l in range(L):
            p = f"blk.{l}."
            Ly = &self.c_layers[l]
            a1 = floats(p + "attn_norm.weight", (D,)); Ly.attn_norm = &a1[0]
            Ly.wq = self._weight(tensors, p + "attn_q.weight", D, H * hd)
            Ly.wk = self._weight(tensors, p + "attn_k.weight", D, Hkv * hd)
            Ly.wv = self._weight(tensors, p + "attn_v.weight", D, Hkv * hd)
            Ly.wo = self._weight(tensors, p + "attn_output.weight", H * hd, D)
            a1 = floats(p + "attn_q.bias", (H * hd,), True); Ly.bq = &a1[0]
            a1 = floats(p + "attn_k.bias", (Hkv * hd,), True); Ly.bk = &a1[0]
            a1 = floats(p + "attn_v.bias", (Hkv * hd,), True); Ly.bv = &a1[0]
            a1 = floats(p + "attn_output.bias", (D,), True); Ly.bo = &a1[0]
            a1 = floats(p + "attn_sinks.weight", (H,)); Ly.sinks = &a1[0]
            a1 = floats(p + "post_attention_norm.weight", (D,)); Ly.post_norm = &a1[0]
            Ly.moe.router = self._weight(tensors, p + "ffn_gate_inp.weight", D, E)
            a1 = floats(p + "ffn_gate_inp.bias", (E,), True); Ly.moe.router_b = &a1[0]
            Ly.moe.gate = self._weight(tensors, p + "ffn_gate_exps.weight", D, F, E)
            Ly.moe.up = self._weight(tensors, p + "ffn_up_exps.weight", D, F, E)
            Ly.moe.down = self._weight(tensors, p + "ffn_down_exps.weight", F, D, E)
            a2 = floats(p + "ffn_gate_exps.bias", (E, F), True); Ly.moe.gate_b = &a2[0, 0]
            a2 = floats(p + "ffn_up_exps.bias", (E, F), True); Ly.moe.up_b = &a2[0, 0]
            a2 = floats(p + "ffn_down_exps.bias", (E, D), True); Ly.moe.down_b = &a2[0, 0]
            Ly.moe.n_expert = E
            Ly.moe.n_used = K
            Ly.moe.n_embd = D
            Ly.moe.n_ff = F
            Ly.sliding = 1 if hp.swa_layers[l] else 0

        yarn = hp.rope_scaling == "yarn"
        self.omega, mscale = rope_freqs(hd, float(hp.rope_base), yarn, float(hp.rope_factor),
                                        float(hp.rope_orig_ctx), float(hp.yarn_beta_fast),
                                        float(hp.yarn_beta_slow), yarn_truncate)
        self.omega_swa, _ = rope_freqs(hd, float(hp.rope_base_swa or hp.rope_base), yarn,
                                       float(hp.rope_factor), float(hp.rope_orig_ctx),
                                       float(hp.yarn_beta_fast), float(hp.yarn_beta_slow), yarn_truncate)
        self.m.omega = <const double *> cnp.PyArray_DATA(self.omega)
        self.m.omega_swa = <const double *> cnp.PyArray_DATA(self.omega_swa)
        self.m.rope_mscale = mscale
        self.m.n_layer, self.m.n_head, self.m.n_head_kv, self.m.head_dim = L, H, Hkv, hd
        self.m.n_embd, self.m.n_vocab = D, self.n_vocab
        self.m.window = int(hp.sliding_window) if any(hp.swa_layers) else 0
        if any(hp.swa_layers) and self.m.window <= 0:
            raise ValueError("sliding layers need a positive sliding_window")
        self.m.eps = float(hp.rms_eps)
        self.m.layers = self.c_layers
        self.counts = np.zeros((L, E), dtype=np.int64)

    cdef pe_weight _weight(self, dict tensors, str name, int64_t n_in, int64_t n_out,
                           int64_t n_expert=0) except *:
        if name not in tensors:
            raise ValueError(f"missing tensor {name}")
        t = tensors[name]
        data, ty, t_in, t_out, t_exp = _tensor_weight_args(t, 3 if n_expert else 2)
        if (t_in, t_out) != (n_in, n_out) or (n_expert and t_exp != n_expert):
            want = [n_in, n_out] + ([n_expert] if n_expert else [])
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {tuple(want)}")
        self.keep.append(data)
        cdef pe_weight w = _weight(data, ty, n_in, n_out, max(n_expert, 1), name, self.int8_activations)
        cdef pe_weight r
        if name not in self.repacked:
            return w
        self.keep.append(self.repacked[name])
        r = _r16_weight(self.repacked[name], ty, n_in, n_out, max(n_expert, 1), name)
        if not n_expert:  # a plain matrix keeps its file rows too: one-token products may read them (matmul.h)
            r.rows = w.data
            r.rows_stride = w.row_stride
        return r

    def __dealloc__(self):
        free(self.c_layers)

    @property
    def window(self) -> int:
        return self.m.window

    def _c_model(self) -> int:
        """Address of the C pe_model (for pyengine._cuda, which uploads its weights and runs the CPU
        part of split models; valid while this object lives)."""
        return <uintptr_t> &self.m

    def kv_bytes_per_token(self, int64_t n_batch=512, type_k=DEFAULT_KV_CACHE_TYPE,
                           type_v=DEFAULT_KV_CACHE_TYPE) -> tuple:
        """(bytes per context position of the full layers, fixed bytes of the sliding rings) of a
        cache with these K and V element types."""
        kv_dim, hd = self.m.n_head_kv * self.m.head_dim, self.m.head_dim
        row = kv_row_bytes(type_k, kv_dim, hd) + kv_row_bytes(type_v, kv_dim, hd)
        n_swa = sum(1 for l in range(self.m.n_layer) if self.c_layers[l].sliding)
        return row * (self.m.n_layer - n_swa), row * n_swa * (self.m.window + n_batch)

    @property
    def cache_layout(self) -> tuple:
        """What a KV cache must match to be used with this model: (n_layer, K/V row length,
        window, sliding flag per layer)."""
        return (self.m.n_layer, self.m.n_head_kv * self.m.head_dim, self.m.window,
                tuple(bool(self.c_layers[l].sliding) for l in range(self.m.n_layer)))

    @property
    def expert_counts(self):
        """int64 (n_layer, n_expert): how often each expert was routed a token by this model's
        forward calls so far (a copy)."""
        return self.counts.copy()

    cdef cnp.ndarray _check_seq(self, object cache, tokens, int64_t n_past):
        """The int32 tokens of one sequence after checking them and its cache."""
        if not isinstance(cache, KVCache) or cache.layout != self.cache_layout:
            raise ValueError("cache belongs to another model")
        return sequence_tokens(tokens, n_past, cache, self.n_vocab, self.m.window)

    def forward(self, KVCache cache, tokens, int64_t n_past, bint logits_all, int n_threads):
        """Logits of `tokens` appended at positions n_past.. (their K/V go into the cache)."""
        cdef cnp.ndarray[cnp.int32_t, ndim=1] tok = self._check_seq(cache, tokens, n_past)
        cdef int64_t n = tok.shape[0]
        if n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        cdef cnp.ndarray[cnp.float32_t, ndim=2] out = np.empty((n if logits_all else 1, self.n_vocab),
                                                                 dtype=np.float32)
        cdef cnp.ndarray[cnp.int64_t, ndim=2] counts = self.counts
        cdef int rc
        with nogil:
            rc = pe_gptoss_forward(&self.m, cache.layers, &tok[0], n, n_past, &out[0, 0],
                                   logits_all, n_threads, &counts[0, 0])
        if rc:
            raise MemoryError("out of memory for the forward pass scratch buffers")
        return out if logits_all else out[0]

    def forward_seqs(self, caches, tokens, n_pasts, bint logits_all, int n_threads):
        """One forward pass over several sequences: tokens[s] appended at positions n_pasts[s]..
        of caches[s] (each a distinct cache of this model). Returns float32 logits
        (sum of lengths, n_vocab) when logits_all, else (len(caches), n_vocab) of each
        sequence's last token."""
        caches, tokens, n_pasts = list(caches), list(tokens), [int(p) for p in n_pasts]
        if not caches or len(tokens) != len(caches) or len(n_pasts) != len(caches):
            raise ValueError("caches, tokens and n_pasts must be non-empty and of equal length")
        if len({id(x) for x in caches}) != len(caches):
            raise ValueError("a cache appears twice: each sequence needs its own")
        if n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        checked = [self._check_seq(x, t, p) for x, t, p in zip(caches, tokens, n_pasts)]
        cdef int64_t n_seq = len(caches), s
        cdef cnp.ndarray[cnp.int32_t, ndim=1] tok = np.concatenate(checked)
        cdef int64_t n = tok.shape[0]
        cdef cnp.ndarray[cnp.float32_t, ndim=2] out = np.empty((n if logits_all else n_seq, self.n_vocab),
                                                                 dtype=np.float32)
        cdef cnp.ndarray[cnp.int64_t, ndim=2] counts = self.counts
        cdef pe_seq *seqs = <pe_seq *> malloc(n_seq * sizeof(pe_seq))
        if seqs == NULL:
            raise MemoryError()
        cdef KVCache c
        for s in range(n_seq):
            c = caches[s]
            seqs[s].kv = c.layers
            seqs[s].n_tok = checked[s].shape[0]
            seqs[s].n_past = n_pasts[s]
        cdef int rc
        with nogil:
            rc = pe_gptoss_forward_seqs(&self.m, seqs, n_seq, &tok[0], &out[0, 0], logits_all, n_threads,
                                        &counts[0, 0])
        free(seqs)
        if rc:
            raise MemoryError("out of memory for the forward pass scratch buffers")
        return out


# ---- kernels, for tests --------------------------------------------------------------------------

def _f32(a, ndim):
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != ndim:
        raise ValueError(f"expected a {ndim}-D array")
    return a


def rmsnorm(x, g, float eps):
    """RMSNorm of each row of x (n, d) with gain g (d,)."""
    cdef cnp.ndarray[cnp.float32_t, ndim=2] xa = _f32(x, 2)
    cdef cnp.ndarray[cnp.float32_t, ndim=1] ga = _f32(g, 1)
    if ga.shape[0] != xa.shape[1] or xa.shape[1] == 0:
        raise ValueError("gain length must equal the row length")
    cdef cnp.ndarray[cnp.float32_t, ndim=2] out = np.empty_like(xa)
    cdef int64_t i
    for i in range(xa.shape[0]):
        pe_rmsnorm(&out[i, 0], &xa[i, 0], &ga[0], xa.shape[1], eps)
    return out


def rope_freqs(int head_dim, double base, bint yarn, double factor, double orig_ctx,
               double beta_fast, double beta_slow, bint truncate=False):
    """(omega float64 (head_dim/2,), magnitude factor M) of RoPE with optional YaRN; truncate rounds
    the YaRN correction range outwards to whole dimensions as llama.cpp does."""
    if head_dim <= 0 or head_dim % 2 or base <= 1 or (yarn and (factor <= 0 or orig_ctx <= 0
                                                                 or beta_fast <= 0 or beta_slow <= 0)):
        raise ValueError("invalid RoPE parameters")
    cdef cnp.ndarray[cnp.float64_t, ndim=1] omega = np.empty(head_dim // 2, dtype=np.float64)
    m = pe_rope_yarn_freqs(&omega[0], head_dim, base, yarn, factor, orig_ctx, beta_fast, beta_slow,
                           truncate)
    return omega, m


def rope(x, positions, omega, double mscale):
    """NeoX RoPE of x (n_tok, n_heads, head_dim) at the given positions."""
    cdef cnp.ndarray[cnp.float32_t, ndim=3] xa = _f32(x, 3).copy()
    cdef cnp.ndarray[cnp.int64_t, ndim=1] pos = np.ascontiguousarray(positions, dtype=np.int64)
    cdef cnp.ndarray[cnp.float64_t, ndim=1] om = np.ascontiguousarray(omega, dtype=np.float64)
    cdef int hd = xa.shape[2]
    if pos.shape[0] != xa.shape[0] or om.shape[0] * 2 != hd or hd == 0:
        raise ValueError("shape mismatch")
    cdef cnp.ndarray[cnp.float32_t, ndim=1] c = np.empty(hd // 2, dtype=np.float32)
    cdef cnp.ndarray[cnp.float32_t, ndim=1] s = np.empty(hd // 2, dtype=np.float32)
    cdef int64_t t
    for t in range(xa.shape[0]):
        pe_rope_table(&c[0], &s[0], &om[0], hd // 2, pos[t], mscale)
        pe_rope_apply(&xa[t, 0, 0], xa.shape[1], hd, &c[0], &s[0])
    return xa


def swiglu_oai(g, u, int n_threads=1):
    """SwiGLU-OAI of equal-length vectors."""
    cdef cnp.ndarray[cnp.float32_t, ndim=1] ga = _f32(g, 1)
    cdef cnp.ndarray[cnp.float32_t, ndim=1] ua = _f32(u, 1)
    if ga.shape[0] != ua.shape[0] or ga.shape[0] == 0:
        raise ValueError("shape mismatch")
    cdef cnp.ndarray[cnp.float32_t, ndim=1] out = np.empty_like(ga)
    if n_threads < 1:
        raise ValueError("n_threads must be >= 1")
    with nogil:
        pe_swiglu_oai(&out[0], &ga[0], &ua[0], ga.shape[0], n_threads)
    return out


def topk(x, int k):
    """Indices of the k largest entries of x, largest first."""
    cdef cnp.ndarray[cnp.float32_t, ndim=1] xa = _f32(x, 1)
    if not 0 < k <= xa.shape[0]:
        raise ValueError("need 0 < k <= len(x)")
    cdef cnp.ndarray[int, ndim=1] idx = np.empty(k, dtype=np.intc)
    pe_topk(&xa[0], xa.shape[0], k, &idx[0])
    return idx


def matmul(data, int ggml_type, int64_t n_in, x, bias=None, int64_t expert=0, int n_threads=1,
           bint int8_activations=False, r16_shape=None):
    """y (n_tok, n_out) = x (n_tok, n_in) @ W.T + bias, W = uint8 rows (n_out, row_bytes) or experts
    (n_expert, n_out, row_bytes) of the given type, any row/expert stride; int8_activations as in
    pe_matmul (matmul.h). r16_shape=(n_out, n_expert): `data` is instead a weight's R16 form
    (r16_repack; types in R16_TYPES) and int8_activations is implied."""
    cdef cnp.ndarray[cnp.float32_t, ndim=2] xa = _f32(x, 2)
    cdef pe_weight w
    if r16_shape is not None:
        n_exp = int(r16_shape[1])
        w = _r16_weight(data, ggml_type, n_in, int(r16_shape[0]), n_exp, "matmul")
    else:
        n_exp = data.shape[0] if data.ndim == 3 else 1
        w = _weight(data, ggml_type, n_in, data.shape[data.ndim - 2] if data.ndim >= 2 else 0,
                    n_exp, "matmul", int8_activations)
    if xa.shape[1] != n_in or xa.shape[0] == 0 or not 0 <= expert < n_exp or n_threads < 1:
        raise ValueError("shape mismatch")
    cdef cnp.ndarray[cnp.float32_t, ndim=1] b
    cdef const float *bp = NULL
    if bias is not None:
        b = _f32(bias, 1)
        if b.shape[0] != w.n_out:
            raise ValueError("bias length must equal n_out")
        bp = &b[0]
    cdef cnp.ndarray[cnp.float32_t, ndim=2] y = np.empty((xa.shape[0], w.n_out), dtype=np.float32)
    cdef int rc
    with nogil:
        rc = pe_matmul(&w, expert, &xa[0, 0], n_in, xa.shape[0], bp, &y[0, 0], w.n_out, n_threads)
    if rc:
        raise MemoryError()
    return y


def attention(q, k, v, sinks, int64_t pos0, int64_t window, int64_t n_slots, int n_threads=1,
              type_k="f32", type_v="f32"):
    """Attention of q (n_tok, n_head, hd) at positions pos0.. over keys/values k, v (pos0 + n_tok,
    n_head_kv, hd) of positions 0.., stored first in a ring of n_slots rows of the cache types
    type_k / type_v."""
    cdef cnp.ndarray[cnp.float32_t, ndim=3] qa = _f32(q, 3)
    cdef cnp.ndarray[cnp.float32_t, ndim=3] ka = _f32(k, 3)
    cdef cnp.ndarray[cnp.float32_t, ndim=3] va = _f32(v, 3)
    cdef cnp.ndarray[cnp.float32_t, ndim=1] sa = _f32(sinks, 1)
    cdef int64_t n_tok = qa.shape[0], n_pos = ka.shape[0]
    cdef int H = qa.shape[1], hd = qa.shape[2], Hkv = ka.shape[1]
    if (n_tok == 0 or n_pos != pos0 + n_tok or va.shape[0] != n_pos or ka.shape[2] != hd
            or va.shape[1] != Hkv or va.shape[2] != hd or Hkv == 0 or H % Hkv or sa.shape[0] != H
            or n_threads < 1 or window < 0 or pos0 < 0):
        raise ValueError("shape mismatch")
    need = min(n_pos, window - 1 + n_tok) if window else n_pos
    if n_slots < need:
        raise ValueError(f"a ring of {n_slots} rows cannot hold the {need} positions this needs")
    type_k, type_v = kv_cache_type(type_k, "type_k"), kv_cache_type(type_v, "type_v")
    cdef cnp.ndarray[cnp.uint8_t, ndim=2] kc = np.zeros((n_slots, kv_row_bytes(type_k, Hkv * hd, hd)), np.uint8)
    cdef cnp.ndarray[cnp.uint8_t, ndim=2] vc = np.zeros((n_slots, kv_row_bytes(type_v, Hkv * hd, hd)), np.uint8)
    cdef pe_kv_layer kv
    kv.k = &kc[0, 0]
    kv.v = &vc[0, 0]
    kv.n_slots = n_slots
    kv.type_k, kv.type_v = KV_CACHE_TYPES[type_k], KV_CACHE_TYPES[type_v]
    pe_kv_store(&kv, &ka[0, 0, 0], &va[0, 0, 0], n_pos, 0, Hkv * hd, hd)
    cdef cnp.ndarray[cnp.float32_t, ndim=3] out = np.empty_like(qa)
    cdef int rc
    with nogil:
        rc = pe_attention(&out[0, 0, 0], &qa[0, 0, 0], n_tok, pos0, &kv, H, Hkv, hd, window, &sa[0],
                          n_threads)
    if rc:
        raise MemoryError()
    return out


def moe(x, router_w, router_b, gate_w, gate_b, up_w, up_b, down_w, down_b, int k, int n_threads=1,
        bint return_counts=False):
    """MoE block of x (n_tok, d) with float32 weights: router (E, d), gate/up (E, F, d), down (E, d, F),
    biases (E,), (E, F), (E, F), (E, d). return_counts: also the int64 (E,) selections per expert."""
    cdef cnp.ndarray[cnp.float32_t, ndim=2] xa = _f32(x, 2)
    arrays = [_f32(router_w, 2), _f32(router_b, 1), _f32(gate_w, 3), _f32(gate_b, 2), _f32(up_w, 3),
              _f32(up_b, 2), _f32(down_w, 3), _f32(down_b, 2)]
    rw, rb, gw, gb, uw, ub, dw, db = arrays
    E, D, F = rw.shape[0], xa.shape[1], gw.shape[1]
    if (xa.shape[0] == 0 or rw.shape[1] != D or rb.shape != (E,) or gw.shape != (E, F, D)
            or uw.shape != (E, F, D) or dw.shape != (E, D, F) or gb.shape != (E, F)
            or ub.shape != (E, F) or db.shape != (E, D) or not 0 < k <= E or n_threads < 1):
        raise ValueError("shape mismatch")
    cdef pe_moe m
    cdef cnp.ndarray[cnp.int64_t, ndim=1] counts = np.zeros(E, dtype=np.int64)
    m.router = _weight(rw.view(np.uint8), 0, D, E, 1, "router")
    m.gate = _weight(gw.view(np.uint8), 0, D, F, E, "gate")
    m.up = _weight(uw.view(np.uint8), 0, D, F, E, "up")
    m.down = _weight(dw.view(np.uint8), 0, F, D, E, "down")
    m.router_b = <const float *> cnp.PyArray_DATA(rb)
    m.gate_b = <const float *> cnp.PyArray_DATA(gb)
    m.up_b = <const float *> cnp.PyArray_DATA(ub)
    m.down_b = <const float *> cnp.PyArray_DATA(db)
    m.n_expert, m.n_used, m.n_embd, m.n_ff = E, k, D, F
    cdef cnp.ndarray[cnp.float32_t, ndim=2] y = np.empty_like(xa)
    cdef int rc
    with nogil:
        rc = pe_moe_forward(&m, &xa[0, 0], xa.shape[0], &y[0, 0], n_threads, &counts[0])
    if rc:
        raise MemoryError()
    return (y, counts) if return_counts else y


def arena_system_allocs() -> int:
    """Blocks the calling thread's scratch arena (csrc/arena.h) has taken from the C library so far:
    a forward pass reuses one layer's blocks for the next, and a second pass of the same size takes
    none."""
    cdef pe_arena *a = pe_arena_get()
    if a == NULL:
        raise MemoryError()
    return pe_arena_system_allocs(a)


def profile_enable(bint on):
    """Per-operation timing of the CPU forward pass on or off (csrc/profile.h); the counters are kept,
    so this pauses and resumes."""
    pe_profile_enable(on)


def profile_reset():
    """Zero the per-operation counters."""
    pe_profile_reset()


def profile_read() -> dict:
    """op name -> (nanoseconds, calls, weight bytes read) since profiling was turned on; "forward"
    is the whole pass, the others its parts."""
    cdef int64_t ns[PE_OP_COUNT]
    cdef int64_t calls[PE_OP_COUNT]
    cdef int64_t nbytes[PE_OP_COUNT]
    pe_profile_read(ns, calls, nbytes)
    return {pe_profile_op_name(i).decode(): (ns[i], calls[i], nbytes[i]) for i in range(PE_OP_COUNT)}
