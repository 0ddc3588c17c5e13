/* The int8 SSM state update of the Quamba2 decode on AVX-512; the specification is
 * quamba2_ssm.quamba2_ssm_decode_ref, and this kernel repeats _quamba2_ssm_numba._head_int8's fp32
 * operations element by element, in the same order:
 *
 *   s = decay * (q * scale[n]) + (dt * x[p]) * b[n]        (no FMA: -ffp-contract=off)
 *   q = rint(clamp(s * inv_scale[n], -128, 127))           (ties to even, as torch.round)
 *   y[p] = sum_n s * c[n] + d * x[p]                       (the sum in its own order)
 *
 * so the int8 states equal the numba kernel's bit for bit, and y differs from it by summation
 * order only. The state is streamed once, 16 values per vector, dequantized, updated, requantized
 * and stored in place; the new fp32 state is used for y while still in registers, never stored.
 */
#include <stddef.h>

#include "simd.h"

#define LANES 16
#define GROUP (4 * LANES) /* state values per 64-byte line */
/* How far ahead of the row being updated the state is prefetched: the hardware prefetcher alone
 * left a cold state update at half the memory bandwidth. */
#define PREFETCH_BYTES 2048

/* The update of 16 state values (the lanes in mask; masked-off lanes load zeros): returns the
 * new fp32 state s and leaves its quantization in *q_new, unclamped below -128 (the caller's
 * saturating conversion clamps there; a rounded value equals a clamped one as the bounds are
 * integers). min(127, v) returns v where v is NaN: quantized to -128 as before the min. */
static ALWAYS_INLINE AVX512_VNNI __m512 update_vector(const int8_t *row, const float *scale, const float *inv_scale,
                                                      const float *b, __m512 decay, __m512 dt_x, __mmask16 mask,
                                                      __m512i *q_new) {
    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, row)));
    const __m512 state = _mm512_mul_ps(q, _mm512_maskz_loadu_ps(mask, scale));
    const __m512 s = _mm512_add_ps(_mm512_mul_ps(decay, state), _mm512_mul_ps(dt_x, _mm512_maskz_loadu_ps(mask, b)));
    const __m512 scaled = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mask, inv_scale));
    *q_new = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_set1_ps(127.0f), scaled));
    return s;
}

/* 4 vectors of int32 -> 64 int8 with signed saturation, in order: the two packs interleave the
 * vectors by 4-value pieces within each 128-bit lane; the permutation puts the pieces back. */
static ALWAYS_INLINE AVX512_VNNI __m512i pack_4(const __m512i q[4]) {
    const __m512i packed = _mm512_packs_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_epi32(order, packed);
}

/* One state row of N values, updated in place; returns its new state . c. */
static ALWAYS_INLINE AVX512_VNNI float update_row(int8_t *row, int64_t state_size, const float *scale,
                                                  const float *inv_scale, const float *b, const float *c,
                                                  float decay, float dt_x) {
    const __m512 decay_v = _mm512_set1_ps(decay), dt_x_v = _mm512_set1_ps(dt_x);
    __m512 acc = _mm512_setzero_ps();
    int64_t n = 0;
    for (; n + GROUP <= state_size; n += GROUP) {
        __m512i q[4];
        for (int j = 0; j < 4; j++) {
            const int64_t k = n + j * LANES;
            const __m512 s = update_vector(row + k, scale + k, inv_scale + k, b + k, decay_v, dt_x_v, 0xFFFF, &q[j]);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(s, _mm512_loadu_ps(c + k)));
        }
        _mm512_storeu_si512(row + n, pack_4(q));
    }
    for (; n < state_size; n += LANES) {
        const __mmask16 mask = state_size - n >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << (state_size - n)) - 1);
        __m512i q;
        const __m512 s = update_vector(row + n, scale + n, inv_scale + n, b + n, decay_v, dt_x_v, mask, &q);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mask, c + n)));
        _mm512_mask_cvtsepi32_storeu_epi8(row + n, mask, q);
    }
    return _mm512_reduce_add_ps(acc);
}

/* Prefetches the state PREFETCH_BYTES after offset in this slot, or past its end in the next. */
static ALWAYS_INLINE void prefetch_ahead(const int8_t *slot, const int8_t *next_slot, int64_t offset, int64_t length,
                                         int64_t slot_bytes) {
    for (int64_t ahead = offset + PREFETCH_BYTES; ahead < offset + PREFETCH_BYTES + length; ahead += 64) {
        if (ahead < slot_bytes)
            _mm_prefetch((const char *)(slot + ahead), _MM_HINT_T0);
        else if (next_slot != NULL)
            _mm_prefetch((const char *)(next_slot + ahead - slot_bytes), _MM_HINT_T0);
    }
}

/* Sequence i's state slot is the contiguous int8 [H*P, N] at ssm + slots[i] * slot_stride; its
 * operands are xbc[i] = [x (H*P), B (G*N), C (G*N)] (rows of conv_dim floats), dt[i], decay[i]
 * ([H] each, decay = exp(dt * A)); head h reads SSD group h / (H / G). State row r scales with
 * scale_table[scale_row[r]] ([R, N]; inv_table holds the fp32 reciprocals). Writes y [batch, H*P]
 * and returns 0. */
AVX512_VNNI int quamba_quamba2_ssm_decode_avx512_vnni(int8_t *ssm, int64_t slot_stride, const int64_t *slots,
                                                      int64_t batch, const float *xbc, int64_t conv_dim,
                                                      const float *dt, const float *decay, const float *d,
                                                      const int64_t *scale_row, const float *scale_table,
                                                      const float *inv_table, int64_t num_heads, int64_t head_dim,
                                                      int64_t state_size, int64_t n_groups, float *y) {
    const int64_t rows = num_heads * head_dim, heads_per_group = num_heads / n_groups;
    const int64_t slot_bytes = rows * state_size;
    for (int64_t i = 0; i < batch; i++) {
        int8_t *slot = ssm + slots[i] * slot_stride;
        const int8_t *next_slot = i + 1 < batch ? ssm + slots[i + 1] * slot_stride : NULL;
        const float *x = xbc + i * conv_dim;
        float *y_seq = y + i * rows;
        for (int64_t h = 0; h < num_heads; h++) {
            const int64_t g = h / heads_per_group;
            const float *b = x + rows + g * state_size, *c = x + rows + (n_groups + g) * state_size;
            const float dt_h = dt[i * num_heads + h], decay_h = decay[i * num_heads + h];
            for (int64_t r = h * head_dim; r < (h + 1) * head_dim; r++) {
                const int64_t table_offset = scale_row[r] * state_size;
                prefetch_ahead(slot, next_slot, r * state_size, state_size, slot_bytes);
                const float dot = update_row(slot + r * state_size, state_size, scale_table + table_offset,
                                             inv_table + table_offset, b, c, decay_h, dt_h * x[r]);
                y_seq[r] = dot + d[h] * x[r];
            }
        }
    }
    return 0;
}
