/* Decode products on int8 activations with dp4a (see matvec_q8_cuda.h and docs/cuda.md, "Decode on
 * int8 activations"). Layout of the work: blocks of MVQ_WARPS warps, each warp MVQ_ROWS weight rows;
 * lane l takes the 16-byte chunks l, l + 32, ... of its rows' codes (512 contiguous bytes per warp
 * and load instruction), the matching activation codes (L1/L2-resident: a row is read by every
 * warp) and the scales, and keeps the partial sums of its rows in registers; one shuffle reduction
 * per output at the end.
 *
 * Arithmetic: per chunk and row the integer sum 254 * (w . q) + (w . ql) (exact in int32: |w| <= 128,
 * |q|, |ql| <= 127, at most 32 terms), then one float multiply-add by (weight scale x activation
 * scale); the sum is scaled by 1/254 once. Q8_0 codes are the weights' int8 codes, their f16 scale
 * goes through the hardware half->float; MXFP4 nibbles become the doubled E2M1 values as int8
 * through a byte-permute table (8 nibbles -> 8 bytes in 8 byte_perm), the e8m0 scale 2^(e-128). */
#include "compat.h"

#include "act_q8_dev.cuh"
#include "kv_dev.cuh"
#include "matvec_q8_cuda.h"
#include "quant_dev.cuh"

#define MVQ_EINVAL 1     /* cudaErrorInvalidValue */
#define MVQ_WARPS 4      /* warps per block */
#define MVQ_ROWS 2       /* weight rows per warp: the activation loads are shared by them */
#define MVQ_MAX_NX 8     /* activation rows sharing one pass over the weights */
#define MVQ_MAX_GRID_Y 65535
#define MVQ_EW_THREADS 256

/* The doubled E2M1 values 0 1 2 3 4 6 8 12 and their negatives as int8, four per word: entries
 * 0-7 in the first two words, 8-15 in the last two. */
#define MVQ_E2M1_T0 0x03020100u
#define MVQ_E2M1_T1 0x0C080604u
#define MVQ_E2M1_T2 0xFDFEFF00u
#define MVQ_E2M1_T3 0xF4F8FAFCu

/* 16 bytes at p (16-byte aligned) as four words: one 128-bit load on the GPU. */
PE_DEVICE inline void mvq_load16(const uint8_t *p, int v[4]) {
#ifdef PE_CUDA_EMU
    memcpy(v, p, 16);
#else
    const int4 t = __ldg(reinterpret_cast<const int4 *>(p));
    v[0] = t.x;
    v[1] = t.y;
    v[2] = t.z;
    v[3] = t.w;
#endif
}

/* Four MXFP4 code bytes (8 nibbles) -> lo: the four low nibbles' values (elements j..j+3 of the
 * block), hi: the four high nibbles' (elements j+16..j+19), each an int8 lane of a word. */
PE_DEVICE inline void mvq_e2m1x8(uint32_t q4, int &lo, int &hi) {
    const uint32_t pick = 0x32103210u | ((q4 & 0x88888888u) >> 1); /* bit 3 of a nibble: the second half */
    const uint32_t t0 = pe_byte_perm(pe_byte_perm(MVQ_E2M1_T0, MVQ_E2M1_T1, q4),
                                     pe_byte_perm(MVQ_E2M1_T2, MVQ_E2M1_T3, q4), pick);
    const uint32_t t1 = pe_byte_perm(pe_byte_perm(MVQ_E2M1_T0, MVQ_E2M1_T1, q4 >> 16),
                                     pe_byte_perm(MVQ_E2M1_T2, MVQ_E2M1_T3, q4 >> 16), pick >> 16);
    lo = (int)pe_byte_perm(t0, t1, 0x6420);
    hi = (int)pe_byte_perm(t0, t1, 0x7531);
}

/* Elements per 16-byte code chunk, and code bytes / scale bytes per row. */
template <int T> struct mvq_fmt {
    static constexpr int chunk = T == CUQ_Q8_0 ? 16 : 32;
    static PE_HOSTDEV int64_t code_bytes(int64_t n) { return T == CUQ_Q8_0 ? n : n / 2; }
    static PE_HOSTDEV int64_t scale_bytes(int64_t n) { return T == CUQ_Q8_0 ? n / 16 : n / 32; }
};

