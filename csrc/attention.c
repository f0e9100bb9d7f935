/* Attention with sinks (see attention.h; docs/gpt-oss.md, "Forward pass"). One thread owns
 * each (token, head) pair, so the result does not depend on the thread count. */
#include "attention.h"

#include "arena.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

void pe_kv_store(pe_kv_layer *kv, const float *k, const float *v, int64_t n_tok, int64_t pos0, int64_t kv_dim) {
    for (int64_t t = 0; t < n_tok; t++) {
        const int64_t slot = (pos0 + t) % kv->n_slots;
        memcpy(kv->k + slot * kv_dim, k + t * kv_dim, (size_t)kv_dim * sizeof(float));
        memcpy(kv->v + slot * kv_dim, v + t * kv_dim, (size_t)kv_dim * sizeof(float));
    }
}

static void attend_one(float *o, const float *q, int64_t p, const pe_kv_layer *kv, int64_t kv_dim,
                       int64_t kv_off, int head_dim, int64_t window, float sink, float *scores) {
    const float scale = 1.0f / sqrtf((float)head_dim);
    const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    const int64_t n = p - lo + 1;
    float m = sink;
    for (int64_t j = 0; j < n; j++) {
        const float *k = kv->k + ((lo + j) % kv->n_slots) * kv_dim + kv_off;
        float s = 0.0f;
        for (int d = 0; d < head_dim; d++) s += q[d] * k[d];
        scores[j] = s * scale;
        m = scores[j] > m ? scores[j] : m;
    }
    double sum = exp((double)sink - m);
    for (int64_t j = 0; j < n; j++) {
        scores[j] = expf(scores[j] - m);
        sum += scores[j];
    }
    const float inv = (float)(1.0 / sum);
    for (int d = 0; d < head_dim; d++) o[d] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        const float *v = kv->v + ((lo + j) % kv->n_slots) * kv_dim + kv_off;
        const float w = scores[j] * inv;
        for (int d = 0; d < head_dim; d++) o[d] += w * v[d];
    }
}

int pe_attention(float *out, const float *q, int64_t n_tok, int64_t pos0, const pe_kv_layer *kv,
                 int n_head, int n_head_kv, int head_dim, int64_t window, const float *sinks, int n_threads) {
    const int64_t work = n_tok * n_head * (pos0 + n_tok) * head_dim; /* upper bound of multiply-adds */
    if (n_threads > work / 32768) n_threads = (int)(work / 32768);
    if (n_threads < 1) n_threads = 1;
    const int64_t kv_dim = (int64_t)n_head_kv * head_dim, q_dim = (int64_t)n_head * head_dim;
    const int group = n_head / n_head_kv;
    const int64_t max_keys = window > 0 && window < pos0 + n_tok ? window : pos0 + n_tok;
    pe_arena *ar = pe_arena_get();
    const size_t mark = ar ? pe_arena_mark(ar) : 0;
    float *scratch = ar ? pe_arena_alloc(ar, (size_t)n_threads * (size_t)max_keys * sizeof(float)) : NULL;
    if (!scratch) return -1;
    const int64_t n_pairs = n_tok * n_head;
#pragma omp parallel num_threads(n_threads)
    {
        float *scores = scratch;
#ifdef _OPENMP
        scores += (size_t)omp_get_thread_num() * (size_t)max_keys;
#endif
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n_pairs; i++) {
            const int64_t t = i / n_head;
            const int h = (int)(i % n_head);
            attend_one(out + t * q_dim + (int64_t)h * head_dim, q + t * q_dim + (int64_t)h * head_dim,
                       pos0 + t, kv, kv_dim, (int64_t)(h / group) * head_dim, head_dim, window,
                       sinks[h], scores);
        }
    }
    pe_arena_release(ar, mark);
    return 0;
}
