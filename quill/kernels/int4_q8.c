/* 4-bit weights times 8-bit activations (format INT4_Q8): integer dot products, as llama.cpp's
   q4 x q8 kernels compute them, for twice the multiply-adds per instruction of bfloat16's.

   The weights are INT4's (matmul.c): weight = (code - 8) * scale + zero, codes 0..15, bfloat16
   scale and zero per group of inputs (a multiple of 32), only packed for 4-input dot products.
   The activations are quantized per row and block of 32 inputs, each row alone:
       amax = max |x_i|;  d = amax / 127;  q_i = round_half_even(x_i * (127 / amax))  (0 where amax is 0)
   (float32, each operation rounding once), and every output is then this chain, block by block
   in increasing order, from acc = 0:
       isum = sum_i code_i * q_i - 8 * sum_i q_i                    exact, in int32
       acc = fma((float)isum, scale * d, acc)                        scale * d rounded once
       acc = fma(zero, (float)(sum_i q_i) * d, acc)                  the product rounded once
   then plus the bias, stored as float32 or rounded to bfloat16. So a row's outputs depend on that
   row alone, whatever the rows beside it, the tiling, the threads or the CPU (the portable loops
   below compute the same chain): batch invariance, as in matmul.c. The integer sums are exact, so
   their order is free; only the float chain above is fixed.

   Against INT4 with bfloat16 activations, the products lose the activations' low bits (llama.cpp
   quantizes them the same way) and keep the weights' exact values instead of rounding each to
   bfloat16. See quill/layers/matmul.py for what it gains and costs. Three paths compute the chain:
   AVX-512 VNNI, AVX2 (byte products through vpmaddubsw, for CPUs without AVX-512) and plain C.
   Built without AVX-512 on an AMD EPYC, the AVX2 path took SmolLM2's four 4-bit matrices of a
   layer from 0.82 to 0.13 ms for one row and from 104 to 4.8 ms for 128, and its decode from 14 to
   85 tokens/s.

   Packed codes: [panels][k/8][64] bytes; byte 4 * lane + j of an octet o holds, in its low nibble,
   input 8o + j of the panel's column `lane`, and in its high nibble input 8o + 4 + j: a vector of
   low nibbles is 16 columns' 4-input dwords for vpdpbusd, and so is one of high nibbles. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QUILL_AVX512_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QUILL_AVX2 1 /* byte products through vpmaddubsw, as llama.cpp's AVX2 dot products */
#endif

#include "entry_points.h"
#include "half_floats.h"
#include "thread_buffer.h"

#define BLOCK 32     /* activations quantized per this many inputs */
#define TILE_ROWS 16 /* rows sharing each expanded weight vector */

/* A call's quantized activations: per row, `k` codes, then per block its d, (sum q) * d and
   -8 * sum q. */
typedef struct {
    int8_t *q;
    float *d, *sum_d;
    int32_t *offset;
    int k, blocks;
} activations_t;

/* A block's d, (sum q) * d and -8 * sum q, from its largest magnitude and its codes' sum (both
   paths below end here; an all-zero block has d = 0 and codes of 0). */
static inline void finish_block(float amax, int sum, float *d, float *sum_d, int32_t *offset) {
    *d = amax / 127.0f, *sum_d = (float)sum * *d, *offset = -8 * sum;
}

