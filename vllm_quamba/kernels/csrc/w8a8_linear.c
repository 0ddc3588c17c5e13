/* W8A8 linear on AVX-512 VNNI; the specification is int8_linear.w8a8_linear_ref:
 *
 *   x_q = quantize_int8(x, input_scale)     rint(clamp(x * (1 / input_scale), -128, 127))
 *   y[m, n] = fp32(sum_k x_q[m, k] * w[n, k]) * (input_scale * weight_scale[n]) (+ bias[n])
 *
 * vpdpbusd multiplies unsigned by signed bytes, so x is stored offset by 128 (as uint8) and the
 * offset's share, 128 * sum_k w[n, k], is taken off again: it comes from a second vpdpbusd of
 * the same weight vector with a vector of 128s, in the first pass over x's rows only.
 * Products and sums wrap in int32 lanes (vpdpbusd does not saturate), so the difference is exact
 * wherever the reference's int32 sum is. The epilogue rounds as the reference's: no FMA (the
 * build passes -ffp-contract=off), fp32 products in the same order.
 *
 * Each pass reads TILE_N weight rows once from memory and multiplies them by every row of x,
 * TILE_M rows at a time from L1: 16 int32 accumulators + 4 offset shares + 4 weight vectors
 * fit in the 32 zmm registers.
 *
 * quamba_w8a8_linear_amx, for CPUs with AMX, multiplies tiles of 16 weight rows x 64 k by 16
 * rows of x (tdpbssd: int8 x int8 into exact int32) straight from the row-major weight, with
 * x transposed into the tiles' 4-byte column layout once per call; from 16 rows of x up it
 * does in one instruction what takes VNNI 64.
 */
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define TILE_N 4
#define TILE_M 4
#define BYTES_PER_VECTOR 64
/* How far ahead the weight is prefetched: at batch 1 (one thread, cold weights, 2-core Xeon VM)
 * 12 KiB streamed at 9.9-12.6 GB/s, 4 KiB at 9.7-11.3, 32 KiB at 8.9-10.4 (three shapes). */
#define PREFETCH_BYTES (12 * 1024)

/* The 4 sums of a[0..3]'s lanes: 13 instructions where 4 separate reductions take 36. */
static ALWAYS_INLINE AVX512_VNNI __m128i reduce_4(const __m512i a[4]) {
    __m256i half[4];
    for (int j = 0; j < 4; j++)
        half[j] = _mm256_add_epi32(_mm512_castsi512_si256(a[j]), _mm512_extracti64x4_epi64(a[j], 1));
    /* hadd pairs neighbours within each 128-bit lane: after two rounds, lane j of each 128-bit
     * half holds half of a[j]'s sum. */
    const __m256i pairs = _mm256_hadd_epi32(_mm256_hadd_epi32(half[0], half[1]), _mm256_hadd_epi32(half[2], half[3]));
    return _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
}

/* sums[i][j] = sum_k x_q[i, k] * w_rows[j][k] for mb rows of x_u8 ([mb, k_len], offset by 128),
 * given offset_share[j] = 128 * sum_k w_rows[j][k], or computing it first when with_share.
 * Inlined with constant mb and with_share, so that the accumulators live in registers. */
