/* Decode kernels with int8 activations (AVX-512 VNNI) for the K-quants (Q2_K..Q6_K) and the 32-block
 * formats with a minimum or a 5th bit (Q4_1, Q5_0, Q5_1). Same contract and ideas as dot_q8_avx512.c
 * (eight rows per pass over the activations, two activation digits x = d * (q + ql / 254) combined
 * exactly in int32 as 254 * (w . q) + (w . ql), unsigned codes for vpdpbusd with the offset or the
 * minimum applied through the activations' combined code sums, prefetch into L2 PE_DOT_PF_GROUPS
 * groups ahead) and each row's block two steps ahead prefetched into L1 (prefetch_row).
 *
 * A step covers 256 elements of each row (one super-block, or eight 32-blocks). A row's codes are
 * decoded into four 64-byte registers of unsigned codes (no reordering of the weights in memory).
 * The activations come as pe_act_q8_quantize wrote them once per token: the combined digit
 * 254 q + ql = 256 h + l in base 256 (int8 h and l: x->xh, x->xl, in the 32-blocks' order, see
 * quants.h), loaded once per step into four registers per digit, as stored (32-blocks) or put in
 * the decode's element order with one lane shuffle per register (K-quants: act_nat, act_k45), so
 * that vpdpbusd against h, a shift by 8 and vpdpbusd against l accumulated on top leave exact
 * partial sums of w . (254 q + ql), 4 per 128-bit lane, each lane within one scale's sub-block.
 * Even with the matrix in L2 one core runs these kernels at 10-23 GB/s of weights, not above the ~22
 * GB/s per core that memory delivers to two: instructions per weight byte are what to cut
 * (docs/quants.md, "Measured speed"). Hence two shapes:
 *
 * - Sub-blocks of 16 (Q3_K, Q6_K), "a row per register": each 128-bit lane of the four
 *   registers is one sub-block; one transpose-add (fold4) turns them into the row's 16 sub-block
 *   sums, scaled per lane with the activations' per-16 sums s16x.
 * - Q2_K, "a sub-block per int32": int32 s of each of the four registers holds 4 codes of sub-block
 *   s (the codes by one vpermd per register, the activations transposed to match once per step,
 *   act_t), so all four accumulate into one register that ends as the 16 sub-block sums: no fold,
 *   one shift instead of four. The 2-bit fields stay in place (4^j q, shifted back exactly), the
 *   4-bit scales and minimums are applied in int32 (vpmulld, m * S with the exact sub-block sums
 *   S of s16x), sub-blocks summed to blocks, and one conversion and one FMA per row and step scale
 *   the 8 block sums and 8 minimum terms with d, -dmin and d_x.
 * - Units of 32 (Q4_K/Q5_K sub-blocks, the 32-blocks), "rows in pairs": the codes are arranged so
 *   that registers 0/1 and 2/3 hold the same units lane by lane (Q4_K/Q5_K: qs regrouped by 128-bit
 *   lanes with vshufi64x2, the activations transposed to match; 32-blocks: the two half-blocks), so
 *   both registers of a pair accumulate into one int32 register (one shift per two registers), a row
 *   ends a step with two registers, and one fold4 gives the 8 unit sums of two rows (lane 4L + i:
 *   row i / 2), scaled in one float register with the per-32 sums s32x. Each row's eight lanes are
 *   summed at the end in unit order whatever its slot in the pair.
 *
 * Several tokens (a decode step of 2-8 sequences, pe_dot_q8_tok_fn): a step's row (pair) is decoded
 * once, then its sums taken for every token with that token's activations, scales and accumulators
 * (in memory for a variable count); the one-token entry is the same code with n_tok = 1, a
 * constant, so a token's bits are the one-token kernel's. In a 4-sequence decode step of the
 * Q4_K_M-style 20b file q|k|v (Q5_0/Q8_0) went from 28-31 to 20-22 ms and attn_out (Q4_K) from
 * 17-19 to 13-16 ms (bench/batch_decode.py --profile, two runs each way). Not Q2_K: its decode is 4
 * permutes and masks, nothing worth sharing, and with a variable count its transposed activations
 * leave the registers (0.8x of one-token calls per token).
 *
 * Per lane:
 *     acc += (sum - offset * s) * (d_w * scale) * d_x / 254  -  min_w * (d_x / 254 * s)
 * where s is the activation unit's combined code sum 254 * sum(q) + sum(ql) and d_x its 32-block's
 * scale. Integer sums are exact; a row's result depends only on its own bytes (rows past nr repeat
 * the last one and are not stored), so any grouping gives the same bits. Codes are used in place
 * where no extra bit follows (Q4_K high nibbles: v & 0xf0 = 16 q; Q2_K 2-bit fields: v & 3 << 2j =
 * 4^j q), the power of two folded into the per-step activation scales (Q4_K) or the row's scales
 * (Q2_K), exactly.
 *
 * K-quants decode a row's super-block with plain loads, masks and 16-bit shifts (5th/6th/3rd bits by
 * vptestmb or shifted ORs), the scales with pshufb (Q3_K/Q4_K/Q5_K: a row pair in one ymm)
 * (AVX-512 F/BW/VL + VNNI). The 32-blocks pick the code, qh and header bytes of four blocks out of
 * two (masked) 64-byte loads with vpermt2b (VBMI), Q5_0/Q5_1 their 5th bits with vpshufbitqmb
 * (BITALG) from one qh permutation that also carries the header words; full steps use constant
 * masks, the last step of a row masks the missing blocks (weights and activations both, nothing is
 * read past a row or past the activation padding).
 * Measured single-thread in L2 against a row per register for every type (thread CPU time, under
 * load): rows in pairs 1.15-1.35x faster (Q4_K, Q5_K, Q4_1, Q5_0, Q5_1). Tried and dropped: decoding
 * four rows' Q4_K/Q5_K headers at once (a lane per row, or with vpermb into the pairs' lanes), 2-5%
 * slower in cache than per pair. A prefetch distance of 2 or 3 groups instead of 1 made no
 * difference single-thread from memory, but 1.02-1.10x with two threads (PE_DOT_PF_GROUPS).
 * Reading xh/xl instead of rewriting the digits qs/ql into base 256 in every step (~44 instructions per 8-row step, now 0-8 shuffles): Q4_1 1.11x, Q4_K 1.10x, Q5_K
 * 1.08x, Q5_0/Q5_1 1.06x, Q2_K/Q3_K 1.03x, Q6_K 1.02x in cache, the same bits. Tried and dropped:
 * Q2_K/Q3_K codes decoded in the stored order (a 2-bit field per lane, no activation shuffle, lanes
 * permuted back before the row sum): the same bits and no measurable difference.
 * Q2_K, measured single-thread in L2 as above (3072 x 64 rows, under load): a sub-block per int32
 * 11.1 GB/s against 10.5 for a row per register with float scales (1.06x); with the scale and
 * minimum work left out entirely the same loop runs at 16.1 (a row per register: 14.6), so the
 * two-digit vpdpbusd, the code decode and the shuffles already take ~18 cycles per 84-byte row
 * step on this core (Zen 4: vpdpbusd, vpmulld, vpmaddwd, FMA share one 512-bit pipe pair and the
 * shuffles half of it). Tried and dropped: Q2_K/Q3_K sub-block sums packed as 65536 (w . xh) +
 * (w . xl) and scaled with one vpmaddwd against (s, 256 s) after the fold, rows in pairs for the
 * float work (0.90x: the codes must then be <= 7, extracted with shifts, and the shift port is the
 * one the digit shifts use); Q3_K in the sub-block-per-int32 layout (0.97x: its 3rd bit costs a
 * second vpermd and a test per register); d and dmin of the eight rows converted once per step
 * (0.94x). */
