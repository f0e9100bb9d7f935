/* AVX2 kernels (+ FMA, F16C), 8 float32 lanes, for CPUs without AVX-512. Hot formats (float rows,
 * Q8_0, Q4_0, MXFP4) have fused dot kernels, and so have Q4_1, Q5_0, Q5_1 and the K-quants through
 * their 16-element chunks (quant_chunks.h). Dequantization stays bit-identical to the reference
 * (-ffp-contract=off). */
#include "quants_impl.h"
#include "quant_chunks.h"

#include <immintrin.h>
#include <string.h>

static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

static inline float half_scale(uint8_t e) {
    const uint32_t bits = pe_e8m0_half_bits(e);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Fixed-order horizontal sum of 8 lanes. */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 i8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

/* ---- float rows: 8-lane main loop, then a scalar tail added in index order ------------------------ */

#define PE_FLOAT_DOT(name, load8, elem_t, convert)                                            \
    static float name(const void *row, const float *x, int64_t n) {                           \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                            \
        int64_t i = 0;                                                                        \
        for (; i + 32 <= n; i += 32) {                                                        \
            a0 = _mm256_fmadd_ps(load8(row, i), _mm256_loadu_ps(x + i), a0);                  \
            a1 = _mm256_fmadd_ps(load8(row, i + 8), _mm256_loadu_ps(x + i + 8), a1);          \
            a2 = _mm256_fmadd_ps(load8(row, i + 16), _mm256_loadu_ps(x + i + 16), a2);        \
            a3 = _mm256_fmadd_ps(load8(row, i + 24), _mm256_loadu_ps(x + i + 24), a3);        \
        }                                                                                     \
        for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(load8(row, i), _mm256_loadu_ps(x + i), a0); \
        float sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));        \
        for (; i < n; i++) sum += convert(((const elem_t *)row)[i]) * x[i];                   \
        return sum;                                                                           \
    }

#define LD_F32(r, i) _mm256_loadu_ps((const float *)(r) + (i))
#define LD_F16(r, i) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)(r) + (i))))
#define LD_BF16(r, i) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)(r) + (i)))), 16))
#define PE_IDENTITY(v) (v)

PE_FLOAT_DOT(dot_f32, LD_F32, float, PE_IDENTITY)
PE_FLOAT_DOT(dot_f16, LD_F16, uint16_t, pe_fp16_to_fp32)
PE_FLOAT_DOT(dot_bf16, LD_BF16, uint16_t, pe_bf16_to_fp32)

/* The KV cache's f16: F16C conversions (round to nearest even, exact as the scalar ones; a signalling
 * NaN keeps its bits as in pe_fp16_to_fp32, where vcvtph2ps would set its quiet bit). */
static void dequant_f16(const void *src, float *dst, int64_t n) {
    const uint16_t *s = src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128((const __m128i *)(s + i));
        const __m256i x = _mm256_cvtepu16_epi32(h);
        const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7fff)), _mm256_set1_epi32(0x7c00));
        __m256 f = _mm256_cvtph_ps(h);
        if (!_mm256_testz_si256(nan, nan)) {
            const __m256i bits = _mm256_or_si256(
                _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x8000)), 16),
                                _mm256_set1_epi32(0x7f800000)),
                _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x3ff)), 13));
            f = _mm256_blendv_ps(f, _mm256_castsi256_ps(bits), _mm256_castsi256_ps(nan));
        }
        _mm256_storeu_ps(dst + i, f);
    }
    for (; i < n; i++) dst[i] = pe_fp16_to_fp32(s[i]);
}

static void quant_f16(const float *src, void *dst, int64_t n) {
    uint16_t *d = dst;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) d[i] = pe_fp32_to_fp16(src[i]);
}

/* ---- 32-element blocks: codes as 4 x 8 int8 -> float ------------------------------------------- */

static inline void i8x32_to_ps(__m128i lo16, __m128i hi16, __m256 v[4]) {
    v[0] = i8x8_to_ps(lo16);
    v[1] = i8x8_to_ps(_mm_srli_si128(lo16, 8));
    v[2] = i8x8_to_ps(hi16);
    v[3] = i8x8_to_ps(_mm_srli_si128(hi16, 8));
}

/* Low and high nibbles of 16 bytes mapped through a 16-entry int8 table. */
static inline void nib_lookup(const uint8_t *qs, __m128i table, __m256 v[4]) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qs), m = _mm_set1_epi8(15);
    const __m128i lo = _mm_shuffle_epi8(table, _mm_and_si128(q, m));
    const __m128i hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(q, 4), m));
    i8x32_to_ps(lo, hi, v);
}

static __m128i mxfp4_table(void) { return _mm_loadu_si128((const __m128i *)pe_mxfp4_values); }
static __m128i q4_0_table(void) { return _mm_setr_epi8(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7); }

