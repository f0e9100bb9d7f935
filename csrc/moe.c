/* MoE with expert grouping (see moe.h). Every token's expert outputs land in its own slot
 * [token][rank] and are summed afterwards in rank order: the result does not depend on how tokens
 * were grouped (batch vs one token) or on the thread count. */
#include "moe.h"

#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "ops.h"

int pe_moe_forward(const pe_moe *m, const float *x, int64_t n_tok, float *y, int n_threads, int64_t *counts) {
    const int E = m->n_expert, K = m->n_used;
    const int64_t D = m->n_embd, F = m->n_ff;
    int rc = -1;
    pe_arena *ar = pe_arena_get();
    if (!ar) return -1;
    const size_t mark = pe_arena_mark(ar);
    float *logits = pe_arena_alloc(ar, (size_t)n_tok * E * sizeof(float));
    int *sel = pe_arena_alloc(ar, (size_t)n_tok * K * sizeof(int));
    float *wts = pe_arena_alloc(ar, (size_t)n_tok * K * sizeof(float));
    int64_t *count = pe_arena_alloc(ar, ((size_t)E + 1) * sizeof(int64_t));
    int64_t *fill = pe_arena_alloc(ar, (size_t)E * sizeof(int64_t));
    int64_t *bucket = pe_arena_alloc(ar, (size_t)n_tok * K * sizeof(int64_t)); /* entries token * K + rank */
    float *xg = pe_arena_alloc(ar, (size_t)n_tok * D * sizeof(float));
    float *g = pe_arena_alloc(ar, (size_t)n_tok * F * sizeof(float));
    float *u = pe_arena_alloc(ar, (size_t)n_tok * F * sizeof(float));
    float *yg = pe_arena_alloc(ar, (size_t)n_tok * D * sizeof(float));
    float *slots = pe_arena_alloc(ar, (size_t)n_tok * K * D * sizeof(float));
    if (!logits || !sel || !wts || !count || !fill || !bucket || !xg || !g || !u || !yg || !slots) goto done;
    memset(count, 0, ((size_t)E + 1) * sizeof(int64_t));

    if (pe_matmul(&m->router, 0, x, D, n_tok, m->router_b, logits, E, n_threads)) goto done;
    for (int64_t t = 0; t < n_tok; t++) {
        pe_topk(logits + t * E, E, K, sel + t * K);
        for (int r = 0; r < K; r++) wts[t * K + r] = logits[t * E + sel[t * K + r]];
        pe_softmax(wts + t * K, K);
    }

    /* counting sort of (token, rank) entries by expert, token order kept inside each bucket */
    for (int64_t i = 0; i < n_tok * K; i++) count[sel[i] + 1]++;
    if (counts)
        for (int e = 0; e < E; e++) counts[e] += count[e + 1];
    for (int e = 0; e < E; e++) count[e + 1] += count[e];
    memcpy(fill, count, (size_t)E * sizeof(int64_t));
    for (int64_t i = 0; i < n_tok * K; i++) bucket[fill[sel[i]]++] = i;

    for (int e = 0; e < E; e++) {
        const int64_t n = count[e + 1] - count[e];
        const int64_t *b = bucket + count[e];
        if (n == 0) continue;
        for (int64_t i = 0; i < n; i++) memcpy(xg + i * D, x + (b[i] / K) * D, (size_t)D * sizeof(float));
        if (pe_matmul(&m->gate, e, xg, D, n, m->gate_b + (int64_t)e * F, g, F, n_threads)) goto done;
        if (pe_matmul(&m->up, e, xg, D, n, m->up_b + (int64_t)e * F, u, F, n_threads)) goto done;
        pe_swiglu_oai(g, g, u, n * F);
        if (pe_matmul(&m->down, e, g, F, n, m->down_b + (int64_t)e * D, yg, D, n_threads)) goto done;
        for (int64_t i = 0; i < n; i++) memcpy(slots + b[i] * D, yg + i * D, (size_t)D * sizeof(float));
    }

    for (int64_t t = 0; t < n_tok; t++) {
        float *yt = y + t * D;
        for (int64_t d = 0; d < D; d++) yt[d] = 0.0f;
        for (int r = 0; r < K; r++) {
            const float w = wts[t * K + r];
            const float *s = slots + (t * K + r) * D;
            for (int64_t d = 0; d < D; d++) yt[d] += w * s[d];
        }
    }
    rc = 0;
done:
    pe_arena_release(ar, mark);
    return rc;
}
