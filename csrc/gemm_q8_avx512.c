/* Prefill products with int8 activations (AVX-512 VNNI) for Q8_0, Q4_0 and MXFP4 weights: tiles of
 * 16 rows, repacked once per tile, times every token of the batch.
 *
 * Why: a batch of tokens reuses each weight many times, so the work is arithmetic, not memory. The
 * float32 path dequantizes a tile and runs an FMA kernel (16 multiply-adds per instruction); here
 * one vpdpbusd does 64 byte multiply-adds, and the layout makes it produce 16 rows' partial sums
 * at once with no horizontal reduction: the tile is repacked so that each 64-byte vector holds four
 * consecutive codes of each of the 16 rows (a dword per row), and the token's matching four
 * activation codes are broadcast to every dword. Per 32-element block, 8 such steps per digit, then
 * one conversion and one multiply-add with the 16 rows' scales times the token's block scale.
 *
 * The numbers are those of the decode kernels (dot_q8_avx512.c): two activation digits (pe_act_q8),
 * weight codes made unsigned by an offset, the offset times the combined code sum subtracted, and
 * each (row, block) integer sum converted to float once; only the order in which the per-block
 * floats are added differs (here: block by block). Each output belongs to one thread and is
 * computed the same way whatever the thread count or the token grouping. */
#include "gemm_q8.h"

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_features.h"
#include "quants_impl.h"

enum { TILE = 16, TOK = 4 };

/* One row of nb blocks -> unsigned codes (value + offset) in element order, and the block scales. */
typedef void (*unpack_fn)(const uint8_t *row, int64_t nb, uint8_t *codes, float *scales);

static inline void store_nibbles(uint8_t *dst, __m128i v, __m128i lut) {
    const __m128i m = _mm_set1_epi8(15);
    _mm_storeu_si128((__m128i *)dst, _mm_shuffle_epi8(lut, _mm_and_si128(v, m)));
    _mm_storeu_si128((__m128i *)(dst + 16), _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(v, 4), m)));
}

static void unpack_mxfp4(const uint8_t *row, int64_t nb, uint8_t *codes, float *scales) {
    static const int8_t lut_bytes[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};
    const __m128i lut = _mm_loadu_si128((const __m128i *)lut_bytes);
    for (int64_t b = 0; b < nb; b++) {
        const pe_block_mxfp4 *blk = (const pe_block_mxfp4 *)(row + 17 * b);
        const uint32_t bits = pe_e8m0_half_bits(blk->e);
        memcpy(&scales[b], &bits, 4);
        store_nibbles(codes + 32 * b, _mm_loadu_si128((const __m128i *)blk->qs), lut);
    }
}

static void unpack_q4_0(const uint8_t *row, int64_t nb, uint8_t *codes, float *scales) {
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t b = 0; b < nb; b++) {
        const pe_block_q4_0 *blk = (const pe_block_q4_0 *)(row + 18 * b);
        scales[b] = _cvtsh_ss(blk->d);
        store_nibbles(codes + 32 * b, _mm_loadu_si128((const __m128i *)blk->qs), lut);
    }
}

static void unpack_q8_0(const uint8_t *row, int64_t nb, uint8_t *codes, float *scales) {
    for (int64_t b = 0; b < nb; b++) {
        const pe_block_q8_0 *blk = (const pe_block_q8_0 *)(row + 34 * b);
        scales[b] = _cvtsh_ss(blk->d);
        _mm256_storeu_si256((__m256i *)(codes + 32 * b),
                            _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)blk->qs), _mm256_set1_epi8((char)0x80)));
    }
}

/* Tokens t < NT of one tile: out[t][0..16) = the 16 rows' dots. packed: nb blocks x 8 steps x 64
 * bytes; ws: nb x 16 row scales. */
