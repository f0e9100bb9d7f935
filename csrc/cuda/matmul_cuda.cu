/* Quantized matrix products on the GPU (matmul_cuda.h): the dequantize, decode (matrix-vector) and
 * prefill (tiled matrix-matrix) kernels, one template instance per weight type.
 *
 * Decode is memory-bound, so the matvec kernel is laid out for bandwidth: one warp per output row,
 * 8 warps per block; the warp walks the row 32 elements at a time with lane l on element l, so a
 * warp load instruction reads adjacent bytes of one block (coalesced) and the block scale by
 * broadcast; several groups are loaded before they are used (memory-level parallelism); x is staged
 * in shared memory when it fits; one warp-shuffle reduction per row at the end. MXFP4 (the gpt-oss
 * experts) and Q8_0 have their own loops: the warp takes two blocks per step, lane l reading byte
 * (MXFP4) or byte pair (Q8_0) l % 16 of block l / 16, so all 32 lanes load distinct bytes. See
 * docs/cuda-matmul.md for the design and the expected bandwidth. */
#include "compat.h"

#include "gemm_groups.cuh"
#include "matmul_cuda.h"
#include "quant_dev.cuh"

#ifndef PE_CUDA_EMU
#include <mma.h> /* nvcuda::wmma; the emulator's lives in compat.h */
#endif

#define CUQ_EINVAL 1            /* cudaErrorInvalidValue */
#define CUQ_MV_WARPS 8          /* output rows (warps) per matvec block */
#define CUQ_MV_UNROLL 4         /* 32-element groups in flight per warp (generic loop) */
/* Block pairs in flight per warp in the MXFP4 / Q8_0 loops: 544 bytes per warp for one x row (so ~25
 * warps per SM cover DRAM latency), half that with more rows (fewer registers, no spills). */
#define CUQ_MV_STEPS_MXFP4(NX) ((NX) == 1 ? 16 : 8)
#define CUQ_MV_STEPS_Q8_0(NX) ((NX) == 1 ? 8 : 4)
#define CUQ_MV_MAX_NX 8         /* x rows sharing one pass over the weights */
#define CUQ_SMEM_BYTES 49152    /* dynamic shared memory without an opt-in */
#define CUQ_MAX_GRID_Y 65535
#define CUQ_TILE 64             /* gemm: x rows and weight rows per block */
#define CUQ_TK 32               /* gemm: elements of k per step */
#define CUQ_TPAD (CUQ_TILE + 1) /* padded k-major tile rows: conflict-free stores and loads */
#define CUQ_TC_MIN_ROWS 16      /* gemm: x rows from which the tensor-core kernel runs */
#define CUQ_TC_LD (CUQ_TK + 4)  /* tensor-core tiles [row][k]: a 16-byte multiple, rows 4 banks apart */
#define CUQ_TC_WARPS 4          /* tensor-core gemm: 2 x 2 warps of 32 x 32 outputs */

/* Two floats read from 8-byte aligned shared memory with one load instruction. */
#ifdef PE_CUDA_EMU
struct cuq_f2 {
    float x, y;
};
#else
typedef float2 cuq_f2;
#endif

extern "C" int pe_cu_type_supported(int type) {
    switch (type) {
    case CUQ_F32: case CUQ_F16: case CUQ_BF16: case CUQ_Q4_0: case CUQ_Q4_1: case CUQ_Q5_0: case CUQ_Q5_1:
    case CUQ_Q8_0: case CUQ_MXFP4: case CUQ_Q2_K: case CUQ_Q3_K: case CUQ_Q4_K: case CUQ_Q5_K: case CUQ_Q6_K:
        return 1;
    default:
        return 0;
    }
}

/* Weight rows an argument check accepts: a known type, whole blocks, strides that hold a row. */
template <int T> static bool cuq_weight_ok(const pe_cu_weight *w) {
    constexpr int B = cuq_traits<T>::blck;
    return w->data && w->n_in > 0 && w->n_out > 0 && w->n_in % B == 0 &&
           w->row_stride >= w->n_in / B * cuq_traits<T>::size && w->expert_stride >= 0;
}

