/* 4-bit weight linears on AVX-512 (VNNI for W4A8); the specifications are w4_linear.py's
 * w4a8_linear_ref and w4a16_linear_ref:
 *
 *   W[n, k] = q[n, k] * scale[n, k / G]          q in [-8, 7], stored as the nibble q + 8
 *   W4A16:  y = x @ W.T                           fp32
 *   W4A8:   x_q = quantize_int8(x, input_scale)
 *           y[m, n] = (sum_g scale[n, g] * acc[m, n, g]) * input_scale,  acc exact int32 sums
 *
 * Weight layout (w4_linear.interleave_w4, made once at load): the checkpoint's int32 words
 * regrouped into blocks of 16 output rows, block-major, then word, then row:
 * blocks[b][w][r] = word w (k = 8w .. 8w + 7) of row 16b + r, rows past N zero. One 64-byte
 * load is then word w of 16 rows, one row per int32 lane, so every lane accumulates its own
 * output and nothing is reduced across lanes: x's values are broadcast instead. A group of G
 * (a multiple of 8) is G / 8 whole words, so each per-group scale is one vector of 16 rows'
 * scales, read from scale_t [groups, N].
 *
 * Nibble j of a word (shift 4j) is k = 8w + j; byte t's low nibble is k even, its high one k odd.
 * W4A8: the low nibbles of all 4 bytes (masked) meet x_q's 4 even k of the word and the high
 * nibbles its 4 odd k, as u8 x s8 in one vpdpbusd each; x_q is rearranged once per call into
 * [4 even, 4 odd] per word. The nibbles carry q + 8: each group's accumulator starts at
 * -8 * (sum of x_q over the group), exactly (int32 lanes; the reference's sums fit int32).
 * W4A16: vpermps looks up q as fp32 from the nibble (it reads only an index's low 4 bits), one
 * FMA per k with x[k] broadcast; a group's sum is then scaled.
 *
 * Each pass multiplies a few row blocks (read from memory once) by TILE_M rows of x at a time
 * (from L1), with int32 or fp32 group accumulators and fp32 totals in registers; its first x
 * tile prefetches the next pass's blocks, so that they arrive while these are multiplied.
 * W4A16 with more than TILE_M rows of x instead dequantizes each chunk of a pass once into an
 * L1 buffer for all x tiles (unpacking per tile cost it 12-20% at 16 to 128 rows).
 *
 * quamba_w4a8_linear_amx, for CPUs with AMX, reads the same layout and multiplies tiles of the
 * unpacked nibbles by 16 rows of x at a time with tdpbssd (see its section below): from 16
 * rows of x up it ran the mamba2-130m linears 1.7-2.5x as fast as the VNNI kernel, which is
 * compute-bound there.
 */
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define ROWS_PER_BLOCK 16
/* Row blocks per pass: 4 when x has at most 2 rows (more independent accumulator chains and
 * memory streams for GEMV), else 2 (registers for 4 x rows). */
#define MAX_BLOCKS_PER_PASS 4
#define TILE_M 4
#define K_PER_WORD 8

/* Switch cases that call TILE(MB, NB) with constants equal to mb and nb, keyed mb * 8 + nb, so
 * that the tile's accumulator arrays become registers: below for mb <= 2 and nb <= 4. */
#define CASES_UP_TO_2_ROWS(TILE)      \
    case 9: TILE(1, 1); break;        \
    case 10: TILE(1, 2); break;       \
    case 11: TILE(1, 3); break;       \
    case 12: TILE(1, 4); break;       \
    case 17: TILE(2, 1); break;       \
    case 18: TILE(2, 2); break;       \
    case 19: TILE(2, 3); break;       \
    case 20: TILE(2, 4); break;

/* The passes' shapes (blocks_per_pass): nb <= 4 where mb <= 2, else nb <= 2. */
#define DISPATCH_PASS_TILE(TILE, mb, nb) \
    switch ((mb) * 8 + (nb)) {           \
        CASES_UP_TO_2_ROWS(TILE)         \
        case 25: TILE(3, 1); break;      \
        case 26: TILE(3, 2); break;      \
        case 33: TILE(4, 1); break;      \
        default: TILE(4, 2); break;      \
    }

/* Every mb <= 4 and nb <= 4 (w4a16_dequantized). */
#define DISPATCH_ANY_TILE(TILE, mb, nb) \
    switch ((mb) * 8 + (nb)) {          \
        CASES_UP_TO_2_ROWS(TILE)        \
        case 25: TILE(3, 1); break;     \
        case 26: TILE(3, 2); break;     \
        case 27: TILE(3, 3); break;     \
        case 28: TILE(3, 4); break;     \
        case 33: TILE(4, 1); break;     \
        case 34: TILE(4, 2); break;     \
        case 35: TILE(4, 3); break;     \
        default: TILE(4, 4); break;     \
    }

