"""numba loops behind w4_linear's CPU path; imported on first call, never at plugin registration.

Weights arrive as the bytes of compressed-tensors' packed int32 words ([N, K_bytes] uint8, x86 is
little-endian): byte t of a row holds k = 2t in its low nibble and k = 2t + 1 in its high one, each
as q + 8. Activations are first split into even and odd columns (x_even[m, t] = x[m, 2t],
x_odd[m, t] = x[m, 2t + 1], zero past K), so both nibbles of a byte meet their x at the same index
and the inner loops are plain contiguous loops that LLVM vectorizes (checked in the assembly).
Everything per call happens in one compiled call: the torch-side glue cost more than the kernel
on small layers.

What vectorization needs here:
- the nibbles' integer results cast back to int8: numba widens integer arithmetic to int64, and
  int64 -> float conversion has no AVX2 instruction (and is slow with AVX-512): 1.6x slower GEMV.
- loops over slices from index 0: from a runtime start an index may be negative, and numba's
  wraparound then turns every load into a gather.
- fastmath, which lets LLVM reorder the float sums into vector accumulators.
W4A8 passes its int8 activations as floats: every product and partial sum within a group is an
integer below 2^24, exact in float32 in any order.
"""

import numpy as np
from numba import njit

from ._numba_prefetch import prefetch_rows

ROW_BLOCK = 4  # weight rows and x rows per block: 16 float accumulators, reductions overlap
# Weight rows requested ahead of the block in use (decode reads each weight byte once, from
# DRAM): see _numba_prefetch.py.
PREFETCH_ROWS = 2 * ROW_BLOCK


@njit(cache=True, inline="always")
def _q_low(byte):
    """q of one weight byte's low nibble (k even) as int8 in [-8, 7]."""
    return np.int8(np.int8(byte & np.uint8(15)) - np.int8(8))


@njit(cache=True, inline="always")
def _q_high(byte):
    """q of one weight byte's high nibble (k odd) as int8 in [-8, 7]."""
    return np.int8(np.int8(byte >> np.uint8(4)) - np.int8(8))


@njit(cache=True, inline="always")
def _nibbles(byte):
    """(q_low, q_high) of one weight byte as float32 in [-8, 7]."""
    return np.float32(_q_low(byte)), np.float32(_q_high(byte))


@njit(cache=True, fastmath=True, inline="always")
def _dot_one_row(weights, x_even, x_odd):
    total = np.float32(0.0)
    for t in range(x_even.shape[0]):
        low, high = _nibbles(weights[t])
        total += low * x_even[t] + high * x_odd[t]
    return total


@njit(cache=True, fastmath=True, inline="always")
def _dot_four_rows(weights0, weights1, weights2, weights3, x_even, x_odd):
    total0 = total1 = total2 = total3 = np.float32(0.0)
    for t in range(x_even.shape[0]):
        even, odd = x_even[t], x_odd[t]
        low, high = _nibbles(weights0[t])
        total0 += low * even + high * odd
        low, high = _nibbles(weights1[t])
        total1 += low * even + high * odd
        low, high = _nibbles(weights2[t])
        total2 += low * even + high * odd
        low, high = _nibbles(weights3[t])
        total3 += low * even + high * odd
    return total0, total1, total2, total3


@njit(cache=True, fastmath=True, inline="always")
def _dot_four_by_four(weights0, weights1, weights2, weights3, even0, odd0, even1, odd1, even2, odd2, even3, odd3):
    """Dots of 4 weight rows with 4 x rows: each byte unpacked once for 4 x rows, each x load
    shared by 4 weight rows. Returns the 16 sums, weight-row-major."""
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0.0)
    for t in range(even0.shape[0]):
        e0, o0, e1, o1 = even0[t], odd0[t], even1[t], odd1[t]
        e2, o2, e3, o3 = even2[t], odd2[t], even3[t], odd3[t]
        low, high = _nibbles(weights0[t])
        s00 += low * e0 + high * o0
        s01 += low * e1 + high * o1
        s02 += low * e2 + high * o2
        s03 += low * e3 + high * o3
        low, high = _nibbles(weights1[t])
        s10 += low * e0 + high * o0
        s11 += low * e1 + high * o1
        s12 += low * e2 + high * o2
        s13 += low * e3 + high * o3
        low, high = _nibbles(weights2[t])
        s20 += low * e0 + high * o0
        s21 += low * e1 + high * o1
        s22 += low * e2 + high * o2
        s23 += low * e3 + high * o3
        low, high = _nibbles(weights3[t])
        s30 += low * e0 + high * o0
        s31 += low * e1 + high * o1
        s32 += low * e2 + high * o2
        s33 += low * e3 + high * o3
    return (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)


