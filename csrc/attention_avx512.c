/* The attention inner loop for AVX-512 (see attention_heads.h). Heads of 64 elements (gpt-oss) take
 * explicit intrinsics; other sizes the generic loop compiled with these flags.
 *
 * Why by hand: compiled from the generic C, a key's score ended in a 16-step scalar sum and a value's
 * weighted add went through memory (the output row stored and reloaded for every key): ~60 % of the
 * inner loop's time (perf annotate, depth 4096). Here keys in tiles (f16, bf16, f32: kv_rows) are
 * scored 16 at a time by broadcast multiply-adds of the item's queries (tiled_scores); keys in rows
 * (Q8_0) are dequantized a tile of 16 at a time, once for all of the item's heads, and 16 keys'
 * partial-product registers summed across lanes together (hsum16). The softmax's exponentials are
 * vectorized (vexp_avx512.h). Values go to four heads at a time (value_rows): each value row is loaded
 * (an f16 row converted by F16C as it is read) once per four heads, whose 16 output registers stay in
 * registers, with the weights already divided by the denominator: on the Zen 4 dev box (one core,
 * depth 4096) that and the softmax's four vectors an iteration took a layer from 880-908 to 749-753
 * us, the same bits (bench/RESULTS.md, fourteenth session). Each head's operations and their order do
 * not depend on the other heads of its item, so its result does not depend on how many share it. */
#include <immintrin.h>
#include <math.h>

#include "attention_heads.h"
#include "vexp_avx512.h"

#define ATTEND_HEADS attend_heads_any
#define ATTEND_HEADS_LINKAGE static
#include "attention_heads.h"

/* Lane j of the result = the sum of the 16 lanes of v[j]. */
static inline __m512 hsum16(const __m512 v[16]) {
    __m512 r[8], s[4], t[2];
    for (int i = 0; i < 8; i++)
        r[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(r[2 * i]), b = _mm512_castps_pd(r[2 * i + 1]);
        s[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)
        t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x88), _mm512_shuffle_f32x4(t[0], t[1], 0xDD));
}

enum { HD = 64 };

/* 16 keys' element of one dimension at p (the first nk lanes; the rest zero) as f32. */
static inline __attribute__((always_inline)) __m512 key_lanes(const int type, const uint8_t *p, __mmask16 live) {
    if (type == PE_TYPE_F16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, p));
    if (type == PE_TYPE_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p)), 16));
    return _mm512_maskz_loadu_ps(live, p);
}

/* Keys [j0, j0 + nk) of a tiled head (kv_rows) of the type from `at`, dimension d's keys `step` bytes
 * apart: the item's heads' scores times `scale` into scores + h * n + j0 and their maxima into mx.
 * The queries (times scale, a power of two for 64-element heads, so exactly the scaled scores) are
 * in qs, eight heads of 64 (zero past nh); per dimension the keys' elements are one vector and each
 * head's score two chains of broadcast multiply-adds (even and odd dimensions, 16 accumulators in
 * registers), added at the end. */
static inline __attribute__((always_inline)) void tiled_scores_t(const int type, const uint8_t *at, size_t step, int nk,
                                                                 const float qs[][HD], int nh, float *scores, int64_t n,
                                                                 int64_t j0, __m512 mx[]) {
    const __mmask16 live = (__mmask16)((1u << nk) - 1);
    __m512 a0[HEADS_PER_ITEM], a1[HEADS_PER_ITEM];
    for (int h = 0; h < HEADS_PER_ITEM; h++) a0[h] = a1[h] = _mm512_setzero_ps();
    for (int d = 0; d < HD; d += 2) {
        const __m512 k0 = key_lanes(type, at + (size_t)d * step, live), k1 = key_lanes(type, at + (size_t)(d + 1) * step, live);
        for (int h = 0; h < HEADS_PER_ITEM; h++) {
            a0[h] = _mm512_fmadd_ps(_mm512_set1_ps(qs[h][d]), k0, a0[h]);
            a1[h] = _mm512_fmadd_ps(_mm512_set1_ps(qs[h][d + 1]), k1, a1[h]);
        }
    }
    for (int h = 0; h < nh; h++) {
        const __m512 sc = _mm512_add_ps(a0[h], a1[h]);
        _mm512_mask_storeu_ps(scores + h * n + j0, live, sc);
        mx[h] = _mm512_mask_max_ps(mx[h], live, mx[h], sc);
    }
}

