/* Prefill products with int8 activations (AVX-512 VNNI) for the block formats (Q8_0, Q4_0, MXFP4,
 * Q4_1, Q5_0, Q5_1, Q2_K..Q6_K): tiles of 16 rows, repacked once per tile, times every token of the
 * batch.
 *
 * Why: a batch of tokens reuses each weight many times, so the work is arithmetic, not memory. The
 * float32 path dequantizes a tile and runs an FMA kernel (16 multiply-adds per instruction); here
 * one vpdpbusd does 64 byte multiply-adds, and the layout makes it produce 16 rows' partial sums
 * at once with no horizontal reduction: the tile is repacked so that each 64-byte vector holds four
 * consecutive codes of each of the 16 rows (a dword per row), and the token's matching four
 * activation codes are broadcast to every dword. Per sub-block (32 elements, or 16 where the format
 * has a scale per 16: Q2_K, Q3_K, Q6_K), G/4 such steps per digit, then one conversion and one
 * multiply-add with the 16 rows' scales times the token's block scale (and, for the formats with a
 * minimum, one more with the rows' minimums times the token's sub-block code sum).
 *
 * Each format only has an unpack function (a row's codes as unsigned bytes in element order, value
 * = scale * (code - offset) - min per sub-block); the repacking and the tile loop are shared.
 *
 * The numbers are those of the decode kernels (dot_q8_avx512.c, dot_q8k_avx512.c): two activation
 * digits (pe_act_q8), the integer sum 254 * (c . q) + (c . ql) per (row, sub-block), the offset
 * times the activations' combined code sum (s32x / s16x) subtracted in int32 (exact), each sum
 * converted to float once; only the order in which the per-sub-block floats are added differs
 * (here: sub-block by sub-block). Each output belongs to one thread and is computed the same way
 * whatever the thread count or the token grouping. */
#include "gemm_q8.h"

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_features.h"
#include "gemm_q8_amx.h"
#include "gemm_q8_step.h"
#include "quants_impl.h"
#include "r16_codes_avx512.h"

enum { TILE = 16, TOK = 4 };

/* One row of n elements -> unsigned codes in element order, and per sub-block its scale and min
 * (mins left alone by the formats without one). */
typedef void (*unpack_fn)(const uint8_t *row, int64_t n, uint8_t *codes, float *scales, float *mins);

static inline float f16(uint16_t h) { return _cvtsh_ss(h); }

/* The 32 nibbles of v (low then high) through lut. */
static inline __m256i nibbles(__m128i v, __m128i lut) {
    const __m128i m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(v, 4), m)),
                            _mm_shuffle_epi8(lut, _mm_and_si128(v, m)));
}

static inline void store_nibbles(uint8_t *dst, __m128i v, __m128i lut) {
    _mm256_storeu_si256((__m256i *)dst, nibbles(v, lut));
}

/* The 32 nibbles of qs (low then high) plus 16 where bit j of qh is set (qh == NULL: no 5th bit). */
static inline void store_nibbles5(uint8_t *dst, const uint8_t *qs, const uint8_t *qh) {
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m256i c = nibbles(_mm_loadu_si128((const __m128i *)qs), lut);
    if (qh) {
        uint32_t h;
        memcpy(&h, qh, 4);
        c = _mm256_mask_add_epi8(c, (__mmask32)h, c, _mm256_set1_epi8(16));
    }
    _mm256_storeu_si256((__m256i *)dst, c);
}

static void unpack_mxfp4(const uint8_t *row, int64_t n, uint8_t *codes, float *scales, float *mins) {
    (void)mins;
    const __m128i lut = _mm_loadu_si128((const __m128i *)pe_mxfp4_codes);
    for (int64_t b = 0; b < n / 32; b++) {
        const pe_block_mxfp4 *blk = (const pe_block_mxfp4 *)(row + 17 * b);
        const uint32_t bits = pe_e8m0_half_bits(blk->e);
        memcpy(&scales[b], &bits, 4);
        store_nibbles(codes + 32 * b, _mm_loadu_si128((const __m128i *)blk->qs), lut);
    }
}