static int64_t words_per_row(int64_t cols_in) { return (cols_in + K_PER_WORD - 1) / K_PER_WORD; }

/* One past group g's last word. */
static int64_t group_end(int64_t g, int64_t group_words, int64_t words) {
    return (g + 1) * group_words < words ? (g + 1) * group_words : words;
}

static int blocks_per_pass(int64_t rows) { return rows <= 2 ? MAX_BLOCKS_PER_PASS : 2; }

/* Lanes of the last block that hold real rows. */
static __mmask16 row_mask(int64_t cols_out, int64_t block) {
    const int64_t rows = cols_out - block * ROWS_PER_BLOCK;
    return rows >= ROWS_PER_BLOCK ? (__mmask16)0xFFFF : (__mmask16)((1u << rows) - 1);
}

/* --------------------------------------------------------------------------------------------
 * W4A8 */

/* x_q [words * 8, zero past K, readable up to a multiple of 64 bytes] -> x_split [words][4 even
 * k, 4 odd k] and word_sums[w] = the sum of word w's 8 values (written up to a multiple of 8). */
static AVX512_VNNI void split_even_odd(const int8_t *x_q, int64_t words, int8_t *x_split, int64_t *word_sums) {
    /* Per 8 bytes: positions 0, 2, 4, 6 then 1, 3, 5, 7 (pshufb indexes within 16-byte lanes). */
    const __m512i order = _mm512_set4_epi32(0x0F0D0B09, 0x0E0C0A08, 0x07050301, 0x06040200);
    const __m512i offset = _mm512_set1_epi8((char)0x80);
    const __m512i offset_sum = _mm512_set1_epi64(K_PER_WORD * 128);
    for (int64_t w = 0; w < words; w += 8) {
        const __mmask64 mask = words - w >= 8 ? ~(__mmask64)0 : ((__mmask64)1 << (K_PER_WORD * (words - w))) - 1;
        const __m512i v = _mm512_loadu_si512(x_q + K_PER_WORD * w);
        _mm512_mask_storeu_epi8(x_split + K_PER_WORD * w, mask, _mm512_shuffle_epi8(v, order));
        /* psadbw against zero sums 8 unsigned bytes: x_q + 128, so 8 * 128 too much. */
        const __m512i sums = _mm512_sad_epu8(_mm512_xor_si512(v, offset), _mm512_setzero_si512());
        _mm512_storeu_si512(word_sums + w, _mm512_sub_epi64(sums, offset_sum));
    }
}

/* Per row of x: x_split as above (rows x_stride bytes apart) and, unless offsets is NULL,
 * offsets[row][g] = -8 * sum of x_q over group g. */
static AVX512_VNNI int prepare_x_int8(const float *x, int64_t rows, int64_t cols_in, float input_scale,
                                      int64_t group_words, int64_t groups, int8_t *x_split, int64_t x_stride,
                                      int32_t *offsets) {
    const int64_t words = words_per_row(cols_in);
    const int64_t padded_words = (words + 7) / 8 * 8; /* split_even_odd's 64-byte steps */
    int8_t *x_q = malloc((size_t)(padded_words * K_PER_WORD));
    int64_t *word_sums = malloc((size_t)padded_words * sizeof(int64_t));
    if (x_q == NULL || word_sums == NULL) {
        free(x_q);
        free(word_sums);
        return -1;
    }
    const float inv_scale = 1.0f / input_scale; /* correctly rounded: the reference's reciprocal */
    for (int64_t m = 0; m < rows; m++) {
        memset(x_q, 0, (size_t)(padded_words * K_PER_WORD));
        quantize_int8_avx512(x + m * cols_in, cols_in, inv_scale, 0, x_q);
        split_even_odd(x_q, words, x_split + m * x_stride, word_sums);
        for (int64_t g = 0; offsets != NULL && g < groups; g++) {
            const int64_t stop = group_end(g, group_words, words);
            int64_t sum = 0;
            for (int64_t w = g * group_words; w < stop; w++) sum += word_sums[w];
            offsets[m * groups + g] = (int32_t)(-8 * sum);
        }
    }
    free(x_q);
    free(word_sums);
    return 0;
}