/* acc + d * (codes . x[0..32)) */
static inline __m256 dot_codes(const __m256 v[4], const float *x, float d, __m256 acc) {
    __m256 t = _mm256_mul_ps(v[0], _mm256_loadu_ps(x));
    t = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(x + 8), t);
    t = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(x + 16), t);
    t = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(x + 24), t);
    return _mm256_fmadd_ps(t, _mm256_set1_ps(d), acc);
}

static inline void store_scaled(float *dst, const __m256 v[4], float d) {
    const __m256 vd = _mm256_set1_ps(d);
    for (int k = 0; k < 4; k++) _mm256_storeu_ps(dst + 8 * k, _mm256_mul_ps(vd, v[k]));
}

static void dequant_q8_0(const void *src, float *dst, int64_t n) {
    const pe_block_q8_0 *b = src;
    for (int64_t i = 0; i < n / PE_QK; i++, b++, dst += PE_QK) {
        __m256 v[4];
        i8x32_to_ps(_mm_loadu_si128((const __m128i *)b->qs), _mm_loadu_si128((const __m128i *)b->qs + 1), v);
        store_scaled(dst, v, h2f(b->d));
    }
}

static void dequant_mxfp4(const void *src, float *dst, int64_t n) {
    const pe_block_mxfp4 *b = src;
    const __m128i table = mxfp4_table();
    for (int64_t i = 0; i < n / PE_QK; i++, b++, dst += PE_QK) {
        __m256 v[4];
        nib_lookup(b->qs, table, v);
        store_scaled(dst, v, half_scale(b->e));
    }
}

static void dequant_q4_0(const void *src, float *dst, int64_t n) {
    const pe_block_q4_0 *b = src;
    const __m128i table = q4_0_table();
    for (int64_t i = 0; i < n / PE_QK; i++, b++, dst += PE_QK) {
        __m256 v[4];
        nib_lookup(b->qs, table, v);
        store_scaled(dst, v, h2f(b->d));
    }
}

#define PE_SUM4(a) hsum(_mm256_add_ps(_mm256_add_ps((a)[0], (a)[1]), _mm256_add_ps((a)[2], (a)[3])))

/* Four block accumulators in registers, blocks dealt round-robin; the tail goes to the first. */
#define PE_DOT4(blocks, nb, x, step)                                                            \
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
    int64_t i = 0;                                                                              \
    for (; i + 4 <= (nb); i += 4) {                                                             \
        a[0] = step((blocks) + i, (x) + PE_QK * i, a[0]);                                       \
        a[1] = step((blocks) + i + 1, (x) + PE_QK * (i + 1), a[1]);                             \
        a[2] = step((blocks) + i + 2, (x) + PE_QK * (i + 2), a[2]);                             \
        a[3] = step((blocks) + i + 3, (x) + PE_QK * (i + 3), a[3]);                             \
    }                                                                                           \
    for (; i < (nb); i++) a[0] = step((blocks) + i, (x) + PE_QK * i, a[0]);                     \
    return PE_SUM4(a)

static inline __m256 step_q8_0(const pe_block_q8_0 *b, const float *x, __m256 acc) {
    __m256 v[4];
    i8x32_to_ps(_mm_loadu_si128((const __m128i *)b->qs), _mm_loadu_si128((const __m128i *)b->qs + 1), v);
    return dot_codes(v, x, h2f(b->d), acc);
}

static inline __m256 step_nib(const uint8_t *qs, const float *x, float scale, __m128i table, __m256 acc) {
    __m256 v[4];
    nib_lookup(qs, table, v);
    return dot_codes(v, x, scale, acc);
}

#define STEP_MXFP4(b, x, acc) step_nib((b)->qs, x, half_scale((b)->e), table, acc)
#define STEP_Q4_0(b, x, acc) step_nib((b)->qs, x, h2f((b)->d), table, acc)

static float dot_q8_0(const void *row, const float *x, int64_t n) {
    PE_DOT4((const pe_block_q8_0 *)row, n / PE_QK, x, step_q8_0);
}

static float dot_mxfp4(const void *row, const float *x, int64_t n) {
    const __m128i table = mxfp4_table();
    PE_DOT4((const pe_block_mxfp4 *)row, n / PE_QK, x, STEP_MXFP4);
}

static float dot_q4_0(const void *row, const float *x, int64_t n) {
    const __m128i table = q4_0_table();
    PE_DOT4((const pe_block_q4_0 *)row, n / PE_QK, x, STEP_Q4_0);
}

/* ---- Q4_1, Q5_0, Q5_1 and the K-quants: 16-element chunks (quant_chunks.h) ------------------------ */

/* A chunk's 16 codes as two vectors of 8 floats. */
static inline __attribute__((always_inline)) void chunk_ps(__m128i q, const int sgn, __m256 *lo, __m256 *hi) {
    const __m128i q8 = _mm_srli_si128(q, 8);
    *lo = _mm256_cvtepi32_ps(sgn ? _mm256_cvtepi8_epi32(q) : _mm256_cvtepu8_epi32(q));
    *hi = _mm256_cvtepi32_ps(sgn ? _mm256_cvtepi8_epi32(q8) : _mm256_cvtepu8_epi32(q8));
}

