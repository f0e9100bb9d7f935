/* The decode kernels for weights in the R16 layout (r16.h), AVX-512 VNNI: MXFP4 and Q2_K (each with a
 * VBMI form where present), and every other block format (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q3_K..Q6_K).
 *
 * MXFP4, per block of the group's 16 rows: four 64-byte loads; each load's low and high nibbles go through
 * a 64-entry vpermb table (pe_mxfp4_codes, doubled E2M1 value + 12: unsigned for vpdpbusd, repeated every
 * 16 entries, so the 16-bit shift's spill-over bits need no mask) into eight registers, register j
 * holding elements 4 j' .. 4 j' + 3 of the block for every row (a dword per row). Per token, each
 * register meets the broadcast activation dword of its four elements: eight vpdpbusd per digit of
 * the two-digit activations (pe_act_q8's xh and xl, each in two independent chains), a shift and
 * an add give w . X for all 16 rows, exact in int32; then the offset correction (12 * the block's
 * combined code sum), one conversion, and one multiply-add with d_x / 254 * 2^(e - 128) (vscalefps:
 * one rounding) into the accumulator of block b mod 4. The row's result is (acc0 + acc1) +
 * (acc2 + acc3): the order of dot_q8_avx512.c's MXFP4 kernel, so the bits are the same.
 *
 * Several tokens: each block's codes are decoded once and dotted with every token.
 *
 * Without VBMI (Cascade Lake) the table lookup is vpshufb on the nibble masked to 4 bits: one more
 * AND per register, the same codes. That form runs 0.90x the vpermb one on Zen 4 (one core, data in
 * L1/L2: 29.4 against 32.5 GB/s of weights), so VBMI CPUs keep vpermb. This file is compiled
 * without -mavx512vbmi, so that the compiler cannot put VBMI instructions anywhere else: the kernel's
 * body (r16_mxfp4_group_avx512.h) is included twice, the vpermb copy inside a target("avx512vbmi")
 * region (the same machine code as when the whole file was built with VBMI). */
#include "r16.h"

#include <immintrin.h>
#include <pthread.h>

#include "cpu_features.h"
#include "quants_impl.h"
#include "r16_codes_avx512.h"

#define PE_AI static inline __attribute__((always_inline))

/* acc + u (unsigned bytes) . the activation dword at p broadcast (signed bytes): vpdpbusd with the
 * broadcast embedded in its memory operand, which GCC does not fold from the intrinsics (it emits a
 * separate vpbroadcastd). One core, weights in L2, Zen 4: 1.02-1.08x on every type's R16 kernel
 * (Q4_0 43 -> 46 GB/s, MXFP4 37 -> 38), Q8_0 unchanged; the same bits. Written for both assembler
 * dialects ({AT&T|Intel}), so -masm=intel builds too. */
PE_AI __m512i dp_bcast(__m512i acc, __m512i u, const int8_t *p) {
    __asm__("vpdpbusd {%2%{1to16%}, %1, %0|%0, %1, %2%{1to16%}}" : "+v"(acc) : "v"(u), "m"(*(const int32_t *)p));
    return acc;
}

/* Block b of one token: the 16 rows' exact sums of w . X minus offset times the block's combined
 * code sum, from the codes u[j] (elements 4 j .. 4 j + 3 of every row): per digit two independent
 * chains of vpdpbusd against the broadcast activation dwords, a shift and an add. */
PE_AI __m512i block_sums(const __m512i u[8], const pe_act_q8 *x, int64_t b, const int offset) {
    __m512i h0 = _mm512_setzero_si512(), h1 = h0, l0 = h0, l1 = h0;
    for (int j = 0; j < 4; j++) {
        h0 = dp_bcast(h0, u[j], x->xh + pe_r16_act_at(b, j));
        h1 = dp_bcast(h1, u[j + 4], x->xh + pe_r16_act_at(b, j + 4));
        l0 = dp_bcast(l0, u[j], x->xl + pe_r16_act_at(b, j));
        l1 = dp_bcast(l1, u[j + 4], x->xl + pe_r16_act_at(b, j + 4));
    }
    const __m512i c = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(h0, h1), 8), _mm512_add_epi32(l0, l1));
    return _mm512_sub_epi32(c, _mm512_set1_epi32(offset * (int32_t)x->s32x[b]));
}