#include "quants_impl.h"

#include "cpu_features.h"

#include <immintrin.h>
#include <pthread.h>
#include <string.h>

#define PE_AI static inline __attribute__((always_inline))

/* 4 registers (i) x 4 lanes (L) x 4 int32 -> lane 4L + i: the sum of lane L of register i. */
PE_AI __m512i fold4(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    const __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    const __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
}

/* The row's 16 sub-block sums of w . (254 q + ql) (fold4 order), codes u against the base-256
 * digits xh, xl of the activations (exact: |256 (w . h)| <= 256 * 4 * 255 * 128 per lane). */
PE_AI __m512i dot2(const __m512i u[4], const __m512i xh[4], const __m512i xl[4]) {
    const __m512i z = _mm512_setzero_si512();
    __m512i c[4];
    for (int i = 0; i < 4; i++)
        c[i] = _mm512_dpbusd_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(z, u[i], xh[i]), 8), u[i], xl[i]);
    return fold4(c[0], c[1], c[2], c[3]);
}

/* Prefetch this step's share (bytes [from, from + len)) of a later group into L2. */
PE_AI void prefetch_next(const uint8_t *from, int64_t len) {
    for (int64_t p = 0; p < len; p += 64) _mm_prefetch((const char *)from + p, _MM_HINT_T1);
}

/* Pull a row's block two steps ahead (bytes [p + 2 len, p + 3 len)) into L1: the group prefetch
 * above only reaches L2, and streaming from memory the kernels stalled on L2 -> L1 (single thread,
 * 64-256 MiB of rows, under load, two or more runs each: Q6_K 1.07-1.48x, Q3_K 1.05-1.24x, Q5_1
 * 1.31-1.37x, Q5_0 1.18x, Q4_K 1.06-1.26x, Q4_1 1.01-1.34x, Q5_K 1.00-1.09x; Q2_K's per-int32
 * kernel went from 0.9x to 1.03-1.09x of the old one; in L2 the same speed). A last step's
 * prefetch may reach past the row: prefetches do not fault. */
PE_AI void prefetch_row(const uint8_t *p, int len) {
    for (int b = 0; b < len; b += 64) _mm_prefetch((const char *)p + 2 * len + b, _MM_HINT_T0);
}

PE_AI float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

PE_AI __m512i bcast32(const uint8_t *p) { return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p)); }
PE_AI __m512i rep8(int v) { return _mm512_set1_epi8((char)v); }
/* 64 bytes: v0 in bytes 0-31, v1 in 32-63 */
PE_AI __m512i halves8(int v0, int v1) {
    return _mm512_inserti64x4(_mm512_set1_epi8((char)v0), _mm256_set1_epi8((char)v1), 1);
}
/* 32 words: v0 in words 0-15, v1 in 16-31 */
PE_AI __m512i halves16(int v0, int v1) {
    return _mm512_inserti64x4(_mm512_set1_epi16((short)v0), _mm256_set1_epi16((short)v1), 1);
}
/* 16 bytes -> 16 floats */
PE_AI __m512 u8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }
PE_AI __m512 i8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }

/* Fold lane 4L + i -> sub-block (16 elements) of the step that register i's lane L holds.
 * NAT: register i = elements 64i..64i+63 (Q2_K, Q3_K, Q6_K). */
static const uint8_t SUB_NAT[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
/* One decoded row step: unsigned codes and per-lane scale (d_w * sc). */
typedef struct {
    __m512i u[4];
    __m512 a;
} row_step;

enum { K_Q2 = 0, K_Q3, K_Q4, K_Q5, K_Q6 };

static const int K_BLOCK[5] = {84, 110, 144, 176, 210};
static const float K_OFFSET[5] = {0.0f, 4.0f, 0.0f, 0.0f, 32.0f};

PE_AI __m128i sub_nat_idx(void) { return _mm_loadu_si128((const __m128i *)SUB_NAT); }

/* Q3_K's scales of a row pair (blocks at pa, pb): both rows' 12 scale bytes in one ymm (4% faster
 * than per row in cache, the same bits). */
PE_AI void k3_pair_scales(const uint8_t *pa, const uint8_t *pb, __m512 *aa, __m512 *ab) {
    /* 12 scale bytes at p + 96 (masked: the block ends at 110) */
    const __m256i h = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_maskz_loadu_epi8(0x0fff, pa + 96)),
                                              _mm_maskz_loadu_epi8(0x0fff, pb + 96), 1);
    const __m256i idx = _mm256_broadcastsi128_si256(_mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i lo = _mm256_and_si256(_mm256_mask_blend_epi8(0xff00ff00u, _mm256_shuffle_epi8(h, idx),
                                                                _mm256_shuffle_epi8(_mm256_srli_epi16(h, 4), idx)),
                                        _mm256_set1_epi8(15));
    const __m256i b = _mm256_and_si256(
        _mm256_shuffle_epi8(h, _mm256_broadcastsi128_si256(_mm_setr_epi8(8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11))),
        _mm256_broadcastsi128_si256(_mm_setr_epi8(3, 3, 3, 3, 12, 12, 12, 12, 48, 48, 48, 48, -64, -64, -64, -64)));
    const __m256i hi = _mm256_srlv_epi16(_mm256_sllv_epi16(b, _mm256_broadcastsi128_si256(_mm_setr_epi16(4, 4, 2, 2, 0, 0, 0, 0))),
                                         _mm256_broadcastsi128_si256(_mm_setr_epi16(0, 0, 0, 0, 0, 0, 2, 2)));
    /* 0..63 = scale + 32, to the fold order, minus 32 */
    const __m256i sc = _mm256_sub_epi8(_mm256_shuffle_epi8(_mm256_or_si256(lo, hi), _mm256_broadcastsi128_si256(sub_nat_idx())),
                                       _mm256_set1_epi8(32));
    *aa = _mm512_mul_ps(i8_to_ps(_mm256_castsi256_si128(sc)), _mm512_set1_ps(f16(pa + 108)));
    *ab = _mm512_mul_ps(i8_to_ps(_mm256_extracti128_si256(sc, 1)), _mm512_set1_ps(f16(pb + 108)));
}

