/* Flash-decoding attention with sinks (see attention_cuda.h; the CPU reference is csrc/attention.c).
 *
 * Pass 1: one block per (token, kv head, set of hb query heads of its GQA group, key chunk), one warp
 * per query head. The block stages tiles of keys and values in shared memory once for all its heads;
 * in each tile lane i scores key i against its warp's q, the warp takes the tile max, rescales its
 * running (max m, per-lane sums l, acc[head_dim] with lanes over dimensions) and adds the tile's
 * weighted values. Each warp writes one partial (m, l, acc) per chunk. Pass 2: one block per (token,
 * head) rescales the chunk partials to the common max, adds exp(sink - max) to the denominator (in
 * double, like the CPU) and writes the output. */
#include "compat.h"
#include "attention_cuda.h"
#include "quant_dev.cuh"
#include "kv_dev.cuh"
#include "act_q8_dev.cuh"

#define CUK_ATT_MAX_DIM 256
#define CUK_ATT_DIMS_PER_LANE (CUK_ATT_MAX_DIM / 32)
#define CUK_ATT_MAX_HEADS_PER_BLOCK 8 /* warps per block */
#define CUK_ATT_TARGET_WARPS 2112     /* 16 warps on each of an H100's 132 SMs */
#define CUK_ATT_MIN_CHUNK 64          /* keys: shorter chunks cost more in setup than they gain */
#define CUK_ATT_MAX_CHUNKS 256
#define CUK_INT_LIMIT 0x7fffffff

/* Chunks per (token, head) pair: enough warps to fill the GPU, none shorter than CUK_ATT_MIN_CHUNK. */
static int64_t cuk_att_chunks(int64_t n_tok, int n_head, int64_t max_keys) {
    const int64_t pairs = n_tok * n_head;
    int64_t c = (CUK_ATT_TARGET_WARPS + pairs - 1) / pairs;
    const int64_t by_len = (max_keys + CUK_ATT_MIN_CHUNK - 1) / CUK_ATT_MIN_CHUNK;
    if (c > by_len) c = by_len;
    if (c > CUK_ATT_MAX_CHUNKS) c = CUK_ATT_MAX_CHUNKS;
    return c < 1 ? 1 : c;
}

/* Keys per shared-memory tile: one per lane, half a warp when head_dim > 128 (48 KiB of shared memory). */
static int cuk_att_tile_keys(int head_dim) { return head_dim > 128 ? 16 : 32; }

/* Query heads per block: the largest divisor of the GQA group up to CUK_ATT_MAX_HEADS_PER_BLOCK. */
static int cuk_att_heads_per_block(int group) {
    for (int hb = CUK_ATT_MAX_HEADS_PER_BLOCK; hb > 1; hb--)
        if (group % hb == 0) return hb;
    return 1;
}

/* ---- the cache's element types (llama.cpp's --cache-type-k/v): F32, F16, BF16, Q8_0 ------------- */

static int cuk_kv_type_ok(int type) {
    return type == CUQ_F32 || type == CUQ_F16 || type == CUQ_BF16 || type == CUQ_Q8_0;
}

/* Bytes of a cache row of n elements (n a multiple of the type's block). */
PE_HOSTDEV inline int64_t cuk_kv_row_bytes(int type, int64_t n) {
    switch (type) {
    case CUQ_F16: return n / cuq_traits<CUQ_F16>::blck * cuq_traits<CUQ_F16>::size;
    case CUQ_BF16: return n / cuq_traits<CUQ_BF16>::blck * cuq_traits<CUQ_BF16>::size;
    case CUQ_Q8_0: return n / cuq_traits<CUQ_Q8_0>::blck * cuq_traits<CUQ_Q8_0>::size;
    default: return n / cuq_traits<CUQ_F32>::blck * cuq_traits<CUQ_F32>::size;
    }
}

/* Element i of a cache row r (any type above), as the CPU's dequantizers compute it. */
PE_DEVICE inline float cuk_kv_elem(const uint8_t *r, int type, int64_t i) {
    switch (type) {
    case CUQ_F16: return cuq_elem<CUQ_F16>(r + 2 * i, 0);
    case CUQ_BF16: return cuq_elem<CUQ_BF16>(r + 2 * i, 0);
    case CUQ_Q8_0: return cuq_elem<CUQ_Q8_0>(r + (i >> 5) * cuq_traits<CUQ_Q8_0>::size, (int)(i & 31));
    default: return cuq_elem<CUQ_F32>(r + 4 * i, 0);
    }
}