static inline __attribute__((always_inline)) void tile_tokens(const uint8_t *packed, const float *ws, int64_t nb,
                                                             const pe_act_q8 *x, const int NT, float offset,
                                                             __m512 f[TOK]) {
    const __m512 voff = _mm512_set1_ps(offset);
    for (int t = 0; t < NT; t++) f[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i a[TOK], al[TOK];
        for (int t = 0; t < NT; t++) a[t] = al[t] = _mm512_setzero_si512();
        const uint8_t *pb = packed + b * 8 * 64;
        for (int c = 0; c < 8; c++) {
            const __m512i w = _mm512_load_si512(pb + 64 * c);
            for (int t = 0; t < NT; t++) {
                int32_t q, l;
                memcpy(&q, x[t].qs + 32 * b + 4 * c, 4);
                memcpy(&l, x[t].ql + 32 * b + 4 * c, 4);
                a[t] = _mm512_dpbusd_epi32(a[t], w, _mm512_set1_epi32(q));
                al[t] = _mm512_dpbusd_epi32(al[t], w, _mm512_set1_epi32(l));
            }
        }
        const __m512 wsb = _mm512_load_ps(ws + 16 * b);
        for (int t = 0; t < NT; t++) {
            const __m512i s = _mm512_add_epi32(_mm512_mullo_epi32(a[t], _mm512_set1_epi32(254)), al[t]);
            const __m512 v = _mm512_sub_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(_mm512_set1_ps(x[t].s32x[b]), voff));
            const __m512 sc = _mm512_mul_ps(wsb, _mm512_set1_ps(x[t].d[b] * (1.0f / 254.0f)));
            f[t] = _mm512_fmadd_ps(v, sc, f[t]);
        }
    }
}

typedef struct {
    unpack_fn unpack;
    float offset;
} pe_gemm_q8_format;

static int format_of(int type, pe_gemm_q8_format *f) {
    switch (type) {
    case PE_TYPE_Q8_0: *f = (pe_gemm_q8_format){unpack_q8_0, 128.0f}; return 1;
    case PE_TYPE_Q4_0: *f = (pe_gemm_q8_format){unpack_q4_0, 8.0f}; return 1;
    case PE_TYPE_MXFP4: *f = (pe_gemm_q8_format){unpack_mxfp4, 12.0f}; return 1;
    default: return 0;
    }
}

int pe_gemm_q8_supported(int type) {
    pe_gemm_q8_format f;
    return pe_simd_level_get() >= PE_SIMD_AVX512 && format_of(type, &f);
}

size_t pe_gemm_q8_scratch_bytes(int64_t n_in) {
    const int64_t nb = n_in / 32;
    /* row-major codes, packed codes, row-major scales, packed scales */
    return (size_t)(TILE * n_in) * 2 + (size_t)(TILE * nb) * 4 * 2 + 256;
}

void pe_gemm_q8_tile(int type, const uint8_t *rows, int64_t stride, int nr, int64_t n_in, const pe_act_q8 *x,
                     int64_t n_tok, const float *bias, float *y, int64_t ldy, void *scratch) {
    pe_gemm_q8_format fmt;
    format_of(type, &fmt);
    const int64_t nb = n_in / 32;
    uint8_t *base = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    uint8_t *codes = base, *packed = base + TILE * n_in;
    float *scales = (float *)(packed + TILE * n_in), *ws = scales + TILE * nb;
    for (int r = 0; r < TILE; r++) /* rows past nr repeat the last one */
        fmt.unpack(rows + (r < nr ? r : nr - 1) * stride, nb, codes + r * n_in, scales + r * nb);
    /* packed[b][c][r] = the 4 codes 32b + 4c .. of row r; ws[b][r] = row r's scale of block b */
    const uint32_t *src = (const uint32_t *)codes;
    uint32_t *dst = (uint32_t *)packed;
    for (int64_t k = 0; k < nb * 8; k++)
        for (int r = 0; r < TILE; r++) dst[k * TILE + r] = src[r * (n_in / 4) + k];
    for (int64_t b = 0; b < nb; b++)
        for (int r = 0; r < TILE; r++) ws[b * TILE + r] = scales[r * nb + b];
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    const __m512 vb = bias ? _mm512_maskz_loadu_ps(keep, bias) : _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < n_tok; t0 += TOK) {
        const int nt = n_tok - t0 < TOK ? (int)(n_tok - t0) : TOK;
        __m512 f[TOK];
        switch (nt) {
        case 4: tile_tokens(packed, ws, nb, x + t0, 4, fmt.offset, f); break;
        case 3: tile_tokens(packed, ws, nb, x + t0, 3, fmt.offset, f); break;
        case 2: tile_tokens(packed, ws, nb, x + t0, 2, fmt.offset, f); break;
        default: tile_tokens(packed, ws, nb, x + t0, 1, fmt.offset, f); break;
        }
        for (int t = 0; t < nt; t++) _mm512_mask_storeu_ps(y + (t0 + t) * ldy, keep, _mm512_add_ps(f[t], vb));
    }
}
