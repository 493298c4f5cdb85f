/* Every decoder layer of a step in one call: the layers of quill/models/llama.py, run through the
   same kernels, in the same order, on the same bits as the PyTorch modules run them.

   A decoding step of SmolLM2 spends about 40 PyTorch operations and ctypes calls per layer
   between the kernels: views, conversions, splits, a residual add, each a few microseconds, 5-6
   ms of a 13 ms step (AMD EPYC, 2 cores; `benchmarks/single_stream.py`). Here a step is one call
   for all 30 layers. Nothing is computed differently: this file calls the functions the modules
   call (linked from their own files, compiled with the same flags, so the same machine code), and
   does between them exactly what PyTorch does between them (widening bf16 to float32, rounding
   back to nearest even, a residual add rounded once). quill/layers/fused_layers.py holds the
   conditions under which a model qualifies; tests/test_fused_layers.py compares both paths bit
   for bit.

   Per layer, for rows x [rows, hidden] bf16 (updated in place):
     h = rms_norm(x);  qkv = h @ Wqkv (bf16, widened to float32)
     q, k = rotary(q, k) (unless the layer has no RoPE);  store k, v in the cache
     a = attention(q) (float32, rounded to bf16);  x = x + a @ Wo
     h = rms_norm(x);  x = x + gated_activation(h @ Wgate_up) @ Wdown */
#include <stdint.h>
#include <stdlib.h>

#include "entry_points.h"
#include "half_floats.h"

typedef struct {
    const uint16_t *attention_norm, *mlp_norm; /* bf16 [hidden] */
    float norm_offset, eps;
    const weights_t *qkv, *o, *gate_up, *down;
    int heads, kv_heads, head_dim, intermediate, activation; /* activation: gated_activation's kind */
    int rope;                                                /* which of the step's tables, or -1: none */
    void *k_cache, *v_cache;                                 /* [kv_heads, num_slots, head_dim] */
    int cache_type, window;
    int64_t num_slots;
    float scale;
} layer_t;

typedef struct {
    int rows;
    const int64_t *slots;                          /* [rows] the cache slot of each row's token */
    const int32_t *block_tables;                   /* [rows, max_blocks] */
    int max_blocks;
    const int32_t *context_lens;                   /* [rows] */
    int block_size;
    const float *cos[2], *signed_sin[2];           /* [rows, head_dim] per rotary table */
} step_t;

/* Where each intermediate lives in the workspace, for `rows` rows of the widest layer. */
typedef struct {
    uint16_t *normed, *qkv_bf16, *attended_bf16, *projected, *gate_up, *activated;
    float *qkv, *rotated, *attended;
} workspace_t;

static size_t aligned(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

/* A per-thread buffer kept between calls (a fresh one per call would be page-faulted each time). */
static void *scratch(size_t bytes) {
    static __thread void *buffer;
    static __thread size_t capacity;
    if (bytes > capacity) {
        free(buffer);
        capacity = aligned(bytes) + 4096;
        buffer = aligned_alloc(64, capacity);
        if (!buffer) capacity = 0;
    }
    return buffer;
}

static int workspace(const layer_t *layers, int count, int rows, int hidden, workspace_t *w) {
    size_t qkv = 0, heads = 0, inner = 0;
    for (int i = 0; i < count; i++) {
        const layer_t *l = &layers[i];
        size_t width = (size_t)(l->heads + 2 * l->kv_heads) * l->head_dim;
        qkv = width > qkv ? width : qkv;
        heads = (size_t)l->heads * l->head_dim > heads ? (size_t)l->heads * l->head_dim : heads;
        inner = (size_t)l->intermediate > inner ? (size_t)l->intermediate : inner;
    }
    size_t sizes[] = {hidden * 2, qkv * 2, heads * 2, hidden * 2, inner * 4, inner * 2, qkv * 4, qkv * 4, heads * 4};
    size_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) total += aligned(sizes[i] * rows);
    char *base = scratch(total);
    if (!base) return -1;
    void **parts[] = {(void **)&w->normed, (void **)&w->qkv_bf16, (void **)&w->attended_bf16,
                      (void **)&w->projected, (void **)&w->gate_up, (void **)&w->activated,
                      (void **)&w->qkv, (void **)&w->rotated, (void **)&w->attended};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        *parts[i] = base;
        base += aligned(sizes[i] * rows);
    }
    return 0;
}

