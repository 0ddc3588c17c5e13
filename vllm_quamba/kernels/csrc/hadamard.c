/* The fast Hadamard transform of fp32 rows on AVX-512; the specification is
 * hadamard.hadamard_transform_ref, and this repeats _hadamard_numba.hadamard_row's additions in the
 * same order (butterflies inside each of the m blocks of n / m, the m x m base matrix across
 * blocks, then the 1/sqrt(n) normalization), so its result equals numba's bit for bit. Each
 * butterfly output is one addition of two values, whatever the vector layout; the base matrix
 * sums its m terms in k order for every element. */
#include <stddef.h>

#include "simd.h"

#define LANES 16

/* A butterfly pass of half 1, 2, 4 or 8 inside one vector: lanes without the bit `half` (the
 * tops) get top + bottom, the others (bottoms: mask) top - bottom, as the scalar loop computes. */
static ALWAYS_INLINE AVX512_VNNI __m512 butterfly_in_vector(__m512 v, int half, __mmask16 bottoms) {
    const __m512i partner_lane =
        _mm512_xor_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(half));
    const __m512 partner = _mm512_permutexvar_ps(partner_lane, v);
    return _mm512_mask_sub_ps(_mm512_add_ps(v, partner), bottoms, partner, v);
}

static ALWAYS_INLINE AVX512_VNNI void butterflies_below_16(float *row, int64_t n) {
    for (int64_t start = 0; start < n; start += LANES) {
        __m512 v = _mm512_loadu_ps(row + start);
        v = butterfly_in_vector(v, 1, 0xAAAA);
        v = butterfly_in_vector(v, 2, 0xCCCC);
        v = butterfly_in_vector(v, 4, 0xF0F0);
        v = butterfly_in_vector(v, 8, 0xFF00);
        _mm512_storeu_ps(row + start, v);
    }
}

static ALWAYS_INLINE AVX512_VNNI void butterfly_pass(float *row, int64_t n, int64_t half) {
    for (int64_t start = 0; start < n; start += 2 * half) {
        if (half >= LANES) {
            for (int64_t i = start; i < start + half; i += LANES) {
                const __m512 top = _mm512_loadu_ps(row + i), bottom = _mm512_loadu_ps(row + i + half);
                _mm512_storeu_ps(row + i, _mm512_add_ps(top, bottom));
                _mm512_storeu_ps(row + i + half, _mm512_sub_ps(top, bottom));
            }
        } else {
            for (int64_t i = start; i < start + half; i++) {
                const float top = row[i], bottom = row[i + half];
                row[i] = top + bottom;
                row[i + half] = top - bottom;
            }
        }
    }
}

/* out[r * block + i] = scale * sum_k base[r, k] * row[k * block + i], k in order from 0. */
static ALWAYS_INLINE AVX512_VNNI void base_matrix(const float *row, int64_t m, int64_t block, const float *base,
                                                  float scale, float *out) {
    const __m512 scale_v = _mm512_set1_ps(scale);
    for (int64_t r = 0; r < m; r++) {
        for (int64_t i = 0; i < block; i += LANES) {
            const __mmask16 mask = block - i >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << (block - i)) - 1);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t k = 0; k < m; k++) {
                const __m512 sign = _mm512_set1_ps(base[r * m + k]);
                acc = _mm512_add_ps(acc, _mm512_mul_ps(sign, _mm512_maskz_loadu_ps(mask, row + k * block + i)));
            }
            _mm512_mask_storeu_ps(out + r * block + i, mask, _mm512_mul_ps(acc, scale_v));
        }
    }
}

AVX512_VNNI void quamba_hadamard_row_avx512(float *row, int64_t n, const float *base, int64_t m, float scale,
                                            float *scratch) {
    const int64_t block = n / m;
    int64_t half = 1;
    if (block >= LANES) {
        butterflies_below_16(row, n);
        half = LANES;
    }
    for (; half < block; half *= 2)
        butterfly_pass(row, n, half);
    if (m > 1) {
        base_matrix(row, m, block, base, scale, scratch);
        for (int64_t i = 0; i < n; i++)
            row[i] = scratch[i];
        return;
    }
    const __m512 scale_v = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < n; i += LANES) {
        const __mmask16 mask = n - i >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(row + i, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + i), scale_v));
    }
}

/* Every one of count rows of n floats (row i at rows + i * n) in place; scratch holds n floats.
 * Returns 0. */
AVX512_VNNI int quamba_hadamard_rows_avx512(float *rows, int64_t count, int64_t n, const float *base, int64_t m,
                                            float scale, float *scratch) {
    for (int64_t i = 0; i < count; i++)
        quamba_hadamard_row_avx512(rows + i * n, n, base, m, scale, scratch);
    return 0;
}