/* dst[0..16) = dl * q - ml (signed codes: dl * q), the reference's unfused float32 operations. */
static inline __attribute__((always_inline)) void put16(float *dst, __m128i q, float d, float m, const int sgn) {
    __m256 lo, hi;
    chunk_ps(q, sgn, &lo, &hi);
    const __m256 dl = _mm256_set1_ps(d), ml = _mm256_set1_ps(m);
    _mm256_storeu_ps(dst, sgn ? _mm256_mul_ps(dl, lo) : _mm256_sub_ps(_mm256_mul_ps(dl, lo), ml));
    _mm256_storeu_ps(dst + 8, sgn ? _mm256_mul_ps(dl, hi) : _mm256_sub_ps(_mm256_mul_ps(dl, hi), ml));
}

/* Per chunk: dl * (q . x) into one of two accumulators, ml * sum(x) into another pair (formats with a
 * minimum), all in registers (no dequantized buffer); the accumulators summed in a fixed order. */
#define PE_CHUNK_KERNELS(name, TYPE, blk_t, blck)                                                   \
    PE_CHUNK_DEQUANT(name, TYPE, blk_t, blck)                                                       \
    static float dot_##name(const void *row, const float *x, int64_t n) {                           \
        const blk_t *b = row;                                                                       \
        __m256 aq[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, am[2] = {aq[0], aq[0]};          \
        for (int64_t i = 0; i < n / (blck); i++, b++, x += (blck))                                  \
            PE_FOR_CHUNKS(TYPE, name, b, {                                                               \
                const __m256 x0 = _mm256_loadu_ps(x + 16 * c), x1 = _mm256_loadu_ps(x + 16 * c + 8); \
                __m256 lo, hi;                                                                      \
                chunk_ps(q, PE_SIGNED_##TYPE, &lo, &hi);                                         \
                const __m256 t = _mm256_fmadd_ps(lo, x0, _mm256_mul_ps(hi, x1));                    \
                aq[c & 1] = _mm256_fmadd_ps(t, _mm256_set1_ps(dl[c]), aq[c & 1]);                   \
                if (!PE_SIGNED_##TYPE)                                                              \
                    am[c & 1] = _mm256_fmadd_ps(_mm256_add_ps(x0, x1), _mm256_set1_ps(ml[c]), am[c & 1]); \
            });                                                                                     \
        return hsum(_mm256_sub_ps(_mm256_add_ps(aq[0], aq[1]), _mm256_add_ps(am[0], am[1])));      \
    }

PE_CHUNK_FORMATS(PE_CHUNK_KERNELS)

void pe_kernels_avx2(int type, pe_kernel_set *k) {
    switch (type) {
    case PE_TYPE_F32: k->dot_f32 = dot_f32; break;
    case PE_TYPE_F16: k->dequant_row = dequant_f16, k->dot_f32 = dot_f16, k->quantize_row = quant_f16; break;
    case PE_TYPE_BF16: k->dot_f32 = dot_bf16; break;
    case PE_TYPE_Q4_0: k->dequant_row = dequant_q4_0, k->dot_f32 = dot_q4_0; break;
    case PE_TYPE_Q4_1: k->dequant_row = dequant_q4_1, k->dot_f32 = dot_q4_1; break;
    case PE_TYPE_Q5_0: k->dequant_row = dequant_q5_0, k->dot_f32 = dot_q5_0; break;
    case PE_TYPE_Q5_1: k->dequant_row = dequant_q5_1, k->dot_f32 = dot_q5_1; break;
    case PE_TYPE_Q8_0: k->dequant_row = dequant_q8_0, k->dot_f32 = dot_q8_0; break;
    case PE_TYPE_MXFP4: k->dequant_row = dequant_mxfp4, k->dot_f32 = dot_mxfp4; break;
    case PE_TYPE_Q2_K: k->dequant_row = dequant_q2_k, k->dot_f32 = dot_q2_k; break;
    case PE_TYPE_Q3_K: k->dequant_row = dequant_q3_k, k->dot_f32 = dot_q3_k; break;
    case PE_TYPE_Q4_K: k->dequant_row = dequant_q4_k, k->dot_f32 = dot_q4_k; break;
    case PE_TYPE_Q5_K: k->dequant_row = dequant_q5_k, k->dot_f32 = dot_q5_k; break;
    case PE_TYPE_Q6_K: k->dequant_row = dequant_q6_k, k->dot_f32 = dot_q6_k; break;
    default: break;
    }
    k->dot_q8 = pe_dot_q8_avx2(type);
    k->dot_q8_tok = pe_dot_q8_tok_avx2(type);
}
