/* Attention of single queries over a paged, head-major KV cache, for decoding rows.

   The PyTorch path gathers every row's keys and values into padded tensors, then runs matmul,
   masked softmax and matmul: about ten calls per layer and a copy of the whole context. This
   reads keys and values in place through each row's block table. Every (row, kv head) pair is
   computed alone and in a fixed order, so a row's result does not depend on the batch around it.

   The cache holds float32, float16 or bfloat16 (cache_type 0, 1, 2); half-size caches are widened
   to float32 a block at a time, and all arithmetic is float32. Decoding reads the whole context
   for every token: a half-size cache halves those bytes (and the cache's memory).

   Layouts: q [rows] with row stride q_stride, each [heads, dim] (float32); caches [kv_heads,
   num_slots, dim]; block_tables [rows, max_blocks] (int32); out [rows, heads * dim] (float32).
   Query head h attends kv head h / (heads / kv_heads). A row sees positions
   max(0, len - window) .. len - 1 (window 0: all). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

enum cache_type { CACHE_F32, CACHE_F16, CACHE_BF16 };

/* IEEE half to float, for CPUs without F16C (and the tail of a block). */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    union { uint32_t u; float f; } out;
    if (exponent == 0x1f) { /* infinity or NaN */
        out.u = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent) {
        out.u = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else { /* zero or subnormal: mantissa * 2^-24 */
        out.f = (float)mantissa * 5.9604644775390625e-8f;
        out.u |= sign;
    }
    return out.f;
}

/* `count` cache elements from element `start` as float32: in place for a float32 cache,
   otherwise converted into `scratch`. Not inlined on purpose: inlined, GCC 12 splits the callers'
   loops by cache type and leaves the float32 copy's dot products unvectorised (2.7x slower). */
static __attribute__((noinline)) const float *widen(const void *cache, enum cache_type type, int64_t start,
                                                    int count, float *restrict scratch) {
    if (type == CACHE_F32) return (const float *)cache + start;
    const uint16_t *source = (const uint16_t *)cache + start;
    if (type == CACHE_BF16) { /* bfloat16 is the top half of a float32 */
#pragma omp simd
        for (int i = 0; i < count; i++) {
            union { uint32_t u; float f; } value = {.u = (uint32_t)source[i] << 16};
            scratch[i] = value.f;
        }
        return scratch;
    }
    int i = 0;
#if defined(__F16C__)
    for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(scratch + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(source + i))));
#endif
    for (; i < count; i++) scratch[i] = half_to_float(source[i]);
    return scratch;
}

/* exp for x <= 0, vectorisable: Cephes' range reduction and polynomial (about 1 ulp). */
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
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

struct kv_cache {
    const void *keys, *values;  /* [kv_heads, num_slots, dim] each */
    enum cache_type type;
    int64_t num_slots;
    int block_size;
};

/* One (row, kv head): the `group` query heads that share the kv head. Always inlined into
   `attend_dim`, so that common head sizes get loops of known length. `scores` has room for
   group * (len - first) floats, `block` for block_size * dim. */
static inline __attribute__((always_inline)) void attend_one(
    const float *restrict q, const struct kv_cache *cache, int kv_head, float *restrict out,
    const int32_t *restrict table, int first, int len, int group, int dim, float scale,
    float *restrict scores, float *restrict block) {
    int count = len - first, block_size = cache->block_size;
    int64_t head_offset = kv_head * cache->num_slots;
    for (int p = first; p < len;) {  /* block by block: no division per key */
        int offset = p % block_size, n = block_size - offset < len - p ? block_size - offset : len - p;
        int64_t slot = head_offset + (int64_t)table[p / block_size] * block_size + offset;
        const float *keys = widen(cache->keys, cache->type, slot * dim, n * dim, block);
        for (int i = 0; i < n; i++) {
            const float *key = keys + (int64_t)i * dim;
            for (int g = 0; g < group; g++) {
                const float *query = q + g * dim;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < dim; d++) dot += query[d] * key[d];
                scores[g * count + p + i - first] = dot * scale;
            }
        }
        p += n;
    }
    for (int g = 0; g < group; g++) {
        float *s = scores + g * count;
        float top = s[0];
        for (int i = 1; i < count; i++) top = s[i] > top ? s[i] : top;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int i = 0; i < count; i++) {
            s[i] = exp_nonpositive(s[i] - top);
            total += s[i];
        }
        float inverse = 1.0f / total;
#pragma omp simd
        for (int i = 0; i < count; i++) s[i] *= inverse;
    }
    for (int i = 0; i < group * dim; i++) out[i] = 0.0f;
    for (int p = first; p < len;) {
        int offset = p % block_size, n = block_size - offset < len - p ? block_size - offset : len - p;
        int64_t slot = head_offset + (int64_t)table[p / block_size] * block_size + offset;
        const float *values = widen(cache->values, cache->type, slot * dim, n * dim, block);
        for (int i = 0; i < n; i++) {
            const float *value = values + (int64_t)i * dim;
            for (int g = 0; g < group; g++) {
                float weight = scores[g * count + p + i - first];
                float *o = out + g * dim;
#pragma omp simd
                for (int d = 0; d < dim; d++) o[d] += weight * value[d];
            }
        }
        p += n;
    }
}

static void attend_dim(const float *q, const struct kv_cache *cache, int kv_head, float *out, const int32_t *table,
                       int first, int len, int group, int dim, float scale, float *scores, float *block) {
    switch (dim) {  /* the same code, compiled for the head sizes of common models */
    case 64: attend_one(q, cache, kv_head, out, table, first, len, group, 64, scale, scores, block); break;
    case 128: attend_one(q, cache, kv_head, out, table, first, len, group, 128, scale, scores, block); break;
    case 256: attend_one(q, cache, kv_head, out, table, first, len, group, 256, scale, scores, block); break;
    default: attend_one(q, cache, kv_head, out, table, first, len, group, dim, scale, scores, block);
    }
}

/* Returns 0, or -1 when scratch memory could not be allocated. */
int decode_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int cache_type,
                     float *out, const int32_t *block_tables, int max_blocks, const int32_t *context_lens,
                     int rows, int heads, int kv_heads, int dim, int64_t num_slots, int block_size,
                     int window, float scale) {
    struct kv_cache cache = {k_cache, v_cache, (enum cache_type)cache_type, num_slots, block_size};
    int group = heads / kv_heads;
    int64_t keys = 0;
    for (int r = 0; r < rows; r++) keys += context_lens[r];
    int failed = 0;
    /* Threads pay off only with enough work: waking them costs several microseconds. */
#pragma omp parallel for schedule(dynamic) collapse(2) if (keys * kv_heads * dim > (1 << 14)) reduction(| : failed)
    for (int r = 0; r < rows; r++) {
        for (int h = 0; h < kv_heads; h++) {
            int len = context_lens[r];
            int first = window > 0 && len > window ? len - window : 0;
            float *scores = malloc(sizeof(float) * ((int64_t)group * (len - first) + (int64_t)block_size * dim));
            if (!scores) {
                failed = 1;
                continue;
            }
            attend_dim(q + r * q_stride + h * group * dim, &cache, h, out + ((int64_t)r * heads + h * group) * dim,
                       block_tables + (int64_t)r * max_blocks, first, len, group, dim, scale, scores,
                       scores + (int64_t)group * (len - first));
            free(scores);
        }
    }
    return failed ? -1 : 0;
}
