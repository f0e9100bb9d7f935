/* Prefill products on int8 tensor cores (gemm_i8_cuda.h), for the gpt-oss weight types Q8_0 and
 * MXFP4: y = x W^T + b with x quantized to int8 per 32-element block (two digits, as the CPU path's
 * pe_act_q8) and W kept in its 8/4-bit codes, so each 32-element block's product is an exact int32
 * sum from mma.sync m16n8k32 (s8 x s8 -> s32) and only the two block scales are applied in float.
 *
 * The activations are quantized once per product by a small kernel into a caller's scratch buffer
 * (codes, digits, a scale per row and block). A block of 4 warps then computes 64 x rows by 64
 * weight rows; per 32-element k step it stages the x tile's codes and digits and the weight tile in
 * its stored form (Q8_0: 32 int8 codes + an f16 scale per row; MXFP4: 16 bytes of E2M1 codes + an e8m0
 * byte), then warp (wm, wn) multiplies its 32 x 32 outputs: 2 x 4 fragments of 16 x 8, two mma per
 * fragment (codes and digits), MXFP4 codes turned into int8 (doubled E2M1 values) in registers. The
 * fragment layout is compat.h's pe_mma_s8_*. Design and expected figures: docs/cuda-matmul.md
 * "Int8 tensor-core gemm". */
#include "compat.h"

#include "gemm_groups.cuh"
#include "gemm_i8_cuda.h"
#include "quant_dev.cuh"

#define CUQ_I8_EINVAL 1      /* cudaErrorInvalidValue */
#define CUQ_I8_TILE 64       /* x rows and weight rows per block */
#define CUQ_I8_WARPS 4       /* 2 x 2 warps of 32 x 32 outputs */
#define CUQ_I8_ROW_WORDS 12  /* 32-bit words per staged int8 row (32 codes + 16 bytes pad): the fragment
                              * loads of lanes (g, t), word t of row g, hit 32 distinct banks */
#define CUQ_I8_MAX_GRID_Y 65535
#define CUQ_I8_QUANT_THREADS 256

/* The quantized activations in the scratch buffer (see pe_cu_gemm_i8_scratch_bytes): row i of x has
 * its codes at q + i * words, its digits at l + i * words (words = n_in / 4) and its block scales
 * (d / 254) at d + i * (n_in / 32). */
struct cuq_act_i8 {
    uint32_t *q, *l;
    float *d;
    int64_t words, nb;
};

static int64_t cuq_align16(int64_t n) { return (n + 15) / 16 * 16; }

static cuq_act_i8 cuq_act_i8_at(void *scratch, int64_t n_rows, int64_t n_in) {
    uint8_t *p = (uint8_t *)scratch;
    cuq_act_i8 a;
    a.q = (uint32_t *)p;
    a.l = (uint32_t *)(p + n_rows * n_in);
    a.d = (float *)(p + cuq_align16(2 * n_rows * n_in));
    a.words = n_in / 4;
    a.nb = n_in / 32;
    return a;
}

extern "C" int64_t pe_cu_gemm_i8_scratch_bytes(int64_t n_rows, int64_t n_in) {
    return cuq_align16(2 * n_rows * n_in) + n_rows * (n_in / 32) * (int64_t)sizeof(float);
}

/* How one k step's 64 x 32 weight tile is staged (its bytes as stored) and read as B fragments. */
template <int T> struct cuq_i8_weights;