/* A row's codes and scales (Q3_K: codes only, its scales come in pairs from k3_pair_scales); Q2_K
 * has its own kernel (dot_q8_k2). */
PE_AI void decode_k(const int T, const uint8_t *p, row_step *s) {
    const __m512i m0f = rep8(0x0f);
    if (T == K_Q6) {
        for (int h = 0; h < 2; h++) {
            const __m512i ql = _mm512_loadu_si512(p + 64 * h);
            const __m512i qh = bcast32(p + 128 + 32 * h);
            const __m512i hl = _mm512_sllv_epi16(_mm512_and_si512(qh, halves8(0x03, 0x0c)), halves16(4, 2));
            const __m512i hh = _mm512_srlv_epi16(_mm512_and_si512(qh, halves8(0x30, 0xc0)), halves16(0, 2));
            s->u[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, m0f), hl);
            s->u[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m0f), hh);
        }
        const __m128i sc = _mm_loadu_si128((const __m128i *)(p + 192));
        s->a = _mm512_mul_ps(i8_to_ps(_mm_shuffle_epi8(sc, sub_nat_idx())), _mm512_set1_ps(f16(p + 208)));
    } else if (T == K_Q3) {
        const uint8_t *qs = p + 32;
        const __m512i m03 = rep8(3);
        const __m512i hm = bcast32(p);
        for (int h = 0; h < 2; h++) {
            const __m512i q = bcast32(qs + 32 * h);
            __m512i u0 = _mm512_and_si512(_mm512_srlv_epi16(q, halves16(0, 2)), m03);
            __m512i u1 = _mm512_and_si512(_mm512_srlv_epi16(q, halves16(4, 6)), m03);
            const int b = 1 << (4 * h);
            u0 = _mm512_mask_add_epi8(u0, _mm512_test_epi8_mask(hm, halves8(b, b << 1)), u0, rep8(4));
            u1 = _mm512_mask_add_epi8(u1, _mm512_test_epi8_mask(hm, halves8(b << 2, b << 3)), u1, rep8(4));
            s->u[2 * h] = u0;
            s->u[2 * h + 1] = u1;
        }
    }
}

/* One base-256 digit array (x->xh or x->xl) of super-block sb in natural order, register i =
 * elements 64 i .. 64 i + 63: of the stored registers (quants.h: 128-bit lanes of elements 32 k
 * (S0, S2) or 32 k + 16 (S1, S3) of each 128), the 16-byte runs interleaved, one vpermt2q each. */
PE_AI void act_nat(const int8_t *digits, int64_t sb, __m512i v[4]) {
    const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    for (int c = 0; c < 2; c++) {
        const __m512i s0 = _mm512_loadu_si512(digits + 256 * sb + 128 * c);
        const __m512i s1 = _mm512_loadu_si512(digits + 256 * sb + 128 * c + 64);
        v[2 * c] = _mm512_permutex2var_epi64(s0, lo, s1);
        v[2 * c + 1] = _mm512_permutex2var_epi64(s0, hi, s1);
    }
}

PE_AI void dot_q8_k(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, const int n_tok, int64_t n,
                    float *out, int64_t ldo, const int T) {
    const int BLOCK = K_BLOCK[T];
    const uint8_t *r[8];
    for (int i = 0; i < 8; i++) r[i] = rows + (i < nr ? i : nr - 1) * stride;
    const __m512i sub = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)SUB_NAT));
    const __m512i sub32 = _mm512_srli_epi32(sub, 1);
    const __m512i voff = _mm512_set1_epi32((int)K_OFFSET[T]);
    const __m512 inv254 = _mm512_set1_ps(1.0f / 254.0f);
    const uint8_t *next = rows + PE_DOT_PF_GROUPS * 8 * stride;
    const int64_t nsb = n / 256;
    __m512 acc[PE_DOT_Q8_MAX_TOK][8];
    for (int tk = 0; tk < n_tok; tk++)
        for (int i = 0; i < 8; i++) acc[tk][i] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const int64_t o = sb * BLOCK;
        __m512i xh[PE_DOT_Q8_MAX_TOK][4], xl[PE_DOT_Q8_MAX_TOK][4], offs[PE_DOT_Q8_MAX_TOK];
        __m512 dx[PE_DOT_Q8_MAX_TOK];
        for (int tk = 0; tk < n_tok; tk++) {
            act_nat(x[tk].xh, sb, xh[tk]);
            act_nat(x[tk].xl, sb, xl[tk]);
            /* d_x / 254 and the combined sums 254 * sum(q) + sum(ql) of each sub-block */
            dx[tk] = _mm512_mul_ps(
                _mm512_permutexvar_ps(sub32, _mm512_castps256_ps512(_mm256_loadu_ps(x[tk].d + 8 * sb))), inv254);
            const __m512 s16 = _mm512_permutexvar_ps(sub, _mm512_loadu_ps(x[tk].s16x + 16 * sb));
            /* offset * s16x in int32, exact (|s16x| <= 16 * 127 * 255) */
            offs[tk] = _mm512_mullo_epi32(_mm512_cvtps_epi32(s16), voff);
        }
        prefetch_next(next + 8 * o, 8 * BLOCK);
        for (int p = 0; p < 4; p++) {
            row_step s[2];
            for (int k = 0; k < 2; k++) {
                prefetch_row(r[2 * p + k] + o, BLOCK);
                decode_k(T, r[2 * p + k] + o, &s[k]);
            }
            if (T == K_Q3) k3_pair_scales(r[2 * p] + o, r[2 * p + 1] + o, &s[0].a, &s[1].a);
            for (int tk = 0; tk < n_tok; tk++)
                for (int k = 0; k < 2; k++) {
                    const int i = 2 * p + k;
                    __m512i f = dot2(s[k].u, xh[tk], xl[tk]);
                    if (K_OFFSET[T] != 0.0f) f = _mm512_sub_epi32(f, offs[tk]);
                    const __m512 t = _mm512_cvtepi32_ps(f);
                    acc[tk][i] = _mm512_fmadd_ps(t, _mm512_mul_ps(s[k].a, dx[tk]), acc[tk][i]);
                }
        }
    }
    for (int tk = 0; tk < n_tok; tk++)
        for (int i = 0; i < nr; i++) out[tk * ldo + i] = _mm512_reduce_add_ps(acc[tk][i]);
}