static void unpack_q4_0(const uint8_t *row, int64_t n, uint8_t *codes, float *scales, float *mins) {
    (void)mins;
    for (int64_t b = 0; b < n / 32; b++) {
        const pe_block_q4_0 *blk = (const pe_block_q4_0 *)(row + 18 * b);
        scales[b] = f16(blk->d);
        store_nibbles5(codes + 32 * b, blk->qs, NULL);
    }
}

static void unpack_q8_0(const uint8_t *row, int64_t n, uint8_t *codes, float *scales, float *mins) {
    (void)mins;
    for (int64_t b = 0; b < n / 32; b++) {
        const pe_block_q8_0 *blk = (const pe_block_q8_0 *)(row + 34 * b);
        scales[b] = f16(blk->d);
        _mm256_storeu_si256((__m256i *)(codes + 32 * b),
                            _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)blk->qs), _mm256_set1_epi8((char)0x80)));
    }
}

/* Q4_1, Q5_1: d * q + m, i.e. min = -m */
static void unpack_q4_1(const uint8_t *row, int64_t n, uint8_t *codes, float *scales, float *mins) {
    for (int64_t b = 0; b < n / 32; b++) {
        const pe_block_q4_1 *blk = (const pe_block_q4_1 *)(row + 20 * b);
        scales[b] = f16(blk->d);
        mins[b] = -f16(blk->m);
        store_nibbles5(codes + 32 * b, blk->qs, NULL);
    }
}

static void unpack_q5_0(const uint8_t *row, int64_t n, uint8_t *codes, float *scales, float *mins) {
    (void)mins;
    for (int64_t b = 0; b < n / 32; b++) {
        const pe_block_q5_0 *blk = (const pe_block_q5_0 *)(row + 22 * b);
        scales[b] = f16(blk->d);
        store_nibbles5(codes + 32 * b, blk->qs, blk->qh);
    }
}

static void unpack_q5_1(const uint8_t *row, int64_t n, uint8_t *codes, float *scales, float *mins) {
    for (int64_t b = 0; b < n / 32; b++) {
        const pe_block_q5_1 *blk = (const pe_block_q5_1 *)(row + 24 * b);
        scales[b] = f16(blk->d);
        mins[b] = -f16(blk->m);
        store_nibbles5(codes + 32 * b, blk->qs, blk->qh);
    }
}

/* Q4_K, Q5_K: 8 sub-blocks of 32, (d * sc) * q - dmin * m; the 64 elements 64i.. are the low then
 * the high nibbles of qs[32i..32i+32) (Q5_K: plus 16 * bit 2i / 2i+1 of qh[l]). */
static void unpack_q45_k(const uint8_t *row, int64_t n, uint8_t *codes, float *scales, float *mins, int five) {
    const int bytes = five ? 176 : 144;
    const __m256i m0f = _mm256_set1_epi8(15), sixteen = _mm256_set1_epi8(16);
    for (int64_t sb = 0; sb < n / 256; sb++) {
        const uint8_t *p = row + bytes * sb;
        uint16_t d, dmin;
        memcpy(&d, p, 2);
        memcpy(&dmin, p + 2, 2);
        const uint8_t *sc = p + 4, *qh = p + 16, *qs = p + (five ? 48 : 16);
        const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
        uint8_t *c = codes + 256 * sb;
        for (int i = 0; i < 4; i++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * i));
            __m256i lo = _mm256_and_si256(v, m0f), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
            if (five) {
                lo = _mm256_mask_add_epi8(lo, _mm256_test_epi8_mask(h, _mm256_set1_epi8((char)(1 << 2 * i))), lo, sixteen);
                hi = _mm256_mask_add_epi8(hi, _mm256_test_epi8_mask(h, _mm256_set1_epi8((char)(2 << 2 * i))), hi, sixteen);
            }
            _mm256_storeu_si256((__m256i *)(c + 64 * i), lo);
            _mm256_storeu_si256((__m256i *)(c + 64 * i + 32), hi);
        }
        for (int j = 0; j < 8; j++) {
            uint8_t s, m;
            pe_k_scale_min(sc, j, &s, &m);
            scales[8 * sb + j] = f16(d) * (float)s;
            mins[8 * sb + j] = f16(dmin) * (float)m;
        }
    }
}
static void unpack_q4_k(const uint8_t *row, int64_t n, uint8_t *codes, float *scales, float *mins) {
    unpack_q45_k(row, n, codes, scales, mins, 0);
}
static void unpack_q5_k(const uint8_t *row, int64_t n, uint8_t *codes, float *scales, float *mins) {
    unpack_q45_k(row, n, codes, scales, mins, 1);
}

