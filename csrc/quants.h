/* Tensor element types as ggml numbers them, and one table of type traits (block size, bytes per
 * block, kernels) in the manner of ggml's type_traits: adding a format is one file and one row.
 *
 * Layout of every block type: see gguf-py's gguf/quants.py (the executable spec) and
 * docs/quants.md. Every kernel here validates nothing: callers (Python)
 * check types, sizes and alignment before a pointer reaches C. */
#ifndef PE_QUANTS_H
#define PE_QUANTS_H

#include <stddef.h>
#include <stdint.h>

#include "quant_formats.h"

#define PE_TYPE_ENUM(name, id, blck, size) PE_TYPE_##name = id,
enum pe_type { PE_QUANT_FORMATS(PE_TYPE_ENUM) };
#undef PE_TYPE_ENUM

/* dst[0..n) = the n elements of the quantized row at src; n is a multiple of blck_size. */
typedef void (*pe_dequant_row_fn)(const void *src, float *dst, int64_t n);
/* sum_i row[i] * x[i] over n elements, accumulated in a fixed order (thread-count independent). */
typedef float (*pe_dot_f32_fn)(const void *row, const float *x, int64_t n);
/* The most rows a several-token float dot takes per call (below). */
#define PE_DOT_F32_ROWS 8
/* dot_f32 of nr (1..PE_DOT_F32_ROWS) rows at rows + r * stride and n_tok tokens x + t * ldx, into
 * out[t * ldo + r] (a decode step of several sequences): each row is read once for all the tokens,
 * and each result is bit-identical to dot_f32 of that row and token alone. */
typedef void (*pe_dot_f32_tok_fn)(const uint8_t *rows, int64_t stride, int nr, const float *x, int64_t ldx,
                                  int n_tok, int64_t n, float *out, int64_t ldo);
/* dst = src[0..n) written in the type (n a multiple of blck_size): the KV cache's store. */
typedef void (*pe_quantize_row_fn)(const float *src, void *dst, int64_t n);

/* One token's activations for the int8 kernels: n floats (n a multiple of 32), per 32 elements a
 * float scale d = max|x| / 127 and int8 codes q = round-half-away(x / d) (llama.cpp's Q8_0 rounding,
 * with a float scale), plus each 32- and 16-element block's code sum for formats whose codes carry
 * an offset or a block minimum. The 32-element formats' kernels also use a second digit, the
 * rounding remainder: ql = round-half-away((x / d - q) * 254), so that x = d * (q + ql / 254) to
 * within d / 508, 254 times closer than q alone (two vpdpbusd per product, combined exactly in
 * int32 as 254 * (w . q) + (w . ql)); s32x and s16x hold the combined sums 254 * sum(q) + sum(ql).
 * xh / xl hold the same combined digit X = 254 q + ql rewritten in base 256 (X = 256 xh + xl, both
 * int8), so that one vpdpbusd per digit, a shift and an add give w . X, in the order of the
 * 32-block decode kernels (dot_q8_avx512.c): per 128 elements, bytes 16k + j = element 32k + j and
 * bytes 64 + 16k + j = element 32k + 16 + j (k < 4, j < 16). x16 holds X itself as int16 in the
 * AVX2 kernels' vpunpck pairing (dot_q8_avx2.c): per block 16 values A (elements 0-7, 16-23), then
 * 16 values B (elements 8-15, 24-31). dk holds d / 254 (d * (1.0f / 254.0f), the factor a block's
 * two-digit sum is scaled by), so that the decode kernels take it from memory as a broadcast operand
 * instead of a multiply and a broadcast per block and token (r16_avx512.c). Built by
 * pe_act_q8_quantize into one buffer; every array is zero-padded so that kernels may read up to four
 * blocks past the end. */
