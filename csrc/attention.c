/* Attention with sinks (see attention.h; docs/gpt-oss.md, "Forward pass"). One thread owns each
 * (token, K/V head, group of up to 8 query heads) item, so the result does not depend on the thread
 * count. The item's keys and values are converted to f32 by the cache type's dequantizer 16 rows at a
 * time into an L1 tile and used by all of its query heads (gpt-oss: 8 query heads per K/V head), so
 * each row is read and converted once per token; scores are the tile rows dotted with each query,
 * values added with their weights, both in SIMD loops. The price: a decoded token of gpt-oss has 8
 * items per layer, so at most 8 threads share its attention (16 with groups of 4, which read every
 * row twice: 1.04-1.18x slower at depths 4096-32768 on 2 cores, bench/RESULTS.md, eleventh session). */
#include "attention.h"

#include "arena.h"
#include "attention_heads.h"
#include "cpu_features.h"
#include "quants.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

void pe_kv_store(pe_kv_layer *kv, const float *k, const float *v, int64_t n_tok, int64_t pos0, int64_t kv_dim,
                 int head_dim) {
    const pe_quantize_row_fn qk = pe_type_traits_get(kv->type_k)->quantize_row;
    const pe_quantize_row_fn qv = pe_type_traits_get(kv->type_v)->quantize_row;
    const size_t rk = pe_row_size(kv->type_k, head_dim), rv = pe_row_size(kv->type_v, head_dim);
    const int64_t n_head_kv = kv_dim / head_dim;
    const int tiled = kv_keys_tiled(kv->type_k);
    const size_t elem = tiled ? rk / (size_t)head_dim : 0;
    uint8_t row_k[rk]; /* a tiled key's row before it is spread over its tile */
    for (int64_t t = 0; t < n_tok; t++) {
        const size_t slot = (size_t)((pos0 + t) % kv->n_slots);
        for (int64_t g = 0; g < n_head_kv; g++) {
            const size_t row = (size_t)g * (size_t)kv->n_slots + slot;
            qv(v + t * kv_dim + g * head_dim, kv->v + row * rv, head_dim);
            if (!tiled) {
                qk(k + t * kv_dim + g * head_dim, kv->k + row * rk, head_dim);
                continue;
            }
            qk(k + t * kv_dim + g * head_dim, row_k, head_dim);
            uint8_t *head = kv->k + (size_t)g * (size_t)kv->n_slots * rk;
            for (int d = 0; d < head_dim; d++)
                memcpy(head + kv_tiled_at((int64_t)slot, d, kv->n_slots, rk, elem), row_k + (size_t)d * elem, elem);
        }
    }
}

int pe_kv_keys_tiled(int type) { return kv_keys_tiled(type); }

/* K/V head g's n_slots rows of head_dim elements: keys tiled where kv_keys_tiled says so. */
static kv_rows kv_rows_of(const uint8_t *base, int type, int64_t n_slots, int head_dim, int g, int keys) {
    const size_t row = pe_row_size(type, head_dim);
    const int tiled = keys && kv_keys_tiled(type);
    return (kv_rows){base + (size_t)g * (size_t)n_slots * row, row, pe_type_traits_get(type)->dequant_row, type, tiled,
                     tiled ? row / (size_t)head_dim : 0};
}

#define ATTEND_HEADS attend_heads_baseline
#define ATTEND_HEADS_LINKAGE static
#include "attention_heads.h"
#undef ATTEND_HEADS
#undef ATTEND_HEADS_LINKAGE

static pe_attend_heads_fn attend_heads_get(void) {
    const pe_simd_level level = pe_simd_level_get();
    return level >= PE_SIMD_AVX512 ? pe_attend_heads_avx512
           : level == PE_SIMD_AVX2 ? pe_attend_heads_avx2
                                   : attend_heads_baseline;
}

int pe_attention(float *out, const float *q, int64_t n_tok, int64_t pos0, const pe_kv_layer *kv,
                 int n_head, int n_head_kv, int head_dim, int64_t window, const float *sinks, int n_threads) {
    const int64_t work = n_tok * n_head * (pos0 + n_tok) * head_dim; /* upper bound of multiply-adds */
    if (n_threads > work / 32768) n_threads = (int)(work / 32768);
    if (n_threads < 1) n_threads = 1;
    const int64_t q_dim = (int64_t)n_head * head_dim;
    const int group = n_head / n_head_kv;
    const int n_sub = (group + HEADS_PER_ITEM - 1) / HEADS_PER_ITEM; /* items per (token, K/V head) */
    const int64_t max_keys = window > 0 && window < pos0 + n_tok ? window : pos0 + n_tok;
    pe_arena *ar = pe_arena_get();
    const size_t mark = ar ? pe_arena_mark(ar) : 0;
    /* per thread: scores of HEADS_PER_ITEM heads | one tile */
    const size_t per_thread = (size_t)HEADS_PER_ITEM * (size_t)max_keys + (size_t)KV_TILE * (size_t)head_dim;
    float *scratch = ar ? pe_arena_alloc(ar, (size_t)n_threads * per_thread * sizeof(float)) : NULL;
    if (!scratch) return -1;
    const int64_t n_items = n_tok * n_head_kv * n_sub;
    const pe_attend_heads_fn attend_heads = attend_heads_get();
#pragma omp parallel num_threads(n_threads)
    {
        float *scores = scratch;
#ifdef _OPENMP
        scores += (size_t)omp_get_thread_num() * per_thread;
#endif
        float *tile = scores + (size_t)HEADS_PER_ITEM * (size_t)max_keys;
        /* items one by one in turn: a prompt's later tokens attend over more keys, and contiguous
         * halves gave the second thread ~3/4 of a 512-token prompt's full-attention work */
#pragma omp for schedule(static, 1)
        for (int64_t i = 0; i < n_items; i++) {
            const int64_t t = i / ((int64_t)n_head_kv * n_sub);
            const int g = (int)(i / n_sub % n_head_kv), sub = (int)(i % n_sub);
            const int h0 = g * group + sub * HEADS_PER_ITEM;
            const int nh = group - sub * HEADS_PER_ITEM < HEADS_PER_ITEM ? group - sub * HEADS_PER_ITEM : HEADS_PER_ITEM;
            const kv_rows K = kv_rows_of(kv->k, kv->type_k, kv->n_slots, head_dim, g, 1);
            const kv_rows V = kv_rows_of(kv->v, kv->type_v, kv->n_slots, head_dim, g, 0);
            attend_heads(out + t * q_dim + (int64_t)h0 * head_dim, q + t * q_dim + (int64_t)h0 * head_dim, nh,
                         pos0 + t, kv->n_slots, &K, &V, head_dim, window, sinks + h0, scores, tile);
        }
    }
    pe_arena_release(ar, mark);
    return 0;
}
