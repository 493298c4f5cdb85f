/* Attention of single queries over a paged, head-major KV cache: decoding rows, and on the CPU
   every prompt token too (each attended as the row that decoding its position would be).

   The PyTorch path gathers every row's keys and values into padded tensors, then runs matmul,
   masked softmax and matmul: about ten calls per layer and a copy of the whole context. This
   reads keys and values in place through each row's block table. Every (row, kv head) pair is
   computed in a fixed order of its own, so a row's result depends neither on the batch around it
   nor on how its prompt was cut into chunks. Consecutive positions of one sequence form tiles
   that share each block's reads.

   The cache holds float32, float16 or bfloat16 (cache_type 0, 1, 2); half-size caches are widened
   to float32 a block at a time (a decoding row's in registers, see `in_place`), and all arithmetic
   is float32. Decoding reads the whole context
   for every token: a half-size cache halves those bytes (and the cache's memory), and the next
   block is prefetched while one is computed. With AVX-512 (and head sizes a multiple of 16), the
   scores of 16 keys come out of one vector tree, the exponentials are vectorised and the
   weighted values add up in registers; elsewhere plain loops do the same sums.

   Layouts: q [rows] with row stride q_stride, each [heads, dim] (float32); caches [kv_heads,
   num_slots, dim]; block_tables [rows, max_blocks] (int32); out [rows, heads * dim] (float32).
   Query head h attends kv head h / (heads / kv_heads). A row sees positions
   max(0, len - window) .. len - 1 (window 0: all). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "entry_points.h"
#include "exp_nonpositive.h"
#include "half_floats.h"

/* `count` cache elements from element `start` as float32: in place for a float32 cache,
   otherwise converted into `scratch`. Not inlined on purpose: inlined, GCC 12 splits the callers'
   loops by cache type and leaves the float32 copy's dot products unvectorised (2.7x slower). */
static __attribute__((noinline)) const float *widen(const void *cache, enum cache_type type, int64_t start,
                                                    int count, float *restrict scratch) {
    if (type == CACHE_F32) return (const float *)cache + start;
    const uint16_t *source = (const uint16_t *)cache + start;
    if (type == CACHE_BF16) { /* bfloat16 is the top half of a float32 */
#pragma omp simd
        for (int i = 0; i < count; i++) scratch[i] = from_bf16(source[i]);
        return scratch;
    }
    int i = 0;
#if defined(__F16C__)
    for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(scratch + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(source + i))));
#endif
    for (; i < count; i++) scratch[i] = from_half(source[i]);
    return scratch;
}

/* Element `i` of cache data read as `type`: float32 (a float32 cache, or a block `widen` stored),
   or float16 or bfloat16 read in place. */
static inline __attribute__((always_inline)) const void *element(const void *data, enum cache_type type, int64_t i) {
    return type == CACHE_F32 ? (const void *)((const float *)data + i) : (const void *)((const uint16_t *)data + i);
}

#if defined(__AVX512F__)
/* 16 floats from element `i` of `data` read as `type`: float32, or float16 or bfloat16 widened in
   registers, the exact values `widen` would have stored (both widenings are exact). */
static inline __attribute__((always_inline)) __m512 load16(const void *data, int64_t i, enum cache_type type) {
    if (type == CACHE_F32) return _mm512_loadu_ps((const float *)data + i);
    __m256i halves = _mm256_loadu_si256((const __m256i *)((const uint16_t *)data + i));
    if (type == CACHE_F16) return _mm512_cvtph_ps(halves);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

/* Dot products of one query with `n` <= 16 keys (rows `dim` apart; dim a multiple of 16), as one
   vector: each key's 16 lane sums, then all keys' lanes added pairwise in a transposing tree.
   Every key's sum is added in the same order, whatever its position among the 16. */
static inline __attribute__((always_inline)) __m512 dot16(const float *restrict query, const void *keys,
                                                          enum cache_type read, int n, int dim) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) {  /* unrolled, branch-free: the sums stay in registers */
        int64_t key = (int64_t)(i < n ? i : n - 1) * dim;  /* keys past n: a copy, unstored */
        acc[i] = _mm512_setzero_ps();
        for (int d = 0; d < dim; d += 16)
            acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(query + d), load16(keys, key + d, read), acc[i]);
    }
    __m512 pairs[8], quads[4], halves[2];
    for (int i = 0; i < 8; i++)  /* 128-bit lane j: keys 2i, 2i+1, two partial sums each */
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                                 _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* 128-bit lane j: keys 4i..4i+3, the sums of their lane-j floats */
        quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++)  /* 128-bit lanes: keys 8i..8i+3 (halves), then 8i+4..8i+7 */
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                                  _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                         _mm512_shuffle_f32x4(halves[0], halves[1], 0xDD));
}
#endif