/* acc[i][r] += this lane's share of dot(row r, activation row i) * 254 (rows' codes qs[r], scales
 * sc[r]; activation rows xq[i]; n elements). */
template <int T, int R, int NX>
PE_DEVICE inline void mvq_rows(const uint8_t *const *qs, const uint8_t *const *sc, const uint8_t *const *xq,
                               int64_t n, int lane, float (&acc)[NX][R]) {
    constexpr int W = mvq_fmt<T>::chunk / 4; /* words of int8 weights per chunk */
    const int64_t n_chunk = n / mvq_fmt<T>::chunk;
#pragma unroll 2
    for (int64_t c = lane; c < n_chunk; c += 32) {
        int w[R][W];
        float ws[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            int raw[4];
            mvq_load16(qs[r] + 16 * c, raw);
            if (T == CUQ_Q8_0) {
#pragma unroll
                for (int j = 0; j < 4; j++) w[r][j] = raw[j];
                ws[r] = pe_cu_fp16_to_fp32(((const uint16_t *)sc[r])[c >> 1]);
            } else {
#pragma unroll
                for (int j = 0; j < 4; j++) mvq_e2m1x8((uint32_t)raw[j], w[r][j], w[r][(W / 2 + j) % W]);
                ws[r] = cuq_e8m0_half(sc[r][c]);
            }
        }
#pragma unroll
        for (int i = 0; i < NX; i++) {
            const uint8_t *x = xq[i];
            int q[W], l[W];
#pragma unroll
            for (int h = 0; h < W / 4; h++) {
                mvq_load16(x + mvq_fmt<T>::chunk * c + 16 * h, q + 4 * h);
                mvq_load16(x + n + mvq_fmt<T>::chunk * c + 16 * h, l + 4 * h);
            }
            const float dx = ((const float *)(x + 2 * n))[T == CUQ_Q8_0 ? c >> 1 : c];
#pragma unroll
            for (int r = 0; r < R; r++) {
                int sq = 0, sl = 0;
#pragma unroll
                for (int j = 0; j < W; j++) {
                    sq = pe_dp4a(w[r][j], q[j], sq);
                    sl = pe_dp4a(w[r][j], l[j], sl);
                }
                acc[i][r] += (float)(254 * sq + sl) * (ws[r] * dx);
            }
        }
    }
}

/* The warp's sum of v, in every lane. */
PE_DEVICE inline float mvq_warp_sum(float v) {
    for (int m = 16; m > 0; m >>= 1) v += pe_shfl_xor(v, m);
    return v;
}

/* Row pointers of rows r0 .. r0 + R - 1 of expert e (rows past n_out repeat the last one: read, never
 * written). */
template <int T, int R>
PE_DEVICE inline void mvq_row_ptrs(const pe_cu_wq8 &w, int64_t e, int64_t r0, int64_t step, const uint8_t **qs,
                                   const uint8_t **sc) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        int64_t rr = r0 + r * step;
        rr = rr < w.n_out ? rr : w.n_out - 1;
        qs[r] = w.qs + (e * w.n_out + rr) * mvq_fmt<T>::code_bytes(w.n_in);
        sc[r] = w.sc + (e * w.n_out + rr) * mvq_fmt<T>::scale_bytes(w.n_in);
    }
}

