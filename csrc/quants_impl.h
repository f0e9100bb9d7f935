/* Private to the quants_*.c files: the block layouts (byte order as in gguf-py's gguf/quants.py and
 * docs/quants.md) and the hook through which each SIMD level offers kernels.
 *
 * Dequantization must be bit-identical to gguf.quants.dequantize, which evaluates in float32 numpy
 * without fused multiply-add; every quants_*.c file is compiled with -ffp-contract=off and writes the
 * products in numpy's order (e.g. Q4_K: (d*sc)*q - dmin*m). The dot kernels use explicit FMA. */
#ifndef PE_QUANTS_IMPL_H
#define PE_QUANTS_IMPL_H

#include "quants.h"

#define PE_QK 32   /* elements per block of the 32-element formats */
#define PE_QK_K 256 /* elements per super-block of the K-quants */

/* The AVX-512 int8 decode kernels read eight rows at a time and prefetch into L2 the slice of the
 * group this many groups ahead (rows 8 * PE_DOT_PF_GROUPS on) that matches their step. One group
 * ahead (~24 KiB of 2880-element Q8_0 rows) left the dev box's two cores waiting on memory: two
 * ahead measured 1.02-1.10x from DRAM (2 threads, paired against one; Q3_K 1.00x), three or four no
 * more. The AVX2 kernels keep one group: two measured 0.98-1.02x there (more compute per byte). */
#define PE_DOT_PF_GROUPS 2

typedef struct { uint16_t d; uint8_t qs[16]; } pe_block_q4_0;
typedef struct { uint16_t d, m; uint8_t qs[16]; } pe_block_q4_1;
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } pe_block_q5_0;
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; } pe_block_q5_1;
typedef struct { uint16_t d; int8_t qs[32]; } pe_block_q8_0;
typedef struct { uint8_t e; uint8_t qs[16]; } pe_block_mxfp4;
typedef struct { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; } pe_block_q2_k;
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; } pe_block_q3_k;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } pe_block_q4_k;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } pe_block_q5_k;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } pe_block_q6_k;

/* each struct is as large as quant_formats.h says its block is */
#define PE_BLOCK_SIZE(name, id, blck, size) enum { PE_BLOCK_BYTES_##name = size };
PE_QUANT_FORMATS(PE_BLOCK_SIZE)
#undef PE_BLOCK_SIZE
_Static_assert(sizeof(pe_block_q4_0) == PE_BLOCK_BYTES_Q4_0, "Q4_0 block");
_Static_assert(sizeof(pe_block_q4_1) == PE_BLOCK_BYTES_Q4_1, "Q4_1 block");
_Static_assert(sizeof(pe_block_q5_0) == PE_BLOCK_BYTES_Q5_0, "Q5_0 block");
_Static_assert(sizeof(pe_block_q5_1) == PE_BLOCK_BYTES_Q5_1, "Q5_1 block");
_Static_assert(sizeof(pe_block_q8_0) == PE_BLOCK_BYTES_Q8_0, "Q8_0 block");
_Static_assert(sizeof(pe_block_mxfp4) == PE_BLOCK_BYTES_MXFP4, "MXFP4 block");
_Static_assert(sizeof(pe_block_q2_k) == PE_BLOCK_BYTES_Q2_K, "Q2_K block");
_Static_assert(sizeof(pe_block_q3_k) == PE_BLOCK_BYTES_Q3_K, "Q3_K block");
_Static_assert(sizeof(pe_block_q4_k) == PE_BLOCK_BYTES_Q4_K, "Q4_K block");
_Static_assert(sizeof(pe_block_q5_k) == PE_BLOCK_BYTES_Q5_K, "Q5_K block");
_Static_assert(sizeof(pe_block_q6_k) == PE_BLOCK_BYTES_Q6_K, "Q6_K block");

/* E2M1 values doubled (bit 3 = sign); the block scale is then 2^(e-128), see pe_e8m0_half. */
extern const int8_t pe_mxfp4_values[16];
/* The same values + 12 (0..24): the unsigned codes the int8 kernels multiply (vpdpbusd / vpmaddwd),
 * with 12 times the activations' code sum taken off afterwards. */
extern const int8_t pe_mxfp4_codes[16];

