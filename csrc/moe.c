/* MoE with expert grouping (see moe.h). Every token's expert outputs land in its own slot
 * [token][rank] and are summed afterwards in rank order: the result does not depend on how tokens
 * were grouped (batch vs one token) or on the thread count. */
#include "moe.h"

#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "ops.h"
#include "profile.h"

int pe_moe_forward(const pe_moe *m, const float *x, int64_t n_tok, float *y, int n_threads, int64_t *counts) {
    const int E = m->n_expert, K = m->n_used;
    const int64_t D = m->n_embd, F = m->n_ff, n_ent = n_tok * K;
    int rc = -1;
    pe_arena *ar = pe_arena_get();
    if (!ar) return -1;
    const size_t mark = pe_arena_mark(ar);
    float *logits = pe_arena_alloc(ar, (size_t)n_tok * E * sizeof(float));
    int *sel = pe_arena_alloc(ar, (size_t)n_ent * sizeof(int));
    float *wts = pe_arena_alloc(ar, (size_t)n_ent * sizeof(float));
    int64_t *count = pe_arena_alloc(ar, ((size_t)E + 1) * sizeof(int64_t));
    int64_t *fill = pe_arena_alloc(ar, (size_t)E * sizeof(int64_t));
    int64_t *bucket = pe_arena_alloc(ar, (size_t)n_ent * sizeof(int64_t)); /* entries token * K + rank */
    int64_t *pos = pe_arena_alloc(ar, (size_t)n_ent * sizeof(int64_t));    /* entry -> its bucket row */
    /* one row per (token, rank) entry, in bucket order: each expert's rows are contiguous */
    float *xg = pe_arena_alloc(ar, (size_t)n_ent * D * sizeof(float));
    float *g = pe_arena_alloc(ar, (size_t)n_ent * F * sizeof(float));
    float *u = pe_arena_alloc(ar, (size_t)n_ent * F * sizeof(float));
    float *yg = pe_arena_alloc(ar, (size_t)n_ent * D * sizeof(float));
    pe_matmul_job *jobs = pe_arena_alloc(ar, sizeof(pe_matmul_job) * 2 * (size_t)E);
    if (!logits || !sel || !wts || !count || !fill || !bucket || !pos || !xg || !g || !u || !yg || !jobs) goto done;
    memset(count, 0, ((size_t)E + 1) * sizeof(int64_t));

    int64_t t_prof = pe_prof_begin();
    if (pe_matmul(&m->router, 0, x, D, n_tok, m->router_b, logits, E, n_threads)) goto done;
    for (int64_t t = 0; t < n_tok; t++) {
        pe_topk(logits + t * E, E, K, sel + t * K);
        for (int r = 0; r < K; r++) wts[t * K + r] = logits[t * E + sel[t * K + r]];
        pe_softmax(wts + t * K, K);
    }

    /* counting sort of (token, rank) entries by expert, token order kept inside each bucket */
    for (int64_t i = 0; i < n_ent; i++) count[sel[i] + 1]++;
    if (counts)
        for (int e = 0; e < E; e++) counts[e] += count[e + 1];
    for (int e = 0; e < E; e++) count[e + 1] += count[e];
    memcpy(fill, count, (size_t)E * sizeof(int64_t));
    for (int64_t i = 0; i < n_ent; i++) bucket[fill[sel[i]]++] = i;
    for (int64_t p = 0; p < n_ent; p++) pos[bucket[p]] = p;
    int64_t n_used = 0; /* distinct experts chosen: each one's matrices are read once */
    for (int e = 0; e < E; e++) n_used += count[e + 1] > count[e];
    pe_prof_end(PE_OP_ROUTER, t_prof, pe_weight_bytes(&m->router));

    /* gate and up of every used expert in one group of products, then down likewise (pe_matmul_many:
     * with a few tokens, one thread team over all of them; one token reads x itself, quantized once) */
    t_prof = pe_prof_begin();
    if (n_tok > 1) { /* each expert's tokens gathered into consecutive rows, a prompt's split between the threads */
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_tok >= PE_SPLIT_MIN_TOK)
        for (int64_t p = 0; p < n_ent; p++) memcpy(xg + p * D, x + (bucket[p] / K) * D, (size_t)D * sizeof(float));
    }
    int n_jobs = 0;
    for (int e = 0; e < E; e++) {
        const int64_t n = count[e + 1] - count[e], p0 = count[e];
        if (n == 0) continue;
        const float *xe = n_tok > 1 ? xg + p0 * D : x;
        jobs[n_jobs++] = (pe_matmul_job){&m->gate, e, xe, D, n, m->gate_b + (int64_t)e * F, g + p0 * F, F};
        jobs[n_jobs++] = (pe_matmul_job){&m->up, e, xe, D, n, m->up_b + (int64_t)e * F, u + p0 * F, F};
    }
    if (pe_matmul_many(jobs, n_jobs, n_threads)) goto done;
    pe_prof_end(PE_OP_EXPERT_UP, t_prof, n_used * (pe_weight_bytes(&m->gate) + pe_weight_bytes(&m->up)));
    t_prof = pe_prof_begin();
    pe_swiglu_oai(g, g, u, n_ent * F, n_threads);
    pe_prof_end(PE_OP_SWIGLU, t_prof, 0);
    t_prof = pe_prof_begin();
    n_jobs = 0;
    for (int e = 0; e < E; e++) {
        const int64_t n = count[e + 1] - count[e], p0 = count[e];
        if (n > 0)
            jobs[n_jobs++] = (pe_matmul_job){&m->down, e, g + p0 * F, F, n, m->down_b + (int64_t)e * D, yg + p0 * D, D};
    }
    if (pe_matmul_many(jobs, n_jobs, n_threads)) goto done;
    pe_prof_end(PE_OP_EXPERT_DOWN, t_prof, n_used * pe_weight_bytes(&m->down));

    t_prof = pe_prof_begin();
    /* each token's weighted sum alone (the same bits for any thread count), a prompt's tokens split */
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_tok >= PE_SPLIT_MIN_TOK)
    for (int64_t t = 0; t < n_tok; t++) {
        float *yt = y + t * D;
        for (int64_t d = 0; d < D; d++) yt[d] = 0.0f;
        for (int r = 0; r < K; r++) {
            const float w = wts[t * K + r];
            const float *s = yg + pos[t * K + r] * D;
            for (int64_t d = 0; d < D; d++) yt[d] += w * s[d];
        }
    }
    pe_prof_end(PE_OP_EXPERT_SUM, t_prof, 0);
    rc = 0;
done:
    pe_arena_release(ar, mark);
    return rc;
}
