/* Per-vector CUDA kernels (see ops_cuda.h). Each mirrors its CPU twin in csrc/ops.c or csrc/moe.c step
 * for step (double where the CPU uses double); only the order of the parallel reductions differs. */
#include "compat.h"
#include "ops_cuda.h"
#include "router_dev.cuh"
#include "act_q8_dev.cuh"

#define CUK_EW_THREADS 256       /* elementwise kernels */
#define CUK_EW_MAX_BLOCKS 65535  /* grid-stride beyond this */
#define CUK_ROUTER_WARPS 4       /* rows (one warp each) per router block */
#define CUK_ROPE_THREADS 128
#define CUK_ROPE_MAX_HALF 128    /* head_dim <= 256 */

/* Threads for a block that walks a row of n values: a multiple of 32, at most 256. */
static int cuk_row_threads(int64_t n) {
    const int64_t w = (n + 31) / 32;
    return w >= 8 ? 256 : (int)(w < 1 ? 32 : w * 32);
}

static unsigned cuk_ew_blocks(int64_t n) {
    const int64_t b = (n + CUK_EW_THREADS - 1) / CUK_EW_THREADS;
    return (unsigned)(b > CUK_EW_MAX_BLOCKS ? CUK_EW_MAX_BLOCKS : b);
}

/* Warp butterfly step on a double, as two 32-bit halves. */
PE_DEVICE inline double cuk_shfl_xor_double(double v, int mask) {
    union {
        double d;
        unsigned u[2];
    } a;
    a.d = v;
    a.u[0] = pe_shfl_xor(a.u[0], mask);
    a.u[1] = pe_shfl_xor(a.u[1], mask);
    return a.d;
}

/* One block per row. ADD: the row first takes the residual update (x += t, stored), fused so the
 * decode step spends one launch on "add the sub-block's output, normalise for the next one".
 * xq: the output row also quantized for the int8 products (matvec_q8_cuda.h; n a multiple of 32, so
 * each warp's pass of the last loop is one whole 32-element block). */
template <bool ADD>
PE_GLOBAL void cuk_rmsnorm_kernel(float *out, float *x, const float *t, const float *g, int64_t n, float eps,
                                  uint8_t *xq) {
    PE_SHARED double part[8];
    PE_SHARED float scale_sh;
    float *xr = x + (int64_t)blockIdx.x * n;
    float *yr = out + (int64_t)blockIdx.x * n;
    double ss = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i];
        if (ADD) xr[i] = v = v + t[(int64_t)blockIdx.x * n + i];
        ss += (double)v * v;
    }
    for (int o = 16; o > 0; o >>= 1) ss += cuk_shfl_xor_double(ss, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (unsigned w = 0; w < blockDim.x / 32; w++) total += part[w];
        scale_sh = (float)(1.0 / sqrt(total / (double)n + (double)eps));
    }
    __syncthreads(); /* every read of x precedes the first write of out (they may alias) */
    const float scale = scale_sh;
    uint8_t *qr = xq ? xq + (int64_t)blockIdx.x * pe_cu_act_q8_row_bytes(n) : NULL;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = g[i] * (xr[i] * scale);
        yr[i] = v;
        if (qr) pe_cu_act_q8_block(v, threadIdx.x & 31, qr, n, i / 32);
    }
}

int pe_cu_rmsnorm(float *out, const float *x, const float *g, int64_t n_rows, int64_t n, float eps, void *stream) {
    if (n_rows < 0 || n <= 0 || n_rows > 0x7fffffff) return (int)cudaErrorInvalidValue;
    if (n_rows == 0) return 0;
    PE_LAUNCH(cuk_rmsnorm_kernel<false>, (unsigned)n_rows, cuk_row_threads(n), 0, (cudaStream_t)stream, out,
              (float *)x, (const float *)NULL, g, n, eps, (uint8_t *)NULL);
    return (int)cudaGetLastError();
}

int pe_cu_rmsnorm_q8(float *out, uint8_t *xq, const float *x, const float *g, int64_t n_rows, int64_t n, float eps,
                     void *stream) {
    if (n_rows < 0 || n <= 0 || n % 32 || n_rows > 0x7fffffff || !xq) return (int)cudaErrorInvalidValue;
    if (n_rows == 0) return 0;
    PE_LAUNCH(cuk_rmsnorm_kernel<false>, (unsigned)n_rows, cuk_row_threads(n), 0, (cudaStream_t)stream, out,
              (float *)x, (const float *)NULL, g, n, eps, xq);
    return (int)cudaGetLastError();
}

