/* Decode kernels with int8 activations on AVX2 (no VNNI) for the 32-block formats Q8_0, Q4_0,
 * MXFP4 (the same results, bit for bit, as dot_q8_avx512.c), Q4_1, Q5_0, Q5_1 and Q2_K..Q6_K (as
 * dot_q8k_avx512.c), and for MXFP4 in the R16 layout (as r16_avx512.c): a model's default
 * (int8) path gives the same products on an AVX2-only CPU as on an AVX-512 one, instead of falling
 * back to float32 activations there. The sections below: the rows kernel (Q8_0, Q4_0, MXFP4), the
 * blocks-in-lanes kernel (Q4_1, Q5_0, Q5_1), the sub-blocks-in-lanes kernels (Q4_K, Q5_K; Q2_K,
 * Q3_K, Q6_K), the R16 kernel.
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
#include "r16.h"

#include <immintrin.h>
#include <string.h>

#define PE_AI static inline __attribute__((always_inline))

enum { F_Q8_0 = 0, F_Q4_0, F_MXFP4, F_Q4_1, F_Q5_0, F_Q5_1 };
static const int BLOCK[6] = {34, 18, 17, 20, 22, 24};
static const int OFFSET[6] = {0, 8, 12, 0, 16, 0};
static const int QS[6] = {2, 2, 1, 4, 6, 8}; /* first code byte of a block */
static const int QH[6] = {0, 0, 0, 0, 2, 4}; /* the 5th bits' word (Q5_0, Q5_1) */
static const int HASMIN[6] = {0, 0, 0, 1, 0, 1};

/* One block's combined activation codes X in the A / B pairing order (see above), as the
 * quantizer wrote them (pe_act_q8.x16): rebuilding them from qs / ql here took 12 instructions per
 * block, token and group of eight rows. */
PE_AI void act_x(const pe_act_q8 *x, int64_t b, __m256i X[2]) {
    X[0] = _mm256_loadu_si256((const __m256i *)(x->x16 + 32 * b));
    X[1] = _mm256_loadu_si256((const __m256i *)(x->x16 + 32 * b + 16));
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
    if (F == F_Q5_0 || F == F_Q5_1) { /* byte e (element e) gets bit e of qh as 16 */
        uint32_t qh;
        memcpy(&qh, blk + QH[F], 4);
        const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                              3, 3, 3, 3, 3, 3, 3, 3);
        const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
        const __m256i bytes = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), pick), bit);
        v = _mm256_or_si256(v, _mm256_and_si256(_mm256_cmpeq_epi8(bytes, bit), _mm256_set1_epi8(16)));
    }
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

/* 2^(e - 128) for eight E8M0 bytes e (one per int32 lane) as pe_e8m0_half_bits writes it. */
PE_AI __m256 e8m0_half_ps(__m256i e) {
    const __m256i small = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);
    const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
    const __m256i is_small = _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e);
    return _mm256_castsi256_ps(_mm256_blendv_epi8(normal, small, is_small));
}

/* The dwords at base + off[k] for k < n, 0 for k >= n (nothing read there). Inserted one by one:
 * eight narrow stores read back as one vector stall on store forwarding (the blocks kernel below ran
 * 1.4-1.7x faster in cache without that). */
PE_AI __m256i dwords8(const uint8_t *base, const int32_t off[8], int64_t n) {
    int32_t w[8];
    for (int k = 0; k < 8; k++) {
        w[k] = 0;
        if (k < n) memcpy(&w[k], base + off[k], 4);
    }
    __m128i lo = _mm_cvtsi32_si128(w[0]), hi = _mm_cvtsi32_si128(w[4]);
    lo = _mm_insert_epi32(lo, w[1], 1), lo = _mm_insert_epi32(lo, w[2], 2), lo = _mm_insert_epi32(lo, w[3], 3);
    hi = _mm_insert_epi32(hi, w[5], 1), hi = _mm_insert_epi32(hi, w[6], 2), hi = _mm_insert_epi32(hi, w[7], 3);
    return _mm256_setr_m128i(lo, hi);
}

/* The eight rows' block scales without d_x: f16 d_w, or 2^(e - 128) as pe_e8m0_half_bits writes it
 * (a product with it is rounded once, as vscalefps rounds once). Eight scalar loads: vpgatherdd
 * was slower on Zen 4. */