/* scores[i] = scale * (query . key i) for the `n` keys of a block, read as `read` (float32, or a
   half-size type only where the vector path below runs: see `in_place`). */
static inline __attribute__((always_inline)) void score_keys(const float *restrict query, const void *keys,
                                                             enum cache_type read, int n, int dim, float scale,
                                                             float *restrict scores) {
#if defined(__AVX512F__)
    if (dim % 16 == 0) {  /* 16 keys at a time, with no horizontal sum per key */
        for (int i = 0; i < n; i += 16) {
            int m = n - i < 16 ? n - i : 16;
            __m512 dots = dot16(query, element(keys, read, (int64_t)i * dim), read, m, dim);
            _mm512_mask_storeu_ps(scores + i, (__mmask16)((1u << m) - 1), _mm512_mul_ps(dots, _mm512_set1_ps(scale)));
        }
        return;
    }
#endif
    for (int i = 0; i < n; i++) {
        const float *key = (const float *)keys + (int64_t)i * dim;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int d = 0; d < dim; d++) dot += query[d] * key[d];
        scores[i] = dot * scale;
    }
}

/* out += sum over the block's `n` values (rows `dim` apart) of weights[i] * value i, key by key,
   read as `read` (as in score_keys). */
static inline __attribute__((always_inline)) void add_weighted(float *restrict out, const float *restrict weights,
                                                               const void *values, enum cache_type read, int n,
                                                               int dim) {
#if defined(__AVX512F__)
    if (dim % 16 == 0) {  /* up to 64 output floats in registers across the block */
        for (int d0 = 0; d0 < dim; d0 += 64) {
            int chunks = (dim - d0) / 16 < 4 ? (dim - d0) / 16 : 4;
            __m512 acc[4];
            for (int c = 0; c < chunks; c++) acc[c] = _mm512_loadu_ps(out + d0 + 16 * c);
            for (int i = 0; i < n; i++) {
                __m512 weight = _mm512_set1_ps(weights[i]);
                int64_t value = (int64_t)i * dim + d0;
                for (int c = 0; c < chunks; c++)
                    acc[c] = _mm512_fmadd_ps(weight, load16(values, value + 16 * c, read), acc[c]);
            }
            for (int c = 0; c < chunks; c++) _mm512_storeu_ps(out + d0 + 16 * c, acc[c]);
        }
        return;
    }
#endif
    for (int i = 0; i < n; i++) {
        const float *value = (const float *)values + (int64_t)i * dim;
#pragma omp simd
        for (int d = 0; d < dim; d++) out[d] += weights[i] * value[d];
    }
}

struct kv_cache {
    const void *keys, *values;  /* [kv_heads, num_slots, dim] each */
    enum cache_type type;
    int64_t num_slots;
    int block_size;
};

/* Positions p.. up to the end of p's block or to len, whichever comes first. */
static inline int keys_in_block(int block_size, int p, int len) {
    int to_block_end = block_size - p % block_size;
    return to_block_end < len - p ? to_block_end : len - p;
}

/* The cache slot of position p of a row with block table `table`, in kv head `kv_head`. */
static inline int64_t slot_of(const struct kv_cache *cache, int kv_head, const int32_t *table, int p) {
    return kv_head * cache->num_slots + (int64_t)table[p / cache->block_size] * cache->block_size + p % cache->block_size;
}

/* Ask for the memory of the block holding position p (up to position len) of `data` (the keys or
   the values) ahead of its use: blocks lie scattered, so the hardware cannot guess the next one. */
static inline void prefetch(const struct kv_cache *cache, const void *data, int kv_head, const int32_t *table, int p,
                            int len, int dim) {
    int n = keys_in_block(cache->block_size, p, len);
    int64_t size = cache->type == CACHE_F32 ? 4 : 2;
    const char *start = (const char *)data + slot_of(cache, kv_head, table, p) * dim * size;
    for (int64_t byte = 0; byte < n * dim * size; byte += 64) __builtin_prefetch(start + byte);
}

/* Scores per query head are kept `stride` floats apart: the context length rounded up to 16, the
   tail filled with -inf, so that the softmax loops run in whole vectors. */
static inline int score_stride(int count) { return (count + 15) / 16 * 16; }

/* Softmax of `count` scores in place, over `stride` (see score_stride). */
static void softmax(float *restrict s, int count, int stride) {
    for (int i = count; i < stride; i++) s[i] = -INFINITY;  /* weighs e^-87 against the top's 1: nothing */
    float top = s[0];
#pragma omp simd reduction(max : top)
    for (int i = 1; i < stride; i++) top = s[i] > top ? s[i] : top;
    float total = 0.0f;
#if defined(__AVX512F__)
    __m512 sums = _mm512_setzero_ps();
    for (int i = 0; i < stride; i += 16) {
        __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(s + i), _mm512_set1_ps(top)));
        _mm512_storeu_ps(s + i, e);
        sums = _mm512_add_ps(sums, e);
    }
    total = _mm512_reduce_add_ps(sums);