static ALWAYS_INLINE AVX512_VNNI void dot_tile(const uint8_t *x_u8, int64_t k_len, const int8_t *const w_rows[TILE_N],
                                               const int mb, const int with_share, __m128i *offset_share,
                                               __m128i sums[TILE_M]) {
    const __m512i offset = _mm512_set1_epi8((char)0x80);
    __m512i acc[TILE_M][TILE_N], share[TILE_N];
    for (int j = 0; j < TILE_N; j++) {
        share[j] = _mm512_setzero_si512();
        for (int i = 0; i < mb; i++) acc[i][j] = _mm512_setzero_si512();
    }
    for (int64_t k = 0; k < k_len; k += BYTES_PER_VECTOR) {
        /* The tail's masked-off bytes load as zero weights, which add nothing to either sum. */
        const __mmask64 mask = k_len - k >= BYTES_PER_VECTOR ? ~(__mmask64)0 : ((__mmask64)1 << (k_len - k)) - 1;
        __m512i w[TILE_N];
        for (int j = 0; j < TILE_N; j++) {
            w[j] = _mm512_maskz_loadu_epi8(mask, w_rows[j] + k);
            if (with_share) {
                share[j] = _mm512_dpbusd_epi32(share[j], offset, w[j]);
                /* The weight streams in row order: keep reading PREFETCH_BYTES ahead of these
                 * rows (a prefetch past the weight's end is harmless: it never faults). */
                _mm_prefetch((const char *)(w_rows[j] + PREFETCH_BYTES + k), _MM_HINT_T0);
            }
        }
        for (int i = 0; i < mb; i++) {
            const __m512i x = _mm512_maskz_loadu_epi8(mask, x_u8 + i * k_len + k);
            for (int j = 0; j < TILE_N; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], x, w[j]);
        }
    }
    if (with_share) *offset_share = reduce_4(share);
    /* Lanes wrap: exact wherever the reference's int32 sum is. */
    for (int i = 0; i < mb; i++) sums[i] = _mm_sub_epi32(reduce_4(acc[i]), *offset_share);
}

/* x f32 [rows, cols_in] and weight int8 [cols_out, cols_in], both C-contiguous; weight_scale
 * f32 [cols_out]; bias f32 [cols_out] or NULL -> out f32 [rows, cols_out]. Returns 0, or -1
 * when the int8 copy of x cannot be allocated. */
AVX512_VNNI int quamba_w8a8_linear_avx512_vnni(const float *x, int64_t rows, int64_t cols_in, float input_scale,
                                               const int8_t *weight, int64_t cols_out, const float *weight_scale,
                                               const float *bias, float *out) {
    uint8_t *x_u8 = malloc((size_t)(rows * cols_in));
    if (x_u8 == NULL) return -1;
    /* fp32 division is correctly rounded: the reference's reciprocal. */
    quantize_int8_avx512(x, rows * cols_in, 1.0f / input_scale, 128, x_u8);
    for (int64_t n0 = 0; n0 < cols_out; n0 += TILE_N) {
        const int nb = cols_out - n0 < TILE_N ? (int)(cols_out - n0) : TILE_N;
        const int8_t *w_rows[TILE_N];
        for (int j = 0; j < TILE_N; j++) w_rows[j] = weight + (n0 + (j < nb ? j : nb - 1)) * cols_in;
        __m128i offset_share = _mm_setzero_si128();
        for (int64_t m0 = 0; m0 < rows; m0 += TILE_M) {
            const int mb = rows - m0 < TILE_M ? (int)(rows - m0) : TILE_M;
            const uint8_t *x_rows = x_u8 + m0 * cols_in;
            __m128i sums[TILE_M];
            /* The weights' offset share is summed in the first pass, then reused. */
            if (m0 == 0) {
                switch (mb) {
                    case 4: dot_tile(x_rows, cols_in, w_rows, 4, 1, &offset_share, sums); break;
                    case 3: dot_tile(x_rows, cols_in, w_rows, 3, 1, &offset_share, sums); break;
                    case 2: dot_tile(x_rows, cols_in, w_rows, 2, 1, &offset_share, sums); break;
                    default: dot_tile(x_rows, cols_in, w_rows, 1, 1, &offset_share, sums); break;
                }
            } else {
                switch (mb) {
                    case 4: dot_tile(x_rows, cols_in, w_rows, 4, 0, &offset_share, sums); break;
                    case 3: dot_tile(x_rows, cols_in, w_rows, 3, 0, &offset_share, sums); break;
                    case 2: dot_tile(x_rows, cols_in, w_rows, 2, 0, &offset_share, sums); break;
                    default: dot_tile(x_rows, cols_in, w_rows, 1, 0, &offset_share, sums); break;
                }
            }
            for (int i = 0; i < mb; i++) {
                int32_t row_sums[TILE_N];
                _mm_storeu_si128((__m128i *)row_sums, sums[i]);
                float *out_row = out + (m0 + i) * cols_out + n0;
                for (int j = 0; j < nb; j++) {
                    float y = (float)row_sums[j] * (input_scale * weight_scale[n0 + j]);
                    if (bias != NULL) y = y + bias[n0 + j];
                    out_row[j] = y;
                }
            }
        }
    }
    free(x_u8);
    return 0;
}

