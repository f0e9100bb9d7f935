/* The prefill tiles' integer products on Intel AMX, for the formats with sub-blocks of 32 (Q8_0,
 * Q4_0, MXFP4, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K): one TDPBSUD multiplies 16 tokens' activation digits
 * (signed bytes, a 16 x 32 tile read in place from the quantized activations) by one sub-block of the
 * packed weight tile (unsigned codes, 8 rows of 64 bytes: four codes of each of the 16 rows, exactly
 * the layout gemm_q8_avx512.c packs for vpdpbusd) into 16 x 16 int32 sums: the work of 64 vpdpbusd,
 * per digit.
 *
 * Why: prefill on AVX-512 VNNI runs at the int8 peak of the cores (two vpdpbusd per 64 weights and
 * token, for the two activation digits), and a gpt-oss prompt spends ~90 % of its time in these
 * products. The tile unit does the byte products; the vector units keep the per-sub-block step
 * (254 h + l, the offset, one conversion, one multiply-add with the rows' scales times the token's,
 * the minimum), done as gemm_q8_avx512.c's tile loop does it and in the same order: the same bits.
 *
 * What holds it back: each sub-block's 16 x 16 sums of both digits go through memory (two tile
 * stores, 2 KiB, read back by the vector step), and on the Intel box of bench/RESULTS.md the tile
 * work and the vector step hardly overlap: a 5760 x 2880 MXFP4 product of 64 tokens on one core took
 * 3.3 ms of tile work, 3.7 ms of vector steps and 1.0 ms of packing, against 10.5 ms for the VNNI
 * loop (1.22-1.40x on the formats above, 2 threads, 128 tokens). With sub-blocks of 16 (Q2_K, Q3_K,
 * Q6_K) twice the sums go through memory per weight and AMX ran 0.84-0.89x the VNNI loop, so those
 * formats stay there.
 *
 * Tile registers: 0, 1 the sums of the high and low digits; 4, 5 the 16 tokens' digits of one
 * sub-block; 6 the weights' sub-block. Each call configures them (ldtilecfg from static memory: GCC
 * 12's _tile_loadconfig gives the instruction an 8-byte operand, so the compiler may drop stores to
 * a config on the stack) and releases them when done. */
#include "gemm_q8_amx.h"

#include <immintrin.h>
#include <pthread.h>

#include "cpu_features.h"
#include "gemm_q8_step.h"

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__)
#include <cpuid.h>

static int detect(void) {
    unsigned int a, b, c, d;
    if (!pe_cpu_amx_allowed() || pe_simd_level_get() < PE_SIMD_AVX512) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return 0;
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0x60000) != 0x60000) return 0; /* the OS manages XTILECFG and XTILEDATA */
#if defined(__linux__)
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}
#else
static int detect(void) { return 0; }
#endif

static int ready;
static pthread_once_t ready_once = PTHREAD_ONCE_INIT;
static void ready_init(void) { ready = detect(); }

int pe_gemm_q8_amx_ready(void) {
    pthread_once(&ready_once, ready_init);
    return ready;
}

enum { G = 32 }; /* elements per sub-block */

/* Palette 1; colsb (bytes per row) and rows per tile: C 16 x 64 (0, 1), A 16 x 32 (4, 5), B 8 x 64 (6). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static const tile_config config __attribute__((aligned(64))) = {
    1, 0, {0}, {64, 64, 0, 0, G, G, 64}, {16, 16, 0, 0, 16, 16, G / 4}};

static inline void load_config(const tile_config *c) { __asm__ volatile("ldtilecfg %0" ::"m"(*c)); }

/* How many sub-blocks ahead of the vector steps the tile products run: each step reads sums the
 * tile unit stored AHEAD sub-blocks earlier, so that it does not wait for them to reach the cache. */
enum { AHEAD = 4, RING = AHEAD + 1 };