#else
#pragma omp simd reduction(+ : total)
    for (int i = 0; i < stride; i++) {
        s[i] = exp_nonpositive(s[i] - top);
        total += s[i];
    }
#endif
    float inverse = 1.0f / total;
#pragma omp simd
    for (int i = 0; i < stride; i++) s[i] *= inverse;
}

static inline int first_visible(int len, int window) { return window > 0 && len > window ? len - window : 0; }

/* Rows attended together: consecutive positions of one sequence (the same block table, context
   lengths one apart), as a prompt's are. Each block of keys and values is read and widened once
   for the whole tile; every row still computes exactly what it would alone. */
#define MAX_TILE 16

/* How a tile's loops read the cache: a row alone (a tile of one: a decoding row) reads a float16 or
   bfloat16 cache in place, its vector loops widening each element in registers instead of `widen`
   storing the block as float32 first: the same floats, one pass over the block instead of two.
   Otherwise CACHE_F32: a float32 cache, or blocks widened once for all of a tile's rows.
   `benchmarks/attention.py` (16 rows, SmolLM2's heads, AMD EPYC, best of 7, alternating runs):
   bfloat16, one thread: 157-173 -> 131-154 us a call at 128 keys a row, at 512 and 2,048 the same
   within this machine's noise; float16 (the CPU default), one thread: 146 -> 129 us at 128 keys,
   279 -> 236 at 256, 553 -> 457 at 512; two threads: 86-108 -> 74-81, 155-161 -> 125-140,
   299 -> 241-247. In a 16-stream decode step, attention is about a seventh of the time. */
static inline enum cache_type in_place(const struct kv_cache *cache, int size, int dim) {
#if defined(__AVX512F__)
    if (size == 1 && cache->type != CACHE_F32 && dim % 16 == 0) return cache->type;
#else
    (void)cache, (void)size, (void)dim;
#endif
    return CACHE_F32;
}

/* The `count` cache elements of a block from element `start`, read as `read`: in place, or widened
   to float32 (`widen`). */
static inline __attribute__((always_inline)) const void *block_of(const void *data, enum cache_type type,
                                                                  enum cache_type read, int64_t start, int count,
                                                                  float *scratch) {
    return read != CACHE_F32 ? element(data, read, start) : (const void *)widen(data, type, start, count, scratch);
}

/* One (tile, kv head): the `group` query heads that share the kv head, for each of the tile's
   `size` rows. Always inlined into `attend_dim`, so that common head sizes get loops of known
   length. `scores` has room for the rows' group * score_stride(len - first) floats, `block` for
   block_size * dim. A row's keys are split where its own would be (block ends, its first and last
   position), so its sums run in the same order whatever else is in the tile. */
static inline __attribute__((always_inline)) void attend_tile(
    const float *restrict q, int64_t q_stride, const struct kv_cache *cache, int kv_head, float *restrict out,
    int64_t out_stride, const int32_t *restrict table, const int32_t *restrict lens, int size, int window,
    int group, int dim, float scale, float *restrict scores, float *restrict block, enum cache_type read) {
    int block_size = cache->block_size, first = first_visible(lens[0], window), len = lens[size - 1];
    int firsts[MAX_TILE], strides[MAX_TILE];
    float *row_scores[MAX_TILE];
    for (int t = 0, at = 0; t < size; at += group * strides[t], t++) {
        firsts[t] = first_visible(lens[t], window);
        strides[t] = score_stride(lens[t] - firsts[t]);
        row_scores[t] = scores + at;
    }
    for (int p = first; p < len;) {  /* block by block */
        int n = keys_in_block(block_size, p, len);
        if (p + n < len) prefetch(cache, cache->keys, kv_head, table, p + n, len, dim);
        else prefetch(cache, cache->values, kv_head, table, first, len, dim);  /* for after the softmax */
        const void *keys = block_of(cache->keys, cache->type, read, slot_of(cache, kv_head, table, p) * dim, n * dim,
                                    block);
        for (int t = 0; t < size; t++) {
            int from = p > firsts[t] ? p : firsts[t], to = p + n < lens[t] ? p + n : lens[t];
            for (int g = 0; from < to && g < group; g++)
                score_keys(q + t * q_stride + g * dim, element(keys, read, (int64_t)(from - p) * dim), read, to - from,
                           dim, scale, row_scores[t] + g * strides[t] + from - firsts[t]);
        }
        p += n;
    }
    for (int t = 0; t < size; t++) {
        for (int g = 0; g < group; g++) softmax(row_scores[t] + g * strides[t], lens[t] - firsts[t], strides[t]);
        for (int i = 0; i < group * dim; i++) out[t * out_stride + i] = 0.0f;
    }
    for (int p = first; p < len;) {
        int n = keys_in_block(block_size, p, len);
        if (p + n < len) prefetch(cache, cache->values, kv_head, table, p + n, len, dim);
        const void *values = block_of(cache->values, cache->type, read, slot_of(cache, kv_head, table, p) * dim,
                                      n * dim, block);
        for (int t = 0; t < size; t++) {
            int from = p > firsts[t] ? p : firsts[t], to = p + n < lens[t] ? p + n : lens[t];
            for (int g = 0; from < to && g < group; g++)
                add_weighted(out + t * out_stride + g * dim, row_scores[t] + g * strides[t] + from - firsts[t],
                             element(values, read, (int64_t)(from - p) * dim), read, to - from, dim);
        }
        p += n;
    }
}