@njit(cache=True, fastmath=True)
def _four_rows_by_four(weight_bytes, scales, x_even, x_odd, group_bytes, n, m, out):
    k_bytes = weight_bytes.shape[1]
    for g in range(scales.shape[1]):
        start = g * group_bytes
        stop = min(start + group_bytes, k_bytes)
        sums = _dot_four_by_four(
            weight_bytes[n, start:stop], weight_bytes[n + 1, start:stop], weight_bytes[n + 2, start:stop],
            weight_bytes[n + 3, start:stop], x_even[m, start:stop], x_odd[m, start:stop],
            x_even[m + 1, start:stop], x_odd[m + 1, start:stop], x_even[m + 2, start:stop],
            x_odd[m + 2, start:stop], x_even[m + 3, start:stop], x_odd[m + 3, start:stop],
        )  # fmt: skip
        for i in range(ROW_BLOCK):
            scale = scales[n + i, g]
            for j in range(ROW_BLOCK):
                out[m + j, n + i] += scale * sums[ROW_BLOCK * i + j]


@njit(cache=True, fastmath=True)
def _four_rows_by_one(weight_bytes, scales, x_even, x_odd, group_bytes, n, m, out):
    k_bytes = weight_bytes.shape[1]
    for g in range(scales.shape[1]):
        start = g * group_bytes
        stop = min(start + group_bytes, k_bytes)
        sums = _dot_four_rows(
            weight_bytes[n, start:stop], weight_bytes[n + 1, start:stop], weight_bytes[n + 2, start:stop],
            weight_bytes[n + 3, start:stop], x_even[m, start:stop], x_odd[m, start:stop],
        )  # fmt: skip
        for i in range(ROW_BLOCK):
            out[m, n + i] += scales[n + i, g] * sums[i]


@njit(cache=True, fastmath=True)
def _one_row_by_one(weight_bytes, scales, x_even, x_odd, group_bytes, n, m, out):
    k_bytes = weight_bytes.shape[1]
    for g in range(scales.shape[1]):
        start = g * group_bytes
        stop = min(start + group_bytes, k_bytes)
        out[m, n] += scales[n, g] * _dot_one_row(weight_bytes[n, start:stop], x_even[m, start:stop], x_odd[m, start:stop])


@njit(cache=True, fastmath=True)
def w4_matmul(weight_bytes, scales, x_even, x_odd, group_bytes, x_rows_per_pass, out):
    """out[m, n] += sum_g scales[n, g] * (group g's dot of weight row n with x row m).

    Blocks of 4 weight rows x 4 x rows; leftovers by 4 x 1 and 1 x 1. x is taken x_rows_per_pass
    rows at a time so that the rows in use stay in L2 while every weight row passes by.
    """
    num_rows = weight_bytes.shape[0]
    num_x_rows = x_even.shape[0]
    blocked_rows = num_rows - num_rows % ROW_BLOCK
    row_bytes, flat_bytes = weight_bytes.shape[1], weight_bytes.reshape(-1)
    for pass_start in range(0, num_x_rows, x_rows_per_pass):
        pass_stop = min(pass_start + x_rows_per_pass, num_x_rows)
        blocked_stop = pass_stop - (pass_stop - pass_start) % ROW_BLOCK
        for n in range(0, blocked_rows, ROW_BLOCK):
            prefetch_rows(flat_bytes, row_bytes, n + PREFETCH_ROWS, n + PREFETCH_ROWS + ROW_BLOCK)
            for m in range(pass_start, blocked_stop, ROW_BLOCK):
                _four_rows_by_four(weight_bytes, scales, x_even, x_odd, group_bytes, n, m, out)
            for m in range(blocked_stop, pass_stop):
                _four_rows_by_one(weight_bytes, scales, x_even, x_odd, group_bytes, n, m, out)
        for n in range(blocked_rows, num_rows):
            for m in range(pass_start, pass_stop):
                _one_row_by_one(weight_bytes, scales, x_even, x_odd, group_bytes, n, m, out)