/* ------------------------------------------------------------------------------------- AMX */

#define AMX_GROUP_ROWS (AMX_OUTPUT_TILES * AMX_ROWS)

/* x_q int8 [rows, padded_k] (zeros past K and past the last row of x) -> per block of 16 rows,
 * the tiles' layout: row r of a k-chunk's tile holds, for each of the 16 rows m, the 4 bytes
 * x_q[m, 4r .. 4r + 3]; blocks [row_blocks][padded_k / 4][16] of 4-byte words. */
static void transpose_to_tiles(const int32_t *x_words, int64_t row_blocks, int64_t quads, int32_t *tiles) {
    for (int64_t block = 0; block < row_blocks; block++)
        for (int64_t r = 0; r < quads; r++)
            for (int m = 0; m < AMX_ROWS; m++)
                tiles[(block * quads + r) * AMX_ROWS + m] = x_words[(block * AMX_ROWS + m) * quads + r];
}

/* Where to load the weight tile of rows n .. n + 15, bytes k0 .. k0 + 63 from: the weight
 * itself when the tile lies inside it (bytes past a row's end belong to the next row and meet
 * x's zero padding), else a zero-padded copy in scratch. */
static const int8_t *weight_tile(const int8_t *weight, int64_t cols_out, int64_t cols_in, int64_t n, int64_t k0,
                                 int8_t *scratch, int64_t *stride) {
    if (n + AMX_ROWS <= cols_out && (n + AMX_ROWS - 1) * cols_in + k0 + AMX_ROW_BYTES <= cols_out * cols_in) {
        *stride = cols_in;
        return weight + n * cols_in + k0;
    }
    memset(scratch, 0, AMX_ROWS * AMX_ROW_BYTES);
    const int64_t width = cols_in - k0 < AMX_ROW_BYTES ? cols_in - k0 : AMX_ROW_BYTES;
    for (int64_t i = 0; i < AMX_ROWS && n + i < cols_out; i++) memcpy(scratch + i * AMX_ROW_BYTES, weight + (n + i) * cols_in + k0, width);
    *stride = AMX_ROW_BYTES;
    return scratch;
}

#define MULTIPLY_INTO(out_tile, w_tile)                                                                      \
    do {                                                                                                     \
        const int8_t *source = weight_tile(weight, cols_out, cols_in, n0 + (out_tile) * AMX_ROWS, k0, scratch, &stride); \
        _tile_loadd(w_tile, source, stride);                                                                 \
        _tile_dpbssd(out_tile, w_tile, TILE_X);                                                              \
    } while (0)

/* sums [64 n][16 m] of a group of weight rows starting at n0 with the x tiles of one block. */
static AMX_INT8 void group_sums(const int8_t *weight, int64_t cols_out, int64_t cols_in, int64_t n0, const int32_t *x_tiles,
                                int64_t quads, int8_t *scratch, int32_t sums[AMX_GROUP_ROWS][AMX_ROWS]) {
    int64_t stride;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k0 = 0; k0 < quads * 4; k0 += AMX_ROW_BYTES) {
        _tile_loadd(TILE_X, x_tiles + (k0 / 4) * AMX_ROWS, AMX_ROW_BYTES);
        MULTIPLY_INTO(0, TILE_W_EVEN);
        MULTIPLY_INTO(1, TILE_W_ODD);
        MULTIPLY_INTO(2, TILE_W_EVEN);
        MULTIPLY_INTO(3, TILE_W_ODD);
    }
    _tile_stored(0, sums[0], AMX_ROW_BYTES);
    _tile_stored(1, sums[AMX_ROWS], AMX_ROW_BYTES);
    _tile_stored(2, sums[2 * AMX_ROWS], AMX_ROW_BYTES);
    _tile_stored(3, sums[3 * AMX_ROWS], AMX_ROW_BYTES);
}

