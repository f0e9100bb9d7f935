/* AVX-512 f32 micro-kernel for pe_gemm_f32 (see gemm.h): blocks of 4 rows x 6 tokens, one zmm
 * accumulator per output, so each step loads 10 vectors for 24 FMAs.
 *
 * The F32 dot_f32 (quants_avx512.c) keeps four accumulators a0..a3, a_j taking the 16 elements at
 * 64m + 16j, then the tail (16 at a time, then masked) into a0, and returns
 * reduce_add((a0 + a1) + (a2 + a3)). The four a_j are independent sums, so they are computed here
 * one after another ("pass j", 24 accumulators in registers instead of 96) and stored; the final
 * combination is the same expression. Pass j only reads every fourth 64-byte line of each row, so a
 * 6-token block of activations for one pass stays in L1 while the weight rows stream past it. */
#include "gemm.h"

#include <immintrin.h>

/* MR x NR outputs per block; KC elements per block of k (a multiple of 64), so that one pass's
 * slices of the weight tile and of NR tokens stay in L1. */
enum { MR = 4, NR = 6, KC = 1024 };

/* Pass j over the elements [i0, i1) (i0 a multiple of 64; i1 too unless it is k) for rows [0, R) x
 * tokens [0, T): continues the partial sums at p[r * ldp_r + t * 16 ...] (starts them at i0 = 0). */
static inline __attribute__((always_inline)) void pass(const int R, const int T, const float *a, int64_t lda,
                                                       const float *b, int64_t ldb, int64_t i0, int64_t i1,
                                                       int64_t k, int j, float *p, int64_t ldp_r) {
    __m512 acc[MR][NR];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            acc[r][t] = i0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(p + r * ldp_r + t * 16);
    const int64_t n64 = i1 / 64 * 64;
    for (int64_t i = i0 + 16 * j; i < n64; i += 64) {
        __m512 bv[NR];
        for (int t = 0; t < T; t++) bv[t] = _mm512_loadu_ps(b + t * ldb + i);
        for (int r = 0; r < R; r++) {
            const __m512 av = _mm512_loadu_ps(a + r * lda + i);
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_fmadd_ps(av, bv[t], acc[r][t]);
        }
    }
    if (j == 0 && i1 == k) {
        int64_t i = n64;
        for (; i + 16 <= k; i += 16)
            for (int r = 0; r < R; r++)
                for (int t = 0; t < T; t++)
                    acc[r][t] = _mm512_fmadd_ps(_mm512_loadu_ps(a + r * lda + i), _mm512_loadu_ps(b + t * ldb + i),
                                                acc[r][t]);
        if (i < k) {
            const __mmask16 msk = (__mmask16)((1u << (k - i)) - 1);
            for (int r = 0; r < R; r++)
                for (int t = 0; t < T; t++)
                    acc[r][t] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(msk, a + r * lda + i),
                                                _mm512_maskz_loadu_ps(msk, b + t * ldb + i), acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) _mm512_store_ps(p + r * ldp_r + t * 16, acc[r][t]);
}

typedef void (*pass_fn)(const float *a, int64_t lda, const float *b, int64_t ldb, int64_t i0, int64_t i1,
                        int64_t k, int j, float *p, int64_t ldp_r);

#define PASS(R, T)                                                                                        \
    static void pass_##R##_##T(const float *a, int64_t lda, const float *b, int64_t ldb, int64_t i0,       \
                               int64_t i1, int64_t k, int j, float *p, int64_t ldp_r) {                  \
        pass(R, T, a, lda, b, ldb, i0, i1, k, j, p, ldp_r);                                               \
    }
#define PASS_ROW(R) PASS(R, 1) PASS(R, 2) PASS(R, 3) PASS(R, 4) PASS(R, 5) PASS(R, 6)
PASS_ROW(1)
PASS_ROW(2)
PASS_ROW(3)
PASS_ROW(4)
#define PASS_REF(R) {pass_##R##_1, pass_##R##_2, pass_##R##_3, pass_##R##_4, pass_##R##_5, pass_##R##_6}
static const pass_fn passes[MR][NR] = {PASS_REF(1), PASS_REF(2), PASS_REF(3), PASS_REF(4)};

void pe_gemm_f32_avx512(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t n,
                        int64_t k, float *c, int64_t ldc, float *scratch) {
    /* scratch[j][r][t][16], for the current chunk of tokens */
    const int64_t ldp_r = (int64_t)PE_GEMM_TOK_CHUNK * 16, ldp_j = PE_GEMM_MAX_ROWS * ldp_r;
    for (int64_t t0 = 0; t0 < n; t0 += PE_GEMM_TOK_CHUNK) {
        const int64_t nt = n - t0 < PE_GEMM_TOK_CHUNK ? n - t0 : PE_GEMM_TOK_CHUNK;
        for (int64_t i0 = 0; i0 < k || i0 == 0; i0 += KC) {
            const int64_t i1 = k - i0 <= KC + 63 ? k : i0 + KC; /* the tail joins the last block */
            for (int j = 0; j < 4; j++)
                for (int64_t tb = 0; tb < nt; tb += NR) {
                    const int T = nt - tb < NR ? (int)(nt - tb) : NR;
                    for (int64_t rb = 0; rb < m; rb += MR) {
                        const int R = m - rb < MR ? (int)(m - rb) : MR;
                        passes[R - 1][T - 1](a + rb * lda, lda, b + (t0 + tb) * ldb, ldb, i0, i1, k, j,
                                             scratch + j * ldp_j + rb * ldp_r + tb * 16, ldp_r);
                    }
                }
            if (i1 == k) break;
        }
        for (int64_t t = 0; t < nt; t++)
            for (int64_t r = 0; r < m; r++) {
                const float *p = scratch + r * ldp_r + t * 16;
                const __m512 s01 = _mm512_add_ps(_mm512_load_ps(p), _mm512_load_ps(p + ldp_j));
                const __m512 s23 = _mm512_add_ps(_mm512_load_ps(p + 2 * ldp_j), _mm512_load_ps(p + 3 * ldp_j));
                c[(t0 + t) * ldc + r] = _mm512_reduce_add_ps(_mm512_add_ps(s01, s23));
            }
    }
}

void pe_f16_to_f32_avx512(const void *src, float *dst, int64_t n) {
    const uint16_t *h = src;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(dst + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + i)));
    }
}
