/* Causal grouped-query attention with per-head sinks and an optional sliding window, over a KV cache.
 *
 * The cache of one layer is a ring of n_slots rows; position p lives in row p % n_slots. Full layers
 * use n_slots = n_ctx (no wrap); sliding layers need only window + batch rows. K and V each have an
 * element type (PE_TYPE_F32, F16, BF16 or Q8_0, as llama.cpp's --cache-type-k/v): rows are written
 * in it once per token and read back through the type's SIMD kernels inside the attention loop. */
#ifndef PE_ATTENTION_H
#define PE_ATTENTION_H

#include <stdint.h>

typedef struct {
    uint8_t *k, *v;     /* [n_slots] rows of n_head_kv * head_dim elements of type_k / type_v */
    int64_t n_slots;
    int type_k, type_v; /* F32, F16, BF16 or Q8_0 (Q8_0: head_dim a multiple of 32, checked by callers) */
} pe_kv_layer;

/* Writes the f32 k and v rows of n_tok tokens at positions pos0.. into the cache, in its types. */
void pe_kv_store(pe_kv_layer *kv, const float *k, const float *v, int64_t n_tok, int64_t pos0, int64_t kv_dim);

/* out[t][h*head_dim..] = attention of query head h of token t (position pos0 + t) over keys j <= p
 * (and p - j < window when window > 0); sinks[h] joins the softmax denominator unscaled. The keys
 * of the n_tok tokens must already be stored. Returns 0, or -1 when scratch cannot be allocated. */
int pe_attention(float *out, const float *q, int64_t n_tok, int64_t pos0, const pe_kv_layer *kv,
                 int n_head, int n_head_kv, int head_dim, int64_t window, const float *sinks, int n_threads);

#endif
