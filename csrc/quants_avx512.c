/* AVX-512 kernels (F/BW/VL/DQ/VNNI + F16C/FMA): 16 float32 lanes, int8 dots with vpdpbusd.
 * Dequantization reproduces the scalar reference bit for bit (same float32 products, no FMA: this
 * file is built with -ffp-contract=off); dots accumulate in lanes with explicit FMA and reduce in a
 * fixed order, so they are deterministic but differ from the scalar dot in the last bits. */
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

static inline __m512 u8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }
static inline __m512 i8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }

/* ---- float rows ------------------------------------------------------------------------------ */

/* One row's dot against T tokens (x + t * ldx), T a constant, per token four accumulators a_j taking
 * the 16 elements at 64 k + 16 j, then the 16-element chunks and a masked tail into a0, summed
 * (a0 + a1) + (a2 + a3) and reduced; the register-blocked gemm (gemm_avx512.c) sums in this order too.
 * A span runs the 64-element steps of [i, end) on the accumulators acc[4 t + j]; with out it then adds
 * the tail up to n and writes out[t * ldo], else it stores the accumulators back. Each token's
 * arithmetic depends neither on T nor on how the row is cut into spans, so the several-token form
 * gives every token the bits of the one-token dot.
 * One token (decode) takes FLOAT_ONE_UNROLL steps per loop pass and loads an F16 row into a register
 * before converting it (load16_one): the same sums in the same order, but on Zen 4 the one-row loop
 * of 64 elements a pass with vcvtph2ps reading memory streamed F16 at 63-70 % of the bandwidth
 * probe, BF16 at 75-85 % and F32 at 71-86 %; four steps a pass and the F16 load apart read 90-94 %,
 * 91-97 % and 81-89 % (pyengine-bench-kernels, 2 threads, ~66 GB/s probes, paired runs,
 * bench/RESULTS.md 2026-12-05). Several tokens keep one step a pass and the folded F16 load. */
