/* Every decoder layer of a step in one call: the layers of quill/models/llama.py and gemma3.py,
   run through the same kernels, in the same order, on the same bits as the PyTorch modules run them.

   A decoding step of SmolLM2 spends about 40 PyTorch operations and ctypes calls per layer
   between the kernels: views, conversions, splits, a residual add, each a few microseconds, 5-6
   ms of a 13 ms step (AMD EPYC, 2 cores; `benchmarks/single_stream.py`). Here a step is one call
   for all 30 layers (SmolLM2's decode: 75 -> 100-108 tokens/s). Nothing is computed differently:
   this file calls the functions the modules call (linked from the object files their own
   libraries are linked from: the same machine code, see kernels.LINKED), and
   does between them exactly what PyTorch does between them (widening bf16 to float32, rounding
   back to nearest even, a residual add rounded once). quill/layers/fused_layers.py holds the
   conditions under which a model qualifies; tests/test_fused_layers.py compares both paths bit
   for bit.

   Per layer, for rows x [rows, hidden] bf16 (updated in place):
     h = rms_norm(x);  qkv = h @ Wqkv (bf16, widened to float32)
     q, k = rms_norm_heads(q), rms_norm_heads(k) (Gemma 3)
     q, k = rotary(q, k) (unless the layer has no RoPE);  store k, v in the cache
     a = attention(q) (float32, rounded to bf16);  x = x + [rms_norm](a @ Wo)
     h = rms_norm(x);  x = x + [rms_norm](gated_activation(h @ Wgate_up) @ Wdown)
   where [rms_norm] is the block's output norm, which only Gemma 3 has. */
#include <stdint.h>
#include <stdlib.h>

#include "entry_points.h"
#include "half_floats.h"
#include "thread_buffer.h"

typedef struct {
    const uint16_t *attention_norm, *mlp_norm;         /* bf16 [hidden]: each block's input norm */
    const uint16_t *attention_out_norm, *mlp_out_norm; /* bf16 [hidden] or NULL: each block's output norm */
    const uint16_t *q_norm, *k_norm;                   /* bf16 [head_dim] or NULL: per-head norms */
    float norm_offset, head_norm_offset, eps;
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
    const float *cos[2], *signed_sin[2];           /* [rows, table_width] per rotary table */
    int table_width;
    int rows_per_pass;                             /* see decoder_layers */
} step_t;

/* Where each intermediate lives in the workspace, for `rows` rows of the widest layer. */
typedef struct {
    uint16_t *normed, *qkv_bf16, *attended_bf16, *projected, *gate_up, *activated;
    float *qkv, *head_normed, *rotated, *attended;
} workspace_t;

