/* Decode kernels with int8 activations (AVX-512 VNNI + VBMI) for the 32-element block formats
 * Q8_0, Q4_0 and MXFP4 (what gpt-oss files are made of). Eight rows share one pass over the
 * activations, so the per-block work (scales, sums, the horizontal fold) is paid once per group.
 *
 * Activations carry two int8 digits (pe_act_q8: x = d * (q + ql / 254)), so the products are as
 * close to float32 activations as makes no difference to the logits (llama.cpp's one Q8_0 digit
 * moves a random test model's logits by ~0.1-0.4 relative; two digits by ~1e-3): each product is
 * two vpdpbusd, combined exactly as 254 * (w . q) + (w . ql). Decode is bound by reading weights,
 * so the second digit costs little time.
 *
 * vpdpbusd multiplies unsigned by signed bytes, so weight codes are made unsigned by an offset
 * (Q8_0: q + 128, Q4_0: the raw nibble = q + 8, MXFP4: doubled E2M1 value + 12), and the offset
 * times the activation block's combined code sum (pe_act_q8.s32x) is subtracted before scaling.
 * Integer arithmetic is exact; each (row, block) sum is converted to float once and scaled by
 * d_w * d_x / 254,
 * so a row's result depends only on its own data, never on its neighbours in the group (rows past
 * nr repeat the last row and are not stored).
 *
 * Two shapes:
 * - 4-bit formats, "a lane per row": four rows' 16 code bytes of one block fill the four 128-bit
 *   lanes of a register; vpermb maps the low and the high nibbles through a 64-entry table (it
 *   ignores index bits 6-7, and the table repeats every 16 entries, so no masking), and two
 *   vpdpbusd against the block's activation halves (broadcast to every lane) leave 4 partial sums
 *   per row. Four blocks' registers fold with one transpose-add tree into (row, block) sums.
 * - Q8_0, "two blocks per row": a row's two 32-byte code blocks fill one register, one vpdpbusd
 *   against the pair's 64 activation codes; eight rows fold into (row, block) sums.
 *
 * The rows of a group are contiguous in every weight matrix, so each step also prefetches the
 * matching slice of the next group into L2: the memory system sees one sequential stream per
 * thread instead of eight interleaved ones (on matrices streamed from DRAM that took these
 * kernels from slower to faster than the float32-activation dot). */
#include "quants_impl.h"

#include "cpu_features.h"

#include <immintrin.h>
#include <string.h>

/* ---- shared pieces ----------------------------------------------------------------------------- */

/* Scales of the folded lanes from the 32-bit words holding each (row, block)'s scale field. */
static inline __m512 scales_f16(__m512i words) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words)); }

/* e8m0 byte e -> 2^(e-128) (the doubled E2M1 values' scale), as pe_e8m0_half_bits: denormal below 2. */
static inline __m512 scales_e8m0(__m512i words) {
    const __m512i e = _mm512_and_si512(words, _mm512_set1_epi32(0xff));
    const __mmask16 small = _mm512_cmplt_epu32_mask(e, _mm512_set1_epi32(2));
    __m512i bits = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
    bits = _mm512_mask_sllv_epi32(bits, small, _mm512_set1_epi32(0x00200000), e);
    return _mm512_castsi512_ps(bits);
}

/* Prefetch this step's share (bytes [from, from + len)) of the next group into L2. */
static inline void prefetch_next(const uint8_t *from, int64_t len) {
    for (int64_t p = 0; p < len; p += 64) _mm_prefetch((const char *)from + p, _MM_HINT_T1);
}

/* Rows past nr repeat the last one (computed, never stored). */
static inline void group_rows(const uint8_t *rows, int64_t stride, int nr, const uint8_t *r[8]) {
    for (int i = 0; i < 8; i++) r[i] = rows + (i < nr ? i : nr - 1) * stride;
}

/* ---- 4-bit formats: a lane per row ---------------------------------------------------------------- */

/* 4 registers (block i) x 4 lanes (row k) x 4 int32 -> lane 4k + i: the (row k, block i) sum. */
static inline __m512i fold4(const __m512i a[4]) {
    const __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
    const __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
}

/* 16 bytes at each of four addresses, one per 128-bit lane. */
static inline __m512i load4x16(const uint8_t *p0, const uint8_t *p1, const uint8_t *p2, const uint8_t *p3) {
    const __m256i lo = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p0)),
                                               _mm_loadu_si128((const __m128i *)p1), 1);
    const __m256i hi = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p2)),
                                               _mm_loadu_si128((const __m128i *)p3), 1);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* 254 * (w . q) + (w . ql): the two activation digits' integer dot products, combined exactly. */
static inline __m512i two_digits(__m512i a, __m512i al) {
    return _mm512_add_epi32(_mm512_mullo_epi32(a, _mm512_set1_epi32(254)), al);
}

/* int32 partial sums of four rows (r[0..3]) with one block whose 16 code bytes sit at offset o;
 * x[0], x[1]: the block's first and second 16 codes broadcast to every lane, x[2], x[3]: the same of
 * the second digits. */
