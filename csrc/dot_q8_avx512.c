/* Decode kernels with int8 activations (AVX-512 VNNI; VBMI for the 4-bit formats) for the 32-block
 * formats Q8_0, Q4_0 and MXFP4 (what gpt-oss files are made of). Decode streams every weight once,
 * so these kernels must keep up with memory: the design counts instructions per weight byte.
 *
 * Activations carry two int8 digits (pe_act_q8: x = d * (q + ql / 254)), so the products are as
 * close to float32 activations as makes no difference to the logits (llama.cpp's one Q8_0 digit
 * moves a random test model's logits by ~0.1-0.4 relative; two digits by ~1e-3). The quantizer also
 * writes the combined digit X = 254 q + ql in base 256 (X = 256 xh + xl, pe_act_q8.xh / xl), already
 * in this file's element order, so a product is vpdpbusd against xh, a shift by 8 and vpdpbusd
 * against xl accumulated on top: exact, and no multiply or second fold for the second digit.
 *
 * vpdpbusd multiplies unsigned by signed bytes, so weight codes are made unsigned by an offset
 * (Q8_0: q + 128, Q4_0: the raw nibble = q + 8, MXFP4: doubled E2M1 value + 12); the offset times
 * the activation block's combined code sum (pe_act_q8.s32x) is subtracted in int32 (exact), and
 * each (row, block) sum is converted to float once and scaled by d_w * d_x / 254. A row's result
 * depends only on its own bytes, never on its neighbours in the group (rows past nr repeat the last
 * row and are not stored), so any grouping and any thread count give the same bits.
 *
 * "A row per register": a step covers four blocks (128 elements) of each of the group's eight rows.
 * A row's step is read with plain 64-byte loads and its codes gathered by one two-source permute
 * per 64 codes (vpermt2b; Q8_0, whose fields sit at even offsets, vpermt2w, so it needs no VBMI)
 * into two registers, lane k of the first holding elements 0-15 of block k, of the second elements
 * 16-31: the 4-bit formats take the low nibbles through a 64-entry vpermb table (it ignores index
 * bits 6-7 and repeats every 16 entries, so no masking; Q4_0 masks with an and) and the high
 * nibbles after one 16-bit shift; Q8_0 flips the sign bit. Per token, four vpdpbusd and a shift
 * leave four partial sums per (block, row) lane; one transpose-add tree (fold4) turns four rows'
 * registers into 16 (row, block) sums. The scale fields are gathered from the loaded registers by
 * masked permutes, converted once per four rows and step (e8m0 through vscalefps: d_x / 254 *
 * 2^(e - 128) in one rounding). The last step of a row masks its loads: nothing is read past a
 * row, and the activations of the missing blocks are zero.
 *
 * Several tokens (a decode step of 2-8 sequences): the same step decodes the rows once and loops
 * over the tokens; each token's arithmetic is the one-token kernel's, so its bits are too.
 *
 * The rows of a group are contiguous in every weight matrix, so each step also prefetches the
 * matching slice of the group PE_DOT_PF_GROUPS ahead into L2 (quants_impl.h): the memory system
 * sees one sequential stream per thread instead of eight interleaved ones. */
#include "quants_impl.h"

#include "cpu_features.h"

#include <immintrin.h>
#include <pthread.h>
#include <string.h>

#define PE_AI static inline __attribute__((always_inline))

enum { F_Q8_0 = 0, F_Q4_0, F_MXFP4 };
static const int BLOCK[3] = {34, 18, 17};
static const int OFFSET[3] = {128, 8, 12};
static const int QS[3] = {2, 2, 1};      /* first code byte of a block */
static const int N_LOAD[3] = {4, 2, 2};  /* 64-byte loads per row step, at LOAD_AT */
static const int LOAD_AT[3][4] = {{0, 56, 16, 72}, {0, 8}, {0, 4}};

/* Position of row-step byte `off` in the two-register permute table made of the 64-byte loads at
 * offsets A (positions 0-63) and B (64-127). */
static int pair_pos(int off, int A, int B) { return off >= A && off - A < 64 ? off - A : 64 + off - B; }