typedef struct {
    const int8_t *qs;  /* n (+ 128 zero) codes */
    const int8_t *ql;  /* n (+ 128 zero) second digits */
    const float *d;    /* n/32 (+ 4 zero) scales */
    const float *s32;  /* n/32 (+ 4 zero) sums of 32 codes */
    const float *s16;  /* n/16 (+ 8 zero) sums of 16 codes */
    const float *s32x; /* n/32 (+ 4 zero) combined two-digit sums of 32 */
    const float *s16x; /* n/16 (+ 8 zero) combined two-digit sums of 16 */
    const int8_t *xh;  /* n rounded up to 128 (+ 128 zero): base-256 high digits, reordered (above) */
    const int8_t *xl;  /* the same, low digits */
    const int16_t *x16; /* n (+ 128 zero): X = 254 q + ql, in the AVX2 pairing order (above) */
    const float *dk;    /* n/32 (+ 4 zero): d * (1.0f / 254.0f) */
} pe_act_q8;

/* Bytes of the buffer for n activations. */
size_t pe_act_q8_bytes(int64_t n);
/* Quantize x[0..n) into buf (pe_act_q8_bytes(n) bytes, 64-byte aligned) and return views into it. */
pe_act_q8 pe_act_q8_quantize(const float *x, int64_t n, void *buf);

/* The int8 kernels take up to this many rows per call. */
#define PE_DOT_Q8_ROWS 8
/* out[r] = sum_i row_r[i] * x[i] for the nr (1..PE_DOT_Q8_ROWS) rows at rows + r * stride, over n
 * elements (whole blocks). Integer products per block, scaled in float; a row's result does not
 * depend on nr or on its place in the group (thread-count and batch independent). */
typedef void (*pe_dot_q8_fn)(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, int64_t n,
                             float *out);
/* The most tokens a several-token kernel takes (below). */
#define PE_DOT_Q8_MAX_TOK 8
/* The same for n_tok (1..PE_DOT_Q8_MAX_TOK) tokens x[0..n_tok), out[t * ldo + r]: the rows are
 * decoded once per call and dotted with every token; each token's results are bit-identical to dot_q8
 * with x[t] alone. */
typedef void (*pe_dot_q8_tok_fn)(const uint8_t *rows, int64_t stride, int nr, const pe_act_q8 *x, int n_tok,
                                 int64_t n, float *out, int64_t ldo);

typedef struct {
    int type;
    const char *name;
    int blck_size;  /* elements per block */
    int type_size;  /* bytes per block */
    pe_dequant_row_fn dequant_row;  /* best SIMD variant for this CPU */
    pe_dot_f32_fn dot_f32;          /* best SIMD variant for this CPU */
    pe_dot_q8_fn dot_q8;            /* int8-activation rows kernel (AVX-512 VNNI); NULL when absent */
    pe_quantize_row_fn quantize_row; /* the KV cache types only (F32, F16, BF16, Q8_0); else NULL */
    pe_dot_q8_tok_fn dot_q8_tok;    /* dot_q8 for several tokens at once; NULL: call dot_q8 per token */
    pe_dot_f32_tok_fn dot_f32_tok;  /* dot_f32 for several tokens (AVX-512 F32/F16/BF16); NULL: dot_f32 per token */
} pe_type_traits;

/* Traits of a supported type, or NULL. Thread-safe; dispatch is resolved on first use. */
const pe_type_traits *pe_type_traits_get(int type);

/* Bytes of one row of n elements (n a multiple of the block size). */
size_t pe_row_size(int type, int64_t n);

/* Row loops over a 2-D tensor (row r at src + r * src_stride bytes), split across OpenMP threads:
 * dst[r * n + i] = element i of row r; out[r] = dot_f32(row r, x). */
void pe_dequantize_rows(int type, const void *src, int64_t src_stride, float *dst, int64_t n_rows, int64_t n);
void pe_dot_rows(int type, const void *src, int64_t src_stride, const float *x, float *out, int64_t n_rows,
                 int64_t n);
/* As pe_dot_rows through the int8 kernel (x quantized once with pe_act_q8_quantize); only for types
 * whose dot_q8 is not NULL. Returns 0, or -1 when the activation buffer cannot be allocated. */
int pe_dot_rows_q8(int type, const void *src, int64_t src_stride, const float *x, float *out, int64_t n_rows,
                   int64_t n);

/* IEEE half / bfloat16 conversions (exact, round-to-nearest-even for the narrowing ones). */
float pe_fp16_to_fp32(uint16_t h);
uint16_t pe_fp32_to_fp16(float f);
float pe_bf16_to_fp32(uint16_t h);
uint16_t pe_fp32_to_bf16(float f);

#endif