/* Each token's row results (acc0 + acc1) + (acc2 + acc3), the first nr lanes stored. */
PE_AI void store_rows(__m512 acc[][4], const int n_tok, int nr, float *out, int64_t ldo) {
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    for (int t = 0; t < n_tok; t++)
        _mm512_mask_storeu_ps(out + t * ldo, keep,
                              _mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3])));
}

#define R16_GROUP group_bw
#define R16_DOT dot_r16_bw
#define R16_LOOKUP(v, table) _mm512_shuffle_epi8(table, _mm512_and_si512(v, _mm512_set1_epi8(15)))
#include "r16_mxfp4_group_avx512.h"
#undef R16_GROUP
#undef R16_DOT
#undef R16_LOOKUP

#pragma GCC push_options
#pragma GCC target("avx512vbmi")
#define R16_GROUP group_vbmi
#define R16_DOT dot_r16_vbmi
#define R16_LOOKUP(v, table) _mm512_permutexvar_epi8(v, table)
#include "r16_mxfp4_group_avx512.h"
#undef R16_GROUP
#undef R16_DOT
#undef R16_LOOKUP
#pragma GCC pop_options

/* Q8_0 and Q4_0. Q8_0: the codes are stored + 128, so a block is eight 64-byte loads that go straight
 * into vpdpbusd (nothing to decode); Q4_0: four loads give the eight registers of nibbles (its code
 * q + 8). Then per token, against the two digits' broadcast dwords, the same steps as
 * dot_q8_avx512.c's kernel: the offset (128, 8) times the block's combined code sum taken off in
 * int32, one conversion, one multiply-add with d_w * (d_x / 254) into the accumulator of block
 * b mod 4, and the row's result (acc0 + acc1) + (acc2 + acc3): the same bits. */
PE_AI void group_q8_0(const int type, const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, const int n_tok,
                      float *out, int64_t ldo, const uint8_t *pf) {
    const int q8 = type == PE_TYPE_Q8_0, code = pe_r16_unit_bytes(type);
    const uint8_t *scales = group + code * nb;
    __m512 acc[PE_DOT_Q8_MAX_TOK][4];
    for (int t = 0; t < n_tok; t++)
        for (int k = 0; k < 4; k++) acc[t][k] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = group + code * b;
        pe_r16_prefetch_block(pf, nb, b, code, 32);
        __m512i u[8]; /* u[j]: elements 4 j .. 4 j + 3 of every row */
        pe_r16_unit_codes(type, p, u);
        const __m512 ws = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(scales + 32 * b)));
        for (int t = 0; t < n_tok; t++) {
            const __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(x[t].dk[b]));
            acc[t][b & 3] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block_sums(u, &x[t], b, q8 ? 128 : 8)), s, acc[t][b & 3]);
        }
    }
    store_rows(acc, n_tok, nr, out, ldo);
}

/* Each token's row results from eight accumulators in dot_q8k_avx512.c's reduction order (its
 * rows-in-pairs kernels sum a row's eight lanes with _mm512_reduce_add_ps):
 * ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7)), the first nr lanes stored. */
PE_AI void store_rows8(__m512 acc[][8], const int n_tok, int nr, float *out, int64_t ldo) {
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    for (int t = 0; t < n_tok; t++) {
        const __m512 *a = acc[t];
        const __m512 r = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
                                       _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])));
        _mm512_mask_storeu_ps(out + t * ldo, keep, r);
    }
}

/* Q4_1, Q5_0, Q5_1 (32-blocks with a fifth bit or a minimum): the code registers (Q4_1: each
 * 64-byte load's low nibbles, then its high ones after a 16-bit shift; the Q5 types: their five
 * pieces of 5-bit fields, r16_codes_avx512.h); then the file layout's
 * steps (dot_q8k_avx512.c's 32-block kernel): Q5_0's 16 times the block's combined code sum taken
 * off in int32, one conversion, one multiply-add with d_w * (d_x / 254), with a minimum one more of
 * m_w with (d_x / 254) times that code sum, into the accumulator of block b mod 8, and the row's
 * result summed in that kernel's order, ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 +
 * acc7)): the same bits. */
