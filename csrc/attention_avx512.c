/* The attention inner loop for AVX-512 (see attention_heads.h). Heads of 64 elements (gpt-oss) take
 * explicit intrinsics; other sizes the generic loop compiled with these flags.
 *
 * Why by hand: compiled from the generic C, a key's score ended in a 16-step scalar sum and a value's
 * weighted add went through memory (the output row stored and reloaded for every key): ~60 % of the
 * inner loop's time (perf annotate, depth 4096). Here a score is four FMAs into one register, and 16
 * keys' registers are summed across lanes together (hsum16: 15 shuffles and adds for 16 scores); the
 * outputs of the item's four heads stay in 16 registers over all keys; f16 caches (the default) are
 * read straight from the cache, and the softmax's exponentials are vectorized (vexp_avx512.h). */
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

/* Row j (j < nk) of a tile of 16 keys or values at positions first.., as four registers: f16 caches
 * straight from the cache (F16C), other types from the tile load_tile filled; rows past nk are 0. */
static inline void row4(const kv_rows *R, const float *tile, int64_t first, int j, int nk, int64_t n_slots,
                        __m512 r[4]) {
    if (j >= nk) {
        r[0] = r[1] = r[2] = r[3] = _mm512_setzero_ps();
    } else if (R->type == PE_TYPE_F16) {
        const uint8_t *h = R->base + (size_t)((first + j) % n_slots) * R->row;
        for (int c = 0; c < 4; c++) r[c] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + 32 * c)));
    } else {
        for (int c = 0; c < 4; c++) r[c] = _mm512_loadu_ps(tile + (size_t)j * HD + 16 * c);
    }
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
    /* scores: per tile of 16 keys and per head, one register of partial products per key, then hsum16 */
    for (int64_t j0 = 0; j0 < n; j0 += KV_TILE) {
        const int nk = n - j0 < KV_TILE ? (int)(n - j0) : KV_TILE;
        if (K->type != PE_TYPE_F16) load_tile(tile, K, lo + j0, nk, n_slots, HD);
        const __mmask16 live = (__mmask16)((1u << nk) - 1);
        __m512 acc[HEADS_PER_ITEM][KV_TILE];
        for (int j = 0; j < KV_TILE; j++) {
            __m512 k[4];
            row4(K, tile, lo + j0, j, nk, n_slots, k);
            for (int h = 0; h < nh; h++) {
                const float *qh = q + (size_t)h * HD;
                __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qh), k[0]);
                a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16), k[1], a);
                a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 32), k[2], a);
                acc[h][j] = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 48), k[3], a);
            }
        }
        for (int h = 0; h < nh; h++) {
            const __m512 sc = _mm512_mul_ps(hsum16(acc[h]), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(scores + h * n + j0, live, sc);
            mx[h] = _mm512_mask_max_ps(mx[h], live, mx[h], sc);
        }
    }
    /* softmax with the sink in the denominator (as the generic loop: exp in float, the sum in double) */
    float inv[HEADS_PER_ITEM] = {0};
    for (int h = 0; h < nh; h++) {
        const float m = _mm512_reduce_max_ps(mx[h]);
        float *sh = scores + h * n;
        __m512d sum = _mm512_setzero_pd();
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 live = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
            const __m512 e = _mm512_maskz_mov_ps(live, pe_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, sh + j),
                                                                                _mm512_set1_ps(m))));
            _mm512_mask_storeu_ps(sh + j, live, e);
            sum = _mm512_add_pd(sum, _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(e)),
                                                   _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1))));
        }
        inv[h] = (float)(1.0 / (exp((double)sink[h] - m) + _mm512_reduce_add_pd(sum)));
    }
    /* values: the item's heads' outputs in registers over every key (heads past nh get weight 0) */
    __m512 out[HEADS_PER_ITEM][4];
    for (int h = 0; h < HEADS_PER_ITEM; h++)
        for (int c = 0; c < 4; c++) out[h][c] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < n; j0 += KV_TILE) {
        const int nk = n - j0 < KV_TILE ? (int)(n - j0) : KV_TILE;
        if (V->type != PE_TYPE_F16) load_tile(tile, V, lo + j0, nk, n_slots, HD);
        for (int j = 0; j < nk; j++) {
            __m512 v[4];
            row4(V, tile, lo + j0, j, nk, n_slots, v);
            for (int h = 0; h < HEADS_PER_ITEM; h++) {
                const __m512 w = _mm512_set1_ps(h < nh ? scores[h * n + j0 + j] * inv[h] : 0.0f);
                for (int c = 0; c < 4; c++) out[h][c] = _mm512_fmadd_ps(w, v[c], out[h][c]);
            }
        }
    }
    for (int h = 0; h < nh; h++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + (size_t)h * HD + 16 * c, out[h][c]);
}