/* Bytes p[0..3] (any alignment) as one little-endian word. */
PE_DEVICE inline uint32_t cuq_word(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

template <> struct cuq_i8_weights<CUQ_Q8_0> {
    static constexpr int WORDS = CUQ_I8_ROW_WORDS;
    /* Block b of weight rows n0 .. n0 + 63 (zeros past n_out): the codes into q, the scales into d.
     * Thread t copies half t % 2 (16 code bytes) of row t / 2; 34-byte blocks are not 4-byte aligned,
     * so the bytes are read one by one from one base address. */
    PE_DEVICE static void stage(const pe_cu_weight &w, const uint8_t *base, int64_t n0, int64_t b, int t, uint32_t *q,
                                float *d) {
        const int r = t >> 1, h = t & 1;
        const int64_t n = n0 + r;
        const uint8_t *blk = base + n * w.row_stride + b * cuq_traits<CUQ_Q8_0>::size;
#pragma unroll
        for (int u = 0; u < 4; u++) q[r * WORDS + 4 * h + u] = n < w.n_out ? cuq_word(blk + 2 + 16 * h + 4 * u) : 0u;
        if (h == 0) d[r] = n < w.n_out ? cuq_half(blk) : 0.0f;
    }
    /* The B fragment of weight row n of the tile (the fragment's column): two words of codes. */
    PE_DEVICE static void frag(const uint32_t *q, int n, int lane, uint32_t b[2]) {
        b[0] = q[n * WORDS + pe_mma_s8_b_k(lane, 0) / 4];
        b[1] = q[n * WORDS + pe_mma_s8_b_k(lane, 4) / 4];
    }
};

/* The doubled E2M1 values (int8) of 4 codes, one per byte of c (0..15, bit 3 the sign): the
 * magnitude and the negated magnitude each by one byte permute of an 8-entry table, then the sign
 * bit picks. */
PE_DEVICE inline uint32_t cuq_e2m1x4(uint32_t c) {
    const uint32_t t = c | (c >> 4);
    const uint32_t sel = ((t & 0xFFu) | ((t >> 8) & 0xFF00u)) & 0x7777u; /* nibble j = code j, sign cleared */
    const uint32_t pos = pe_byte_perm(0x03020100u, 0x0C080604u, sel);   /* 0 1 2 3 | 4 6 8 12 */
    const uint32_t neg = pe_byte_perm(0xFDFEFF00u, 0xF4F8FAFCu, sel);   /* their negations */
    const uint32_t m = ((c >> 3) & 0x01010101u) * 0xFFu;
    return (pos & ~m) | (neg & m);
}

template <> struct cuq_i8_weights<CUQ_MXFP4> {
    static constexpr int WORDS = 4; /* 16 bytes per row: lanes (g, t) read word t of row g, 32 banks */
    /* As for Q8_0: thread t copies half t % 2 (8 code bytes) of row t / 2, the e8m0 byte becomes the
     * float scale. */
    PE_DEVICE static void stage(const pe_cu_weight &w, const uint8_t *base, int64_t n0, int64_t b, int t, uint32_t *q,
                                float *d) {
        const int r = t >> 1, h = t & 1;
        const int64_t n = n0 + r;
        const uint8_t *blk = base + n * w.row_stride + b * cuq_traits<CUQ_MXFP4>::size;
#pragma unroll
        for (int u = 0; u < 2; u++) q[r * WORDS + 2 * h + u] = n < w.n_out ? cuq_word(blk + 1 + 8 * h + 4 * u) : 0u;
        if (h == 0) d[r] = n < w.n_out ? cuq_e8m0_half(blk[0]) : 0.0f;
    }
    /* Byte k of a block holds the codes of elements k (low nibble) and k + 16 (high): the lane's B
     * registers (k = 4 threadID_in_group .. + 3, then the same + 16) come from one word. */
    PE_DEVICE static void frag(const uint32_t *q, int n, int lane, uint32_t b[2]) {
        const uint32_t packed = q[n * WORDS + pe_mma_s8_b_k(lane, 0) / 4];
        b[0] = cuq_e2m1x4(packed & 0x0F0F0F0Fu);
        b[1] = cuq_e2m1x4((packed >> 4) & 0x0F0F0F0Fu); /* pe_mma_s8_b_k(lane, 4) = that + 16 */
    }
};

/* Rows row0 .. n_rows - 1 of x into a, as csrc/act_q8.c quantizes: per 32-element block d = max|x| /
 * 127, v = x / d (times the reciprocal), code q = round(v), digit l = round((v - q) * 254), both
 * rounded half away from zero; x = d (q + l / 254) to within d / 508. The stored scale is d / 254, so
 * a block's int32 sum 254 (q . w) + (l . w) times it is the product. Two adjacent threads per block
 * (16 elements each, one shuffle for the maximum); every lane takes part in the shuffle. */
PE_GLOBAL void __launch_bounds__(CUQ_I8_QUANT_THREADS)
    cuq_act_i8_kernel(const float *x, int64_t ldx, int64_t row0, int64_t n_rows, int64_t n_in, cuq_act_i8 a) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, per_row = n_in / 16;
    const int64_t r = row0 + idx / per_row, c = 16 * (idx % per_row);
    const bool live = r < n_rows;
    float v[16], amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 16; j++) {
        v[j] = live ? x[r * ldx + c + j] : 0.0f;
        amax = fmaxf(amax, fabsf(v[j]));
    }
    amax = fmaxf(amax, pe_shfl_xor(amax, 1));
    if (!live) return;
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
#pragma unroll
    for (int wd = 0; wd < 4; wd++) {
        uint32_t pq = 0, pl = 0;
#pragma unroll
        for (int jj = 0; jj < 4; jj++) {
            const float s = cuq_mul(v[4 * wd + jj], id); /* rounded before the subtraction, as on the CPU */
            const float q = roundf(s);
            pq |= ((uint32_t)(int)q & 0xFFu) << (8 * jj);
            pl |= ((uint32_t)(int)roundf((s - q) * 254.0f) & 0xFFu) << (8 * jj);
        }
        a.q[r * a.words + c / 4 + wd] = pq;
        a.l[r * a.words + c / 4 + wd] = pl;
    }
    if (c % 32 == 0) a.d[r * a.nb + c / 32] = d / 254.0f;
}

