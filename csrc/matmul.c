/* Threaded matrix-vector / matrix-matrix products (see matmul.h). Threads take contiguous runs of
 * row groups (tiles of rows for batches), the end of a slow thread's run taken over by the others
 * (worksplit.h): each output element is computed by exactly one thread, whichever it is. */
#include "matmul.h"

#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "arena.h"
#include "cpu_features.h"
#include "gemm.h"
#include "gemm_q8.h"
#include "r16.h"
#include "quants.h"
#include "worksplit.h"

enum { PE_TILE_ROWS = PE_GEMM_MAX_ROWS };
_Static_assert(PE_GEMM_Q8_TILE == PE_R16_ROWS, "an int8 tile of R16 weights is one group");
/* multiply-adds per thread below which waking another thread costs more than it saves */
#define PE_MIN_WORK_PER_THREAD 32768

/* Up to PE_ROWWISE_MAX_TOK tokens (one decode step of several sequences): each row is read from
 * memory once and dotted with every token while it is in cache, with the type's fused dot (the int8
 * kernels' several-token form decodes a group of rows once for all tokens): per token exactly the
 * one-token result, so a sequence decoded in a batch gets the logits it would get alone. */
enum { PE_ROWWISE_MAX_TOK = PE_DOT_Q8_MAX_TOK };

/* Row groups a thread takes at a time from its own range: a few microseconds of decode work, so the
 * threads end within that of each other. */
enum { PE_SPLIT_STEP = 4 };

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* A work split of n_items for a team of `team` threads, from the arena (NULL when it is full). */
static pe_split *split_new(pe_arena *ar, int64_t n_items, int team, int64_t step) {
    pe_split *s = pe_arena_alloc(ar, sizeof(pe_split));
    if (s) pe_split_init(s, n_items, team, step);
    return s;
}

/* y[t * ldy + i] += bias[i] for n_tok tokens and nr outputs (nothing when bias is NULL): the bias added
 * after a product that left it out, the same single rounding as adding it to each dot. */
static void add_bias(float *y, int64_t ldy, int64_t n_tok, const float *bias, int64_t nr) {
    if (!bias) return;
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t i = 0; i < nr; i++) y[t * ldy + i] += bias[i];
}

/* The register-blocked kernel for this CPU, or NULL: then each output is one F32 dot_f32 (the same
 * summation order, only slower). */
static pe_gemm_f32_fn gemm_f32_get(void) {
    const pe_simd_level level = pe_simd_level_get();
    return level >= PE_SIMD_AVX512 ? pe_gemm_f32_avx512 : level == PE_SIMD_AVX2 ? pe_gemm_f32_avx2 : NULL;
}