PE_AI void group_b(const int type, const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, const int n_tok,
                   float *out, int64_t ldo, const uint8_t *pf) {
    const int has_min = type != PE_TYPE_Q5_0;
    const int code = pe_r16_unit_bytes(type), scale = has_min ? 64 : 32;
    const uint8_t *scales = group + code * nb;
    __m512 acc[PE_DOT_Q8_MAX_TOK][8];
    for (int t = 0; t < n_tok; t++)
        for (int k = 0; k < 8; k++) acc[t][k] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = group + code * b;
        pe_r16_prefetch_block(pf, nb, b, code, scale);
        __m512i u[8]; /* u[j]: elements 4 j .. 4 j + 3 of every row */
        pe_r16_unit_codes(type, p, u);
        const __m512 ws = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(scales + scale * b)));
        const __m512 wm = has_min ? _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(scales + scale * b + 32)))
                                  : _mm512_setzero_ps();
        for (int t = 0; t < n_tok; t++) {
            const float dx = x[t].dk[b];
            const __m512i sums = block_sums(u, &x[t], b, type == PE_TYPE_Q5_0 ? 16 : 0);
            acc[t][b & 7] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(ws, _mm512_set1_ps(dx)), acc[t][b & 7]);
            if (has_min) acc[t][b & 7] = _mm512_fmadd_ps(wm, _mm512_set1_ps(dx * x[t].s32x[b]), acc[t][b & 7]);
        }
    }
    store_rows8(acc, n_tok, nr, out, ldo);
}

/* The 16 rows' f16 values at p (a K-quant group's d or dmin). */
PE_AI __m512 f16_rows(const uint8_t *p) { return _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)p)); }

/* Q4_K and Q5_K, per sub-block of 32 (one 32-element unit of the activations): the eight code
 * registers (Q4_K: four loads' low and high nibbles; Q5_K: the five pieces of 5-bit fields, as
 * Q5_0's), the row's d * sc and dmin * m converted from the unpacked scale bytes; then the file
 * layout's steps (dot_q8k_avx512.c's Q4_K/Q5_K kernel): one conversion, one multiply-add with (d * sc)
 * * (d_x / 254), one negated multiply-add of dmin * m with d_x / 254 times the unit's combined code
 * sum, into the accumulator of sub-block s, and the row's result summed in that kernel's order,
 * ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7)): the same bits (for Q4_K that
 * kernel keeps the odd sub-blocks' codes as 16 q and d_x / 16, exactly the same products). */
PE_AI void group_k(const int type, const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, const int n_tok,
                   float *out, int64_t ldo, const uint8_t *pf) {
    const int64_t nsb = nb / 8, cs = pe_r16_unit_bytes(type); /* code bytes per sub-block */
    const uint8_t *scales = group + 8 * cs * nsb;
    __m512 acc[PE_DOT_Q8_MAX_TOK][8];
    for (int t = 0; t < n_tok; t++)
        for (int k = 0; k < 8; k++) acc[t][k] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *sc = scales + 320 * sb;
        const __m512 d = f16_rows(sc + 256), dmin = f16_rows(sc + 288);
        for (int s = 0; s < 8; s++) {
            const int64_t b = 8 * sb + s;
            const uint8_t *p = group + cs * b;
            pe_r16_prefetch_unit(pf, nsb, b, (int)cs, 320);
            __m512i u[8]; /* u[j]: elements 4 j .. 4 j + 3 of the sub-block, every row */
            pe_r16_unit_codes(type, p, u);
            const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(sc + 16 * s)))), d);
            const __m512 m = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(sc + 128 + 16 * s)))), dmin);
            for (int t = 0; t < n_tok; t++) {
                const float dx = x[t].dk[b];
                const __m512 f = _mm512_cvtepi32_ps(block_sums(u, &x[t], b, 0));
                acc[t][s] = _mm512_fmadd_ps(f, _mm512_mul_ps(a, _mm512_set1_ps(dx)), acc[t][s]);
                acc[t][s] = _mm512_fnmadd_ps(m, _mm512_set1_ps(dx * x[t].s32x[b]), acc[t][s]);
            }
        }
    }
    store_rows8(acc, n_tok, nr, out, ldo);
}

