/* RMSNorm of bfloat16 rows, computed in float32 as the reference models do, in one pass.

   PyTorch spends about 15 us on it for one row (a conversion, a composite norm of five kernels,
   another conversion, a multiply); this takes a few. Per row r of x [rows, dim] (row stride
   x_stride) into out [rows, dim]:
     y = x * 1 / sqrt(mean(x^2) + eps)            (float32)
     offset == 0: out = bf16(w * bf16(y))         (Llama: the weight scales the rounded result)
     offset != 0: out = bf16(y * (w + offset))    (Gemma: the weight is stored minus one)
   Each row is computed alone and in a fixed order, whatever the number of rows. */
#include <math.h>
#include <stdint.h>

#include "entry_points.h"
#include "half_floats.h"

void rms_norm(const uint16_t *x, int64_t x_stride, const uint16_t *weight, uint16_t *out,
              int rows, int dim, float eps, float offset) {
#pragma omp parallel for if ((int64_t)rows * dim > (1 << 16))
    for (int r = 0; r < rows; r++) {
        const uint16_t *row = x + r * x_stride;
        uint16_t *result = out + (int64_t)r * dim;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int d = 0; d < dim; d++) {
            float value = from_bf16(row[d]);
            squares += value * value;
        }
        float inverse = 1.0f / sqrtf(squares / dim + eps);
        if (offset == 0.0f) {
#pragma omp simd
            for (int d = 0; d < dim; d++)
                result[d] = to_bf16(from_bf16(weight[d]) * from_bf16(to_bf16(from_bf16(row[d]) * inverse)));
        } else {
#pragma omp simd
            for (int d = 0; d < dim; d++)
                result[d] = to_bf16(from_bf16(row[d]) * inverse * (from_bf16(weight[d]) + offset));
        }
    }
}

/* RMSNorm of each head of float32 rows (Gemma 3's and Qwen3's q and k norms), into float32:
   per token t and head h of x [tokens, heads, dim] (token stride x_stride, heads adjacent) into
   out [tokens, heads, dim]:
     y = x * 1 / sqrt(mean(x^2) + eps);  out = y * (w + offset)
   (with offset 0 that is w * y, as the reference's float32 product). */
void rms_norm_heads(const float *x, int64_t x_stride, const uint16_t *weight, float *out, int tokens, int heads,
                    int dim, float eps, float offset) {
#pragma omp parallel for if ((int64_t)tokens * heads * dim > (1 << 16))
    for (int t = 0; t < tokens; t++) {
        for (int h = 0; h < heads; h++) {
            const float *row = x + t * x_stride + (int64_t)h * dim;
            float *result = out + ((int64_t)t * heads + h) * dim;
            float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
            for (int d = 0; d < dim; d++) squares += row[d] * row[d];
            float inverse = 1.0f / sqrtf(squares / dim + eps);
#pragma omp simd
            for (int d = 0; d < dim; d++) result[d] = row[d] * inverse * (from_bf16(weight[d]) + offset);
        }
    }
}
