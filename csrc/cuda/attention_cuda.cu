/* Flash-decoding attention with sinks (see attention_cuda.h; the CPU reference is csrc/attention.c).
 *
 * Pass 1: block (pair, chunk), 4 warps. q sits in shared memory; warp w takes keys w, w+4, ... of the
 * chunk, its lanes split the head dimensions (lane + 32 i), a butterfly sums the dot product, and the
 * warp keeps an online softmax (max m, sum l, acc[head_dim]). The 4 warps merge in shared memory into
 * one partial (m, l, acc) per chunk. Pass 2: one block per pair rescales the chunk partials to the
 * common max, adds exp(sink - max) to the denominator (in double, like the CPU) and writes the output. */
#include "compat.h"
#include "attention_cuda.h"

#define CUK_ATT_WARPS 4
#define CUK_ATT_MAX_DIM 256
#define CUK_ATT_DIMS_PER_LANE (CUK_ATT_MAX_DIM / 32)
#define CUK_ATT_TARGET_BLOCKS 1056 /* 8 four-warp blocks on each of an H100's 132 SMs */
#define CUK_ATT_MIN_CHUNK 64       /* keys: shorter chunks cost more in setup than they gain */
#define CUK_ATT_MAX_CHUNKS 256
#define CUK_INT_LIMIT 0x7fffffff

/* Chunks per (token, head) pair: enough blocks to fill the GPU, none shorter than CUK_ATT_MIN_CHUNK. */
static int64_t cuk_att_chunks(int64_t n_tok, int n_head, int64_t max_keys) {
    const int64_t pairs = n_tok * n_head;
    int64_t c = (CUK_ATT_TARGET_BLOCKS + pairs - 1) / pairs;
    const int64_t by_len = (max_keys + CUK_ATT_MIN_CHUNK - 1) / CUK_ATT_MIN_CHUNK;
    if (c > by_len) c = by_len;
    if (c > CUK_ATT_MAX_CHUNKS) c = CUK_ATT_MAX_CHUNKS;
    return c < 1 ? 1 : c;
}

PE_GLOBAL void cuk_kv_store_kernel(float *kc, float *vc, int64_t n_slots, const float *k, const float *v, int64_t ld,
                                   const int64_t *pos, int64_t kv_dim) {
    const int64_t t = blockIdx.x;
    int64_t slot = pos[t] % n_slots;
    if (slot < 0) slot += n_slots;
    float *kd = kc + slot * kv_dim, *vd = vc + slot * kv_dim;
    const float *ks = k + t * ld, *vs = v + t * ld;
    for (int64_t c = threadIdx.x; c < kv_dim; c += blockDim.x) {
        kd[c] = ks[c];
        vd[c] = vs[c];
    }
}

int pe_cu_kv_store(float *kc, float *vc, int64_t n_slots, const float *k, const float *v, int64_t ld,
                   int64_t n_tok, const int64_t *pos, int64_t kv_dim, void *stream) {
    if (n_slots <= 0 || n_tok < 0 || n_tok > CUK_INT_LIMIT || kv_dim <= 0 || ld < kv_dim)
        return (int)cudaErrorInvalidValue;
    if (n_tok == 0) return 0;
    const int threads = kv_dim >= 256 ? 256 : (int)((kv_dim + 31) / 32 * 32);
    PE_LAUNCH(cuk_kv_store_kernel, (unsigned)n_tok, threads, 0, (cudaStream_t)stream, kc, vc, n_slots, k, v, ld,
              pos, kv_dim);
    return (int)cudaGetLastError();
}

size_t pe_cu_attention_scratch_floats(int64_t n_tok, int n_head, int head_dim, int64_t max_keys) {
    if (n_tok <= 0 || n_head <= 0 || head_dim <= 0) return 0;
    return (size_t)(n_tok * n_head * cuk_att_chunks(n_tok, n_head, max_keys)) * (size_t)(head_dim + 2);
}

/* Partial softmax of one chunk; ml gets (max, sum) per block, acc head_dim floats per block. A chunk
 * with no keys leaves max = -inf, sum = 0, acc = 0. The last chunk runs to the token's true key count
 * even past chunk_len, so an underestimated max_keys costs speed, never keys. */