static void cuq_act_i8_launch(const float *x, int64_t ldx, int64_t row0, int64_t n_rows, int64_t n_in,
                              const cuq_act_i8 &a, cudaStream_t stream) {
    const int64_t threads = (n_rows - row0) * (n_in / 16);
    if (threads > 0)
        PE_LAUNCH(cuq_act_i8_kernel, (unsigned)((threads + CUQ_I8_QUANT_THREADS - 1) / CUQ_I8_QUANT_THREADS),
                  CUQ_I8_QUANT_THREADS, 0, stream, x, ldx, row0, n_rows, n_in, a);
}

/* Outputs (m0 .. m0 + rows - 1, n0 .. n0 + 63), n0 = blockIdx.x * 64, of the quantized x rows in a
 * (rows <= 64) and the weights at base, into y (plus bias). */
template <int T>
PE_DEVICE inline void cuq_gemm_i8_block(const pe_cu_weight &w, const uint8_t *base, const cuq_act_i8 &a, int64_t m0,
                                        int rows, const float *bias, float *y, int64_t ldy) {
    typedef cuq_i8_weights<T> W;
    alignas(16) PE_SHARED uint32_t xq[2][CUQ_I8_TILE * CUQ_I8_ROW_WORDS]; /* codes, digits */
    PE_SHARED float xd[CUQ_I8_TILE];
    alignas(16) PE_SHARED uint32_t wq[CUQ_I8_TILE * W::WORDS];
    PE_SHARED float wd[CUQ_I8_TILE];
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, wm = warp >> 1, wn = warp & 1;
    const int64_t n0 = (int64_t)blockIdx.x * CUQ_I8_TILE;
    const int32_t zero[4] = {0, 0, 0, 0};
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;
    const int xr = t >> 1, xh = t & 1; /* thread t stages half xh of x row xr's codes and digits */
    const int64_t xo = (m0 + xr) * a.words + 4 * xh;
    for (int64_t b = 0; b < w.n_in / 32; b++) {
#pragma unroll
        for (int u = 0; u < 4; u++) {
            xq[0][xr * CUQ_I8_ROW_WORDS + 4 * xh + u] = xr < rows ? a.q[xo + 8 * b + u] : 0u;
            xq[1][xr * CUQ_I8_ROW_WORDS + 4 * xh + u] = xr < rows ? a.l[xo + 8 * b + u] : 0u;
        }
        if (xh == 0) xd[xr] = xr < rows ? a.d[(m0 + xr) * a.nb + b] : 0.0f;
        W::stage(w, base, n0, b, t, wq, wd);
        __syncthreads();
        uint32_t af[2][2][4];
        float sx[2][2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int f0 = wm * 32 + 16 * i;
#pragma unroll
            for (int dg = 0; dg < 2; dg++)
#pragma unroll
                for (int rg = 0; rg < 4; rg++)
                    af[i][dg][rg] = xq[dg][(f0 + pe_mma_s8_a_row(lane, 4 * rg)) * CUQ_I8_ROW_WORDS +
                                           pe_mma_s8_a_col(lane, 4 * rg) / 4];
            sx[i][0] = xd[f0 + pe_mma_s32_c_row(lane, 0)];
            sx[i][1] = xd[f0 + pe_mma_s32_c_row(lane, 2)];
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int nt = wn * 32 + 8 * j;
            uint32_t bf[2];
            W::frag(wq, nt + pe_mma_s8_b_col(lane, 0), lane, bf);
            const float sw[2] = {wd[nt + pe_mma_s32_c_col(lane, 0)], wd[nt + pe_mma_s32_c_col(lane, 1)]};
#pragma unroll
            for (int i = 0; i < 2; i++) {
                int32_t dq[4], dl[4];
                pe_mma_s8_m16n8k32(dq, af[i][0], bf, zero);
                pe_mma_s8_m16n8k32(dl, af[i][1], bf, zero);
#pragma unroll
                for (int e = 0; e < 4; e++) /* |sum| <= 254 * 32 * 128 * 127 + 32 * 128 * 127 < 2^31 */
                    acc[i][j][e] += (float)(254 * dq[e] + dl[e]) * (sx[i][e >> 1] * sw[e & 1]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int m = wm * 32 + 16 * i + pe_mma_s32_c_row(lane, e);
                const int64_t n = n0 + wn * 32 + 8 * j + pe_mma_s32_c_col(lane, e);
                if (m < rows && n < w.n_out) y[(m0 + m) * ldy + n] = acc[i][j][e] + (bias ? bias[n] : 0.0f);
            }
}

template <int T>
PE_GLOBAL void __launch_bounds__(32 * CUQ_I8_WARPS, 4)
    cuq_gemm_i8_kernel(pe_cu_weight w, const uint8_t *base, cuq_act_i8 a, int64_t n_rows, int64_t row0,
                       const float *bias, float *y, int64_t ldy) {
    const int64_t m0 = row0 + (int64_t)blockIdx.y * CUQ_I8_TILE;
    const int rows = n_rows - m0 < CUQ_I8_TILE ? (int)(n_rows - m0) : CUQ_I8_TILE;
    cuq_gemm_i8_block<T>(w, base, a, m0, rows, bias, y, ldy);
}

/* Block (x, y): weight tile x of the expert whose tiles hold tile0 + y. */
template <int T>
PE_GLOBAL void __launch_bounds__(32 * CUQ_I8_WARPS, 4)
    cuq_gemm_experts_i8_kernel(pe_cu_weight w, cuq_groups g, int64_t tile0, cuq_act_i8 a, const float *bias,
                               float *y, int64_t ldy) {
    int64_t m0;
    int rows;
    const int64_t e = g.e0 + cuq_group_of(g, (int32_t)(tile0 + blockIdx.y), CUQ_I8_TILE, &m0, &rows);
    cuq_gemm_i8_block<T>(w, w.data + e * w.expert_stride, a, m0, rows, bias ? bias + e * w.n_out : bias, y, ldy);
}

extern "C" int pe_cu_gemm_i8_supported(int type) { return type == CUQ_Q8_0 || type == CUQ_MXFP4; }

template <int T> static bool cuq_i8_args_ok(const pe_cu_weight *w, const float *x, int64_t ldx, const float *y,
                                            int64_t ldy, const void *scratch) {
    return w->data && w->n_in > 0 && w->n_out > 0 && w->n_in % 32 == 0 &&
           w->row_stride >= w->n_in / 32 * cuq_traits<T>::size && w->expert_stride >= 0 && x && y &&
           ldx >= w->n_in && ldy >= w->n_out && scratch;
}

template <int T>
static int cuq_gemm_i8_run(const pe_cu_weight *w, int64_t expert, const float *x, int64_t ldx, int64_t n_rows,
                           const float *bias, float *y, int64_t ldy, void *scratch, cudaStream_t stream) {
    if (!cuq_i8_args_ok<T>(w, x, ldx, y, ldy, scratch) || expert < 0 || n_rows < 0) return CUQ_I8_EINVAL;
    const cuq_act_i8 a = cuq_act_i8_at(scratch, n_rows, w->n_in);
    cuq_act_i8_launch(x, ldx, 0, n_rows, w->n_in, a, stream);
    const int64_t tiles_m = (n_rows + CUQ_I8_TILE - 1) / CUQ_I8_TILE;
    for (int64_t t0 = 0; t0 < tiles_m; t0 += CUQ_I8_MAX_GRID_Y) {
        const int64_t gy = tiles_m - t0 < CUQ_I8_MAX_GRID_Y ? tiles_m - t0 : CUQ_I8_MAX_GRID_Y;
        PE_LAUNCH(cuq_gemm_i8_kernel<T>, dim3((unsigned)((w->n_out + CUQ_I8_TILE - 1) / CUQ_I8_TILE), (unsigned)gy),
                  32 * CUQ_I8_WARPS, 0, stream, *w, w->data + expert * w->expert_stride, a, n_rows, t0 * CUQ_I8_TILE,
                  bias, y, ldy);
    }
    return (int)cudaGetLastError();
}

extern "C" int pe_cu_gemm_i8(const pe_cu_weight *w, int64_t expert, const float *x, int64_t ldx, int64_t n_rows,
                             const float *bias, float *y, int64_t ldy, void *scratch, void *stream) {
    if (!w) return CUQ_I8_EINVAL;
    if (w->type == CUQ_Q8_0)
        return cuq_gemm_i8_run<CUQ_Q8_0>(w, expert, x, ldx, n_rows, bias, y, ldy, scratch, (cudaStream_t)stream);
    if (w->type == CUQ_MXFP4)
        return cuq_gemm_i8_run<CUQ_MXFP4>(w, expert, x, ldx, n_rows, bias, y, ldy, scratch, (cudaStream_t)stream);
    return CUQ_I8_EINVAL;
}

template <int T>
static int cuq_gemm_experts_i8_run(const pe_cu_weight *w, const int64_t *start, int64_t n_expert, const float *x,
                                   int64_t ldx, const float *bias, float *y, int64_t ldy, void *scratch,
                                   cudaStream_t stream) {
    if (!cuq_i8_args_ok<T>(w, x, ldx, y, ldy, scratch) || !cuq_groups_ok(start, n_expert)) return CUQ_I8_EINVAL;
    const cuq_act_i8 a = cuq_act_i8_at(scratch, start[n_expert], w->n_in);
    cuq_act_i8_launch(x, ldx, start[0], start[n_expert], w->n_in, a, stream);
    const unsigned tiles_n = (unsigned)((w->n_out + CUQ_I8_TILE - 1) / CUQ_I8_TILE);
    for (int64_t e0 = 0; e0 < n_expert; e0 += CUQ_GROUPS) {
        cuq_groups g;
        const int32_t tiles = cuq_groups_fill(g, start, n_expert, e0, CUQ_I8_TILE);
        for (int32_t t0 = 0; t0 < tiles; t0 += CUQ_I8_MAX_GRID_Y) {
            const int32_t gy = tiles - t0 < CUQ_I8_MAX_GRID_Y ? tiles - t0 : CUQ_I8_MAX_GRID_Y;
            PE_LAUNCH(cuq_gemm_experts_i8_kernel<T>, dim3(tiles_n, (unsigned)gy), 32 * CUQ_I8_WARPS, 0, stream, *w,
                      g, (int64_t)t0, a, bias, y, ldy);
        }
    }
    return (int)cudaGetLastError();
}

extern "C" int pe_cu_gemm_experts_i8(const pe_cu_weight *w, const int64_t *start, int64_t n_expert, const float *x,
                                     int64_t ldx, const float *bias, float *y, int64_t ldy, void *scratch,
                                     void *stream) {
    if (!w) return CUQ_I8_EINVAL;
    cudaStream_t st = (cudaStream_t)stream;
    if (w->type == CUQ_Q8_0)
        return cuq_gemm_experts_i8_run<CUQ_Q8_0>(w, start, n_expert, x, ldx, bias, y, ldy, scratch, st);
    if (w->type == CUQ_MXFP4)
        return cuq_gemm_experts_i8_run<CUQ_MXFP4>(w, start, n_expert, x, ldx, bias, y, ldy, scratch, st);
    return CUQ_I8_EINVAL;
}

/* ---- the fragment layout, for tests ------------------------------------------------------------ */

PE_GLOBAL void __launch_bounds__(32) cuq_mma_s8_kernel(const uint32_t *a, const uint32_t *b, const int32_t *c, int32_t *d) {
    const int lane = threadIdx.x;
    uint32_t ar[4], br[2];
    int32_t cr[4], dr[4];
    for (int i = 0; i < 4; i++) {
        ar[i] = a[4 * lane + i];
        cr[i] = c[4 * lane + i];
    }
    for (int i = 0; i < 2; i++) br[i] = b[2 * lane + i];
    pe_mma_s8_m16n8k32(dr, ar, br, cr);
    for (int i = 0; i < 4; i++) d[4 * lane + i] = dr[i];
}

extern "C" int pe_cu_mma_s8_run(const uint32_t *a, const uint32_t *b, const int32_t *c, int32_t *d, void *stream) {
    if (!a || !b || !c || !d) return CUQ_I8_EINVAL;
    PE_LAUNCH(cuq_mma_s8_kernel, 1, 32, 0, (cudaStream_t)stream, a, b, c, d);
    return (int)cudaGetLastError();
}

extern "C" void pe_cu_mma_s8_layout(int *a, int *b, int *c) {
    for (int l = 0; l < 32; l++) {
        for (int i = 0; i < 16; i++) {
            a[(l * 16 + i) * 2] = pe_mma_s8_a_row(l, i);
            a[(l * 16 + i) * 2 + 1] = pe_mma_s8_a_col(l, i);
        }
        for (int i = 0; i < 8; i++) {
            b[(l * 8 + i) * 2] = pe_mma_s8_b_k(l, i);
            b[(l * 8 + i) * 2 + 1] = pe_mma_s8_b_col(l, i);
        }
        for (int i = 0; i < 4; i++) {
            c[(l * 4 + i) * 2] = pe_mma_s32_c_row(l, i);
            c[(l * 4 + i) * 2 + 1] = pe_mma_s32_c_col(l, i);
        }
    }
}
