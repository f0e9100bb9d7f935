/* The gpt-oss forward pass on a CUDA device (see gptoss_cuda.h). It follows csrc/gptoss.c line for
 * line; the differences are where the work runs:
 * - the token embedding (and any CPU layers) run on the host, then the residual stream is uploaded;
 * - up to 8 tokens (decode): matrix-vector kernels read each weight row once for all of them, and the
 *   mixture of experts runs one row per (token, rank) pair with the expert id read on the device, so
 *   the whole step needs no host round trip and is captured once into a CUDA graph and replayed;
 * - more tokens (prefill): the routing goes to the host, which groups the (token, rank) pairs by
 *   expert; one grouped tensor-core product per weight covers every expert's tokens (int8 for Q8_0/MXFP4
 *   weights unless the model keeps float activations: gemm_i8_cuda.h).
 * - cpu_moe layers hand the normalised activations to the CPU experts (pe_moe_forward) and back. */
#include "compat.h"

#include <stdlib.h>
#include <string.h>

#include "argmax_cuda.h"
#include "attention_cuda.h"
#include "gemm_i8_cuda.h"
#include "gptoss_cuda.h"
#include "matmul_cuda.h"
#include "ops_cuda.h"
#include "router_cuda.h"

extern "C" {
#include "moe.h"
}

#define PE_CU_TRY(expr)                     \
    do {                                    \
        const int pe_cu_rc_ = (int)(expr);  \
        if (pe_cu_rc_) return pe_cu_rc_;    \
    } while (0)

static const int64_t GPT_CU_MATVEC_MAX = 8;  /* rows per call up to which products are matrix-vector */
static const int64_t GPT_CU_HEAD_CHUNK = 32; /* output-head rows per logits download */

/* The operations the profile times (pe_cu_op_name gives their names). */
enum {
    OP_NORM, OP_ADD_NORM, OP_QKV, OP_ROPE, OP_KV_STORE, OP_ATTENTION, OP_ATTN_OUT, OP_ADD, OP_ROUTER, OP_TOPK,
    OP_EXPERTS_UP, OP_SWIGLU, OP_EXPERTS_DOWN, OP_COMBINE, OP_EXPERTS_GROUPED, OP_CPU_MOE, OP_HEAD, OP_ACT_Q8,
    OP_ARGMAX, OP_COUNT
};
static const char *const gpt_cu_op_names[OP_COUNT] = {
    "rmsnorm", "add_rmsnorm", "qkv", "rope", "kv_store", "attention", "attn_out", "add", "router", "topk",
    "experts_gate_up", "swiglu", "experts_down", "moe_combine", "experts_grouped", "cpu_moe",
    "output_head", "act_q8", "argmax"};

struct pe_cu_ctx {
    int64_t max_tok, max_pairs, bytes;
    cudaStream_t stream;
    /* device */
    float *x, *a, *t, *qkv, *o, *logits, *rlog, *wts, *xg, *g, *u, *slots, *attn;
    void *act_i8; /* int8 prefill products' quantized activations (m->int8_act only) */
    size_t attn_floats;
    int64_t *pos;
    int32_t *sel;      /* [n_layer][max_pairs]: each layer's routing of this call */
    int32_t *pair_tok; /* [max_pairs]: p / n_used (the token of pair p), constant */
    int32_t *idx;      /* [2][max_pairs]: gather / scatter indices of the grouped experts */
    int32_t *out_idx;  /* [max_tok]: the rows the output head reads */
    uint64_t *amax;    /* [max_tok]: each output row's argmax key (argmax_cuda.h) */
    /* int8 activations of decode calls (matvec_q8_cuda.h), rows pe_cu_act_q8_ld(n) bytes apart: the
     * normalised rows (aq), the attention output (oq), each expert pair's SwiGLU output (hq) */
    uint8_t *aq, *oq, *hq;
    /* pinned host */
    float *h_x, *h_a, *h_t;
    int64_t *h_pos;
    int32_t *h_sel, *h_idx, *h_out_idx;
    uint64_t *h_amax;
    /* decode graph: replayed while every GPU layer's cache buffers (graph_kv) and the attention
     * scratch are the ones it was captured with */
    int use_graphs;
#if PE_CU_HAVE_GRAPHS
    cudaGraphExec_t graph;
#endif
    pe_cu_kv_layer *graph_kv; /* [n_layer] */
    int graph_valid;
    int graph_failures, graph_error; /* refused captures so far, the last one's error */
    /* profile: per-operation device time from a pair of events around each operation, recorded
     * without waiting (so the host stays ahead and a start event fires when the previous
     * operation ends, not when the host gets round to the launch), read after the call (graphs off) */
    int profile;
    cudaEvent_t *ev; /* [2 * ev_cap]: start, end of each operation of this call */
    int *ev_op;      /* [ev_cap] */
    int ev_n, ev_cap;
    double op_ms[OP_COUNT];
    int64_t op_calls[OP_COUNT];
};

/* Decode steps after this many refused captures run direct launches for the model's life. */
static const int GPT_CU_GRAPH_TRIES = 3;

/* Runs expr; in profile mode between two events under operation id. */
#define GPT_CU_OP(c, id, expr)                                    \
    do {                                                          \
        int pe_cu_ev_ = -1;                                       \
        if ((c)->profile) PE_CU_TRY(gpt_cu_op_begin(c, id, &pe_cu_ev_)); \
        PE_CU_TRY(expr);                                          \
        if (pe_cu_ev_ >= 0) PE_CU_TRY(cudaEventRecord((c)->ev[2 * pe_cu_ev_ + 1], (c)->stream)); \
    } while (0)

