/* Activations quantized once per token for the int8 kernels (see pe_act_q8 in quants.h). The
 * rounding is C's roundf (half away from zero), as ggml's quantize_row_q8_0. A decoded token
 * quantizes a few hundred vectors (every product's input), so the blocks go through AVX-512 or AVX2
 * where int8 kernels run (a scalar pass took ~10 % of a 20b decode step); the scalar loop is the
 * fallback, and all three give the same bits. The base-256 digits xh / xl and the int16 X (see
 * pe_act_q8) are written here once per token, in the order the decode kernels read them (AVX-512:
 * xh / xl, AVX2: x16), instead of being rebuilt by those kernels for every group of rows. */
#include <math.h>
#include <string.h>

#include "cpu_features.h"
#include "quants.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define PE_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

/* roundf of each lane (|v| < 2^23, so |v| - trunc(|v|) is exact). */
PE_AVX512_FN static inline __m512 round_away16(__m512 v) {
    const __m512 a = _mm512_abs_ps(v);
    __m512 t = _mm512_roundscale_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(a, t), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    t = _mm512_mask_add_ps(t, up, t, _mm512_set1_ps(1.0f));
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));
}

/* Block b: codes, digits, scale and the per-16 sums (s16[0..2), s16x[0..2)); half h of the base-256
 * digits at xh + 64 h, xl + 64 h. */
PE_AVX512_FN static void block_avx512(const float *xb, int8_t *qs, int8_t *ql, float *d, int sum[2], int suml[2],
                                      int8_t *xh, int8_t *xl, int16_t *x16) {
    const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
    *d = db;
    const __m512 vid = _mm512_set1_ps(id);
    for (int h = 0; h < 2; h++) {
        const __m512 v = _mm512_mul_ps(h ? v1 : v0, vid);
        const __m512 q = round_away16(v);
        const __m512i qi = _mm512_cvttps_epi32(q);
        const __m512i li = _mm512_cvttps_epi32(round_away16(_mm512_mul_ps(_mm512_sub_ps(v, q), _mm512_set1_ps(254.0f))));
        _mm_storeu_si128((__m128i *)(qs + 16 * h), _mm512_cvtepi32_epi8(qi));
        _mm_storeu_si128((__m128i *)(ql + 16 * h), _mm512_cvtepi32_epi8(li));
        /* X = 254 q + ql = 256 hi + lo: lo = X wrapped to int8, hi = (X - lo) / 256 */
        const __m512i X = _mm512_add_epi32(_mm512_mullo_epi32(qi, _mm512_set1_epi32(254)), li);
        const __m512i lo = _mm512_srai_epi32(_mm512_slli_epi32(X, 24), 24);
        _mm_storeu_si128((__m128i *)(xh + 64 * h), _mm512_cvtepi32_epi8(_mm512_srai_epi32(_mm512_sub_epi32(X, lo), 8)));
        _mm_storeu_si128((__m128i *)(xl + 64 * h), _mm512_cvtepi32_epi8(lo));
        const __m256i X16 = _mm512_cvtepi32_epi16(X); /* elements 16 h .. + 7 in A, + 8 .. + 15 in B */
        _mm_storeu_si128((__m128i *)(x16 + 8 * h), _mm256_castsi256_si128(X16));
        _mm_storeu_si128((__m128i *)(x16 + 16 + 8 * h), _mm256_extracti128_si256(X16, 1));
        sum[h] = _mm512_reduce_add_epi32(qi);
        suml[h] = _mm512_reduce_add_epi32(li);
    }
}

#define PE_AVX2_FN __attribute__((target("avx2")))

/* round_away16 on 8 lanes (no FMA: the same single roundings as the scalar loop). */
PE_AVX2_FN static inline __m256 round_away8(__m256 v) {
    const __m256 sign = _mm256_set1_ps(-0.0f), a = _mm256_andnot_ps(sign, v);
    __m256 t = _mm256_round_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 up = _mm256_cmp_ps(_mm256_sub_ps(a, t), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    t = _mm256_add_ps(t, _mm256_and_ps(up, _mm256_set1_ps(1.0f)));
    return _mm256_or_ps(t, _mm256_and_ps(v, sign));
}

/* Eight int32 lanes (each within int8) as eight bytes at dst. */
PE_AVX2_FN static inline void store8(int8_t *dst, __m256i v) {
    const __m256i t = _mm256_packs_epi16(_mm256_packs_epi32(v, v), _mm256_setzero_si256());
    _mm_storel_epi64((__m128i *)dst, _mm_unpacklo_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1)));
}

