/* The gpt-oss forward pass (see gptoss.h). */
#include "gptoss.h"

#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "ops.h"
#include "profile.h"
#include "quants.h"

/* Run `stmt` (which may `goto done`) under the profile timer of `op`. */
#define TIMED(op, bytes, stmt)                                                                                     \
    do {                                                                                                         \
        const int64_t t_ = pe_prof_begin();                                                                      \
        stmt;                                                                                                    \
        pe_prof_end(op, t_, bytes);                                                                              \
    } while (0)

/* RMSNorm of n_tok rows of D values; a prompt's rows split between the threads (each row computed
 * alone: the same bits for any thread count). */
static void norm_rows(float *out, const float *x, const float *g, int64_t n_tok, int64_t D, float eps, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_tok >= PE_SPLIT_MIN_TOK)
    for (int64_t i = 0; i < n_tok; i++) pe_rmsnorm(out + i * D, x + i * D, g, D, eps);
}

/* x += t over n_tok rows of D values (the residual stream), a prompt's split between the threads. */
static void add_into(float *x, const float *t, int64_t n_tok, int64_t D, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_tok >= PE_SPLIT_MIN_TOK)
    for (int64_t i = 0; i < n_tok * D; i++) x[i] += t[i];
}

/* RoPE on each token's q and k rows (cos | sin of token i at rope + 2 i half), a prompt's tokens split
 * between the threads. */
static void rope_rows(const pe_model *m, float *q, float *k, const float *rope, int64_t n_tok, int n_threads) {
    const int64_t hd = m->head_dim, half = hd / 2, q_dim = m->n_head * hd, kv_dim = m->n_head_kv * hd;
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_tok >= PE_SPLIT_MIN_TOK)
    for (int64_t i = 0; i < n_tok; i++) {
        const float *cs = rope + i * 2 * half;
        pe_rope_apply(q + i * q_dim, m->n_head, (int)hd, cs, cs + half);
        pe_rope_apply(k + i * kv_dim, m->n_head_kv, (int)hd, cs, cs + half);
    }
}

/* Embedding and layers [0, layer_end); then either the residual stream goes to x_out (x_out != NULL)
 * or the output head writes logits. */