/* ---- dequantize: one thread per element, adjacent threads on adjacent elements of a row -------- */

template <int T>
PE_GLOBAL void cuq_dequant_kernel(pe_cu_weight w, const uint8_t *base, float *dst, int64_t total) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int64_t r = idx / w.n_in, k = idx % w.n_in;
    dst[idx] = cuq_row_elem<T>(base + r * w.row_stride, k);
}

struct cuq_run_dequant {
    template <int T> static int run(const pe_cu_weight *w, int64_t expert, float *dst, cudaStream_t stream) {
        if (!cuq_weight_ok<T>(w) || expert < 0 || !dst) return CUQ_EINVAL;
        const int64_t total = w->n_in * w->n_out, threads = 256;
        auto kern = cuq_dequant_kernel<T>;
        PE_LAUNCH(kern, (unsigned)((total + threads - 1) / threads), (unsigned)threads, 0, stream, *w,
                  w->data + expert * w->expert_stride, dst, total);
        return (int)cudaGetLastError();
    }
};

extern "C" int pe_cu_dequant(const pe_cu_weight *w, int64_t expert, float *dst, void *stream) {
    if (!w) return CUQ_EINVAL;
    return cuq_dispatch<cuq_run_dequant>(w->type, w, expert, dst, (cudaStream_t)stream);
}

/* ---- matvec ------------------------------------------------------------------------------------ */

/* acc[i] += the lane's share of dot(row, xr[i]): elements 32g + lane; every type but MXFP4. */
template <int T, int NX>
PE_DEVICE inline void cuq_mv_row(const uint8_t *row, int64_t n_in, const float *const *xr, int lane, float *acc) {
    const int64_t ng = (n_in + 31) / 32;
    int64_t g = 0;
    for (; g + CUQ_MV_UNROLL <= ng; g += CUQ_MV_UNROLL) {
        float wv[CUQ_MV_UNROLL];
#pragma unroll
        for (int u = 0; u < CUQ_MV_UNROLL; u++) {
            const int64_t k = 32 * (g + u) + lane;
            wv[u] = (cuq_traits<T>::blck > 1 || k < n_in) ? cuq_row_elem<T>(row, k) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < CUQ_MV_UNROLL; u++) {
            const int64_t k = 32 * (g + u) + lane;
            if (cuq_traits<T>::blck > 1 || k < n_in) {
#pragma unroll
                for (int i = 0; i < NX; i++) acc[i] += wv[u] * xr[i][k];
            }
        }
    }
    for (; g < ng; g++) {
        const int64_t k = 32 * g + lane;
        if (cuq_traits<T>::blck > 1 || k < n_in) {
            const float wk = cuq_row_elem<T>(row, k);
#pragma unroll
            for (int i = 0; i < NX; i++) acc[i] += wk * xr[i][k];
        }
    }
}

/* MXFP4: two blocks per warp step; lane l takes byte l % 16 of block 2s + l / 16, i.e. elements
 * j = l % 16 and j + 16. PAIRS: x is in shared memory in pair order (position 2j + h of a 32-block
 * holds element j + 16h, see cuq_matvec_kernel), one 8-byte load per byte. Otherwise the upper
 * half-warp reads x[j + 16] first so each 4-byte load of the warp touches 32 distinct banks. */
