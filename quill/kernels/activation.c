/* The gated MLP's activation, act(gate) * up, of bfloat16 rows, in one pass.

   PyTorch spends four calls on it (a split, the activation, a product, and the allocations
   between), and its exponential is its own; this kernel is the one definition both the layer
   (quill/layers/mlp.py) and the fused decoder (decoder.c) run, so that both give the same bits.
   Per row r of gate_up [rows, 2 * width] (row stride `stride`; gate the first half, up the
   second) into out [rows, width]:
     out = bf16(bf16(act(gate)) * up)       (rounded twice, as the two PyTorch operations do)
   where act(x) = x * sigmoid(z), with z = x for SiLU (kind 0) and z = 2 sqrt(2 / pi) (x + 0.044715
   x^3) for the tanh approximation of GELU (kind 1): 0.5 x (1 + tanh(z / 2)) is the same function.
   sigmoid(z) = (z >= 0 ? 1 : e) / (1 + e) with e = exp(-|z|), which never overflows. All
   arithmetic is float32 and no multiply-add is fused (ISO C mode). */
#include <stdint.h>

#include "entry_points.h"
#include "exp_nonpositive.h"
#include "half_floats.h"

enum activation { ACT_SILU, ACT_GELU_TANH };

static const float GELU_Z_SCALE = 1.5957691216057308f; /* 2 sqrt(2 / pi) */

static inline float activate(float x, int kind) {
    float z = kind == ACT_SILU ? x : GELU_Z_SCALE * (x + 0.044715f * (x * x * x));
    float e = exp_nonpositive(z < 0 ? z : -z); /* e^-|z| */
    return x * ((z >= 0 ? 1.0f : e) / (1.0f + e));
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define QUILL_ACTIVATION_AVX512 1

static inline __m512 widen16(__m256i bf16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

/* 16 floats to bf16, rounded to nearest even, as to_bf16 does (NaN aside: no NaN reaches here
   from finite weights). */
static inline __m256i narrow16(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

/* activate() on 16 floats: the same operations in the same order. */
static inline __m512 activate16(__m512 x, int kind) {
    __m512 z = x;
    if (kind != ACT_SILU) {
        __m512 cube = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
        z = _mm512_mul_ps(_mm512_set1_ps(GELU_Z_SCALE), _mm512_add_ps(x, _mm512_mul_ps(_mm512_set1_ps(0.044715f), cube)));
    }
    __m512 e = exp_nonpositive16(_mm512_min_ps(z, _mm512_sub_ps(_mm512_setzero_ps(), z)));
    __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 numerator = _mm512_mask_blend_ps(negative, _mm512_set1_ps(1.0f), e);
    return _mm512_mul_ps(x, _mm512_div_ps(numerator, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
}
#endif

void gated_activation(const uint16_t *gate_up, int64_t stride, int rows, int width, int kind, uint16_t *out) {
#pragma omp parallel for if ((int64_t)rows * width > (1 << 16))
    for (int r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * stride, *up = gate + width;
        uint16_t *result = out + (int64_t)r * width;
#ifdef QUILL_ACTIVATION_AVX512
        for (int i = 0; i < width; i += 16) { /* the tail masked: every column takes the same steps */
            __mmask16 mask = width - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (width - i)) - 1);
            __m512 activated = widen16(narrow16(activate16(widen16(_mm256_maskz_loadu_epi16(mask, gate + i)), kind)));
            __m512 product = _mm512_mul_ps(activated, widen16(_mm256_maskz_loadu_epi16(mask, up + i)));
            _mm256_mask_storeu_epi16(result + i, mask, narrow16(product));
        }
#else
        for (int i = 0; i < width; i++)
            result[i] = to_bf16(from_bf16(to_bf16(activate(from_bf16(gate[i]), kind))) * from_bf16(up[i]));
#endif
    }
}
