/* The per-sub-block step of the int8 prefill tiles, shared by the AVX-512 VNNI loop
 * (gemm_q8_avx512.c) and the AMX one (gemm_q8_amx.c), so that both give the same bits by
 * construction. Include only from AVX-512 files. */
#ifndef PE_GEMM_Q8_STEP_H
#define PE_GEMM_Q8_STEP_H

#include <immintrin.h>

#include "gemm_q8.h"

/* f plus one token's sub-block of 16 rows: the integer sums a = c . q and al = c . ql of the two
 * digits, combined as 254 a + al, less the offset times the token's code sum (formats with an
 * offset, MIN = 0), converted once, times the rows' scales wsj times d_x / 254, less the rows'
 * minimums wmj times d_x / 254 times the code sum (MIN = 1); tj indexes the token's constants k. */
static inline __attribute__((always_inline)) __m512 pe_gemm_q8_step(__m512 f, __m512i a, __m512i al, __m512 wsj,
                                                                    const float *wmj, pe_gemm_q8_consts k,
                                                                    int64_t tj, const int MIN) {
    __m512i s = _mm512_add_epi32(_mm512_mullo_epi32(a, _mm512_set1_epi32(254)), al);
    if (!MIN) s = _mm512_sub_epi32(s, _mm512_set1_epi32(k.off[tj]));
    f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(wsj, _mm512_set1_ps(k.dx[tj])), f);
    if (MIN) f = _mm512_fnmadd_ps(_mm512_load_ps(wmj), _mm512_set1_ps(k.dxs[tj]), f);
    return f;
}

#endif