template <int NX, bool PAIRS>
PE_DEVICE inline void cuq_mv_row_mxfp4(const uint8_t *row, int64_t n_in, const float *const *xr, int lane,
                                       float *acc) {
    const int64_t nb = n_in / 32;
    const int j = lane & 15, h = lane >> 4;
    const int64_t steps = (nb + 1) / 2;
    constexpr int S = CUQ_MV_STEPS_MXFP4(NX);
    for (int64_t s0 = 0; s0 < steps; s0 += S) {
        uint8_t q[S], e[S];
#pragma unroll
        for (int u = 0; u < S; u++) {
            const int64_t b = 2 * (s0 + u) + h;
            q[u] = e[u] = 0;
            if (s0 + u < steps && b < nb) {
                e[u] = row[17 * b];
                q[u] = row[17 * b + 1 + j];
            }
        }
#pragma unroll
        for (int u = 0; u < S; u++) {
            const int64_t b = 2 * (s0 + u) + h;
            if (s0 + u < steps && b < nb) {
                const float d = cuq_e8m0_half(e[u]);
                if (PAIRS) {
                    const float w_lo = (float)cuq_e2m1(q[u] & 15), w_hi = (float)cuq_e2m1(q[u] >> 4);
#pragma unroll
                    for (int i = 0; i < NX; i++) {
                        const cuq_f2 v = *(const cuq_f2 *)(xr[i] + 32 * b + 2 * j);
                        acc[i] += d * (w_lo * v.x + w_hi * v.y);
                    }
                    continue;
                }
                const float w_first = (float)cuq_e2m1(h ? q[u] >> 4 : q[u] & 15);
                const float w_second = (float)cuq_e2m1(h ? q[u] & 15 : q[u] >> 4);
                const int64_t k_first = 32 * b + j + 16 * h, k_second = 32 * b + j + 16 * (1 - h);
#pragma unroll
                for (int i = 0; i < NX; i++)
                    acc[i] += d * (w_first * xr[i][k_first] + w_second * xr[i][k_second]);
            }
        }
    }
}

/* Q8_0 with 2-byte aligned blocks (data and strides even): two 34-byte blocks per warp step; lane l
 * reads quants 2j, 2j + 1 (j = l % 16) of block 2s + l / 16 as one 16-bit load and the f16 scale as
 * another. PAIRS (x in shared memory): x[2j], x[2j + 1] as one 8-byte load; otherwise the upper
 * half-warp reads x[2j + 1] first (no shared-memory bank conflict). */
template <int NX, bool PAIRS>
PE_DEVICE inline void cuq_mv_row_q8_0(const uint8_t *row, int64_t n_in, const float *const *xr, int lane,
                                      float *acc) {
    const int64_t nb = n_in / 32, steps = (nb + 1) / 2;
    const int j = lane & 15, h = lane >> 4;
    constexpr int S = CUQ_MV_STEPS_Q8_0(NX);
    for (int64_t s0 = 0; s0 < steps; s0 += S) {
        uint16_t q[S], d[S];
#pragma unroll
        for (int u = 0; u < S; u++) {
            const int64_t b = 2 * (s0 + u) + h;
            q[u] = d[u] = 0;
            if (s0 + u < steps && b < nb) {
                const uint16_t *blk = (const uint16_t *)(row + 34 * b);
                d[u] = blk[0];
                q[u] = blk[1 + j];
            }
        }
#pragma unroll
        for (int u = 0; u < S; u++) {
            const int64_t b = 2 * (s0 + u) + h;
            if (s0 + u < steps && b < nb) {
                const float scale = pe_cu_fp16_to_fp32(d[u]);
                const float w_lo = (float)(int8_t)(q[u] & 0xff), w_hi = (float)(int8_t)(q[u] >> 8);
                if (PAIRS) {
#pragma unroll
                    for (int i = 0; i < NX; i++) {
                        const cuq_f2 v = *(const cuq_f2 *)(xr[i] + 32 * b + 2 * j);
                        acc[i] += scale * (w_lo * v.x + w_hi * v.y);
                    }
                    continue;
                }
                const float w_first = h ? w_hi : w_lo, w_second = h ? w_lo : w_hi;
                const int64_t k_first = 32 * b + 2 * j + h, k_second = 32 * b + 2 * j + (1 - h);
#pragma unroll
                for (int i = 0; i < NX; i++)
                    acc[i] += scale * (w_first * xr[i][k_first] + w_second * xr[i][k_second]);
            }
        }
    }
}

