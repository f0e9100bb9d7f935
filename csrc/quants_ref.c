/* Scalar reference kernels, one dequantize_row and one dot per format, in the manner of ggml's
 * ggml-quants.c: the portable fallback and the specification the SIMD variants must reproduce.
 * Products follow gguf.quants' float32 evaluation order exactly (see quants_impl.h). */
#include "quants_impl.h"

#include <math.h>
#include <string.h>

const int8_t pe_mxfp4_values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
const int8_t pe_mxfp4_codes[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

static float bits_to_float(uint32_t bits) {
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void dequant_f32(const void *src, float *dst, int64_t n) { memcpy(dst, src, (size_t)n * 4); }

static void dequant_f16(const void *src, float *dst, int64_t n) {
    const uint16_t *s = src;
    for (int64_t i = 0; i < n; i++) dst[i] = pe_fp16_to_fp32(s[i]);
}

static void dequant_bf16(const void *src, float *dst, int64_t n) {
    const uint16_t *s = src;
    for (int64_t i = 0; i < n; i++) dst[i] = pe_bf16_to_fp32(s[i]);
}

void pe_ref_dequant_q4_0(const void *src, float *dst, int64_t n) {
    const pe_block_q4_0 *b = src;
    for (int64_t i = 0; i < n / PE_QK; i++, b++, dst += PE_QK) {
        const float d = pe_fp16_to_fp32(b->d);
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)((b->qs[j] & 15) - 8);
            dst[j + 16] = d * (float)((b->qs[j] >> 4) - 8);
        }
    }
}

void pe_ref_dequant_q4_1(const void *src, float *dst, int64_t n) {
    const pe_block_q4_1 *b = src;
    for (int64_t i = 0; i < n / PE_QK; i++, b++, dst += PE_QK) {
        const float d = pe_fp16_to_fp32(b->d), m = pe_fp16_to_fp32(b->m);
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)(b->qs[j] & 15) + m;
            dst[j + 16] = d * (float)(b->qs[j] >> 4) + m;
        }
    }
}

