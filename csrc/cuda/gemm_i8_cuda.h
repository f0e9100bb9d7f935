/* Prefill products on int8 tensor cores (gemm_i8_cuda.cu) for Q8_0 and MXFP4 weights: the activations
 * are quantized to int8 per 32-element block with two digits, as the CPU path's pe_act_q8 (csrc/act_q8.c,
 * docs/forward.md "Int8 activations"), the weights stay in their 8/4-bit codes, each block's product is
 * an exact int32 sum and its scales are applied in float. Same arguments, results within the int8
 * activations' rounding of pe_cu_gemm / pe_cu_gemm_experts (matmul_cuda.h), which keep float32
 * activations (3xTF32). Plain C; every pointer device memory; nothing synchronizes or allocates. */
#ifndef PE_GEMM_I8_CUDA_H
#define PE_GEMM_I8_CUDA_H

#include <stdint.h>

#include "matmul_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 for the weight types the int8 kernels take (Q8_0, MXFP4). */
int pe_cu_gemm_i8_supported(int type);

/* Device bytes of the scratch buffer the products below need for x of n_rows rows of n_in elements
 * (the quantized activations: 2 n_in bytes + n_in / 8 bytes per row, plus 16). */
int64_t pe_cu_gemm_i8_scratch_bytes(int64_t n_rows, int64_t n_in);

/* As pe_cu_gemm (any n_rows >= 0), x first quantized into scratch (pe_cu_gemm_i8_scratch_bytes(n_rows,
 * n_in) bytes of device memory, overwritten). 1 for an unsupported type or a NULL scratch. */
int pe_cu_gemm_i8(const pe_cu_weight *w, int64_t expert, const float *x, int64_t ldx, int64_t n_rows,
                  const float *bias, float *y, int64_t ldy, void *scratch, void *stream);

/* As pe_cu_gemm_experts: every expert's rows in one grid per 128 experts; scratch as above for
 * start[n_expert] rows (rows start[0] .. start[n_expert] - 1 are quantized). */
int pe_cu_gemm_experts_i8(const pe_cu_weight *w, const int64_t *start, int64_t n_expert, const float *x,
                          int64_t ldx, const float *bias, float *y, int64_t ldy, void *scratch, void *stream);

/* Test helpers for the fragment layout (compat.h, pe_mma_s8_*): one warp runs one mma.sync m16n8k32 on
 * the registers a[32][4], b[32][2], c[32][4] (lane-major, device memory) and stores d[32][4]. */
int pe_cu_mma_s8_run(const uint32_t *a, const uint32_t *b, const int32_t *c, int32_t *d, void *stream);
/* The layout on the host: for lane l and element i, (row, column) of A in a[(l*16+i)*2 ..], of B (k, n)
 * in b[(l*8+i)*2 ..], of C/D in c[(l*4+i)*2 ..]. */
void pe_cu_mma_s8_layout(int *a, int *b, int *c);

#ifdef __cplusplus
}
#endif

#endif