/* Block (x, y): output rows x*8 .. x*8+7 (one per warp) for the x rows row0 + y*NX .. + NX - 1 (NX = 1
 * with experts). x is copied into dynamic shared memory first when x_smem (for MXFP4 in pair order:
 * the two x values of one quant byte side by side); even = the weight data and
 * strides are even (Q8_0 then takes its 16-bit load loop). At most 64 registers (4 blocks = 32 warps
 * per SM; 3 blocks for 4 x rows, 2 for 8: more registers, no spills). */
template <int T, int NX>
PE_GLOBAL void __launch_bounds__(32 * CUQ_MV_WARPS, NX >= 8 ? 2 : NX >= 4 ? 3 : 4)
    cuq_matvec_kernel(pe_cu_weight w, const int32_t *experts, const float *x, int64_t ldx, int64_t n_rows,
                      int64_t row0, int x_smem, int even, const float *bias, float *y, int64_t ldy) {
    PE_DYN_SHARED(float, xs);
    const int64_t i0 = row0 + (int64_t)blockIdx.y * NX;
    const int nx = n_rows - i0 < NX ? (int)(n_rows - i0) : NX;
    const float *xp = x + i0 * ldx;
    int64_t lxs = ldx;
    if (x_smem) {
        for (int64_t t = threadIdx.x; t < nx * w.n_in; t += blockDim.x) {
            const int64_t k = t % w.n_in;
            const int64_t src = T == CUQ_MXFP4 ? (k & ~31) + ((k & 31) >> 1) + 16 * (k & 1) : k;
            xs[t] = xp[(t / w.n_in) * ldx + src];
        }
        __syncthreads();
        xp = xs;
        lxs = w.n_in;
    }
    const int lane = threadIdx.x & 31;
    const int64_t r = (int64_t)blockIdx.x * CUQ_MV_WARPS + (threadIdx.x >> 5);
    if (r >= w.n_out) return;
    const int64_t e = experts ? experts[i0] : 0;
    const uint8_t *row = w.data + e * w.expert_stride + r * w.row_stride;
    float acc[NX];
    const float *xr[NX];
    /* Rows past nx (the last group) read x row i0 again, in range, and are not written. */
#pragma unroll
    for (int i = 0; i < NX; i++) {
        acc[i] = 0.0f;
        xr[i] = xp + (i < nx ? i : 0) * lxs;
    }
    if (T == CUQ_MXFP4 && x_smem)
        cuq_mv_row_mxfp4<NX, true>(row, w.n_in, xr, lane, acc);
    else if (T == CUQ_MXFP4)
        cuq_mv_row_mxfp4<NX, false>(row, w.n_in, xr, lane, acc);
    else if (T == CUQ_Q8_0 && even && x_smem)
        cuq_mv_row_q8_0<NX, true>(row, w.n_in, xr, lane, acc);
    else if (T == CUQ_Q8_0 && even)
        cuq_mv_row_q8_0<NX, false>(row, w.n_in, xr, lane, acc);
    else
        cuq_mv_row<T, NX>(row, w.n_in, xr, lane, acc);
#pragma unroll
    for (int i = 0; i < NX; i++) {
        float v = acc[i];
        for (int m = 16; m > 0; m >>= 1) v += pe_shfl_xor(v, m);
        if (lane == 0 && i < nx) y[(i0 + i) * ldy + r] = v + (bias ? bias[e * w.n_out + r] : 0.0f);
    }
}

