# The gpt-oss model on the GPU (csrc/cuda/gptoss_cuda.cu): uploads the CPU model's weight views once,
# owns the device KV caches, and runs forward calls with the same contract as pyengine._model.Model.

from libc.stdlib cimport malloc, free
from libc.string cimport memset
from cpython.list cimport PyList_GET_ITEM
from cpython.ref cimport PyObject, _Py_REFCNT

from pyengine._model import (DEFAULT_KV_CACHE_TYPE, KV_CACHE_TYPES, KVCache, kv_cache_type, kv_row_bytes,
                             sequence_tokens)
from pyengine.log import logger

cdef extern from "quants.h":
    size_t pe_row_size(int type, int64_t n)

from _core cimport pe_kv_layer, pe_layer, pe_model, pe_weight

cdef extern from "gptoss_cuda.h":
    ctypedef struct gm_weight "pe_cu_weight":
        const uint8_t *data
        int type
        int64_t n_in, n_out, row_stride, expert_stride
    ctypedef struct pe_cu_layer:
        int on_gpu, cpu_moe, sliding
        const float *attn_norm
        const float *post_norm
        int qkv_fused
        gm_weight wqkv
        const float *bqkv
        gm_weight wq, wk, wv, wo
        const float *bq
        const float *bk
        const float *bv
        const float *bo
        const float *sinks
        gm_weight router
        const float *router_b
        int gate_up_fused
        gm_weight gate_up
        const float *gate_up_b
        gm_weight gate, up, down
        const float *gate_b
        const float *up_b
        const float *down_b
        pe_cu_wq8 wqkv_q8, wo_q8, gate_up_q8, down_q8
    ctypedef struct pe_cu_model:
        int n_layer, n_head, n_head_kv, head_dim, n_expert, n_used
        int64_t n_embd, n_ff, n_vocab, window
        float eps
        const double *omega
        const double *omega_swa
        double rope_mscale
        gm_weight output
        pe_cu_wq8 output_q8
        const float *out_norm
        const pe_cu_layer *layers
        int first_gpu_layer
        const pe_model *cpu
        int int8_act
    ctypedef struct pe_cu_kv_layer:
        void *k
        void *v
        int64_t n_slots
        int type_k, type_v
    ctypedef struct pe_cu_seq:
        pe_cu_kv_layer *kv
        pe_kv_layer *cpu_kv
        int64_t n_tok, n_past
    ctypedef struct pe_cu_ctx:
        pass
    pe_cu_ctx *pe_cu_ctx_create(const pe_cu_model *m, int64_t max_tok, int use_graphs, int *err)
    void pe_cu_ctx_free(pe_cu_ctx *c)
    int64_t pe_cu_ctx_bytes(const pe_cu_ctx *c)
    int pe_cu_ctx_graphs(const pe_cu_ctx *c)
    int pe_cu_ctx_graph_failures(const pe_cu_ctx *c, int *last_error)
    void pe_cu_ctx_profile(pe_cu_ctx *c, int enable)
    int pe_cu_ctx_profile_read(const pe_cu_ctx *c, int op, const char **name, double *ms, int64_t *calls)
    int pe_cu_forward(const pe_cu_model *m, pe_cu_ctx *c, const pe_cu_seq *seqs, int64_t n_seq,
                      const int32_t *tokens, float *logits, int32_t *argmax, int logits_all, int n_threads,
                      int64_t *expert_counts) nogil

# Results of at most this many logits rows (decode calls) land in pinned host memory; a pool of at most
# _PINNED_BUFFERS such buffers per model is kept (a buffer is reused once no array of it is alive).
_PINNED_ROWS = 8
_PINNED_BUFFERS = 4


cdef int64_t _q8_bytes(const gm_weight *d, const pe_weight *host, int64_t n_expert):
    """Bytes of the re-laid copy of d, 0 where the CPU weight keeps float activations or the type has
    no int8 kernel."""
    if not host.int8_act or not pe_cu_wq8_supported(d.type, d.n_in):
        return 0
    return (pe_cu_wq8_code_bytes(d.type, d.n_in, d.n_out, n_expert)
            + pe_cu_wq8_scale_bytes(d.type, d.n_in, d.n_out, n_expert))