static void attend_dim(const float *q, int64_t q_stride, const struct kv_cache *cache, int kv_head, float *out,
                       int64_t out_stride, const int32_t *table, const int32_t *lens, int size, int window, int group,
                       int dim, float scale, float *scores, float *block) {
    /* the same code, compiled for the head sizes of common models, each for every way of reading
       the cache (`read` is a constant in each call: three loop nests) */
    enum cache_type read = in_place(cache, size, dim);
#define TILE(DIM, READ) attend_tile(q, q_stride, cache, kv_head, out, out_stride, table, lens, size, window, group, \
                                    DIM, scale, scores, block, READ)
#define ATTEND(DIM) (read == CACHE_F16 ? TILE(DIM, CACHE_F16) : read == CACHE_BF16 ? TILE(DIM, CACHE_BF16) \
                                                                                 : TILE(DIM, CACHE_F32))
    switch (dim) {
    case 64: ATTEND(64); break;
    case 128: ATTEND(128); break;
    case 256: ATTEND(256); break;
    default: ATTEND(dim);
    }
#undef ATTEND
#undef TILE
}

/* Splits the rows into tiles; tile_starts gets rows + 1 entries at most. Returns the tile count. */
static int find_tiles(const int32_t *block_tables, int max_blocks, const int32_t *context_lens, int rows,
                      int block_size, int *tile_starts) {
    int tiles = 0;
    for (int r = 0; r < rows; r++) {
        int previous_blocks = r ? (context_lens[r - 1] + block_size - 1) / block_size : 0;
        int joins = r > 0 && r - tile_starts[tiles - 1] < MAX_TILE && context_lens[r] == context_lens[r - 1] + 1 &&
                    memcmp(block_tables + (int64_t)r * max_blocks, block_tables + (int64_t)(r - 1) * max_blocks,
                           sizeof(int32_t) * previous_blocks) == 0;
        if (!joins) tile_starts[tiles++] = r;
    }
    tile_starts[tiles] = rows;
    return tiles;
}

/* Returns 0, or -1 when scratch memory could not be allocated. */
int decode_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int cache_type,
                     float *out, const int32_t *block_tables, int max_blocks, const int32_t *context_lens,
                     int rows, int heads, int kv_heads, int dim, int64_t num_slots, int block_size,
                     int window, float scale) {
    struct kv_cache cache = {k_cache, v_cache, (enum cache_type)cache_type, num_slots, block_size};
    int group = heads / kv_heads;
    int *tile_starts = malloc(sizeof(int) * (rows + 1));
    if (!tile_starts) return -1;
    int tiles = find_tiles(block_tables, max_blocks, context_lens, rows, block_size, tile_starts);
    int64_t keys = 0;
    for (int r = 0; r < rows; r++) keys += context_lens[r];
    int failed = 0;
    /* Threads pay off only with enough work: waking them costs several microseconds. */
#pragma omp parallel for schedule(dynamic) collapse(2) if (keys * kv_heads * dim > (1 << 14)) reduction(| : failed)
    for (int i = 0; i < tiles; i++) {
        for (int h = 0; h < kv_heads; h++) {
            int r0 = tile_starts[i], size = tile_starts[i + 1] - r0;
            int64_t scores_size = 0;
            for (int r = r0; r < r0 + size; r++)
                scores_size += (int64_t)group * score_stride(context_lens[r] - first_visible(context_lens[r], window));
            float *scores = malloc(sizeof(float) * (scores_size + (int64_t)block_size * dim));
            if (!scores) {
                failed = 1;
                continue;
            }
            /* the tile's last row has the longest table: the others' are its beginning */
            attend_dim(q + r0 * q_stride + h * group * dim, q_stride, &cache, h,
                       out + ((int64_t)r0 * heads + h * group) * dim, (int64_t)heads * dim,
                       block_tables + (int64_t)(r0 + size - 1) * max_blocks, context_lens + r0, size, window,
                       group, dim, scale, scores, scores + scores_size);
            free(scores);
        }
    }
    free(tile_starts);
    return failed ? -1 : 0;
}