struct cuq_run_matvec {
    template <int T, int NX>
    static int launch(const pe_cu_weight *w, const int32_t *experts, const float *x, int64_t ldx, int64_t n_rows,
                      const float *bias, float *y, int64_t ldy, cudaStream_t stream) {
        const int64_t smem = (int64_t)NX * w->n_in * (int64_t)sizeof(float);
        const int x_smem = smem <= CUQ_SMEM_BYTES;
        const int even = (((uintptr_t)w->data | (uintptr_t)w->row_stride | (uintptr_t)w->expert_stride) & 1) == 0;
        const int64_t groups = (n_rows + NX - 1) / NX;
        auto kern = cuq_matvec_kernel<T, NX>;
        for (int64_t g0 = 0; g0 < groups; g0 += CUQ_MAX_GRID_Y) {
            const int64_t gy = groups - g0 < CUQ_MAX_GRID_Y ? groups - g0 : CUQ_MAX_GRID_Y;
            dim3 grid((unsigned)((w->n_out + CUQ_MV_WARPS - 1) / CUQ_MV_WARPS), (unsigned)gy);
            PE_LAUNCH(kern, grid, 32 * CUQ_MV_WARPS, x_smem ? (size_t)smem : 0, stream, *w, experts, x, ldx, n_rows,
                      g0 * NX, x_smem, even, bias, y, ldy);
        }
        return (int)cudaGetLastError();
    }
    template <int T>
    static int run(const pe_cu_weight *w, const int32_t *experts, const float *x, int64_t ldx, int64_t n_rows,
                   const float *bias, float *y, int64_t ldy, cudaStream_t stream) {
        const int broadcast = experts && ldx == 0; /* every pair of one token reads the same x */
        if (!cuq_weight_ok<T>(w) || !x || !y || n_rows < 0 || (ldx < w->n_in && !broadcast) || ldy < w->n_out)
            return CUQ_EINVAL;
        if (n_rows == 0) return 0;
        if (experts || n_rows == 1) return launch<T, 1>(w, experts, x, ldx, n_rows, bias, y, ldy, stream);
        if (n_rows == 2) return launch<T, 2>(w, experts, x, ldx, n_rows, bias, y, ldy, stream);
        if (n_rows <= 4) return launch<T, 4>(w, experts, x, ldx, n_rows, bias, y, ldy, stream);
        return launch<T, CUQ_MV_MAX_NX>(w, experts, x, ldx, n_rows, bias, y, ldy, stream);
    }
};

extern "C" int pe_cu_matvec(const pe_cu_weight *w, const int32_t *experts, const float *x, int64_t ldx,
                            int64_t n_rows, const float *bias, float *y, int64_t ldy, void *stream) {
    if (!w) return CUQ_EINVAL;
    return cuq_dispatch<cuq_run_matvec>(w->type, w, experts, x, ldx, n_rows, bias, y, ldy, (cudaStream_t)stream);
}

/* ---- gemm: 64 x rows by 64 weight rows per block of 256 threads ---------------------------------- */

/* Per k step of 32: the block stages its x tile and dequantizes its weight tile into shared memory
 * (k-major, padded: thread t stores element (t % 32, t / 32 + 8u), one bank each), then thread
 * (tx, ty) = (t % 16, t / 16) accumulates the 4x4 outputs (ty + 16a, tx + 16b) with f32 FMA. */
