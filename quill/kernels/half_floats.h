/* The 16-bit float formats the kernels read and write, converted as PyTorch converts them:
   widening is exact, narrowing rounds to nearest even (NaN stays NaN). Also the KV cache's
   element types, as quill/layers/attention.py numbers them (KERNEL_CACHE_TYPES). */
#ifndef QUILL_HALF_FLOATS_H
#define QUILL_HALF_FLOATS_H

#include <stdint.h>
#include <string.h>

enum cache_type { CACHE_F32, CACHE_F16, CACHE_BF16 };

static inline uint32_t bits_of(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

static inline float float_of(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float from_bf16(uint16_t h) { return float_of((uint32_t)h << 16); }

static inline uint16_t to_bf16(float f) {
    uint32_t bits = bits_of(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* IEEE half, for CPUs without F16C (and the tails of vector loops). */
static inline float from_half(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    if (exponent == 0x1f) return float_of(sign | 0x7f800000u | (mantissa << 13));  /* infinity or NaN */
    if (exponent) return float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
    return float_of(sign | bits_of((float)mantissa * 5.9604644775390625e-8f));  /* zero or subnormal: m * 2^-24 */
}

static inline uint16_t to_half(float f) {
    uint32_t bits = bits_of(f), sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  /* NaN */
    if (magnitude >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  /* 65520 and up round to infinity */
    if (magnitude < 0x38800000u) {  /* below 2^-14: a subnormal half, a whole number of 2^-24 */
        float units = (f < 0 ? -f : f) * 16777216.0f;
        return (uint16_t)(sign | (uint32_t)((units + 8388608.0f) - 8388608.0f));  /* to nearest even */
    }
    return (uint16_t)(sign | ((magnitude + 0xfffu + ((magnitude >> 13) & 1u) - 0x38000000u) >> 13));
}

/* One output element: float32, or rounded to bfloat16 (`out_bf16`), at `index` of `out`. */
static inline void store_value(void *out, int64_t index, float value, int out_bf16) {
    if (out_bf16)
        ((uint16_t *)out)[index] = to_bf16(value);
    else
        ((float *)out)[index] = value;
}

#if defined(__AVX2__)
#include <immintrin.h>
/* 8 bfloat16 values widened to float32 (exact). */
static inline __m256 bf16x8_to_ps(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 8 floats rounded to bfloat16 and widened back, as from_bf16(to_bf16(x)) (NaN stays NaN). */
static inline __m256 bf16_round8(__m256 v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x400000));
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    __m256i chosen = _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(nan));
    return _mm256_castsi256_ps(_mm256_and_si256(chosen, _mm256_set1_epi32((int)0xffff0000u)));
}
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
/* 16 bfloat16 values widened to float32 (exact). */
static inline __m512 bf16x16_to_ps(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* 16 floats rounded to bfloat16: AVX-512 BF16's instruction where the CPU has it, otherwise
   `to_bf16` in integer lanes (CPUs with AVX-512 VNNI but not BF16, such as Intel's Cascade Lake
   and Ice Lake, run int4_q8.c's vector path too). The two agree but on subnormal results, which
   the instruction flushes to zero. */
static inline __m256i bf16x16_from_ps(__m512 v) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)); /* NaN stays NaN */
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, quiet));
#endif
}
#endif

#endif
