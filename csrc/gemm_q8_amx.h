/* The prefill tiles' integer products on Intel AMX (AMX-INT8), for 16 tokens at a time: see
 * gemm_q8_amx.c. gemm_q8_avx512.c calls it where pe_gemm_q8_amx_ready() says the CPU and the OS let
 * this process use the tiles; the results are bit for bit those of its AVX-512 VNNI tile loop. */
#ifndef PE_GEMM_Q8_AMX_H
#define PE_GEMM_Q8_AMX_H

#include <stdint.h>

#include "gemm_q8.h"

/* Whether this CPU has AMX-TILE and AMX-INT8, PYENGINE_SIMD leaves them on, and Linux granted this
 * process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once). */
int pe_gemm_q8_amx_ready(void);

/* For the n16 * 16 tokens x[0..) (constants k): the 16 rows' dots of a packed tile of a format with
 * sub-blocks of 32 (gemm_q8_avx512.c: n/4 steps of 64 bytes, each four codes of each row; ws, wm: per
 * sub-block the rows' scales and, has_min, minimums), plus bias, the rows whose bit is set in keep
 * stored to y + t * ldy. The tokens' codes qs and second digits ql must lie xstride bytes apart. */
void pe_gemm_q8_amx(const uint8_t *packed, const float *ws, const float *wm, int64_t nsub, int has_min,
                    const pe_act_q8 *x, int64_t n16, int64_t xstride, pe_gemm_q8_consts k, uint16_t keep,
                    const float *bias, float *y, int64_t ldy);

#endif