static uint32_t load_u32_le(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void pe_ref_dequant_q5_0(const void *src, float *dst, int64_t n) {
    const pe_block_q5_0 *b = src;
    for (int64_t i = 0; i < n / PE_QK; i++, b++, dst += PE_QK) {
        const float d = pe_fp16_to_fp32(b->d);
        const uint32_t qh = load_u32_le(b->qh);
        for (int j = 0; j < 16; j++) {
            int lo = (b->qs[j] & 15) | (int)((qh >> j) & 1) << 4;
            int hi = (b->qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            dst[j] = d * (float)(lo - 16);
            dst[j + 16] = d * (float)(hi - 16);
        }
    }
}

void pe_ref_dequant_q5_1(const void *src, float *dst, int64_t n) {
    const pe_block_q5_1 *b = src;
    for (int64_t i = 0; i < n / PE_QK; i++, b++, dst += PE_QK) {
        const float d = pe_fp16_to_fp32(b->d), m = pe_fp16_to_fp32(b->m);
        const uint32_t qh = load_u32_le(b->qh);
        for (int j = 0; j < 16; j++) {
            int lo = (b->qs[j] & 15) | (int)((qh >> j) & 1) << 4;
            int hi = (b->qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            dst[j] = d * (float)lo + m;
            dst[j + 16] = d * (float)hi + m;
        }
    }
}

void pe_ref_dequant_q8_0(const void *src, float *dst, int64_t n) {
    const pe_block_q8_0 *b = src;
    for (int64_t i = 0; i < n / PE_QK; i++, b++, dst += PE_QK) {
        const float d = pe_fp16_to_fp32(b->d);
        for (int j = 0; j < PE_QK; j++) dst[j] = (float)b->qs[j] * d;
    }
}

void pe_ref_dequant_mxfp4(const void *src, float *dst, int64_t n) {
    const pe_block_mxfp4 *b = src;
    for (int64_t i = 0; i < n / PE_QK; i++, b++, dst += PE_QK) {
        const float d = bits_to_float(pe_e8m0_half_bits(b->e));
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)pe_mxfp4_values[b->qs[j] & 15];
            dst[j + 16] = d * (float)pe_mxfp4_values[b->qs[j] >> 4];
        }
    }
}

void pe_ref_dequant_q2_k(const void *src, float *dst, int64_t n) {
    const pe_block_q2_k *b = src;
    for (int64_t i = 0; i < n / PE_QK_K; i++, b++, dst += PE_QK_K) {
        const float d = pe_fp16_to_fp32(b->d), dmin = pe_fp16_to_fp32(b->dmin);
        for (int e = 0; e < PE_QK_K; e++) {
            const int half = e / 128, j = (e % 128) / 32, l = e % 32;
            const uint8_t sc = b->scales[e / 16];
            const float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
            dst[e] = dl * (float)((b->qs[32 * half + l] >> (2 * j)) & 3) - ml;
        }
    }
}

void pe_ref_dequant_q3_k(const void *src, float *dst, int64_t n) {
    const pe_block_q3_k *b = src;
    for (int64_t i = 0; i < n / PE_QK_K; i++, b++, dst += PE_QK_K) {
        const float d = pe_fp16_to_fp32(b->d);
        for (int e = 0; e < PE_QK_K; e++) {
            const int half = e / 128, j = (e % 128) / 32, l = e % 32;
            const float dl = d * (float)pe_q3_k_scale(b->scales, e / 16);
            const int lo = (b->qs[32 * half + l] >> (2 * j)) & 3;
            const int hbit = (b->hmask[l] >> (4 * half + j)) & 1;
            dst[e] = dl * (float)(lo - (hbit ? 0 : 4));
        }
    }
}

void pe_ref_dequant_q4_k(const void *src, float *dst, int64_t n) {
    const pe_block_q4_k *b = src;
    for (int64_t i = 0; i < n / PE_QK_K; i++, b++, dst += PE_QK_K) {
        const float d = pe_fp16_to_fp32(b->d), dmin = pe_fp16_to_fp32(b->dmin);
        for (int s = 0; s < 8; s++) {
            uint8_t sc, mn;
            pe_k_scale_min(b->scales, s, &sc, &mn);
            const float d1 = d * (float)sc, m1 = dmin * (float)mn;
            const uint8_t *q = b->qs + 32 * (s / 2);
            const int shift = 4 * (s % 2);
            for (int l = 0; l < 32; l++) dst[32 * s + l] = d1 * (float)((q[l] >> shift) & 15) - m1;
        }
    }
}

void pe_ref_dequant_q5_k(const void *src, float *dst, int64_t n) {
    const pe_block_q5_k *b = src;
    for (int64_t i = 0; i < n / PE_QK_K; i++, b++, dst += PE_QK_K) {
        const float d = pe_fp16_to_fp32(b->d), dmin = pe_fp16_to_fp32(b->dmin);
        for (int s = 0; s < 8; s++) {
            uint8_t sc, mn;
            pe_k_scale_min(b->scales, s, &sc, &mn);
            const float d1 = d * (float)sc, m1 = dmin * (float)mn;
            const uint8_t *q = b->qs + 32 * (s / 2);
            const int shift = 4 * (s % 2);
            for (int l = 0; l < 32; l++) {
                const int v = ((q[l] >> shift) & 15) | ((b->qh[l] >> s) & 1) << 4;
                dst[32 * s + l] = d1 * (float)v - m1;
            }
        }
    }
}

void pe_ref_dequant_q6_k(const void *src, float *dst, int64_t n) {
    const pe_block_q6_k *b = src;
    for (int64_t i = 0; i < n / PE_QK_K; i++, b++, dst += PE_QK_K) {
        const float d = pe_fp16_to_fp32(b->d);
        for (int e = 0; e < PE_QK_K; e++) {
            const int half = e / 128, r = e % 128;
            const int lo = (b->ql[64 * half + r % 64] >> (4 * (r / 64))) & 15;
            const int hi = (b->qh[32 * half + r % 32] >> (2 * (r / 32))) & 3;
            const float dl = d * (float)b->scales[e / 16];
            dst[e] = dl * (float)((lo | hi << 4) - 32);
        }
    }
}

/* Dot product through a dequantized block in a stack buffer; 8 partial sums in a fixed order. */
#define PE_REF_DOT(name, dequant, blck, tsize)                                          \
    static float name(const void *row, const float *x, int64_t n) {                     \
        float acc[8] = {0}, tmp[blck];                                                  \
        const uint8_t *src = row;                                                       \
        for (int64_t i = 0; i < n; i += (blck), src += (tsize), x += (blck)) {          \
            dequant(src, tmp, (blck));                                                  \
            for (int j = 0; j < (blck); j++) acc[j % 8] += tmp[j] * x[j];               \
        }                                                                               \
        return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])); \
    }

PE_REF_DOT(dot_q4_0, pe_ref_dequant_q4_0, PE_QK, 18)
PE_REF_DOT(dot_q4_1, pe_ref_dequant_q4_1, PE_QK, 20)
PE_REF_DOT(dot_q5_0, pe_ref_dequant_q5_0, PE_QK, 22)
PE_REF_DOT(dot_q5_1, pe_ref_dequant_q5_1, PE_QK, 24)
PE_REF_DOT(dot_q8_0, pe_ref_dequant_q8_0, PE_QK, 34)
PE_REF_DOT(dot_mxfp4, pe_ref_dequant_mxfp4, PE_QK, 17)
PE_REF_DOT(dot_q2_k, pe_ref_dequant_q2_k, PE_QK_K, 84)
PE_REF_DOT(dot_q3_k, pe_ref_dequant_q3_k, PE_QK_K, 110)
PE_REF_DOT(dot_q4_k, pe_ref_dequant_q4_k, PE_QK_K, 144)
PE_REF_DOT(dot_q5_k, pe_ref_dequant_q5_k, PE_QK_K, 176)
PE_REF_DOT(dot_q6_k, pe_ref_dequant_q6_k, PE_QK_K, 210)