PE_AI __m256 row_scales(const int F, const uint8_t *blk0, const int32_t off[8]) {
    const __m256i raw = dwords8(blk0, off, 8);
    if (F != F_MXFP4) return _mm256_cvtph_ps(low_halves(raw));
    return e8m0_half_ps(_mm256_and_si256(raw, _mm256_set1_epi32(0xff)));
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
        const __m256 s = _mm256_mul_ps(ws, _mm256_set1_ps(x[t].dk[b]));
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

/* ---- Q4_1, Q5_0, Q5_1: blocks in lanes, dot_q8k_avx512.c's arithmetic ------------------------------
 * The AVX-512 kernel (dot_q8k_avx512.c, "32-blocks ... rows in pairs") keeps for each row eight
 * float accumulators, one per block index mod 8, each taking per block fma(S - offset * s32x,
 * d_w * d_x / 254) and, with a minimum, fma(m_w, d_x / 254 * s32x), and sums them at the end as
 * ((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3)) (its lane reduction). Here one 8-lane register
 * per row and token is those eight accumulators: a step of 8 blocks gives the row's 8 exact block
 * sums S in one vector (the blocks' int32 vectors folded as the rows kernel above folds rows), so
 * every float operation and its order are the AVX-512 kernel's and the bits are the same. Missing
 * blocks of a last step count as S = 0 with a zero activation scale, as there. */

/* _mm512_reduce_add_ps's order after its first step (upper 8 lanes + lower 8):
 * ((v4 + v0) + (v6 + v2)) + ((v5 + v1) + (v7 + v3)). */
PE_AI float tree8(__m256 v) {
    const __m128 h = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    const __m128 q = _mm_add_ps(h, _mm_shuffle_ps(h, h, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(q) + _mm_cvtss_f32(_mm_shuffle_ps(q, q, 1));
}

/* The eight lanes of a row's accumulator summed as the AVX-512 kernels' reduction of a register
 * whose upper half is zero. */
PE_AI float lanes8_sum(__m256 acc) { return tree8(_mm256_add_ps(_mm256_setzero_ps(), acc)); }

PE_AI void dot_blocks(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, const int n_tok, int64_t n,
                      float *out, int64_t ldo, const int F) {
    const int B = BLOCK[F];
    const uint8_t *next = rows + 8 * stride;
    const int64_t nb = n / 32;
    const __m256i none = _mm256_setzero_si256();
    const int32_t head_off[8] = {0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B};
    __m256 acc[PE_DOT_Q8_MAX_TOK][8];
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < 8; i++) acc[t][i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b += 8) {
        const int64_t nblk = nb - b < 8 ? nb - b : 8;
        __m256i X[PE_DOT_Q8_MAX_TOK][8][2];
        __m256 dx[PE_DOT_Q8_MAX_TOK], dxs[PE_DOT_Q8_MAX_TOK];
        __m256i offs[PE_DOT_Q8_MAX_TOK];
        const __m256i have = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)nblk), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (int t = 0; t < n_tok; t++) {
            for (int k = 0; k < nblk; k++) act_x(&x[t], b + k, X[t][k]);
            const __m256 d = _mm256_castsi256_ps(_mm256_maskload_epi32((const int *)(x[t].d + b), have));
            const __m256 s32 = _mm256_castsi256_ps(_mm256_maskload_epi32((const int *)(x[t].s32x + b), have));
            dx[t] = _mm256_mul_ps(d, _mm256_set1_ps(1.0f / 254.0f));
            dxs[t] = _mm256_mul_ps(dx[t], s32);
            offs[t] = _mm256_mullo_epi32(_mm256_cvtps_epi32(s32), _mm256_set1_epi32(OFFSET[F]));
        }
        for (int p = 0; p < 8 * 8 * B; p += 64) _mm_prefetch((const char *)next + 8 * b * B + p, _MM_HINT_T1);
        for (int i = 0; i < 8; i++) {
            const uint8_t *row = rows + (i < nr ? i : nr - 1) * stride + b * B;
            __m256i blk[PE_DOT_Q8_MAX_TOK][8];
            for (int k = 0; k < 8; k++) {
                __m256i u[2];
                if (k < nblk) decode(F, row + k * B, none, u);
                for (int t = 0; t < n_tok; t++) blk[t][k] = k < nblk ? madd2(u, X[t][k]) : none;
            }
            const __m256i heads = dwords8(row, head_off, nblk); /* d, and m (Q4_1, Q5_1) above it */
            const __m256 a = _mm256_cvtph_ps(low_halves(heads));
            const __m256 m = HASMIN[F] ? _mm256_cvtph_ps(low_halves(_mm256_srli_epi32(heads, 16))) : _mm256_setzero_ps();
            for (int t = 0; t < n_tok; t++) {
                __m256i S = fold8(fold4(blk[t]), fold4(blk[t] + 4));
                if (OFFSET[F]) S = _mm256_sub_epi32(S, offs[t]);
                acc[t][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S), _mm256_mul_ps(a, dx[t]), acc[t][i]);
                if (HASMIN[F]) acc[t][i] = _mm256_fmadd_ps(m, dxs[t], acc[t][i]);
            }
        }
    }
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < nr; i++) out[t * ldo + i] = lanes8_sum(acc[t][i]);
}