template <int T, int NX>
PE_GLOBAL void __launch_bounds__(32 * MVQ_WARPS)
    mvq_matvec_kernel(pe_cu_wq8 w, const int32_t *experts, const uint8_t *xq, int64_t ldq, int64_t n_rows,
                      int64_t row0, const float *bias, float *y, int64_t ldy) {
    const int lane = threadIdx.x & 31;
    const int64_t r0 = ((int64_t)blockIdx.x * MVQ_WARPS + (threadIdx.x >> 5)) * MVQ_ROWS;
    if (r0 >= w.n_out) return; /* whole warps */
    const int64_t i0 = row0 + (int64_t)blockIdx.y * NX;
    const int nx = n_rows - i0 < NX ? (int)(n_rows - i0) : NX;
    const int64_t e = experts ? experts[i0] : 0;
    const uint8_t *qs[MVQ_ROWS], *sc[MVQ_ROWS], *xr[NX];
    mvq_row_ptrs<T, MVQ_ROWS>(w, e, r0, 1, qs, sc);
    float acc[NX][MVQ_ROWS];
#pragma unroll
    for (int i = 0; i < NX; i++) {
        xr[i] = xq + (i0 + (i < nx ? i : 0)) * ldq;
#pragma unroll
        for (int r = 0; r < MVQ_ROWS; r++) acc[i][r] = 0.0f;
    }
    mvq_rows<T, MVQ_ROWS, NX>(qs, sc, xr, w.n_in, lane, acc);
#pragma unroll
    for (int i = 0; i < NX; i++)
#pragma unroll
        for (int r = 0; r < MVQ_ROWS; r++) {
            const float v = mvq_warp_sum(acc[i][r]) * (1.0f / 254.0f);
            if (lane == 0 && i < nx && r0 + r < w.n_out)
                y[(i0 + i) * ldy + r0 + r] = v + (bias ? bias[e * w.n_out + r0 + r] : 0.0f);
        }
}

/* One warp per (pair, f): rows f (gate) and n_ff + f (up) of the pair's expert, SwiGLU-OAI as
 * ops_cuda.cu's cuk_swiglu_oai_kernel. */
template <int T>
PE_GLOBAL void __launch_bounds__(32 * MVQ_WARPS)
    mvq_gate_up_kernel(pe_cu_wq8 w, const int32_t *sel, const uint8_t *xq, int64_t ldq, int k, const float *bias,
                       float *h) {
    const int lane = threadIdx.x & 31;
    const int64_t F = w.n_out / 2, f = (int64_t)blockIdx.x * MVQ_WARPS + (threadIdx.x >> 5), p = blockIdx.y;
    if (f >= F) return;
    const int64_t e = sel[p];
    const uint8_t *qs[2], *sc[2], *xr[1] = {xq + (p / k) * ldq};
    mvq_row_ptrs<T, 2>(w, e, f, F, qs, sc);
    float acc[1][2] = {{0.0f, 0.0f}};
    mvq_rows<T, 2, 1>(qs, sc, xr, w.n_in, lane, acc);
    const float g = mvq_warp_sum(acc[0][0]) * (1.0f / 254.0f) + bias[e * w.n_out + f];
    const float u = mvq_warp_sum(acc[0][1]) * (1.0f / 254.0f) + bias[e * w.n_out + F + f];
    if (lane == 0) {
        const float alpha = 1.702f, limit = 7.0f;
        const float gi = g < limit ? g : limit;
        float ui = u < -limit ? -limit : u;
        ui = ui > limit ? limit : ui;
        h[p * F + f] = gi / (1.0f + expf(-alpha * gi)) * (ui + 1.0f);
    }
}

/* One warp per (token, MVQ_ROWS output rows): the token's k experts in rank order, each product plus
 * its bias weighted into the sum as ops_cuda.cu's cuk_moe_combine_kernel. */
template <int T>
PE_GLOBAL void __launch_bounds__(32 * MVQ_WARPS)
    mvq_down_kernel(pe_cu_wq8 w, const int32_t *sel, const float *wts, const uint8_t *hq, int64_t ldq, int k,
                    const float *bias, float *y) {
    const int lane = threadIdx.x & 31;
    const int64_t r0 = ((int64_t)blockIdx.x * MVQ_WARPS + (threadIdx.x >> 5)) * MVQ_ROWS, t = blockIdx.y;
    if (r0 >= w.n_out) return;
    float out[MVQ_ROWS];
#pragma unroll
    for (int r = 0; r < MVQ_ROWS; r++) out[r] = 0.0f;
    for (int j = 0; j < k; j++) {
        const int64_t p = t * k + j, e = sel[p];
        const uint8_t *qs[MVQ_ROWS], *sc[MVQ_ROWS], *xr[1] = {hq + p * ldq};
        mvq_row_ptrs<T, MVQ_ROWS>(w, e, r0, 1, qs, sc);
        float acc[1][MVQ_ROWS];
#pragma unroll
        for (int r = 0; r < MVQ_ROWS; r++) acc[0][r] = 0.0f;
        mvq_rows<T, MVQ_ROWS, 1>(qs, sc, xr, w.n_in, lane, acc);
#pragma unroll
        for (int r = 0; r < MVQ_ROWS; r++) {
            const int64_t rr = r0 + r < w.n_out ? r0 + r : w.n_out - 1;
            out[r] += wts[p] * (mvq_warp_sum(acc[0][r]) * (1.0f / 254.0f) + bias[e * w.n_out + rr]);
        }
    }
    if (lane == 0)
#pragma unroll
        for (int r = 0; r < MVQ_ROWS; r++)
            if (r0 + r < w.n_out) y[t * w.n_out + r0 + r] = out[r];
}

