/* Repacking MXFP4, Q8_0, Q4_1, Q5_0, Q5_1, Q4_K and Q5_K weights into the R16 layout (r16.h): a transpose
 * of 4-byte pieces (and of the fifth bits, the K-quants' nibbles and scales), done once per model into the
 * cache file, so plain C. */
#include "r16.h"

#include <string.h>

#include "quants_impl.h"

int pe_r16_has_type(int type) {
    return type == PE_TYPE_MXFP4 || type == PE_TYPE_Q8_0 || type == PE_TYPE_Q4_1 || type == PE_TYPE_Q5_0 ||
           type == PE_TYPE_Q5_1 || type == PE_TYPE_Q4_K || type == PE_TYPE_Q5_K;
}

/* Bytes of one block of one row in the file (17, 34, 20, 22, 24, 144 or 176), and elements per block. */
static int64_t block_bytes(int type) {
    switch (type) {
    case PE_TYPE_Q8_0: return PE_BLOCK_BYTES_Q8_0;
    case PE_TYPE_Q4_1: return PE_BLOCK_BYTES_Q4_1;
    case PE_TYPE_Q5_0: return PE_BLOCK_BYTES_Q5_0;
    case PE_TYPE_Q5_1: return PE_BLOCK_BYTES_Q5_1;
    case PE_TYPE_Q4_K: return PE_BLOCK_BYTES_Q4_K;
    case PE_TYPE_Q5_K: return PE_BLOCK_BYTES_Q5_K;
    default: return PE_BLOCK_BYTES_MXFP4;
    }
}
static int64_t block_elems(int type) { return type == PE_TYPE_Q4_K || type == PE_TYPE_Q5_K ? 256 : 32; }
/* Bytes of one block of the group's 16 rows in the R16 form: the file's, but Q4_K's and Q5_K's scales
 * and minimums unpacked to a byte each (2368 = 16 * 144 + 64, 2880 = 16 * 176 + 64). */
static int64_t r16_block_bytes(int type) {
    return type == PE_TYPE_Q4_K ? 2368 : type == PE_TYPE_Q5_K ? 2880 : PE_R16_ROWS * block_bytes(type);
}

int64_t pe_r16_group_bytes(int type, int64_t n_in) {
    return ((n_in / block_elems(type)) * r16_block_bytes(type) + 63) / 64 * 64;
}

int64_t pe_r16_bytes(int type, int64_t n_in, int64_t n_out, int64_t n_expert) {
    return n_expert * ((n_out + PE_R16_ROWS - 1) / PE_R16_ROWS) * pe_r16_group_bytes(type, n_in);
}

pe_weight pe_r16_weight(int type, const uint8_t *data, int64_t n_in, int64_t n_out) {
    return (pe_weight){data, type, n_in, n_out, pe_r16_group_bytes(type, n_in) / PE_R16_ROWS,
                       pe_r16_bytes(type, n_in, n_out, 1), 1, PE_LAYOUT_R16};
}