static inline __m512i block4(const uint8_t *const r[4], int64_t o, __m512i table, const __m512i x[4]) {
    const __m512i v = load4x16(r[0] + o, r[1] + o, r[2] + o, r[3] + o);
    const __m512i lo = _mm512_permutexvar_epi8(v, table);
    const __m512i hi = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), table);
    const __m512i z = _mm512_setzero_si512();
    return two_digits(_mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo, x[0]), hi, x[1]),
                      _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo, x[2]), hi, x[3]));
}

/* Sum of the four lanes of each 128-bit lane, in a fixed order -> 4 floats. */
static inline void lanes_to_rows(__m512 acc, float out[4]) {
    float v[16];
    _mm512_storeu_ps(v, acc);
    for (int k = 0; k < 4; k++) out[k] = (v[4 * k] + v[4 * k + 1]) + (v[4 * k + 2] + v[4 * k + 3]);
}

/* One 4-bit format: BLOCK bytes per block, codes at QS, scale word at 0 read by SCALES, unsigned
 * codes table[16] (code value + OFFSET). Steps of four blocks; a tail of 1-3 blocks is the same step
 * with the missing blocks' codes, gathered scales and (zero-padded) activations left at zero. */
static inline void dot_q8_nibbles(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, int64_t n,
                                  float *out, const int BLOCK, const int QS, const float OFFSET,
                                  const int8_t table16[16], const int e8m0) {
    const uint8_t *r[8];
    group_rows(rows, stride, nr, r);
    int8_t t64[64];
    for (int i = 0; i < 64; i++) t64[i] = table16[i & 15];
    const __m512i table = _mm512_loadu_si512(t64);
    /* scale bytes: for block i of the step, bytes i * BLOCK (+ 1 for f16 scales) of each row's
     * step; gathered into dword lane 4k + i (row k) by one masked byte load and one vpermb per row */
    const int sb = e8m0 ? 1 : 2;
    uint8_t perm[64] = {0};
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < sb; j++) perm[4 * (4 * k + i) + j] = (uint8_t)(i * BLOCK + j);
    const __m512i sperm = _mm512_loadu_si512(perm);
    __mmask64 load_mask[5], lane_mask[4] = {0, 0, 0, 0};
    for (int nblk = 0; nblk <= 4; nblk++) {
        load_mask[nblk] = 0;
        for (int i = 0; i < nblk; i++)
            for (int j = 0; j < sb; j++) load_mask[nblk] |= 1ull << (i * BLOCK + j);
    }
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < sb; j++) lane_mask[k] |= 1ull << (4 * (4 * k + i) + j);
    const __m512 voff = _mm512_set1_ps(OFFSET), inv254 = _mm512_set1_ps(1.0f / 254.0f);
    const uint8_t *next = rows + 8 * stride;
    const int64_t nb = n / 32;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    for (int64_t b = 0; b < nb; b += 4) {
        const int nblk = nb - b < 4 ? (int)(nb - b) : 4;
        const int64_t o = b * BLOCK;
        __m512i a0[4], a1[4];
        for (int i = 0; i < 4; i++) {
            if (i >= nblk) { a0[i] = a1[i] = _mm512_setzero_si512(); continue; }
            const int8_t *xq = x->qs + 32 * (b + i), *xl = x->ql + 32 * (b + i);
            const __m512i xv[4] = {_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)xq)),
                                   _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + 16))),
                                   _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)xl)),
                                   _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xl + 16)))};
            a0[i] = block4(r, o + i * BLOCK + QS, table, xv);
            a1[i] = block4(r + 4, o + i * BLOCK + QS, table, xv);
        }
        prefetch_next(next + 8 * o, 32 * BLOCK);
        __m512i w0 = _mm512_setzero_si512(), w1 = w0;
        for (int k = 0; k < 4; k++) {
            w0 = _mm512_mask_permutexvar_epi8(w0, lane_mask[k], sperm, _mm512_maskz_loadu_epi8(load_mask[nblk], r[k] + o));
            w1 = _mm512_mask_permutexvar_epi8(w1, lane_mask[k], sperm, _mm512_maskz_loadu_epi8(load_mask[nblk], r[4 + k] + o));
        }
        const __m512 dx = _mm512_mul_ps(_mm512_broadcast_f32x4(_mm_loadu_ps(x->d + b)), inv254);
        const __m512 sx = _mm512_mul_ps(_mm512_broadcast_f32x4(_mm_loadu_ps(x->s32x + b)), voff);
        const __m512 s0 = _mm512_mul_ps(e8m0 ? scales_e8m0(w0) : scales_f16(w0), dx);
        const __m512 s1 = _mm512_mul_ps(e8m0 ? scales_e8m0(w1) : scales_f16(w1), dx);
        acc0 = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(fold4(a0)), sx), s0, acc0);
        acc1 = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(fold4(a1)), sx), s1, acc1);
    }
    float res[8];
    lanes_to_rows(acc0, res);
    lanes_to_rows(acc1, res + 4);
    memcpy(out, res, (size_t)nr * sizeof(float));
}