/* q|k|v of one token with RoPE and the K/V store as the epilogue. A warp takes a rotated pair (rows
 * i and i + head_dim/2 of one q or k head) or two adjacent v rows; lane 0 rotates the pair as
 * ops_cuda.cu's cuk_rope_kernel (angle in double), writes it to qkv and, for k and v, into the cache
 * row pos % n_slots (kc NULL: no store). */
template <int T>
PE_GLOBAL void __launch_bounds__(32 * MVQ_WARPS)
    mvq_qkv_rope_kernel(pe_cu_wq8 w, const uint8_t *xq, const float *bias, float *qkv, int n_head, int n_head_kv,
                        int hd, const int64_t *pos, const double *omega, double mscale, uint8_t *kc, uint8_t *vc,
                        int type_k, int type_v, int64_t n_slots) {
    const int lane = threadIdx.x & 31, half = hd / 2;
    const int64_t pw = (int64_t)blockIdx.x * MVQ_WARPS + (threadIdx.x >> 5);
    const int64_t n_rot = (int64_t)(n_head + n_head_kv) * half, q_dim = (int64_t)n_head * hd,
                  kv_dim = (int64_t)n_head_kv * hd;
    if (pw >= n_rot + kv_dim / 2) return;
    const int rot = pw < n_rot;
    const int64_t r0 = rot ? pw / half * hd + pw % half : q_dim + kv_dim + 2 * (pw - n_rot), step = rot ? half : 1;
    const uint8_t *qs[2], *sc[2], *xr[1] = {xq};
    mvq_row_ptrs<T, 2>(w, 0, r0, step, qs, sc);
    float acc[1][2] = {{0.0f, 0.0f}};
    mvq_rows<T, 2, 1>(qs, sc, xr, w.n_in, lane, acc);
    float a = mvq_warp_sum(acc[0][0]) * (1.0f / 254.0f) + bias[r0];
    float b = mvq_warp_sum(acc[0][1]) * (1.0f / 254.0f) + bias[r0 + step];
    if (lane) return;
    if (rot) {
        const double ang = (double)pos[0] * omega[pw % half];
        const float cs = (float)(mscale * cos(ang)), sn = (float)(mscale * sin(ang));
        const float ra = a * cs - b * sn, rb = b * cs + a * sn;
        a = ra;
        b = rb;
    }
    qkv[r0] = a;
    qkv[r0 + step] = b;
    if (kc && r0 >= q_dim) {
        int64_t slot = pos[0] % n_slots;
        if (slot < 0) slot += n_slots;
        const int is_v = r0 >= q_dim + kv_dim, type = is_v ? type_v : type_k;
        uint8_t *row = (is_v ? vc : kc) + slot * kv_dim * (type == CUQ_F32 ? 4 : 2);
        const int64_t e = r0 - q_dim - (is_v ? kv_dim : 0);
        cuk_kv_put(row, type, e, a);
        cuk_kv_put(row, type, e + step, b);
    }
}

