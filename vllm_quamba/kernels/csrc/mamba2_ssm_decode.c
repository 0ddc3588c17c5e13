/* One decode step of the Mamba2 fp SSM with an fp16 state (W4A16 layers) on AVX-512, the whole
 * batch in one call; the specification is mamba2_ssm.mamba2_ssm_decode_ref. Per sequence:
 *
 *   conv    xbc = SiLU(sum_j window[j] * w[j] + bias), the fp32 window (oldest first) shifted in
 *           place in its cache slot to end with this token's xBC;
 *   dt      dt = softplus(dt_in + dt_bias), decay = exp(dt * A);
 *   state   s = decay * state + (dt * x[p]) * b[n], computed in fp32 from the fp16 state and
 *           stored back as fp16 (rounded to nearest even, as torch's .to(float16));
 *           y[p] = sum_n s * c[n] + d * x[p], from the fp32 s;
 *   finish  out = gated RMSNorm of y with z, then the online Hadamard transform (csrc/hadamard.c)
 *           when the layer rotates its output.
 *
 * The state is streamed once, 16 values per vector, and prefetched ahead as in the int8 kernel.
 * One call replaces vLLM's causal_conv1d_update, selective_state_update, the gated norm and the
 * Hadamard op, and the Python between them.
 */
#include <stddef.h>
#include <stdlib.h>

#include "ssm_decode.h"

/* A layer's constants (mamba2_ssm._DecodeLayer mirrors this struct); C = conv_dim, H = num_heads,
 * I = H * head_dim. */
struct mamba2_decode_layer {
    const float *conv_weight_t;      /* [K, C]: taps outermost */
    const float *conv_bias;          /* [C], or NULL */
    const float *dt_bias, *A, *D;    /* [H] */
    const float *norm_weight;        /* [I] */
    const float *hadamard_base;      /* [m, m]; NULL: no rotation */
    int64_t hadamard_m;
    float hadamard_scale, norm_eps;
    int64_t num_heads, head_dim, state_size, n_groups, conv_kernel;
};

/* The conv of one token on its slot's window (strided: vLLM's "DS" layout strides the channels),
 * pre-activation into xbc, then the window shifted; SiLU in a vector pass after. */
static AVX512_VNNI void conv_token(const struct mamba2_decode_layer *layer, const float *xbc_in, float *slot,
                                   int64_t state_stride, int64_t channel_stride, int64_t conv_dim, float *xbc) {
    const int64_t state_len = layer->conv_kernel - 1;
    for (int64_t c = 0; c < conv_dim; c++) {
        float *window = slot + c * channel_stride;
        float acc = 0.0f;
        for (int64_t j = 0; j < state_len; j++)
            acc += window[j * state_stride] * layer->conv_weight_t[j * conv_dim + c];
        acc += xbc_in[c] * layer->conv_weight_t[state_len * conv_dim + c];
        xbc[c] = layer->conv_bias != NULL ? acc + layer->conv_bias[c] : acc;
        for (int64_t j = 0; j + 1 < state_len; j++)
            window[j * state_stride] = window[(j + 1) * state_stride];
        if (state_len > 0)
            window[(state_len - 1) * state_stride] = xbc_in[c];
    }
    for (int64_t c = 0; c < conv_dim; c += LANES) {
        const __mmask16 mask = tail_mask(conv_dim - c);
        _mm512_mask_storeu_ps(xbc + c, mask, silu_avx512(_mm512_maskz_loadu_ps(mask, xbc + c)));
    }
}

/* One state row of N fp16 values, updated in place; returns its new fp32 state . c. */
static ALWAYS_INLINE AVX512_VNNI float update_row(uint16_t *row, int64_t state_size, const float *b, const float *c,
                                                  float decay, float dt_x) {
    const __m512 decay_v = _mm512_set1_ps(decay), dt_x_v = _mm512_set1_ps(dt_x);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t n = 0; n < state_size; n += LANES) {
        const __mmask16 mask = tail_mask(state_size - n);
        const __m512 state = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, row + n));
        const __m512 s =
            _mm512_add_ps(_mm512_mul_ps(decay_v, state), _mm512_mul_ps(dt_x_v, _mm512_maskz_loadu_ps(mask, b + n)));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mask, c + n)));
        _mm256_mask_storeu_epi16(row + n, mask, _mm512_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    return _mm512_reduce_add_ps(acc);
}