/* Q6_K: 16 sub-blocks of 16, (d * sc) * (q - 32); element 128h + 32k + l (l < 32) has the nibble
 * k / 2 of ql[64h + 32 (k % 2) + l] and the 2 bits 2k of qh[32h + l]. */
static void unpack_q6_k(const uint8_t *row, int64_t n, uint8_t *codes, float *scales, float *mins) {
    (void)mins;
    const __m256i m0f = _mm256_set1_epi8(15), m03 = _mm256_set1_epi8(3);
    for (int64_t sb = 0; sb < n / 256; sb++) {
        const pe_block_q6_k *blk = (const pe_block_q6_k *)(row + 210 * sb);
        uint8_t *c = codes + 256 * sb;
        for (int h = 0; h < 2; h++) {
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk->qh + 32 * h));
            for (int k = 0; k < 4; k++) {
                const __m256i ql = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * h + 32 * (k % 2)));
                const __m256i lo = _mm256_and_si256(k < 2 ? ql : _mm256_srli_epi16(ql, 4), m0f);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), m03);
                _mm256_storeu_si256((__m256i *)(c + 128 * h + 32 * k), _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)));
            }
        }
        const float d = f16(blk->d);
        for (int j = 0; j < 16; j++) scales[16 * sb + j] = d * (float)blk->scales[j];
    }
}

/* Q3_K: 16 sub-blocks of 16, (d * sc) * (q - 4); element 128h + 32j + l (l < 32) has the 2 bits 2j
 * of qs[32h + l] and, as its 3rd bit, bit 4h + j of hmask[l]. */
static void unpack_q3_k(const uint8_t *row, int64_t n, uint8_t *codes, float *scales, float *mins) {
    (void)mins;
    const __m256i m03 = _mm256_set1_epi8(3);
    for (int64_t sb = 0; sb < n / 256; sb++) {
        const pe_block_q3_k *blk = (const pe_block_q3_k *)(row + 110 * sb);
        uint8_t *c = codes + 256 * sb;
        const __m256i hm = _mm256_loadu_si256((const __m256i *)blk->hmask);
        for (int h = 0; h < 2; h++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(blk->qs + 32 * h));
            for (int j = 0; j < 4; j++) {
                const __m256i v = _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), m03);
                const __mmask32 b = _mm256_test_epi8_mask(hm, _mm256_set1_epi8((char)(1 << (4 * h + j))));
                _mm256_storeu_si256((__m256i *)(c + 128 * h + 32 * j), _mm256_mask_add_epi8(v, b, v, _mm256_set1_epi8(4)));
            }
        }
        const float d = f16(blk->d);
        for (int k = 0; k < 16; k++) scales[16 * sb + k] = d * (float)pe_q3_k_scale(blk->scales, k);
    }
}

/* Q2_K: 16 sub-blocks of 16, (d * (sc & 15)) * q - dmin * (sc >> 4); element 128h + 32j + l has the
 * 2 bits 2j of qs[32h + l]. */
static void unpack_q2_k(const uint8_t *row, int64_t n, uint8_t *codes, float *scales, float *mins) {
    const __m256i m03 = _mm256_set1_epi8(3);
    for (int64_t sb = 0; sb < n / 256; sb++) {
        const pe_block_q2_k *blk = (const pe_block_q2_k *)(row + 84 * sb);
        uint8_t *c = codes + 256 * sb;
        for (int h = 0; h < 2; h++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(blk->qs + 32 * h));
            for (int j = 0; j < 4; j++)
                _mm256_storeu_si256((__m256i *)(c + 128 * h + 32 * j), _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), m03));
        }
        const float d = f16(blk->d), dmin = f16(blk->dmin);
        for (int k = 0; k < 16; k++) {
            scales[16 * sb + k] = d * (float)(blk->scales[k] & 15);
            mins[16 * sb + k] = dmin * (float)(blk->scales[k] >> 4);
        }
    }
}

