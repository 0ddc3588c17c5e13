/* One decode step of the Quamba2 int8 SSM on AVX-512, the whole batch in one call; the
 * specification is quamba2_ssm.quamba2_ssm_decode_ref, and this kernel repeats the fp32 operations
 * of _quamba2_ssm_numba.decode_kernel element by element, in the same order (no FMA:
 * -ffp-contract=off), so the int8 conv and SSM states equal numba's bit for bit and the output
 * differs from numba's only by the summation order of y = state . C and of the norm's sum of
 * squares. Per sequence:
 *
 *   conv    xbc = quantize(dequantize(window) . conv taps + bias -> SiLU) with the conv window
 *           (int8 in_proj outputs) shifted in place in its cache slot;
 *   dt      dt = softplus(dequantize(quantize(dt_in)) + dt_bias), decay = exp(dt * A);
 *   state   s = decay * (q * scale[n]) + (dt * x[p]) * b[n]
 *           q = rint(clamp(s * inv_scale[n], -128, 127))       (ties to even, as torch.round)
 *           y[p] = sum_n s * c[n] + d * x[p]
 *   finish  out = gated RMSNorm of y with the dequantized int8 z, then the online Hadamard
 *           transform (csrc/hadamard.c) when the layer rotates its output.
 *
 * The state is streamed once, 16 values per vector, dequantized, updated, requantized and stored in
 * place; the new fp32 state is used for y while still in registers, never stored. One call for the
 * batch, where numba's three phases cost ~24 us of dispatch a layer at batch 1.
 */
#include <stddef.h>
#include <stdlib.h>

#include "ssm_decode.h"

#define GROUP (4 * LANES) /* state values per 64-byte line */

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



/* A layer's constants, as quamba2_ssm.Quamba2CpuWeights holds them (quamba2_ssm._DecodeLayer
 * mirrors this struct); C = conv_dim, H = num_heads, I = H * head_dim, N = state_size. */
struct quamba2_decode_layer {
    const float *xbc_in_scale, *xbc_in_inv;                 /* [C]: the conv input's int8 grid */
    const float *conv_weight_t;                             /* [K, C]: taps outermost */
    const float *conv_bias, *xbc_out_scale, *xbc_out_inv;   /* [C] */
    const float *dt_bias, *A, *D;                           /* [H] */
    const float *norm_weight;                               /* [I] */
    const int64_t *state_scale_row;                         /* [I]: each state row's scale row */
    const float *state_scale_table, *state_inv_table;       /* [R, N] */
    const float *hadamard_base;                             /* [m, m]; NULL: no rotation */
    int64_t hadamard_m;
    float hadamard_scale, z_scale, z_inv, dt_scale, dt_inv, norm_eps;
    int64_t num_heads, head_dim, state_size, n_groups, conv_kernel;
};


/* rint(clamp(value * inv_scale, -128, 127)) as int32 lanes (cvtps rounds ties to even). */
static ALWAYS_INLINE AVX512_VNNI __m512i quantize_vector(__m512 value, __m512 inv_scale) {
    const __m512 v = _mm512_mul_ps(value, inv_scale);
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-128.0f)), _mm512_set1_ps(127.0f)));
}

static ALWAYS_INLINE AVX512_VNNI __m512 fake_quant(__m512 value, __m512 inv_scale, __m512 scale) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(quantize_vector(value, inv_scale)), scale);
}


/* The conv window of a slot (K-1 rows of C int8 at the given strides) to or from a contiguous
 * copy: vLLM's "DS" layout strides the channels. */
static void copy_window(int8_t *slot, int64_t state_stride, int64_t channel_stride, int8_t *window, int64_t rows,
                        int64_t conv_dim, int to_slot) {
    for (int64_t j = 0; j < rows; j++) {
        int8_t *cached = slot + j * state_stride, *local = window + j * conv_dim;
        for (int64_t c = 0; c < conv_dim; c++) {
            if (to_slot)
                cached[c * channel_stride] = local[c];
            else
                local[c] = cached[c * channel_stride];
        }
    }
}

