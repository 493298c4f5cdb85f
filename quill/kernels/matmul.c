/* Matrix products whose every output is computed the same way however many rows share the call.

   A BLAS picks its kernel (and so its order of additions) by the shape of the call and by the
   processor: the same row, multiplied alone and inside a batch, can differ in its last bits, and
   which row counts agree differs between machines (an AMD EPYC agreed on multiples of 4; an Intel
   Xeon with AMX did not). Greedy output would then depend on the server's load. Here each output
   is one fixed chain of operations, defined below, whatever the number of rows, the tiling, the
   thread count or the CPU's vector width: batch invariance by construction.

   Weights are stored in panels of 16 output columns (lanes) so that a vector holds one input pair
   of 16 columns; every output lane accumulates in float32, over the inputs in increasing order,
   starting from zero:

     bf16 activations (formats BF16, INT4, INT8): for each input pair (2i, 2i+1),
         acc = acc + w[2i+1] * x[2i+1];  acc = acc + w[2i] * x[2i]
       with both weight and activation bfloat16, so every product is exact in float32 and each
       addition rounds once (to nearest even) -- what AVX-512 BF16's vdpbf16ps does, and what the
       portable loop below computes too. Weights come from their packed form as bfloat16:
         BF16  w itself;                      packed [panels][k/2][16][2] uint16
         INT4  bf16((code - 8) * scale + zero), computed in float32 (the product is exact);
               codes [panels][k/2][16] uint8: byte i holds input 2p + i % 2 of column i / 2 in
               its low nibble and of column 8 + i / 2 in its high one (so that a vector of low
               nibbles, and one of high nibbles, is already in pair order);
               scales and zeros [panels][k/group][16] bfloat16
               (Tried and reverted, 0f6075b: codes looked up as bf16 integers, scale and zero
               applied to each group's sum. One row ran 1.4x faster, 512 rows 1.3x slower, from
               the extra per-group sums: SmolLM2 decoded 13% faster and prefilled 15-20% slower.)
         INT8  the signed code (exact in bf16); packed [panels][k/2][16][2] int8, and the output
               is then acc * channel_scale[n]
         INT8G bf16(code * scale + zero), computed in float32 (the product is exact: 8 bits by 8),
               codes signed bytes centred on zero (5- to 8-bit values less 2^(bits - 1), so that
               symmetric formats have zero = 0); packed [panels][k/2][16][2] int8, scales and
               zeros as INT4's
         Q8_0  bf16(code * scale), computed in float32 with the scale an IEEE half: GGML's Q8_0
               exactly as its dequantizer expands it, so that the one packed copy serves both as
               an LM head and as the embedding table it is tied to (quill/layers/embedding.py);
               packed [panels][k/2][16][2] int8, scales [panels][k/32][16] float16, no zeros
     F32 (format F32, float32 activations): acc = fma(x[i], w[i], acc) for each input i;
         packed [panels][k][16] float32.
   A bias is then added (once, rounding once) and the result stored as float32 or rounded to
   bfloat16 (nearest even). INT4_Q8 (INT4's weights times 8-bit activations) has a chain of its own,
   defined in int4_q8.c.

   Rows are worked through in tiles that share each expanded weight vector: up to 16 rows in one
   pass over the packed weights (decoding batches), more through a per-thread buffer of expanded
   panels (prompts). Threads split the columns, never the inputs. Without AVX-512 BF16, each
   thread expands one panel at a time into a buffer (with AVX2 where the CPU has it, in plain C
   otherwise) and runs every row through it, adding the same exact products in the same order.
   Built without AVX-512 on an AMD EPYC, AVX2's expansion took SmolLM2's decode from 4.6 to 40
   tokens/s and its prefill from 152 to 299 (a layer's four 4-bit matrices: 4.9 -> 0.56 ms for one
   row, 6.9 -> 2.0 for 16, 21.5 -> 12.5 for 128). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QUILL_AVX512_BF16 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QUILL_AVX2 1
#endif

#include "entry_points.h"
#include "half_floats.h"
#include "thread_buffer.h"

#define FUSED_MAX_ROWS 16 /* up to this many rows, weights are expanded once per call into registers */

/* Whether the format has a scale and zero per group of inputs. */
static inline int grouped(int format) { return format == FMT_INT4 || format == FMT_INT8G || format == FMT_Q8_0; }