/* One thread per (row, 32-element block): code bytes to qs, scale bytes to sc. */
template <int T>
PE_GLOBAL void mvq_relayout_kernel(pe_cu_weight w, uint8_t *qs, uint8_t *sc, int64_t total) {
    const int64_t nb = w.n_in / 32;
    for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < total; g += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = g / nb, b = g % nb, e = row / w.n_out, r = row % w.n_out;
        const uint8_t *src = w.data + e * w.expert_stride + r * w.row_stride + b * cuq_traits<T>::size;
        if (T == CUQ_Q8_0) {
            sc[2 * g] = src[0];
            sc[2 * g + 1] = src[1];
            for (int j = 0; j < 32; j++) qs[row * w.n_in + 32 * b + j] = src[2 + j];
        } else {
            sc[g] = src[0];
            for (int j = 0; j < 16; j++) qs[row * (w.n_in / 2) + 16 * b + j] = src[1 + j];
        }
    }
}

/* One warp per 32-element block of a row. */
PE_GLOBAL void mvq_act_q8_kernel(uint8_t *xq, const float *x, int64_t ldx, int64_t n, int64_t total) {
    const int lane = threadIdx.x & 31;
    const int64_t ld = pe_cu_act_q8_row_bytes(n), nb = n / 32;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
    for (int64_t g = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5); g < total; g += warps) {
        const int64_t i = g / nb, b = g % nb;
        pe_cu_act_q8_block(x[i * ldx + 32 * b + lane], lane, xq + i * ld, n, b);
    }
}

static int mvq_type_ok(int type) { return type == CUQ_Q8_0 || type == CUQ_MXFP4; }

extern "C" int pe_cu_wq8_supported(int type, int64_t n_in) { return mvq_type_ok(type) && n_in > 0 && n_in % 32 == 0; }

extern "C" int64_t pe_cu_wq8_code_bytes(int type, int64_t n_in, int64_t n_out, int64_t n_expert) {
    return (type == CUQ_Q8_0 ? mvq_fmt<CUQ_Q8_0>::code_bytes(n_in) : mvq_fmt<CUQ_MXFP4>::code_bytes(n_in)) * n_out *
           n_expert;
}

extern "C" int64_t pe_cu_wq8_scale_bytes(int type, int64_t n_in, int64_t n_out, int64_t n_expert) {
    return (type == CUQ_Q8_0 ? mvq_fmt<CUQ_Q8_0>::scale_bytes(n_in) : mvq_fmt<CUQ_MXFP4>::scale_bytes(n_in)) *
           n_out * n_expert;
}

extern "C" int pe_cu_wq8_relayout(const pe_cu_weight *w, int64_t n_expert, uint8_t *qs, uint8_t *sc, pe_cu_wq8 *out,
                                  void *stream) {
    if (!pe_cu_wq8_supported(w->type, w->n_in) || w->n_out <= 0 || n_expert <= 0 || (n_expert > 1 && !w->expert_stride))
        return MVQ_EINVAL;
    const int64_t total = n_expert * w->n_out * (w->n_in / 32);
    const unsigned blocks = (unsigned)((total + MVQ_EW_THREADS - 1) / MVQ_EW_THREADS < 65535
                                           ? (total + MVQ_EW_THREADS - 1) / MVQ_EW_THREADS
                                           : 65535);
    if (w->type == CUQ_Q8_0)
        PE_LAUNCH(mvq_relayout_kernel<CUQ_Q8_0>, blocks, MVQ_EW_THREADS, 0, (cudaStream_t)stream, *w, qs, sc, total);
    else
        PE_LAUNCH(mvq_relayout_kernel<CUQ_MXFP4>, blocks, MVQ_EW_THREADS, 0, (cudaStream_t)stream, *w, qs, sc, total);
    out->qs = qs;
    out->sc = sc;
    out->type = w->type;
    out->n_in = w->n_in;
    out->n_out = w->n_out;
    return (int)cudaGetLastError();
}

extern "C" int64_t pe_cu_act_q8_ld(int64_t n) { return pe_cu_act_q8_row_bytes(n); }