/* Start reading the next group of weight rows (contiguous) while this one multiplies. */
static void prefetch_group(const int8_t *weight, int64_t cols_out, int64_t cols_in, int64_t n0) {
    const int64_t start = (n0 + AMX_GROUP_ROWS) * cols_in, end = cols_out * cols_in;
    const int64_t stop = start + AMX_GROUP_ROWS * cols_in < end ? start + AMX_GROUP_ROWS * cols_in : end;
    for (int64_t byte = start; byte < stop; byte += 64) _mm_prefetch((const char *)(weight + byte), _MM_HINT_T1);
}

/* The same contract as quamba_w8a8_linear_avx512_vnni. */
AMX_INT8 int quamba_w8a8_linear_amx(const float *x, int64_t rows, int64_t cols_in, float input_scale, const int8_t *weight,
                                    int64_t cols_out, const float *weight_scale, const float *bias, float *out) {
    const int64_t padded_k = (cols_in + AMX_ROW_BYTES - 1) / AMX_ROW_BYTES * AMX_ROW_BYTES, quads = padded_k / 4;
    const int64_t row_blocks = (rows + AMX_ROWS - 1) / AMX_ROWS;
    int8_t *x_q = calloc((size_t)(row_blocks * AMX_ROWS * padded_k), 1);
    int32_t *x_tiles = malloc((size_t)(row_blocks * AMX_ROWS * padded_k));
    int8_t *scratch = malloc(AMX_ROWS * AMX_ROW_BYTES);
    if (x_q == NULL || x_tiles == NULL || scratch == NULL) {
        free(x_q);
        free(x_tiles);
        free(scratch);
        return -1;
    }
    const float inv_scale = 1.0f / input_scale;
    for (int64_t m = 0; m < rows; m++) quantize_int8_avx512(x + m * cols_in, cols_in, inv_scale, 0, x_q + m * padded_k);
    transpose_to_tiles((const int32_t *)x_q, row_blocks, quads, x_tiles);
    configure_amx_tiles();
    int32_t sums[AMX_GROUP_ROWS][AMX_ROWS];
    float scales[AMX_GROUP_ROWS];
    for (int64_t n0 = 0; n0 < cols_out; n0 += AMX_GROUP_ROWS) {
        prefetch_group(weight, cols_out, cols_in, n0);
        const int64_t group_rows = cols_out - n0 < AMX_GROUP_ROWS ? cols_out - n0 : AMX_GROUP_ROWS;
        for (int64_t i = 0; i < group_rows; i++) scales[i] = input_scale * weight_scale[n0 + i];
        for (int64_t block = 0; block < row_blocks; block++) {
            group_sums(weight, cols_out, cols_in, n0, x_tiles + block * quads * AMX_ROWS, quads, scratch, sums);
            /* Rows of x outermost: each writes a contiguous run of its output row. */
            for (int64_t m = 0; m < AMX_ROWS && block * AMX_ROWS + m < rows; m++) {
                float *out_row = out + (block * AMX_ROWS + m) * cols_out + n0;
                for (int64_t i = 0; i < group_rows; i++) {
                    float y = (float)sums[i][m] * scales[i];
                    if (bias != NULL) y = y + bias[n0 + i];
                    out_row[i] = y;
                }
            }
        }
    }
    _tile_release();
    free(x_q);
    free(x_tiles);
    free(scratch);
    return 0;
}
