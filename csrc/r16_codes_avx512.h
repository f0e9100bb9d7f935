/* The code registers of one 32-element unit of an R16 group (r16.h): register j holds elements
 * 4 j .. 4 j + 3 of every row as unsigned bytes. Where the codes are nibbles in four 64-byte pieces
 * at p (Q4_0, Q4_1, each 32-element sub-block of Q4_K, Q6_K's low four bits): register j
 * (j < 4) holds the low nibbles of piece j, register j + 4 its high nibbles. Where they are 2-bit
 * fields in two pieces (Q2_K, Q6_K's high two bits): register 4 k + f holds bits 2 f, 2 f + 1 of
 * piece k. Q3_K's are 3-bit fields in three pieces, the Q5 types' 5-bit fields in five
 * (pe_r16_codes_q3_k, pe_r16_codes_q5). Shared by the decode kernels (r16_avx512.c) and the
 * prefill tiles (gemm_q8_avx512.c), whose packing steps these registers are. Include only from
 * AVX-512 BW files. */
#ifndef PE_R16_CODES_AVX512_H
#define PE_R16_CODES_AVX512_H

#include <immintrin.h>
#include <stdint.h>

#include "r16.h"

static inline __attribute__((always_inline)) void pe_r16_nibbles(const uint8_t *p, __m512i u[8]) {
    const __m512i m0f = _mm512_set1_epi8(15);
    for (int j = 0; j < 4; j++) {
        const __m512i v = _mm512_load_si512(p + 64 * j);
        u[j] = _mm512_and_si512(v, m0f);
        u[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
    }
}

/* Q5_0, Q5_1, Q5_K: five pieces (r16.h): register 2 k is bits 0-4 of piece k (k < 4), register 2 k + 1
 * its bits 5-7 with bits 2 k, 2 k + 1 of piece 4 above them (moved to bits 3-4 by a 16-bit shift;
 * each byte's bits 3-4 come from its own byte, as do bits 0-2 of piece k >> 5), joined by one
 * vpternlogd (bits 0-2 from the first source, the rest from the second) before the mask. 21
 * instructions a unit where nibbles plus eight fifth-bit masks (64-bit masks, each loaded into a
 * mask register for a masked add of 16) took 28: one core in cache Q5_0 1.16x (35.4 -> 41.2 GB/s),
 * Q5_1 1.15x, Q5_K 1.14x (Zen 4, 2026-12-06). */
static inline __attribute__((always_inline)) void pe_r16_codes_q5(const uint8_t *p, __m512i u[8]) {
    const __m512i m31 = _mm512_set1_epi8(31), m7 = _mm512_set1_epi8(7);
    const __m512i top = _mm512_load_si512(p + 256);
    const __m512i at3[4] = {_mm512_slli_epi16(top, 3), _mm512_slli_epi16(top, 1), _mm512_srli_epi16(top, 1),
                            _mm512_srli_epi16(top, 3)};
    for (int k = 0; k < 4; k++) {
        const __m512i v = _mm512_load_si512(p + 64 * k);
        u[2 * k] = _mm512_and_si512(v, m31);
        /* vpternlogd 0xca: bits of the first operand (the mask) from the second, the rest from the third */
        u[2 * k + 1] = _mm512_and_si512(_mm512_ternarylogic_epi32(m7, _mm512_srli_epi16(v, 5), at3[k], 0xca), m31);
    }
}

/* Q2_K: the 2-bit fields of the two pieces at p. */
static inline __attribute__((always_inline)) void pe_r16_crumbs(const uint8_t *p, __m512i u[8]) {
    const __m512i m3 = _mm512_set1_epi8(3);
    for (int k = 0; k < 2; k++) {
        const __m512i v = _mm512_load_si512(p + 64 * k);
        u[4 * k] = _mm512_and_si512(v, m3);
        u[4 * k + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 2), m3);
        u[4 * k + 2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m3);
        u[4 * k + 3] = _mm512_and_si512(_mm512_srli_epi16(v, 6), m3);
    }
}

