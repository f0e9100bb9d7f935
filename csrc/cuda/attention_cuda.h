/* CUDA attention with sinks over a ring KV cache (the GPU counterpart of csrc/attention.c).
 *
 * Flash-decoding: each (token, head) pair's key range is cut into a fixed number of chunks chosen on
 * the host from max_keys and the pair count; one block per (pair, chunk) computes a partial online
 * softmax, a second kernel merges the chunks and adds the sink. All pointers are device memory; every
 * call is asynchronous on `stream`, allocates nothing and never waits on the host (graph-capturable:
 * the grid depends only on host arguments, never on the positions stored on the device). Returns 0 or
 * a cudaError_t code. */
#ifndef PE_ATTENTION_CUDA_H
#define PE_ATTENTION_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Cache element types: ggml ids (csrc/quant_formats.h) F32, F16, BF16 or Q8_0 (Q8_0: head_dim a multiple
 * of 32); a row of kv_dim elements takes kv_dim / block * block bytes. */

/* Row pos[t] % n_slots of kc and vc = k + t*ld and v + t*ld (kv_dim floats each), each head encoded in type_k /
 * type_v exactly as the CPU's pe_kv_store encodes it (the CPU cache is head-major, this one position-major). */
int pe_cu_kv_store(void *kc, void *vc, int type_k, int type_v, int64_t n_slots, const float *k, const float *v,
                   int64_t ld, int64_t n_tok, const int64_t *pos, int64_t kv_dim, void *stream);

/* Floats of scratch pe_cu_attention needs for these arguments. */
size_t pe_cu_attention_scratch_floats(int64_t n_tok, int n_head, int head_dim, int64_t max_keys);

/* As pe_attention: query head h of token t (q + t*ldq + h*head_dim, position pos[t]) attends the keys at
 * positions lo..pos[t] (lo = max(0, pos[t] - window + 1) when window > 0, else 0), stored in row
 * j % n_slots of kc/vc ([n_slots][n_head_kv*head_dim] of type_k / type_v, converted to f32 as each
 * tile is staged in shared memory), kv head h / (n_head / n_head_kv), scale
 * 1/sqrt(head_dim); sinks[h] joins the softmax denominator without a value. Output at
 * out + t*ldo + h*head_dim. max_keys: host bound of the keys any token attends; it fixes the number
 * of chunks (the grid and the scratch), while each token's true key count, derived on the device from
 * pos, is split evenly over those chunks (any count is attended in full). head_dim <= 256, n_head a
 * multiple of n_head_kv. */
int pe_cu_attention(float *out, int64_t ldo, const float *q, int64_t ldq, int64_t n_tok, const int64_t *pos,
                    const void *kc, const void *vc, int type_k, int type_v, int64_t n_slots, int n_head,
                    int n_head_kv, int head_dim, int64_t window, const float *sinks, int64_t max_keys, float *scratch,
                    void *stream);
/* As pe_cu_attention, and the output rows also quantized for the int8 products as they are written
 * (the codes pe_cu_act_q8 would give them, matvec_q8_cuda.h): row t at oq + t*ldoq, of n_head*head_dim
 * elements. head_dim a multiple of 32 (each merge warp then writes one whole 32-element block). */
int pe_cu_attention_q8(float *out, int64_t ldo, const float *q, int64_t ldq, int64_t n_tok, const int64_t *pos,
                       const void *kc, const void *vc, int type_k, int type_v, int64_t n_slots, int n_head,
                       int n_head_kv, int head_dim, int64_t window, const float *sinks, int64_t max_keys,
                       float *scratch, uint8_t *oq, int64_t ldoq, void *stream);

#ifdef __cplusplus
}
#endif

#endif