/* Tokens t < NT of one tile: out[t][0..16) = the 16 rows' dots. packed: n/4 steps x 64 bytes; ws,
 * wm: per sub-block of G elements the 16 rows' scales and mins (MIN: whether the format has them;
 * the formats without one are those with an offset, see format_of). */
static inline __attribute__((always_inline)) void tile_tokens(const uint8_t *packed, const float *ws, const float *wm,
                                                             int64_t nsub, const pe_act_q8 *x, const int NT,
                                                             const int G, const int MIN, pe_gemm_q8_consts k,
                                                             __m512 f[TOK]) {
    for (int t = 0; t < NT; t++) f[t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < nsub; j++) {
        __m512i a[TOK], al[TOK];
        for (int t = 0; t < NT; t++) a[t] = al[t] = _mm512_setzero_si512();
        const uint8_t *pb = packed + j * (G / 4) * 64;
        for (int c = 0; c < G / 4; c++) {
            const __m512i w = _mm512_load_si512(pb + 64 * c);
            for (int t = 0; t < NT; t++) {
                int32_t q, l;
                memcpy(&q, x[t].qs + G * j + 4 * c, 4);
                memcpy(&l, x[t].ql + G * j + 4 * c, 4);
                a[t] = _mm512_dpbusd_epi32(a[t], w, _mm512_set1_epi32(q));
                al[t] = _mm512_dpbusd_epi32(al[t], w, _mm512_set1_epi32(l));
            }
        }
        const __m512 wsj = _mm512_load_ps(ws + 16 * j);
        for (int t = 0; t < NT; t++) f[t] = pe_gemm_q8_step(f[t], a[t], al[t], wsj, wm + 16 * j, k, t * nsub + j, MIN);
    }
}

/* The token groups of one tile, for one (G, MIN) shape. */
static inline __attribute__((always_inline)) void tile_all(const uint8_t *packed, const float *ws, const float *wm,
                                                          int64_t nsub, const pe_act_q8 *x, int64_t n_tok,
                                                          const int G, const int MIN, pe_gemm_q8_consts k,
                                                          __mmask16 keep, __m512 vb, float *y, int64_t ldy) {
    for (int64_t t0 = 0; t0 < n_tok; t0 += TOK) {
        const int nt = n_tok - t0 < TOK ? (int)(n_tok - t0) : TOK;
        const pe_gemm_q8_consts kt = {k.dx + t0 * nsub, k.dxs + t0 * nsub, k.off + t0 * nsub};
        __m512 f[TOK] = {0};
        switch (nt) {
        case 4: tile_tokens(packed, ws, wm, nsub, x + t0, 4, G, MIN, kt, f); break;
        case 3: tile_tokens(packed, ws, wm, nsub, x + t0, 3, G, MIN, kt, f); break;
        case 2: tile_tokens(packed, ws, wm, nsub, x + t0, 2, G, MIN, kt, f); break;
        default: tile_tokens(packed, ws, wm, nsub, x + t0, 1, G, MIN, kt, f); break;
        }
        for (int t = 0; t < nt; t++) _mm512_mask_storeu_ps(y + (t0 + t) * ldy, keep, _mm512_add_ps(f[t], vb));
    }
}

/* One compiled tile loop per (sub-block size, minimum) shape that the formats need. */
#define PE_TILE_SHAPE(NAME, G, MIN)                                                                             \
    static __attribute__((noinline)) void NAME(const uint8_t *packed, const float *ws, const float *wm,        \
                                               int64_t nsub, const pe_act_q8 *x, int64_t n_tok, pe_gemm_q8_consts k,  \
                                               __mmask16 keep, __m512 vb, float *y, int64_t ldy) {              \
        tile_all(packed, ws, wm, nsub, x, n_tok, G, MIN, k, keep, vb, y, ldy);                                  \
    }
PE_TILE_SHAPE(tile_32, 32, 0)
PE_TILE_SHAPE(tile_32_min, 32, 1)
PE_TILE_SHAPE(tile_16, 16, 0)
PE_TILE_SHAPE(tile_16_min, 16, 1)
#undef PE_TILE_SHAPE

