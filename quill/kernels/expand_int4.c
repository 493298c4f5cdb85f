/* Expands an int4 layer in PyTorch's packed CPU layout to bfloat16 weights, in one pass.

   Long prompts multiply through bf16 weights expanded for the step (quill/layers/quantized.py);
   PyTorch spends about 40 ms a 512-token SmolLM2 prefill on it in five passes over memory. Per
   block of 64 output rows and input column, the packed layout holds 32 bytes: rows 0-31 in the
   low nibbles, 32-63 in the high ones. Each weight is (code - 8) * scale + zero, computed in
   float32 and rounded once to bfloat16 (nearest even): the product is exact (4 bits times 8), so
   the sum rounds the same with or without a fused multiply-add, as PyTorch's addcmul does.
   out is [in, out_features] (the transpose of the weight); scales_and_zeros [in / group,
   out_features, 2] bfloat16. */
#include <stdint.h>

#include "half_floats.h"

void expand_int4(const uint8_t *packed, const uint16_t *scales_and_zeros, uint16_t *out, int out_features,
                 int in_features, int group_size) {
#pragma omp parallel for
    for (int i = 0; i < in_features; i++) {
        const uint16_t *group = scales_and_zeros + (int64_t)(i / group_size) * out_features * 2;
        uint16_t *row = out + (int64_t)i * out_features;
        for (int block = 0; block < out_features / 64; block++) {
            const uint8_t *bytes = packed + ((int64_t)block * in_features + i) * 32;
            int o = block * 64;
#pragma omp simd
            for (int r = 0; r < 32; r++) {
                float low = (float)((bytes[r] & 15) - 8), high = (float)((bytes[r] >> 4) - 8);
                row[o + r] = to_bf16(low * from_bf16(group[2 * (o + r)]) + from_bf16(group[2 * (o + r) + 1]));
                row[o + 32 + r] = to_bf16(high * from_bf16(group[2 * (o + 32 + r)]) +
                                          from_bf16(group[2 * (o + 32 + r) + 1]));
            }
        }
    }
}
