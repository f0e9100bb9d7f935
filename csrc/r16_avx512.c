/* The decode kernels for weights in the R16 layout (r16.h), AVX-512 VNNI: MXFP4 (+ VBMI where
 * present) and Q8_0.
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
#include <string.h>

#include "cpu_features.h"
#include "quants_impl.h"

#define PE_AI static inline __attribute__((always_inline))

PE_AI __m512i bcast(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* Block b of one token: the 16 rows' exact sums of w . X minus offset times the block's combined
 * code sum, from the codes u[j] (elements 4 j .. 4 j + 3 of every row): per digit two independent
 * chains of vpdpbusd against the broadcast activation dwords, a shift and an add. */
PE_AI __m512i block_sums(const __m512i u[8], const pe_act_q8 *x, int64_t b, const int offset) {
    __m512i h0 = _mm512_setzero_si512(), h1 = h0, l0 = h0, l1 = h0;
    for (int j = 0; j < 4; j++) {
        h0 = _mm512_dpbusd_epi32(h0, u[j], bcast(x->xh + pe_r16_act_at(b, j)));
        h1 = _mm512_dpbusd_epi32(h1, u[j + 4], bcast(x->xh + pe_r16_act_at(b, j + 4)));
        l0 = _mm512_dpbusd_epi32(l0, u[j], bcast(x->xl + pe_r16_act_at(b, j)));
        l1 = _mm512_dpbusd_epi32(l1, u[j + 4], bcast(x->xl + pe_r16_act_at(b, j + 4)));
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

/* Q8_0: the codes are stored + 128, so a block is eight 64-byte loads that go straight into
 * vpdpbusd (nothing to decode), per token against the two digits' broadcast dwords; then the same
 * steps as dot_q8_avx512.c's Q8_0 kernel: 128 times the block's combined code sum taken off in
 * int32, one conversion, one multiply-add with d_w * (d_x / 254) into the accumulator of block
 * b mod 4, and the row's result (acc0 + acc1) + (acc2 + acc3): the same bits. */
PE_AI void group_q8_0(const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, const int n_tok, float *out,
                      int64_t ldo, const uint8_t *pf) {
    const uint8_t *scales = group + 512 * nb;
    __m512 acc[PE_DOT_Q8_MAX_TOK][4];
    for (int t = 0; t < n_tok; t++)
        for (int k = 0; k < 4; k++) acc[t][k] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = group + 512 * b;
        pe_r16_prefetch_block(pf, nb, b, 512, 32);
        __m512i u[8]; /* u[j]: elements 4 j .. 4 j + 3 of every row */
        for (int j = 0; j < 8; j++) u[j] = _mm512_load_si512(p + 64 * j);
        const __m512 ws = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(scales + 32 * b)));
        for (int t = 0; t < n_tok; t++) {
            const __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(x[t].d[b] * (1.0f / 254.0f)));
            acc[t][b & 3] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block_sums(u, &x[t], b, 128)), s, acc[t][b & 3]);
        }
    }
    store_rows(acc, n_tok, nr, out, ldo);
}

static void dot_r16_q8_0(const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, int n_tok, float *out,
                         int64_t ldo, const uint8_t *pf) {
    if (n_tok == 1) group_q8_0(group, nb, nr, x, 1, out, ldo, pf);
    else group_q8_0(group, nb, nr, x, n_tok, out, ldo, pf);
}

static pe_r16_dot_fn chosen_mxfp4, chosen_q8_0;
static pthread_once_t chosen_once = PTHREAD_ONCE_INIT;
static void choose(void) {
    const pe_simd_level level = pe_simd_level_get();
    if (level >= PE_SIMD_AVX512) {
        chosen_mxfp4 = pe_cpu_has_avx512vbmi() ? dot_r16_vbmi : dot_r16_bw;
        chosen_q8_0 = dot_r16_q8_0;
    } else chosen_mxfp4 = level >= PE_SIMD_AVX2 ? pe_r16_dot_avx2 : NULL;
}

/* Resolved once (cpuid is slow, and in a VM a trap): matmul.c asks per row group. */
pe_r16_dot_fn pe_r16_dot_get(int type) {
    pthread_once(&chosen_once, choose);
    return type == PE_TYPE_MXFP4 ? chosen_mxfp4 : type == PE_TYPE_Q8_0 ? chosen_q8_0 : NULL;
}