static uint32_t u32_at(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Row i's 16 nibble bytes qs into the four pieces of the block's codes at c. */
static void put_nibbles(const uint8_t *qs, int i, uint8_t *c) {
    for (int j = 0; j < 4; j++) memcpy(c + 64 * j + 4 * i, qs + 4 * j, 4);
}

/* Row i's fifth bits qh (bit k: element k) into the eight 64-bit masks at c (ORed in): mask j, bit
 * 4 i + e = the fifth bit of element 4 j + e. */
static void put_fifth(uint32_t qh, int i, uint8_t *c) {
    for (int j = 0; j < 8; j++)
        for (int e = 0; e < 4; e++) c[8 * j + (4 * i + e) / 8] |= (uint8_t)(((qh >> (4 * j + e)) & 1) << ((4 * i + e) % 8));
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
    if (type == PE_TYPE_Q5_0) {
        const pe_block_q5_0 *q = (const pe_block_q5_0 *)blk;
        put_nibbles(q->qs, i, out + 320 * b);
        put_fifth(u32_at(q->qh), i, out + 320 * b + 256);
        memcpy(out + 320 * nb + 32 * b + 2 * i, &q->d, 2);
        return;
    }
    if (type == PE_TYPE_Q4_1) {
        const pe_block_q4_1 *q = (const pe_block_q4_1 *)blk;
        put_nibbles(q->qs, i, out + 256 * b);
        memcpy(out + 256 * nb + 64 * b + 2 * i, &q->d, 2);
        memcpy(out + 256 * nb + 64 * b + 32 + 2 * i, &q->m, 2);
        return;
    }
    if (type == PE_TYPE_Q5_1) {
        const pe_block_q5_1 *q = (const pe_block_q5_1 *)blk;
        put_nibbles(q->qs, i, out + 320 * b);
        put_fifth(u32_at(q->qh), i, out + 320 * b + 256);
        memcpy(out + 320 * nb + 64 * b + 2 * i, &q->d, 2);
        memcpy(out + 320 * nb + 64 * b + 32 + 2 * i, &q->m, 2);
        return;
    }
    if (type == PE_TYPE_Q4_K || type == PE_TYPE_Q5_K) { /* the same header: d, dmin, scales[12] */
        const pe_block_q4_k *q = (const pe_block_q4_k *)blk;
        const pe_block_q5_k *q5 = type == PE_TYPE_Q5_K ? (const pe_block_q5_k *)blk : NULL;
        const int64_t cs = q5 ? 320 : 256; /* code bytes per sub-block */
        uint8_t *sc_area = out + 8 * cs * nb + 320 * b;
        for (int sub = 0; sub < 8; sub++) {
            /* nibble sub % 2 of qs[l] is element 32 sub + l; Q5_K: its fifth bit is bit sub of qh[l] */
            const uint8_t *qs = (q5 ? q5->qs : q->qs) + 32 * (sub / 2);
            uint8_t *c = out + 8 * cs * b + cs * sub;
            for (int j = 0; j < 4; j++)
                for (int e = 0; e < 4; e++) {
                    const int lo = (qs[4 * j + e] >> (4 * (sub % 2))) & 15, hi = (qs[16 + 4 * j + e] >> (4 * (sub % 2))) & 15;
                    c[64 * j + 4 * i + e] = (uint8_t)(lo | hi << 4);
                }
            if (q5) {
                uint32_t qh = 0;
                for (int l = 0; l < 32; l++) qh |= (uint32_t)((q5->qh[l] >> sub) & 1) << l;
                put_fifth(qh, i, c + 256);
            }
            uint8_t sc, mn;
            pe_k_scale_min(q->scales, sub, &sc, &mn);
            sc_area[16 * sub + i] = sc;
            sc_area[128 + 16 * sub + i] = mn;
        }
        memcpy(sc_area + 256 + 2 * i, &q->d, 2);
        memcpy(sc_area + 288 + 2 * i, &q->dmin, 2);
        return;
    }
    const pe_block_mxfp4 *m = (const pe_block_mxfp4 *)blk;
    put_nibbles(m->qs, i, out + 256 * b);
    out[256 * nb + 16 * b + i] = m->e;
}

void pe_r16_repack(const pe_weight *src, int64_t n_expert, uint8_t *dst, int n_threads) {
    const int type = src->type;
    const int64_t nb = src->n_in / block_elems(type), groups = (src->n_out + PE_R16_ROWS - 1) / PE_R16_ROWS;
    const int64_t group_bytes = pe_r16_group_bytes(type, src->n_in);
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t eg = 0; eg < n_expert * groups; eg++) {
        const int64_t e = eg / groups, g = eg % groups;
        uint8_t *out = dst + eg * group_bytes;
        memset(out, 0, (size_t)group_bytes); /* the fifth-bit masks are ORed in */
        for (int i = 0; i < PE_R16_ROWS; i++) {
            const int64_t r = g * PE_R16_ROWS + i < src->n_out ? g * PE_R16_ROWS + i : src->n_out - 1;
            const uint8_t *row = src->data + e * src->expert_stride + r * src->row_stride;
            for (int64_t b = 0; b < nb; b++) put_block(type, row + block_bytes(type) * b, nb, b, i, out);
        }
    }
}
