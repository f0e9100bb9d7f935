/* Batched (prefill) products with int8 activations for the formats that have them (see
 * gemm_q8_avx512.c): one tile of 16 weight rows times many tokens. */
#ifndef PE_GEMM_Q8_H
#define PE_GEMM_Q8_H

#include <stddef.h>
#include <stdint.h>

#include "quants.h"

#define PE_GEMM_Q8_TILE 16

/* Whether this CPU has the kernel for ggml type `type` (AVX-512 VNNI; the block formats: Q8_0, Q4_0,
 * MXFP4, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K). */
int pe_gemm_q8_supported(int type);
/* Per token t and sub-block j (of 32 elements, or 16 for Q2_K/Q3_K/Q6_K), at t * nsub + j, the
 * constants of the tile loop's per-sub-block step, computed once per batch (pe_gemm_q8_token_consts)
 * and shared by every tile: dx = d_x / 254, off = the format's offset times the combined code sum s
 * (exact in int32), dxs = dx * s. */
typedef struct {
    float *dx, *dxs;
    int32_t *off;
} pe_gemm_q8_consts;
/* Sub-blocks per row of n_in elements of the type (0: no tiles for it). */
int64_t pe_gemm_q8_nsub(int type, int64_t n_in);
/* Token t's entries of k, from its activations x. */
void pe_gemm_q8_token_consts(int type, const pe_act_q8 *x, int64_t n_in, pe_gemm_q8_consts k, int64_t t);
/* Bytes of per-thread scratch for rows of n_in elements. */
size_t pe_gemm_q8_scratch_bytes(int64_t n_in);
/* y[t * ldy + r] = dot(row r, token t) (+ bias[r]) for r < nr (1..16) rows at rows + r * stride and
 * t < n_tok tokens given as pe_act_q8 activations and their constants k. */
void pe_gemm_q8_tile(int type, const uint8_t *rows, int64_t stride, int nr, int64_t n_in, const pe_act_q8 *x,
                     int64_t n_tok, pe_gemm_q8_consts k, const float *bias, float *y, int64_t ldy, void *scratch);

/* The same for the 16-row group of an MXFP4, Q8_0, Q5_0 or Q4_K weight in the R16 layout (r16.h) at
 * `group`: its codes are already the tile's packing, so MXFP4's are only looked up, Q5_0's given
 * their fifth bits, Q4_K's split into nibbles and Q8_0's used in place (the same bits as the rows). */
void pe_gemm_q8_tile_r16(int type, const uint8_t *group, int nr, int64_t n_in, const pe_act_q8 *x, int64_t n_tok,
                         pe_gemm_q8_consts k, const float *bias, float *y, int64_t ldy, void *scratch);

#endif