static int forward(const pe_model *m, const pe_seq *seqs, int64_t n_seq, const int32_t *tokens, int layer_end,
                   float *x_out, float *logits, int logits_all, int n_threads, int64_t *expert_counts) {
    const int64_t D = m->n_embd, hd = m->head_dim, half = hd / 2;
    const int64_t q_dim = m->n_head * hd, kv_dim = m->n_head_kv * hd;
    int64_t n_tok = 0;
    for (int64_t s = 0; s < n_seq; s++) n_tok += seqs[s].n_tok;
    int rc = -1;
    pe_arena *ar = pe_arena_get();
    if (!ar) return -1;
    const size_t mark = pe_arena_mark(ar);
#define SCRATCH(n) (float *)pe_arena_alloc(ar, (size_t)(n) * sizeof(float))
    float *x = SCRATCH(n_tok * D);          /* residual stream */
    float *a = SCRATCH(n_tok * D);          /* normalised input of a sub-block */
    float *t = SCRATCH(n_tok * D);          /* sub-block output */
    float *q = SCRATCH(n_tok * q_dim);
    float *k = SCRATCH(n_tok * kv_dim);
    float *v = SCRATCH(n_tok * kv_dim);
    float *o = SCRATCH(n_tok * q_dim);
    float *cs = SCRATCH(n_tok * 2 * half);     /* cos | sin, full layers */
    float *cs_swa = SCRATCH(n_tok * 2 * half); /* cos | sin, sliding layers */
#undef SCRATCH
    if (!x || !a || !t || !q || !k || !v || !o || !cs || !cs_swa) goto done;
    const int64_t t_forward = pe_prof_begin(); /* also the embedding's start */

    /* token embedding (no scaling) */
    const pe_type_traits *et = pe_type_traits_get(m->tok_embd.type);
    for (int64_t i = 0; i < n_tok; i++)
        et->dequant_row(m->tok_embd.data + (int64_t)tokens[i] * m->tok_embd.row_stride, x + i * D, D);

    /* RoPE tables at each token's own position */
    for (int64_t s = 0, i = 0; s < n_seq; s++)
        for (int64_t j = 0; j < seqs[s].n_tok; j++, i++) {
            const int64_t pos = seqs[s].n_past + j;
            pe_rope_table(cs + i * 2 * half, cs + i * 2 * half + half, m->omega, (int)half, pos, m->rope_mscale);
            pe_rope_table(cs_swa + i * 2 * half, cs_swa + i * 2 * half + half, m->omega_swa, (int)half, pos,
                          m->rope_mscale);
        }
    pe_prof_end(PE_OP_EMBED, t_forward, 0);

    for (int l = 0; l < layer_end; l++) {
        const pe_layer *L = &m->layers[l];
        const float *rope = L->sliding ? cs_swa : cs;

        /* attention: RMSNorm -> q, k, v (+bias) -> RoPE -> cache -> sinks/SWA attention -> out (+bias) */
        TIMED(PE_OP_NORM, 0, norm_rows(a, x, L->attn_norm, n_tok, D, m->eps, n_threads));
        const pe_matmul_job qkv[3] = {{&L->wq, 0, a, D, n_tok, L->bq, q, q_dim},
                                      {&L->wk, 0, a, D, n_tok, L->bk, k, kv_dim},
                                      {&L->wv, 0, a, D, n_tok, L->bv, v, kv_dim}};
        TIMED(PE_OP_QKV, pe_weight_bytes(&L->wq) + pe_weight_bytes(&L->wk) + pe_weight_bytes(&L->wv),
              if (pe_matmul_many(qkv, 3, n_threads)) goto done);
        TIMED(PE_OP_ROPE, 0, rope_rows(m, q, k, rope, n_tok, n_threads));
        /* each sequence stores into and attends over its own cache */
        TIMED(PE_OP_ATTENTION, 0, for (int64_t s = 0, i = 0; s < n_seq; i += seqs[s].n_tok, s++) {
            pe_kv_layer *kv = &seqs[s].kv[l];
            pe_kv_store(kv, k + i * kv_dim, v + i * kv_dim, seqs[s].n_tok, seqs[s].n_past, kv_dim, (int)hd);
            if (pe_attention(o + i * q_dim, q + i * q_dim, seqs[s].n_tok, seqs[s].n_past, kv, m->n_head,
                             m->n_head_kv, (int)hd, L->sliding ? m->window : 0, L->sinks, n_threads))
                goto done;
        });
        TIMED(PE_OP_ATTN_OUT, pe_weight_bytes(&L->wo),
              if (pe_matmul(&L->wo, 0, o, q_dim, n_tok, L->bo, t, D, n_threads)) goto done);
        TIMED(PE_OP_RESIDUAL, 0, add_into(x, t, n_tok, D, n_threads));

        /* mixture of experts: RMSNorm -> router -> experts -> weighted sum (moe.c times its parts) */
        TIMED(PE_OP_NORM, 0, norm_rows(a, x, L->post_norm, n_tok, D, m->eps, n_threads));
        if (pe_moe_forward(&L->moe, a, n_tok, t, n_threads,
                           expert_counts ? expert_counts + (int64_t)l * L->moe.n_expert : NULL))
            goto done;
        TIMED(PE_OP_RESIDUAL, 0, add_into(x, t, n_tok, D, n_threads));
    }

    if (x_out) {
        memcpy(x_out, x, (size_t)n_tok * D * sizeof(float));
        pe_prof_end(PE_OP_FORWARD, t_forward, 0);
        rc = 0;
        goto done;
    }

    /* final RMSNorm -> output head (no bias): every token's row, or each sequence's last token's */
    int64_t n_out = 0;
    TIMED(PE_OP_NORM, 0, for (int64_t s = 0, i = 0; s < n_seq; i += seqs[s].n_tok, s++)
        for (int64_t j = logits_all ? 0 : seqs[s].n_tok - 1; j < seqs[s].n_tok; j++, n_out++)
            pe_rmsnorm(a + n_out * D, x + (i + j) * D, m->out_norm, D, m->eps));
    TIMED(PE_OP_OUTPUT, pe_weight_bytes(&m->output),
          if (pe_matmul(&m->output, 0, a, D, n_out, NULL, logits, m->n_vocab, n_threads)) goto done);
    pe_prof_end(PE_OP_FORWARD, t_forward, 0);
    rc = 0;
done:
    pe_arena_release(ar, mark);
    return rc;
}

int pe_gptoss_forward_seqs(const pe_model *m, const pe_seq *seqs, int64_t n_seq, const int32_t *tokens,
                           float *logits, int logits_all, int n_threads, int64_t *expert_counts) {
    return forward(m, seqs, n_seq, tokens, m->n_layer, NULL, logits, logits_all, n_threads, expert_counts);
}

int pe_gptoss_forward_layers(const pe_model *m, const pe_seq *seqs, int64_t n_seq, const int32_t *tokens,
                             int layer_end, float *x, int n_threads, int64_t *expert_counts) {
    return forward(m, seqs, n_seq, tokens, layer_end, x, NULL, 0, n_threads, expert_counts);
}

int pe_gptoss_forward(const pe_model *m, pe_kv_layer *kv, const int32_t *tokens, int64_t n_tok,
                      int64_t n_past, float *logits, int logits_all, int n_threads, int64_t *expert_counts) {
    const pe_seq seq = {kv, n_tok, n_past};
    return pe_gptoss_forward_seqs(m, &seq, 1, tokens, logits, logits_all, n_threads, expert_counts);
}
