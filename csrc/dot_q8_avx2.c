/* Decode kernels with int8 activations on AVX2 (no VNNI) for the 32-block formats Q8_0, Q4_0 and
 * MXFP4: the same results, bit for bit, as dot_q8_avx512.c, so a model's default (int8) path gives
 * the same products on an AVX2-only CPU as on an AVX-512 one, instead of falling back to float32
 * activations there.
 *
 * The arithmetic is dot_q8_avx512.c's: for each (row, block) an exact int32 sum S of weight codes
 * times the activation's combined two-digit code X = 254 q + ql (pe_act_q8), converted to float
 * once and multiplied by the block's scale (Q8_0 / Q4_0: f16 d_w times d_x / 254; MXFP4: d_x / 254
 * times 2^(e - 128), exact), accumulated with FMA into one of four partial sums by block index mod
 * 4 and finished as (a0 + a1) + (a2 + a3). Integer sums are exact in any order, so only the float
 * steps have to match, and they do.
 *
 * Without vpdpbusd the product is vpmaddwd on int16: X fits in int16 (|X| <= 254 * 127 + 127), and
 * a weight code, widened to int16, times X and summed in pairs stays far inside int32. Weight codes
 * are unsigned where that saves a sign extension (Q4_0: the nibble = q + 8, MXFP4: doubled E2M1 value
 * + 12 through a vpshufb table), and the offset times the block's code sum (s32x, exact) is taken
 * off the int32 sum, as in the AVX-512 kernels. Elements are paired in vpunpck's in-lane order
 * (register A holds elements 0-7 and 16-23 of a block, B 8-15 and 24-31), for the weights and for
 * X alike, so nothing is permuted across lanes. Eight rows are done together: their eight int32
 * vectors are folded into one vector of eight row sums (vphaddd tree), so the scale, the float
 * conversion and the accumulation are one vector op each per block and token.
 *
 * Speed: without vpdpbusd and with 256-bit registers this is ~13 vector instructions per row and
 * block where the AVX-512 kernel needs ~3.4, so on 2 cores it is compute-bound well below memory
 * bandwidth (MXFP4 ~1.15x, Q4_0 ~1.25x the float32-activation kernel in cache on one Zen 4 core
 * at the AVX2 level; Q8_0 about even); it is here for the bits (a prompt, a decoded token and a
 * batch agree) and the L2 prefetch from DRAM.
 *
 * Several tokens (a decode step of 2-8 sequences) reuse each row's decoded codes for every token;
 * a token's arithmetic is the one-token kernel's. The rows of a group are contiguous, so the next
 * group's matching bytes are prefetched into L2 as the AVX-512 kernels do. */
#include "quants_impl.h"

#include <immintrin.h>
#include <string.h>

#define PE_AI static inline __attribute__((always_inline))

enum { F_Q8_0 = 0, F_Q4_0, F_MXFP4 };
static const int BLOCK[3] = {34, 18, 17};
static const int OFFSET[3] = {0, 8, 12};
static const int QS[3] = {2, 2, 1}; /* first code byte of a block */

/* One block's combined activation codes X in the A / B pairing order (see above). */
PE_AI void act_x(const pe_act_q8 *x, int64_t b, __m256i X[2]) {
    const __m256i q = _mm256_loadu_si256((const __m256i *)(x->qs + 32 * b));
    const __m256i l = _mm256_loadu_si256((const __m256i *)(x->ql + 32 * b));
    const __m256i zero = _mm256_setzero_si256(), k254 = _mm256_set1_epi16(254);
    const __m256i sq = _mm256_cmpgt_epi8(zero, q), sl = _mm256_cmpgt_epi8(zero, l);
    X[0] = _mm256_add_epi16(_mm256_mullo_epi16(_mm256_unpacklo_epi8(q, sq), k254), _mm256_unpacklo_epi8(l, sl));
    X[1] = _mm256_add_epi16(_mm256_mullo_epi16(_mm256_unpackhi_epi8(q, sq), k254), _mm256_unpackhi_epi8(l, sl));
}

/* A row's block as int16 codes in the A / B order (unsigned for Q4_0 / MXFP4, signed for Q8_0). */
PE_AI void decode(const int F, const uint8_t *blk, __m256i table, __m256i u[2]) {
    if (F == F_Q8_0) {
        const __m256i c = _mm256_loadu_si256((const __m256i *)(blk + QS[F]));
        const __m256i s = _mm256_cmpgt_epi8(_mm256_setzero_si256(), c);
        u[0] = _mm256_unpacklo_epi8(c, s);
        u[1] = _mm256_unpackhi_epi8(c, s);
        return;
    }
    /* low nibbles (elements 0-15) in lane 0, high nibbles (16-31) in lane 1: the 16 code bytes in
     * both lanes, lane 1's dwords shifted right by 4 (bits that cross a byte are masked off) */
    const __m256i c = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + QS[F])));
    __m256i v = _mm256_and_si256(_mm256_srlv_epi32(c, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                 _mm256_set1_epi8(0x0f));
    if (F == F_MXFP4) v = _mm256_shuffle_epi8(table, v);
    u[0] = _mm256_unpacklo_epi8(v, _mm256_setzero_si256());
    u[1] = _mm256_unpackhi_epi8(v, _mm256_setzero_si256());
}

PE_AI __m256i madd2(const __m256i u[2], const __m256i X[2]) {
    return _mm256_add_epi32(_mm256_madd_epi16(u[0], X[0]), _mm256_madd_epi16(u[1], X[1]));
}

