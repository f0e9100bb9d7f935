/* AVX2 f32 micro-kernel for pe_gemm_f32 (see gemm.h): blocks of 4 rows x 3 tokens, one ymm
 * accumulator per output (12 of the 16 registers), 7 loads for 12 FMAs per step.
 *
 * Same scheme as gemm_avx512.c, matching the AVX2 F32 dot_f32 (quants_avx2.c): four accumulators,
 * a_j taking the 8 elements at 32m + 8j, the 8-element tail into a0, hsum((a0 + a1) + (a2 + a3)),
 * then the last k mod 8 products added one by one in index order (this file is built with
 * -ffp-contract=off, so each product is rounded before the add, as there). */
#include "gemm.h"

#include <immintrin.h>

enum { MR = 4, NR = 3, KC = 1024 };

/* The same fixed-order horizontal sum as quants_avx2.c. */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Pass j over [i0, i1) (i0 a multiple of 32; i1 too unless it is k), continuing the partial sums at
 * p[r * ldp_r + t * 8 ...] (starting them at i0 = 0). */
static inline __attribute__((always_inline)) void pass(const int R, const int T, const float *a, int64_t lda,
                                                       const float *b, int64_t ldb, int64_t i0, int64_t i1,
                                                       int64_t k, int j, float *p, int64_t ldp_r) {
    __m256 acc[MR][NR];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            acc[r][t] = i0 == 0 ? _mm256_setzero_ps() : _mm256_load_ps(p + r * ldp_r + t * 8);
    const int64_t n32 = i1 / 32 * 32;
    for (int64_t i = i0 + 8 * j; i < n32; i += 32) {
        __m256 bv[NR];
        for (int t = 0; t < T; t++) bv[t] = _mm256_loadu_ps(b + t * ldb + i);
        for (int r = 0; r < R; r++) {
            const __m256 av = _mm256_loadu_ps(a + r * lda + i);
            for (int t = 0; t < T; t++) acc[r][t] = _mm256_fmadd_ps(av, bv[t], acc[r][t]);
        }
    }
    if (j == 0 && i1 == k)
        for (int64_t i = n32; i + 8 <= k; i += 8)
            for (int r = 0; r < R; r++)
                for (int t = 0; t < T; t++)
                    acc[r][t] = _mm256_fmadd_ps(_mm256_loadu_ps(a + r * lda + i), _mm256_loadu_ps(b + t * ldb + i),
                                                acc[r][t]);
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) _mm256_store_ps(p + r * ldp_r + t * 8, acc[r][t]);
}

typedef void (*pass_fn)(const float *a, int64_t lda, const float *b, int64_t ldb, int64_t i0, int64_t i1,
                        int64_t k, int j, float *p, int64_t ldp_r);

#define PASS(R, T)                                                                                        \
    static void pass_##R##_##T(const float *a, int64_t lda, const float *b, int64_t ldb, int64_t i0,       \
                               int64_t i1, int64_t k, int j, float *p, int64_t ldp_r) {                  \
        pass(R, T, a, lda, b, ldb, i0, i1, k, j, p, ldp_r);                                               \
    }
#define PASS_ROW(R) PASS(R, 1) PASS(R, 2) PASS(R, 3)
PASS_ROW(1)
PASS_ROW(2)
PASS_ROW(3)
PASS_ROW(4)
#define PASS_REF(R) {pass_##R##_1, pass_##R##_2, pass_##R##_3}
static const pass_fn passes[MR][NR] = {PASS_REF(1), PASS_REF(2), PASS_REF(3), PASS_REF(4)};

void pe_gemm_f32_avx2(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t n, int64_t k,
                      float *c, int64_t ldc, float *scratch) {
    /* scratch[j][r][t][8], for the current chunk of tokens */
    const int64_t ldp_r = (int64_t)PE_GEMM_TOK_CHUNK * 8, ldp_j = PE_GEMM_MAX_ROWS * ldp_r;
    const int64_t n8 = k / 8 * 8;
    for (int64_t t0 = 0; t0 < n; t0 += PE_GEMM_TOK_CHUNK) {
        const int64_t nt = n - t0 < PE_GEMM_TOK_CHUNK ? n - t0 : PE_GEMM_TOK_CHUNK;
        for (int64_t i0 = 0;; i0 += KC) {
            const int64_t i1 = k - i0 <= KC + 31 ? k : i0 + KC; /* the tail joins the last block */
            for (int j = 0; j < 4; j++)
                for (int64_t tb = 0; tb < nt; tb += NR) {
                    const int T = nt - tb < NR ? (int)(nt - tb) : NR;
                    for (int64_t rb = 0; rb < m; rb += MR) {
                        const int R = m - rb < MR ? (int)(m - rb) : MR;
                        passes[R - 1][T - 1](a + rb * lda, lda, b + (t0 + tb) * ldb, ldb, i0, i1, k, j,
                                             scratch + j * ldp_j + rb * ldp_r + tb * 8, ldp_r);
                    }
                }
            if (i1 == k) break;
        }
        for (int64_t t = 0; t < nt; t++)
            for (int64_t r = 0; r < m; r++) {
                const float *p = scratch + r * ldp_r + t * 8;
                const __m256 s01 = _mm256_add_ps(_mm256_load_ps(p), _mm256_load_ps(p + ldp_j));
                const __m256 s23 = _mm256_add_ps(_mm256_load_ps(p + 2 * ldp_j), _mm256_load_ps(p + 3 * ldp_j));
                float s = hsum(_mm256_add_ps(s01, s23));
                const float *ar = a + r * lda, *bt = b + (t0 + t) * ldb;
                for (int64_t i = n8; i < k; i++) s += ar[i] * bt[i];
                c[(t0 + t) * ldc + r] = s;
            }
    }
}

void pe_f16_to_f32_avx2(const void *src, float *dst, int64_t n) {
    const uint16_t *h = src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) dst[i] = _cvtsh_ss(h[i]);
}