PE_GLOBAL void cuk_attn_partial_kernel(const float *q, int64_t ldq, const int64_t *pos, const float *kc,
                                       const float *vc, int64_t n_slots, int n_head, int n_head_kv, int head_dim,
                                       int64_t window, int64_t n_chunks, int64_t chunk_len, float *ml, float *acc_out) {
    PE_SHARED float q_sh[CUK_ATT_MAX_DIM];
    PE_SHARED float m_sh[CUK_ATT_WARPS], l_sh[CUK_ATT_WARPS];
    PE_SHARED float acc_sh[CUK_ATT_WARPS][CUK_ATT_MAX_DIM];
    const int64_t blk = blockIdx.x, pair = blk / n_chunks, chunk = blk % n_chunks;
    const int64_t t = pair / n_head;
    const int h = (int)(pair % n_head);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float *qh = q + t * ldq + (int64_t)h * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) q_sh[d] = qh[d];

    const int64_t p = pos[t];
    const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    const int64_t n_keys = p - lo + 1; /* <= 0 for a negative position: no keys */
    const int64_t begin = chunk * chunk_len;
    int64_t end = chunk == n_chunks - 1 ? n_keys : begin + chunk_len;
    if (end > n_keys) end = n_keys;
    const int64_t kv_dim = (int64_t)n_head_kv * head_dim;
    const int64_t kv_off = (int64_t)(h / (n_head / n_head_kv)) * head_dim;
    const float scale = 1.0f / sqrtf((float)head_dim);
    __syncthreads();

    float m = -INFINITY, l = 0.0f, acc[CUK_ATT_DIMS_PER_LANE];
    for (int i = 0; i < CUK_ATT_DIMS_PER_LANE; i++) acc[i] = 0.0f;
    int64_t slot = (lo + begin + warp) % n_slots; /* ring row of key j, advanced without a division */
    for (int64_t j = begin + warp; j < end; j += CUK_ATT_WARPS) {
        const float *kr = kc + slot * kv_dim + kv_off, *vr = vc + slot * kv_dim + kv_off;
        for (slot += CUK_ATT_WARPS; slot >= n_slots;) slot -= n_slots;
        float s = 0.0f;
        for (int i = 0; i < CUK_ATT_DIMS_PER_LANE; i++) {
            const int d = lane + 32 * i;
            if (d < head_dim) s += q_sh[d] * kr[d];
        }
        for (int o = 16; o > 0; o >>= 1) s += pe_shfl_xor(s, o);
        s *= scale;
        const float m_new = fmaxf(m, s);
        if (m_new == -INFINITY) continue; /* a -inf score adds nothing */
        const float corr = expf(m - m_new), e = expf(s - m_new);
        l = l * corr + e;
        for (int i = 0; i < CUK_ATT_DIMS_PER_LANE; i++) {
            const int d = lane + 32 * i;
            if (d < head_dim) acc[i] = acc[i] * corr + e * vr[d];
        }
        m = m_new;
    }

    if (lane == 0) {
        m_sh[warp] = m;
        l_sh[warp] = l;
    }
    for (int i = 0; i < CUK_ATT_DIMS_PER_LANE; i++) {
        const int d = lane + 32 * i;
        if (d < head_dim) acc_sh[warp][d] = acc[i];
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int w = 0; w < CUK_ATT_WARPS; w++) mx = fmaxf(mx, m_sh[w]);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.0f;
        for (int w = 0; w < CUK_ATT_WARPS; w++)
            if (m_sh[w] != -INFINITY) a += acc_sh[w][d] * expf(m_sh[w] - mx);
        acc_out[blk * head_dim + d] = a;
    }
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int w = 0; w < CUK_ATT_WARPS; w++)
            if (m_sh[w] != -INFINITY) sum += l_sh[w] * expf(m_sh[w] - mx);
        ml[2 * blk] = mx;
        ml[2 * blk + 1] = sum;
    }
}

PE_GLOBAL void cuk_attn_merge_kernel(float *out, int64_t ldo, const float *sinks, int n_head, int head_dim,
                                     int64_t n_chunks, const float *ml, const float *acc_in) {
    const int64_t pair = blockIdx.x, t = pair / n_head;
    const int h = (int)(pair % n_head);
    const float *pm = ml + 2 * pair * n_chunks;
    const float *pa = acc_in + pair * n_chunks * head_dim;
    const float sink = sinks[h];
    float mx = sink;
    for (int64_t c = 0; c < n_chunks; c++) mx = fmaxf(mx, pm[2 * c]);
    double sum = exp((double)sink - mx);
    for (int64_t c = 0; c < n_chunks; c++)
        if (pm[2 * c] != -INFINITY) sum += (double)(pm[2 * c + 1] * expf(pm[2 * c] - mx));
    const float inv = (float)(1.0 / sum);
    float *o = out + t * ldo + (int64_t)h * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.0f;
        for (int64_t c = 0; c < n_chunks; c++)
            if (pm[2 * c] != -INFINITY) a += pa[c * head_dim + d] * expf(pm[2 * c] - mx);
        o[d] = a * inv;
    }
}

int pe_cu_attention(float *out, int64_t ldo, const float *q, int64_t ldq, int64_t n_tok, const int64_t *pos,
                    const float *kc, const float *vc, int64_t n_slots, int n_head, int n_head_kv, int head_dim,
                    int64_t window, const float *sinks, int64_t max_keys, float *scratch, void *stream) {
    if (n_tok < 0 || n_head <= 0 || n_head_kv <= 0 || n_head % n_head_kv || head_dim <= 0 ||
        head_dim > CUK_ATT_MAX_DIM || n_slots <= 0 || window < 0 || max_keys <= 0 ||
        ldq < (int64_t)n_head * head_dim || ldo < (int64_t)n_head * head_dim)
        return (int)cudaErrorInvalidValue;
    if (n_tok == 0) return 0;
    const int64_t n_chunks = cuk_att_chunks(n_tok, n_head, max_keys);
    const int64_t pairs = n_tok * n_head;
    if (pairs * n_chunks > CUK_INT_LIMIT) return (int)cudaErrorInvalidValue;
    const int64_t chunk_len = (max_keys + n_chunks - 1) / n_chunks;
    float *ml = scratch, *acc = scratch + 2 * pairs * n_chunks;
    PE_LAUNCH(cuk_attn_partial_kernel, (unsigned)(pairs * n_chunks), 32 * CUK_ATT_WARPS, 0, (cudaStream_t)stream,
              q, ldq, pos, kc, vc, n_slots, n_head, n_head_kv, head_dim, window, n_chunks, chunk_len, ml, acc);
    const int rc = (int)cudaGetLastError();
    if (rc) return rc;
    PE_LAUNCH(cuk_attn_merge_kernel, (unsigned)pairs, (head_dim + 31) / 32 * 32, 0, (cudaStream_t)stream, out, ldo,
              sinks, n_head, head_dim, n_chunks, ml, acc);
    return (int)cudaGetLastError();
}