extern "C" int pe_cu_act_q8(uint8_t *xq, const float *x, int64_t ldx, int64_t n_rows, int64_t n, void *stream) {
    if (n <= 0 || n % 32 || n_rows < 0 || ldx < n) return MVQ_EINVAL;
    if (n_rows == 0) return 0;
    const int64_t total = n_rows * (n / 32), per_block = MVQ_EW_THREADS / 32;
    const int64_t blocks = (total + per_block - 1) / per_block;
    PE_LAUNCH(mvq_act_q8_kernel, (unsigned)(blocks < 65535 ? blocks : 65535), MVQ_EW_THREADS, 0,
              (cudaStream_t)stream, xq, x, ldx, n, total);
    return (int)cudaGetLastError();
}

static int mvq_wq8_ok(const pe_cu_wq8 *w) {
    return w->qs && w->sc && pe_cu_wq8_supported(w->type, w->n_in) && w->n_out > 0;
}

struct mvq_launch_matvec {
    template <int T, int NX>
    static int run(const pe_cu_wq8 *w, const int32_t *experts, const uint8_t *xq, int64_t ldq, int64_t n_rows,
                   const float *bias, float *y, int64_t ldy, cudaStream_t stream) {
        const int64_t groups = (n_rows + NX - 1) / NX, per_block = MVQ_WARPS * MVQ_ROWS;
        for (int64_t g0 = 0; g0 < groups; g0 += MVQ_MAX_GRID_Y) {
            const int64_t gy = groups - g0 < MVQ_MAX_GRID_Y ? groups - g0 : MVQ_MAX_GRID_Y;
            dim3 grid((unsigned)((w->n_out + per_block - 1) / per_block), (unsigned)gy);
            auto kern = mvq_matvec_kernel<T, NX>;
            PE_LAUNCH(kern, grid, 32 * MVQ_WARPS, 0, stream, *w, experts, xq, ldq, n_rows, g0 * NX, bias, y, ldy);
        }
        return (int)cudaGetLastError();
    }
    template <int T>
    static int by_rows(const pe_cu_wq8 *w, const int32_t *experts, const uint8_t *xq, int64_t ldq, int64_t n_rows,
                       const float *bias, float *y, int64_t ldy, cudaStream_t stream) {
        if (experts || n_rows == 1) return run<T, 1>(w, experts, xq, ldq, n_rows, bias, y, ldy, stream);
        if (n_rows == 2) return run<T, 2>(w, experts, xq, ldq, n_rows, bias, y, ldy, stream);
        if (n_rows <= 4) return run<T, 4>(w, experts, xq, ldq, n_rows, bias, y, ldy, stream);
        return run<T, MVQ_MAX_NX>(w, experts, xq, ldq, n_rows, bias, y, ldy, stream);
    }
};