static int gpt_cu_op_begin(pe_cu_ctx *c, int id, int *slot) {
    if (c->ev_n == c->ev_cap) {
        const int cap = c->ev_cap ? 2 * c->ev_cap : 256;
        cudaEvent_t *ev = (cudaEvent_t *)realloc(c->ev, 2 * (size_t)cap * sizeof(cudaEvent_t));
        if (!ev) return -1;
        c->ev = ev;
        int *op = (int *)realloc(c->ev_op, (size_t)cap * sizeof(int));
        if (!op) return -1;
        c->ev_op = op;
        for (int i = 2 * c->ev_cap; i < 2 * cap; i++) {
            const int e = (int)cudaEventCreate(&c->ev[i]);
            if (e) {
                c->ev_cap = i / 2;
                return e;
            }
        }
        c->ev_cap = cap;
    }
    *slot = c->ev_n++;
    c->ev_op[*slot] = id;
    return (int)cudaEventRecord(c->ev[2 * *slot], c->stream);
}

/* After the call's last operation: adds each recorded operation's time to its total. */
static int gpt_cu_profile_collect(pe_cu_ctx *c) {
    if (!c->ev_n) return 0;
    PE_CU_TRY(cudaEventSynchronize(c->ev[2 * c->ev_n - 1]));
    for (int i = 0; i < c->ev_n; i++) {
        float ms = 0.0f;
        PE_CU_TRY(cudaEventElapsedTime(&ms, c->ev[2 * i], c->ev[2 * i + 1]));
        c->op_ms[c->ev_op[i]] += ms;
        c->op_calls[c->ev_op[i]]++;
    }
    c->ev_n = 0;
    return 0;
}

static int gpt_cu_alloc(pe_cu_ctx *c, void *pp, size_t n) {
    void **p = (void **)pp;
    const cudaError_t e = cudaMalloc(p, n ? n : 1);
    if (e == cudaSuccess) c->bytes += (int64_t)n;
    return (int)e;
}

static int gpt_cu_alloc_host(void *pp, size_t n) {
    return (int)cudaMallocHost((void **)pp, n ? n : 1);
}

extern "C" pe_cu_ctx *pe_cu_ctx_create(const pe_cu_model *m, int64_t max_tok, int use_graphs, int *err) {
    pe_cu_ctx *c = (pe_cu_ctx *)calloc(1, sizeof(pe_cu_ctx));
    *err = cudaErrorMemoryAllocation;
    if (!c) return NULL;
    const int64_t D = m->n_embd, F = m->n_ff, q_dim = (int64_t)m->n_head * m->head_dim;
    const int64_t kv_dim = (int64_t)m->n_head_kv * m->head_dim, P = max_tok * m->n_used;
    c->max_tok = max_tok;
    c->max_pairs = P;
    c->use_graphs = use_graphs;
    /* non-blocking: work other code puts on the legacy default stream neither waits for this one
     * nor invalidates a capture running on it */
    int e = (int)cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    c->graph_kv = (pe_cu_kv_layer *)calloc((size_t)m->n_layer, sizeof(pe_cu_kv_layer));
    if (!e && !c->graph_kv) e = cudaErrorMemoryAllocation;
    const size_t f = sizeof(float);
    if (!e) e = gpt_cu_alloc(c, &c->x, max_tok * D * f);
    if (!e) e = gpt_cu_alloc(c, &c->a, max_tok * D * f);
    if (!e) e = gpt_cu_alloc(c, &c->t, max_tok * D * f);
    if (!e) e = gpt_cu_alloc(c, &c->qkv, max_tok * (q_dim + 2 * kv_dim) * f);
    if (!e) e = gpt_cu_alloc(c, &c->o, max_tok * q_dim * f);
    if (!e) e = gpt_cu_alloc(c, &c->logits, GPT_CU_HEAD_CHUNK * m->n_vocab * f);
    if (!e) e = gpt_cu_alloc(c, &c->rlog, max_tok * m->n_expert * f);
    if (!e) e = gpt_cu_alloc(c, &c->wts, P * f);
    if (!e) e = gpt_cu_alloc(c, &c->xg, P * D * f);
    if (!e) e = gpt_cu_alloc(c, &c->g, P * 2 * F * f); /* gate | up of each pair */
    if (!e) e = gpt_cu_alloc(c, &c->u, P * F * f);
    if (!e) e = gpt_cu_alloc(c, &c->slots, P * D * f);
    if (!e) e = gpt_cu_alloc(c, &c->pos, max_tok * sizeof(int64_t));
    if (!e) e = gpt_cu_alloc(c, &c->sel, (size_t)m->n_layer * P * sizeof(int32_t));
    if (!e) e = gpt_cu_alloc(c, &c->pair_tok, P * sizeof(int32_t));
    if (!e) e = gpt_cu_alloc(c, &c->idx, 2 * P * sizeof(int32_t));
    if (!e) e = gpt_cu_alloc(c, &c->out_idx, max_tok * sizeof(int32_t));
    if (!e) e = gpt_cu_alloc(c, &c->amax, max_tok * sizeof(uint64_t));
    if (!e && m->int8_act) {
        const int64_t width = D > F ? (D > q_dim ? D : q_dim) : (F > q_dim ? F : q_dim);
        e = gpt_cu_alloc(c, &c->act_i8, (size_t)pe_cu_gemm_i8_scratch_bytes(P, width));
    }
    const int64_t n8 = max_tok < GPT_CU_MATVEC_MAX ? max_tok : GPT_CU_MATVEC_MAX; /* decode calls only */
    if (!e) e = gpt_cu_alloc(c, &c->aq, n8 * pe_cu_act_q8_ld(D));
    if (!e) e = gpt_cu_alloc(c, &c->oq, n8 * pe_cu_act_q8_ld(q_dim));
    if (!e) e = gpt_cu_alloc(c, &c->hq, n8 * m->n_used * pe_cu_act_q8_ld(F));
    if (!e) e = gpt_cu_alloc_host(&c->h_x, max_tok * D * f);
    if (!e) e = gpt_cu_alloc_host(&c->h_a, max_tok * D * f);
    if (!e) e = gpt_cu_alloc_host(&c->h_t, max_tok * D * f);
    if (!e) e = gpt_cu_alloc_host(&c->h_pos, max_tok * sizeof(int64_t));
    if (!e) e = gpt_cu_alloc_host(&c->h_sel, (size_t)m->n_layer * P * sizeof(int32_t));
    if (!e) e = gpt_cu_alloc_host(&c->h_idx, 2 * P * sizeof(int32_t));
    if (!e) e = gpt_cu_alloc_host(&c->h_out_idx, max_tok * sizeof(int32_t));
    if (!e) e = gpt_cu_alloc_host(&c->h_amax, max_tok * sizeof(uint64_t));
    if (!e) {
        for (int64_t p = 0; p < P; p++) c->h_idx[p] = (int32_t)(p / m->n_used);
        e = (int)cudaMemcpy(c->pair_tok, c->h_idx, P * sizeof(int32_t), cudaMemcpyHostToDevice);
    }
    if (e) {
        *err = e;
        pe_cu_ctx_free(c);
        return NULL;
    }
    *err = 0;
    return c;
}