PE_DOT_Q8_ENTRIES(q4_1, dot_blocks, F_Q4_1)
PE_DOT_Q8_ENTRIES(q5_0, dot_blocks, F_Q5_0)
PE_DOT_Q8_ENTRIES(q5_1, dot_blocks, F_Q5_1)

/* ---- Q4_K, Q5_K: sub-blocks in lanes, dot_q8k_avx512.c's arithmetic ---------------------------------
 * As the blocks kernel, with a super-block's eight 32-element sub-blocks in the lanes: per lane
 * fma(S, (d sc) * dxa) then fnmadd(dmin m, d_x / 254 * s32x), dxa = d_x / 254 times 1/16 where the
 * codes are Q4_K's high nibbles left in place (16 q, as there), the scales decoded with the
 * AVX-512 kernel's shuffles (k45_pair_scales, here one row in 128 bits). */

enum { K_Q4 = 0, K_Q5 };
static const int K_BLOCK[2] = {144, 176};

/* sc (bytes 0-7) and m (bytes 8-15) of the row's eight sub-blocks (pe_k_scale_min) times d, dmin. */
PE_AI void k45_scales(const uint8_t *p, __m256 *a, __m256 *m) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    const __m128i q = _mm_shuffle_epi8(h, _mm_setr_epi8(4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m128i q4 = _mm_shuffle_epi8(_mm_srli_epi16(h, 4),
                                        _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 12, 13, 14, 15));
    const __m128i q2 = _mm_shuffle_epi8(_mm_srli_epi16(h, 2),
                                        _mm_setr_epi8(-1, -1, -1, -1, 4, 5, 6, 7, -1, -1, -1, -1, 8, 9, 10, 11));
    const __m128i lo = _mm_or_si128(_mm_and_si128(q, _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0)),
                                    _mm_and_si128(q4, _mm_set1_epi8(15)));
    const __m128i scm = _mm_or_si128(lo, _mm_and_si128(q2, _mm_set1_epi8(0x30)));
    const __m128 dd = _mm_cvtph_ps(h); /* d, dmin in lanes 0, 1 */
    *a = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(scm)), _mm256_broadcastss_ps(dd));
    *m = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(scm, 8))),
                       _mm256_broadcastss_ps(_mm_movehdup_ps(dd)));
}

/* A row's super-block: the int16 codes of sub-block s in the A / B pairing order, u[s][0..1]. */
PE_AI void k45_codes(const int T, const uint8_t *p, __m256i u[8][2]) {
    const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    const uint8_t *qs = p + (T == K_Q5 ? 48 : 16);
    const __m256i qh = T == K_Q5 ? _mm256_loadu_si256((const __m256i *)(p + 16)) : zero;
    for (int j = 0; j < 4; j++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
        __m256i c0 = _mm256_and_si256(v, low), c1;
        if (T == K_Q4) {
            c1 = _mm256_andnot_si256(low, v); /* 16 q, as the AVX-512 kernel */
        } else {
            c1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            const __m256i b0 = _mm256_set1_epi8((char)(1 << (2 * j))), b1 = _mm256_set1_epi8((char)(2 << (2 * j)));
            c0 = _mm256_or_si256(c0, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b0), b0), _mm256_set1_epi8(16)));
            c1 = _mm256_or_si256(c1, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), _mm256_set1_epi8(16)));
        }
        u[2 * j][0] = _mm256_unpacklo_epi8(c0, zero), u[2 * j][1] = _mm256_unpackhi_epi8(c0, zero);
        u[2 * j + 1][0] = _mm256_unpacklo_epi8(c1, zero), u[2 * j + 1][1] = _mm256_unpackhi_epi8(c1, zero);
    }
}

