/* Device-side dequantization of one weight element, for every type the CPU engine reads (F32, F16,
 * BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, MXFP4).
 *
 * Block layouts and byte order: gguf-py's gguf/quants.py and csrc/quants_impl.h. Each element is
 * computed with the same float32 operations, in the same order, as csrc/quants_ref.c (itself
 * bit-identical to gguf.quants.dequantize). A product that flows into an add or subtract goes
 * through cuq_mul, so nvcc cannot fuse it into an FMA whatever its --fmad setting: this header
 * needs no special nvcc flag.
 *
 * The element functions take the block holding the element and its index inside the block, so one
 * warp lane can decode one element: the lanes of a warp then read adjacent bytes (coalesced) and
 * the scale bytes by broadcast. Bytes are read one at a time, so no alignment is assumed for the
 * block formats; F32/F16/BF16 elements are read as aligned 4-/2-byte words (callers check). */
#ifndef PE_CUQ_QUANT_DEV_CUH
#define PE_CUQ_QUANT_DEV_CUH

#include "compat.h"
#include "../quant_formats.h"

#include <stdint.h>

/* ggml type ids and block geometry, from the one list in csrc/quant_formats.h. */
#define CUQ_ENUM(name, id, blck, size) CUQ_##name = id,
enum { PE_QUANT_FORMATS(CUQ_ENUM) };
#undef CUQ_ENUM

/* Elements per block and bytes per block of type T. */
template <int T> struct cuq_traits;
#define CUQ_TRAITS(name, id, B, S)              \
    template <> struct cuq_traits<id> {         \
        static constexpr int blck = B;          \
        static constexpr int size = S;          \
    };
PE_QUANT_FORMATS(CUQ_TRAITS)
#undef CUQ_TRAITS

/* a * b rounded to float32 and never contracted with a following add: __fmul_rn on the GPU (never
 * fused, whatever --fmad says); the emulator build is compiled with -ffp-contract=off. */
PE_DEVICE inline float cuq_mul(float a, float b) {
#ifdef PE_CUDA_EMU
    return a * b;
#else
    return __fmul_rn(a, b);
#endif
}

/* Little-endian half at p (any alignment). */
PE_DEVICE inline float cuq_half(const uint8_t *p) {
    return pe_cu_fp16_to_fp32((uint16_t)(p[0] | (p[1] << 8)));
}

/* MXFP4 block scale 2^(e-128) (the E2M1 values below are doubled), denormal for e < 2, as
 * ggml_e8m0_to_fp32_half. */
PE_DEVICE inline float cuq_e8m0_half(uint8_t e) {
    return pe_cu_bits_to_float(e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23);
}

/* Doubled E2M1 value of a 4-bit code (bit 3 = sign): magnitudes 0,1,2,3,4,6,8,12 packed 4 bits each. */
PE_DEVICE inline int cuq_e2m1(int code) {
    const int mag = (int)((0xC8643210u >> (4 * (code & 7))) & 15u);
    return (code & 8) ? -mag : mag;
}

/* Low 4 bits (k < 16) or high 4 bits (k >= 16) of byte k % 16 of qs: the 32-element 4-bit layout. */
PE_DEVICE inline int cuq_nibble32(const uint8_t *qs, int k) {
    return k < 16 ? qs[k] & 15 : qs[k - 16] >> 4;
}

/* Bit k of the 32-bit little-endian high-bit mask of Q5_0/Q5_1. */
PE_DEVICE inline int cuq_qh_bit(const uint8_t *qh, int k) { return (qh[k >> 3] >> (k & 7)) & 1; }

/* 6-bit scale (want_min = 0) or min (want_min = 1) of sub-block j (0..7) of a Q4_K/Q5_K block. */
PE_DEVICE inline int cuq_k_scale_min(const uint8_t *s, int j, int want_min) {
    if (j < 4) return s[j + 4 * want_min] & 63;
    return want_min ? (s[j + 4] >> 4) | ((s[j] >> 6) << 4) : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
}

/* Signed 6-bit scale k (0..15) of a Q3_K block. */
PE_DEVICE inline int cuq_q3_k_scale(const uint8_t *s, int k) {
    const int lo = k < 8 ? s[k] & 15 : s[k - 8] >> 4;
    const int hi = (s[8 + (k & 3)] >> (2 * (k >> 2))) & 3;
    return (lo | (hi << 4)) - 32;
}

/* Element k (0 <= k < blck) of the block at b; for the float types b points at the element, k = 0.
 * Formulas and operation order as csrc/quants_ref.c. */