/* Q3_K: three pieces of 3-bit fields (r16.h): registers 2 k and 2 k + 1 are bits 0-2 and 3-5 of
 * piece k, register 6 (7) the top two bits of piece 0 (1) with bit 6 (7) of piece 2 above them. With
 * 16-bit shifts each byte's bits 0-2 come from its own byte (shifts of at most 6), and one
 * vpternlogd joins the two sources of registers 6 and 7 (bits 0-1 from the first, the rest from the
 * second) before the mask. 20 instructions a unit where 2-bit fields plus eight third-bit masks (as
 * Q5_0's) took 34: one core in cache 1.27x (20.0 -> 25.4 GB/s, Zen 4, 2026-12-06). */
static inline __attribute__((always_inline)) void pe_r16_codes_q3_k(const uint8_t *p, __m512i u[8]) {
    const __m512i m7 = _mm512_set1_epi8(7), m3 = _mm512_set1_epi8(3);
    const __m512i r0 = _mm512_load_si512(p), r1 = _mm512_load_si512(p + 64), r2 = _mm512_load_si512(p + 128);
    u[0] = _mm512_and_si512(r0, m7);
    u[1] = _mm512_and_si512(_mm512_srli_epi16(r0, 3), m7);
    u[2] = _mm512_and_si512(r1, m7);
    u[3] = _mm512_and_si512(_mm512_srli_epi16(r1, 3), m7);
    u[4] = _mm512_and_si512(r2, m7);
    u[5] = _mm512_and_si512(_mm512_srli_epi16(r2, 3), m7);
    /* vpternlogd 0xca: bits of the first operand (the mask) from the second, the rest from the third */
    u[6] = _mm512_and_si512(_mm512_ternarylogic_epi32(m3, _mm512_srli_epi16(r0, 6), _mm512_srli_epi16(r2, 4), 0xca), m7);
    u[7] = _mm512_and_si512(_mm512_ternarylogic_epi32(m3, _mm512_srli_epi16(r1, 6), _mm512_srli_epi16(r2, 5), 0xca), m7);
}

/* Q6_K: the nibbles (at p) or'ed with the 2-bit fields of the two pieces at p + 256 moved to bits 4-5
 * (a 16-bit shift and one vpternlogd: u | (shifted & 0x30)). */
static inline __attribute__((always_inline)) void pe_r16_codes_q6_k(const uint8_t *p, __m512i u[8]) {
    const __m512i m30 = _mm512_set1_epi8(0x30);
    pe_r16_nibbles(p, u);
    for (int k = 0; k < 2; k++) {
        const __m512i v = _mm512_load_si512(p + 256 + 64 * k);
        const __m512i at4[4] = {_mm512_slli_epi16(v, 4), _mm512_slli_epi16(v, 2), v, _mm512_srli_epi16(v, 2)};
        for (int f = 0; f < 4; f++) u[4 * k + f] = _mm512_ternarylogic_epi32(u[4 * k + f], at4[f], m30, 0xf8);
    }
}

/* The code registers of the unit at p of a group of the type, for every R16 type but MXFP4 (its
 * codes go through a table: r16_avx512.c, gemm_q8_avx512.c): Q8_0's as stored, the others' decoded. */
static inline __attribute__((always_inline)) void pe_r16_unit_codes(const int type, const uint8_t *p, __m512i u[8]) {
    switch (type) {
    case PE_TYPE_Q8_0:
        for (int j = 0; j < 8; j++) u[j] = _mm512_load_si512(p + 64 * j);
        return;
    case PE_TYPE_Q5_0: case PE_TYPE_Q5_1: case PE_TYPE_Q5_K: pe_r16_codes_q5(p, u); return;
    case PE_TYPE_Q2_K: pe_r16_crumbs(p, u); return;
    case PE_TYPE_Q3_K: pe_r16_codes_q3_k(p, u); return;
    case PE_TYPE_Q6_K: pe_r16_codes_q6_k(p, u); return;
    default: pe_r16_nibbles(p, u); /* Q4_0, Q4_1, Q4_K */
    }
}

#endif
