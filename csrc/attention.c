/* Attention with sinks (see attention.h; docs/gpt-oss.md, "Forward pass"). One thread owns
 * each (token, head) pair, so the result does not depend on the thread count. Keys are scored by
 * the cache type's dot kernel (converting to f32 in registers: F16C, bfloat16 shifts, Q8_0 blocks of
 * 32 with their f16 scale); each value row is converted once into an L1 buffer by the type's
 * dequantizer (used directly when f32) and added with its weight. */
#include "attention.h"

#include "arena.h"
#include "quants.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

void pe_kv_store(pe_kv_layer *kv, const float *k, const float *v, int64_t n_tok, int64_t pos0, int64_t kv_dim) {
    const pe_quantize_row_fn qk = pe_type_traits_get(kv->type_k)->quantize_row;
    const pe_quantize_row_fn qv = pe_type_traits_get(kv->type_v)->quantize_row;
    const size_t rk = pe_row_size(kv->type_k, kv_dim), rv = pe_row_size(kv->type_v, kv_dim);
    for (int64_t t = 0; t < n_tok; t++) {
        const int64_t slot = (pos0 + t) % kv->n_slots;
        qk(k + t * kv_dim, kv->k + (size_t)slot * rk, kv_dim);
        qv(v + t * kv_dim, kv->v + (size_t)slot * rv, kv_dim);
    }
}

/* One of K or V of a layer as attend_one reads it: row r of a head at base + r * row + off. */
typedef struct {
    const uint8_t *base;
    size_t row, off;
    pe_dot_f32_fn dot;
    pe_dequant_row_fn dequant;
    int is_f32;
} kv_rows;

static kv_rows kv_rows_of(const uint8_t *base, int type, int64_t kv_dim, int64_t kv_off) {
    const pe_type_traits *t = pe_type_traits_get(type);
    return (kv_rows){base, pe_row_size(type, kv_dim), pe_row_size(type, kv_off), t->dot_f32, t->dequant_row,
                     type == PE_TYPE_F32};
}

static void attend_one(float *o, const float *q, int64_t p, int64_t n_slots, const kv_rows *K, const kv_rows *V,
                       int head_dim, int64_t window, float sink, float *scores, float *vbuf) {
    const float scale = 1.0f / sqrtf((float)head_dim);
    const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    const int64_t n = p - lo + 1;
    float m = sink;
    for (int64_t j = 0; j < n; j++) {
        const uint8_t *k = K->base + (size_t)((lo + j) % n_slots) * K->row + K->off;
        scores[j] = K->dot(k, q, head_dim) * scale;
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
        const uint8_t *row = V->base + (size_t)((lo + j) % n_slots) * V->row + V->off;
        const float *v = (const float *)row;
        if (!V->is_f32) {
            V->dequant(row, vbuf, head_dim);
            v = vbuf;
        }
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
    const size_t per_thread = (size_t)max_keys + (size_t)head_dim; /* scores | one value row */
    float *scratch = ar ? pe_arena_alloc(ar, (size_t)n_threads * per_thread * sizeof(float)) : NULL;
    if (!scratch) return -1;
    const int64_t n_pairs = n_tok * n_head;
#pragma omp parallel num_threads(n_threads)
    {
        float *scores = scratch;
#ifdef _OPENMP
        scores += (size_t)omp_get_thread_num() * per_thread;
#endif
        float *vbuf = scores + max_keys;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n_pairs; i++) {
            const int64_t t = i / n_head;
            const int h = (int)(i % n_head);
            const int64_t kv_off = (int64_t)(h / group) * head_dim;
            const kv_rows K = kv_rows_of(kv->k, kv->type_k, kv_dim, kv_off);
            const kv_rows V = kv_rows_of(kv->v, kv->type_v, kv_dim, kv_off);
            attend_one(out + t * q_dim + (int64_t)h * head_dim, q + t * q_dim + (int64_t)h * head_dim,
                       pos0 + t, kv->n_slots, &K, &V, head_dim, window, sinks[h], scores, vbuf);
        }
    }
    pe_arena_release(ar, mark);
    return 0;
}
