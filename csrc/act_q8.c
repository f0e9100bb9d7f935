/* Activations quantized once per token for the int8 kernels (see pe_act_q8 in quants.h). Plain C:
 * a few thousand floats per matrix product, next to megabytes of weights, so speed is no concern;
 * the rounding is C's roundf (half away from zero), as ggml's quantize_row_q8_0. */
#include <math.h>
#include <string.h>

#include "quants.h"

enum { PE_ACT_PAD = 128 }; /* zero codes past the end: four blocks */

static size_t align64(size_t b) { return (b + 63) & ~(size_t)63; }

size_t pe_act_q8_bytes(int64_t n) {
    const size_t nb = (size_t)n / 32;
    return align64((size_t)n + PE_ACT_PAD) * 2 + align64((nb + 4) * 4) * 3 + align64((2 * nb + 8) * 4) * 2;
}

/* round-half-away-from-zero as an int (|v| <= 127.5 here) */
static int round_away(float v) { return (int)roundf(v); }

pe_act_q8 pe_act_q8_quantize(const float *x, int64_t n, void *buf) {
    const int64_t nb = n / 32;
    int8_t *qs = buf;
    int8_t *ql = qs + align64((size_t)n + PE_ACT_PAD);
    float *d = (float *)(ql + align64((size_t)n + PE_ACT_PAD));
    float *s32 = (float *)((uint8_t *)d + align64((size_t)(nb + 4) * 4));
    float *s32x = (float *)((uint8_t *)s32 + align64((size_t)(nb + 4) * 4));
    float *s16 = (float *)((uint8_t *)s32x + align64((size_t)(nb + 4) * 4));
    float *s16x = (float *)((uint8_t *)s16 + align64((size_t)(2 * nb + 8) * 4));
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        int sum[2] = {0, 0}, suml[2] = {0, 0};
        for (int j = 0; j < 32; j++) {
            const float v = xb[j] * id;
            const int q = round_away(v);
            const int l = round_away((v - (float)q) * 254.0f); /* v - q is exact: |v - q| <= 0.5 */
            qs[32 * b + j] = (int8_t)q;
            ql[32 * b + j] = (int8_t)l;
            sum[j / 16] += q;
            suml[j / 16] += l;
        }
        d[b] = db;
        s32[b] = (float)(sum[0] + sum[1]);
        s32x[b] = (float)(254 * (sum[0] + sum[1]) + suml[0] + suml[1]);
        s16x[2 * b] = (float)(254 * sum[0] + suml[0]);
        s16x[2 * b + 1] = (float)(254 * sum[1] + suml[1]);
        s16[2 * b] = (float)sum[0];
        s16[2 * b + 1] = (float)sum[1];
    }
    memset(qs + n, 0, PE_ACT_PAD);
    memset(ql + n, 0, PE_ACT_PAD);
    memset(d + nb, 0, 4 * sizeof(float));
    memset(s32 + nb, 0, 4 * sizeof(float));
    memset(s32x + nb, 0, 4 * sizeof(float));
    memset(s16 + 2 * nb, 0, 8 * sizeof(float));
    memset(s16x + 2 * nb, 0, 8 * sizeof(float));
    return (pe_act_q8){qs, ql, d, s32, s16, s32x, s16x};
}