/* The block's threads write the n floats of src into the cache row dst in its type; Q8_0 one thread
 * per block of 32, as llama.cpp's quantize_row_q8_0_ref (the CPU's writer, bit for bit). */
PE_DEVICE inline void cuk_kv_write(uint8_t *dst, int type, const float *src, int64_t n) {
    if (type == CUQ_Q8_0) {
        for (int64_t b = threadIdx.x; b < n / 32; b += blockDim.x) {
            const float *x = src + 32 * b;
            uint8_t *o = dst + b * cuq_traits<CUQ_Q8_0>::size;
            float amax = 0.0f;
            for (int j = 0; j < 32; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
            const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            const uint16_t h = cuk_f32_to_f16(d);
            o[0] = (uint8_t)(h & 255);
            o[1] = (uint8_t)(h >> 8);
            for (int j = 0; j < 32; j++) o[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
        }
        return;
    }
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) cuk_kv_put(dst, type, c, src[c]);
}

PE_GLOBAL void cuk_kv_store_kernel(uint8_t *kc, uint8_t *vc, int type_k, int type_v, int64_t n_slots, const float *k,
                                   const float *v, int64_t ld, const int64_t *pos, int64_t kv_dim) {
    const int64_t t = blockIdx.x;
    int64_t slot = pos[t] % n_slots;
    if (slot < 0) slot += n_slots;
    cuk_kv_write(kc + slot * cuk_kv_row_bytes(type_k, kv_dim), type_k, k + t * ld, kv_dim);
    cuk_kv_write(vc + slot * cuk_kv_row_bytes(type_v, kv_dim), type_v, v + t * ld, kv_dim);
}

int pe_cu_kv_store(void *kc, void *vc, int type_k, int type_v, int64_t n_slots, const float *k, const float *v,
                   int64_t ld, int64_t n_tok, const int64_t *pos, int64_t kv_dim, void *stream) {
    if (n_slots <= 0 || n_tok < 0 || n_tok > CUK_INT_LIMIT || kv_dim <= 0 || ld < kv_dim || !cuk_kv_type_ok(type_k) ||
        !cuk_kv_type_ok(type_v) || ((type_k == CUQ_Q8_0 || type_v == CUQ_Q8_0) && kv_dim % 32))
        return (int)cudaErrorInvalidValue;
    if (n_tok == 0) return 0;
    const int threads = kv_dim >= 256 ? 256 : (int)((kv_dim + 31) / 32 * 32);
    PE_LAUNCH(cuk_kv_store_kernel, (unsigned)n_tok, threads, 0, (cudaStream_t)stream, (uint8_t *)kc, (uint8_t *)vc,
              type_k, type_v, n_slots, k, v, ld, pos, kv_dim);
    return (int)cudaGetLastError();
}

size_t pe_cu_attention_scratch_floats(int64_t n_tok, int n_head, int head_dim, int64_t max_keys) {
    if (n_tok <= 0 || n_head <= 0 || head_dim <= 0) return 0;
    return (size_t)(n_tok * n_head * cuk_att_chunks(n_tok, n_head, max_keys)) * (size_t)(head_dim + 2);
}

/* Partial softmax of one chunk for each of the block's heads; ml gets (max, sum) and acc_out head_dim
 * floats per (token, head, chunk). The chunks split the token's true key count (known only here, from
 * pos) evenly in whole tiles, so the work spreads over the grid at every position whatever max_keys
 * was; a chunk without keys leaves max = -inf, sum = 0, acc = 0. Shared memory: k [tile][head_dim + 1]
 * (padded: lane i reads row i without bank conflicts), v [tile][head_dim], q [hb][head_dim], p [hb][32]. */
PE_GLOBAL void cuk_attn_partial_kernel(const float *q, int64_t ldq, const int64_t *pos, const uint8_t *kc,
                                       const uint8_t *vc, int type_k, int type_v, int64_t n_slots, int n_head,
                                       int n_head_kv, int head_dim, int tile_keys, int64_t window, int64_t n_chunks,
                                       float *ml, float *acc_out) {
    PE_DYN_SHARED(float, smem);
    const int hb = (int)(blockDim.x / 32), group = n_head / n_head_kv;
    float *k_sh = smem, *v_sh = k_sh + tile_keys * (head_dim + 1);
    float *q_sh = v_sh + tile_keys * head_dim, *p_sh = q_sh + hb * head_dim;
    int64_t b = blockIdx.x;
    const int64_t chunk = b % n_chunks;
    b /= n_chunks;
    const int set = (int)(b % (group / hb));
    b /= group / hb;
    const int kvh = (int)(b % n_head_kv);
    const int64_t t = b / n_head_kv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h0 = kvh * group + set * hb; /* the block's heads h0 .. h0 + hb - 1 are contiguous in q */
    for (int i = threadIdx.x; i < hb * head_dim; i += blockDim.x) q_sh[i] = q[t * ldq + (int64_t)h0 * head_dim + i];

    const int64_t p = pos[t];
    const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    const int64_t n_keys = p - lo + 1; /* <= 0 for a negative position: no keys */
    const int64_t per_chunk = n_keys > 0 ? (n_keys + n_chunks - 1) / n_chunks : 0;
    const int64_t chunk_len = (per_chunk + tile_keys - 1) / tile_keys * tile_keys;
    const int64_t begin = chunk * chunk_len;
    const int64_t end = begin + chunk_len < n_keys ? begin + chunk_len : n_keys;
    const int64_t kv_dim = (int64_t)n_head_kv * head_dim, kv_off = (int64_t)kvh * head_dim;
    const int64_t row_k = cuk_kv_row_bytes(type_k, kv_dim), row_v = cuk_kv_row_bytes(type_v, kv_dim);
    const float scale = 1.0f / sqrtf((float)head_dim);
    const float *qw = q_sh + warp * head_dim;
    float *pw = p_sh + warp * 32;

    float m = -INFINITY, l = 0.0f, acc[CUK_ATT_DIMS_PER_LANE];
    for (int i = 0; i < CUK_ATT_DIMS_PER_LANE; i++) acc[i] = 0.0f;
    for (int64_t first = begin; first < end; first += tile_keys) {
        const int nk = end - first < tile_keys ? (int)(end - first) : tile_keys;
        __syncthreads(); /* q is written; nobody still reads the previous tile */
        for (int r = warp; r < nk; r += hb) { /* converted to f32 once per tile, for all hb heads */
            const int64_t slot = (lo + first + r) % n_slots;
            const uint8_t *kr = kc + slot * row_k, *vr = vc + slot * row_v;
            for (int d = lane; d < head_dim; d += 32) {
                k_sh[r * (head_dim + 1) + d] = cuk_kv_elem(kr, type_k, kv_off + d);
                v_sh[r * head_dim + d] = cuk_kv_elem(vr, type_v, kv_off + d);
            }
        }
        __syncthreads();
        float s = -INFINITY;
        if (lane < nk) {
            const float *kr = k_sh + lane * (head_dim + 1);
            float dot = 0.0f;
            for (int d = 0; d < head_dim; d++) dot += qw[d] * kr[d];
            s = dot * scale;
        }
        float tile_max = s;
        for (int o = 16; o > 0; o >>= 1) tile_max = fmaxf(tile_max, pe_shfl_xor(tile_max, o));
        const float m_new = fmaxf(m, tile_max);
        if (m_new != -INFINITY) { /* uniform in the warp; a tile of -inf scores adds nothing */
            const float corr = expf(m - m_new), e = s == -INFINITY ? 0.0f : expf(s - m_new);
            l = l * corr + e;
            pw[lane] = e;
            __syncwarp();
            for (int i = 0; i < CUK_ATT_DIMS_PER_LANE; i++) acc[i] *= corr;
            for (int r = 0; r < nk; r++) {
                const float w = pw[r];
                const float *vr = v_sh + r * head_dim;
                for (int i = 0; i < CUK_ATT_DIMS_PER_LANE; i++) {
                    const int d = lane + 32 * i;
                    if (d < head_dim) acc[i] += w * vr[d];
                }
            }
            m = m_new;
        }
    }
    for (int o = 16; o > 0; o >>= 1) l += pe_shfl_xor(l, o);
    const int64_t part = (t * n_head + h0 + warp) * n_chunks + chunk;
    if (lane == 0) {
        ml[2 * part] = m;
        ml[2 * part + 1] = l;
    }
    for (int i = 0; i < CUK_ATT_DIMS_PER_LANE; i++) {
        const int d = lane + 32 * i;
        if (d < head_dim) acc_out[part * head_dim + d] = acc[i];
    }
}

/* oq (NULL: none): the output row also quantized as it is written; head_dim is then a multiple of 32
 * and each thread writes one element, so warp w of head h holds 32-block h * head_dim / 32 + w. */
PE_GLOBAL void cuk_attn_merge_kernel(float *out, int64_t ldo, const float *sinks, int n_head, int head_dim,
                                     int64_t n_chunks, const float *ml, const float *acc_in, uint8_t *oq,
                                     int64_t ldoq) {
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
        if (oq)
            pe_cu_act_q8_block(a * inv, d & 31, oq + t * ldoq, (int64_t)n_head * head_dim,
                               ((int64_t)h * head_dim + d) / 32);
    }
}