extern "C" void pe_cu_ctx_free(pe_cu_ctx *c) {
    if (!c) return;
#if PE_CU_HAVE_GRAPHS
    if (c->graph) cudaGraphExecDestroy(c->graph);
#endif
    void *dev[] = {c->x, c->a, c->t, c->qkv, c->o, c->logits, c->rlog, c->wts, c->xg, c->g, c->u,
                   c->slots, c->attn, c->pos, c->sel, c->pair_tok, c->idx, c->out_idx, c->act_i8, c->aq, c->oq,
                   c->hq, c->amax};
    void *host[] = {c->h_x, c->h_a, c->h_t, c->h_pos, c->h_sel, c->h_idx, c->h_out_idx, c->h_amax};
    for (void *p : dev) cudaFree(p);
    for (void *p : host) cudaFreeHost(p);
    for (int i = 0; i < 2 * c->ev_cap; i++) cudaEventDestroy(c->ev[i]);
    free(c->ev);
    free(c->ev_op);
    free(c->graph_kv);
    if (c->stream) cudaStreamDestroy(c->stream);
    cudaGetLastError(); /* frees after an earlier failure must not leave a sticky error behind */
    free(c);
}

extern "C" int64_t pe_cu_ctx_bytes(const pe_cu_ctx *c) { return c->bytes; }

extern "C" int pe_cu_ctx_graphs(const pe_cu_ctx *c) { return c->use_graphs; }

extern "C" int pe_cu_ctx_graph_failures(const pe_cu_ctx *c, int *last_error) {
    *last_error = c->graph_error;
    return c->graph_failures;
}

extern "C" void pe_cu_ctx_profile(pe_cu_ctx *c, int enable) {
    c->profile = enable;
    c->ev_n = 0;
    memset(c->op_ms, 0, sizeof c->op_ms);
    memset(c->op_calls, 0, sizeof c->op_calls);
}

extern "C" int pe_cu_ctx_profile_read(const pe_cu_ctx *c, int op, const char **name, double *ms, int64_t *calls) {
    if (op < 0 || op >= OP_COUNT) return -1;
    *name = gpt_cu_op_names[op];
    *ms = c->op_ms[op];
    *calls = c->op_calls[op];
    return 0;
}

/* Most keys a token of this sequence attends to in layer l; with fixed_grid the ring size, an
 * upper bound for every later step too. Decode calls always size attention this way, so a replayed
 * graph and a direct launch split the keys into the same chunks and give the same bits. */
static int64_t gpt_cu_max_keys(const pe_cu_model *m, const pe_cu_seq *s, int l, int fixed_grid) {
    const pe_cu_kv_layer *kv = &s->kv[l];
    int64_t n = fixed_grid ? kv->n_slots : s->n_past + s->n_tok;
    if (m->layers[l].sliding && m->window < n) n = m->window;
    return n < kv->n_slots ? n : kv->n_slots;
}

static int gpt_cu_ensure_attn(const pe_cu_model *m, pe_cu_ctx *c, const pe_cu_seq *seqs, int64_t n_seq,
                              int fixed_grid) {
    size_t need = 0;
    for (int64_t s = 0; s < n_seq; s++)
        for (int l = m->first_gpu_layer; l < m->n_layer; l++) {
            const size_t n = pe_cu_attention_scratch_floats(seqs[s].n_tok, m->n_head, m->head_dim,
                                                            gpt_cu_max_keys(m, &seqs[s], l, fixed_grid));
            need = n > need ? n : need;
        }
    if (need <= c->attn_floats) return 0;
    PE_CU_TRY(cudaStreamSynchronize(c->stream));
    if (c->attn) {
        cudaFree(c->attn);
        c->bytes -= (int64_t)(c->attn_floats * sizeof(float));
        c->attn = NULL;
        c->attn_floats = 0;
    }
    PE_CU_TRY(gpt_cu_alloc(c, &c->attn, need * sizeof(float)));
    c->attn_floats = need;
    c->graph_valid = 0; /* a captured graph points at the old scratch */
    return 0;
}