#ifdef QUILL_AVX512_VNNI
static void quantize_block(const uint16_t *x, int8_t *q, float *d, float *sum_d, int32_t *offset) {
    __m512 low = bf16x16_to_ps(x), high = bf16x16_to_ps(x + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
    if (amax == 0.0f) {
        memset(q, 0, BLOCK);
        finish_block(0.0f, 0, d, sum_d, offset);
        return;
    }
    __m512 inverse = _mm512_set1_ps(127.0f / amax);
    const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m512i q_low = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(low, inverse), round));
    __m512i q_high = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(high, inverse), round));
    /* |x * 127 / amax| can round up past 127 by an ulp at most: clamped */
    const __m512i top = _mm512_set1_epi32(127), bottom = _mm512_set1_epi32(-127);
    q_low = _mm512_max_epi32(_mm512_min_epi32(q_low, top), bottom);
    q_high = _mm512_max_epi32(_mm512_min_epi32(q_high, top), bottom);
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(q_low));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(q_high));
    int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q_low, q_high));
    finish_block(amax, sum, d, sum_d, offset);
}
#elif defined(QUILL_AVX2)
static void quantize_block(const uint16_t *x, int8_t *q, float *d, float *sum_d, int32_t *offset) {
    __m256 v[4], magnitude = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 4; i++) {
        v[i] = bf16x8_to_ps(x + 8 * i);
        magnitude = _mm256_max_ps(magnitude, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 top = _mm_max_ps(_mm256_castps256_ps128(magnitude), _mm256_extractf128_ps(magnitude, 1));
    top = _mm_max_ps(top, _mm_movehl_ps(top, top));
    float amax = _mm_cvtss_f32(_mm_max_ss(top, _mm_shuffle_ps(top, top, 1)));
    if (amax == 0.0f) {
        memset(q, 0, BLOCK);
        finish_block(0.0f, 0, d, sum_d, offset);
        return;
    }
    __m256 inverse = _mm256_set1_ps(127.0f / amax);
    const __m256i top_code = _mm256_set1_epi32(127), bottom_code = _mm256_set1_epi32(-127);
    __m256i sum = _mm256_setzero_si256();
    int32_t codes[BLOCK];
    for (int i = 0; i < 4; i++) {
        __m256 scaled = _mm256_round_ps(_mm256_mul_ps(v[i], inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256i code = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(scaled), top_code), bottom_code);
        sum = _mm256_add_epi32(sum, code);
        _mm256_storeu_si256((__m256i *)(codes + 8 * i), code);
    }
    for (int i = 0; i < BLOCK; i++) q[i] = (int8_t)codes[i];
    __m128i total = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    total = _mm_add_epi32(total, _mm_shuffle_epi32(total, _MM_SHUFFLE(1, 0, 3, 2)));
    total = _mm_add_epi32(total, _mm_shuffle_epi32(total, _MM_SHUFFLE(2, 3, 0, 1)));
    finish_block(amax, _mm_cvtsi128_si32(total), d, sum_d, offset);
}
#else
static void quantize_block(const uint16_t *x, int8_t *q, float *d, float *sum_d, int32_t *offset) {
    float amax = 0.0f;
    for (int i = 0; i < BLOCK; i++) amax = fmaxf(amax, fabsf(from_bf16(x[i])));
    if (amax == 0.0f) {
        memset(q, 0, BLOCK);
        finish_block(0.0f, 0, d, sum_d, offset);
        return;
    }
    float inverse = 127.0f / amax;
    int sum = 0;
    for (int i = 0; i < BLOCK; i++) {
        float value = nearbyintf(from_bf16(x[i]) * inverse); /* half to even, the default rounding */
        int code = value > 127.0f ? 127 : value < -127.0f ? -127 : (int)value;
        q[i] = (int8_t)code, sum += code;
    }
    finish_block(amax, sum, d, sum_d, offset);
}
#endif

/* Room in this thread's buffer for the activations of `rows` rows; returns -1 if it cannot be had. */
static int reserve(int rows, int k, activations_t *a) {
    static __thread void *buffer;
    static __thread size_t capacity;
    int blocks = k / BLOCK;
    size_t codes = (size_t)rows * k, per_block = (size_t)rows * blocks;
    char *base = grown_buffer(&buffer, &capacity, codes + per_block * 12 + 64);
    if (!base) return -1;
    a->d = (float *)base, a->sum_d = a->d + per_block, a->offset = (int32_t *)(a->sum_d + per_block);
    a->q = (int8_t *)(a->offset + per_block), a->k = k, a->blocks = blocks;
    return 0;
}

static void quantize_row(const uint16_t *x, int row, activations_t *a) {
    for (int b = 0; b < a->blocks; b++) {
        int64_t at = (int64_t)row * a->blocks + b;
        quantize_block(x + b * BLOCK, a->q + (int64_t)row * a->k + b * BLOCK, a->d + at, a->sum_d + at,
                       a->offset + at);
    }
}

/* One output's end of the chain in the AVX2 and plain C paths (the AVX-512 one does the same in
   vectors): plus the bias, stored as float32 or rounded to bfloat16. */
static inline void store_output(const weights_t *w, void *out, int64_t at, int column, float acc, int out_bf16) {
    if (w->bias) acc = acc + w->bias[column];
    store_value(out, at + column, acc, out_bf16);
}

/* The int32 at byte `i` of a row's codes (4 of them, broadcast to every lane by the caller). */
static inline int32_t four_codes(const int8_t *q, int i) {
    int32_t value;
    memcpy(&value, q + i, sizeof value);
    return value;
}

#ifdef QUILL_AVX512_VNNI

#define UNROLLED _Pragma("GCC unroll 16")

/* R rows (from row0) by C panels: each block's weight vectors are expanded once for all the rows. */
static inline __attribute__((always_inline)) void tile(const int R, const int C, const weights_t *w, int panel,
                                                      const activations_t *a, int row0, void *out,
                                                      int64_t out_stride, int out_bf16) {
    int blocks = a->blocks, groups = w->k / w->group, per_group = w->group / BLOCK;
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512 acc[TILE_ROWS][4];
    UNROLLED for (int r = 0; r < R; r++) UNROLLED for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        UNROLLED for (int c = 0; c < C; c++) {
            const uint8_t *codes = (const uint8_t *)w->packed + ((int64_t)(panel + c) * (w->k / 8) + b * 4) * 64;
            __m512i low[4], high[4];
            UNROLLED for (int o = 0; o < 4; o++) {
                __m512i v = _mm512_loadu_si512(codes + o * 64);
                low[o] = _mm512_and_si512(v, nibble);
                high[o] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            }
            int64_t g = ((int64_t)(panel + c) * groups + b / per_group) * LANES;
            __m512 scale = bf16x16_to_ps(w->scales + g), zero = bf16x16_to_ps(w->zeros + g);
            UNROLLED for (int r = 0; r < R; r++) {
                int64_t at = (int64_t)(row0 + r) * blocks + b;
                const int8_t *q = a->q + (row0 + r) * (int64_t)a->k + b * BLOCK;
                __m512i sum = _mm512_set1_epi32(a->offset[at]);
                UNROLLED for (int o = 0; o < 4; o++) {
                    sum = _mm512_dpbusd_epi32(sum, low[o], _mm512_set1_epi32(four_codes(q, 8 * o)));
                    sum = _mm512_dpbusd_epi32(sum, high[o], _mm512_set1_epi32(four_codes(q, 8 * o + 4)));
                }
                __m512 isum = _mm512_cvtepi32_ps(sum);
                acc[r][c] = _mm512_fmadd_ps(isum, _mm512_mul_ps(scale, _mm512_set1_ps(a->d[at])), acc[r][c]);
                acc[r][c] = _mm512_fmadd_ps(zero, _mm512_set1_ps(a->sum_d[at]), acc[r][c]);
            }
        }
    }
    UNROLLED for (int r = 0; r < R; r++) UNROLLED for (int c = 0; c < C; c++) {
        int column = (panel + c) * LANES, valid = w->n - column < LANES ? w->n - column : LANES;
        __mmask16 mask = (__mmask16)((1u << valid) - 1);
        __m512 value = acc[r][c];
        if (w->bias) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, w->bias + column));
        int64_t at = (int64_t)(row0 + r) * out_stride + column;
        if (out_bf16)
            _mm256_mask_storeu_epi16((uint16_t *)out + at, mask, bf16x16_from_ps(value));
        else
            _mm512_mask_storeu_ps((float *)out + at, mask, value);
    }
}