/* This thread's buffer of expanded panels (both paths below expand into one), at least `bytes`. */
static void *scratch(size_t bytes) {
    static __thread void *buffer;
    static __thread size_t capacity;
    return grown_buffer(&buffer, &capacity, bytes);
}

/* The epilogue of one output: the channel scale (INT8), then the bias. Scalar, for the portable
   path; the vector path's store_lanes does the same operations. */
static inline float finish(const weights_t *w, int column, float acc) {
    if (w->format == FMT_INT8) acc = acc * w->channel_scale[column];
    if (w->bias) acc = acc + w->bias[column];
    return acc;
}

#ifdef QUILL_AVX512_BF16

/* ---- AVX-512 BF16 ------------------------------------------------------------------------------ */

typedef struct {
    __m512 scale, zero; /* the first 8 columns' values, each twice (lane i is column i / 2) */
    __m512 scale_high, zero_high; /* the last 8 columns' values, each twice */
} group_t;

/* The weight vector of one panel and input pair, as bf16 pairs. */
static inline __attribute__((always_inline)) __m512bh expand(const int format, const weights_t *w, int panel,
                                                            int pair, group_t g, __m512 table) {
    int64_t pairs = w->k / 2, at = (int64_t)panel * pairs + pair;
    if (format == FMT_BF16) return (__m512bh)_mm512_loadu_si512((const uint16_t *)w->packed + at * 32);
    if (format == FMT_INT8) {
        const int8_t *codes = (const int8_t *)w->packed + at * 32;
        __m512 even = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)codes)));
        __m512 odd = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 16))));
        return _mm512_cvtne2ps_pbh(odd, even); /* the codes are already in pair order */
    }
    if (format == FMT_INT8G) { /* pair order too: the first 16 codes are lanes 0-7's pairs */
        const int8_t *codes = (const int8_t *)w->packed + at * 32;
        __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)codes)));
        __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 16))));
        return _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(high, g.scale_high, g.zero_high), _mm512_fmadd_ps(low, g.scale, g.zero));
    }
    if (format == FMT_Q8_0) { /* as INT8G, less the zero: code * scale alone, as GGML expands it */
        const int8_t *codes = (const int8_t *)w->packed + at * 32;
        __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)codes)));
        __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 16))));
        return _mm512_cvtne2ps_pbh(_mm512_mul_ps(high, g.scale_high), _mm512_mul_ps(low, g.scale));
    }
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)w->packed + at * 16)));
    __m512 low = _mm512_permutexvar_ps(bytes, table); /* code - 8: the table reads the low 4 bits */
    __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
    return _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(high, g.scale_high, g.zero_high), _mm512_fmadd_ps(low, g.scale, g.zero));
}

static inline group_t load_group(const int format, const weights_t *w, int panel, int group_index) {
    group_t g = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    if (!grouped(format)) return g;
    int64_t at = ((int64_t)panel * (w->k / w->group) + group_index) * LANES;
    if (format == FMT_Q8_0) {
        g.scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->scales + at)));
    } else {
        g.scale = bf16x16_to_ps(w->scales + at);
        g.zero = bf16x16_to_ps(w->zeros + at);
    }
    /* lane i of the codes' vectors is column i / 2 */
    const __m512i first = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i last = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    g.scale_high = _mm512_permutexvar_ps(last, g.scale), g.zero_high = _mm512_permutexvar_ps(last, g.zero);
    g.scale = _mm512_permutexvar_ps(first, g.scale), g.zero = _mm512_permutexvar_ps(first, g.zero);
    return g;
}

static inline void store_lanes(const weights_t *w, int panel, __m512 acc, void *out, int64_t row_offset,
                               int out_bf16) {
    int column = panel * LANES;
    int valid = w->n - column < LANES ? w->n - column : LANES;
    __mmask16 mask = (__mmask16)((1u << valid) - 1);
    if (w->format == FMT_INT8) acc = _mm512_mul_ps(acc, _mm512_maskz_loadu_ps(mask, w->channel_scale + column));
    if (w->bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, w->bias + column));
    if (out_bf16)
        _mm256_mask_storeu_epi16((uint16_t *)out + row_offset + column, mask, bf16x16_from_ps(acc));
    else
        _mm512_mask_storeu_ps((float *)out + row_offset + column, mask, acc);
}

