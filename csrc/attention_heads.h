/* The attention inner loop (csrc/attention.c), compiled once per SIMD level: attention.c includes it
 * for the baseline build, attention_avx2.c and attention_avx512.c with their flags (the loops are
 * written for the compiler to vectorize; with AVX2/AVX-512 it uses FMA, so the levels differ in the
 * last bits, while one machine always gives the same bits). The includer defines ATTEND_HEADS, the
 * function's name (and ATTEND_HEADS_LINKAGE static for a file-local one). */
#ifndef PE_ATTENTION_HEADS_H
#define PE_ATTENTION_HEADS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "cpu_features.h"
#include "quants.h"

/* Keys / values converted to f32 per tile (in L1), and query heads per item: a GQA group shares one
 * K/V head, so each converted row serves up to HEADS_PER_ITEM heads (gpt-oss's 8: all of them). */
enum { KV_TILE = 16, HEADS_PER_ITEM = 8 };

/* One K/V head of a layer's K or V cache as the loop reads it: n_slots rows of `row` bytes from base.
 * In rows (V, and Q8_0 keys): the row of ring slot r at base + r * row. Tiled (keys of the element
 * types F32, F16, BF16: kv_keys_tiled): slots in tiles of KV_TILE, tile t the bytes of its slots'
 * rows (base + KV_TILE t * row ..), holding them dimension by dimension: element d of slot
 * KV_TILE t + i at (d * w + i) * elem, w the tile's slot count (KV_TILE, or what the ring has left). */
typedef struct {
    const uint8_t *base;
    size_t row;
    pe_dequant_row_fn dequant;
    int type;    /* the cache type (a SIMD level may read some types directly) */
    int tiled;   /* keys in tiles (above) */
    size_t elem; /* bytes of one element (tiled types) */
} kv_rows;

/* Whether a key cache of this type is tiled (kv_rows): the element types, not Q8_0 (its blocks run
 * along the head's dimensions), where the AVX-512 loop reads them. Why: a tile's 16 keys of one
 * dimension are one vector, so the scores of 16 keys are broadcast multiply-adds of the query's
 * elements, with no sums across lanes (a third of the key pass's time in rows; 1.22-1.44x on
 * attention, bench/RESULTS.md, twelfth session). The AVX2 and scalar levels keep rows: their generic
 * loop read tiles 0.66-0.8x as fast. The level is fixed for a process, and so is the layout. */
static inline int kv_keys_tiled(int type) {
    return (type == PE_TYPE_F32 || type == PE_TYPE_F16 || type == PE_TYPE_BF16) && pe_simd_level_get() >= PE_SIMD_AVX512;
}

/* Byte offset of element d of ring slot s in a tiled head of n_slots rows of `row` bytes. */
static inline size_t kv_tiled_at(int64_t s, int d, int64_t n_slots, size_t row, size_t elem) {
    const int64_t t0 = s / KV_TILE * KV_TILE, w = n_slots - t0 < KV_TILE ? n_slots - t0 : KV_TILE;
    return (size_t)t0 * row + ((size_t)d * (size_t)w + (size_t)(s - t0)) * elem;
}

/* Of the positions [first, first + max) of a tiled head, those up to the end of first's tile (or of
 * the ring): their count nk, and (*w, the tile's slot count) the address of dimension 0 of the first
 * of them; dimension d's nk values follow at d * w * elem from it. */
static inline int kv_tiled_run(const kv_rows *R, int64_t first, int64_t max, int64_t n_slots, const uint8_t **at,
                               int64_t *w) {
    const int64_t s = first % n_slots, t0 = s / KV_TILE * KV_TILE;
    *w = n_slots - t0 < KV_TILE ? n_slots - t0 : KV_TILE;
    *at = R->base + kv_tiled_at(s, 0, n_slots, R->row, R->elem);
    return (int)(*w - (s - t0) < max ? *w - (s - t0) : max);
}

/* The inner loop of each SIMD level (attention.c picks one at run time). */
typedef void (*pe_attend_heads_fn)(float *o, const float *q, int nh, int64_t p, int64_t n_slots, const kv_rows *K,
                                   const kv_rows *V, int head_dim, int64_t window, const float *sink, float *scores,
                                   float *tile);
void pe_attend_heads_avx2(float *o, const float *q, int nh, int64_t p, int64_t n_slots, const kv_rows *K,
                          const kv_rows *V, int head_dim, int64_t window, const float *sink, float *scores, float *tile);
void pe_attend_heads_avx512(float *o, const float *q, int nh, int64_t p, int64_t n_slots, const kv_rows *K,
                            const kv_rows *V, int head_dim, int64_t window, const float *sink, float *scores,
                            float *tile);

#endif