int pe_cu_add_rmsnorm(float *out, float *x, const float *t, const float *g, int64_t n_rows, int64_t n, float eps,
                      void *stream) {
    if (n_rows < 0 || n <= 0 || n_rows > 0x7fffffff || out == x) return (int)cudaErrorInvalidValue;
    if (n_rows == 0) return 0;
    PE_LAUNCH(cuk_rmsnorm_kernel<true>, (unsigned)n_rows, cuk_row_threads(n), 0, (cudaStream_t)stream, out, x, t,
              g, n, eps, (uint8_t *)NULL);
    return (int)cudaGetLastError();
}

int pe_cu_add_rmsnorm_q8(float *out, uint8_t *xq, float *x, const float *t, const float *g, int64_t n_rows,
                         int64_t n, float eps, void *stream) {
    if (n_rows < 0 || n <= 0 || n % 32 || n_rows > 0x7fffffff || out == x || !xq) return (int)cudaErrorInvalidValue;
    if (n_rows == 0) return 0;
    PE_LAUNCH(cuk_rmsnorm_kernel<true>, (unsigned)n_rows, cuk_row_threads(n), 0, (cudaStream_t)stream, out, x, t,
              g, n, eps, xq);
    return (int)cudaGetLastError();
}

/* One block per token: the cos/sin table in double like pe_rope_table, then every head's pairs. */
PE_GLOBAL void cuk_rope_kernel(float *x, int64_t ld, int n_heads, int head_dim, const int64_t *pos,
                               const double *omega, double mscale) {
    PE_SHARED float cos_sh[CUK_ROPE_MAX_HALF], sin_sh[CUK_ROPE_MAX_HALF];
    const int half = head_dim / 2;
    const double p = (double)pos[blockIdx.x];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const double a = p * omega[i];
        cos_sh[i] = (float)(mscale * cos(a));
        sin_sh[i] = (float)(mscale * sin(a));
    }
    __syncthreads();
    float *xt = x + (int64_t)blockIdx.x * ld;
    for (int e = threadIdx.x; e < n_heads * half; e += blockDim.x) {
        const int i = e % half;
        float *v = xt + (int64_t)(e / half) * head_dim;
        const float a = v[i], b = v[i + half];
        v[i] = a * cos_sh[i] - b * sin_sh[i];
        v[i + half] = b * cos_sh[i] + a * sin_sh[i];
    }
}

int pe_cu_rope(float *x, int64_t n_tok, int64_t ld, int n_heads, int head_dim, const int64_t *pos,
               const double *omega, double mscale, void *stream) {
    if (n_tok < 0 || n_tok > 0x7fffffff || n_heads <= 0 || head_dim <= 0 || head_dim % 2 ||
        head_dim > 2 * CUK_ROPE_MAX_HALF || (int64_t)n_heads * head_dim > 0x7fffffff ||
        ld < (int64_t)n_heads * head_dim)
        return (int)cudaErrorInvalidValue;
    if (n_tok == 0) return 0;
    PE_LAUNCH(cuk_rope_kernel, (unsigned)n_tok, CUK_ROPE_THREADS, 0, (cudaStream_t)stream, x, ld, n_heads,
              head_dim, pos, omega, mscale);
    return (int)cudaGetLastError();
}

/* One warp per row (router_dev.cuh). */
PE_GLOBAL void cuk_router_kernel(const float *logits, int64_t n_rows, int n_expert, int k, int32_t *sel,
                                 float *wts) {
    const int64_t row = (int64_t)blockIdx.x * CUK_ROUTER_WARPS + (threadIdx.x >> 5);
    if (row >= n_rows) return; /* the whole warp leaves together */
    pe_cu_router_row(logits + row * n_expert, n_expert, k, sel + row * k, wts + row * k, threadIdx.x & 31);
}

int pe_cu_router(const float *logits, int64_t n_rows, int n_expert, int k, int32_t *sel, float *wts, void *stream) {
    if (n_rows < 0 || n_expert <= 0 || n_expert > PE_CU_ROUTER_MAX_EXPERT || k <= 0 || k > n_expert)
        return (int)cudaErrorInvalidValue;
    const int64_t blocks = (n_rows + CUK_ROUTER_WARPS - 1) / CUK_ROUTER_WARPS;
    if (blocks > 0x7fffffff) return (int)cudaErrorInvalidValue;
    if (n_rows == 0) return 0;
    PE_LAUNCH(cuk_router_kernel, (unsigned)blocks, 32 * CUK_ROUTER_WARPS, 0, (cudaStream_t)stream, logits, n_rows,
              n_expert, k, sel, wts);
    return (int)cudaGetLastError();
}