PE_AI void dot_k45(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, const int n_tok, int64_t n,
                   float *out, int64_t ldo, const int T) {
    const int B = K_BLOCK[T];
    const uint8_t *next = rows + 8 * stride;
    const __m256 pw = T == K_Q4 ? _mm256_setr_ps(1, 0.0625f, 1, 0.0625f, 1, 0.0625f, 1, 0.0625f) : _mm256_set1_ps(1.0f);
    __m256 acc[PE_DOT_Q8_MAX_TOK][8];
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < 8; i++) acc[t][i] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < n / 256; sb++) {
        __m256i X[PE_DOT_Q8_MAX_TOK][8][2];
        __m256 dxa[PE_DOT_Q8_MAX_TOK], dxs[PE_DOT_Q8_MAX_TOK];
        for (int t = 0; t < n_tok; t++) {
            for (int k = 0; k < 8; k++) act_x(&x[t], 8 * sb + k, X[t][k]);
            const __m256 dx = _mm256_mul_ps(_mm256_loadu_ps(x[t].d + 8 * sb), _mm256_set1_ps(1.0f / 254.0f));
            dxs[t] = _mm256_mul_ps(dx, _mm256_loadu_ps(x[t].s32x + 8 * sb));
            dxa[t] = _mm256_mul_ps(dx, pw);
        }
        for (int p = 0; p < 8 * B; p += 64) _mm_prefetch((const char *)next + 8 * sb * B + p, _MM_HINT_T1);
        for (int i = 0; i < 8; i++) {
            const uint8_t *row = rows + (i < nr ? i : nr - 1) * stride + sb * B;
            __m256i u[8][2], sub[PE_DOT_Q8_MAX_TOK][8];
            k45_codes(T, row, u);
            for (int k = 0; k < 8; k++)
                for (int t = 0; t < n_tok; t++) sub[t][k] = madd2(u[k], X[t][k]);
            __m256 a, m;
            k45_scales(row, &a, &m);
            for (int t = 0; t < n_tok; t++) {
                const __m256i S = fold8(fold4(sub[t]), fold4(sub[t] + 4));
                acc[t][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S), _mm256_mul_ps(a, dxa[t]), acc[t][i]);
                acc[t][i] = _mm256_fnmadd_ps(m, dxs[t], acc[t][i]);
            }
        }
    }
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < nr; i++) out[t * ldo + i] = lanes8_sum(acc[t][i]);
}

PE_DOT_Q8_ENTRIES(q4_k, dot_k45, K_Q4)
PE_DOT_Q8_ENTRIES(q5_k, dot_k45, K_Q5)

/* ---- Q2_K, Q3_K, Q6_K: 16-element sub-blocks, dot_q8k_avx512.c's arithmetic ---------------------------
 * The AVX-512 kernel keeps one 16-lane accumulator per row, lane p for sub-block SUB_NAT[p] (0, 4,
 * 8, 12, 1, 5, ...), each taking fma(S - offset * s16x, (d sc) * d_x / 254), and sums the 16 lanes
 * with _mm512_reduce_add_ps. Here a super-block's eight 32-element units give, after the blocks
 * kernel's fold, sub-blocks (0 2 4 6 1 3 5 7) in one register and (8 10 12 14 9 11 13 15) in a
 * second; the per-lane float steps are the same, and at the end two shuffles put the pairs that
 * reduction adds first side by side (sub-blocks SUB_NAT[k] and SUB_NAT[8 + k]), so the bits are
 * the AVX-512 kernel's. Codes unsigned (Q3_K: 2 bits + 4 with the hmask bit, offset 4; Q6_K: 6
 * bits, offset 32; Q2_K: 2 bits, its scales and minimums applied in int32 as its q2_row does). */