/* The digit sums of sub-block j (tiles 0 and 1: high and low digits) stored to sums[0..2). */
static inline __attribute__((always_inline)) void block_sums(const uint8_t *packed, const pe_act_q8 *x,
                                                            int64_t xstride, int64_t j, int32_t sums[2][16][16]) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(4, x[0].qs + G * j, xstride);
    _tile_loadd(5, x[0].ql + G * j, xstride);
    _tile_loadd(6, packed + j * (G / 4) * 64, 64);
    _tile_dpbsud(0, 4, 6);
    _tile_dpbsud(1, 5, 6);
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[1], 64);
}

/* The 16 tokens x[0..16) of one tile (MIN: the format has minimums, else an offset): sub-block
 * j + AHEAD's tile products are issued before sub-block j's vector steps (a ring of RING buffers). */
static inline __attribute__((always_inline)) void tokens16(const uint8_t *packed, const float *ws, const float *wm,
                                                          int64_t nsub, const int MIN, const pe_act_q8 *x,
                                                          int64_t xstride, pe_gemm_q8_consts k, __mmask16 keep,
                                                          __m512 vb, float *y, int64_t ldy) {
    int32_t sums[RING][2][16][16] __attribute__((aligned(64)));
    __m512 f[16];
    for (int t = 0; t < 16; t++) f[t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < AHEAD && j < nsub; j++) block_sums(packed, x, xstride, j, sums[j]);
    for (int64_t j = 0; j < nsub; j++) {
        if (j + AHEAD < nsub) block_sums(packed, x, xstride, j + AHEAD, sums[(j + AHEAD) % RING]);
        int32_t(*S)[16][16] = sums[j % RING];
        const __m512 wsj = _mm512_load_ps(ws + 16 * j);
        for (int t = 0; t < 16; t++)
            f[t] = pe_gemm_q8_step(f[t], _mm512_load_si512(S[0][t]), _mm512_load_si512(S[1][t]), wsj, wm + 16 * j, k,
                                   t * nsub + j, MIN);
    }
    for (int t = 0; t < 16; t++) _mm512_mask_storeu_ps(y + t * ldy, keep, _mm512_add_ps(f[t], vb));
}

/* Every group of 16 tokens, for one of the two shapes (with an offset, with minimums). */
#define PE_AMX_SHAPE(NAME, MIN)                                                                                   \
    static __attribute__((noinline)) void NAME(const uint8_t *packed, const float *ws, const float *wm,          \
                                               int64_t nsub, const pe_act_q8 *x, int64_t n16, int64_t xstride,    \
                                               pe_gemm_q8_consts k, __mmask16 keep, __m512 vb, float *y,         \
                                               int64_t ldy) {                                                    \
        for (int64_t g = 0; g < n16; g++) {                                                                     \
            const int64_t o = 16 * g * nsub;                                                                    \
            const pe_gemm_q8_consts kg = {k.dx + o, k.dxs + o, k.off + o};                                      \
            tokens16(packed, ws, wm, nsub, MIN, x + 16 * g, xstride, kg, keep, vb, y + 16 * g * ldy, ldy);      \
        }                                                                                                       \
    }
PE_AMX_SHAPE(amx_offset, 0)
PE_AMX_SHAPE(amx_min, 1)
#undef PE_AMX_SHAPE

void pe_gemm_q8_amx(const uint8_t *packed, const float *ws, const float *wm, int64_t nsub, int has_min,
                    const pe_act_q8 *x, int64_t n16, int64_t xstride, pe_gemm_q8_consts k, uint16_t keep,
                    const float *bias, float *y, int64_t ldy) {
    const __m512 vb = bias ? _mm512_maskz_loadu_ps(keep, bias) : _mm512_setzero_ps();
    load_config(&config);
    (has_min ? amx_min : amx_offset)(packed, ws, wm, nsub, x, n16, xstride, k, keep, vb, y, ldy);
    _tile_release();
}
