/* Writes a step's keys and values into their KV-cache slots, converted to the cache's dtype.

   PyTorch spends four calls on it (two conversions, two index_copy_), about 8 us a layer for one
   decoding token; this takes one. k and v are [tokens, kv_heads, dim] float32 (token strides
   k_stride and v_stride, heads adjacent); the caches are [kv_heads, num_slots, dim] of float32,
   float16 or bfloat16 (cache_type 0, 1, 2). Conversions round to nearest even, as PyTorch's do,
   so both paths store the same bits. */
#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "entry_points.h"
#include "half_floats.h"

static void store_row(const float *source, void *cache, enum cache_type type, int64_t start, int dim) {
    if (type == CACHE_F32) {
        memcpy((float *)cache + start, source, sizeof(float) * dim);
        return;
    }
    uint16_t *target = (uint16_t *)cache + start;
    if (type == CACHE_BF16) {
        for (int d = 0; d < dim; d++) target[d] = to_bf16(source[d]);
        return;
    }
    int d = 0;
#if defined(__F16C__)
    for (; d + 8 <= dim; d += 8)
        _mm_storeu_si128((__m128i *)(target + d),
                         _mm256_cvtps_ph(_mm256_loadu_ps(source + d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; d < dim; d++) target[d] = to_half(source[d]);
}

void store_kv(const float *k, int64_t k_stride, const float *v, int64_t v_stride, const int64_t *slots, int tokens,
              int kv_heads, int dim, void *k_cache, void *v_cache, int cache_type, int64_t num_slots) {
    for (int t = 0; t < tokens; t++) {
        for (int h = 0; h < kv_heads; h++) {
            int64_t start = (h * num_slots + slots[t]) * dim;
            store_row(k + t * k_stride + (int64_t)h * dim, k_cache, (enum cache_type)cache_type, start, dim);
            store_row(v + t * v_stride + (int64_t)h * dim, v_cache, (enum cache_type)cache_type, start, dim);
        }
    }
}
