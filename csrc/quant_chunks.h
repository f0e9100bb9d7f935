/* The blocks of Q4_1, Q5_0, Q5_1 and the K-quants as 16-element chunks: chunk c of a block is
 * elements 16 c .. 16 c + 15, given as 16 byte codes q with one scale dl and one minimum ml, so that
 * element i = dl * q[i] - ml (q signed and ml = 0 for Q5_0 / Q3_K / Q6_K: dl * q[i]). Every format's
 * bit layout is written here once, in 128-bit (SSSE3) code, for the SIMD files that dequantize or
 * dot these formats (quants_avx2.c, quants_avx512.c); the scalar reference (quants_ref.c) spells the
 * same layouts element by element, and the tests hold them to gguf.quants.
 *
 * dl and ml are the products the reference forms (Q4_K: d * sc, dmin * m; Q4_1: d and -m, since
 * d q + m == d q - (-m) exactly), so dl * q - ml with unfused float32 operations is the reference's
 * value bit for bit (f16 scales through F16C). Include only from files compiled with SSSE3 and F16C. */
#ifndef PE_QUANT_CHUNKS_H
#define PE_QUANT_CHUNKS_H

#include <immintrin.h>
#include <string.h>

#include "quants_impl.h"

#define PE_CHUNK_AI static inline __attribute__((always_inline))

/* (v >> s) & mask on each byte. */
PE_CHUNK_AI __m128i pe_bits8(__m128i v, int s, int mask) {
    return _mm_and_si128(_mm_srl_epi16(v, _mm_cvtsi32_si128(s)), _mm_set1_epi8((char)mask));
}

PE_CHUNK_AI __m128i pe_load16(const uint8_t *p) { return _mm_loadu_si128((const __m128i *)p); }

/* Bits 16 c .. 16 c + 15 of a 32-element block's little-endian qh word as bytes 0 / 16. */
PE_CHUNK_AI __m128i pe_qh_fives(const uint8_t qh[4], int c) {
    uint16_t h;
    memcpy(&h, qh + 2 * c, 2);
    const __m128i bytes = _mm_shuffle_epi8(_mm_cvtsi32_si128(h), _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
    const __m128i bit = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
    return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(bytes, bit), bit), _mm_set1_epi8(16));
}

/* 4 scale codes (the low 4 bytes: unsigned, or signed) times d as floats. */
PE_CHUNK_AI __m128 pe_scale4(__m128i sc4, const int sgn, __m128 d) {
    return _mm_mul_ps(d, _mm_cvtepi32_ps(sgn ? _mm_cvtepi8_epi32(sc4) : _mm_cvtepu8_epi32(sc4)));
}
/* 16 scale codes times d: out[i] = d * (float)sc[i]. */
PE_CHUNK_AI void pe_scale16(__m128i sc, const int sgn, float d, float out[16]) {
    const __m128 vd = _mm_set1_ps(d);
    _mm_storeu_ps(out, pe_scale4(sc, sgn, vd));
    _mm_storeu_ps(out + 4, pe_scale4(_mm_srli_si128(sc, 4), sgn, vd));
    _mm_storeu_ps(out + 8, pe_scale4(_mm_srli_si128(sc, 8), sgn, vd));
    _mm_storeu_ps(out + 12, pe_scale4(_mm_srli_si128(sc, 12), sgn, vd));
}

/* A block's chunks: codes(b, c) gives chunk c's codes; scales(b, dl, ml) fills the chunks' dl[c]
 * and ml[c] once per block (vector conversions of the scale codes, the reference's products). */

/* 32-element blocks: chunk 0 = the low nibbles, chunk 1 = the high nibbles, one scale (d; minimum -m). */
PE_CHUNK_AI __m128i pe_codes_q4_1(const pe_block_q4_1 *b, int c) { return pe_bits8(pe_load16(b->qs), 4 * c, 15); }
PE_CHUNK_AI __m128i pe_codes_q5_0(const pe_block_q5_0 *b, int c) {
    return _mm_sub_epi8(_mm_or_si128(pe_bits8(pe_load16(b->qs), 4 * c, 15), pe_qh_fives(b->qh, c)), _mm_set1_epi8(16));
}
PE_CHUNK_AI __m128i pe_codes_q5_1(const pe_block_q5_1 *b, int c) {
    return _mm_or_si128(pe_bits8(pe_load16(b->qs), 4 * c, 15), pe_qh_fives(b->qh, c));
}
/* Q4_1 and Q5_1: the f16 scale d and minimum m of both chunks. */
PE_CHUNK_AI void pe_scales_dm(uint16_t d, uint16_t m, float dl[16], float ml[16]) {
    dl[0] = dl[1] = _cvtsh_ss(d);
    ml[0] = ml[1] = -_cvtsh_ss(m);
}
PE_CHUNK_AI void pe_scales_q4_1(const pe_block_q4_1 *b, float dl[16], float ml[16]) { pe_scales_dm(b->d, b->m, dl, ml); }
PE_CHUNK_AI void pe_scales_q5_0(const pe_block_q5_0 *b, float dl[16], float ml[16]) {
    (void)ml;
    dl[0] = dl[1] = _cvtsh_ss(b->d);
}
PE_CHUNK_AI void pe_scales_q5_1(const pe_block_q5_1 *b, float dl[16], float ml[16]) { pe_scales_dm(b->d, b->m, dl, ml); }