/* ---- Q2_K: a sub-block per int32 ---------------------------------------------------------- */

/* One digit array of super-block sb "transposed": register r, int32 s = elements 16 s + 4 r .. + 3
 * (sub-block s). As stored (quants.h), register 2 h + e, lane k holds elements 128 h + 32 k + 16 e
 * .. + 15, so int32 s = 8 h + 2 k + e of register r is int32 4 k + r of that lane: a vpermt2d of the
 * two registers of each half, the halves blended. */
PE_AI void act_t(const int8_t *digits, int64_t sb, __m512i t[4]) {
    const int8_t *p = digits + 256 * sb;
    const __m512i s0 = _mm512_loadu_si512(p), s1 = _mm512_loadu_si512(p + 64);
    const __m512i s2 = _mm512_loadu_si512(p + 128), s3 = _mm512_loadu_si512(p + 192);
    /* int32 s = 4 L + c: 16 e + 4 k + r with e = c % 2, k = 2 (L % 2) + c / 2 */
    const __m512i i0 = _mm512_setr_epi32(0, 16, 4, 20, 8, 24, 12, 28, 0, 16, 4, 20, 8, 24, 12, 28);
    for (int r = 0; r < 4; r++) {
        const __m512i idx = _mm512_add_epi32(i0, _mm512_set1_epi32(r));
        t[r] = _mm512_mask_blend_epi32(0xff00, _mm512_permutex2var_epi32(s0, idx, s1),
                                       _mm512_permutex2var_epi32(s2, idx, s3));
    }
}

/* The two f16 at p (Q2_K's d, dmin) in lanes 0-7 and 8-15. */
PE_AI __m512 f16_halves(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(v))));
}

/* Q2_K, a row per step: register r, int32 s holds the codes of elements 16 s + 4 r .. + 3 (qs int32
 * 8 (s / 8) + 4 (s % 2) + r, one vpermd; field j = (s % 8) / 2 kept in place, 4^j q), so that all
 * four registers accumulate into one: int32 s ends as the sub-block sum 4^j (q . X), no fold
 * (|4^j q . X| <= 16 * 192 * 32896 + ... < 2^27). Shifted back exactly, times sc, and m * S, in
 * int32 (<= 15 * 16 * 3 * 32896 and 15 * 16 * 32896); the 16 sub-blocks summed to 8 blocks (lanes
 * 0-7, the minimum terms in 8-15) and scaled with d (-dmin) * d_x / 254 in one FMA. */
PE_AI __m512 q2_row(const uint8_t *p, const __m512i th[4], const __m512i tl[4], __m512i S, __m512 dx2, __m512 acc) {
    prefetch_row(p, 84);
    const __m512i z = _mm512_loadu_si512(p + 16);
    const __m512i fm = _mm512_setr_epi32(0x03030303, 0x03030303, 0x0c0c0c0c, 0x0c0c0c0c, 0x30303030, 0x30303030,
                                         (int)0xc0c0c0c0, (int)0xc0c0c0c0, 0x03030303, 0x03030303, 0x0c0c0c0c,
                                         0x0c0c0c0c, 0x30303030, 0x30303030, (int)0xc0c0c0c0, (int)0xc0c0c0c0);
    __m512i c[4];
    for (int r = 0; r < 4; r++)
        c[r] = _mm512_and_si512(
            _mm512_permutexvar_epi32(_mm512_setr_epi32(r, 4 + r, r, 4 + r, r, 4 + r, r, 4 + r, 8 + r, 12 + r, 8 + r,
                                                       12 + r, 8 + r, 12 + r, 8 + r, 12 + r), z), fm);
    __m512i f = _mm512_setzero_si512();
    for (int r = 0; r < 4; r++) f = _mm512_dpbusd_epi32(f, c[r], th[r]);
    f = _mm512_slli_epi32(f, 8);
    for (int r = 0; r < 4; r++) f = _mm512_dpbusd_epi32(f, c[r], tl[r]);
    f = _mm512_srav_epi32(f, _mm512_setr_epi32(0, 0, 2, 2, 4, 4, 6, 6, 0, 0, 2, 2, 4, 4, 6, 6));
    const __m512i sm = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    const __m512i F = _mm512_mullo_epi32(f, _mm512_and_si512(sm, _mm512_set1_epi32(15)));
    const __m512i M = _mm512_mullo_epi32(S, _mm512_srli_epi32(sm, 4));
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i r = _mm512_add_epi32(_mm512_permutex2var_epi32(F, ie, M),
                                       _mm512_permutex2var_epi32(F, _mm512_add_epi32(ie, _mm512_set1_epi32(1)), M));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(r), _mm512_mul_ps(f16_halves(p + 80), dx2), acc);
}

PE_AI void dot_q8_k2(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, int64_t n, float *out) {
    const int BLOCK = K_BLOCK[K_Q2];
    const uint8_t *r[8];
    for (int i = 0; i < 8; i++) r[i] = rows + (i < nr ? i : nr - 1) * stride;
    const uint8_t *next = rows + PE_DOT_PF_GROUPS * 8 * stride;
    const int64_t nsb = n / 256;
    __m512 acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const int64_t o = sb * BLOCK;
        __m512i th[4], tl[4];
        act_t(x->xh, sb, th);
        act_t(x->xl, sb, tl);
        /* the sub-blocks' S = sum X (exact in s16x); d_x / 254 of block b in lanes b and (negated,
         * for the minimum terms) 8 + b */
        const __m512i S = _mm512_cvtps_epi32(_mm512_loadu_ps(x->s16x + 16 * sb));
        const float c = 1.0f / 254.0f;
        const __m512 dx2 = _mm512_mul_ps(
            _mm512_permutexvar_ps(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7),
                                  _mm512_castps256_ps512(_mm256_loadu_ps(x->d + 8 * sb))),
            _mm512_setr_ps(c, c, c, c, c, c, c, c, -c, -c, -c, -c, -c, -c, -c, -c));
        prefetch_next(next + 8 * o, 8 * BLOCK);
        for (int i = 0; i < 8; i++) acc[i] = q2_row(r[i] + o, th, tl, S, dx2, acc[i]);
    }
    for (int i = 0; i < nr; i++) out[i] = _mm512_reduce_add_ps(acc[i]);
}

/* ---- Q4_K / Q5_K: sub-blocks of 32, rows in pairs ----------------------------------------- */

/* w . (254 q + ql) of the two registers u0, u1 whose lanes are the same sub-blocks: lane L of the
 * result holds 4 partial sums of that sub-block (|sum| <= 2 * 256 * 4 * 255 * 128 per int32). */
