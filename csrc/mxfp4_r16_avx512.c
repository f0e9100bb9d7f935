/* The decode kernel for MXFP4 weights in the R16 layout (mxfp4_r16.h), AVX-512 VNNI + VBMI.
 *
 * Per block of the group's 16 rows: four 64-byte loads; each load's low and high nibbles go through
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
 * Several tokens: each block's codes are decoded once and dotted with every token. */
#include "mxfp4_r16.h"

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

PE_AI void dot_group(const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, const int n_tok, float *out,
                     int64_t ldo) {
    /* pe_mxfp4_codes four times (vpermb ignores index bits 6-7) */
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)pe_mxfp4_codes));
    const uint8_t *scales = group + 256 * nb;
    __m512 acc[PE_DOT_Q8_MAX_TOK][4];
    for (int t = 0; t < n_tok; t++)
        for (int k = 0; k < 4; k++) acc[t][k] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = group + 256 * b;
        for (int l = 0; l < 256; l += 64) _mm_prefetch((const char *)p + PE_R16_PF_DIST + l, _MM_HINT_T1);
        if (!(b & 3)) _mm_prefetch((const char *)scales + 16 * b + PE_R16_PF_DIST / 16, _MM_HINT_T1);
        __m512i u[8]; /* u[j]: elements 4 j .. 4 j + 3 (j < 4), 16 + 4 (j - 4) .. (j >= 4) of every row */
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_load_si512(p + 64 * j);
            u[j] = _mm512_permutexvar_epi8(v, table);
            u[j + 4] = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), table);
        }
        const __m512 ws = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(scales + 16 * b)))),
                                        _mm512_set1_ps(128.0f));
        for (int t = 0; t < n_tok; t++) {
            __m512i h0 = _mm512_setzero_si512(), h1 = h0, l0 = h0, l1 = h0;
            for (int j = 0; j < 4; j++) {
                h0 = _mm512_dpbusd_epi32(h0, u[j], bcast(x[t].xh + pe_r16_act_at(b, j)));
                h1 = _mm512_dpbusd_epi32(h1, u[j + 4], bcast(x[t].xh + pe_r16_act_at(b, j + 4)));
                l0 = _mm512_dpbusd_epi32(l0, u[j], bcast(x[t].xl + pe_r16_act_at(b, j)));
                l1 = _mm512_dpbusd_epi32(l1, u[j + 4], bcast(x[t].xl + pe_r16_act_at(b, j + 4)));
            }
            __m512i c = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(h0, h1), 8), _mm512_add_epi32(l0, l1));
            c = _mm512_sub_epi32(c, _mm512_set1_epi32(12 * (int32_t)x[t].s32x[b]));
            const __m512 s = _mm512_scalef_ps(_mm512_set1_ps(x[t].d[b] * (1.0f / 254.0f)), ws);
            acc[t][b & 3] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), s, acc[t][b & 3]);
        }
    }
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    for (int t = 0; t < n_tok; t++)
        _mm512_mask_storeu_ps(out + t * ldo, keep,
                              _mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3])));
}

static void dot_r16(const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, int n_tok, float *out, int64_t ldo) {
    if (n_tok == 1) dot_group(group, nb, nr, x, 1, out, ldo); /* one token: accumulators in registers */
    else dot_group(group, nb, nr, x, n_tok, out, ldo);
}

static pe_r16_dot_fn chosen;
static pthread_once_t chosen_once = PTHREAD_ONCE_INIT;
static void choose(void) {
    const pe_simd_level level = pe_simd_level_get();
    chosen = level >= PE_SIMD_AVX512 && pe_cpu_has_avx512vbmi() ? dot_r16 : level >= PE_SIMD_AVX2 ? pe_r16_dot_avx2 : NULL;
}

/* Resolved once (cpuid is slow, and in a VM a trap): matmul.c asks per row group. */
pe_r16_dot_fn pe_r16_dot_get(void) {
    pthread_once(&chosen_once, choose);
    return chosen;
}