/* Sub-block s (16 elements: hh = s % 2 picks registers 4 hh .. 4 hh + 3 of the unit's codes u) of
 * unit b, one token: the rows' exact sums of w . X minus offset times the sub-block's combined code
 * sum, one vpdpbusd chain per digit, a shift and an add. */
PE_AI __m512i sub_sums(const __m512i u[8], const pe_act_q8 *x, int64_t b, int hh, const int offset, int64_t s16) {
    __m512i h = _mm512_setzero_si512(), l = h;
    for (int j = 4 * hh; j < 4 * hh + 4; j++) {
        h = dp_bcast(h, u[j], x->xh + pe_r16_act_at(b, j));
        l = dp_bcast(l, u[j], x->xl + pe_r16_act_at(b, j));
    }
    const __m512i c = _mm512_add_epi32(_mm512_slli_epi32(h, 8), l);
    return offset ? _mm512_sub_epi32(c, _mm512_set1_epi32(offset * (int32_t)x->s16x[s16])) : c;
}

/* A row's sixteen lane values l[0..16) summed as _mm512_reduce_add_ps sums the lanes of one register
 * (GCC's tree: halves, then quarters, then pairs), for 16 rows at once. */
PE_AI __m512 reduce16(const __m512 l[16]) {
    __m512 t[8];
    for (int i = 0; i < 8; i++) t[i] = _mm512_add_ps(l[i + 8], l[i]);
    for (int i = 0; i < 4; i++) t[i] = _mm512_add_ps(t[i + 4], t[i]);
    return _mm512_add_ps(_mm512_add_ps(t[0], t[2]), _mm512_add_ps(t[1], t[3]));
}

/* Q3_K and Q6_K (sub-blocks of 16), per 32-element unit: the codes (Q3_K: three pieces of 3-bit
 * fields, Q6_K: nibbles plus 2-bit fields), then per sub-block the file layout's steps
 * (dot_q8k_avx512.c's sub-blocks-of-16 kernel): the offset (4, 32) times the sub-block's combined code
 * sum taken off in int32, one conversion, one multiply-add with (d * sc) * (d_x / 254) into the
 * accumulator of sub-block s, and the row's result summed as that kernel's _mm512_reduce_add_ps sums
 * its register, whose lane 4 L + i holds sub-block 4 i + L: the same bits. */
PE_AI void group_16(const int type, const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, const int n_tok,
                    float *out, int64_t ldo, const uint8_t *pf) {
    const int six = type == PE_TYPE_Q6_K, offset = six ? 32 : 4;
    const int64_t nsb = nb / 8, ub = pe_r16_unit_bytes(type); /* code bytes per unit of 32 */
    const uint8_t *scales = group + 8 * ub * nsb;
    __m512 acc[PE_DOT_Q8_MAX_TOK][16];
    for (int t = 0; t < n_tok; t++)
        for (int k = 0; k < 16; k++) acc[t][k] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *sc = scales + 288 * sb;
        const __m512 d = f16_rows(sc + 256);
        for (int v = 0; v < 8; v++) {
            const int64_t b = 8 * sb + v;
            pe_r16_prefetch_unit(pf, nsb, b, (int)ub, 288);
            __m512i u[8]; /* u[j]: elements 4 j .. 4 j + 3 of the unit, every row */
            pe_r16_unit_codes(type, group + ub * b, u);
            for (int hh = 0; hh < 2; hh++) {
                const int s = 2 * v + hh;
                const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(sc + 16 * s)))), d);
                for (int t = 0; t < n_tok; t++) {
                    const float dx = x[t].dk[b];
                    const __m512 f = _mm512_cvtepi32_ps(sub_sums(u, &x[t], b, hh, offset, 16 * sb + s));
                    acc[t][s] = _mm512_fmadd_ps(f, _mm512_mul_ps(a, _mm512_set1_ps(dx)), acc[t][s]);
                }
            }
        }
    }
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    static const int lane_sub[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
    for (int t = 0; t < n_tok; t++) {
        __m512 l[16];
        for (int i = 0; i < 16; i++) l[i] = acc[t][lane_sub[i]];
        _mm512_mask_storeu_ps(out + t * ldo, keep, reduce16(l));
    }
}