static int cuk_attention(float *out, int64_t ldo, const float *q, int64_t ldq, int64_t n_tok, const int64_t *pos,
                         const void *kc, const void *vc, int type_k, int type_v, int64_t n_slots, int n_head,
                         int n_head_kv, int head_dim, int64_t window, const float *sinks, int64_t max_keys,
                         float *scratch, uint8_t *oq, int64_t ldoq, void *stream) {
    if ((oq && (head_dim % 32 || ldoq < pe_cu_act_q8_row_bytes((int64_t)n_head * head_dim))) ||
        n_tok < 0 || n_head <= 0 || n_head_kv <= 0 || n_head % n_head_kv || head_dim <= 0 ||
        head_dim > CUK_ATT_MAX_DIM || n_slots <= 0 || window < 0 || max_keys <= 0 ||
        ldq < (int64_t)n_head * head_dim || ldo < (int64_t)n_head * head_dim || !cuk_kv_type_ok(type_k) ||
        !cuk_kv_type_ok(type_v) || ((type_k == CUQ_Q8_0 || type_v == CUQ_Q8_0) && head_dim % 32))
        return (int)cudaErrorInvalidValue;
    if (n_tok == 0) return 0;
    const int64_t n_chunks = cuk_att_chunks(n_tok, n_head, max_keys), pairs = n_tok * n_head;
    const int group = n_head / n_head_kv, hb = cuk_att_heads_per_block(group), tk = cuk_att_tile_keys(head_dim);
    const int64_t blocks = n_tok * n_head_kv * (group / hb) * n_chunks;
    if (blocks > CUK_INT_LIMIT || pairs > CUK_INT_LIMIT) return (int)cudaErrorInvalidValue;
    const size_t smem = ((size_t)tk * (2 * head_dim + 1) + (size_t)hb * (head_dim + 32)) * sizeof(float);
    float *ml = scratch, *acc = scratch + 2 * pairs * n_chunks;
    PE_LAUNCH(cuk_attn_partial_kernel, (unsigned)blocks, 32 * hb, smem, (cudaStream_t)stream, q, ldq, pos,
              (const uint8_t *)kc, (const uint8_t *)vc, type_k, type_v, n_slots, n_head, n_head_kv, head_dim, tk, window,
              n_chunks, ml, acc);
    const int rc = (int)cudaGetLastError();
    if (rc) return rc;
    PE_LAUNCH(cuk_attn_merge_kernel, (unsigned)pairs, (head_dim + 31) / 32 * 32, 0, (cudaStream_t)stream, out, ldo,
              sinks, n_head, head_dim, n_chunks, ml, acc, oq, ldoq);
    return (int)cudaGetLastError();
}

