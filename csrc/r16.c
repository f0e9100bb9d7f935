/* Repacking MXFP4 and Q8_0 weights into the R16 layout (r16.h): a transpose of 4-byte pieces, done
 * once per model into the cache file, so plain C. */
#include "r16.h"

#include <string.h>

#include "quants_impl.h"

int pe_r16_has_type(int type) { return type == PE_TYPE_MXFP4 || type == PE_TYPE_Q8_0; }

/* Bytes of one block of one row in the file (17 or 34). */
static int64_t block_bytes(int type) { return type == PE_TYPE_Q8_0 ? PE_BLOCK_BYTES_Q8_0 : PE_BLOCK_BYTES_MXFP4; }

int64_t pe_r16_group_bytes(int type, int64_t n_in) {
    return (PE_R16_ROWS * (n_in / 32) * block_bytes(type) + 63) / 64 * 64;
}

int64_t pe_r16_bytes(int type, int64_t n_in, int64_t n_out, int64_t n_expert) {
    return n_expert * ((n_out + PE_R16_ROWS - 1) / PE_R16_ROWS) * pe_r16_group_bytes(type, n_in);
}

pe_weight pe_r16_weight(int type, const uint8_t *data, int64_t n_in, int64_t n_out) {
    return (pe_weight){data, type, n_in, n_out, pe_r16_group_bytes(type, n_in) / PE_R16_ROWS,
                       pe_r16_bytes(type, n_in, n_out, 1), 1, PE_LAYOUT_R16};
}

/* Row i's block (at blk) into group `out` of nb blocks. */
static void put_block(int type, const uint8_t *blk, int64_t nb, int64_t b, int i, uint8_t *out) {
    if (type == PE_TYPE_Q8_0) {
        const pe_block_q8_0 *q = (const pe_block_q8_0 *)blk;
        for (int j = 0; j < 8; j++)
            for (int e = 0; e < 4; e++) out[512 * b + 64 * j + 4 * i + e] = (uint8_t)(q->qs[4 * j + e] ^ 0x80);
        memcpy(out + 512 * nb + 32 * b + 2 * i, &q->d, 2);
        return;
    }
    const pe_block_mxfp4 *m = (const pe_block_mxfp4 *)blk;
    for (int j = 0; j < 4; j++) memcpy(out + 256 * b + 64 * j + 4 * i, m->qs + 4 * j, 4);
    out[256 * nb + 16 * b + i] = m->e;
}

void pe_r16_repack(const pe_weight *src, int64_t n_expert, uint8_t *dst, int n_threads) {
    const int type = src->type;
    const int64_t nb = src->n_in / 32, groups = (src->n_out + PE_R16_ROWS - 1) / PE_R16_ROWS;
    const int64_t group_bytes = pe_r16_group_bytes(type, src->n_in), used = PE_R16_ROWS * nb * block_bytes(type);
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t eg = 0; eg < n_expert * groups; eg++) {
        const int64_t e = eg / groups, g = eg % groups;
        uint8_t *out = dst + eg * group_bytes;
        memset(out + used, 0, (size_t)(group_bytes - used));
        for (int i = 0; i < PE_R16_ROWS; i++) {
            const int64_t r = g * PE_R16_ROWS + i < src->n_out ? g * PE_R16_ROWS + i : src->n_out - 1;
            const uint8_t *row = src->data + e * src->expert_stride + r * src->row_stride;
            for (int64_t b = 0; b < nb; b++) put_block(type, row + block_bytes(type) * b, nb, b, i, out);
        }
    }
}
