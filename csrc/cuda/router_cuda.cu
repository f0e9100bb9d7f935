/* The fused router (router_cuda.h): one block per token. Its 32 warps take the experts' rows in turn
 * (expert e on warp e % 32): each lane accumulates elements lane, lane + 32, ... in that order and the
 * warp sums by butterfly, the same operations as the matrix-vector kernel's generic row loop
 * (matmul_cuda.cu, cuq_mv_row with one activation row), so the logits are its bits. They stay in
 * shared memory, and warp 0 selects and weighs the experts (router_dev.cuh). One block per token reads
 * the router weights once per token from L2 after the first (20b: 32 x 2880 floats, 368 KB per layer);
 * two launches and the logits' round trip through global memory become one launch. */
#include "compat.h"

#include "quant_dev.cuh"
#include "router_cuda.h"
#include "router_dev.cuh"

#define CUR_WARPS 32

template <int T>
PE_GLOBAL void cur_router_kernel(pe_cu_weight w, const float *x, int64_t ldx, const float *bias, int k,
                                 int32_t *sel, float *wts) {
    PE_SHARED float logit[PE_CU_ROUTER_MAX_EXPERT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float *xr = x + (int64_t)blockIdx.x * ldx;
    for (int64_t e = warp; e < w.n_out; e += CUR_WARPS) {
        const uint8_t *row = w.data + e * w.row_stride;
        float acc = 0.0f;
        for (int64_t i = lane; i < w.n_in; i += 32) acc += cuq_row_elem<T>(row, i) * xr[i];
        for (int m = 16; m > 0; m >>= 1) acc += pe_shfl_xor(acc, m);
        if (lane == 0) logit[e] = acc + (bias ? bias[e] : 0.0f);
    }
    __syncthreads();
    if (warp == 0)
        pe_cu_router_row(logit, (int)w.n_out, k, sel + (int64_t)blockIdx.x * k, wts + (int64_t)blockIdx.x * k, lane);
}

extern "C" int pe_cu_router_fused_supported(int type, int64_t n_expert) {
    return (type == CUQ_F32 || type == CUQ_F16 || type == CUQ_BF16) && n_expert > 0 &&
           n_expert <= PE_CU_ROUTER_MAX_EXPERT;
}

extern "C" int pe_cu_router_fused(const pe_cu_weight *w, const float *x, int64_t ldx, int64_t n_rows,
                                  const float *bias, int k, int32_t *sel, float *wts, void *stream) {
    if (!w || !w->data || !pe_cu_router_fused_supported(w->type, w->n_out) || w->n_in <= 0 || ldx < w->n_in ||
        n_rows < 0 || n_rows > 0x7fffffff || k <= 0 || k > w->n_out || !x || !sel || !wts)
        return (int)cudaErrorInvalidValue;
    if (n_rows == 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    if (w->type == CUQ_F32)
        PE_LAUNCH(cur_router_kernel<CUQ_F32>, (unsigned)n_rows, 32 * CUR_WARPS, 0, s, *w, x, ldx, bias, k, sel, wts);
    else if (w->type == CUQ_F16)
        PE_LAUNCH(cur_router_kernel<CUQ_F16>, (unsigned)n_rows, 32 * CUR_WARPS, 0, s, *w, x, ldx, bias, k, sel, wts);
    else
        PE_LAUNCH(cur_router_kernel<CUQ_BF16>, (unsigned)n_rows, 32 * CUR_WARPS, 0, s, *w, x, ldx, bias, k, sel, wts);
    return (int)cudaGetLastError();
}