/* out[m0 .. m0 + mb, 16 * b0 .. 16 * (b0 + nb)] for constant mb and nb (inlined into switches). */
static ALWAYS_INLINE AVX512_VNNI void w4a8_tile(const int8_t *x_split, const int32_t *offsets, int64_t m0,
                                                const int mb, const uint32_t *blocks, int64_t b0, const int nb,
                                                int64_t words, int64_t group_words, int64_t groups,
                                                const float *scale_t, int64_t cols_out, float input_scale,
                                                float *out) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512 total[TILE_M][MAX_BLOCKS_PER_PASS];
    for (int i = 0; i < mb; i++)
        for (int b = 0; b < nb; b++) total[i][b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const int64_t stop = group_end(g, group_words, words);
        __m512i acc[TILE_M][MAX_BLOCKS_PER_PASS];
        for (int i = 0; i < mb; i++)
            for (int b = 0; b < nb; b++) acc[i][b] = _mm512_set1_epi32(offsets[(m0 + i) * groups + g]);
        for (int64_t w = g * group_words; w < stop; w++) {
            __m512i even[MAX_BLOCKS_PER_PASS], odd[MAX_BLOCKS_PER_PASS];
            for (int b = 0; b < nb; b++) {
                const uint32_t *word = blocks + ((b0 + b) * words + w) * ROWS_PER_BLOCK;
                /* The next pass's block b, nb blocks on (past the end: harmless, never faults). */
                if (m0 == 0) _mm_prefetch((const char *)(word + nb * words * ROWS_PER_BLOCK), _MM_HINT_T0);
                const __m512i v = _mm512_loadu_si512(word);
                even[b] = _mm512_and_si512(v, nibble);
                odd[b] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            }
            for (int i = 0; i < mb; i++) {
                const int32_t *x_word = (const int32_t *)(x_split + ((m0 + i) * words + w) * K_PER_WORD);
                const __m512i x_even = _mm512_set1_epi32(x_word[0]), x_odd = _mm512_set1_epi32(x_word[1]);
                for (int b = 0; b < nb; b++) {
                    acc[i][b] = _mm512_dpbusd_epi32(acc[i][b], even[b], x_even);
                    acc[i][b] = _mm512_dpbusd_epi32(acc[i][b], odd[b], x_odd);
                }
            }
        }
        for (int b = 0; b < nb; b++) {
            const __m512 scale = _mm512_maskz_loadu_ps(row_mask(cols_out, b0 + b), scale_t + g * cols_out + (b0 + b) * ROWS_PER_BLOCK);
            for (int i = 0; i < mb; i++) total[i][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][b]), scale, total[i][b]);
        }
    }
    const __m512 in_scale = _mm512_set1_ps(input_scale);
    for (int i = 0; i < mb; i++)
        for (int b = 0; b < nb; b++)
            _mm512_mask_storeu_ps(out + (m0 + i) * cols_out + (b0 + b) * ROWS_PER_BLOCK, row_mask(cols_out, b0 + b),
                                  _mm512_mul_ps(total[i][b], in_scale));
}

static AVX512_VNNI void w4a8_pass(const int8_t *x_split, const int32_t *offsets, int64_t m0, int mb,
                                  const uint32_t *blocks, int64_t b0, int nb, int64_t words, int64_t group_words,
                                  int64_t groups, const float *scale_t, int64_t cols_out, float input_scale,
                                  float *out) {
#define W4A8_TILE(MB, NB) \
    w4a8_tile(x_split, offsets, m0, MB, blocks, b0, NB, words, group_words, groups, scale_t, cols_out, input_scale, out)
    DISPATCH_PASS_TILE(W4A8_TILE, mb, nb)
#undef W4A8_TILE
}

/* x f32 [rows, cols_in]; blocks as described above for a weight [cols_out, cols_in] with
 * groups of group_size; scale_t f32 [ceil(cols_in / group_size), cols_out] -> out f32
 * [rows, cols_out] (no bias). Returns 0, or -1 when the int8 copy of x cannot be allocated. */
