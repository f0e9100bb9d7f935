/* Decode products on int8 activations (docs/cuda.md, "Decode on int8 activations"): each product's
 * input is quantized once per token into the CPU path's two-digit int8 blocks (docs/forward.md,
 * "Int8 activations"), and Q8_0 / MXFP4 weights, re-laid once at upload into code bytes and a
 * separate scale array, are multiplied with dp4a. Reading the weights is the whole cost of a decode
 * step; these kernels retire several weight bytes per warp instruction, the float kernels of
 * matmul_cuda.cu about one.
 *
 * Plain C, callable from Cython. Device pointers; `stream` a cudaStream_t. Nothing synchronizes or
 * allocates (every call can be captured in a CUDA graph). Return value: 0, 1 (cudaErrorInvalidValue,
 * nothing launched) or the launch's CUDA error. */
#ifndef PE_MATVEC_Q8_CUDA_H
#define PE_MATVEC_Q8_CUDA_H

#include <stdint.h>

#include "matmul_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A Q8_0 or MXFP4 weight re-laid for 16-byte loads: row r of expert e has its codes at
 * qs + (e * n_out + r) * code_bytes(n_in) (Q8_0: the n_in int8 codes; MXFP4: per 32 elements the 16
 * nibble bytes of the file's block) and its per-32 scales at sc + (e * n_out + r) * (n_in / 32) *
 * scale_bytes (Q8_0: f16; MXFP4: the e8m0 byte). qs == NULL: no re-laid copy (the float kernels run). */
typedef struct {
    const uint8_t *qs;
    const uint8_t *sc;
    int type;
    int64_t n_in, n_out;
} pe_cu_wq8;

/* 1 when pe_cu_wq8_relayout takes this weight: Q8_0 or MXFP4 with n_in a positive multiple of 32. */
int pe_cu_wq8_supported(int type, int64_t n_in);
/* Bytes of the code and scale arrays of n_expert experts of w's shape. */
int64_t pe_cu_wq8_code_bytes(int type, int64_t n_in, int64_t n_out, int64_t n_expert);
int64_t pe_cu_wq8_scale_bytes(int type, int64_t n_in, int64_t n_out, int64_t n_expert);
/* Re-lays n_expert experts of the packed device weight w into qs / sc (sized as above) and fills *out. */
int pe_cu_wq8_relayout(const pe_cu_weight *w, int64_t n_expert, uint8_t *qs, uint8_t *sc, pe_cu_wq8 *out,
                       void *stream);

/* Quantized activations of a row of n floats (n a multiple of 32): n int8 codes q, n int8 second
 * digits ql, n / 32 float scales d, at byte offsets 0, n, 2n of the row; rows pe_cu_act_q8_ld(n)
 * bytes apart. Per 32 elements d = max|x| / 127, q = round(x / d), ql = round((x / d - q) * 254),
 * rounding half away from zero: csrc/act_q8.c's formula. */
int64_t pe_cu_act_q8_ld(int64_t n);
int pe_cu_act_q8(uint8_t *xq, const float *x, int64_t ldx, int64_t n_rows, int64_t n, void *stream);
/* The RMSNorm kernels that quantize their output as they write it: pe_cu_rmsnorm_q8 and
 * pe_cu_add_rmsnorm_q8 in ops_cuda.h. */

/* y[i*ldy + r] = dot(row r of expert e_i, activation row i) + (bias ? bias[e_i*n_out + r] : 0) for
 * i < n_rows, e_i = experts ? experts[i] : 0; activation row i at xq + i * ldq (ldq = 0: every row
 * reads the same one). Without experts up to 8 activation rows share one pass over the weights. */
int pe_cu_matvec_q8(const pe_cu_wq8 *w, const int32_t *experts, const uint8_t *xq, int64_t ldq, int64_t n_rows,
                    const float *bias, float *y, int64_t ldy, void *stream);

/* q|k|v of one token (activation row xq) with RoPE and the K/V store as the epilogue: w holds the
 * n_head q heads, n_head_kv k heads, n_head_kv v heads of head_dim rows; qkv[r] = product + bias[r],
 * q and k heads rotated as pe_cu_rope (ops_cuda.h) at position pos[0] (device); with kc/vc (F32, F16
 * or BF16 cache rows of n_head_kv * head_dim elements; NULL: no store) k and v also go into row
 * pos[0] % n_slots as pe_cu_kv_store writes them. Replaces three launches of a decode step. */
int pe_cu_qkv_rope_q8_stores(int type_k, int type_v); /* 1: the cache types the store above takes */
int pe_cu_qkv_rope_q8(const pe_cu_wq8 *w, const uint8_t *xq, const float *bias, float *qkv, int n_head, int n_head_kv,
                      int head_dim, const int64_t *pos, const double *omega, double mscale, void *kc, void *vc,
                      int type_k, int type_v, int64_t n_slots, void *stream);

/* The mixture of experts of n_tok tokens, k experts each (sel, wts: [n_tok * k], rank order):
 * gate|up with SwiGLU-OAI as the epilogue: w holds per expert n_ff gate rows, then n_ff up rows
 * (bias [n_expert][2 n_ff]); h[p*n_ff + f] = swiglu(gate_f + b, up_f + b) for pair p = t*k + j, which
 * reads token t's activation row (xq + t * ldq). */
int pe_cu_moe_gate_up_q8(const pe_cu_wq8 *w, const int32_t *sel, const uint8_t *xq, int64_t ldq, int64_t n_tok,
                         int k, const float *bias, float *h, void *stream);
/* down with the weighted sum as the epilogue: y[t*n_out + r] = sum over ranks j in order of
 * wts[p] * (dot(row r of expert sel[p], hq row p) + bias[sel[p]*n_out + r]), p = t*k + j; hq rows
 * ldq bytes apart. Deterministic (no atomics): one warp owns each output. */
int pe_cu_moe_down_q8(const pe_cu_wq8 *w, const int32_t *sel, const float *wts, const uint8_t *hq, int64_t ldq,
                      int64_t n_tok, int k, const float *bias, float *y, void *stream);

#ifdef __cplusplus
}
#endif

#endif
