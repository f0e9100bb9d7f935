/* Mixture-of-experts feed-forward of gpt-oss: router (linear + bias, top-k, softmax over the k),
 * then each selected expert's SwiGLU-OAI MLP, weighted sum.
 *
 * Tokens of a batch are grouped by expert, so each expert's weights are read once per batch. */
#ifndef PE_MOE_H
#define PE_MOE_H

#include <stdint.h>

#include "matmul.h"

typedef struct {
    pe_weight router;                  /* [n_embd -> n_expert] */
    const float *router_b;             /* [n_expert] */
    pe_weight gate, up, down;          /* expert-stacked: gate/up [n_embd -> n_ff], down [n_ff -> n_embd] */
    const float *gate_b, *up_b, *down_b; /* [n_expert][n_ff] / [n_expert][n_embd] */
    int n_expert, n_used;
    int64_t n_embd, n_ff;
} pe_moe;

/* y[t] = sum over the n_used selected experts e (in rank order) of w_e * (down_e(swiglu(gate_e x,
 * up_e x)) + down_b_e). x and y are [n_tok][n_embd]. counts: NULL, or [n_expert] counters to which
 * each routed (token, rank) adds one (serial code: safe with any n_threads). Returns 0, or -1 on
 * allocation failure. */
int pe_moe_forward(const pe_moe *m, const float *x, int64_t n_tok, float *y, int n_threads, int64_t *counts);

#endif