/* x = bf16(x + y), elementwise over n values: PyTorch's bf16 add. */
static void add_rounded(uint16_t *x, const uint16_t *y, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) x[i] = to_bf16(from_bf16(x[i]) + from_bf16(y[i]));
}

static void widen(const uint16_t *in, float *out, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = from_bf16(in[i]);
}

static void narrow(const float *in, uint16_t *out, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = to_bf16(in[i]);
}

static int layer(const layer_t *l, const step_t *s, uint16_t *x, int hidden, const workspace_t *w) {
    int rows = s->rows, dim = l->head_dim;
    int64_t qkv_width = (int64_t)(l->heads + 2 * l->kv_heads) * dim, q_width = (int64_t)l->heads * dim;
    rms_norm(x, hidden, l->attention_norm, w->normed, rows, hidden, l->eps, l->norm_offset);
    if (matmul(l->qkv, w->normed, hidden, rows, w->qkv_bf16, qkv_width, 1)) return -1;
    widen(w->qkv_bf16, w->qkv, rows * qkv_width);
    /* q and k adjacent: rotated in one pass into [rows, heads + kv_heads, dim], as the module does */
    const float *q = w->qkv, *k = w->qkv + q_width;
    int64_t qk_stride = qkv_width;
    if (l->rope >= 0) {
        rotary(w->qkv, qkv_width, s->cos[l->rope], s->signed_sin[l->rope], w->rotated, rows, l->heads + l->kv_heads,
               dim);
        q = w->rotated, k = w->rotated + q_width, qk_stride = q_width + (int64_t)l->kv_heads * dim;
    }
    const float *v = w->qkv + q_width + (int64_t)l->kv_heads * dim;
    store_kv(k, qk_stride, v, qkv_width, s->slots, rows, l->kv_heads, dim, l->k_cache, l->v_cache, l->cache_type,
             l->num_slots);
    if (decode_attention(q, qk_stride, l->k_cache, l->v_cache, l->cache_type, w->attended, s->block_tables,
                         s->max_blocks, s->context_lens, rows, l->heads, l->kv_heads, dim, l->num_slots,
                         s->block_size, l->window, l->scale))
        return -1;
    narrow(w->attended, w->attended_bf16, rows * q_width);
    if (matmul(l->o, w->attended_bf16, q_width, rows, w->projected, hidden, 1)) return -1;
    add_rounded(x, w->projected, (int64_t)rows * hidden);

    rms_norm(x, hidden, l->mlp_norm, w->normed, rows, hidden, l->eps, l->norm_offset);
    if (matmul(l->gate_up, w->normed, hidden, rows, w->gate_up, 2 * (int64_t)l->intermediate, 1)) return -1;
    gated_activation(w->gate_up, 2 * (int64_t)l->intermediate, rows, l->intermediate, l->activation, w->activated);
    if (matmul(l->down, w->activated, l->intermediate, rows, w->projected, hidden, 1)) return -1;
    add_rounded(x, w->projected, (int64_t)rows * hidden);
    return 0;
}

/* Runs `count` layers over x [step->rows, hidden] (bf16, contiguous), in place. Returns 0, or -1
   when scratch memory could not be allocated. */
int decoder_layers(const layer_t *layers, int count, const step_t *step, uint16_t *x, int hidden) {
    workspace_t w;
    if (workspace(layers, count, step->rows, hidden, &w)) return -1;
    for (int i = 0; i < count; i++)
        if (layer(&layers[i], step, x, hidden, &w)) return -1;
    return 0;
}