AVX512_VNNI int quamba_w4a8_linear_avx512_vnni(const float *x, int64_t rows, int64_t cols_in, float input_scale,
                                               const uint32_t *blocks, int64_t cols_out, const float *scale_t,
                                               int64_t group_size, float *out) {
    if (rows == 0) return 0; /* below, malloc(0) may return NULL */
    const int64_t words = words_per_row(cols_in), group_words = group_size / K_PER_WORD;
    const int64_t groups = (cols_in + group_size - 1) / group_size;
    int8_t *x_split = malloc((size_t)(rows * words * K_PER_WORD));
    int32_t *offsets = malloc((size_t)(rows * groups) * sizeof(int32_t));
    int status = -1;
    if (x_split != NULL && offsets != NULL)
        status = prepare_x_int8(x, rows, cols_in, input_scale, group_words, groups, x_split, words * K_PER_WORD,
                                offsets);
    if (status == 0) {
        const int64_t num_blocks = (cols_out + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
        const int pass_blocks = blocks_per_pass(rows);
        for (int64_t b0 = 0; b0 < num_blocks; b0 += pass_blocks) {
            const int nb = num_blocks - b0 < pass_blocks ? (int)(num_blocks - b0) : pass_blocks;
            for (int64_t m0 = 0; m0 < rows; m0 += TILE_M) {
                const int mb = rows - m0 < TILE_M ? (int)(rows - m0) : TILE_M;
                w4a8_pass(x_split, offsets, m0, mb, blocks, b0, nb, words, group_words, groups, scale_t, cols_out,
                          input_scale, out);
            }
        }
    }
    free(x_split);
    free(offsets);
    return status;
}

/* --------------------------------------------------------------------------------------------
 * W4A8 on AMX
 *
 * tdpbssd multiplies a tile of x (16 rows m x 64 k) by a weight tile of 16 tile rows x 64
 * bytes, whose row r holds for each of 16 output rows n the 4 bytes of k = 4r .. 4r + 3, into
 * exact int32 sums C[m][n] (signed bytes both). Any order of k within a group gives the same
 * sums, so the tiles take x_split's order: tile row 2i of a 64-k chunk is word i's low nibbles
 * (its 4 even k, one byte each) and row 2i + 1 its high nibbles (4 odd k), each unpacked to q
 * (nibble - 8), so that no -8 offsets are left to add to the sums.
 * Each pass takes up to 4 blocks of 16 output rows (one C tile each) group by group: it unpacks
 * the group's words into such tiles once (8 KiB at G = 128, in L1) for every 16 rows of x.
 * Tile rows past a group's last word are zero, so a group that is not a multiple of 64 k reads
 * neighbouring k of x against zeros. Each group's sums are scaled in fp32 as in w4a8_tile, in
 * the same order: the results are bitwise those of quamba_w4a8_linear_avx512_vnni.
 * Unpacking a whole pass at once for all groups (48 KiB at K = 768) measured 1.2-1.5x slower at
 * 16 rows of x. One tdpbssd (16 x 16 outputs, 64 k) does the work of 256 vpdpbusd. */

#define WORDS_PER_CHUNK (AMX_ROW_BYTES / K_PER_WORD)

/* Group g's weight tiles of blocks b0 .. b0 + nb: tiles[(b * chunks + c) * 16 + row] is tile row
 * `row` of chunk c of block b0 + b. Prefetches the next pass's words. */
static AMX_INT8 void unpack_group(const uint32_t *blocks, int64_t b0, int nb, int64_t words, int64_t g,
                                  int64_t group_words, int64_t chunks, __m512i *tiles) {
    const __m512i nibble = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
    const int64_t start = g * group_words, stop = group_end(g, group_words, words);
    for (int b = 0; b < nb; b++) {
        __m512i *tile_rows = tiles + b * chunks * AMX_ROWS;
        for (int64_t w = start; w < stop; w++) {
            const uint32_t *word = blocks + ((b0 + b) * words + w) * ROWS_PER_BLOCK;
            _mm_prefetch((const char *)(word + nb * words * ROWS_PER_BLOCK), _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512(word);
            tile_rows[2 * (w - start)] = _mm512_sub_epi8(_mm512_and_si512(v, nibble), eight);
            tile_rows[2 * (w - start) + 1] = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), nibble), eight);
        }
        for (int64_t row = 2 * (stop - start); row < chunks * AMX_ROWS; row++)
            tile_rows[row] = _mm512_setzero_si512();
    }
}

#define MULTIPLY_INTO(out_tile, w_tile)                                                                 \
    do {                                                                                                \
        _tile_loadd(w_tile, tiles + ((out_tile) * chunks + c) * AMX_ROWS, AMX_ROW_BYTES);              \
        _tile_dpbssd(out_tile, TILE_X, w_tile);                                                         \
    } while (0)

/* sums[b][m][n]: a group's int32 sums for 16 rows of x from x_group
 * (its first k; rows x_stride bytes apart) and the nb blocks' tiles. */
static AMX_INT8 void group_tile_sums(const int8_t *x_group, int64_t x_stride, int64_t chunks, const __m512i *tiles,
                                     int nb, int32_t sums[AMX_OUTPUT_TILES][AMX_ROWS][AMX_ROWS]) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < chunks; c++) {
        _tile_loadd(TILE_X, x_group + c * AMX_ROW_BYTES, x_stride);
        MULTIPLY_INTO(0, TILE_W_EVEN);
        if (nb > 1) MULTIPLY_INTO(1, TILE_W_ODD);
        if (nb > 2) MULTIPLY_INTO(2, TILE_W_EVEN);
        if (nb > 3) MULTIPLY_INTO(3, TILE_W_ODD);
    }
    _tile_stored(0, sums[0], AMX_ROW_BYTES);
    if (nb > 1) _tile_stored(1, sums[1], AMX_ROW_BYTES);
    if (nb > 2) _tile_stored(2, sums[2], AMX_ROW_BYTES);
    if (nb > 3) _tile_stored(3, sums[3], AMX_ROW_BYTES);
}