cdef class CudaModel:
    """A CPU Model's weights on the device. Layers [first_gpu_layer, n_layer) and the output head run
    on the GPU; the token embedding and any earlier layers on the CPU (n_gpu_layers). cpu_moe: the
    GPU layers' experts stay in host memory and the CPU runs them. fuse: stack q|k|v and each expert's
    gate|up rows into one matrix where the types match (one product each; False keeps them apart,
    which files with mixed types get anyway). When the CPU model uses int8 activations (not exact),
    Q8_0 and MXFP4 weights also get a re-laid copy for the int8 decode kernels (matvec_q8_cuda.h:
    q|k|v, attention output, fused gate|up, down, output head). Same forward/forward_seqs contract
    as pyengine._model.Model. Those copies go experts first, then attention, then the head, each while
    it leaves a quarter of the device memory free (int8_budget >= 0: at most that many bytes instead);
    what does not fit keeps the float kernels (int8_bytes says how much was re-laid)."""
    cdef pe_cu_model m
    cdef pe_cu_layer *layers
    cdef pe_cu_ctx *ctx
    cdef readonly object cpu          # the CPU Model (owns the host weights the CPU part reads)
    cdef object bufs                  # every DevBuf a device pointer points into
    cdef object counts
    cdef readonly int64_t weight_bytes, int8_bytes
    cdef readonly int first_gpu_layer
    cdef readonly bint cpu_moe, graphs
    cdef readonly int device          # the CUDA device the weights live on
    cdef int64_t max_tok
    cdef int graph_failures_logged
    cdef list pinned                  # PinnedBuf pool for decode logits (_logits_out)
    cdef public int64_t n_vocab

    def __cinit__(self):
        self.layers = NULL
        self.ctx = NULL

    def __init__(self, cpu, hp, int n_gpu_layers=-1, bint cpu_moe=False, int64_t max_tok=512,
                 bint graphs=True, int device=0, bint fuse=True, int64_t int8_budget=-1):
        cdef const pe_model *cm = <const pe_model *> <uintptr_t> cpu._c_model()
        cdef int L = cm.n_layer, l
        if n_gpu_layers < 0 or n_gpu_layers > L:
            n_gpu_layers = L
        if n_gpu_layers == 0:
            raise ValueError("n_gpu_layers=0 puts no layer on the GPU: use the CPU engine")
        if max_tok < 1:
            raise ValueError("max_tok must be positive")
        self.device = device
        _check(pe_cu_set_device(device))
        self.cpu = cpu
        self.bufs = []
        self.pinned = []
        self.weight_bytes = 0
        self.cpu_moe = cpu_moe
        self.graphs = graphs
        self.n_vocab = cm.n_vocab
        self.first_gpu_layer = L - n_gpu_layers
        memset(&self.m, 0, sizeof(self.m))
        self.m.n_layer, self.m.n_head, self.m.n_head_kv, self.m.head_dim = L, cm.n_head, cm.n_head_kv, cm.head_dim
        self.m.n_expert, self.m.n_used = cm.layers[0].moe.n_expert, cm.layers[0].moe.n_used
        self.m.n_embd, self.m.n_ff, self.m.n_vocab = cm.n_embd, cm.layers[0].moe.n_ff, cm.n_vocab
        self.m.window, self.m.eps, self.m.rope_mscale = cm.window, cm.eps, cm.rope_mscale
        self.m.first_gpu_layer = self.first_gpu_layer
        self.m.cpu = cm
        self.m.int8_act = 1 if cpu.int8_activations else 0  # exact=False: int8 prefill products (as the CPU)
        half = cm.head_dim // 2
        self.m.omega = <const double *> self._floats(cm.omega, half * 8)
        self.m.omega_swa = <const double *> self._floats(cm.omega_swa, half * 8)
        self.m.output = self._weight(&cm.output, 1)
        self.m.out_norm = <const float *> self._floats(cm.out_norm, cm.n_embd * 4)
        self.layers = <pe_cu_layer *> malloc(L * sizeof(pe_cu_layer))
        if self.layers == NULL:
            raise MemoryError()
        memset(self.layers, 0, L * sizeof(pe_cu_layer))
        self.m.layers = self.layers
        cdef const pe_layer *c
        cdef pe_cu_layer *g
        cdef int64_t D = cm.n_embd, q_dim = cm.n_head * cm.head_dim, kv_dim = cm.n_head_kv * cm.head_dim
        cdef int64_t E = self.m.n_expert, F = self.m.n_ff
        for l in range(self.first_gpu_layer, L):
            c = &cm.layers[l]
            g = &self.layers[l]
            g.on_gpu, g.cpu_moe, g.sliding = 1, cpu_moe, c.sliding
            g.attn_norm = <const float *> self._floats(c.attn_norm, D * 4)
            g.post_norm = <const float *> self._floats(c.post_norm, D * 4)
            if fuse and c.wq.type == c.wk.type == c.wv.type:
                # one product for q, k and v: their rows stacked in one buffer, biases likewise
                g.qkv_fused = 1
                g.wqkv = self._stacked(&c.wq, &c.wk, &c.wv)
                bqkv = np.concatenate([np.asarray(<const float[:q_dim]> c.bq), np.asarray(<const float[:kv_dim]> c.bk),
                                       np.asarray(<const float[:kv_dim]> c.bv)])
                g.bqkv = <const float *> self._floats(cnp.PyArray_DATA(bqkv), bqkv.nbytes)
            else:
                g.wq, g.wk, g.wv = self._weight(&c.wq, 1), self._weight(&c.wk, 1), self._weight(&c.wv, 1)
                g.bq = <const float *> self._floats(c.bq, q_dim * 4)
                g.bk = <const float *> self._floats(c.bk, kv_dim * 4)
                g.bv = <const float *> self._floats(c.bv, kv_dim * 4)
            g.wo = self._weight(&c.wo, 1)
            g.bo = <const float *> self._floats(c.bo, D * 4)
            g.sinks = <const float *> self._floats(c.sinks, cm.n_head * 4)
            if not cpu_moe:
                g.router = self._weight(&c.moe.router, 1)
                g.router_b = <const float *> self._floats(c.moe.router_b, E * 4)
                if fuse and c.moe.gate.type == c.moe.up.type:
                    # one product per expert for gate and up: each expert's gate rows, then its up rows
                    g.gate_up_fused = 1
                    g.gate_up = self._experts_stacked(&c.moe.gate, &c.moe.up, E)
                    gate_up_b = np.concatenate([np.asarray(<const float[:E, :F]> c.moe.gate_b),
                                                np.asarray(<const float[:E, :F]> c.moe.up_b)], axis=1)
                    g.gate_up_b = <const float *> self._floats(cnp.PyArray_DATA(gate_up_b), gate_up_b.nbytes)
                else:
                    g.gate, g.up = self._weight(&c.moe.gate, E), self._weight(&c.moe.up, E)
                    g.gate_b = <const float *> self._floats(c.moe.gate_b, E * F * 4)
                    g.up_b = <const float *> self._floats(c.moe.up_b, E * F * 4)
                g.down = self._weight(&c.moe.down, E)
                g.down_b = <const float *> self._floats(c.moe.down_b, E * D * 4)
        self.int8_bytes = self._relay_for_int8(cm, int8_budget)
        self.counts = np.zeros((L, E), dtype=np.int64)
        self._make_ctx(max_tok)

    cdef void *_floats(self, const void *host, int64_t nbytes) except NULL:
        cdef DevBuf b = DevBuf(nbytes)
        _check(pe_cu_copy_to_device(b.p, host, nbytes))
        self.bufs.append(b)
        self.weight_bytes += nbytes
        return b.p

    cdef int64_t _relay_for_int8(self, const pe_model *cm, int64_t budget) except -1:
        """The re-laid copies for the int8 decode kernels within the budget (see the class doc);
        returns their bytes."""
        if budget < 0:
            free, total = mem_info()
            budget = free - total // 4
        cdef int64_t used = 0, skipped = 0, a, b, E = self.m.n_expert
        cdef int l
        cdef pe_cu_layer *g
        cdef const pe_layer *c
        for l in range(self.first_gpu_layer, self.m.n_layer):  # experts: most of a token's bytes
            g, c = &self.layers[l], &cm.layers[l]
            if not g.gate_up_fused or g.cpu_moe:
                continue
            a, b = _q8_bytes(&g.gate_up, &c.moe.gate, E), _q8_bytes(&g.down, &c.moe.down, E)
            if a and b and used + a + b <= budget:
                g.gate_up_q8, g.down_q8 = self._q8(&g.gate_up, E), self._q8(&g.down, E)
                used += a + b
            elif a and b:
                skipped += a + b
        for l in range(self.first_gpu_layer, self.m.n_layer):  # attention
            g, c = &self.layers[l], &cm.layers[l]
            a = _q8_bytes(&g.wqkv, &c.wq, 1) if g.qkv_fused else 0
            if a and used + a <= budget:
                g.wqkv_q8 = self._q8(&g.wqkv, 1)
                used += a
            else:
                skipped += a
            b = _q8_bytes(&g.wo, &c.wo, 1)
            if b and used + b <= budget:
                g.wo_q8 = self._q8(&g.wo, 1)
                used += b
            else:
                skipped += b
        a = _q8_bytes(&self.m.output, &cm.output, 1)
        if a and used + a <= budget:
            self.m.output_q8 = self._q8(&self.m.output, 1)
            used += a
        else:
            skipped += a
        if skipped:
            logger.info("int8 decode kernels: %.2f GB of weights re-laid, %.2f GB left on the float kernels "
                        "(device memory)", used / 1e9, skipped / 1e9)
        return used

    cdef pe_cu_wq8 _q8(self, const gm_weight *d, int64_t n_expert) except *:
        """The re-laid copy of device weight d for the int8 decode kernels."""
        cdef WQ8 q = _wq8_from(<const pe_cu_weight *> d, n_expert)
        self.bufs.append(q)
        self.weight_bytes += q.qs.nbytes + q.sc.nbytes
        return q.w

    cdef gm_weight _weight(self, const pe_weight *w, int64_t n_expert) except *:
        """A packed device copy of a (possibly strided, expert-stacked) host weight view."""
        cdef gm_weight d
        cdef int64_t rb = pe_row_size(w.type, w.n_in), e
        cdef DevBuf b = DevBuf(rb * w.n_out * n_expert)
        for e in range(n_expert):
            _check(pe_cu_copy_2d_to_device(<uint8_t *> b.p + e * rb * w.n_out, rb,
                                           w.data + e * w.expert_stride, w.row_stride, rb, w.n_out))
        self.bufs.append(b)
        self.weight_bytes += b.nbytes
        d.data = <const uint8_t *> b.p
        d.type = w.type
        d.n_in, d.n_out = w.n_in, w.n_out
        d.row_stride = rb
        d.expert_stride = rb * w.n_out if n_expert > 1 else 0
        return d

    cdef gm_weight _stacked(self, const pe_weight *a, const pe_weight *b, const pe_weight *c) except *:
        """One packed device matrix holding the rows of a, then b, then c (same type and row length)."""
        cdef gm_weight d
        cdef int64_t rb = pe_row_size(a.type, a.n_in), row = 0
        cdef const pe_weight *parts[3]
        parts[0], parts[1], parts[2] = a, b, c
        cdef DevBuf buf = DevBuf(rb * (a.n_out + b.n_out + c.n_out))
        for i in range(3):
            _check(pe_cu_copy_2d_to_device(<uint8_t *> buf.p + row * rb, rb, parts[i].data, parts[i].row_stride, rb,
                                           parts[i].n_out))
            row += parts[i].n_out
        self.bufs.append(buf)
        self.weight_bytes += buf.nbytes
        d.data = <const uint8_t *> buf.p
        d.type = a.type
        d.n_in, d.n_out = a.n_in, row
        d.row_stride = rb
        d.expert_stride = 0
        return d

    cdef gm_weight _experts_stacked(self, const pe_weight *a, const pe_weight *b, int64_t n_expert) except *:
        """Expert-stacked device matrices holding, per expert, the rows of a then the rows of b."""
        cdef gm_weight d
        cdef int64_t rb = pe_row_size(a.type, a.n_in), per = a.n_out + b.n_out, e
        cdef DevBuf buf = DevBuf(rb * per * n_expert)
        for e in range(n_expert):
            _check(pe_cu_copy_2d_to_device(<uint8_t *> buf.p + e * per * rb, rb, a.data + e * a.expert_stride,
                                           a.row_stride, rb, a.n_out))
            _check(pe_cu_copy_2d_to_device(<uint8_t *> buf.p + (e * per + a.n_out) * rb, rb,
                                           b.data + e * b.expert_stride, b.row_stride, rb, b.n_out))
        self.bufs.append(buf)
        self.weight_bytes += buf.nbytes
        d.data = <const uint8_t *> buf.p
        d.type = a.type
        d.n_in, d.n_out = a.n_in, per
        d.row_stride = rb
        d.expert_stride = rb * per
        return d

    cdef _make_ctx(self, int64_t max_tok):
        cdef int err = 0
        if self.ctx != NULL:
            pe_cu_ctx_free(self.ctx)
            self.ctx = NULL
        self.ctx = pe_cu_ctx_create(&self.m, max_tok, self.graphs, &err)
        if self.ctx == NULL:
            _check(err if err else 2)
        self.max_tok = max_tok
        self.graph_failures_logged = 0

    def __dealloc__(self):
        if self.ctx != NULL:
            pe_cu_ctx_free(self.ctx)
        free(self.layers)

    @property
    def window(self) -> int:
        return self.m.window

    @property
    def device_argmax(self) -> bool:
        """forward_seqs can pick greedy tokens on the device (its `greedy` argument)."""
        return True

    @property
    def graphs_active(self) -> bool:
        """Whether single-token decode steps replay a CUDA graph (the emulator records and replays
        them too); False when turned off, or after 3 refused captures made the model fall back to
        direct launches for good."""
        return bool(pe_cu_ctx_graphs(self.ctx))

    @property
    def scratch_bytes(self) -> int:
        """Device bytes of the activations and scratch buffers."""
        return pe_cu_ctx_bytes(self.ctx)

    def profile(self, bint enable) -> None:
        """Time every operation of the following forward calls with CUDA events (each synchronises;
        CUDA graphs are off meanwhile). Enabling or disabling clears the totals."""
        pe_cu_ctx_profile(self.ctx, enable)

    def profile_results(self) -> dict:
        """{operation: (milliseconds, calls)} since profiling was enabled."""
        cdef const char *name
        cdef double ms
        cdef int64_t calls
        cdef int op = 0
        out = {}
        while pe_cu_ctx_profile_read(self.ctx, op, &name, &ms, &calls) == 0:
            out[name.decode()] = (ms, calls)
            op += 1
        return out

    def kv_bytes_per_token(self, int64_t n_batch=512, type_k=DEFAULT_KV_CACHE_TYPE,
                           type_v=DEFAULT_KV_CACHE_TYPE) -> tuple:
        return self.cpu.kv_bytes_per_token(n_batch, type_k, type_v)

    @property
    def cache_layout(self) -> tuple:
        return self.cpu.cache_layout

    @property
    def expert_counts(self):
        """int64 (n_layer, n_expert): expert selections of this model's forward calls so far."""
        return self.counts.copy()

    def _sequence(self, cache, tokens, int64_t n_past):
        """The int32 tokens of one sequence after checking them and its cache."""
        if not isinstance(cache, CudaKVCache) or (<CudaKVCache> cache).model is not self:
            raise ValueError("cache belongs to another model")
        return sequence_tokens(tokens, n_past, cache, self.n_vocab, self.m.window)

    def forward(self, cache, tokens, int64_t n_past, bint logits_all, int n_threads):
        """Logits of `tokens` appended at positions n_past.. (their K/V go into the cache)."""
        out = self.forward_seqs([cache], [tokens], [n_past], logits_all, n_threads)
        return out if logits_all else out[0]

    cdef cnp.ndarray _logits_out(self, int64_t rows):
        """Where a call's logits go: for up to _PINNED_ROWS rows a view of a pinned buffer that no live
        array uses (the device copies straight into it, and the caller reads it without another
        copy), else (or with every pooled buffer still referenced) ordinary memory."""
        cdef int64_t need = rows * self.n_vocab * 4, i
        cdef PinnedBuf b
        if rows > _PINNED_ROWS:
            return np.empty((rows, self.n_vocab), dtype=np.float32)
        for i in range(len(self.pinned)):
            if _Py_REFCNT(<PyObject *> PyList_GET_ITEM(self.pinned, i)) == 1:  # only the pool holds it
                b = self.pinned[i]
                if <int64_t> b.nbytes < need:
                    b = self.pinned[i] = PinnedBuf(_PINNED_ROWS * self.n_vocab * 4)
                return b.array(rows, self.n_vocab)
        if len(self.pinned) == _PINNED_BUFFERS:
            return np.empty((rows, self.n_vocab), dtype=np.float32)
        b = PinnedBuf(_PINNED_ROWS * self.n_vocab * 4)
        self.pinned.append(b)
        return b.array(rows, self.n_vocab)

    def forward_seqs(self, caches, tokens, n_pasts, bint logits_all, int n_threads, greedy=None):
        """As Model.forward_seqs: one pass over several sequences, each with its own cache. Decode
        results (at most 8 rows) are views of pinned host memory the device copied into (no second
        copy); a later call never overwrites one while an array of it is alive.
        greedy (not with logits_all): a bool per sequence; then the device also picks every sequence's
        argmax (argmax_cuda.h: the greedy Sampler's choice from these logits) and the call returns
        (logits, ids), ids int64 [n_seq], logits None when every sequence is greedy: only the ids come
        back from the device."""
        caches, tokens, n_pasts = list(caches), list(tokens), [int(p) for p in n_pasts]
        if not caches or len(tokens) != len(caches) or len(n_pasts) != len(caches):
            raise ValueError("caches, tokens and n_pasts must be non-empty and of equal length")
        if len({id(x) for x in caches}) != len(caches):
            raise ValueError("a cache appears twice: each sequence needs its own")
        if n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        checked = [self._sequence(x, t, p) for x, t, p in zip(caches, tokens, n_pasts)]
        cdef int64_t n_seq = len(caches), s
        cdef cnp.ndarray[cnp.int32_t, ndim=1] tok = np.concatenate(checked)
        cdef int64_t n = tok.shape[0]
        if n > self.max_tok:
            self._make_ctx(n)
        if greedy is not None and (logits_all or len(greedy) != n_seq):
            raise ValueError("greedy needs one flag per sequence and logits_all=False")
        cdef bint want_logits = greedy is None or not all(greedy)
        cdef cnp.ndarray out = self._logits_out(n if logits_all else n_seq) if want_logits else None
        cdef cnp.ndarray[cnp.int32_t, ndim=1] ids = np.empty(n_seq, dtype=np.int32)
        cdef float *out_p = <float *> cnp.PyArray_DATA(out) if want_logits else NULL
        cdef int32_t *ids_p = &ids[0] if greedy is not None else NULL
        cdef cnp.ndarray[cnp.int64_t, ndim=2] counts = self.counts
        cdef pe_cu_seq *seqs = <pe_cu_seq *> malloc(n_seq * sizeof(pe_cu_seq))
        if seqs == NULL:
            raise MemoryError()
        cdef CudaKVCache c
        _check(pe_cu_set_device(self.device))  # the current device is per thread (the node's worker)
        for s in range(n_seq):
            c = caches[s]
            seqs[s].kv = c.layers
            seqs[s].cpu_kv = <pe_kv_layer *> <uintptr_t> c.cpu_cache._c_layers() if c.cpu_cache is not None else NULL
            seqs[s].n_tok = checked[s].shape[0]
            seqs[s].n_past = n_pasts[s]
        cdef int rc
        with nogil:
            rc = pe_cu_forward(&self.m, self.ctx, seqs, n_seq, &tok[0], out_p, ids_p, logits_all, n_threads,
                               &counts[0, 0])
        free(seqs)
        if rc == -1:
            raise MemoryError("out of host memory for the forward pass")
        _check(rc)
        self._log_graph_failures()
        return out if greedy is None else (out, ids.astype(np.int64))

    cdef _log_graph_failures(self):
        """One log line per refused CUDA graph capture (the step ran direct launches)."""
        cdef int err = 0
        cdef int n = pe_cu_ctx_graph_failures(self.ctx, &err)
        if n > self.graph_failures_logged:
            self.graph_failures_logged = n
            logger.warning("CUDA graph capture refused (%s): this decode step ran direct launches; %s",
                           pe_cu_error_string(err).decode(),
                           "graphs are now off for this model" if not pe_cu_ctx_graphs(self.ctx)
                           else f"the next step tries again ({n} of 3 refusals)")