static inline int32_t activation_pair(const uint16_t *row, int pair) {
    int32_t value;
    memcpy(&value, row + 2 * pair, sizeof value);
    return value;
}

/* GCC keeps a tile's sums in registers only when every loop over rows and panels is unrolled
   (otherwise it spills them around each product: measured at half the speed). */
#define UNROLLED _Pragma("GCC unroll 16")

/* R rows (from row0) by C panels straight from the packed weights: each weight vector is expanded
   once and used by every row. */
static inline __attribute__((always_inline)) void fused_tile(const int format, const int R, const int C,
                                                            const weights_t *w, int panel, const uint16_t *x,
                                                            int64_t x_stride, int row0, void *out,
                                                            int64_t out_stride, int out_bf16) {
    __m512 acc[FUSED_MAX_ROWS][4];
    UNROLLED for (int r = 0; r < R; r++) UNROLLED for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    const __m512 table = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
    const uint16_t *rows[FUSED_MAX_ROWS];
    UNROLLED for (int r = 0; r < R; r++) rows[r] = x + (row0 + r) * x_stride;
    int pairs = w->k / 2, step = grouped(format) ? w->group / 2 : pairs;
    for (int first = 0; first < pairs; first += step) {
        group_t g[4];
        UNROLLED for (int c = 0; c < C; c++) g[c] = load_group(format, w, panel + c, first / step);
        for (int pair = first; pair < first + step; pair++) {
            __m512bh wv[4];
            UNROLLED for (int c = 0; c < C; c++) wv[c] = expand(format, w, panel + c, pair, g[c], table);
            UNROLLED for (int r = 0; r < R; r++) {
                __m512bh xv = (__m512bh)_mm512_set1_epi32(activation_pair(rows[r], pair));
                UNROLLED for (int c = 0; c < C; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv[c], xv);
            }
        }
    }
    UNROLLED for (int r = 0; r < R; r++) UNROLLED for (int c = 0; c < C; c++)
        store_lanes(w, panel + c, acc[r][c], out, (row0 + r) * out_stride, out_bf16);
}

/* R rows (from row0) by C panels from expanded panels (`expanded[c]` holds panel c's pairs). */
static inline __attribute__((always_inline)) void buffered_tile(const int R, const int C, const weights_t *w,
                                                               int panel, const __m512bh *const *expanded,
                                                               const uint16_t *x, int64_t x_stride, int row0,
                                                               void *out, int64_t out_stride, int out_bf16) {
    __m512 acc[FUSED_MAX_ROWS][4];
    UNROLLED for (int r = 0; r < R; r++) UNROLLED for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    const uint16_t *rows[FUSED_MAX_ROWS];
    UNROLLED for (int r = 0; r < R; r++) rows[r] = x + (row0 + r) * x_stride;
    const __m512bh *source[4];
    UNROLLED for (int c = 0; c < C; c++) source[c] = expanded[c];
    int pairs = w->k / 2;
    for (int pair = 0; pair < pairs; pair++) {
        __m512bh wv[4];
        UNROLLED for (int c = 0; c < C; c++) wv[c] = source[c][pair];
        UNROLLED for (int r = 0; r < R; r++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32(activation_pair(rows[r], pair));
            UNROLLED for (int c = 0; c < C; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv[c], xv);
        }
    }
    UNROLLED for (int r = 0; r < R; r++) UNROLLED for (int c = 0; c < C; c++)
        store_lanes(w, panel + c, acc[r][c], out, (row0 + r) * out_stride, out_bf16);
}

/* CALL(R) for a run-time row count 1..16, with R a compile-time constant. */
#define ROWS_SWITCH(rows, CALL)                                                                                  \
    switch (rows) {                                                                                              \
    case 1: CALL(1); break;   case 2: CALL(2); break;   case 3: CALL(3); break;   case 4: CALL(4); break;        \
    case 5: CALL(5); break;   case 6: CALL(6); break;   case 7: CALL(7); break;   case 8: CALL(8); break;        \
    case 9: CALL(9); break;   case 10: CALL(10); break; case 11: CALL(11); break; case 12: CALL(12); break;      \
    case 13: CALL(13); break; case 14: CALL(14); break; case 15: CALL(15); break; case 16: CALL(16); break;      \
    }

