/* Row argmax for the greedy sampler (argmax_cuda.h). A grid of (blocks per row, rows): each thread
 * keeps the best key of its strided elements, the block reduces them by warp shuffles and one
 * shared-memory step, and its first thread folds the block's best into the row's key with atomicMax.
 * Several blocks per row spread the 804 KB of a 20b logits row over many SMs (one block would read
 * it at a single SM's bandwidth). */
#include "compat.h"

#include "argmax_cuda.h"

#define CUA_THREADS 256
#define CUA_PER_THREAD 16   /* elements per thread before another block is added */
#define CUA_MAX_BLOCKS 128  /* blocks per row */

/* (value, index) as one integer that orders as the sampler chooses: the float's bits mapped to an
 * unsigned order (negatives reversed), NaN as -inf, -0 as +0; the index complemented below it so that
 * the lower index of equal values is the larger key. Never 0 (-inf maps to 0x007fffff). */
PE_DEVICE inline unsigned long long cua_key(float v, int64_t i) {
    if (v != v) v = -INFINITY;
    if (v == 0.0f) v = 0.0f;
    const uint32_t b = __float_as_uint(v);
    const uint32_t u = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((unsigned long long)u << 32) | (unsigned long long)(0xffffffffu - (uint32_t)i);
}

PE_GLOBAL void cua_argmax_kernel(const float *x, int64_t n, int64_t ld, unsigned long long *keys) {
    PE_SHARED unsigned long long part[CUA_THREADS / 32];
    const float *row = x + (int64_t)blockIdx.y * ld;
    unsigned long long best = 0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const unsigned long long k = cua_key(row[i], i);
        best = k > best ? k : best;
    }
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long k = pe_shfl_xor(best, o);
        best = k > best ? k : best;
    }
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (unsigned w = 1; w < blockDim.x / 32; w++) best = part[w] > best ? part[w] : best;
        atomicMax(keys + blockIdx.y, best);
    }
}

extern "C" int pe_cu_argmax_keys(const float *x, int64_t n_rows, int64_t n, int64_t ld, uint64_t *keys,
                                 void *stream) {
    if (n_rows < 0 || n <= 0 || n > 0x80000000LL || ld < n || n_rows > 65535) return (int)cudaErrorInvalidValue;
    if (n_rows == 0) return 0;
    int64_t blocks = (n + CUA_THREADS * CUA_PER_THREAD - 1) / (CUA_THREADS * CUA_PER_THREAD);
    if (blocks > CUA_MAX_BLOCKS) blocks = CUA_MAX_BLOCKS;
    PE_LAUNCH(cua_argmax_kernel, dim3((unsigned)blocks, (unsigned)n_rows), CUA_THREADS, 0, (cudaStream_t)stream, x, n,
              ld, (unsigned long long *)keys);
    return (int)cudaGetLastError();
}