/* y = W x (+ bias) for n rows of x: the matrix-vector kernel for decode, the tiled one for prefill
 * (on int8 tensor cores for Q8_0/MXFP4 unless the model keeps float activations). */
static int gpt_cu_matmul(const pe_cu_model *m, pe_cu_ctx *c, const pe_cu_weight *w, const float *x, int64_t ldx,
                         int64_t n, const float *bias, float *y, int64_t ldy, cudaStream_t s) {
    if (n <= GPT_CU_MATVEC_MAX) return pe_cu_matvec(w, NULL, x, ldx, n, bias, y, ldy, s);
    if (m->int8_act && pe_cu_gemm_i8_supported(w->type))
        return pe_cu_gemm_i8(w, 0, x, ldx, n, bias, y, ldy, c->act_i8, s);
    return pe_cu_gemm(w, 0, x, ldx, n, bias, y, ldy, s);
}

/* The grouped expert product of gpt_cu_moe_grouped, int8 or float activations as gpt_cu_matmul. */
static int gpt_cu_gemm_experts(const pe_cu_model *m, pe_cu_ctx *c, const pe_cu_weight *w, const int64_t *start,
                               const float *x, int64_t ldx, const float *bias, float *y, int64_t ldy, cudaStream_t s) {
    if (m->int8_act && pe_cu_gemm_i8_supported(w->type))
        return pe_cu_gemm_experts_i8(w, start, m->n_expert, x, ldx, bias, y, ldy, c->act_i8, s);
    return pe_cu_gemm_experts(w, start, m->n_expert, x, ldx, bias, y, ldy, s);
}

/* Experts for few tokens: one row per (token, rank) pair, expert ids stay on the device. */
static int gpt_cu_moe_pairs(const pe_cu_model *m, const pe_cu_layer *L, pe_cu_ctx *c, const int32_t *sel,
                            int64_t n_tok) {
    const int64_t D = m->n_embd, F = m->n_ff, P = n_tok * m->n_used;
    cudaStream_t s = c->stream;
    if (L->gate_up_q8.qs && L->down_q8.qs) {
        /* int8 activations (c->aq, quantized by the norm): gate|up with SwiGLU into c->u, quantized,
         * then down with the weighted sum over the token's experts straight into c->t */
        GPT_CU_OP(c, OP_EXPERTS_UP, pe_cu_moe_gate_up_q8(&L->gate_up_q8, sel, c->aq, pe_cu_act_q8_ld(D), n_tok,
                                                         m->n_used, L->gate_up_b, c->u, s));
        GPT_CU_OP(c, OP_ACT_Q8, pe_cu_act_q8(c->hq, c->u, F, P, F, s));
        GPT_CU_OP(c, OP_EXPERTS_DOWN, pe_cu_moe_down_q8(&L->down_q8, sel, c->wts, c->hq, pe_cu_act_q8_ld(F), n_tok,
                                                        m->n_used, L->down_b, c->t, s));
        return 0;
    }
    /* one token: its pairs all read its row (ldx 0); several: gather each pair's token row */
    const float *xp = c->a;
    int64_t ldx = 0;
    if (n_tok > 1) {
        GPT_CU_OP(c, OP_EXPERTS_UP, pe_cu_gather_rows(c->xg, c->a, c->pair_tok, P, D, s));
        xp = c->xg;
        ldx = D;
    }
    /* h = swiglu(gate x, up x) into c->u, [P][F] */
    if (L->gate_up_fused) {
        GPT_CU_OP(c, OP_EXPERTS_UP, pe_cu_matvec(&L->gate_up, sel, xp, ldx, P, L->gate_up_b, c->g, 2 * F, s));
        GPT_CU_OP(c, OP_SWIGLU, pe_cu_swiglu_oai_rows(c->u, c->g, c->g + F, P, F, 2 * F, s));
    } else {
        GPT_CU_OP(c, OP_EXPERTS_UP, pe_cu_matvec(&L->gate, sel, xp, ldx, P, L->gate_b, c->g, F, s));
        GPT_CU_OP(c, OP_EXPERTS_UP, pe_cu_matvec(&L->up, sel, xp, ldx, P, L->up_b, c->u, F, s));
        GPT_CU_OP(c, OP_SWIGLU, pe_cu_swiglu_oai(c->u, c->g, c->u, P * F, s));
    }
    GPT_CU_OP(c, OP_EXPERTS_DOWN, pe_cu_matvec(&L->down, sel, c->u, F, P, L->down_b, c->slots, D, s));
    GPT_CU_OP(c, OP_COMBINE, pe_cu_moe_combine(c->t, c->slots, c->wts, n_tok, m->n_used, D, s));
    return 0;
}

/* Experts for many tokens: the host sorts the (token, rank) pairs by expert (a counting sort that
 * keeps token order, as moe.c does) and each expert with tokens multiplies them in one product. */