/* Rows of n outputs; row r's gate and up values start at g + r*ld and u + r*ld. */
PE_GLOBAL void cuk_swiglu_oai_kernel(float *out, const float *g, const float *u, int64_t n_rows, int64_t n,
                                     int64_t ld) {
    const float alpha = 1.702f, limit = 7.0f;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_rows * n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t j = i / n * ld + i % n;
        const float gi = g[j] < limit ? g[j] : limit;
        float ui = u[j] < -limit ? -limit : u[j];
        ui = ui > limit ? limit : ui;
        out[i] = gi / (1.0f + expf(-alpha * gi)) * (ui + 1.0f);
    }
}

int pe_cu_swiglu_oai(float *out, const float *g, const float *u, int64_t n, void *stream) {
    return pe_cu_swiglu_oai_rows(out, g, u, 1, n, n, stream);
}

int pe_cu_swiglu_oai_rows(float *out, const float *g, const float *u, int64_t n_rows, int64_t n, int64_t ld,
                          void *stream) {
    if (n < 0 || n_rows < 0 || ld < n) return (int)cudaErrorInvalidValue;
    if (n == 0 || n_rows == 0) return 0;
    PE_LAUNCH(cuk_swiglu_oai_kernel, cuk_ew_blocks(n_rows * n), CUK_EW_THREADS, 0, (cudaStream_t)stream, out, g, u,
              n_rows, n, ld);
    return (int)cudaGetLastError();
}

PE_GLOBAL void cuk_add_kernel(float *x, const float *t, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        x[i] += t[i];
}

int pe_cu_add(float *x, const float *t, int64_t n, void *stream) {
    if (n < 0) return (int)cudaErrorInvalidValue;
    if (n == 0) return 0;
    PE_LAUNCH(cuk_add_kernel, cuk_ew_blocks(n), CUK_EW_THREADS, 0, (cudaStream_t)stream, x, t, n);
    return (int)cudaGetLastError();
}

/* One block per row i: dst row (scatter ? idx[i] : i) = src row (scatter ? i : idx[i]). */
PE_GLOBAL void cuk_move_rows_kernel(float *dst, const float *src, const int32_t *idx, int64_t d, int scatter) {
    const int64_t i = blockIdx.x, j = idx[i];
    float *to = dst + (scatter ? j : i) * d;
    const float *from = src + (scatter ? i : j) * d;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) to[c] = from[c];
}

static int cuk_move_rows(float *dst, const float *src, const int32_t *idx, int64_t n_rows, int64_t d, int scatter,
                         void *stream) {
    if (n_rows < 0 || n_rows > 0x7fffffff || d <= 0) return (int)cudaErrorInvalidValue;
    if (n_rows == 0) return 0;
    PE_LAUNCH(cuk_move_rows_kernel, (unsigned)n_rows, cuk_row_threads(d), 0, (cudaStream_t)stream, dst, src, idx,
              d, scatter);
    return (int)cudaGetLastError();
}

int pe_cu_gather_rows(float *dst, const float *src, const int32_t *idx, int64_t n_rows, int64_t d, void *stream) {
    return cuk_move_rows(dst, src, idx, n_rows, d, 0, stream);
}

int pe_cu_scatter_rows(float *dst, const float *src, const int32_t *idx, int64_t n_rows, int64_t d, void *stream) {
    return cuk_move_rows(dst, src, idx, n_rows, d, 1, stream);
}

/* One block per token; the ranks are summed in order from 0 like pe_moe_forward. */
PE_GLOBAL void cuk_moe_combine_kernel(float *y, const float *slots, const float *wts, int k, int64_t d) {
    const int64_t t = blockIdx.x;
    const float *w = wts + t * k;
    const float *s = slots + t * k * d;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.0f;
        for (int r = 0; r < k; r++) acc += w[r] * s[r * d + c];
        y[t * d + c] = acc;
    }
}

int pe_cu_moe_combine(float *y, const float *slots, const float *wts, int64_t n_tok, int k, int64_t d, void *stream) {
    if (n_tok < 0 || n_tok > 0x7fffffff || k <= 0 || d <= 0) return (int)cudaErrorInvalidValue;
    if (n_tok == 0) return 0;
    PE_LAUNCH(cuk_moe_combine_kernel, (unsigned)n_tok, cuk_row_threads(d), 0, (cudaStream_t)stream, y, slots, wts,
              k, d);
    return (int)cudaGetLastError();
}
