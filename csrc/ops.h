/* Small per-vector operations of the gpt-oss block: RMSNorm, RoPE with YaRN, softmax, SwiGLU-OAI,
 * top-k. Formulas: docs/gpt-oss.md, "Forward pass". */
#ifndef PE_OPS_H
#define PE_OPS_H

#include <stdint.h>

/* The fewest tokens for which a forward pass's per-token steps (gptoss.c's norms, RoPE and residual
 * adds, moe.c's gather of the experts' inputs and their weighted sum) split the tokens between the
 * threads: a decode step's few tokens stay on one, where a parallel region costs more than it saves. */
#define PE_SPLIT_MIN_TOK 16

/* out_i = g_i * x_i / sqrt(mean(x^2) + eps). out may alias x. */
void pe_rmsnorm(float *out, const float *x, const float *g, int64_t n, float eps);

/* Per-pair angular frequencies omega'_i (i < head_dim/2) of NeoX RoPE, with YaRN when factor > 1:
 * fractional correction range (transformers' truncate=false, the reference), or floor/ceil of it
 * when truncate (what llama.cpp's ggml_rope_yarn_corr_dims does). Returns the magnitude factor M that
 * multiplies cos and sin (0.1 ln f + 1 with YaRN, 1 without). */
double pe_rope_yarn_freqs(double *omega, int head_dim, double base, int yarn, double factor,
                          double orig_ctx, double beta_fast, double beta_slow, int truncate);

/* cos_i = M cos(pos * omega_i), sin_i = M sin(pos * omega_i); angle computed in double directly. */
void pe_rope_table(float *cos_t, float *sin_t, const double *omega, int half, int64_t pos, double mscale);

/* Rotates n_heads consecutive head vectors in place, NeoX pairs (i, i + head_dim/2). */
void pe_rope_apply(float *x, int n_heads, int head_dim, const float *cos_t, const float *sin_t);

/* In-place softmax over n values. */
void pe_softmax(float *x, int n);

/* out = min(g,7) * sigmoid(1.702 min(g,7)) * (clamp(u,-7,7) + 1), on up to n_threads threads. AVX-512
 * machines take ops_avx512.c's loop (its e^x within ~1e-7 of expf's), others expf per element. */
void pe_swiglu_oai(float *out, const float *g, const float *u, int64_t n, int n_threads);
void pe_swiglu_oai_avx512(float *out, const float *g, const float *u, int64_t n);

/* Indices of the k largest values, largest first; ties go to the lower index. */
void pe_topk(const float *x, int n, int k, int *idx);

#endif