/* Token x's Q2_K unit b (v = b % 8) into its accumulators F_v and M_v (acc[v], acc[8 + v]): F, the
 * sub-blocks' exact code sums times their scales (int32), converted and multiplied once with d * (d_x
 * / 254); M = m0 S0 + m1 S1, the sub-blocks' 4-bit minimums mn (as floats) times their combined code
 * sums S (s16x), taken in float, where it is exact (m <= 15, |S| <= 16 * 32385: each product and their
 * sum below 2^24, so it equals dot_q8k_avx512.c's int32 minimum term, converted), then taken off
 * times dmin * (d_x / 254) (a negated multiply-add: the bits of adding it times dmin * -(d_x / 254)). */
PE_AI void q2_k_acc(__m512 acc[16], int v, __m512i F, const __m512 mn[2], const pe_act_q8 *x, int64_t b, __m512 d,
                    __m512 dmin) {
    const __m512 dx = _mm512_set1_ps(x->dk[b]);
    acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(F), _mm512_mul_ps(d, dx), acc[v]);
    const __m512 M = _mm512_fmadd_ps(mn[1], _mm512_set1_ps(x->s16x[2 * b + 1]), _mm512_mul_ps(mn[0], _mm512_set1_ps(x->s16x[2 * b])));
    acc[8 + v] = _mm512_fnmadd_ps(M, _mm512_mul_ps(dmin, dx), acc[8 + v]);
}

/* Q2_K, per 32-element unit b (two sub-blocks of 16): the 2-bit codes, per sub-block the exact sums
 * times the 4-bit scale, in int32, the two sub-blocks added (F), and the minimum term (q2_k_acc);
 * then as dot_q8k_avx512.c's Q2_K kernel, whose lanes 0-7 hold the eight blocks' sums and 8-15
 * their minimum terms: the row's result summed as that kernel's _mm512_reduce_add_ps over (F0..F7,
 * M0..M7): the same bits. */
PE_AI void group_q2_k(const int type, const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, const int n_tok,
                      float *out, int64_t ldo, const uint8_t *pf) {
    const int64_t nsb = nb / 8, ub = pe_r16_unit_bytes(type); /* code bytes per unit of 32 */
    const uint8_t *scales = group + 8 * ub * nsb;
    __m512 acc[PE_DOT_Q8_MAX_TOK][16]; /* F0..F7, M0..M7 */
    for (int t = 0; t < n_tok; t++)
        for (int k = 0; k < 16; k++) acc[t][k] = _mm512_setzero_ps();
    const __m512i m15 = _mm512_set1_epi32(15);
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *sc = scales + 320 * sb;
        const __m512 d = f16_rows(sc + 256), dmin = f16_rows(sc + 288);
        for (int v = 0; v < 8; v++) {
            const int64_t b = 8 * sb + v;
            pe_r16_prefetch_unit(pf, nsb, b, (int)ub, 320);
            __m512i u[8];
            pe_r16_unit_codes(type, group + ub * b, u);
            const __m512i s0 = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(sc + 32 * v)));
            const __m512i s1 = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(sc + 32 * v + 16)));
            const __m512i sc0 = _mm512_and_si512(s0, m15), sc1 = _mm512_and_si512(s1, m15);
            const __m512 mn[2] = {_mm512_cvtepi32_ps(_mm512_srli_epi32(s0, 4)), _mm512_cvtepi32_ps(_mm512_srli_epi32(s1, 4))};
            for (int t = 0; t < n_tok; t++) {
                const __m512i F = _mm512_add_epi32(_mm512_mullo_epi32(sub_sums(u, &x[t], b, 0, 0, 0), sc0),
                                                   _mm512_mullo_epi32(sub_sums(u, &x[t], b, 1, 0, 0), sc1));
                q2_k_acc(acc[t], v, F, mn, &x[t], b, d, dmin);
            }
        }
    }
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    for (int t = 0; t < n_tok; t++) _mm512_mask_storeu_ps(out + t * ldo, keep, reduce16(acc[t]));
}

