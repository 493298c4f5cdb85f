/* Rotary position embedding (rotate-half layout) of float32 heads, in one pass.

   PyTorch spends five calls on it (two products, a concatenation of the halves, a sum, and a
   view), about 12 us a layer for one decoding token; this takes one. Per token t and head h of
   x [tokens, heads, dim] (token stride x_stride, heads adjacent) into out [tokens, heads, dim]:
     out = x * cos[t] + swap_halves(x) * signed_sin[t]
   with cos and signed_sin [tokens, dim] (signed_sin's first half negated). Each product is
   rounded, then the sum, exactly as the PyTorch expression computes it: the build does not fuse
   multiply-adds (ISO C mode), so both paths give the same bits. */
#include <stdint.h>

#include "entry_points.h"

void rotary(const float *x, int64_t x_stride, const float *cos, const float *signed_sin, float *out,
            int tokens, int heads, int dim) {
    int half = dim / 2;
#pragma omp parallel for if ((int64_t)tokens * heads * dim > (1 << 16))
    for (int t = 0; t < tokens; t++) {
        const float *c = cos + (int64_t)t * dim, *s = signed_sin + (int64_t)t * dim;
        for (int h = 0; h < heads; h++) {
            const float *in = x + t * x_stride + (int64_t)h * dim;
            float *o = out + ((int64_t)t * heads + h) * dim;
#pragma omp simd
            for (int d = 0; d < half; d++) {
                float kept = in[d] * c[d], swapped = in[d + half] * s[d];
                o[d] = kept + swapped;
            }
#pragma omp simd
            for (int d = half; d < dim; d++) {
                float kept = in[d] * c[d], swapped = in[d - half] * s[d];
                o[d] = kept + swapped;
            }
        }
    }
}
