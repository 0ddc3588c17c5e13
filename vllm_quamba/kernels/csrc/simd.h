/* Shared definitions of the package's SIMD kernels (see setup.py and kernels/_simd.py). */
#ifndef VLLM_QUAMBA_SIMD_H
#define VLLM_QUAMBA_SIMD_H

#include <immintrin.h>
#include <stdint.h>

/* AVX-512 with VNNI (vpdpbusd: u8 x s8 products summed into int32 lanes), for functions that
 * only run where quamba_cpu_has_avx512_vnni() says so; the rest of the file stays baseline
 * x86-64. */
#define AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
/* AMX tiles with int8 dot products (tdpbssd), for functions that only run where
 * quamba_cpu_has_amx_int8() says so; it also asks Linux for the tile data state. */
#define AMX_INT8 __attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-int8")))
#define ALWAYS_INLINE inline __attribute__((always_inline))

/* out[i] = quantize_int8(x[i]) + offset as bytes, for count values (offset 128 makes them the
 * unsigned operand of vpdpbusd); inv_scale = 1 / input_scale, the reference's fp32 reciprocal.
 * Clamping before rounding equals rounding before clamping (the bounds are integers); cvtps
 * rounds to nearest, ties to even (the default MXCSR mode), as torch.round. */
static inline __attribute__((target("avx512f,avx512bw"))) void quantize_int8_avx512(const float *x, int64_t count,
                                                                                    float inv_scale, int32_t offset,
                                                                                    void *out) {
    uint8_t *out_bytes = out;
    const __m512 inv = _mm512_set1_ps(inv_scale);
    const __m512 low = _mm512_set1_ps(-128.0f), high = _mm512_set1_ps(127.0f);
    const __m512i offset_vector = _mm512_set1_epi32(offset);
    for (int64_t i = 0; i < count; i += 16) {
        const __mmask16 mask = count - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - i)) - 1);
        const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + i), inv), low), high);
        _mm512_mask_cvtepi32_storeu_epi8(out_bytes + i, mask, _mm512_add_epi32(_mm512_cvtps_epi32(v), offset_vector));
    }
}

/* The tiles of both AMX kernels, every one 16 rows of 64 bytes: 0 .. AMX_OUTPUT_TILES - 1
 * accumulate int32 sums, TILE_X holds x, and the weights alternate between TILE_W_EVEN and
 * TILE_W_ODD so that a tile's load overlaps the product of the one before. */
#define AMX_ROWS 16
#define AMX_ROW_BYTES 64
#define AMX_OUTPUT_TILES 4
#define TILE_X 4
#define TILE_W_EVEN 5
#define TILE_W_ODD 6

struct amx_tile_config {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

static inline AMX_INT8 void configure_amx_tiles(void) {
    struct amx_tile_config config = {.palette = 1};
    for (int tile = 0; tile <= TILE_W_ODD; tile++) {
        config.rows[tile] = AMX_ROWS;
        config.bytes_per_row[tile] = AMX_ROW_BYTES;
    }
    _tile_loadconfig(&config);
}

/* hadamard_transform_ref of one row of n floats in place (csrc/hadamard.c): base is the m x m
 * +-1 base matrix (fp32, row-major), scale = 1/sqrt(n), scratch n floats of work space. */
AVX512_VNNI void quamba_hadamard_row_avx512(float *row, int64_t n, const float *base, int64_t m, float scale,
                                            float *scratch);

/* 1 when this CPU and OS run AVX512_VNNI functions. */
int quamba_cpu_has_avx512_vnni(void);
/* 1 when this CPU runs AMX_INT8 functions and the kernel granted this process the tile state. */
int quamba_cpu_has_amx_int8(void);

#endif