enum { FLOAT_ONE_UNROLL = 4 };
#define PE_FLOAT_DOT(name, load16, load16_one, loadmask, esize)                                   \
    static inline __attribute__((always_inline)) void name##_step(                                \
        const void *row, const float *x, int64_t ldx, const int T, int64_t i, __m512 a[][4]) {    \
        const __m512 w0 = T == 1 ? load16_one(row, i) : load16(row, i);                           \
        const __m512 w1 = T == 1 ? load16_one(row, i + 16) : load16(row, i + 16);                 \
        const __m512 w2 = T == 1 ? load16_one(row, i + 32) : load16(row, i + 32);                 \
        const __m512 w3 = T == 1 ? load16_one(row, i + 48) : load16(row, i + 48);                 \
        for (int t = 0; t < T; t++) {                                                             \
            const float *xt = x + t * ldx + i;                                                    \
            a[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xt), a[t][0]);                          \
            a[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xt + 16), a[t][1]);                     \
            a[t][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xt + 32), a[t][2]);                     \
            a[t][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xt + 48), a[t][3]);                     \
        }                                                                                         \
    }                                                                                             \
    static inline __attribute__((always_inline)) void name##_span(                                \
        const void *row, const float *x, int64_t ldx, const int T, int64_t i, int64_t end, int64_t n, \
        __m512 *acc, float *out, int64_t ldo) {                                                   \
        __m512 a[4][4];                                                                           \
        for (int t = 0; t < T; t++)                                                               \
            for (int j = 0; j < 4; j++) a[t][j] = acc[4 * t + j];                                 \
        if (T == 1)                                                                               \
            for (; i + 64 * FLOAT_ONE_UNROLL <= end; i += 64 * FLOAT_ONE_UNROLL)                  \
                for (int u = 0; u < FLOAT_ONE_UNROLL; u++) name##_step(row, x, ldx, T, i + 64 * u, a); \
        for (; i + 64 <= end; i += 64) name##_step(row, x, ldx, T, i, a);                         \
        if (!out) {                                                                               \
            for (int t = 0; t < T; t++)                                                           \
                for (int j = 0; j < 4; j++) acc[4 * t + j] = a[t][j];                             \
            return;                                                                               \
        }                                                                                         \
        for (; i + 16 <= n; i += 16) {                                                            \
            const __m512 w = load16(row, i);                                                      \
            for (int t = 0; t < T; t++) a[t][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * ldx + i), a[t][0]); \
        }                                                                                         \
        if (i < n) {                                                                              \
            const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);                                 \
            const __m512 w = loadmask(row, i, m);                                                 \
            for (int t = 0; t < T; t++)                                                           \
                a[t][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + t * ldx + i), a[t][0]); \
        }                                                                                         \
        for (int t = 0; t < T; t++)                                                               \
            out[t * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[t][0], a[t][1]),   \
                                                              _mm512_add_ps(a[t][2], a[t][3])));  \
    }                                                                                             \
    static float name(const void *row, const float *x, int64_t n) {                               \
        __m512 z[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}; \
        float s;                                                                                  \
        name##_span(row, x, 0, 1, 0, n, n, z, &s, 0);                                             \
        return s;                                                                                 \
    }                                                                                             \
    static inline __attribute__((always_inline)) void name##_tok_t(                               \
        const uint8_t *rows, int64_t stride, int nr, const float *x, int64_t ldx, const int T, int64_t n, \
        float *out, int64_t ldo) {                                                                \
        __m512 acc[PE_DOT_F32_ROWS][16];                                                          \
        const int64_t n64 = n / 64 * 64;                                                          \
        for (int r = 0; r < nr; r++)                                                              \
            for (int k = 0; k < 4 * T; k++) acc[r][k] = _mm512_setzero_ps();                      \
        for (int64_t c = 0; c < n64; c += FLOAT_TOK_SPAN) {                                       \
            const int64_t e = c + FLOAT_TOK_SPAN < n64 ? c + FLOAT_TOK_SPAN : n64;                \
            for (int r = 0; r < nr; r++) {                                                        \
                const uint8_t *row = rows + r * stride;                                           \
                for (int64_t p = e * (esize); p < (e + FLOAT_TOK_SPAN) * (esize) && p < n * (esize); p += 64) \
                    _mm_prefetch((const char *)row + p, _MM_HINT_T1);                             \
                name##_span(row, x, ldx, T, c, e, n, acc[r], NULL, 0);                            \
            }                                                                                     \
        }                                                                                         \
        for (int r = 0; r < nr; r++) name##_span(rows + r * stride, x, ldx, T, n64, n64, n, acc[r], out + r, ldo); \
    }                                                                                             \
    static void name##_tok(const uint8_t *rows, int64_t stride, int nr, const float *x, int64_t ldx, int n_tok, \
                           int64_t n, float *out, int64_t ldo) {                                  \
        for (int t0 = 0; t0 < n_tok; t0 += 4) {                                                   \
            const float *xt = x + t0 * ldx;                                                       \
            float *ot = out + t0 * ldo;                                                           \
            switch (n_tok - t0) {                                                                 \
            case 1: name##_tok_t(rows, stride, nr, xt, ldx, 1, n, ot, ldo); break;                \
            case 2: name##_tok_t(rows, stride, nr, xt, ldx, 2, n, ot, ldo); break;                \
            case 3: name##_tok_t(rows, stride, nr, xt, ldx, 3, n, ot, ldo); break;                \
            default: name##_tok_t(rows, stride, nr, xt, ldx, 4, n, ot, ldo); break;               \
            }                                                                                     \
        }                                                                                         \
    }

/* Several tokens: the rows of a call advance together through spans of this many elements, so each
 * span of up to four tokens' activations (8 KiB) is read from L1 by all of them, and each row's next
 * span is prefetched into L2 while the rows work through this one. Four tokens, 256 MiB of rows, two
 * threads at a ~67 GB/s probe (pyengine-bench-kernels, 2026-12-05): F32 21-23 -> 28 GB/s, F16/BF16
 * 14-15 -> 20 GB/s of weights against a row and a token at a time; into L1 instead of L2 or two spans
 * ahead: slower. */
enum { FLOAT_TOK_SPAN = 512 };

#define LD_F32(r, i) _mm512_loadu_ps((const float *)(r) + (i))
#define LDM_F32(r, i, m) _mm512_maskz_loadu_ps(m, (const float *)(r) + (i))
/* 16 halves loaded into a register that the compiler may not fold into the next instruction's
 * memory operand (the empty asm says the register changed), for vcvtph2ps from a register. */
static inline __m256i load_opaque(const void *p) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    __asm__("" : "+v"(v));
    return v;
}
#define LD_F16(r, i) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(r) + (i))))
#define LD_F16_REG(r, i) _mm512_cvtph_ps(load_opaque((const uint16_t *)(r) + (i)))
#define LDM_F16(r, i, m) _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)(r) + (i)))
#define BF16_WIDEN(v) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16))
#define LD_BF16(r, i) BF16_WIDEN(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(r) + (i))))
#define LDM_BF16(r, i, m) BF16_WIDEN(_mm256_maskz_loadu_epi16(m, (const uint16_t *)(r) + (i)))

