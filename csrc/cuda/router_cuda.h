/* The MoE router of a decode step in one launch: the router product with its bias, the top-k and the
 * softmax over the chosen experts (csrc/moe.c's order of selection and ties, router_dev.cuh), instead
 * of a matrix-vector launch followed by pe_cu_router. For float-typed router weights (F32, F16, BF16:
 * what gpt-oss files carry); the caller keeps the two launches for other types.
 *
 * Device pointers; asynchronous on `stream`; nothing allocated (graph-capturable). */
#ifndef PE_ROUTER_CUDA_H
#define PE_ROUTER_CUDA_H

#include <stdint.h>

#include "matmul_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Whether pe_cu_router_fused takes router weights of this ggml type and n_expert rows. */
int pe_cu_router_fused_supported(int type, int64_t n_expert);

/* Per row i < n_rows of x (n_in floats, ldx apart): logits = W x_i + bias (bias NULL: none), computed
 * as pe_cu_matvec computes them for these types (the same bits); sel[i*k..] = the k largest experts,
 * largest first, ties to the lower index; wts[i*k..] = softmax of their logits. 0 < k <= n_expert. */
int pe_cu_router_fused(const pe_cu_weight *w, const float *x, int64_t ldx, int64_t n_rows, const float *bias,
                       int k, int32_t *sel, float *wts, void *stream);

#ifdef __cplusplus
}
#endif

#endif