static int matmul_batch(const pe_weight *w, const uint8_t *base, const float *x, int64_t ldx,
                        int64_t n_tok, const float *bias, float *y, int64_t ldy, int n_threads) {
    const pe_type_traits *tt = pe_type_traits_get(w->type);
    const pe_type_traits *f32 = pe_type_traits_get(PE_TYPE_F32);
    const pe_gemm_f32_fn gemm = gemm_f32_get();
    pe_dequant_row_fn dequant = tt->dequant_row;
    if (w->type == PE_TYPE_F16 && gemm)
        dequant = gemm == pe_gemm_f32_avx512 ? pe_f16_to_f32_avx512 : pe_f16_to_f32_avx2;
    const int64_t n_out = w->n_out, n_in = w->n_in, stride = w->row_stride;
    const int64_t n_tiles = (n_out + PE_TILE_ROWS - 1) / PE_TILE_ROWS;
    /* per thread: the dequantized tile, then the kernel's scratch; 64-byte aligned */
    const int64_t tile_floats = (PE_TILE_ROWS * n_in + 15) / 16 * 16;
    const int64_t per_thread = tile_floats + (gemm ? PE_GEMM_SCRATCH_FLOATS : 0);
    pe_arena *ar = pe_arena_get();
    const size_t mark = ar ? pe_arena_mark(ar) : 0;
    float *scratch = ar ? pe_arena_alloc(ar, (size_t)n_threads * (size_t)per_thread * sizeof(float)) : NULL;
    if (!scratch) {
        if (ar) pe_arena_release(ar, mark);
        return -1;
    }
    pe_split *split = split_new(ar, n_tiles, n_threads, 1);
    if (!split) {
        pe_arena_release(ar, mark);
        return -1;
    }
#pragma omp parallel num_threads(n_threads)
    {
        float *tile = scratch + (size_t)thread_id() * (size_t)per_thread;
        int64_t ta, tb;
        while (pe_split_next(split, thread_id(), &ta, &tb))
            for (int64_t ti = ta; ti < tb; ti++) {
                const int64_t r0 = ti * PE_TILE_ROWS;
                const int64_t nr = n_out - r0 < PE_TILE_ROWS ? n_out - r0 : PE_TILE_ROWS;
                for (int64_t i = 0; i < nr; i++) dequant(base + (r0 + i) * stride, tile + i * n_in, n_in);
                if (gemm) {
                    gemm(tile, n_in, nr, x, ldx, n_tok, n_in, y + r0, ldy, tile + tile_floats);
                    add_bias(y + r0, ldy, n_tok, bias ? bias + r0 : NULL, nr);
                    continue;
                }
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
    pe_arena_release(ar, mark);
    return 0;
}

/* Whether a product of up to PE_ROWWISE_MAX_TOK tokens takes the int8 rows kernel (else the float dot). */
static int int8_rows(const pe_weight *w) {
    if (w->layout == PE_LAYOUT_R16) return w->int8_act && pe_r16_dot_get(w->type);
    return w->int8_act && pe_type_traits_get(w->type)->dot_q8;
}

/* Whether a product of up to PE_ROWWISE_MAX_TOK tokens runs row-wise in pe_matmul_many's one pass:
 * through the int8 rows kernel, or through the float dot (every type has one) in the file's layout. */
static int rowwise(const pe_weight *w) { return int8_rows(w) || w->layout == PE_LAYOUT_ROWS; }

/* Rows per call of the row-wise kernels: a group of the R16 layout, PE_DOT_Q8_ROWS for the int8
 * kernels, PE_DOT_F32_ROWS for the float dot. */
static int64_t rows_per_group(const pe_weight *w) {
    if (w->layout == PE_LAYOUT_R16) return PE_R16_ROWS;
    return int8_rows(w) ? PE_DOT_Q8_ROWS : PE_DOT_F32_ROWS;
}

/* y[t * ldy + i] = row i . token t for nr rows (at most rows_per_group) and n tokens (at most
 * PE_ROWWISE_MAX_TOK), no bias: R16's kernel, or the several-token form (the rows decoded once for
 * all tokens, per token the one-token bits), or the one-token kernel. pf: the R16 group this thread
 * reads PE_R16_PF_GROUPS groups later, prefetched meanwhile (NULL: none; the other layouts' kernels
 * prefetch their own next rows). */
static void rows_group(const pe_weight *w, const uint8_t *rows, int nr, const pe_act_q8 *xa, int n, float *y,
                       int64_t ldy, const uint8_t *pf) {
    const pe_type_traits *tt = pe_type_traits_get(w->type);
    if (w->layout == PE_LAYOUT_R16) pe_r16_dot_get(w->type)(rows, w->n_in / 32, nr, xa, n, y, ldy, pf);
    else if (n > 1 && tt->dot_q8_tok) tt->dot_q8_tok(rows, w->row_stride, nr, xa, n, w->n_in, y, ldy);
    else
        for (int t = 0; t < n; t++) tt->dot_q8(rows, w->row_stride, nr, &xa[t], w->n_in, y + t * ldy);
}

/* The same through the type's float dot (float weights, and every type on the exact path), x[t * ldx]:
 * the several-token form where the type has one (the rows read once for all the tokens), else
 * dot_f32 per row and token; each token's bits those of dot_f32 alone. */
static void float_group(const pe_weight *w, const uint8_t *rows, int nr, const float *x, int64_t ldx, int n, float *y,
                        int64_t ldy) {
    const pe_type_traits *tt = pe_type_traits_get(w->type);
    if (n > 1 && tt->dot_f32_tok) {
        tt->dot_f32_tok(rows, w->row_stride, nr, x, ldx, n, w->n_in, y, ldy);
        return;
    }
    for (int t = 0; t < n; t++)
        for (int i = 0; i < nr; i++) y[t * ldy + i] = tt->dot_f32(rows + i * w->row_stride, x + t * ldx, w->n_in);
}

/* A tile of 16 rows times n_tok tokens through the int8 rows kernel, 8 tokens a call (each group of
 * rows stays in cache for all of them), where there are no int8 tiles (AVX2): the same bits as
 * decoding. R16: the tile is one group. */
static void rows_chunks(const pe_weight *w, const uint8_t *tile, int nr, const pe_act_q8 *xq, int64_t n_tok,
                        const float *bias, float *y, int64_t ldy, const uint8_t *pf) {
    const int per = (int)rows_per_group(w);
    for (int g = 0; g < nr; g += per)
        for (int64_t t0 = 0; t0 < n_tok; t0 += PE_ROWWISE_MAX_TOK)
            rows_group(w, tile + g * w->row_stride, nr - g < per ? nr - g : per, xq + t0,
                       n_tok - t0 < PE_ROWWISE_MAX_TOK ? (int)(n_tok - t0) : PE_ROWWISE_MAX_TOK, y + t0 * ldy + g, ldy,
                       pf);
    add_bias(y, ldy, n_tok, bias, nr);
}

/* More tokens with int8 activations where there are no int8 tiles (AVX2; with tiles: tiles_many):
 * every token quantized once, then threads take 16 rows at a time through the rows kernel, 8 tokens a
 * call (rows_chunks). */
static int matmul_batch_q8(const pe_weight *w, const uint8_t *base, const float *x, int64_t ldx, int64_t n_tok,
                           const float *bias, float *y, int64_t ldy, int n_threads) {
    const int64_t n_out = w->n_out, n_in = w->n_in, stride = w->row_stride;
    const size_t act_bytes = pe_act_q8_bytes(n_in);
    pe_arena *ar = pe_arena_get();
    if (!ar) return -1;
    const size_t mark = pe_arena_mark(ar);
    uint8_t *buf = pe_arena_alloc(ar, act_bytes * (size_t)n_tok);
    pe_act_q8 *xq = pe_arena_alloc(ar, sizeof(pe_act_q8) * (size_t)n_tok);
    const int64_t n_tiles = (n_out + PE_GEMM_Q8_TILE - 1) / PE_GEMM_Q8_TILE;
    pe_split *split = buf && xq ? split_new(ar, n_tiles, n_threads, 1) : NULL;
    if (!split) {
        pe_arena_release(ar, mark);
        return -1;
    }
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t t = 0; t < n_tok; t++) xq[t] = pe_act_q8_quantize(x + t * ldx, n_in, buf + t * act_bytes);
#pragma omp parallel num_threads(n_threads)
    {
        int64_t ta, tb;
        while (pe_split_next(split, thread_id(), &ta, &tb))
            for (int64_t ti = ta; ti < tb; ti++) {
                const int64_t r0 = ti * PE_GEMM_Q8_TILE;
                const int nr = n_out - r0 < PE_GEMM_Q8_TILE ? (int)(n_out - r0) : PE_GEMM_Q8_TILE;
                const int64_t rp = r0 + PE_R16_PF_GROUPS * PE_GEMM_Q8_TILE; /* R16: a tile is a group */
                rows_chunks(w, base + r0 * stride, nr, xq, n_tok, bias ? bias + r0 : NULL, y + r0, ldy,
                            w->layout == PE_LAYOUT_R16 && rp < n_out ? base + rp * stride : NULL);
            }
    }
    pe_arena_release(ar, mark);
    return 0;
}

/* Threads worth waking for `work` multiply-adds (at most n_threads, at least 1). */
static int threads_for(int64_t work, int n_threads) {
    if (n_threads > work / PE_MIN_WORK_PER_THREAD) n_threads = (int)(work / PE_MIN_WORK_PER_THREAD);
    return n_threads < 1 ? 1 : n_threads;
}

/* The job of group g: the last whose first group is <= g. */
static int job_of(const int64_t *first, int n_jobs, int64_t g) {
    int j = 0;
    for (int lo = 0, hi = n_jobs; lo < hi;) {
        const int mid = (lo + hi) / 2;
        if (first[mid] <= g) j = mid, lo = mid + 1;
        else hi = mid;
    }
    return j;
}

/* Row r of job b's weight (its expert's matrix). */
static const uint8_t *row_at(const pe_matmul_job *b, int64_t r) {
    return b->w->data + b->expert * b->w->expert_stride + r * b->w->row_stride;
}

/* The first row of group k of job b's weight. */
static const uint8_t *group_rows(const pe_matmul_job *b, int64_t k) { return row_at(b, k * rows_per_group(b->w)); }

/* Tile ti of jobs whose first tiles are first[]: its job, and in *r0 and *nr its first row and rows. */
static int tile_of(const pe_matmul_job *jobs, const int64_t *first, int n_jobs, int64_t ti, int64_t *r0, int *nr) {
    const int j = job_of(first, n_jobs, ti);
    const int64_t n_out = jobs[j].w->n_out;
    *r0 = (ti - first[j]) * PE_GEMM_Q8_TILE;
    *nr = n_out - *r0 < PE_GEMM_Q8_TILE ? (int)(n_out - *r0) : PE_GEMM_Q8_TILE;
    return j;
}

/* Whether job b reads its weight's rows in the file's layout instead of its R16 form (pe_weight.rows). */
static int reads_rows(const pe_matmul_job *b) {
    return b->n_tok == 1 && b->w->layout == PE_LAYOUT_R16 && b->w->rows && pe_r16_one_token_rows(b->w->type);
}

static int matmul_many(const pe_matmul_job *jobs, int n_jobs, int n_threads);

int pe_matmul_many(const pe_matmul_job *jobs, int n_jobs, int n_threads) {
    int any = 0;
    for (int j = 0; j < n_jobs; j++) any |= reads_rows(&jobs[j]);
    if (!any) return matmul_many(jobs, n_jobs, n_threads);
    pe_arena *ar = pe_arena_get();
    if (!ar) return -1;
    const size_t mark = pe_arena_mark(ar);
    pe_matmul_job *swapped = pe_arena_alloc(ar, sizeof(pe_matmul_job) * (size_t)n_jobs);
    pe_weight *views = pe_arena_alloc(ar, sizeof(pe_weight) * (size_t)n_jobs);
    int rc = -1;
    if (swapped && views) {
        for (int j = 0; j < n_jobs; j++) {
            swapped[j] = jobs[j];
            if (!reads_rows(&jobs[j])) continue;
            views[j] = *jobs[j].w;
            views[j].data = views[j].rows;
            views[j].row_stride = views[j].rows_stride;
            views[j].expert_stride = 0;
            views[j].layout = PE_LAYOUT_ROWS;
            views[j].rows = NULL;
            swapped[j].w = &views[j];
            swapped[j].expert = 0;
        }
        rc = matmul_many(swapped, n_jobs, n_threads);
    }
    pe_arena_release(ar, mark);
    return rc;
}

/* Whether job b's product runs through the int8 tiles when done alone (pe_matmul: more tokens than
 * the row-wise kernels take, int8 activations, a tile kernel for the type, and for R16 weights an R16
 * kernel), so that doing it in tiles_many gives the same bits. */
static int tiled_job(const pe_matmul_job *b) {
    const pe_weight *w = b->w;
    return b->n_tok > PE_ROWWISE_MAX_TOK && w->int8_act && pe_gemm_q8_supported(w->type) &&
           (w->layout != PE_LAYOUT_R16 || pe_r16_dot_get(w->type));
}

/* Tile ti's weights (16 rows, contiguous in both layouts) into L2, a line at a time: a thread asks
 * for the tile it takes next while it computes the current one. A prefill's expert tiles come from
 * memory once each, and their repacking waited on the loads (perf: the R16 tiles' repack at 5 % of a
 * 512-token prefill, its time on the instructions right after the loads). */
static void prefetch_tile(const pe_matmul_job *jobs, const int64_t *first, int n_jobs, int64_t ti) {
    int64_t r0;
    int nr;
    const int j = tile_of(jobs, first, n_jobs, ti, &r0, &nr);
    const pe_weight *w = jobs[j].w;
    const uint8_t *p = row_at(&jobs[j], r0);
    const int64_t bytes = w->layout == PE_LAYOUT_R16 ? pe_r16_group_bytes(w->type, w->n_in) : nr * w->row_stride;
    for (int64_t o = 0; o < bytes; o += 64) pe_r16_prefetch_line(p + o);
}

/* Jobs that each run through the int8 tiles (tiled_job), in one thread team: each distinct input
 * quantized once (a prefill's MoE gives gate and up of an expert the same tokens), the constants per
 * job, then every job's tiles in one split: threads take tiles of 16 rows, each repacked once and
 * multiplied by all of its job's tokens (gemm_q8_avx512.c). One job alone (pe_matmul) or several
 * (a prefill's experts: pe_matmul_many) are computed alike, tile by tile, so the bits are the same.
 * Why several in one team: one parallel region and barrier instead of one per job (64 a layer for a
 * prefill's gate|up), and half the activations' quantization (gate and up of an expert share them). */
static int tiles_many(const pe_matmul_job *jobs, int n_jobs, int n_threads) {
    pe_arena *ar = pe_arena_get();
    if (!ar) return -1;
    const size_t mark = pe_arena_mark(ar);
    int64_t *first = pe_arena_alloc(ar, sizeof(int64_t) * (size_t)(n_jobs + 1)); /* each job's first tile */
    int64_t *tok0 = pe_arena_alloc(ar, sizeof(int64_t) * (size_t)(n_jobs + 1));  /* each job's first token */
    int64_t *c0 = pe_arena_alloc(ar, sizeof(int64_t) * (size_t)(n_jobs + 1));    /* each job's first constant */
    int *act_of = pe_arena_alloc(ar, sizeof(int) * (size_t)n_jobs);              /* the job whose input it reads */
    pe_gemm_q8_consts *k = pe_arena_alloc(ar, sizeof(pe_gemm_q8_consts) * (size_t)n_jobs);
    if (!first || !tok0 || !c0 || !act_of || !k) goto fail;
    int64_t n_tiles = 0, n_tok = 0, n_consts = 0, max_in = 0, work = 0;
    for (int j = 0; j < n_jobs; j++) {
        const pe_matmul_job *b = &jobs[j];
        first[j] = n_tiles;
        n_tiles += (b->w->n_out + PE_GEMM_Q8_TILE - 1) / PE_GEMM_Q8_TILE;
        tok0[j] = n_tok;
        n_tok += b->n_tok;
        c0[j] = n_consts;
        n_consts += b->n_tok * pe_gemm_q8_nsub(b->w->type, b->w->n_in);
        if (b->w->n_in > max_in) max_in = b->w->n_in;
        work += b->w->n_out * b->w->n_in * b->n_tok;
        act_of[j] = j;
        for (int i = 0; i < j && act_of[j] == j; i++)
            if (jobs[i].x == b->x && jobs[i].ldx == b->ldx && jobs[i].n_tok == b->n_tok && jobs[i].w->n_in == b->w->n_in)
                act_of[j] = act_of[i];
    }
    first[n_jobs] = n_tiles;
    tok0[n_jobs] = n_tok;
    c0[n_jobs] = n_consts;
    /* the constants of every job, from one block each (the arena takes few large allocations best) */
    float *dx = pe_arena_alloc(ar, 4 * (size_t)n_consts), *dxs = pe_arena_alloc(ar, 4 * (size_t)n_consts);
    int32_t *off = pe_arena_alloc(ar, 4 * (size_t)n_consts);
    if (!dx || !dxs || !off) goto fail;
    for (int j = 0; j < n_jobs; j++) k[j] = (pe_gemm_q8_consts){dx + c0[j], dxs + c0[j], off + c0[j]};
    /* the activations of every job's tokens (those of a job that shares its input left unused) */
    const size_t act_bytes = pe_act_q8_bytes(max_in);
    uint8_t *buf = pe_arena_alloc(ar, act_bytes * (size_t)n_tok);
    pe_act_q8 *xq = pe_arena_alloc(ar, sizeof(pe_act_q8) * (size_t)n_tok);
    const size_t scratch_bytes = pe_gemm_q8_scratch_bytes(max_in);
    const int team = threads_for(work, n_threads);
    uint8_t *scratch = pe_arena_alloc(ar, scratch_bytes * (size_t)team);
    pe_split *split = split_new(ar, n_tiles, team, 1);
    if (!buf || !xq || !scratch || !split) goto fail;
#pragma omp parallel num_threads(team)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n_tok; i++) { /* the inputs */
            const int j = job_of(tok0, n_jobs, i);
            const pe_matmul_job *b = &jobs[j];
            if (act_of[j] == j)
                xq[i] = pe_act_q8_quantize(b->x + (i - tok0[j]) * b->ldx, b->w->n_in, buf + (size_t)i * act_bytes);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n_tok; i++) { /* each job's constants, from its input's activations */
            const int j = job_of(tok0, n_jobs, i);
            const int64_t t = i - tok0[j];
            pe_gemm_q8_token_consts(jobs[j].w->type, &xq[tok0[act_of[j]] + t], jobs[j].w->n_in, k[j], t);
        }
        uint8_t *mine = scratch + (size_t)thread_id() * scratch_bytes;
        int64_t ta, tb;
        while (pe_split_next(split, thread_id(), &ta, &tb))
            for (int64_t ti = ta; ti < tb; ti++) {
                if (ti + 1 < n_tiles) prefetch_tile(jobs, first, n_jobs, ti + 1); /* this thread's next, unless stolen */
                int64_t r0;
                int nr;
                const int j = tile_of(jobs, first, n_jobs, ti, &r0, &nr);
                const pe_matmul_job *b = &jobs[j];
                const pe_weight *w = b->w;
                const pe_act_q8 *x = &xq[tok0[act_of[j]]];
                const float *bias = b->bias ? b->bias + r0 : NULL;
                if (w->layout == PE_LAYOUT_R16)
                    pe_gemm_q8_tile_r16(w->type, row_at(b, r0), nr, w->n_in, x, b->n_tok, k[j], bias, b->y + r0, b->ldy, mine);
                else
                    pe_gemm_q8_tile(w->type, row_at(b, r0), w->row_stride, nr, w->n_in, x, b->n_tok, k[j], bias, b->y + r0,
                                    b->ldy, mine);
            }
    }
    pe_arena_release(ar, mark);
    return 0;