template <int T>
PE_GLOBAL void cuq_gemm_kernel(pe_cu_weight w, const uint8_t *base, const float *x, int64_t ldx, int64_t n_rows,
                               int64_t row0, const float *bias, float *y, int64_t ldy) {
    PE_SHARED float xs[CUQ_TK * CUQ_TPAD];
    PE_SHARED float ws[CUQ_TK * CUQ_TPAD];
    const int t = threadIdx.x, kk = t & 31, tx = t & 15, ty = t >> 4;
    const int64_t m0 = row0 + (int64_t)blockIdx.y * CUQ_TILE, n0 = (int64_t)blockIdx.x * CUQ_TILE;
    float acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int b = 0; b < 4; b++) acc[a][b] = 0.0f;
    for (int64_t k0 = 0; k0 < w.n_in; k0 += CUQ_TK) {
        const int64_t k = k0 + kk;
#pragma unroll
        for (int u = 0; u < CUQ_TILE / 8; u++) {
            const int mm = (t >> 5) + 8 * u;
            const int64_t m = m0 + mm, n = n0 + mm;
            xs[kk * CUQ_TPAD + mm] = (m < n_rows && k < w.n_in) ? x[m * ldx + k] : 0.0f;
            ws[kk * CUQ_TPAD + mm] =
                (n < w.n_out && k < w.n_in) ? cuq_row_elem<T>(base + n * w.row_stride, k) : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int c = 0; c < CUQ_TK; c++) {
            float xa[4], wb[4];
#pragma unroll
            for (int a = 0; a < 4; a++) xa[a] = xs[c * CUQ_TPAD + ty + 16 * a];
#pragma unroll
            for (int b = 0; b < 4; b++) wb[b] = ws[c * CUQ_TPAD + tx + 16 * b];
#pragma unroll
            for (int a = 0; a < 4; a++)
#pragma unroll
                for (int b = 0; b < 4; b++) acc[a][b] += xa[a] * wb[b];
        }
        __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < 4; a++) {
        const int64_t m = m0 + ty + 16 * a;
#pragma unroll
        for (int b = 0; b < 4; b++) {
            const int64_t n = n0 + tx + 16 * b;
            if (m < n_rows && n < w.n_out) y[m * ldy + n] = acc[a][b] + (bias ? bias[n] : 0.0f);
        }
    }
}

/* ---- gemm on tensor cores (3xTF32): 64 x rows by 64 weight rows per block of 4 warps ----------- */

/* hi = tf32(v), lo = tf32(v - hi) for each element of a fragment just loaded into hi; v - hi is exact,
 * so hi + lo carries 21 significant bits of v (f32 has 24). */
template <typename F> PE_DEVICE inline void cuq_tf32_split(F &hi, F &lo) {
#pragma unroll
    for (int i = 0; i < hi.num_elements; i++) {
        const float v = hi.x[i];
        hi.x[i] = nvcuda::wmma::__float_to_tf32(v);
        lo.x[i] = nvcuda::wmma::__float_to_tf32(v - hi.x[i]);
    }
}

/* Outputs (0 .. rows - 1, n0 .. n0 + 63), n0 = blockIdx.x * 64, of the x rows at x (rows <= 64) and the
 * weights at base, into y. The block stages its x tile and dequantizes its weight tile (exact element function) per k step of
 * 32, both [row][k] in padded shared memory (thread t stores element (t / 32 + 4u, t % 32): adjacent
 * threads read adjacent x floats / quant bytes and store to adjacent banks). Warp (wm, wn) owns the
 * outputs (wm * 32 .. + 31, wn * 32 .. + 31): 2 x 2 fragments of 16 x 16, each k slice of 8 adding
 * x_lo w_hi + x_hi w_lo + x_hi w_hi on the tensor cores with f32 accumulation (x_lo w_lo, ~2^-22 of
 * the product, is dropped). x is matrix_a row-major, the weight tile [n][k] is matrix_b (k x n)
 * column-major. The epilogue goes through a 16 x 16 shared scratch per warp to add the bias and
 * mask the partial tiles. */