/* Q2_K: chunk c = bits 2 j of qs[32 h + 16 p ..] (h = c / 8, j = c % 8 / 2, p = c % 2); scale byte
 * scales[c]: d * (low nibble), dmin * (high nibble). */
PE_CHUNK_AI __m128i pe_codes_q2_k(const pe_block_q2_k *b, int c) {
    return pe_bits8(pe_load16(b->qs + 32 * (c / 8) + 16 * (c % 2)), 2 * (c % 8 / 2), 3);
}
PE_CHUNK_AI void pe_scales_q2_k(const pe_block_q2_k *b, float dl[16], float ml[16]) {
    const __m128i sc = pe_load16(b->scales);
    pe_scale16(pe_bits8(sc, 0, 15), 0, _cvtsh_ss(b->d), dl);
    pe_scale16(pe_bits8(sc, 4, 15), 0, _cvtsh_ss(b->dmin), ml);
}

/* Q3_K: Q2_K's fields, minus 4 where hmask[16 p + l] lacks bit 4 h + j; d * pe_q3_k_scale(c). */
PE_CHUNK_AI __m128i pe_codes_q3_k(const pe_block_q3_k *b, int c) {
    const int h = c / 8, j = c % 8 / 2, p = c % 2;
    const __m128i missing = _mm_xor_si128(pe_bits8(pe_load16(b->hmask + 16 * p), 4 * h + j, 1), _mm_set1_epi8(1));
    return _mm_sub_epi8(pe_bits8(pe_load16(b->qs + 32 * h + 16 * p), 2 * j, 3), _mm_slli_epi16(missing, 2));
}
PE_CHUNK_AI void pe_scales_q3_k(const pe_block_q3_k *b, float dl[16], float ml[16]) {
    (void)ml;
    int8_t sc[16];
    for (int k = 0; k < 16; k++) sc[k] = (int8_t)pe_q3_k_scale(b->scales, k);
    pe_scale16(pe_load16((const uint8_t *)sc), 1, _cvtsh_ss(b->d), dl);
}

/* Q4_K / Q5_K: chunk c is half of sub-block s = c / 2, nibble s % 2 of qs[32 (s / 2) + 16 (c % 2) ..]
 * (Q5_K: plus bit s of qh[16 (c % 2) + l] as 16); both chunks of s take d * sc(s), dmin * m(s). */
PE_CHUNK_AI __m128i pe_codes_q4_k(const pe_block_q4_k *b, int c) {
    return pe_bits8(pe_load16(b->qs + 32 * (c / 4) + 16 * (c % 2)), 4 * (c / 2 % 2), 15);
}
PE_CHUNK_AI __m128i pe_codes_q5_k(const pe_block_q5_k *b, int c) {
    return _mm_or_si128(pe_bits8(pe_load16(b->qs + 32 * (c / 4) + 16 * (c % 2)), 4 * (c / 2 % 2), 15),
                        _mm_slli_epi16(pe_bits8(pe_load16(b->qh + 16 * (c % 2)), c / 2, 1), 4));
}
PE_CHUNK_AI void pe_scales_k45(const uint8_t scales[12], float d, float dmin, float dl[16], float ml[16]) {
    uint8_t sc[16], mn[16];
    for (int s = 0; s < 8; s++) {
        pe_k_scale_min(scales, s, &sc[2 * s], &mn[2 * s]);
        sc[2 * s + 1] = sc[2 * s], mn[2 * s + 1] = mn[2 * s];
    }
    pe_scale16(pe_load16(sc), 0, d, dl);
    pe_scale16(pe_load16(mn), 0, dmin, ml);
}
PE_CHUNK_AI void pe_scales_q4_k(const pe_block_q4_k *b, float dl[16], float ml[16]) {
    pe_scales_k45(b->scales, _cvtsh_ss(b->d), _cvtsh_ss(b->dmin), dl, ml);
}
PE_CHUNK_AI void pe_scales_q5_k(const pe_block_q5_k *b, float dl[16], float ml[16]) {
    pe_scales_k45(b->scales, _cvtsh_ss(b->d), _cvtsh_ss(b->dmin), dl, ml);
}

