/* Register-blocked f32 matrix product for batched matmul (prefill): a small tile of weight rows
 * (already dequantized to f32) times a batch of token activations.
 *
 * Summation order: every output is summed exactly as the F32 type's dot_f32 of the same SIMD level
 * sums it (same lanes, same partial sums, same final reduction), so a batch gives the same bits as
 * one-token decode on F32 weights and as any other blocking or thread partition. */
#ifndef PE_GEMM_H
#define PE_GEMM_H

#include <stdint.h>

enum {
    PE_GEMM_MAX_ROWS = 16,   /* rows of a weight tile */
    PE_GEMM_TOK_CHUNK = 48,  /* tokens whose partial sums are held in scratch at once */
};
/* floats of scratch one pe_gemm_f32 call needs: 4 partial-sum vectors of (at most) 16 lanes per output */
#define PE_GEMM_SCRATCH_FLOATS ((int64_t)4 * PE_GEMM_MAX_ROWS * PE_GEMM_TOK_CHUNK * 16)

/* c[t*ldc + r] = sum_i a[r*lda + i] * b[t*ldb + i] for r < m (m <= PE_GEMM_MAX_ROWS), t < n, i < k.
 * scratch: PE_GEMM_SCRATCH_FLOATS floats, 64-byte aligned. */
typedef void (*pe_gemm_f32_fn)(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t n,
                               int64_t k, float *c, int64_t ldc, float *scratch);

/* dst[0..n) = the IEEE half values at src, exactly (the type table has no SIMD F16 dequant_row;
 * the scalar one is the bottleneck of batched F16 products). */
void pe_f16_to_f32_avx512(const void *src, float *dst, int64_t n);
void pe_f16_to_f32_avx2(const void *src, float *dst, int64_t n);

void pe_gemm_f32_avx512(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t n,
                        int64_t k, float *c, int64_t ldc, float *scratch);
void pe_gemm_f32_avx2(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t n, int64_t k,
                      float *c, int64_t ldc, float *scratch);

#endif