typedef void (*tile_fn)(const uint8_t *packed, const float *ws, const float *wm, int64_t nsub, const pe_act_q8 *x,
                        int64_t n_tok, pe_gemm_q8_consts k, __mmask16 keep, __m512 vb, float *y, int64_t ldy);

typedef struct {
    unpack_fn unpack;
    int offset;  /* value = scale * (code - offset) - min */
    int sub;     /* elements per scale: 32 or 16 */
    int has_min;
} pe_gemm_q8_format;

/* Every format has either an offset or a minimum (the tile loop relies on it). */
static int format_of(int type, pe_gemm_q8_format *f) {
    switch (type) {
    case PE_TYPE_Q8_0: *f = (pe_gemm_q8_format){unpack_q8_0, 128, 32, 0}; return 1;
    case PE_TYPE_Q4_0: *f = (pe_gemm_q8_format){unpack_q4_0, 8, 32, 0}; return 1;
    case PE_TYPE_MXFP4: *f = (pe_gemm_q8_format){unpack_mxfp4, 12, 32, 0}; return 1;
    case PE_TYPE_Q5_0: *f = (pe_gemm_q8_format){unpack_q5_0, 16, 32, 0}; return 1;
    case PE_TYPE_Q4_1: *f = (pe_gemm_q8_format){unpack_q4_1, 0, 32, 1}; return 1;
    case PE_TYPE_Q5_1: *f = (pe_gemm_q8_format){unpack_q5_1, 0, 32, 1}; return 1;
    case PE_TYPE_Q4_K: *f = (pe_gemm_q8_format){unpack_q4_k, 0, 32, 1}; return 1;
    case PE_TYPE_Q5_K: *f = (pe_gemm_q8_format){unpack_q5_k, 0, 32, 1}; return 1;
    case PE_TYPE_Q6_K: *f = (pe_gemm_q8_format){unpack_q6_k, 32, 16, 0}; return 1;
    case PE_TYPE_Q3_K: *f = (pe_gemm_q8_format){unpack_q3_k, 4, 16, 0}; return 1;
    case PE_TYPE_Q2_K: *f = (pe_gemm_q8_format){unpack_q2_k, 0, 16, 1}; return 1;
    default: return 0;
    }
}

int pe_gemm_q8_supported(int type) {
    pe_gemm_q8_format f;
    return pe_simd_level_get() >= PE_SIMD_AVX512 && format_of(type, &f);
}

size_t pe_gemm_q8_scratch_bytes(int64_t n_in) {
    const int64_t nsub = n_in / 16; /* at most */
    /* row-major codes, packed codes, row-major and packed scales and mins */
    return (size_t)(TILE * n_in) * 2 + (size_t)(TILE * nsub) * 4 * 4 + 256;
}

int64_t pe_gemm_q8_nsub(int type, int64_t n_in) {
    pe_gemm_q8_format f;
    return format_of(type, &f) ? n_in / f.sub : 0;
}

void pe_gemm_q8_token_consts(int type, const pe_act_q8 *x, int64_t n_in, pe_gemm_q8_consts k, int64_t t) {
    pe_gemm_q8_format f;
    if (!format_of(type, &f)) return;
    const int64_t nsub = n_in / f.sub;
    for (int64_t j = 0; j < nsub; j++) {
        const float sx = f.sub == 32 ? x->s32x[j] : x->s16x[j];
        const float dx = x->d[f.sub == 32 ? j : j / 2] * (1.0f / 254.0f);
        k.dx[t * nsub + j] = dx;
        k.off[t * nsub + j] = f.offset * (int32_t)sx;
        k.dxs[t * nsub + j] = dx * sx;
    }
}

