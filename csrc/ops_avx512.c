/* The experts' SwiGLU for AVX-512 (see ops.h): ops.c's formula 16 elements at a time, e^x by
 * pe_exp512 (vexp_avx512.h); NaN inputs clamp as the scalar comparisons do (g NaN -> 7, u NaN stays). */
#include <immintrin.h>

#include "ops.h"
#include "vexp_avx512.h"

void pe_swiglu_oai_avx512(float *out, const float *g, const float *u, int64_t n) {
    const __m512 lim = _mm512_set1_ps(7.0f), nlim = _mm512_set1_ps(-7.0f), one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 gi = _mm512_min_ps(_mm512_maskz_loadu_ps(m, g + i), lim);  /* NaN -> 7, as g < 7 ? g : 7 */
        const __m512 ui = _mm512_min_ps(lim, _mm512_max_ps(nlim, _mm512_maskz_loadu_ps(m, u + i))); /* NaN stays */
        const __m512 den = _mm512_add_ps(one, pe_exp512(_mm512_mul_ps(_mm512_set1_ps(-1.702f), gi)));
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_div_ps(gi, den), _mm512_add_ps(ui, one)));
    }
}
