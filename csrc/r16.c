/* Repacking weights into the R16 layout (r16.h): a transpose of 4-byte pieces (and of the extra bits,
 * the K-quants' codes and scales), done once per model into the cache file, so plain C. */
#include "r16.h"

#include <stdlib.h>
#include <string.h>

#include "cpu_features.h"
#include "quants_impl.h"

/* Bytes of one block of one row in the file, and elements per block (quant_formats.h). */
static int64_t block_bytes(int type) { return pe_type_traits_get(type)->type_size; }
static int64_t block_elems(int type) { return pe_type_traits_get(type)->blck_size; }
/* Bytes of one block of the group's 16 rows in the R16 form: the file's, but the 6-bit scales (and
 * minimums) of Q3_K, Q4_K and Q5_K unpacked to a byte each (16 * 110 + 64, 16 * 144 + 64, 16 * 176 + 64). */
static int64_t r16_block_bytes(int type) {
    const int64_t file = PE_R16_ROWS * block_bytes(type);
    return type == PE_TYPE_Q3_K || type == PE_TYPE_Q4_K || type == PE_TYPE_Q5_K ? file + 64 : file;
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

int pe_r16_pf_cursors = 4;

/* PYENGINE_R16_PF_CURSORS (1 or 4), else 1 on AMD CPUs and 4 on the others (r16.h says why). */
__attribute__((constructor)) static void pick_pf_cursors(void) {
    const char *v = getenv("PYENGINE_R16_PF_CURSORS");
    if (v && (strcmp(v, "1") == 0 || strcmp(v, "4") == 0)) pe_r16_pf_cursors = v[0] - '0';
    else pe_r16_pf_cursors = pe_cpu_is_amd() ? 1 : 4;
}

int pe_r16_one_token_rows(int type) {
    const char *v = getenv("PYENGINE_DECODE_LAYOUT");
    if (v && strcmp(v, "rows") == 0) return 1;
    if (v && strcmp(v, "r16") == 0) return 0;
    return type == PE_TYPE_Q8_0 && pe_cpu_is_amd();
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

/* Row i's 5-bit codes v[e'] (element e' of a 32-element unit) into the unit's five pieces at c (r16.h):
 * byte 4 i + e of piece k (k < 4) holds element 4 (2 k) + e in bits 0-4 and the low three bits of
 * element 4 (2 k + 1) + e in bits 5-7; bits 2 k, 2 k + 1 of piece 4 hold that element's top two bits. */
static void put_q5(const uint8_t v[32], int i, uint8_t *c) {
    for (int k = 0; k < 4; k++)
        for (int e = 0; e < 4; e++) {
            const uint8_t even = v[8 * k + e], odd = v[8 * k + 4 + e];
            c[64 * k + 4 * i + e] = (uint8_t)(even | (odd & 7) << 5);
            c[256 + 4 * i + e] |= (uint8_t)((odd >> 3) << (2 * k));
        }
}

/* Row i's 2-bit fields v[e'] (element e' of a 32-element unit) into the unit's two pieces at c: piece k,
 * byte 4 i + e, bits 2 f, 2 f + 1 = element 4 (4 k + f) + e. */
static void put_crumbs(const uint8_t v[32], int i, uint8_t *c) {
    for (int k = 0; k < 2; k++)
        for (int f = 0; f < 4; f++)
            for (int e = 0; e < 4; e++) c[64 * k + 4 * i + e] |= (uint8_t)((v[4 * (4 * k + f) + e] & 3) << (2 * f));
}

/* Row i's 3-bit codes v[e'] (element e' of a 32-element unit) into the unit's three pieces at c (r16.h):
 * byte 4 i + e of piece k holds element 4 (2 k) + e in bits 0-2 and 4 (2 k + 1) + e in bits 3-5; bits
 * 6-7 of pieces 0 and 1 hold the low two bits of elements 24 + e and 28 + e, bits 6 and 7 of piece 2
 * their third bits. */
static void put_q3(const uint8_t v[32], int i, uint8_t *c) {
    for (int e = 0; e < 4; e++) {
        const uint8_t top6 = v[24 + e], top7 = v[28 + e];
        for (int k = 0; k < 3; k++) c[64 * k + 4 * i + e] = (uint8_t)(v[8 * k + e] | v[8 * k + 4 + e] << 3);
        c[4 * i + e] |= (uint8_t)((top6 & 3) << 6);
        c[64 + 4 * i + e] |= (uint8_t)((top7 & 3) << 6);
        c[128 + 4 * i + e] |= (uint8_t)((top6 >> 2) << 6 | (top7 >> 2) << 7);
    }
}

/* Q2_K, Q3_K, Q6_K (sub-blocks of 16): row i's super-block b into the group's unit codes (units of 32
 * elements, unit_bytes each) and scale area (16 s + i: the sub-block's scale byte, Q2_K's raw, Q3_K's
 * signed value, Q6_K's int8; at 256 + 2 i the row's f16 d, Q2_K's dmin at 288 + 2 i). */
static void put_k16(int type, const uint8_t *blk, int64_t nb, int64_t b, int i, uint8_t *out) {
    const int64_t unit_bytes = pe_r16_unit_bytes(type);
    uint8_t *sc = out + 8 * unit_bytes * nb + (type == PE_TYPE_Q2_K ? 320 : 288) * b;
    uint8_t code[256]; /* element 128 h + 32 j + l */
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++) {
                const int e = 128 * h + 32 * j + l;
                if (type == PE_TYPE_Q2_K) code[e] = (uint8_t)((((const pe_block_q2_k *)blk)->qs[32 * h + l] >> (2 * j)) & 3);
                else if (type == PE_TYPE_Q3_K) {
                    const pe_block_q3_k *q = (const pe_block_q3_k *)blk;
                    code[e] = (uint8_t)(((q->qs[32 * h + l] >> (2 * j)) & 3) | (((q->hmask[l] >> (4 * h + j)) & 1) << 2));
                } else {
                    const pe_block_q6_k *q = (const pe_block_q6_k *)blk;
                    code[e] = (uint8_t)(((q->ql[64 * h + 32 * (j % 2) + l] >> (4 * (j / 2))) & 15) |
                                        (((q->qh[32 * h + l] >> (2 * j)) & 3) << 4));
                }
            }
    for (int u = 0; u < 8; u++) {
        const uint8_t *v = code + 32 * u;
        uint8_t *c = out + unit_bytes * (8 * b + u);
        if (type == PE_TYPE_Q6_K) {
            uint8_t lo[16], hi[32];
            for (int e = 0; e < 16; e++) lo[e] = (uint8_t)((v[e] & 15) | (v[16 + e] & 15) << 4);
            for (int e = 0; e < 32; e++) hi[e] = v[e] >> 4;
            put_nibbles(lo, i, c);
            put_crumbs(hi, i, c + 256);
        } else if (type == PE_TYPE_Q3_K) put_q3(v, i, c);
        else put_crumbs(v, i, c);
    }
    for (int k = 0; k < 16; k++)
        sc[16 * k + i] = type == PE_TYPE_Q2_K ? ((const pe_block_q2_k *)blk)->scales[k]
                         : type == PE_TYPE_Q3_K ? (uint8_t)(int8_t)pe_q3_k_scale(((const pe_block_q3_k *)blk)->scales, k)
                                                : (uint8_t)((const pe_block_q6_k *)blk)->scales[k];
    if (type == PE_TYPE_Q2_K) {
        memcpy(sc + 256 + 2 * i, &((const pe_block_q2_k *)blk)->d, 2);
        memcpy(sc + 288 + 2 * i, &((const pe_block_q2_k *)blk)->dmin, 2);
    } else memcpy(sc + 256 + 2 * i, type == PE_TYPE_Q3_K ? &((const pe_block_q3_k *)blk)->d : &((const pe_block_q6_k *)blk)->d, 2);
}

/* Row i's block (at blk) into group `out` of nb blocks. */
static void put_block(int type, const uint8_t *blk, int64_t nb, int64_t b, int i, uint8_t *out) {
    if (type == PE_TYPE_Q2_K || type == PE_TYPE_Q3_K || type == PE_TYPE_Q6_K) {
        put_k16(type, blk, nb, b, i, out);
        return;
    }
    if (type == PE_TYPE_Q8_0) {
        const pe_block_q8_0 *q = (const pe_block_q8_0 *)blk;
        for (int j = 0; j < 8; j++)
            for (int e = 0; e < 4; e++) out[512 * b + 64 * j + 4 * i + e] = (uint8_t)(q->qs[4 * j + e] ^ 0x80);
        memcpy(out + 512 * nb + 32 * b + 2 * i, &q->d, 2);
        return;
    }
    if (type == PE_TYPE_Q4_0 || type == PE_TYPE_Q4_1 || type == PE_TYPE_Q5_0 || type == PE_TYPE_Q5_1) {
        /* the block: f16 d, then m (with a minimum), then qh (with a fifth bit), then qs[16] */
        const int fifth = type == PE_TYPE_Q5_0 || type == PE_TYPE_Q5_1, has_min = type == PE_TYPE_Q4_1 || type == PE_TYPE_Q5_1;
        const int64_t code = pe_r16_unit_bytes(type), scale = has_min ? 64 : 32;
        const uint8_t *qs = blk + block_bytes(type) - 16;
        if (fifth) { /* element l: nibble l / 16 of qs[l % 16], fifth bit l of qh */
            const uint32_t qh = u32_at(blk + (has_min ? 4 : 2));
            uint8_t v[32];
            for (int l = 0; l < 32; l++) v[l] = (uint8_t)(((qs[l % 16] >> (4 * (l / 16))) & 15) | ((qh >> l) & 1) << 4);
            put_q5(v, i, out + code * b);
        } else put_nibbles(qs, i, out + code * b);
        memcpy(out + code * nb + scale * b + 2 * i, blk, 2);
        if (has_min) memcpy(out + code * nb + scale * b + 32 + 2 * i, blk + 2, 2);
        return;
    }
    if (type == PE_TYPE_Q4_K || type == PE_TYPE_Q5_K) { /* the same header: d, dmin, scales[12] */
        const pe_block_q4_k *q = (const pe_block_q4_k *)blk;
        const pe_block_q5_k *q5 = type == PE_TYPE_Q5_K ? (const pe_block_q5_k *)blk : NULL;
        const int64_t cs = pe_r16_unit_bytes(type); /* code bytes per sub-block */
        uint8_t *sc_area = out + 8 * cs * nb + 320 * b;
        for (int sub = 0; sub < 8; sub++) {
            /* nibble sub % 2 of qs[l] is element 32 sub + l; Q5_K: its fifth bit is bit sub of qh[l] */
            const uint8_t *qs = (q5 ? q5->qs : q->qs) + 32 * (sub / 2);
            uint8_t *c = out + 8 * cs * b + cs * sub, v[32];
            for (int l = 0; l < 32; l++)
                v[l] = (uint8_t)(((qs[l] >> (4 * (sub % 2))) & 15) | (q5 ? ((q5->qh[l] >> sub) & 1) << 4 : 0));
            if (q5) put_q5(v, i, c);
            else {
                uint8_t lo[16];
                for (int e = 0; e < 16; e++) lo[e] = (uint8_t)(v[e] | v[16 + e] << 4);
                put_nibbles(lo, i, c);
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
        memset(out, 0, (size_t)group_bytes); /* the bit masks and 2-bit fields are ORed in */
        for (int i = 0; i < PE_R16_ROWS; i++) {
            const int64_t r = g * PE_R16_ROWS + i < src->n_out ? g * PE_R16_ROWS + i : src->n_out - 1;
            const uint8_t *row = src->data + e * src->expert_stride + r * src->row_stride;
            for (int64_t b = 0; b < nb; b++) put_block(type, row + block_bytes(type) * b, nb, b, i, out);
        }
    }
}