/* Four rows' int32 vectors -> lanes (i, 4 + i): halves of row i's sum (fold8 adds them). */
PE_AI __m256i fold4(const __m256i p[4]) {
    return _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
}

/* Rows 0-3 and 4-7 from fold4 -> lane i: row i's sum. */
PE_AI __m256i fold8(__m256i a, __m256i b) {
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* The low 16 bits of each int32 lane, packed into eight halves (AVX2 has no vpmovdw). */
PE_AI __m128i low_halves(__m256i v) {
    const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi32(0xffff));
    return _mm_packus_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
}

/* The eight rows' block scales without d_x: f16 d_w, or 2^(e - 128) as pe_e8m0_half_bits writes it
 * (a product with it is rounded once, as vscalefps rounds once). Eight scalar loads: vpgatherdd
 * was slower on Zen 4. */
PE_AI __m256 row_scales(const int F, const uint8_t *blk0, const int32_t off[8]) {
    int32_t w[8];
    for (int i = 0; i < 8; i++) memcpy(&w[i], blk0 + off[i], 4);
    const __m256i raw = _mm256_loadu_si256((const __m256i *)w);
    if (F != F_MXFP4) return _mm256_cvtph_ps(low_halves(raw));
    const __m256i e = _mm256_and_si256(raw, _mm256_set1_epi32(0xff));
    const __m256i small = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);
    const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
    const __m256i is_small = _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e);
    return _mm256_castsi256_ps(_mm256_blendv_epi8(normal, small, is_small));
}

/* Block b of the eight rows for n_tok tokens, into acc[t] (the block's partial sum, b mod 4). */
PE_AI void block(const int F, const uint8_t *rows, const int32_t off[8], __m256i table,
                 const pe_act_q8 *x, const int n_tok, int64_t b, __m256 *acc[]) {
    const int64_t o = b * BLOCK[F];
    __m256i X[PE_DOT_Q8_MAX_TOK][2], half[PE_DOT_Q8_MAX_TOK][2];
    for (int t = 0; t < n_tok; t++) act_x(&x[t], b, X[t]);
    for (int h = 0; h < 2; h++) {
        __m256i p[PE_DOT_Q8_MAX_TOK][4];
        for (int i = 0; i < 4; i++) {
            __m256i u[2];
            decode(F, rows + off[4 * h + i] + o, table, u);
            for (int t = 0; t < n_tok; t++) p[t][i] = madd2(u, X[t]);
        }
        for (int t = 0; t < n_tok; t++) half[t][h] = fold4(p[t]);
    }
    const __m256 ws = row_scales(F, rows + o, off);
    for (int t = 0; t < n_tok; t++) {
        __m256i S = fold8(half[t][0], half[t][1]);
        if (OFFSET[F]) S = _mm256_sub_epi32(S, _mm256_set1_epi32(OFFSET[F] * (int)x[t].s32x[b]));
        const __m256 s = _mm256_mul_ps(ws, _mm256_set1_ps(x[t].d[b] * (1.0f / 254.0f)));
        *acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S), s, *acc[t]);
    }
}

PE_AI void dot_rows(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, const int n_tok, int64_t n,
                    float *out, int64_t ldo, const int F) {
    const int B = BLOCK[F];
    int32_t off[8]; /* rows past nr repeat the last one and are not stored */
    for (int i = 0; i < 8; i++) off[i] = (int32_t)((i < nr ? i : nr - 1) * stride);
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)pe_mxfp4_codes));
    const uint8_t *next = rows + 8 * stride;
    const int64_t nb = n / 32;
    __m256 acc[PE_DOT_Q8_MAX_TOK][4];
    for (int t = 0; t < n_tok; t++)
        for (int k = 0; k < 4; k++) acc[t][k] = _mm256_setzero_ps();
    for (int64_t g = 0; 4 * g < nb; g++) {
        for (int p = 0; p < 32 * B; p += 64) _mm_prefetch((const char *)next + 8 * g * 4 * B + p, _MM_HINT_T1);
        for (int k = 0; k < 4 && 4 * g + k < nb; k++) {
            __m256 *a[PE_DOT_Q8_MAX_TOK];
            for (int t = 0; t < n_tok; t++) a[t] = &acc[t][k];
            block(F, rows, off, table, x, n_tok, 4 * g + k, a);
        }
    }
    for (int t = 0; t < n_tok; t++) {
        float res[8];
        _mm256_storeu_ps(res, _mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3])));
        memcpy(out + t * ldo, res, (size_t)nr * sizeof(float));
    }
}

PE_DOT_Q8_ENTRIES(q8_0, dot_rows, F_Q8_0)
PE_DOT_Q8_ENTRIES(q4_0, dot_rows, F_Q4_0)
PE_DOT_Q8_ENTRIES(mxfp4, dot_rows, F_MXFP4)

pe_dot_q8_fn pe_dot_q8_avx2(int type) {
    switch (type) {
    case PE_TYPE_Q8_0: return dot_q8_q8_0;
    case PE_TYPE_Q4_0: return dot_q8_q4_0;
    case PE_TYPE_MXFP4: return dot_q8_mxfp4;
    default: return NULL;
    }
}

pe_dot_q8_tok_fn pe_dot_q8_tok_avx2(int type) {
    switch (type) {
    case PE_TYPE_Q8_0: return tok_q8_q8_0;
    case PE_TYPE_Q4_0: return tok_q8_q4_0;
    case PE_TYPE_MXFP4: return tok_q8_mxfp4;
    default: return NULL;
    }
}
