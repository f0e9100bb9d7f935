/* The row groups of a grouped (MoE) prefill launch, shared by the 3xTF32 kernel (matmul_cuda.cu) and
 * the int8 kernel (gemm_i8_cuda.cu): x rows sorted by expert, expert e owning rows start[e] ..
 * start[e + 1] - 1, each group cut into tiles of `tile` rows. The table (~1 KiB) travels as a kernel
 * argument; a block finds its group by binary search, so the grid depends only on the shapes. */
#ifndef PE_CUQ_GEMM_GROUPS_CUH
#define PE_CUQ_GEMM_GROUPS_CUH

#include "compat.h"

#include <stdint.h>
#include <string.h>

#define CUQ_GROUPS 128 /* experts per grouped gemm launch (gpt-oss-120b has 128) */

/* Expert e0 + i owns the x rows row[i] .. row[i + 1] - 1 and the tiles tile[i] .. tile[i + 1] - 1. */
struct cuq_groups {
    int32_t e0, n;
    int32_t row[CUQ_GROUPS + 1], tile[CUQ_GROUPS + 1];
};

/* start[0 .. n_expert] as pe_cu_gemm_experts takes it: nondecreasing, within 0 .. INT32_MAX. */
inline bool cuq_groups_ok(const int64_t *start, int64_t n_expert) {
    if (!start || n_expert < 1 || start[0] < 0 || start[n_expert] > INT32_MAX) return false;
    for (int64_t e = 0; e < n_expert; e++)
        if (start[e + 1] < start[e]) return false;
    return true;
}

/* The table for experts e0 .. e0 + CUQ_GROUPS - 1 (at most); returns its number of tiles. */
inline int32_t cuq_groups_fill(cuq_groups &g, const int64_t *start, int64_t n_expert, int64_t e0, int tile) {
    memset(&g, 0, sizeof g);
    g.e0 = (int32_t)e0;
    g.n = (int32_t)(n_expert - e0 < CUQ_GROUPS ? n_expert - e0 : CUQ_GROUPS);
    int32_t tiles = 0;
    for (int i = 0; i <= g.n; i++) {
        g.row[i] = (int32_t)start[e0 + i];
        g.tile[i] = tiles;
        if (i < g.n) tiles += (int32_t)((start[e0 + i + 1] - start[e0 + i] + tile - 1) / tile);
    }
    return tiles;
}

/* The group holding tile `tile` (the last one starting at or before it: that one is nonempty), its
 * first x row *m0 and its rows in the tile *rows. */
PE_DEVICE inline int cuq_group_of(const cuq_groups &g, int32_t tile, int tile_rows, int64_t *m0, int *rows) {
    int lo = 0, hi = g.n;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (g.tile[mid] <= tile) lo = mid;
        else hi = mid;
    }
    *m0 = g.row[lo] + (int64_t)(tile - g.tile[lo]) * tile_rows;
    *rows = g.row[lo + 1] - *m0 < tile_rows ? (int)(g.row[lo + 1] - *m0) : tile_rows;
    return lo;
}

#endif
