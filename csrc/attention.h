/* Causal grouped-query attention with per-head sinks and an optional sliding window, over a KV cache.
 *
 * The cache of one layer is a ring of n_slots positions; position p lives in slot p % n_slots. Full
 * layers use n_slots = n_ctx (no wrap); sliding layers need only window + batch slots. The cache is
 * head-major: K/V head g's row for slot r (head_dim elements) is row g * n_slots + r, so attention,
 * which reads one head's rows in order, streams contiguous memory (position-major rows put the
 * head's 128 bytes every kv_dim elements, and the strided reads waited on memory: at depth 2048 the
 * head-major tiles made attention ~2x faster). K and V each have an element type (PE_TYPE_F32, F16,
 * BF16 or Q8_0, as llama.cpp's --cache-type-k/v): rows are written in it once per token and read back
 * through the type's dequantizer, a tile at a time. On AVX-512 CPUs the keys of the element types
 * (not Q8_0) are kept in tiles of 16 slots, dimension by dimension within a tile (kv_rows in attention_heads.h), so
 * that 16 keys' scores take no sums across vector lanes: 1.12-1.29x on attention at depths 4096 and
 * 32768 (bench/RESULTS.md, twelfth session). */
#ifndef PE_ATTENTION_H
#define PE_ATTENTION_H

#include <stdint.h>

typedef struct {
    uint8_t *k, *v;     /* [n_head_kv][n_slots] rows of head_dim elements of type_k / type_v (keys tiled: above) */
    int64_t n_slots;
    int type_k, type_v; /* F32, F16, BF16 or Q8_0 (Q8_0: head_dim a multiple of 32, checked by callers) */
} pe_kv_layer;

/* Writes the f32 k and v rows (kv_dim = n_head_kv * head_dim floats each) of n_tok tokens at positions
 * pos0.. into the cache, in its types. */
void pe_kv_store(pe_kv_layer *kv, const float *k, const float *v, int64_t n_tok, int64_t pos0, int64_t kv_dim,
                 int head_dim);

/* Whether this process keeps keys of the cache type in tiles (above; attention_heads.h): a copy of a
 * cache's rows reads back right only where the answer is the same (pyengine's state files say it). */
int pe_kv_keys_tiled(int type);

/* out[t][h*head_dim..] = attention of query head h of token t (position pos0 + t) over keys j <= p
 * (and p - j < window when window > 0); sinks[h] joins the softmax denominator unscaled. The keys
 * of the n_tok tokens must already be stored. Returns 0, or -1 when scratch cannot be allocated. */
int pe_attention(float *out, const float *q, int64_t n_tok, int64_t pos0, const pe_kv_layer *kv,
                 int n_head, int n_head_kv, int head_dim, int64_t window, const float *sinks, int n_threads);

#endif