/* 2^(e-128) as float bits, exactly as ggml_e8m0_to_fp32_half: denormal for e < 2. */
static inline uint32_t pe_e8m0_half_bits(uint8_t e) {
    return e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
}

/* The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block. */
static inline void pe_k_scale_min(const uint8_t *s, int j, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (uint8_t)((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4));
        *mn = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* Signed 6-bit scale k (0..15) of a Q3_K super-block. */
static inline int pe_q3_k_scale(const uint8_t *s, int k) {
    int lo = k < 8 ? s[k] & 15 : s[k - 8] >> 4;
    int hi = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
    return (lo | (hi << 4)) - 32;
}

/* Scalar reference dequantizers (quants_ref.c), also the fallback of SIMD files for rare types. */
void pe_ref_dequant_q4_0(const void *src, float *dst, int64_t n);
void pe_ref_dequant_q4_1(const void *src, float *dst, int64_t n);
void pe_ref_dequant_q5_0(const void *src, float *dst, int64_t n);
void pe_ref_dequant_q5_1(const void *src, float *dst, int64_t n);
void pe_ref_dequant_q8_0(const void *src, float *dst, int64_t n);
void pe_ref_dequant_mxfp4(const void *src, float *dst, int64_t n);
void pe_ref_dequant_q2_k(const void *src, float *dst, int64_t n);
void pe_ref_dequant_q3_k(const void *src, float *dst, int64_t n);
void pe_ref_dequant_q4_k(const void *src, float *dst, int64_t n);
void pe_ref_dequant_q5_k(const void *src, float *dst, int64_t n);
void pe_ref_dequant_q6_k(const void *src, float *dst, int64_t n);

/* A SIMD level's kernels for one type; a level fills only the fields it implements (set whole
 * structs only in the reference, single fields in the SIMD files). */
typedef struct {
    pe_dequant_row_fn dequant_row;
    pe_dot_f32_fn dot_f32;
    pe_dot_q8_fn dot_q8;
    pe_quantize_row_fn quantize_row;
    pe_dot_q8_tok_fn dot_q8_tok;
    pe_dot_f32_tok_fn dot_f32_tok; /* a level that sets dot_f32 sets this too (its bits), or NULL */
} pe_kernel_set;

/* The AVX-512 VNNI int8 rows kernel of a type, or NULL: Q8_0, Q4_0, MXFP4 in dot_q8_avx512.c, the
 * other block formats in dot_q8k_avx512.c (pe_dot_q8k_avx512). */
pe_dot_q8_fn pe_dot_q8_avx512(int type);
/* Its several-token form (the same files), or NULL. */
pe_dot_q8_tok_fn pe_dot_q8_tok_avx512(int type);
pe_dot_q8_fn pe_dot_q8k_avx512(int type);
/* A type's one-token (dot_q8_NAME) and several-token (tok_q8_NAME) entry points over an int8 kernel
 * KERNEL(rows, stride, nr, x, n_tok, n, out, ldo, T), T its format: the same kernel code (n_tok 1 a
 * constant), so per token the same bits. */
#define PE_DOT_Q8_ENTRIES(NAME, KERNEL, T)                                                                    \
    static void dot_q8_##NAME(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, int64_t n,     \
                              float *out) {                                                                   \
        KERNEL(rows, stride, nr, x, 1, n, out, 0, T);                                                         \
    }                                                                                                         \
    static void tok_q8_##NAME(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, int n_tok,     \
                              int64_t n, float *out, int64_t ldo) {                                           \
        KERNEL(rows, stride, nr, x, n_tok, n, out, ldo, T);                                                   \
    }
pe_dot_q8_tok_fn pe_dot_q8k_tok_avx512(int type);
/* The AVX2 int8 rows kernels (dot_q8_avx2.c: every block format; the AVX-512 kernels' bits), or
 * NULL. */
pe_dot_q8_fn pe_dot_q8_avx2(int type);
pe_dot_q8_tok_fn pe_dot_q8_tok_avx2(int type);

void pe_kernels_ref(int type, pe_kernel_set *k);
void pe_kernels_avx2(int type, pe_kernel_set *k);
void pe_kernels_avx512(int type, pe_kernel_set *k);

#endif