PE_AI __m512i dot_pair(__m512i u0, __m512i u1, __m512i h0, __m512i h1, __m512i l0, __m512i l1) {
    const __m512i c = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u0, h0), u1, h1);
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(c, 8), u0, l0), u1, l1);
}

/* Row s (0, 1) of a pair accumulator, its eight lanes idx[0..8) (in sub-block or block order,
 * whatever the slot), summed in one fixed order: a row's bits do not depend on its place. */
PE_AI float pair_row(__m512 acc, __m512i idx) { return _mm512_reduce_add_ps(_mm512_maskz_permutexvar_ps(0x00ff, idx, acc)); }

/* Q4_K/Q5_K: a row's codes, register k's lane L = elements 64 L + 16 k .. + 15 (sub-block 2L for
 * k < 2, 2L + 1 for k >= 2): the two 64-byte halves of qs regrouped by 128-bit lanes, the chunk's
 * first 16 bytes (k even) or last 16 (k odd). Q4_K's high nibbles stay in place (16 q). */
PE_AI void decode_k45(const int T, const uint8_t *p, __m512i u[4]) {
    const __m512i m0f = rep8(0x0f);
    const uint8_t *qs = p + (T == K_Q5 ? 48 : 16);
    const __m512i v0 = _mm512_loadu_si512(qs), v1 = _mm512_loadu_si512(qs + 64);
    const __m512i w0 = _mm512_shuffle_i64x2(v0, v1, _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i w1 = _mm512_shuffle_i64x2(v0, v1, _MM_SHUFFLE(3, 1, 3, 1));
    u[0] = _mm512_and_si512(w0, m0f);
    u[1] = _mm512_and_si512(w1, m0f);
    if (T == K_Q4) {
        u[2] = _mm512_andnot_si512(m0f, w0);
        u[3] = _mm512_andnot_si512(m0f, w1);
    } else {
        u[2] = _mm512_and_si512(_mm512_srli_epi16(w0, 4), m0f);
        u[3] = _mm512_and_si512(_mm512_srli_epi16(w1, 4), m0f);
        /* 5th bit of element 64 L + 32 h + j: bit 2L + h of qh[j], qh[0..16) (b0) or qh[16..32) (b1)
         * repeated per 128-bit lane */
        const __m512i b0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(p + 16)));
        const __m512i b1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(p + 32)));
        const __m512i c = _mm512_setr_epi32(0x01010101, 0x01010101, 0x01010101, 0x01010101, 0x04040404, 0x04040404,
                                            0x04040404, 0x04040404, 0x10101010, 0x10101010, 0x10101010, 0x10101010,
                                            0x40404040, 0x40404040, 0x40404040, 0x40404040);
        const __m512i c1 = _mm512_add_epi8(c, c), s16 = rep8(16);
        u[0] = _mm512_mask_add_epi8(u[0], _mm512_test_epi8_mask(b0, c), u[0], s16);
        u[1] = _mm512_mask_add_epi8(u[1], _mm512_test_epi8_mask(b1, c), u[1], s16);
        u[2] = _mm512_mask_add_epi8(u[2], _mm512_test_epi8_mask(b0, c1), u[2], s16);
        u[3] = _mm512_mask_add_epi8(u[3], _mm512_test_epi8_mask(b1, c1), u[3], s16);
    }
}

/* The scales of a row pair (headers at pa, pb), in the pair's fold lanes 4L + i (row i / 2,
 * sub-block 2L + i % 2): a = d * sc, m = dmin * m. */
PE_AI void k45_pair_scales(const uint8_t *pa, const uint8_t *pb, __m512 *a, __m512 *m) {
    const __m256i h = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)pa)),
                                              _mm_loadu_si128((const __m128i *)pb), 1);
    /* sc0..7 in bytes 0-7, m0..7 in 8-15 of each 128-bit lane, as pe_k_scale_min; s[k] at byte 4 + k */
    const __m256i p = _mm256_shuffle_epi8(h, _mm256_setr_epi8(4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15,
                                                              4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m256i p4 = _mm256_shuffle_epi8(_mm256_srli_epi16(h, 4),
                                           _mm256_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 12, 13, 14, 15,
                                                            -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 12, 13, 14, 15));
    const __m256i p2 = _mm256_shuffle_epi8(_mm256_srli_epi16(h, 2),
                                           _mm256_setr_epi8(-1, -1, -1, -1, 4, 5, 6, 7, -1, -1, -1, -1, 8, 9, 10, 11,
                                                            -1, -1, -1, -1, 4, 5, 6, 7, -1, -1, -1, -1, 8, 9, 10, 11));
    const __m256i lo = _mm256_or_si256(
        _mm256_and_si256(p, _mm256_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0,
                                             63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0)),
        _mm256_and_si256(p4, _mm256_set1_epi8(15)));
    const __m256i scm = _mm256_or_si256(lo, _mm256_and_si256(p2, _mm256_set1_epi8(0x30)));
    /* byte 4L + i: row i / 2's scale (min) of sub-block 2L + i % 2 */
    const __m128i sa = _mm256_castsi256_si128(scm), sb = _mm256_extracti128_si256(scm, 1);
    const __m512 sc = u8_to_ps(_mm_unpacklo_epi16(sa, sb)), mn = u8_to_ps(_mm_unpackhi_epi16(sa, sb));
    /* d, dmin of both rows (words 0, 1, 8, 9) */
    const __m512 dd = _mm512_castps128_ps512(
        _mm_cvtph_ps(_mm256_castsi256_si128(_mm256_permutexvar_epi16(_mm256_setr_epi16(0, 1, 8, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), h))));
    const __m512i row = _mm512_setr_epi32(0, 0, 2, 2, 0, 0, 2, 2, 0, 0, 2, 2, 0, 0, 2, 2);
    *a = _mm512_mul_ps(sc, _mm512_permutexvar_ps(row, dd));
    *m = _mm512_mul_ps(mn, _mm512_permutexvar_ps(_mm512_add_epi32(row, _mm512_set1_epi32(1)), dd));
}

/* One base-256 digit array of super-block sb in decode_k45's order (register k, lane L = elements
 * 64 L + 16 k .. + 15): lanes 0 and 2 (k even) or 1 and 3 (k odd) of the stored registers S0, S2
 * (k < 2) or S1, S3 (see act_nat), one vshufi64x2 each. */
PE_AI void act_k45(const int8_t *digits, int64_t sb, __m512i v[4]) {
    const int8_t *p = digits + 256 * sb;
    const __m512i s0 = _mm512_loadu_si512(p), s1 = _mm512_loadu_si512(p + 64);
    const __m512i s2 = _mm512_loadu_si512(p + 128), s3 = _mm512_loadu_si512(p + 192);
    v[0] = _mm512_shuffle_i64x2(s0, s2, _MM_SHUFFLE(2, 0, 2, 0));
    v[1] = _mm512_shuffle_i64x2(s1, s3, _MM_SHUFFLE(2, 0, 2, 0));
    v[2] = _mm512_shuffle_i64x2(s0, s2, _MM_SHUFFLE(3, 1, 3, 1));
    v[3] = _mm512_shuffle_i64x2(s1, s3, _MM_SHUFFLE(3, 1, 3, 1));
}

