/* Threaded y = W x over a batch of tokens, for weights of any type in the type-traits table.
 *
 * Determinism: every output element is computed by exactly one thread, with one dot product in a
 * fixed element order, so results are bit-identical for any thread count. */
#ifndef PE_MATMUL_H
#define PE_MATMUL_H

#include <stdint.h>

/* A read-only view of a (possibly expert-stacked) weight matrix: n_out rows of n_in elements.
 * Rows and experts may be strided (zero-copy views into fused tensors). */
typedef struct {
    const uint8_t *data;   /* row 0 of expert 0 */
    int type;              /* ggml type id; pe_type_traits_get(type) != NULL (checked by the caller) */
    int64_t n_in, n_out;
    int64_t row_stride;    /* bytes from one output row to the next */
    int64_t expert_stride; /* bytes from one expert to the next (0 for a plain matrix) */
    int int8_act;          /* nonzero: row-wise products use int8 activations (see pe_matmul) */
    int layout;            /* PE_LAYOUT_ROWS, or PE_LAYOUT_R16: MXFP4, Q8_0, Q5_0 or Q4_K rows interleaved by 16 (r16.h) */
    /* An R16 plain matrix (expert_stride ignored) may also carry its rows in the file's layout (row 0
     * at rows, rows_stride bytes apart; NULL: not at hand): one-token products read those instead
     * where this CPU streams that layout faster (pe_r16_one_token_rows, r16.h), with the same bits. */
    const uint8_t *rows;
    int64_t rows_stride;
} pe_weight;

/* PE_LAYOUT_R16 weights (MXFP4, Q8_0, Q5_0 or Q4_K, row_stride = pe_r16_group_bytes / 16, so that row 16 g starts group g)
 * take only the int8 paths: pe_matmul returns -1 for them without int8_act or without the kernel. */
enum { PE_LAYOUT_ROWS = 0, PE_LAYOUT_R16 = 1 };

/* y[t*ldy + r] = dot(row r of expert `expert`, x[t*ldx ...]) + (bias ? bias[r] : 0),
 * for t < n_tok, r < n_out. Up to 8 tokens (decode): row-wise, as one job of pe_matmul_many, through
 * the type's float dot; more: tiles of rows dequantized once to f32 and multiplied by every token
 * with a register-blocked kernel (gemm.h) that sums exactly as the F32 dot_f32 does, so F32 weights
 * give the same bits batched or one token at a time. With w->int8_act set and a type that has
 * int8 kernels, each token's x is first quantized once (pe_act_q8_quantize) and the int8 kernels
 * take it, as llama.cpp does (not bit-identical to the f32 path). Returns 0, or -1 when scratch
 * memory cannot be allocated. */
int pe_matmul(const pe_weight *w, int64_t expert, const float *x, int64_t ldx, int64_t n_tok,
              const float *bias, float *y, int64_t ldy, int n_threads);

/* Bytes of one (expert's) matrix, what one product reads (row padding of strided views not counted). */
int64_t pe_weight_bytes(const pe_weight *w);

/* One product of a group (pe_matmul_many): y = W x + bias over n_tok tokens, as pe_matmul's arguments. */
typedef struct {
    const pe_weight *w;
    int64_t expert;
    const float *x;
    int64_t ldx, n_tok;
    const float *bias;
    float *y;
    int64_t ldy;
} pe_matmul_job;

/* Every job's product, each bit-identical to pe_matmul on its own. When every job has at most 8
 * tokens (decode: q|k|v of a layer, the experts' gate|up, their down), they run as one pass: each
 * distinct x of the jobs with int8 kernels is quantized once (float weights and the exact path read
 * x as it is) and one thread team takes the row groups of all jobs, contiguous runs per thread with
 * the end of a slow thread's run taken over (one parallel region instead of one per product, and
 * no repeated quantization of a shared input). Otherwise one pe_matmul per job. Returns 0, or -1
 * when scratch memory runs out. */
int pe_matmul_many(const pe_matmul_job *jobs, int n_jobs, int n_threads);

#endif