extern "C" int pe_cu_matvec_q8(const pe_cu_wq8 *w, const int32_t *experts, const uint8_t *xq, int64_t ldq,
                               int64_t n_rows, const float *bias, float *y, int64_t ldy, void *stream) {
    const int broadcast = experts && ldq == 0;
    if (!mvq_wq8_ok(w) || !xq || !y || n_rows < 0 || ldy < w->n_out ||
        (!broadcast && ldq < pe_cu_act_q8_row_bytes(w->n_in)) || ldq % 16)
        return MVQ_EINVAL;
    if (n_rows == 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    return w->type == CUQ_Q8_0 ? mvq_launch_matvec::by_rows<CUQ_Q8_0>(w, experts, xq, ldq, n_rows, bias, y, ldy, s)
                               : mvq_launch_matvec::by_rows<CUQ_MXFP4>(w, experts, xq, ldq, n_rows, bias, y, ldy, s);
}

extern "C" int pe_cu_moe_gate_up_q8(const pe_cu_wq8 *w, const int32_t *sel, const uint8_t *xq, int64_t ldq,
                                    int64_t n_tok, int k, const float *bias, float *h, void *stream) {
    if (!mvq_wq8_ok(w) || w->n_out % 2 || !sel || !xq || !bias || !h || k <= 0 || n_tok < 0 ||
        n_tok * k > MVQ_MAX_GRID_Y || ldq % 16 || (n_tok > 1 && ldq < pe_cu_act_q8_row_bytes(w->n_in)))
        return MVQ_EINVAL;
    if (n_tok == 0) return 0;
    dim3 grid((unsigned)((w->n_out / 2 + MVQ_WARPS - 1) / MVQ_WARPS), (unsigned)(n_tok * k));
    if (w->type == CUQ_Q8_0)
        PE_LAUNCH(mvq_gate_up_kernel<CUQ_Q8_0>, grid, 32 * MVQ_WARPS, 0, (cudaStream_t)stream, *w, sel, xq, ldq, k,
                  bias, h);
    else
        PE_LAUNCH(mvq_gate_up_kernel<CUQ_MXFP4>, grid, 32 * MVQ_WARPS, 0, (cudaStream_t)stream, *w, sel, xq, ldq, k,
                  bias, h);
    return (int)cudaGetLastError();
}

extern "C" int pe_cu_moe_down_q8(const pe_cu_wq8 *w, const int32_t *sel, const float *wts, const uint8_t *hq,
                                 int64_t ldq, int64_t n_tok, int k, const float *bias, float *y, void *stream) {
    if (!mvq_wq8_ok(w) || !sel || !wts || !hq || !bias || !y || k <= 0 || n_tok < 0 || n_tok > MVQ_MAX_GRID_Y ||
        ldq % 16 || ldq < pe_cu_act_q8_row_bytes(w->n_in))
        return MVQ_EINVAL;
    if (n_tok == 0) return 0;
    const int64_t per_block = MVQ_WARPS * MVQ_ROWS;
    dim3 grid((unsigned)((w->n_out + per_block - 1) / per_block), (unsigned)n_tok);
    if (w->type == CUQ_Q8_0)
        PE_LAUNCH(mvq_down_kernel<CUQ_Q8_0>, grid, 32 * MVQ_WARPS, 0, (cudaStream_t)stream, *w, sel, wts, hq, ldq, k,
                  bias, y);
    else
        PE_LAUNCH(mvq_down_kernel<CUQ_MXFP4>, grid, 32 * MVQ_WARPS, 0, (cudaStream_t)stream, *w, sel, wts, hq, ldq, k,
                  bias, y);
    return (int)cudaGetLastError();
}

static int mvq_float_kv(int type) { return type == CUQ_F32 || type == CUQ_F16 || type == CUQ_BF16; }

extern "C" int pe_cu_qkv_rope_q8_stores(int type_k, int type_v) { return mvq_float_kv(type_k) && mvq_float_kv(type_v); }

extern "C" int pe_cu_qkv_rope_q8(const pe_cu_wq8 *w, const uint8_t *xq, const float *bias, float *qkv, int n_head,
                                 int n_head_kv, int head_dim, const int64_t *pos, const double *omega, double mscale,
                                 void *kc, void *vc, int type_k, int type_v, int64_t n_slots, void *stream) {
    if (!mvq_wq8_ok(w) || !xq || !bias || !qkv || !pos || !omega || n_head <= 0 || n_head_kv <= 0 || head_dim <= 0 ||
        head_dim % 2 || w->n_out != (int64_t)(n_head + 2 * n_head_kv) * head_dim || (!kc) != (!vc) ||
        (kc && (!pe_cu_qkv_rope_q8_stores(type_k, type_v) || n_slots <= 0)))
        return MVQ_EINVAL;
    const int64_t warps = w->n_out / 2;
    const unsigned blocks = (unsigned)((warps + MVQ_WARPS - 1) / MVQ_WARPS);
    cudaStream_t s = (cudaStream_t)stream;
    if (w->type == CUQ_Q8_0)
        PE_LAUNCH(mvq_qkv_rope_kernel<CUQ_Q8_0>, blocks, 32 * MVQ_WARPS, 0, s, *w, xq, bias, qkv, n_head, n_head_kv,
                  head_dim, pos, omega, mscale, (uint8_t *)kc, (uint8_t *)vc, type_k, type_v, n_slots);
    else
        PE_LAUNCH(mvq_qkv_rope_kernel<CUQ_MXFP4>, blocks, 32 * MVQ_WARPS, 0, s, *w, xq, bias, qkv, n_head, n_head_kv,
                  head_dim, pos, omega, mscale, (uint8_t *)kc, (uint8_t *)vc, type_k, type_v, n_slots);
    return (int)cudaGetLastError();
}