/* Q2_K with VBMI: each code register's 2-bit fields, with the row's 4-bit scale of that sub-block
 * beside them, index a 64-entry vpermb table of sc * q (at most 45), so one vpdpbusd chain per digit
 * over the whole unit gives F = sc0 (q . X)_0 + sc1 (q . X)_1 directly, in int32 with the same value
 * as group_q2_k's two multiplies (|F| < 2^26); the same minimum term and accumulators (q2_k_acc):
 * the same bits, with the two per-token multiplies of the scales gone, paid for once per unit by 8
 * vpermb + 8 vpternlogd shared by every token. vpermb reads only bits 0-5 of an index byte, so the
 * fields need no masking of their own: field 0 (bits 0-1 of the code byte c) and field 1 (bits 0-1
 * of c >> 2) take the scale in bits 2-5 (table prod), field 2 (bits 4-5 of c) and field 3 (bits 4-5
 * of c >> 2) take it in bits 0-3 (table prod2); one vpternlogd selects the bits. One shift of the
 * codes per 64 bytes instead of three, and none to mask the scale: 1.085x on one core in cache. */
#pragma GCC push_options
#pragma GCC target("avx512vbmi")
PE_AI void group_q2_k_vbmi(const int type, const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x,
                           const int n_tok, float *out, int64_t ldo, const uint8_t *pf) {
    const int64_t nsb = nb / 8, ub = pe_r16_unit_bytes(type); /* code bytes per unit of 32 */
    const uint8_t *scales = group + 8 * ub * nsb;
    __m512 acc[PE_DOT_Q8_MAX_TOK][16]; /* F0..F7, M0..M7 */
    for (int t = 0; t < n_tok; t++)
        for (int k = 0; k < 16; k++) acc[t][k] = _mm512_setzero_ps();
    /* prod: byte i = (i >> 2) * (i & 3) (the code in bits 0-1); prod2: byte i = (i & 15) * (i >> 4)
     * (the code in bits 4-5); rep: byte 4 r + k = byte r (a row's scale byte in its dword) */
    const __m512i prod = _mm512_set_epi32(0x2d1e0f00, 0x2a1c0e00, 0x271a0d00, 0x24180c00, 0x21160b00, 0x1e140a00,
                                          0x1b120900, 0x18100800, 0x150e0700, 0x120c0600, 0x0f0a0500, 0x0c080400,
                                          0x09060300, 0x06040200, 0x03020100, 0x00000000);
    const __m512i prod2 = _mm512_set_epi32(0x2d2a2724, 0x211e1b18, 0x15120f0c, 0x09060300, 0x1e1c1a18, 0x16141210,
                                           0x0e0c0a08, 0x06040200, 0x0f0e0d0c, 0x0b0a0908, 0x07060504, 0x03020100,
                                           0x00000000, 0x00000000, 0x00000000, 0x00000000);
    const __m512i rep = _mm512_setr_epi32(0x00000000, 0x01010101, 0x02020202, 0x03030303, 0x04040404, 0x05050505,
                                          0x06060606, 0x07070707, 0x08080808, 0x09090909, 0x0a0a0a0a, 0x0b0b0b0b,
                                          0x0c0c0c0c, 0x0d0d0d0d, 0x0e0e0e0e, 0x0f0f0f0f);
    const __m512i m03 = _mm512_set1_epi8(0x03), m30 = _mm512_set1_epi8(0x30);
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *sc = scales + 320 * sb;
        const __m512 d = f16_rows(sc + 256), dmin = f16_rows(sc + 288);
        for (int v = 0; v < 8; v++) {
            const int64_t b = 8 * sb + v;
            const uint8_t *p = group + ub * b;
            pe_r16_prefetch_unit(pf, nsb, b, (int)ub, 320);
            __m512i u[8];
            __m512 mn[2];
            for (int hh = 0; hh < 2; hh++) {
                /* raw: the scale byte (minimum in the high nibble, scale in the low one) in every byte of the row's dword */
                const __m512i raw = _mm512_permutexvar_epi8(rep, _mm512_castsi128_si512(_mm_load_si128((const __m128i *)(sc + 32 * v + 16 * hh))));
                const __m512i raw2 = _mm512_slli_epi32(raw, 2);
                mn[hh] = _mm512_cvtepi32_ps(_mm512_srli_epi32(raw, 28));
                const __m512i c = _mm512_load_si512(p + 64 * hh), c2 = _mm512_srli_epi16(c, 2);
                /* vpternlogd 0xca: bits of the first operand (the mask) from the second, the rest from the third */
                u[4 * hh + 0] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(m03, c, raw2, 0xca), prod);
                u[4 * hh + 1] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(m03, c2, raw2, 0xca), prod);
                u[4 * hh + 2] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(m30, c, raw, 0xca), prod2);
                u[4 * hh + 3] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(m30, c2, raw, 0xca), prod2);
            }
            for (int t = 0; t < n_tok; t++) q2_k_acc(acc[t], v, block_sums(u, &x[t], b, 0), mn, &x[t], b, d, dmin);
        }
    }
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    for (int t = 0; t < n_tok; t++) _mm512_mask_storeu_ps(out + t * ldo, keep, reduce16(acc[t]));
}
#pragma GCC pop_options