/* Each (rows, panels) shape compiled as a function of its own: inlined into one function, the 32
   shapes' sums no longer fit in registers and GCC 12 spilled them around every product. */
typedef void tile_fn(const weights_t *w, int panel, const activations_t *a, int row0, void *out, int64_t out_stride,
                     int out_bf16);
#define SHAPE(R, C)                                                                                               \
    static __attribute__((noinline)) void tile_##R##_##C(const weights_t *w, int panel, const activations_t *a,  \
                                                         int row0, void *out, int64_t out_stride, int out_bf16) { \
        tile(R, C, w, panel, a, row0, out, out_stride, out_bf16);                                                 \
    }
#define SHAPES(C) SHAPE(1, C) SHAPE(2, C) SHAPE(3, C) SHAPE(4, C) SHAPE(5, C) SHAPE(6, C) SHAPE(7, C) SHAPE(8, C) \
    SHAPE(9, C) SHAPE(10, C) SHAPE(11, C) SHAPE(12, C) SHAPE(13, C) SHAPE(14, C) SHAPE(15, C) SHAPE(16, C)
SHAPE(1, 4) SHAPE(2, 2) SHAPE(3, 2) SHAPE(4, 2)
SHAPES(1)
/* One row takes 4 panels a call, two to four rows 2, for enough independent sums in flight (their
   sums in registers: one panel at three rows was latency-bound, 1.5x slower; 3-4 rows at 2 panels
   spill a little and still win); more rows take one. */