fail:
    pe_arena_release(ar, mark);
    return -1;
}

static int matmul_many(const pe_matmul_job *jobs, int n_jobs, int n_threads) {
    int fused = n_jobs > 0;
    int64_t work = 0, n_groups = 0;
    for (int j = 0; j < n_jobs; j++) {
        fused &= jobs[j].n_tok <= PE_ROWWISE_MAX_TOK && rowwise(jobs[j].w);
        work += jobs[j].w->n_out * jobs[j].w->n_in * jobs[j].n_tok;
    }
    if (!fused) { /* the jobs in int8 tiles in one team (tiles_many), the others one by one */
        int n_tiled = 0;
        for (int j = 0; j < n_jobs; j++) n_tiled += tiled_job(&jobs[j]);
        pe_arena *ar = n_tiled > 1 ? pe_arena_get() : NULL;
        const size_t mark = ar ? pe_arena_mark(ar) : 0;
        pe_matmul_job *tiled = ar ? pe_arena_alloc(ar, sizeof(pe_matmul_job) * (size_t)n_tiled) : NULL;
        int rc = 0;
        if (tiled) {
            int n = 0;
            for (int j = 0; j < n_jobs; j++)
                if (tiled_job(&jobs[j])) tiled[n++] = jobs[j];
            rc = tiles_many(tiled, n, n_threads);
        }
        for (int j = 0; j < n_jobs && !rc; j++) {
            const pe_matmul_job *b = &jobs[j];
            if (tiled && tiled_job(b)) continue;
            rc = pe_matmul(b->w, b->expert, b->x, b->ldx, b->n_tok, b->bias, b->y, b->ldy, n_threads);
        }
        if (ar) pe_arena_release(ar, mark);
        return rc ? -1 : 0;
    }
    pe_arena *ar = pe_arena_get();
    if (!ar) return -1;
    const size_t mark = pe_arena_mark(ar);
    int64_t *first = pe_arena_alloc(ar, sizeof(int64_t) * (size_t)(n_jobs + 1)); /* each job's first group */
    int *act_of = pe_arena_alloc(ar, sizeof(int) * (size_t)n_jobs);            /* each job's activations */
    pe_act_q8 *acts = pe_arena_alloc(ar, sizeof(pe_act_q8) * (size_t)n_jobs * PE_ROWWISE_MAX_TOK);
    if (!first || !act_of || !acts) goto fail;
    /* each distinct input of the int8 jobs quantized once, serially (the result does not depend on the
     * thread count); the float jobs read x as it is */
    for (int j = 0, n_act = 0; j < n_jobs; j++) {
        const pe_matmul_job *b = &jobs[j];
        act_of[j] = -1;
        if (!int8_rows(b->w)) continue;
        for (int k = 0; k < j && act_of[j] < 0; k++)
            if (jobs[k].x == b->x && jobs[k].ldx == b->ldx && jobs[k].n_tok == b->n_tok && jobs[k].w->n_in == b->w->n_in)
                act_of[j] = act_of[k];
        if (act_of[j] >= 0) continue;
        const size_t act_bytes = pe_act_q8_bytes(b->w->n_in);
        uint8_t *buf = pe_arena_alloc(ar, act_bytes * (size_t)b->n_tok);
        if (!buf) goto fail;
        act_of[j] = n_act++;
        for (int64_t t = 0; t < b->n_tok; t++)
            acts[act_of[j] * PE_ROWWISE_MAX_TOK + t] = pe_act_q8_quantize(b->x + t * b->ldx, b->w->n_in, buf + t * act_bytes);
    }
    for (int j = 0; j < n_jobs; j++) {
        first[j] = n_groups;
        n_groups += (jobs[j].w->n_out + rows_per_group(jobs[j].w) - 1) / rows_per_group(jobs[j].w);
    }
    first[n_jobs] = n_groups;
    /* contiguous runs of groups per thread, the end stolen by whichever thread is free (worksplit.h);
     * an R16 group's kernel prefetches the group PE_R16_PF_GROUPS later in the run, whichever job
     * (expert) that is */
    const int team = threads_for(work, n_threads);
    pe_split *split = split_new(ar, n_groups, team, PE_SPLIT_STEP);
    if (!split) goto fail;
#pragma omp parallel num_threads(team)
    {
        int64_t ga, gb;
        while (pe_split_next(split, thread_id(), &ga, &gb))
            for (int64_t g = ga; g < gb; g++) {
                const int j = job_of(first, n_jobs, g);
                const pe_matmul_job *b = &jobs[j];
                const pe_weight *w = b->w;
                const int64_t per = rows_per_group(w), r0 = (g - first[j]) * per;
                const int nr = w->n_out - r0 < per ? (int)(w->n_out - r0) : (int)per;
                const uint8_t *pf = NULL;
                if (w->layout == PE_LAYOUT_R16 && g + PE_R16_PF_GROUPS < n_groups) {
                    const int64_t gp = g + PE_R16_PF_GROUPS;
                    const int jp = job_of(first, n_jobs, gp);
                    if (jobs[jp].w->layout == PE_LAYOUT_R16 && jobs[jp].w->type == w->type && jobs[jp].w->n_in == w->n_in)
                        pf = group_rows(&jobs[jp], gp - first[jp]);
                }
                if (act_of[j] < 0)
                    float_group(w, group_rows(b, g - first[j]), nr, b->x, b->ldx, (int)b->n_tok, b->y + r0, b->ldy);
                else
                    rows_group(w, group_rows(b, g - first[j]), nr, &acts[act_of[j] * PE_ROWWISE_MAX_TOK],
                               (int)b->n_tok, b->y + r0, b->ldy, pf);
                add_bias(b->y + r0, b->ldy, b->n_tok, b->bias ? b->bias + r0 : NULL, nr);
            }
    }
    pe_arena_release(ar, mark);
    return 0;
fail:
    pe_arena_release(ar, mark);
    return -1;
}

int pe_matmul(const pe_weight *w, int64_t expert, const float *x, int64_t ldx, int64_t n_tok,
              const float *bias, float *y, int64_t ldy, int n_threads) {
    const uint8_t *base = w->data + expert * w->expert_stride;
    if (n_tok <= 0) return 0;
    n_threads = threads_for(w->n_out * w->n_in * n_tok, n_threads);
    const pe_matmul_job job = {w, expert, x, ldx, n_tok, bias, y, ldy};
    if (n_tok <= PE_ROWWISE_MAX_TOK && rowwise(w)) return pe_matmul_many(&job, 1, n_threads);
    if (tiled_job(&job)) return tiles_many(&job, 1, n_threads);
    /* no int8 tiles for it: the rows kernel, or the float path */
    if (int8_rows(w)) return matmul_batch_q8(w, base, x, ldx, n_tok, bias, y, ldy, n_threads);
    if (w->layout == PE_LAYOUT_R16) return -1; /* only the int8 paths read this layout */
    return matmul_batch(w, base, x, ldx, n_tok, bias, y, ldy, n_threads);
}

int64_t pe_weight_bytes(const pe_weight *w) { return w->n_out * (int64_t)pe_row_size(w->type, w->n_in); }