static void tiled_scores(const kv_rows *K, const uint8_t *at, int64_t w, int nk, const float qs[][HD], int nh,
                         float *scores, int64_t n, int64_t j0, __m512 mx[]) {
    const size_t step = (size_t)w * K->elem;
    if (K->type == PE_TYPE_F16) tiled_scores_t(PE_TYPE_F16, at, step, nk, qs, nh, scores, n, j0, mx);
    else if (K->type == PE_TYPE_BF16) tiled_scores_t(PE_TYPE_BF16, at, step, nk, qs, nh, scores, n, j0, mx);
    else tiled_scores_t(PE_TYPE_F32, at, step, nk, qs, nh, scores, n, j0, mx);
}

/* The nk value rows of a tile (from ring slot slot0) added to g (1 or 4) heads' outputs o (heads HD
 * apart), head i's weight of row j at w[i * n + j]: the heads' 4 g output registers in registers, each
 * row's four registers loaded once for all g heads, from rows (the tile, f32) or, f16 set, converted
 * from the f16 cache as read (with load_tile's prefetch one tile ahead when `prefetch`). Each head's
 * multiply-adds are the same ones in the same order, whatever g. */
static inline __attribute__((always_inline)) void value_rows(const int g, const int f16, const kv_rows *V, const float *rows,
                                                             int64_t slot0, int64_t n_slots, int nk, const float *w,
                                                             int64_t n, float *o, int prefetch) {
    __m512 a[4][4];
    for (int i = 0; i < g; i++)
        for (int c = 0; c < 4; c++) a[i][c] = _mm512_loadu_ps(o + (size_t)i * HD + 16 * c);
    int64_t slot = slot0;
    for (int j = 0; j < nk; j++, slot = slot + 1 == n_slots ? 0 : slot + 1) {
        __m512 v[4];
        if (!f16) {
            for (int c = 0; c < 4; c++) v[c] = _mm512_loadu_ps(rows + j * HD + 16 * c);
        } else {
            const uint8_t *r = V->base + (size_t)slot * V->row;
            if (prefetch) prefetch_row_ahead(V, r, slot, n_slots);
            for (int c = 0; c < 4; c++) v[c] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(r + 32 * c)));
        }
        for (int i = 0; i < g; i++) {
            const __m512 wj = _mm512_set1_ps(w[i * n + j]);
            for (int c = 0; c < 4; c++) a[i][c] = _mm512_fmadd_ps(wj, v[c], a[i][c]);
        }
    }
    for (int i = 0; i < g; i++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + (size_t)i * HD + 16 * c, a[i][c]);
}