template <int T>
PE_DEVICE inline void cuq_gemm_tc_block(const pe_cu_weight &w, const uint8_t *base, const float *x, int64_t ldx,
                                        int rows, const float *bias, float *y, int64_t ldy) {
    namespace wmma = nvcuda::wmma;
    typedef wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> frag_x;
    typedef wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> frag_w;
    typedef wmma::fragment<wmma::accumulator, 16, 16, 8, float> frag_acc;
    alignas(32) PE_SHARED float xs[CUQ_TILE * CUQ_TC_LD];
    alignas(32) PE_SHARED float ws[CUQ_TILE * CUQ_TC_LD];
    alignas(32) PE_SHARED float scratch[CUQ_TC_WARPS][16 * 16];
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, wm = warp >> 1, wn = warp & 1;
    const int64_t n0 = (int64_t)blockIdx.x * CUQ_TILE;
    frag_acc acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int64_t k0 = 0; k0 < w.n_in; k0 += CUQ_TK) {
        const int64_t k = k0 + lane;
#pragma unroll 4
        for (int u = 0; u < CUQ_TILE / CUQ_TC_WARPS; u++) {
            const int r = warp + CUQ_TC_WARPS * u;
            const int64_t n = n0 + r;
            xs[r * CUQ_TC_LD + lane] = (r < rows && k < w.n_in) ? x[r * ldx + k] : 0.0f;
            ws[r * CUQ_TC_LD + lane] =
                (n < w.n_out && k < w.n_in) ? cuq_row_elem<T>(base + n * w.row_stride, k) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < CUQ_TK; ks += 8) {
            frag_x xh[2], xl[2];
            frag_w wh[2], wl[2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                wmma::load_matrix_sync(xh[i], xs + (wm * 32 + 16 * i) * CUQ_TC_LD + ks, CUQ_TC_LD);
                cuq_tf32_split(xh[i], xl[i]);
                wmma::load_matrix_sync(wh[i], ws + (wn * 32 + 16 * i) * CUQ_TC_LD + ks, CUQ_TC_LD);
                cuq_tf32_split(wh[i], wl[i]);
            }
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    wmma::mma_sync(acc[i][j], xl[i], wh[j], acc[i][j]);
                    wmma::mma_sync(acc[i][j], xh[i], wl[j], acc[i][j]);
                    wmma::mma_sync(acc[i][j], xh[i], wh[j], acc[i][j]);
                }
        }
        __syncthreads();
    }
    float *o = scratch[warp];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) {
            wmma::store_matrix_sync(o, acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
#pragma unroll
            for (int e = lane; e < 16 * 16; e += 32) {
                const int m = wm * 32 + 16 * i + e / 16;
                const int64_t n = n0 + wn * 32 + 16 * j + e % 16;
                if (m < rows && n < w.n_out) y[m * ldy + n] = o[e] + (bias ? bias[n] : 0.0f);
            }
            __syncwarp(); /* every lane has read the scratch before the next fragment overwrites it */
        }
}

template <int T>
PE_GLOBAL void __launch_bounds__(32 * CUQ_TC_WARPS, 4)
    cuq_gemm_tc_kernel(pe_cu_weight w, const uint8_t *base, const float *x, int64_t ldx, int64_t n_rows,
                       int64_t row0, const float *bias, float *y, int64_t ldy) {
    const int64_t m0 = row0 + (int64_t)blockIdx.y * CUQ_TILE;
    const int rows = n_rows - m0 < CUQ_TILE ? (int)(n_rows - m0) : CUQ_TILE;
    cuq_gemm_tc_block<T>(w, base, x + m0 * ldx, ldx, rows, bias, y + m0 * ldy, ldy);
}

/* Block (x, y): weight tile x of the expert whose tiles hold tile0 + y (binary search for the last
 * group starting at or before it: that one is nonempty). */
template <int T>
PE_GLOBAL void __launch_bounds__(32 * CUQ_TC_WARPS, 3)
    cuq_gemm_experts_kernel(pe_cu_weight w, cuq_groups g, int64_t tile0, const float *x, int64_t ldx,
                            const float *bias, float *y, int64_t ldy) {
    int64_t m0;
    int rows;
    const int64_t e = g.e0 + cuq_group_of(g, (int32_t)(tile0 + blockIdx.y), CUQ_TILE, &m0, &rows);
    cuq_gemm_tc_block<T>(w, w.data + e * w.expert_stride, x + m0 * ldx, ldx, rows, bias ? bias + e * w.n_out : bias,
                         y + m0 * ldy, ldy);
}

/* n_rows >= CUQ_TC_MIN_ROWS: the tensor-core kernel (at least one full 16-row fragment of x); fewer
 * rows (e.g. an expert that got few tokens) stay on the f32 SIMT kernel, where a 64-row tile of
 * tensor-core work would be mostly padding. Same tiles, same grid. */