PE_FLOAT_DOT(dot_f32, LD_F32, LD_F32, LDM_F32, 4)
PE_FLOAT_DOT(dot_f16, LD_F16, LD_F16_REG, LDM_F16, 2)
PE_FLOAT_DOT(dot_bf16, LD_BF16, LD_BF16, LDM_BF16, 2)

static void dequant_bf16(const void *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, LD_BF16(src, i));
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(dst + i, m, LDM_BF16(src, i, m));
    }
}

/* The KV cache's half types: F16C conversions (round to nearest even, exact as pe_fp32_to_fp16) and
 * bfloat16 rounding in integer lanes (bit-identical to pe_fp32_to_bf16, subnormals kept). Widening
 * keeps a signalling NaN's bits as pe_fp16_to_fp32 does (vcvtph2ps would set its quiet bit). */
static inline __m512 f16_widen(__m256i h) {
    const __m512i x = _mm512_cvtepu16_epi32(h);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, _mm512_set1_epi32(0x7fff)),
                                                  _mm512_set1_epi32(0x7c00));
    const __m512 f = _mm512_cvtph_ps(h);
    if (!nan) return f;
    const __m512i bits = _mm512_or_si512(_mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x8000)), 16),
                                                         _mm512_set1_epi32(0x7f800000)),
                                         _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x3ff)), 13));
    return _mm512_mask_mov_ps(f, nan, _mm512_castsi512_ps(bits));
}

static void dequant_f16(const void *src, float *dst, int64_t n) {
    const uint16_t *s = src;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, f16_widen(_mm256_loadu_si256((const __m256i *)(s + i))));
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(dst + i, m, f16_widen(_mm256_maskz_loadu_epi16(m, s + i)));
    }
}

static void quant_f16(const float *src, void *dst, int64_t n) {
    uint16_t *d = dst;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) d[i] = pe_fp32_to_fp16(src[i]);
}

static void quant_bf16(const float *src, void *dst, int64_t n) {
    uint16_t *d = dst;
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i x = _mm512_loadu_si512(src + i);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), one);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(bias, odd)), 16);
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, abs_mask), inf);
        r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(64)));
        _mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtepi32_epi16(r));
    }
    for (; i < n; i++) d[i] = pe_fp32_to_bf16(src[i]);
}

/* ---- 32-element blocks ----------------------------------------------------------------------- */

static void dequant_q8_0(const void *src, float *dst, int64_t n) {
    const pe_block_q8_0 *b = src;
    for (int64_t i = 0; i < n / PE_QK; i++, b++, dst += PE_QK) {
        const __m512 d = _mm512_set1_ps(h2f(b->d));
        const __m128i q0 = _mm_loadu_si128((const __m128i *)b->qs), q1 = _mm_loadu_si128((const __m128i *)b->qs + 1);
        _mm512_storeu_ps(dst, _mm512_mul_ps(i8_to_ps(q0), d));
        _mm512_storeu_ps(dst + 16, _mm512_mul_ps(i8_to_ps(q1), d));
    }
}

/* Four block accumulators in registers, blocks dealt round-robin; the tail goes to the first. */
#define PE_DOT4(blocks, nb, x, step)                                                            \
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                 \
    int64_t i = 0;                                                                              \
    for (; i + 4 <= (nb); i += 4) {                                                             \
        a0 = step((blocks) + i, (x) + PE_QK * i, a0);                                           \
        a1 = step((blocks) + i + 1, (x) + PE_QK * (i + 1), a1);                                 \
        a2 = step((blocks) + i + 2, (x) + PE_QK * (i + 2), a2);                                 \
        a3 = step((blocks) + i + 3, (x) + PE_QK * (i + 3), a3);                                 \
    }                                                                                           \
    for (; i < (nb); i++) a0 = step((blocks) + i, (x) + PE_QK * i, a0);                         \
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)))

static inline __m512 step_q8_0(const pe_block_q8_0 *b, const float *x, __m512 acc) {
    const __m128i q0 = _mm_loadu_si128((const __m128i *)b->qs), q1 = _mm_loadu_si128((const __m128i *)b->qs + 1);
    __m512 t = _mm512_mul_ps(i8_to_ps(q0), _mm512_loadu_ps(x));
    t = _mm512_fmadd_ps(i8_to_ps(q1), _mm512_loadu_ps(x + 16), t);
    return _mm512_fmadd_ps(t, _mm512_set1_ps(h2f(b->d)), acc);
}

static float dot_q8_0(const void *row, const float *x, int64_t n) {
    PE_DOT4((const pe_block_q8_0 *)row, n / PE_QK, x, step_q8_0);
}

