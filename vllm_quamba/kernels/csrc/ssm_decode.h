/* Shared pieces of the SSM decode kernels (quamba2_ssm_decode.c: the int8 state, mamba2_ssm_decode.c:
 * the fp16 state): vector math that repeats _numba_math's fp32 operations, the dt step, prefetching,
 * and the group RMS normalization of the gated norm. */
#ifndef VLLM_QUAMBA_SSM_DECODE_H
#define VLLM_QUAMBA_SSM_DECODE_H

#include <math.h>

#include "simd.h"

#define LANES 16
/* How far ahead of the row being updated the state is prefetched: the hardware prefetcher alone
 * left a cold state update at half the memory bandwidth. */
#define PREFETCH_BYTES 2048

static ALWAYS_INLINE __mmask16 tail_mask(int64_t remaining) {
    return remaining >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1);
}

/* Prefetches the state PREFETCH_BYTES after offset (bytes) in this slot, or past its end in the
 * next one (NULL: none). */
static ALWAYS_INLINE void prefetch_ahead(const void *slot, const void *next_slot, int64_t offset, int64_t length,
                                         int64_t slot_bytes) {
    for (int64_t ahead = offset + PREFETCH_BYTES; ahead < offset + PREFETCH_BYTES + length; ahead += 64) {
        if (ahead < slot_bytes)
            _mm_prefetch((const char *)slot + ahead, _MM_HINT_T0);
        else if (next_slot != NULL)
            _mm_prefetch((const char *)next_slot + ahead - slot_bytes, _MM_HINT_T0);
    }
}

/* _numba_math's exp: 2^k * e^r, k = rint(x log2 e), r = x - k ln 2 (ln 2 in an exact head and a
 * tail), e^r by its degree-7 Taylor polynomial, x clamped to [-87, 88]. */
#define EXP_MIN (-87.0f)
#define EXP_MAX 88.0f
#define LOG2E ((float)1.4426950408889634)
#define LN2_HI 0.693359375f
#define LN2_LO ((float)-2.12194440e-4)

static ALWAYS_INLINE AVX512_VNNI __m512 exp_avx512(__m512 x) {
    static const float taylor[8] = {1.0f, 1.0f, (float)(1.0 / 2), (float)(1.0 / 6), (float)(1.0 / 24),
                                    (float)(1.0 / 120), (float)(1.0 / 720), (float)(1.0 / 5040)};
    const __m512 v = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_MIN)), _mm512_set1_ps(EXP_MAX));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r =
        _mm512_sub_ps(_mm512_sub_ps(v, _mm512_mul_ps(k, _mm512_set1_ps(LN2_HI))), _mm512_mul_ps(k, _mm512_set1_ps(LN2_LO)));
    __m512 poly = _mm512_set1_ps(taylor[7]);
    for (int i = 6; i >= 0; i--)
        poly = _mm512_add_ps(_mm512_set1_ps(taylor[i]), _mm512_mul_ps(r, poly));
    const __m512i pow2_bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(poly, _mm512_castsi512_ps(pow2_bits));
}

/* silu(v) = v / (1 + exp(-v)), the exp's argument as numba's -1.0 * v. */
static ALWAYS_INLINE AVX512_VNNI __m512 silu_avx512(__m512 v) {
    const __m512 exp_minus = exp_avx512(_mm512_mul_ps(v, _mm512_set1_ps(-1.0f)));
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_minus));
}

/* dt = softplus(v) (torch's threshold 20) and the state's decay exp(dt * A), by the libm expf and
 * log1pf that numba calls. */
static inline void softplus_and_decay(float v, float A, float *dt, float *decay) {
    *dt = v > 20.0f ? v : log1pf(expf(v));
    *decay = expf(*dt * A);
}

/* The RMS normalization of the gated norm, in place on gated [size] (already y * silu(z)): each
 * group of `group` channels divided by its RMS (+ eps), times weight. */
static AVX512_VNNI void normalize_groups(float *gated, int64_t size, int64_t group, const float *weight, float eps) {
    for (int64_t start = 0; start < size; start += group) {
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = start; i < start + group; i += LANES) {
            const __m512 v = _mm512_maskz_loadu_ps(tail_mask(start + group - i), gated + i);
            squares = _mm512_add_ps(squares, _mm512_mul_ps(v, v));
        }
        const __m512 inv_rms = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)group + eps));
        for (int64_t i = start; i < start + group; i += LANES) {
            const __mmask16 mask = tail_mask(start + group - i);
            const __m512 normed = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, gated + i), inv_rms);
            _mm512_mask_storeu_ps(gated + i, mask, _mm512_mul_ps(normed, _mm512_maskz_loadu_ps(mask, weight + i)));
        }
    }
}

#endif