static const int8_t Q4_0_CODES[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; /* q + 8 */
/* pe_mxfp4_values + 12 */
static const int8_t MXFP4_CODES[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

static void dot_q8_q4_0(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, int64_t n, float *out) {
    dot_q8_nibbles(rows, stride, nr, x, n, out, 18, 2, 8.0f, Q4_0_CODES, 0);
}

static void dot_q8_mxfp4(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, int64_t n, float *out) {
    dot_q8_nibbles(rows, stride, nr, x, n, out, 17, 1, 12.0f, MXFP4_CODES, 1);
}

/* ---- Q8_0: two blocks per row ------------------------------------------------------------------- */

/* Lane j of fold8's result holds row ROW_OF(j), block BLK_OF(j) of the pair. */
#define ROW_OF(j) (((j) / 8) * 4 + (j) % 4)
#define BLK_OF(j) (((j) / 4) % 2)

/* 8 x 16 int32 lanes (lanes 0-7: even block, 8-15: odd block of each row) -> 16 (row, block) sums. */
static inline __m512i fold8(const __m512i a[8]) {
    const __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
    const __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
    const __m512i t45 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[4], a[5]), _mm512_unpackhi_epi32(a[4], a[5]));
    const __m512i t67 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[6], a[7]), _mm512_unpackhi_epi32(a[6], a[7]));
    const __m512i u0 = _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
    const __m512i u1 = _mm512_add_epi32(_mm512_unpacklo_epi64(t45, t67), _mm512_unpackhi_epi64(t45, t67));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Activation scales / code sums of blocks b, b+1 laid out as fold8's lanes. */
static inline __m512 pair_lanes(const float *v) {
    const __m512i pat = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    return _mm512_permutexvar_ps(pat, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)v))));
}

enum { BLOCK_Q8_0 = 34 };

/* q + 128 of block b and (two) block b+1, or zero codes for an absent second block. */
static inline __m512i codes_q8_0(const uint8_t *b, int two) {
    const __m256i lo = _mm256_loadu_si256((const __m256i *)(b + 2));
    const __m512i v = two ? _mm512_inserti64x4(_mm512_castsi256_si512(lo),
                                              _mm256_loadu_si256((const __m256i *)(b + BLOCK_Q8_0 + 2)), 1)
                          : _mm512_zextsi256_si512(lo);
    return _mm512_maskz_xor_epi64(two ? 0xff : 0x0f, v, _mm512_set1_epi8((char)0x80));
}

static void dot_q8_q8_0(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, int64_t n, float *out) {
    const uint8_t *r[8];
    group_rows(rows, stride, nr, r);
    int32_t off[16];
    for (int j = 0; j < 16; j++) off[j] = (int32_t)((r[ROW_OF(j)] - rows) + BLK_OF(j) * BLOCK_Q8_0);
    const __m512i vidx = _mm512_loadu_si512(off);
    const __m512 voff = _mm512_set1_ps(128.0f), inv254 = _mm512_set1_ps(1.0f / 254.0f);
    const uint8_t *next = rows + 8 * stride;
    const int64_t nb = n / 32;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 2) {
        const int two = b + 1 < nb;
        const int64_t o = b * BLOCK_Q8_0;
        const __m512i xv = _mm512_loadu_si512(x->qs + 32 * b), xl = _mm512_loadu_si512(x->ql + 32 * b);
        __m512i a[8];
        for (int i = 0; i < 8; i++) {
            const __m512i w = codes_q8_0(r[i] + o, two), z = _mm512_setzero_si512();
            a[i] = two_digits(_mm512_dpbusd_epi32(z, w, xv), _mm512_dpbusd_epi32(z, w, xl));
        }
        prefetch_next(next + 8 * o, 16 * BLOCK_Q8_0);
        const __m512i ws = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), two ? 0xffff : 0x0f0f, vidx, rows + o, 1);
        const __m512 t = _mm512_fnmadd_ps(pair_lanes(x->s32x + b), voff, _mm512_cvtepi32_ps(fold8(a)));
        const __m512 dx = _mm512_mul_ps(pair_lanes(x->d + b), inv254);
        acc = _mm512_fmadd_ps(t, _mm512_mul_ps(scales_f16(ws), dx), acc);
    }
    /* rows 0-3: lanes 0-3 + 4-7; rows 4-7: lanes 8-11 + 12-15 */
    const __m256 lo = _mm512_castps512_ps256(acc), hi = _mm512_extractf32x8_ps(acc, 1);
    float res[8];
    _mm_storeu_ps(res, _mm_add_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps(lo, 1)));
    _mm_storeu_ps(res + 4, _mm_add_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps(hi, 1)));
    memcpy(out, res, (size_t)nr * sizeof(float));
}

pe_dot_q8_fn pe_dot_q8_avx512(int type) {
    switch (type) {
    case PE_TYPE_Q8_0: return dot_q8_q8_0;
    case PE_TYPE_Q4_0: return pe_cpu_has_avx512vbmi() ? dot_q8_q4_0 : NULL;
    case PE_TYPE_MXFP4: return pe_cpu_has_avx512vbmi() ? dot_q8_mxfp4 : NULL;
    default: return pe_dot_q8k_avx512(type);
    }
}