/* Permute indexes and masks of a format, built once (tables_build); loaded per call (tables_get). */
typedef struct {
    uint8_t code[2][64];  /* index of code register c (Q8_0: words, from the loads 2c, 2c + 1) */
    uint8_t scale[4][64]; /* Q8_0: row i's scale words to word 4k + i; 4-bit: rows (0, 1), (2, 3) */
    uint64_t scale_k[4];
} __attribute__((aligned(64))) table_bytes;
static table_bytes TABLES[3];
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

/* Scalar, and run on every AVX-512 CPU (Q8_0 needs no VBMI): kept free of VBMI whatever the vectorizer does. */
static __attribute__((target("no-avx512vbmi"))) void tables_build_one(const int F, table_bytes *t) {
    const int B = BLOCK[F];
    if (F == F_Q8_0) {
        uint16_t w[32];
        for (int c = 0; c < 2; c++) {
            for (int k = 0; k < 4; k++)
                for (int j = 0; j < 8; j++)
                    w[8 * k + j] = (uint16_t)(pair_pos(B * k + QS[F] + 16 * c + 2 * j, LOAD_AT[F][2 * c],
                                                       LOAD_AT[F][2 * c + 1]) / 2);
            memcpy(t->code[c], w, 64);
        }
        for (int i = 0; i < 4; i++) {
            memset(w, 0, sizeof w);
            for (int k = 0; k < 4; k++) w[4 * k + i] = (uint16_t)(pair_pos(B * k, LOAD_AT[F][0], LOAD_AT[F][1]) / 2);
            memcpy(t->scale[i], w, 64);
            t->scale_k[i] = 0x1111ull << i; /* words 4k + i */
        }
        return;
    }
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < 16; j++)
            t->code[0][16 * k + j] = (uint8_t)pair_pos(B * k + QS[F] + j, LOAD_AT[F][0], LOAD_AT[F][1]);
    /* f16 scales (Q4_0): bytes 2 (4k + i) + j; e8m0 (MXFP4): byte 4 (4k + i); rows 2p, 2p + 1 are the
     * two tables (first loads) of permute p */
    const int sb = F == F_MXFP4 ? 1 : 2, lane = F == F_MXFP4 ? 4 : 2;
    for (int p = 0; p < 2; p++)
        for (int k = 0; k < 4; k++)
            for (int i = 2 * p; i < 2 * p + 2; i++)
                for (int j = 0; j < sb; j++) {
                    t->scale[p][lane * (4 * k + i) + j] = (uint8_t)(B * k + j + 64 * (i % 2));
                    t->scale_k[p] |= 1ull << (lane * (4 * k + i) + j);
                }
}

static __attribute__((target("no-avx512vbmi"))) void tables_build(void) {
    for (int F = 0; F < 3; F++) tables_build_one(F, &TABLES[F]);
}

typedef struct {
    __m512i code[2], scale[4], table;
    __mmask64 scale_k[4];
} tables;

PE_AI void tables_get(const int F, tables *t) {
    const table_bytes *b = &TABLES[F];
    for (int c = 0; c < (F == F_Q8_0 ? 2 : 1); c++) t->code[c] = _mm512_load_si512(b->code[c]);
    for (int i = 0; i < (F == F_Q8_0 ? 4 : 2); i++) {
        t->scale[i] = _mm512_load_si512(b->scale[i]);
        t->scale_k[i] = b->scale_k[i];
    }
    /* pe_mxfp4_codes in every 16 bytes: vpermb looks up index bits 0-3 alike in all four copies */
    if (F == F_MXFP4) t->table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)pe_mxfp4_codes));
}

/* Bytes [p, p + valid) (valid clamped to 0..64), zero elsewhere; never reads past valid. */
PE_AI __m512i loadm(const uint8_t *p, int valid) {
    if (valid >= 64) return _mm512_loadu_si512(p);
    return _mm512_maskz_loadu_epi8(valid <= 0 ? 0 : (((__mmask64)1 << valid) - 1), p);
}

/* 4 registers (row i) x 4 lanes (block k) x 4 int32 -> lane 4k + i: the (row i, block k) sum. */
PE_AI __m512i fold4(const __m512i a[4]) {
    const __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
    const __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
}

/* Four rows' step: unsigned codes u[i][0..2) and the scale fields of lane 4k + i (f16 words in the
 * low 256 bits, or e8m0 dwords). */