/* Rows' results from a pair accumulator per token (out + tk * ldo), lanes idx(s) of row slot s. */
#define STORE_PAIRS(acc, n_tok, nr, out, ldo, IDX)                                                            \
    for (int tk = 0; tk < (n_tok); tk++)                                                                     \
        for (int i = 0; i < (nr); i++) {                                                                     \
            const int s = 2 * (i % 2);                                                                       \
            (out)[tk * (ldo) + i] = pair_row((acc)[tk][i / 2], IDX);                                         \
        }

PE_AI void dot_q8_k45(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, const int n_tok, int64_t n,
                      float *out, int64_t ldo, const int T) {
    const int BLOCK = K_BLOCK[T];
    const uint8_t *r[8];
    for (int i = 0; i < 8; i++) r[i] = rows + (i < nr ? i : nr - 1) * stride;
    /* lane 4L + i holds sub-block 2L + i % 2 */
    const __m512i lane_sub = _mm512_setr_epi32(0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7, 6, 7);
    const __m512 inv254 = _mm512_set1_ps(1.0f / 254.0f);
    /* Q4_K: the high-nibble registers (odd i) hold 16 q */
    const __m512 pw = T == K_Q4 ? _mm512_setr_ps(1, 0.0625f, 1, 0.0625f, 1, 0.0625f, 1, 0.0625f, 1, 0.0625f, 1, 0.0625f,
                                                 1, 0.0625f, 1, 0.0625f)
                                : _mm512_set1_ps(1.0f);
    const uint8_t *next = rows + PE_DOT_PF_GROUPS * 8 * stride;
    const int64_t nsb = n / 256;
    __m512 acc[PE_DOT_Q8_MAX_TOK][4];
    for (int tk = 0; tk < n_tok; tk++)
        for (int i = 0; i < 4; i++) acc[tk][i] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const int64_t o = sb * BLOCK;
        __m512i xh[PE_DOT_Q8_MAX_TOK][4], xl[PE_DOT_Q8_MAX_TOK][4];
        __m512 dxs[PE_DOT_Q8_MAX_TOK], dxa[PE_DOT_Q8_MAX_TOK];
        for (int tk = 0; tk < n_tok; tk++) {
            act_k45(x[tk].xh, sb, xh[tk]);
            act_k45(x[tk].xl, sb, xl[tk]);
            const __m512 dx = _mm512_mul_ps(
                _mm512_permutexvar_ps(lane_sub, _mm512_castps256_ps512(_mm256_loadu_ps(x[tk].d + 8 * sb))), inv254);
            dxs[tk] = _mm512_mul_ps(dx, _mm512_permutexvar_ps(lane_sub, _mm512_castps256_ps512(_mm256_loadu_ps(x[tk].s32x + 8 * sb))));
            dxa[tk] = _mm512_mul_ps(dx, pw);
        }
        prefetch_next(next + 8 * o, 8 * BLOCK);
        for (int p = 0; p < 4; p++) {
            __m512i ua[4], ub[4];
            prefetch_row(r[2 * p] + o, BLOCK);
            prefetch_row(r[2 * p + 1] + o, BLOCK);
            decode_k45(T, r[2 * p] + o, ua);
            decode_k45(T, r[2 * p + 1] + o, ub);
            __m512 a, m;
            k45_pair_scales(r[2 * p] + o, r[2 * p + 1] + o, &a, &m);
            for (int tk = 0; tk < n_tok; tk++) {
                const __m512i *h = xh[tk], *l = xl[tk];
                const __m512i f = fold4(dot_pair(ua[0], ua[1], h[0], h[1], l[0], l[1]),
                                        dot_pair(ua[2], ua[3], h[2], h[3], l[2], l[3]),
                                        dot_pair(ub[0], ub[1], h[0], h[1], l[0], l[1]),
                                        dot_pair(ub[2], ub[3], h[2], h[3], l[2], l[3]));
                acc[tk][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(f), _mm512_mul_ps(a, dxa[tk]), acc[tk][p]);
                acc[tk][p] = _mm512_fnmadd_ps(m, dxs[tk], acc[tk][p]);
            }
        }
    }
    STORE_PAIRS(acc, n_tok, nr, out, ldo,
                _mm512_setr_epi32(s, s + 1, s + 4, s + 5, s + 8, s + 9, s + 12, s + 13, 0, 0, 0, 0, 0, 0, 0, 0));
}

/* ---- 32-blocks with a minimum or a 5th bit: eight blocks per step, rows in pairs --------------- */

enum { B_Q4_1 = 0, B_Q5_0, B_Q5_1 };
static const int B_BLOCK[3] = {20, 22, 24};
static const int B_QH[3] = {0, 2, 4};  /* qh offset (Q5 types) */
static const int B_QS[3] = {4, 6, 8};
static const int B_OFFSET[3] = {0, 16, 0};
static const int B_HASMIN[3] = {1, 0, 1};

/* Bytes of [p, p + valid) (valid clamped to 0..64), zero elsewhere; never reads past valid. */
PE_AI __m512i loadm(const uint8_t *p, int64_t valid) {
    const __mmask64 m = valid >= 64 ? ~(__mmask64)0 : valid <= 0 ? 0 : (((__mmask64)1 << valid) - 1);
    return _mm512_maskz_loadu_epi8(m, p);
}

/* Index into the pair (A = p[0..64), B = p[32..96)) of the byte at offset off < 96. */
static inline int pair_pos(int off) { return off < 64 ? off : 64 + off - 32; }

typedef struct {
    __m512i qs;         /* vpermt2b: the codes of four blocks, block per lane */
    __m512i qh;         /* vpermt2b (Q5): qh of block L in qwords 2L and 2L+1 (bytes 0-3), the
                         * header word d(L) (qword L) or m(L) (qword 4 + L) in bytes 4-5 */
    __m512i hdr;        /* vpermt2w over the two groups' qh (Q5) or first windows (Q4_1): the words
                         * d(0..3) m(0..3) d(4..7) m(4..7) of the step's eight blocks */
    __m512i blo, bhi;   /* vpshufbitqmb: byte 16L + j of a register selects bit j (low half-block)
                         * or 16 + j (high) of its qword 2L + j/8, i.e. of qh(L) */
    __m512i a_idx, m_idx; /* the float lanes of d and m of a row pair (see b_step) */
} b_tables;