/* A 16-entry float table indexed by 4-bit codes: lo/hi nibbles of 16 bytes -> 2 x 16 floats.
 * vpermps reads only the low 4 bits of each index, so the low nibble needs no mask. */
static inline void lookup32(const uint8_t *qs, __m512 table, __m512 *lo, __m512 *hi) {
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qs));
    *lo = _mm512_permutexvar_ps(q, table);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
}

static __m512 mxfp4_table(void) {
    float t[16];
    for (int i = 0; i < 16; i++) t[i] = (float)pe_mxfp4_values[i];
    return _mm512_loadu_ps(t);
}

static __m512 q4_0_table(void) {
    float t[16];
    for (int i = 0; i < 16; i++) t[i] = (float)(i - 8);
    return _mm512_loadu_ps(t);
}

static void dequant_mxfp4(const void *src, float *dst, int64_t n) {
    const pe_block_mxfp4 *b = src;
    const __m512 table = mxfp4_table();
    for (int64_t i = 0; i < n / PE_QK; i++, b++, dst += PE_QK) {
        const __m512 d = _mm512_set1_ps(half_scale(b->e));
        __m512 lo, hi;
        lookup32(b->qs, table, &lo, &hi);
        _mm512_storeu_ps(dst, _mm512_mul_ps(d, lo));
        _mm512_storeu_ps(dst + 16, _mm512_mul_ps(d, hi));
    }
}

/* The 256 e8m0 half scales, so that the per-block broadcast is a plain load (filled at dispatch). */
static float e8m0_half[256];

/* acc + scale * (codes . x[0..32)) for a block of 16 nibble bytes. */
static inline __m512 step_nib(const uint8_t *qs, const float *x, float scale, __m512 table, __m512 acc) {
    __m512 lo, hi;
    lookup32(qs, table, &lo, &hi);
    const __m512 t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(x)));
    return _mm512_fmadd_ps(t, _mm512_set1_ps(scale), acc);
}

#define STEP_MXFP4(b, x, acc) step_nib((b)->qs, x, e8m0_half[(b)->e], table, acc)
#define STEP_Q4_0(b, x, acc) step_nib((b)->qs, x, h2f((b)->d), table, acc)

static float dot_mxfp4(const void *row, const float *x, int64_t n) {
    const __m512 table = mxfp4_table();
    PE_DOT4((const pe_block_mxfp4 *)row, n / PE_QK, x, STEP_MXFP4);
}

static void dequant_q4_0(const void *src, float *dst, int64_t n) {
    const pe_block_q4_0 *b = src;
    const __m512 table = q4_0_table();
    for (int64_t i = 0; i < n / PE_QK; i++, b++, dst += PE_QK) {
        const __m512 d = _mm512_set1_ps(h2f(b->d));
        __m512 lo, hi;
        lookup32(b->qs, table, &lo, &hi);
        _mm512_storeu_ps(dst, _mm512_mul_ps(d, lo));
        _mm512_storeu_ps(dst + 16, _mm512_mul_ps(d, hi));
    }
}

static float dot_q4_0(const void *row, const float *x, int64_t n) {
    const __m512 table = q4_0_table();
    PE_DOT4((const pe_block_q4_0 *)row, n / PE_QK, x, STEP_Q4_0);
}

/* ---- Q4_1, Q5_0, Q5_1 and the K-quants: 16-element chunks (quant_chunks.h) ------------------------ */

/* dst[0..16) = dl * q - ml (signed codes: dl * q), q given as 16 bytes (numpy order: product, then
 * difference). */
static inline __attribute__((always_inline)) void put16(float *dst, __m128i q, float dl, float ml, const int sgn) {
    const __m512 p = _mm512_mul_ps(_mm512_set1_ps(dl), sgn ? i8_to_ps(q) : u8_to_ps(q));
    _mm512_storeu_ps(dst, sgn ? p : _mm512_sub_ps(p, _mm512_set1_ps(ml)));
}

PE_CHUNK_FORMATS(PE_CHUNK_DEQUANT)

/* Dot through a dequantized super-block in L1; 4 lane accumulators in a fixed order. */
#define PE_BLOCK_DOT(name, dequant, blck, tsize)                                                 \
    static float name(const void *row, const float *x, int64_t n) {                              \
        float tmp[blck] __attribute__((aligned(64)));                                            \
        const uint8_t *src = row;                                                                \
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}; \
        for (int64_t i = 0; i < n; i += (blck), src += (tsize), x += (blck)) {                   \
            dequant(src, tmp, (blck));                                                           \
            for (int j = 0; j < (blck); j += 16)                                                 \
                a[(j / 16) & 3] = _mm512_fmadd_ps(_mm512_load_ps(tmp + j), _mm512_loadu_ps(x + j), a[(j / 16) & 3]); \
        }                                                                                        \
        return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]))); \
    }

