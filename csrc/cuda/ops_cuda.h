/* Per-vector CUDA kernels of the gpt-oss block (RMSNorm, RoPE, MoE router, SwiGLU-OAI, residual add,
 * row gather/scatter, MoE combine): the GPU counterparts of csrc/ops.c and the glue of csrc/moe.c.
 *
 * All pointers are device memory. Every function is asynchronous on `stream` (a cudaStream_t), returns
 * 0 or a cudaError_t code, allocates nothing and never waits on the host, so it can be captured in a
 * CUDA graph: grid sizes depend only on the host arguments. */
#ifndef PE_OPS_CUDA_H
#define PE_OPS_CUDA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Per contiguous row of n floats, as pe_rmsnorm: out = g * (x * (1 / sqrt(mean(x^2) + eps))), the sum
 * of squares in double. out may alias x. */
int pe_cu_rmsnorm(float *out, const float *x, const float *g, int64_t n_rows, int64_t n, float eps, void *stream);
/* x += t, then out = rmsnorm(x) (both per row of n), in one pass; out must not alias x. */
int pe_cu_add_rmsnorm(float *out, float *x, const float *t, const float *g, int64_t n_rows, int64_t n, float eps,
                      void *stream);
/* The two above, also writing out quantized into xq (rows pe_cu_act_q8_ld(n) bytes apart; n a
 * multiple of 32): the int8 activations of matvec_q8_cuda.h, quantized once per token where they
 * are made. */
int pe_cu_rmsnorm_q8(float *out, uint8_t *xq, const float *x, const float *g, int64_t n_rows, int64_t n, float eps,
                     void *stream);
int pe_cu_add_rmsnorm_q8(float *out, uint8_t *xq, float *x, const float *t, const float *g, int64_t n_rows,
                         int64_t n, float eps, void *stream);

/* NeoX RoPE in place: token t's n_heads head vectors start at x + t*ld; pair (i, i + head_dim/2) is
 * rotated by cos/sin = (float)(mscale * cos((double)pos[t] * omega[i])), as pe_rope_table/pe_rope_apply.
 * pos: n_tok int64, omega: head_dim/2 doubles (device). head_dim even, <= 256. */
int pe_cu_rope(float *x, int64_t n_tok, int64_t ld, int n_heads, int head_dim, const int64_t *pos,
               const double *omega, double mscale, void *stream);

/* Per row of n_expert logits: sel = indices of the k largest, largest first, ties to the lower index
 * (pe_topk); wts = softmax of those k logits (pe_softmax). 0 < k <= n_expert <= 256. */
int pe_cu_router(const float *logits, int64_t n_rows, int n_expert, int k, int32_t *sel, float *wts, void *stream);

/* out = min(g,7) * sigmoid(1.702 min(g,7)) * (clamp(u,-7,7) + 1) over n values (out may alias g or u). */
int pe_cu_swiglu_oai(float *out, const float *g, const float *u, int64_t n, void *stream);
/* The same per row: out[r*n + i] from g[r*ld + i] and u[r*ld + i] (gate and up rows side by side,
 * as the stacked gate|up expert product writes them: u = g + n, ld = 2n). out may alias neither. */
int pe_cu_swiglu_oai_rows(float *out, const float *g, const float *u, int64_t n_rows, int64_t n, int64_t ld,
                          void *stream);

/* x += t over n values. */
int pe_cu_add(float *x, const float *t, int64_t n, void *stream);

/* dst row i = src row idx[i] (rows of d floats). */
int pe_cu_gather_rows(float *dst, const float *src, const int32_t *idx, int64_t n_rows, int64_t d, void *stream);

/* dst row idx[i] = src row i (rows of d floats). */
int pe_cu_scatter_rows(float *dst, const float *src, const int32_t *idx, int64_t n_rows, int64_t d, void *stream);

/* y[t] = sum over ranks r < k, in rank order from 0, of wts[t*k + r] * slots row (t*k + r); rows of d. */
int pe_cu_moe_combine(float *y, const float *slots, const float *wts, int64_t n_tok, int k, int64_t d, void *stream);

#ifdef __cplusplus
}
#endif

#endif
