/* The greedy sampler on the device: the argmax of each logits row, so that a greedy decode step
 * downloads one 8-byte key per sequence instead of its n_vocab floats (201,088 x 4 bytes for the
 * gpt-oss vocabulary).
 *
 * The choice is the one pyengine/sampling.py's greedy Sampler makes from the same float32 row: the
 * largest value, the lowest index among equal ones, NaN counted as -inf (the sampler's nan_to_num),
 * -0.0 equal to +0.0, and index 0 when every value is -inf or NaN. Each row's choice is kept as a
 * 64-bit key that orders as (value, -index) and is combined with atomicMax, an order-independent
 * maximum, so the result does not depend on how the blocks are scheduled.
 *
 * Device pointers; asynchronous on `stream`; nothing allocated. */
#ifndef PE_ARGMAX_CUDA_H
#define PE_ARGMAX_CUDA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* keys[r] = max(keys[r], key of row r's best element) for n_rows rows of n floats, ld apart. Zero the
 * keys before the first call of a row (a zero key is below every element's); one call per chunk of rows
 * may follow another on the same keys. n <= 2^31. */
int pe_cu_argmax_keys(const float *x, int64_t n_rows, int64_t n, int64_t ld, uint64_t *keys, void *stream);

/* The index a key stands for (host or device). */
static inline int32_t pe_cu_argmax_index(uint64_t key) { return (int32_t)(0xffffffffu - (uint32_t)key); }

#ifdef __cplusplus
}
#endif

#endif