struct cuq_run_gemm {
    template <int T>
    static int run(const pe_cu_weight *w, int64_t expert, const float *x, int64_t ldx, int64_t n_rows,
                   const float *bias, float *y, int64_t ldy, cudaStream_t stream) {
        if (!cuq_weight_ok<T>(w) || expert < 0 || !x || !y || n_rows < 0 || ldx < w->n_in || ldy < w->n_out)
            return CUQ_EINVAL;
        const int64_t tiles_m = (n_rows + CUQ_TILE - 1) / CUQ_TILE;
        const bool tc = n_rows >= CUQ_TC_MIN_ROWS;
        auto kern = tc ? cuq_gemm_tc_kernel<T> : cuq_gemm_kernel<T>;
        for (int64_t t0 = 0; t0 < tiles_m; t0 += CUQ_MAX_GRID_Y) {
            const int64_t gy = tiles_m - t0 < CUQ_MAX_GRID_Y ? tiles_m - t0 : CUQ_MAX_GRID_Y;
            dim3 grid((unsigned)((w->n_out + CUQ_TILE - 1) / CUQ_TILE), (unsigned)gy);
            PE_LAUNCH(kern, grid, tc ? 32 * CUQ_TC_WARPS : 256, 0, stream, *w, w->data + expert * w->expert_stride, x, ldx, n_rows,
                      t0 * CUQ_TILE, bias, y, ldy);
        }
        return (int)cudaGetLastError();
    }
};

extern "C" int pe_cu_gemm(const pe_cu_weight *w, int64_t expert, const float *x, int64_t ldx, int64_t n_rows,
                          const float *bias, float *y, int64_t ldy, void *stream) {
    if (!w) return CUQ_EINVAL;
    return cuq_dispatch<cuq_run_gemm>(w->type, w, expert, x, ldx, n_rows, bias, y, ldy, (cudaStream_t)stream);
}

/* Groups of up to CUQ_GROUPS experts per launch, every group on the tensor-core kernel (a small group
 * costs one partial tile, but runs beside the others instead of in a launch of its own). */
struct cuq_run_gemm_experts {
    template <int T>
    static int run(const pe_cu_weight *w, const int64_t *start, int64_t n_expert, const float *x, int64_t ldx,
                   const float *bias, float *y, int64_t ldy, cudaStream_t stream) {
        if (!cuq_weight_ok<T>(w) || !cuq_groups_ok(start, n_expert) || !x || !y || ldx < w->n_in || ldy < w->n_out)
            return CUQ_EINVAL;
        auto kern = cuq_gemm_experts_kernel<T>;
        const unsigned tiles_n = (unsigned)((w->n_out + CUQ_TILE - 1) / CUQ_TILE);
        for (int64_t e0 = 0; e0 < n_expert; e0 += CUQ_GROUPS) {
            cuq_groups g;
            const int32_t tiles = cuq_groups_fill(g, start, n_expert, e0, CUQ_TILE);
            for (int32_t t0 = 0; t0 < tiles; t0 += CUQ_MAX_GRID_Y) {
                const int32_t gy = tiles - t0 < CUQ_MAX_GRID_Y ? tiles - t0 : CUQ_MAX_GRID_Y;
                PE_LAUNCH(kern, dim3(tiles_n, (unsigned)gy), 32 * CUQ_TC_WARPS, 0, stream, *w, g, (int64_t)t0, x, ldx,
                          bias, y, ldy);
            }
        }
        return (int)cudaGetLastError();
    }
};

extern "C" int pe_cu_gemm_experts(const pe_cu_weight *w, const int64_t *start, int64_t n_expert, const float *x,
                                  int64_t ldx, const float *bias, float *y, int64_t ldy, void *stream) {
    if (!w) return CUQ_EINVAL;
    return cuq_dispatch<cuq_run_gemm_experts>(w->type, w, start, n_expert, x, ldx, bias, y, ldy,
                                              (cudaStream_t)stream);
}