/* CALL(R) for a run-time row count 1..4 (ROWS_SWITCH would also compile 4-panel tiles of up to 16
   rows that never run: 3,300 spilling instructions of dead code). */
#define FEW_ROWS_SWITCH(rows, CALL) \
    switch (rows) {                 \
    case 1: CALL(1); break;         \
    case 2: CALL(2); break;         \
    case 3: CALL(3); break;         \
    case 4: CALL(4); break;         \
    }

/* Few rows: one pass over the packed weights. Up to 4 rows take 4 panels at a time, to keep enough
   independent sums in flight; more rows take one panel each. */
static inline __attribute__((always_inline)) void fused_rows(const int format, const weights_t *w, int rows,
                                                            const uint16_t *x, int64_t x_stride, void *out,
                                                            int64_t out_stride, int out_bf16) {
    int panels = panels_of(w->n), width = rows <= 4 ? 4 : 1;
    int units = (panels + width - 1) / width;
    int64_t work = (int64_t)rows * w->n * w->k;
#pragma omp parallel for schedule(static) if (work > (1 << 18))
    for (int unit = 0; unit < units; unit++) {
        int panel = unit * width;
        if (width == 4 && panel + 4 <= panels) {
#define FUSED4(R) fused_tile(format, R, 4, w, panel, x, x_stride, 0, out, out_stride, out_bf16)
            FEW_ROWS_SWITCH(rows, FUSED4)
        } else {
            for (int p = panel; p < panel + width && p < panels; p++) {
#define FUSED1(R) fused_tile(format, R, 1, w, p, x, x_stride, 0, out, out_stride, out_bf16)
                ROWS_SWITCH(rows, FUSED1)
            }
        }
    }
}

#define BUFFER_PANELS 4
#define TILE_ROWS 6

/* Rows of one group of up to BUFFER_PANELS expanded panels, TILE_ROWS at a time. */
static inline __attribute__((always_inline)) void buffered_panels(const weights_t *w, int panel, int width,
                                                                 const __m512bh *const *expanded, int rows,
                                                                 const uint16_t *x, int64_t x_stride, void *out,
                                                                 int64_t out_stride, int out_bf16) {
    for (int row = 0; row < rows; row += TILE_ROWS) {
        int count = rows - row < TILE_ROWS ? rows - row : TILE_ROWS;
        if (width == BUFFER_PANELS) {
#define BUFFERED4(R) buffered_tile(R, BUFFER_PANELS, w, panel, expanded, x, x_stride, row, out, out_stride, out_bf16)
            ROWS_SWITCH(count, BUFFERED4)
        } else {
            for (int c = 0; c < width; c++) {
#define BUFFERED1(R) buffered_tile(R, 1, w, panel + c, expanded + c, x, x_stride, row, out, out_stride, out_bf16)
                ROWS_SWITCH(count, BUFFERED1)
            }
        }
    }
}

/* Many rows: each thread expands a group of panels into its buffer once, then runs every row
   through it. */
static inline __attribute__((always_inline)) int buffered_rows(const int format, const weights_t *w, int rows,
                                                              const uint16_t *x, int64_t x_stride, void *out,
                                                              int64_t out_stride, int out_bf16) {
    int panels = panels_of(w->n), pairs = w->k / 2;
    int units = (panels + BUFFER_PANELS - 1) / BUFFER_PANELS;
    int failed = 0;
#pragma omp parallel for schedule(static) reduction(| : failed)
    for (int unit = 0; unit < units; unit++) {
        int panel = unit * BUFFER_PANELS;
        int width = panels - panel < BUFFER_PANELS ? panels - panel : BUFFER_PANELS;
        const __m512bh *expanded[BUFFER_PANELS];
        if (format == FMT_BF16) {
            for (int c = 0; c < width; c++)
                expanded[c] = (const __m512bh *)((const uint16_t *)w->packed + (int64_t)(panel + c) * pairs * 32);
        } else {
            __m512bh *buffer = scratch((size_t)BUFFER_PANELS * pairs * sizeof(__m512bh));
            if (!buffer) {
                failed = 1;
                continue;
            }
            const __m512 table = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
                    int step = grouped(format) ? w->group / 2 : pairs;
            for (int c = 0; c < width; c++) {
                __m512bh *target = buffer + (int64_t)c * pairs;
                for (int first = 0; first < pairs; first += step) {
                    group_t g = load_group(format, w, panel + c, first / step);
                    for (int pair = first; pair < first + step; pair++)
                        target[pair] = expand(format, w, panel + c, pair, g, table);
                }
                expanded[c] = target;
            }
        }
        buffered_panels(w, panel, width, expanded, rows, x, x_stride, out, out_stride, out_bf16);
    }
    return failed ? -1 : 0;
}