PE_BLOCK_DOT(dot_q4_1, dequant_q4_1, PE_QK, 20)
PE_BLOCK_DOT(dot_q5_0, dequant_q5_0, PE_QK, 22)
PE_BLOCK_DOT(dot_q5_1, dequant_q5_1, PE_QK, 24)
PE_BLOCK_DOT(dot_q2_k, dequant_q2_k, PE_QK_K, 84)
PE_BLOCK_DOT(dot_q3_k, dequant_q3_k, PE_QK_K, 110)
PE_BLOCK_DOT(dot_q5_k, dequant_q5_k, PE_QK_K, 176)
PE_BLOCK_DOT(dot_q6_k, dequant_q6_k, PE_QK_K, 210)

/* Q4_K without a dequantized buffer: per sub-block j, d*sc_j * (q . x) - dmin*m_j * sum(x). Low
 * nibbles go through vpermps (it ignores the high bits), high nibbles through a shift and cvtdq2ps,
 * to balance the two vector ports. */
static float dot_q4_k(const void *row, const float *x, int64_t n) {
    const pe_block_q4_k *b = row;
    float t[16];
    for (int i = 0; i < 16; i++) t[i] = (float)i;
    const __m512 table = _mm512_loadu_ps(t);
    __m512 acc_q0 = _mm512_setzero_ps(), acc_q1 = acc_q0, acc_m0 = acc_q0, acc_m1 = acc_q0;
    for (int64_t i = 0; i < n / PE_QK_K; i++, b++, x += PE_QK_K) {
        const float d = h2f(b->d), dmin = h2f(b->dmin);
        float dsc[8], dmn[8];
        for (int s = 0; s < 8; s++) {
            uint8_t sc, mn;
            pe_k_scale_min(b->scales, s, &sc, &mn);
            dsc[s] = d * (float)sc;
            dmn[s] = dmin * (float)mn;
        }
        for (int c = 0; c < 4; c++) {
            const float *xc = x + 64 * c;
            const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b->qs + 32 * c)));
            const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b->qs + 32 * c + 16)));
            const __m512 xa0 = _mm512_loadu_ps(xc), xa1 = _mm512_loadu_ps(xc + 16);
            const __m512 xb0 = _mm512_loadu_ps(xc + 32), xb1 = _mm512_loadu_ps(xc + 48);
            const __m512 ta = _mm512_fmadd_ps(_mm512_permutexvar_ps(v1, table), xa1,
                                              _mm512_mul_ps(_mm512_permutexvar_ps(v0, table), xa0));
            const __m512 tb = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 4)), xb1,
                                              _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 4)), xb0));
            acc_q0 = _mm512_fmadd_ps(ta, _mm512_set1_ps(dsc[2 * c]), acc_q0);
            acc_q1 = _mm512_fmadd_ps(tb, _mm512_set1_ps(dsc[2 * c + 1]), acc_q1);
            acc_m0 = _mm512_fmadd_ps(_mm512_add_ps(xa0, xa1), _mm512_set1_ps(dmn[2 * c]), acc_m0);
            acc_m1 = _mm512_fmadd_ps(_mm512_add_ps(xb0, xb1), _mm512_set1_ps(dmn[2 * c + 1]), acc_m1);
        }
    }
    return _mm512_reduce_add_ps(_mm512_sub_ps(_mm512_add_ps(acc_q0, acc_q1), _mm512_add_ps(acc_m0, acc_m1)));
}

void pe_kernels_avx512(int type, pe_kernel_set *k) {
    for (int e = 0; e < 256; e++) e8m0_half[e] = half_scale((uint8_t)e);
    switch (type) {
    case PE_TYPE_F32: k->dot_f32 = dot_f32, k->dot_f32_tok = dot_f32_tok; break;
    case PE_TYPE_F16:
        k->dequant_row = dequant_f16, k->dot_f32 = dot_f16, k->dot_f32_tok = dot_f16_tok, k->quantize_row = quant_f16;
        break;
    case PE_TYPE_BF16:
        k->dequant_row = dequant_bf16, k->dot_f32 = dot_bf16, k->dot_f32_tok = dot_bf16_tok, k->quantize_row = quant_bf16;
        break;
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
    /* where AVX-512 has no int8 kernel for a type (Q4_0 / MXFP4 without VBMI), AVX2's stays */
    if (pe_dot_q8_avx512(type)) {
        k->dot_q8 = pe_dot_q8_avx512(type);
        k->dot_q8_tok = pe_dot_q8_tok_avx512(type);
    }
}
