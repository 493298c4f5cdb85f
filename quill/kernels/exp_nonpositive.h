/* exp(x) for x <= 0, the exponential attention's softmax and the gated activations' sigmoid
   need: Cephes' range reduction and polynomial (about 1 ulp), scalar and on 16 floats. Both
   compute the same steps; which one a kernel uses is fixed per loop, never per row. */
#ifndef QUILL_EXP_NONPOSITIVE_H
#define QUILL_EXP_NONPOSITIVE_H

#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "half_floats.h"

static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x; /* below e^-87 the weight is 0 against the maximum's 1 */
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * float_of((uint32_t)((int32_t)n + 127) << 23);  /* times 2^n */
}

#if defined(__AVX512F__)
/* exp_nonpositive on 16 floats: the same steps, with vscalefps for the power of two (GCC 12
   does not vectorise the scalar version's bit cast). */
static inline __m512 exp_nonpositive16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                                  _mm512_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_add_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f))),
                             _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    static const float coefficients[] = {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                                         5.0000001201e-1f};
    for (int i = 0; i < 5; i++) p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(coefficients[i]));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

#endif