static tile_fn *const few_rows[5] = {0, tile_1_4, tile_2_2, tile_3_2, tile_4_2};
static tile_fn *const one_panel[17] = {0,         tile_1_1,  tile_2_1,  tile_3_1,  tile_4_1,  tile_5_1,
                                       tile_6_1,  tile_7_1,  tile_8_1,  tile_9_1,  tile_10_1, tile_11_1,
                                       tile_12_1, tile_13_1, tile_14_1, tile_15_1, tile_16_1};

/* Rows in tiles of up to 16 that reread the panel's codes from cache. Called inside the parallel
   region of `matmul_int4_q8`: the threads share out the panels. */
static void run_panels(const weights_t *w, int rows, const activations_t *a, void *out, int64_t out_stride,
                       int out_bf16) {
    int panels = panels_of(w->n), width = rows == 1 ? 4 : rows <= 4 ? 2 : 1;
    int units = (panels + width - 1) / width;
#pragma omp for schedule(static)
    for (int unit = 0; unit < units; unit++) {
        int panel = unit * width;
        if (width > 1 && panel + width <= panels) {
            few_rows[rows](w, panel, a, 0, out, out_stride, out_bf16);
            continue;
        }
        for (int p = panel; p < panel + width && p < panels; p++)
            for (int row = 0; row < rows; row += TILE_ROWS) {
                int count = rows - row < TILE_ROWS ? rows - row : TILE_ROWS;
                one_panel[count](w, p, a, row, out, out_stride, out_bf16);
            }
    }
}

#elif defined(QUILL_AVX2)

/* Up to AVX2_ROWS rows (from row0) of one panel. Per block and 8 columns, each octet's low and
   high nibbles multiply 4 codes of the row (vpmaddubsw: pairs of byte products summed in 16 bits,
   at most 2 * 15 * 127 each, two of them 7,620 at most), vpmaddwd widens their sums to int32:
   exact, as VNNI's. The float chain is the portable one, 8 lanes at a time. */