template <int T> PE_DEVICE inline float cuq_elem(const uint8_t *b, int k) {
    if constexpr (T == CUQ_F32) {
        return *(const float *)b;
    } else if constexpr (T == CUQ_F16) {
        return pe_cu_fp16_to_fp32(*(const uint16_t *)b);
    } else if constexpr (T == CUQ_BF16) {
        return pe_cu_bf16_to_fp32(*(const uint16_t *)b);
    } else if constexpr (T == CUQ_Q4_0) { /* f16 d | 16 bytes of nibbles; d * (q - 8) */
        return cuq_half(b) * (float)(cuq_nibble32(b + 2, k) - 8);
    } else if constexpr (T == CUQ_Q4_1) { /* f16 d | f16 m | 16 bytes of nibbles; d * q + m */
        return cuq_mul(cuq_half(b), (float)cuq_nibble32(b + 4, k)) + cuq_half(b + 2);
    } else if constexpr (T == CUQ_Q5_0) { /* f16 d | u32 high bits | 16 bytes of nibbles; d * (q - 16) */
        const int q = cuq_nibble32(b + 6, k) | cuq_qh_bit(b + 2, k) << 4;
        return cuq_half(b) * (float)(q - 16);
    } else if constexpr (T == CUQ_Q5_1) { /* f16 d | f16 m | u32 high bits | 16 bytes of nibbles; d * q + m */
        const int q = cuq_nibble32(b + 8, k) | cuq_qh_bit(b + 4, k) << 4;
        return cuq_mul(cuq_half(b), (float)q) + cuq_half(b + 2);
    } else if constexpr (T == CUQ_Q8_0) { /* f16 d | 32 int8; q * d */
        return (float)(int8_t)b[2 + k] * cuq_half(b);
    } else if constexpr (T == CUQ_MXFP4) { /* e8m0 e | 16 bytes of E2M1 nibbles; 2^(e-128) * doubled value */
        return cuq_e8m0_half(b[0]) * (float)cuq_e2m1(cuq_nibble32(b + 1, k));
    } else if constexpr (T == CUQ_Q2_K) { /* scales[16] | qs[64] | f16 d | f16 dmin; (d*sc) * q - dmin*m */
        const int half = k >> 7, j = (k & 127) >> 5, l = k & 31, sc = b[k >> 4];
        const float dl = cuq_half(b + 80) * (float)(sc & 15);
        const int q = (b[16 + 32 * half + l] >> (2 * j)) & 3;
        return cuq_mul(dl, (float)q) - cuq_mul(cuq_half(b + 82), (float)(sc >> 4));
    } else if constexpr (T == CUQ_Q3_K) { /* hmask[32] | qs[64] | scales[12] | f16 d; (d*sc) * (q - 4*!h) */
        const int half = k >> 7, j = (k & 127) >> 5, l = k & 31;
        const float dl = cuq_half(b + 108) * (float)cuq_q3_k_scale(b + 96, k >> 4);
        const int lo = (b[32 + 32 * half + l] >> (2 * j)) & 3;
        const int hbit = (b[l] >> (4 * half + j)) & 1;
        return dl * (float)(lo - (hbit ? 0 : 4));
    } else if constexpr (T == CUQ_Q4_K) { /* f16 d | f16 dmin | scales[12] | qs[128]; (d*sc) * q - dmin*m */
        const int s = k >> 5, l = k & 31;
        const float d1 = cuq_half(b) * (float)cuq_k_scale_min(b + 4, s, 0);
        const int q = (b[16 + 32 * (s >> 1) + l] >> (4 * (s & 1))) & 15;
        return cuq_mul(d1, (float)q) - cuq_mul(cuq_half(b + 2), (float)cuq_k_scale_min(b + 4, s, 1));
    } else if constexpr (T == CUQ_Q5_K) { /* f16 d | f16 dmin | scales[12] | qh[32] | qs[128] */
        const int s = k >> 5, l = k & 31;
        const float d1 = cuq_half(b) * (float)cuq_k_scale_min(b + 4, s, 0);
        const int q = ((b[48 + 32 * (s >> 1) + l] >> (4 * (s & 1))) & 15) | ((b[16 + l] >> s) & 1) << 4;
        return cuq_mul(d1, (float)q) - cuq_mul(cuq_half(b + 2), (float)cuq_k_scale_min(b + 4, s, 1));
    } else { /* Q6_K: ql[128] | qh[64] | int8 scales[16] | f16 d; (d*sc) * (q - 32) */
        static_assert(T == CUQ_Q6_K, "unknown weight type");
        const int half = k >> 7, r = k & 127;
        const int lo = (b[64 * half + (r & 63)] >> (4 * (r >> 6))) & 15;
        const int hi = (b[128 + 32 * half + (r & 31)] >> (2 * (r >> 5))) & 3;
        const float dl = cuq_half(b + 208) * (float)(int8_t)b[192 + (k >> 4)];
        return dl * (float)((lo | hi << 4) - 32);
    }
}

/* Element k (0 <= k < elements per row) of the row at row. */
template <int T> PE_DEVICE inline float cuq_row_elem(const uint8_t *row, int64_t k) {
    constexpr int B = cuq_traits<T>::blck;
    return cuq_elem<T>(row + (k / B) * cuq_traits<T>::size, (int)(k % B));
}

/* Calls F::template run<T>(args...) for the ggml type id `type`; returns 1 for an unknown type. */
template <class F, class... A> inline int cuq_dispatch(int type, A... args) {
    switch (type) {
    case CUQ_F32: return F::template run<CUQ_F32>(args...);
    case CUQ_F16: return F::template run<CUQ_F16>(args...);
    case CUQ_BF16: return F::template run<CUQ_BF16>(args...);
    case CUQ_Q4_0: return F::template run<CUQ_Q4_0>(args...);
    case CUQ_Q4_1: return F::template run<CUQ_Q4_1>(args...);
    case CUQ_Q5_0: return F::template run<CUQ_Q5_0>(args...);
    case CUQ_Q5_1: return F::template run<CUQ_Q5_1>(args...);
    case CUQ_Q8_0: return F::template run<CUQ_Q8_0>(args...);
    case CUQ_MXFP4: return F::template run<CUQ_MXFP4>(args...);
    case CUQ_Q2_K: return F::template run<CUQ_Q2_K>(args...);
    case CUQ_Q3_K: return F::template run<CUQ_Q3_K>(args...);
    case CUQ_Q4_K: return F::template run<CUQ_Q4_K>(args...);
    case CUQ_Q5_K: return F::template run<CUQ_Q5_K>(args...);
    case CUQ_Q6_K: return F::template run<CUQ_Q6_K>(args...);
    default: return 1;
    }
}

#endif