/* One token of the int8 causal conv1d with SiLU and the requantization of its output (numba's
 * _conv_token): window [K-1, C] (oldest first) is shifted to end with this token's quantized
 * inputs; xbc [C] gets x, B and C of the SSM. Each channel sums its taps oldest first. */
static AVX512_VNNI void conv_token(const struct quamba2_decode_layer *layer, const float *xbc_in, int8_t *window,
                                   int64_t conv_dim, float *xbc) {
    const int64_t state_len = layer->conv_kernel - 1;
    for (int64_t c = 0; c < conv_dim; c += LANES) {
        const __mmask16 mask = tail_mask(conv_dim - c);
        const __m512 scale = _mm512_maskz_loadu_ps(mask, layer->xbc_in_scale + c);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < state_len; j++) {
            const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, window + j * conv_dim + c)));
            const __m512 weight = _mm512_maskz_loadu_ps(mask, layer->conv_weight_t + j * conv_dim + c);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_mul_ps(q, scale), weight));
        }
        const __m512i newest =
            quantize_vector(_mm512_maskz_loadu_ps(mask, xbc_in + c), _mm512_maskz_loadu_ps(mask, layer->xbc_in_inv + c));
        const __m512 weight = _mm512_maskz_loadu_ps(mask, layer->conv_weight_t + state_len * conv_dim + c);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(newest), scale), weight));
        acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, layer->conv_bias + c));
        const __m512 out = fake_quant(silu_avx512(acc), _mm512_maskz_loadu_ps(mask, layer->xbc_out_inv + c),
                                      _mm512_maskz_loadu_ps(mask, layer->xbc_out_scale + c));
        _mm512_mask_storeu_ps(xbc + c, mask, out);
        for (int64_t j = 0; j + 1 < state_len; j++)
            _mm_mask_storeu_epi8(window + j * conv_dim + c, mask, _mm_maskz_loadu_epi8(mask, window + (j + 1) * conv_dim + c));
        if (state_len > 0)
            _mm512_mask_cvtepi32_storeu_epi8(window + (state_len - 1) * conv_dim + c, mask, newest);
    }
}

/* dt = softplus(dequantized int8 dt_in + dt_bias) (torch's threshold 20), decay = exp(dt * A):
 * numba calls the same libm expf and log1pf. */
static void effective_dt(const struct quamba2_decode_layer *layer, const float *dt_in, float *dt, float *decay) {
    for (int64_t h = 0; h < layer->num_heads; h++) {
        const float q = rintf(fminf(fmaxf(dt_in[h] * layer->dt_inv, -128.0f), 127.0f));
        softplus_and_decay(q * layer->dt_scale + layer->dt_bias[h], layer->A[h], dt + h, decay + h);
    }
}

/* The state update of one sequence's slot [I, N] in place -> y [I]; next_slot (or NULL) is
 * prefetched while the last rows stream. */
static AVX512_VNNI void update_states(const struct quamba2_decode_layer *layer, int8_t *slot, const int8_t *next_slot,
                                      const float *xbc, const float *dt, const float *decay, float *y) {
    const int64_t state_size = layer->state_size, rows = layer->num_heads * layer->head_dim;
    const int64_t heads_per_group = layer->num_heads / layer->n_groups, slot_bytes = rows * state_size;
    for (int64_t h = 0; h < layer->num_heads; h++) {
        const int64_t g = h / heads_per_group;
        const float *b = xbc + rows + g * state_size, *c = xbc + rows + (layer->n_groups + g) * state_size;
        for (int64_t r = h * layer->head_dim; r < (h + 1) * layer->head_dim; r++) {
            const int64_t table_offset = layer->state_scale_row[r] * state_size;
            prefetch_ahead(slot, next_slot, r * state_size, state_size, slot_bytes);
            const float dot = update_row(slot + r * state_size, state_size, layer->state_scale_table + table_offset,
                                         layer->state_inv_table + table_offset, b, c, decay[h], dt[h] * xbc[r]);
            y[r] = dot + layer->D[h] * xbc[r];
        }
    }
}