/* Built once per process when a kernel is first chosen (ready()), for the types the CPU can run,
 * instead of on the stack by every call (~5% of a call at n = 2880). */
static b_tables B_TABLES[3];

static void b_tables_init(const int T, b_tables *t) {
    const int BLOCK = B_BLOCK[T];
    uint8_t qs[64], qh[64], blo[64], bhi[64];
    uint16_t hdr[32];
    for (int L = 0; L < 4; L++)
        for (int j = 0; j < 16; j++) {
            qs[16 * L + j] = (uint8_t)pair_pos(BLOCK * L + B_QS[T] + j);
            blo[16 * L + j] = (uint8_t)j;
            bhi[16 * L + j] = (uint8_t)(16 + j);
        }
    for (int q = 0; q < 8; q++)
        for (int k = 0; k < 8; k++) {
            const int L = q % 4, h = T == B_Q5_1 && q >= 4 ? 2 : 0; /* d, or m (Q5_1) */
            qh[8 * q + k] = (uint8_t)pair_pos(k < 4 ? BLOCK * (q / 2) + B_QH[T] + k : BLOCK * L + h + k - 4);
        }
    memset(hdr, 0, sizeof hdr);
    for (int g = 0; g < 2; g++)
        for (int L = 0; L < 4; L++)
            for (int dm = 0; dm < 2; dm++) /* word w of the first (< 32) or second source */
                hdr[8 * g + 4 * dm + L] = (uint16_t)(32 * g + (T == B_Q4_1 ? (BLOCK * L) / 2 + dm : 4 * (4 * dm + L) + 2));
    t->qs = _mm512_loadu_si512(qs);
    t->qh = _mm512_loadu_si512(qh);
    t->hdr = _mm512_loadu_si512(hdr);
    t->blo = _mm512_loadu_si512(blo);
    t->bhi = _mm512_loadu_si512(bhi);
    /* lane 4L + i: row i / 2 of the pair, block 4 (i % 2) + L; a row's floats (b_pair) are
     * d(0..3) m(0..3) d(4..7) m(4..7) */
    int32_t ai[16], mi[16];
    for (int L = 0; L < 4; L++)
        for (int i = 0; i < 4; i++) {
            ai[4 * L + i] = 16 * (i / 2) + 8 * (i % 2) + L;
            mi[4 * L + i] = ai[4 * L + i] + 4;
        }
    t->a_idx = _mm512_loadu_si512(ai);
    t->m_idx = _mm512_loadu_si512(mi);
}

/* A row's step of eight blocks at p, nblk of them present (1..8): codes u (register 2g + h: half h
 * of blocks 4g..4g+3, block per lane) and the header words (see b_tables.hdr). */
PE_AI __m256i b_decode(const int T, const b_tables *t, const uint8_t *p, int64_t nblk, __m512i u[4]) {
    const int BLOCK = B_BLOCK[T];
    const __m512i m0f = rep8(0x0f);
    __m512i H[2];
    for (int g = 0; g < 2; g++) {
        const int64_t rem = (nblk - 4 * g) * BLOCK;
        const uint8_t *q = p + 4 * g * BLOCK;
        const __m512i A = loadm(q, rem), B = loadm(q + 32, rem - 32);
        const __m512i qs = _mm512_permutex2var_epi8(A, t->qs, B);
        const __m512i lo = _mm512_and_si512(qs, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(qs, 4), m0f);
        if (T == B_Q4_1) {
            u[2 * g] = lo;
            u[2 * g + 1] = hi;
            H[g] = A;
        } else {
            H[g] = _mm512_permutex2var_epi8(A, t->qh, B);
            u[2 * g] = _mm512_mask_add_epi8(lo, _mm512_bitshuffle_epi64_mask(H[g], t->blo), lo, rep8(16));
            u[2 * g + 1] = _mm512_mask_add_epi8(hi, _mm512_bitshuffle_epi64_mask(H[g], t->bhi), hi, rep8(16));
        }
    }
    return _mm512_castsi512_si256(_mm512_permutex2var_epi16(H[0], t->hdr, H[1]));
}

/* The 16 block sums of a row pair (lane 4L + i: row i / 2, block 4 (i % 2) + L), codes ua, ub. */
PE_AI __m512i b_sums(const __m512i ua[4], const __m512i ub[4], const __m512i xh[4], const __m512i xl[4]) {
    return fold4(dot_pair(ua[0], ua[1], xh[0], xh[1], xl[0], xl[1]), dot_pair(ua[2], ua[3], xh[2], xh[3], xl[2], xl[3]),
                 dot_pair(ub[0], ub[1], xh[0], xh[1], xl[0], xl[1]), dot_pair(ub[2], ub[3], xh[2], xh[3], xl[2], xl[3]));
}

/* One step of eight blocks (nblk present: 8 in the loop, so that every mask is a constant there) for
 * n_tok tokens: each row pair is decoded once, then its sums taken per token (per token the one-token
 * arithmetic, so the one-token bits). */
