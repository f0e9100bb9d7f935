/* Writing K/V cache elements of the float types (F32, F16, BF16) on the device, bit for bit as the
 * CPU's writers (csrc/quants.c): shared by the cache store (attention_cuda.cu) and the q|k|v product
 * that stores K and V itself (matvec_q8_cuda.cu). */
#ifndef PE_CU_KV_DEV_CUH
#define PE_CU_KV_DEV_CUH

#include "compat.h"
#include "quant_dev.cuh"

PE_DEVICE inline uint32_t cuk_float_bits(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
#endif
}

/* float -> IEEE half bits, round to nearest even: bit for bit csrc/quants.c's pe_fp32_to_fp16. */
PE_DEVICE inline uint16_t cuk_f32_to_f16(float f) {
    const uint32_t x = cuk_float_bits(f), sign = (x >> 16) & 0x8000u, mant = x & 0x7fffffu;
    const int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    if (((x >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0u));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        const uint32_t m = mant | 0x800000u, shift = (uint32_t)(14 - exp);
        uint32_t half = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)exp << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) half++;
    return (uint16_t)half;
}

/* float -> bfloat16 bits, round to nearest even, NaN kept quiet (pe_fp32_to_bf16). */
PE_DEVICE inline uint16_t cuk_f32_to_bf16(float f) {
    const uint32_t x = cuk_float_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 64);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

/* Element c of the F32/F16/BF16 cache row dst = v. */
PE_DEVICE inline void cuk_kv_put(uint8_t *dst, int type, int64_t c, float v) {
    if (type == CUQ_F16) ((uint16_t *)dst)[c] = cuk_f32_to_f16(v);
    else if (type == CUQ_BF16) ((uint16_t *)dst)[c] = cuk_f32_to_bf16(v);
    else ((float *)dst)[c] = v;
}

#endif