/* Float rows: any n, so the 8 partial sums take element i mod 8 and the tail joins the same lanes. */
#define PE_REF_DOT_FLOAT(name, elem_t, convert)                                         \
    static float name(const void *row, const float *x, int64_t n) {                     \
        const elem_t *w = row;                                                          \
        float acc[8] = {0};                                                             \
        for (int64_t i = 0; i < n; i++) acc[i % 8] += convert(w[i]) * x[i];             \
        return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])); \
    }

#define PE_IDENTITY(v) (v)
PE_REF_DOT_FLOAT(dot_f32, float, PE_IDENTITY)
PE_REF_DOT_FLOAT(dot_f16, uint16_t, pe_fp16_to_fp32)
PE_REF_DOT_FLOAT(dot_bf16, uint16_t, pe_bf16_to_fp32)

/* ---- writers of the KV cache types (f32 -> type), as ggml's from_float --------------------------- */

static void quant_f32(const float *src, void *dst, int64_t n) { memcpy(dst, src, (size_t)n * 4); }

static void quant_f16(const float *src, void *dst, int64_t n) {
    uint16_t *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = pe_fp32_to_fp16(src[i]);
}

static void quant_bf16(const float *src, void *dst, int64_t n) {
    uint16_t *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = pe_fp32_to_bf16(src[i]);
}

/* llama.cpp's quantize_row_q8_0_ref: d = max|x| / 127 (stored as f16), q = round(x / d). */
static void quant_q8_0(const float *src, void *dst, int64_t n) {
    pe_block_q8_0 *b = dst;
    for (int64_t i = 0; i < n / PE_QK; i++, b++, src += PE_QK) {
        float amax = 0.0f;
        for (int j = 0; j < PE_QK; j++) amax = fabsf(src[j]) > amax ? fabsf(src[j]) : amax;
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        b->d = pe_fp32_to_fp16(d);
        for (int j = 0; j < PE_QK; j++) b->qs[j] = (int8_t)roundf(src[j] * id);
    }
}

void pe_kernels_ref(int type, pe_kernel_set *k) {
    switch (type) {
    case PE_TYPE_F32: *k = (pe_kernel_set){dequant_f32, dot_f32, NULL, quant_f32, NULL}; break;
    case PE_TYPE_F16: *k = (pe_kernel_set){dequant_f16, dot_f16, NULL, quant_f16, NULL}; break;
    case PE_TYPE_BF16: *k = (pe_kernel_set){dequant_bf16, dot_bf16, NULL, quant_bf16, NULL}; break;
    case PE_TYPE_Q4_0: *k = (pe_kernel_set){pe_ref_dequant_q4_0, dot_q4_0, NULL, NULL, NULL}; break;
    case PE_TYPE_Q4_1: *k = (pe_kernel_set){pe_ref_dequant_q4_1, dot_q4_1, NULL, NULL, NULL}; break;
    case PE_TYPE_Q5_0: *k = (pe_kernel_set){pe_ref_dequant_q5_0, dot_q5_0, NULL, NULL, NULL}; break;
    case PE_TYPE_Q5_1: *k = (pe_kernel_set){pe_ref_dequant_q5_1, dot_q5_1, NULL, NULL, NULL}; break;
    case PE_TYPE_Q8_0: *k = (pe_kernel_set){pe_ref_dequant_q8_0, dot_q8_0, NULL, quant_q8_0, NULL}; break;
    case PE_TYPE_MXFP4: *k = (pe_kernel_set){pe_ref_dequant_mxfp4, dot_mxfp4, NULL, NULL, NULL}; break;
    case PE_TYPE_Q2_K: *k = (pe_kernel_set){pe_ref_dequant_q2_k, dot_q2_k, NULL, NULL, NULL}; break;
    case PE_TYPE_Q3_K: *k = (pe_kernel_set){pe_ref_dequant_q3_k, dot_q3_k, NULL, NULL, NULL}; break;
    case PE_TYPE_Q4_K: *k = (pe_kernel_set){pe_ref_dequant_q4_k, dot_q4_k, NULL, NULL, NULL}; break;
    case PE_TYPE_Q5_K: *k = (pe_kernel_set){pe_ref_dequant_q5_k, dot_q5_k, NULL, NULL, NULL}; break;
    case PE_TYPE_Q6_K: *k = (pe_kernel_set){pe_ref_dequant_q6_k, dot_q6_k, NULL, NULL, NULL}; break;
    default: break;
    }
}