cdef class CudaKVCache:
    """K and V rings per GPU layer in device memory, in the element types type_k / type_v (n_ctx rows
    for full layers, window + n_batch for sliding ones, as the CPU KVCache), plus a CPU KVCache of the
    same types for the layers the CPU runs."""
    cdef readonly CudaModel model
    cdef readonly int64_t n_ctx
    cdef readonly object n_slots, layout, cpu_cache, type_k, type_v
    cdef object bufs
    cdef pe_cu_kv_layer *layers
    cdef readonly int64_t nbytes

    def __cinit__(self):
        self.layers = NULL

    def __init__(self, CudaModel model, int64_t n_ctx, int64_t n_batch, type_k=DEFAULT_KV_CACHE_TYPE,
                 type_v=DEFAULT_KV_CACHE_TYPE):
        cdef int l, L = model.m.n_layer
        if n_ctx <= 0 or n_batch <= 0:
            raise ValueError("n_ctx and n_batch must be positive")
        self.type_k, self.type_v = kv_cache_type(type_k, "type_k"), kv_cache_type(type_v, "type_v")
        cdef int64_t kv_dim = model.m.n_head_kv * model.m.head_dim, slots
        cdef int64_t row_k = kv_row_bytes(self.type_k, kv_dim, model.m.head_dim)
        cdef int64_t row_v = kv_row_bytes(self.type_v, kv_dim, model.m.head_dim)
        _check(pe_cu_set_device(model.device))
        self.model = model
        self.n_ctx = n_ctx
        self.layout = model.cache_layout
        self.cpu_cache = (KVCache(model.cpu, n_ctx, n_batch, self.type_k, self.type_v)
                          if model.first_gpu_layer > 0 else None)
        self.bufs, self.n_slots = [], []
        self.nbytes = 0
        self.layers = <pe_cu_kv_layer *> malloc(L * sizeof(pe_cu_kv_layer))
        if self.layers == NULL:
            raise MemoryError()
        memset(self.layers, 0, L * sizeof(pe_cu_kv_layer))
        cdef DevBuf k, v
        for l in range(L):
            slots = min(n_ctx, model.m.window + n_batch) if self.layout[3][l] else n_ctx
            self.n_slots.append(slots)
            if l < model.first_gpu_layer:
                continue
            k, v = DevBuf(slots * row_k), DevBuf(slots * row_v)
            k.zero()
            v.zero()
            self.bufs += [k, v]
            self.nbytes += k.nbytes + v.nbytes
            self.layers[l].k = k.p
            self.layers[l].v = v.p
            self.layers[l].n_slots = slots
            self.layers[l].type_k = KV_CACHE_TYPES[self.type_k]
            self.layers[l].type_v = KV_CACHE_TYPES[self.type_v]

    def __dealloc__(self):
        free(self.layers)

    def max_batch(self, int64_t window) -> int:
        """Most tokens one forward call may add without a sliding ring overwriting keys it needs."""
        return min(self.n_slots) - window + 1 if min(self.n_slots) < self.n_ctx else self.n_ctx

    def _parts(self, bint rings_only) -> list:
        """Every layer's K, then every layer's V (with rings_only: of the sliding layers that wrap,
        fewer slots than the context): a CPU-run layer's array of cpu_cache, or a GPU layer's
        (device buffer, its slots, bytes of one slot's row: the rows lie slot by slot, all heads
        of slot r at r * row)."""
        cdef int first = self.model.first_gpu_layer
        ks, vs = [], []
        for l, slots in enumerate(self.n_slots):
            if rings_only and slots >= self.n_ctx:
                continue
            if l < first:
                ks.append(self.cpu_cache.k[l])
                vs.append(self.cpu_cache.v[l])
            else:
                k, v = self.bufs[2 * (l - first)], self.bufs[2 * (l - first) + 1]  # __init__'s order
                ks.append((k, slots, k.nbytes // slots))
                vs.append((v, slots, v.nbytes // slots))
        return ks + vs

    @staticmethod
    def _shapes(parts, int64_t n) -> list:
        """(shape, dtype) of the first n slots (at most all) of each of _parts' parts, as host arrays."""
        return [((p.shape[0], min(n, p.shape[1]), p.shape[2]), p.dtype) if isinstance(p, np.ndarray)
                else ((1, min(n, p[1]), p[2]), np.dtype(np.uint8)) for p in parts]

    @staticmethod
    def _copies(parts, shapes) -> list:
        """Host arrays of the first slots of each part, shaped as shapes says (the GPU's downloaded)."""
        return [p[:, :s[1], :] if isinstance(p, np.ndarray) else (<DevBuf> p[0]).download(s, np.uint8)
                for p, (s, _) in zip(parts, shapes)]

    @staticmethod
    def _write(parts, arrays) -> None:
        """Each array (shaped as _shapes says, checked by the callers) into the first slots of its part."""
        cdef cnp.ndarray host
        cdef DevBuf buf
        for part, a in zip(parts, arrays):
            if isinstance(part, np.ndarray):
                part[:, :a.shape[1], :] = a
                continue
            buf, host = part[0], np.ascontiguousarray(a, dtype=np.uint8)
            if <size_t> host.nbytes > buf.nbytes:
                raise ValueError(f"{buf.nbytes} bytes of KV cache cannot take {host.nbytes}")
            _check(pe_cu_copy_to_device(buf.p, cnp.PyArray_DATA(host), host.nbytes))

    def ring_shapes(self) -> list:
        """(shape, dtype) of each array ring_copies gives."""
        return self._shapes(self._parts(True), self.n_ctx)

    def ring_copies(self) -> tuple:
        """Host copies of the sliding rings (the GPU layers' downloaded as bytes, one row a slot): a
        checkpoint's contents (pyengine/runner.py Checkpoint), as KVCache.ring_copies."""
        parts = self._parts(True)
        host = self._copies(parts, self._shapes(parts, self.n_ctx))
        return tuple(a.copy() if isinstance(p, np.ndarray) else a for p, a in zip(parts, host))  # views copied

    def put_rings(self, rings) -> None:
        """Write arrays ring_copies gave back into the rings (a rewind to a checkpoint)."""
        self._write(self._parts(True), rings)

    @property
    def row_format(self) -> tuple:
        """As KVCache.row_format: the GPU layers' rows slot by slot from first_gpu_layer on, the
        layers before it as the CPU keeps them."""
        return ("cuda", self.model.first_gpu_layer, None if self.cpu_cache is None else self.cpu_cache.row_format)

    def row_shapes(self, int64_t n_past) -> list:
        """(shape, dtype) of each array used_rows(n_past) gives."""
        return self._shapes(self._parts(False), -(-n_past // 16) * 16)

    def used_rows(self, int64_t n_past) -> list:
        """Host arrays of the K then V rows that n_past tokens wrote, as KVCache.used_rows (the
        CPU-run layers' views of cpu_cache, the GPU layers' first slots downloaded)."""
        return self._copies(self._parts(False), self.row_shapes(n_past))

    def put_rows(self, rows) -> None:
        """Write arrays shaped as row_shapes says (checked by the caller: Runner.write_rows) back."""
        self._write(self._parts(False), rows)