/* block_avx512 on AVX2, eight elements at a time. */
PE_AVX2_FN static void block_avx2(const float *xb, int8_t *qs, int8_t *ql, float *d, int sum[2], int suml[2],
                                  int8_t *xh, int8_t *xl, int16_t *x16) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(xb));
    for (int k = 1; k < 4; k++) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 8 * k)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
    *d = db;
    const __m256 vid = _mm256_set1_ps(id);
    __m256i sq[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, sl[2] = {sq[0], sq[1]};
    for (int k = 0; k < 4; k++) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xb + 8 * k), vid);
        const __m256 q = round_away8(v);
        const __m256i qi = _mm256_cvttps_epi32(q);
        const __m256i li = _mm256_cvttps_epi32(round_away8(_mm256_mul_ps(_mm256_sub_ps(v, q), _mm256_set1_ps(254.0f))));
        store8(qs + 8 * k, qi);
        store8(ql + 8 * k, li);
        const __m256i X = _mm256_add_epi32(_mm256_mullo_epi32(qi, _mm256_set1_epi32(254)), li);
        const __m256i lo = _mm256_srai_epi32(_mm256_slli_epi32(X, 24), 24);
        const int at = 64 * (k / 2) + 8 * (k % 2); /* element 16 h + j of the block (see pe_act_q8) */
        store8(xh + at, _mm256_srai_epi32(_mm256_sub_epi32(X, lo), 8));
        store8(xl + at, lo);
        /* elements 8 k .. 8 k + 7: A's first or second eight (k even), B's (k odd) */
        const __m256i X16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(X, X), 0x08);
        _mm_storeu_si128((__m128i *)(x16 + 16 * (k % 2) + 8 * (k / 2)), _mm256_castsi256_si128(X16));
        sq[k / 2] = _mm256_add_epi32(sq[k / 2], qi);
        sl[k / 2] = _mm256_add_epi32(sl[k / 2], li);
    }
    for (int h = 0; h < 2; h++) {
        int32_t a[8], b[8];
        _mm256_storeu_si256((__m256i *)a, sq[h]);
        _mm256_storeu_si256((__m256i *)b, sl[h]);
        sum[h] = suml[h] = 0;
        for (int i = 0; i < 8; i++) sum[h] += a[i], suml[h] += b[i];
    }
}
#endif

enum { PE_ACT_PAD = 128 }; /* zero codes past the end: four blocks */

static size_t align64(size_t b) { return (b + 63) & ~(size_t)63; }

/* Bytes of xh or xl: n rounded up to whole 128-element groups, plus a zero group. */
static size_t b256_bytes(int64_t n) { return ((size_t)n + 127) / 128 * 128 + PE_ACT_PAD; }

size_t pe_act_q8_bytes(int64_t n) {
    const size_t nb = (size_t)n / 32;
    return align64((size_t)n + PE_ACT_PAD) * 2 + align64((nb + 4) * 4) * 4 + align64((2 * nb + 8) * 4) * 2 +
           align64(b256_bytes(n)) * 2 + align64(((size_t)n + PE_ACT_PAD) * 2);
}

/* Where element j of a block goes in its 32 values of x16 (A: 0-7, 16-23; B: 8-15, 24-31). */
static int x16_pos(int j) { return j < 8 || j >= 24 ? j : j < 16 ? j + 8 : j - 8; }

/* Where element 32 b + 16 h of the 32-block order goes in xh / xl (see pe_act_q8). */
static size_t b256_pos(int64_t b, int h) { return (size_t)(128 * (b / 4) + 64 * h + 16 * (b % 4)); }

/* round-half-away-from-zero as an int (|v| <= 127.5 here) */
static int round_away(float v) { return (int)roundf(v); }