enum { K_Q3 = 0, K_Q6, K_Q2 };
static const int K16_BLOCK[3] = {110, 210, 84};
static const int K16_OFFSET[3] = {4, 32, 0};

/* Lanes of the two sub-block registers: sub-block of lane k (0-7) and of lane 8 + k. */
static const int8_t K16_LANES[16] = {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15};

/* The 16 signed scales of a row's super-block in natural order (pe_k_scale / pe_q3_k_scale). */
PE_AI __m128i k16_scales(const int T, const uint8_t *p) {
    if (T == K_Q6) return _mm_loadu_si128((const __m128i *)(p + 192));
    /* Q3_K: 12 bytes at p + 96, loaded as the 16 ending with the block (p + 94) and shifted down */
    const __m128i h = _mm_srli_si128(_mm_loadu_si128((const __m128i *)(p + 94)), 2);
    const __m128i idx = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m128i lo = _mm_and_si128(_mm_blendv_epi8(_mm_shuffle_epi8(h, idx), _mm_shuffle_epi8(_mm_srli_epi16(h, 4), idx),
                                                     _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1)),
                                     _mm_set1_epi8(15));
    /* byte k: s[8 + k % 4] >> 2 (k / 4) & 3, as bits 4-5 */
    const __m128i b = _mm_shuffle_epi8(h, _mm_setr_epi8(8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11));
    const __m128i hi = _mm_or_si128(
        _mm_or_si128(_mm_and_si128(_mm_slli_epi16(b, 4), _mm_setr_epi8(48, 48, 48, 48, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
                     _mm_and_si128(_mm_slli_epi16(b, 2), _mm_setr_epi8(0, 0, 0, 0, 48, 48, 48, 48, 0, 0, 0, 0, 0, 0, 0, 0))),
        _mm_or_si128(_mm_and_si128(b, _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 48, 48, 48, 48, 0, 0, 0, 0)),
                     _mm_and_si128(_mm_srli_epi16(b, 2), _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 48, 48, 48, 48))));
    return _mm_sub_epi8(_mm_or_si128(lo, hi), _mm_set1_epi8(32));
}

/* A row's super-block as eight 32-element units of int16 codes in the A / B pairing order. */
PE_AI void k16_codes(const int T, const uint8_t *p, __m256i u[8][2]) {
    const __m256i zero = _mm256_setzero_si256();
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++) {
            __m256i c;
            if (T == K_Q2) { /* unit 4 h + j: bits 2 j of qs[32 h ..] */
                const __m256i q = _mm256_loadu_si256((const __m256i *)(p + 16 + 32 * h));
                c = _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), _mm256_set1_epi8(3));
            } else if (T == K_Q6) { /* unit 4 h + j: nibble j / 2 of ql[64 h + 32 (j % 2) ..], 2 bits j of qh[32 h ..] */
                const __m256i ql = _mm256_loadu_si256((const __m256i *)(p + 64 * h + 32 * (j % 2)));
                const __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 128 + 32 * h));
                const __m256i nib = _mm256_and_si256(j < 2 ? ql : _mm256_srli_epi16(ql, 4), _mm256_set1_epi8(15));
                const __m256i top = j == 0 ? _mm256_slli_epi16(qh, 4) : j == 1 ? _mm256_slli_epi16(qh, 2)
                                  : j == 2 ? qh : _mm256_srli_epi16(qh, 2);
                c = _mm256_or_si256(nib, _mm256_and_si256(top, _mm256_set1_epi8(48)));
            } else { /* unit 4 h + j: bits 2 j of qs[32 h ..] + 4 where hmask has bit 4 h + j */
                const __m256i q = _mm256_loadu_si256((const __m256i *)(p + 32 + 32 * h));
                const __m256i hm = _mm256_loadu_si256((const __m256i *)p), bit = _mm256_set1_epi8((char)(1 << (4 * h + j)));
                const __m256i two = _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), _mm256_set1_epi8(3));
                c = _mm256_or_si256(two, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit), _mm256_set1_epi8(4)));
            }
            u[4 * h + j][0] = _mm256_unpacklo_epi8(c, zero), u[4 * h + j][1] = _mm256_unpackhi_epi8(c, zero);
        }
}

