/* The code registers of one block of an R16 group (r16.h) whose codes are nibbles in four 64-byte
 * pieces at p (Q5_0, and each 32-element sub-block of Q4_K): register j (j < 4) holds the low
 * nibbles of piece j, register j + 4 its high nibbles, i.e. elements 4 j .. 4 j + 3 of every row as
 * unsigned bytes. Shared by the decode kernels (r16_avx512.c) and the prefill tiles
 * (gemm_q8_avx512.c), whose packing steps these registers are. Include only from AVX-512 BW files. */
#ifndef PE_R16_CODES_AVX512_H
#define PE_R16_CODES_AVX512_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline __attribute__((always_inline)) void pe_r16_nibbles(const uint8_t *p, __m512i u[8]) {
    const __m512i m0f = _mm512_set1_epi8(15);
    for (int j = 0; j < 4; j++) {
        const __m512i v = _mm512_load_si512(p + 64 * j);
        u[j] = _mm512_and_si512(v, m0f);
        u[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
    }
}

/* Q5_0: the nibbles plus 16 where the block's fifth-bit mask of that register (at p + 256) is set. */
static inline __attribute__((always_inline)) void pe_r16_codes_q5_0(const uint8_t *p, __m512i u[8]) {
    uint64_t fifth[8];
    memcpy(fifth, p + 256, sizeof fifth);
    pe_r16_nibbles(p, u);
    for (int j = 0; j < 8; j++) u[j] = _mm512_mask_add_epi8(u[j], _cvtu64_mask64(fifth[j]), u[j], _mm512_set1_epi8(16));
}

#endif
