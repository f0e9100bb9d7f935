/* The gpt-oss forward pass (see gptoss.h). */
#include "gptoss.h"

#include <stdlib.h>

#include "ops.h"
#include "quants.h"

int pe_gptoss_forward(const pe_model *m, pe_kv_layer *kv, const int32_t *tokens, int64_t n_tok,
                      int64_t n_past, float *logits, int logits_all, int n_threads) {
    const int64_t D = m->n_embd, hd = m->head_dim, half = hd / 2;
    const int64_t q_dim = m->n_head * hd, kv_dim = m->n_head_kv * hd;
    int rc = -1;
    float *x = malloc((size_t)n_tok * D * sizeof(float));     /* residual stream */
    float *a = malloc((size_t)n_tok * D * sizeof(float));     /* normalised input of a sub-block */
    float *t = malloc((size_t)n_tok * D * sizeof(float));     /* sub-block output */
    float *q = malloc((size_t)n_tok * q_dim * sizeof(float));
    float *k = malloc((size_t)n_tok * kv_dim * sizeof(float));
    float *v = malloc((size_t)n_tok * kv_dim * sizeof(float));
    float *o = malloc((size_t)n_tok * q_dim * sizeof(float));
    float *cs = malloc((size_t)n_tok * 2 * half * sizeof(float));     /* cos | sin, full layers */
    float *cs_swa = malloc((size_t)n_tok * 2 * half * sizeof(float)); /* cos | sin, sliding layers */
    if (!x || !a || !t || !q || !k || !v || !o || !cs || !cs_swa) goto done;

    /* token embedding (no scaling) */
    const pe_type_traits *et = pe_type_traits_get(m->tok_embd.type);
    for (int64_t i = 0; i < n_tok; i++)
        et->dequant_row(m->tok_embd.data + (int64_t)tokens[i] * m->tok_embd.row_stride, x + i * D, D);

    for (int64_t i = 0; i < n_tok; i++) {
        pe_rope_table(cs + i * 2 * half, cs + i * 2 * half + half, m->omega, (int)half, n_past + i, m->rope_mscale);
        pe_rope_table(cs_swa + i * 2 * half, cs_swa + i * 2 * half + half, m->omega_swa, (int)half, n_past + i,
                      m->rope_mscale);
    }

    for (int l = 0; l < m->n_layer; l++) {
        const pe_layer *L = &m->layers[l];
        const float *rope = L->sliding ? cs_swa : cs;

        /* attention: RMSNorm -> q, k, v (+bias) -> RoPE -> cache -> sinks/SWA attention -> out (+bias) */
        for (int64_t i = 0; i < n_tok; i++) pe_rmsnorm(a + i * D, x + i * D, L->attn_norm, D, m->eps);
        if (pe_matmul(&L->wq, 0, a, D, n_tok, L->bq, q, q_dim, n_threads)) goto done;
        if (pe_matmul(&L->wk, 0, a, D, n_tok, L->bk, k, kv_dim, n_threads)) goto done;
        if (pe_matmul(&L->wv, 0, a, D, n_tok, L->bv, v, kv_dim, n_threads)) goto done;
        for (int64_t i = 0; i < n_tok; i++) {
            pe_rope_apply(q + i * q_dim, m->n_head, (int)hd, rope + i * 2 * half, rope + i * 2 * half + half);
            pe_rope_apply(k + i * kv_dim, m->n_head_kv, (int)hd, rope + i * 2 * half, rope + i * 2 * half + half);
        }
        pe_kv_store(&kv[l], k, v, n_tok, n_past, kv_dim);
        if (pe_attention(o, q, n_tok, n_past, &kv[l], m->n_head, m->n_head_kv, (int)hd,
                         L->sliding ? m->window : 0, L->sinks, n_threads))
            goto done;
        if (pe_matmul(&L->wo, 0, o, q_dim, n_tok, L->bo, t, D, n_threads)) goto done;
        for (int64_t i = 0; i < n_tok * D; i++) x[i] += t[i];

        /* mixture of experts: RMSNorm -> router -> experts -> weighted sum */
        for (int64_t i = 0; i < n_tok; i++) pe_rmsnorm(a + i * D, x + i * D, L->post_norm, D, m->eps);
        if (pe_moe_forward(&L->moe, a, n_tok, t, n_threads)) goto done;
        for (int64_t i = 0; i < n_tok * D; i++) x[i] += t[i];
    }

    /* final RMSNorm -> output head (no bias) */
    const int64_t first = logits_all ? 0 : n_tok - 1, n_out = n_tok - first;
    for (int64_t i = first; i < n_tok; i++) pe_rmsnorm(a + i * D, x + i * D, m->out_norm, D, m->eps);
    if (pe_matmul(&m->output, 0, a + first * D, D, n_out, NULL, logits, m->n_vocab, n_threads)) goto done;
    rc = 0;
done:
    free(x); free(a); free(t); free(q); free(k); free(v); free(o); free(cs); free(cs_swa);
    return rc;
}