static size_t aligned(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

/* This thread's workspace memory, at least `bytes`. */
static void *scratch(size_t bytes) {
    static __thread void *buffer;
    static __thread size_t capacity;
    return grown_buffer(&buffer, &capacity, bytes);
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
    size_t sizes[] = {hidden * 2, qkv * 2, heads * 2, hidden * 2, inner * 4, inner * 2, qkv * 4, qkv * 4, qkv * 4,
                      heads * 4};
    size_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) total += aligned(sizes[i] * rows);
    char *base = scratch(total);
    if (!base) return -1;
    void **parts[] = {(void **)&w->normed, (void **)&w->qkv_bf16, (void **)&w->attended_bf16,
                      (void **)&w->projected, (void **)&w->gate_up, (void **)&w->activated,
                      (void **)&w->qkv, (void **)&w->head_normed, (void **)&w->rotated, (void **)&w->attended};
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

/* q and k of every row, as the attention module hands them on: normed per head (q and k apart)
   and rotated, or rotated together (adjacent in qkv), or neither. Sets their rows and strides. */
static void queries_and_keys(const layer_t *l, const step_t *s, const workspace_t *w, const float **q,
                             int64_t *q_stride, const float **k, int64_t *k_stride) {
    int rows = s->rows, dim = l->head_dim;
    int64_t q_width = (int64_t)l->heads * dim, kv_width = (int64_t)l->kv_heads * dim;
    int64_t qkv_width = q_width + 2 * kv_width;
    *q = w->qkv, *k = w->qkv + q_width, *q_stride = *k_stride = qkv_width;
    if (l->q_norm) {
        float *normed_k = w->head_normed + rows * q_width, *rotated_k = w->rotated + rows * q_width;
        rms_norm_heads(*q, qkv_width, l->q_norm, w->head_normed, rows, l->heads, dim, l->eps, l->head_norm_offset);
        rms_norm_heads(*k, qkv_width, l->k_norm, normed_k, rows, l->kv_heads, dim, l->eps, l->head_norm_offset);
        *q = w->head_normed, *k = normed_k, *q_stride = q_width, *k_stride = kv_width;
        if (l->rope >= 0) {
            rotary(*q, q_width, s->cos[l->rope], s->signed_sin[l->rope], w->rotated, rows, l->heads, dim);
            rotary(*k, kv_width, s->cos[l->rope], s->signed_sin[l->rope], rotated_k, rows, l->kv_heads, dim);
            *q = w->rotated, *k = rotated_k;
        }
    } else if (l->rope >= 0) { /* into [rows, heads + kv_heads, dim] */
        rotary(w->qkv, qkv_width, s->cos[l->rope], s->signed_sin[l->rope], w->rotated, rows, l->heads + l->kv_heads,
               dim);
        *q = w->rotated, *k = w->rotated + q_width, *q_stride = *k_stride = q_width + kv_width;
    }
}

/* x = bf16(x + out), or bf16(x + norm(out)) where the block has an output norm (Gemma 3). */
static void add_block_output(const layer_t *l, const uint16_t *out_norm, uint16_t *x, uint16_t *out, int rows,
                             int hidden, uint16_t *normed) {
    if (out_norm) {
        rms_norm(out, hidden, out_norm, normed, rows, hidden, l->eps, l->norm_offset);
        out = normed;
    }
    add_rounded(x, out, (int64_t)rows * hidden);
}

static int layer(const layer_t *l, const step_t *s, uint16_t *x, int hidden, const workspace_t *w) {
    int rows = s->rows, dim = l->head_dim;
    int64_t q_width = (int64_t)l->heads * dim, kv_width = (int64_t)l->kv_heads * dim;
    int64_t qkv_width = q_width + 2 * kv_width;
    rms_norm(x, hidden, l->attention_norm, w->normed, rows, hidden, l->eps, l->norm_offset);
    if (matmul(l->qkv, w->normed, hidden, rows, w->qkv_bf16, qkv_width, 1)) return -1;
    widen(w->qkv_bf16, w->qkv, rows * qkv_width);
    const float *q, *k, *v = w->qkv + q_width + kv_width;
    int64_t q_stride, k_stride;
    queries_and_keys(l, s, w, &q, &q_stride, &k, &k_stride);
    store_kv(k, k_stride, v, qkv_width, s->slots, rows, l->kv_heads, dim, l->k_cache, l->v_cache, l->cache_type,
             l->num_slots);
    if (decode_attention(q, q_stride, l->k_cache, l->v_cache, l->cache_type, w->attended, s->block_tables,
                         s->max_blocks, s->context_lens, rows, l->heads, l->kv_heads, dim, l->num_slots,
                         s->block_size, l->window, l->scale))
        return -1;
    narrow(w->attended, w->attended_bf16, rows * q_width);
    if (matmul(l->o, w->attended_bf16, q_width, rows, w->projected, hidden, 1)) return -1;
    add_block_output(l, l->attention_out_norm, x, w->projected, rows, hidden, w->normed);

    rms_norm(x, hidden, l->mlp_norm, w->normed, rows, hidden, l->eps, l->norm_offset);
    if (matmul(l->gate_up, w->normed, hidden, rows, w->gate_up, 2 * (int64_t)l->intermediate, 1)) return -1;
    gated_activation(w->gate_up, 2 * (int64_t)l->intermediate, rows, l->intermediate, l->activation, w->activated);
    if (matmul(l->down, w->activated, l->intermediate, rows, w->projected, hidden, 1)) return -1;
    add_block_output(l, l->mlp_out_norm, x, w->projected, rows, hidden, w->normed);
    return 0;
}

/* The rows from `first` on, at most `rows` of them, as a step of their own. */
static step_t rows_of(const step_t *s, int first, int rows) {
    step_t part = *s;
    part.rows = rows;
    part.slots += first, part.block_tables += (int64_t)first * s->max_blocks, part.context_lens += first;
    for (int t = 0; t < 2; t++)
        if (part.cos[t]) part.cos[t] += (int64_t)first * s->table_width, part.signed_sin[t] += (int64_t)first * s->table_width;
    return part;
}

/* Runs `count` layers over x [step->rows, hidden] (bf16, contiguous), in place. Returns 0, or -1
   when scratch memory could not be allocated.

   The rows go through all the layers `rows_per_pass` at a time, which bounds the workspace (about
   28 KB a row for SmolLM2, 43 for Gemma 3 270M), as chunked prefill cuts a prompt: a later pass's
   rows find the earlier ones' keys and values in the cache, and every row computes the same. */
int decoder_layers(const layer_t *layers, int count, const step_t *step, uint16_t *x, int hidden) {
    for (int first = 0; first < step->rows; first += step->rows_per_pass) {
        int rows = step->rows - first < step->rows_per_pass ? step->rows - first : step->rows_per_pass;
        step_t part = rows_of(step, first, rows);
        workspace_t w;
        if (workspace(layers, count, rows, hidden, &w)) return -1;
        for (int i = 0; i < count; i++)
            if (layer(&layers[i], &part, x + (int64_t)first * hidden, hidden, &w)) return -1;
    }
    return 0;
}
