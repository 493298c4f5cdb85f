/* The functions Python calls (through ctypes, quill/kernels/__init__.py) and the decoder calls
   (decoder.c, linked with the files that define them). Each defining file includes this header,
   so that the compiler checks every definition against the declaration its callers see. Each
   function is documented where it is defined. */
#ifndef QUILL_ENTRY_POINTS_H
#define QUILL_ENTRY_POINTS_H

#include <stdint.h>

enum format { FMT_BF16, FMT_INT4, FMT_INT8, FMT_INT8G, FMT_F32, FMT_Q8_0, FMT_INT4_Q8 };

/* Output columns per panel of every packed layout (quill/layers/matmul.py LANES). */
#define LANES 16

static inline int panels_of(int n) { return (n + LANES - 1) / LANES; }

/* A layer's packed weights, built once by quill/layers/matmul.py (`_Weights` mirrors it). */
typedef struct {
    int format, k, n, group;
    const void *packed;         /* BF16: uint16 pairs; INT4: nibble pairs; INT8, INT8G, Q8_0: int8 pairs; F32;
                                   INT4_Q8: nibble dwords (int4_q8.c) */
    const uint16_t *scales;     /* INT4, INT4_Q8, INT8G: bf16 [panels][k/group][16]; Q8_0: float16, the same shape */
    const uint16_t *zeros;      /* INT4, INT4_Q8, INT8G: bf16 [panels][k/group][16] */
    const float *channel_scale; /* INT8: float32 [panels * 16] */
    const float *bias;          /* float32 [n] or NULL */
} weights_t;

int matmul(const weights_t *w, const void *x, int64_t x_stride, int rows, void *out, int64_t out_stride,
           int out_bf16);                                                                   /* matmul.c */
int matmul_int4_q8(const weights_t *w, const uint16_t *x, int64_t x_stride, int rows, void *out, int64_t out_stride,
                   int out_bf16);                                                           /* int4_q8.c */
void rms_norm(const uint16_t *x, int64_t x_stride, const uint16_t *weight, uint16_t *out, int rows, int dim,
              float eps, float offset);                                                     /* rms_norm.c */
void rms_norm_heads(const float *x, int64_t x_stride, const uint16_t *weight, float *out, int tokens, int heads,
                    int dim, float eps, float offset);                                      /* rms_norm.c */
void rotary(const float *x, int64_t x_stride, const float *cos, const float *signed_sin, float *out, int tokens,
            int heads, int dim);                                                            /* rotary.c */
void store_kv(const float *k, int64_t k_stride, const float *v, int64_t v_stride, const int64_t *slots,
              int tokens, int kv_heads, int dim, void *k_cache, void *v_cache, int cache_type,
              int64_t num_slots);                                                           /* store_kv.c */
int decode_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int cache_type,
                     float *out, const int32_t *block_tables, int max_blocks, const int32_t *context_lens,
                     int rows, int heads, int kv_heads, int dim, int64_t num_slots, int block_size, int window,
                     float scale);                                                          /* decode_attention.c */
void gated_activation(const uint16_t *gate_up, int64_t stride, int rows, int width, int kind,
                      uint16_t *out);                                                       /* activation.c */

#endif
