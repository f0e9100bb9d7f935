/* The gpt-oss forward pass (shared/docs/gpt-oss-spec.md section 3), in the manner of llama2.c's
 * run.c: plain structs of weight views, one function that reads top to bottom like the model.
 *
 * Every pointer, type and shape here has been validated by the caller (pyengine/_model.pyx). */
#ifndef PE_GPTOSS_H
#define PE_GPTOSS_H

#include <stdint.h>

#include "attention.h"
#include "matmul.h"
#include "moe.h"

typedef struct {
    const float *attn_norm;          /* [n_embd] */
    pe_weight wq, wk, wv, wo;
    const float *bq, *bk, *bv, *bo;  /* zeros where the file has no bias */
    const float *sinks;              /* [n_head] */
    const float *post_norm;          /* [n_embd] */
    pe_moe moe;
    int sliding;                     /* 1: attends to the last `window` positions only */
} pe_layer;

typedef struct {
    int n_layer, n_head, n_head_kv, head_dim;
    int64_t n_embd, n_vocab, window;
    float eps;
    const double *omega, *omega_swa; /* RoPE frequencies [head_dim/2] for full / sliding layers */
    double rope_mscale;              /* YaRN magnitude on cos and sin */
    pe_weight tok_embd, output;
    const float *out_norm;
    const pe_layer *layers;
} pe_model;

/* Runs tokens[0..n_tok) at positions n_past.. through the model, storing their K/V in kv[layer].
 * logits: [n_tok][n_vocab] when logits_all, else [n_vocab] for the last token.
 * Returns 0, or -1 when scratch memory cannot be allocated. */
int pe_gptoss_forward(const pe_model *m, pe_kv_layer *kv, const int32_t *tokens, int64_t n_tok,
                      int64_t n_past, float *logits, int logits_all, int n_threads);

#endif