PE_AI void decode4(const int F, const tables *t, const uint8_t *const r[4], int64_t o, const int nblk, __m512i u[4][2],
                   __m512i *sc) {
    const int valid = nblk * BLOCK[F];
    __m512i ld[4][4];
    for (int i = 0; i < 4; i++)
        for (int l = 0; l < N_LOAD[F]; l++) ld[i][l] = loadm(r[i] + o + LOAD_AT[F][l], valid - LOAD_AT[F][l]);
    const __m512i m0f = _mm512_set1_epi8(0x0f);
    for (int i = 0; i < 4; i++) {
        if (F == F_Q8_0) {
            const __m512i flip = _mm512_set1_epi8((char)0x80);
            u[i][0] = _mm512_xor_si512(_mm512_permutex2var_epi16(ld[i][0], t->code[0], ld[i][1]), flip);
            u[i][1] = _mm512_xor_si512(_mm512_permutex2var_epi16(ld[i][2], t->code[1], ld[i][3]), flip);
            continue;
        }
        const __m512i v = _mm512_permutex2var_epi8(ld[i][0], t->code[0], ld[i][1]);
        const __m512i hi = _mm512_srli_epi16(v, 4);
        if (F == F_Q4_0) {
            u[i][0] = _mm512_and_si512(v, m0f);
            u[i][1] = _mm512_and_si512(hi, m0f);
        } else {
            u[i][0] = _mm512_permutexvar_epi8(v, t->table);
            u[i][1] = _mm512_permutexvar_epi8(hi, t->table);
        }
    }
    if (F == F_Q8_0) {
        __m512i s[4];
        for (int i = 0; i < 4; i++)
            s[i] = _mm512_maskz_permutex2var_epi16((__mmask32)t->scale_k[i], ld[i][0], t->scale[i], ld[i][1]);
        *sc = _mm512_or_si512(_mm512_ternarylogic_epi32(s[0], s[1], s[2], 0xfe), s[3]);
    } else {
        *sc = _mm512_or_si512(_mm512_maskz_permutex2var_epi8(t->scale_k[0], ld[0][0], t->scale[0], ld[1][0]),
                              _mm512_maskz_permutex2var_epi8(t->scale_k[1], ld[2][0], t->scale[1], ld[3][0]));
    }
}

/* One token's int32 partial sums of a row's step: w . (256 xh + xl), exact
 * (|256 (w . xh)| <= 256 * 8 * 255 * 127 per lane). */
PE_AI __m512i dot_row(const __m512i u[2], const int8_t *xh, const int8_t *xl) {
    __m512i c = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[0], _mm512_loadu_si512(xh));
    c = _mm512_slli_epi32(_mm512_dpbusd_epi32(c, u[1], _mm512_loadu_si512(xh + 64)), 8);
    c = _mm512_dpbusd_epi32(c, u[0], _mm512_loadu_si512(xl));
    return _mm512_dpbusd_epi32(c, u[1], _mm512_loadu_si512(xl + 64));
}