pe_act_q8 pe_act_q8_quantize(const float *x, int64_t n, void *buf) {
    const int64_t nb = n / 32;
    int8_t *qs = buf;
    int8_t *ql = qs + align64((size_t)n + PE_ACT_PAD);
    float *d = (float *)(ql + align64((size_t)n + PE_ACT_PAD));
    float *s32 = (float *)((uint8_t *)d + align64((size_t)(nb + 4) * 4));
    float *s32x = (float *)((uint8_t *)s32 + align64((size_t)(nb + 4) * 4));
    float *s16 = (float *)((uint8_t *)s32x + align64((size_t)(nb + 4) * 4));
    float *s16x = (float *)((uint8_t *)s16 + align64((size_t)(2 * nb + 8) * 4));
    int8_t *xh = (int8_t *)((uint8_t *)s16x + align64((size_t)(2 * nb + 8) * 4));
    int8_t *xl = xh + align64(b256_bytes(n));
    int16_t *x16 = (int16_t *)(xl + align64(b256_bytes(n)));
    float *dk = (float *)((uint8_t *)x16 + align64(((size_t)n + PE_ACT_PAD) * 2));
    /* the last, partial group and the padding group stay zero where no block writes */
    const size_t filled = (size_t)(128 * (nb / 4));
    memset(xh + filled, 0, b256_bytes(n) - filled);
    memset(xl + filled, 0, b256_bytes(n) - filled);
#if defined(__x86_64__)
    const pe_simd_level simd = pe_simd_level_get();
#endif
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + 32 * b;
        int sum[2] = {0, 0}, suml[2] = {0, 0};
#if defined(__x86_64__)
        if (simd >= PE_SIMD_AVX512) {
            block_avx512(xb, qs + 32 * b, ql + 32 * b, d + b, sum, suml, xh + b256_pos(b, 0), xl + b256_pos(b, 0), x16 + 32 * b);
            goto sums;
        }
        if (simd == PE_SIMD_AVX2) {
            block_avx2(xb, qs + 32 * b, ql + 32 * b, d + b, sum, suml, xh + b256_pos(b, 0), xl + b256_pos(b, 0), x16 + 32 * b);
            goto sums;
        }
#endif
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        for (int j = 0; j < 32; j++) {
            const float v = xb[j] * id;
            const int q = round_away(v);
            const int l = round_away((v - (float)q) * 254.0f); /* v - q is exact: |v - q| <= 0.5 */
            qs[32 * b + j] = (int8_t)q;
            ql[32 * b + j] = (int8_t)l;
            const int X = 254 * q + l, lo = ((X & 0xff) ^ 0x80) - 0x80; /* X = 256 hi + lo */
            xh[b256_pos(b, j / 16) + j % 16] = (int8_t)((X - lo) / 256);
            xl[b256_pos(b, j / 16) + j % 16] = (int8_t)lo;
            x16[32 * b + x16_pos(j)] = (int16_t)X;
            sum[j / 16] += q;
            suml[j / 16] += l;
        }
        d[b] = db;
#if defined(__x86_64__)
    sums:
#endif
        dk[b] = d[b] * (1.0f / 254.0f);
        s32[b] = (float)(sum[0] + sum[1]);
        s32x[b] = (float)(254 * (sum[0] + sum[1]) + suml[0] + suml[1]);
        s16x[2 * b] = (float)(254 * sum[0] + suml[0]);
        s16x[2 * b + 1] = (float)(254 * sum[1] + suml[1]);
        s16[2 * b] = (float)sum[0];
        s16[2 * b + 1] = (float)sum[1];
    }
    memset(qs + n, 0, PE_ACT_PAD);
    memset(ql + n, 0, PE_ACT_PAD);
    memset(x16 + n, 0, PE_ACT_PAD * sizeof(int16_t));
    memset(d + nb, 0, 4 * sizeof(float));
    memset(dk + nb, 0, 4 * sizeof(float));
    memset(s32 + nb, 0, 4 * sizeof(float));
    memset(s32x + nb, 0, 4 * sizeof(float));
    memset(s16 + 2 * nb, 0, 8 * sizeof(float));
    memset(s16x + 2 * nb, 0, 8 * sizeof(float));
    return (pe_act_q8){qs, ql, d, s32, s16, s32x, s16x, xh, xl, x16, dk};
}
