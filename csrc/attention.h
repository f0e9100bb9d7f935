/* Causal grouped-query attention with per-head sinks and an optional sliding window, over a KV cache.
 *
 * The cache of one layer is a ring of n_slots rows; position p lives in row p % n_slots. Full layers
 * use n_slots = n_ctx (no wrap); sliding layers need only window + batch rows. The cache is f32. */
#ifndef PE_ATTENTION_H
#define PE_ATTENTION_H

#include <stdint.h>

typedef struct {
    float *k, *v;    /* [n_slots][n_head_kv * head_dim] each */
    int64_t n_slots;
} pe_kv_layer;

/* Copies the k and v rows of n_tok tokens at positions pos0.. into the cache. */
void pe_kv_store(pe_kv_layer *kv, const float *k, const float *v, int64_t n_tok, int64_t pos0, int64_t kv_dim);

/* out[t][h*head_dim..] = attention of query head h of token t (position pos0 + t) over keys j <= p
 * (and p - j < window when window > 0); sinks[h] joins the softmax denominator unscaled. The keys
 * of the n_tok tokens must already be stored. Returns 0, or -1 when scratch cannot be allocated. */
int pe_attention(float *out, const float *q, int64_t n_tok, int64_t pos0, const pe_kv_layer *kv,
                 int n_head, int n_head_kv, int head_dim, int64_t window, const float *sinks, int n_threads);

#endif
