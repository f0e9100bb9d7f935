/* The gpt-oss forward pass (docs/gpt-oss.md, "Forward pass"), in the manner of llama2.c's
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

/* One sequence's share of a forward call: its tokens are consecutive in the call's token array and
 * sit at positions n_past, n_past + 1, ... of its own cache kv[layer]. */
typedef struct {
    pe_kv_layer *kv;  /* [n_layer] */
    int64_t n_tok;    /* >= 1 */
    int64_t n_past;
} pe_seq;

/* Runs the tokens of n_seq sequences (seqs[s].n_tok each, concatenated in `tokens`) through the
 * model in one pass: every matrix and expert is read once for all of them; RoPE, the cache store
 * and attention use each sequence's own positions and cache.
 * logits: [total tokens][n_vocab] when logits_all, else [n_seq][n_vocab] (each sequence's last token).
 * expert_counts: NULL, or [n_layer][n_expert] counters to which each routed (token, rank) adds one.
 * Returns 0, or -1 when scratch memory cannot be allocated. */
int pe_gptoss_forward_seqs(const pe_model *m, const pe_seq *seqs, int64_t n_seq, const int32_t *tokens,
                           float *logits, int logits_all, int n_threads, int64_t *expert_counts);

/* The first part of pe_gptoss_forward_seqs when layers run on different devices: the token embedding
 * and layers [0, layer_end) (0 <= layer_end <= n_layer); x receives the residual stream [total tokens]
 * [n_embd] that the remaining layers continue from. */
int pe_gptoss_forward_layers(const pe_model *m, const pe_seq *seqs, int64_t n_seq, const int32_t *tokens,
                             int layer_end, float *x, int n_threads, int64_t *expert_counts);

/* One sequence: tokens[0..n_tok) at positions n_past.. of kv (pe_gptoss_forward_seqs with n_seq = 1).
 * logits: [n_tok][n_vocab] when logits_all, else [n_vocab] for the last token. */
int pe_gptoss_forward(const pe_model *m, pe_kv_layer *kv, const int32_t *tokens, int64_t n_tok,
                      int64_t n_past, float *logits, int logits_all, int n_threads, int64_t *expert_counts);

#endif