static int gpt_cu_moe_grouped(const pe_cu_model *m, const pe_cu_layer *L, pe_cu_ctx *c, const int32_t *sel,
                              int64_t n_tok, int64_t *counts) {
    const int E = m->n_expert, K = m->n_used;
    const int64_t D = m->n_embd, F = m->n_ff, P = n_tok * K;
    cudaStream_t s = c->stream;
    PE_CU_TRY(cudaMemcpyAsync(c->h_sel, sel, P * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    PE_CU_TRY(cudaStreamSynchronize(s));
    int64_t *start = (int64_t *)calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *fill = (int64_t *)malloc((size_t)E * sizeof(int64_t));
    if (!start || !fill) {
        free(start);
        free(fill);
        return -1;
    }
    for (int64_t i = 0; i < P; i++) start[c->h_sel[i] + 1]++;
    if (counts)
        for (int e = 0; e < E; e++) counts[e] += start[e + 1];
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    memcpy(fill, start, (size_t)E * sizeof(int64_t));
    int32_t *tok = c->h_idx, *entry = c->h_idx + c->max_pairs;
    for (int64_t i = 0; i < P; i++) {
        const int64_t j = fill[c->h_sel[i]]++;
        entry[j] = (int32_t)i;
        tok[j] = (int32_t)(i / K);
    }
    free(fill);
    int rc = (int)cudaMemcpyAsync(c->idx, c->h_idx, 2 * c->max_pairs * sizeof(int32_t), cudaMemcpyHostToDevice, s);
    if (!rc) rc = pe_cu_gather_rows(c->xg, c->a, c->idx, P, D, s);
    /* every expert's rows in one grid per weight; h = swiglu(gate x, up x) into c->u; down
     * projections land in xg (free by then) */
    if (L->gate_up_fused) {
        if (!rc) rc = gpt_cu_gemm_experts(m, c, &L->gate_up, start, c->xg, D, L->gate_up_b, c->g, 2 * F, s);
        if (!rc) rc = pe_cu_swiglu_oai_rows(c->u, c->g, c->g + F, P, F, 2 * F, s);
    } else {
        if (!rc) rc = gpt_cu_gemm_experts(m, c, &L->gate, start, c->xg, D, L->gate_b, c->g, F, s);
        if (!rc) rc = gpt_cu_gemm_experts(m, c, &L->up, start, c->xg, D, L->up_b, c->u, F, s);
        if (!rc) rc = pe_cu_swiglu_oai(c->u, c->g, c->u, P * F, s);
    }
    if (!rc) rc = gpt_cu_gemm_experts(m, c, &L->down, start, c->u, F, L->down_b, c->xg, D, s);
    free(start);
    if (!rc) rc = pe_cu_scatter_rows(c->slots, c->xg, c->idx + c->max_pairs, P, D, s);
    if (!rc) rc = pe_cu_moe_combine(c->t, c->slots, c->wts, n_tok, K, D, s);
    return rc;
}

/* Experts kept in host memory: the CPU runs the layer's whole MoE block on the normalised input. */
static int gpt_cu_moe_cpu(const pe_cu_model *m, int l, pe_cu_ctx *c, int64_t n_tok, int n_threads,
                          int64_t *counts) {
    const int64_t D = m->n_embd;
    cudaStream_t s = c->stream;
    PE_CU_TRY(cudaMemcpyAsync(c->h_a, c->a, n_tok * D * sizeof(float), cudaMemcpyDeviceToHost, s));
    PE_CU_TRY(cudaStreamSynchronize(s));
    if (pe_moe_forward(&m->cpu->layers[l].moe, c->h_a, n_tok, c->h_t, n_threads, counts)) return -1;
    return (int)cudaMemcpyAsync(c->t, c->h_t, n_tok * D * sizeof(float), cudaMemcpyHostToDevice, s);
}

/* The GPU layers, from the uploaded residual stream c->x (positions in c->pos) to the output head's
 * input: every token's (or each sequence's last token's) final normalised row in c->a. */
static int gpt_cu_layers(const pe_cu_model *m, pe_cu_ctx *c, const pe_cu_seq *seqs, int64_t n_seq, int64_t n_tok,
                         int64_t n_out, int fixed_grid, int n_threads, int64_t *expert_counts) {
    const int64_t D = m->n_embd, hd = m->head_dim;
    const int64_t q_dim = m->n_head * hd, kv_dim = m->n_head_kv * hd, qkv_dim = q_dim + 2 * kv_dim;
    cudaStream_t s = c->stream;
    /* decode calls run the products that have re-laid weights on int8 activations (c->aq: the norm
     * output, quantized by the norm kernel when its consumer needs it) */
    const int dec = n_tok <= GPT_CU_MATVEC_MAX;
    const int64_t ldq_d = pe_cu_act_q8_ld(D), ldq_o = pe_cu_act_q8_ld(q_dim);
    for (int l = m->first_gpu_layer; l < m->n_layer; l++) {
        const pe_cu_layer *L = &m->layers[l];
        const double *omega = L->sliding ? m->omega_swa : m->omega;
        const int moe_q8 = dec && !L->cpu_moe && L->gate_up_q8.qs && L->down_q8.qs;

        /* attention (its input norm came with the previous layer's last residual add) */
        if (l == m->first_gpu_layer)
            GPT_CU_OP(c, OP_NORM, dec && L->wqkv_q8.qs
                                      ? pe_cu_rmsnorm_q8(c->a, c->aq, c->x, L->attn_norm, n_tok, D, m->eps, s)
                                      : pe_cu_rmsnorm(c->a, c->x, L->attn_norm, n_tok, D, m->eps, s));
        /* rows of c->qkv: q | k | v of one token */
        float *q = c->qkv, *k = c->qkv + q_dim, *v = c->qkv + q_dim + kv_dim;
        /* one token of one sequence with a float-typed cache: RoPE and the K/V store are the q|k|v
         * product's epilogue */
        const pe_cu_kv_layer *kv0 = &seqs[0].kv[l];
        const int qkv_rope = dec && L->wqkv_q8.qs && n_seq == 1 && n_tok == 1 &&
                             pe_cu_qkv_rope_q8_stores(kv0->type_k, kv0->type_v);
        if (qkv_rope) {
            GPT_CU_OP(c, OP_QKV, pe_cu_qkv_rope_q8(&L->wqkv_q8, c->aq, L->bqkv, c->qkv, m->n_head, m->n_head_kv,
                                                   (int)hd, c->pos, omega, m->rope_mscale, kv0->k, kv0->v,
                                                   kv0->type_k, kv0->type_v, kv0->n_slots, s));
        } else if (dec && L->wqkv_q8.qs) {
            GPT_CU_OP(c, OP_QKV, pe_cu_matvec_q8(&L->wqkv_q8, NULL, c->aq, ldq_d, n_tok, L->bqkv, c->qkv, qkv_dim, s));
        } else if (L->qkv_fused) {
            GPT_CU_OP(c, OP_QKV, gpt_cu_matmul(m, c, &L->wqkv, c->a, D, n_tok, L->bqkv, c->qkv, qkv_dim, s));
        } else {
            GPT_CU_OP(c, OP_QKV, gpt_cu_matmul(m, c, &L->wq, c->a, D, n_tok, L->bq, q, qkv_dim, s));
            GPT_CU_OP(c, OP_QKV, gpt_cu_matmul(m, c, &L->wk, c->a, D, n_tok, L->bk, k, qkv_dim, s));
            GPT_CU_OP(c, OP_QKV, gpt_cu_matmul(m, c, &L->wv, c->a, D, n_tok, L->bv, v, qkv_dim, s));
        }
        /* q and k heads are adjacent and share the token's angles: one rotation over both */
        if (!qkv_rope)
            GPT_CU_OP(c, OP_ROPE, pe_cu_rope(c->qkv, n_tok, qkv_dim, m->n_head + m->n_head_kv, (int)hd, c->pos, omega,
                                             m->rope_mscale, s));
        /* int8 output product: attention's merge quantizes its output as it writes it (head_dim a
         * multiple of 32), else a separate quantize launch */
        const int wo_q8 = dec && L->wo_q8.qs, att_q8 = wo_q8 && hd % 32 == 0;
        for (int64_t j = 0, i = 0; j < n_seq; i += seqs[j].n_tok, j++) {
            const pe_cu_kv_layer *kv = &seqs[j].kv[l];
            if (!qkv_rope)
                GPT_CU_OP(c, OP_KV_STORE,
                          pe_cu_kv_store(kv->k, kv->v, kv->type_k, kv->type_v, kv->n_slots, k + i * qkv_dim,
                                         v + i * qkv_dim, qkv_dim, seqs[j].n_tok, c->pos + i, kv_dim, s));
            const int64_t keys = gpt_cu_max_keys(m, &seqs[j], l, fixed_grid), window = L->sliding ? m->window : 0;
            if (att_q8)
                GPT_CU_OP(c, OP_ATTENTION,
                          pe_cu_attention_q8(c->o + i * q_dim, q_dim, q + i * qkv_dim, qkv_dim, seqs[j].n_tok,
                                             c->pos + i, kv->k, kv->v, kv->type_k, kv->type_v, kv->n_slots, m->n_head,
                                             m->n_head_kv, (int)hd, window, L->sinks, keys, c->attn,
                                             c->oq + i * ldq_o, ldq_o, s));
            else
                GPT_CU_OP(c, OP_ATTENTION,
                          pe_cu_attention(c->o + i * q_dim, q_dim, q + i * qkv_dim, qkv_dim, seqs[j].n_tok, c->pos + i,
                                          kv->k, kv->v, kv->type_k, kv->type_v, kv->n_slots, m->n_head, m->n_head_kv,
                                          (int)hd, window, L->sinks, keys, c->attn, s));
        }
        if (wo_q8) {
            if (!att_q8) GPT_CU_OP(c, OP_ACT_Q8, pe_cu_act_q8(c->oq, c->o, q_dim, n_tok, q_dim, s));
            GPT_CU_OP(c, OP_ATTN_OUT, pe_cu_matvec_q8(&L->wo_q8, NULL, c->oq, ldq_o, n_tok, L->bo, c->t, D, s));
        } else {
            GPT_CU_OP(c, OP_ATTN_OUT, gpt_cu_matmul(m, c, &L->wo, c->o, q_dim, n_tok, L->bo, c->t, D, s));
        }

        /* mixture of experts, on x + attention output, normalised */
        GPT_CU_OP(c, OP_ADD_NORM,
                  moe_q8 ? pe_cu_add_rmsnorm_q8(c->a, c->aq, c->x, c->t, L->post_norm, n_tok, D, m->eps, s)
                         : pe_cu_add_rmsnorm(c->a, c->x, c->t, L->post_norm, n_tok, D, m->eps, s));
        int64_t *counts = expert_counts ? expert_counts + (int64_t)l * m->n_expert : NULL;
        if (L->cpu_moe) {
            GPT_CU_OP(c, OP_CPU_MOE, gpt_cu_moe_cpu(m, l, c, n_tok, n_threads, counts));
        } else {
            int32_t *sel = c->sel + (int64_t)l * c->max_pairs;
            if (dec && pe_cu_router_fused_supported(L->router.type, m->n_expert)) { /* product, top-k, softmax */
                GPT_CU_OP(c, OP_ROUTER, pe_cu_router_fused(&L->router, c->a, D, n_tok, L->router_b, m->n_used, sel,
                                                           c->wts, s));
            } else {
                GPT_CU_OP(c, OP_ROUTER, gpt_cu_matmul(m, c, &L->router, c->a, D, n_tok, L->router_b, c->rlog,
                                                      m->n_expert, s));
                GPT_CU_OP(c, OP_TOPK, pe_cu_router(c->rlog, n_tok, m->n_expert, m->n_used, sel, c->wts, s));
            }
            if (n_tok <= GPT_CU_MATVEC_MAX)
                PE_CU_TRY(gpt_cu_moe_pairs(m, L, c, sel, n_tok));
            else
                GPT_CU_OP(c, OP_EXPERTS_GROUPED, gpt_cu_moe_grouped(m, L, c, sel, n_tok, counts));
        }
        if (l + 1 < m->n_layer && dec && m->layers[l + 1].wqkv_q8.qs)
            GPT_CU_OP(c, OP_ADD_NORM, pe_cu_add_rmsnorm_q8(c->a, c->aq, c->x, c->t, m->layers[l + 1].attn_norm, n_tok,
                                                           D, m->eps, s));
        else if (l + 1 < m->n_layer)
            GPT_CU_OP(c, OP_ADD_NORM,
                      pe_cu_add_rmsnorm(c->a, c->x, c->t, m->layers[l + 1].attn_norm, n_tok, D, m->eps, s));
        else
            GPT_CU_OP(c, OP_ADD, pe_cu_add(c->x, c->t, n_tok * D, s));
    }
    /* final norm of the rows the head needs (indices uploaded in c->out_idx by the caller) */
    GPT_CU_OP(c, OP_NORM, pe_cu_gather_rows(c->a, c->x, c->out_idx, n_out, D, s));
    GPT_CU_OP(c, OP_NORM, dec && m->output_q8.qs ? pe_cu_rmsnorm_q8(c->a, c->aq, c->a, m->out_norm, n_out, D, m->eps, s)
                                                 : pe_cu_rmsnorm(c->a, c->a, m->out_norm, n_out, D, m->eps, s));
    return 0;
}

#if PE_CU_HAVE_GRAPHS
/* Whether the captured graph was made for this sequence's cache: the same K and V buffers and ring
 * sizes in every GPU layer (they are baked into the graph; a new cache can reuse some addresses of
 * a freed one, so no single layer's pointer is a safe key). */
static int gpt_cu_graph_fits(const pe_cu_model *m, const pe_cu_ctx *c, const pe_cu_seq *seq) {
    if (!c->graph_valid) return 0;
    for (int l = m->first_gpu_layer; l < m->n_layer; l++) {
        const pe_cu_kv_layer *a = &seq->kv[l], *b = &c->graph_kv[l];
        if (a->k != b->k || a->v != b->v || a->n_slots != b->n_slots) return 0;
    }
    return 1;
}

/* One decode step (one sequence, one token) as a replayed CUDA graph; captured on first use for a
 * cache (its device pointers and ring sizes are baked into the graph). */
static int gpt_cu_graph_step(const pe_cu_model *m, pe_cu_ctx *c, const pe_cu_seq *seq, int n_threads) {
    if (!c->graph || !gpt_cu_graph_fits(m, c, seq)) {
        c->graph_valid = 0;
        if (c->graph) {
            cudaGraphExecDestroy(c->graph);
            c->graph = NULL;
        }
        cudaGraph_t g = NULL;
        PE_CU_TRY(cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal));
        const int rc = gpt_cu_layers(m, c, seq, 1, 1, 1, 1, n_threads, NULL);
        const cudaError_t end = cudaStreamEndCapture(c->stream, &g);
        if (rc || end != cudaSuccess) {
            if (g) cudaGraphDestroy(g);
            return rc ? rc : (int)end;
        }
        const cudaError_t inst = cudaGraphInstantiate(&c->graph, g, 0);
        cudaGraphDestroy(g);
        PE_CU_TRY(inst);
        for (int l = m->first_gpu_layer; l < m->n_layer; l++) c->graph_kv[l] = seq->kv[l];
        c->graph_valid = 1;
    }
    return (int)cudaGraphLaunch(c->graph, c->stream);
}
#endif

extern "C" int pe_cu_forward(const pe_cu_model *m, pe_cu_ctx *c, const pe_cu_seq *seqs, int64_t n_seq,
                             const int32_t *tokens, float *logits, int32_t *argmax, int logits_all,
                             int n_threads, int64_t *expert_counts) {
    const int64_t D = m->n_embd, V = m->n_vocab;
    cudaStream_t s = c->stream;
    int64_t n_tok = 0;
    for (int64_t q = 0; q < n_seq; q++) n_tok += seqs[q].n_tok;
    if (n_tok > c->max_tok) return cudaErrorInvalidValue;
    c->ev_n = 0; /* a failed call's profile events are dropped */

    /* embedding and the CPU layers on the host, then the residual stream goes up */
    pe_seq *cpu = (pe_seq *)calloc((size_t)n_seq, sizeof(pe_seq));
    if (!cpu) return -1;
    for (int64_t q = 0; q < n_seq; q++) {
        cpu[q].kv = seqs[q].cpu_kv;
        cpu[q].n_tok = seqs[q].n_tok;
        cpu[q].n_past = seqs[q].n_past;
    }
    int cpu_rc = pe_gptoss_forward_layers(m->cpu, cpu, n_seq, tokens, m->first_gpu_layer, c->h_x, n_threads,
                                          expert_counts);
    free(cpu);
    if (cpu_rc) return -1;

    int64_t n_out = 0;
    for (int64_t q = 0, i = 0; q < n_seq; i += seqs[q].n_tok, q++) {
        for (int64_t j = 0; j < seqs[q].n_tok; j++) c->h_pos[i + j] = seqs[q].n_past + j;
        for (int64_t j = logits_all ? 0 : seqs[q].n_tok - 1; j < seqs[q].n_tok; j++) c->h_out_idx[n_out++] = (int32_t)(i + j);
    }
    PE_CU_TRY(cudaMemcpyAsync(c->x, c->h_x, n_tok * D * sizeof(float), cudaMemcpyHostToDevice, s));
    PE_CU_TRY(cudaMemcpyAsync(c->pos, c->h_pos, n_tok * sizeof(int64_t), cudaMemcpyHostToDevice, s));
    PE_CU_TRY(cudaMemcpyAsync(c->out_idx, c->h_out_idx, n_out * sizeof(int32_t), cudaMemcpyHostToDevice, s));

    const int fixed_grid = n_tok <= GPT_CU_MATVEC_MAX;
    PE_CU_TRY(gpt_cu_ensure_attn(m, c, seqs, n_seq, fixed_grid));
    int rc = 1;
#if PE_CU_HAVE_GRAPHS
    int any_cpu_moe = 0;
    for (int l = m->first_gpu_layer; l < m->n_layer; l++) any_cpu_moe |= m->layers[l].cpu_moe;
    const int graph = c->use_graphs && !c->profile && n_seq == 1 && n_tok == 1 && !any_cpu_moe;
    if (graph && (rc = gpt_cu_graph_step(m, c, seqs, n_threads)) != 0) {
        /* capture or instantiation refused: this step runs directly and a later one tries again,
         * up to GPT_CU_GRAPH_TRIES refusals, then direct launches for good (the binding logs each
         * refusal); a real fault (sticky error) fails the direct run as well */
        cudaGetLastError();
        c->graph_failures++;
        c->graph_error = rc;
        c->graph_valid = 0;
        if (c->graph_failures >= GPT_CU_GRAPH_TRIES) c->use_graphs = 0;
    }
#endif
    if (rc) PE_CU_TRY(gpt_cu_layers(m, c, seqs, n_seq, n_tok, n_out, fixed_grid, n_threads, expert_counts));

    /* output head in chunks of rows, each downloaded as it is done (and/or reduced to its argmax) */
    if (argmax) PE_CU_TRY(cudaMemsetAsync(c->amax, 0, n_out * sizeof(uint64_t), s));
    for (int64_t r = 0; r < n_out; r += GPT_CU_HEAD_CHUNK) {
        const int64_t nr = n_out - r < GPT_CU_HEAD_CHUNK ? n_out - r : GPT_CU_HEAD_CHUNK;
        if (fixed_grid && m->output_q8.qs) /* decode: the final norm quantized its rows into c->aq */
            GPT_CU_OP(c, OP_HEAD, pe_cu_matvec_q8(&m->output_q8, NULL, c->aq + r * pe_cu_act_q8_ld(D),
                                                  pe_cu_act_q8_ld(D), nr, NULL, c->logits, V, s));
        else
            GPT_CU_OP(c, OP_HEAD, gpt_cu_matmul(m, c, &m->output, c->a + r * D, D, nr, NULL, c->logits, V, s));
        if (argmax) GPT_CU_OP(c, OP_ARGMAX, pe_cu_argmax_keys(c->logits, nr, V, V, c->amax + r, s));
        if (logits) {
            PE_CU_TRY(cudaMemcpyAsync(logits + r * V, c->logits, nr * V * sizeof(float), cudaMemcpyDeviceToHost, s));
            PE_CU_TRY(cudaStreamSynchronize(s));
        }
    }
    if (argmax) {
        PE_CU_TRY(cudaMemcpyAsync(c->h_amax, c->amax, n_out * sizeof(uint64_t), cudaMemcpyDeviceToHost, s));
        PE_CU_TRY(cudaStreamSynchronize(s));
        for (int64_t r = 0; r < n_out; r++) argmax[r] = pe_cu_argmax_index(c->h_amax[r]);
    }

    if (c->profile) PE_CU_TRY(gpt_cu_profile_collect(c));

    /* expert selections of the decode path (the grouped and CPU paths counted as they went): every
     * layer's row of pairs in one strided copy */
    if (expert_counts && n_tok <= GPT_CU_MATVEC_MAX) {
        const int64_t P = n_tok * m->n_used, pitch = c->max_pairs * (int64_t)sizeof(int32_t);
        PE_CU_TRY(cudaMemcpy2DAsync(c->h_sel, pitch, c->sel, pitch, P * sizeof(int32_t), m->n_layer,
                                    cudaMemcpyDeviceToHost, s));
        PE_CU_TRY(cudaStreamSynchronize(s));
        for (int l = m->first_gpu_layer; l < m->n_layer; l++) {
            if (m->layers[l].cpu_moe) continue;
            for (int64_t p = 0; p < P; p++)
                expert_counts[(int64_t)l * m->n_expert + c->h_sel[(int64_t)l * c->max_pairs + p]]++;
        }
    }
    return (int)cudaGetLastError();
}