static int matmul_format(const int format, const weights_t *w, int rows, const uint16_t *x, int64_t x_stride,
                         void *out, int64_t out_stride, int out_bf16) {
    if (rows <= FUSED_MAX_ROWS) {
        fused_rows(format, w, rows, x, x_stride, out, out_stride, out_bf16);
        return 0;
    }
    return buffered_rows(format, w, rows, x, x_stride, out, out_stride, out_bf16);
}

static int matmul_rows(const weights_t *w, int rows, const uint16_t *x, int64_t x_stride, void *out,
                       int64_t out_stride, int out_bf16) {
    switch (w->format) {
    case FMT_BF16: return matmul_format(FMT_BF16, w, rows, x, x_stride, out, out_stride, out_bf16);
    case FMT_INT4: return matmul_format(FMT_INT4, w, rows, x, x_stride, out, out_stride, out_bf16);
    case FMT_INT8G: return matmul_format(FMT_INT8G, w, rows, x, x_stride, out, out_stride, out_bf16);
    case FMT_Q8_0: return matmul_format(FMT_Q8_0, w, rows, x, x_stride, out, out_stride, out_bf16);
    default: return matmul_format(FMT_INT8, w, rows, x, x_stride, out, out_stride, out_bf16);
    }
}

#else /* without AVX-512 BF16: the same operations, one panel at a time (AVX2 expansion where present) */

/* A panel's weights expanded for the row loop: [pair][even, odd][16 lanes] float32 bf16 values. */
#define EXPANDED_PAIR (2 * LANES)

/* One input pair of one lane as float32 bf16 values. */
static inline void expand_pair(const weights_t *w, int panel, int pair, int lane, float *even, float *odd) {
    int64_t pairs = w->k / 2, at = (int64_t)panel * pairs + pair;
    if (w->format == FMT_BF16) {
        const uint16_t *v = (const uint16_t *)w->packed + at * 32 + 2 * lane;
        *even = from_bf16(v[0]), *odd = from_bf16(v[1]);
    } else if (w->format == FMT_INT8) {
        const int8_t *v = (const int8_t *)w->packed + at * 32 + 2 * lane;
        *even = (float)v[0], *odd = (float)v[1];
    } else if (w->format == FMT_Q8_0) {
        const int8_t *v = (const int8_t *)w->packed + at * 32 + 2 * lane;
        float scale = from_half(w->scales[((int64_t)panel * (w->k / w->group) + (2 * pair) / w->group) * LANES + lane]);
        *even = from_bf16(to_bf16((float)v[0] * scale));
        *odd = from_bf16(to_bf16((float)v[1] * scale));
    } else if (w->format == FMT_INT8G) {
        const int8_t *v = (const int8_t *)w->packed + at * 32 + 2 * lane;
        int64_t g = ((int64_t)panel * (w->k / w->group) + (2 * pair) / w->group) * LANES + lane;
        float scale = from_bf16(w->scales[g]), zero = from_bf16(w->zeros[g]);
        *even = from_bf16(to_bf16((float)v[0] * scale + zero));
        *odd = from_bf16(to_bf16((float)v[1] * scale + zero));
    } else {
        const uint8_t *bytes = (const uint8_t *)w->packed + at * 16 + 2 * (lane % 8);
        int shift = lane < 8 ? 0 : 4;
        int64_t g = ((int64_t)panel * (w->k / w->group) + (2 * pair) / w->group) * LANES + lane;
        float scale = from_bf16(w->scales[g]), zero = from_bf16(w->zeros[g]);
        *even = from_bf16(to_bf16((float)(((bytes[0] >> shift) & 15) - 8) * scale + zero));
        *odd = from_bf16(to_bf16((float)(((bytes[1] >> shift) & 15) - 8) * scale + zero));
    }
}