#define R16_ENTRY(name, body, TYPE)                                                                                \
    static void name(const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, int n_tok, float *out,         \
                     int64_t ldo, const uint8_t *pf) {                                                             \
        if (n_tok == 1) body(TYPE, group, nb, nr, x, 1, out, ldo, pf);                                             \
        else body(TYPE, group, nb, nr, x, n_tok, out, ldo, pf);                                                    \
    }
R16_ENTRY(dot_r16_q8_0, group_q8_0, PE_TYPE_Q8_0)
R16_ENTRY(dot_r16_q4_0, group_q8_0, PE_TYPE_Q4_0)
R16_ENTRY(dot_r16_q4_1, group_b, PE_TYPE_Q4_1)
R16_ENTRY(dot_r16_q5_0, group_b, PE_TYPE_Q5_0)
R16_ENTRY(dot_r16_q5_1, group_b, PE_TYPE_Q5_1)
R16_ENTRY(dot_r16_q4_k, group_k, PE_TYPE_Q4_K)
R16_ENTRY(dot_r16_q5_k, group_k, PE_TYPE_Q5_K)
R16_ENTRY(dot_r16_q2_k, group_q2_k, PE_TYPE_Q2_K)
#pragma GCC push_options
#pragma GCC target("avx512vbmi")
R16_ENTRY(dot_r16_q2_k_vbmi, group_q2_k_vbmi, PE_TYPE_Q2_K)
#pragma GCC pop_options
R16_ENTRY(dot_r16_q3_k, group_16, PE_TYPE_Q3_K)
R16_ENTRY(dot_r16_q6_k, group_16, PE_TYPE_Q6_K)
#undef R16_ENTRY

/* The kernel of each type, by ggml type id (MXFP4's, 39, is the largest). */
static pe_r16_dot_fn chosen[PE_TYPE_MXFP4 + 1];
static pthread_once_t chosen_once = PTHREAD_ONCE_INIT;
static void choose(void) {
    const pe_simd_level level = pe_simd_level_get();
    if (level >= PE_SIMD_AVX512) {
        chosen[PE_TYPE_MXFP4] = pe_cpu_has_avx512vbmi() ? dot_r16_vbmi : dot_r16_bw;
        chosen[PE_TYPE_Q8_0] = dot_r16_q8_0;
        chosen[PE_TYPE_Q4_0] = dot_r16_q4_0;
        chosen[PE_TYPE_Q4_1] = dot_r16_q4_1;
        chosen[PE_TYPE_Q5_0] = dot_r16_q5_0;
        chosen[PE_TYPE_Q5_1] = dot_r16_q5_1;
        chosen[PE_TYPE_Q2_K] = pe_cpu_has_avx512vbmi() ? dot_r16_q2_k_vbmi : dot_r16_q2_k;
        chosen[PE_TYPE_Q3_K] = dot_r16_q3_k;
        chosen[PE_TYPE_Q4_K] = dot_r16_q4_k;
        chosen[PE_TYPE_Q5_K] = dot_r16_q5_k;
        chosen[PE_TYPE_Q6_K] = dot_r16_q6_k;
    } else chosen[PE_TYPE_MXFP4] = level >= PE_SIMD_AVX2 ? pe_r16_dot_avx2 : NULL;
}

/* Resolved once (cpuid is slow, and in a VM a trap): matmul.c asks per row group. */
pe_r16_dot_fn pe_r16_dot_get(int type) {
    pthread_once(&chosen_once, choose);
    return type >= 0 && type <= PE_TYPE_MXFP4 ? chosen[type] : NULL;
}
