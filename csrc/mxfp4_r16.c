/* Repacking MXFP4 weights into the R16 layout (mxfp4_r16.h): a transpose of 4-byte pieces, done
 * once per model into the cache file, so plain C. */
#include "mxfp4_r16.h"

#include <string.h>

#include "quants_impl.h"

int64_t pe_r16_group_bytes(int64_t n_in) { return (PE_R16_ROWS * (n_in / 32) * PE_BLOCK_BYTES_MXFP4 + 63) / 64 * 64; }

int64_t pe_r16_bytes(int64_t n_in, int64_t n_out, int64_t n_expert) {
    return n_expert * ((n_out + PE_R16_ROWS - 1) / PE_R16_ROWS) * pe_r16_group_bytes(n_in);
}

pe_weight pe_r16_weight(const uint8_t *data, int64_t n_in, int64_t n_out) {
    return (pe_weight){data, PE_TYPE_MXFP4, n_in, n_out, pe_r16_group_bytes(n_in) / PE_R16_ROWS,
                       pe_r16_bytes(n_in, n_out, 1), 1, PE_LAYOUT_R16};
}

void pe_r16_repack(const pe_weight *src, int64_t n_expert, uint8_t *dst, int n_threads) {
    const int64_t nb = src->n_in / 32, groups = (src->n_out + PE_R16_ROWS - 1) / PE_R16_ROWS;
    const int64_t group_bytes = pe_r16_group_bytes(src->n_in);
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t eg = 0; eg < n_expert * groups; eg++) {
        const int64_t e = eg / groups, g = eg % groups;
        uint8_t *out = dst + eg * group_bytes;
        memset(out + 272 * nb, 0, (size_t)(group_bytes - 272 * nb));
        for (int i = 0; i < PE_R16_ROWS; i++) {
            const int64_t r = g * PE_R16_ROWS + i < src->n_out ? g * PE_R16_ROWS + i : src->n_out - 1;
            const uint8_t *row = src->data + e * src->expert_stride + r * src->row_stride;
            for (int64_t b = 0; b < nb; b++) {
                const pe_block_mxfp4 *blk = (const pe_block_mxfp4 *)(row + PE_BLOCK_BYTES_MXFP4 * b);
                for (int j = 0; j < 4; j++) memcpy(out + 256 * b + 64 * j + 4 * i, blk->qs + 4 * j, 4);
                out[256 * nb + 16 * b + i] = blk->e;
            }
        }
    }
}