#ifdef QUILL_AVX2
/* The same values as expand_pair, 8 lanes at a time, with the same operations (multiply, then
   add, then round to bfloat16). Built without AVX-512, SmolLM2's four 4-bit matrices of a layer
   took 4.9 ms for one row when every weight went through expand_pair. */

/* 16 bytes [lane][even, odd] of 8 lanes as their even bytes, then their odd bytes. */
static inline __m128i split_pairs(__m128i bytes) {
    return _mm_shuffle_epi8(bytes, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
}

/* Lanes half*8 .. half*8+7 of one pair: `even` and `odd` as codes in int32, then as weights. */
static inline void store_half(const weights_t *w, int panel, int pair, int half, __m256i even, __m256i odd,
                              float *target) {
    __m256 e = _mm256_cvtepi32_ps(even), o = _mm256_cvtepi32_ps(odd);
    if (w->format == FMT_INT4 || w->format == FMT_INT8G || w->format == FMT_Q8_0) {
        int64_t g = ((int64_t)panel * (w->k / w->group) + (2 * pair) / w->group) * LANES + 8 * half;
        if (w->format == FMT_Q8_0) {
            __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->scales + g)));
            e = bf16_round8(_mm256_mul_ps(e, scale)), o = bf16_round8(_mm256_mul_ps(o, scale));
        } else {
            __m256 scale = bf16x8_to_ps(w->scales + g), zero = bf16x8_to_ps(w->zeros + g);
            if (w->format == FMT_INT4) {
                e = _mm256_sub_ps(e, _mm256_set1_ps(8.0f)), o = _mm256_sub_ps(o, _mm256_set1_ps(8.0f));
            }
            e = bf16_round8(_mm256_add_ps(_mm256_mul_ps(e, scale), zero));
            o = bf16_round8(_mm256_add_ps(_mm256_mul_ps(o, scale), zero));
        }
    }
    _mm256_storeu_ps(target + 8 * half, e);
    _mm256_storeu_ps(target + LANES + 8 * half, o);
}

static void expand_panel(const weights_t *w, int panel, float *expanded) {
    int64_t pairs = w->k / 2;
    for (int pair = 0; pair < pairs; pair++) {
        int64_t at = (int64_t)panel * pairs + pair;
        float *target = expanded + (int64_t)pair * EXPANDED_PAIR;
        if (w->format == FMT_BF16) { /* a dword per lane: even in its low half, odd in its high half */
            for (int half = 0; half < 2; half++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w->packed + at * 32 + 16 * half));
                _mm256_storeu_ps(target + 8 * half, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
                _mm256_storeu_ps(target + LANES + 8 * half,
                                 _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u))));
            }
        } else if (w->format == FMT_INT4) { /* byte i: lanes i / 2 (low nibble) and 8 + i / 2 (high) */
            __m128i split = split_pairs(_mm_loadu_si128((const __m128i *)((const uint8_t *)w->packed + at * 16)));
            __m128i nibble = _mm_set1_epi8(15);
            __m128i low = _mm_and_si128(split, nibble), high = _mm_and_si128(_mm_srli_epi16(split, 4), nibble);
            store_half(w, panel, pair, 0, _mm256_cvtepu8_epi32(low), _mm256_cvtepu8_epi32(_mm_srli_si128(low, 8)),
                       target);
            store_half(w, panel, pair, 1, _mm256_cvtepu8_epi32(high), _mm256_cvtepu8_epi32(_mm_srli_si128(high, 8)),
                       target);
        } else { /* signed byte codes, [lane][even, odd] */
            for (int half = 0; half < 2; half++) {
                __m128i split = split_pairs(
                    _mm_loadu_si128((const __m128i *)((const int8_t *)w->packed + at * 32 + 16 * half)));
                store_half(w, panel, pair, half, _mm256_cvtepi8_epi32(split),
                           _mm256_cvtepi8_epi32(_mm_srli_si128(split, 8)), target);
            }
        }
    }
}
#else
static void expand_panel(const weights_t *w, int panel, float *expanded) {
    for (int pair = 0; pair < w->k / 2; pair++)
        for (int lane = 0; lane < LANES; lane++)
            expand_pair(w, panel, pair, lane, expanded + (int64_t)pair * EXPANDED_PAIR + lane,
                        expanded + (int64_t)pair * EXPANDED_PAIR + LANES + lane);
}
#endif

