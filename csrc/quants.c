/* The type-traits table (see quants.h) and its run-time SIMD dispatch, plus the exact half/bfloat16
 * conversions every kernel file shares. The kernels live in quants_ref.c (scalar), quants_avx2.c and
 * quants_avx512.c. */
#include "quants.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_features.h"
#include "quants_impl.h"

float pe_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal half -> normal float */
            int e = -1;
            do { mant <<= 1; e++; } while (!(mant & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t pe_fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t mant = x & 0x7fffff;
    if (((x >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = mant >> shift, rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)exp << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;
    return (uint16_t)half;
}

float pe_bf16_to_fp32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ggml_compute_fp32_to_bf16: round to nearest even, NaN kept quiet. */
uint16_t pe_fp32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 64);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

#define PE_TRAITS_ROW(name, id, blck, size) {PE_TYPE_##name, #name, blck, size, NULL, NULL, NULL, NULL, NULL},
static pe_type_traits traits[] = {PE_QUANT_FORMATS(PE_TRAITS_ROW)};
#undef PE_TRAITS_ROW

static pthread_once_t traits_once = PTHREAD_ONCE_INIT;

/* Each row starts from the scalar reference; each SIMD level the CPU allows overrides what it has. */
static void traits_init(void) {
    const pe_simd_level level = pe_simd_level_get();
    for (size_t i = 0; i < sizeof traits / sizeof traits[0]; i++) {
        pe_kernel_set k = {NULL, NULL, NULL, NULL, NULL, NULL};
        pe_kernels_ref(traits[i].type, &k);
        if (level >= PE_SIMD_AVX2) pe_kernels_avx2(traits[i].type, &k);
        if (level >= PE_SIMD_AVX512) pe_kernels_avx512(traits[i].type, &k);
        traits[i].dequant_row = k.dequant_row;
        traits[i].dot_f32 = k.dot_f32;
        traits[i].dot_q8 = k.dot_q8;
        traits[i].quantize_row = k.quantize_row;
        traits[i].dot_q8_tok = k.dot_q8_tok;
        traits[i].dot_f32_tok = k.dot_f32_tok;
    }
}

const pe_type_traits *pe_type_traits_get(int type) {
    pthread_once(&traits_once, traits_init);
    for (size_t i = 0; i < sizeof traits / sizeof traits[0]; i++)
        if (traits[i].type == type) return &traits[i];
    return NULL;
}

void pe_dequantize_rows(int type, const void *src, int64_t src_stride, float *dst, int64_t n_rows, int64_t n) {
    const pe_dequant_row_fn f = pe_type_traits_get(type)->dequant_row;
    const uint8_t *s = src;
#pragma omp parallel for schedule(static) if (n_rows * n >= (1 << 18))
    for (int64_t r = 0; r < n_rows; r++) f(s + r * src_stride, dst + r * n, n);
}

void pe_dot_rows(int type, const void *src, int64_t src_stride, const float *x, float *out, int64_t n_rows,
                 int64_t n) {
    const pe_dot_f32_fn f = pe_type_traits_get(type)->dot_f32;
    const uint8_t *s = src;
#pragma omp parallel for schedule(static) if (n_rows * n >= (1 << 18))
    for (int64_t r = 0; r < n_rows; r++) out[r] = f(s + r * src_stride, x, n);
}

int pe_dot_rows_q8(int type, const void *src, int64_t src_stride, const float *x, float *out, int64_t n_rows,
                   int64_t n) {
    const pe_dot_q8_fn f = pe_type_traits_get(type)->dot_q8;
    void *buf = aligned_alloc(64, pe_act_q8_bytes(n));
    if (!buf) return -1;
    const pe_act_q8 xq = pe_act_q8_quantize(x, n, buf);
    const uint8_t *s = src;
    const int64_t n_groups = (n_rows + PE_DOT_Q8_ROWS - 1) / PE_DOT_Q8_ROWS;
#pragma omp parallel for schedule(static) if (n_rows * n >= (1 << 18))
    for (int64_t g = 0; g < n_groups; g++) {
        const int64_t r0 = g * PE_DOT_Q8_ROWS;
        const int nr = n_rows - r0 < PE_DOT_Q8_ROWS ? (int)(n_rows - r0) : PE_DOT_Q8_ROWS;
        f(s + r0 * src_stride, src_stride, nr, &xq, n, out + r0);
    }
    free(buf);
    return 0;
}

size_t pe_row_size(int type, int64_t n) {
    const pe_type_traits *t = pe_type_traits_get(type);
    return t ? (size_t)(n / t->blck_size) * (size_t)t->type_size : 0;
}