PE_AI void dot_k16(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, const int n_tok, int64_t n,
                   float *out, int64_t ldo, const int T) {
    const int B = K16_BLOCK[T];
    const uint8_t *next = rows + 8 * stride;
    const __m128i lanes = _mm_loadu_si128((const __m128i *)K16_LANES);
    const __m256i lo_idx = _mm256_cvtepi8_epi32(lanes), hi_idx = _mm256_cvtepi8_epi32(_mm_srli_si128(lanes, 8));
    const __m256i m15 = _mm256_set1_epi32(15);
    __m256 acc[PE_DOT_Q8_MAX_TOK][8][2];
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < 8; i++) acc[t][i][0] = acc[t][i][1] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < n / 256; sb++) {
        __m256i X[PE_DOT_Q8_MAX_TOK][8][2], s16i[PE_DOT_Q8_MAX_TOK][2];
        __m256 dx[PE_DOT_Q8_MAX_TOK][2];
        for (int t = 0; t < n_tok; t++) {
            for (int k = 0; k < 8; k++) act_x(&x[t], 8 * sb + k, X[t][k]);
            const __m256 d = _mm256_mul_ps(_mm256_loadu_ps(x[t].d + 8 * sb), _mm256_set1_ps(1.0f / 254.0f));
            const __m256 s_lo = _mm256_loadu_ps(x[t].s16x + 16 * sb), s_hi = _mm256_loadu_ps(x[t].s16x + 16 * sb + 8);
            for (int g = 0; g < 2; g++) {
                const __m256i idx = g ? hi_idx : lo_idx; /* sub-block of each lane; its unit is idx / 2 */
                const __m256i in = _mm256_and_si256(idx, _mm256_set1_epi32(7));
                const __m256 s16 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(s_lo, in), _mm256_permutevar8x32_ps(s_hi, in),
                                                    _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7))));
                s16i[t][g] = _mm256_cvtps_epi32(s16); /* exact (|s16x| <= 16 * 127 * 255) */
                /* Q2_K: d_x / 254 by block (main terms) and its negation (minimum terms) */
                dx[t][g] = T == K_Q2 ? _mm256_mul_ps(d, _mm256_set1_ps(g ? -1.0f : 1.0f))
                                     : _mm256_permutevar8x32_ps(d, _mm256_srli_epi32(idx, 1));
            }
        }
        for (int p = 0; p < 8 * B; p += 64) _mm_prefetch((const char *)next + 8 * sb * B + p, _MM_HINT_T1);
        for (int i = 0; i < 8; i++) {
            const uint8_t *row = rows + (i < nr ? i : nr - 1) * stride + sb * B;
            __m256i u[8][2], unit[PE_DOT_Q8_MAX_TOK][8];
            k16_codes(T, row, u);
            for (int k = 0; k < 8; k++)
                for (int t = 0; t < n_tok; t++) unit[t][k] = madd2(u[k], X[t][k]);
            if (T == K_Q2) {
                /* as dot_q8k_avx512.c's q2_row: per sub-block f sc and S m in int32, summed by
                 * blocks (fold8 of the two lane registers), then one FMA each with d (dmin) d_x / 254 */
                const __m128i sm = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)row), lanes);
                const __m256i s0 = _mm256_cvtepu8_epi32(sm), s1 = _mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8));
                const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128(row[80] | row[81] << 8 | row[82] << 16 | row[83] << 24));
                const __m256 dw = _mm256_broadcastss_ps(dd), dm = _mm256_broadcastss_ps(_mm_movehdup_ps(dd));
                for (int t = 0; t < n_tok; t++) {
                    const __m256i F = fold8(_mm256_mullo_epi32(fold4(unit[t]), _mm256_and_si256(s0, m15)),
                                            _mm256_mullo_epi32(fold4(unit[t] + 4), _mm256_and_si256(s1, m15)));
                    const __m256i M = fold8(_mm256_mullo_epi32(s16i[t][0], _mm256_srli_epi32(s0, 4)),
                                            _mm256_mullo_epi32(s16i[t][1], _mm256_srli_epi32(s1, 4)));
                    acc[t][i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(F), _mm256_mul_ps(dw, dx[t][0]), acc[t][i][0]);
                    acc[t][i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(M), _mm256_mul_ps(dm, dx[t][1]), acc[t][i][1]);
                }
                continue;
            }
            const __m128i sc = _mm_shuffle_epi8(k16_scales(T, row), lanes);
            const __m256 dw = _mm256_set1_ps(_cvtsh_ss((uint16_t)(row[B - 2] | row[B - 1] << 8)));
            const __m256 a[2] = {_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)), dw),
                                 _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))), dw)};
            for (int t = 0; t < n_tok; t++) {
                const __m256i S[2] = {fold4(unit[t]), fold4(unit[t] + 4)}; /* sub-blocks as K16_LANES */
                for (int g = 0; g < 2; g++) {
                    const __m256i off = _mm256_mullo_epi32(s16i[t][g], _mm256_set1_epi32(K16_OFFSET[T]));
                    acc[t][i][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(S[g], off)),
                                                   _mm256_mul_ps(a[g], dx[t][g]), acc[t][i][g]);
                }
            }
        }
    }
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < nr; i++) {
            const __m256 lo = acc[t][i][0], hi = acc[t][i][1];
            /* Q2_K: lane k = block k's main term + its minimum term (lanes k and 8 + k there); else
             * lane k = sub-blocks SUB_NAT[k] + SUB_NAT[8 + k] = (0 2) (4 6) (8 10) (12 14) (1 3) ... */
            out[t * ldo + i] = T == K_Q2 ? tree8(_mm256_add_ps(hi, lo))
                                         : tree8(_mm256_add_ps(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)),
                                                               _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0))));
        }
}

