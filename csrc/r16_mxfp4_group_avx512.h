/* The body of r16_avx512.c's kernel, included there once per table lookup: R16_GROUP names
 * the group kernel, R16_DOT its pe_r16_dot_fn entry, R16_LOOKUP(v, table) gives the low nibbles of
 * v through the table. */
PE_AI void R16_GROUP(const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x,
                     const int n_tok, float *out, int64_t ldo, const uint8_t *pf) {
    /* pe_mxfp4_codes four times (vpermb ignores index bits 6-7, vpshufb takes bits 0-3 of a masked index) */
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)pe_mxfp4_codes));
    const uint8_t *scales = group + 256 * nb;
    __m512 acc[PE_DOT_Q8_MAX_TOK][4];
    for (int t = 0; t < n_tok; t++)
        for (int k = 0; k < 4; k++) acc[t][k] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = group + 256 * b;
        pe_r16_prefetch(pf, nb, b);
        __m512i u[8]; /* u[j]: elements 4 j .. 4 j + 3 (j < 4), 16 + 4 (j - 4) .. (j >= 4) of every row */
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_load_si512(p + 64 * j);
            u[j] = R16_LOOKUP(v, table);
            u[j + 4] = R16_LOOKUP(_mm512_srli_epi16(v, 4), table);
        }
        const __m512 ws = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(scales + 16 * b)))),
                                        _mm512_set1_ps(128.0f));
        for (int t = 0; t < n_tok; t++) {
            const __m512 s = _mm512_scalef_ps(_mm512_set1_ps(x[t].dk[b]), ws);
            acc[t][b & 3] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block_sums(u, &x[t], b, 12)), s, acc[t][b & 3]);
        }
    }
    store_rows(acc, n_tok, nr, out, ldo);
}

/* One token: the accumulators stay in registers (n_tok a constant). */
static void R16_DOT(const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, int n_tok, float *out, int64_t ldo,
                    const uint8_t *pf) {
    if (n_tok == 1) R16_GROUP(group, nb, nr, x, 1, out, ldo, pf);
    else R16_GROUP(group, nb, nr, x, n_tok, out, ldo, pf);
}