/* Q6_K: element e = 16 c, h = e / 128, r = e % 128: 4 bits of ql[64 h + r % 64 ..] (shift 4 (r / 64)),
 * 2 bits of qh[32 h + r % 32 ..] (shift 2 (r / 32)), minus 32; d * scales[c] (signed). */
PE_CHUNK_AI __m128i pe_codes_q6_k(const pe_block_q6_k *b, int c) {
    const int h = c / 8, r = 16 * c % 128;
    const __m128i lo = pe_bits8(pe_load16(b->ql + 64 * h + r % 64), 4 * (r / 64), 15);
    const __m128i hi = pe_bits8(pe_load16(b->qh + 32 * h + r % 32), 2 * (r / 32), 3);
    return _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), _mm_set1_epi8(32));
}
PE_CHUNK_AI void pe_scales_q6_k(const pe_block_q6_k *b, float dl[16], float ml[16]) {
    (void)ml;
    pe_scale16(pe_load16((const uint8_t *)b->scales), 1, _cvtsh_ss(b->d), dl);
}

/* PE_FOR_CHUNKS(TYPE, b, body...) runs the statements `body` once per chunk of block b, in order,
 * with `c`, `q` (the codes), `dl[c]` and `ml[c]` in scope (the scales computed once per block).
 * PE_SIGNED_<TYPE>: whether its codes are signed (no minimum); PE_CHUNKS_<TYPE>: chunks per block. */
enum { PE_SIGNED_Q4_1 = 0, PE_SIGNED_Q5_1 = 0, PE_SIGNED_Q2_K = 0, PE_SIGNED_Q4_K = 0, PE_SIGNED_Q5_K = 0,
       PE_SIGNED_Q5_0 = 1, PE_SIGNED_Q3_K = 1, PE_SIGNED_Q6_K = 1 };
enum { PE_CHUNKS_Q4_1 = 2, PE_CHUNKS_Q5_0 = 2, PE_CHUNKS_Q5_1 = 2, PE_CHUNKS_Q2_K = 16, PE_CHUNKS_Q3_K = 16,
       PE_CHUNKS_Q4_K = 16, PE_CHUNKS_Q5_K = 16, PE_CHUNKS_Q6_K = 16 };
#define PE_FOR_CHUNKS(TYPE, name, b, ...)                                                     \
    do {                                                                                      \
        float dl[16], ml[16];                                                                 \
        pe_scales_##name((b), dl, ml);                                                        \
        _Pragma("GCC unroll 16") for (int c = 0; c < PE_CHUNKS_##TYPE; c++) {                 \
            const __m128i q = pe_codes_##name((b), c);                                        \
            __VA_ARGS__;                                                                      \
        }                                                                                     \
    } while (0)

/* X(name, TYPE, block type, elements per block) for every format above. */
#define PE_CHUNK_FORMATS(X)                                                                           \
    X(q4_1, Q4_1, pe_block_q4_1, PE_QK)                                                               \
    X(q5_0, Q5_0, pe_block_q5_0, PE_QK)                                                               \
    X(q5_1, Q5_1, pe_block_q5_1, PE_QK)                                                               \
    X(q2_k, Q2_K, pe_block_q2_k, PE_QK_K)                                                             \
    X(q3_k, Q3_K, pe_block_q3_k, PE_QK_K)                                                             \
    X(q4_k, Q4_K, pe_block_q4_k, PE_QK_K)                                                             \
    X(q5_k, Q5_K, pe_block_q5_k, PE_QK_K)                                                             \
    X(q6_k, Q6_K, pe_block_q6_k, PE_QK_K)

/* dequant_<name>: every chunk through the including file's put16(dst, q, dl, ml, sgn), which writes
 * dl * q - ml (dl * q for signed codes) as 16 floats in the reference's unfused operations. */
#define PE_CHUNK_DEQUANT(name, TYPE, blk_t, blck)                                                     \
    static void dequant_##name(const void *src, float *dst, int64_t n) {                              \
        const blk_t *b = src;                                                                         \
        for (int64_t i = 0; i < n / (blck); i++, b++, dst += (blck))                                  \
            PE_FOR_CHUNKS(TYPE, name, b,                                                              \
                          put16(dst + 16 * c, q, dl[c], PE_SIGNED_##TYPE ? 0.0f : ml[c], PE_SIGNED_##TYPE)); \
    }

#endif
