/* Quantized matrix products on the GPU: dequantize, decode matrix-vector (plain, batched and per-row
 * expert for MoE) and prefill matrix-matrix, for every weight type of csrc/quants.h.
 *
 * Plain C, callable from Cython. Every pointer is device memory; `stream` is a cudaStream_t (NULL =
 * default stream). Nothing here synchronizes or allocates, so every call can be captured in a CUDA
 * graph. Return value: 0, 1 (cudaErrorInvalidValue: an argument the kernels cannot take, nothing
 * launched) or the CUDA error of the launch. Callers (Python) validate shapes, strides, expert ids
 * and F32/F16/BF16 alignment (data and strides a multiple of the element size) first. */
#ifndef PE_MATMUL_CUDA_H
#define PE_MATMUL_CUDA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const uint8_t *data;    /* device memory: row 0 of expert 0 */
    int type;               /* ggml type id */
    int64_t n_in, n_out;    /* elements per row, rows (per expert) */
    int64_t row_stride;     /* bytes between rows (>= bytes of one row) */
    int64_t expert_stride;  /* bytes between experts (0 for a plain matrix) */
} pe_cu_weight;

/* 1 for the 14 types the CPU engine reads (F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K..Q6_K MXFP4). */
int pe_cu_type_supported(int type);

/* dst[r][0..n_in) (f32, row-major, contiguous) = row r of expert `expert`, all n_out rows; bit-identical
 * to the CPU dequantization (and gguf.quants.dequantize). */
int pe_cu_dequant(const pe_cu_weight *w, int64_t expert, float *dst, void *stream);

/* Decode products: for i < n_rows, r < n_out:
 *   y[i*ldy + r] = dot(row r of expert e_i, x + i*ldx) + (bias ? bias[e_i*n_out + r] : 0),
 *   e_i = experts ? experts[i] : 0 (device int32 [n_rows], already range-checked).
 * Without experts each weight row is read once per group of up to 8 rows of x. With experts, ldx = 0
 * is allowed: every row reads the same x (the n_used expert pairs of one token, no gather). */
int pe_cu_matvec(const pe_cu_weight *w, const int32_t *experts, const float *x, int64_t ldx, int64_t n_rows,
                 const float *bias, float *y, int64_t ldy, void *stream);

/* Prefill products: as pe_cu_matvec with e_i = expert for every row; bias NULL or [n_out] (already
 * offset to the expert). Tiled: each 64x32 weight tile is dequantized once per 64 rows of x; from
 * 16 rows on, 3xTF32 tensor cores (f32-level accuracy), below that f32 FMA. */
int pe_cu_gemm(const pe_cu_weight *w, int64_t expert, const float *x, int64_t ldx, int64_t n_rows,
               const float *bias, float *y, int64_t ldy, void *stream);

/* Prefill products of many experts in one grid (MoE): the rows of x are sorted by expert, expert e
 * owning rows start[e] .. start[e+1]-1 (start: a HOST array of n_expert + 1 nondecreasing offsets,
 * start[0] >= 0, start[n_expert] <= INT32_MAX; rows outside are not touched):
 *   y[i*ldy + r] = dot(row r of expert e, x + i*ldx) + (bias ? bias[e*n_out + r] : 0).
 * The same results as one pe_cu_gemm per expert with at least 16 rows (the tensor-core kernel, used
 * here for every group), but one launch per 128 experts, so the tiles of all experts fill the GPU
 * together. The caller checks that experts 0 .. n_expert-1 exist. */
int pe_cu_gemm_experts(const pe_cu_weight *w, const int64_t *start, int64_t n_expert, const float *x, int64_t ldx,
                       const float *bias, float *y, int64_t ldy, void *stream);

#ifdef __cplusplus
}
#endif

#endif