/* total[m][b] += group g's scaled sums for the mb rows of x from m0 (total: [rows][4] vectors). */
static AMX_INT8 void add_scaled_sums(const int32_t sums[AMX_OUTPUT_TILES][AMX_ROWS][AMX_ROWS], int64_t m0,
                                     int64_t mb, int64_t g, int64_t b0, int nb, const float *scale_t,
                                     int64_t cols_out, __m512 *total) {
    __m512 scale[AMX_OUTPUT_TILES];
    for (int b = 0; b < nb; b++)
        scale[b] = _mm512_maskz_loadu_ps(row_mask(cols_out, b0 + b), scale_t + g * cols_out + (b0 + b) * ROWS_PER_BLOCK);
    for (int64_t m = 0; m < mb; m++)
        for (int b = 0; b < nb; b++) {
            __m512 *sum = total + (m0 + m) * AMX_OUTPUT_TILES + b;
            *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[b][m])), scale[b], *sum);
        }
}

/* out[:, 16 * b0 .. 16 * (b0 + nb)]: per group, its weight tiles are unpacked once (into L1)
 * for every 16 rows of x, whose fp32 totals wait in memory. */
static AMX_INT8 void amx_pass(const int8_t *x_split, int64_t x_stride, int64_t rows,
                              const uint32_t *blocks, int64_t b0, int nb, int64_t words, int64_t group_words,
                              int64_t groups, int64_t chunks, const float *scale_t, int64_t cols_out,
                              float input_scale, __m512i *tiles, __m512 *total, float *out) {
    int32_t sums[AMX_OUTPUT_TILES][AMX_ROWS][AMX_ROWS] __attribute__((aligned(64)));
    memset(total, 0, (size_t)(rows * AMX_OUTPUT_TILES) * sizeof(__m512));
    for (int64_t g = 0; g < groups; g++) {
        unpack_group(blocks, b0, nb, words, g, group_words, chunks, tiles);
        for (int64_t m0 = 0; m0 < rows; m0 += AMX_ROWS) {
            const int64_t mb = rows - m0 < AMX_ROWS ? rows - m0 : AMX_ROWS;
            const int8_t *x_group = x_split + m0 * x_stride + g * group_words * K_PER_WORD;
            group_tile_sums(x_group, x_stride, chunks, tiles, nb, sums);
            add_scaled_sums(sums, m0, mb, g, b0, nb, scale_t, cols_out, total);
        }
    }
    const __m512 in_scale = _mm512_set1_ps(input_scale);
    for (int64_t m = 0; m < rows; m++)
        for (int b = 0; b < nb; b++)
            _mm512_mask_storeu_ps(out + m * cols_out + (b0 + b) * ROWS_PER_BLOCK, row_mask(cols_out, b0 + b),
                                  _mm512_mul_ps(total[m * AMX_OUTPUT_TILES + b], in_scale));
}