PE_DOT_Q8_ENTRIES(q3_k, dot_k16, K_Q3)
PE_DOT_Q8_ENTRIES(q6_k, dot_k16, K_Q6)
PE_DOT_Q8_ENTRIES(q2_k, dot_k16, K_Q2)

/* ---- MXFP4 in the R16 layout (r16.h) ------------------------------------------------------
 * One group = 16 rows interleaved by dwords: a 32-byte load of piece j holds 4 codes of each of 8
 * rows, so per (row half, token) the products are vpmaddubsw of the looked-up unsigned codes
 * (value + 12, <= 24) against the broadcast activation dword of those 4 elements, one digit at a
 * time (|pair sum| <= 2 * 24 * 128, four registers summed in int16 stay below 2^15), then vpmaddwd
 * by 256 (high digit) or 1 (low digit) into int32: 256 (w . xh) + (w . xl) = w . X exactly, as the
 * AVX-512 kernel (r16_avx512.c) sums it, and the same float steps after it (offset, one
 * conversion, d_x / 254 times 2^(e - 128), FMA into the accumulator of block b mod 4, (a0 + a1) +
 * (a2 + a3)), so the bits are the file-layout kernels'. Per 16 rows x 32 elements and token ~80
 * vector instructions plus ~40 for the codes shared by all tokens, where the file-layout kernel
 * above needs ~13 per row and block (~210). */

PE_AI __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* One digit: sum over the 8 code registers of u . digit, per row as int32, times `weight` (256 / 1). */
PE_AI __m256i r16_digit(const __m256i u[8], const int8_t *digit, int64_t b, __m256i weight) {
    __m256i m[8];
    for (int j = 0; j < 8; j++) m[j] = _mm256_maddubs_epi16(u[j], bcast4(digit + pe_r16_act_at(b, j)));
    const __m256i a = _mm256_add_epi16(_mm256_add_epi16(m[0], m[1]), _mm256_add_epi16(m[2], m[3]));
    const __m256i c = _mm256_add_epi16(_mm256_add_epi16(m[4], m[5]), _mm256_add_epi16(m[6], m[7]));
    return _mm256_add_epi32(_mm256_madd_epi16(a, weight), _mm256_madd_epi16(c, weight));
}