/* The state update of one sequence's slot [I, N] in place -> y [I]; next_slot (or NULL) is
 * prefetched while the last rows stream. */
static AVX512_VNNI void update_states(const struct mamba2_decode_layer *layer, uint16_t *slot,
                                      const uint16_t *next_slot, const float *xbc, const float *dt,
                                      const float *decay, float *y) {
    const int64_t state_size = layer->state_size, rows = layer->num_heads * layer->head_dim;
    const int64_t heads_per_group = layer->num_heads / layer->n_groups, row_bytes = state_size * sizeof(uint16_t);
    for (int64_t h = 0; h < layer->num_heads; h++) {
        const int64_t g = h / heads_per_group;
        const float *b = xbc + rows + g * state_size, *c = xbc + rows + (layer->n_groups + g) * state_size;
        for (int64_t r = h * layer->head_dim; r < (h + 1) * layer->head_dim; r++) {
            prefetch_ahead(slot, next_slot, r * row_bytes, row_bytes, rows * row_bytes);
            const float dot = update_row(slot + r * state_size, state_size, b, c, decay[h], dt[h] * xbc[r]);
            y[r] = dot + layer->D[h] * xbc[r];
        }
    }
}

/* out [I] = the gated RMSNorm of y with z (per group of I / G channels), then the Hadamard
 * transform when the layer rotates (scratch: I floats). */
static AVX512_VNNI void finish_token(const struct mamba2_decode_layer *layer, const float *y, const float *z,
                                     float *out, float *scratch) {
    const int64_t size = layer->num_heads * layer->head_dim;
    for (int64_t i = 0; i < size; i += LANES) {
        const __mmask16 mask = tail_mask(size - i);
        const __m512 gate = silu_avx512(_mm512_maskz_loadu_ps(mask, z + i));
        _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, y + i), gate));
    }
    normalize_groups(out, size, size / layer->n_groups, layer->norm_weight, layer->norm_eps);
    if (layer->hadamard_base != NULL)
        quamba_hadamard_row_avx512(out, size, layer->hadamard_base, layer->hadamard_m, layer->hadamard_scale, scratch);
}

/* One token for each of batch sequences: zxbcdt [batch, I + C + H] (contiguous rows of z, xBC,
 * dt) -> out [batch, I]. Sequence i's conv window is the fp32 [K-1, C] at conv + slots[i] *
 * conv_slot_stride (row and channel strides given), its SSM state the contiguous fp16 [I, N] at
 * ssm + slots[i] * ssm_slot_stride; both are updated in place. Returns 0, or -1 where the work
 * space cannot be allocated (nothing written then). */
AVX512_VNNI int quamba_mamba2_ssm_decode_avx512(const struct mamba2_decode_layer *layer, const float *zxbcdt,
                                                int64_t batch, const int64_t *slots, float *conv,
                                                int64_t conv_slot_stride, int64_t conv_state_stride,
                                                int64_t conv_channel_stride, uint16_t *ssm, int64_t ssm_slot_stride,
                                                float *out) {
    const int64_t heads = layer->num_heads, intermediate = heads * layer->head_dim;
    const int64_t conv_dim = intermediate + 2 * layer->n_groups * layer->state_size;
    const int64_t row_length = intermediate + conv_dim + heads;
    float *work = malloc(sizeof(float) * (conv_dim + 2 * heads + 2 * intermediate));
    if (work == NULL)
        return -1;
    float *xbc = work, *dt = xbc + conv_dim, *decay = dt + heads, *y = decay + heads, *scratch = y + intermediate;
    for (int64_t i = 0; i < batch; i++) {
        const float *token = zxbcdt + i * row_length, *dt_in = token + intermediate + conv_dim;
        conv_token(layer, token + intermediate, conv + slots[i] * conv_slot_stride, conv_state_stride,
                   conv_channel_stride, conv_dim, xbc);
        for (int64_t h = 0; h < heads; h++)
            softplus_and_decay(dt_in[h] + layer->dt_bias[h], layer->A[h], dt + h, decay + h);
        const uint16_t *next_slot = i + 1 < batch ? ssm + slots[i + 1] * ssm_slot_stride : NULL;
        update_states(layer, ssm + slots[i] * ssm_slot_stride, next_slot, xbc, dt, decay, y);
        finish_token(layer, y, token, out + i * intermediate, scratch);
    }
    free(work);
    return 0;
}
