/* Device side of the int8 activations (matvec_q8_cuda.h): one warp quantizes one block of 32
 * floats, lane l holding element l. Shared by the RMSNorm kernel (ops_cuda.cu), which quantizes its
 * output as it writes it, and the standalone quantizer (matvec_q8_cuda.cu). */
#ifndef PE_CU_ACT_Q8_DEV_CUH
#define PE_CU_ACT_Q8_DEV_CUH

#include "compat.h"

/* Bytes between quantized rows of n elements: n codes, n second digits, n / 32 float scales,
 * rounded up to 16 bytes so every row starts where a 16-byte load may. */
PE_HOSTDEV inline int64_t pe_cu_act_q8_row_bytes(int64_t n) { return (2 * n + n / 8 + 15) & ~(int64_t)15; }

/* Block b of the quantized row `row` (n elements) from v (lane l: element 32 b + l), as
 * csrc/act_q8.c: d = max|x| / 127, s = x / d (as x * (1 / d)), q = round(s), ql = round((s - q) *
 * 254), half away from zero. Every lane of the warp calls it (warp shuffles). */
PE_DEVICE inline void pe_cu_act_q8_block(float v, int lane, uint8_t *row, int64_t n, int64_t b) {
    float amax = fabsf(v);
    for (int m = 16; m > 0; m >>= 1) amax = fmaxf(amax, pe_shfl_xor(amax, m));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    const float s = v * id;
    const float q = roundf(s);
    const float l = roundf((s - q) * 254.0f);
    row[32 * b + lane] = (uint8_t)(int8_t)(int)q;
    row[n + 32 * b + lane] = (uint8_t)(int8_t)(int)l;
    if (lane == 0) ((float *)(row + 2 * n))[b] = d;
}

#endif