/* Step g (blocks 4g..4g + nblk) of eight rows for n_tok tokens, into acc[t][half]. */
PE_AI void step(const int F, const tables *t, const uint8_t *const r[8], const pe_act_q8 *x, const int n_tok,
                int64_t g, const int nblk, const uint8_t *next, __m512 acc[][2]) {
    const int64_t o = g * 4 * BLOCK[F];
    for (int p = 0; p < 32 * BLOCK[F]; p += 64) _mm_prefetch((const char *)next + 8 * o + p, _MM_HINT_T1);
    /* per token: d_x / 254 and offset * s32x (exact in int32) of lane 4k + i (block k) */
    const __m512i lane_blk = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 dx[PE_DOT_Q8_MAX_TOK];
    __m512i offs[PE_DOT_Q8_MAX_TOK];
    for (int tk = 0; tk < n_tok; tk++) {
        const __m512 d = _mm512_permutexvar_ps(lane_blk, _mm512_castps128_ps512(_mm_loadu_ps(x[tk].d + 4 * g)));
        const __m512 sx = _mm512_permutexvar_ps(lane_blk, _mm512_castps128_ps512(_mm_loadu_ps(x[tk].s32x + 4 * g)));
        dx[tk] = _mm512_mul_ps(d, _mm512_set1_ps(1.0f / 254.0f));
        offs[tk] = _mm512_mullo_epi32(_mm512_cvtps_epi32(sx), _mm512_set1_epi32(OFFSET[F]));
    }
    for (int h = 0; h < 2; h++) {
        __m512i u[4][2], sc;
        decode4(F, t, r + 4 * h, o, nblk, u, &sc);
        /* the rows' scales: f16 as floats, e8m0 as the exponent e - 128 */
        const __m512 ws = F == F_MXFP4 ? _mm512_sub_ps(_mm512_cvtepi32_ps(sc), _mm512_set1_ps(128.0f))
                                       : _mm512_cvtph_ps(_mm512_castsi512_si256(sc));
        for (int tk = 0; tk < n_tok; tk++) {
            __m512i c[4];
            for (int i = 0; i < 4; i++) c[i] = dot_row(u[i], x[tk].xh + 128 * g, x[tk].xl + 128 * g);
            const __m512 s = F == F_MXFP4 ? _mm512_scalef_ps(dx[tk], ws) : _mm512_mul_ps(ws, dx[tk]);
            acc[tk][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(fold4(c), offs[tk])), s, acc[tk][h]);
        }
    }
}

/* The rows' results from lanes 4k + i (row 4 half + i), summed over k in a fixed order. */
PE_AI void store_rows(const __m512 acc[2], int nr, float *out) {
    float v[32], res[8];
    _mm512_storeu_ps(v, acc[0]);
    _mm512_storeu_ps(v + 16, acc[1]);
    for (int i = 0; i < 8; i++) {
        const float *a = v + 16 * (i / 4) + i % 4;
        res[i] = (a[0] + a[4]) + (a[8] + a[12]);
    }
    memcpy(out, res, (size_t)nr * sizeof(float));
}

PE_AI void dot_rows(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, const int n_tok, int64_t n,
                    float *out, int64_t ldo, const int F) {
    tables t;
    tables_get(F, &t);
    const uint8_t *r[8];
    for (int i = 0; i < 8; i++) r[i] = rows + (i < nr ? i : nr - 1) * stride;
    const uint8_t *next = rows + PE_DOT_PF_GROUPS * 8 * stride;
    const int64_t nb = n / 32;
    __m512 acc[PE_DOT_Q8_MAX_TOK][2];
    for (int tk = 0; tk < n_tok; tk++) acc[tk][0] = acc[tk][1] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; 4 * g + 4 <= nb; g++) step(F, &t, r, x, n_tok, g, 4, next, acc);
    if (4 * g < nb) step(F, &t, r, x, n_tok, g, (int)(nb - 4 * g), next, acc);
    for (int tk = 0; tk < n_tok; tk++) store_rows(acc[tk], nr, out + tk * ldo);
}

PE_DOT_Q8_ENTRIES(q8_0, dot_rows, F_Q8_0)
PE_DOT_Q8_ENTRIES(q4_0, dot_rows, F_Q4_0)
PE_DOT_Q8_ENTRIES(mxfp4, dot_rows, F_MXFP4)

pe_dot_q8_fn pe_dot_q8_avx512(int type) {
    pthread_once(&tables_once, tables_build);
    switch (type) {
    case PE_TYPE_Q8_0: return dot_q8_q8_0;
    case PE_TYPE_Q4_0: return pe_cpu_has_avx512vbmi() ? dot_q8_q4_0 : NULL;
    case PE_TYPE_MXFP4: return pe_cpu_has_avx512vbmi() ? dot_q8_mxfp4 : NULL;
    default: return pe_dot_q8k_avx512(type);
    }
}

pe_dot_q8_tok_fn pe_dot_q8_tok_avx512(int type) {
    pthread_once(&tables_once, tables_build);
    switch (type) {
    case PE_TYPE_Q8_0: return tok_q8_q8_0;
    case PE_TYPE_Q4_0: return pe_cpu_has_avx512vbmi() ? tok_q8_q4_0 : NULL;
    case PE_TYPE_MXFP4: return pe_cpu_has_avx512vbmi() ? tok_q8_mxfp4 : NULL;
    default: return pe_dot_q8k_tok_avx512(type);
    }
}