/* out [I] = the gated RMSNorm of y with the dequantized int8 z (per group of I / G channels),
 * then the Hadamard transform when the layer rotates (scratch: I floats). */
static AVX512_VNNI void finish_token(const struct quamba2_decode_layer *layer, const float *y, const float *z_in,
                                     float *out, float *scratch) {
    const int64_t size = layer->num_heads * layer->head_dim, group = size / layer->n_groups;
    const __m512 z_inv = _mm512_set1_ps(layer->z_inv), z_scale = _mm512_set1_ps(layer->z_scale);
    for (int64_t i = 0; i < size; i += LANES) {
        const __mmask16 mask = tail_mask(size - i);
        const __m512 z = fake_quant(_mm512_maskz_loadu_ps(mask, z_in + i), z_inv, z_scale);
        _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, y + i), silu_avx512(z)));
    }
    normalize_groups(out, size, group, layer->norm_weight, layer->norm_eps);
    if (layer->hadamard_base != NULL)
        quamba_hadamard_row_avx512(out, size, layer->hadamard_base, layer->hadamard_m, layer->hadamard_scale, scratch);
}

/* One token for each of batch sequences: zxbcdt [batch, I + C + H] (contiguous rows of z, xBC,
 * dt) -> out [batch, I]. Sequence i's conv window is the int8 [K-1, C] at conv + slots[i] *
 * conv_slot_stride (row and channel strides given), its SSM state the contiguous int8 [I, N] at
 * ssm + slots[i] * ssm_slot_stride; both are updated in place. Returns 0, or -1 where the work
 * space cannot be allocated (nothing written then). */
AVX512_VNNI int quamba_quamba2_ssm_decode_avx512_vnni(const struct quamba2_decode_layer *layer, const float *zxbcdt,
                                                      int64_t batch, const int64_t *slots, int8_t *conv,
                                                      int64_t conv_slot_stride, int64_t conv_state_stride,
                                                      int64_t conv_channel_stride, int8_t *ssm, int64_t ssm_slot_stride,
                                                      float *out) {
    const int64_t heads = layer->num_heads, intermediate = heads * layer->head_dim;
    const int64_t conv_dim = intermediate + 2 * layer->n_groups * layer->state_size;
    const int64_t row_length = intermediate + conv_dim + heads, window_rows = layer->conv_kernel - 1;
    float *work = malloc(sizeof(float) * (conv_dim + 2 * heads + 2 * intermediate) + window_rows * conv_dim);
    if (work == NULL)
        return -1;
    float *xbc = work, *dt = xbc + conv_dim, *decay = dt + heads, *y = decay + heads, *scratch = y + intermediate;
    int8_t *window = (int8_t *)(scratch + intermediate);
    for (int64_t i = 0; i < batch; i++) {
        const float *token = zxbcdt + i * row_length;
        int8_t *conv_slot = conv + slots[i] * conv_slot_stride;
        copy_window(conv_slot, conv_state_stride, conv_channel_stride, window, window_rows, conv_dim, 0);
        conv_token(layer, token + intermediate, window, conv_dim, xbc);
        copy_window(conv_slot, conv_state_stride, conv_channel_stride, window, window_rows, conv_dim, 1);
        effective_dt(layer, token + intermediate + conv_dim, dt, decay);
        const int8_t *next_slot = i + 1 < batch ? ssm + slots[i + 1] * ssm_slot_stride : NULL;
        update_states(layer, ssm + slots[i] * ssm_slot_stride, next_slot, xbc, dt, decay, y);
        finish_token(layer, y, token, out + i * intermediate, scratch);
    }
    free(work);
    return 0;
}
