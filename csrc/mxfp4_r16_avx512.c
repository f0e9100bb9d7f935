/* The decode kernel for MXFP4 weights in the R16 layout (mxfp4_r16.h), AVX-512 VNNI (+ VBMI where present).
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
 * Several tokens: each block's codes are decoded once and dotted with every token.
 *
 * Without VBMI (Cascade Lake) the table lookup is vpshufb on the nibble masked to 4 bits: one more
 * AND per register, the same codes. That form runs 0.90x the vpermb one on Zen 4 (one core, data in
 * L1/L2: 29.4 against 32.5 GB/s of weights), so VBMI CPUs keep vpermb. This file is compiled
 * without -mavx512vbmi, so that the compiler cannot put VBMI instructions anywhere else: the kernel's
 * body (mxfp4_r16_group_avx512.h) is included twice, the vpermb copy inside a target("avx512vbmi")
 * region (the same machine code as when the whole file was built with VBMI). */
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

#define R16_GROUP group_bw
#define R16_DOT dot_r16_bw
#define R16_LOOKUP(v, table) _mm512_shuffle_epi8(table, _mm512_and_si512(v, _mm512_set1_epi8(15)))
#include "mxfp4_r16_group_avx512.h"
#undef R16_GROUP
#undef R16_DOT
#undef R16_LOOKUP

#pragma GCC push_options
#pragma GCC target("avx512vbmi")
#define R16_GROUP group_vbmi
#define R16_DOT dot_r16_vbmi
#define R16_LOOKUP(v, table) _mm512_permutexvar_epi8(v, table)
#include "mxfp4_r16_group_avx512.h"
#undef R16_GROUP
#undef R16_DOT
#undef R16_LOOKUP
#pragma GCC pop_options

static pe_r16_dot_fn chosen;
static pthread_once_t chosen_once = PTHREAD_ONCE_INIT;
static void choose(void) {
    const pe_simd_level level = pe_simd_level_get();
    if (level >= PE_SIMD_AVX512) chosen = pe_cpu_has_avx512vbmi() ? dot_r16_vbmi : dot_r16_bw;
    else chosen = level >= PE_SIMD_AVX2 ? pe_r16_dot_avx2 : NULL;
}

/* Resolved once (cpuid is slow, and in a VM a trap): matmul.c asks per row group. */
pe_r16_dot_fn pe_r16_dot_get(void) {
    pthread_once(&chosen_once, choose);
    return chosen;
}
