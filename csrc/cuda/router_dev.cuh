/* The MoE router's top-k + softmax for one row, on one warp: shared by the router kernel over a
 * matrix of logits (ops_cuda.cu) and the fused router product (router_cuda.cu), so both select and
 * weigh exactly as csrc/moe.c (pe_topk, pe_softmax). */
#ifndef PE_CU_ROUTER_DEV_CUH
#define PE_CU_ROUTER_DEV_CUH

#include "compat.h"

#define PE_CU_ROUTER_PER_LANE 8 /* 256 experts / 32 lanes */
#define PE_CU_ROUTER_MAX_EXPERT (32 * PE_CU_ROUTER_PER_LANE)
#define PE_CU_ROUTER_NO_INDEX 0x7fffffff

/* One warp (every lane calls it): lane l holds experts l, l+32, ... of the n_expert logits at x; each
 * rank takes the warp-wide best untaken (value, index): larger value, then lower index, as pe_topk's
 * scan. The winner is the same in every lane because the pairwise rule is symmetric. Lane 0 writes
 * s[0..k) (largest first) and w[0..k) = softmax of those logits (pe_softmax). */
PE_DEVICE inline void pe_cu_router_row(const float *x, int n_expert, int k, int32_t *s, float *w, int lane) {
    float v[PE_CU_ROUTER_PER_LANE];
    unsigned taken = 0; /* bit j: expert lane + 32 j is taken or does not exist */
    for (int j = 0; j < PE_CU_ROUTER_PER_LANE; j++) {
        const int e = lane + 32 * j;
        v[j] = e < n_expert ? x[e] : 0.0f;
        if (e >= n_expert) taken |= 1u << j;
    }
    for (int r = 0; r < k; r++) {
        float bv = 0.0f;
        int bi = PE_CU_ROUTER_NO_INDEX;
        for (int j = 0; j < PE_CU_ROUTER_PER_LANE; j++)
            if (!((taken >> j) & 1u) && (bi == PE_CU_ROUTER_NO_INDEX || v[j] > bv)) {
                bv = v[j];
                bi = lane + 32 * j;
            }
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = pe_shfl_xor(bv, o);
            const int oi = pe_shfl_xor(bi, o);
            if (oi != PE_CU_ROUTER_NO_INDEX && (bi == PE_CU_ROUTER_NO_INDEX || ov > bv || (!(bv > ov) && oi < bi))) {
                bv = ov;
                bi = oi;
            }
        }
        if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
        if (lane == 0) {
            s[r] = bi;
            w[r] = bv;
        }
    }
    if (lane == 0) { /* pe_softmax over the k selected logits */
        float m = w[0];
        for (int r = 1; r < k; r++) m = w[r] > m ? w[r] : m;
        double sum = 0.0;
        for (int r = 0; r < k; r++) {
            w[r] = expf(w[r] - m);
            sum += w[r];
        }
        const float inv = (float)(1.0 / sum);
        for (int r = 0; r < k; r++) w[r] *= inv;
    }
}

#endif