@njit(cache=True)
def _split_even_odd(x, k_bytes, quantize, input_scale):
    """x [M, K] -> (x_even, x_odd) float32 [M, k_bytes], zero past K; int8-quantized if asked.

    The quantization is kernels.quant.quantize_int8's: round half to even of x * (1 / scale),
    both products in float32, clamped to [-128, 127]. No fastmath here: it must round the same.
    """
    rows, in_features = x.shape
    inverse_scale = np.float32(1.0) / np.float32(input_scale)  # float32, as torch computes it
    x_even = np.zeros((rows, k_bytes), dtype=np.float32)
    x_odd = np.zeros((rows, k_bytes), dtype=np.float32)
    for m in range(rows):
        for k in range(in_features):
            value = np.float32(x[m, k])
            if quantize:
                value = min(max(np.rint(value * inverse_scale), np.float32(-128.0)), np.float32(127.0))
            if k % 2 == 0:
                x_even[m, k // 2] = value
            else:
                x_odd[m, k // 2] = value
    return x_even, x_odd


@njit(cache=True)
def w4_linear(weight_bytes, scales, x, group_bytes, x_rows_per_pass, quantize, input_scale):
    """float32 y [M, N]: W4A16 (quantize False) or W4A8 (quantize True, y scaled by input_scale)."""
    x_even, x_odd = _split_even_odd(x, weight_bytes.shape[1], quantize, input_scale)
    out = np.zeros((x.shape[0], weight_bytes.shape[0]), dtype=np.float32)
    w4_matmul(weight_bytes, scales, x_even, x_odd, group_bytes, x_rows_per_pass, out)
    if quantize:
        out *= np.float32(input_scale)
    return out


# Helpers of the GEMM-library candidates (w4_linear.cpu_candidates): the weight is unpacked one
# tile of rows at a time into a buffer for torch.mm or torch._int_mm, even k (low nibbles) before
# odd k (high nibbles), the order of x_even then x_odd, so that every store is contiguous (with
# k in place, the interleaved stores did not vectorize: 2 ns per weight).


@njit(cache=True)
def dequantize_rows(weight_bytes, scales, group_bytes, start, out):
    """out [rows, 2 * k_bytes] float32: q * scale of weight rows start:start + rows, even k in
    columns :k_bytes, odd k after (padding nibbles past K included: the caller zeroes x there)."""
    k_bytes = weight_bytes.shape[1]
    for i in range(out.shape[0]):
        for g in range(scales.shape[1]):
            first, stop = g * group_bytes, min((g + 1) * group_bytes, k_bytes)
            row = weight_bytes[start + i, first:stop]
            even, odd = out[i, first:stop], out[i, k_bytes + first : k_bytes + stop]
            scale = scales[start + i, g]
            for t in range(row.shape[0]):
                low, high = _nibbles(row[t])
                even[t] = low * scale
                odd[t] = high * scale


@njit(cache=True)
def unpack_groups(weight_bytes, group_bytes, start, out):
    """out int8 [groups, rows, 2 * group_bytes]: q of weight rows start:start + rows, group by
    group, even k then odd k within each group, zero past the packed words."""
    k_bytes = weight_bytes.shape[1]
    out[:] = 0
    for g in range(out.shape[0]):
        first, stop = g * group_bytes, min((g + 1) * group_bytes, k_bytes)
        for i in range(out.shape[1]):
            row = weight_bytes[start + i, first:stop]
            even, odd = out[g, i, : stop - first], out[g, i, group_bytes : group_bytes + stop - first]
            # row[t] read twice, on purpose: from one load LLVM unrolled the vector loop to 128
            # bytes, more than a group of 128 k holds (64 bytes), and the loop ran scalar (3x).
            for t in range(row.shape[0]):
                even[t] = _q_low(row[t])
                odd[t] = _q_high(row[t])


@njit(cache=True)
def scale_group_sums(acc, scales_t, start, input_scale, out):
    """out[m, start + n] = input_scale * sum_g scales_t[g, start + n] * acc[g, m, n] (in g
    order, as w4_matmul accumulates), for int32 acc [groups, M, rows] and the transposed
    scales [groups, N]: loops over n innermost, which vectorize."""
    rows = acc.shape[2]
    for m in range(acc.shape[1]):
        total = out[m, start : start + rows]
        total[:] = 0.0
        for g in range(acc.shape[0]):
            scale, sums = scales_t[g, start : start + rows], acc[g, m]
            for n in range(rows):
                total[n] += scale[n] * np.float32(sums[n])
        for n in range(rows):
            total[n] *= np.float32(input_scale)
