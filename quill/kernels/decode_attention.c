/* Attention of single queries over a paged, head-major float32 KV cache, for decoding rows.

   The PyTorch path gathers every row's keys and values into padded tensors, then runs matmul,
   masked softmax and matmul: about ten calls per layer and a copy of the whole context. This
   reads keys and values in place through each row's block table. Every (row, kv head) pair is
   computed alone and in a fixed order, so a row's result does not depend on the batch around it.

   Layouts: q [rows] with row stride q_stride, each [heads, dim]; caches [kv_heads, num_slots, dim];
   block_tables [rows, max_blocks] (int32); out [rows, heads * dim]. Query head h attends kv head
   h / (heads / kv_heads). A row sees positions max(0, len - window) .. len - 1 (window 0: all). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

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

/* One (row, kv head): the `group` query heads that share the kv head. Always inlined into
   `attend_dim`, so that common head sizes get loops of known length. */
static inline __attribute__((always_inline)) void attend_one(
    const float *restrict q, const float *restrict k_cache, const float *restrict v_cache,
    float *restrict out, const int32_t *restrict table, int first, int len, int group, int dim,
    int64_t head_offset, int block_size, float scale, float *restrict scores) {
    int count = len - first;
    for (int p = first; p < len;) {  /* block by block: no division per key */
        int offset = p % block_size, n = block_size - offset < len - p ? block_size - offset : len - p;
        const float *keys = k_cache + (head_offset + (int64_t)table[p / block_size] * block_size + offset) * dim;
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
        const float *values = v_cache + (head_offset + (int64_t)table[p / block_size] * block_size + offset) * dim;
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

static void attend_dim(const float *q, const float *k_cache, const float *v_cache, float *out,
                       const int32_t *table, int first, int len, int group, int dim, int64_t head_offset,
                       int block_size, float scale, float *scores) {
    switch (dim) {  /* the same code, compiled for the head sizes of common models */
    case 64: attend_one(q, k_cache, v_cache, out, table, first, len, group, 64, head_offset, block_size, scale, scores); break;
    case 128: attend_one(q, k_cache, v_cache, out, table, first, len, group, 128, head_offset, block_size, scale, scores); break;
    case 256: attend_one(q, k_cache, v_cache, out, table, first, len, group, 256, head_offset, block_size, scale, scores); break;
    default: attend_one(q, k_cache, v_cache, out, table, first, len, group, dim, head_offset, block_size, scale, scores);
    }
}

/* Returns 0, or -1 when scratch memory could not be allocated. */
int decode_attention(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                     float *out, const int32_t *block_tables, int max_blocks, const int32_t *context_lens,
                     int rows, int heads, int kv_heads, int dim, int64_t num_slots, int block_size,
                     int window, float scale) {
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
            float *scores = malloc(sizeof(float) * group * (len - first));
            if (!scores) {
                failed = 1;
                continue;
            }
            attend_dim(q + r * q_stride + h * group * dim, k_cache, v_cache,
                       out + ((int64_t)r * heads + h * group) * dim, block_tables + (int64_t)r * max_blocks,
                       first, len, group, dim, h * num_slots, block_size, scale, scores);
            free(scores);
        }
    }
    return failed ? -1 : 0;
}