int pe_cu_attention(float *out, int64_t ldo, const float *q, int64_t ldq, int64_t n_tok, const int64_t *pos,
                    const void *kc, const void *vc, int type_k, int type_v, int64_t n_slots, int n_head,
                    int n_head_kv, int head_dim, int64_t window, const float *sinks, int64_t max_keys, float *scratch,
                    void *stream) {
    return cuk_attention(out, ldo, q, ldq, n_tok, pos, kc, vc, type_k, type_v, n_slots, n_head, n_head_kv, head_dim,
                         window, sinks, max_keys, scratch, NULL, 0, stream);
}

int pe_cu_attention_q8(float *out, int64_t ldo, const float *q, int64_t ldq, int64_t n_tok, const int64_t *pos,
                       const void *kc, const void *vc, int type_k, int type_v, int64_t n_slots, int n_head,
                       int n_head_kv, int head_dim, int64_t window, const float *sinks, int64_t max_keys,
                       float *scratch, uint8_t *oq, int64_t ldoq, void *stream) {
    if (!oq) return (int)cudaErrorInvalidValue;
    return cuk_attention(out, ldo, q, ldq, n_tok, pos, kc, vc, type_k, type_v, n_slots, n_head, n_head_kv, head_dim,
                         window, sinks, max_keys, scratch, oq, ldoq, stream);
}