/* dst[16 k + r] = src[r * ld + k] for k, r < 16: a 16 x 16 dword transpose (the repacking's inner step). */
static void transpose16(const uint32_t *src, int64_t ld, uint32_t *dst) {
    __m512i v[16], t[16];
    for (int r = 0; r < 16; r++) v[r] = _mm512_loadu_si512(src + r * ld);
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    /* v[4i + c], lane L: dword 4L + c of rows 4i..4i+3 */
    for (int i = 0; i < 4; i++) {
        v[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        v[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        v[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        v[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; c++) { /* the 4 x 4 transpose of 128-bit lanes of v[c], v[4 + c], v[8 + c], v[12 + c] */
        const __m512i a = _mm512_shuffle_i32x4(v[c], v[4 + c], 0x44), b = _mm512_shuffle_i32x4(v[c], v[4 + c], 0xee);
        const __m512i e = _mm512_shuffle_i32x4(v[8 + c], v[12 + c], 0x44), f = _mm512_shuffle_i32x4(v[8 + c], v[12 + c], 0xee);
        _mm512_store_si512(dst + 16 * c, _mm512_shuffle_i32x4(a, e, 0x88));
        _mm512_store_si512(dst + 16 * (4 + c), _mm512_shuffle_i32x4(a, e, 0xdd));
        _mm512_store_si512(dst + 16 * (8 + c), _mm512_shuffle_i32x4(b, f, 0x88));
        _mm512_store_si512(dst + 16 * (12 + c), _mm512_shuffle_i32x4(b, f, 0xdd));
    }
}

/* Where a tile's buffers lie in the per-thread scratch (pe_gemm_q8_scratch_bytes). */
typedef struct {
    uint8_t *codes, *packed;
    float *scales, *mins, *ws, *wm;
} tile_scratch;

static tile_scratch scratch_of(void *scratch, int64_t n_in, int64_t nsub) {
    tile_scratch t;
    uint8_t *base = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    t.codes = base, t.packed = base + TILE * n_in;
    t.scales = (float *)(t.packed + TILE * n_in), t.mins = t.scales + TILE * nsub;
    t.ws = t.mins + TILE * nsub, t.wm = t.ws + TILE * nsub;
    return t;
}

/* Whether the n tokens' codes and second digits lie xstride bytes apart (as matmul.c quantizes a
 * batch: the AMX tiles read 16 tokens' digits as one tile). */
static int evenly_spaced(const pe_act_q8 *x, int64_t n, int64_t xstride) {
    for (int64_t t = 1; t < n; t++)
        if (x[t].qs != x[0].qs + t * xstride || x[t].ql != x[0].ql + t * xstride) return 0;
    return 1;
}

/* The packed tile (t.packed, t.ws, t.wm) times every token, the first nr rows stored: 16 tokens at a
 * time on AMX where this process may use it (gemm_q8_amx.c), the rest here. */
static void tile_run(const pe_gemm_q8_format *fmt, const tile_scratch *t, int nr, int64_t nsub, const pe_act_q8 *x,
                     int64_t n_tok, pe_gemm_q8_consts k, const float *bias, float *y, int64_t ldy) {
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    const int64_t n16 = n_tok / 16, xstride = n_tok > 1 ? x[1].qs - x[0].qs : 0;
    int64_t t0 = 0;
    /* the same bits on AMX; only with sub-blocks of 32: with 16 (Q2_K, Q3_K, Q6_K) twice the sums go
     * through memory per weight, and AMX ran 0.84-0.89x this loop (gemm_q8_amx.c) */
    if (fmt->sub == 32 && n16 > 0 && pe_gemm_q8_amx_ready() && evenly_spaced(x, 16 * n16, xstride)) {
        pe_gemm_q8_amx(t->packed, t->ws, t->wm, nsub, fmt->has_min, x, n16, xstride, k, keep, bias, y, ldy);
        t0 = 16 * n16;
    }
    if (t0 == n_tok) return;
    const __m512 vb = bias ? _mm512_maskz_loadu_ps(keep, bias) : _mm512_setzero_ps();
    const tile_fn tile = fmt->sub == 32 ? (fmt->has_min ? tile_32_min : tile_32) : (fmt->has_min ? tile_16_min : tile_16);
    const pe_gemm_q8_consts kt = {k.dx + t0 * nsub, k.dxs + t0 * nsub, k.off + t0 * nsub};
    tile(t->packed, t->ws, t->wm, nsub, x + t0, n_tok - t0, kt, keep, vb, y + t0 * ldy, ldy);
}

void pe_gemm_q8_tile(int type, const uint8_t *rows, int64_t stride, int nr, int64_t n_in, const pe_act_q8 *x,
                     int64_t n_tok, pe_gemm_q8_consts k, const float *bias, float *y, int64_t ldy, void *scratch) {
    pe_gemm_q8_format fmt = {0};
    format_of(type, &fmt);
    const int64_t nsub = n_in / fmt.sub;
    const tile_scratch t = scratch_of(scratch, n_in, nsub);
    for (int r = 0; r < TILE; r++) /* rows past nr repeat the last one */
        fmt.unpack(rows + (r < nr ? r : nr - 1) * stride, n_in, t.codes + r * n_in, t.scales + r * nsub,
                   t.mins + r * nsub);
    /* packed[k][r] = the 4 codes 4k .. of row r; ws[j][r], wm[j][r] = row r's scale, min of sub-block j */
    const int64_t nk = n_in / 4;
    const uint32_t *src = (const uint32_t *)t.codes;
    uint32_t *dst = (uint32_t *)t.packed;
    int64_t k0 = 0;
    for (; k0 + 16 <= nk; k0 += 16) transpose16(src + k0, nk, dst + k0 * TILE);
    for (int64_t k = k0; k < nk; k++)
        for (int r = 0; r < TILE; r++) dst[k * TILE + r] = src[r * nk + k];
    for (int64_t j = 0; j < nsub; j++)
        for (int r = 0; r < TILE; r++) {
            t.ws[j * TILE + r] = t.scales[r * nsub + j];
            if (fmt.has_min) t.wm[j * TILE + r] = t.mins[r * nsub + j];
        }
    tile_run(&fmt, &t, nr, nsub, x, n_tok, k, bias, y, ldy);
}

/* ws[i] = the i-th f16 at p, for i < n (the R16 groups' scales, already in the tiles' order). */
static void f16_scales(const uint8_t *p, int64_t n, float *ws) {
    for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        ws[i] = f16(h);
    }
}

/* The scales (and minimums, as unpack_q4_1 forms them: -m) of a 32-block group's nb blocks, at p:
 * per block the rows' f16 d, with a minimum then the rows' f16 m (r16.h), already in the tiles' order. */
static void b_scales(const uint8_t *p, int64_t nb, int has_min, float *ws, float *wm) {
    if (!has_min) {
        f16_scales(p, TILE * nb, ws);
        return;
    }
    for (int64_t b = 0; b < nb; b++) {
        f16_scales(p + 64 * b, TILE, ws + TILE * b);
        f16_scales(p + 64 * b + 32, TILE, wm + TILE * b);
        for (int r = 0; r < TILE; r++) wm[TILE * b + r] = -wm[TILE * b + r];
    }
}

/* A Q4_K or Q5_K group's scales and minimums of every 32-element unit 8 sb + s, as unpack_q45_k forms
 * them: d * sc and dmin * m (r16.h: the unpacked bytes and the rows' f16 d, dmin, at p after the codes). */
static void k_scales(const uint8_t *p, int64_t n_in, float *ws, float *wm) {
    const int64_t nsb = n_in / 256;
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *sc = p + 320 * sb;
        for (int r = 0; r < TILE; r++) {
            uint16_t d, dmin;
            memcpy(&d, sc + 256 + 2 * r, 2);
            memcpy(&dmin, sc + 288 + 2 * r, 2);
            for (int s = 0; s < 8; s++) {
                ws[(8 * sb + s) * TILE + r] = f16(d) * (float)sc[16 * s + r];
                wm[(8 * sb + s) * TILE + r] = f16(dmin) * (float)sc[128 + 16 * s + r];
            }
        }
    }
}

/* A Q2_K, Q3_K or Q6_K group's scales (and Q2_K's minimums) of every 16-element sub-block 16 sb + s,
 * as unpack_q2_k / unpack_q3_k / unpack_q6_k form them (r16.h: the scale bytes and the rows' f16 d,
 * Q2_K's dmin, at p after the codes). */
static void k16_scales(int type, const uint8_t *p, int64_t n_in, float *ws, float *wm) {
    const int64_t nsb = n_in / 256, area = type == PE_TYPE_Q2_K ? 320 : 288;
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *sc = p + area * sb;
        for (int r = 0; r < TILE; r++) {
            uint16_t d, dmin = 0;
            memcpy(&d, sc + 256 + 2 * r, 2);
            if (type == PE_TYPE_Q2_K) memcpy(&dmin, sc + 288 + 2 * r, 2);
            for (int s = 0; s < 16; s++) {
                const uint8_t v = sc[16 * s + r];
                ws[(16 * sb + s) * TILE + r] = f16(d) * (float)(type == PE_TYPE_Q2_K ? v & 15 : (int8_t)v);
                if (type == PE_TYPE_Q2_K) wm[(16 * sb + s) * TILE + r] = f16(dmin) * (float)(v >> 4);
            }
        }
    }
}

void pe_gemm_q8_tile_r16(int type, const uint8_t *group, int nr, int64_t n_in, const pe_act_q8 *x, int64_t n_tok,
                         pe_gemm_q8_consts k, const float *bias, float *y, int64_t ldy, void *scratch) {
    pe_gemm_q8_format fmt = {0};
    format_of(type, &fmt);
    const int64_t nb = n_in / 32, nsub = n_in / fmt.sub;
    tile_scratch t = scratch_of(scratch, n_in, nsub);
    if (type == PE_TYPE_Q8_0) { /* piece j of block b is packing step 8 b + j already; f16 scales */
        t.packed = (uint8_t *)group;
        f16_scales(group + 512 * nb, TILE * nb, t.ws);
        tile_run(&fmt, &t, nr, nb, x, n_tok, k, bias, y, ldy);
        return;
    }
    if (type != PE_TYPE_MXFP4) { /* the decode kernels' code registers are the packing steps 8 b + j of
                                  * 32-element unit b */
        const int64_t unit_bytes = pe_r16_unit_bytes(type);
        for (int64_t b = 0; b < nb; b++) {
            __m512i u[8];
            pe_r16_unit_codes(type, group + unit_bytes * b, u);
            for (int j = 0; j < 8; j++) _mm512_store_si512(t.packed + 64 * (8 * b + j), u[j]);
        }
        const uint8_t *sc = group + unit_bytes * nb;
        if (fmt.sub == 16) k16_scales(type, sc, n_in, t.ws, t.wm);
        else if (type == PE_TYPE_Q4_K || type == PE_TYPE_Q5_K) k_scales(sc, n_in, t.ws, t.wm);
        else b_scales(sc, nb, fmt.has_min, t.ws, t.wm);
        tile_run(&fmt, &t, nr, nsub, x, n_tok, k, bias, y, ldy);
        return;
    }
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)pe_mxfp4_codes));
    const __m512i m4 = _mm512_set1_epi8(15);
    /* piece j of block b holds codes 4 j (low nibbles) and 16 + 4 j (high) of every row: packing steps
     * 8 b + j and 8 b + 4 + j (vpshufb, not VBMI's vpermb: the tiles run on every AVX-512 VNNI CPU) */
    for (int64_t b = 0; b < nb; b++)
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_loadu_si512(group + 256 * b + 64 * j);
            _mm512_store_si512(t.packed + 64 * (8 * b + j), _mm512_shuffle_epi8(table, _mm512_and_si512(v, m4)));
            _mm512_store_si512(t.packed + 64 * (8 * b + 4 + j),
                               _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4)));
        }
    /* the rows' E8M0 scales as floats, 16 at a time: pe_e8m0_half_bits in vector form (a scalar loop
     * over a tile's 1440 bytes took ~1/6 of this function in a prefill's profile) */
    const __m512i two = _mm512_set1_epi32(2), one = _mm512_set1_epi32(1), tiny = _mm512_set1_epi32(0x00200000);
    for (int64_t i = 0; i < TILE * nb; i += 16) {
        const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(group + 256 * nb + i)));
        const __m512i normal = _mm512_slli_epi32(_mm512_sub_epi32(e, one), 23);
        _mm512_storeu_si512(t.ws + i, _mm512_mask_sllv_epi32(normal, _mm512_cmplt_epu32_mask(e, two), tiny, e));
    }
    tile_run(&fmt, &t, nr, nb, x, n_tok, k, bias, y, ldy);
}