/* The same contract as quamba_w4a8_linear_avx512_vnni. */
AMX_INT8 int quamba_w4a8_linear_amx(const float *x, int64_t rows, int64_t cols_in, float input_scale,
                                    const uint32_t *blocks, int64_t cols_out, const float *scale_t,
                                    int64_t group_size, float *out) {
    if (rows == 0) return 0; /* below, malloc(0) may return NULL */
    const int64_t group_words = group_size / K_PER_WORD, chunks = (group_words + WORDS_PER_CHUNK - 1) / WORDS_PER_CHUNK;
    const int64_t words = words_per_row(cols_in), groups = (cols_in + group_size - 1) / group_size;
    /* Every chunk's tile of x lies inside its row; past K it holds zeros (calloc). */
    const int64_t x_stride = ((groups - 1) * group_words + chunks * WORDS_PER_CHUNK) * K_PER_WORD;
    const int64_t x_rows = (rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
    int8_t *x_split = calloc((size_t)(x_rows * x_stride), 1);
    const size_t tile_bytes = (size_t)(AMX_OUTPUT_TILES * chunks * AMX_ROWS) * sizeof(__m512i);
    __m512i *tiles = aligned_alloc(sizeof(__m512i), tile_bytes);
    __m512 *total = aligned_alloc(sizeof(__m512), (size_t)(rows * AMX_OUTPUT_TILES) * sizeof(__m512));
    int status = -1;
    if (x_split != NULL && tiles != NULL && total != NULL)
        status = prepare_x_int8(x, rows, cols_in, input_scale, group_words, groups, x_split, x_stride, NULL);
    if (status == 0) {
        configure_amx_tiles();
        const int64_t num_blocks = (cols_out + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
        for (int64_t b0 = 0; b0 < num_blocks; b0 += AMX_OUTPUT_TILES) {
            const int nb = num_blocks - b0 < AMX_OUTPUT_TILES ? (int)(num_blocks - b0) : AMX_OUTPUT_TILES;
            amx_pass(x_split, x_stride, rows, blocks, b0, nb, words, group_words, groups, chunks, scale_t,
                     cols_out, input_scale, tiles, total, out);
        }
        _tile_release();
    }
    free(x_split);
    free(tiles);
    free(total);
    return status;
}

/* --------------------------------------------------------------------------------------------
 * W4A16 */

/* out[m0 .. m0 + mb, 16 * b0 .. 16 * (b0 + nb)] from x [rows, words * 8] (zero past K), for
 * constant mb and nb. */
static ALWAYS_INLINE AVX512_VNNI void w4a16_tile(const float *x, int64_t m0, const int mb, const uint32_t *blocks,
                                                 int64_t b0, const int nb, int64_t words, int64_t group_words,
                                                 int64_t groups, const float *scale_t, int64_t cols_out, float *out) {
    /* q as fp32 for each nibble value q + 8. */
    const __m512 q_of_nibble = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    __m512 total[TILE_M][MAX_BLOCKS_PER_PASS];
    for (int i = 0; i < mb; i++)
        for (int b = 0; b < nb; b++) total[i][b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const int64_t stop = group_end(g, group_words, words);
        __m512 acc[TILE_M][MAX_BLOCKS_PER_PASS];
        for (int i = 0; i < mb; i++)
            for (int b = 0; b < nb; b++) acc[i][b] = _mm512_setzero_ps();
        for (int64_t w = g * group_words; w < stop; w++) {
            __m512i v[MAX_BLOCKS_PER_PASS];
            for (int b = 0; b < nb; b++) {
                const uint32_t *word = blocks + ((b0 + b) * words + w) * ROWS_PER_BLOCK;
                if (m0 == 0) _mm_prefetch((const char *)(word + nb * words * ROWS_PER_BLOCK), _MM_HINT_T0);
                v[b] = _mm512_loadu_si512(word);
            }
            for (int j = 0; j < K_PER_WORD; j++) {
                for (int b = 0; b < nb; b++) {
                    const __m512 q = _mm512_permutexvar_ps(_mm512_srli_epi32(v[b], 4 * j), q_of_nibble);
                    for (int i = 0; i < mb; i++) {
                        const __m512 x_k = _mm512_set1_ps(x[(m0 + i) * words * K_PER_WORD + w * K_PER_WORD + j]);
                        acc[i][b] = _mm512_fmadd_ps(q, x_k, acc[i][b]);
                    }
                }
            }
        }
        for (int b = 0; b < nb; b++) {
            const __m512 scale = _mm512_maskz_loadu_ps(row_mask(cols_out, b0 + b), scale_t + g * cols_out + (b0 + b) * ROWS_PER_BLOCK);
            for (int i = 0; i < mb; i++) total[i][b] = _mm512_fmadd_ps(acc[i][b], scale, total[i][b]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int b = 0; b < nb; b++)
            _mm512_mask_storeu_ps(out + (m0 + i) * cols_out + (b0 + b) * ROWS_PER_BLOCK, row_mask(cols_out, b0 + b),
                                  total[i][b]);
}

static AVX512_VNNI void w4a16_pass(const float *x, int64_t m0, int mb, const uint32_t *blocks, int64_t b0, int nb,
                                   int64_t words, int64_t group_words, int64_t groups, const float *scale_t,
                                   int64_t cols_out, float *out) {
#define W4A16_TILE(MB, NB) w4a16_tile(x, m0, MB, blocks, b0, NB, words, group_words, groups, scale_t, cols_out, out)
    DISPATCH_PASS_TILE(W4A16_TILE, mb, nb)
#undef W4A16_TILE
}

/* Words per chunk of the dequantized path: 4 blocks' chunk is 16 KiB of fp32 weights in L1. */
#define CHUNK_WORDS 8

/* q as fp32 for the words w0 .. w0 + count of nb blocks: chunk[(b * CHUNK_WORDS + w) * 8 + j]
 * is k = 8 (w0 + w) + j of block b0 + b's 16 rows. Prefetches the next pass's words. */
static ALWAYS_INLINE AVX512_VNNI void dequantize_chunk(const uint32_t *blocks, int64_t b0, const int nb, int64_t words,
                                                       int64_t w0, int64_t count, __m512 *chunk) {
    const __m512 q_of_nibble = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    for (int b = 0; b < nb; b++)
        for (int64_t w = 0; w < count; w++) {
            const uint32_t *word = blocks + ((b0 + b) * words + w0 + w) * ROWS_PER_BLOCK;
            _mm_prefetch((const char *)(word + nb * words * ROWS_PER_BLOCK), _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512(word);
            for (int j = 0; j < K_PER_WORD; j++)
                chunk[(b * CHUNK_WORDS + w) * K_PER_WORD + j] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * j), q_of_nibble);
        }
}

/* Adds one chunk's products for x rows m0 .. m0 + mb to their group sums group_acc[m][b]
 * (zero first when first), and when last, the scaled group sums to total[m][b]. Both are
 * [rows][MAX_BLOCKS_PER_PASS]. Constant mb and nb. */
static ALWAYS_INLINE AVX512_VNNI void w4a16_chunk_tile(const float *x, int64_t x_stride, int64_t m0, const int mb,
                                                       const int nb, int64_t w0, int64_t count, const __m512 *chunk,
                                                       int first, int last, const __m512 *scale, __m512 *group_acc,
                                                       __m512 *total) {
    __m512 acc[TILE_M][MAX_BLOCKS_PER_PASS];
    for (int i = 0; i < mb; i++)
        for (int b = 0; b < nb; b++)
            acc[i][b] = first ? _mm512_setzero_ps() : group_acc[(m0 + i) * MAX_BLOCKS_PER_PASS + b];
    for (int64_t w = 0; w < count; w++)
        for (int j = 0; j < K_PER_WORD; j++) {
            __m512 x_k[TILE_M];
            for (int i = 0; i < mb; i++) x_k[i] = _mm512_set1_ps(x[(m0 + i) * x_stride + (w0 + w) * K_PER_WORD + j]);
            for (int b = 0; b < nb; b++) {
                const __m512 q = chunk[(b * CHUNK_WORDS + w) * K_PER_WORD + j];
                for (int i = 0; i < mb; i++) acc[i][b] = _mm512_fmadd_ps(q, x_k[i], acc[i][b]);
            }
        }
    for (int i = 0; i < mb; i++)
        for (int b = 0; b < nb; b++) {
            __m512 *sum = (last ? total : group_acc) + (m0 + i) * MAX_BLOCKS_PER_PASS + b;
            *sum = last ? _mm512_fmadd_ps(acc[i][b], scale[b], *sum) : acc[i][b];
        }
}

/* w4a16 for more than TILE_M rows of x: each chunk of weights is dequantized once per pass
 * into L1 and then serves every x tile (the direct tiles would unpack it once per tile). */
static AVX512_VNNI int w4a16_dequantized(const float *x, int64_t rows, int64_t words, const uint32_t *blocks,
                                         int64_t cols_out, const float *scale_t, int64_t group_words,
                                         int64_t groups, float *out) {
    const size_t sums_bytes = (size_t)rows * MAX_BLOCKS_PER_PASS * sizeof(__m512);
    __m512 *group_acc = aligned_alloc(sizeof(__m512), sums_bytes), *total = aligned_alloc(sizeof(__m512), sums_bytes);
    if (group_acc == NULL || total == NULL) {
        free(group_acc);
        free(total);
        return -1;
    }
    __m512 chunk[MAX_BLOCKS_PER_PASS * CHUNK_WORDS * K_PER_WORD];
    const int64_t num_blocks = (cols_out + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK, x_stride = words * K_PER_WORD;
    for (int64_t b0 = 0; b0 < num_blocks; b0 += MAX_BLOCKS_PER_PASS) {
        const int nb = num_blocks - b0 < MAX_BLOCKS_PER_PASS ? (int)(num_blocks - b0) : MAX_BLOCKS_PER_PASS;
        memset(total, 0, sums_bytes);
        for (int64_t g = 0; g < groups; g++) {
            const int64_t start = g * group_words, stop = group_end(g, group_words, words);
            __m512 scale[MAX_BLOCKS_PER_PASS];
            for (int b = 0; b < nb; b++)
                scale[b] = _mm512_maskz_loadu_ps(row_mask(cols_out, b0 + b), scale_t + g * cols_out + (b0 + b) * ROWS_PER_BLOCK);
            for (int64_t w0 = start; w0 < stop; w0 += CHUNK_WORDS) {
                const int64_t count = stop - w0 < CHUNK_WORDS ? stop - w0 : CHUNK_WORDS;
                dequantize_chunk(blocks, b0, nb, words, w0, count, chunk);
                const int first = w0 == start, last = w0 + count == stop;
                for (int64_t m0 = 0; m0 < rows; m0 += TILE_M) {
                    const int mb = rows - m0 < TILE_M ? (int)(rows - m0) : TILE_M;
#define CHUNK_TILE(MB, NB) \
    w4a16_chunk_tile(x, x_stride, m0, MB, NB, w0, count, chunk, first, last, scale, group_acc, total)
                    DISPATCH_ANY_TILE(CHUNK_TILE, mb, nb)
#undef CHUNK_TILE
                }
            }
        }
        for (int64_t m = 0; m < rows; m++)
            for (int b = 0; b < nb; b++)
                _mm512_mask_storeu_ps(out + m * cols_out + (b0 + b) * ROWS_PER_BLOCK, row_mask(cols_out, b0 + b),
                                      total[m * MAX_BLOCKS_PER_PASS + b]);
    }
    free(group_acc);
    free(total);
    return 0;
}

/* As quamba_w4a8_linear_avx512_vnni for x f32 [rows, cols_in] without quantization. Returns 0,
 * or -1 when scratch memory (a zero-padded copy of x where cols_in is not a multiple of 8, the
 * sums of more than 4 rows) cannot be allocated. */
AVX512_VNNI int quamba_w4a16_linear_avx512_vnni(const float *x, int64_t rows, int64_t cols_in,
                                                const uint32_t *blocks, int64_t cols_out, const float *scale_t,
                                                int64_t group_size, float *out) {
    if (rows == 0) return 0; /* the tiles below have at least one row */
    const int64_t words = words_per_row(cols_in), group_words = group_size / K_PER_WORD;
    const int64_t groups = (cols_in + group_size - 1) / group_size;
    float *x_padded = NULL;
    if (cols_in != words * K_PER_WORD) {
        /* The padding nibbles must meet zeros. */
        x_padded = calloc((size_t)(rows * words * K_PER_WORD), sizeof(float));
        if (x_padded == NULL) return -1;
        for (int64_t m = 0; m < rows; m++)
            memcpy(x_padded + m * words * K_PER_WORD, x + m * cols_in, (size_t)cols_in * sizeof(float));
        x = x_padded;
    }
    int status = 0;
    if (rows > TILE_M) {
        status = w4a16_dequantized(x, rows, words, blocks, cols_out, scale_t, group_words, groups, out);
    } else {
        const int64_t num_blocks = (cols_out + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
        const int pass_blocks = blocks_per_pass(rows);
        for (int64_t b0 = 0; b0 < num_blocks; b0 += pass_blocks) {
            const int nb = num_blocks - b0 < pass_blocks ? (int)(num_blocks - b0) : pass_blocks;
            w4a16_pass(x, 0, (int)rows, blocks, b0, nb, words, group_words, groups, scale_t, cols_out, out);
        }
    }
    free(x_padded);
    return status;
}

/* --------------------------------------------------------------------------------------------
 * W4A16 through the GEMM library: W.T dequantized for torch.mm (w4_linear._dequantized_blocks_mm) */

/* weight_t[k * ld + 16 * (b - b0) + r] = q[n, k] * scale[n, k / G] for n = 16 b + r, every k < cols_in
 * and the blocks b0 .. b0 + nb: the columns of W.T for those rows, each product rounded once to
 * fp32 as the reference's dequantization rounds it (rows past N come out zero: their scales load
 * as zero). One 64-byte store per k and block. Returns 0 (an int, as every kernel of the library). */
AVX512_VNNI int quamba_w4_dequantize_t_avx512(const uint32_t *blocks, int64_t cols_in, int64_t cols_out,
                                               const float *scale_t, int64_t group_size, int64_t b0, int64_t nb,
                                               float *weight_t, int64_t ld) {
    const __m512 q_of_nibble = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const int64_t words = words_per_row(cols_in), group_words = group_size / K_PER_WORD;
    const int64_t groups = (cols_in + group_size - 1) / group_size;
    for (int64_t b = b0; b < b0 + nb; b++) {
        float *column = weight_t + (b - b0) * ROWS_PER_BLOCK;
        for (int64_t g = 0; g < groups; g++) {
            const __m512 scale = _mm512_maskz_loadu_ps(row_mask(cols_out, b), scale_t + g * cols_out + b * ROWS_PER_BLOCK);
            for (int64_t w = g * group_words; w < group_end(g, group_words, words); w++) {
                const __m512i v = _mm512_loadu_si512(blocks + (b * words + w) * ROWS_PER_BLOCK);
                const int64_t k0 = w * K_PER_WORD, count = cols_in - k0 < K_PER_WORD ? cols_in - k0 : K_PER_WORD;
                for (int64_t j = 0; j < count; j++) {
                    const __m512 q = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * (int)j), q_of_nibble);
                    _mm512_storeu_ps(column + (k0 + j) * ld, _mm512_mul_ps(q, scale));
                }
            }
        }
    }
    return 0;
}
