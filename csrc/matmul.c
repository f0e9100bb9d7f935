/* Threaded matrix-vector / matrix-matrix products (see matmul.h). OpenMP static partition over
 * output rows (tiles of rows for batches): each output element has one owner thread. */
#include "matmul.h"

#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "quants.h"

enum { PE_TILE_ROWS = 16 };
/* most tokens for which the fused row-by-row dot beats dequantizing tiles (measured, docs/node.md) */
enum { PE_ROWWISE_MAX_TOK = 8 };
/* multiply-adds per thread below which waking another thread costs more than it saves */
#define PE_MIN_WORK_PER_THREAD 32768

/* Each row is read from memory once and dotted with every token while it is in cache, with the
 * type's fused dot: per token, exactly the one-token result (a decode step of several sequences
 * gives each the logits it would get alone). */
static int matmul_rows(const pe_weight *w, const uint8_t *base, const float *x, int64_t ldx, int64_t n_tok,
                       const float *bias, float *y, int64_t ldy, int n_threads) {
    const pe_type_traits *tt = pe_type_traits_get(w->type);
    const int64_t n_out = w->n_out, n_in = w->n_in, stride = w->row_stride;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t r = 0; r < n_out; r++) {
        for (int64_t t = 0; t < n_tok; t++) {
            float s = tt->dot_f32(base + r * stride, x + t * ldx, n_in);
            y[t * ldy + r] = bias ? s + bias[r] : s;
        }
    }
    return 0;
}

static int matmul_batch(const pe_weight *w, const uint8_t *base, const float *x, int64_t ldx,
                        int64_t n_tok, const float *bias, float *y, int64_t ldy, int n_threads) {
    const pe_type_traits *tt = pe_type_traits_get(w->type);
    const pe_type_traits *f32 = pe_type_traits_get(PE_TYPE_F32);
    const int64_t n_out = w->n_out, n_in = w->n_in, stride = w->row_stride;
    const int64_t n_tiles = (n_out + PE_TILE_ROWS - 1) / PE_TILE_ROWS;
    float *tiles = malloc((size_t)n_threads * PE_TILE_ROWS * (size_t)n_in * sizeof(float));
    if (!tiles) return -1;
#pragma omp parallel num_threads(n_threads)
    {
        float *tile = tiles;
#ifdef _OPENMP
        tile += (size_t)omp_get_thread_num() * PE_TILE_ROWS * (size_t)n_in;
#endif
#pragma omp for schedule(static)
        for (int64_t ti = 0; ti < n_tiles; ti++) {
            const int64_t r0 = ti * PE_TILE_ROWS;
            const int64_t nr = n_out - r0 < PE_TILE_ROWS ? n_out - r0 : PE_TILE_ROWS;
            for (int64_t i = 0; i < nr; i++) tt->dequant_row(base + (r0 + i) * stride, tile + i * n_in, n_in);
            for (int64_t t = 0; t < n_tok; t++) {
                const float *xt = x + t * ldx;
                float *yt = y + t * ldy + r0;
                for (int64_t i = 0; i < nr; i++) {
                    float s = f32->dot_f32(tile + i * n_in, xt, n_in);
                    yt[i] = bias ? s + bias[r0 + i] : s;
                }
            }
        }
    }
    free(tiles);
    return 0;
}

int pe_matmul(const pe_weight *w, int64_t expert, const float *x, int64_t ldx, int64_t n_tok,
              const float *bias, float *y, int64_t ldy, int n_threads) {
    const uint8_t *base = w->data + expert * w->expert_stride;
    if (n_tok <= 0) return 0;
    const int64_t work = w->n_out * w->n_in * n_tok;
    if (n_threads > work / PE_MIN_WORK_PER_THREAD) n_threads = (int)(work / PE_MIN_WORK_PER_THREAD);
    if (n_threads < 1) n_threads = 1;
    if (n_tok <= PE_ROWWISE_MAX_TOK) return matmul_rows(w, base, x, ldx, n_tok, bias, y, ldy, n_threads);
    return matmul_batch(w, base, x, ldx, n_tok, bias, y, ldy, n_threads);
}