PE_AI void b_step(const int T, const b_tables *tb, const uint8_t *const r[8], const pe_act_q8 *x, const int n_tok,
                  int64_t b, const int64_t nblk, const uint8_t *next, __m512i lane_blk, __m512 acc[][4]) {
    const int BLOCK = B_BLOCK[T];
    const int64_t o = b * BLOCK;
    /* lane L of register 2g (2g + 1): the first (second) 16 elements of block 4g + L, as xh / xl
     * store them. Plain loads also in a last step: b is a multiple of 8, so the 256 bytes from 32 b
     * lie within xh's zero-padded length (n rounded up to 128, plus 128), and the missing blocks'
     * codes are zero. */
    __m512i xh[PE_DOT_Q8_MAX_TOK][4], xl[PE_DOT_Q8_MAX_TOK][4], offs[PE_DOT_Q8_MAX_TOK];
    __m512 dx[PE_DOT_Q8_MAX_TOK], dxs[PE_DOT_Q8_MAX_TOK];
    const __mmask8 bm = (__mmask8)((1u << nblk) - 1);
    for (int tk = 0; tk < n_tok; tk++) {
        for (int i = 0; i < 4; i++) {
            xh[tk][i] = _mm512_loadu_si512(x[tk].xh + 32 * b + 64 * i);
            xl[tk][i] = _mm512_loadu_si512(x[tk].xl + 32 * b + 64 * i);
        }
        /* per lane (its block): d_x / 254 and the combined sum 254 * sum(q) + sum(ql) */
        dx[tk] = _mm512_mul_ps(
            _mm512_permutexvar_ps(lane_blk, _mm512_castps256_ps512(_mm256_maskz_loadu_ps(bm, x[tk].d + b))),
            _mm512_set1_ps(1.0f / 254.0f));
        const __m512 s32 = _mm512_permutexvar_ps(lane_blk, _mm512_castps256_ps512(_mm256_maskz_loadu_ps(bm, x[tk].s32x + b)));
        dxs[tk] = _mm512_mul_ps(dx[tk], s32);
        /* offset * s32x in int32, exact (|s32x| <= 32 * 127 * 255) */
        offs[tk] = _mm512_mullo_epi32(_mm512_cvtps_epi32(s32), _mm512_set1_epi32(B_OFFSET[T]));
    }
    prefetch_next(next + 8 * o, 8 * 8 * BLOCK);
    for (int p = 0; p < 4; p++) {
        __m512i ua[4], ub[4];
        prefetch_row(r[2 * p] + o, 8 * BLOCK);
        prefetch_row(r[2 * p + 1] + o, 8 * BLOCK);
        const __m256i ha = b_decode(T, tb, r[2 * p] + o, nblk, ua);
        const __m256i hb = b_decode(T, tb, r[2 * p + 1] + o, nblk, ub);
        const __m512 fa = _mm512_cvtph_ps(ha), fb = _mm512_cvtph_ps(hb);
        const __m512 a = _mm512_permutex2var_ps(fa, tb->a_idx, fb);
        const __m512 m = _mm512_permutex2var_ps(fa, tb->m_idx, fb);
        for (int tk = 0; tk < n_tok; tk++) {
            __m512i f = b_sums(ua, ub, xh[tk], xl[tk]);
            if (B_OFFSET[T]) f = _mm512_sub_epi32(f, offs[tk]);
            acc[tk][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(f), _mm512_mul_ps(a, dx[tk]), acc[tk][p]);
            if (B_HASMIN[T]) acc[tk][p] = _mm512_fmadd_ps(m, dxs[tk], acc[tk][p]);
        }
    }
}

PE_AI void dot_q8_b(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, const int n_tok, int64_t n,
                    float *out, int64_t ldo, const int T) {
    const uint8_t *r[8];
    for (int i = 0; i < 8; i++) r[i] = rows + (i < nr ? i : nr - 1) * stride;
    const b_tables tb = B_TABLES[T];
    /* lane 4L + i holds block 4 (i % 2) + L */
    const __m512i lane_blk = _mm512_setr_epi32(0, 4, 0, 4, 1, 5, 1, 5, 2, 6, 2, 6, 3, 7, 3, 7);
    const uint8_t *next = rows + PE_DOT_PF_GROUPS * 8 * stride;
    const int64_t nb = n / 32;
    __m512 acc[PE_DOT_Q8_MAX_TOK][4];
    for (int tk = 0; tk < n_tok; tk++)
        for (int i = 0; i < 4; i++) acc[tk][i] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) b_step(T, &tb, r, x, n_tok, b, 8, next, lane_blk, acc);
    if (b < nb) b_step(T, &tb, r, x, n_tok, b, nb - b, next, lane_blk, acc);
    STORE_PAIRS(acc, n_tok, nr, out, ldo,
                _mm512_setr_epi32(s, s + 4, s + 8, s + 12, s + 1, s + 5, s + 9, s + 13, 0, 0, 0, 0, 0, 0, 0, 0));
}

PE_DOT_Q8_ENTRIES(q4_1, dot_q8_b, B_Q4_1)
PE_DOT_Q8_ENTRIES(q5_0, dot_q8_b, B_Q5_0)
PE_DOT_Q8_ENTRIES(q5_1, dot_q8_b, B_Q5_1)
/* Q2_K has no several-token form: its decode is 4 permutes and masks, nothing to share, and with a
 * variable token count its activations leave the registers (2 tokens: 0.8x of two one-token calls). */
static void dot_q8_q2_k(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, int64_t n, float *out) {
    dot_q8_k2(rows, stride, nr, x, n, out);
}
PE_DOT_Q8_ENTRIES(q3_k, dot_q8_k, K_Q3)
PE_DOT_Q8_ENTRIES(q4_k, dot_q8_k45, K_Q4)
PE_DOT_Q8_ENTRIES(q5_k, dot_q8_k45, K_Q5)
PE_DOT_Q8_ENTRIES(q6_k, dot_q8_k, K_Q6)

static pthread_once_t b_tables_once = PTHREAD_ONCE_INIT;
static int b_runs(int T) { return pe_cpu_has_avx512vbmi() && (T == B_Q4_1 || pe_cpu_has_avx512bitalg()); }
static void b_tables_build(void) {
    for (int T = 0; T < 3; T++)
        if (b_runs(T)) b_tables_init(T, &B_TABLES[T]);
}

/* Whether the CPU has what the type's kernel needs; the 32-block tables are built on the first
 * call (once, as dot_q8_avx512.c builds its own). */
static int ready(int type) {
    pthread_once(&b_tables_once, b_tables_build);
    switch (type) {
    case PE_TYPE_Q2_K:
    case PE_TYPE_Q3_K:
    case PE_TYPE_Q4_K:
    case PE_TYPE_Q5_K:
    case PE_TYPE_Q6_K: return 1;
    case PE_TYPE_Q4_1: return b_runs(B_Q4_1);
    case PE_TYPE_Q5_0: return b_runs(B_Q5_0);
    case PE_TYPE_Q5_1: return b_runs(B_Q5_1);
    default: return 0;
    }
}

pe_dot_q8_fn pe_dot_q8k_avx512(int type) {
    if (!ready(type)) return NULL;
    switch (type) {
    case PE_TYPE_Q2_K: return dot_q8_q2_k;
    case PE_TYPE_Q3_K: return dot_q8_q3_k;
    case PE_TYPE_Q4_K: return dot_q8_q4_k;
    case PE_TYPE_Q5_K: return dot_q8_q5_k;
    case PE_TYPE_Q6_K: return dot_q8_q6_k;
    case PE_TYPE_Q4_1: return dot_q8_q4_1;
    case PE_TYPE_Q5_0: return dot_q8_q5_0;
    default: return dot_q8_q5_1;
    }
}

pe_dot_q8_tok_fn pe_dot_q8k_tok_avx512(int type) {
    if (!ready(type)) return NULL;
    switch (type) {
    case PE_TYPE_Q2_K: return NULL;
    case PE_TYPE_Q3_K: return tok_q8_q3_k;
    case PE_TYPE_Q4_K: return tok_q8_q4_k;
    case PE_TYPE_Q5_K: return tok_q8_q5_k;
    case PE_TYPE_Q6_K: return tok_q8_q6_k;
    case PE_TYPE_Q4_1: return tok_q8_q4_1;
    case PE_TYPE_Q5_0: return tok_q8_q5_0;
    default: return tok_q8_q5_1;
    }
}