void pe_attend_heads_avx512(float *o, const float *q, int nh, int64_t p, int64_t n_slots, const kv_rows *K,
                            const kv_rows *V, int head_dim, int64_t window, const float *sink, float *scores,
                            float *tile) {
    if (head_dim != HD) {
        attend_heads_any(o, q, nh, p, n_slots, K, V, head_dim, window, sink, scores, tile);
        return;
    }
    const float scale = 1.0f / sqrtf((float)HD);
    const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    const int64_t n = p - lo + 1;
    __m512 mx[HEADS_PER_ITEM];
    for (int h = 0; h < nh; h++) mx[h] = _mm512_set1_ps(sink[h]);
    if (K->tiled) { /* the keys' tiles, a run at a time (tiled_scores) */
        _Alignas(64) float qs[HEADS_PER_ITEM][HD];
        for (int h = 0; h < HEADS_PER_ITEM; h++)
            for (int d = 0; d < HD; d++) qs[h][d] = h < nh ? q[(size_t)h * HD + d] * scale : 0.0f;
        for (int64_t j0 = 0; j0 < n;) {
            const uint8_t *at;
            int64_t w;
            const int nk = kv_tiled_run(K, lo + j0, n - j0, n_slots, &at, &w);
            if (at + KV_TILE * K->row < K->base + (size_t)n_slots * K->row) /* the next tile, into L1 */
                for (size_t b = 0; b < KV_TILE * K->row; b += 64) _mm_prefetch((const char *)(at + KV_TILE * K->row + b), _MM_HINT_T0);
            tiled_scores(K, at, w, nk, qs, nh, scores, n, j0, mx);
            j0 += nk;
        }
    }
    /* keys in rows (Q8_0): per tile of 16 keys (converted once, for every head of the item) and per
     * head, one register of partial products per key, then hsum16: 16 accumulators and the head's
     * query in registers */
    for (int64_t j0 = 0; j0 < n && !K->tiled; j0 += KV_TILE) {
        const int nk = n - j0 < KV_TILE ? (int)(n - j0) : KV_TILE;
        load_tile(tile, K, lo + j0, nk, n_slots, HD);
        const __mmask16 live = (__mmask16)((1u << nk) - 1);
        for (int h = 0; h < nh; h++) {
            const float *qh = q + (size_t)h * HD;
            const __m512 q0 = _mm512_loadu_ps(qh), q1 = _mm512_loadu_ps(qh + 16), q2 = _mm512_loadu_ps(qh + 32),
                         q3 = _mm512_loadu_ps(qh + 48);
            __m512 acc[KV_TILE];
            for (int j = 0; j < KV_TILE; j++) {
                if (j >= nk) {
                    acc[j] = _mm512_setzero_ps();
                    continue;
                }
                const float *k = tile + j * HD;
                __m512 a = _mm512_mul_ps(q0, _mm512_loadu_ps(k));
                a = _mm512_fmadd_ps(q1, _mm512_loadu_ps(k + 16), a);
                a = _mm512_fmadd_ps(q2, _mm512_loadu_ps(k + 32), a);
                acc[j] = _mm512_fmadd_ps(q3, _mm512_loadu_ps(k + 48), a);
            }
            const __m512 sc = _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(scores + h * n + j0, live, sc);
            mx[h] = _mm512_mask_max_ps(mx[h], live, mx[h], sc);
        }
    }
    /* softmax with the sink in the denominator (as the generic loop: exp in float, the sum in double,
     * in order), four vectors of exponentials an iteration (one at a time they waited on each other's
     * latency chains); then each weight times the head's 1 / denominator, in place */
    for (int h = 0; h < nh; h++) {
        const float m = _mm512_reduce_max_ps(mx[h]);
        float *sh = scores + h * n;
        __m512d sum = _mm512_setzero_pd();
        int64_t j = 0;
        for (; j + 64 <= n; j += 64) {
            __m512 e[4];
            for (int u = 0; u < 4; u++) e[u] = pe_exp512(_mm512_sub_ps(_mm512_loadu_ps(sh + j + 16 * u), _mm512_set1_ps(m)));
            for (int u = 0; u < 4; u++) {
                _mm512_storeu_ps(sh + j + 16 * u, e[u]);
                sum = _mm512_add_pd(sum, _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(e[u])),
                                                       _mm512_cvtps_pd(_mm512_extractf32x8_ps(e[u], 1))));
            }
        }
        for (; j < n; j += 16) {
            const __mmask16 live = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
            const __m512 e = _mm512_maskz_mov_ps(live, pe_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, sh + j),
                                                                                _mm512_set1_ps(m))));
            _mm512_mask_storeu_ps(sh + j, live, e);
            sum = _mm512_add_pd(sum, _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(e)),
                                                   _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1))));
        }
        const float inv = (float)(1.0 / (exp((double)sink[h] - m) + _mm512_reduce_add_pd(sum)));
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 live = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
            _mm512_mask_storeu_ps(sh + j, live, _mm512_mul_ps(_mm512_maskz_loadu_ps(live, sh + j), _mm512_set1_ps(inv)));
        }
    }
    /* values: per tile of 16, four heads at a time (value_rows); an f16 cache's rows are converted as
     * they are read, the other types' go through the tile */
    for (int h = 0; h < nh; h++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + (size_t)h * HD + 16 * c, _mm512_setzero_ps());
    for (int64_t j0 = 0; j0 < n; j0 += KV_TILE) {
        const int nk = n - j0 < KV_TILE ? (int)(n - j0) : KV_TILE;
        const int f16 = V->type == PE_TYPE_F16;
        if (!f16) load_tile(tile, V, lo + j0, nk, n_slots, HD);
        const int64_t slot0 = (lo + j0) % n_slots;
        int h = 0;
        for (; h + 4 <= nh; h += 4) {
            if (f16) value_rows(4, 1, V, tile, slot0, n_slots, nk, scores + h * n + j0, n, o + (size_t)h * HD, h == 0);
            else value_rows(4, 0, V, tile, slot0, n_slots, nk, scores + h * n + j0, n, o + (size_t)h * HD, 0);
        }
        for (; h < nh; h++)
            value_rows(1, f16, V, tile, slot0, n_slots, nk, scores + h * n + j0, n, o + (size_t)h * HD, h == 0);
    }
}