static int matmul_rows(const weights_t *w, int rows, const uint16_t *x, int64_t x_stride, void *out,
                       int64_t out_stride, int out_bf16) {
    int panels = panels_of(w->n), pairs = w->k / 2, failed = 0;
    int64_t work = (int64_t)rows * w->n * w->k;
#pragma omp parallel for schedule(static) if (work > (1 << 18)) reduction(| : failed)
    for (int panel = 0; panel < panels; panel++) {
        float *expanded = scratch(sizeof(float) * EXPANDED_PAIR * pairs);
        if (!expanded) {
            failed = 1;
            continue;
        }
        expand_panel(w, panel, expanded);
        int valid = w->n - panel * LANES < LANES ? w->n - panel * LANES : LANES;
        for (int r = 0; r < rows; r++) {
            float acc[LANES] = {0};
            for (int pair = 0; pair < pairs; pair++) {
                float x_even = from_bf16(x[r * x_stride + 2 * pair]), x_odd = from_bf16(x[r * x_stride + 2 * pair + 1]);
                const float *even = expanded + (int64_t)pair * EXPANDED_PAIR, *odd = even + LANES;
#pragma omp simd
                for (int lane = 0; lane < LANES; lane++) {
                    acc[lane] = acc[lane] + odd[lane] * x_odd; /* exact products: one rounding each */
                    acc[lane] = acc[lane] + even[lane] * x_even;
                }
            }
            for (int lane = 0; lane < valid; lane++)
                store_value(out, r * out_stride + panel * LANES + lane, finish(w, panel * LANES + lane, acc[lane]),
                            out_bf16);
        }
    }
    return failed ? -1 : 0;
}

#endif

/* F32: per output, acc = fma(x[i], w[i], acc) over i in order, then + bias. */
static void matmul_f32(const weights_t *w, const float *x, int64_t x_stride, int rows, float *out,
                       int64_t out_stride) {
    int panels = panels_of(w->n), k = w->k, n = w->n;
    const float *packed = w->packed, *bias = w->bias;
    int64_t work = (int64_t)rows * n * k;
#pragma omp parallel for schedule(static) if (work > (1 << 18))
    for (int panel = 0; panel < panels; panel++) {
        const float *wp = packed + (int64_t)panel * k * LANES;
        int valid = n - panel * LANES < LANES ? n - panel * LANES : LANES;
        for (int row = 0; row < rows; row += 4) {
            int count = rows - row < 4 ? rows - row : 4;
            float acc[4][LANES] = {{0}};
            for (int i = 0; i < k; i++) {
                const float *wi = wp + (int64_t)i * LANES;
                for (int r = 0; r < count; r++) {
                    float xi = x[(row + r) * x_stride + i];
#pragma omp simd
                    for (int lane = 0; lane < LANES; lane++) acc[r][lane] = __builtin_fmaf(xi, wi[lane], acc[r][lane]);
                }
            }
            for (int r = 0; r < count; r++)
                for (int lane = 0; lane < valid; lane++) {
                    float value = acc[r][lane];
                    if (bias) value = value + bias[panel * LANES + lane];
                    out[(row + r) * out_stride + panel * LANES + lane] = value;
                }
        }
    }
}

/* y[rows, n] = x[rows, k] (row stride x_stride; float32 for F32, bfloat16 otherwise) times the
   packed weights `w` (see the top of this file), into out (row stride out_stride; bfloat16 if
   out_bf16, else float32; F32 writes float32). Returns 0, or -1 when scratch memory could not be
   allocated. */
int matmul(const weights_t *w, const void *x, int64_t x_stride, int rows, void *out, int64_t out_stride,
           int out_bf16) {
    if (w->format == FMT_F32) {
        matmul_f32(w, x, x_stride, rows, out, out_stride);
        return 0;
    }
    if (w->format == FMT_INT4_Q8) return matmul_int4_q8(w, x, x_stride, rows, out, out_stride, out_bf16);
    return matmul_rows(w, rows, x, x_stride, out, out_stride, out_bf16);
}
