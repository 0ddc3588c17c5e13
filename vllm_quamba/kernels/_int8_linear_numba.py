"""numba kernels of the CPU W8A8 linear (see int8_linear.py); imported on first use only.

One fused pass per call: quantize x to int8, int32 dot products, fp32 epilogue (the first and
last also serve int8_linear's torch._int_mm path). fastmath stays
off: integer sums are exact without it, and it would let LLVM contract the epilogue's multiply
and add into an FMA, which rounds differently from the torch reference.

The dot products are written as scalar int32 loops over K that LLVM vectorizes for the host
CPU (sign-extend, multiply, add in int32 lanes; checked in the assembly: vpmaddwd in the
single-row dot, vpmulld in the 4x4 tile); every intermediate is cast back to int32 because numba
would otherwise widen int32 arithmetic to int64 and halve the lanes per instruction.
"""

import numpy as np
from numba import njit

_I32 = np.int32
_F32 = np.float32
_Q_MIN, _Q_MAX = _F32(-128.0), _F32(127.0)
# Rows of x and of the weight per register tile: 4 x 4 int32 accumulators, each a vector
# reduction over K, so each weight vector loaded serves 4 rows of x. 2x4 to 8x4 tiles measured
# within noise of each other on the development CPU; 4x4 was never the slowest.
TILE = 4


@njit(cache=True, fastmath=False)
def _quantize(x, inv_scale, x_q):
    """round_half_even(x * inv_scale) clamped to int8, as quant.quantize_int8 (fp32 product)."""
    rows, cols = x.shape
    for m in range(rows):
        for k in range(cols):
            # Clamping before rounding equals rounding before clamping: the bounds are integers.
            v = min(max(x[m, k] * inv_scale, _Q_MIN), _Q_MAX)
            x_q[m, k] = np.int8(np.rint(v))


@njit(cache=True, fastmath=False, inline="always")
def _store(out, m, n, acc, input_scale, weight_scale, bias, has_bias):
    y = _F32(acc) * _F32(input_scale * weight_scale[n])
    if has_bias:
        y = _F32(y + bias[n])
    out[m, n] = y


@njit(cache=True, fastmath=False)
def _dot(x_q, m, weight, n):
    acc = _I32(0)
    for k in range(x_q.shape[1]):
        acc = _I32(acc + _I32(x_q[m, k]) * _I32(weight[n, k]))
    return acc


@njit(cache=True, fastmath=False)
def _tile_4x4(x_q, m, weight, n, input_scale, weight_scale, bias, has_bias, out):
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = _I32(0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = _I32(0)
    for k in range(x_q.shape[1]):
        w0, w1, w2, w3 = _I32(weight[n, k]), _I32(weight[n + 1, k]), _I32(weight[n + 2, k]), _I32(weight[n + 3, k])
        x0, x1, x2, x3 = _I32(x_q[m, k]), _I32(x_q[m + 1, k]), _I32(x_q[m + 2, k]), _I32(x_q[m + 3, k])
        a00 = _I32(a00 + x0 * w0)
        a01 = _I32(a01 + x0 * w1)
        a02 = _I32(a02 + x0 * w2)
        a03 = _I32(a03 + x0 * w3)
        a10 = _I32(a10 + x1 * w0)
        a11 = _I32(a11 + x1 * w1)
        a12 = _I32(a12 + x1 * w2)
        a13 = _I32(a13 + x1 * w3)
        a20 = _I32(a20 + x2 * w0)
        a21 = _I32(a21 + x2 * w1)
        a22 = _I32(a22 + x2 * w2)
        a23 = _I32(a23 + x2 * w3)
        a30 = _I32(a30 + x3 * w0)
        a31 = _I32(a31 + x3 * w1)
        a32 = _I32(a32 + x3 * w2)
        a33 = _I32(a33 + x3 * w3)
    tile = ((a00, a01, a02, a03), (a10, a11, a12, a13), (a20, a21, a22, a23), (a30, a31, a32, a33))
    for i in range(TILE):
        row = tile[i]
        for j in range(TILE):
            _store(out, m + i, n + j, row[j], input_scale, weight_scale, bias, has_bias)


@njit(cache=True, fastmath=False)
def quantize_input(x, input_scale):
    """x f32 [M, K] -> int8 [M, K] with the static scale (an fp32 value), as quantize_int8."""
    x_q = np.empty(x.shape, dtype=np.int8)
    # fp32 division is correctly rounded: the same reciprocal as torch's in quantize_int8.
    _quantize(x, _F32(1.0) / _F32(input_scale), x_q)
    return x_q


@njit(cache=True, fastmath=False)
def epilogue(acc, input_scale, weight_scale, bias, has_bias):
    """int32 sums [M, N] -> f32 [M, N]: the kernel's epilogue for sums from another GEMM."""
    out = np.empty(acc.shape, dtype=np.float32)
    input_scale = _F32(input_scale)
    for m in range(acc.shape[0]):
        for n in range(acc.shape[1]):
            _store(out, m, n, acc[m, n], input_scale, weight_scale, bias, has_bias)
    return out


@njit(cache=True, fastmath=False)
def w8a8_linear_kernel(x, input_scale, weight, weight_scale, bias, has_bias):
    """x f32 [M, K], input_scale (an fp32 value), weight int8 [N, K], weight_scale f32 [N],
    bias f32 [N] (read only when has_bias) -> f32 [M, N]."""
    rows = x.shape[0]
    cols_out = weight.shape[0]
    input_scale = _F32(input_scale)
    x_q = quantize_input(x, input_scale)
    out = np.empty((rows, cols_out), dtype=np.float32)
    full_rows = rows - rows % TILE
    full_cols = cols_out - cols_out % TILE
    # Weight tile outermost: its 4 rows stay in L1 while every row tile of x streams past.
    for n in range(0, full_cols, TILE):
        for m in range(0, full_rows, TILE):
            _tile_4x4(x_q, m, weight, n, input_scale, weight_scale, bias, has_bias, out)
    for n in range(full_cols):
        for m in range(full_rows, rows):
            _store(out, m, n, _dot(x_q, m, weight, n), input_scale, weight_scale, bias, has_bias)
    for n in range(full_cols, cols_out):
        for m in range(rows):
            _store(out, m, n, _dot(x_q, m, weight, n), input_scale, weight_scale, bias, has_bias)
    return out