#define AVX2_ROWS 4
static inline __attribute__((always_inline)) void avx2_tile(const int R, const weights_t *w, int panel,
                                                           const activations_t *a, int row0, void *out,
                                                           int64_t out_stride, int out_bf16) {
    int blocks = a->blocks, groups = w->k / w->group, per_group = w->group / BLOCK;
    const __m256i nibble = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 acc[AVX2_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        const uint8_t *codes = (const uint8_t *)w->packed + ((int64_t)panel * (w->k / 8) + b * 4) * 64;
        __m256i sum[AVX2_ROWS][2];
        for (int r = 0; r < R; r++)
            sum[r][0] = sum[r][1] = _mm256_set1_epi32(a->offset[(int64_t)(row0 + r) * blocks + b]);
        for (int o = 0; o < 4; o++) {
            for (int half = 0; half < 2; half++) { /* columns 8 * half .. 8 * half + 7 */
                __m256i v = _mm256_loadu_si256((const __m256i *)(codes + o * 64 + 32 * half));
                __m256i low = _mm256_and_si256(v, nibble), high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                for (int r = 0; r < R; r++) {
                    const int8_t *q = a->q + (row0 + r) * (int64_t)a->k + b * BLOCK + 8 * o;
                    __m256i products = _mm256_add_epi16(_mm256_maddubs_epi16(low, _mm256_set1_epi32(four_codes(q, 0))),
                                                        _mm256_maddubs_epi16(high, _mm256_set1_epi32(four_codes(q, 4))));
                    sum[r][half] = _mm256_add_epi32(sum[r][half], _mm256_madd_epi16(products, ones));
                }
            }
        }
        int64_t g = ((int64_t)panel * groups + b / per_group) * LANES;
        for (int half = 0; half < 2; half++) {
            __m256 scale = bf16x8_to_ps(w->scales + g + 8 * half), zero = bf16x8_to_ps(w->zeros + g + 8 * half);
            for (int r = 0; r < R; r++) {
                int64_t at = (int64_t)(row0 + r) * blocks + b;
                __m256 isum = _mm256_cvtepi32_ps(sum[r][half]);
                acc[r][half] = _mm256_fmadd_ps(isum, _mm256_mul_ps(scale, _mm256_set1_ps(a->d[at])), acc[r][half]);
                acc[r][half] = _mm256_fmadd_ps(zero, _mm256_set1_ps(a->sum_d[at]), acc[r][half]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        float lanes[LANES];
        _mm256_storeu_ps(lanes, acc[r][0]);
        _mm256_storeu_ps(lanes + 8, acc[r][1]);
        for (int lane = 0; lane < LANES && panel * LANES + lane < w->n; lane++) {
            store_output(w, out, (int64_t)(row0 + r) * out_stride, panel * LANES + lane, lanes[lane], out_bf16);
        }
    }
}

static void run_panels(const weights_t *w, int rows, const activations_t *a, void *out, int64_t out_stride,
                       int out_bf16) {
    int panels = panels_of(w->n);
#pragma omp for schedule(static)
    for (int panel = 0; panel < panels; panel++)
        for (int row = 0; row < rows; row += AVX2_ROWS) {
            switch (rows - row < AVX2_ROWS ? rows - row : AVX2_ROWS) {
            case 1: avx2_tile(1, w, panel, a, row, out, out_stride, out_bf16); break;
            case 2: avx2_tile(2, w, panel, a, row, out, out_stride, out_bf16); break;
            case 3: avx2_tile(3, w, panel, a, row, out, out_stride, out_bf16); break;
            default: avx2_tile(4, w, panel, a, row, out, out_stride, out_bf16); break;
            }
        }
}

#else /* portable: the same chain in plain C */

static void run_panels(const weights_t *w, int rows, const activations_t *a, void *out, int64_t out_stride,
                       int out_bf16) {
    int panels = panels_of(w->n), blocks = a->blocks, groups = w->k / w->group;
    int per_group = w->group / BLOCK;
#pragma omp for schedule(static)
    for (int panel = 0; panel < panels; panel++) {
        const uint8_t *codes = (const uint8_t *)w->packed + (int64_t)panel * (w->k / 8) * 64;
        for (int lane = 0; lane < LANES && panel * LANES + lane < w->n; lane++) {
            int column = panel * LANES + lane;
            for (int r = 0; r < rows; r++) {
                float acc = 0.0f;
                for (int b = 0; b < blocks; b++) {
                    int64_t at = (int64_t)r * blocks + b, g = ((int64_t)panel * groups + b / per_group) * LANES + lane;
                    const int8_t *q = a->q + (int64_t)r * a->k + b * BLOCK;
                    int32_t isum = a->offset[at];
                    for (int o = 0; o < 4; o++)
                        for (int j = 0; j < 4; j++) {
                            uint8_t byte = codes[(b * 4 + o) * 64 + 4 * lane + j];
                            isum += (byte & 15) * q[8 * o + j] + (byte >> 4) * q[8 * o + 4 + j];
                        }
                    acc = fmaf((float)isum, from_bf16(w->scales[g]) * a->d[at], acc);
                    acc = fmaf(from_bf16(w->zeros[g]), a->sum_d[at], acc);
                }
                store_output(w, out, (int64_t)r * out_stride, column, acc, out_bf16);
            }
        }
    }
}

#endif

/* The INT4_Q8 product (matmul.c's `matmul` calls it for that format): bfloat16 x, as `matmul`.
   Returns 0, or -1 when scratch memory could not be allocated. */
int matmul_int4_q8(const weights_t *w, const uint16_t *x, int64_t x_stride, int rows, void *out, int64_t out_stride,
                   int out_bf16) {
    activations_t a;
    if (reserve(rows, w->k, &a)) return -1;
    /* One parallel region: the threads quantize the rows between them, wait for each other, then
       share out the panels. (Quantizing on one thread before the region cost 6% of a 512-token
       prompt's time, the other core idle meanwhile.) */
    int64_t work = (int64_t)rows * w->n * w->k;
#pragma omp parallel if (work > (1 << 18))
    {
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) quantize_row(x + r * x_stride, r, &a);
        run_panels(w, rows, &a, out, out_stride, out_bf16);
    }
    return 0;
}