#ifdef ATTEND_HEADS
#ifndef ATTEND_HEADS_LINKAGE
#define ATTEND_HEADS_LINKAGE
#endif
/* Into L1, the row one tile ahead of row `r` (ring slot `slot`) when the ring has it without wrapping:
 * the hardware prefetcher alone left the tile loops waiting on memory (1.15-1.5x at depths
 * 4096-32768 on the Intel dev box, bench/RESULTS.md, eleventh session). */
static inline void prefetch_row_ahead(const kv_rows *R, const uint8_t *r, int64_t slot, int64_t n_slots) {
    if (slot + KV_TILE < n_slots)
        for (size_t b = 0; b < R->row; b += 64) __builtin_prefetch(r + KV_TILE * R->row + b, 0, 3);
}

/* Rows [first, first + nk) (positions; ring slot = position % n_slots) of one K or V head as f32. */
static inline void load_tile(float *tile, const kv_rows *R, int64_t first, int nk, int64_t n_slots, int head_dim) {
    int64_t slot = first % n_slots; /* one division a tile, not one a row */
    for (int j = 0; j < nk; j++, slot = slot + 1 == n_slots ? 0 : slot + 1) {
        const uint8_t *r = R->base + (size_t)slot * R->row;
        prefetch_row_ahead(R, r, slot, n_slots);
        R->dequant(r, tile + (size_t)j * head_dim, head_dim);
    }
}

/* Heads h0 .. h0 + nh - 1 (sharing one K/V head) of the query at position p: o and q point at head h0,
 * heads head_dim apart. scores: nh rows of the item's key count; tile: KV_TILE rows of head_dim. */
ATTEND_HEADS_LINKAGE void ATTEND_HEADS(float *o, const float *q, int nh, int64_t p, int64_t n_slots,
                                       const kv_rows *K, const kv_rows *V, int head_dim, int64_t window,
                                       const float *sink, float *scores, float *tile) {
    const float scale = 1.0f / sqrtf((float)head_dim);
    const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    const int64_t n = p - lo + 1;
    float m[HEADS_PER_ITEM], inv[HEADS_PER_ITEM];
    for (int h = 0; h < nh; h++) m[h] = sink[h];
    for (int64_t j0 = 0; j0 < n;) {
        int nk;
        if (K->tiled) { /* tile[d * KV_TILE + j]: element d of key j, each dimension's keys one run */
            const uint8_t *at;
            int64_t w;
            nk = kv_tiled_run(K, lo + j0, n - j0, n_slots, &at, &w);
            if (nk == KV_TILE) /* a whole tile: its head_dim * 16 elements in one call */
                K->dequant(at, tile, (int64_t)head_dim * KV_TILE);
            else
                for (int d = 0; d < head_dim; d++) K->dequant(at + (size_t)d * (size_t)w * K->elem, tile + (size_t)d * KV_TILE, nk);
        } else {
            nk = n - j0 < KV_TILE ? (int)(n - j0) : KV_TILE;
            load_tile(tile, K, lo + j0, nk, n_slots, head_dim);
        }
        for (int h = 0; h < nh; h++) {
            const float *qh = q + (size_t)h * head_dim;
            float *sh = scores + h * n + j0;
            if (K->tiled) {
                float acc[KV_TILE] = {0};
                for (int d = 0; d < head_dim; d++) {
                    const float *kd = tile + (size_t)d * KV_TILE;
#pragma omp simd
                    for (int j = 0; j < KV_TILE; j++) acc[j] += qh[d] * kd[j];
                }
                for (int j = 0; j < nk; j++) sh[j] = acc[j] * scale;
            } else
                for (int j = 0; j < nk; j++) {
                    const float *k = tile + (size_t)j * head_dim;
                    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                    for (int d = 0; d < head_dim; d++) acc += qh[d] * k[d];
                    sh[j] = acc * scale;
                }
            for (int j = 0; j < nk; j++) m[h] = sh[j] > m[h] ? sh[j] : m[h];
        }
        j0 += nk;
    }
    for (int h = 0; h < nh; h++) {
        float *sh = scores + h * n;
        double sum = exp((double)sink[h] - m[h]);
        for (int64_t j = 0; j < n; j++) {
            sh[j] = expf(sh[j] - m[h]);
            sum += sh[j];
        }
        inv[h] = (float)(1.0 / sum);
        for (int d = 0; d < head_dim; d++) o[(size_t)h * head_dim + d] = 0.0f;
    }
    for (int64_t j0 = 0; j0 < n; j0 += KV_TILE) {
        const int nk = n - j0 < KV_TILE ? (int)(n - j0) : KV_TILE;
        load_tile(tile, V, lo + j0, nk, n_slots, head_dim);
        for (int h = 0; h < nh; h++) {
            float *oh = o + (size_t)h * head_dim;
            for (int j = 0; j < nk; j++) {
                const float w = scores[h * n + j0 + j] * inv[h];
                const float *v = tile + (size_t)j * head_dim;
#pragma omp simd
                for (int d = 0; d < head_dim; d++) oh[d] += w * v[d];
            }
        }
    }
}
#endif