PE_AI void r16_group(const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, const int n_tok, float *out,
                     int64_t ldo, const uint8_t *pf) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)pe_mxfp4_codes));
    const __m256i low = _mm256_set1_epi8(0x0f), k256 = _mm256_set1_epi16(256), k1 = _mm256_set1_epi16(1);
    const uint8_t *scales = group + 256 * nb;
    const int halves = nr > 8 ? 2 : 1;
    __m256 acc[PE_DOT_Q8_MAX_TOK][2][4];
    for (int t = 0; t < n_tok; t++)
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++) acc[t][h][k] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = group + 256 * b;
        pe_r16_prefetch(pf, nb, b);
        for (int h = 0; h < halves; h++) { /* rows 8 h .. 8 h + 7 */
            __m256i u[8]; /* u[j]: elements 4 j .. 4 j + 3 (j < 4), 16 + 4 (j - 4) .. (j >= 4) of 8 rows */
            for (int j = 0; j < 4; j++) {
                const __m256i v = _mm256_load_si256((const __m256i *)(p + 64 * j + 32 * h));
                u[j] = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low));
                u[j + 4] = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
            }
            const __m256 ws = e8m0_half_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(scales + 16 * b + 8 * h))));
            for (int t = 0; t < n_tok; t++) {
                __m256i c = _mm256_add_epi32(r16_digit(u, x[t].xh, b, k256), r16_digit(u, x[t].xl, b, k1));
                c = _mm256_sub_epi32(c, _mm256_set1_epi32(12 * (int32_t)x[t].s32x[b]));
                const __m256 s = _mm256_mul_ps(ws, _mm256_set1_ps(x[t].dk[b]));
                acc[t][h][b & 3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), s, acc[t][h][b & 3]);
            }
        }
    }
    for (int t = 0; t < n_tok; t++)
        for (int h = 0; h < halves; h++) {
            float res[8];
            const __m256 *a = acc[t][h];
            _mm256_storeu_ps(res, _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
            const int n = nr - 8 * h < 8 ? nr - 8 * h : 8;
            memcpy(out + t * ldo + 8 * h, res, (size_t)n * sizeof(float));
        }
}

void pe_r16_dot_avx2(const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, int n_tok, float *out, int64_t ldo,
                     const uint8_t *pf) {
    if (n_tok == 1) r16_group(group, nb, nr, x, 1, out, ldo, pf); /* one token: accumulators in registers */
    else r16_group(group, nb, nr, x, n_tok, out, ldo, pf);
}

pe_dot_q8_fn pe_dot_q8_avx2(int type) {
    switch (type) {
    case PE_TYPE_Q8_0: return dot_q8_q8_0;
    case PE_TYPE_Q4_0: return dot_q8_q4_0;
    case PE_TYPE_MXFP4: return dot_q8_mxfp4;
    case PE_TYPE_Q4_1: return dot_q8_q4_1;
    case PE_TYPE_Q5_0: return dot_q8_q5_0;
    case PE_TYPE_Q5_1: return dot_q8_q5_1;
    case PE_TYPE_Q4_K: return dot_q8_q4_k;
    case PE_TYPE_Q5_K: return dot_q8_q5_k;
    case PE_TYPE_Q3_K: return dot_q8_q3_k;
    case PE_TYPE_Q6_K: return dot_q8_q6_k;
    case PE_TYPE_Q2_K: return dot_q8_q2_k;
    default: return NULL;
    }
}

pe_dot_q8_tok_fn pe_dot_q8_tok_avx2(int type) {
    switch (type) {
    case PE_TYPE_Q8_0: return tok_q8_q8_0;
    case PE_TYPE_Q4_0: return tok_q8_q4_0;
    case PE_TYPE_MXFP4: return tok_q8_mxfp4;
    case PE_TYPE_Q4_1: return tok_q8_q4_1;
    case PE_TYPE_Q5_0: return tok_q8_q5_0;
    case PE_TYPE_Q5_1: return tok_q8_q5_1;
    case PE_TYPE_Q4_K: return tok_q8_q4_k;
    case PE_TYPE_Q5_K: return tok_q8_q5_k;
    case PE_TYPE_Q3_K: return tok_q8_q3_k;
    case PE_TYPE_Q6_K: return tok_q8_q6_k;
    case PE_TYPE_Q2_K: return tok_q8_q2_k;
    default: return NULL;
    }
}
