/* e^x in 16 float lanes (AVX-512), for the loops that take one per element: attention's softmax and
 * the experts' SwiGLU. Why not expf: libm's is a call per element (~14 ns each in a 20b prefill's
 * SwiGLU, 14 % of the pass) and slow on its underflow path (the many scores far below the maximum).
 *
 * x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, Cody-Waite), e^r by Cephes' degree-6 expf
 * polynomial, times 2^n by vscalefps. Within 1.2e-7 relative of exp over [-87, 88] (checked against
 * double exp in tests/test_forward_kernels.py through pe_swiglu_oai); x is clamped to [-104, 88.7]: below, the
 * result is 0 or denormal as expf's; above, FLT_MAX-range instead of inf. */
#ifndef PE_VEXP_AVX512_H
#define PE_VEXP_AVX512_H

#include <immintrin.h>

static inline __m512 pe_exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

#endif
